//! SPEC.md sections 7.2–7.6 with real MLS groups: commit sequencing, the Welcome inbox,
//! membership from commits, removal. Each group mixes the engines: A runs openmls, B mls-rs.

use confab_spec::ErrorCode;
use confab_spec::ServerFrame;
use confab_spec::frame::{ClientFrame, ConversationKind, EntryBody, Subscribe};
use confab_spec::ids::{ConversationId, MlsBytes, MsgId, StreamId};

use crate::case;
use crate::case::{Case, CaseResult, Failure, Stop};
use crate::cases::log::{
    Attached, random, send_commit, send_mls, send_with, subscribe, subscribed,
};
use crate::context::{Ctx, Device, Peer};
use crate::mls::{Member, PAIR, broken, bytes};
use confab_client::mls::CommitOutput;

/// The cases of sections 7.2–7.6 that need a group.
pub fn cases() -> Vec<Case> {
    vec![
        case!(
            "7.2-1.epoch-too-old",
            "REQ-7.2-1",
            Must,
            "an application message 5 epochs old is refused with epoch_too_old carrying the current epoch; one 4 epochs old is accepted",
            epoch_too_old
        ),
        case!(
            "7.2-3.old-epoch-application",
            "REQ-7.2-3",
            Must,
            "an application message of the previous epoch is still accepted",
            old_epoch_application
        ),
        case!(
            "7.3-1.one-commit-per-epoch",
            "REQ-7.3-1",
            Must,
            "of two Commits for one epoch only the first is accepted, and the log holds one",
            one_commit_per_epoch
        ),
        case!(
            "7.3-2.stale-commit",
            "REQ-7.3-2",
            Must,
            "a Commit for a decided epoch is stale_commit (402) with the current epoch and its Commit's seq",
            stale_commit
        ),
        case!(
            "7.3-3.commit-by-reference",
            "REQ-7.3-3",
            Must,
            "a Commit holding a proposal by reference is mls_commit_by_reference (407)",
            commit_by_reference
        ),
        case!(
            "7.5-1.welcome-inbox",
            "REQ-7.5-1",
            Must,
            "an accepted Commit puts its Welcome in the added device's inbox with the Commit's seq",
            welcome_inbox
        ),
        case!(
            "7.5-2.add-without-welcome",
            "REQ-7.5-2",
            Must,
            "a Commit adding a device without a Welcome is welcome_mismatch (405)",
            add_without_welcome
        ),
        case!(
            "7.5-2.welcome-without-add",
            "REQ-7.5-2",
            Must,
            "a Welcome with a Commit that adds nobody is welcome_mismatch (405)",
            welcome_without_add
        ),
        case!(
            "7.6-1.member-by-commit",
            "REQ-7.6-1",
            Must,
            "a device reads a conversation only once a Commit added it",
            member_by_commit
        ),
        case!(
            "7.6-2.removed-reads-nothing-after",
            "REQ-7.6-2",
            Must,
            "a removed device is delivered nothing after the removing Commit",
            removed_reads_nothing_after
        ),
        case!(
            "7.6-3.removal-ends-subscription",
            "REQ-7.6-3",
            Must,
            "a removed device's subscription ends with Unsubscribed after the removing Commit; from above it, not_member",
            removal_ends_subscription
        ),
    ]
}

/// A (openmls) with a new conversation and its group, and B (mls-rs) connected, not added.
pub(crate) struct Pair {
    pub(crate) a: Peer,
    pub(crate) am: Member,
    pub(crate) b: Peer,
    pub(crate) bm: Member,
    pub(crate) conversation: ConversationId,
    /// The GroupInfo A's `CreateConversation` carried.
    pub(crate) created_group_info: MlsBytes,
}

impl Pair {
    pub(crate) async fn new(cx: &Ctx) -> Result<Self, Stop> {
        let da = Device::fresh();
        let (mut a, ready) = cx.ready("a", &da).await?;
        let now = ready.server_time_ms;
        let mut am = Member::new(da, PAIR[0], now)?;
        let conversation = ConversationId(random());
        let create = am.create_frame(1, conversation, ConversationKind::DirectMessage, &[])?;
        let ClientFrame::CreateConversation(created) = &create else {
            return Err(broken("create a conversation", "not a CreateConversation"));
        };
        let created_group_info = created.group_info.clone();
        a.send(&create).await?;
        a.expect("Created", |f| {
            matches!(f, ServerFrame::Created(c) if c.rid == 1).then_some(())
        })
        .await?;
        let db = Device::fresh();
        let (b, _) = cx.ready("b", &db).await?;
        let bm = Member::new(db, PAIR[1], now)?;
        Ok(Self {
            a,
            am,
            b,
            bm,
            conversation,
            created_group_info,
        })
    }

    /// A adds B (Commit with Welcome); the Commit's seq and the Welcome.
    pub(crate) async fn add_b(&mut self, rid: u64) -> Result<(u64, MlsBytes), Stop> {
        let kp = self.bm.key_packages(1, false)?;
        let kp: Vec<Vec<u8>> = kp.iter().map(|k| k.as_bytes().to_vec()).collect();
        let add = self
            .am
            .engine
            .add_members(&self.conversation, &kp)
            .map_err(|e| broken("add a member", e))?;
        let welcome = bytes(
            add.welcome
                .clone()
                .ok_or_else(|| broken("add a member", "no Welcome"))?,
        )?;
        let answer =
            send_commit(&mut self.a, rid, self.conversation, MsgId(random()), &add).await?;
        let (seq, _) = answer.map_err(|e| {
            Failure::new(
                "the adding Commit Accepted",
                format!("Error {}", e.code.name()),
            )
        })?;
        self.am
            .engine
            .merge_pending_commit(&self.conversation)
            .map_err(|e| broken("merge", e))?;
        Ok((seq, welcome))
    }

    /// `add_b`, then B joins from the Welcome the suite sent.
    pub(crate) async fn joined(cx: &Ctx) -> Result<Self, Stop> {
        let mut pair = Self::new(cx).await?;
        let (_, welcome) = pair.add_b(2).await?;
        pair.bm
            .engine
            .join(welcome.as_bytes())
            .map_err(|e| broken("join", e))?;
        Ok(pair)
    }
}

/// A self-update Commit of `m`, pending, with its GroupInfo.
pub(crate) fn update(m: &mut Member, conversation: &ConversationId) -> Result<CommitOutput, Stop> {
    m.engine
        .self_update(conversation)
        .map_err(|e| broken("commit", e))
}

async fn old_epoch_application(cx: &mut Ctx) -> CaseResult {
    let mut p = Pair::joined(cx).await?;
    let c = p.conversation;
    let old = bytes(
        p.bm.engine
            .encrypt(&c, b"in flight")
            .map_err(|e| broken("encrypt", e))?,
    )?;
    let commit = update(&mut p.am, &c)?;
    send_commit(&mut p.a, 3, c, MsgId(random()), &commit)
        .await?
        .map_err(|e| Failure::new("the update Accepted", format!("Error {}", e.code.name())))?;
    let answer = send_mls(&mut p.b, 4, c, MsgId(random()), old, None).await?;
    match answer {
        Ok((3, false)) => Ok(()),
        other => Err(Failure::new("Accepted at seq 3", format!("{other:?}")).into()),
    }
}

async fn epoch_too_old(cx: &mut Ctx) -> CaseResult {
    let mut p = Pair::joined(cx).await?;
    let c = p.conversation;
    // B encrypts one message in epoch 1 and one in epoch 2; A then commits up to epoch 6.
    let encrypt = |p: &mut Pair, text: &[u8]| {
        bytes(
            p.bm.engine
                .encrypt(&c, text)
                .map_err(|e| broken("encrypt", e))?,
        )
    };
    let epoch_1 = encrypt(&mut p, b"five epochs old")?;
    let mut epoch_2 = None;
    let mut rid = 3;
    for round in 0..5 {
        let commit = update(&mut p.am, &c)?;
        send_commit(&mut p.a, rid, c, MsgId(random()), &commit)
            .await?
            .map_err(|e| Failure::new("the update Accepted", format!("Error {}", e.code.name())))?;
        p.am.engine
            .merge_pending_commit(&c)
            .map_err(|e| broken("merge", e))?;
        p.bm.engine
            .process(&c, &commit.commit)
            .map_err(|e| broken("process", e))?;
        rid += 1;
        if round == 0 {
            // Now in epoch 2.
            epoch_2 = Some(encrypt(&mut p, b"four epochs old")?);
        }
    }
    let old = send_mls(&mut p.b, rid, c, MsgId(random()), epoch_1, None).await?;
    match old {
        Err(e) if e.code == ErrorCode::EpochTooOld && e.epoch.map(|x| x.0) == Some(6) => {}
        other => {
            return Err(Failure::new(
                "Error 408 epoch_too_old with epoch 6 for a message of epoch 1",
                format!("{other:?}"),
            )
            .into());
        }
    }
    let Some(epoch_2) = epoch_2 else {
        return Err(broken("encrypt", "no message of epoch 2"));
    };
    match send_mls(&mut p.b, rid + 1, c, MsgId(random()), epoch_2, None).await? {
        Ok(_) => Ok(()),
        other => Err(Failure::new(
            "a message of epoch 2 in epoch 6 Accepted (REQ-7.2-3)",
            format!("{other:?}"),
        )
        .into()),
    }
}

/// Both commit in epoch 1: A first. B's answer, and the conversation's entries.
async fn race(
    cx: &Ctx,
) -> Result<(Result<(u64, bool), confab_spec::frame::ErrorFrame>, Pair), Stop> {
    let mut p = Pair::joined(cx).await?;
    let c = p.conversation;
    let first = update(&mut p.am, &c)?;
    let second = update(&mut p.bm, &c)?;
    send_commit(&mut p.a, 3, c, MsgId(random()), &first)
        .await?
        .map_err(|e| {
            Failure::new(
                "the first Commit Accepted",
                format!("Error {}", e.code.name()),
            )
        })?;
    let answer = send_commit(&mut p.b, 4, c, MsgId(random()), &second).await?;
    Ok((answer, p))
}

async fn one_commit_per_epoch(cx: &mut Ctx) -> CaseResult {
    let (answer, mut p) = race(cx).await?;
    if answer.is_ok() {
        return Err(Failure::new(
            "the second Commit for epoch 1 refused",
            format!("{answer:?}"),
        )
        .into());
    }
    // The log: seq 1 the add (epoch 0), seq 2 one Commit of epoch 1, nothing else.
    p.a.send(&subscribe(5, p.conversation, Some(1))).await?;
    subscribed(&mut p.a, 5).await?;
    let entries =
        p.a.expect("Batch", |f| match f {
            ServerFrame::Batch(b) => Some(b.entries.clone()),
            _ => None,
        })
        .await?;
    let commits: Vec<(u64, u64)> = entries
        .iter()
        .filter_map(|e| match e.body {
            EntryBody::Commit { epoch } => Some((e.seq.get(), epoch.0)),
            _ => None,
        })
        .collect();
    if commits != [(1, 0), (2, 1)] {
        return Err(Failure::new(
            "Commits (seq, epoch) [(1, 0), (2, 1)]",
            format!("{commits:?}"),
        )
        .into());
    }
    Ok(())
}

async fn stale_commit(cx: &mut Ctx) -> CaseResult {
    let (answer, _) = race(cx).await?;
    match answer {
        Err(e)
            if e.code == ErrorCode::StaleCommit
                && e.epoch.map(|x| x.0) == Some(2)
                && e.seq.map(|s| s.get()) == Some(2) =>
        {
            Ok(())
        }
        other => Err(Failure::new(
            "Error 402 stale_commit with epoch 2 and seq 2",
            format!("{other:?}"),
        )
        .into()),
    }
}

async fn commit_by_reference(cx: &mut Ctx) -> CaseResult {
    // B asks to leave (a standalone Remove proposal, SPEC.md 10.3); A commits it by
    // reference instead of by value.
    let mut p = Pair::joined(cx).await?;
    let c = p.conversation;
    let proposal = p.bm.engine.leave(&c).map_err(|e| broken("propose", e))?;
    send_mls(
        &mut p.b,
        3,
        c,
        MsgId(random()),
        bytes(proposal.clone())?,
        None,
    )
    .await?
    .map_err(|e| Failure::new("the proposal Accepted", format!("Error {}", e.code.name())))?;
    p.am.engine
        .process(&c, &proposal)
        .map_err(|e| broken("store the proposal", e))?;
    let commit =
        p.am.engine
            .commit(&c, &[], &[], &[], false)
            .map_err(|e| broken("commit the proposal", e))?;
    let answer = send_mls(&mut p.a, 4, c, MsgId(random()), bytes(commit.commit)?, None).await?;
    match answer {
        Err(e) if e.code == ErrorCode::MlsCommitByReference => Ok(()),
        other => {
            Err(Failure::new("Error 407 mls_commit_by_reference", format!("{other:?}")).into())
        }
    }
}

async fn welcome_inbox(cx: &mut Ctx) -> CaseResult {
    let mut p = Pair::new(cx).await?;
    let (seq, welcome) = p.add_b(2).await?;
    p.b.send(&ClientFrame::Subscribe(Subscribe {
        rid: 3,
        stream: StreamId::Inbox,
        from_seq: None,
    }))
    .await?;
    subscribed(&mut p.b, 3).await?;
    let entries =
        p.b.expect("Batch of the inbox", |f| match f {
            ServerFrame::Batch(b) => Some(b.entries.clone()),
            _ => None,
        })
        .await?;
    match entries.as_slice() {
        [e] if e.body
            == (EntryBody::Welcome {
                conversation: p.conversation,
                commit_seq: confab_spec::ids::Seq::new(seq).unwrap_or(confab_spec::ids::Seq::FIRST),
            })
            && e.payload == welcome =>
        {
            // And it works: B joins from it.
            p.bm.engine
                .join(e.payload.as_bytes())
                .map(|_| ())
                .map_err(|e| Failure::new("a Welcome B can join from", e.to_string()).into())
        }
        other => Err(Failure::new(
            format!("one inbox entry: the Welcome for the conversation, commit_seq {seq}"),
            format!("{other:?}"),
        )
        .into()),
    }
}

async fn add_without_welcome(cx: &mut Ctx) -> CaseResult {
    let mut p = Pair::new(cx).await?;
    let kp: Vec<Vec<u8>> =
        p.bm.key_packages(1, false)?
            .iter()
            .map(|k| k.as_bytes().to_vec())
            .collect();
    let add =
        p.am.engine
            .add_members(&p.conversation, &kp)
            .map_err(|e| broken("add", e))?;
    // With its GroupInfo and without its Welcome: only the Welcome is missing.
    let attached = Attached {
        welcome: None,
        group_info: Attached::of(&add)?.group_info,
    };
    let payload = bytes(add.commit)?;
    let answer = send_with(
        &mut p.a,
        2,
        (p.conversation, MsgId(random())),
        payload,
        attached,
    )
    .await?;
    match answer {
        Err(e) if e.code == ErrorCode::WelcomeMismatch => Ok(()),
        other => Err(Failure::new("Error 405 welcome_mismatch", format!("{other:?}")).into()),
    }
}

async fn welcome_without_add(cx: &mut Ctx) -> CaseResult {
    let mut p = Pair::joined(cx).await?;
    let c = p.conversation;
    let commit = update(&mut p.am, &c)?;
    let stray = bytes(vec![0x00, 0x01, 0x00, 0x03, 0x00, 0x01])?;
    let attached = Attached {
        welcome: Some(stray),
        group_info: Attached::of(&commit)?.group_info,
    };
    let payload = bytes(commit.commit)?;
    let answer = send_with(&mut p.a, 3, (c, MsgId(random())), payload, attached).await?;
    match answer {
        Err(e) if e.code == ErrorCode::WelcomeMismatch => Ok(()),
        other => Err(Failure::new("Error 405 welcome_mismatch", format!("{other:?}")).into()),
    }
}

async fn member_by_commit(cx: &mut Ctx) -> CaseResult {
    let mut p = Pair::new(cx).await?;
    p.b.send(&subscribe(3, p.conversation, None)).await?;
    p.b.expect_error(ErrorCode::NotMember, Some(3)).await?;
    let (seq, _) = p.add_b(2).await?;
    p.b.send(&subscribe(4, p.conversation, Some(seq + 1)))
        .await?;
    subscribed(&mut p.b, 4).await
}

/// A removes B while B follows the conversation live from seq 2; the removing Commit's
/// seq and what B received.
async fn remove_b(p: &mut Pair) -> Result<(u64, Vec<ServerFrame>), Stop> {
    let c = p.conversation;
    p.b.send(&subscribe(7, c, Some(2))).await?;
    subscribed(&mut p.b, 7).await?;
    p.b.expect("an empty Batch", |f| {
        matches!(f, ServerFrame::Batch(b) if b.entries.is_empty()).then_some(())
    })
    .await?;
    let removed = p.bm.device.id();
    let rm =
        p.am.engine
            .remove_members(&c, &[removed])
            .map_err(|e| broken("remove", e))?;
    let (seq, _) = send_commit(&mut p.a, 3, c, MsgId(random()), &rm)
        .await?
        .map_err(|e| {
            Failure::new(
                "the removing Commit Accepted",
                format!("Error {}", e.code.name()),
            )
        })?;
    p.am.engine
        .merge_pending_commit(&c)
        .map_err(|e| broken("merge", e))?;
    let after = bytes(
        p.am.engine
            .encrypt(&c, b"after")
            .map_err(|e| broken("encrypt", e))?,
    )?;
    send_mls(&mut p.a, 4, c, MsgId(random()), after, None)
        .await?
        .map_err(|e| {
            Failure::new(
                "a message after the removal Accepted",
                format!("Error {}", e.code.name()),
            )
        })?;
    let mut received = Vec::new();
    loop {
        match p.b.next(crate::context::SILENCE_WAIT * 2).await {
            crate::context::Observed::Frame(ServerFrame::HeartbeatAck(_)) => {}
            crate::context::Observed::Frame(f) => received.push(f),
            _ => break,
        }
    }
    Ok((seq, received))
}

async fn removed_reads_nothing_after(cx: &mut Ctx) -> CaseResult {
    let mut p = Pair::joined(cx).await?;
    let (seq, received) = remove_b(&mut p).await?;
    let delivered: Vec<u64> = received
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Deliver(d) => Some(d.entry.seq.get()),
            _ => None,
        })
        .collect();
    if delivered.iter().any(|s| *s > seq) {
        return Err(Failure::new(
            format!("nothing above seq {seq}"),
            format!("delivered {delivered:?}"),
        )
        .into());
    }
    Ok(())
}

async fn removal_ends_subscription(cx: &mut Ctx) -> CaseResult {
    let mut p = Pair::joined(cx).await?;
    let (seq, received) = remove_b(&mut p).await?;
    let ok = matches!(received.as_slice(),
        [ServerFrame::Deliver(d), ServerFrame::Unsubscribed(u)] if d.entry.seq.get() == seq && u.rid == 7);
    if !ok {
        return Err(Failure::new(
            format!("Deliver of the removing Commit (seq {seq}), then Unsubscribed for rid 7"),
            format!("{received:?}"),
        )
        .into());
    }
    p.b.send(&subscribe(8, p.conversation, Some(seq + 1)))
        .await?;
    p.b.expect_error(ErrorCode::NotMember, Some(8)).await?;
    Ok(())
}
