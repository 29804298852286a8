//! # confab-gateway
//!
//! The Confab reference gateway. Today:
//! - [`store`]: the durable state that sequences conversation logs and device inboxes
//!   (SPEC.md sections 6 and 7), with SQLite as the embedded default;
//! - [`handler`]: the sans-IO per-connection protocol logic (handshake, heartbeats,
//!   conversations, sends with the MLS delivery rules, subscribe/replay/live, acks).
//!
//! - [`server`]: the axum shell (`/v1/ws`, `/healthz`, `/v1/info`), the wake-up hub, the
//!   auth and heartbeat deadlines, and graceful shutdown.
//!
//! Resume tokens, retention, revocations, the KeyPackage directory and metrics come with
//! the rest of issue 4 and issue 5.

pub mod handler;
pub mod server;
pub mod store;
pub mod telemetry;
