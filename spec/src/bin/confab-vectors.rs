//! Writes or checks `vectors/*.json` and the requirement index of `spec/SPEC.md`.
//!
//! ```text
//! cargo run -p confab-spec --bin confab-vectors -- --write   # regenerate
//! cargo run -p confab-spec --bin confab-vectors -- --check   # fail if stale
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let write = match mode.as_str() {
        "--write" => true,
        "--check" => false,
        _ => {
            eprintln!("usage: confab-vectors --write | --check");
            return ExitCode::from(2);
        }
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut stale = Vec::new();
    let mut files: Vec<(PathBuf, String)> = confab_spec::vectors::generate()
        .into_iter()
        .map(|f| (root.join("vectors").join(f.name), f.text))
        .collect();
    let spec_path = root.join("spec").join("SPEC.md");
    match std::fs::read_to_string(&spec_path) {
        Ok(spec) => files.push((spec_path, confab_spec::requirements::with_index(&spec))),
        Err(e) => {
            eprintln!("cannot read {}: {e}", spec_path.display());
            return ExitCode::FAILURE;
        }
    }
    for (path, text) in files {
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current == text {
            continue;
        }
        if write {
            if let Err(e) = std::fs::write(&path, &text) {
                eprintln!("cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            println!("wrote {}", path.display());
        } else {
            stale.push(path.display().to_string());
        }
    }
    if stale.is_empty() {
        println!("vectors and requirement index are up to date");
        ExitCode::SUCCESS
    } else {
        eprintln!("stale: {}", stale.join(", "));
        ExitCode::FAILURE
    }
}
