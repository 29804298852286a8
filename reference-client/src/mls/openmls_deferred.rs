//! An openmls storage provider that can hold back the write of the message secrets, for
//! receive batches ([`super::MlsEngine::begin_receive_batch`]).
//!
//! openmls writes a group's whole `MessageSecretsStore` after every application message it
//! decrypts. With the past epochs' member lists inside it (openmls issue #2080) that write
//! grows with the room: ~25 ms per message in a room of 1,000 on this project's machines,
//! when it was JSON.
//! Inside a batch the engine processes application messages through this provider with
//! `defer_message_secrets` set, which skips that one write (the ratchet's progress stays in
//! the in-memory group), and writes the store once when the batch ends.
//!
//! The message secrets are also the one entity kept in a compact binary form (postcard, in
//! the table [`MESSAGE_SECRETS_TABLE`]) instead of the JSON of the SQLite provider, whose
//! byte arrays are arrays of decimal numbers: for a room of 1,000 with 4 past epochs that
//! is ~4.9 MB per write, against 1.3 MB in postcard, written ~4 times and read ~7 times
//! faster. Secrets written in JSON before are still read, and the next write replaces
//! them. postcard is not self-describing: the bytes follow openmls' field order, so
//! `Cargo.toml` pins openmls exactly, and a release that changes the message secrets'
//! fields needs a migration (read with the old release, write anew) before it is taken.
//! Every other call goes to the wrapped provider unchanged; the method list follows
//! the `StorageProvider` trait of openmls_traits 0.6.

use openmls_traits::storage::{StorageProvider, traits};
use rusqlite::{Connection, OptionalExtension as _, params};

/// The table of the message secrets in postcard: group id (JSON, as the provider's keys)
/// and the format byte (1) followed by the postcard bytes.
pub const MESSAGE_SECRETS_TABLE: &str = "CREATE TABLE IF NOT EXISTS confab_message_secrets (
    group_id BLOB PRIMARY KEY,
    secrets BLOB NOT NULL
) WITHOUT ROWID;";

/// The first byte of a stored value: its format, so that another one can follow.
const MESSAGE_SECRETS_FORMAT: u8 = 1;

/// `inner`, except that the message secrets live in [`MESSAGE_SECRETS_TABLE`] of `conn`
/// and `write_message_secrets` does nothing while `defer_message_secrets` is set.
pub struct DeferringStorage<'a, S> {
    /// The provider every other call goes to.
    pub inner: S,
    /// The connection holding [`MESSAGE_SECRETS_TABLE`] (the one `inner` uses).
    pub conn: &'a Connection,
    /// Skip writes of the message secrets (the caller writes them later).
    pub defer_message_secrets: bool,
}

fn encode_error(e: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(Box::new(e))
}

fn decode_error(e: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, Box::new(e))
}

impl<S> DeferringStorage<'_, S> {
    fn secrets_key(group_id: &impl serde::Serialize) -> Result<Vec<u8>, rusqlite::Error> {
        serde_json::to_vec(group_id).map_err(encode_error)
    }

    fn write_secrets(
        &self,
        group_id: &impl serde::Serialize,
        secrets: &impl serde::Serialize,
    ) -> Result<(), rusqlite::Error> {
        let value =
            postcard::to_extend(secrets, vec![MESSAGE_SECRETS_FORMAT]).map_err(encode_error)?;
        self.conn
            .prepare_cached(
                "INSERT INTO confab_message_secrets (group_id, secrets) VALUES (?1, ?2)
                 ON CONFLICT (group_id) DO UPDATE SET secrets = excluded.secrets",
            )?
            .execute(params![Self::secrets_key(group_id)?, value])?;
        Ok(())
    }

    fn read_secrets<T: serde::de::DeserializeOwned>(
        &self,
        group_id: &impl serde::Serialize,
    ) -> Result<Option<T>, rusqlite::Error> {
        let value: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT secrets FROM confab_message_secrets WHERE group_id = ?1")?
            .query_row([Self::secrets_key(group_id)?], |r| r.get(0))
            .optional()?;
        match value.as_deref() {
            None => Ok(None),
            Some([MESSAGE_SECRETS_FORMAT, rest @ ..]) => {
                postcard::from_bytes(rest).map(Some).map_err(decode_error)
            }
            Some(_) => Err(decode_error(std::io::Error::other(
                "message secrets in an unknown format",
            ))),
        }
    }

    fn delete_secrets(&self, group_id: &impl serde::Serialize) -> Result<(), rusqlite::Error> {
        self.conn
            .prepare_cached("DELETE FROM confab_message_secrets WHERE group_id = ?1")?
            .execute([Self::secrets_key(group_id)?])?;
        Ok(())
    }
}

impl<const VERSION: u16, S: StorageProvider<VERSION, Error = rusqlite::Error>>
    StorageProvider<VERSION> for DeferringStorage<'_, S>
{
    type Error = S::Error;

    fn write_mls_join_config<
        GroupId: traits::GroupId<VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<VERSION>,
    >(
        &self,
        group_id: &GroupId,
        config: &MlsGroupJoinConfig,
    ) -> Result<(), Self::Error> {
        self.inner
            .write_mls_join_config::<GroupId, MlsGroupJoinConfig>(group_id, config)
    }

    fn append_own_leaf_node<
        GroupId: traits::GroupId<VERSION>,
        LeafNode: traits::LeafNode<VERSION>,
    >(
        &self,
        group_id: &GroupId,
        leaf_node: &LeafNode,
    ) -> Result<(), Self::Error> {
        self.inner
            .append_own_leaf_node::<GroupId, LeafNode>(group_id, leaf_node)
    }

    fn queue_proposal<
        GroupId: traits::GroupId<VERSION>,
        ProposalRef: traits::ProposalRef<VERSION>,
        QueuedProposal: traits::QueuedProposal<VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
        proposal: &QueuedProposal,
    ) -> Result<(), Self::Error> {
        self.inner
            .queue_proposal::<GroupId, ProposalRef, QueuedProposal>(
                group_id,
                proposal_ref,
                proposal,
            )
    }

    fn write_tree<GroupId: traits::GroupId<VERSION>, TreeSync: traits::TreeSync<VERSION>>(
        &self,
        group_id: &GroupId,
        tree: &TreeSync,
    ) -> Result<(), Self::Error> {
        self.inner.write_tree::<GroupId, TreeSync>(group_id, tree)
    }

    fn write_interim_transcript_hash<
        GroupId: traits::GroupId<VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<VERSION>,
    >(
        &self,
        group_id: &GroupId,
        interim_transcript_hash: &InterimTranscriptHash,
    ) -> Result<(), Self::Error> {
        self.inner
            .write_interim_transcript_hash::<GroupId, InterimTranscriptHash>(
                group_id,
                interim_transcript_hash,
            )
    }

    fn write_context<
        GroupId: traits::GroupId<VERSION>,
        GroupContext: traits::GroupContext<VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_context: &GroupContext,
    ) -> Result<(), Self::Error> {
        self.inner
            .write_context::<GroupId, GroupContext>(group_id, group_context)
    }

    fn write_confirmation_tag<
        GroupId: traits::GroupId<VERSION>,
        ConfirmationTag: traits::ConfirmationTag<VERSION>,
    >(
        &self,
        group_id: &GroupId,
        confirmation_tag: &ConfirmationTag,
    ) -> Result<(), Self::Error> {
        self.inner
            .write_confirmation_tag::<GroupId, ConfirmationTag>(group_id, confirmation_tag)
    }

    fn write_group_state<
        GroupState: traits::GroupState<VERSION>,
        GroupId: traits::GroupId<VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_state: &GroupState,
    ) -> Result<(), Self::Error> {
        self.inner
            .write_group_state::<GroupState, GroupId>(group_id, group_state)
    }

    fn write_message_secrets<
        GroupId: traits::GroupId<VERSION>,
        MessageSecrets: traits::MessageSecrets<VERSION>,
    >(
        &self,
        group_id: &GroupId,
        message_secrets: &MessageSecrets,
    ) -> Result<(), Self::Error> {
        if self.defer_message_secrets {
            return Ok(());
        }
        self.write_secrets(group_id, message_secrets)?;
        // Secrets written in JSON before this table existed are replaced.
        self.inner.delete_message_secrets::<GroupId>(group_id)
    }

    fn write_resumption_psk_store<
        GroupId: traits::GroupId<VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<VERSION>,
    >(
        &self,
        group_id: &GroupId,
        resumption_psk_store: &ResumptionPskStore,
    ) -> Result<(), Self::Error> {
        self.inner
            .write_resumption_psk_store::<GroupId, ResumptionPskStore>(
                group_id,
                resumption_psk_store,
            )
    }

    fn write_own_leaf_index<
        GroupId: traits::GroupId<VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<VERSION>,
    >(
        &self,
        group_id: &GroupId,
        own_leaf_index: &LeafNodeIndex,
    ) -> Result<(), Self::Error> {
        self.inner
            .write_own_leaf_index::<GroupId, LeafNodeIndex>(group_id, own_leaf_index)
    }

    fn write_group_epoch_secrets<
        GroupId: traits::GroupId<VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_epoch_secrets: &GroupEpochSecrets,
    ) -> Result<(), Self::Error> {
        self.inner
            .write_group_epoch_secrets::<GroupId, GroupEpochSecrets>(group_id, group_epoch_secrets)
    }

    fn write_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
        signature_key_pair: &SignatureKeyPair,
    ) -> Result<(), Self::Error> {
        self.inner
            .write_signature_key_pair::<SignaturePublicKey, SignatureKeyPair>(
                public_key,
                signature_key_pair,
            )
    }

    fn write_encryption_key_pair<
        EncryptionKey: traits::EncryptionKey<VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
        key_pair: &HpkeKeyPair,
    ) -> Result<(), Self::Error> {
        self.inner
            .write_encryption_key_pair::<EncryptionKey, HpkeKeyPair>(public_key, key_pair)
    }

    fn write_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<VERSION>,
        EpochKey: traits::EpochKey<VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
        key_pairs: &[HpkeKeyPair],
    ) -> Result<(), Self::Error> {
        self.inner
            .write_encryption_epoch_key_pairs::<GroupId, EpochKey, HpkeKeyPair>(
                group_id, epoch, leaf_index, key_pairs,
            )
    }

    fn write_key_package<
        HashReference: traits::HashReference<VERSION>,
        KeyPackage: traits::KeyPackage<VERSION>,
    >(
        &self,
        hash_ref: &HashReference,
        key_package: &KeyPackage,
    ) -> Result<(), Self::Error> {
        self.inner
            .write_key_package::<HashReference, KeyPackage>(hash_ref, key_package)
    }

    fn write_psk<PskId: traits::PskId<VERSION>, PskBundle: traits::PskBundle<VERSION>>(
        &self,
        psk_id: &PskId,
        psk: &PskBundle,
    ) -> Result<(), Self::Error> {
        self.inner.write_psk::<PskId, PskBundle>(psk_id, psk)
    }

    fn mls_group_join_config<
        GroupId: traits::GroupId<VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MlsGroupJoinConfig>, Self::Error> {
        self.inner
            .mls_group_join_config::<GroupId, MlsGroupJoinConfig>(group_id)
    }

    fn own_leaf_nodes<GroupId: traits::GroupId<VERSION>, LeafNode: traits::LeafNode<VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<LeafNode>, Self::Error> {
        self.inner.own_leaf_nodes::<GroupId, LeafNode>(group_id)
    }

    fn queued_proposal_refs<
        GroupId: traits::GroupId<VERSION>,
        ProposalRef: traits::ProposalRef<VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<ProposalRef>, Self::Error> {
        self.inner
            .queued_proposal_refs::<GroupId, ProposalRef>(group_id)
    }

    fn queued_proposals<
        GroupId: traits::GroupId<VERSION>,
        ProposalRef: traits::ProposalRef<VERSION>,
        QueuedProposal: traits::QueuedProposal<VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<(ProposalRef, QueuedProposal)>, Self::Error> {
        self.inner
            .queued_proposals::<GroupId, ProposalRef, QueuedProposal>(group_id)
    }

    fn tree<GroupId: traits::GroupId<VERSION>, TreeSync: traits::TreeSync<VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<TreeSync>, Self::Error> {
        self.inner.tree::<GroupId, TreeSync>(group_id)
    }

    fn group_context<
        GroupId: traits::GroupId<VERSION>,
        GroupContext: traits::GroupContext<VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupContext>, Self::Error> {
        self.inner.group_context::<GroupId, GroupContext>(group_id)
    }

    fn interim_transcript_hash<
        GroupId: traits::GroupId<VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<InterimTranscriptHash>, Self::Error> {
        self.inner
            .interim_transcript_hash::<GroupId, InterimTranscriptHash>(group_id)
    }

    fn confirmation_tag<
        GroupId: traits::GroupId<VERSION>,
        ConfirmationTag: traits::ConfirmationTag<VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ConfirmationTag>, Self::Error> {
        self.inner
            .confirmation_tag::<GroupId, ConfirmationTag>(group_id)
    }

    fn group_state<GroupState: traits::GroupState<VERSION>, GroupId: traits::GroupId<VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupState>, Self::Error> {
        self.inner.group_state::<GroupState, GroupId>(group_id)
    }

    fn message_secrets<
        GroupId: traits::GroupId<VERSION>,
        MessageSecrets: traits::MessageSecrets<VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MessageSecrets>, Self::Error> {
        match self.read_secrets(group_id)? {
            Some(secrets) => Ok(Some(secrets)),
            // Written in JSON before this table existed.
            None => self
                .inner
                .message_secrets::<GroupId, MessageSecrets>(group_id),
        }
    }

    fn resumption_psk_store<
        GroupId: traits::GroupId<VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ResumptionPskStore>, Self::Error> {
        self.inner
            .resumption_psk_store::<GroupId, ResumptionPskStore>(group_id)
    }

    fn own_leaf_index<
        GroupId: traits::GroupId<VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<LeafNodeIndex>, Self::Error> {
        self.inner
            .own_leaf_index::<GroupId, LeafNodeIndex>(group_id)
    }

    fn group_epoch_secrets<
        GroupId: traits::GroupId<VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupEpochSecrets>, Self::Error> {
        self.inner
            .group_epoch_secrets::<GroupId, GroupEpochSecrets>(group_id)
    }

    fn signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<Option<SignatureKeyPair>, Self::Error> {
        self.inner
            .signature_key_pair::<SignaturePublicKey, SignatureKeyPair>(public_key)
    }

    fn encryption_key_pair<
        HpkeKeyPair: traits::HpkeKeyPair<VERSION>,
        EncryptionKey: traits::EncryptionKey<VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<Option<HpkeKeyPair>, Self::Error> {
        self.inner
            .encryption_key_pair::<HpkeKeyPair, EncryptionKey>(public_key)
    }

    fn encryption_epoch_key_pairs<
        GroupId: traits::GroupId<VERSION>,
        EpochKey: traits::EpochKey<VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<Vec<HpkeKeyPair>, Self::Error> {
        self.inner
            .encryption_epoch_key_pairs::<GroupId, EpochKey, HpkeKeyPair>(
                group_id, epoch, leaf_index,
            )
    }

    fn key_package<
        KeyPackageRef: traits::HashReference<VERSION>,
        KeyPackage: traits::KeyPackage<VERSION>,
    >(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<Option<KeyPackage>, Self::Error> {
        self.inner
            .key_package::<KeyPackageRef, KeyPackage>(hash_ref)
    }

    fn psk<PskBundle: traits::PskBundle<VERSION>, PskId: traits::PskId<VERSION>>(
        &self,
        psk_id: &PskId,
    ) -> Result<Option<PskBundle>, Self::Error> {
        self.inner.psk::<PskBundle, PskId>(psk_id)
    }

    fn remove_proposal<
        GroupId: traits::GroupId<VERSION>,
        ProposalRef: traits::ProposalRef<VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
    ) -> Result<(), Self::Error> {
        self.inner
            .remove_proposal::<GroupId, ProposalRef>(group_id, proposal_ref)
    }

    fn delete_own_leaf_nodes<GroupId: traits::GroupId<VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.inner.delete_own_leaf_nodes::<GroupId>(group_id)
    }

    fn delete_group_config<GroupId: traits::GroupId<VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.inner.delete_group_config::<GroupId>(group_id)
    }

    fn delete_tree<GroupId: traits::GroupId<VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.inner.delete_tree::<GroupId>(group_id)
    }

    fn delete_confirmation_tag<GroupId: traits::GroupId<VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.inner.delete_confirmation_tag::<GroupId>(group_id)
    }

    fn delete_group_state<GroupId: traits::GroupId<VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.inner.delete_group_state::<GroupId>(group_id)
    }

    fn delete_context<GroupId: traits::GroupId<VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.inner.delete_context::<GroupId>(group_id)
    }

    fn delete_interim_transcript_hash<GroupId: traits::GroupId<VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.inner
            .delete_interim_transcript_hash::<GroupId>(group_id)
    }

    fn delete_message_secrets<GroupId: traits::GroupId<VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete_secrets(group_id)?;
        self.inner.delete_message_secrets::<GroupId>(group_id)
    }

    fn delete_all_resumption_psk_secrets<GroupId: traits::GroupId<VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.inner
            .delete_all_resumption_psk_secrets::<GroupId>(group_id)
    }

    fn delete_own_leaf_index<GroupId: traits::GroupId<VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.inner.delete_own_leaf_index::<GroupId>(group_id)
    }

    fn delete_group_epoch_secrets<GroupId: traits::GroupId<VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.inner.delete_group_epoch_secrets::<GroupId>(group_id)
    }

    fn clear_proposal_queue<
        GroupId: traits::GroupId<VERSION>,
        ProposalRef: traits::ProposalRef<VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.inner
            .clear_proposal_queue::<GroupId, ProposalRef>(group_id)
    }

    fn delete_signature_key_pair<SignaturePublicKey: traits::SignaturePublicKey<VERSION>>(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<(), Self::Error> {
        self.inner
            .delete_signature_key_pair::<SignaturePublicKey>(public_key)
    }

    fn delete_encryption_key_pair<EncryptionKey: traits::EncryptionKey<VERSION>>(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<(), Self::Error> {
        self.inner
            .delete_encryption_key_pair::<EncryptionKey>(public_key)
    }

    fn delete_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<VERSION>,
        EpochKey: traits::EpochKey<VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<(), Self::Error> {
        self.inner
            .delete_encryption_epoch_key_pairs::<GroupId, EpochKey>(group_id, epoch, leaf_index)
    }

    fn delete_key_package<KeyPackageRef: traits::HashReference<VERSION>>(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<(), Self::Error> {
        self.inner.delete_key_package::<KeyPackageRef>(hash_ref)
    }

    fn delete_psk<PskKey: traits::PskId<VERSION>>(
        &self,
        psk_id: &PskKey,
    ) -> Result<(), Self::Error> {
        self.inner.delete_psk::<PskKey>(psk_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mls::openmls_engine::JsonCodec;
    use openmls_sqlite_storage::SqliteStorageProvider;
    use openmls_traits::storage::{CURRENT_VERSION, Entity, Key};

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Secrets {
        epoch: u64,
        keys: Vec<Vec<u8>>,
        added_at: Option<u64>,
    }
    impl Entity<CURRENT_VERSION> for Secrets {}
    impl traits::MessageSecrets<CURRENT_VERSION> for Secrets {}

    #[derive(serde::Serialize)]
    struct Group(Vec<u8>);
    impl Key<CURRENT_VERSION> for Group {}
    impl traits::GroupId<CURRENT_VERSION> for Group {}

    fn secrets(epoch: u64) -> Secrets {
        Secrets {
            epoch,
            keys: vec![vec![7; 32], vec![]],
            added_at: Some(epoch * 10),
        }
    }

    /// Secrets written in JSON by the SQLite provider (before the postcard table) are
    /// read, replaced by the next write, and deleted with the group; a deferred write
    /// writes nothing.
    #[test]
    fn message_secrets_move_from_json_to_postcard_and_deferred_writes_wait() {
        let mut conn = Connection::open_in_memory().expect("sqlite");
        SqliteStorageProvider::<JsonCodec, &mut Connection>::new(&mut conn)
            .run_migrations()
            .expect("migrations");
        conn.execute_batch(MESSAGE_SECRETS_TABLE).expect("table");
        let legacy = SqliteStorageProvider::<JsonCodec, &Connection>::new(&conn);
        let storage = |defer| DeferringStorage {
            inner: SqliteStorageProvider::<JsonCodec, &Connection>::new(&conn),
            conn: &conn,
            defer_message_secrets: defer,
        };
        let (g, other) = (Group(vec![1, 2]), Group(vec![3]));
        let read = |g: &Group| -> Option<Secrets> {
            StorageProvider::<CURRENT_VERSION>::message_secrets(&storage(false), g).expect("read")
        };
        let legacy_read = |g: &Group| -> Option<Secrets> {
            StorageProvider::<CURRENT_VERSION>::message_secrets(&legacy, g).expect("read")
        };

        StorageProvider::<CURRENT_VERSION>::write_message_secrets(&legacy, &g, &secrets(1))
            .expect("legacy write");
        assert_eq!(read(&g), Some(secrets(1)), "JSON secrets still read");

        StorageProvider::<CURRENT_VERSION>::write_message_secrets(&storage(true), &g, &secrets(2))
            .expect("deferred write");
        assert_eq!(
            read(&g),
            Some(secrets(1)),
            "a deferred write writes nothing"
        );

        StorageProvider::<CURRENT_VERSION>::write_message_secrets(&storage(false), &g, &secrets(3))
            .expect("write");
        assert_eq!(read(&g), Some(secrets(3)));
        assert_eq!(legacy_read(&g), None, "the JSON row is replaced");
        let stored: Vec<u8> = conn
            .query_row("SELECT secrets FROM confab_message_secrets", [], |r| {
                r.get(0)
            })
            .expect("row");
        assert_eq!(stored.first(), Some(&MESSAGE_SECRETS_FORMAT));

        assert_eq!(read(&other), None, "groups are apart");
        StorageProvider::<CURRENT_VERSION>::write_message_secrets(&legacy, &g, &secrets(4))
            .expect("legacy write");
        StorageProvider::<CURRENT_VERSION>::delete_message_secrets(&storage(false), &g)
            .expect("delete");
        assert_eq!(read(&g), None, "deleted in both tables");
        assert_eq!(legacy_read(&g), None);

        conn.execute(
            "INSERT INTO confab_message_secrets (group_id, secrets) VALUES (?1, ?2)",
            params![serde_json::to_vec(&other).expect("key"), vec![9u8, 1, 2]],
        )
        .expect("insert");
        assert!(
            StorageProvider::<CURRENT_VERSION>::message_secrets::<Group, Secrets>(
                &storage(false),
                &other
            )
            .is_err(),
            "an unknown format is an error, not a silent loss"
        );
    }
}
