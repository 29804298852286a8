//! Conversations for the load modes, built with real MLS so that the gateway's roster
//! holds every member (SPEC.md 7.6): the creator's engine commits Adds of KeyPackages
//! made by each member's own engine. The engines alternate between openmls and mls-rs.
//! Members never join the MLS group: the load modes count and time deliveries, they do
//! not decrypt them.

use confab_client::mls::{EngineKind, ExtraProposal, MlsEngine, open_engine, system_clock};
use confab_spec::frame::{
    Accepted, ClientFrame, ConversationKind, CreateConversation, Send, ServerFrame,
};
use confab_spec::identity::DeviceKeyPair;
use confab_spec::ids::{ConversationId, MlsBytes, MsgId, UnixMs};
use confab_spec::rooms::RoomRoles;
use confab_spec::session::DeviceCredentials;
use rand_core::RngCore;

use crate::wire::{self, Identity, LoadError, Ws, fail};

/// Adds per Commit, which keeps each Commit well inside the default frame limit.
const ADDS_PER_COMMIT: usize = 25;

/// A conversation whose creator is connected and whose members are in the roster.
pub struct Conversation {
    /// Its id.
    pub conversation: ConversationId,
    /// The current epoch (after the adding Commits).
    pub epoch: u64,
    /// The seq of the last adding Commit (0 when nobody was added).
    pub head: u64,
    /// The creator's authenticated connection.
    pub creator_ws: Ws,
    _engine: Box<dyn MlsEngine>,
    _dir: tempfile::TempDir,
}

fn engine_for(
    identity: &Identity,
    kind: EngineKind,
    dir: &std::path::Path,
    name: &str,
) -> Result<Box<dyn MlsEngine>, LoadError> {
    let credentials = DeviceCredentials {
        key: DeviceKeyPair::from_seed(&identity.key.seed()),
        certificate: identity.certificate(now()),
    };
    open_engine(kind, &dir.join(name), credentials, system_clock())
        .or_else(|e| fail("opening an MLS engine", e))
}

/// A `CreateConversation` carrying the GroupInfo of the new group (SPEC.md 6.1).
fn create_frame(
    rid: u64,
    conversation: ConversationId,
    kind: ConversationKind,
    group_info: Vec<u8>,
) -> Result<ClientFrame, LoadError> {
    Ok(ClientFrame::CreateConversation(CreateConversation {
        rid,
        conversation,
        kind,
        group_info: MlsBytes::new(group_info).or_else(|e| fail("a GroupInfo", e))?,
    }))
}

/// A `CreateConversation` by `creator` for a conversation that only carries application
/// messages: the GroupInfo of a group made by a throwaway engine.
pub fn creation(
    creator: &Identity,
    rid: u64,
    conversation: ConversationId,
    kind: ConversationKind,
) -> Result<ClientFrame, LoadError> {
    let dir = tempfile::tempdir().or_else(|e| fail("a scratch directory", e))?;
    let mut engine = engine_for(creator, EngineKind::MlsRs, dir.path(), "creator.db")?;
    let context = if kind == ConversationKind::Room {
        RoomRoles::new(creator.system_key()).context_extensions()
    } else {
        Vec::new()
    };
    let group_info = engine
        .create_group_with(&conversation, &context)
        .or_else(|e| fail("creating the MLS group", e))?;
    create_frame(rid, conversation, kind, group_info)
}

fn now() -> UnixMs {
    UnixMs(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    )
}

/// A fresh message id.
pub fn random_msg_id() -> MsgId {
    let mut id = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut id);
    MsgId(id)
}

/// An encoded `Send` (fresh msg_id) of an application message of `size` bytes for
/// `conversation` at `epoch`, stamped with `sender` and `sent_ns` (see
/// [`wire::application_message`]).
pub fn application_send(
    rid: u64,
    conversation: ConversationId,
    epoch: u64,
    size: usize,
    sender: u32,
    sent_ns: u64,
) -> Result<Vec<u8>, LoadError> {
    let m = wire::application_message(&conversation, epoch, size, sender, sent_ns);
    let payload = MlsBytes::new(m).or_else(|e| fail("a payload", e))?;
    Ok(ClientFrame::Send(Send {
        rid,
        conversation,
        msg_id: random_msg_id(),
        payload,
        welcome: None,
        group_info: None,
    })
    .encode())
}

/// Sends `payload` (a Commit with its Welcome and GroupInfo, SPEC.md 7.10) and waits for
/// its `Accepted`.
pub async fn send_and_wait(
    ws: &mut Ws,
    rid: u64,
    conversation: ConversationId,
    payload: Vec<u8>,
    (welcome, group_info): (Option<Vec<u8>>, Option<Vec<u8>>),
) -> Result<Accepted, LoadError> {
    let payload = MlsBytes::new(payload).or_else(|e| fail("a payload", e))?;
    let welcome = welcome
        .map(MlsBytes::new)
        .transpose()
        .or_else(|e| fail("a Welcome", e))?;
    let group_info = group_info
        .map(MlsBytes::new)
        .transpose()
        .or_else(|e| fail("a GroupInfo", e))?;
    wire::send(
        ws,
        &ClientFrame::Send(Send {
            rid,
            conversation,
            msg_id: random_msg_id(),
            payload,
            welcome,
            group_info,
        }),
    )
    .await?;
    wire::expect(ws, "Accepted", |f| match f {
        ServerFrame::Accepted(a) if a.rid == rid => Ok(Some(a)),
        ServerFrame::Error(e) if e.rid == Some(rid) => Err(Box::new(ServerFrame::Error(e))),
        _ => Ok(None),
    })
    .await
}

/// Creates a conversation of `kind` by `creator` (connected and authenticated on
/// `creator_ws`) and commits Adds of every device in `members`; `index` picks the
/// creator's engine, so that consecutive conversations alternate between the two.
pub async fn conversation(
    creator: &Identity,
    mut creator_ws: Ws,
    members: &[Identity],
    kind: ConversationKind,
    index: usize,
) -> Result<Conversation, LoadError> {
    let dir = tempfile::tempdir().or_else(|e| fail("a scratch directory", e))?;
    let kinds = EngineKind::ALL;
    let mut engine = engine_for(creator, kinds[index % 2], dir.path(), "creator.db")?;
    let conversation = wire::random_conversation();
    // A room states its roles in its group context and in every Commit (SPEC.md 10.1).
    let context = if kind == ConversationKind::Room {
        RoomRoles::new(creator.system_key()).context_extensions()
    } else {
        Vec::new()
    };
    let group_info = engine
        .create_group_with(&conversation, &context)
        .or_else(|e| fail("creating the MLS group", e))?;
    wire::send(
        &mut creator_ws,
        &create_frame(1, conversation, kind, group_info)?,
    )
    .await?;
    wire::expect(&mut creator_ws, "Created", |f| match f {
        ServerFrame::Created(c) if c.rid == 1 => Ok(Some(())),
        ServerFrame::Error(e) => Err(Box::new(ServerFrame::Error(e))),
        _ => Ok(None),
    })
    .await?;
    let restated: Vec<ExtraProposal> = (!context.is_empty())
        .then(|| ExtraProposal::GroupContextExtensions(context.clone()))
        .into_iter()
        .collect();
    let mut head = 0;
    for (rid, (chunk_index, chunk)) in (2..).zip(members.chunks(ADDS_PER_COMMIT).enumerate()) {
        let mut packages = Vec::with_capacity(chunk.len());
        for (i, member) in chunk.iter().enumerate() {
            let n = chunk_index * ADDS_PER_COMMIT + i;
            let mut e = engine_for(
                member,
                kinds[(index + n + 1) % 2],
                dir.path(),
                &format!("m{n}.db"),
            )?;
            let mut kp = e
                .key_packages(1, false)
                .or_else(|e| fail("making a KeyPackage", e))?;
            packages.push(
                kp.pop()
                    .ok_or_else(|| LoadError("no KeyPackage made".into()))?,
            );
        }
        let commit = engine
            .commit(&conversation, &packages, &[], &restated, false)
            .or_else(|e| fail("committing Adds", e))?;
        let accepted = send_and_wait(
            &mut creator_ws,
            rid,
            conversation,
            commit.commit,
            (commit.welcome, commit.group_info),
        )
        .await?;
        head = accepted.seq.get();
        engine
            .merge_pending_commit(&conversation)
            .or_else(|e| fail("merging the Commit", e))?;
    }
    let epoch = engine
        .epoch(&conversation)
        .or_else(|e| fail("reading the epoch", e))?;
    Ok(Conversation {
        conversation,
        epoch,
        head,
        creator_ws,
        _engine: engine,
        _dir: dir,
    })
}
