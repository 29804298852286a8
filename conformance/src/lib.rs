//! `confab-conformance`: a black-box suite that checks a Confab gateway against SPEC.md.
//!
//! It knows only SPEC.md and the server's URL: it reads the server's limits from
//! `GET /v1/info`, makes its own identities, and talks the protocol over WebSockets. Each
//! [`case::Case`] checks one requirement of SPEC.md's index and names it; a run
//! ([`runner::run`]) gives a [`report::RunReport`] with expected and observed behaviour and a
//! transcript of every frame, written as JSON, JUnit XML and HTML ([`report::write`]).

pub mod case;
pub mod cases;
pub mod client;
pub mod context;
pub mod control;
pub mod info;
pub mod mls;
pub mod report;
pub mod runner;
