//! Every IETF interop scenario script in `../shared/mls-interop-scenarios/` runs through
//! `confab-mls-interop`'s harness in every engine assignment (`--assign all`). No run may
//! fail; runs that reach an action the harness does not drive stop there with a reason.

use std::path::PathBuf;

use confab_client::interop::{self, AssignMode, Outcome};
use confab_client::mls::EngineKind;

fn scenarios_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("CONFAB_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
        .join("mls-interop-scenarios");
    if dir.is_dir() {
        return Some(dir);
    }
    let msg = format!(
        "IETF interop scenarios not found at {} (set CONFAB_SHARED_DIR)",
        dir.display()
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg}");
    }
    eprintln!("\n!!! SKIPPED: {msg}\n");
    None
}

fn scratch() -> tempfile::TempDir {
    // Engine state is fsynced on every operation; tmpfs keeps this test fast.
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("tempdir")
}

#[test]
fn every_scenario_script_in_every_assignment() {
    let Some(dir) = scenarios_dir() else { return };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("read scenarios")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 7,
        "expected the 7 scenario files, found {}",
        files.len()
    );
    let (mut passed, mut failures, mut unsupported) = (0, Vec::new(), 0);
    let mut passed_scripts = std::collections::BTreeSet::new();
    for file in &files {
        for script in interop::load_config(file).expect("config") {
            let actors = interop::actors(&script);
            for assignment in interop::assignments(&actors, &EngineKind::ALL, AssignMode::All, 1) {
                let scratch = scratch();
                match interop::run_script(&script, &assignment, scratch.path()) {
                    Outcome::Passed => {
                        passed += 1;
                        passed_scripts.insert(script.name.clone());
                    }
                    Outcome::Failed { step, reason } => {
                        failures.push(format!(
                            "{} [{}] step {step}: {reason}",
                            script.name,
                            interop::describe(&assignment)
                        ));
                    }
                    Outcome::Unsupported { reason, .. } => {
                        assert!(!reason.is_empty());
                        unsupported += 1;
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} runs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!(
        "{passed} passed, 0 failed, {unsupported} unsupported; scripts passing: {passed_scripts:?}"
    );
    for needed in [
        "commit/add",
        "commit/remove",
        "commit/update",
        "commit/empty",
        "application/out_of_order_across_epochs",
        "welcome_join/with_path_secret",
    ] {
        assert!(passed_scripts.contains(needed), "{needed} never passed");
    }
}

#[test]
fn assignments_enumerate_every_combination_then_sample() {
    let actors: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    let all = interop::assignments(&actors, &EngineKind::ALL, AssignMode::All, 7);
    assert_eq!(all.len(), 8);
    let distinct: std::collections::BTreeSet<String> = all.iter().map(interop::describe).collect();
    assert_eq!(distinct.len(), 8);
    let many: Vec<String> = (0..10).map(|i| format!("actor{i}")).collect();
    assert_eq!(
        interop::assignments(&many, &EngineKind::ALL, AssignMode::All, 7).len(),
        interop::ALL_ASSIGNMENTS_MAX
    );
    let a = interop::assignments(&many, &EngineKind::ALL, AssignMode::Random(5), 42);
    let b = interop::assignments(&many, &EngineKind::ALL, AssignMode::Random(5), 42);
    assert_eq!(a, b, "the seed fixes the sample");
}
