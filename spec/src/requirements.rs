//! The requirement index of SPEC.md (Appendix B), extracted from the text itself.
//!
//! Every MUST-level sentence carries a `[REQ-<section>-<n>]` tag. [`requirements`] finds
//! each tag with its sentence, and [`check`] reports untagged MUST sentences, repeated
//! ids and a stale Appendix B. The conformance suite names its cases after these ids.

/// SPEC.md, compiled in so tools can quote requirements.
pub const SPEC_MD: &str = include_str!("../SPEC.md");

const INDEX_START: &str = "<!-- requirement-index:start -->";
const INDEX_END: &str = "<!-- requirement-index:end -->";

/// One tagged requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// For example `REQ-5.4-3`.
    pub id: String,
    /// For example `5.4`.
    pub section: String,
    /// The sentence that carries the tag, whitespace collapsed, tags removed.
    pub text: String,
}

/// Every tagged requirement of `spec` (the text before Appendix B), in order.
pub fn requirements(spec: &str) -> Vec<Requirement> {
    let body = body(spec);
    let mut out = Vec::new();
    for sentence in sentences(body) {
        for id in tags(&sentence) {
            let section = id
                .trim_start_matches("REQ-")
                .rsplit_once('-')
                .map(|(s, _)| s.to_string())
                .unwrap_or_default();
            out.push(Requirement {
                id,
                section,
                text: strip_tags(&sentence),
            });
        }
    }
    out
}

/// Problems with the spec's requirement tagging; empty when all is well.
pub fn check(spec: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let body = body(spec);
    let mut seen = std::collections::BTreeSet::new();
    for sentence in sentences(body) {
        let tagged = tags(&sentence);
        if has_must(&sentence) && tagged.is_empty() && !sentence.contains("BCP 14") {
            problems.push(format!(
                "MUST without a requirement id: {}",
                collapse(&sentence)
            ));
        }
        for id in tagged {
            if !seen.insert(id.clone()) {
                problems.push(format!("requirement id used twice: {id}"));
            }
        }
    }
    if render_index(spec) != current_index(spec).unwrap_or_default() {
        problems.push(
            "Appendix B is stale: run `cargo run -p confab-spec --bin confab-vectors -- --write`"
                .into(),
        );
    }
    problems
}

/// `spec` with Appendix B regenerated.
pub fn with_index(spec: &str) -> String {
    let (Some(start), Some(end)) = (spec.find(INDEX_START), spec.find(INDEX_END)) else {
        return spec.to_string();
    };
    format!(
        "{}{}\n{}{}",
        &spec[..start + INDEX_START.len()],
        render_index(spec),
        "",
        &spec[end..]
    )
}

fn render_index(spec: &str) -> String {
    let reqs = requirements(spec);
    let mut out = String::from("\n| id | requirement |\n| --- | --- |\n");
    for r in &reqs {
        out.push_str(&format!("| {} | {} |\n", r.id, r.text.replace('|', "\\|")));
    }
    out.push_str(&format!("\n{} requirements.", reqs.len()));
    out
}

fn current_index(spec: &str) -> Option<String> {
    let start = spec.find(INDEX_START)? + INDEX_START.len();
    let end = spec.find(INDEX_END)?;
    Some(spec.get(start..end)?.trim_end_matches('\n').to_string())
}

/// The normative text: from section 2 up to Appendix B (section 1 defines the keywords).
fn body(spec: &str) -> &str {
    let start = spec.find("\n## 2.").unwrap_or(0);
    let end = spec.find("\n## Appendix B").unwrap_or(spec.len());
    &spec[start..end]
}

/// Splits into sentences: at ". " / ".\n", blank lines, list items and table rows.
fn sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        for item in split_items(block) {
            let mut current = String::new();
            let chars: Vec<char> = item.chars().collect();
            for (i, &ch) in chars.iter().enumerate() {
                current.push(ch);
                let next = chars.get(i + 1).copied();
                if ch == '.'
                    && matches!(next, Some(' ' | '\n') | None)
                    && !current.trim_end().ends_with("e.g.")
                {
                    out.push(std::mem::take(&mut current));
                }
            }
            if !current.trim().is_empty() {
                out.push(current);
            }
        }
    }
    out
}

fn split_items(block: &str) -> Vec<String> {
    let mut items: Vec<String> = Vec::new();
    for line in block.lines() {
        let trimmed = line.trim_start();
        let starts_item = trimmed.starts_with("- ")
            || trimmed.starts_with('|')
            || trimmed.starts_with('#')
            || is_numbered_item(trimmed);
        if starts_item || items.is_empty() {
            items.push(line.to_string());
        } else if let Some(last) = items.last_mut() {
            last.push('\n');
            last.push_str(line);
        }
    }
    items
}

/// `1. text`, `12. text`.
fn is_numbered_item(line: &str) -> bool {
    let digits = line.chars().take_while(|c| c.is_ascii_digit()).count();
    digits > 0 && line[digits..].starts_with(". ")
}

fn tags(sentence: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = sentence;
    while let Some(i) = rest.find("[REQ-") {
        let after = &rest[i + 1..];
        match after.find(']') {
            Some(j) => {
                out.push(after[..j].to_string());
                rest = &after[j..];
            }
            None => break,
        }
    }
    out
}

fn has_must(sentence: &str) -> bool {
    sentence
        .split(|c: char| !c.is_ascii_alphanumeric())
        .any(|w| w == "MUST")
}

fn strip_tags(sentence: &str) -> String {
    let mut s = sentence.to_string();
    while let (Some(i), Some(j)) = (s.find(" [REQ-"), s.find(']')) {
        if j < i {
            break;
        }
        s.replace_range(i..=j, "");
    }
    collapse(&s).trim_start_matches("- ").to_string()
}

fn collapse(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_untagged_must() {
        let spec = "# x\n\n## 2. A\n\nA gateway MUST do it [REQ-2-1]. A client MUST do that.\n\n## Appendix B\n";
        let problems = check(spec);
        assert!(
            problems.iter().any(|p| p.contains("A client MUST do that")),
            "{problems:?}"
        );
        assert_eq!(requirements(spec)[0].id, "REQ-2-1");
        assert_eq!(requirements(spec)[0].text, "A gateway MUST do it.");
    }

    #[test]
    fn finds_repeated_ids() {
        let spec = "## 2. A\n\nX MUST a [REQ-2-1]. Y MUST b [REQ-2-1].\n";
        assert!(check(spec).iter().any(|p| p.contains("used twice")));
    }
}
