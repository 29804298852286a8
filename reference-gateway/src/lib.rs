//! # confab-gateway
//!
//! The Confab reference gateway:
//! - [`store`]: the durable state that sequences conversation logs and device inboxes
//!   (SPEC.md sections 6 and 7), resume tokens, revocations and retention, with SQLite as
//!   the embedded default;
//! - [`handler`]: the sans-IO per-connection protocol logic (handshake, resume,
//!   revocations, conversations, sends with the MLS delivery rules, subscribe/replay/live,
//!   acks, continuity-lost);
//! - [`server`]: the axum shell (`/v1/ws`, `/healthz`, `/metrics`, `/v1/info`), the wake-up
//!   hub, bounded outbound queues, the auth and heartbeat deadlines, the per-address connect
//!   limit, retention runs and graceful shutdown;
//! - [`rate`]: the rate limits;
//! - [`telemetry`]: the metrics.

pub mod config;
pub mod durability;
pub mod faults;
pub mod handler;
pub mod hub;
pub mod presence;
pub mod rate;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tracked_group;
