//! # confab-conformance
//!
//! The black-box conformance suite run against any gateway URL. Its cases are named after
//! the requirement ids of SPEC.md Appendix B, available here as
//! [`confab_spec::requirements::requirements`]. Built by the conformance issue.

pub use confab_spec::requirements;
