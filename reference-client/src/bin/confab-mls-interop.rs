//! `confab-mls-interop`: runs IETF MLS interop scenario scripts with every actor played by
//! openmls or mls-rs, in every assignment, verifying the common group state after every
//! step. Exits non-zero on any failure; the last line is `N passed, N failed, N skipped`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use confab_client::interop::{self, AssignMode, Outcome};
use confab_client::mls::EngineKind;

/// Cross-checks openmls and mls-rs on IETF interop scenario scripts.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// A scenario config file (JSON with a "scripts" object), for example
    /// ../shared/mls-interop-scenarios/commit.json. Repeat for several files.
    #[arg(long, required = true)]
    config: Vec<PathBuf>,
    /// Engines actors may be played by, comma-separated.
    #[arg(long, default_value = "openmls,mls-rs", value_delimiter = ',')]
    engines: Vec<String>,
    /// `all` (every assignment, up to 64, then a seeded sample) or `random:N`.
    #[arg(long, default_value = "all")]
    assign: String,
    /// Seed for sampled assignments.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut engines = Vec::new();
    for name in &args.engines {
        match EngineKind::parse(name) {
            Some(e) => engines.push(e),
            None => {
                eprintln!("error: unknown engine {name:?} (expected openmls or mls-rs)");
                return ExitCode::from(2);
            }
        }
    }
    let mode = match args.assign.as_str() {
        "all" => AssignMode::All,
        other => match other.strip_prefix("random:").and_then(|n| n.parse().ok()) {
            Some(n) => AssignMode::Random(n),
            None => {
                eprintln!("error: --assign must be `all` or `random:N`, not {other:?}");
                return ExitCode::from(2);
            }
        },
    };
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for path in &args.config {
        let scripts = match interop::load_config(path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
        for script in scripts {
            let actors = interop::actors(&script);
            for assignment in interop::assignments(&actors, &engines, mode, args.seed) {
                let dir = match tempfile::tempdir() {
                    Ok(d) => d,
                    Err(e) => {
                        eprintln!("error: temporary directory: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                let who = interop::describe(&assignment);
                match interop::run_script(&script, &assignment, dir.path()) {
                    Outcome::Passed => {
                        passed += 1;
                        println!("PASS {} [{who}]", script.name);
                    }
                    Outcome::Failed { step, reason } => {
                        failed += 1;
                        println!("FAIL {} [{who}] step {step}: {reason}", script.name);
                    }
                    Outcome::Unsupported {
                        step,
                        action,
                        reason,
                    } => {
                        skipped += 1;
                        println!(
                            "UNSUPPORTED {} [{who}] step {step} ({action}): {reason}",
                            script.name
                        );
                    }
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed, {skipped} skipped");
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
