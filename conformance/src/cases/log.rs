//! SPEC.md section 6: conversations, dense seqs, idempotent sends, replay and live
//! delivery, cursors; and the rows of section 7.2 that need no MLS group.

use std::collections::HashMap;

use confab_spec::ErrorCode;
use confab_spec::ServerFrame;
use confab_spec::frame::{
    Ack, ClientFrame, Continue, ConversationKind, Entry, ErrorFrame, Send, Subscribe,
};
use confab_spec::ids::{ConversationId, MlsBytes, MsgId, Seq, StreamId};
use rand_core::RngCore as _;

use crate::case;
use crate::case::{Case, CaseResult, Failure, Stop};
use crate::context::{ANSWER_WAIT, Ctx, Device, Observed, Peer};

/// The cases of section 6 and of 7.2's framing rows.
pub fn cases() -> Vec<Case> {
    vec![
        case!(
            "4.4-5.payload-too-large",
            "REQ-4.4-5",
            Must,
            "a payload over payload_bytes_max is payload_too_large (307) and not stored",
            payload_too_large
        ),
        case!(
            "4.4-6.messages-within-limit",
            "REQ-4.4-6",
            Must,
            "replaying entries of payload_bytes_max sends no message over frame_bytes_max",
            messages_within_limit
        ),
        case!(
            "6.4-7.slow-session-closed",
            "REQ-6.4-7",
            Must,
            "a session that stops reading is closed with 4002 once its outbound queue overflows, with no frame dropped before",
            slow_session_closed
        ),
        case!(
            "7.2-2.opaque-ciphertext",
            "REQ-7.2-2",
            Must,
            "a PrivateMessage is accepted and delivered without the server decrypting it",
            opaque_ciphertext
        ),
        case!(
            "6.1-1.conversation-exists",
            "REQ-6.1-1",
            Must,
            "creating a conversation with a taken id is conversation_exists (302)",
            conversation_exists
        ),
        case!(
            "6.1-2.not-member",
            "REQ-6.1-2",
            Must,
            "a non-member's Subscribe, Send and Ack are not_member (301)",
            not_member
        ),
        case!(
            "6.1-2.not-found",
            "REQ-6.1-2",
            Must,
            "frames naming an unknown conversation are conversation_not_found (300)",
            not_found
        ),
        case!(
            "6.2-1.dense-seqs",
            "REQ-6.2-1",
            Must,
            "sends are sequenced 1, 2, 3, ... with no gap",
            dense_seqs
        ),
        case!(
            "6.3-2.duplicate-send",
            "REQ-6.3-2",
            Must,
            "a resent msg_id is Accepted with the original seq and duplicate true, and not appended",
            duplicate_send
        ),
        case!(
            "6.3-3.msg-id-conflict",
            "REQ-6.3-3",
            Must,
            "a msg_id reused with another payload is msg_id_conflict (304)",
            msg_id_conflict
        ),
        case!(
            "6.4-1.replay-across-batches",
            "REQ-6.4-1",
            Must,
            "replay delivers every entry once, in order, across batches",
            replay_across_batches
        ),
        case!(
            "6.4-2.replay-to-live",
            "REQ-6.4-2",
            Must,
            "entries appended during a replay follow it with no gap and no repeat",
            replay_to_live
        ),
        case!(
            "6.4-3.batch-bounds",
            "REQ-6.4-3",
            Must,
            "batches hold at most replay_batch_max entries and wait for Continue",
            batch_bounds
        ),
        case!(
            "6.4-4.live-order",
            "REQ-6.4-4",
            Must,
            "a live subscription gets entries in seq order with no gap",
            live_order
        ),
        case!(
            "6.4-5.resubscribe-restarts",
            "REQ-6.4-5",
            Must,
            "a second Subscribe restarts the replay at its from_seq",
            resubscribe_restarts
        ),
        case!(
            "6.4-6.from-seq-beyond-head",
            "REQ-6.4-6",
            Must,
            "a Subscribe from beyond head + 1 is seq_out_of_range (305)",
            from_seq_beyond_head
        ),
        case!(
            "6.4-8.continue-without-batch",
            "REQ-6.4-8",
            Must,
            "a Continue with no batch awaiting it is not_subscribed (306)",
            continue_without_batch
        ),
        case!(
            "6.5-1.cursor-never-backwards",
            "REQ-6.5-1",
            Must,
            "an Ack below the cursor does not move it back",
            cursor_never_backwards
        ),
        case!(
            "6.5-2.ack-beyond-head",
            "REQ-6.5-2",
            Must,
            "an Ack above the head is seq_out_of_range (305)",
            ack_beyond_head
        ),
        case!(
            "7.2-1.not-mls",
            "REQ-7.2-1",
            Must,
            "a payload that is not an MLSMessage is mls_malformed (400)",
            not_mls
        ),
        case!(
            "7.2-1.wire-format",
            "REQ-7.2-1",
            Must,
            "a KeyPackage as payload is mls_wire_format_not_allowed (404)",
            wire_format
        ),
        case!(
            "7.2-1.group-mismatch",
            "REQ-7.2-1",
            Must,
            "a message for another group is mls_group_mismatch (401)",
            group_mismatch
        ),
        case!(
            "7.2-1.public-application",
            "REQ-7.2-1",
            Must,
            "an application message as PublicMessage is mls_wire_format_not_allowed (404)",
            public_application
        ),
        case!(
            "7.2-1.private-handshake",
            "REQ-7.2-1",
            Must,
            "a PrivateMessage with handshake content is mls_wire_format_not_allowed (404)",
            private_handshake
        ),
        case!(
            "7.2-1.epoch-ahead",
            "REQ-7.2-1",
            Must,
            "a message for an epoch not reached is epoch_ahead (403)",
            epoch_ahead
        ),
    ]
}

/// A random id.
pub fn random<const N: usize>() -> [u8; N] {
    let mut v = [0u8; N];
    rand_core::OsRng.fill_bytes(&mut v);
    v
}

/// The MLS variable-length integer of `n` (RFC 9420 2.1.2).
fn varint(n: usize) -> Vec<u8> {
    match n {
        0..=63 => vec![n as u8],
        64..=16_383 => vec![0x40 | (n >> 8) as u8, n as u8],
        _ => {
            let n = n as u32 | 0x8000_0000;
            n.to_be_bytes().to_vec()
        }
    }
}

/// An MLSMessage header as SPEC.md 7.2 reads it, followed by `tail`: a PrivateMessage
/// (`wire_format` 2) or PublicMessage (1, from the member at leaf 0) of `group` at `epoch`
/// with `content_type` (1 application, 2 proposal, 3 commit).
pub fn mls_message(
    wire_format: u16,
    group: &ConversationId,
    epoch: u64,
    content_type: u8,
    tail: &[u8],
) -> MlsBytes {
    let mut m = vec![0x00, 0x01];
    m.extend_from_slice(&wire_format.to_be_bytes());
    m.extend(varint(32));
    m.extend_from_slice(&group.0);
    m.extend_from_slice(&epoch.to_be_bytes());
    if wire_format == 1 {
        m.push(1); // sender_type member
        m.extend_from_slice(&0u32.to_be_bytes());
        m.extend(varint(0)); // authenticated_data
    }
    m.push(content_type);
    if wire_format == 2 {
        m.extend(varint(0)); // authenticated_data
    }
    m.extend(varint(tail.len()));
    m.extend_from_slice(tail);
    MlsBytes::new(m).unwrap_or_else(|_| unreachable!("at least 4 bytes"))
}

/// An application message of `group` at epoch 0 whose ciphertext is `body`.
pub fn application(group: &ConversationId, body: &[u8]) -> MlsBytes {
    mls_message(2, group, 0, 1, body)
}

/// A ready session with a conversation it created.
pub async fn with_conversation(
    cx: &Ctx,
    name: &str,
) -> Result<(Peer, Device, ConversationId), Stop> {
    let device = Device::fresh();
    let (mut peer, _) = cx.ready(name, &device).await?;
    let conversation = create_conversation(&mut peer, 1).await?;
    Ok((peer, device, conversation))
}

/// Creates a conversation on a ready session (request `rid`); its id.
pub async fn create_conversation(peer: &mut Peer, rid: u64) -> Result<ConversationId, Stop> {
    let conversation = ConversationId(random());
    let frame = creation(peer, rid, conversation, ConversationKind::DirectMessage)?;
    peer.send(&frame).await?;
    peer.expect("Created", |f| {
        matches!(f, ServerFrame::Created(c) if c.rid == rid).then_some(())
    })
    .await?;
    Ok(conversation)
}

/// A `CreateConversation` of `conversation` by the device `peer` authenticated as, with
/// the GroupInfo of a new group of that device (SPEC.md 6.1).
pub fn creation(
    peer: &Peer,
    rid: u64,
    conversation: ConversationId,
    kind: ConversationKind,
) -> Result<ClientFrame, Stop> {
    let Some((device, now)) = peer.authenticated() else {
        return Err(crate::mls::broken(
            "create a conversation",
            "the connection is not authenticated",
        ));
    };
    crate::mls::create_frame(device, now, rid, conversation, kind)
}

/// A `Send` of `payload` with `msg_id`.
pub fn send_frame(
    rid: u64,
    conversation: ConversationId,
    msg_id: MsgId,
    payload: MlsBytes,
) -> ClientFrame {
    ClientFrame::Send(Send {
        rid,
        conversation,
        msg_id,
        payload,
        welcome: None,
        group_info: None,
    })
}

/// Sends `count` application messages, pipelined in groups, and returns their seqs by
/// order of sending. Each must be accepted.
pub async fn send_many(
    cx: &Ctx,
    peer: &mut Peer,
    conversation: ConversationId,
    count: u64,
) -> Result<Vec<u64>, Stop> {
    let window = (cx.info.limits.pending_sends_max / 2).clamp(1, 64);
    // Stay within the announced `sends_per_device` (SPEC.md 11): a conforming server
    // refuses a faster device, and these cases test something else.
    let mut pace = cx
        .info
        .rate_limit("sends_per_device")
        .map(|(per_minute, burst)| SendPace::new(per_minute, burst));
    let mut seqs = Vec::new();
    let mut next = 0;
    while next < count {
        let group: Vec<u64> = (next..count.min(next + window)).collect();
        for i in &group {
            if let Some(pace) = &mut pace {
                pace.take().await;
            }
            let body = format!("message {i}");
            peer.send(&send_frame(
                1_000 + i,
                conversation,
                MsgId(random()),
                application(&conversation, body.as_bytes()),
            ))
            .await?;
        }
        let mut answers = HashMap::new();
        while answers.len() < group.len() {
            let (rid, seq) = peer
                .expect("Accepted", |f| match f {
                    ServerFrame::Accepted(a) => Some((a.rid, a.seq.get())),
                    _ => None,
                })
                .await?;
            answers.insert(rid, seq);
        }
        for i in &group {
            seqs.push(answers.get(&(1_000 + i)).copied().unwrap_or(0));
        }
        next += window;
    }
    Ok(seqs)
}

/// A local mirror of a `sends_per_device` bucket, kept below the server's with a margin
/// for the frames a case sent before.
struct SendPace {
    tokens: f64,
    burst: f64,
    per_ms: f64,
    last: std::time::Instant,
}

impl SendPace {
    const MARGIN: f64 = 16.0;

    fn new(per_minute: u64, burst: u64) -> Self {
        let burst = (burst as f64 - Self::MARGIN).max(1.0);
        Self {
            tokens: burst,
            burst,
            per_ms: per_minute.max(1) as f64 / 60_000.0,
            last: std::time::Instant::now(),
        }
    }

    /// Waits until a send is within the limit, and counts it.
    async fn take(&mut self) {
        loop {
            let now = std::time::Instant::now();
            let elapsed = now.duration_since(self.last).as_secs_f64() * 1_000.0;
            self.tokens = (self.tokens + elapsed * self.per_ms).min(self.burst);
            self.last = now;
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                return;
            }
            let wait_ms = ((1.0 - self.tokens) / self.per_ms).ceil().max(1.0);
            tokio::time::sleep(std::time::Duration::from_millis(wait_ms as u64)).await;
        }
    }
}

/// Sends one message; its `Accepted` as `(seq, duplicate)`, or the error.
async fn send_one(
    peer: &mut Peer,
    rid: u64,
    conversation: ConversationId,
    msg_id: MsgId,
    payload: MlsBytes,
) -> Result<Result<(u64, bool), ErrorCode>, Stop> {
    let answer = send_mls(peer, rid, conversation, msg_id, payload, None).await?;
    Ok(answer.map_err(|e| e.code))
}

/// Sends `payload` (with `welcome`); the `Accepted` as `(seq, duplicate)`, or the `Error`.
/// A Commit goes with [`send_commit`], which adds its GroupInfo (SPEC.md 7.10).
pub async fn send_mls(
    peer: &mut Peer,
    rid: u64,
    conversation: ConversationId,
    msg_id: MsgId,
    payload: MlsBytes,
    welcome: Option<MlsBytes>,
) -> Result<Result<(u64, bool), ErrorFrame>, Stop> {
    let attached = Attached {
        welcome,
        group_info: None,
    };
    send_with(peer, rid, (conversation, msg_id), payload, attached).await
}

/// What a `Send` of a Commit carries beside it (SPEC.md 7.5, 7.10).
#[derive(Debug, Clone, Default)]
pub struct Attached {
    /// `Send.welcome`.
    pub welcome: Option<MlsBytes>,
    /// `Send.group_info`.
    pub group_info: Option<MlsBytes>,
}

impl Attached {
    /// The Welcome and GroupInfo an engine made with a Commit.
    pub fn of(output: &confab_client::mls::CommitOutput) -> Result<Self, Stop> {
        let wrap = |b: &Option<Vec<u8>>| b.clone().map(crate::mls::bytes).transpose();
        Ok(Self {
            welcome: wrap(&output.welcome)?,
            group_info: wrap(&output.group_info)?,
        })
    }
}

/// Sends a Commit an engine made, with its Welcome and GroupInfo; the `Accepted` as
/// `(seq, duplicate)`, or the `Error`.
pub async fn send_commit(
    peer: &mut Peer,
    rid: u64,
    conversation: ConversationId,
    msg_id: MsgId,
    output: &confab_client::mls::CommitOutput,
) -> Result<Result<(u64, bool), ErrorFrame>, Stop> {
    let payload = crate::mls::bytes(output.commit.clone())?;
    let attached = Attached::of(output)?;
    send_with(peer, rid, (conversation, msg_id), payload, attached).await
}

/// Sends `payload` with what is `attached`; the `Accepted` as `(seq, duplicate)`, or the
/// `Error`.
pub async fn send_with(
    peer: &mut Peer,
    rid: u64,
    (conversation, msg_id): (ConversationId, MsgId),
    payload: MlsBytes,
    attached: Attached,
) -> Result<Result<(u64, bool), ErrorFrame>, Stop> {
    peer.send(&ClientFrame::Send(Send {
        rid,
        conversation,
        msg_id,
        payload,
        welcome: attached.welcome,
        group_info: attached.group_info,
    }))
    .await?;
    peer.expect("Accepted or Error for the Send", |f| match f {
        ServerFrame::Accepted(a) if a.rid == rid => Some(Ok((a.seq.get(), a.duplicate))),
        ServerFrame::Error(e) if e.rid == Some(rid) => Some(Err(e.clone())),
        _ => None,
    })
    .await
}

/// Acknowledges `conversation` up to `seq`.
pub async fn ack(peer: &mut Peer, conversation: ConversationId, seq: u64) -> CaseResult {
    peer.send(&ClientFrame::Ack(Ack {
        stream: StreamId::Conversation(conversation),
        seq: Seq::new(seq).unwrap_or(Seq::FIRST),
    }))
    .await
}

/// Waits for the `Subscribed` of `rid`.
pub async fn subscribed(peer: &mut Peer, rid: u64) -> CaseResult {
    peer.expect(&format!("Subscribed for rid {rid}"), |f| {
        matches!(f, ServerFrame::Subscribed(s) if s.rid == rid).then_some(())
    })
    .await
}

/// A `Subscribe` to `conversation` (from its start, or the cursor when `from` is `None`).
pub fn subscribe(rid: u64, conversation: ConversationId, from: Option<u64>) -> ClientFrame {
    ClientFrame::Subscribe(Subscribe {
        rid,
        stream: StreamId::Conversation(conversation),
        from_seq: from.and_then(Seq::new),
    })
}

/// Reads a whole replay (answering every `more` batch with `Continue`); the seqs in
/// order, the largest batch, and the frames that followed the last batch within a short
/// wait are not read.
pub async fn replay(
    peer: &mut Peer,
    conversation: ConversationId,
) -> Result<(Vec<Entry>, usize), Stop> {
    let mut entries = Vec::new();
    let mut largest = 0;
    loop {
        let (batch, more) = peer
            .expect("Batch", |f| match f {
                ServerFrame::Batch(b) => Some((b.entries.clone(), b.more)),
                _ => None,
            })
            .await?;
        largest = largest.max(batch.len());
        let last = batch.last().map(|e| e.seq);
        entries.extend(batch);
        if !more {
            return Ok((entries, largest));
        }
        let Some(after_seq) = last else {
            return Err(
                Failure::new("a Batch with more true holds entries", "an empty one").into(),
            );
        };
        peer.send(&ClientFrame::Continue(Continue {
            stream: StreamId::Conversation(conversation),
            after_seq,
        }))
        .await?;
    }
}

/// `got` must be `expected`, in order.
pub fn check_seqs(what: &str, got: &[u64], expected: impl Iterator<Item = u64>) -> CaseResult {
    let expected: Vec<u64> = expected.collect();
    if got != expected {
        return Err(Failure::new(
            format!(
                "{what}: seqs {}..={}",
                expected.first().unwrap_or(&0),
                expected.last().unwrap_or(&0)
            ),
            format!("seqs {got:?}"),
        )
        .into());
    }
    Ok(())
}

async fn conversation_exists(cx: &mut Ctx) -> CaseResult {
    let (_a, _, conversation) = with_conversation(cx, "a").await?;
    let (mut b, _) = cx.ready("b", &Device::fresh()).await?;
    b.send(&creation(&b, 2, conversation, ConversationKind::Room)?)
        .await?;
    b.expect_error(ErrorCode::ConversationExists, Some(2))
        .await?;
    Ok(())
}

async fn not_member(cx: &mut Ctx) -> CaseResult {
    let (mut a, _, conversation) = with_conversation(cx, "a").await?;
    send_many(cx, &mut a, conversation, 1).await?;
    let (mut b, _) = cx.ready("b", &Device::fresh()).await?;
    b.send(&subscribe(3, conversation, None)).await?;
    b.expect_error(ErrorCode::NotMember, Some(3)).await?;
    b.send(&send_frame(
        4,
        conversation,
        MsgId(random()),
        application(&conversation, b"x"),
    ))
    .await?;
    b.expect_error(ErrorCode::NotMember, Some(4)).await?;
    b.send(&ClientFrame::Ack(Ack {
        stream: StreamId::Conversation(conversation),
        seq: Seq::FIRST,
    }))
    .await?;
    b.expect_error(ErrorCode::NotMember, None).await?;
    Ok(())
}

async fn not_found(cx: &mut Ctx) -> CaseResult {
    let (mut a, _) = cx.ready("a", &Device::fresh()).await?;
    let nowhere = ConversationId(random());
    a.send(&subscribe(3, nowhere, None)).await?;
    a.expect_error(ErrorCode::ConversationNotFound, Some(3))
        .await?;
    a.send(&send_frame(
        4,
        nowhere,
        MsgId(random()),
        application(&nowhere, b"x"),
    ))
    .await?;
    a.expect_error(ErrorCode::ConversationNotFound, Some(4))
        .await?;
    Ok(())
}

async fn dense_seqs(cx: &mut Ctx) -> CaseResult {
    let (mut a, _, conversation) = with_conversation(cx, "a").await?;
    let seqs = send_many(cx, &mut a, conversation, 20).await?;
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    check_seqs("20 sends", &sorted, 1..=20)
}

async fn duplicate_send(cx: &mut Ctx) -> CaseResult {
    let (mut a, _, conversation) = with_conversation(cx, "a").await?;
    let msg_id = MsgId(random());
    let payload = application(&conversation, b"once");
    let first = send_one(&mut a, 2, conversation, msg_id, payload.clone()).await?;
    let again = send_one(&mut a, 3, conversation, msg_id, payload).await?;
    if first != Ok((1, false)) || again != Ok((1, true)) {
        return Err(Failure::new(
            "Accepted seq 1, then Accepted seq 1 duplicate true",
            format!("{first:?}, then {again:?}"),
        )
        .into());
    }
    let next = send_one(
        &mut a,
        4,
        conversation,
        MsgId(random()),
        application(&conversation, b"next"),
    )
    .await?;
    if next != Ok((2, false)) {
        return Err(Failure::new(
            "the next message at seq 2 (nothing appended twice)",
            format!("{next:?}"),
        )
        .into());
    }
    Ok(())
}

async fn msg_id_conflict(cx: &mut Ctx) -> CaseResult {
    let (mut a, _, conversation) = with_conversation(cx, "a").await?;
    let msg_id = MsgId(random());
    let first = send_one(
        &mut a,
        2,
        conversation,
        msg_id,
        application(&conversation, b"one"),
    )
    .await?;
    if first != Ok((1, false)) {
        return Err(Failure::new("Accepted seq 1", format!("{first:?}")).into());
    }
    let other = send_one(
        &mut a,
        3,
        conversation,
        msg_id,
        application(&conversation, b"two"),
    )
    .await?;
    if other != Err(ErrorCode::MsgIdConflict) {
        return Err(Failure::new("Error 304 msg_id_conflict", format!("{other:?}")).into());
    }
    Ok(())
}

async fn replay_across_batches(cx: &mut Ctx) -> CaseResult {
    let batch = cx.info.limits.replay_batch_max.max(1);
    let count = (2 * batch + 3).min(2_000);
    let (mut a, device, conversation) = with_conversation(cx, "a").await?;
    send_many(cx, &mut a, conversation, count).await?;
    let (mut b, _) = cx.ready("b", &device).await?;
    b.send(&subscribe(5, conversation, Some(1))).await?;
    b.expect("Subscribed", |f| {
        matches!(f, ServerFrame::Subscribed(s) if s.rid == 5).then_some(())
    })
    .await?;
    let (entries, _) = replay(&mut b, conversation).await?;
    let seqs: Vec<u64> = entries.iter().map(|e| e.seq.get()).collect();
    check_seqs("the whole replay", &seqs, 1..=count)
}

async fn replay_to_live(cx: &mut Ctx) -> CaseResult {
    let batch = cx.info.limits.replay_batch_max.max(1);
    let count = (2 * batch).min(1_000);
    let (mut a, _, conversation) = with_conversation(cx, "a").await?;
    send_many(cx, &mut a, conversation, count).await?;
    // The creator reads while its own session appends more: the appends race the replay.
    a.send(&subscribe(5, conversation, Some(1))).await?;
    let extra = 5;
    for i in 0..extra {
        a.send(&send_frame(
            2_000 + i,
            conversation,
            MsgId(random()),
            application(&conversation, b"during"),
        ))
        .await?;
    }
    let mut seqs = Vec::new();
    let mut more = true;
    while seqs.len() < (count + extra) as usize {
        match a.next(ANSWER_WAIT).await {
            Observed::Frame(ServerFrame::Batch(b)) => {
                seqs.extend(b.entries.iter().map(|e| e.seq.get()));
                more = b.more;
                if b.more {
                    if let Some(last) = b.entries.last() {
                        a.send(&ClientFrame::Continue(Continue {
                            stream: StreamId::Conversation(conversation),
                            after_seq: last.seq,
                        }))
                        .await?;
                    }
                }
            }
            Observed::Frame(ServerFrame::Deliver(d)) => {
                if more {
                    return Err(Failure::new(
                        "no Deliver before the last Batch",
                        "a Deliver during the replay",
                    )
                    .into());
                }
                seqs.push(d.entry.seq.get());
            }
            Observed::Frame(
                ServerFrame::Subscribed(_)
                | ServerFrame::Accepted(_)
                | ServerFrame::HeartbeatAck(_),
            ) => {}
            other => {
                return Err(Failure::new("Batch, Deliver or Accepted", other.to_string()).into());
            }
        }
    }
    check_seqs("replay then live", &seqs, 1..=count + extra)
}

async fn batch_bounds(cx: &mut Ctx) -> CaseResult {
    let max = cx.info.limits.replay_batch_max.max(1);
    let count = (max + 1).min(1_000);
    let (mut a, _, conversation) = with_conversation(cx, "a").await?;
    send_many(cx, &mut a, conversation, count).await?;
    a.send(&subscribe(5, conversation, Some(1))).await?;
    subscribed(&mut a, 5).await?;
    let (first, more) = a
        .expect("Batch", |f| match f {
            ServerFrame::Batch(b) => Some((b.entries.len() as u64, b.more)),
            _ => None,
        })
        .await?;
    if first > max || !more {
        return Err(Failure::new(
            format!("a first Batch of at most {max} entries with more true"),
            format!("{first} entries, more {more}"),
        )
        .into());
    }
    a.expect_silence("no further Batch before Continue").await
}

async fn live_order(cx: &mut Ctx) -> CaseResult {
    // The only member is the creator; its session reads live what it sends.
    let (mut a, _, conversation) = with_conversation(cx, "a").await?;
    a.send(&subscribe(5, conversation, Some(1))).await?;
    subscribed(&mut a, 5).await?;
    a.expect("an empty Batch", |f| {
        matches!(f, ServerFrame::Batch(b) if b.entries.is_empty() && !b.more).then_some(())
    })
    .await?;
    let count = 10u64;
    for i in 0..count {
        a.send(&send_frame(
            3_000 + i,
            conversation,
            MsgId(random()),
            application(&conversation, b"live"),
        ))
        .await?;
    }
    let mut delivered = Vec::new();
    while delivered.len() < count as usize {
        match a.next(ANSWER_WAIT).await {
            Observed::Frame(ServerFrame::Deliver(d)) => delivered.push(d.entry.seq.get()),
            Observed::Frame(ServerFrame::Accepted(_) | ServerFrame::HeartbeatAck(_)) => {}
            other => return Err(Failure::new("Deliver", other.to_string()).into()),
        }
    }
    check_seqs("live delivery", &delivered, 1..=count)
}

async fn resubscribe_restarts(cx: &mut Ctx) -> CaseResult {
    let max = cx.info.limits.replay_batch_max.max(1);
    let count = (max + 5).min(1_000);
    let (mut a, _, conversation) = with_conversation(cx, "a").await?;
    send_many(cx, &mut a, conversation, count).await?;
    a.send(&subscribe(5, conversation, Some(1))).await?;
    subscribed(&mut a, 5).await?;
    a.expect("Batch", |f| {
        matches!(f, ServerFrame::Batch(_)).then_some(())
    })
    .await?;
    let from = count - 2;
    a.send(&subscribe(6, conversation, Some(from))).await?;
    a.expect("Subscribed for rid 6", |f| {
        matches!(f, ServerFrame::Subscribed(s) if s.rid == 6).then_some(())
    })
    .await?;
    let (entries, _) = replay(&mut a, conversation).await?;
    let seqs: Vec<u64> = entries.iter().map(|e| e.seq.get()).collect();
    check_seqs("the second replay only", &seqs, from..=count)
}

async fn from_seq_beyond_head(cx: &mut Ctx) -> CaseResult {
    let (mut a, _, conversation) = with_conversation(cx, "a").await?;
    send_many(cx, &mut a, conversation, 3).await?;
    a.send(&subscribe(5, conversation, Some(5))).await?;
    a.expect_error(ErrorCode::SeqOutOfRange, Some(5)).await?;
    Ok(())
}

async fn continue_without_batch(cx: &mut Ctx) -> CaseResult {
    let (mut a, _, conversation) = with_conversation(cx, "a").await?;
    send_many(cx, &mut a, conversation, 3).await?;
    a.send(&ClientFrame::Continue(Continue {
        stream: StreamId::Conversation(conversation),
        after_seq: Seq::FIRST,
    }))
    .await?;
    a.expect_error(ErrorCode::NotSubscribed, None).await?;
    Ok(())
}

async fn cursor_never_backwards(cx: &mut Ctx) -> CaseResult {
    let (mut a, _, conversation) = with_conversation(cx, "a").await?;
    send_many(cx, &mut a, conversation, 6).await?;
    let stream = StreamId::Conversation(conversation);
    for seq in [5, 3] {
        a.send(&ClientFrame::Ack(Ack {
            stream,
            seq: Seq::new(seq).unwrap_or(Seq::FIRST),
        }))
        .await?;
    }
    a.send(&subscribe(7, conversation, None)).await?;
    let (from, cursor) = a
        .expect("Subscribed", |f| match f {
            ServerFrame::Subscribed(s) if s.rid == 7 => Some((s.from_seq.get(), s.ack_cursor)),
            _ => None,
        })
        .await?;
    if (from, cursor) != (6, 5) {
        return Err(Failure::new(
            "ack_cursor 5 and from_seq 6",
            format!("ack_cursor {cursor}, from_seq {from}"),
        )
        .into());
    }
    Ok(())
}

async fn ack_beyond_head(cx: &mut Ctx) -> CaseResult {
    let (mut a, _, conversation) = with_conversation(cx, "a").await?;
    send_many(cx, &mut a, conversation, 2).await?;
    a.send(&ClientFrame::Ack(Ack {
        stream: StreamId::Conversation(conversation),
        seq: Seq::new(3).unwrap_or(Seq::FIRST),
    }))
    .await?;
    a.expect_error(ErrorCode::SeqOutOfRange, None).await?;
    Ok(())
}

/// `payload` must be refused with `code` and nothing appended.
async fn refused(
    cx: &mut Ctx,
    code: ErrorCode,
    make: impl FnOnce(ConversationId) -> MlsBytes,
) -> CaseResult {
    let (mut a, _, conversation) = with_conversation(cx, "a").await?;
    let answer = send_one(&mut a, 2, conversation, MsgId(random()), make(conversation)).await?;
    if answer != Err(code) {
        return Err(Failure::new(
            format!("Error {} {}", code.value(), code.name()),
            format!("{answer:?}"),
        )
        .into());
    }
    let next = send_one(
        &mut a,
        3,
        conversation,
        MsgId(random()),
        application(&conversation, b"ok"),
    )
    .await?;
    if next != Ok((1, false)) {
        return Err(Failure::new(
            "nothing appended: the next message is seq 1",
            format!("{next:?}"),
        )
        .into());
    }
    Ok(())
}

async fn not_mls(cx: &mut Ctx) -> CaseResult {
    refused(cx, ErrorCode::MlsMalformed, |_| {
        MlsBytes::new(b"this is not an MLS message".to_vec()).unwrap_or_else(|_| unreachable!())
    })
    .await
}

async fn wire_format(cx: &mut Ctx) -> CaseResult {
    // wire_format 5 (mls_key_package) with some body.
    refused(cx, ErrorCode::MlsWireFormatNotAllowed, |_| {
        MlsBytes::new(vec![0x00, 0x01, 0x00, 0x05, 0x00, 0x01, 0x00, 0x00])
            .unwrap_or_else(|_| unreachable!())
    })
    .await
}

async fn group_mismatch(cx: &mut Ctx) -> CaseResult {
    refused(cx, ErrorCode::MlsGroupMismatch, |_| {
        application(&ConversationId(random()), b"elsewhere")
    })
    .await
}

async fn public_application(cx: &mut Ctx) -> CaseResult {
    refused(cx, ErrorCode::MlsWireFormatNotAllowed, |c| {
        mls_message(1, &c, 0, 1, b"plain")
    })
    .await
}

async fn private_handshake(cx: &mut Ctx) -> CaseResult {
    refused(cx, ErrorCode::MlsWireFormatNotAllowed, |c| {
        mls_message(2, &c, 0, 3, b"commit")
    })
    .await
}

async fn epoch_ahead(cx: &mut Ctx) -> CaseResult {
    refused(cx, ErrorCode::EpochAhead, |c| {
        mls_message(2, &c, 5, 1, b"future")
    })
    .await
}

/// `payload_bytes_max` (SPEC.md 4.4: `frame_bytes_max` - 512).
pub(crate) fn payload_bytes_max(cx: &Ctx) -> usize {
    usize::try_from(cx.info.limits.frame_bytes_max)
        .unwrap_or(usize::MAX)
        .saturating_sub(512)
}

/// An application message of exactly `size` bytes.
pub(crate) fn application_of_size(conversation: &ConversationId, size: usize) -> MlsBytes {
    let header = application(conversation, b"").as_bytes().len();
    // The tail's length prefix grows with the tail; find the tail that fits exactly.
    let mut tail = size.saturating_sub(header);
    loop {
        let m = application(conversation, &vec![0xA5; tail]);
        match m.as_bytes().len().cmp(&size) {
            std::cmp::Ordering::Equal => return m,
            std::cmp::Ordering::Greater if tail > 0 => tail -= 1,
            _ => return m,
        }
    }
}

/// The socket buffers the slow-session case asks for, so that what is in flight sits in
/// the server's queue rather than in the client's kernel.
const SLOW_SESSION_SOCKET_BUFFERS: u32 = 65_536;

/// What can be in flight between a session that stops reading and the server's queue,
/// besides the queue: the server's socket buffers (Linux grows them up to 6 MiB for
/// receiving and 4 MiB for sending by default; a margin for other kernels) and the
/// client's (the kernel doubles what is asked).
const SOCKET_BUFFERS_BYTES: u64 = 16 * 1_048_576 + 4 * SLOW_SESSION_SOCKET_BUFFERS as u64;

/// Most `Send` frames the slow-session case sends.
const SLOW_SESSION_SENDS_MAX: u64 = 2_000;

async fn slow_session_closed(cx: &mut Ctx) -> CaseResult {
    let Some(queue_bytes) = cx.info.outbound_queue_bytes_max else {
        return Err(Stop::Skipped(
            "/v1/info announces no outbound_queue_bytes_max".into(),
        ));
    };
    let size = payload_bytes_max(cx).max(1);
    // Half again as much as the queue and the socket buffers hold, so that a kernel or a
    // WebSocket writer that buffers a little more than estimated does not leave the queue
    // short of full (seen once in a full test run: all 25 reached the silent session).
    let sends = ((queue_bytes + SOCKET_BUFFERS_BYTES) * 3 / 2).div_ceil(size as u64);
    if sends > SLOW_SESSION_SENDS_MAX {
        return Err(Stop::Skipped(format!(
            "overflowing an outbound queue of {queue_bytes} bytes takes {sends} sends of \
             {size} bytes, more than this case sends ({SLOW_SESSION_SENDS_MAX}); the \
             reference gateway's 8 MiB and 1 MiB frames take 37"
        )));
    }
    let (mut a, _) = cx
        .ready_with("a", &Device::fresh(), Some(SLOW_SESSION_SOCKET_BUFFERS))
        .await?;
    let conversation = create_conversation(&mut a, 1).await?;
    a.send(&subscribe(5, conversation, Some(1))).await?;
    subscribed(&mut a, 5).await?;
    a.expect("an empty Batch", |f| {
        matches!(f, ServerFrame::Batch(b) if b.entries.is_empty() && !b.more).then_some(())
    })
    .await?;
    // The session stops reading; each message comes back to it as a Deliver. Sends are
    // paced to the announced rate, and stop when the server stops reading them.
    let mut pace = cx
        .info
        .rate_limit("sends_per_device")
        .map(|(per_minute, burst)| SendPace::new(per_minute, burst));
    for i in 0..sends {
        if let Some(pace) = &mut pace {
            pace.take().await;
        }
        let frame = send_frame(
            4_000 + i,
            conversation,
            MsgId(random()),
            application_of_size(&conversation, size),
        );
        if tokio::time::timeout(ANSWER_WAIT, a.send(&frame))
            .await
            .is_err()
        {
            break;
        }
    }
    // Now it reads: the frames still in flight, then the close.
    let mut delivered = Vec::new();
    loop {
        match a.next(ANSWER_WAIT).await {
            Observed::Frame(ServerFrame::Deliver(d)) => delivered.push(d.entry.seq.get()),
            Observed::Frame(_) => {}
            Observed::Closed(Some(4002)) => break,
            // Everything came through: the queue never filled.
            _ if delivered.len() as u64 == sends => {
                return Err(Stop::Skipped(format!(
                    "all {sends} messages of {size} bytes reached the session that did not \
                     read: the server buffers more than outbound_queue_bytes_max \
                     ({queue_bytes}) and {SOCKET_BUFFERS_BYTES} bytes of socket buffers"
                )));
            }
            other => {
                return Err(Failure::new(
                    format!(
                        "close 4002 after {sends} messages of {size} bytes with the session \
                         not reading (outbound_queue_bytes_max {queue_bytes})"
                    ),
                    format!("{other} after {} Deliver frames", delivered.len()),
                )
                .into());
            }
        }
    }
    let count = delivered.len() as u64;
    check_seqs(
        "the Deliver frames before the close (none dropped)",
        &delivered,
        1..=count,
    )
}

async fn payload_too_large(cx: &mut Ctx) -> CaseResult {
    let size = payload_bytes_max(cx) + 1;
    refused(cx, ErrorCode::PayloadTooLarge, |c| {
        application_of_size(&c, size)
    })
    .await
}

async fn messages_within_limit(cx: &mut Ctx) -> CaseResult {
    let size = payload_bytes_max(cx);
    let limit = usize::try_from(cx.info.limits.frame_bytes_max).unwrap_or(usize::MAX);
    let (mut a, _, conversation) = with_conversation(cx, "a").await?;
    for rid in 10..13 {
        let answer = send_one(
            &mut a,
            rid,
            conversation,
            MsgId(random()),
            application_of_size(&conversation, size),
        )
        .await?;
        if answer.is_err() {
            return Err(Failure::new(
                format!("a payload of payload_bytes_max ({size}) Accepted"),
                format!("{answer:?}"),
            )
            .into());
        }
    }
    a.send(&subscribe(5, conversation, Some(1))).await?;
    subscribed(&mut a, 5).await?;
    let (entries, _) = replay(&mut a, conversation).await?;
    if entries.len() != 3 {
        return Err(Failure::new("3 entries", format!("{}", entries.len())).into());
    }
    if a.largest_received() > limit {
        return Err(Failure::new(
            format!("no message over frame_bytes_max ({limit} bytes)"),
            format!("a message of {} bytes", a.largest_received()),
        )
        .into());
    }
    Ok(())
}

async fn opaque_ciphertext(cx: &mut Ctx) -> CaseResult {
    let (mut a, _, conversation) = with_conversation(cx, "a").await?;
    let noise: [u8; 64] = random();
    let payload = application(&conversation, &noise);
    let answer = send_one(&mut a, 2, conversation, MsgId(random()), payload.clone()).await?;
    if answer != Ok((1, false)) {
        return Err(Failure::new("Accepted at seq 1", format!("{answer:?}")).into());
    }
    a.send(&subscribe(5, conversation, Some(1))).await?;
    subscribed(&mut a, 5).await?;
    let (entries, _) = replay(&mut a, conversation).await?;
    match entries.as_slice() {
        [e] if e.payload == payload => Ok(()),
        other => {
            Err(Failure::new("the payload delivered byte for byte", format!("{other:?}")).into())
        }
    }
}
