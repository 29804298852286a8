//! # confab-spec
//!
//! The Confab protocol, version 1, as code: the typed frames and identifiers of
//! `spec/SPEC.md`, a strict deterministic CBOR codec with explicit limits, device
//! certificates and the auth transcript, and the sans-IO client session state machine.
//!
//! Nothing here opens a socket, reads a clock or touches storage. The gateway, the client,
//! the simulator and the fuzzers all drive the same code with explicit time and input, in
//! the style of `quinn-proto`.
//!
//! Map from SPEC.md to modules:
//! - section 3 (identity) and 5.3 (auth transcript): [`identity`]; 3.6 (safety numbers):
//!   [`safety`];
//! - section 4.2 (CBOR rules) and 4.4 (limits): [`cbor`], [`limits`];
//! - section 4.6 (identifiers): [`ids`];
//! - Appendix A (frames): [`frame`];
//! - section 7.2 (what the gateway reads of MLS): [`mls_framing`], and writers of MLS
//!   messages for tests and hostile peers: [`mls_write`];
//! - section 7.9 (application content): [`content`];
//! - section 8.1 (consent): [`consent`];
//! - section 10 (rooms and governance): [`rooms`];
//! - sections 5.7 and 12 (close and error codes): [`error`];
//! - sections 5 and 6.8 (client behaviour): [`session`];
//! - `vectors/` (test vectors): [`vectors`];
//! - Appendix B (requirement index): [`requirements`].

pub mod cbor;
pub mod consent;
pub mod content;
pub mod error;
pub mod frame;
pub mod identity;
pub mod ids;
pub mod limits;
pub mod mls_framing;
pub mod mls_write;
pub mod requirements;
pub mod rooms;
pub mod safety;
pub mod session;
pub mod vectors;

pub use cbor::{DecodeError, DecodeLimits};
pub use error::{CloseCode, ErrorCode};
pub use frame::{ClientFrame, ServerFrame};
