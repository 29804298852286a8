//! SPEC.md sections 6.6 and 6.7: retention deletes only entries that are old enough and
//! acknowledged by every member device (or abandoned), keeps their dedup records as long,
//! and a subscription that retention passed is told so with `ContinuityLost`.
//!
//! These cases wait for the server's retention to run. They need a `retention_ms` of at
//! most [`RETENTION_MS_MAX`] and a server that runs retention within
//! [`RETENTION_RUN_WAIT`] of it (the reference gateway's conformance profile: 2 s, run
//! every 250 ms); against a server announcing longer retention they are skipped. Each case
//! tells whether retention has run by a *control* conversation of its own whose entries
//! are all acknowledged and younger than the entries under test: once its first entry is
//! gone, retention has passed everything older that it may delete.

use std::time::{Duration, Instant};

use confab_spec::ServerFrame;
use confab_spec::frame::{ClientFrame, Continue, ContinuityLost};
use confab_spec::ids::{ConversationId, MsgId, StreamId};

use super::log::{
    ack, application, check_seqs, create_conversation, random, replay, send_many, send_mls,
    subscribe, subscribed, with_conversation,
};
use crate::case;
use crate::case::{Case, CaseResult, Failure, Stop};
use crate::context::{ANSWER_WAIT, Ctx, Observed, Peer};

/// The longest `retention_ms` these cases wait for.
pub const RETENTION_MS_MAX: u64 = 30_000;

/// How long after `retention_ms` the cases wait for retention to run before skipping.
pub const RETENTION_RUN_WAIT: Duration = Duration::from_secs(30);

/// How often a case looks at its control conversation while it waits.
const POLL: Duration = Duration::from_millis(250);

/// The cases of sections 6.6 and 6.7.
pub fn cases() -> Vec<Case> {
    vec![
        case!(
            "6.6-1.continuity-lost",
            "REQ-6.6-1",
            Must,
            "a Subscribe below oldest_seq is ContinuityLost (not a replay from oldest_seq), and the stream stays unsubscribed",
            continuity_lost
        ),
        case!(
            "6.6-2.continuity-lost-in-replay",
            "REQ-6.6-2",
            Must,
            "retention passing a paused replay ends it with ContinuityLost from the next seq",
            continuity_lost_in_replay
        ),
        case!(
            "6.7-1.unacknowledged-kept",
            "REQ-6.7-1",
            Must,
            "entries not yet acknowledged by every member device, or younger than retention_ms, are kept",
            unacknowledged_kept
        ),
        case!(
            "6.7-2.dedup-kept-with-entry",
            "REQ-6.7-2",
            Must,
            "a msg_id resent after retention_ms, while its entry is kept, is still a duplicate",
            dedup_kept_with_entry
        ),
    ]
}

/// The announced `(retention_ms, retention_unacked_ms)`, or why the cases cannot run.
fn retention(cx: &Ctx) -> Result<(u64, u64), Stop> {
    let (Some(retention_ms), Some(unacked_ms)) =
        (cx.info.retention_ms, cx.info.retention_unacked_ms)
    else {
        return Err(Stop::Skipped(
            "/v1/info announces no retention_ms and retention_unacked_ms".into(),
        ));
    };
    if retention_ms > RETENTION_MS_MAX {
        return Err(Stop::Skipped(format!(
            "needs retention_ms of at most {RETENTION_MS_MAX} ms to see retention run; the \
             server announces {retention_ms} (the reference gateway's conformance profile \
             sets 2000)"
        )));
    }
    Ok((retention_ms, unacked_ms))
}

/// A control conversation on `peer`: `count` entries, all acknowledged.
async fn control(cx: &Ctx, peer: &mut Peer, rid: u64, count: u64) -> Result<ConversationId, Stop> {
    let conversation = create_conversation(peer, rid).await?;
    send_many(cx, peer, conversation, count).await?;
    ack(peer, conversation, count).await?;
    Ok(conversation)
}

/// Waits until retention has deleted the first entry of `control` (all acknowledged),
/// looking at `Subscribed.oldest_seq`; returns it, with any `ContinuityLost` that came
/// meanwhile for another stream. Skips when retention does not run in time.
async fn wait_for_retention(
    peer: &mut Peer,
    control: ConversationId,
    retention_ms: u64,
) -> Result<(u64, Vec<ContinuityLost>), Stop> {
    let deadline = Instant::now() + Duration::from_millis(retention_ms) + RETENTION_RUN_WAIT;
    let mut lost = Vec::new();
    let mut rid = 10_000;
    loop {
        rid += 1;
        // From the cursor (the head): a `Subscribed`, then one empty `Batch`.
        peer.send(&subscribe(rid, control, None)).await?;
        let stream = StreamId::Conversation(control);
        let mut oldest = None;
        loop {
            match peer.next(ANSWER_WAIT).await {
                Observed::Frame(ServerFrame::Subscribed(s)) if s.rid == rid => {
                    oldest = Some(s.oldest_seq);
                }
                Observed::Frame(ServerFrame::Batch(b)) if b.stream == stream && !b.more => {
                    if oldest.is_some() {
                        break;
                    }
                }
                Observed::Frame(ServerFrame::ContinuityLost(c)) if c.stream != stream => {
                    lost.push(c);
                }
                Observed::Frame(ServerFrame::HeartbeatAck(_)) => {}
                other => {
                    return Err(Failure::new(
                        format!(
                            "Subscribed for rid {rid}, then an empty Batch (the control \
                             conversation, acknowledged to its head)"
                        ),
                        other.to_string(),
                    )
                    .into());
                }
            }
        }
        let oldest = oldest.unwrap_or(1);
        if oldest > 1 {
            return Ok((oldest, lost));
        }
        if Instant::now() > deadline {
            return Err(Stop::Skipped(format!(
                "retention did not delete acknowledged entries within {} s after \
                 retention_ms; these cases need a server that runs retention that often",
                RETENTION_RUN_WAIT.as_secs()
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn continuity_lost(cx: &mut Ctx) -> CaseResult {
    let (retention_ms, _) = retention(cx)?;
    let (mut a, _, conversation) = with_conversation(cx, "a").await?;
    send_many(cx, &mut a, conversation, 3).await?;
    ack(&mut a, conversation, 3).await?;
    // The conversation is its own control: all of it is acknowledged.
    let (oldest, _) = wait_for_retention(&mut a, conversation, retention_ms).await?;
    a.send(&subscribe(7, conversation, Some(1))).await?;
    let answer = a
        .expect("ContinuityLost for rid 7", |f| match f {
            ServerFrame::ContinuityLost(c) if c.rid == 7 => Some(c.clone()),
            _ => None,
        })
        .await?;
    // Retention may have gone on since the poll: oldest_seq only grows.
    let observed = (answer.stream, answer.from_seq.get(), answer.head_seq);
    if observed != (StreamId::Conversation(conversation), 1, 3) || answer.oldest_seq < oldest {
        return Err(Failure::new(
            format!("stream {conversation:?}, from_seq 1, oldest_seq {oldest} or more, head_seq 3"),
            format!("{answer:?}"),
        )
        .into());
    }
    // Unsubscribed: a new entry is acknowledged to its sender but not delivered.
    let sent = send_mls(
        &mut a,
        8,
        conversation,
        MsgId(random()),
        application(&conversation, b"after"),
        None,
    )
    .await?;
    if sent.as_ref().map(|(seq, _)| *seq) != Ok(4) {
        return Err(Failure::new("Accepted seq 4", format!("{sent:?}")).into());
    }
    a.expect_silence("no Deliver: ContinuityLost leaves the stream unsubscribed")
        .await
}

async fn continuity_lost_in_replay(cx: &mut Ctx) -> CaseResult {
    let (retention_ms, _) = retention(cx)?;
    let batch_max = cx.info.limits.replay_batch_max.max(1);
    let count = (batch_max + 2).min(1_000);
    let (mut a, _, conversation) = with_conversation(cx, "a").await?;
    send_many(cx, &mut a, conversation, count).await?;
    ack(&mut a, conversation, count).await?;
    a.send(&subscribe(5, conversation, Some(1))).await?;
    subscribed(&mut a, 5).await?;
    let (last, more) = a
        .expect("Batch", |f| match f {
            ServerFrame::Batch(b) => Some((b.entries.last().map(|e| e.seq), b.more)),
            _ => None,
        })
        .await?;
    let (Some(last), true) = (last, more) else {
        return Err(Failure::new(
            format!("a first Batch with more true ({count} entries, replay_batch_max {batch_max})"),
            format!("last seq {last:?}, more {more}"),
        )
        .into());
    };
    // The replay waits for `Continue` while retention passes it.
    let control = control(cx, &mut a, 6, 1).await?;
    let (_, mut lost) = wait_for_retention(&mut a, control, retention_ms).await?;
    if lost.is_empty() {
        // A server may tell at once or when the replay goes on.
        a.send(&ClientFrame::Continue(Continue {
            stream: StreamId::Conversation(conversation),
            after_seq: last,
        }))
        .await?;
        lost.push(
            a.expect("ContinuityLost for rid 5", |f| match f {
                ServerFrame::ContinuityLost(c) => Some(c.clone()),
                _ => None,
            })
            .await?,
        );
    }
    let answer = &lost[0];
    let from = last.get() + 1;
    if (
        answer.rid,
        answer.stream,
        answer.from_seq.get(),
        answer.head_seq,
    ) != (5, StreamId::Conversation(conversation), from, count)
        || answer.oldest_seq <= from
    {
        return Err(Failure::new(
            format!(
                "ContinuityLost rid 5, stream {conversation:?}, from_seq {from} (the replay's \
                 next seq), oldest_seq above it, head_seq {count}"
            ),
            format!("{answer:?}"),
        )
        .into());
    }
    Ok(())
}

async fn unacknowledged_kept(cx: &mut Ctx) -> CaseResult {
    let (retention_ms, unacked_ms) = retention(cx)?;
    let (mut a, _, young) = with_conversation(cx, "a").await?;
    // Condition 1: acknowledged but younger than retention_ms.
    let started = Instant::now();
    send_many(cx, &mut a, young, 3).await?;
    ack(&mut a, young, 3).await?;
    // Only while the entries are well within retention_ms (a slow link skips this part).
    if started.elapsed() < Duration::from_millis(retention_ms / 2) {
        all_kept(
            &mut a,
            young,
            3,
            "acknowledged entries younger than retention_ms",
        )
        .await?;
    }
    // Condition 2: old enough but not acknowledged by the member device.
    let unacked = create_conversation(&mut a, 4).await?;
    let sent = Instant::now();
    send_many(cx, &mut a, unacked, 3).await?;
    let control = control(cx, &mut a, 5, 1).await?;
    wait_for_retention(&mut a, control, retention_ms).await?;
    if sent.elapsed() >= Duration::from_millis(unacked_ms) {
        return Err(Stop::Skipped(format!(
            "retention took longer than retention_unacked_ms ({unacked_ms} ms), after which \
             unacknowledged entries may go"
        )));
    }
    all_kept(
        &mut a,
        unacked,
        3,
        "entries past retention_ms that no member device acknowledged",
    )
    .await
}

/// `conversation`'s entries `1..=count`, `what`, must all still be there: a `Subscribe`
/// from seq 1 is answered with `oldest_seq` 1 and replays every one of them.
async fn all_kept(
    peer: &mut Peer,
    conversation: ConversationId,
    count: u64,
    what: &str,
) -> CaseResult {
    peer.send(&subscribe(20_000, conversation, Some(1))).await?;
    let expected = format!("Subscribed for rid 20000 with oldest_seq 1: {what} are kept");
    let oldest = peer
        .expect(&expected, |f| match f {
            ServerFrame::Subscribed(s) if s.rid == 20_000 => Some(s.oldest_seq),
            _ => None,
        })
        .await?;
    if oldest != 1 {
        return Err(Failure::new(expected, format!("oldest_seq {oldest}")).into());
    }
    let (entries, _) = replay(peer, conversation).await?;
    let seqs: Vec<u64> = entries.iter().map(|e| e.seq.get()).collect();
    check_seqs(what, &seqs, 1..=count)
}

async fn dedup_kept_with_entry(cx: &mut Ctx) -> CaseResult {
    let (retention_ms, unacked_ms) = retention(cx)?;
    let (mut a, _, conversation) = with_conversation(cx, "a").await?;
    let msg_id = MsgId(random());
    let payload = application(&conversation, b"kept");
    let sent = Instant::now();
    let first = send_mls(&mut a, 2, conversation, msg_id, payload.clone(), None).await?;
    if first.as_ref().map(|a| *a) != Ok((1, false)) {
        return Err(Failure::new("Accepted seq 1", format!("{first:?}")).into());
    }
    // Not acknowledged: the entry stays until retention_unacked_ms.
    let control = control(cx, &mut a, 3, 1).await?;
    wait_for_retention(&mut a, control, retention_ms).await?;
    if sent.elapsed() >= Duration::from_millis(unacked_ms) {
        return Err(Stop::Skipped(format!(
            "retention took longer than retention_unacked_ms ({unacked_ms} ms)"
        )));
    }
    let again = send_mls(&mut a, 4, conversation, msg_id, payload, None).await?;
    if again.as_ref().map(|a| *a) != Ok((1, true)) {
        return Err(Failure::new(
            "Accepted seq 1 duplicate true: the entry is kept, so is its dedup record",
            format!("{again:?}"),
        )
        .into());
    }
    Ok(())
}
