//! Named limits and defaults (SPEC.md sections 4.4, 5 and 6). Every limit the gateway
//! enforces has a name here, in SPEC.md, and in `GET /v1/info`.

/// The protocol version this crate implements (SPEC.md section 4.5).
pub const PROTOCOL_VERSION: u64 = 1;
/// Default `frame_bytes_max`.
pub const FRAME_BYTES_MAX_DEFAULT: usize = 1_048_576;
/// Smallest `frame_bytes_max` a gateway may announce.
pub const FRAME_BYTES_MAX_MINIMUM: usize = 65_536;
/// The most bytes an entry's encoding adds to its payload (SPEC.md 4.4).
pub const ENTRY_FRAMING_BYTES_MAX: usize = 256;
/// The most bytes a `Batch` or `Deliver` frame adds to its entries (SPEC.md 4.4).
pub const FRAME_ENVELOPE_BYTES_MAX: usize = 256;

/// `payload_bytes_max` for a `frame_bytes_max`: the largest MLS payload or Welcome a
/// gateway accepts, so that every entry fits in one `Deliver` or `Batch` (SPEC.md 4.4).
pub fn payload_bytes_max(frame_bytes_max: usize) -> usize {
    frame_bytes_max.saturating_sub(ENTRY_FRAMING_BYTES_MAX + FRAME_ENVELOPE_BYTES_MAX)
}
/// Default `collection_len_max`.
pub const COLLECTION_LEN_MAX_DEFAULT: usize = 1_024;
/// Default `nesting_depth_max`.
pub const NESTING_DEPTH_MAX_DEFAULT: usize = 8;
/// Default `text_bytes_max`.
pub const TEXT_BYTES_MAX_DEFAULT: usize = 256;
/// Default `replay_batch_max`.
pub const REPLAY_BATCH_MAX_DEFAULT: u64 = 256;
/// How many epochs an application message may lag behind its conversation and still be
/// accepted (SPEC.md 7.2): receivers keep at least this many past epochs' secrets
/// (REQ-7.2-4), so anything the gateway accepts stays readable.
pub const APP_EPOCH_LAG_MAX: u64 = 4;
/// Default `key_packages_per_upload_max`.
pub const KEY_PACKAGES_PER_UPLOAD_MAX_DEFAULT: u64 = 100;
/// Default `pending_sends_max`.
pub const PENDING_SENDS_MAX_DEFAULT: u64 = 256;
/// Default `pre_auth_frames_max`.
pub const PRE_AUTH_FRAMES_MAX_DEFAULT: u64 = 4;
/// Most versions a `Hello` may list.
pub const HELLO_VERSIONS_MAX: usize = 8;
/// Default `heartbeat_interval_ms`.
pub const HEARTBEAT_INTERVAL_MS_DEFAULT: u64 = 15_000;
/// Default `heartbeat_timeout_ms`.
pub const HEARTBEAT_TIMEOUT_MS_DEFAULT: u64 = 45_000;
/// Default `auth_timeout_ms`.
pub const AUTH_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Default `clock_skew_max_ms`.
pub const CLOCK_SKEW_MAX_MS_DEFAULT: u64 = 300_000;
/// `certificate_lifetime_max_ms`: 400 days.
pub const CERTIFICATE_LIFETIME_MAX_MS: u64 = 400 * 24 * 3600 * 1000;
/// Reconnect backoff base (`backoff_base_ms`, SPEC.md section 5.8).
pub const BACKOFF_BASE_MS: u64 = 250;
/// Reconnect backoff cap (`backoff_cap_ms`).
pub const BACKOFF_CAP_MS: u64 = 30_000;
