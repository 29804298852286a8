//! # confab-gateway
//!
//! The Confab reference gateway. Today:
//! - [`store`]: the durable state that sequences conversation logs and device inboxes
//!   (SPEC.md sections 6 and 7), with SQLite as the embedded default;
//! - [`handler`]: the sans-IO per-connection protocol logic (handshake, heartbeats,
//!   conversations, sends with the MLS delivery rules, subscribe/replay/live, acks).
//!
//! The axum WebSocket shell, the fan-out hub, resume tokens, retention and metrics come
//! with the rest of issue 4.

pub mod handler;
pub mod store;
