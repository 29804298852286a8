//! Every frame of SPEC.md Appendix A, with its canonical CBOR encoding.
//!
//! A frame is a CBOR map whose key 0 holds the frame type (SPEC.md section 4.3).
//! [`ClientFrame`] holds types 1–63 and [`ServerFrame`] types 64–127.

use serde::{Deserialize, Serialize};

use crate::cbor::{Cbor, DecodeError, DecodeLimits, MapFields, Reader, Writer, cbor_map};
use crate::error::ErrorCode;
use crate::identity::{DeviceCertificate, Revocation};
use crate::ids::{
    ConversationId, DeviceId, Epoch, MlsBytes, MsgId, Nonce, ResumeToken, Seq, SessionId,
    ShortText, Signature, StreamId, SystemKey, UnixMs,
};

/// Conversation kinds (SPEC.md section 6.1).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize, arbitrary::Arbitrary)]
#[serde(rename_all = "snake_case")]
pub enum ConversationKind {
    /// A direct message between the devices of at most two systems.
    DirectMessage,
    /// A governed room (SPEC.md section 10).
    Room,
}

impl Cbor for ConversationKind {
    fn encode(&self, w: &mut Writer) {
        w.uint(match self {
            ConversationKind::DirectMessage => 1,
            ConversationKind::Room => 2,
        });
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        match r.uint()? {
            1 => Ok(ConversationKind::DirectMessage),
            2 => Ok(ConversationKind::Room),
            _ => Err(DecodeError::Malformed("unknown conversation kind")),
        }
    }
}

/// The protocol versions a client offers: 1 to 8 entries.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
#[serde(transparent)]
pub struct Versions(Vec<u64>);

impl<'de> Deserialize<'de> for Versions {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::new(Vec::<u64>::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl<'a> arbitrary::Arbitrary<'a> for Versions {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        let n = u.int_in_range(1..=crate::limits::HELLO_VERSIONS_MAX)?;
        let v = (0..n)
            .map(|_| u64::arbitrary(u))
            .collect::<arbitrary::Result<Vec<u64>>>()?;
        Ok(Self(v))
    }
}

impl Versions {
    /// Wraps 1 to [`crate::limits::HELLO_VERSIONS_MAX`] versions.
    pub fn new(v: Vec<u64>) -> Result<Self, DecodeError> {
        if v.is_empty() || v.len() > crate::limits::HELLO_VERSIONS_MAX {
            return Err(DecodeError::Malformed(
                "Hello.versions must list 1 to 8 versions",
            ));
        }
        Ok(Self(v))
    }

    /// Only the version this crate implements.
    pub fn current() -> Self {
        Self(vec![crate::limits::PROTOCOL_VERSION])
    }

    /// The versions, as listed.
    pub fn as_slice(&self) -> &[u64] {
        &self.0
    }
}

impl Cbor for Versions {
    fn encode(&self, w: &mut Writer) {
        self.0.encode(w);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Self::new(Vec::<u64>::decode(r)?)
    }
}

cbor_map! {
    /// `Hello` (type 1, SPEC.md section 5.2).
    pub struct Hello {
        /// Versions the client speaks.
        1 req versions: Versions,
        /// A resume token from an earlier `Ready`.
        2 opt resume_token: ResumeToken,
    }
}

cbor_map! {
    /// `Auth` (type 2, SPEC.md section 5.3).
    pub struct Auth {
        /// The device certificate.
        1 req certificate: DeviceCertificate,
        /// The client's clock when it signed.
        2 req time_ms: UnixMs,
        /// Device-key signature over the auth transcript.
        3 req signature: Signature,
        /// The gateway origin the client intended to reach.
        4 req origin: ShortText,
        /// The nonce of the `Challenge` answered.
        5 req nonce: Nonce,
    }
}

cbor_map! {
    /// `Heartbeat` (type 3, SPEC.md section 5.6).
    pub struct Heartbeat {
        /// Echoed in the `HeartbeatAck`.
        1 req nonce: u64,
    }
}

cbor_map! {
    /// `CreateConversation` (type 4, SPEC.md section 6.1).
    pub struct CreateConversation {
        /// Request id.
        1 req rid: u64,
        /// The new conversation's id, chosen at random by the client.
        2 req conversation: ConversationId,
        /// Direct message or room.
        3 req kind: ConversationKind,
        /// An MLSMessage carrying the GroupInfo of the creator's new group (epoch 0, the
        /// ratchet tree in its `ratchet_tree` extension): the public state the gateway
        /// verifies every handshake message against (SPEC.md 7.7).
        4 req group_info: MlsBytes,
    }
}

cbor_map! {
    /// `Send` (type 5, SPEC.md section 6.3).
    pub struct Send {
        /// Request id.
        1 req rid: u64,
        /// Target conversation.
        2 req conversation: ConversationId,
        /// Idempotency key, fixed when the message was composed.
        3 req msg_id: MsgId,
        /// An MLSMessage.
        4 req payload: MlsBytes,
        /// The Welcome for the members a Commit adds.
        5 opt welcome: MlsBytes,
        /// With a Commit: the GroupInfo of the epoch it opens, with `external_pub`, so
        /// that a member that forked can resync (SPEC.md 7.10).
        6 opt group_info: MlsBytes,
    }
}

cbor_map! {
    /// `GetGroupInfo` (type 15, SPEC.md section 7.10): the public state a member needs to
    /// resync.
    pub struct GetGroupInfo {
        /// Request id.
        1 req rid: u64,
        /// The conversation.
        2 req conversation: ConversationId,
    }
}

cbor_map! {
    /// `Subscribe` (type 6, SPEC.md section 6.4).
    pub struct Subscribe {
        /// Request id.
        1 req rid: u64,
        /// The stream.
        2 req stream: StreamId,
        /// First seq wanted; default the ack cursor plus one.
        3 opt from_seq: Seq,
    }
}

cbor_map! {
    /// `Continue` (type 7, SPEC.md section 6.4): ask for the next replay batch.
    pub struct Continue {
        /// The stream being replayed.
        1 req stream: StreamId,
        /// The last seq of the batch received.
        2 req after_seq: Seq,
    }
}

cbor_map! {
    /// `Unsubscribe` (type 8, SPEC.md section 6.4).
    pub struct Unsubscribe {
        /// Request id.
        1 req rid: u64,
        /// The stream.
        2 req stream: StreamId,
    }
}

cbor_map! {
    /// `Ack` (type 9, SPEC.md section 6.5).
    pub struct Ack {
        /// The stream.
        1 req stream: StreamId,
        /// Highest seq durably processed.
        2 req seq: Seq,
    }
}

cbor_map! {
    /// `RevokeDevice` (type 10, SPEC.md section 5.9).
    pub struct RevokeDevice {
        /// Request id.
        1 req rid: u64,
        /// The signed revocation.
        2 req revocation: Revocation,
    }
}

cbor_map! {
    /// `UploadKeyPackages` (type 11, SPEC.md section 8).
    pub struct UploadKeyPackages {
        /// Request id.
        1 req rid: u64,
        /// KeyPackages, each an MLSMessage.
        2 req key_packages: Vec<MlsBytes>,
        /// The device's last-resort KeyPackage.
        3 opt last_resort: MlsBytes,
    }
}

cbor_map! {
    /// `ClaimKeyPackages` (type 12, SPEC.md section 8).
    pub struct ClaimKeyPackages {
        /// Request id.
        1 req rid: u64,
        /// The user whose devices are wanted.
        2 req user: SystemKey,
        /// Only these devices of the user; every device when absent.
        3 opt devices: Vec<DeviceId>,
    }
}

cbor_map! {
    /// `ListDevices` (type 13, SPEC.md section 8): the caller's own user's devices.
    pub struct ListDevices {
        /// Request id.
        1 req rid: u64,
    }
}

cbor_map! {
    /// `UpdateInviteSettings` (type 14, SPEC.md section 8.1): change who may claim the
    /// caller's user's KeyPackages and add the user. With no field besides `rid` it is a
    /// query.
    pub struct UpdateInviteSettings {
        /// Request id.
        1 req rid: u64,
        /// The new policy.
        2 opt policy: InvitePolicy,
        /// Users to put on the allow list.
        3 opt allow: Vec<SystemKey>,
        /// Users to take off the allow list (applied after `allow`).
        4 opt disallow: Vec<SystemKey>,
    }
}

/// Who may claim a user's KeyPackages and add the user (SPEC.md section 8.1).
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize, arbitrary::Arbitrary,
)]
#[serde(rename_all = "snake_case")]
pub enum InvitePolicy {
    /// Any user the user does not block (the default).
    #[default]
    Everyone,
    /// Only the users on the user's allow list (and never a blocked one).
    Allowed,
}

impl InvitePolicy {
    /// The wire value (1 everyone, 2 allowed).
    pub fn code(self) -> u64 {
        match self {
            InvitePolicy::Everyone => 1,
            InvitePolicy::Allowed => 2,
        }
    }

    /// The policy of a wire value, if it is one.
    pub fn from_code(code: u64) -> Option<Self> {
        match code {
            1 => Some(InvitePolicy::Everyone),
            2 => Some(InvitePolicy::Allowed),
            _ => None,
        }
    }
}

impl Cbor for InvitePolicy {
    fn encode(&self, w: &mut Writer) {
        w.uint(self.code());
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        InvitePolicy::from_code(r.uint()?).ok_or(DecodeError::Malformed("unknown invite policy"))
    }
}

/// What a device asks its presence to be (SPEC.md section 9.1).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize, arbitrary::Arbitrary)]
#[serde(rename_all = "snake_case")]
pub enum PresenceMode {
    /// Hold a lease: the user shows online to the users it shares presence with.
    Online,
    /// Hold a lease but show offline to everyone; the user's last-seen stops advancing.
    Invisible,
    /// Release this device's lease now.
    Offline,
}

impl Cbor for PresenceMode {
    fn encode(&self, w: &mut Writer) {
        w.uint(match self {
            PresenceMode::Online => 1,
            PresenceMode::Invisible => 2,
            PresenceMode::Offline => 3,
        });
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        match r.uint()? {
            1 => Ok(PresenceMode::Online),
            2 => Ok(PresenceMode::Invisible),
            3 => Ok(PresenceMode::Offline),
            _ => Err(DecodeError::Malformed("unknown presence mode")),
        }
    }
}

/// What a watcher is told about a target (SPEC.md section 9.2): a coarse bucket, never a
/// timestamp.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize, arbitrary::Arbitrary)]
#[serde(rename_all = "snake_case")]
pub enum PresenceState {
    /// At least one of the target's devices holds a lease.
    Online,
    /// Last seen within the past hour.
    WithinHour,
    /// Last seen within the past 24 hours.
    Today,
    /// Last seen within the past 7 days.
    ThisWeek,
    /// Last seen longer ago, or never.
    Longer,
    /// The target shares no presence with this watcher; also the answer for a key that
    /// belongs to nobody.
    Unavailable,
}

impl PresenceState {
    /// The state's name as SPEC.md writes it.
    pub fn name(self) -> &'static str {
        match self {
            PresenceState::Online => "online",
            PresenceState::WithinHour => "within_hour",
            PresenceState::Today => "today",
            PresenceState::ThisWeek => "this_week",
            PresenceState::Longer => "longer",
            PresenceState::Unavailable => "unavailable",
        }
    }
}

impl Cbor for PresenceState {
    fn encode(&self, w: &mut Writer) {
        w.uint(match self {
            PresenceState::Online => 1,
            PresenceState::WithinHour => 2,
            PresenceState::Today => 3,
            PresenceState::ThisWeek => 4,
            PresenceState::Longer => 5,
            PresenceState::Unavailable => 6,
        });
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        match r.uint()? {
            1 => Ok(PresenceState::Online),
            2 => Ok(PresenceState::WithinHour),
            3 => Ok(PresenceState::Today),
            4 => Ok(PresenceState::ThisWeek),
            5 => Ok(PresenceState::Longer),
            6 => Ok(PresenceState::Unavailable),
            _ => Err(DecodeError::Malformed("unknown presence state")),
        }
    }
}

cbor_map! {
    /// `SetPresence` (type 20, SPEC.md section 9.1): take, renew or release this device's
    /// presence lease.
    pub struct SetPresence {
        /// Request id.
        1 req rid: u64,
        /// Online, invisible or offline.
        2 req mode: PresenceMode,
        /// How long the lease should last; the gateway clamps it. Ignored for offline.
        3 req ttl_ms: u64,
    }
}

cbor_map! {
    /// `WatchPresence` (type 21, SPEC.md section 9.2): replace this session's watchlist.
    pub struct WatchPresence {
        /// Request id.
        1 req rid: u64,
        /// The users to watch; empty stops watching.
        2 req targets: Vec<SystemKey>,
    }
}

cbor_map! {
    /// `UpdatePresenceLists` (type 22, SPEC.md section 9.3): change the caller's user's
    /// share list and blocklist. With no field besides `rid` it is a query.
    pub struct UpdatePresenceLists {
        /// Request id.
        1 req rid: u64,
        /// Users to start sharing presence with.
        2 opt share: Vec<SystemKey>,
        /// Users to stop sharing presence with.
        3 opt unshare: Vec<SystemKey>,
        /// Users to block.
        4 opt block: Vec<SystemKey>,
        /// Users to unblock.
        5 opt unblock: Vec<SystemKey>,
    }
}

cbor_map! {
    /// `Challenge` (type 64, SPEC.md section 5.2).
    pub struct Challenge {
        /// The version the gateway picked.
        1 req version: u64,
        /// Fresh nonce for this connection.
        2 req nonce: Nonce,
        /// The gateway's clock.
        3 req server_time_ms: UnixMs,
    }
}

cbor_map! {
    /// Limits announced in `Ready` (SPEC.md section 5.5).
    pub struct SessionLimits {
        /// `frame_bytes_max`.
        1 req frame_bytes_max: u64,
        /// `collection_len_max`.
        2 req collection_len_max: u64,
        /// `nesting_depth_max`.
        3 req nesting_depth_max: u64,
        /// `text_bytes_max`.
        4 req text_bytes_max: u64,
        /// `replay_batch_max`.
        5 req replay_batch_max: u64,
        /// `pending_sends_max`.
        6 req pending_sends_max: u64,
        /// `key_packages_per_upload_max`.
        7 req key_packages_per_upload_max: u64,
    }
}

impl Default for SessionLimits {
    fn default() -> Self {
        use crate::limits::*;
        Self {
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT as u64,
            collection_len_max: COLLECTION_LEN_MAX_DEFAULT as u64,
            nesting_depth_max: NESTING_DEPTH_MAX_DEFAULT as u64,
            text_bytes_max: TEXT_BYTES_MAX_DEFAULT as u64,
            replay_batch_max: REPLAY_BATCH_MAX_DEFAULT,
            pending_sends_max: PENDING_SENDS_MAX_DEFAULT,
            key_packages_per_upload_max: KEY_PACKAGES_PER_UPLOAD_MAX_DEFAULT,
        }
    }
}

impl SessionLimits {
    /// The decode limits these announced limits imply.
    pub fn decode_limits(&self) -> DecodeLimits {
        let clamp = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        DecodeLimits {
            frame_bytes_max: clamp(self.frame_bytes_max),
            collection_len_max: clamp(self.collection_len_max),
            nesting_depth_max: clamp(self.nesting_depth_max),
            text_bytes_max: clamp(self.text_bytes_max),
        }
    }
}

cbor_map! {
    /// `Ready` (type 65, SPEC.md section 5.5).
    pub struct Ready {
        /// The session.
        1 req session_id: SessionId,
        /// Single-use token for the next reconnect.
        2 req resume_token: ResumeToken,
        /// Lifetime of `resume_token`.
        3 req resume_token_ttl_ms: u64,
        /// The client sends a heartbeat after this much silence.
        4 req heartbeat_interval_ms: u64,
        /// Silence after which either side declares the connection dead.
        5 req heartbeat_timeout_ms: u64,
        /// Whether a resume token was accepted.
        6 req resumed: bool,
        /// The gateway's clock.
        7 req server_time_ms: UnixMs,
        /// The authenticated device.
        8 req device: DeviceId,
        /// Limits in force.
        9 req limits: SessionLimits,
    }
}

cbor_map! {
    /// `HeartbeatAck` (type 66, SPEC.md section 5.6).
    pub struct HeartbeatAck {
        /// The heartbeat's nonce.
        1 req nonce: u64,
    }
}

cbor_map! {
    /// `Created` (type 67, SPEC.md section 6.1).
    pub struct Created {
        /// Request id.
        1 req rid: u64,
        /// The conversation created.
        2 req conversation: ConversationId,
    }
}

cbor_map! {
    /// `Accepted` (type 68, SPEC.md section 6.3): the durable acknowledgement of a `Send`.
    pub struct Accepted {
        /// Request id.
        1 req rid: u64,
        /// The conversation.
        2 req conversation: ConversationId,
        /// The message.
        3 req msg_id: MsgId,
        /// Its seq.
        4 req seq: Seq,
        /// True when the msg_id had already been sequenced.
        5 req duplicate: bool,
    }
}

cbor_map! {
    /// `Subscribed` (type 69, SPEC.md section 6.4).
    pub struct Subscribed {
        /// Request id.
        1 req rid: u64,
        /// The stream.
        2 req stream: StreamId,
        /// First seq that will be replayed.
        3 req from_seq: Seq,
        /// Highest assigned seq (0 when empty).
        4 req head_seq: u64,
        /// The device's ack cursor (0 when nothing acked).
        5 req ack_cursor: u64,
        /// Lowest retained seq (head + 1 when empty).
        6 req oldest_seq: u64,
    }
}

/// What an entry carries (SPEC.md section 6.2, `kind` and the fields it implies).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize, arbitrary::Arbitrary)]
#[serde(rename_all = "snake_case")]
pub enum EntryBody {
    /// An MLS PrivateMessage with application content.
    Application {
        /// The MLS epoch it was sent in.
        epoch: Epoch,
    },
    /// An MLS PublicMessage Commit.
    Commit {
        /// The epoch the Commit was created in.
        epoch: Epoch,
    },
    /// An MLS PublicMessage Proposal.
    Proposal {
        /// The epoch the Proposal was created in.
        epoch: Epoch,
    },
    /// A Welcome in a device inbox.
    Welcome {
        /// The conversation it joins.
        conversation: ConversationId,
        /// The seq of the Commit that added the device.
        commit_seq: Seq,
    },
}

/// One sequenced entry of a stream (SPEC.md section 6.2).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, arbitrary::Arbitrary)]
pub struct Entry {
    /// Position in the stream.
    pub seq: Seq,
    /// The sender's idempotency key.
    pub msg_id: MsgId,
    /// The sending device.
    pub sender: DeviceId,
    /// The gateway's clock when it sequenced the entry.
    pub accepted_ms: UnixMs,
    /// The MLSMessage.
    pub payload: MlsBytes,
    /// Kind and kind-specific fields.
    pub body: EntryBody,
}

impl Cbor for Entry {
    fn encode(&self, w: &mut Writer) {
        let (kind, extra) = match &self.body {
            EntryBody::Application { .. } => (1, 1),
            EntryBody::Commit { .. } => (2, 1),
            EntryBody::Proposal { .. } => (3, 1),
            EntryBody::Welcome { .. } => (4, 2),
        };
        w.map(6 + extra);
        w.uint(1);
        self.seq.encode(w);
        w.uint(2);
        self.msg_id.encode(w);
        w.uint(3);
        self.sender.encode(w);
        w.uint(4);
        w.uint(kind);
        w.uint(5);
        self.accepted_ms.encode(w);
        w.uint(6);
        self.payload.encode(w);
        match &self.body {
            EntryBody::Application { epoch }
            | EntryBody::Commit { epoch }
            | EntryBody::Proposal { epoch } => {
                w.uint(7);
                epoch.encode(w);
            }
            EntryBody::Welcome {
                conversation,
                commit_seq,
            } => {
                w.uint(8);
                conversation.encode(w);
                w.uint(9);
                commit_seq.encode(w);
            }
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut keys = r.map()?;
        let (mut seq, mut msg_id, mut sender, mut kind, mut accepted_ms, mut payload) =
            (None, None, None, None, None, None);
        let (mut epoch, mut conversation, mut commit_seq) = (None, None, None);
        while let Some(key) = keys.next(r)? {
            match key {
                1 => seq = Some(Seq::decode(r)?),
                2 => msg_id = Some(MsgId::decode(r)?),
                3 => sender = Some(DeviceId::decode(r)?),
                4 => kind = Some(r.uint()?),
                5 => accepted_ms = Some(UnixMs::decode(r)?),
                6 => payload = Some(MlsBytes::decode(r)?),
                7 => epoch = Some(Epoch::decode(r)?),
                8 => conversation = Some(ConversationId::decode(r)?),
                9 => commit_seq = Some(Seq::decode(r)?),
                _ => r.skip()?,
            }
        }
        r.leave();
        let missing = DecodeError::Malformed("entry is missing a field its kind requires");
        let with_epoch = |e: Option<Epoch>| e.ok_or(missing.clone());
        let body = match (kind, conversation.is_some() || commit_seq.is_some(), epoch) {
            (Some(1), false, e) => EntryBody::Application {
                epoch: with_epoch(e)?,
            },
            (Some(2), false, e) => EntryBody::Commit {
                epoch: with_epoch(e)?,
            },
            (Some(3), false, e) => EntryBody::Proposal {
                epoch: with_epoch(e)?,
            },
            (Some(4), _, None) => EntryBody::Welcome {
                conversation: conversation.ok_or(missing.clone())?,
                commit_seq: commit_seq.ok_or(missing.clone())?,
            },
            (Some(1..=4), _, _) => {
                return Err(DecodeError::Malformed("entry has a field its kind forbids"));
            }
            (Some(_), _, _) => return Err(DecodeError::Malformed("unknown entry kind")),
            (None, _, _) => return Err(missing),
        };
        Ok(Entry {
            seq: seq.ok_or(missing.clone())?,
            msg_id: msg_id.ok_or(missing.clone())?,
            sender: sender.ok_or(missing.clone())?,
            accepted_ms: accepted_ms.ok_or(missing.clone())?,
            payload: payload.ok_or(missing)?,
            body,
        })
    }
}

cbor_map! {
    /// `Batch` (type 70, SPEC.md section 6.4): a bounded slice of a replay.
    pub struct Batch {
        /// The stream.
        1 req stream: StreamId,
        /// Consecutive entries, at most `replay_batch_max`.
        2 req entries: Vec<Entry>,
        /// Whether more batches follow (after `Continue`).
        3 req more: bool,
    }
}

cbor_map! {
    /// `Deliver` (type 71, SPEC.md section 6.4): one live entry.
    pub struct Deliver {
        /// The stream.
        1 req stream: StreamId,
        /// The entry.
        2 req entry: Entry,
    }
}

cbor_map! {
    /// `ContinuityLost` (type 72, SPEC.md section 6.6).
    pub struct ContinuityLost {
        /// Request id of the `Subscribe`.
        1 req rid: u64,
        /// The stream.
        2 req stream: StreamId,
        /// The seq the client asked for.
        3 req from_seq: Seq,
        /// The lowest retained seq.
        4 req oldest_seq: u64,
        /// The head.
        5 req head_seq: u64,
    }
}

cbor_map! {
    /// `Unsubscribed` (type 73, SPEC.md section 6.4).
    pub struct Unsubscribed {
        /// Request id.
        1 req rid: u64,
        /// The stream.
        2 req stream: StreamId,
    }
}

cbor_map! {
    /// `Error` (type 74, SPEC.md section 5.9).
    pub struct ErrorFrame {
        /// The error code (SPEC.md section 12).
        1 req code: ErrorCode,
        /// The request it answers.
        2 opt rid: u64,
        /// When to retry, for `rate_limited`.
        3 opt retry_after_ms: u64,
        /// The conversation's current epoch, for `stale_commit` and `epoch_ahead`.
        4 opt epoch: Epoch,
        /// A seq the code refers to (for `stale_commit`, the winning Commit's).
        5 opt seq: Seq,
        /// Short diagnosis for humans; never payloads, keys or tokens.
        6 opt detail: ShortText,
    }
}

impl ErrorFrame {
    /// An `Error` with `code` and no other field.
    pub fn new(code: ErrorCode) -> Self {
        Self {
            code,
            rid: None,
            retry_after_ms: None,
            epoch: None,
            seq: None,
            detail: None,
        }
    }
}

impl Cbor for ErrorCode {
    fn encode(&self, w: &mut Writer) {
        w.uint(u64::from(self.value()));
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let v = u16::try_from(r.uint()?)
            .map_err(|_| DecodeError::Malformed("error code out of range"))?;
        Ok(ErrorCode::from_value(v))
    }
}

cbor_map! {
    /// `Ok` (type 75, SPEC.md section 5.9).
    pub struct OkFrame {
        /// Request id.
        1 req rid: u64,
    }
}

cbor_map! {
    /// `KeyPackagesStored` (type 76, SPEC.md section 8).
    pub struct KeyPackagesStored {
        /// Request id.
        1 req rid: u64,
        /// KeyPackages in the device's pool (not counting the last-resort one).
        2 req pool_count: u64,
        /// Upload more below this.
        3 req low_watermark: u64,
        /// Whether a last-resort package is stored.
        4 req last_resort_present: bool,
        /// Whether the last-resort package was handed out since it was uploaded.
        5 req last_resort_claimed: bool,
    }
}

cbor_map! {
    /// One device's package in a claim (SPEC.md section 8).
    pub struct ClaimedKeyPackage {
        /// The device.
        1 req device: DeviceId,
        /// Its KeyPackage, as an MLSMessage.
        2 req key_package: MlsBytes,
        /// Whether this is the device's last-resort package.
        3 req last_resort: bool,
    }
}

cbor_map! {
    /// One device of the caller's user in `Devices` (SPEC.md section 8).
    pub struct DeviceStatus {
        /// The device.
        1 req device: DeviceId,
        /// KeyPackages in its pool.
        2 req pool_count: u64,
        /// Whether it has a last-resort package.
        3 req last_resort_present: bool,
    }
}

cbor_map! {
    /// `Devices` (type 78, SPEC.md section 8).
    pub struct Devices {
        /// Request id.
        1 req rid: u64,
        /// Every device of the caller's user that is in the directory and not revoked,
        /// ordered by DeviceId; the caller included.
        2 req devices: Vec<DeviceStatus>,
    }
}

cbor_map! {
    /// `InviteSettings` (type 79, SPEC.md section 8.1): the caller's user's invite settings
    /// after an `UpdateInviteSettings`.
    pub struct InviteSettings {
        /// Request id.
        1 req rid: u64,
        /// The policy in force.
        2 req policy: InvitePolicy,
        /// The allow list, strictly ascending.
        3 req allowed: Vec<SystemKey>,
    }
}

cbor_map! {
    /// `GroupInfo` (type 80, SPEC.md section 7.10): the GroupInfo the gateway keeps for a
    /// conversation, and the tracked ratchet tree when the GroupInfo holds none.
    pub struct GroupInfoFrame {
        /// Request id.
        1 req rid: u64,
        /// The conversation.
        2 req conversation: ConversationId,
        /// The epoch of the GroupInfo.
        3 req epoch: Epoch,
        /// The seq of the Commit that opened that epoch (0 for the creation's, so a plain
        /// uint rather than a `Seq`).
        4 req seq: u64,
        /// The GroupInfo, an MLSMessage, as its committer gave it.
        5 req group_info: MlsBytes,
        /// The ratchet tree (the `ratchet_tree` extension's data), when `group_info` holds
        /// none.
        6 opt ratchet_tree: MlsBytes,
    }
}

cbor_map! {
    /// `KeyPackagesClaimed` (type 77, SPEC.md section 8).
    pub struct KeyPackagesClaimed {
        /// Request id.
        1 req rid: u64,
        /// The user.
        2 req user: SystemKey,
        /// One package per device that had one.
        3 req claimed: Vec<ClaimedKeyPackage>,
    }
}

cbor_map! {
    /// `PresenceLease` (type 90, SPEC.md section 9.1): the lease granted.
    pub struct PresenceLease {
        /// Request id.
        1 req rid: u64,
        /// The mode now in force for this device.
        2 req mode: PresenceMode,
        /// The lease's length after clamping; 0 for offline.
        3 req ttl_ms: u64,
    }
}

cbor_map! {
    /// One target's state in a `PresenceStates` answer.
    pub struct PresenceOf {
        /// The watched user.
        1 req target: SystemKey,
        /// What this watcher may know of it.
        2 req state: PresenceState,
    }
}

cbor_map! {
    /// `PresenceStates` (type 91, SPEC.md section 9.2): the watchlist's current states, in
    /// the order requested.
    pub struct PresenceStates {
        /// Request id.
        1 req rid: u64,
        /// One per requested target.
        2 req states: Vec<PresenceOf>,
    }
}

cbor_map! {
    /// `PresenceChanged` (type 92, SPEC.md section 9.2): a watched user's state changed.
    pub struct PresenceChanged {
        /// The watched user.
        1 req target: SystemKey,
        /// Its new state for this watcher.
        2 req state: PresenceState,
    }
}

cbor_map! {
    /// `PresenceLists` (type 93, SPEC.md section 9.3): the caller's user's lists after an
    /// `UpdatePresenceLists`.
    pub struct PresenceLists {
        /// Request id.
        1 req rid: u64,
        /// Users this user shares presence with.
        2 req shared: Vec<SystemKey>,
        /// Users this user blocks.
        3 req blocked: Vec<SystemKey>,
        /// Whether a device of this user set invisible mode (cleared by going online).
        4 req invisible: bool,
    }
}

/// Declares a frame enum over structs with their type numbers.
macro_rules! frame_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident ($lo:literal ..= $hi:literal, other $olo:literal ..= $ohi:literal) {
            $( $ty:literal => $variant:ident($inner:ty), )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
        #[derive(arbitrary::Arbitrary)]
        #[non_exhaustive]
        pub enum $name {
            $( #[doc = concat!("Frame type ", stringify!($ty), ".")] $variant($inner), )*
        }

        impl $name {
            /// Every frame type number of this direction.
            pub const TYPES: &'static [u64] = &[$($ty),*];

            /// The frame type number (envelope key 0).
            pub fn frame_type(&self) -> u64 {
                match self { $( $name::$variant(_) => $ty, )* }
            }

            /// The frame's name, as in SPEC.md Appendix A.
            pub fn name(&self) -> &'static str {
                match self { $( $name::$variant(_) => stringify!($variant), )* }
            }

            /// The canonical encoding.
            pub fn encode(&self) -> Vec<u8> {
                let mut w = Writer::new();
                match self {
                    $( $name::$variant(f) => {
                        w.map(1 + f.field_count());
                        w.uint(0);
                        w.uint($ty);
                        f.encode_fields(&mut w);
                    } )*
                }
                w.into_bytes()
            }

            /// Decodes one frame from one WebSocket message, enforcing `limits`.
            pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<Self, DecodeError> {
                if bytes.len() > limits.frame_bytes_max {
                    return Err(DecodeError::TooLarge { len: bytes.len(), max: limits.frame_bytes_max });
                }
                let mut r = Reader::new(bytes, limits);
                let mut keys = r.map()?;
                if keys.next(&mut r)? != Some(0) {
                    return Err(DecodeError::Malformed("frame type (key 0) missing"));
                }
                let ty = r.uint()?;
                let frame = match ty {
                    $( $ty => $name::$variant(<$inner as MapFields>::decode_fields(&mut r, &mut keys)?), )*
                    $lo..=$hi => return Err(DecodeError::UnknownType(ty)),
                    $olo..=$ohi => return Err(DecodeError::WrongDirection(ty)),
                    _ => return Err(DecodeError::UnknownType(ty)),
                };
                r.leave();
                r.finish()?;
                Ok(frame)
            }
        }
    };
}

frame_enum! {
    /// A frame sent by a client (types 1–63).
    pub enum ClientFrame (1..=63, other 64..=127) {
        1 => Hello(Hello),
        2 => Auth(Auth),
        3 => Heartbeat(Heartbeat),
        4 => CreateConversation(CreateConversation),
        5 => Send(Send),
        6 => Subscribe(Subscribe),
        7 => Continue(Continue),
        8 => Unsubscribe(Unsubscribe),
        9 => Ack(Ack),
        10 => RevokeDevice(RevokeDevice),
        11 => UploadKeyPackages(UploadKeyPackages),
        12 => ClaimKeyPackages(ClaimKeyPackages),
        13 => ListDevices(ListDevices),
        14 => UpdateInviteSettings(UpdateInviteSettings),
        15 => GetGroupInfo(GetGroupInfo),
        20 => SetPresence(SetPresence),
        21 => WatchPresence(WatchPresence),
        22 => UpdatePresenceLists(UpdatePresenceLists),
    }
}

frame_enum! {
    /// A frame sent by a gateway (types 64–127).
    pub enum ServerFrame (64..=127, other 1..=63) {
        64 => Challenge(Challenge),
        65 => Ready(Ready),
        66 => HeartbeatAck(HeartbeatAck),
        67 => Created(Created),
        68 => Accepted(Accepted),
        69 => Subscribed(Subscribed),
        70 => Batch(Batch),
        71 => Deliver(Deliver),
        72 => ContinuityLost(ContinuityLost),
        73 => Unsubscribed(Unsubscribed),
        74 => Error(ErrorFrame),
        75 => Ok(OkFrame),
        76 => KeyPackagesStored(KeyPackagesStored),
        77 => KeyPackagesClaimed(KeyPackagesClaimed),
        78 => Devices(Devices),
        79 => InviteSettings(InviteSettings),
        80 => GroupInfo(GroupInfoFrame),
        90 => PresenceLease(PresenceLease),
        91 => PresenceStates(PresenceStates),
        92 => PresenceChanged(PresenceChanged),
        93 => PresenceLists(PresenceLists),
    }
}

impl ServerFrame {
    /// The request id of the request this frame answers, for frames that carry one.
    pub fn rid(&self) -> Option<u64> {
        match self {
            ServerFrame::Created(f) => Some(f.rid),
            ServerFrame::Accepted(f) => Some(f.rid),
            ServerFrame::Subscribed(f) => Some(f.rid),
            ServerFrame::ContinuityLost(f) => Some(f.rid),
            ServerFrame::Unsubscribed(f) => Some(f.rid),
            ServerFrame::Error(f) => f.rid,
            ServerFrame::Ok(f) => Some(f.rid),
            ServerFrame::KeyPackagesStored(f) => Some(f.rid),
            ServerFrame::KeyPackagesClaimed(f) => Some(f.rid),
            ServerFrame::Devices(f) => Some(f.rid),
            ServerFrame::InviteSettings(f) => Some(f.rid),
            ServerFrame::GroupInfo(f) => Some(f.rid),
            ServerFrame::PresenceLease(f) => Some(f.rid),
            ServerFrame::PresenceStates(f) => Some(f.rid),
            ServerFrame::PresenceLists(f) => Some(f.rid),
            ServerFrame::Challenge(_)
            | ServerFrame::Ready(_)
            | ServerFrame::HeartbeatAck(_)
            | ServerFrame::Batch(_)
            | ServerFrame::Deliver(_)
            | ServerFrame::PresenceChanged(_) => None,
        }
    }
}

impl ClientFrame {
    /// The request id, for frames that carry one.
    pub fn rid(&self) -> Option<u64> {
        match self {
            ClientFrame::CreateConversation(f) => Some(f.rid),
            ClientFrame::Send(f) => Some(f.rid),
            ClientFrame::Subscribe(f) => Some(f.rid),
            ClientFrame::Unsubscribe(f) => Some(f.rid),
            ClientFrame::RevokeDevice(f) => Some(f.rid),
            ClientFrame::UploadKeyPackages(f) => Some(f.rid),
            ClientFrame::ClaimKeyPackages(f) => Some(f.rid),
            ClientFrame::ListDevices(f) => Some(f.rid),
            ClientFrame::UpdateInviteSettings(f) => Some(f.rid),
            ClientFrame::GetGroupInfo(f) => Some(f.rid),
            ClientFrame::SetPresence(f) => Some(f.rid),
            ClientFrame::WatchPresence(f) => Some(f.rid),
            ClientFrame::UpdatePresenceLists(f) => Some(f.rid),
            ClientFrame::Hello(_)
            | ClientFrame::Auth(_)
            | ClientFrame::Heartbeat(_)
            | ClientFrame::Continue(_)
            | ClientFrame::Ack(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_requires_type_first() {
        // {1: 5} with no key 0.
        let err = ClientFrame::decode(&[0xa1, 0x01, 0x05], &DecodeLimits::default());
        assert_eq!(
            err,
            Err(DecodeError::Malformed("frame type (key 0) missing"))
        );
    }

    #[test]
    fn unknown_and_wrong_direction_types() {
        let limits = DecodeLimits::default();
        // {0: 63}
        assert_eq!(
            ClientFrame::decode(&[0xa1, 0x00, 0x18, 0x3f], &limits),
            Err(DecodeError::UnknownType(63))
        );
        // {0: 64} sent by a client
        assert_eq!(
            ClientFrame::decode(&[0xa1, 0x00, 0x18, 0x40], &limits),
            Err(DecodeError::WrongDirection(64))
        );
        assert_eq!(
            ServerFrame::decode(&[0xa1, 0x00, 0x01], &limits),
            Err(DecodeError::WrongDirection(1))
        );
        assert_eq!(
            ServerFrame::decode(&[0xa1, 0x00, 0x18, 0xc8], &limits),
            Err(DecodeError::UnknownType(200))
        );
    }

    #[test]
    fn unknown_keys_are_ignored() {
        // Heartbeat {0: 3, 1: 7, 9: h'00'}
        let bytes = [0xa3, 0x00, 0x03, 0x01, 0x07, 0x09, 0x41, 0x00];
        assert_eq!(
            ClientFrame::decode(&bytes, &DecodeLimits::default()),
            Ok(ClientFrame::Heartbeat(Heartbeat { nonce: 7 }))
        );
    }

    #[test]
    fn missing_required_field_is_malformed() {
        // Heartbeat {0: 3}
        assert!(matches!(
            ClientFrame::decode(&[0xa1, 0x00, 0x03], &DecodeLimits::default()),
            Err(DecodeError::Malformed(_))
        ));
    }
}
