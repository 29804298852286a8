//! The gateway's metrics (SPEC.md 13.1), recorded with the `metrics` facade. The binary
//! installs a Prometheus recorder and serves it at `/metrics`; without a recorder (unit
//! tests, the simulator) every call here is a no-op.
//!
//! Labels are low-cardinality codes only: never a device, a conversation, a payload, a
//! key or a token.

use confab_spec::error::{CloseCode, ErrorCode};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

/// Open WebSocket connections.
pub const CONNECTIONS_OPEN: &str = "confab_connections_open";
/// WebSocket connections accepted.
pub const CONNECTIONS_TOTAL: &str = "confab_connections_total";
/// Sessions that reached `Ready`, by `how` (`auth` or `resume`).
pub const SESSIONS_TOTAL: &str = "confab_sessions_total";
/// `Hello` frames that carried a resume token (a reconnect), valid or not.
pub const RECONNECTS_TOTAL: &str = "confab_reconnects_total";
/// Failed authentications and resumes, by error `code`.
pub const AUTH_REJECTED_TOTAL: &str = "confab_auth_rejected_total";
/// Entries per replay `Batch`.
pub const REPLAY_BATCH_ENTRIES: &str = "confab_replay_batch_entries";
/// Entries delivered live (after replay).
pub const LIVE_DELIVERIES_TOTAL: &str = "confab_live_deliveries_total";
/// `Ack` frames that moved or confirmed a cursor.
pub const ACKS_TOTAL: &str = "confab_acks_total";
/// Entries sequenced, by `kind` (`application`, `proposal`, `commit`).
pub const APPENDS_TOTAL: &str = "confab_appends_total";
/// Commits, by `outcome` (`accepted`, `duplicate`, `stale`, `rejected`).
pub const COMMITS_TOTAL: &str = "confab_commits_total";
/// Frames answered with an error, by error `code`.
pub const ERRORS_TOTAL: &str = "confab_errors_total";
/// Connections closed by the gateway, by close `code`.
pub const CLOSES_TOTAL: &str = "confab_closes_total";
/// Requests refused by a rate limit, by `limit`.
pub const RATE_LIMITED_TOTAL: &str = "confab_rate_limited_total";
/// Revocations stored.
pub const REVOCATIONS_TOTAL: &str = "confab_revocations_total";
/// Entries deleted by retention.
pub const GC_ENTRIES_DELETED_TOTAL: &str = "confab_gc_entries_deleted_total";

/// TCP connections closed before any HTTP was served, by `reason` (`connections_max`,
/// `connections_per_ip_max`), and connections closed because their HTTP request did not
/// complete in time (`http_request_timeout`).
pub const CONNECTIONS_REFUSED_TOTAL: &str = "confab_connections_refused_total";

/// Presence transitions published (online or offline, after jitter).
pub const PRESENCE_TRANSITIONS_TOTAL: &str = "confab_presence_transitions_total";
/// `PresenceChanged` frames queued to watchers.
pub const PRESENCE_EVENTS_TOTAL: &str = "confab_presence_events_total";

/// Store transactions made durable by group commit (a running total).
pub const STORE_TRANSACTIONS_TOTAL: &str = "confab_store_transactions_total";
/// WAL syncs of group commit (each covers every transaction since the previous one).
pub const STORE_SYNCS_TOTAL: &str = "confab_store_syncs_total";
/// Time per WAL sync.
pub const STORE_SYNC_SECONDS: &str = "confab_store_sync_seconds";

/// Registers a description for every metric (shown as `# HELP` by the exporter).
pub fn describe() {
    describe_gauge!(CONNECTIONS_OPEN, "Open WebSocket connections.");
    describe_counter!(CONNECTIONS_TOTAL, "WebSocket connections accepted.");
    describe_counter!(SESSIONS_TOTAL, "Sessions that reached Ready, by how.");
    describe_counter!(RECONNECTS_TOTAL, "Hello frames carrying a resume token.");
    describe_counter!(AUTH_REJECTED_TOTAL, "Rejected auths and resumes, by code.");
    describe_histogram!(REPLAY_BATCH_ENTRIES, "Entries per replay Batch.");
    describe_counter!(LIVE_DELIVERIES_TOTAL, "Entries delivered live.");
    describe_counter!(ACKS_TOTAL, "Accepted Ack frames.");
    describe_counter!(APPENDS_TOTAL, "Entries sequenced, by kind.");
    describe_counter!(COMMITS_TOTAL, "Commits by outcome.");
    describe_counter!(ERRORS_TOTAL, "Error frames sent, by code.");
    describe_counter!(CLOSES_TOTAL, "Connections closed by the gateway, by code.");
    describe_counter!(
        RATE_LIMITED_TOTAL,
        "Requests refused by a rate limit, by limit."
    );
    describe_counter!(REVOCATIONS_TOTAL, "Device revocations stored.");
    describe_counter!(
        CONNECTIONS_REFUSED_TOTAL,
        "Connections refused at accept or cut for a slow HTTP request, by reason."
    );
    describe_counter!(GC_ENTRIES_DELETED_TOTAL, "Entries deleted by retention.");
    describe_counter!(
        PRESENCE_TRANSITIONS_TOTAL,
        "Presence transitions published."
    );
    describe_counter!(PRESENCE_EVENTS_TOTAL, "PresenceChanged frames queued.");
    describe_counter!(
        STORE_TRANSACTIONS_TOTAL,
        "Store transactions made durable by group commit."
    );
    describe_counter!(STORE_SYNCS_TOTAL, "WAL syncs of group commit.");
    describe_histogram!(STORE_SYNC_SECONDS, "Time per WAL sync.");
}

/// An `Error` frame with `code` was sent.
pub fn error_sent(code: ErrorCode) {
    counter!(ERRORS_TOTAL, "code" => code.value().to_string()).increment(1);
}

/// The gateway closed a connection with `code`.
pub fn closed(code: CloseCode) {
    counter!(CLOSES_TOTAL, "code" => code.value().to_string()).increment(1);
}

/// A session reached `Ready`.
pub fn session_ready(resumed: bool) {
    let how = if resumed { "resume" } else { "auth" };
    counter!(SESSIONS_TOTAL, "how" => how).increment(1);
}

/// A `Hello` carried a resume token.
pub fn reconnect() {
    counter!(RECONNECTS_TOTAL).increment(1);
}

/// An auth or resume was rejected with `code`.
pub fn auth_rejected(code: ErrorCode) {
    counter!(AUTH_REJECTED_TOTAL, "code" => code.value().to_string()).increment(1);
}

/// A replay `Batch` of `entries` was sent.
pub fn replay_batch(entries: usize) {
    histogram!(REPLAY_BATCH_ENTRIES).record(entries as f64);
}

/// `n` entries were delivered live.
pub fn live_delivered(n: usize) {
    counter!(LIVE_DELIVERIES_TOTAL).increment(n as u64);
}

/// An `Ack` was applied.
pub fn acked() {
    counter!(ACKS_TOTAL).increment(1);
}

/// An entry of `kind` was sequenced.
pub fn appended(kind: &'static str) {
    counter!(APPENDS_TOTAL, "kind" => kind).increment(1);
}

/// A Commit ended with `outcome`.
pub fn commit(outcome: &'static str) {
    counter!(COMMITS_TOTAL, "outcome" => outcome).increment(1);
}

/// A request was refused by the rate limit `limit`.
pub fn rate_limited(limit: &'static str) {
    counter!(RATE_LIMITED_TOTAL, "limit" => limit).increment(1);
}

/// A revocation was stored.
pub fn revocation_stored() {
    counter!(REVOCATIONS_TOTAL).increment(1);
}

/// Retention deleted `n` entries.
pub fn gc_deleted(n: u64) {
    counter!(GC_ENTRIES_DELETED_TOTAL).increment(n);
}

/// A connection opened (`+1`) or closed (`-1`).
pub fn connections_open(delta: f64) {
    if delta > 0.0 {
        counter!(CONNECTIONS_TOTAL).increment(1);
    }
    gauge!(CONNECTIONS_OPEN).increment(delta);
}

/// A connection was refused or cut before its upgrade, for `reason`.
pub fn connection_refused(reason: &'static str) {
    counter!(CONNECTIONS_REFUSED_TOTAL, "reason" => reason).increment(1);
}

/// A presence transition was published.
pub fn presence_transition() {
    counter!(PRESENCE_TRANSITIONS_TOTAL).increment(1);
}

/// `n` `PresenceChanged` frames were queued.
pub fn presence_events(n: usize) {
    counter!(PRESENCE_EVENTS_TOTAL).increment(n as u64);
}

/// A group-commit sync made the store's first `transactions` transactions durable.
pub fn store_synced(transactions: u64, took: std::time::Duration) {
    counter!(STORE_TRANSACTIONS_TOTAL).absolute(transactions);
    counter!(STORE_SYNCS_TOTAL).increment(1);
    histogram!(STORE_SYNC_SECONDS).record(took.as_secs_f64());
}
