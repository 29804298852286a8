//! # confab-sim
//!
//! Deterministic simulations of the real gateway and real clients inside turmoil: one seed
//! drives the network, the faults, the workload and the timing, and the protocol's
//! invariants are checked on every observation.
//!
//! - [`scenario`]: the named scenarios and their defaults;
//! - [`run`]: the orchestrator (workload, fault schedule, phases, summary);
//! - [`gateway`]: the gateway host (`confab_gateway::server::serve` on simulated TCP);
//! - [`device`]: a device host (`confab_client::app::Client` on simulated TCP);
//! - [`scrape`]: the `presence-scrape` scenario (bots against presence);
//! - [`hostile`]: the `hostile-member` scenario's acts;
//! - [`check`]: the invariants;
//! - [`workers`]: threads that run devices' synchronous work beside turmoil's;
//! - [`world`]: what hosts and orchestrator share, and the trace digest.
//!
//! The session-level chaos property test in `spec/tests/session_props.rs` is its
//! in-memory precursor.

pub mod check;
pub mod device;
pub mod gateway;
pub mod hostile;
pub mod run;
pub mod scenario;
pub mod scrape;
pub mod workers;
pub mod world;

pub use run::{Failure, Options, Progress, Summary, run};
pub use scenario::Scenario;
