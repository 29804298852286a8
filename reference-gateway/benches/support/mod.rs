//! What the gateway's benchmarks share: a scratch directory in RAM and criterion's
//! medians, read back to print ratios against the baseline measured in the same run.

#![allow(dead_code)] // each bench uses a part

use std::path::PathBuf;

/// A temporary directory in /dev/shm when there is one (the figures then measure the
/// gateway and SQLite, not the disk).
pub fn scratch() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("tempdir")
}

/// The median of benchmark `id` ("group/function") in ns, from criterion's output of
/// this run.
pub fn median(id: &str) -> Option<f64> {
    let root = PathBuf::from(
        std::env::var("CARGO_TARGET_DIR")
            .unwrap_or_else(|_| format!("{}/../target", env!("CARGO_MANIFEST_DIR"))),
    )
    .join("criterion");
    let text = std::fs::read_to_string(root.join(id).join("new/estimates.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["median"]["point_estimate"].as_f64()
}
