//! The gateway's durable state (SPEC.md section 6 and 7): conversations, their rosters and
//! epochs, the per-stream logs with dense seqs, msg_id de-duplication, device inboxes and
//! ack cursors.
//!
//! [`Store`] is the one interface; [`sqlite::SqliteStore`] is the embedded default. Every
//! mutating call is one storage transaction: when it returns `Ok`, its effect is durable
//! (SPEC.md REQ-6.3-1), and when it returns an error nothing changed.

pub mod sqlite;

use confab_spec::consent::ConsentOf;
use confab_spec::frame::{ConversationKind, Entry, InvitePolicy};
use confab_spec::identity::Revocation;
use confab_spec::ids::{ConversationId, DeviceId, Epoch, MlsBytes, MsgId, Seq, SystemKey, UnixMs};
use confab_spec::rooms::{RolesError, RoomRoles};

use crate::tracked_group::TrackedGroup;

/// A stream the gateway sequences (SPEC.md section 6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamKey {
    /// A conversation's log.
    Conversation(ConversationId),
    /// A device's inbox.
    Inbox(DeviceId),
}

/// The GroupInfo a gateway keeps for a conversation (SPEC.md 7.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptGroupInfo {
    /// The epoch it is the GroupInfo of.
    pub epoch: Epoch,
    /// The seq of the Commit that opened that epoch (0: the creation's).
    pub seq: u64,
    /// The GroupInfo, an MLSMessage, as it was given.
    pub group_info: Vec<u8>,
}

/// What a conversation looks like now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationState {
    /// Direct message or room.
    pub kind: ConversationKind,
    /// The current MLS epoch (0 at creation).
    pub epoch: Epoch,
    /// The seq of the Commit that opened the current epoch (0 before the first Commit).
    pub epoch_seq: u64,
    /// The highest seq (0 when empty).
    pub head_seq: u64,
    /// The lowest retained seq (head + 1 when empty).
    pub oldest_seq: u64,
}

/// What the sender's MLS message is, as the gateway read it (SPEC.md section 7.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendKind {
    /// An application message (PrivateMessage) sent in `epoch`.
    Application {
        /// Its epoch.
        epoch: Epoch,
    },
    /// A standalone proposal sent in `epoch`.
    Proposal {
        /// Its epoch.
        epoch: Epoch,
        /// The leaf it proposes to remove, for a Remove proposal: when that leaf is a
        /// device of the sender's own user, a leave request (SPEC.md 10.3).
        removes: Option<u32>,
    },
    /// A Commit created in `epoch`.
    Commit {
        /// Its epoch.
        epoch: Epoch,
        /// The Welcome for the added devices.
        welcome: Option<MlsBytes>,
        /// The roles its GroupContextExtensions proposal states (`None`: it states none),
        /// judged in a room (SPEC.md 10.2).
        roles: Option<Result<RoomRoles, RolesError>>,
        /// The group after the Commit, as the gateway verified it (SPEC.md 7.7): its
        /// roster replaces the conversation's, and its state is stored with the entry.
        /// `None` when the Commit was not verified because it is not for the
        /// conversation's current epoch or its msg_id was already sequenced: the store
        /// then answers duplicate, conflict, `stale_commit` or `epoch_ahead`, and never
        /// appends it.
        next: Option<Box<TrackedGroup>>,
    },
}

/// The room limits of SPEC.md 10.4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomLimits {
    /// `room_members_max`: most member devices in one room.
    pub members_max: u64,
    /// `rooms_per_user_max`: most rooms one user has joined.
    pub rooms_per_user_max: u64,
}

impl Default for RoomLimits {
    /// SPEC.md's defaults.
    fn default() -> Self {
        Self {
            members_max: confab_spec::rooms::ROOM_MEMBERS_MAX_DEFAULT,
            rooms_per_user_max: confab_spec::rooms::ROOMS_PER_USER_MAX_DEFAULT,
        }
    }
}

/// The outcome of [`Store::create_conversation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateOutcome {
    /// Created.
    Created,
    /// The id is taken (`conversation_exists`).
    Exists,
    /// A room, and its creator has joined `rooms_per_user_max` rooms already
    /// (`too_many_rooms`).
    TooManyRooms,
}

/// A message to sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendRequest {
    /// The conversation.
    pub conversation: ConversationId,
    /// The sending device (a member).
    pub sender: DeviceId,
    /// The client's idempotency key.
    pub msg_id: MsgId,
    /// The MLSMessage.
    pub payload: MlsBytes,
    /// What it is.
    pub kind: AppendKind,
    /// The gateway's clock.
    pub now: UnixMs,
    /// The room limits in force.
    pub rooms: RoomLimits,
    /// `conversation_bytes_max`: the payload bytes the conversation's log may retain.
    pub bytes_max: u64,
}

/// The outcome of [`Store::append`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Sequenced at `seq`; for a Commit, Welcomes went to the inboxes in the same
    /// transaction.
    Appended {
        /// Its seq.
        seq: Seq,
    },
    /// The msg_id was already sequenced with the same sender and payload.
    Duplicate {
        /// The original seq.
        seq: Seq,
    },
    /// The msg_id was used with another sender or payload (`msg_id_conflict`).
    Conflict,
    /// A Commit for an epoch already decided (`stale_commit`).
    StaleCommit {
        /// The current epoch.
        epoch: Epoch,
        /// The seq of the Commit that opened it.
        epoch_seq: u64,
    },
    /// A message for an epoch not reached yet (`epoch_ahead`).
    EpochAhead {
        /// The current epoch.
        epoch: Epoch,
    },
    /// An application message more than `APP_EPOCH_LAG_MAX` epochs old (`epoch_too_old`).
    EpochTooOld {
        /// The current epoch.
        epoch: Epoch,
    },
    /// A Commit that adds devices without a Welcome, or a Welcome without adds.
    WelcomeMismatch,
    /// A Commit for the current epoch that reached the store without its verified next
    /// state: a bug of the caller (`internal_error`); nothing was appended.
    Unverified,
    /// The sender is not a member (`not_member`).
    NotMember,
    /// A Commit that breaks a governance rule (`forbidden`, SPEC.md 10.2); the detail
    /// names the rule.
    Forbidden(String),
    /// A Commit that would pass `room_members_max` (`room_full`).
    RoomFull,
    /// The conversation's log would retain more than `conversation_bytes_max`
    /// (`quota_exceeded`).
    ConversationFull,
    /// A Commit adding a user that does not allow the committer (`invite_not_allowed`,
    /// SPEC.md 10.2 rule 8).
    InviteNotAllowed,
    /// No such conversation (`conversation_not_found`).
    NotFound,
}

/// Storage failures. Nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("storage: {0}")]
    Database(String),
    /// Stored data does not decode (corruption or a newer schema).
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

/// The gateway's durable state.
pub trait Store: Send {
    /// Creates a conversation from its verified new group (`group`: the creator at leaf 0,
    /// epoch 0, SPEC.md 6.1); a room with the creator's user as owner (SPEC.md 10.2),
    /// unless that user is already in `rooms_per_user_max` rooms.
    fn create_conversation(
        &mut self,
        id: &ConversationId,
        kind: ConversationKind,
        group: &TrackedGroup,
        rooms_per_user_max: u64,
        now: UnixMs,
    ) -> Result<CreateOutcome, StoreError>;

    /// The tracked MLS group state of a conversation (SPEC.md 7.7): mls-rs's
    /// `ExternalSnapshot` after its latest accepted Commit. `None` for no such conversation.
    fn group_state(&self, id: &ConversationId) -> Result<Option<Vec<u8>>, StoreError>;

    /// The GroupInfo kept for a conversation (SPEC.md 7.10): the latest one a Commit
    /// carried, or the creation's.
    fn group_info(&self, id: &ConversationId) -> Result<Option<KeptGroupInfo>, StoreError>;

    /// Whether `msg_id` is already sequenced in the conversation (the store's
    /// idempotency record, SPEC.md 6.3).
    fn sequenced(&self, id: &ConversationId, msg_id: &MsgId) -> Result<bool, StoreError>;

    /// A room's roles as the gateway holds them (`None` for a direct message or no such
    /// conversation).
    fn room_roles(&self, id: &ConversationId) -> Result<Option<RoomRoles>, StoreError>;

    /// The conversation's state, if it exists.
    fn conversation(&self, id: &ConversationId) -> Result<Option<ConversationState>, StoreError>;

    /// The roster: (leaf, device), by leaf.
    fn roster(&self, id: &ConversationId) -> Result<Vec<(u32, DeviceId)>, StoreError>;

    /// Sequences one message (SPEC.md sections 6.3, 7.2, 7.3, 7.5, 7.6), atomically.
    fn append(&mut self, request: &AppendRequest) -> Result<AppendOutcome, StoreError>;

    /// Up to `limit` entries of `stream` from `from_seq`, in seq order, stopping before
    /// the entries' size would pass `max_bytes`; the first entry is always returned. An
    /// entry's size is its payload plus `limits::ENTRY_FRAMING_BYTES_MAX`.
    fn read(
        &self,
        stream: &StreamKey,
        from_seq: Seq,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StoreError>;

    /// The stream's head seq and oldest retained seq.
    fn bounds(&self, stream: &StreamKey) -> Result<(u64, u64), StoreError>;

    /// Moves `device`'s cursor on `stream` to `max(cursor, seq)` and returns the new
    /// cursor; `None`, changing nothing, when `seq` is beyond the head (REQ-6.5-2).
    fn ack(
        &mut self,
        stream: &StreamKey,
        device: &DeviceId,
        seq: Seq,
    ) -> Result<Option<u64>, StoreError>;

    /// `device`'s cursor on `stream` (0 when it never acked).
    fn cursor(&self, stream: &StreamKey, device: &DeviceId) -> Result<u64, StoreError>;

    /// Stores a resume token by its hash (SPEC.md 5.5). Tokens of one `family` descend from
    /// one authentication; reuse of any of them revokes the family.
    fn issue_token(&mut self, token: &IssuedToken) -> Result<(), StoreError>;

    /// Redeems a token: marks it used and returns what it was bound to, atomically.
    fn redeem_token(&mut self, hash: &[u8; 32], now: UnixMs) -> Result<Redeemed, StoreError>;

    /// Stores a revocation whose signature the caller verified (SPEC.md 3.3). It takes
    /// effect at `min(revoked_at_ms, now)`; a later revocation of the same device never
    /// moves that time forward. Returns the effective time. Revocations are never deleted.
    fn store_revocation(
        &mut self,
        revocation: &Revocation,
        now: UnixMs,
    ) -> Result<UnixMs, StoreError>;

    /// When `device` was revoked, if it was.
    fn revoked_at(&self, device: &DeviceId) -> Result<Option<UnixMs>, StoreError>;

    /// Makes every committed write durable. The SQLite store commits durably on every write,
    /// so this does nothing there, except under the `ack_before_durable` fault.
    fn flush(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Deletes what SPEC.md 6.7 allows: for each stream, the longest prefix of entries that
    /// are older than `retention_ms` and either acknowledged by every current member device
    /// or older than `retention_unacked_ms`, at most `max_entries` entries in all; and resume
    /// tokens past their expiry. Each stream's deletion is one transaction.
    fn collect_garbage(
        &mut self,
        policy: &RetentionPolicy,
        now: UnixMs,
        max_entries: u64,
    ) -> Result<GcReport, StoreError>;

    /// Adds validated KeyPackages to `device`'s pool and, when given, replaces its
    /// last-resort package (SPEC.md section 8), atomically. Packages past their lifetime
    /// are dropped first. Refused, changing nothing, when the pool would hold more than
    /// `pool_max`.
    fn upload_key_packages(
        &mut self,
        device: &DeviceId,
        packages: &[StoredKeyPackage],
        last_resort: Option<&StoredKeyPackage>,
        pool_max: u64,
        now: UnixMs,
    ) -> Result<UploadOutcome, StoreError>;

    /// Claims one package for each device of `user` other than `claimer` that is not
    /// revoked (and, with `only`, is listed there), in one transaction (REQ-8-2): the oldest
    /// live pool package, removed, or else the live last-resort package, kept and marked
    /// claimed (REQ-8-3, REQ-8-9). Ordered by device.
    fn claim_key_packages(
        &mut self,
        user: &SystemKey,
        claimer: &DeviceId,
        only: Option<&[DeviceId]>,
        now: UnixMs,
    ) -> Result<Vec<ClaimedPackage>, StoreError>;

    /// The devices of `user` with a live package or last-resort package that are not
    /// revoked, by DeviceId (`ListDevices`, REQ-8-8).
    fn devices(&self, user: &SystemKey, now: UnixMs) -> Result<Vec<DeviceListing>, StoreError>;

    /// The seq of the first Commit at or after `from_seq` that removed `device` from
    /// `conversation`, if any: `device` reads nothing above it (REQ-7.6-2).
    fn departure(
        &self,
        conversation: &ConversationId,
        device: &DeviceId,
        from_seq: u64,
    ) -> Result<Option<u64>, StoreError>;

    /// The seq of the Commit that most recently added `device` to `conversation`, if a
    /// Commit did (the creator was not added by one): the device reads nothing below it
    /// (REQ-7.6-4).
    fn arrival(
        &self,
        conversation: &ConversationId,
        device: &DeviceId,
    ) -> Result<Option<u64>, StoreError>;

    /// `user`'s presence status (SPEC.md 9.1); the default for a key never seen.
    fn presence_status(&self, user: &SystemKey) -> Result<PresenceStatus, StoreError>;

    /// Stores `user`'s presence status.
    fn put_presence_status(
        &mut self,
        user: &SystemKey,
        status: &PresenceStatus,
    ) -> Result<(), StoreError>;

    /// `user`'s invite policy and allow list (SPEC.md 8.1); the defaults for a key never
    /// seen.
    fn invite_settings(&self, user: &SystemKey) -> Result<InviteSettingsOf, StoreError>;

    /// Replaces `user`'s invite policy and allow list.
    fn put_invite_settings(
        &mut self,
        user: &SystemKey,
        settings: &InviteSettingsOf,
    ) -> Result<(), StoreError>;

    /// What `target`'s settings say of `other` (SPEC.md 8.1): one lookup, the same work
    /// whether or not `target` belongs to anyone (REQ-8-13).
    fn consent_of(&self, target: &SystemKey, other: &SystemKey) -> Result<ConsentOf, StoreError>;

    /// `device` subscribes or sends to `conversation`: when it is a room, `device` is in
    /// its roster and its user has not joined it yet, the user joins it unless it has
    /// joined `rooms_per_user_max` rooms already (SPEC.md 10.4, REQ-10-8). Anything else
    /// is `Joined` and changes nothing.
    fn join(
        &mut self,
        conversation: &ConversationId,
        device: &DeviceId,
        rooms_per_user_max: u64,
    ) -> Result<JoinOutcome, StoreError>;

    /// `user`'s share list and blocklist (SPEC.md 9.3); empty for a key never seen.
    fn share_lists(&self, user: &SystemKey) -> Result<ShareLists, StoreError>;

    /// Replaces `user`'s share list and blocklist.
    fn put_share_lists(&mut self, user: &SystemKey, lists: &ShareLists) -> Result<(), StoreError>;

    /// Whether `target` shares with `watcher`, and whether it blocks `watcher`: one indexed
    /// lookup, the same work whether or not `target` belongs to anyone or how long its
    /// lists are (REQ-9.2-2).
    fn share_of(&self, target: &SystemKey, watcher: &SystemKey)
    -> Result<(bool, bool), StoreError>;
}

/// A user's stored presence status (SPEC.md 9.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PresenceStatus {
    /// Invisible mode is on.
    pub invisible: bool,
    /// The published time of the user's last online/offline transition.
    pub last_seen: Option<UnixMs>,
}

/// A user's invite settings (SPEC.md 8.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InviteSettingsOf {
    /// Who may claim the user's KeyPackages and add the user.
    pub policy: InvitePolicy,
    /// The users the `allowed` policy lets in.
    pub allowed: std::collections::BTreeSet<SystemKey>,
}

/// The outcome of [`Store::join`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinOutcome {
    /// The user has joined (now or before), or nothing was to be joined.
    Joined,
    /// The user has joined `rooms_per_user_max` rooms already (`too_many_rooms`).
    TooManyRooms,
}

/// A user's share list and blocklist (SPEC.md 9.3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShareLists {
    /// Users this user shares presence with.
    pub shared: std::collections::BTreeSet<SystemKey>,
    /// Users this user blocks.
    pub blocked: std::collections::BTreeSet<SystemKey>,
}

/// One device in [`Store::devices`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceListing {
    /// The device.
    pub device: DeviceId,
    /// Live packages in its pool.
    pub pool_count: u64,
    /// Whether it has a live last-resort package.
    pub last_resort_present: bool,
}

/// A KeyPackage the handler validated, with the end of its lifetime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKeyPackage {
    /// The MLSMessage bytes.
    pub bytes: Vec<u8>,
    /// The leaf's `not_after`, in seconds since the Unix epoch.
    pub not_after_s: u64,
}

/// A device's pool as its owner sees it (`KeyPackagesStored`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStatus {
    /// Live packages in the pool, not counting the last-resort one.
    pub pool_count: u64,
    /// Whether a live last-resort package is stored.
    pub last_resort_present: bool,
    /// Whether it was handed out since it was uploaded.
    pub last_resort_claimed: bool,
}

/// The outcome of [`Store::upload_key_packages`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadOutcome {
    /// Stored; the pool now.
    Stored(PoolStatus),
    /// The pool would pass `pool_max`; nothing was stored.
    PoolFull(PoolStatus),
}

/// One device's package handed out by a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedPackage {
    /// The device.
    pub device: DeviceId,
    /// Its KeyPackage.
    pub key_package: Vec<u8>,
    /// Whether it is the device's last-resort package.
    pub last_resort: bool,
}

/// How long entries are kept (SPEC.md 6.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// `retention_ms`: no entry is deleted before this age.
    pub retention_ms: u64,
    /// `retention_unacked_ms`: after this age an entry is deleted even if a member device
    /// never acknowledged it.
    pub retention_unacked_ms: u64,
}

impl Default for RetentionPolicy {
    /// SPEC.md's defaults: 30 and 90 days.
    fn default() -> Self {
        Self {
            retention_ms: 30 * 86_400_000,
            retention_unacked_ms: 90 * 86_400_000,
        }
    }
}

/// What one [`Store::collect_garbage`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Entries deleted.
    pub entries_deleted: u64,
    /// Streams whose `oldest_seq` advanced.
    pub streams_advanced: u64,
    /// Expired resume tokens deleted.
    pub tokens_deleted: u64,
    /// `true` when the pass stopped at `max_entries` and more may be deletable now.
    pub more: bool,
}

/// A resume token as stored: only its hash, never the token (REQ-5.5-7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// SHA-256 of the token.
    pub hash: [u8; 32],
    /// The device it is bound to.
    pub device: DeviceId,
    /// The session it resumes.
    pub session: [u8; 16],
    /// The chain of tokens it belongs to.
    pub family: [u8; 16],
    /// When it stops working.
    pub expires: UnixMs,
    /// When the device's certificate expires (checked again on resume, REQ-5.5-6).
    pub certificate_not_after: UnixMs,
}

/// The outcome of [`Store::redeem_token`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redeemed {
    /// Valid and now used.
    Valid(IssuedToken),
    /// Already used: the whole family is now revoked (`resume_token_reused`), and the
    /// session that descends from it must end (REQ-5.5-10).
    Reused {
        /// The device the token was bound to.
        device: DeviceId,
        /// Its chain.
        family: [u8; 16],
    },
    /// Unknown, expired or revoked (`resume_token_invalid`).
    Invalid,
}
