//! What the spec benchmarks share: criterion's medians, read back to print ratios against
//! the baseline measured in the same run.

use std::path::PathBuf;

/// The median of benchmark `group/id` in ns, from criterion's output of this run.
pub fn median(group: &str, id: &str) -> Option<f64> {
    let root = PathBuf::from(
        std::env::var("CARGO_TARGET_DIR")
            .unwrap_or_else(|_| format!("{}/../target", env!("CARGO_MANIFEST_DIR"))),
    )
    .join("criterion")
    .join(group);
    let text = std::fs::read_to_string(root.join(id).join("new/estimates.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["median"]["point_estimate"].as_f64()
}
