//! [`MlsEngine`] on mls-rs 0.57 with its SQLite storage provider.
//!
//! mls-rs keeps group state in memory and persists it only on `write_to_storage()`, which
//! writes the group state and its epochs in one SQLite transaction. This engine calls it
//! after every mutation and before it returns anything derived from the new state. On any
//! failure it drops the cached group, so the next use reloads the durable state.
//!
//! In a receive batch ([`MlsEngine::begin_receive_batch`]) application messages are
//! processed in memory: their outcomes are kept in memory, and when the batch ends those
//! the client has not released yet are journaled in one transaction on the journal's
//! connection, before the groups they advanced are written, once each (or, with a
//! state-write window, once each that is due: [`super::unwritten`]). Any other mutation
//! ends the batch and writes every unwritten group first.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mls_rs::client_builder::MlsConfig;
use mls_rs::error::{IntoAnyError, MlsError};
use mls_rs::extension::ExtensionType;
use mls_rs::extension::built_in::RatchetTreeExt;
use mls_rs::extension::recommended::LastResortKeyPackageExt;
use mls_rs::group::{ContentType, ExportedTree, ReceivedMessage};
use mls_rs::identity::basic::BasicCredential;
use mls_rs::identity::{CredentialType, SigningIdentity};
use mls_rs::mls_rules::{CommitOptions, DefaultMlsRules};
use mls_rs::time::MlsTime;
use mls_rs::{
    CipherSuite, Client, ExtensionList, Group, IdentityProvider, MlsMessage, MlsMessageDescription,
};
use mls_rs_core::identity::MemberValidationContext;
use mls_rs_core::psk::{ExternalPskId, PreSharedKey};
use mls_rs_crypto_rustcrypto::RustCryptoProvider;
use mls_rs_provider_sqlite::SqLiteDataStorageEngine;
use mls_rs_provider_sqlite::connection_strategy::FileConnectionStrategy;
use mls_rs_provider_sqlite::storage::{SqLiteGroupStateStorage, SqLitePreSharedKeyStorage};

use super::journal::Journal;
use super::mlsrs_memo_crypto::MemoCryptoProvider;
use super::signature_memo::SignatureMemo;
use super::unwritten::{StateWriteWindow, UnwrittenGroups};
use super::{
    Clock, CommitOutput, EngineError, EngineKind, ExtraProposal, MlsEngine, Processed,
    credential_identity, device_of, verify_member,
};
use confab_spec::ids::{ConversationId, DeviceId, UnixMs};
use confab_spec::session::DeviceCredentials;

const CIPHERSUITE: CipherSuite = CipherSuite::CURVE25519_AES128;

/// The mls-rs engine of one device.
pub struct MlsRsEngine<C: MlsConfig> {
    client: Client<C>,
    psks: SqLitePreSharedKeyStorage,
    group_states: SqLiteGroupStateStorage,
    device: DeviceId,
    clock: Clock,
    groups: HashMap<ConversationId, Group<C>>,
    /// A connection of our own to the state file, for the decryption journal.
    journal_conn: rusqlite::Connection,
    /// The decryption journal's outcomes in memory and the keys of those in the table.
    journal: Journal,
    /// Whether a receive batch's journal transaction is open.
    batch: bool,
    /// The groups receive batches advanced in memory and did not write yet.
    unwritten: UnwrittenGroups,
}

/// Opens or creates the state at `path` for the device in `credentials`.
pub fn open(
    path: &Path,
    credentials: DeviceCredentials,
    clock: Clock,
    signatures: Option<Arc<SignatureMemo>>,
) -> Result<Box<dyn MlsEngine>, EngineError> {
    let engine = SqLiteDataStorageEngine::new(FileConnectionStrategy::new(path))
        .map_err(storage)?
        .with_journal_mode(Some(mls_rs_provider_sqlite::JournalMode::Wal));
    let psks = engine.pre_shared_key_storage().map_err(storage)?;
    // Past epochs kept for late application messages: at least what the gateway still
    // accepts (REQ-7.2-4); mls-rs keeps 3 by default.
    let group_states = engine
        .group_state_storage()
        .map_err(storage)?
        .with_max_epoch_retention(PAST_EPOCHS);
    let certificate = credentials.certificate;
    let identity = SigningIdentity::new(
        BasicCredential::new(credential_identity(&certificate)).into_credential(),
        certificate.device_key.as_bytes().to_vec().into(),
    );
    // mls-rs-crypto-rustcrypto takes ed25519 secret keys as seed || public key.
    let mut secret = credentials.key.seed().to_vec();
    secret.extend_from_slice(certificate.device_key.as_bytes());
    let client = Client::builder()
        .crypto_provider(MemoCryptoProvider {
            inner: RustCryptoProvider::default(),
            memo: signatures,
        })
        .identity_provider(CertificateIdentity {
            clock: clock.clone(),
        })
        .group_state_storage(group_states.clone())
        .key_package_repo(engine.key_package_storage().map_err(storage)?)
        .psk_store(psks.clone())
        // Every Commit publishes the GroupInfo of its epoch for resyncs (SPEC.md 7.10),
        // without the tree: the gateway serves the tree it tracks.
        .mls_rules(
            DefaultMlsRules::default().with_commit_options(
                CommitOptions::default()
                    .with_allow_external_commit(true)
                    .with_always_out_of_band_ratchet_tree(true),
            ),
        )
        .extension_type(ExtensionType::LAST_RESORT_KEY_PACKAGE)
        // Every leaf can be in a room (SPEC.md REQ-10-1).
        .extension_type(ExtensionType::new(confab_spec::rooms::ROLES_EXTENSION_TYPE))
        .signing_identity(identity, secret.into(), CIPHERSUITE)
        .build();
    let journal_conn = rusqlite::Connection::open(path).map_err(storage)?;
    journal_conn
        .execute_batch("PRAGMA synchronous=FULL;")
        .map_err(storage)?;
    journal_conn
        .busy_timeout(std::time::Duration::from_secs(5))
        .map_err(storage)?;
    let journal = Journal::open(&journal_conn)?;
    Ok(Box::new(MlsRsEngine {
        client,
        psks,
        group_states,
        device: certificate.device_id(),
        clock,
        groups: HashMap::new(),
        journal_conn,
        journal,
        batch: false,
        unwritten: UnwrittenGroups::default(),
    }))
}

/// Validates members by their device certificates (SPEC.md 7.1).
#[derive(Clone)]
pub struct CertificateIdentity {
    clock: Clock,
}

/// A member credential failed validation.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CertificateError(String);

impl IntoAnyError for CertificateError {}

fn identifier(identity: &SigningIdentity) -> Result<&[u8], CertificateError> {
    identity
        .credential
        .as_basic()
        .map(|b| b.identifier.as_slice())
        .ok_or_else(|| CertificateError("not a basic credential".into()))
}

impl IdentityProvider for CertificateIdentity {
    type Error = CertificateError;

    fn validate_member(
        &self,
        signing_identity: &SigningIdentity,
        timestamp: Option<MlsTime>,
        _context: MemberValidationContext<'_>,
    ) -> Result<(), Self::Error> {
        let now = timestamp.map_or_else(
            || (self.clock)(),
            |t| UnixMs(t.seconds_since_epoch().saturating_mul(1_000)),
        );
        verify_member(
            identifier(signing_identity)?,
            signing_identity.signature_key.as_bytes(),
            now,
        )
        .map(|_| ())
        .map_err(|e| CertificateError(e.to_string()))
    }

    fn validate_external_sender(
        &self,
        _signing_identity: &SigningIdentity,
        _timestamp: Option<MlsTime>,
        _extensions: Option<&ExtensionList>,
    ) -> Result<(), Self::Error> {
        Err(CertificateError(
            "Confab groups have no external senders".into(),
        ))
    }

    fn identity(
        &self,
        signing_identity: &SigningIdentity,
        _extensions: &ExtensionList,
    ) -> Result<Vec<u8>, Self::Error> {
        device_of(identifier(signing_identity)?)
            .map(|d| d.to_bytes().to_vec())
            .map_err(|e| CertificateError(e.to_string()))
    }

    fn valid_successor(
        &self,
        predecessor: &SigningIdentity,
        successor: &SigningIdentity,
        _extensions: &ExtensionList,
    ) -> Result<bool, Self::Error> {
        let a = device_of(identifier(predecessor)?).map_err(|e| CertificateError(e.to_string()))?;
        let b = device_of(identifier(successor)?).map_err(|e| CertificateError(e.to_string()))?;
        Ok(a == b)
    }

    fn supported_types(&self) -> Vec<CredentialType> {
        vec![CredentialType::BASIC]
    }
}

fn storage(e: impl std::fmt::Display) -> EngineError {
    EngineError::Storage(e.to_string())
}

fn map_err(e: MlsError) -> EngineError {
    match e {
        MlsError::InvalidEpoch | MlsError::EpochNotFound => EngineError::WrongEpoch(e.to_string()),
        MlsError::KeyMissing(_) => EngineError::SecretReused(e.to_string()),
        MlsError::InvalidSender | MlsError::MemberNotFound | MlsError::LeafNotFound(_) => {
            EngineError::UnknownMember(e.to_string())
        }
        MlsError::IdentityProviderError(_) => EngineError::InvalidCertificate(e.to_string()),
        MlsError::GroupNotFound => EngineError::GroupNotFound,
        MlsError::InvalidSignature => EngineError::Malformed(e.to_string()),
        MlsError::ExistingPendingCommit => EngineError::PendingCommit,
        MlsError::PendingCommitNotFound => EngineError::NoPendingCommit,
        MlsError::GroupUsedAfterReInit => EngineError::Removed,
        other => EngineError::Other(other.to_string()),
    }
}

fn parse(bytes: &[u8]) -> Result<MlsMessage, EngineError> {
    MlsMessage::from_bytes(bytes).map_err(|e| EngineError::Malformed(e.to_string()))
}

fn to_bytes(message: &MlsMessage) -> Result<Vec<u8>, EngineError> {
    message.to_bytes().map_err(map_err)
}

fn roster<C: MlsConfig>(group: &Group<C>) -> Result<Vec<(u32, DeviceId)>, EngineError> {
    group
        .roster()
        .members_iter()
        .map(|m| {
            let id =
                m.signing_identity.credential.as_basic().ok_or_else(|| {
                    EngineError::InvalidCertificate("not a basic credential".into())
                })?;
            Ok((m.index, device_of(&id.identifier)?))
        })
        .collect()
}

/// The device of the member at leaf `index`.
fn member_device<C: MlsConfig>(group: &Group<C>, index: u32) -> Result<DeviceId, EngineError> {
    let member = group
        .member_at_index(index)
        .ok_or_else(|| EngineError::UnknownMember(format!("leaf {index}")))?;
    let id = member
        .signing_identity
        .credential
        .as_basic()
        .ok_or_else(|| EngineError::InvalidCertificate("not a basic credential".into()))?;
    device_of(&id.identifier)
}

fn leaf_of<C: MlsConfig>(group: &Group<C>, device: &DeviceId) -> Result<u32, EngineError> {
    roster(group)?
        .into_iter()
        .find(|(_, d)| d == device)
        .map(|(leaf, _)| leaf)
        .ok_or_else(|| EngineError::UnknownMember(format!("{device:?}")))
}

fn extension_list(list: &[(u16, Vec<u8>)]) -> ExtensionList {
    let mut out = ExtensionList::new();
    for (ty, data) in list {
        out.set(mls_rs::Extension::new(
            ExtensionType::new(*ty),
            data.clone(),
        ));
    }
    out
}

/// Past epochs whose secrets are kept, as the openmls engine keeps them: what REQ-7.2-4
/// asks, `limits::APP_EPOCH_LAG_MAX` (the gateway accepts nothing older, REQ-7.2-3).
const PAST_EPOCHS: u64 = confab_spec::limits::APP_EPOCH_LAG_MAX;

/// How far a KeyPackage's lifetime starts before its creation (openmls uses one hour).
const KEY_PACKAGE_BACKDATE_MS: u64 = 3_600_000;

fn mls_time(now: UnixMs) -> MlsTime {
    MlsTime::from_duration_since_epoch(Duration::from_millis(now.0))
}

impl<C: MlsConfig + Clone> MlsRsEngine<C> {
    /// Runs `f` on the group, then persists it; on failure forgets the cached group. An
    /// open receive batch ends first and every unwritten group is written, except that this
    /// group's state is written once, after `f`, with what the batches did to it (their
    /// outcomes are journaled before: a failure of `f` leaves the state last written, which
    /// still holds their keys).
    fn mutate<T>(
        &mut self,
        id: &ConversationId,
        f: impl FnOnce(&mut Group<C>, UnixMs) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let all = self.unwritten.take_all();
        self.finish(all, Some(id))?;
        let now = (self.clock)();
        let result = self.load(id).and_then(|g| {
            let value = f(g, now)?;
            g.write_to_storage().map_err(map_err)?;
            Ok(value)
        });
        if result.is_err() {
            self.groups.remove(id);
        }
        result
    }

    /// Ends the open receive batch, if any, journaling the outcomes not released yet, then
    /// writes `groups` but `except` (which the caller writes next).
    fn finish(
        &mut self,
        mut groups: Vec<ConversationId>,
        except: Option<&ConversationId>,
    ) -> Result<(), EngineError> {
        if self.batch {
            self.batch = false;
            // The journal first: a crash before the groups are written leaves their old
            // state (with the keys) and the outcomes.
            let committed = self
                .journal
                .flush(&self.journal_conn)
                .and_then(|()| self.journal_conn.execute_batch("COMMIT").map_err(storage));
            if let Err(e) = committed {
                let _ = self.journal_conn.execute_batch("ROLLBACK");
                // The groups go back to their state last written, which still holds the
                // keys of the outcomes that were not written.
                groups.extend(self.unwritten.take_all());
                for id in &groups {
                    self.groups.remove(id);
                }
                self.journal.reload(&self.journal_conn)?;
                return Err(e);
            }
        }
        groups.retain(|id| Some(id) != except);
        let mut failed = None;
        for id in groups {
            let written = match self.groups.get_mut(&id) {
                Some(g) => g.write_to_storage().map_err(map_err),
                None => Ok(()),
            };
            if let Err(e) = written {
                self.groups.remove(&id);
                failed.get_or_insert(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Ends the open batch and writes every group with unwritten state (before any other
    /// operation).
    fn write_all(&mut self) -> Result<(), EngineError> {
        let all = self.unwritten.take_all();
        self.finish(all, None)
    }

    /// Persists a group this device just created or joined and caches it; returns its id.
    /// A group re-initialised under the id of the group it `replaces` starts from epoch 0
    /// again, so the old epochs are deleted before the new state is written.
    fn adopt(
        &mut self,
        mut group: Group<C>,
        replaces: Option<&ConversationId>,
    ) -> Result<ConversationId, EngineError> {
        self.write_all()?;
        let id = ConversationId::from_slice(group.group_id())
            .map_err(|_| EngineError::Malformed("group id is not a conversation id".into()))?;
        if replaces == Some(&id) {
            self.group_states.delete_group(&id.0).map_err(storage)?;
        }
        group.write_to_storage().map_err(map_err)?;
        self.groups.insert(id, group);
        Ok(id)
    }

    /// The ReInit client of a group whose ReInit Commit was applied. It consumes the cached
    /// group; the durable state stays on disk until the new group replaces it.
    fn reinit_client(
        &mut self,
        id: &ConversationId,
    ) -> Result<mls_rs::group::ReinitClient<C>, EngineError> {
        self.write_all()?;
        self.load(id)?;
        let g = self.groups.remove(id).ok_or(EngineError::GroupNotFound)?;
        g.get_reinit_client(None, None).map_err(map_err)
    }

    fn load(&mut self, id: &ConversationId) -> Result<&mut Group<C>, EngineError> {
        if !self.groups.contains_key(id) {
            let group = self.client.load_group(&id.0).map_err(map_err)?;
            self.groups.insert(*id, group);
        }
        self.groups.get_mut(id).ok_or(EngineError::GroupNotFound)
    }

    fn read<T>(
        &self,
        id: &ConversationId,
        f: impl FnOnce(&Group<C>) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        match self.groups.get(id) {
            Some(g) => f(g),
            None => f(&self.client.load_group(&id.0).map_err(map_err)?),
        }
    }
}

fn commit_output(output: mls_rs::group::CommitOutput) -> Result<CommitOutput, EngineError> {
    Ok(CommitOutput {
        commit: to_bytes(&output.commit_message)?,
        welcome: first_welcome(&output.welcome_messages)?,
        group_info: output
            .external_commit_group_info
            .as_ref()
            .map(to_bytes)
            .transpose()?,
    })
}

/// The single Welcome mls-rs produces (`single_welcome_message` is on), if any.
fn first_welcome(welcomes: &[MlsMessage]) -> Result<Option<Vec<u8>>, EngineError> {
    welcomes.first().map(to_bytes).transpose()
}

impl<C: MlsConfig + Clone + Send> MlsEngine for MlsRsEngine<C>
where
    Group<C>: Send,
    Client<C>: Send,
{
    fn kind(&self) -> EngineKind {
        EngineKind::MlsRs
    }

    fn device(&self) -> DeviceId {
        self.device
    }

    fn key_packages(
        &mut self,
        count: usize,
        last_resort: bool,
    ) -> Result<Vec<Vec<u8>>, EngineError> {
        // mls-rs writes KeyPackages through its own connection, which would wait for the
        // batch's journal transaction on this thread until it timed out.
        self.write_all()?;
        // Backdated as openmls does, so that a member whose clock is behind this device's
        // (or an engine that reads another clock) does not see the lifetime as not yet
        // begun.
        let now = UnixMs((self.clock)().0.saturating_sub(KEY_PACKAGE_BACKDATE_MS));
        let mut extensions = ExtensionList::new();
        if last_resort {
            extensions
                .set_from(LastResortKeyPackageExt)
                .map_err(|e| EngineError::Other(e.to_string()))?;
        }
        (0..count)
            .map(|_| {
                let kp = self
                    .client
                    .generate_key_package_message(
                        extensions.clone(),
                        ExtensionList::new(),
                        Some(mls_time(now)),
                    )
                    .map_err(map_err)?;
                to_bytes(&kp)
            })
            .collect()
    }

    fn create_group_with(
        &mut self,
        group: &ConversationId,
        extensions: &[(u16, Vec<u8>)],
    ) -> Result<Vec<u8>, EngineError> {
        let now = (self.clock)();
        let g = self
            .client
            .create_group_with_id(
                group.0.to_vec(),
                extension_list(extensions),
                ExtensionList::new(),
                Some(mls_time(now)),
            )
            .map_err(map_err)?;
        // The ratchet tree goes in-band (SPEC.md 6.1, 7.1).
        let info = to_bytes(&g.group_info_message(true).map_err(map_err)?)?;
        self.adopt(g, None)?;
        Ok(info)
    }

    fn add_members(
        &mut self,
        group: &ConversationId,
        key_packages: &[Vec<u8>],
    ) -> Result<CommitOutput, EngineError> {
        self.commit(group, key_packages, &[], &[], false)
    }

    fn remove_members(
        &mut self,
        group: &ConversationId,
        devices: &[DeviceId],
    ) -> Result<CommitOutput, EngineError> {
        self.commit(group, &[], devices, &[], false)
    }

    fn self_update(&mut self, group: &ConversationId) -> Result<CommitOutput, EngineError> {
        // A commit with no proposals carries an update path: a fresh leaf.
        self.commit(group, &[], &[], &[], true)
    }

    fn leave(&mut self, group: &ConversationId) -> Result<Vec<u8>, EngineError> {
        self.mutate(group, |g, _| {
            let own = g.current_member_index();
            to_bytes(&g.propose_remove(own, vec![]).map_err(map_err)?)
        })
    }

    fn propose_add(
        &mut self,
        group: &ConversationId,
        key_package: &[u8],
    ) -> Result<Vec<u8>, EngineError> {
        let kp = parse(key_package)?;
        self.mutate(group, |g, _| {
            to_bytes(&g.propose_add(kp, vec![]).map_err(map_err)?)
        })
    }

    fn propose_remove(
        &mut self,
        group: &ConversationId,
        device: &DeviceId,
    ) -> Result<Vec<u8>, EngineError> {
        self.mutate(group, |g, _| {
            let leaf = leaf_of(g, device)?;
            to_bytes(&g.propose_remove(leaf, vec![]).map_err(map_err)?)
        })
    }

    fn propose_update(&mut self, group: &ConversationId) -> Result<Vec<u8>, EngineError> {
        self.mutate(group, |g, _| {
            to_bytes(&g.propose_update(vec![]).map_err(map_err)?)
        })
    }

    fn commit(
        &mut self,
        group: &ConversationId,
        adds: &[Vec<u8>],
        removes: &[DeviceId],
        extra: &[ExtraProposal],
        _force_path: bool,
    ) -> Result<CommitOutput, EngineError> {
        let adds = adds
            .iter()
            .map(|kp| parse(kp))
            .collect::<Result<Vec<_>, _>>()?;
        self.mutate(group, |g, _| {
            if g.has_pending_commit() {
                return Err(EngineError::PendingCommit);
            }
            let leaves = removes
                .iter()
                .map(|d| leaf_of(g, d))
                .collect::<Result<Vec<_>, _>>()?;
            let mut builder = g.commit_builder();
            for kp in adds {
                builder = builder.add_member(kp).map_err(map_err)?;
            }
            for leaf in leaves {
                builder = builder.remove_member(leaf).map_err(map_err)?;
            }
            for p in extra {
                builder = match p {
                    ExtraProposal::ExternalPsk(id) => builder
                        .add_external_psk(ExternalPskId::new(id.clone()))
                        .map_err(map_err)?,
                    ExtraProposal::ResumptionPsk(epoch) => {
                        builder.add_resumption_psk(*epoch).map_err(map_err)?
                    }
                    ExtraProposal::GroupContextExtensions(list) => builder
                        .set_group_context_ext(extension_list(list))
                        .map_err(map_err)?,
                };
            }
            commit_output(builder.build().map_err(map_err)?)
        })
    }

    fn group_info(&mut self, group: &ConversationId) -> Result<Vec<u8>, EngineError> {
        self.mutate(group, |g, _| {
            to_bytes(
                &g.group_info_message_allowing_ext_commit(true)
                    .map_err(map_err)?,
            )
        })
    }

    fn resync(
        &mut self,
        group: &ConversationId,
        group_info: &[u8],
        ratchet_tree: Option<&[u8]>,
    ) -> Result<CommitOutput, EngineError> {
        self.write_all()?;
        let info = parse(group_info)?;
        let tree = match ratchet_tree {
            Some(bytes) => ExportedTree::from_bytes(bytes).map_err(map_err)?,
            None => info
                .as_group_info()
                .and_then(|i| i.extensions().get_as::<RatchetTreeExt>().ok().flatten())
                .map(|ext| ext.tree_data)
                .ok_or_else(|| {
                    EngineError::Malformed("no ratchet tree for the GroupInfo".into())
                })?,
        };
        if info.group_id() != Some(group.0.as_slice()) {
            return Err(EngineError::Malformed(
                "the GroupInfo is of another group".into(),
            ));
        }
        // The leaf holding this device's certificate is the one the resync replaces.
        let mut own = None;
        for member in tree.roster().members_iter() {
            let Some(basic) = member.signing_identity.credential.as_basic() else {
                continue;
            };
            if device_of(&basic.identifier).ok() == Some(self.device) {
                own = Some(member.index);
            }
        }
        let own = own.ok_or(EngineError::Removed)?;
        // The old state's epochs go first: the new group numbers its own from the
        // GroupInfo's, and mls-rs refuses a prior epoch that does not follow the stored
        // ones. The old state is forked or stale: nothing is lost that could still send.
        self.groups.remove(group);
        self.group_states.delete_group(&group.0).map_err(storage)?;
        let (g, commit) = self
            .client
            .external_commit_builder()
            .map_err(map_err)?
            .with_tree_data(tree)
            .with_removal(own)
            .build(info)
            .map_err(map_err)?;
        let group_info = to_bytes(
            &g.group_info_message_allowing_ext_commit(false)
                .map_err(map_err)?,
        )?;
        let commit = to_bytes(&commit)?;
        self.adopt(g, Some(group))?;
        Ok(CommitOutput {
            commit,
            welcome: None,
            group_info: Some(group_info),
        })
    }

    fn join_external(
        &mut self,
        group_info: &[u8],
        remove_prior: Option<u32>,
        psks: &[Vec<u8>],
    ) -> Result<(ConversationId, Vec<u8>), EngineError> {
        let info = parse(group_info)?;
        let mut builder = self.client.external_commit_builder().map_err(map_err)?;
        if let Some(leaf) = remove_prior {
            builder = builder.with_removal(leaf);
        }
        for id in psks {
            builder = builder.with_external_psk(ExternalPskId::new(id.clone()));
        }
        let (g, commit) = builder.build(info).map_err(map_err)?;
        let commit = to_bytes(&commit)?;
        Ok((self.adopt(g, None)?, commit))
    }

    fn branch(
        &mut self,
        group: &ConversationId,
        new_group: &ConversationId,
        key_packages: &[Vec<u8>],
    ) -> Result<Vec<u8>, EngineError> {
        let kps = key_packages
            .iter()
            .map(|k| parse(k))
            .collect::<Result<Vec<_>, _>>()?;
        let (sub, welcomes) = self
            .load(group)?
            .branch(new_group.0.to_vec(), kps, None)
            .map_err(map_err)?;
        self.adopt(sub, None)?;
        first_welcome(&welcomes)?
            .ok_or_else(|| EngineError::Other("branch produced no Welcome".into()))
    }

    fn join_branch(
        &mut self,
        group: &ConversationId,
        welcome: &[u8],
    ) -> Result<ConversationId, EngineError> {
        let welcome = parse(welcome)?;
        let (sub, _) = self
            .load(group)?
            .join_subgroup(&welcome, None, None)
            .map_err(map_err)?;
        self.adopt(sub, None)
    }

    fn propose_reinit(
        &mut self,
        group: &ConversationId,
        new_group: &ConversationId,
        extensions: &[(u16, Vec<u8>)],
    ) -> Result<Vec<u8>, EngineError> {
        let extensions = extension_list(extensions);
        let new_id = new_group.0.to_vec();
        self.mutate(group, |g, _| {
            to_bytes(
                &g.propose_reinit(
                    Some(new_id),
                    mls_rs::ProtocolVersion::MLS_10,
                    CIPHERSUITE,
                    extensions,
                    vec![],
                )
                .map_err(map_err)?,
            )
        })
    }

    fn reinit_key_package(&mut self, group: &ConversationId) -> Result<Vec<u8>, EngineError> {
        let client = self.reinit_client(group)?;
        to_bytes(&client.generate_key_package(None).map_err(map_err)?)
    }

    fn reinit_commit(
        &mut self,
        group: &ConversationId,
        key_packages: &[Vec<u8>],
    ) -> Result<(ConversationId, Vec<u8>), EngineError> {
        let kps = key_packages
            .iter()
            .map(|k| parse(k))
            .collect::<Result<Vec<_>, _>>()?;
        let client = self.reinit_client(group)?;
        let (new, welcomes) = client
            .commit(kps, ExtensionList::new(), None)
            .map_err(map_err)?;
        let id = self.adopt(new, Some(group))?;
        let welcome = first_welcome(&welcomes)?
            .ok_or_else(|| EngineError::Other("reinit produced no Welcome".into()))?;
        Ok((id, welcome))
    }

    fn reinit_join(
        &mut self,
        group: &ConversationId,
        welcome: &[u8],
    ) -> Result<ConversationId, EngineError> {
        let welcome = parse(welcome)?;
        let client = self.reinit_client(group)?;
        let (new, _) = client.join(&welcome, None, None).map_err(map_err)?;
        self.adopt(new, Some(group))
    }

    fn install_external_psk(&mut self, id: &[u8], secret: &[u8]) -> Result<(), EngineError> {
        self.write_all()?;
        self.psks
            .insert(id, &PreSharedKey::new(secret.to_vec()))
            .map_err(storage)
    }

    fn propose_extra(
        &mut self,
        group: &ConversationId,
        proposal: &ExtraProposal,
    ) -> Result<Vec<u8>, EngineError> {
        let proposal = proposal.clone();
        self.mutate(group, |g, _| {
            let msg = match proposal {
                ExtraProposal::ExternalPsk(id) => {
                    g.propose_external_psk(ExternalPskId::new(id), vec![])
                }
                ExtraProposal::ResumptionPsk(epoch) => g.propose_resumption_psk(epoch, vec![]),
                ExtraProposal::GroupContextExtensions(list) => {
                    g.propose_group_context_extensions(extension_list(&list), vec![])
                }
            }
            .map_err(map_err)?;
            to_bytes(&msg)
        })
    }

    fn merge_pending_commit(&mut self, group: &ConversationId) -> Result<(), EngineError> {
        self.mutate(group, |g, _| {
            if !g.has_pending_commit() {
                return Err(EngineError::NoPendingCommit);
            }
            g.apply_pending_commit().map(|_| ()).map_err(map_err)
        })
    }

    fn discard_pending_commit(&mut self, group: &ConversationId) -> Result<(), EngineError> {
        self.mutate(group, |g, _| {
            if !g.has_pending_commit() {
                return Err(EngineError::NoPendingCommit);
            }
            g.clear_pending_commit();
            Ok(())
        })
    }

    fn has_pending_commit(&self, group: &ConversationId) -> Result<bool, EngineError> {
        self.read(group, |g| Ok(g.has_pending_commit()))
    }

    fn join(&mut self, welcome: &[u8]) -> Result<ConversationId, EngineError> {
        self.write_all()?;
        let now = (self.clock)();
        let message = parse(welcome)?;
        let (g, _) = self
            .client
            .join_group(None, &message, Some(mls_time(now)))
            .map_err(map_err)?;
        // A device removed from a group and added again replaces its old state.
        let id = ConversationId::from_slice(g.group_id())
            .map_err(|_| EngineError::Malformed("group id is not a conversation id".into()))?;
        self.groups.remove(&id);
        self.adopt(g, Some(&id))
    }

    fn encrypt(
        &mut self,
        group: &ConversationId,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, EngineError> {
        self.mutate(group, |g, _| {
            if g.has_pending_commit() {
                return Err(EngineError::PendingCommit);
            }
            to_bytes(
                &g.encrypt_application_message(plaintext, vec![])
                    .map_err(map_err)?,
            )
        })
    }

    fn process(
        &mut self,
        group: &ConversationId,
        message: &[u8],
    ) -> Result<Processed, EngineError> {
        let message = parse(message)?;
        let own = self.device;
        self.mutate(group, |g, now| process_in(g, own, now, message))
    }

    fn verify_proposal(
        &mut self,
        group: &ConversationId,
        message: &[u8],
    ) -> Result<Option<DeviceId>, EngineError> {
        super::require_public_proposal(message)?;
        let message = parse(message)?;
        let own = self.device;
        self.mutate(group, |g, now| {
            let processed = process_in(g, own, now, message);
            // mls-rs caches a received proposal for a Commit by reference; Confab's never
            // carry one, so it goes before the state is written.
            g.clear_proposal_cache();
            match processed? {
                Processed::Proposal { sender } => Ok(sender),
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
        if let Some(journaled) = self.journal.get(&self.journal_conn, group, seq)? {
            return Ok(journaled);
        }
        let message = parse(message)?;
        let own = self.device;
        let now = (self.clock)();
        self.load(group)?;
        let (journal, journal_conn) = (&mut self.journal, &self.journal_conn);
        let loaded = self.groups.get_mut(group).ok_or(EngineError::GroupNotFound);
        let (batch, unwritten) = (self.batch, &mut self.unwritten);
        let result = loaded.and_then(|g| {
            let processed = process_in(g, own, now, message)?;
            if let Processed::Application { sender, plaintext } = &processed {
                // Journaled before the state that consumed the secret is written: after a
                // crash in between, the key is still in the old state and the outcome is
                // in the journal.
                if batch {
                    // Written when the batch ends, before the groups (or never, if the
                    // client recorded the message by then).
                    journal.record(group, seq, sender, plaintext);
                    unwritten.read(group, sender, now);
                    return Ok(processed);
                }
                super::journal::put(journal_conn, group, seq, sender, plaintext)?;
                journal.note_stored(group, seq);
            }
            g.write_to_storage().map_err(map_err)?;
            // The write covers what earlier batches read.
            unwritten.forget(group);
            Ok(processed)
        });
        if result.is_err() {
            // The group is reloaded from its durable state. That state may predate entries
            // read since: it still holds their keys (less forward secrecy until the next
            // write, no loss; their outcomes are recorded or journaled).
            self.groups.remove(group);
            self.unwritten.forget(group);
        }
        result
    }

    fn begin_receive_batch(&mut self) -> Result<(), EngineError> {
        if !self.batch {
            self.journal_conn.execute_batch("BEGIN").map_err(storage)?;
            self.batch = true;
        }
        Ok(())
    }

    fn end_receive_batch(&mut self) -> Result<(), EngineError> {
        let due = self.unwritten.take_due((self.clock)());
        self.finish(due, None)
    }

    fn set_state_write_window(&mut self, window: StateWriteWindow) {
        self.unwritten.set_window(window);
    }

    fn unwritten_due_in(&self) -> Option<u64> {
        self.unwritten.due_in((self.clock)())
    }

    fn release_processed(&mut self, group: &ConversationId, seq: u64) -> Result<(), EngineError> {
        self.journal.release(&self.journal_conn, group, seq)
    }

    fn epoch(&self, group: &ConversationId) -> Result<u64, EngineError> {
        self.read(group, |g| Ok(g.current_epoch()))
    }

    fn epoch_authenticator(&self, group: &ConversationId) -> Result<Vec<u8>, EngineError> {
        self.read(group, |g| {
            Ok(g.epoch_authenticator()
                .map_err(map_err)?
                .as_bytes()
                .to_vec())
        })
    }

    fn export_secret(
        &self,
        group: &ConversationId,
        label: &str,
        context: &[u8],
        len: usize,
    ) -> Result<Vec<u8>, EngineError> {
        self.read(group, |g| {
            Ok(g.export_secret(label.as_bytes(), context, len)
                .map_err(map_err)?
                .as_bytes()
                .to_vec())
        })
    }

    fn members(&self, group: &ConversationId) -> Result<Vec<(u32, DeviceId)>, EngineError> {
        self.read(group, roster)
    }

    fn context_extension(
        &self,
        group: &ConversationId,
        extension_type: u16,
    ) -> Result<Option<Vec<u8>>, EngineError> {
        self.read(group, |g| {
            Ok(g.context()
                .extensions
                .get(ExtensionType::new(extension_type))
                .map(|e| e.extension_data().to_vec()))
        })
    }
}

/// Processes `message` in `g` (in memory; the caller writes the state).
fn process_in<C: MlsConfig>(
    g: &mut Group<C>,
    own: DeviceId,
    now: UnixMs,
    message: MlsMessage,
) -> Result<Processed, EngineError> {
    // An application message changes no membership: only its sender is looked up (the
    // roster decodes the certificate of every member, a cost that grows with the room).
    let application = matches!(
        message.description(),
        MlsMessageDescription::PrivateProtocolMessage {
            content_type: ContentType::Application,
            ..
        }
    );
    let before = if application { Vec::new() } else { roster(g)? };
    let received = g
        .process_incoming_message_with_time(message, mls_time(now))
        .map_err(map_err)?;
    let member = |index: u32, roster: &[(u32, DeviceId)]| {
        roster.iter().find(|(l, _)| *l == index).map(|(_, d)| *d)
    };
    match received {
        ReceivedMessage::ApplicationMessage(app) => Ok(Processed::Application {
            sender: member_device(g, app.sender_index)?,
            plaintext: app.data().to_vec(),
        }),
        ReceivedMessage::Proposal(p) => Ok(Processed::Proposal {
            sender: match p.sender {
                mls_rs::group::ProposalSender::Member(i) => member(i, &before),
                _ => None,
            },
        }),
        ReceivedMessage::Commit(c) => {
            let self_removed = matches!(c.effect, mls_rs::group::CommitEffect::Removed { .. });
            let after = if self_removed { Vec::new() } else { roster(g)? };
            // By device: a resync moves a device to a new leaf without adding or removing
            // it (SPEC.md 7.10).
            let has = |roster: &[(u32, DeviceId)], d: &DeviceId| roster.iter().any(|(_, m)| m == d);
            let added = after
                .iter()
                .filter(|(_, d)| !has(&before, d))
                .map(|(_, d)| *d)
                .collect();
            let removed = before
                .iter()
                .filter(|(_, d)| !has(&after, d) && (!self_removed || *d != own))
                .map(|(_, d)| *d)
                .collect();
            let sender = if c.is_external {
                // The committer's leaf is new; the removed copy of this device reads the
                // certificate from the Commit's leaf (its own group is gone).
                member(c.committer, &after).or_else(|| self_removed.then_some(own))
            } else {
                member(c.committer, &before)
            };
            Ok(Processed::Commit {
                sender,
                epoch: g.current_epoch(),
                added,
                removed,
                self_removed,
                external: c.is_external,
            })
        }
        _ => Err(EngineError::Malformed("not a group message".into())),
    }
}
