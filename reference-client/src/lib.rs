//! # confab-client
//!
//! The Confab reference client: identity and device keys, the MLS engine layer (openmls
//! and mls-rs behind one trait), the local store, and the `confab` CLI. It drives the
//! sans-IO [`confab_spec::session::ClientSession`]. Built by the MLS engine and client
//! issues; today it re-exports the session so dependants compile against the final path.

pub use confab_spec::session;
