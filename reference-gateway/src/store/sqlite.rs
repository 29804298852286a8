//! [`Store`] on SQLite, the embedded default: one file, WAL journal, `synchronous=FULL`
//! (an acknowledged entry survives a crash of the process and, on hardware that honours
//! fsync, a power loss). Each mutating call runs in one `BEGIN IMMEDIATE` transaction.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use sha2::{Digest, Sha256};

use super::{
    AppendKind, AppendOutcome, AppendRequest, ClaimedPackage, ConversationState, CreateOutcome,
    DeviceListing, GcReport, InviteSettingsOf, IssuedToken, JoinOutcome, PoolStatus,
    PresenceStatus, Redeemed, RetentionPolicy, ShareLists, Store, StoreError, StoredKeyPackage,
    StreamKey, UploadOutcome,
};
use crate::durability::WriteCounters;
use crate::faults::Faults;
use crate::store::KeptGroupInfo;
use crate::tracked_group::{TrackedGroup, membership_change};
use confab_spec::consent::{self, ConsentOf};
use confab_spec::frame::{ConversationKind, Entry, EntryBody, InvitePolicy};
use confab_spec::identity::Revocation;
use confab_spec::ids::{ConversationId, DeviceId, Epoch, MlsBytes, MsgId, Seq, SystemKey, UnixMs};
use confab_spec::limits;
use confab_spec::rooms::{self, CommitView, RolesError, RoomRoles};

/// Prepared statements kept: more than the store has.
const STATEMENT_CACHE: usize = 96;

/// The SQLite store.
pub struct SqliteStore {
    conn: Connection,
    faults: Faults,
    path: std::path::PathBuf,
    /// The `ack_before_durable` fault is on: `conn` is in memory.
    write_behind: bool,
    /// Group commit: store calls share batches ([`crate::durability`]).
    batch: Option<std::sync::Arc<WriteCounters>>,
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // A clean stop commits the open batch (nothing in it was acknowledged yet, but
        // there is no reason to lose it).
        if let Err(e) = self.commit_batch() {
            tracing::warn!(error = %e, "committing the last batch failed");
        }
    }
}

/// One store call's atomic unit: its own transaction, or a savepoint inside the open
/// batch (group commit).
enum Tx<'a> {
    Own(rusqlite::Transaction<'a>),
    InBatch(rusqlite::Savepoint<'a>),
}

impl std::ops::Deref for Tx<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        match self {
            Tx::Own(t) => t,
            Tx::InBatch(s) => s,
        }
    }
}

impl Tx<'_> {
    /// Commits the transaction, or releases the savepoint into the batch.
    fn commit(self) -> rusqlite::Result<()> {
        match self {
            Tx::Own(t) => t.commit(),
            Tx::InBatch(s) => s.commit(),
        }
    }
}

/// Begins a store call: a transaction of its own, or under group commit a savepoint in
/// the open batch (beginning the batch if none is open).
fn begin<'a>(conn: &'a mut Connection, batch: Option<&WriteCounters>) -> rusqlite::Result<Tx<'a>> {
    let Some(batch) = batch else {
        return conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map(Tx::Own);
    };
    if !batch.is_open() {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        batch.opened();
    }
    conn.savepoint().map(Tx::InBatch)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS conversations (
    id BLOB PRIMARY KEY,
    kind INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    epoch_seq INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS roster (
    conversation BLOB NOT NULL,
    leaf INTEGER NOT NULL,
    device BLOB NOT NULL,
    PRIMARY KEY (conversation, leaf)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS roster_device ON roster (conversation, device);
CREATE INDEX IF NOT EXISTS roster_by_device ON roster (device);
CREATE TABLE IF NOT EXISTS room_roles (
    conversation BLOB PRIMARY KEY,
    roles BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leaving (
    conversation BLOB NOT NULL,
    leaf INTEGER NOT NULL,
    PRIMARY KEY (conversation, leaf)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS streams (
    stream BLOB PRIMARY KEY,
    head_seq INTEGER NOT NULL,
    oldest_seq INTEGER NOT NULL,
    bytes INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entries (
    stream BLOB NOT NULL,
    seq INTEGER NOT NULL,
    msg_id BLOB NOT NULL,
    sender BLOB NOT NULL,
    kind INTEGER NOT NULL,
    epoch INTEGER,
    conversation BLOB,
    commit_seq INTEGER,
    accepted_ms INTEGER NOT NULL,
    payload BLOB NOT NULL,
    payload_hash BLOB NOT NULL,
    PRIMARY KEY (stream, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS entries_msg_id ON entries (stream, msg_id);
CREATE TABLE IF NOT EXISTS cursors (
    stream BLOB NOT NULL,
    device BLOB NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (stream, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS resume_tokens (
    hash BLOB PRIMARY KEY,
    device BLOB NOT NULL,
    session BLOB NOT NULL,
    family BLOB NOT NULL,
    expires_ms INTEGER NOT NULL,
    certificate_not_after_ms INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0,
    revoked INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS resume_tokens_family ON resume_tokens (family);
CREATE TABLE IF NOT EXISTS revocations (
    system BLOB NOT NULL,
    process BLOB NOT NULL,
    effective_ms INTEGER NOT NULL,
    revocation BLOB NOT NULL,
    PRIMARY KEY (system, process)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS key_packages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    system BLOB NOT NULL,
    process BLOB NOT NULL,
    not_after_s INTEGER NOT NULL,
    package BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS key_packages_device ON key_packages (system, process, id);
CREATE TABLE IF NOT EXISTS last_resort_key_packages (
    system BLOB NOT NULL,
    process BLOB NOT NULL,
    not_after_s INTEGER NOT NULL,
    package BLOB NOT NULL,
    claimed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (system, process)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS departures (
    conversation BLOB NOT NULL,
    device BLOB NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (conversation, device, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS presence_status (
    user BLOB PRIMARY KEY,
    invisible INTEGER NOT NULL,
    last_seen_ms INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS share_lists (
    user BLOB NOT NULL,
    list INTEGER NOT NULL,
    peer BLOB NOT NULL,
    PRIMARY KEY (user, peer, list)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS arrivals (
    conversation BLOB NOT NULL,
    device BLOB NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (conversation, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_states (
    conversation BLOB PRIMARY KEY,
    snapshot BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_infos (
    conversation BLOB PRIMARY KEY,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    group_info BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS invite_policies (
    user BLOB PRIMARY KEY,
    policy INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS joined (
    user BLOB NOT NULL,
    conversation BLOB NOT NULL,
    PRIMARY KEY (user, conversation)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS joined_by_conversation ON joined (conversation);
PRAGMA user_version = 9;
";

impl SqliteStore {
    /// Opens (creating and migrating) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(db)?;
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;")
            .map_err(db)?;
        // Another process (a backup, an operator's query) may hold the write lock briefly.
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        if (1..8).contains(&version) {
            // Version 8 counts the payload bytes each stream retains (SPEC.md 11).
            let has: bool = conn
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM pragma_table_info('streams') WHERE name = 'bytes')",
                    [],
                    |r| r.get(0),
                )
                .map_err(db)?;
            if !has {
                conn.execute_batch(
                    "ALTER TABLE streams ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
                     UPDATE streams SET bytes = (SELECT COALESCE(SUM(length(payload)), 0)
                         FROM entries WHERE entries.stream = streams.stream);",
                )
                .map_err(db)?;
            }
        }
        if (1..9).contains(&version) {
            // Version 9 tells invited users from joined ones (SPEC.md 10.4): every user
            // with a device in a room before it counted as joined, and still does.
            conn.execute_batch(
                "INSERT OR IGNORE INTO joined (user, conversation)
                 SELECT DISTINCT substr(r.device, 1, 32), r.conversation FROM roster r
                 JOIN conversations c ON c.id = r.conversation WHERE c.kind = 2;",
            )
            .map_err(db)?;
        }
        // Every statement is prepared once and reused (parsing SQL cost more per append
        // than executing it).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(Self {
            conn,
            path: path.to_owned(),
            write_behind: false,
            faults: Faults::default(),
            batch: None,
        })
    }

    /// Switches to group commit ([`crate::durability`]): store calls share batches, each
    /// call a savepoint in the open batch, committed by [`Self::commit_batch`] with
    /// `synchronous=NORMAL` (the commit writes the WAL; the syncer makes it durable).
    /// Returns the counters that name the batch a write lands in, and the WAL file, after
    /// making its directory entry durable. Refused under the `ack_before_durable` fault
    /// (the database is in memory then).
    pub fn enable_group_commit(
        &mut self,
    ) -> Result<(std::sync::Arc<WriteCounters>, std::fs::File), StoreError> {
        if self.write_behind {
            return Err(StoreError::Database(
                "group commit needs the database on disk".into(),
            ));
        }
        let wal_path = std::path::PathBuf::from(format!("{}-wal", self.path.display()));
        let wal = std::fs::File::open(&wal_path)
            .map_err(|e| StoreError::Database(format!("opening {}: {e}", wal_path.display())))?;
        if let Some(dir) = wal_path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| StoreError::Database(format!("syncing {}: {e}", dir.display())))?;
        }
        wal.sync_data()
            .map_err(|e| StoreError::Database(format!("syncing {}: {e}", wal_path.display())))?;
        self.conn
            .execute_batch("PRAGMA synchronous=NORMAL;")
            .map_err(db)?;
        let counters = std::sync::Arc::new(WriteCounters::default());
        let hook = counters.clone();
        self.conn.commit_hook(Some(move || {
            hook.committed();
            false // never turn the commit into a rollback
        }));
        self.batch = Some(counters.clone());
        Ok((counters, wal))
    }

    /// Commits the open batch, if there is one (group commit). An error means writes
    /// already promised to waiting frames are lost: the caller must stop the gateway.
    pub fn commit_batch(&mut self) -> Result<(), StoreError> {
        let Some(batch) = &self.batch else {
            return Ok(());
        };
        if batch.is_lost() {
            return Err(StoreError::Database(
                "SQLite rolled a batch back and a later write committed on its own".into(),
            ));
        }
        if !batch.is_open() {
            return Ok(());
        }
        if self.conn.is_autocommit() {
            return Err(StoreError::Database(
                "SQLite rolled the open batch back".into(),
            ));
        }
        batch.committing(true);
        let committed = self.conn.execute_batch("COMMIT").map_err(db);
        batch.committing(false);
        committed
    }

    /// Turns on deliberately broken behaviours (self-tests only, [`Faults`]). With
    /// `ack_before_durable` the database moves into memory, written to disk only by
    /// [`Store::flush`].
    pub fn set_faults(&mut self, faults: Faults) -> Result<(), StoreError> {
        self.faults = faults;
        if faults.no_msg_id_dedup {
            // Without the index a resent message is really appended a second time.
            self.conn
                .execute_batch("DROP INDEX IF EXISTS entries_msg_id")
                .map_err(db)?;
        }
        if faults.ack_before_durable && !self.write_behind {
            let mut memory = Connection::open_in_memory().map_err(db)?;
            memory
                .restore(
                    rusqlite::MAIN_DB,
                    &self.path,
                    None::<fn(rusqlite::backup::Progress)>,
                )
                .map_err(db)?;
            self.conn = memory;
            self.write_behind = true;
        }
        Ok(())
    }
}

/// `share_lists.list`: the share list.
const LIST_SHARED: i64 = 1;
/// `share_lists.list`: the blocklist.
const LIST_BLOCKED: i64 = 2;
/// `share_lists.list`: the allow list of SPEC.md 8.1.
const LIST_ALLOWED: i64 = 3;

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

fn stream_key(s: &StreamKey) -> Vec<u8> {
    match s {
        StreamKey::Conversation(c) => [&[1u8][..], &c.0].concat(),
        StreamKey::Inbox(d) => [&[2u8][..], &d.to_bytes()].concat(),
    }
}

fn kind_code(kind: ConversationKind) -> i64 {
    match kind {
        ConversationKind::DirectMessage => 1,
        ConversationKind::Room => 2,
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn seq_of(v: i64) -> Result<Seq, StoreError> {
    u64::try_from(v)
        .ok()
        .and_then(Seq::new)
        .ok_or_else(|| StoreError::Corrupt(format!("seq {v}")))
}

fn device_of(bytes: &[u8]) -> Result<DeviceId, StoreError> {
    DeviceId::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// A conversation's roster: (leaf, device), by leaf.
fn roster_of(conn: &Connection, id: &ConversationId) -> Result<Vec<(u32, DeviceId)>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT leaf, device FROM roster WHERE conversation = ?1 ORDER BY leaf")
        .map_err(db)?;
    let rows = stmt
        .query_map([id.0.as_slice()], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })
        .map_err(db)?;
    rows.map(|row| {
        let (leaf, device) = row.map_err(db)?;
        Ok((leaf as u32, device_of(&device)?))
    })
    .collect()
}

/// The number of rooms `user` has joined (SPEC.md 10.4); under the
/// `invites_count_toward_rooms` fault, the rooms in which it has a device.
fn rooms_of(conn: &Connection, user: &SystemKey, faults: &Faults) -> Result<u64, StoreError> {
    if !faults.invites_count_toward_rooms {
        let n: i64 = conn
            .prepare_cached(
                "SELECT COUNT(*) FROM joined j JOIN conversations c ON c.id = j.conversation
                 WHERE j.user = ?1 AND c.kind = 2",
            )
            .map_err(db)?
            .query_row([user.0.as_slice()], |r| r.get(0))
            .map_err(db)?;
        return Ok(n.max(0) as u64);
    }
    let low = [&user.0[..], &[0u8; 16]].concat();
    let high = [&user.0[..], &[0xffu8; 16]].concat();
    let n: i64 = conn
        .prepare_cached(
            "SELECT COUNT(DISTINCT r.conversation) FROM roster r
             JOIN conversations c ON c.id = r.conversation
             WHERE r.device BETWEEN ?1 AND ?2 AND c.kind = 2",
        )
        .map_err(db)?
        .query_row(params![low, high], |r| r.get(0))
        .map_err(db)?;
    Ok(n.max(0) as u64)
}

/// What `target`'s settings say of `other` (SPEC.md 8.1): its policy and whether `other`
/// is on its allow list and its blocklist. The same indexed lookups whether or not
/// `target` belongs to anyone (REQ-8-13).
fn consent_of(
    conn: &Connection,
    target: &SystemKey,
    other: &SystemKey,
) -> Result<ConsentOf, StoreError> {
    let (policy, allowed, blocked): (i64, bool, bool) = conn
        .prepare_cached(
            "SELECT COALESCE((SELECT policy FROM invite_policies WHERE user = ?1), 1),
                    EXISTS (SELECT 1 FROM share_lists WHERE user = ?1 AND peer = ?2 AND list = ?3),
                    EXISTS (SELECT 1 FROM share_lists WHERE user = ?1 AND peer = ?2 AND list = ?4)",
        )
        .map_err(db)?
        .query_row(
            params![
                target.0.as_slice(),
                other.0.as_slice(),
                LIST_ALLOWED,
                LIST_BLOCKED
            ],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .map_err(db)?;
    let policy = u64::try_from(policy)
        .ok()
        .and_then(InvitePolicy::from_code)
        .ok_or_else(|| StoreError::Corrupt(format!("invite policy {policy}")))?;
    Ok(ConsentOf {
        policy,
        allowed,
        blocked,
    })
}

/// Drops the joined mark of every user of `id` that has no device left in its roster
/// (SPEC.md 10.4: a user added again is invited again).
fn forget_departed_joins(conn: &Connection, id: &ConversationId) -> Result<(), StoreError> {
    conn.prepare_cached(
        "DELETE FROM joined WHERE conversation = ?1 AND NOT EXISTS (
             SELECT 1 FROM roster r WHERE r.conversation = ?1
             AND r.device BETWEEN joined.user || zeroblob(16)
                              AND joined.user || x'ffffffffffffffffffffffffffffffff')",
    )
    .map_err(db)?
    .execute([id.0.as_slice()])
    .map_err(db)?;
    Ok(())
}

fn put_roles(conn: &Connection, id: &ConversationId, roles: &RoomRoles) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO room_roles (conversation, roles) VALUES (?1, ?2)
         ON CONFLICT (conversation) DO UPDATE SET roles = excluded.roles",
    )
    .map_err(db)?
    .execute(params![id.0.as_slice(), roles.to_extension()])
    .map_err(db)?;
    Ok(())
}

/// Stores the tracked group after a creation (`seq` 0) or an accepted Commit at `seq`: its
/// state (unless `roster_only`, the `stale_group_state` fault), its GroupInfo when it came
/// with one (SPEC.md 7.10), and its roster in place of the conversation's (SPEC.md 7.6:
/// membership follows MLS).
fn put_group(
    conn: &Connection,
    id: &ConversationId,
    group: &TrackedGroup,
    (seq, roster_only): (i64, bool),
) -> Result<(), StoreError> {
    if let Some(info) = &group.group_info {
        conn.prepare_cached(
            "INSERT INTO group_infos (conversation, epoch, seq, group_info) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (conversation) DO UPDATE SET epoch = excluded.epoch,
                 seq = excluded.seq, group_info = excluded.group_info",
        )
        .map_err(db)?
        .execute(params![
            id.0.as_slice(),
            to_i64(group.epoch.0),
            seq,
            info.as_slice()
        ])
        .map_err(db)?;
    }
    if !roster_only {
        conn.prepare_cached(
            "INSERT INTO group_states (conversation, snapshot) VALUES (?1, ?2)
             ON CONFLICT (conversation) DO UPDATE SET snapshot = excluded.snapshot",
        )
        .map_err(db)?
        .execute(params![id.0.as_slice(), group.snapshot.as_slice()])
        .map_err(db)?;
    }
    conn.prepare_cached("DELETE FROM roster WHERE conversation = ?1")
        .map_err(db)?
        .execute([id.0.as_slice()])
        .map_err(db)?;
    for (leaf, device) in &group.members {
        conn.prepare_cached("INSERT INTO roster (conversation, leaf, device) VALUES (?1, ?2, ?3)")
            .map_err(db)?
            .execute(params![
                id.0.as_slice(),
                i64::from(*leaf),
                device.to_bytes().as_slice()
            ])
            .map_err(db)?;
    }
    Ok(())
}

fn roles_of(conn: &Connection, id: &ConversationId) -> Result<Option<RoomRoles>, StoreError> {
    let data: Option<Vec<u8>> = conn
        .prepare_cached("SELECT roles FROM room_roles WHERE conversation = ?1")
        .map_err(db)?
        .query_row([id.0.as_slice()], |r| r.get(0))
        .optional()
        .map_err(db)?;
    data.map(|d| {
        RoomRoles::from_extension(&d).map_err(|e| StoreError::Corrupt(format!("room roles: {e}")))
    })
    .transpose()
}

fn device_at(
    conn: &Connection,
    id: &ConversationId,
    leaf: u32,
) -> Result<Option<DeviceId>, StoreError> {
    let device: Option<Vec<u8>> = conn
        .prepare_cached("SELECT device FROM roster WHERE conversation = ?1 AND leaf = ?2")
        .map_err(db)?
        .query_row(params![id.0.as_slice(), i64::from(leaf)], |r| r.get(0))
        .optional()
        .map_err(db)?;
    device.as_deref().map(device_of).transpose()
}

/// A Commit as [`govern`] judges it.
struct Governed<'a> {
    conversation: &'a ConversationId,
    room: bool,
    committer: &'a DeviceId,
    /// Leaves and devices the Commit removes.
    removed: &'a [(u32, DeviceId)],
    /// Devices it adds.
    added: &'a [DeviceId],
    /// The roles its GroupContextExtensions proposal states.
    roles: &'a Option<Result<RoomRoles, RolesError>>,
    /// The group after it.
    next: &'a TrackedGroup,
    limits: &'a super::RoomLimits,
    /// The `no_room_rules` fault: rules 1–8 are not checked.
    no_rules: bool,
    /// The `no_invite_consent` fault: rule 8 is not checked.
    no_consent: bool,
}

/// Judges a Commit that passed every check of SPEC.md 6.3 and 7.2–7.5 by the rules of
/// section 10: the roles it leaves the room with (`None` for a direct message), or the
/// refusal.
fn govern(
    conn: &Connection,
    g: &Governed<'_>,
) -> Result<Result<Option<RoomRoles>, AppendOutcome>, StoreError> {
    let forbidden = |why: String| Ok(Err(AppendOutcome::Forbidden(why)));
    let present_before: std::collections::BTreeSet<SystemKey> = roster_of(conn, g.conversation)?
        .into_iter()
        .map(|(_, d)| d.system)
        .collect();
    let mut removed = Vec::with_capacity(g.removed.len());
    for (leaf, device) in g.removed {
        let leaving: bool = conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM leaving WHERE conversation = ?1 AND leaf = ?2)",
            )
            .map_err(db)?
            .query_row(
                params![g.conversation.0.as_slice(), i64::from(*leaf)],
                |r| r.get(0),
            )
            .map_err(db)?;
        removed.push((*device, leaving));
    }
    let members_after = g.next.members.len();
    let present_after: std::collections::BTreeSet<SystemKey> =
        g.next.members.iter().map(|(_, d)| d.system).collect();
    // Rule 7: nobody adds a user that blocks them (rooms and direct messages alike).
    let committer = g.committer.system;
    if g.no_rules {
        let stated = g.roles.as_ref().and_then(|r| r.as_ref().ok()).cloned();
        return Ok(Ok(if g.room {
            stated.or(roles_of(conn, g.conversation)?)
        } else {
            None
        }));
    }
    let invitees: std::collections::BTreeSet<SystemKey> = g
        .added
        .iter()
        .map(|d| d.system)
        .filter(|s| *s != committer)
        .collect();
    for invitee in &invitees {
        let blocks: bool = conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM share_lists WHERE user = ?1 AND peer = ?2 AND list = ?3)",
            )
            .map_err(db)?
            .query_row(
                params![invitee.0.as_slice(), committer.0.as_slice(), LIST_BLOCKED],
                |r| r.get(0),
            )
            .map_err(db)?;
        if blocks {
            return forbidden("rule 7: an invitee blocks the committer".into());
        }
    }
    // Rule 8: every user the Commit brings in allows the committer (SPEC.md 8.1); checked
    // after the other rules (REQ-10-9).
    let check_consent = |conn: &Connection| -> Result<Option<AppendOutcome>, StoreError> {
        if g.no_consent {
            return Ok(None);
        }
        for invitee in invitees.difference(&present_before) {
            if !consent::allows(invitee, &committer, consent_of(conn, invitee, &committer)?) {
                return Ok(Some(AppendOutcome::InviteNotAllowed));
            }
        }
        Ok(None)
    };
    if !g.room {
        if present_after.len() > 2 {
            return forbidden("a direct message holds the devices of two users at most".into());
        }
        if let Some(refusal) = check_consent(conn)? {
            return Ok(Err(refusal));
        }
        return Ok(Ok(None));
    }
    // A room created before the gateway kept roles (schema version 5) has none: nobody
    // owns or administers it, so its members can still leave and manage their own
    // devices, and nobody can invite.
    let before = roles_of(conn, g.conversation)?.unwrap_or(RoomRoles {
        owner: None,
        admins: Vec::new(),
    });
    let stated = match g.roles {
        Some(Ok(roles)) => Some(roles),
        Some(Err(e)) => return forbidden(format!("rule 1: {e}")),
        None => None,
    };
    // A GroupContextExtensions proposal replaces the whole list: it must restate
    // required_capabilities, or later Adds could bring devices without the roles
    // capability (SPEC.md 10.1).
    if stated.is_some() && !g.next.requires_roles_capability() {
        return forbidden(
            "rule 1: the group context extensions must restate required_capabilities with \
             the roles extension"
                .into(),
        );
    }
    if let Err(violation) = rooms::check_commit(&CommitView {
        committer,
        before: &before,
        after: stated,
        added: g.added,
        removed: &removed,
        present_after: &present_after,
    }) {
        return forbidden(violation.to_string());
    }
    if let Some(refusal) = check_consent(conn)? {
        return Ok(Err(refusal));
    }
    if members_after as u64 > g.limits.members_max {
        return Ok(Err(AppendOutcome::RoomFull));
    }
    // An invitation counts toward no limit of the invited user: `rooms_per_user_max` is
    // checked when it joins (REQ-10-8, [`Store::join`]).
    Ok(Ok(stated.cloned()))
}

struct NewEntry<'a> {
    msg_id: &'a MsgId,
    sender: &'a DeviceId,
    kind: i64,
    epoch: Option<Epoch>,
    conversation: Option<ConversationId>,
    commit_seq: Option<i64>,
    now: UnixMs,
    payload: &'a [u8],
}

/// Appends one entry to `stream` inside the open transaction; returns its seq. The seq is
/// the stream's head plus one, read and written in the same transaction (REQ-6.2-1).
fn push(tx: &Connection, stream: &[u8], entry: &NewEntry<'_>) -> Result<i64, StoreError> {
    let head: Option<i64> = tx
        .prepare_cached("SELECT head_seq FROM streams WHERE stream = ?1")
        .map_err(db)?
        .query_row([stream], |r| r.get(0))
        .optional()
        .map_err(db)?;
    let seq = head.unwrap_or(0) + 1;
    let bytes = i64::try_from(entry.payload.len()).unwrap_or(i64::MAX);
    match head {
        Some(_) => tx
            .prepare_cached(
                "UPDATE streams SET head_seq = ?2, bytes = bytes + ?3 WHERE stream = ?1",
            )
            .map_err(db)?
            .execute(params![stream, seq, bytes]),
        None => tx
            .prepare_cached(
                "INSERT INTO streams (stream, head_seq, oldest_seq, bytes) VALUES (?1, ?2, 1, ?3)",
            )
            .map_err(db)?
            .execute(params![stream, seq, bytes]),
    }
    .map_err(db)?;
    tx.prepare_cached("INSERT INTO entries (stream, seq, msg_id, sender, kind, epoch, conversation, commit_seq, accepted_ms, payload, payload_hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)")
            .map_err(db)?
            .execute(
        params![
            stream,
            seq,
            entry.msg_id.0.as_slice(),
            entry.sender.to_bytes().as_slice(),
            entry.kind,
            entry.epoch.map(|e| to_i64(e.0)),
            entry.conversation.map(|c| c.0.to_vec()),
            entry.commit_seq,
            to_i64(entry.now.0),
            entry.payload,
            Sha256::digest(entry.payload).as_slice(),
        ],
    )
    .map_err(db)?;
    Ok(seq)
}

type EntryRow = (
    i64,
    Vec<u8>,
    Vec<u8>,
    i64,
    Option<i64>,
    Option<Vec<u8>>,
    Option<i64>,
    i64,
    Vec<u8>,
);

fn entry_of(row: EntryRow) -> Result<Entry, StoreError> {
    let (seq, msg_id, sender, kind, epoch, conversation, commit_seq, accepted_ms, payload) = row;
    let corrupt = |what: &str| StoreError::Corrupt(what.to_string());
    let epoch = || {
        epoch
            .map(|e| Epoch(e as u64))
            .ok_or_else(|| corrupt("entry without epoch"))
    };
    let body = match kind {
        1 => EntryBody::Application { epoch: epoch()? },
        2 => EntryBody::Commit { epoch: epoch()? },
        3 => EntryBody::Proposal { epoch: epoch()? },
        4 => EntryBody::Welcome {
            conversation: ConversationId::from_slice(
                &conversation.ok_or_else(|| corrupt("welcome without conversation"))?,
            )
            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            commit_seq: seq_of(commit_seq.ok_or_else(|| corrupt("welcome without commit seq"))?)?,
        },
        other => return Err(StoreError::Corrupt(format!("entry kind {other}"))),
    };
    Ok(Entry {
        seq: seq_of(seq)?,
        msg_id: MsgId::from_slice(&msg_id).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        sender: device_of(&sender)?,
        accepted_ms: UnixMs(accepted_ms as u64),
        payload: MlsBytes::new(payload).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        body,
    })
}

impl Store for SqliteStore {
    fn create_conversation(
        &mut self,
        id: &ConversationId,
        kind: ConversationKind,
        group: &TrackedGroup,
        rooms_per_user_max: u64,
        now: UnixMs,
    ) -> Result<CreateOutcome, StoreError> {
        let tx = begin(&mut self.conn, self.batch.as_deref()).map_err(db)?;
        let room = kind == ConversationKind::Room;
        let creator = group.members.first().map(|(_, d)| d.system);
        if let Some(creator) = creator.filter(|_| room) {
            if rooms_of(&tx, &creator, &self.faults)? >= rooms_per_user_max {
                return Ok(CreateOutcome::TooManyRooms);
            }
        }
        let inserted = tx
            .prepare_cached("INSERT OR IGNORE INTO conversations (id, kind, epoch, epoch_seq, created_ms) VALUES (?1, ?2, ?3, 0, ?4)")
            .map_err(db)?
            .execute(
                params![id.0.as_slice(), kind_code(kind), to_i64(group.epoch.0), to_i64(now.0)],
            )
            .map_err(db)?;
        if inserted == 1 {
            put_group(&tx, id, group, (0, false))?;
            // The creator of a room has joined it (SPEC.md 10.4).
            if let Some(creator) = creator.filter(|_| room) {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO joined (user, conversation) VALUES (?1, ?2)",
                )
                .map_err(db)?
                .execute(params![creator.0.as_slice(), id.0.as_slice()])
                .map_err(db)?;
            }
            if room {
                if let Some(Ok(roles)) = group.roles() {
                    put_roles(&tx, id, &roles)?;
                }
            }
        }
        tx.commit().map_err(db)?;
        Ok(if inserted == 1 {
            CreateOutcome::Created
        } else {
            CreateOutcome::Exists
        })
    }

    fn group_state(&self, id: &ConversationId) -> Result<Option<Vec<u8>>, StoreError> {
        self.conn
            .prepare_cached("SELECT snapshot FROM group_states WHERE conversation = ?1")
            .map_err(db)?
            .query_row([id.0.as_slice()], |r| r.get(0))
            .optional()
            .map_err(db)
    }

    fn group_info(&self, id: &ConversationId) -> Result<Option<KeptGroupInfo>, StoreError> {
        let row: Option<(i64, i64, Vec<u8>)> = self
            .conn
            .prepare_cached(
                "SELECT epoch, seq, group_info FROM group_infos WHERE conversation = ?1",
            )
            .map_err(db)?
            .query_row([id.0.as_slice()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()
            .map_err(db)?;
        row.map(|(epoch, seq, group_info)| {
            let number = |v: i64| {
                u64::try_from(v).map_err(|_| StoreError::Corrupt("negative group info seq".into()))
            };
            Ok(KeptGroupInfo {
                epoch: Epoch(number(epoch)?),
                seq: number(seq)?,
                group_info,
            })
        })
        .transpose()
    }

    fn sequenced(&self, id: &ConversationId, msg_id: &MsgId) -> Result<bool, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM entries WHERE stream = ?1 AND msg_id = ?2)",
            )
            .map_err(db)?
            .query_row(
                params![
                    stream_key(&StreamKey::Conversation(*id)),
                    msg_id.0.as_slice()
                ],
                |r| r.get(0),
            )
            .map_err(db)
    }

    fn room_roles(&self, id: &ConversationId) -> Result<Option<RoomRoles>, StoreError> {
        roles_of(&self.conn, id)
    }

    fn conversation(&self, id: &ConversationId) -> Result<Option<ConversationState>, StoreError> {
        let row = self
            .conn
            .prepare_cached("SELECT kind, epoch, epoch_seq FROM conversations WHERE id = ?1")
            .map_err(db)?
            .query_row([id.0.as_slice()], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .optional()
            .map_err(db)?;
        let Some((kind, epoch, epoch_seq)) = row else {
            return Ok(None);
        };
        let (head_seq, oldest_seq) = self.bounds(&StreamKey::Conversation(*id))?;
        Ok(Some(ConversationState {
            kind: if kind == 2 {
                ConversationKind::Room
            } else {
                ConversationKind::DirectMessage
            },
            epoch: Epoch(epoch as u64),
            epoch_seq: epoch_seq as u64,
            head_seq,
            oldest_seq,
        }))
    }

    fn roster(&self, id: &ConversationId) -> Result<Vec<(u32, DeviceId)>, StoreError> {
        roster_of(&self.conn, id)
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        if self.write_behind {
            self.conn
                .backup(
                    rusqlite::MAIN_DB,
                    &self.path,
                    None::<fn(rusqlite::backup::Progress)>,
                )
                .map_err(db)?;
        }
        Ok(())
    }

    fn append(&mut self, request: &AppendRequest) -> Result<AppendOutcome, StoreError> {
        let conv = request.conversation;
        let stream = stream_key(&StreamKey::Conversation(conv));
        let tx = begin(&mut self.conn, self.batch.as_deref()).map_err(db)?;
        let state: Option<(i64, i64, i64)> = tx
            .prepare_cached("SELECT epoch, epoch_seq, kind FROM conversations WHERE id = ?1")
            .map_err(db)?
            .query_row([conv.0.as_slice()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()
            .map_err(db)?;
        let Some((epoch, epoch_seq, conversation_kind)) = state else {
            return Ok(AppendOutcome::NotFound);
        };
        let room = conversation_kind == kind_code(ConversationKind::Room);
        let epoch = epoch as u64;
        // Idempotency first (SPEC.md 6.3): a resent accepted Commit is a duplicate, not stale.
        let existing: Option<(i64, Vec<u8>, Vec<u8>)> = tx
            .prepare_cached(
                "SELECT seq, sender, payload_hash FROM entries WHERE stream = ?1 AND msg_id = ?2",
            )
            .map_err(db)?
            .query_row(params![stream, request.msg_id.0.as_slice()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()
            .map_err(db)?;
        let existing = existing.filter(|_| !self.faults.no_msg_id_dedup);
        if let Some((seq, sender, hash)) = existing {
            let same = sender == request.sender.to_bytes()
                && hash == Sha256::digest(request.payload.as_bytes()).as_slice();
            return Ok(if same {
                AppendOutcome::Duplicate { seq: seq_of(seq)? }
            } else {
                AppendOutcome::Conflict
            });
        }
        let member: bool = tx
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM roster WHERE conversation = ?1 AND device = ?2)",
            )
            .map_err(db)?
            .query_row(
                params![conv.0.as_slice(), request.sender.to_bytes().as_slice()],
                |r| r.get(0),
            )
            .map_err(db)?;
        if !member {
            return Ok(AppendOutcome::NotMember);
        }
        let (kind, msg_epoch) = match &request.kind {
            AppendKind::Application { epoch } => (1, *epoch),
            AppendKind::Commit { epoch, .. } => (2, *epoch),
            AppendKind::Proposal { epoch, .. } => (3, *epoch),
        };
        if msg_epoch.0 > epoch {
            return Ok(AppendOutcome::EpochAhead {
                epoch: Epoch(epoch),
            });
        }
        // Application messages of older epochs stay deliverable (REQ-7.2-3); handshake
        // messages of older epochs are stale (REQ-7.3-2).
        let is_handshake = !matches!(request.kind, AppendKind::Application { .. });
        let stale = msg_epoch.0 < epoch && !self.faults.two_commits_per_epoch;
        if is_handshake && stale {
            return Ok(AppendOutcome::StaleCommit {
                epoch: Epoch(epoch),
                epoch_seq: epoch_seq as u64,
            });
        }
        // Older still, nobody who moved on can read it (REQ-7.2-3, REQ-7.2-4).
        if !is_handshake && msg_epoch.0.saturating_add(limits::APP_EPOCH_LAG_MAX) < epoch {
            return Ok(AppendOutcome::EpochTooOld {
                epoch: Epoch(epoch),
            });
        }
        // A Commit for the current epoch: its verified next state decides who joins and
        // leaves (SPEC.md 7.6, 7.7).
        let mut commit = None;
        if let AppendKind::Commit {
            welcome,
            roles,
            next,
            ..
        } = &request.kind
        {
            let Some(next) = next else {
                return Ok(AppendOutcome::Unverified);
            };
            let change = membership_change(&roster_of(&tx, &conv)?, &next.members);
            if change.added.is_empty() != welcome.is_none() {
                return Ok(AppendOutcome::WelcomeMismatch);
            }
            let added: Vec<DeviceId> = change.added.iter().map(|(_, d)| *d).collect();
            let judged = govern(
                &tx,
                &Governed {
                    conversation: &conv,
                    room,
                    committer: &request.sender,
                    removed: &change.removed,
                    added: &added,
                    roles,
                    next,
                    limits: &request.rooms,
                    no_rules: self.faults.no_room_rules,
                    no_consent: self.faults.no_invite_consent,
                },
            )?;
            match judged {
                Ok(roles) => commit = Some((next, change, roles, welcome)),
                Err(refusal) => return Ok(refusal),
            }
        }
        // The conversation's retained bytes (SPEC.md 11), checked last.
        let retained: i64 = tx
            .prepare_cached("SELECT bytes FROM streams WHERE stream = ?1")
            .map_err(db)?
            .query_row([stream.as_slice()], |r| r.get(0))
            .optional()
            .map_err(db)?
            .unwrap_or(0);
        let size = request.payload.as_bytes().len() as u64;
        if (retained.max(0) as u64).saturating_add(size) > request.bytes_max {
            return Ok(AppendOutcome::ConversationFull);
        }
        let seq = push(
            &tx,
            &stream,
            &NewEntry {
                msg_id: &request.msg_id,
                sender: &request.sender,
                kind,
                epoch: Some(msg_epoch),
                conversation: None,
                commit_seq: None,
                now: request.now,
                payload: request.payload.as_bytes(),
            },
        )?;
        if let Some((next, change, new_roles, welcome)) = commit {
            // One Commit per epoch, decided in this transaction (REQ-7.3-1).
            tx.prepare_cached(
                "UPDATE conversations SET epoch = epoch + 1, epoch_seq = ?2 WHERE id = ?1",
            )
            .map_err(db)?
            .execute(params![conv.0.as_slice(), seq])
            .map_err(db)?;
            if let Some(roles) = &new_roles {
                put_roles(&tx, &conv, roles)?;
            }
            for (leaf, device) in &change.removed {
                tx.prepare_cached("DELETE FROM leaving WHERE conversation = ?1 AND leaf = ?2")
                    .map_err(db)?
                    .execute(params![conv.0.as_slice(), i64::from(*leaf)])
                    .map_err(db)?;
                // Where the removed device's reading ends (REQ-7.6-2).
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO departures (conversation, device, seq) VALUES (?1, ?2, ?3)",
                )
                .map_err(db)?
                .execute(params![conv.0.as_slice(), device.to_bytes().as_slice(), seq])
                .map_err(db)?;
            }
            // A resynced device's leave request follows it to its new leaf (SPEC.md 7.10).
            for (from, to, _) in &change.moved {
                tx.prepare_cached(
                    "UPDATE leaving SET leaf = ?3 WHERE conversation = ?1 AND leaf = ?2",
                )
                .map_err(db)?
                .execute(params![conv.0.as_slice(), i64::from(*from), i64::from(*to)])
                .map_err(db)?;
            }
            // The tracked state and the roster move with the entry (REQ-7.7-1).
            // The `group_info_not_kept` fault drops a Commit's GroupInfo.
            let next = match self.faults.group_info_not_kept {
                true => std::borrow::Cow::Owned(TrackedGroup {
                    group_info: None,
                    ..(**next).clone()
                }),
                false => std::borrow::Cow::Borrowed(&**next),
            };
            put_group(&tx, &conv, &next, (seq, self.faults.stale_group_state))?;
            if !change.removed.is_empty() {
                forget_departed_joins(&tx, &conv)?;
            }
            // An added device reads from its Commit on (REQ-7.6-4); its cursor starts there,
            // so the entries before it wait for nobody's ack (SPEC.md 6.7).
            for (_, device) in &change.added {
                tx.prepare_cached(
                    "INSERT INTO arrivals (conversation, device, seq) VALUES (?1, ?2, ?3)
                     ON CONFLICT (conversation, device) DO UPDATE SET seq = excluded.seq",
                )
                .map_err(db)?
                .execute(params![
                    conv.0.as_slice(),
                    device.to_bytes().as_slice(),
                    seq
                ])
                .map_err(db)?;
                tx.prepare_cached(
                    "INSERT INTO cursors (stream, device, seq) VALUES (?1, ?2, ?3)
                     ON CONFLICT (stream, device) DO UPDATE SET seq = max(seq, excluded.seq)",
                )
                .map_err(db)?
                .execute(params![stream, device.to_bytes().as_slice(), seq])
                .map_err(db)?;
            }
            // The Welcome reaches each added device with its Commit (REQ-7.5-1).
            if let Some(welcome) = welcome {
                for (_, device) in &change.added {
                    push(
                        &tx,
                        &stream_key(&StreamKey::Inbox(*device)),
                        &NewEntry {
                            msg_id: &request.msg_id,
                            sender: &request.sender,
                            kind: 4,
                            epoch: None,
                            conversation: Some(conv),
                            commit_seq: Some(seq),
                            now: request.now,
                            payload: welcome.as_bytes(),
                        },
                    )?;
                }
            }
        }
        if let AppendKind::Proposal {
            removes: Some(leaf),
            ..
        } = &request.kind
        {
            // A Remove of a device of the proposer's own user is a leave request (SPEC.md
            // 10.3): any member may commit it from now on.
            let target = device_at(&tx, &conv, *leaf)?;
            if target.is_some_and(|d| d.system == request.sender.system) {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO leaving (conversation, leaf) VALUES (?1, ?2)",
                )
                .map_err(db)?
                .execute(params![conv.0.as_slice(), i64::from(*leaf)])
                .map_err(db)?;
            }
        }
        tx.commit().map_err(db)?;
        Ok(AppendOutcome::Appended { seq: seq_of(seq)? })
    }

    fn read(
        &self,
        stream: &StreamKey,
        from_seq: Seq,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq, msg_id, sender, kind, epoch, conversation, commit_seq, accepted_ms, payload
                 FROM entries WHERE stream = ?1 AND seq >= ?2 ORDER BY seq LIMIT ?3",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map(
                params![
                    stream_key(stream),
                    to_i64(from_seq.get()),
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                        r.get(8)?,
                    ))
                },
            )
            .map_err(db)?;
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        for row in rows {
            let entry = entry_of(row.map_err(db)?)?;
            bytes += entry.payload.as_bytes().len() + confab_spec::limits::ENTRY_FRAMING_BYTES_MAX;
            if bytes > max_bytes && !entries.is_empty() {
                break;
            }
            entries.push(entry);
        }
        Ok(entries)
    }

    fn bounds(&self, stream: &StreamKey) -> Result<(u64, u64), StoreError> {
        let row: Option<(i64, i64)> = self
            .conn
            .prepare_cached("SELECT head_seq, oldest_seq FROM streams WHERE stream = ?1")
            .map_err(db)?
            .query_row([stream_key(stream)], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(db)?;
        Ok(row.map_or((0, 1), |(h, o)| (h as u64, o as u64)))
    }

    fn ack(
        &mut self,
        stream: &StreamKey,
        device: &DeviceId,
        seq: Seq,
    ) -> Result<Option<u64>, StoreError> {
        let key = stream_key(stream);
        let device = device.to_bytes();
        let tx = begin(&mut self.conn, self.batch.as_deref()).map_err(db)?;
        let head: i64 = tx
            .prepare_cached("SELECT head_seq FROM streams WHERE stream = ?1")
            .map_err(db)?
            .query_row([&key], |r| r.get(0))
            .optional()
            .map_err(db)?
            .unwrap_or(0);
        if to_i64(seq.get()) > head {
            return Ok(None);
        }
        // Cursors only move forward (REQ-6.5-1).
        tx.prepare_cached(
            "INSERT INTO cursors (stream, device, seq) VALUES (?1, ?2, ?3)
             ON CONFLICT (stream, device) DO UPDATE SET seq = max(seq, excluded.seq)",
        )
        .map_err(db)?
        .execute(params![key, device.as_slice(), to_i64(seq.get())])
        .map_err(db)?;
        let cursor: i64 = tx
            .prepare_cached("SELECT seq FROM cursors WHERE stream = ?1 AND device = ?2")
            .map_err(db)?
            .query_row(params![key, device.as_slice()], |r| r.get(0))
            .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(Some(cursor as u64))
    }

    fn cursor(&self, stream: &StreamKey, device: &DeviceId) -> Result<u64, StoreError> {
        let v: Option<i64> = self
            .conn
            .prepare_cached("SELECT seq FROM cursors WHERE stream = ?1 AND device = ?2")
            .map_err(db)?
            .query_row(
                params![stream_key(stream), device.to_bytes().as_slice()],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        Ok(v.map_or(0, |v| v as u64))
    }

    fn issue_token(&mut self, t: &IssuedToken) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("INSERT INTO resume_tokens (hash, device, session, family, expires_ms, certificate_not_after_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
            .map_err(db)?
            .execute(
                params![
                    t.hash.as_slice(),
                    t.device.to_bytes().as_slice(),
                    t.session.as_slice(),
                    t.family.as_slice(),
                    to_i64(t.expires.0),
                    to_i64(t.certificate_not_after.0)
                ],
            )
            .map_err(db)?;
        Ok(())
    }

    fn redeem_token(&mut self, hash: &[u8; 32], now: UnixMs) -> Result<Redeemed, StoreError> {
        let tx = begin(&mut self.conn, self.batch.as_deref()).map_err(db)?;
        type Row = (Vec<u8>, Vec<u8>, Vec<u8>, i64, i64, i64, i64);
        let row: Option<Row> = tx
            .prepare_cached("SELECT device, session, family, expires_ms, certificate_not_after_ms, used, revoked
                 FROM resume_tokens WHERE hash = ?1")
            .map_err(db)?
            .query_row(
                [hash.as_slice()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
            )
            .optional()
            .map_err(db)?;
        let Some((device, session, family, expires, not_after, used, revoked)) = row else {
            return Ok(Redeemed::Invalid);
        };
        let outcome = if revoked != 0 || to_i64(now.0) >= expires {
            Redeemed::Invalid
        } else if used != 0 {
            // Reuse: revoke the chain, including the token issued in its place (REQ-5.5-3).
            tx.prepare_cached("UPDATE resume_tokens SET revoked = 1 WHERE family = ?1")
                .map_err(db)?
                .execute([&family])
                .map_err(db)?;
            Redeemed::Reused {
                device: device_of(&device)?,
                family: family
                    .as_slice()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("token family".into()))?,
            }
        } else {
            tx.prepare_cached("UPDATE resume_tokens SET used = 1 WHERE hash = ?1")
                .map_err(db)?
                .execute([hash.as_slice()])
                .map_err(db)?;
            let fixed = |v: &[u8]| -> Result<[u8; 16], StoreError> {
                v.try_into()
                    .map_err(|_| StoreError::Corrupt("token binding".into()))
            };
            Redeemed::Valid(IssuedToken {
                hash: *hash,
                device: device_of(&device)?,
                session: fixed(&session)?,
                family: fixed(&family)?,
                expires: UnixMs(expires as u64),
                certificate_not_after: UnixMs(not_after as u64),
            })
        };
        tx.commit().map_err(db)?;
        Ok(outcome)
    }

    fn store_revocation(
        &mut self,
        revocation: &Revocation,
        now: UnixMs,
    ) -> Result<UnixMs, StoreError> {
        let effective = to_i64(revocation.revoked_at_ms.0.min(now.0));
        let tx = begin(&mut self.conn, self.batch.as_deref()).map_err(db)?;
        tx.prepare_cached("INSERT INTO revocations (system, process, effective_ms, revocation) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (system, process) DO UPDATE SET
                 revocation = CASE WHEN excluded.effective_ms < effective_ms THEN excluded.revocation ELSE revocation END,
                 effective_ms = min(effective_ms, excluded.effective_ms)")
            .map_err(db)?
            .execute(
            params![
                revocation.system.0.as_slice(),
                revocation.process.0.as_slice(),
                effective,
                confab_spec::cbor::to_vec(revocation),
            ],
        )
        .map_err(db)?;
        let stored: i64 = tx
            .prepare_cached(
                "SELECT effective_ms FROM revocations WHERE system = ?1 AND process = ?2",
            )
            .map_err(db)?
            .query_row(
                params![
                    revocation.system.0.as_slice(),
                    revocation.process.0.as_slice()
                ],
                |r| r.get(0),
            )
            .map_err(db)?;
        // A revoked device's packages are never handed out again (REQ-8-7).
        for table in ["key_packages", "last_resort_key_packages"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE system = ?1 AND process = ?2"),
                params![
                    revocation.system.0.as_slice(),
                    revocation.process.0.as_slice()
                ],
            )
            .map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(UnixMs(stored as u64))
    }

    fn revoked_at(&self, device: &DeviceId) -> Result<Option<UnixMs>, StoreError> {
        let v: Option<i64> = self
            .conn
            .prepare_cached(
                "SELECT effective_ms FROM revocations WHERE system = ?1 AND process = ?2",
            )
            .map_err(db)?
            .query_row(
                params![device.system.0.as_slice(), device.process.0.as_slice()],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        Ok(v.map(|v| UnixMs(v as u64)))
    }

    fn collect_garbage(
        &mut self,
        policy: &RetentionPolicy,
        now: UnixMs,
        max_entries: u64,
    ) -> Result<GcReport, StoreError> {
        let mut report = GcReport::default();
        // Entries accepted before these times pass condition 1 / the unacked bound.
        let aged = to_i64(now.0.saturating_sub(policy.retention_ms));
        let abandoned = to_i64(now.0.saturating_sub(policy.retention_unacked_ms));
        // Only streams whose oldest entry was accepted before `aged` can lose anything (no
        // entry goes before that, whatever the cursors), so the others cost one index
        // lookup here instead of a transaction of their own.
        let streams: Vec<(Vec<u8>, i64, i64)> = {
            let mut stmt = self
                .conn
                .prepare_cached(
                    "SELECT s.stream, s.head_seq, s.oldest_seq FROM streams s
                     LEFT JOIN entries e ON e.stream = s.stream AND e.seq = s.oldest_seq
                     WHERE s.oldest_seq <= s.head_seq
                     AND (e.accepted_ms IS NULL OR e.accepted_ms < ?1)",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map(params![aged], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)?
        };
        for (stream, head, oldest) in streams {
            let budget = to_i64(max_entries.saturating_sub(report.entries_deleted));
            if budget == 0 {
                report.more = true;
                break;
            }
            let tx = begin(&mut self.conn, self.batch.as_deref()).map_err(db)?;
            // The lowest cursor among the devices that must have acknowledged an entry.
            let acked_by_all: i64 = match stream.first() {
                Some(1) => tx
                    .prepare_cached("SELECT coalesce(min(coalesce(c.seq, 0)), ?2) FROM roster r
                         LEFT JOIN cursors c ON c.stream = ?1 AND c.device = r.device
                         WHERE r.conversation = ?3")
            .map_err(db)?
            .query_row(
                        params![stream, head, &stream[1..]],
                        |r| r.get(0),
                    )
                    .map_err(db)?,
                Some(2) => tx
                    .prepare_cached("SELECT coalesce(max(seq), 0) FROM cursors WHERE stream = ?1 AND device = ?2")
            .map_err(db)?
            .query_row(
                        params![stream, &stream[1..]],
                        |r| r.get(0),
                    )
                    .map_err(db)?,
                _ => return Err(StoreError::Corrupt("stream key".into())),
            };
            // The first entry that must stay; everything before it goes (a prefix, 6.7).
            let limit = (oldest + budget).min(head + 1);
            let keep: Option<i64> = tx
                .prepare_cached(
                    "SELECT seq FROM entries WHERE stream = ?1 AND seq >= ?2 AND seq < ?3
                     AND NOT (accepted_ms < ?4 AND (seq <= ?5 OR accepted_ms < ?6))
                     ORDER BY seq LIMIT 1",
                )
                .map_err(db)?
                .query_row(
                    params![stream, oldest, limit, aged, acked_by_all, abandoned],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db)?;
            let new_oldest = keep.unwrap_or(limit);
            if new_oldest > oldest {
                let freed: i64 = tx
                    .prepare_cached(
                        "SELECT COALESCE(SUM(length(payload)), 0) FROM entries
                         WHERE stream = ?1 AND seq < ?2",
                    )
                    .map_err(db)?
                    .query_row(params![stream, new_oldest], |r| r.get(0))
                    .map_err(db)?;
                tx.prepare_cached(
                    "UPDATE streams SET bytes = max(0, bytes - ?2) WHERE stream = ?1",
                )
                .map_err(db)?
                .execute(params![stream, freed])
                .map_err(db)?;
                let deleted = tx
                    .prepare_cached("DELETE FROM entries WHERE stream = ?1 AND seq < ?2")
                    .map_err(db)?
                    .execute(params![stream, new_oldest])
                    .map_err(db)?;
                tx.prepare_cached("UPDATE streams SET oldest_seq = ?2 WHERE stream = ?1")
                    .map_err(db)?
                    .execute(params![stream, new_oldest])
                    .map_err(db)?;
                report.entries_deleted += deleted as u64;
                report.streams_advanced += 1;
                if keep.is_none() && limit <= head {
                    report.more = true;
                }
            }
            tx.commit().map_err(db)?;
        }
        report.tokens_deleted = self
            .conn
            .prepare_cached("DELETE FROM resume_tokens WHERE expires_ms <= ?1")
            .map_err(db)?
            .execute([to_i64(now.0)])
            .map_err(db)? as u64;
        Ok(report)
    }

    fn upload_key_packages(
        &mut self,
        device: &DeviceId,
        packages: &[StoredKeyPackage],
        last_resort: Option<&StoredKeyPackage>,
        pool_max: u64,
        now: UnixMs,
    ) -> Result<UploadOutcome, StoreError> {
        let (system, process) = (device.system.0.as_slice(), device.process.0.as_slice());
        let now_s = to_i64(now.0 / 1_000);
        let tx = begin(&mut self.conn, self.batch.as_deref()).map_err(db)?;
        tx.prepare_cached(
            "DELETE FROM key_packages WHERE system = ?1 AND process = ?2 AND not_after_s <= ?3",
        )
        .map_err(db)?
        .execute(params![system, process, now_s])
        .map_err(db)?;
        let status = pool_status(&tx, system, process, now_s)?;
        if status.pool_count + packages.len() as u64 > pool_max {
            return Ok(UploadOutcome::PoolFull(status));
        }
        for p in packages {
            tx.prepare_cached("INSERT INTO key_packages (system, process, not_after_s, package) VALUES (?1, ?2, ?3, ?4)")
            .map_err(db)?
            .execute(
                params![system, process, to_i64(p.not_after_s), p.bytes],
            )
            .map_err(db)?;
        }
        if let Some(p) = last_resort {
            tx.prepare_cached("INSERT INTO last_resort_key_packages (system, process, not_after_s, package, claimed)
                 VALUES (?1, ?2, ?3, ?4, 0)
                 ON CONFLICT (system, process) DO UPDATE SET
                     not_after_s = excluded.not_after_s, package = excluded.package, claimed = 0")
            .map_err(db)?
            .execute(
                params![system, process, to_i64(p.not_after_s), p.bytes],
            )
            .map_err(db)?;
        }
        let status = pool_status(&tx, system, process, now_s)?;
        tx.commit().map_err(db)?;
        Ok(UploadOutcome::Stored(status))
    }

    fn departure(
        &self,
        conversation: &ConversationId,
        device: &DeviceId,
        from_seq: u64,
    ) -> Result<Option<u64>, StoreError> {
        let v: Option<i64> = self
            .conn
            .prepare_cached("SELECT min(seq) FROM departures WHERE conversation = ?1 AND device = ?2 AND seq >= ?3")
            .map_err(db)?
            .query_row(
                params![
                    conversation.0.as_slice(),
                    device.to_bytes().as_slice(),
                    to_i64(from_seq)
                ],
                |r| r.get(0),
            )
            .map_err(db)?;
        Ok(v.map(|v| v as u64))
    }

    fn arrival(
        &self,
        conversation: &ConversationId,
        device: &DeviceId,
    ) -> Result<Option<u64>, StoreError> {
        let seq: Option<i64> = self
            .conn
            .prepare_cached("SELECT seq FROM arrivals WHERE conversation = ?1 AND device = ?2")
            .map_err(db)?
            .query_row(
                params![conversation.0.as_slice(), device.to_bytes().as_slice()],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        Ok(seq.map(|s| s.max(0) as u64))
    }

    fn presence_status(&self, user: &SystemKey) -> Result<PresenceStatus, StoreError> {
        let row: Option<(i64, Option<i64>)> = self
            .conn
            .prepare_cached("SELECT invisible, last_seen_ms FROM presence_status WHERE user = ?1")
            .map_err(db)?
            .query_row(params![user.0.as_slice()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(db)?;
        Ok(
            row.map_or_else(PresenceStatus::default, |(invisible, last_seen)| {
                PresenceStatus {
                    invisible: invisible != 0,
                    last_seen: last_seen.map(|v| UnixMs(v.max(0) as u64)),
                }
            }),
        )
    }

    fn put_presence_status(
        &mut self,
        user: &SystemKey,
        status: &PresenceStatus,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO presence_status (user, invisible, last_seen_ms)
                 VALUES (?1, ?2, ?3)",
            )
            .map_err(db)?
            .execute(params![
                user.0.as_slice(),
                i64::from(status.invisible),
                status.last_seen.map(|t| to_i64(t.0)),
            ])
            .map_err(db)?;
        Ok(())
    }

    fn share_lists(&self, user: &SystemKey) -> Result<ShareLists, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT list, peer FROM share_lists WHERE user = ?1")
            .map_err(db)?;
        let rows = stmt
            .query_map(params![user.0.as_slice()], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(db)?;
        let mut lists = ShareLists::default();
        for row in rows {
            let (list, peer) = row.map_err(db)?;
            let peer =
                SystemKey::from_slice(&peer).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            match list {
                LIST_SHARED => lists.shared.insert(peer),
                LIST_BLOCKED => lists.blocked.insert(peer),
                LIST_ALLOWED => continue,
                other => return Err(StoreError::Corrupt(format!("share list kind {other}"))),
            };
        }
        Ok(lists)
    }

    fn put_share_lists(&mut self, user: &SystemKey, lists: &ShareLists) -> Result<(), StoreError> {
        let tx = begin(&mut self.conn, self.batch.as_deref()).map_err(db)?;
        tx.prepare_cached("DELETE FROM share_lists WHERE user = ?1 AND list IN (?2, ?3)")
            .map_err(db)?
            .execute(params![user.0.as_slice(), LIST_SHARED, LIST_BLOCKED])
            .map_err(db)?;
        {
            let mut insert = tx
                .prepare_cached("INSERT INTO share_lists (user, list, peer) VALUES (?1, ?2, ?3)")
                .map_err(db)?;
            for (list, peers) in [(LIST_SHARED, &lists.shared), (LIST_BLOCKED, &lists.blocked)] {
                for peer in peers {
                    insert
                        .execute(params![user.0.as_slice(), list, peer.0.as_slice()])
                        .map_err(db)?;
                }
            }
        }
        tx.commit().map_err(db)
    }

    fn share_of(
        &self,
        target: &SystemKey,
        watcher: &SystemKey,
    ) -> Result<(bool, bool), StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT list FROM share_lists WHERE user = ?1 AND peer = ?2")
            .map_err(db)?;
        let rows = stmt
            .query_map(params![target.0.as_slice(), watcher.0.as_slice()], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(db)?;
        let (mut shared, mut blocked) = (false, false);
        for list in rows {
            match list.map_err(db)? {
                LIST_SHARED => shared = true,
                LIST_BLOCKED => blocked = true,
                _ => {}
            }
        }
        Ok((shared, blocked))
    }

    fn invite_settings(&self, user: &SystemKey) -> Result<InviteSettingsOf, StoreError> {
        let policy: Option<i64> = self
            .conn
            .prepare_cached("SELECT policy FROM invite_policies WHERE user = ?1")
            .map_err(db)?
            .query_row([user.0.as_slice()], |r| r.get(0))
            .optional()
            .map_err(db)?;
        let policy = match policy {
            None => InvitePolicy::Everyone,
            Some(p) => u64::try_from(p)
                .ok()
                .and_then(InvitePolicy::from_code)
                .ok_or_else(|| StoreError::Corrupt(format!("invite policy {p}")))?,
        };
        let mut stmt = self
            .conn
            .prepare_cached("SELECT peer FROM share_lists WHERE user = ?1 AND list = ?2")
            .map_err(db)?;
        let rows = stmt
            .query_map(params![user.0.as_slice(), LIST_ALLOWED], |r| {
                r.get::<_, Vec<u8>>(0)
            })
            .map_err(db)?;
        let mut allowed = std::collections::BTreeSet::new();
        for row in rows {
            allowed.insert(
                SystemKey::from_slice(&row.map_err(db)?)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            );
        }
        Ok(InviteSettingsOf { policy, allowed })
    }

    fn put_invite_settings(
        &mut self,
        user: &SystemKey,
        settings: &InviteSettingsOf,
    ) -> Result<(), StoreError> {
        let tx = begin(&mut self.conn, self.batch.as_deref()).map_err(db)?;
        tx.prepare_cached(
            "INSERT INTO invite_policies (user, policy) VALUES (?1, ?2)
             ON CONFLICT (user) DO UPDATE SET policy = excluded.policy",
        )
        .map_err(db)?
        .execute(params![user.0.as_slice(), to_i64(settings.policy.code())])
        .map_err(db)?;
        tx.prepare_cached("DELETE FROM share_lists WHERE user = ?1 AND list = ?2")
            .map_err(db)?
            .execute(params![user.0.as_slice(), LIST_ALLOWED])
            .map_err(db)?;
        {
            let mut insert = tx
                .prepare_cached("INSERT INTO share_lists (user, list, peer) VALUES (?1, ?2, ?3)")
                .map_err(db)?;
            for peer in &settings.allowed {
                insert
                    .execute(params![user.0.as_slice(), LIST_ALLOWED, peer.0.as_slice()])
                    .map_err(db)?;
            }
        }
        tx.commit().map_err(db)
    }

    fn consent_of(&self, target: &SystemKey, other: &SystemKey) -> Result<ConsentOf, StoreError> {
        consent_of(&self.conn, target, other)
    }

    fn join(
        &mut self,
        conversation: &ConversationId,
        device: &DeviceId,
        rooms_per_user_max: u64,
    ) -> Result<JoinOutcome, StoreError> {
        let user = device.system;
        // Read first: nearly every call finds the user joined, or no room, and writes
        // nothing.
        let (room, member, joined): (bool, bool, bool) = self
            .conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM conversations WHERE id = ?1 AND kind = 2),
                        EXISTS (SELECT 1 FROM roster WHERE conversation = ?1 AND device = ?2),
                        EXISTS (SELECT 1 FROM joined WHERE user = ?3 AND conversation = ?1)",
            )
            .map_err(db)?
            .query_row(
                params![
                    conversation.0.as_slice(),
                    device.to_bytes().as_slice(),
                    user.0.as_slice()
                ],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(db)?;
        if !room || !member || joined {
            return Ok(JoinOutcome::Joined);
        }
        let tx = begin(&mut self.conn, self.batch.as_deref()).map_err(db)?;
        if rooms_of(&tx, &user, &self.faults)? >= rooms_per_user_max {
            return Ok(JoinOutcome::TooManyRooms);
        }
        tx.prepare_cached("INSERT OR IGNORE INTO joined (user, conversation) VALUES (?1, ?2)")
            .map_err(db)?
            .execute(params![user.0.as_slice(), conversation.0.as_slice()])
            .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(JoinOutcome::Joined)
    }

    fn devices(&self, user: &SystemKey, now: UnixMs) -> Result<Vec<DeviceListing>, StoreError> {
        let now_s = to_i64(now.0 / 1_000);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT p.process,
                    (SELECT count(*) FROM key_packages k
                     WHERE k.system = ?1 AND k.process = p.process AND k.not_after_s > ?2),
                    EXISTS (SELECT 1 FROM last_resort_key_packages l
                     WHERE l.system = ?1 AND l.process = p.process AND l.not_after_s > ?2)
                 FROM (SELECT process FROM key_packages WHERE system = ?1 AND not_after_s > ?2
                       UNION SELECT process FROM last_resort_key_packages
                       WHERE system = ?1 AND not_after_s > ?2) p
                 WHERE NOT EXISTS (SELECT 1 FROM revocations r
                                   WHERE r.system = ?1 AND r.process = p.process)
                 ORDER BY p.process",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map(params![user.0.as_slice(), now_s], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, bool>(2)?,
                ))
            })
            .map_err(db)?;
        let mut out = Vec::new();
        for row in rows {
            let (process, pool_count, last_resort_present) = row.map_err(db)?;
            out.push(DeviceListing {
                device: device_of(&[user.0.as_slice(), process.as_slice()].concat())?,
                pool_count: pool_count as u64,
                last_resort_present,
            });
        }
        Ok(out)
    }

    fn claim_key_packages(
        &mut self,
        user: &SystemKey,
        claimer: &DeviceId,
        only: Option<&[DeviceId]>,
        now: UnixMs,
    ) -> Result<Vec<ClaimedPackage>, StoreError> {
        let now_s = to_i64(now.0 / 1_000);
        let system = user.0.as_slice();
        let tx = begin(&mut self.conn, self.batch.as_deref()).map_err(db)?;
        tx.prepare_cached("DELETE FROM key_packages WHERE system = ?1 AND not_after_s <= ?2")
            .map_err(db)?
            .execute(params![system, now_s])
            .map_err(db)?;
        let processes: Vec<Vec<u8>> = {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT process FROM key_packages WHERE system = ?1
                     UNION SELECT process FROM last_resort_key_packages WHERE system = ?1 AND not_after_s > ?2
                     ORDER BY 1",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map(params![system, now_s], |r| r.get(0))
                .map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)?
        };
        let mut claimed = Vec::new();
        for process in processes {
            let device = device_of(&[system, process.as_slice()].concat())?;
            if device == *claimer || only.is_some_and(|only| !only.contains(&device)) {
                continue;
            }
            let pooled: Option<(i64, Vec<u8>)> = tx
                .prepare_cached(
                    "SELECT id, package FROM key_packages WHERE system = ?1 AND process = ?2
                     ORDER BY id LIMIT 1",
                )
                .map_err(db)?
                .query_row(params![system, process], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .map_err(db)?;
            if let Some((id, package)) = pooled {
                // Claim and delete in one transaction (REQ-8-2).
                if !self.faults.double_claim {
                    tx.prepare_cached("DELETE FROM key_packages WHERE id = ?1")
                        .map_err(db)?
                        .execute([id])
                        .map_err(db)?;
                }
                claimed.push(ClaimedPackage {
                    device,
                    key_package: package,
                    last_resort: false,
                });
                continue;
            }
            let last: Option<Vec<u8>> = tx
                .prepare_cached(
                    "SELECT package FROM last_resort_key_packages
                     WHERE system = ?1 AND process = ?2 AND not_after_s > ?3",
                )
                .map_err(db)?
                .query_row(params![system, process, now_s], |r| r.get(0))
                .optional()
                .map_err(db)?;
            if let Some(package) = last {
                tx.prepare_cached("UPDATE last_resort_key_packages SET claimed = 1 WHERE system = ?1 AND process = ?2")
            .map_err(db)?
            .execute(
                    params![system, process],
                )
                .map_err(db)?;
                claimed.push(ClaimedPackage {
                    device,
                    key_package: package,
                    last_resort: true,
                });
            }
        }
        tx.commit().map_err(db)?;
        Ok(claimed)
    }
}

/// A device's pool inside an open transaction.
fn pool_status(
    tx: &Connection,
    system: &[u8],
    process: &[u8],
    now_s: i64,
) -> Result<PoolStatus, StoreError> {
    let pool_count: i64 = tx
        .prepare_cached("SELECT count(*) FROM key_packages WHERE system = ?1 AND process = ?2 AND not_after_s > ?3")
            .map_err(db)?
            .query_row(
            params![system, process, now_s],
            |r| r.get(0),
        )
        .map_err(db)?;
    let last: Option<i64> = tx
        .prepare_cached(
            "SELECT claimed FROM last_resort_key_packages
             WHERE system = ?1 AND process = ?2 AND not_after_s > ?3",
        )
        .map_err(db)?
        .query_row(params![system, process, now_s], |r| r.get(0))
        .optional()
        .map_err(db)?;
    Ok(PoolStatus {
        pool_count: pool_count as u64,
        last_resort_present: last.is_some(),
        last_resort_claimed: last.is_some_and(|c| c != 0),
    })
}
