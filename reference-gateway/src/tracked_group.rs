//! The gateway's copy of each conversation's public MLS state, and the verification of
//! every handshake message against it (SPEC.md 6.1 and 7.7).
//!
//! Why: a member with a raw socket could otherwise send a Commit that no honest client can
//! process (no signature, no path, a forged KeyPackage), the gateway would advance the
//! epoch, and the group would be dead for everyone. So the gateway observes each group the
//! way a passive member does, without any group secret: the creator hands over a GroupInfo
//! with the ratchet tree at creation ([`observe_new_group`]); every Commit is processed
//! against the tracked tree and group context before it is sequenced ([`verify_commit`]),
//! and its result becomes the new tracked state, stored atomically with the Commit's entry.
//! The roster and a room's roles are read from that state ([`TrackedGroup`]), so they
//! cannot drift from MLS.
//!
//! The observer is mls-rs's external client (`ExternalGroup`). What it checks and what it
//! cannot, by construction (it holds no membership key and no epoch secrets):
//! - checked: the signature of every PublicMessage proposal and Commit under its sender
//!   leaf's key, that the sender is a current member, every Add's KeyPackage (signature,
//!   lifetime, ciphersuite, capabilities, credential), the proposal list's validity rules,
//!   that a path is present where RFC 9420 requires one, the path's leaf node (signature,
//!   credential of the same device) and parent hashes, and that no signature or encryption
//!   key repeats in the tree;
//! - not checked: the membership tag, the confirmation tag and the path's HPKE
//!   ciphertexts. A Commit the gateway accepts can therefore still be refused by members:
//!   clients treat that as a fork, not a reason to stop.
//!
//! Confab's profile narrows RFC 9420 further: Commits carry only Add, Remove and
//! GroupContextExtensions proposals by value; standalone proposals are Removes (leave
//! requests); group context extensions are `required_capabilities` and `confab_room_roles`.
//! mls-rs's external client would accept PSK proposals with any key and ignore encrypted
//! handshakes, so both are refused here, before it is asked.
//!
//! Everything here is a pure function of its inputs (bytes, time, revocations): no store
//! and no socket, so tests and fuzzers drive it directly.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use mls_rs::error::{IntoAnyError, MlsError};
use mls_rs::extension::ExtensionType;
use mls_rs::extension::built_in::RequiredCapabilitiesExt;
use mls_rs::external_client::builder::{
    ExternalBaseConfig, WithCryptoProvider, WithIdentityProvider,
};
use mls_rs::external_client::{
    ExternalClient, ExternalGroup, ExternalReceivedMessage, ExternalSnapshot,
};
use mls_rs::group::proposal::Proposal;
use mls_rs::identity::{CredentialType, SigningIdentity};
use mls_rs::time::MlsTime;
use mls_rs::{
    CipherSuite, CryptoProvider, ExtensionList, IdentityProvider, MlsMessage, WireFormat,
};
use mls_rs_core::identity::MemberValidationContext;
use mls_rs_crypto_rustcrypto::RustCryptoProvider;

use confab_spec::error::ErrorCode;
use confab_spec::frame::ConversationKind;
use confab_spec::identity::{CredentialError, certificate_of_credential, verify_member_credential};
use confab_spec::ids::{ConversationId, DeviceId, Epoch, UnixMs};
use confab_spec::limits::CLOCK_SKEW_MAX_MS_DEFAULT;
use confab_spec::rooms::{
    REQUIRED_CAPABILITIES_EXTENSION_TYPE, ROLES_EXTENSION_TYPE, RolesError, RoomRoles,
};

/// A conversation's MLS group as the gateway tracks it, after its latest accepted Commit.
#[derive(Clone, PartialEq, Eq)]
pub struct TrackedGroup {
    /// The group's epoch.
    pub epoch: Epoch,
    /// mls-rs's `ExternalSnapshot` of the group (tree, context, transcript hash).
    pub snapshot: Vec<u8>,
    /// The members: (leaf index, device), by leaf index.
    pub members: Vec<(u32, DeviceId)>,
    /// The group context extensions, as `(type, data)` pairs.
    pub extensions: Vec<(u16, Vec<u8>)>,
    /// The GroupInfo of this epoch that came with the creation or the Commit, verified
    /// (SPEC.md 7.10); `None` when the Commit carried none.
    pub group_info: Option<Vec<u8>>,
}

impl std::fmt::Debug for TrackedGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackedGroup")
            .field("epoch", &self.epoch)
            .field("snapshot_bytes", &self.snapshot.len())
            .field("members", &self.members.len())
            .field("group_info", &self.group_info.as_ref().map(Vec::len))
            .finish()
    }
}

impl TrackedGroup {
    /// The roles of a room as its group context states them (`None`: no roles extension).
    pub fn roles(&self) -> Option<Result<RoomRoles, RolesError>> {
        self.extension(ROLES_EXTENSION_TYPE)
            .map(RoomRoles::from_extension)
    }

    /// Whether the group context requires the `confab_room_roles` capability of every
    /// member (SPEC.md 10.1).
    pub fn requires_roles_capability(&self) -> bool {
        self.extension(REQUIRED_CAPABILITIES_EXTENSION_TYPE)
            .and_then(|data| {
                let list: ExtensionList = [mls_rs::Extension::new(
                    ExtensionType::REQUIRED_CAPABILITIES,
                    data.to_vec(),
                )]
                .into_iter()
                .collect();
                list.get_as::<RequiredCapabilitiesExt>().ok().flatten()
            })
            .is_some_and(|r| {
                r.extensions
                    .contains(&ExtensionType::new(ROLES_EXTENSION_TYPE))
            })
    }

    fn extension(&self, extension_type: u16) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|(t, _)| *t == extension_type)
            .map(|(_, d)| d.as_slice())
    }
}

/// Why a GroupInfo or handshake message was refused: the error code and a short detail
/// naming the check (never key material or payload bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The code to answer.
    pub code: ErrorCode,
    /// What failed.
    pub detail: String,
}

impl Refusal {
    fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        let mut detail = detail.into();
        // `Error.detail` is short (SPEC.md 5.9); an engine's message can be long.
        if detail.len() > DETAIL_BYTES_MAX {
            let mut end = DETAIL_BYTES_MAX;
            while !detail.is_char_boundary(end) {
                end -= 1;
            }
            detail.truncate(end);
        }
        Self { code, detail }
    }
}

/// The longest `detail` a refusal carries.
const DETAIL_BYTES_MAX: usize = 160;

/// Known revocations of the devices a message names: device → effective time. The caller
/// looks them up; a device missing from the map is taken as not revoked.
pub type Revocations = BTreeMap<DeviceId, UnixMs>;

/// What a verified standalone proposal is (SPEC.md 10.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiedProposal {
    /// The leaf the Remove proposal removes.
    pub removes: u32,
}

/// Who changed in a Commit: compares the roster before and after it, by device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MembershipChange {
    /// Devices that left (leaf, device), in leaf order.
    pub removed: Vec<(u32, DeviceId)>,
    /// Devices that joined (leaf, device), in leaf order.
    pub added: Vec<(u32, DeviceId)>,
    /// Devices that stayed on another leaf (old leaf, new leaf, device): a resync
    /// (SPEC.md 7.10) moves a device without removing or adding it.
    pub moved: Vec<(u32, u32, DeviceId)>,
}

/// Compares two rosters (each by leaf index): a device is removed or added when it is in
/// one and not the other, whatever its leaf.
pub fn membership_change(
    before: &[(u32, DeviceId)],
    after: &[(u32, DeviceId)],
) -> MembershipChange {
    let old: BTreeMap<DeviceId, u32> = before.iter().map(|(l, d)| (*d, *l)).collect();
    let new: BTreeMap<DeviceId, u32> = after.iter().map(|(l, d)| (*d, *l)).collect();
    let mut change = MembershipChange {
        removed: before
            .iter()
            .filter(|(_, d)| !new.contains_key(d))
            .copied()
            .collect(),
        added: after
            .iter()
            .filter(|(_, d)| !old.contains_key(d))
            .copied()
            .collect(),
        moved: old
            .iter()
            .filter_map(|(d, from)| {
                new.get(d)
                    .filter(|to| *to != from)
                    .map(|to| (*from, *to, *d))
            })
            .collect(),
    };
    change.removed.sort_by_key(|(l, _)| *l);
    change.added.sort_by_key(|(l, _)| *l);
    change
}

/// Starts tracking a new conversation from the GroupInfo its creator supplies
/// (`CreateConversation.group_info`, SPEC.md 6.1, REQ-6.1-3): an MLSMessage carrying a
/// GroupInfo, signed by its only member, `creator`, at leaf 0, epoch 0, ciphersuite 0x0001,
/// the conversation id as group id, with the ratchet tree in its extension, Confab's group
/// context extensions only, and for a room the roles naming the creator's user as owner
/// with no admins and `required_capabilities` listing the roles extension.
pub fn observe_new_group(
    group_info: &[u8],
    conversation: &ConversationId,
    kind: ConversationKind,
    creator: &DeviceId,
    now: UnixMs,
    revocations: &Revocations,
) -> Result<TrackedGroup, Refusal> {
    let refuse = |detail: &str| Refusal::new(ErrorCode::MlsGroupInfoInvalid, detail);
    let message = parse_whole(group_info).map_err(|d| refuse(&d))?;
    if message.wire_format() != WireFormat::GroupInfo {
        return Err(refuse("not an MLSMessage carrying a GroupInfo"));
    }
    if message.cipher_suite() != Some(CIPHER_SUITE) {
        return Err(refuse("ciphersuite is not 0x0001"));
    }
    let observer = observer(now, revocations);
    let group = observer
        .observe_group(message, None, Some(mls_time(now)))
        .map_err(|e| refuse(&format!("does not verify: {e}")))?;
    let mut tracked = tracked(&group)?;
    tracked.group_info = Some(group_info.to_vec());
    let context = group.group_context();
    if context.group_id.as_slice() != conversation.0.as_slice() {
        return Err(refuse("group id is not the conversation id"));
    }
    if tracked.epoch != Epoch(0) {
        return Err(refuse("epoch is not 0"));
    }
    if tracked.members != [(0, *creator)] {
        return Err(refuse(
            "the group's only member is not the creating device at leaf 0",
        ));
    }
    check_context_extensions(&tracked.extensions).map_err(|d| refuse(&d))?;
    if kind == ConversationKind::Room {
        match tracked.roles() {
            Some(Ok(roles)) if roles == RoomRoles::new(creator.system) => {}
            Some(Ok(_)) => {
                return Err(refuse(
                    "the roles do not name the creator's user as owner with no admins",
                ));
            }
            Some(Err(e)) => return Err(refuse(&format!("room roles: {e}"))),
            None => return Err(refuse("a room's group context has no roles extension")),
        }
        if !tracked.requires_roles_capability() {
            return Err(refuse(
                "a room's required_capabilities do not list the roles extension",
            ));
        }
    }
    Ok(tracked)
}

/// A Commit to verify with [`verify_commit`]: the `Send`'s payload, Welcome and GroupInfo.
#[derive(Debug, Clone, Copy)]
pub struct CommitInput<'a> {
    /// The Commit, an MLSMessage.
    pub commit: &'a [u8],
    /// `Send.welcome`.
    pub welcome: Option<&'a [u8]>,
    /// `Send.group_info` (SPEC.md 7.10), which every Commit must carry.
    pub group_info: Option<&'a [u8]>,
    /// Whether to check it (off only under the `no_group_info_check` fault: whatever
    /// came, or nothing, is kept unchecked).
    pub check_group_info: bool,
    /// For an external Commit: the sending device and the leaf the gateway maps to it,
    /// which a resync must remove (SPEC.md 7.10).
    pub resync: Option<(DeviceId, u32)>,
}

/// Verifies a PublicMessage Commit (already known to be for the tracked epoch, sent by the
/// member at its sender leaf, or an external Commit of a member device) against the
/// tracked state in `snapshot`, its Welcome and its GroupInfo (SPEC.md 7.5, 7.7, 7.10).
/// Returns the group after the Commit.
pub fn verify_commit(
    snapshot: &[u8],
    input: &CommitInput<'_>,
    now: UnixMs,
    revocations: &Revocations,
) -> Result<TrackedGroup, Refusal> {
    let message =
        parse_whole(input.commit).map_err(|d| Refusal::new(ErrorCode::MlsMalformed, d))?;
    let invalid = |detail: String| Refusal::new(ErrorCode::MlsHandshakeInvalid, detail);
    let observer = observer(now, revocations);
    if let Some((_, leaf)) = input.resync {
        check_resync_proposals(&message, leaf).map_err(|d| invalid(d.into()))?;
    }
    let mut added = Vec::new();
    for proposal in message.proposals_by_value() {
        match proposal {
            Proposal::Add(add) => added.push(add.key_package().clone()),
            Proposal::Remove(_) => {}
            Proposal::ExternalInit(_) if input.resync.is_some() => {}
            Proposal::GroupContextExtensions(extensions) => {
                let pairs = extension_pairs(extensions);
                check_context_extensions(&pairs).map_err(invalid)?;
            }
            other => {
                return Err(invalid(format!(
                    "a {:?} proposal is outside Confab's profile (Add, Remove and \
                     GroupContextExtensions only)",
                    other.proposal_type()
                )));
            }
        }
    }
    // Each Add's KeyPackage on its own first, so that a bad one is named as such.
    for (i, key_package) in added.iter().enumerate() {
        let message = key_package_message(key_package)
            .map_err(|d| Refusal::new(ErrorCode::MlsKeyPackageInvalid, format!("add {i}: {d}")))?;
        observer
            .validate_key_package(message, Some(mls_time(now)))
            .map_err(|e| {
                Refusal::new(
                    ErrorCode::MlsKeyPackageInvalid,
                    format!("add {i}: {}", describe(&e)),
                )
            })?;
    }
    if let Some(welcome) = input.welcome.filter(|_| !added.is_empty()) {
        check_welcome(welcome, &added)?;
    }
    let mut group = load(&observer, snapshot)?;
    let outcome = group
        .process_incoming_message_with_time(message, mls_time(now))
        .map_err(|e| match e {
            MlsError::InvalidSignature => Refusal::new(
                ErrorCode::MlsSignatureInvalid,
                "the signature does not verify under the sender leaf's key",
            ),
            other => invalid(describe(&other)),
        })?;
    let ExternalReceivedMessage::Commit(description) = outcome else {
        return Err(invalid("not a Commit".into()));
    };
    let mut next = tracked(&group)?;
    if let Some((device, _)) = input.resync {
        // The path's leaf is the sending device's, and the device holds one leaf only.
        let holds: Vec<u32> = next
            .members
            .iter()
            .filter(|(_, d)| *d == device)
            .map(|(l, _)| *l)
            .collect();
        if holds != [description.committer] {
            return Err(invalid(
                "a resync's new leaf must hold the sending device's certificate".into(),
            ));
        }
    }
    if input.check_group_info {
        let Some(info) = input.group_info else {
            return Err(Refusal::new(
                ErrorCode::MlsGroupInfoInvalid,
                "a Commit must carry the GroupInfo of the epoch it opens (Send.group_info)",
            ));
        };
        let after = (&group, next.snapshot.as_slice());
        check_group_info(&observer, after, description.committer, info, now)?;
    }
    next.group_info = input.group_info.map(<[u8]>::to_vec);
    Ok(next)
}

/// A resync carries one ExternalInit and one Remove of the sending device's own leaf, and
/// nothing else (SPEC.md 7.10, REQ-7.10-5).
fn check_resync_proposals(message: &MlsMessage, own_leaf: u32) -> Result<(), &'static str> {
    let mut inits = 0;
    let mut removes = Vec::new();
    for proposal in message.proposals_by_value() {
        match proposal {
            Proposal::ExternalInit(_) => inits += 1,
            Proposal::Remove(r) => removes.push(r.to_remove()),
            _ => return Err("an external Commit carries only ExternalInit and one Remove"),
        }
    }
    if inits != 1 {
        return Err("an external Commit carries exactly one ExternalInit");
    }
    if removes != [own_leaf] {
        return Err("an external Commit must remove the sending device's own leaf, and no other");
    }
    Ok(())
}

/// The GroupInfo a Commit publishes is the one of the epoch it opens (SPEC.md 7.10,
/// REQ-7.10-2): one MLSMessage carrying a GroupInfo with `external_pub`, signed by the
/// committer's leaf, whose verified state (group context, tree, interim transcript hash,
/// so the confirmation tag too) is `after`'s.
fn check_group_info(
    observer: &ExternalClient<ObserverConfig>,
    (after, after_state): (&ExternalGroup<ObserverConfig>, &[u8]),
    committer: u32,
    bytes: &[u8],
    now: UnixMs,
) -> Result<(), Refusal> {
    let refuse = |detail: &str| Refusal::new(ErrorCode::MlsGroupInfoInvalid, detail);
    let message = parse_whole(bytes).map_err(|d| refuse(&d))?;
    let Some(info) = message.as_group_info() else {
        return Err(refuse("not an MLSMessage carrying a GroupInfo"));
    };
    if info.sender() != committer {
        return Err(refuse(
            "the GroupInfo is not signed by the committer's leaf",
        ));
    }
    if !info.extensions().has_extension(ExtensionType::EXTERNAL_PUB) {
        return Err(refuse("the GroupInfo has no external_pub extension"));
    }
    let observed = observer
        .observe_group(message, Some(after.exported_tree()), Some(mls_time(now)))
        .map_err(|e| refuse(&format!("does not verify: {}", describe(&e))))?;
    if observed.group_context() != after.group_context() {
        return Err(refuse(
            "the GroupInfo's group context is not the one the Commit leads to",
        ));
    }
    // `after_state` is the snapshot the Commit leads to, encoded once already.
    if observed.snapshot().to_bytes().ok().as_deref() != Some(after_state) {
        return Err(refuse(
            "the GroupInfo's confirmation tag is not the Commit's",
        ));
    }
    Ok(())
}

/// The ratchet tree to serve with a kept GroupInfo (SPEC.md 7.10): the tracked state's,
/// unless the GroupInfo carries one in its `ratchet_tree` extension.
pub fn tree_to_serve(snapshot: &[u8], group_info: &[u8]) -> Result<Option<Vec<u8>>, Refusal> {
    let internal = |what: &str| Refusal::new(ErrorCode::InternalError, what);
    let has_tree = MlsMessage::from_bytes(group_info)
        .ok()
        .and_then(|m| {
            m.as_group_info()
                .map(|i| i.extensions().has_extension(ExtensionType::RATCHET_TREE))
        })
        .unwrap_or(false);
    if has_tree {
        return Ok(None);
    }
    let observer = observer(UnixMs(0), &Revocations::new());
    let group = load(&observer, snapshot)?;
    group
        .export_tree()
        .map(Some)
        .map_err(|_| internal("the tracked tree does not encode"))
}

/// Verifies a standalone PublicMessage proposal against the tracked state: its signature
/// under the sender leaf's key, and that it is a Remove (SPEC.md 7.7, 10.3). The tracked
/// state does not change.
pub fn verify_proposal(
    snapshot: &[u8],
    proposal: &[u8],
    now: UnixMs,
    revocations: &Revocations,
) -> Result<VerifiedProposal, Refusal> {
    let message = parse_whole(proposal).map_err(|d| Refusal::new(ErrorCode::MlsMalformed, d))?;
    let invalid = |detail: String| Refusal::new(ErrorCode::MlsHandshakeInvalid, detail);
    let observer = observer(now, revocations);
    let mut group = load(&observer, snapshot)?;
    let outcome = group
        .process_incoming_message_with_time(message, mls_time(now))
        .map_err(|e| match e {
            MlsError::InvalidSignature => Refusal::new(
                ErrorCode::MlsSignatureInvalid,
                "the signature does not verify under the sender leaf's key",
            ),
            other => invalid(describe(&other)),
        })?;
    let ExternalReceivedMessage::Proposal(description) = outcome else {
        return Err(invalid("not a proposal".into()));
    };
    match description.proposal {
        Proposal::Remove(remove) => Ok(VerifiedProposal {
            removes: remove.to_remove(),
        }),
        other => Err(invalid(format!(
            "a standalone {:?} proposal is outside Confab's profile (leave requests only)",
            other.proposal_type()
        ))),
    }
}

/// The ciphersuite of Confab's profile (SPEC.md 7.1).
const CIPHER_SUITE: CipherSuite = CipherSuite::CURVE25519_AES128;

/// Parses an MLSMessage that must be exactly `bytes` long.
fn parse_whole(bytes: &[u8]) -> Result<MlsMessage, String> {
    let message =
        MlsMessage::from_bytes(bytes).map_err(|e| format!("does not parse: {}", describe(&e)))?;
    // mls-rs stops reading at the end of the message; anything after it is refused too.
    let encoded = message
        .to_bytes()
        .map_err(|e| format!("does not encode: {}", describe(&e)))?;
    if encoded.len() != bytes.len() {
        return Err("trailing bytes after the MLSMessage".into());
    }
    Ok(message)
}

/// Wraps a KeyPackage in an MLSMessage (RFC 9420 section 6), as the directory holds them.
fn key_package_message(key_package: &mls_rs::KeyPackage) -> Result<MlsMessage, String> {
    use mls_rs::mls_rs_codec::MlsEncode as _;
    let mut bytes = vec![0x00, 0x01, 0x00, 0x05];
    key_package
        .mls_encode(&mut bytes)
        .map_err(|e| format!("does not encode: {e}"))?;
    MlsMessage::from_bytes(&bytes).map_err(|e| format!("does not parse: {}", describe(&e)))
}

/// A Welcome for exactly the KeyPackages a Commit adds, in Confab's ciphersuite.
fn check_welcome(welcome: &[u8], added: &[mls_rs::KeyPackage]) -> Result<(), Refusal> {
    let refuse = |detail: &str| Refusal::new(ErrorCode::MlsWelcomeInvalid, detail);
    let message = parse_whole(welcome).map_err(|d| refuse(&d))?;
    if message.wire_format() != WireFormat::Welcome {
        return Err(refuse("not an MLSMessage carrying a Welcome"));
    }
    if message.cipher_suite() != Some(CIPHER_SUITE) {
        return Err(refuse("ciphersuite is not 0x0001"));
    }
    let provider = RustCryptoProvider::default()
        .cipher_suite_provider(CIPHER_SUITE)
        .ok_or_else(|| refuse("ciphersuite 0x0001 is unavailable"))?;
    let mut expected = BTreeSet::new();
    for key_package in added {
        let reference: mls_rs::KeyPackageRef = key_package
            .to_reference(&provider)
            .map_err(|_| refuse("a KeyPackage reference cannot be computed"))?;
        expected.insert(reference.to_vec());
    }
    let named: BTreeSet<Vec<u8>> = message
        .welcome_key_package_references()
        .into_iter()
        .map(|r| r.to_vec())
        .collect();
    if named != expected {
        return Err(refuse(
            "the Welcome's recipients are not the KeyPackages the Commit adds",
        ));
    }
    Ok(())
}

/// The group context extensions Confab allows (SPEC.md 7.1, 10.1).
fn check_context_extensions(extensions: &[(u16, Vec<u8>)]) -> Result<(), String> {
    match extensions
        .iter()
        .find(|(t, _)| *t != REQUIRED_CAPABILITIES_EXTENSION_TYPE && *t != ROLES_EXTENSION_TYPE)
    {
        Some((t, _)) => Err(format!(
            "group context extension {t:#06x} is outside Confab's profile"
        )),
        None => Ok(()),
    }
}

fn extension_pairs(list: &ExtensionList) -> Vec<(u16, Vec<u8>)> {
    list.iter()
        .map(|e| (e.extension_type.raw_value(), e.extension_data.clone()))
        .collect()
}

fn mls_time(now: UnixMs) -> MlsTime {
    MlsTime::from_duration_since_epoch(Duration::from_millis(now.0))
}

/// The external client's configuration (mls-rs keeps its config trait private, so the
/// concrete type is named through its builder's aliases).
type ObserverConfig = WithCryptoProvider<
    RustCryptoProvider,
    WithIdentityProvider<CertificateCheck, ExternalBaseConfig>,
>;

/// An external client that checks credentials as Confab members do, at `now`.
fn observer(now: UnixMs, revocations: &Revocations) -> ExternalClient<ObserverConfig> {
    ExternalClient::builder()
        .crypto_provider(RustCryptoProvider::default())
        .identity_provider(CertificateCheck {
            now,
            revocations: Arc::new(revocations.clone()),
        })
        .extension_type(ExtensionType::new(ROLES_EXTENSION_TYPE))
        // A Commit's proposals are all by value (REQ-7.3-3); nothing is kept between
        // messages.
        .cache_proposals(false)
        .build()
}

fn load(
    observer: &ExternalClient<ObserverConfig>,
    snapshot: &[u8],
) -> Result<ExternalGroup<ObserverConfig>, Refusal> {
    let internal = |what: &str| Refusal::new(ErrorCode::InternalError, what);
    let snapshot = ExternalSnapshot::from_bytes(snapshot)
        .map_err(|_| internal("the tracked group state does not decode"))?;
    observer
        .load_group(snapshot)
        .map_err(|_| internal("the tracked group state does not load"))
}

/// Reads what the gateway keeps of an observed group.
fn tracked(group: &ExternalGroup<ObserverConfig>) -> Result<TrackedGroup, Refusal> {
    let internal = |what: String| Refusal::new(ErrorCode::InternalError, what);
    let mut members = Vec::new();
    for member in group.roster().members() {
        let device = basic_identity(&member.signing_identity)
            .and_then(certificate_of_credential)
            .map_err(|e| internal(format!("leaf {}: {e}", member.index)))?
            .device_id();
        members.push((member.index, device));
    }
    members.sort_by_key(|(leaf, _)| *leaf);
    let snapshot = group
        .snapshot()
        .to_bytes()
        .map_err(|e| internal(format!("the group state does not encode: {}", describe(&e))))?;
    let context = group.group_context();
    Ok(TrackedGroup {
        epoch: Epoch(context.epoch),
        snapshot,
        members,
        extensions: extension_pairs(&context.extensions),
        group_info: None,
    })
}

fn basic_identity(identity: &SigningIdentity) -> Result<&[u8], CredentialError> {
    identity
        .credential
        .as_basic()
        .map(|b| b.identifier.as_slice())
        .ok_or(CredentialError::NotACertificate)
}

/// A short description of an mls-rs error, without any bytes it may carry.
fn describe(e: &MlsError) -> String {
    let text = e.to_string();
    if text.len() <= DETAIL_BYTES_MAX {
        text
    } else {
        format!("{e:?}").chars().take(DETAIL_BYTES_MAX).collect()
    }
}

/// Validates member credentials as Confab clients do (SPEC.md 7.1): a basic credential
/// holding a device certificate valid at the message's time, not revoked, whose device key
/// is the leaf's signature key; a leaf keeps its device across updates.
#[derive(Clone)]
struct CertificateCheck {
    now: UnixMs,
    revocations: Arc<Revocations>,
}

/// A member credential failed validation.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct CertificateRefused(String);

impl IntoAnyError for CertificateRefused {}

impl IdentityProvider for CertificateCheck {
    type Error = CertificateRefused;

    fn validate_member(
        &self,
        signing_identity: &SigningIdentity,
        timestamp: Option<MlsTime>,
        _context: MemberValidationContext<'_>,
    ) -> Result<(), Self::Error> {
        // mls-rs's time has whole seconds; the gateway's own clock is finer.
        let now = timestamp.map_or(self.now, |t| {
            UnixMs(t.seconds_since_epoch().saturating_mul(1_000)).max(self.now)
        });
        let identity =
            basic_identity(signing_identity).map_err(|e| CertificateRefused(e.to_string()))?;
        verify_member_credential(
            identity,
            signing_identity.signature_key.as_bytes(),
            now,
            CLOCK_SKEW_MAX_MS_DEFAULT,
            |device| self.revocations.get(device).copied(),
        )
        .map(|_| ())
        .map_err(|e| CertificateRefused(e.to_string()))
    }

    fn validate_external_sender(
        &self,
        _signing_identity: &SigningIdentity,
        _timestamp: Option<MlsTime>,
        _extensions: Option<&ExtensionList>,
    ) -> Result<(), Self::Error> {
        Err(CertificateRefused(
            "Confab groups have no external senders".into(),
        ))
    }

    fn identity(
        &self,
        signing_identity: &SigningIdentity,
        _extensions: &ExtensionList,
    ) -> Result<Vec<u8>, Self::Error> {
        basic_identity(signing_identity)
            .and_then(certificate_of_credential)
            .map(|c| c.device_id().to_bytes().to_vec())
            .map_err(|e| CertificateRefused(e.to_string()))
    }

    fn valid_successor(
        &self,
        predecessor: &SigningIdentity,
        successor: &SigningIdentity,
        extensions: &ExtensionList,
    ) -> Result<bool, Self::Error> {
        Ok(self.identity(predecessor, extensions)? == self.identity(successor, extensions)?)
    }

    fn supported_types(&self) -> Vec<CredentialType> {
        vec![CredentialType::BASIC]
    }
}
