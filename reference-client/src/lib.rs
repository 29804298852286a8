//! # confab-client
//!
//! The Confab reference client:
//! - [`identity`]: Polycentric identity import;
//! - [`environment`]: the clock, randomness and dialer a client runs on;
//! - [`mls`]: the MLS engine layer (openmls and mls-rs behind one trait);
//! - [`store`]: local state (contacts, conversations, cursors, outbox, messages);
//! - [`transport`]: the sans-IO [`confab_spec::session::ClientSession`] over a WebSocket;
//! - [`app`]: the client application tying them together;
//! - [`presence`]: the client's presence lease, watchlist and what it knows of others;
//! - [`home`]: a device's state directory, used by the `confab` CLI ([`cli`]);
//! - [`interop`]: the IETF interop scenario harness;
//! - [`cli`]: the `confab` command line;
//! - [`faults`]: deliberately broken behaviours for the conformance suite's self-test.

pub mod app;
pub mod cli;
pub mod display;
pub mod environment;
pub mod faults;
pub mod home;
pub mod identity;
pub mod interop;
pub mod link;
pub mod mls;
pub mod presence;
pub mod store;
pub mod transport;

pub use confab_spec::session;
