//! `confab-load all` end to end at a tiny scale: it starts the gateway binary built beside
//! it and the raw baseline, runs every mode, and writes a report whose figures add up.
//! (The figures themselves are measured on demand, README "Performance"; this checks the
//! tool and its report, not the machine.)

use std::path::PathBuf;
use std::process::Command;

#[test]
fn every_mode_runs_and_reports_consistent_figures() {
    let load = PathBuf::from(env!("CARGO_BIN_EXE_confab-load"));
    let gateway = load.with_file_name("confab-gateway");
    assert!(
        gateway.exists(),
        "{} is missing: build the workspace (cargo build --workspace) first",
        gateway.display()
    );
    let scratch = tempfile::tempdir().expect("scratch");
    let out = scratch.path().join("report.json");
    let status = Command::new(&load)
        .args(["all", "--gateway-bin"])
        .arg(&gateway)
        .arg("--scratch")
        .arg(scratch.path())
        .arg("--out")
        .arg(&out)
        .args([
            "--connections",
            "40",
            "--hold-s",
            "2",
            "--rooms",
            "2",
            "--members",
            "3",
            "--start-rate",
            "20",
            "--steps",
            "2",
            "--step-s",
            "1",
            "--append-connections",
            "4",
            "--window",
            "2",
            "--duration-s",
            "1",
            "--backlog",
            "300",
            "--repeats",
            "2",
        ])
        .status()
        .expect("run confab-load");
    assert!(status.success(), "confab-load all failed: {status}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("report")).expect("json");

    let resume = &report["resume"];
    assert_eq!(resume["backlog"], 300);
    assert_eq!(resume["replays"].as_array().map(Vec::len), Some(2));

    let append = &report["append"]["confab"];
    assert!(
        append["accepted"].as_u64().unwrap_or(0) > 0,
        "no appends: {append}"
    );
    assert_eq!(append["refused"], 0);
    assert!(
        report["append"]["sqlite_each"]["rows_per_s"]
            .as_f64()
            .unwrap_or(0.0)
            > 0.0
    );

    for side in ["confab", "raw"] {
        let f = &report["fanout"][side];
        assert_eq!(f["gaps"], 0, "{side}: {f}");
        assert_eq!(f["duplicates"], 0, "{side}: {f}");
        assert_eq!(f["closed"], 0, "{side}: {f}");
        let steps = f["steps"].as_array().expect("steps");
        assert!(!steps.is_empty());
        for step in steps {
            // At a few dozen messages a second everything is delivered, to every member.
            assert_eq!(step["delivered"], step["expected"], "{side}: {step}");
            assert_eq!(
                step["expected"].as_u64(),
                step["sent"].as_u64().map(|s| s * 3)
            );
        }
        let idle = &report["idle"][side];
        assert_eq!(idle["connected"], 40, "{side}: {idle}");
        assert_eq!(idle["lost"], 0, "{side}: {idle}");
        assert!(
            idle["per_connection_kib_max"].as_f64().is_some(),
            "{side}: no memory figure"
        );
    }
    assert!(report["machine"]["cpus"].as_u64().unwrap_or(0) >= 1);
}
