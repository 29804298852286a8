//! [`MlsEngine`] on openmls 0.9 with its SQLite storage provider.
//!
//! openmls writes through its `StorageProvider` during every operation. This engine wraps
//! each operation in one SQLite transaction on the same connection (`BEGIN IMMEDIATE` …
//! `COMMIT`), so an operation's writes land together or not at all; on failure it rolls
//! back and drops the cached group, which is reloaded from disk on next use.
//!
//! A receive batch ([`MlsEngine::begin_receive_batch`]) is one transaction around many
//! [`MlsEngine::process_entry`] calls, each in a savepoint of its own; any other operation
//! ends it first. Inside it, application messages are processed without openmls' write of
//! the group's message secrets after each ([`super::openmls_deferred`]); the batch's end
//! writes them once per group it advanced (or, with a state-write window, once per group
//! that is due: [`super::unwritten`]), then commits.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use ed25519_dalek::Signer as _;
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls::schedule::psk::{ExternalPsk, PreSharedKeyId, Psk, ResumptionPsk, ResumptionPskUsage};
use openmls_rust_crypto::RustCrypto;
use openmls_sqlite_storage::{Codec, Connection, SqliteStorageProvider};
use openmls_traits::signatures::{Signer, SignerError};

use super::openmls_deferred::{DeferringStorage, MESSAGE_SECRETS_TABLE};
use super::openmls_memo_crypto::MemoCrypto;
use super::signature_memo::SignatureMemo;
use super::unwritten::{StateWriteWindow, UnwrittenGroups};
use super::{
    Clock, CommitOutput, EngineError, EngineKind, ExtraProposal, MlsEngine, Processed,
    credential_identity, device_of, journal, verify_member,
};
use confab_spec::ids::{ConversationId, DeviceId};
use confab_spec::session::DeviceCredentials;

const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
/// Past epochs whose application messages can still be decrypted: `app_epoch_lag_max`,
/// what SPEC.md REQ-7.2-4 asks (the gateway accepts nothing older, REQ-7.2-3). openmls
/// writes the member list of each past epoch with every write of the message secrets, so
/// each one more costs a room's size per write.
const MAX_PAST_EPOCHS: usize = confab_spec::limits::APP_EPOCH_LAG_MAX as usize;

/// openmls 0.9 has no public API for subgroup branching or ReInit.
const NO_RESUMPTION: &str = "openmls 0.9 (no public branch or ReInit API)";

/// The openmls engine of one device.
pub struct OpenMlsEngine {
    conn: Connection,
    crypto: MemoCrypto,
    signer: DeviceSigner,
    credential: CredentialWithKey,
    device: DeviceId,
    clock: Clock,
    groups: HashMap<ConversationId, MlsGroup>,
    /// Whether a receive batch's transaction is open.
    batch: bool,
    /// The groups whose message secrets receive batches advanced and did not write yet.
    unwritten: UnwrittenGroups,
    /// The decryption journal's outcomes in memory and the keys of those in the table.
    journal: journal::Journal,
}

/// The serde codec openmls' SQLite provider stores values with.
#[derive(Default)]
pub struct JsonCodec;

impl Codec for JsonCodec {
    type Error = serde_json::Error;

    fn to_vec<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Self::Error> {
        serde_json::to_vec(value)
    }

    fn from_slice<T: serde::de::DeserializeOwned>(slice: &[u8]) -> Result<T, Self::Error> {
        serde_json::from_slice(slice)
    }
}

/// The engine's storage: openmls' SQLite provider on `conn`, with the message secrets in
/// postcard on the same connection, their writes skipped while `defer_message_secrets`.
type Storage<'a> = DeferringStorage<'a, SqliteStorageProvider<JsonCodec, &'a Connection>>;

fn storage_on(conn: &Connection, defer_message_secrets: bool) -> Storage<'_> {
    DeferringStorage {
        inner: SqliteStorageProvider::new(conn),
        conn,
        defer_message_secrets,
    }
}

struct Provider<'a> {
    crypto: &'a MemoCrypto,
    storage: Storage<'a>,
}

impl<'a> OpenMlsProvider for Provider<'a> {
    type CryptoProvider = MemoCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = Storage<'a>;

    fn storage(&self) -> &Self::StorageProvider {
        &self.storage
    }

    fn crypto(&self) -> &Self::CryptoProvider {
        self.crypto
    }

    fn rand(&self) -> &Self::RandProvider {
        &self.crypto.inner
    }
}

/// The device key as openmls' signer.
struct DeviceSigner(ed25519_dalek::SigningKey);

impl Signer for DeviceSigner {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
        Ok(self.0.sign(payload).to_bytes().to_vec())
    }

    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

impl OpenMlsEngine {
    /// Opens or creates the state at `path` for the device in `credentials`.
    pub fn open(
        path: &Path,
        credentials: DeviceCredentials,
        clock: Clock,
        signatures: Option<Arc<SignatureMemo>>,
    ) -> Result<Self, EngineError> {
        let mut conn = Connection::open(path).map_err(storage)?;
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;")
            .map_err(storage)?;
        SqliteStorageProvider::<JsonCodec, &mut Connection>::new(&mut conn)
            .run_migrations()
            .map_err(|e| EngineError::Storage(e.to_string()))?;
        let journal = journal::Journal::open(&conn)?;
        conn.execute_batch(MESSAGE_SECRETS_TABLE).map_err(storage)?;
        let certificate = credentials.certificate;
        let signing_key = ed25519_dalek::SigningKey::from_bytes(&credentials.key.seed());
        let credential = CredentialWithKey {
            credential: BasicCredential::new(credential_identity(&certificate)).into(),
            signature_key: certificate.device_key.as_bytes().to_vec().into(),
        };
        Ok(Self {
            conn,
            crypto: MemoCrypto {
                inner: RustCrypto::default(),
                memo: signatures,
            },
            signer: DeviceSigner(signing_key),
            credential,
            device: certificate.device_id(),
            clock,
            groups: HashMap::new(),
            batch: false,
            unwritten: UnwrittenGroups::default(),
            journal,
        })
    }
}

fn storage(e: impl std::fmt::Display) -> EngineError {
    EngineError::Storage(e.to_string())
}

/// Everything an operation needs, borrowed for the length of one transaction.
struct Ctx<'a> {
    conn: &'a Connection,
    provider: &'a Provider<'a>,
    signer: &'a DeviceSigner,
    credential: &'a CredentialWithKey,
    groups: &'a mut HashMap<ConversationId, MlsGroup>,
    now: confab_spec::ids::UnixMs,
}

impl Ctx<'_> {
    /// Caches a group this device just joined; returns its id.
    fn adopt(&mut self, group: MlsGroup) -> Result<ConversationId, EngineError> {
        let id = ConversationId::from_slice(group.group_id().as_slice())
            .map_err(|_| EngineError::Malformed("group id is not a conversation id".into()))?;
        self.groups.insert(id, group);
        Ok(id)
    }

    /// The group, which must have no pending Commit (SPEC.md 7.4: nothing new is sent
    /// while a Commit of this device awaits its echo).
    fn group_without_pending_commit(
        &mut self,
        id: &ConversationId,
    ) -> Result<&mut MlsGroup, EngineError> {
        let g = self.group(id)?;
        if !g.is_active() {
            return Err(EngineError::Removed);
        }
        if g.pending_commit().is_some() {
            return Err(EngineError::PendingCommit);
        }
        Ok(g)
    }

    fn group(&mut self, id: &ConversationId) -> Result<&mut MlsGroup, EngineError> {
        if !self.groups.contains_key(id) {
            let group = MlsGroup::load(self.provider.storage(), &GroupId::from_slice(&id.0))
                .map_err(storage)?
                .ok_or(EngineError::GroupNotFound)?;
            self.groups.insert(*id, group);
        }
        self.groups.get_mut(id).ok_or(EngineError::GroupNotFound)
    }
}

/// The capabilities of every leaf: the `confab_room_roles` extension (SPEC.md REQ-10-1)
/// and, for a last-resort KeyPackage, the `last_resort` extension it carries.
fn capabilities(last_resort: bool) -> Capabilities {
    let roles = ExtensionType::Unknown(confab_spec::rooms::ROLES_EXTENSION_TYPE);
    let extensions: &[ExtensionType] = if last_resort {
        &[ExtensionType::LastResort, roles]
    } else {
        &[roles]
    };
    Capabilities::new(None, None, Some(extensions), None, None)
}

fn create_config(extensions: Extensions<GroupContext>) -> MlsGroupCreateConfig {
    MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .capabilities(capabilities(false))
        .with_group_context_extensions(extensions)
        .use_ratchet_tree_extension(true)
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .number_of_resumption_psks(MAX_PAST_EPOCHS)
        .build()
}

fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .use_ratchet_tree_extension(true)
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .number_of_resumption_psks(MAX_PAST_EPOCHS)
        .build()
}

fn serialize(message: &MlsMessageOut) -> Result<Vec<u8>, EngineError> {
    message
        .tls_serialize_detached()
        .map_err(|e| EngineError::Other(format!("serialize: {e}")))
}

fn parse(bytes: &[u8]) -> Result<MlsMessageIn, EngineError> {
    MlsMessageIn::tls_deserialize_exact(bytes).map_err(|e| EngineError::Malformed(e.to_string()))
}

fn identity_of(credential: &Credential) -> Result<Vec<u8>, EngineError> {
    BasicCredential::try_from(credential.clone())
        .map(|c| c.identity().to_vec())
        .map_err(|e| EngineError::InvalidCertificate(format!("not a basic credential: {e}")))
}

fn check_leaf(leaf: &LeafNode, now: confab_spec::ids::UnixMs) -> Result<DeviceId, EngineError> {
    verify_member(
        &identity_of(leaf.credential())?,
        leaf.signature_key().as_slice(),
        now,
    )
}

fn parse_key_package(
    provider: &Provider<'_>,
    bytes: &[u8],
    now: confab_spec::ids::UnixMs,
) -> Result<KeyPackage, EngineError> {
    let MlsMessageBodyIn::KeyPackage(kp) = parse(bytes)?.extract() else {
        return Err(EngineError::Malformed("not a KeyPackage".into()));
    };
    let kp = kp
        .validate(provider.crypto(), ProtocolVersion::Mls10)
        .map_err(|e| EngineError::Malformed(format!("key package: {e}")))?;
    check_leaf(kp.leaf_node(), now)?;
    Ok(kp)
}

/// A PSK id with a fresh nonce for an [`ExtraProposal`] PSK.
fn psk_id(
    provider: &Provider<'_>,
    group: &GroupId,
    psk: &ExtraProposal,
) -> Result<PreSharedKeyId, EngineError> {
    let psk = match psk {
        ExtraProposal::ExternalPsk(id) => Psk::External(ExternalPsk::new(id.clone())),
        ExtraProposal::ResumptionPsk(epoch) => Psk::Resumption(ResumptionPsk::new(
            ResumptionPskUsage::Application,
            group.clone(),
            GroupEpoch::from(*epoch),
        )),
        ExtraProposal::GroupContextExtensions(_) => {
            return Err(EngineError::Other("not a PSK".into()));
        }
    };
    PreSharedKeyId::new(CIPHERSUITE, provider.rand(), psk).map_err(|e| other("psk id", e))
}

/// Group context extensions from `(type, data)` pairs, parsed into openmls' typed ones.
fn context_extensions(list: &[(u16, Vec<u8>)]) -> Result<Extensions<GroupContext>, EngineError> {
    let extensions = list
        .iter()
        .map(|(ty, data)| {
            let mut bytes = ty.to_be_bytes().to_vec();
            bytes.extend(mls_vector_length(data.len()));
            bytes.extend_from_slice(data);
            Extension::tls_deserialize_exact(bytes.as_slice())
                .map_err(|e| EngineError::Malformed(format!("extension {ty}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Extensions::from_vec(extensions).map_err(|e| EngineError::Malformed(e.to_string()))
}

/// The MLS variable-length vector prefix for `len` bytes (RFC 9420 section 2.1.2).
fn mls_vector_length(len: usize) -> Vec<u8> {
    match len {
        0..=63 => vec![len as u8],
        64..=16_383 => vec![0x40 | (len >> 8) as u8, len as u8],
        _ => {
            let v = (len as u32) | 0x8000_0000;
            v.to_be_bytes().to_vec()
        }
    }
}

fn leaf_of(group: &MlsGroup, device: &DeviceId) -> Result<LeafNodeIndex, EngineError> {
    member_devices(group)?
        .into_iter()
        .find(|(_, d)| d == device)
        .map(|(leaf, _)| LeafNodeIndex::new(leaf))
        .ok_or_else(|| EngineError::UnknownMember(format!("{device:?}")))
}

fn member_devices(group: &MlsGroup) -> Result<Vec<(u32, DeviceId)>, EngineError> {
    group
        .members()
        .map(|m| Ok((m.index.u32(), device_of(&identity_of(&m.credential)?)?)))
        .collect()
}

fn other(context: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Other(format!("{context}: {e}"))
}

fn commit_output(
    commit: &MlsMessageOut,
    welcome: Option<MlsMessageOut>,
    group_info: Option<openmls::messages::group_info::GroupInfo>,
) -> Result<CommitOutput, EngineError> {
    Ok(CommitOutput {
        commit: serialize(commit)?,
        welcome: welcome.as_ref().map(serialize).transpose()?,
        group_info: group_info
            .map(|g| serialize(&MlsMessageOut::from(g)))
            .transpose()?,
    })
}

fn map_process_error<E: std::fmt::Display>(e: ProcessMessageError<E>) -> EngineError {
    use openmls::prelude::ValidationError as V;
    match &e {
        ProcessMessageError::ValidationError(V::WrongEpoch | V::NoPastEpochData) => {
            EngineError::WrongEpoch(e.to_string())
        }
        ProcessMessageError::ValidationError(V::UnknownMember) => {
            EngineError::UnknownMember(e.to_string())
        }
        ProcessMessageError::ValidationError(V::UnableToDecrypt(inner))
            if inner
                .to_string()
                .contains("deleted to preserve forward secrecy") =>
        {
            EngineError::SecretReused(e.to_string())
        }
        ProcessMessageError::ValidationError(V::WrongGroupId) => {
            EngineError::Malformed(e.to_string())
        }
        _ => EngineError::Other(format!("process: {e}")),
    }
}

impl OpenMlsEngine {
    /// Runs `f` inside one SQLite transaction (ending an open receive batch and writing
    /// every group with unwritten message secrets first); on
    /// failure rolls back and forgets `group`'s cached state so that it is reloaded from
    /// disk.
    fn with_tx<T>(
        &mut self,
        group: Option<&ConversationId>,
        f: impl FnOnce(&mut Ctx<'_>) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        self.write_all()?;
        self.run(group, ["BEGIN IMMEDIATE", "COMMIT", "ROLLBACK"], false, f)
    }

    /// Ends the open batch's transaction, if any, after writing the message secrets of
    /// `groups` and journaling the outcomes not released yet; without a batch, writes
    /// `groups` in a transaction of their own.
    fn finish(&mut self, groups: Vec<ConversationId>) -> Result<(), EngineError> {
        if !self.batch && groups.is_empty() {
            return Ok(());
        }
        if !self.batch {
            if let Err(e) = self.conn.execute_batch("BEGIN IMMEDIATE") {
                // Reloaded from disk on next use, as after any failed write.
                for id in &groups {
                    self.groups.remove(id);
                }
                return Err(storage(e));
            }
        }
        self.batch = false;
        let provider = Provider {
            crypto: &self.crypto,
            storage: storage_on(&self.conn, false),
        };
        // Setting the deletion policy a group has is openmls' public way to write its
        // message secrets (it resizes the store to the same size first: nothing changes).
        let journaled = self.journal.flush(&self.conn);
        let written = journaled.and_then(|()| {
            groups.iter().try_for_each(|id| {
                let Some(g) = self.groups.get_mut(id) else {
                    return Ok(());
                };
                let policy = g.past_epoch_deletion_policy().clone();
                g.set_past_epoch_deletion_policy(&provider, policy)
                    .map_err(|e| other("write message secrets", e))
            })
        });
        let committed = written.and_then(|()| self.conn.execute_batch("COMMIT").map_err(storage));
        if let Err(e) = committed {
            let _ = self.conn.execute_batch("ROLLBACK");
            // Back to the state on disk, which still holds the keys of the outcomes that
            // were not journaled.
            self.groups.clear();
            self.unwritten.clear();
            self.journal.reload(&self.conn)?;
            return Err(e);
        }
        Ok(())
    }

    /// Ends the open batch and writes every group with unwritten message secrets (before
    /// any other operation).
    fn write_all(&mut self) -> Result<(), EngineError> {
        let all = self.unwritten.take_all();
        self.finish(all)
    }

    /// Runs `f` in a savepoint of the open receive batch, or in a transaction of its own
    /// without one.
    fn in_batch<T>(
        &mut self,
        group: &ConversationId,
        f: impl FnOnce(&mut Ctx<'_>) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        if !self.batch {
            return self.with_tx(Some(group), f);
        }
        // On failure the group is reloaded from the transaction: its message secrets are
        // those last written, which still hold the keys of the messages read since (less
        // forward secrecy until the next write, no loss).
        self.run(
            Some(group),
            [
                "SAVEPOINT entry",
                "RELEASE entry",
                "ROLLBACK TO entry; RELEASE entry",
            ],
            true,
            f,
        )
    }

    /// Runs `f` between `begin` and `commit`, or `rollback` on failure (`[begin, commit,
    /// rollback]`), forgetting the cached state of `group` (of every group without one)
    /// when it fails. With `defer`, openmls' writes of message secrets are skipped.
    fn run<T>(
        &mut self,
        group: Option<&ConversationId>,
        [begin, commit, rollback]: [&str; 3],
        defer: bool,
        f: impl FnOnce(&mut Ctx<'_>) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        self.conn.execute_batch(begin).map_err(storage)?;
        let provider = Provider {
            crypto: &self.crypto,
            storage: storage_on(&self.conn, defer),
        };
        let mut ctx = Ctx {
            conn: &self.conn,
            provider: &provider,
            signer: &self.signer,
            credential: &self.credential,
            groups: &mut self.groups,
            now: (self.clock)(),
        };
        let result = f(&mut ctx).and_then(|v| {
            self.conn.execute_batch(commit).map_err(storage)?;
            Ok(v)
        });
        if result.is_err() {
            let _ = self.conn.execute_batch(rollback);
            match group {
                Some(g) => {
                    self.groups.remove(g);
                    self.unwritten.forget(g);
                }
                None => {
                    self.groups.clear();
                    self.unwritten.clear();
                }
            }
        }
        result
    }

    /// Reads a group without caching it (for `&self` accessors).
    fn read<T>(
        &self,
        id: &ConversationId,
        f: impl FnOnce(&MlsGroup) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        if let Some(g) = self.groups.get(id) {
            return f(g);
        }
        let group = MlsGroup::load(&storage_on(&self.conn, false), &GroupId::from_slice(&id.0))
            .map_err(self::storage)?
            .ok_or(EngineError::GroupNotFound)?;
        f(&group)
    }
}

impl MlsEngine for OpenMlsEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::OpenMls
    }

    fn device(&self) -> DeviceId {
        self.device
    }

    fn key_packages(
        &mut self,
        count: usize,
        last_resort: bool,
    ) -> Result<Vec<Vec<u8>>, EngineError> {
        self.with_tx(None, |ctx| {
            (0..count)
                .map(|_| {
                    // A KeyPackage extension must be listed in its leaf's capabilities.
                    let mut builder =
                        KeyPackage::builder().leaf_node_capabilities(capabilities(last_resort));
                    if last_resort {
                        builder = builder.mark_as_last_resort();
                    }
                    let bundle = builder
                        .build(
                            CIPHERSUITE,
                            ctx.provider,
                            ctx.signer,
                            ctx.credential.clone(),
                        )
                        .map_err(|e| other("key package", e))?;
                    serialize(&MlsMessageOut::from(bundle.key_package().clone()))
                })
                .collect()
        })
    }

    fn create_group_with(
        &mut self,
        group: &ConversationId,
        extensions: &[(u16, Vec<u8>)],
    ) -> Result<Vec<u8>, EngineError> {
        let extensions = context_extensions(extensions)?;
        self.with_tx(Some(group), |ctx| {
            let g = MlsGroup::new_with_group_id(
                ctx.provider,
                ctx.signer,
                &create_config(extensions),
                GroupId::from_slice(&group.0),
                ctx.credential.clone(),
            )
            .map_err(|e| other("create group", e))?;
            // The ratchet tree goes in-band (SPEC.md 6.1, 7.1).
            let info = g
                .export_group_info(ctx.provider.crypto(), ctx.signer, true)
                .map_err(|e| other("group info", e))?;
            ctx.groups.insert(*group, g);
            serialize(&info)
        })
    }

    fn add_members(
        &mut self,
        group: &ConversationId,
        key_packages: &[Vec<u8>],
    ) -> Result<CommitOutput, EngineError> {
        self.with_tx(Some(group), |ctx| {
            let kps = key_packages
                .iter()
                .map(|kp| parse_key_package(ctx.provider, kp, ctx.now))
                .collect::<Result<Vec<_>, _>>()?;
            let provider = ctx.provider;
            let signer = ctx.signer;
            let g = ctx.group_without_pending_commit(group)?;
            let (commit, welcome, group_info) = g
                .add_members(provider, signer, &kps)
                .map_err(|e| other("add members", e))?;
            commit_output(&commit, Some(welcome), group_info)
        })
    }

    fn remove_members(
        &mut self,
        group: &ConversationId,
        devices: &[DeviceId],
    ) -> Result<CommitOutput, EngineError> {
        self.with_tx(Some(group), |ctx| {
            let provider = ctx.provider;
            let signer = ctx.signer;
            let g = ctx.group_without_pending_commit(group)?;
            let leaves = devices
                .iter()
                .map(|d| leaf_of(g, d))
                .collect::<Result<Vec<_>, _>>()?;
            let (commit, welcome, group_info) = g
                .remove_members(provider, signer, &leaves)
                .map_err(|e| other("remove members", e))?;
            commit_output(&commit, welcome, group_info)
        })
    }

    fn self_update(&mut self, group: &ConversationId) -> Result<CommitOutput, EngineError> {
        self.with_tx(Some(group), |ctx| {
            let provider = ctx.provider;
            let signer = ctx.signer;
            let g = ctx.group_without_pending_commit(group)?;
            let bundle = g
                .self_update(provider, signer, LeafNodeParameters::default())
                .map_err(|e| other("self update", e))?;
            commit_output(
                bundle.commit(),
                bundle.to_welcome_msg(),
                bundle.group_info().cloned(),
            )
        })
    }

    fn leave(&mut self, group: &ConversationId) -> Result<Vec<u8>, EngineError> {
        self.with_tx(Some(group), |ctx| {
            let provider = ctx.provider;
            let signer = ctx.signer;
            let g = ctx.group(group)?;
            let proposal = g
                .leave_group(provider, signer)
                .map_err(|e| other("leave", e))?;
            serialize(&proposal)
        })
    }

    fn propose_add(
        &mut self,
        group: &ConversationId,
        key_package: &[u8],
    ) -> Result<Vec<u8>, EngineError> {
        self.with_tx(Some(group), |ctx| {
            let kp = parse_key_package(ctx.provider, key_package, ctx.now)?;
            let provider = ctx.provider;
            let signer = ctx.signer;
            let g = ctx.group(group)?;
            let (msg, _) = g
                .propose_add_member(provider, signer, &kp)
                .map_err(|e| other("propose add", e))?;
            serialize(&msg)
        })
    }

    fn propose_remove(
        &mut self,
        group: &ConversationId,
        device: &DeviceId,
    ) -> Result<Vec<u8>, EngineError> {
        self.with_tx(Some(group), |ctx| {
            let provider = ctx.provider;
            let signer = ctx.signer;
            let g = ctx.group(group)?;
            let leaf = leaf_of(g, device)?;
            let (msg, _) = g
                .propose_remove_member(provider, signer, leaf)
                .map_err(|e| other("propose remove", e))?;
            serialize(&msg)
        })
    }

    fn propose_update(&mut self, group: &ConversationId) -> Result<Vec<u8>, EngineError> {
        self.with_tx(Some(group), |ctx| {
            let provider = ctx.provider;
            let signer = ctx.signer;
            let g = ctx.group(group)?;
            let (msg, _) = g
                .propose_self_update(provider, signer, LeafNodeParameters::default())
                .map_err(|e| other("propose update", e))?;
            serialize(&msg)
        })
    }

    fn commit(
        &mut self,
        group: &ConversationId,
        adds: &[Vec<u8>],
        removes: &[DeviceId],
        extra: &[ExtraProposal],
        force_path: bool,
    ) -> Result<CommitOutput, EngineError> {
        self.with_tx(Some(group), |ctx| {
            let kps = adds
                .iter()
                .map(|kp| parse_key_package(ctx.provider, kp, ctx.now))
                .collect::<Result<Vec<_>, _>>()?;
            let provider = ctx.provider;
            let signer = ctx.signer;
            let g = ctx.group_without_pending_commit(group)?;
            let leaves = removes
                .iter()
                .map(|d| leaf_of(g, d))
                .collect::<Result<Vec<_>, _>>()?;
            let group_id = g.group_id().clone();
            let mut builder = g
                .commit_builder()
                .consume_proposal_store(true)
                .force_self_update(force_path)
                .propose_adds(kps)
                .propose_removals(leaves);
            for p in extra {
                builder = match p {
                    ExtraProposal::GroupContextExtensions(list) => builder
                        .propose_group_context_extensions(context_extensions(list)?)
                        .map_err(|e| other("commit", e))?,
                    psk => builder.add_proposal(Proposal::PreSharedKey(Box::new(
                        PreSharedKeyProposal::new(psk_id(provider, &group_id, psk)?),
                    ))),
                };
            }
            let bundle = builder
                .load_psks(provider.storage())
                .map_err(|e| other("commit", e))?
                .build(provider.rand(), provider.crypto(), signer, |_| true)
                .map_err(|e| other("commit", e))?
                .stage_commit(provider)
                .map_err(|e| other("commit", e))?;
            commit_output(
                bundle.commit(),
                bundle.to_welcome_msg(),
                bundle.group_info().cloned(),
            )
        })
    }

    fn group_info(&mut self, group: &ConversationId) -> Result<Vec<u8>, EngineError> {
        self.with_tx(Some(group), |ctx| {
            let provider = ctx.provider;
            let signer = ctx.signer;
            let g = ctx.group(group)?;
            let info = g
                .export_group_info(provider.crypto(), signer, true)
                .map_err(|e| other("group info", e))?;
            serialize(&info)
        })
    }

    fn resync(
        &mut self,
        group: &ConversationId,
        group_info: &[u8],
        ratchet_tree: Option<&[u8]>,
    ) -> Result<CommitOutput, EngineError> {
        self.with_tx(None, |ctx| {
            let MlsMessageBodyIn::GroupInfo(info) = parse(group_info)?.extract() else {
                return Err(EngineError::Malformed("not a GroupInfo".into()));
            };
            if info.group_id().as_slice() != group.0.as_slice() {
                return Err(EngineError::Malformed(
                    "the GroupInfo is of another group".into(),
                ));
            }
            let provider = ctx.provider;
            let signer = ctx.signer;
            // The old state is forked or stale: it goes, and the new one takes its place
            // (openmls removes the leaf holding our credential by itself).
            if let Ok(old) = ctx.group(group) {
                old.delete(provider.storage()).map_err(storage)?;
            }
            ctx.groups.remove(group);
            let mut builder = MlsGroup::external_commit_builder().with_config(join_config());
            if let Some(tree) = ratchet_tree {
                let tree = RatchetTreeIn::tls_deserialize_exact(tree)
                    .map_err(|e| EngineError::Malformed(format!("ratchet tree: {e}")))?;
                builder = builder.with_ratchet_tree(tree);
            }
            // The new leaf can be in a room, as every leaf (REQ-10-1).
            let leaf = LeafNodeParameters::builder()
                .with_capabilities(capabilities(false))
                .build();
            let (mut g, bundle) = builder
                .build_group(provider, info, ctx.credential.clone())
                .map_err(|e| other("resync", e))?
                .leaf_node_parameters(leaf)
                .load_psks(provider.storage())
                .map_err(|e| other("resync", e))?
                .build(provider.rand(), provider.crypto(), signer, |_| true)
                .map_err(|e| other("resync", e))?
                .finalize(provider)
                .map_err(|e| other("resync", e))?;
            let commit = serialize(bundle.commit())?;
            if g.pending_commit().is_some() {
                g.merge_pending_commit(provider)
                    .map_err(|e| other("merge resync", e))?;
            }
            let info = g
                .export_group_info(provider.crypto(), signer, false)
                .map_err(|e| other("group info", e))?;
            ctx.adopt(g)?;
            Ok(CommitOutput {
                commit,
                welcome: None,
                group_info: Some(serialize(&info)?),
            })
        })
    }

    fn join_external(
        &mut self,
        group_info: &[u8],
        _remove_prior: Option<u32>,
        psks: &[Vec<u8>],
    ) -> Result<(ConversationId, Vec<u8>), EngineError> {
        // openmls removes an existing member with our credential by itself.
        self.with_tx(None, |ctx| {
            let MlsMessageBodyIn::GroupInfo(info) = parse(group_info)?.extract() else {
                return Err(EngineError::Malformed("not a GroupInfo".into()));
            };
            let group_id = info.group_id().clone();
            let mut psk_proposals = Vec::new();
            for id in psks {
                let psk = ExtraProposal::ExternalPsk(id.clone());
                psk_proposals.push(PreSharedKeyProposal::new(psk_id(
                    ctx.provider,
                    &group_id,
                    &psk,
                )?));
            }
            let (mut g, bundle) = MlsGroup::external_commit_builder()
                .with_config(join_config())
                .build_group(ctx.provider, info, ctx.credential.clone())
                .map_err(|e| other("external commit", e))?
                .add_psk_proposals(psk_proposals)
                .load_psks(ctx.provider.storage())
                .map_err(|e| other("external commit", e))?
                .build(
                    ctx.provider.rand(),
                    ctx.provider.crypto(),
                    ctx.signer,
                    |_| true,
                )
                .map_err(|e| other("external commit", e))?
                .finalize(ctx.provider)
                .map_err(|e| other("external commit", e))?;
            let commit = serialize(bundle.commit())?;
            if g.pending_commit().is_some() {
                g.merge_pending_commit(ctx.provider)
                    .map_err(|e| other("merge external commit", e))?;
            }
            let id = ctx.adopt(g)?;
            Ok((id, commit))
        })
    }

    fn branch(
        &mut self,
        _group: &ConversationId,
        _new_group: &ConversationId,
        _key_packages: &[Vec<u8>],
    ) -> Result<Vec<u8>, EngineError> {
        Err(EngineError::Unsupported(NO_RESUMPTION))
    }

    fn join_branch(
        &mut self,
        _group: &ConversationId,
        _welcome: &[u8],
    ) -> Result<ConversationId, EngineError> {
        Err(EngineError::Unsupported(NO_RESUMPTION))
    }

    fn propose_reinit(
        &mut self,
        _group: &ConversationId,
        _new_group: &ConversationId,
        _extensions: &[(u16, Vec<u8>)],
    ) -> Result<Vec<u8>, EngineError> {
        Err(EngineError::Unsupported(NO_RESUMPTION))
    }

    fn reinit_key_package(&mut self, _group: &ConversationId) -> Result<Vec<u8>, EngineError> {
        Err(EngineError::Unsupported(NO_RESUMPTION))
    }

    fn reinit_commit(
        &mut self,
        _group: &ConversationId,
        _key_packages: &[Vec<u8>],
    ) -> Result<(ConversationId, Vec<u8>), EngineError> {
        Err(EngineError::Unsupported(NO_RESUMPTION))
    }

    fn reinit_join(
        &mut self,
        _group: &ConversationId,
        _welcome: &[u8],
    ) -> Result<ConversationId, EngineError> {
        Err(EngineError::Unsupported(NO_RESUMPTION))
    }

    fn install_external_psk(&mut self, id: &[u8], secret: &[u8]) -> Result<(), EngineError> {
        self.with_tx(None, |ctx| {
            PreSharedKeyId::external(id.to_vec(), vec![0; 32])
                .store(ctx.provider, secret)
                .map_err(|e| other("store psk", e))
        })
    }

    fn propose_extra(
        &mut self,
        group: &ConversationId,
        proposal: &ExtraProposal,
    ) -> Result<Vec<u8>, EngineError> {
        self.with_tx(Some(group), |ctx| {
            let provider = ctx.provider;
            let signer = ctx.signer;
            let g = ctx.group(group)?;
            let (msg, _) = match proposal {
                ExtraProposal::GroupContextExtensions(list) => g
                    .propose_group_context_extensions(provider, context_extensions(list)?, signer)
                    .map_err(|e| other("propose extensions", e))?,
                psk => {
                    let id = psk_id(provider, g.group_id(), psk)?;
                    g.propose_pre_shared_key(provider, signer, id)
                        .map_err(|e| other("propose psk", e))?
                }
            };
            serialize(&msg)
        })
    }

    fn merge_pending_commit(&mut self, group: &ConversationId) -> Result<(), EngineError> {
        self.with_tx(Some(group), |ctx| {
            let provider = ctx.provider;
            let g = ctx.group(group)?;
            if g.pending_commit().is_none() {
                return Err(EngineError::NoPendingCommit);
            }
            g.merge_pending_commit(provider)
                .map_err(|e| other("merge pending commit", e))
        })
    }

    fn discard_pending_commit(&mut self, group: &ConversationId) -> Result<(), EngineError> {
        self.with_tx(Some(group), |ctx| {
            let provider = ctx.provider;
            let g = ctx.group(group)?;
            if g.pending_commit().is_none() {
                return Err(EngineError::NoPendingCommit);
            }
            g.clear_pending_commit(provider.storage())
                .map_err(|e| other("discard pending commit", e))
        })
    }

    fn has_pending_commit(&self, group: &ConversationId) -> Result<bool, EngineError> {
        self.read(group, |g| Ok(g.pending_commit().is_some()))
    }

    fn join(&mut self, welcome: &[u8]) -> Result<ConversationId, EngineError> {
        self.with_tx(None, |ctx| {
            let MlsMessageBodyIn::Welcome(welcome) = parse(welcome)?.extract() else {
                return Err(EngineError::Malformed("not a Welcome".into()));
            };
            let builder = StagedWelcome::build_from_welcome(ctx.provider, &join_config(), welcome)
                .map_err(|e| other("welcome", e))?;
            // A device removed from a group and added again replaces its old state; the
            // transaction restores it if the join fails.
            let group_id = builder
                .processed_welcome()
                .unverified_group_info()
                .group_id()
                .clone();
            if let Some(mut old) =
                MlsGroup::load(ctx.provider.storage(), &group_id).map_err(storage)?
            {
                old.delete(ctx.provider.storage()).map_err(storage)?;
                if let Ok(id) = ConversationId::from_slice(group_id.as_slice()) {
                    ctx.groups.remove(&id);
                }
            }
            let staged = builder.build().map_err(|e| other("welcome", e))?;
            for member in staged.members() {
                verify_member(
                    &identity_of(&member.credential)?,
                    &member.signature_key,
                    ctx.now,
                )?;
            }
            let g = staged
                .into_group(ctx.provider)
                .map_err(|e| other("join", e))?;
            let id = ctx.adopt(g)?;
            Ok(id)
        })
    }

    fn encrypt(
        &mut self,
        group: &ConversationId,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, EngineError> {
        let step = |ctx: &mut Ctx<'_>| {
            let provider = ctx.provider;
            let signer = ctx.signer;
            let g = ctx.group_without_pending_commit(group)?;
            let message = g
                .create_message(provider, signer, plaintext)
                .map_err(|e| other("encrypt", e))?;
            serialize(&message)
        };
        if !self.unwritten.contains(group) {
            return self.with_tx(Some(group), step);
        }
        // Receive batches advanced this group without writing it: openmls writes its
        // message secrets as it encrypts, so in one transaction with the batch's that one
        // write covers both. The message goes nowhere before the commit: a failed commit
        // returns the error and the generation is used again.
        self.begin_receive_batch()?;
        let encrypted = self.run(
            Some(group),
            ["SAVEPOINT op", "RELEASE op", "ROLLBACK TO op; RELEASE op"],
            false,
            step,
        );
        // Written, or dropped from the cache on failure.
        self.unwritten.forget(group);
        self.write_all()?;
        encrypted
    }

    fn process(
        &mut self,
        group: &ConversationId,
        message: &[u8],
    ) -> Result<Processed, EngineError> {
        self.with_tx(Some(group), |ctx| process_in(ctx, group, message))
    }

    fn verify_proposal(
        &mut self,
        group: &ConversationId,
        message: &[u8],
    ) -> Result<Option<DeviceId>, EngineError> {
        super::require_public_proposal(message)?;
        self.with_tx(Some(group), |ctx| {
            // Verifying a PublicMessage changes nothing in the group; the proposal is not
            // stored (no `store_pending_proposal`).
            let (processed, sender) = process_message_in(ctx, group, message)?;
            match processed.into_content() {
                ProcessedMessageContent::ProposalMessage(_) => Ok(sender),
                _ => Err(EngineError::Malformed("not a member's proposal".into())),
            }
        })
    }

    fn process_entry(
        &mut self,
        group: &ConversationId,
        seq: u64,
        message: &[u8],
    ) -> Result<Processed, EngineError> {
        if let Some(journaled) = self.journal.get(&self.conn, group, seq)? {
            return Ok(journaled);
        }
        let application = matches!(
            MlsMessageIn::tls_deserialize_exact(message).map(|m| m.extract()),
            Ok(MlsMessageBodyIn::PrivateMessage(p)) if p.content_type() == ContentType::Application
        );
        if application && self.batch {
            // Recorded in memory: the batch's end journals it (if the client has not
            // released it by then) in the transaction that stores the consumed secret.
            let processed = self.in_batch(group, |ctx| process_in(ctx, group, message))?;
            let now = (self.clock)();
            match &processed {
                Processed::Application { sender, plaintext } => {
                    self.journal.record(group, seq, sender, plaintext);
                    self.unwritten.read(group, sender, now);
                }
                _ => self.unwritten.changed(group, now),
            }
            return Ok(processed);
        }
        let processed = self.with_tx(Some(group), |ctx| {
            let processed = process_in(ctx, group, message)?;
            if let Processed::Application { sender, plaintext } = &processed {
                // In the transaction that stores the consumed secret.
                journal::put(ctx.conn, group, seq, sender, plaintext)?;
            }
            Ok(processed)
        })?;
        if matches!(processed, Processed::Application { .. }) {
            self.journal.note_stored(group, seq);
        }
        Ok(processed)
    }

    fn begin_receive_batch(&mut self) -> Result<(), EngineError> {
        if !self.batch {
            self.conn
                .execute_batch("BEGIN IMMEDIATE")
                .map_err(storage)?;
            self.batch = true;
        }
        Ok(())
    }

    fn set_state_write_window(&mut self, window: StateWriteWindow) {
        self.unwritten.set_window(window);
    }

    fn unwritten_due_in(&self) -> Option<u64> {
        self.unwritten.due_in((self.clock)())
    }

    fn end_receive_batch(&mut self) -> Result<(), EngineError> {
        let due = self.unwritten.take_due((self.clock)());
        self.finish(due)
    }

    fn release_processed(&mut self, group: &ConversationId, seq: u64) -> Result<(), EngineError> {
        self.journal.release(&self.conn, group, seq)
    }

    fn epoch(&self, group: &ConversationId) -> Result<u64, EngineError> {
        self.read(group, |g| Ok(g.epoch().as_u64()))
    }

    fn epoch_authenticator(&self, group: &ConversationId) -> Result<Vec<u8>, EngineError> {
        self.read(group, |g| Ok(g.epoch_authenticator().as_slice().to_vec()))
    }

    fn export_secret(
        &self,
        group: &ConversationId,
        label: &str,
        context: &[u8],
        len: usize,
    ) -> Result<Vec<u8>, EngineError> {
        let crypto = &self.crypto;
        self.read(group, |g| {
            g.export_secret(crypto, label, context, len)
                .map_err(|e| other("export secret", e))
        })
    }

    fn members(&self, group: &ConversationId) -> Result<Vec<(u32, DeviceId)>, EngineError> {
        self.read(group, member_devices)
    }

    fn context_extension(
        &self,
        group: &ConversationId,
        extension_type: u16,
    ) -> Result<Option<Vec<u8>>, EngineError> {
        self.read(group, |g| {
            let Some(extension) = g
                .extensions()
                .iter()
                .find(|e| u16::from(e.extension_type()) == extension_type)
            else {
                return Ok(None);
            };
            if let Extension::Unknown(_, UnknownExtension(data)) = extension {
                return Ok(Some(data.clone()));
            }
            // A type openmls knows (required_capabilities, ...): its data is what follows
            // the type and the length in its encoding.
            let bytes = extension
                .tls_serialize_detached()
                .map_err(|e| other("encode an extension", e))?;
            let data_at = match bytes.get(2).map(|b| b >> 6) {
                Some(0) => 3,
                Some(1) => 4,
                Some(2) => 6,
                _ => return Err(EngineError::Malformed("extension length".into())),
            };
            Ok(bytes.get(data_at..).map(<[u8]>::to_vec))
        })
    }
}

/// Verifies (and for a PrivateMessage decrypts) `message` in `group` inside an open
/// transaction: what openmls made of it, and its sender's device when its credential is a
/// device certificate.
fn process_message_in(
    ctx: &mut Ctx<'_>,
    group: &ConversationId,
    message: &[u8],
) -> Result<(ProcessedMessage, Option<DeviceId>), EngineError> {
    let provider = ctx.provider;
    let protocol = parse(message)?
        .try_into_protocol_message()
        .map_err(|e| EngineError::Malformed(e.to_string()))?;
    let g = ctx.group(group)?;
    if !g.is_active() {
        return Err(EngineError::Removed);
    }
    let processed = g
        .process_message(provider, protocol)
        .map_err(map_process_error)?;
    let sender = device_of(&identity_of(processed.credential())?).ok();
    Ok((processed, sender))
}

/// Processes `message` in `group` inside an open transaction.
fn process_in(
    ctx: &mut Ctx<'_>,
    group: &ConversationId,
    message: &[u8],
) -> Result<Processed, EngineError> {
    let now = ctx.now;
    let provider = ctx.provider;
    let (processed, sender) = process_message_in(ctx, group, message)?;
    let external = matches!(processed.sender(), Sender::NewMemberCommit);
    let g = ctx.group(group)?;
    match processed.into_content() {
        ProcessedMessageContent::ApplicationMessage(app) => Ok(Processed::Application {
            sender: sender.ok_or_else(|| EngineError::UnknownMember("sender".into()))?,
            plaintext: app.into_bytes(),
        }),
        ProcessedMessageContent::ProposalMessage(p) => {
            g.store_pending_proposal(provider.storage(), *p)
                .map_err(storage)?;
            Ok(Processed::Proposal { sender })
        }
        ProcessedMessageContent::ExternalJoinProposalMessage(p) => {
            g.store_pending_proposal(provider.storage(), *p)
                .map_err(storage)?;
            Ok(Processed::Proposal { sender: None })
        }
        ProcessedMessageContent::OwnPendingCommit | ProcessedMessageContent::OwnPrivateMessage => {
            Err(EngineError::OwnMessage)
        }
        ProcessedMessageContent::StagedCommitMessage(staged) => {
            let added = staged
                .add_proposals()
                .map(|add| check_leaf(add.add_proposal().key_package().leaf_node(), now))
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(leaf) = staged.update_path_leaf_node() {
                check_leaf(leaf, now)?;
            }
            let members = member_devices(g)?;
            let mut removed: Vec<DeviceId> = staged
                .remove_proposals()
                .filter_map(|r| {
                    let leaf = r.remove_proposal().removed().u32();
                    members.iter().find(|(l, _)| *l == leaf).map(|(_, d)| *d)
                })
                .collect();
            let self_removed = staged.self_removed();
            g.merge_staged_commit(provider, *staged)
                .map_err(|e| other("merge commit", e))?;
            if !self_removed {
                // By device: a resync's Remove replaces its sender's own leaf, and the
                // device stays (SPEC.md 7.10).
                let after = member_devices(g)?;
                removed.retain(|d| !after.iter().any(|(_, m)| m == d));
            }
            Ok(Processed::Commit {
                sender,
                epoch: g.epoch().as_u64(),
                added,
                removed,
                self_removed,
                external,
            })
        }
    }
}
