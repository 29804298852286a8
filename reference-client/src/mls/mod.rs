//! The MLS engine layer: one trait, [`MlsEngine`], with two implementations, openmls
//! ([`openmls_engine::OpenMlsEngine`]) and mls-rs ([`mlsrs_engine::MlsRsEngine`]).
//!
//! Both engines follow SPEC.md section 7.1: ciphersuite 0x0001, handshake messages as
//! PublicMessage, application messages as PrivateMessage, the ratchet tree in every
//! Welcome, and a basic credential whose identity is the member's device certificate
//! (deterministic CBOR, SPEC.md section 3.2) with the device key as leaf signature key.
//! Every Add and every Welcome is checked with [`verify_member`]. Every KeyPackage and
//! every leaf lists the `confab_room_roles` extension in its capabilities (SPEC.md
//! REQ-10-1), so that any device can be added to a room.
//!
//! State lives in one SQLite file per device. Every operation that changes state writes it
//! durably before it returns success, so no ciphertext derived from a state can leave the
//! process before that state is on disk, and a reloaded engine never reuses a secret. The
//! one exception is reading application messages in a receive batch
//! ([`MlsEngine::begin_receive_batch`], [`unwritten`]): that advance may stay in memory,
//! and a reloaded engine reads those messages again from the older state.

pub mod journal;
pub mod mlsrs_engine;
pub mod mlsrs_memo_crypto;
pub mod openmls_deferred;
pub mod openmls_engine;
pub mod openmls_memo_crypto;
pub mod signature_memo;
pub mod unwritten;

use std::path::Path;
use std::sync::Arc;

use confab_spec::cbor;
use confab_spec::identity::DeviceCertificate;
use confab_spec::ids::{ConversationId, DeviceId, UnixMs};
use confab_spec::session::DeviceCredentials;

/// The clock the engines validate certificates and lifetimes against.
pub use crate::environment::Clock;

/// The wall clock.
pub fn system_clock() -> Clock {
    Arc::new(crate::environment::system_now)
}

/// Which implementation backs an engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// openmls 0.9.
    OpenMls,
    /// mls-rs 0.57.
    MlsRs,
}

impl EngineKind {
    /// Both engines.
    pub const ALL: [EngineKind; 2] = [EngineKind::OpenMls, EngineKind::MlsRs];

    /// The name used on command lines: `openmls` or `mls-rs`.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::OpenMls => "openmls",
            EngineKind::MlsRs => "mls-rs",
        }
    }

    /// Parses `openmls` or `mls-rs`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "openmls" => Some(EngineKind::OpenMls),
            "mls-rs" | "mlsrs" => Some(EngineKind::MlsRs),
            _ => None,
        }
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Opens (creating if needed) the engine state of one device at `path`.
pub fn open_engine(
    kind: EngineKind,
    path: &Path,
    credentials: DeviceCredentials,
    clock: Clock,
) -> Result<Box<dyn MlsEngine>, EngineError> {
    open_engine_with(kind, path, credentials, clock, None)
}

/// [`open_engine`], checking signatures through `signatures`, a memo shared with the
/// engines of other devices in this process ([`signature_memo`]; for simulations).
pub fn open_engine_with(
    kind: EngineKind,
    path: &Path,
    credentials: DeviceCredentials,
    clock: Clock,
    signatures: Option<Arc<signature_memo::SignatureMemo>>,
) -> Result<Box<dyn MlsEngine>, EngineError> {
    Ok(match kind {
        EngineKind::OpenMls => Box::new(openmls_engine::OpenMlsEngine::open(
            path,
            credentials,
            clock,
            signatures,
        )?),
        EngineKind::MlsRs => mlsrs_engine::open(path, credentials, clock, signatures)?,
    })
}

/// A Commit created by this device, pending until the gateway sequences it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitOutput {
    /// The Commit, an MLSMessage (PublicMessage).
    pub commit: Vec<u8>,
    /// The Welcome for added members, an MLSMessage, when the Commit adds anyone.
    pub welcome: Option<Vec<u8>>,
    /// The GroupInfo of the epoch the Commit opens, with `external_pub` (an MLSMessage),
    /// for `Send.group_info` (SPEC.md 7.10).
    pub group_info: Option<Vec<u8>>,
}

/// Proposals beyond Add and Remove that the IETF interop scenarios exercise. Confab itself
/// does not use them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtraProposal {
    /// An external PSK, installed beforehand with [`MlsEngine::install_external_psk`].
    ExternalPsk(Vec<u8>),
    /// The resumption PSK of an earlier epoch of the same group.
    ResumptionPsk(u64),
    /// Replace the group context extensions with these `(type, data)` pairs.
    GroupContextExtensions(Vec<(u16, Vec<u8>)>),
}

/// Refuses, unread, anything but a PublicMessage proposal (for
/// [`MlsEngine::verify_proposal`]).
pub(crate) fn require_public_proposal(message: &[u8]) -> Result<(), EngineError> {
    use confab_spec::mls_framing::{ContentType, Peek, WireFormat, peek};
    match peek(message) {
        Ok(Peek::Framed(f))
            if f.wire_format == WireFormat::PublicMessage
                && f.content_type == ContentType::Proposal =>
        {
            Ok(())
        }
        _ => Err(EngineError::Malformed(
            "not a PublicMessage proposal".into(),
        )),
    }
}

/// What processing an incoming message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed {
    /// An application message.
    Application {
        /// The sending device.
        sender: DeviceId,
        /// The plaintext.
        plaintext: Vec<u8>,
    },
    /// A Commit by another member, merged: the group is now at `epoch`. `added` and
    /// `removed` compare the members before and after by device: a resync (an external
    /// Commit that replaces its sender's own leaf, SPEC.md 7.10) is in neither.
    Commit {
        /// The committer: the member at its sender leaf, or for an external Commit the
        /// device of its new leaf.
        sender: Option<DeviceId>,
        /// The new epoch.
        epoch: u64,
        /// Devices added.
        added: Vec<DeviceId>,
        /// Devices removed.
        removed: Vec<DeviceId>,
        /// Whether this device was removed (the group is no longer usable).
        self_removed: bool,
        /// Whether it is an external Commit (a resync).
        external: bool,
    },
    /// A proposal, stored for a later Commit.
    Proposal {
        /// The proposer, when it is a member.
        sender: Option<DeviceId>,
    },
}

/// Errors of the engine layer. The cases the protocol must tell apart are variants of
/// their own; engine-specific detail is kept as text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The message is for another epoch than the one the group can process it in.
    #[error("wrong epoch: {0}")]
    WrongEpoch(String),
    /// The message would reuse (or needs) a secret already consumed; a replay, or a sender
    /// that restored a stale snapshot.
    #[error("secret reused: {0}")]
    SecretReused(String),
    /// The sender is not a member of the group.
    #[error("unknown member: {0}")]
    UnknownMember(String),
    /// A member's credential is not a valid device certificate for its key.
    #[error("invalid member certificate: {0}")]
    InvalidCertificate(String),
    /// No such group in this engine's state.
    #[error("group not found")]
    GroupNotFound,
    /// The group has a pending Commit; merge or discard it first.
    #[error("a commit is pending")]
    PendingCommit,
    /// There is no pending Commit to merge or discard.
    #[error("no pending commit")]
    NoPendingCommit,
    /// The bytes are not a valid MLS message of the expected kind.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// This device is no longer a member of the group.
    #[error("removed from the group")]
    Removed,
    /// The engine does not implement this operation.
    #[error("unsupported by {0}")]
    Unsupported(&'static str),
    /// The message is this device's own; it is recognised by its msg_id, not processed.
    #[error("own message")]
    OwnMessage,
    /// The state store failed; nothing was changed.
    #[error("storage: {0}")]
    Storage(String),
    /// Any other engine failure; nothing was changed.
    #[error("{0}")]
    Other(String),
}

/// One MLS implementation holding the state of one device.
///
/// Every mutating method either returns `Ok` after its new state is durable, or returns
/// an error and leaves the durable state as it was.
pub trait MlsEngine: Send {
    /// Which implementation this is.
    fn kind(&self) -> EngineKind;

    /// The device this engine acts for.
    fn device(&self) -> DeviceId;

    /// Generates `count` KeyPackages (MLSMessage bytes). With `last_resort`, each carries
    /// the `last_resort` extension and may be used to join more than once.
    fn key_packages(
        &mut self,
        count: usize,
        last_resort: bool,
    ) -> Result<Vec<Vec<u8>>, EngineError>;

    /// Creates a group with `group` as group id and this device as its only member.
    /// Returns the new group's GroupInfo (an MLSMessage, with the ratchet tree in its
    /// extension), which `CreateConversation` hands to the gateway (SPEC.md 6.1).
    fn create_group(&mut self, group: &ConversationId) -> Result<Vec<u8>, EngineError> {
        self.create_group_with(group, &[])
    }

    /// [`MlsEngine::create_group`] with these group context extensions, as `(type, data)`
    /// pairs (a room's roles, SPEC.md 10.1).
    fn create_group_with(
        &mut self,
        group: &ConversationId,
        extensions: &[(u16, Vec<u8>)],
    ) -> Result<Vec<u8>, EngineError>;

    /// The data of the group context extension of type `extension_type`, if the group's
    /// current epoch has one.
    fn context_extension(
        &self,
        group: &ConversationId,
        extension_type: u16,
    ) -> Result<Option<Vec<u8>>, EngineError>;

    /// Creates a pending Commit adding the owners of `key_packages`, with its Welcome.
    fn add_members(
        &mut self,
        group: &ConversationId,
        key_packages: &[Vec<u8>],
    ) -> Result<CommitOutput, EngineError>;

    /// Creates a pending Commit removing `devices`.
    fn remove_members(
        &mut self,
        group: &ConversationId,
        devices: &[DeviceId],
    ) -> Result<CommitOutput, EngineError>;

    /// Creates a pending Commit that updates this device's leaf (post-compromise security).
    fn self_update(&mut self, group: &ConversationId) -> Result<CommitOutput, EngineError>;

    /// Creates a proposal to remove this device; another member commits it.
    fn leave(&mut self, group: &ConversationId) -> Result<Vec<u8>, EngineError>;

    /// Proposes adding the owner of `key_package` (a PublicMessage proposal). Confab's
    /// gateway refuses Commits that carry proposals by reference (SPEC.md REQ-7.3-3); the
    /// proposal operations exist for cross-checks against the IETF interop scenarios.
    fn propose_add(
        &mut self,
        group: &ConversationId,
        key_package: &[u8],
    ) -> Result<Vec<u8>, EngineError>;

    /// Proposes removing `device`.
    fn propose_remove(
        &mut self,
        group: &ConversationId,
        device: &DeviceId,
    ) -> Result<Vec<u8>, EngineError>;

    /// Proposes an update of this device's own leaf.
    fn propose_update(&mut self, group: &ConversationId) -> Result<Vec<u8>, EngineError>;

    /// Creates a pending Commit of every proposal received or sent in this epoch, plus
    /// `adds` and `removes` by value. `force_path` asks for an update path even when the
    /// proposals do not need one (mls-rs decides by itself and may omit it).
    fn commit(
        &mut self,
        group: &ConversationId,
        adds: &[Vec<u8>],
        removes: &[DeviceId],
        extra: &[ExtraProposal],
        force_path: bool,
    ) -> Result<CommitOutput, EngineError>;

    /// Stores an external PSK under `id`.
    fn install_external_psk(&mut self, id: &[u8], secret: &[u8]) -> Result<(), EngineError>;

    /// Proposes a PSK or a group context extensions change (a PublicMessage proposal).
    fn propose_extra(
        &mut self,
        group: &ConversationId,
        proposal: &ExtraProposal,
    ) -> Result<Vec<u8>, EngineError>;

    /// Rejoins `group` by a resync (SPEC.md 7.10): an external Commit from `group_info`
    /// (with `ratchet_tree` when the GroupInfo holds none) that removes the leaf holding
    /// this device's key. The new state replaces the old one at once (the old one is
    /// forked or lost: it can send nothing anyway); the caller sends nothing else into the
    /// group until the Commit is accepted. The output's `group_info` is the new epoch's.
    fn resync(
        &mut self,
        group: &ConversationId,
        group_info: &[u8],
        ratchet_tree: Option<&[u8]>,
    ) -> Result<CommitOutput, EngineError>;

    /// Exports a GroupInfo (MLSMessage) with the ratchet tree and `external_pub`, so that
    /// a device can join by external Commit. Interop scenarios only.
    fn group_info(&mut self, group: &ConversationId) -> Result<Vec<u8>, EngineError>;

    /// Joins by external Commit from `group_info`, removing the member at
    /// `remove_prior` (this device's earlier leaf) and mixing in the external PSKs
    /// `psks`. The Commit is merged at once; returns the group and the Commit for the
    /// members. Interop scenarios only.
    fn join_external(
        &mut self,
        group_info: &[u8],
        remove_prior: Option<u32>,
        psks: &[Vec<u8>],
    ) -> Result<(ConversationId, Vec<u8>), EngineError>;

    /// Creates a subgroup `new_group` of this group (RFC 9420 section 11.3) with the
    /// members owning `key_packages`; returns its Welcome. Interop scenarios only.
    fn branch(
        &mut self,
        group: &ConversationId,
        new_group: &ConversationId,
        key_packages: &[Vec<u8>],
    ) -> Result<Vec<u8>, EngineError>;

    /// Joins a subgroup of `group` from its Welcome.
    fn join_branch(
        &mut self,
        group: &ConversationId,
        welcome: &[u8],
    ) -> Result<ConversationId, EngineError>;

    /// Proposes re-initialising `group` as `new_group` with these group context extensions
    /// (RFC 9420 section 11.2). Interop scenarios only.
    fn propose_reinit(
        &mut self,
        group: &ConversationId,
        new_group: &ConversationId,
        extensions: &[(u16, Vec<u8>)],
    ) -> Result<Vec<u8>, EngineError>;

    /// After a ReInit Commit: a KeyPackage for the re-initialised group.
    fn reinit_key_package(&mut self, group: &ConversationId) -> Result<Vec<u8>, EngineError>;

    /// After a ReInit Commit: creates the re-initialised group with the members' new
    /// KeyPackages; returns its id and Welcome.
    fn reinit_commit(
        &mut self,
        group: &ConversationId,
        key_packages: &[Vec<u8>],
    ) -> Result<(ConversationId, Vec<u8>), EngineError>;

    /// After a ReInit Commit: joins the re-initialised group from its Welcome.
    fn reinit_join(
        &mut self,
        group: &ConversationId,
        welcome: &[u8],
    ) -> Result<ConversationId, EngineError>;

    /// Merges this device's pending Commit after the gateway echoed it (SPEC.md 7.4).
    fn merge_pending_commit(&mut self, group: &ConversationId) -> Result<(), EngineError>;

    /// Discards this device's pending Commit after the gateway rejected it.
    fn discard_pending_commit(&mut self, group: &ConversationId) -> Result<(), EngineError>;

    /// Whether a Commit of this device is pending in `group`.
    fn has_pending_commit(&self, group: &ConversationId) -> Result<bool, EngineError>;

    /// Joins a group from a Welcome; returns its id.
    fn join(&mut self, welcome: &[u8]) -> Result<ConversationId, EngineError>;

    /// Encrypts an application message (a PrivateMessage).
    fn encrypt(&mut self, group: &ConversationId, plaintext: &[u8])
    -> Result<Vec<u8>, EngineError>;

    /// Processes a message from another member: decrypts it, or merges its Commit, or
    /// stores its proposal.
    fn process(&mut self, group: &ConversationId, message: &[u8])
    -> Result<Processed, EngineError>;

    /// Verifies a standalone proposal of another member (a PublicMessage: its signature and
    /// membership tag in the group's current epoch, its sender a member) and returns its
    /// sender, without keeping the proposal: Confab's Commits carry every proposal by value
    /// (REQ-7.3-3), so none may wait in the group to be committed by reference. Anything
    /// but a PublicMessage proposal is refused unread ([`EngineError::Malformed`]), so no
    /// application message's secret is consumed here.
    fn verify_proposal(
        &mut self,
        group: &ConversationId,
        message: &[u8],
    ) -> Result<Option<DeviceId>, EngineError>;

    /// [`MlsEngine::process`] for the entry at `seq` of the group's stream, with the
    /// decryption journal ([`journal`]): an application message's outcome is durable no
    /// later than the state that consumed its secret, and processing the same `seq` again
    /// returns it instead of failing. Release it with [`MlsEngine::release_processed`] once
    /// the outcome is recorded elsewhere.
    fn process_entry(
        &mut self,
        group: &ConversationId,
        seq: u64,
        message: &[u8],
    ) -> Result<Processed, EngineError>;

    /// Forgets the journaled outcome of `seq` (nothing if there is none).
    fn release_processed(&mut self, group: &ConversationId, seq: u64) -> Result<(), EngineError>;

    /// Starts a receive batch: until [`MlsEngine::end_receive_batch`], the state that
    /// [`MlsEngine::process_entry`] advances for application messages may stay in memory,
    /// and is written once at the end (or later, within the state-write window:
    /// [`MlsEngine::set_state_write_window`]). Any other mutating operation ends the batch first,
    /// so nothing is sent from a state that is not durable. A crash inside a batch leaves
    /// the state from before it, which still holds the keys of the batch's messages:
    /// nothing is lost, and their outcomes are in the journal or with the caller. What a
    /// member of a large room pays per message is then one decryption instead of a write
    /// of the whole group (issue 9's room-soak). Starting an open batch does nothing.
    fn begin_receive_batch(&mut self) -> Result<(), EngineError>;

    /// Ends the receive batch: when this returns `Ok`, the outcomes the caller has not
    /// released are journaled, and the state it advanced is durable unless the state-write
    /// window ([`MlsEngine::set_state_write_window`]) lets it wait. Writes the state that
    /// is due even without a batch. A caller acknowledges the batch's entries only after
    /// this, and only those it recorded itself (REQ-6.5-3).
    fn end_receive_batch(&mut self) -> Result<(), EngineError>;

    /// Lets receive batches leave the state they advanced unwritten for up to `window`
    /// ([`unwritten`]); the default writes it at every batch's end.
    fn set_state_write_window(&mut self, window: unwritten::StateWriteWindow);

    /// Milliseconds until unwritten state is due (0: now), for a caller that wakes up to
    /// write it with [`MlsEngine::end_receive_batch`]; `None` if every state is written.
    fn unwritten_due_in(&self) -> Option<u64>;

    /// The group's current epoch.
    fn epoch(&self, group: &ConversationId) -> Result<u64, EngineError>;

    /// The epoch authenticator (RFC 9420 section 8.7); equal at every member.
    fn epoch_authenticator(&self, group: &ConversationId) -> Result<Vec<u8>, EngineError>;

    /// An exported secret (RFC 9420 section 8.5).
    fn export_secret(
        &self,
        group: &ConversationId,
        label: &str,
        context: &[u8],
        len: usize,
    ) -> Result<Vec<u8>, EngineError>;

    /// The members, as (leaf index, device), by leaf index.
    fn members(&self, group: &ConversationId) -> Result<Vec<(u32, DeviceId)>, EngineError>;
}

/// The credential identity of a device: its certificate in deterministic CBOR.
pub fn credential_identity(certificate: &DeviceCertificate) -> Vec<u8> {
    cbor::to_vec(certificate)
}

/// Checks a member's credential (SPEC.md 7.1, REQ-7.1-3): the identity is a device
/// certificate valid at `now` whose device key is the leaf's signature key. Returns the
/// device it names.
pub fn verify_member(
    identity: &[u8],
    signature_key: &[u8],
    now: UnixMs,
) -> Result<DeviceId, EngineError> {
    confab_spec::identity::verify_member_credential(
        identity,
        signature_key,
        now,
        confab_spec::limits::CLOCK_SKEW_MAX_MS_DEFAULT,
        |_| None,
    )
    .map_err(|e| EngineError::InvalidCertificate(e.to_string()))
}

/// The device named by a credential identity, without checking validity (for members
/// already admitted).
pub fn device_of(identity: &[u8]) -> Result<DeviceId, EngineError> {
    confab_spec::identity::certificate_of_credential(identity)
        .map(|c| c.device_id())
        .map_err(|e| EngineError::InvalidCertificate(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use confab_spec::identity::{DeviceKeyPair, SystemKeyPair};
    use confab_spec::ids::ProcessId;

    #[test]
    fn verify_member_checks_certificate_and_key() {
        let system = SystemKeyPair::from_seed(&[1; 32]);
        let key = DeviceKeyPair::from_seed(&[2; 32]);
        let cert = system.issue_certificate(
            ProcessId([3; 16]),
            key.public(),
            UnixMs(1_000),
            UnixMs(100_000),
        );
        let identity = credential_identity(&cert);
        let device = verify_member(&identity, key.public().as_bytes(), UnixMs(50_000));
        assert_eq!(device, Ok(cert.device_id()));
        let other = DeviceKeyPair::from_seed(&[4; 32]);
        assert!(matches!(
            verify_member(&identity, other.public().as_bytes(), UnixMs(50_000)),
            Err(EngineError::InvalidCertificate(_))
        ));
        assert!(matches!(
            verify_member(&identity, key.public().as_bytes(), UnixMs(200_000)),
            Err(EngineError::InvalidCertificate(_))
        ));
        assert!(matches!(
            verify_member(b"not cbor", key.public().as_bytes(), UnixMs(50_000)),
            Err(EngineError::InvalidCertificate(_))
        ));
    }
}
