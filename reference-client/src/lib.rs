//! # confab-client
//!
//! The Confab reference client: identity and device keys, the MLS engine layer
//! ([`mls`]: openmls and mls-rs behind one trait), the local store, and the `confab` CLI.
//! It drives the sans-IO [`confab_spec::session::ClientSession`].

pub mod app;
pub mod home;
pub mod identity;
pub mod interop;
pub mod mls;
pub mod store;
pub mod transport;

pub use confab_spec::session;
