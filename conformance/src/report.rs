//! The reports of a run: `report.json`, `junit.xml` and `index.html`.

use std::path::Path;

use crate::case::{Level, Outcome};
use crate::context::Record;

/// One case's result in a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaseReport {
    /// The case id.
    pub id: String,
    /// The requirement it checks.
    pub requirement: String,
    /// MUST or SHOULD.
    pub level: Level,
    /// What the case checks.
    pub description: String,
    /// What happened.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// How long it took, in milliseconds.
    pub duration_ms: u64,
    /// Every frame in both directions.
    pub transcript: Vec<Record>,
}

/// A whole run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    /// The server's URL.
    pub url: String,
    /// The cases, in order.
    pub cases: Vec<CaseReport>,
    /// Passed, failed, skipped.
    pub passed: usize,
    /// Failed cases.
    pub failed: usize,
    /// Skipped cases.
    pub skipped: usize,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

/// Where SPEC.md is published: the repository's copy.
pub const SPEC_URL: &str = concat!(env!("CARGO_PKG_REPOSITORY"), "/blob/main/spec/SPEC.md");

/// The link to the SPEC.md section of `requirement` (`REQ-5.4-1` → the heading of 5.4, as
/// Markdown renderers name it: `#54-auth-verification`).
pub fn spec_link(requirement: &str) -> String {
    let section = requirement
        .trim_start_matches("REQ-")
        .rsplit_once('-')
        .map_or("", |(s, _)| s);
    let heading = confab_spec::requirements::SPEC_MD.lines().find(|l| {
        let title = l.trim_start_matches('#').trim_start();
        l.starts_with('#')
            && (title.starts_with(&format!("{section} "))
                || title.starts_with(&format!("{section}. ")))
    });
    let anchor: String = heading
        .map(|h| h.trim_start_matches('#').trim().to_lowercase())
        .unwrap_or_default()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect();
    format!("{SPEC_URL}#{anchor}")
}

fn escape_xml(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '&' => "&amp;".to_owned(),
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            '"' => "&quot;".to_owned(),
            '\'' => "&#39;".to_owned(),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => format!("&#{};", c as u32),
            c => c.to_string(),
        })
        .collect()
}

/// Writes `report.json`, `junit.xml` and `index.html` into `dir`.
pub fn write(dir: &Path, run: &RunReport) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = serde_json::to_string_pretty(run).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("report.json"), json)?;
    std::fs::write(dir.join("junit.xml"), junit(run))?;
    std::fs::write(dir.join("index.html"), html(run))?;
    Ok(())
}

/// The JUnit XML of a run.
pub fn junit(run: &RunReport) -> String {
    let mut suite = quick_junit::TestSuite::new("confab-conformance");
    for case in &run.cases {
        let status = match &case.outcome {
            Outcome::Passed => quick_junit::TestCaseStatus::success(),
            Outcome::Failed(f) => {
                let mut s =
                    quick_junit::TestCaseStatus::non_success(quick_junit::NonSuccessKind::Failure);
                s.set_message(format!("expected {}; observed {}", f.expected, f.observed));
                s.set_description(
                    case.transcript
                        .iter()
                        .map(|r| {
                            format!("{:>6} ms {} {} {}", r.at_ms, r.peer, r.direction, r.frame)
                        })
                        .collect::<Vec<_>>()
                        .join("\n"),
                );
                s
            }
            Outcome::Skipped { reason } => {
                let mut s = quick_junit::TestCaseStatus::skipped();
                s.set_message(reason.clone());
                s
            }
        };
        let mut tc = quick_junit::TestCase::new(case.id.clone(), status);
        tc.set_classname(case.requirement.clone());
        tc.set_time(std::time::Duration::from_millis(case.duration_ms));
        suite.add_test_case(tc);
    }
    let mut report = quick_junit::Report::new("confab-conformance");
    report.add_test_suite(suite);
    report.to_string().unwrap_or_else(|e| {
        format!(
            "<!-- junit serialisation failed: {} -->",
            escape_xml(&e.to_string())
        )
    })
}

/// The HTML summary of a run.
pub fn html(run: &RunReport) -> String {
    let mut rows = String::new();
    for case in &run.cases {
        let (class, outcome, detail) = match &case.outcome {
            Outcome::Passed => ("pass", "passed", String::new()),
            Outcome::Failed(f) => (
                "fail",
                "FAILED",
                format!(
                    "expected: {}<br>observed: {}",
                    escape_xml(&f.expected),
                    escape_xml(&f.observed)
                ),
            ),
            Outcome::Skipped { reason } => ("skip", "skipped", escape_xml(reason)),
        };
        let transcript: String = case
            .transcript
            .iter()
            .map(|r| {
                escape_xml(&format!(
                    "{:>6} ms  {:<8} {:<8} {}\n",
                    r.at_ms, r.peer, r.direction, r.frame
                ))
            })
            .collect();
        rows.push_str(&format!(
            "<tr class=\"{class}\"><td>{id}</td><td><a href=\"{link}\">{req}</a></td><td>{level:?}</td>\
             <td>{desc}</td><td>{outcome}</td><td>{ms} ms</td><td>{detail}\
             <details><summary>transcript</summary><pre>{transcript}</pre></details></td></tr>\n",
            id = escape_xml(&case.id),
            link = spec_link(&case.requirement),
            req = escape_xml(&case.requirement),
            level = case.level,
            desc = escape_xml(&case.description),
            ms = case.duration_ms,
        ));
    }
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Confab conformance: {url}</title>\
         <style>body{{font-family:sans-serif}}td{{vertical-align:top;padding:2px 8px}}\
         tr.fail{{background:#fdd}}tr.skip{{background:#eee}}pre{{font-size:12px}}</style></head>\
         <body><h1>Confab conformance</h1><p>{url}: {passed} passed, {failed} failed, {skipped} skipped \
         in {ms} ms. Requirement ids are those of SPEC.md's index.</p>\
         <table><tr><th>case</th><th>requirement</th><th>level</th><th>checks</th><th>outcome</th>\
         <th>time</th><th>detail</th></tr>\n{rows}</table></body></html>\n",
        url = escape_xml(&run.url),
        passed = run.passed,
        failed = run.failed,
        skipped = run.skipped,
        ms = run.duration_ms,
    )
}
