//! SPEC.md's requirement tags are complete and unique, and Appendix B is current.

use confab_spec::requirements::{SPEC_MD, check, requirements};

#[test]
fn every_must_has_a_unique_requirement_id_and_the_index_is_current() {
    let problems = check(SPEC_MD);
    assert!(
        problems.is_empty(),
        "SPEC.md requirement problems:\n{}",
        problems.join("\n")
    );
}

#[test]
fn requirement_ids_name_existing_sections() {
    let reqs = requirements(SPEC_MD);
    assert!(reqs.len() >= 100, "only {} requirements found", reqs.len());
    for r in reqs {
        let heading_a = format!("\n## {}. ", r.section);
        let heading_b = format!("\n### {} ", r.section);
        assert!(
            SPEC_MD.contains(&heading_a) || SPEC_MD.contains(&heading_b),
            "{} names section {} which has no heading",
            r.id,
            r.section
        );
        assert!(
            r.text.contains("MUST"),
            "{} is not a MUST sentence: {}",
            r.id,
            r.text
        );
    }
}
