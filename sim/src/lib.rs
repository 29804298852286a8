//! # confab-sim
//!
//! Deterministic turmoil simulations of gateways and clients under faults, with invariant
//! checks after every step. Built by the simulation issue; the session-level chaos
//! property test in `spec/tests/session_props.rs` is its first, in-memory precursor.

pub use confab_spec::session;
