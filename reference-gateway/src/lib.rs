//! # confab-gateway
//!
//! The Confab reference gateway. Today: the durable store ([`store`]) that sequences
//! conversation logs and device inboxes per SPEC.md sections 6 and 7. The WebSocket
//! server, sessions, replay and metrics come with the rest of issue 4.

pub mod store;
