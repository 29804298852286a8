//! The client's local state besides the MLS groups (which the engine layer keeps): the
//! identity, contacts, conversations, per-stream cursors, the outbox and received
//! messages, in one SQLite file (WAL, `synchronous=FULL`).
//!
//! Each method is one transaction. [`ClientStore::deliver`] records a processed entry and
//! moves the stream's cursor together, so that an entry is acknowledged to the gateway only
//! after its effect is durable (SPEC.md REQ-6.5-3), and a replayed entry is recognised as a
//! duplicate (REQ-6.8-1).

use std::path::Path;

use confab_spec::frame::ConversationKind;
use confab_spec::ids::{
    ConversationId, DeviceId, MsgId, ProcessId, Seq, StreamId, SystemKey, UnixMs,
};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

/// Local storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("local database: {0}")]
    Database(#[from] rusqlite::Error),
    /// A stored value does not decode (corruption, or a newer version of confab).
    #[error("local database holds an unreadable {0}")]
    Corrupt(&'static str),
    /// A contact name or key is already taken.
    #[error("{0} is already a contact")]
    ContactExists(String),
}

/// The identity of this installation.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredIdentity {
    /// The system key's seed, on devices that hold it (the first device, or an import).
    pub system_seed: Option<[u8; 32]>,
    /// The system (user).
    pub system: SystemKey,
    /// This device's key seed.
    pub device_seed: [u8; 32],
    /// This device's certificate, deterministic CBOR.
    pub certificate: Vec<u8>,
}

impl std::fmt::Debug for StoredIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredIdentity")
            .field("system", &self.system)
            .field("holds_system_key", &self.system_seed.is_some())
            .finish_non_exhaustive()
    }
}

/// A conversation this device is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationRecord {
    /// Its id (the MLS group id).
    pub id: ConversationId,
    /// DM or room.
    pub kind: ConversationKind,
    /// For a DM, the other user.
    pub peer: Option<SystemKey>,
    /// Whether this device was removed from it (it may be added again later).
    pub removed: bool,
}

/// An invitation held for its user to accept or decline (SPEC.md 10.5): the Welcome of a
/// user this device had never talked with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvitationRequest {
    /// The conversation it invites to.
    pub conversation: ConversationId,
    /// The device whose Commit added this one, as the gateway reported it.
    pub inviter: DeviceId,
    /// The seq of that Commit in the conversation.
    pub commit_seq: Seq,
    /// The Welcome.
    pub welcome: Vec<u8>,
    /// When the gateway accepted the Commit.
    pub received: UnixMs,
}

/// Most invitation requests kept; a newer one pushes out the oldest.
pub const REQUESTS_MAX: usize = 100;

/// A message composed here and not yet accepted by the gateway. Its `msg_id` and payload
/// are fixed when it is composed, so every retry is the same `Send` (SPEC.md REQ-6.3-4).
#[derive(Clone, PartialEq, Eq)]
pub struct OutboxItem {
    /// The idempotency key.
    pub msg_id: MsgId,
    /// Where it goes.
    pub conversation: ConversationId,
    /// The MLSMessage.
    pub payload: Vec<u8>,
    /// The Welcome of a Commit that adds devices.
    pub welcome: Option<Vec<u8>>,
    /// The GroupInfo a Commit publishes (SPEC.md 7.10).
    pub group_info: Option<Vec<u8>>,
    /// The plaintext of an application message, kept to show one's own message (a sender
    /// cannot decrypt its own PrivateMessage).
    pub plaintext: Option<Vec<u8>>,
    /// When it was composed.
    pub composed: UnixMs,
}

impl std::fmt::Debug for OutboxItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the plaintext or the payload.
        f.debug_struct("OutboxItem")
            .field("msg_id", &self.msg_id)
            .field("conversation", &self.conversation)
            .field("payload_len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

/// Most devices of one user kept with a verification.
pub const DEVICES_MAX: usize = 64;

/// A user's safety number, compared and found right ([`ClientStore::set_verified`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// When.
    pub at: UnixMs,
    /// The user's devices this device saw in shared groups then.
    pub devices: Vec<ProcessId>,
}

/// Counts of what a device could not trust ([`ClientStore::suspicions`]), for `status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Suspicions {
    /// Messages whose sender the gateway named wrongly (SPEC.md 7.8).
    pub relabelled: u64,
    /// Entries that could not be read (SPEC.md 6.8), kept messages only.
    pub unreadable: u64,
    /// Conversations that forked (SPEC.md 7.7, 7.8).
    pub forked: u64,
    /// Messages of other members that never arrived, as their numbers show (SPEC.md 7.9).
    pub missing: u64,
    /// Messages that came out of their sender's order, or twice (SPEC.md 7.9).
    pub out_of_order: u64,
    /// Times this device got back into a forked conversation (SPEC.md 7.10).
    pub resynced: u64,
}

/// A message shown to the user.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    /// The conversation.
    pub conversation: ConversationId,
    /// Its seq in the conversation's log.
    pub seq: Seq,
    /// The sending device.
    pub sender: DeviceId,
    /// Its msg_id.
    pub msg_id: MsgId,
    /// When the gateway sequenced it.
    pub accepted: UnixMs,
    /// The plaintext (empty when the message is unreadable).
    pub body: Vec<u8>,
    /// Why the entry could not be read, when it could not (a message that fails MLS, or a
    /// Commit this device could not apply): shown in its place, never lost silently.
    pub unreadable: Option<String>,
    /// The sender the gateway named in the entry, when MLS authenticated another one as
    /// `sender` (SPEC.md 7.8): the message is shown as `sender`'s and flagged.
    pub gateway_sender: Option<DeviceId>,
    /// The sender's number for it (SPEC.md 7.9), when its content carries one.
    pub counter: Option<u64>,
    /// What its number says of the sender's messages before it, when that is not "the
    /// next one".
    pub irregular: Option<Irregular>,
}

/// A message whose number (SPEC.md 7.9) is not the one after the sender's last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Irregular {
    /// This many of the sender's messages before it never arrived or could not be read.
    Missing(u64),
    /// Its number is at or below one already read: a copy, or a message held back.
    Stale,
}

impl Irregular {
    fn to_column(self) -> i64 {
        match self {
            Self::Missing(n) => to_i64(n),
            Self::Stale => -1,
        }
    }

    fn from_column(v: i64) -> Option<Self> {
        match v {
            -1 => Some(Self::Stale),
            n if n > 0 => Some(Self::Missing(n as u64)),
            _ => None,
        }
    }
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("conversation", &self.conversation)
            .field("seq", &self.seq)
            .field("sender", &self.sender)
            .finish_non_exhaustive()
    }
}

/// A stream's position: the next seq to process and the last acknowledged one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// The next seq this device expects.
    pub next_seq: Seq,
    /// The highest seq acknowledged to the gateway.
    pub acked: u64,
}

/// The client's SQLite store.
pub struct ClientStore {
    conn: Connection,
    /// Messages kept per conversation, the newest; `None` keeps all.
    keep_messages: Option<std::num::NonZeroU32>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS identity (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    system_seed BLOB,
    system BLOB NOT NULL,
    device_seed BLOB NOT NULL,
    certificate BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS contacts (
    name TEXT PRIMARY KEY,
    system BLOB NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS conversations (
    id BLOB PRIMARY KEY,
    kind INTEGER NOT NULL,
    peer BLOB,
    removed INTEGER NOT NULL DEFAULT 0,
    forked_seq INTEGER,
    forked_reason TEXT,
    sent_counter INTEGER NOT NULL DEFAULT 0,
    resyncs INTEGER NOT NULL DEFAULT 0,
    resync_seq INTEGER,
    resync_from INTEGER
);
CREATE TABLE IF NOT EXISTS cursors (
    stream BLOB PRIMARY KEY,
    next_seq INTEGER NOT NULL,
    acked INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    msg_id BLOB PRIMARY KEY,
    conversation BLOB NOT NULL,
    payload BLOB NOT NULL,
    welcome BLOB,
    plaintext BLOB,
    composed_ms INTEGER NOT NULL,
    position INTEGER NOT NULL,
    group_info BLOB
);
CREATE TABLE IF NOT EXISTS messages (
    conversation BLOB NOT NULL,
    seq INTEGER NOT NULL,
    sender BLOB NOT NULL,
    msg_id BLOB NOT NULL,
    accepted_ms INTEGER NOT NULL,
    body BLOB NOT NULL,
    unreadable TEXT,
    gateway_sender BLOB,
    counter INTEGER,
    irregular INTEGER,
    PRIMARY KEY (conversation, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS room_names (
    name TEXT PRIMARY KEY,
    conversation BLOB NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS leave_requests (
    conversation BLOB NOT NULL,
    device BLOB NOT NULL,
    PRIMARY KEY (conversation, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS requests (
    conversation BLOB PRIMARY KEY,
    inviter BLOB NOT NULL,
    commit_seq INTEGER NOT NULL,
    welcome BLOB NOT NULL,
    received_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS verified_users (
    system BLOB PRIMARY KEY,
    verified_ms INTEGER NOT NULL,
    devices BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS pending_device (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    device_seed BLOB NOT NULL,
    process BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS sender_counters (
    conversation BLOB NOT NULL,
    sender BLOB NOT NULL,
    highest INTEGER NOT NULL,
    PRIMARY KEY (conversation, sender)
) WITHOUT ROWID;
PRAGMA user_version = 10;
";

fn stream_key(stream: &StreamId) -> Vec<u8> {
    match stream {
        StreamId::Inbox => vec![2],
        StreamId::Conversation(c) => [&[1u8][..], &c.0].concat(),
    }
}

fn array<const N: usize>(v: Vec<u8>, what: &'static str) -> Result<[u8; N], StoreError> {
    v.try_into().map_err(|_| StoreError::Corrupt(what))
}

/// Whether `seq` of the stream `key` is below its cursor (processed before).
fn processed(tx: &Connection, key: &[u8], seq: Seq) -> Result<bool, StoreError> {
    let next: Option<i64> = tx
        .prepare_cached("SELECT next_seq FROM cursors WHERE stream = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?;
    Ok(next.is_some_and(|n| to_i64(seq.get()) < n))
}

/// Deletes the messages of `conversation` older than its `keep` newest, in `tx`.
fn prune_messages(
    tx: &Connection,
    conversation: &ConversationId,
    keep: std::num::NonZeroU32,
) -> Result<(), StoreError> {
    // The subquery is the seq of the keep-th newest message (none while there are fewer).
    tx.prepare_cached(
        "DELETE FROM messages WHERE conversation = ?1 AND seq < (
             SELECT seq FROM messages WHERE conversation = ?1
             ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
    )?
    .execute(params![conversation.0.as_slice(), keep.get() - 1])?;
    Ok(())
}

/// Records one delivered entry in the open transaction `tx` (see [`ClientStore::deliver`]).
fn deliver_in(
    tx: &Connection,
    stream: &StreamId,
    seq: Seq,
    message: Option<&Message>,
) -> Result<bool, StoreError> {
    let key = stream_key(stream);
    if processed(tx, &key, seq)? {
        return Ok(false);
    }
    // A message already kept at this seq (the entry was processed before the cursor was
    // lost) is not shown again, readable or not (REQ-6.8-1).
    let mut shown_before = false;
    if let Some(m) = message {
        shown_before = 0
            == tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO messages
                 (conversation, seq, sender, msg_id, accepted_ms, body, unreadable,
                  gateway_sender, counter, irregular)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )?
                .execute(params![
                    m.conversation.0.as_slice(),
                    to_i64(m.seq.get()),
                    m.sender.to_bytes().as_slice(),
                    m.msg_id.0.as_slice(),
                    to_i64(m.accepted.0),
                    m.body,
                    m.unreadable,
                    m.gateway_sender.map(|d| d.to_bytes().to_vec()),
                    m.counter.map(to_i64),
                    m.irregular.map(Irregular::to_column),
                ])?;
        if let Some(counter) = m.counter {
            tx.prepare_cached(
                "INSERT INTO sender_counters (conversation, sender, highest) VALUES (?1, ?2, ?3)
                 ON CONFLICT (conversation, sender) DO UPDATE SET
                     highest = max(highest, excluded.highest)",
            )?
            .execute(params![
                m.conversation.0.as_slice(),
                m.sender.to_bytes().as_slice(),
                to_i64(counter)
            ])?;
        }
        // One's own message is no longer waiting.
        tx.prepare_cached("DELETE FROM outbox WHERE msg_id = ?1")?
            .execute([m.msg_id.0.as_slice()])?;
    }
    advance_cursor(tx, &key, seq.get() + 1)?;
    Ok(!shown_before)
}

/// Stores `identity` as the one identity, replacing any.
fn put_identity(conn: &Connection, identity: &StoredIdentity) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO identity (id, system_seed, system, device_seed, certificate)
         VALUES (1, ?1, ?2, ?3, ?4)
         ON CONFLICT (id) DO UPDATE SET system_seed = excluded.system_seed,
             system = excluded.system, device_seed = excluded.device_seed,
             certificate = excluded.certificate",
    )?
    .execute(params![
        identity.system_seed.map(|s| s.to_vec()),
        identity.system.0.as_slice(),
        identity.device_seed.as_slice(),
        identity.certificate,
    ])?;
    Ok(())
}

/// Adds `column` to `table` unless the table has it (a migration).
fn add_column_if_missing(
    conn: &Connection,
    table: &str,
    column: &str,
    declaration: &str,
) -> Result<(), StoreError> {
    let has: bool = conn
        .prepare(&format!(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1)"
        ))?
        .query_row([column], |r| r.get(0))?;
    if !has {
        conn.execute_batch(&format!(
            "ALTER TABLE {table} ADD COLUMN {column} {declaration};"
        ))?;
    }
    Ok(())
}

/// The `conversations.kind` code of `kind`.
fn kind_code(kind: ConversationKind) -> i64 {
    match kind {
        ConversationKind::DirectMessage => 1,
        ConversationKind::Room => 2,
    }
}

/// Moves `stream`'s cursor forward to `next_seq` (never back), inside the open transaction.
fn advance_cursor(tx: &Connection, stream: &[u8], next_seq: u64) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO cursors (stream, next_seq, acked) VALUES (?1, ?2, 0)
         ON CONFLICT (stream) DO UPDATE SET next_seq = max(next_seq, excluded.next_seq)",
    )?
    .execute(params![stream, to_i64(next_seq)])?;
    Ok(())
}

/// Records `c` as a conversation this device is in (a member again if it was removed) and
/// moves its cursor forward to `from_seq`, inside the open transaction: a join from a
/// Welcome, read at once or accepted later.
fn member_again(tx: &Connection, c: &ConversationRecord, from_seq: Seq) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO conversations (id, kind, peer, removed) VALUES (?1, ?2, ?3, 0)
         ON CONFLICT (id) DO UPDATE SET removed = 0",
    )?
    .execute(params![
        c.id.0.as_slice(),
        kind_code(c.kind),
        c.peer.map(|p| p.0.to_vec())
    ])?;
    advance_cursor(
        tx,
        &stream_key(&StreamId::Conversation(c.id)),
        from_seq.get(),
    )
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl ClientStore {
    /// Opens (creating and migrating) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn
            .prepare_cached("PRAGMA user_version")?
            .query_row([], |r| r.get(0))?;
        let fresh: bool = conn
            .prepare_cached(
                "SELECT NOT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'conversations')",
            )?
            .query_row([], |r| r.get(0))?;
        if !fresh && version < 2 {
            // Version 2 records whether this device was removed from a conversation.
            conn.execute_batch(
                "ALTER TABLE conversations ADD COLUMN removed INTEGER NOT NULL DEFAULT 0;",
            )?;
        }
        conn.execute_batch(SCHEMA)?;
        if !fresh && version < 4 {
            // Version 4 records unreadable entries and forked conversations (tables
            // created above by this version's schema already have the columns).
            for (table, column, declaration) in [
                ("messages", "unreadable", "TEXT"),
                ("conversations", "forked_seq", "INTEGER"),
                ("conversations", "forked_reason", "TEXT"),
            ] {
                add_column_if_missing(&conn, table, column, declaration)?;
            }
        }
        if !fresh && version < 6 {
            // Version 6 keeps the sender the gateway named for a message MLS authenticated
            // as another's.
            add_column_if_missing(&conn, "messages", "gateway_sender", "BLOB")?;
        }
        if !fresh && version < 9 {
            // Version 9 numbers each sender's messages (SPEC.md 7.9).
            for (table, column, declaration) in [
                ("messages", "counter", "INTEGER"),
                ("messages", "irregular", "INTEGER"),
                (
                    "conversations",
                    "sent_counter",
                    "INTEGER NOT NULL DEFAULT 0",
                ),
            ] {
                add_column_if_missing(&conn, table, column, declaration)?;
            }
        }
        if !fresh && version < 10 {
            // Version 10 keeps a Commit's GroupInfo for its resend, and the resyncs of
            // each conversation (SPEC.md 7.10).
            for (table, column, declaration) in [
                ("outbox", "group_info", "BLOB"),
                ("conversations", "resyncs", "INTEGER NOT NULL DEFAULT 0"),
                ("conversations", "resync_seq", "INTEGER"),
                ("conversations", "resync_from", "INTEGER"),
            ] {
                add_column_if_missing(&conn, table, column, declaration)?;
            }
        }
        // Every statement is prepared once per connection (parsing cost more than running
        // them on the per-entry path).
        conn.set_prepared_statement_cache_capacity(64);
        Ok(Self {
            conn,
            keep_messages: None,
        })
    }

    /// Keeps at most `keep` messages per conversation, the newest by seq: recording a
    /// message deletes the oldest beyond that (a device that only needs recent history:
    /// a bot, a simulated member of a busy room). `None`, the default, keeps every
    /// message. Which entries were processed is tracked by the cursors, not by the kept
    /// messages, so an entry that comes again is still recognised.
    pub fn set_message_retention(&mut self, keep: Option<std::num::NonZeroU32>) {
        self.keep_messages = keep;
    }

    /// The identity, once `init` stored one.
    pub fn identity(&self) -> Result<Option<StoredIdentity>, StoreError> {
        type Row = (Option<Vec<u8>>, Vec<u8>, Vec<u8>, Vec<u8>);
        let row: Option<Row> = self
            .conn
            .prepare_cached(
                "SELECT system_seed, system, device_seed, certificate FROM identity WHERE id = 1",
            )?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .optional()?;
        let Some((system_seed, system, device_seed, certificate)) = row else {
            return Ok(None);
        };
        Ok(Some(StoredIdentity {
            system_seed: system_seed.map(|s| array(s, "system key")).transpose()?,
            system: SystemKey(array(system, "system")?),
            device_seed: array(device_seed, "device key")?,
            certificate,
        }))
    }

    /// The device key seed and process id of a device waiting to be linked (`init --link`),
    /// if any.
    pub fn pending_device(&self) -> Result<Option<([u8; 32], ProcessId)>, StoreError> {
        let row: Option<(Vec<u8>, Vec<u8>)> = self
            .conn
            .prepare_cached("SELECT device_seed, process FROM pending_device WHERE id = 1")?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        row.map(|(seed, process)| {
            Ok((
                array(seed, "pending device key")?,
                ProcessId(array(process, "pending process id")?),
            ))
        })
        .transpose()
    }

    /// Keeps the key and process id of a device waiting to be linked.
    pub fn set_pending_device(
        &mut self,
        device_seed: &[u8; 32],
        process: &ProcessId,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO pending_device (id, device_seed, process)
                 VALUES (1, ?1, ?2)",
            )?
            .execute(params![device_seed.as_slice(), process.0.as_slice()])?;
        Ok(())
    }

    /// Stores the identity of a linked device and forgets its pending state, in one
    /// transaction.
    pub fn complete_link(&mut self, identity: &StoredIdentity) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        put_identity(&tx, identity)?;
        tx.execute("DELETE FROM pending_device", [])?;
        tx.commit()?;
        Ok(())
    }

    /// Stores the identity, replacing any (a renewed certificate).
    pub fn set_identity(&mut self, identity: &StoredIdentity) -> Result<(), StoreError> {
        put_identity(&self.conn, identity)
    }

    /// Adds a contact under a local name.
    pub fn add_contact(&mut self, name: &str, system: &SystemKey) -> Result<(), StoreError> {
        match self
            .conn
            .prepare_cached("INSERT INTO contacts (name, system) VALUES (?1, ?2)")?
            .execute(params![name, system.0.as_slice()])
        {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::ContactExists(name.to_owned()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Removes a contact; `false` if there was none of that name.
    pub fn remove_contact(&mut self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .execute("DELETE FROM contacts WHERE name = ?1", [name])?
            == 1)
    }

    /// Records that the user compared `system`'s safety number and found it right (SPEC.md
    /// 3.6), with the devices of that user this device saw then (at most [`DEVICES_MAX`]).
    pub fn set_verified(
        &mut self,
        system: &SystemKey,
        devices: &[ProcessId],
        at: UnixMs,
    ) -> Result<(), StoreError> {
        let devices: Vec<u8> = devices.iter().take(DEVICES_MAX).flat_map(|p| p.0).collect();
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO verified_users (system, verified_ms, devices)
                 VALUES (?1, ?2, ?3)",
            )?
            .execute(params![system.0.as_slice(), to_i64(at.0), devices])?;
        Ok(())
    }

    /// When the user verified `system`, and the devices seen then; `None` if never.
    pub fn verified(&self, system: &SystemKey) -> Result<Option<Verification>, StoreError> {
        let row: Option<(i64, Vec<u8>)> = self
            .conn
            .prepare_cached("SELECT verified_ms, devices FROM verified_users WHERE system = ?1")?
            .query_row([system.0.as_slice()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        row.map(|(at, devices)| {
            if devices.len() % 16 != 0 {
                return Err(StoreError::Corrupt("verified devices"));
            }
            Ok(Verification {
                at: UnixMs(u64::try_from(at).unwrap_or(0)),
                devices: devices
                    .chunks_exact(16)
                    .map(|c| array(c.to_vec(), "process id").map(ProcessId))
                    .collect::<Result<_, _>>()?,
            })
        })
        .transpose()
    }

    /// The contacts, by name.
    pub fn contacts(&self) -> Result<Vec<(String, SystemKey)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name, system FROM contacts ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        rows.map(|row| {
            let (name, system) = row?;
            Ok((name, SystemKey(array(system, "contact key")?)))
        })
        .collect()
    }

    /// Records a conversation; `false` if it was known.
    pub fn add_conversation(&mut self, c: &ConversationRecord) -> Result<bool, StoreError> {
        let kind = kind_code(c.kind);
        Ok(self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO conversations (id, kind, peer) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![
                c.id.0.as_slice(),
                kind,
                c.peer.map(|p| p.0.to_vec())
            ])?
            == 1)
    }

    /// Records that this device was removed from `conversation` (its Commit was processed,
    /// or the gateway refused to deliver it more).
    pub fn set_removed(&mut self, conversation: &ConversationId) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE conversations SET removed = 1 WHERE id = ?1")?
            .execute([conversation.0.as_slice()])?;
        Ok(())
    }

    /// Records that `conversation` forked at `seq`: a Commit the gateway accepted there
    /// could not be applied here, for `reason`. The first fork is kept.
    pub fn set_forked(
        &mut self,
        conversation: &ConversationId,
        seq: Seq,
        reason: &str,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "UPDATE conversations SET forked_seq = ?2, forked_reason = ?3
                 WHERE id = ?1 AND forked_seq IS NULL",
            )?
            .execute(params![
                conversation.0.as_slice(),
                to_i64(seq.get()),
                reason
            ])?;
        Ok(())
    }

    /// Records that this device got back into `conversation` by a resync accepted at
    /// `seq` (SPEC.md 7.10): the fork is over, and where it was is kept to tell the user.
    pub fn set_resynced(
        &mut self,
        conversation: &ConversationId,
        seq: Seq,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "UPDATE conversations SET resync_from = forked_seq, resync_seq = ?2,
                     resyncs = resyncs + 1, forked_seq = NULL, forked_reason = NULL
                 WHERE id = ?1",
            )?
            .execute(params![conversation.0.as_slice(), to_i64(seq.get())])?;
        Ok(())
    }

    /// How often this device resynced `conversation`, and the last time: (count, the seq
    /// of the fork it ended, the seq of the resync).
    pub fn resyncs(
        &self,
        conversation: &ConversationId,
    ) -> Result<(u64, Option<(Seq, Seq)>), StoreError> {
        let row: Option<(i64, Option<i64>, Option<i64>)> = self
            .conn
            .prepare_cached(
                "SELECT resyncs, resync_from, resync_seq FROM conversations WHERE id = ?1",
            )?
            .query_row([conversation.0.as_slice()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let seq = |v: i64| u64::try_from(v).ok().and_then(Seq::new);
        Ok(match row {
            Some((count, from, at)) => (
                u64::try_from(count).unwrap_or(0),
                from.and_then(seq).zip(at.and_then(seq)),
            ),
            None => (0, None),
        })
    }

    /// The conversations that forked here and this device is still in.
    pub fn forked_conversations(&self) -> Result<Vec<ConversationId>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id FROM conversations WHERE forked_seq IS NOT NULL AND removed = 0",
        )?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        rows.map(|id| Ok(ConversationId(array(id?, "conversation id")?)))
            .collect()
    }

    /// Where and why `conversation` forked, if it did ([`ClientStore::set_forked`]).
    pub fn forked(
        &self,
        conversation: &ConversationId,
    ) -> Result<Option<(Seq, String)>, StoreError> {
        let row: Option<(Option<i64>, Option<String>)> = self
            .conn
            .prepare_cached("SELECT forked_seq, forked_reason FROM conversations WHERE id = ?1")?
            .query_row([conversation.0.as_slice()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(match row {
            Some((Some(seq), reason)) => Some((
                u64::try_from(seq)
                    .ok()
                    .and_then(Seq::new)
                    .ok_or(StoreError::Corrupt("fork seq"))?,
                reason.unwrap_or_default(),
            )),
            _ => None,
        })
    }

    /// Records a join from a Welcome, in one transaction: the conversation (a member again
    /// if it was removed), its cursor moved forward to `from_seq` (the seq after the Commit
    /// that added this device: what came before is not for it), and the inbox entry
    /// `inbox_seq` processed. `false`, changing nothing, when `inbox_seq` was processed.
    pub fn join_conversation(
        &mut self,
        c: &ConversationRecord,
        from_seq: Seq,
        inbox_seq: Seq,
    ) -> Result<bool, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let inbox = stream_key(&StreamId::Inbox);
        if processed(&tx, &inbox, inbox_seq)? {
            return Ok(false);
        }
        member_again(&tx, c, from_seq)?;
        advance_cursor(&tx, &inbox, inbox_seq.get() + 1)?;
        tx.commit()?;
        Ok(true)
    }

    /// Holds an invitation request (a newer Welcome to the same conversation replaces the
    /// older), and drops the oldest requests beyond [`REQUESTS_MAX`].
    pub fn hold_request(&mut self, r: &InvitationRequest) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.prepare_cached(
            "INSERT INTO requests (conversation, inviter, commit_seq, welcome, received_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (conversation) DO UPDATE SET inviter = excluded.inviter,
                 commit_seq = excluded.commit_seq, welcome = excluded.welcome,
                 received_ms = excluded.received_ms",
        )?
        .execute(params![
            r.conversation.0.as_slice(),
            r.inviter.to_bytes().as_slice(),
            to_i64(r.commit_seq.get()),
            r.welcome,
            to_i64(r.received.0)
        ])?;
        tx.prepare_cached(
            "DELETE FROM requests WHERE conversation NOT IN (
                 SELECT conversation FROM requests ORDER BY received_ms DESC, conversation
                 LIMIT ?1)",
        )?
        .execute([REQUESTS_MAX as i64])?;
        tx.commit()?;
        Ok(())
    }

    /// The invitation requests, oldest first.
    pub fn requests(&self) -> Result<Vec<InvitationRequest>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT conversation, inviter, commit_seq, welcome, received_ms FROM requests
             ORDER BY received_ms, conversation",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Vec<u8>>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        rows.map(|row| {
            let (conversation, inviter, commit_seq, welcome, received) = row?;
            Ok(InvitationRequest {
                conversation: ConversationId(array(conversation, "request conversation")?),
                inviter: DeviceId::from_slice(&inviter)
                    .map_err(|_| StoreError::Corrupt("request inviter"))?,
                commit_seq: u64::try_from(commit_seq)
                    .ok()
                    .and_then(Seq::new)
                    .ok_or(StoreError::Corrupt("request commit seq"))?,
                welcome,
                received: UnixMs(u64::try_from(received).unwrap_or(0)),
            })
        })
        .collect()
    }

    /// Forgets an invitation request; `false` if there was none for `conversation`.
    pub fn drop_request(&mut self, conversation: &ConversationId) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("DELETE FROM requests WHERE conversation = ?1")?
            .execute([conversation.0.as_slice()])?
            == 1)
    }

    /// Records the join of an accepted invitation request, in one transaction: the
    /// conversation, its cursor moved forward to `from_seq`, and the request gone.
    pub fn join_requested(
        &mut self,
        c: &ConversationRecord,
        from_seq: Seq,
    ) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        member_again(&tx, c, from_seq)?;
        tx.prepare_cached("DELETE FROM requests WHERE conversation = ?1")?
            .execute([c.id.0.as_slice()])?;
        tx.commit()?;
        Ok(())
    }

    /// The conversations.
    pub fn conversations(&self) -> Result<Vec<ConversationRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, kind, peer, removed FROM conversations ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<Vec<u8>>>(2)?,
                r.get::<_, bool>(3)?,
            ))
        })?;
        rows.map(|row| {
            let (id, kind, peer, removed) = row?;
            Ok(ConversationRecord {
                id: ConversationId(array(id, "conversation id")?),
                kind: if kind == 2 {
                    ConversationKind::Room
                } else {
                    ConversationKind::DirectMessage
                },
                peer: peer.map(|p| array(p, "peer").map(SystemKey)).transpose()?,
                removed,
            })
        })
        .collect()
    }

    /// A stream's cursor, if this device ever processed or acknowledged anything on it.
    pub fn cursor(&self, stream: &StreamId) -> Result<Option<Cursor>, StoreError> {
        let row: Option<(i64, i64)> = self
            .conn
            .prepare_cached("SELECT next_seq, acked FROM cursors WHERE stream = ?1")?
            .query_row([stream_key(stream)], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        row.map(|(next, acked)| {
            Ok(Cursor {
                next_seq: u64::try_from(next)
                    .ok()
                    .and_then(Seq::new)
                    .ok_or(StoreError::Corrupt("cursor"))?,
                acked: acked as u64,
            })
        })
        .transpose()
    }

    /// Records that the entry `seq` of `stream` was processed, with the message it held if
    /// any, and moves the stream's `next_seq` past it, in one transaction. `false`, changing
    /// nothing, when `seq` was already processed (a duplicate); `false` too when a message
    /// is already kept at that seq (processed before the cursor was lost: not shown again).
    pub fn deliver(
        &mut self,
        stream: &StreamId,
        seq: Seq,
        message: Option<&Message>,
    ) -> Result<bool, StoreError> {
        let new = self.deliver_all([(*stream, seq, message)])?;
        Ok(new.first().copied().unwrap_or(false))
    }

    /// [`ClientStore::deliver`] for many entries, in one transaction (a receive batch);
    /// whether each was new.
    pub fn deliver_all<'a>(
        &mut self,
        entries: impl IntoIterator<Item = (StreamId, Seq, Option<&'a Message>)>,
    ) -> Result<Vec<bool>, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut conversations = std::collections::BTreeSet::new();
        let new = entries
            .into_iter()
            .map(|(stream, seq, message)| {
                if let Some(m) = message {
                    conversations.insert(m.conversation);
                }
                deliver_in(&tx, &stream, seq, message)
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(keep) = self.keep_messages {
            for c in &conversations {
                prune_messages(&tx, c, keep)?;
            }
        }
        tx.commit()?;
        Ok(new)
    }

    /// Records that `seq` was acknowledged (never moves back, REQ-6.8-3).
    pub fn set_acked(&mut self, stream: &StreamId, seq: Seq) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO cursors (stream, next_seq, acked) VALUES (?1, ?2, ?3)
             ON CONFLICT (stream) DO UPDATE SET acked = max(acked, excluded.acked)",
            )?
            .execute(params![
                stream_key(stream),
                to_i64(seq.get() + 1),
                to_i64(seq.get())
            ])?;
        Ok(())
    }

    /// Puts a composed message in the outbox, before its first send.
    pub fn outbox_put(&mut self, item: &OutboxItem) -> Result<(), StoreError> {
        self.conn.prepare_cached("INSERT OR IGNORE INTO outbox (msg_id, conversation, payload, welcome, plaintext, composed_ms, position, group_info)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, (SELECT coalesce(max(position), 0) + 1 FROM outbox), ?7)")?.execute(params![
                item.msg_id.0.as_slice(),
                item.conversation.0.as_slice(),
                item.payload,
                item.welcome,
                item.plaintext,
                to_i64(item.composed.0),
                item.group_info,
            ],
        )?;
        Ok(())
    }

    /// Whether a message with `msg_id` is recorded in `conversation` (a replay of an entry
    /// already processed, after a crash rewound the cursor).
    pub fn holds_message(
        &self,
        conversation: &ConversationId,
        msg_id: &MsgId,
    ) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM messages WHERE conversation = ?1 AND msg_id = ?2")?
            .query_row(
                params![conversation.0.as_slice(), msg_id.0.as_slice()],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Removes a message from the outbox (accepted, or given up); `false` if absent.
    pub fn outbox_remove(&mut self, msg_id: &MsgId) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("DELETE FROM outbox WHERE msg_id = ?1")?
            .execute([msg_id.0.as_slice()])?
            == 1)
    }

    /// Whether the outbox holds a message with this `msg_id` and exactly this payload: the
    /// entry is this device's own, whoever the gateway says sent it (SPEC.md 7.8).
    pub fn outbox_holds(&self, msg_id: &MsgId, payload: &[u8]) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM outbox WHERE msg_id = ?1 AND payload = ?2")?
            .query_row(params![msg_id.0.as_slice(), payload], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// The plaintext kept with an outbox message, if it is still there and has one.
    pub fn outbox_plaintext(&self, msg_id: &MsgId) -> Result<Option<Vec<u8>>, StoreError> {
        let row: Option<Option<Vec<u8>>> = self
            .conn
            .prepare_cached("SELECT plaintext FROM outbox WHERE msg_id = ?1")?
            .query_row([msg_id.0.as_slice()], |r| r.get(0))
            .optional()?;
        Ok(row.flatten())
    }

    /// The outbox, in the order messages were composed.
    pub fn outbox(&self) -> Result<Vec<OutboxItem>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT msg_id, conversation, payload, welcome, plaintext, composed_ms, group_info
             FROM outbox ORDER BY position",
        )?;
        type Row = (
            Vec<u8>,
            Vec<u8>,
            Vec<u8>,
            Option<Vec<u8>>,
            Option<Vec<u8>>,
            i64,
            Option<Vec<u8>>,
        );
        let rows = stmt.query_map([], |r| -> rusqlite::Result<Row> {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })?;
        rows.map(|row| {
            let (msg_id, conversation, payload, welcome, plaintext, composed, group_info) = row?;
            Ok(OutboxItem {
                msg_id: MsgId(array(msg_id, "msg_id")?),
                conversation: ConversationId(array(conversation, "conversation id")?),
                payload,
                welcome,
                group_info,
                plaintext,
                composed: UnixMs(composed as u64),
            })
        })
        .collect()
    }

    /// Names a room on this device (names are local; other members name it as they like).
    /// Refused when another room has the name.
    pub fn set_room_name(
        &mut self,
        conversation: &ConversationId,
        name: &str,
    ) -> Result<bool, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let taken: bool = tx
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM room_names WHERE name = ?1 AND conversation != ?2)",
            )?
            .query_row(params![name, conversation.0.as_slice()], |r| r.get(0))?;
        if taken {
            return Ok(false);
        }
        tx.prepare_cached("DELETE FROM room_names WHERE conversation = ?1")?
            .execute([conversation.0.as_slice()])?;
        tx.prepare_cached("INSERT INTO room_names (name, conversation) VALUES (?1, ?2)")?
            .execute(params![name, conversation.0.as_slice()])?;
        tx.commit()?;
        Ok(true)
    }

    /// The room this device named `name`.
    pub fn room_named(&self, name: &str) -> Result<Option<ConversationId>, StoreError> {
        let id: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT conversation FROM room_names WHERE name = ?1")?
            .query_row([name], |r| r.get(0))
            .optional()?;
        id.map(|id| array(id, "room id").map(ConversationId))
            .transpose()
    }

    /// This device's name for a room.
    pub fn room_name(&self, conversation: &ConversationId) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT name FROM room_names WHERE conversation = ?1")?
            .query_row([conversation.0.as_slice()], |r| r.get(0))
            .optional()?)
    }

    /// Records that `device` asked to leave `conversation` (SPEC.md 10.3); kept until it
    /// is no longer a member.
    pub fn add_leave_request(
        &mut self,
        conversation: &ConversationId,
        device: &DeviceId,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT OR IGNORE INTO leave_requests (conversation, device) VALUES (?1, ?2)",
            )?
            .execute(params![
                conversation.0.as_slice(),
                device.to_bytes().as_slice()
            ])?;
        Ok(())
    }

    /// The devices that asked to leave `conversation`, by device.
    pub fn leave_requests(
        &self,
        conversation: &ConversationId,
    ) -> Result<Vec<DeviceId>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT device FROM leave_requests WHERE conversation = ?1 ORDER BY device",
        )?;
        let rows = stmt.query_map([conversation.0.as_slice()], |r| r.get::<_, Vec<u8>>(0))?;
        rows.map(|row| DeviceId::from_slice(&row?).map_err(|_| StoreError::Corrupt("device")))
            .collect()
    }

    /// Forgets the leave requests of `conversation` by devices not in `members`.
    pub fn retain_leave_requests(
        &mut self,
        conversation: &ConversationId,
        members: &[DeviceId],
    ) -> Result<(), StoreError> {
        for device in self.leave_requests(conversation)? {
            if !members.contains(&device) {
                self.conn
                    .prepare_cached(
                        "DELETE FROM leave_requests WHERE conversation = ?1 AND device = ?2",
                    )?
                    .execute(params![
                        conversation.0.as_slice(),
                        device.to_bytes().as_slice()
                    ])?;
            }
        }
        Ok(())
    }

    /// The highest number (SPEC.md 7.9) read from `sender` in `conversation`, if any.
    pub fn sender_counter(
        &self,
        conversation: &ConversationId,
        sender: &DeviceId,
    ) -> Result<Option<u64>, StoreError> {
        let v: Option<i64> = self
            .conn
            .prepare_cached(
                "SELECT highest FROM sender_counters WHERE conversation = ?1 AND sender = ?2",
            )?
            .query_row(
                params![conversation.0.as_slice(), sender.to_bytes().as_slice()],
                |r| r.get(0),
            )
            .optional()?;
        Ok(v.and_then(|v| u64::try_from(v).ok()))
    }

    /// Takes the next number for a message this device sends into `conversation` (1 for
    /// the first): durable before the message is encrypted, so no number is used twice.
    pub fn take_sent_counter(&mut self, conversation: &ConversationId) -> Result<u64, StoreError> {
        let v: Option<i64> = self
            .conn
            .prepare_cached(
                "UPDATE conversations SET sent_counter = sent_counter + 1 WHERE id = ?1
                 RETURNING sent_counter",
            )?
            .query_row([conversation.0.as_slice()], |r| r.get(0))
            .optional()?;
        v.and_then(|v| u64::try_from(v).ok())
            .ok_or(StoreError::Corrupt("no such conversation"))
    }

    /// What this device noticed that it could not trust, over every conversation.
    pub fn suspicions(&self) -> Result<Suspicions, StoreError> {
        let count = |sql: &str| -> Result<u64, StoreError> {
            let n: i64 = self.conn.prepare_cached(sql)?.query_row([], |r| r.get(0))?;
            Ok(u64::try_from(n).unwrap_or(0))
        };
        Ok(Suspicions {
            relabelled: count("SELECT count(*) FROM messages WHERE gateway_sender IS NOT NULL")?,
            unreadable: count("SELECT count(*) FROM messages WHERE unreadable IS NOT NULL")?,
            forked: count("SELECT count(*) FROM conversations WHERE forked_seq IS NOT NULL")?,
            missing: count(
                "SELECT coalesce(sum(CASE WHEN irregular > 0 THEN irregular ELSE 0 END), 0)
                 FROM messages",
            )?,
            out_of_order: count("SELECT count(*) FROM messages WHERE irregular = -1")?,
            resynced: count("SELECT coalesce(sum(resyncs), 0) FROM conversations")?,
        })
    }

    /// Messages of `conversation` with seq above `after`, oldest first, at most `limit`.
    pub fn messages(
        &self,
        conversation: &ConversationId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, sender, msg_id, accepted_ms, body, unreadable, gateway_sender, counter,
                 irregular
             FROM messages
             WHERE conversation = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let rows = stmt.query_map(
            params![
                conversation.0.as_slice(),
                to_i64(after),
                i64::try_from(limit).unwrap_or(i64::MAX)
            ],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, Option<Vec<u8>>>(6)?,
                    r.get::<_, Option<i64>>(7)?,
                    r.get::<_, Option<i64>>(8)?,
                ))
            },
        )?;
        rows.map(|row| {
            let (
                seq,
                sender,
                msg_id,
                accepted,
                body,
                unreadable,
                gateway_sender,
                counter,
                irregular,
            ) = row?;
            Ok(Message {
                conversation: *conversation,
                seq: u64::try_from(seq)
                    .ok()
                    .and_then(Seq::new)
                    .ok_or(StoreError::Corrupt("seq"))?,
                sender: DeviceId::from_slice(&sender).map_err(|_| StoreError::Corrupt("sender"))?,
                msg_id: MsgId(array(msg_id, "msg_id")?),
                accepted: UnixMs(accepted as u64),
                body,
                unreadable,
                gateway_sender: gateway_sender
                    .map(|d| DeviceId::from_slice(&d))
                    .transpose()
                    .map_err(|_| StoreError::Corrupt("gateway_sender"))?,
                counter: counter.and_then(|c| u64::try_from(c).ok()),
                irregular: irregular.and_then(Irregular::from_column),
            })
        })
        .collect()
    }
}
