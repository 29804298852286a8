//! Durability: the cases that stop the server, a graceful shutdown (REQ-5.7-3) and a crash
//! (REQ-6.3-1), each followed by a restart and a replay that must hold every entry the
//! server acknowledged (they need the run's server control, [`crate::control`], and are
//! skipped without it); and what the server says its acknowledgements survive
//! (REQ-6.3-5).
//!
//! Each case starts the server again whatever it observed, before it judges, so that the
//! cases after it find a server.

use std::collections::BTreeMap;
use std::time::Duration;

use confab_spec::ServerFrame;
use confab_spec::ids::{ConversationId, MsgId};

use super::log::{
    application, check_seqs, random, replay, send_frame, subscribe, subscribed, with_conversation,
};
use crate::case;
use crate::case::{Case, CaseResult, Failure, Stop};
use crate::context::{ANSWER_WAIT, Ctx, Device, Observed, Peer};
use crate::control::{COMMAND_WAIT, Command};

/// The cases of REQ-5.7-3, REQ-6.3-1 and REQ-6.3-5.
pub fn cases() -> Vec<Case> {
    vec![
        case!(
            "5.7-3.graceful-shutdown",
            "REQ-5.7-3",
            Must,
            "a graceful shutdown closes every session with 4000, accepts no new connection, and keeps every acknowledged entry",
            graceful_shutdown
        ),
        case!(
            "6.3-1.acknowledged-survives-crash",
            "REQ-6.3-1",
            Must,
            "every entry acknowledged before the server was killed mid-stream is there after the restart, at its seq",
            acknowledged_survives_crash
        ),
        case!(
            "6.3-5.durability-reported",
            "REQ-6.3-5",
            Must,
            "/v1/info reports durability: process_crash or power_loss",
            durability_reported
        ),
    ]
}

async fn durability_reported(cx: &mut Ctx) -> CaseResult {
    // The run read /v1/info before the first case.
    match cx.info.durability.as_deref() {
        Some("process_crash" | "power_loss") => Ok(()),
        other => Err(Failure::new(
            "\"durability\": \"process_crash\" or \"power_loss\" in /v1/info",
            match other {
                Some(value) => format!("\"durability\": {value:?}"),
                None => "no durability".into(),
            },
        )
        .into()),
    }
}

/// Sends in flight at once while the server goes down.
const IN_FLIGHT: u64 = 16;

/// Sends of one crash round at most (three rounds stay inside the reference's burst of
/// `sends_per_device`; a refused send is simply not acknowledged).
const ROUND_SENDS_MAX: u64 = 50;

/// Crash rounds: kill, restart, check.
const CRASH_ROUNDS: usize = 3;

/// The acknowledged entries of a conversation: seq → msg_id.
type Acked = BTreeMap<u64, MsgId>;

/// Skips a case that sends `sends` messages from one device at once when the server's
/// announced `sends_per_device` burst (SPEC.md 11) is smaller: its refusals would leave
/// too few acknowledged entries to check.
fn within_send_burst(cx: &Ctx, sends: u64) -> Result<(), Stop> {
    match cx.info.rate_limit("sends_per_device") {
        Some((_, burst)) if burst < sends => Err(Stop::Skipped(format!(
            "sends {sends} messages from one device at once; the server's sends_per_device burst is {burst}"
        ))),
        _ => Ok(()),
    }
}

/// Sends without waiting for the answer: `Send` with `rid`, its msg_id.
async fn send_unanswered(
    peer: &mut Peer,
    rid: u64,
    conversation: ConversationId,
) -> Result<MsgId, Stop> {
    let msg_id = MsgId(random());
    let body = format!("entry {rid}");
    peer.send(&send_frame(
        rid,
        conversation,
        msg_id,
        application(&conversation, body.as_bytes()),
    ))
    .await?;
    Ok(msg_id)
}

/// Records an `Accepted` for one of `sent` (rid → msg_id) in `acked`; a failure if it
/// names a seq already acknowledged for another message.
fn record(acked: &mut Acked, sent: &BTreeMap<u64, MsgId>, rid: u64, seq: u64) -> Result<(), Stop> {
    let Some(msg_id) = sent.get(&rid) else {
        return Ok(());
    };
    match acked.insert(seq, *msg_id) {
        Some(other) if other != *msg_id => Err(Failure::new(
            "one message per acknowledged seq",
            format!("seq {seq} acknowledged for two messages"),
        )
        .into()),
        _ => Ok(()),
    }
}

/// How a session's connection ended while the server went down.
#[derive(Debug, Default)]
struct Ending {
    /// The close code it got, `None` without a close frame.
    code: Option<u16>,
    /// Whether it ended at all within the wait.
    ended: bool,
}

/// Reads `peer` until its connection ends (or [`COMMAND_WAIT`] and [`ANSWER_WAIT`] pass),
/// recording the `Accepted` of `sent`, and sending more (while `more` is above zero) each
/// time one is answered.
async fn read_until_closed(
    peer: &mut Peer,
    conversation: ConversationId,
    sent: &mut BTreeMap<u64, MsgId>,
    acked: &mut Acked,
    mut more: u64,
) -> Result<Ending, Stop> {
    let deadline = tokio::time::Instant::now() + COMMAND_WAIT + ANSWER_WAIT;
    loop {
        let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
        match peer.next(wait.max(Duration::from_millis(1))).await {
            Observed::Frame(ServerFrame::Accepted(a)) => {
                record(acked, sent, a.rid, a.seq.get())?;
                if more > 0 {
                    more -= 1;
                    let rid = sent.keys().next_back().copied().unwrap_or(1_000) + 1;
                    let msg_id = send_unanswered(peer, rid, conversation).await?;
                    sent.insert(rid, msg_id);
                }
            }
            Observed::Frame(_) | Observed::Undecodable(_) => {}
            Observed::Closed(code) => return Ok(Ending { code, ended: true }),
            Observed::Silence => return Ok(Ending::default()),
        }
    }
}

/// A fresh session of `device` replays `conversation` from seq 1: every entry of `acked`
/// must be there at its seq, and the seqs dense.
async fn check_replay(
    cx: &Ctx,
    device: &Device,
    conversation: ConversationId,
    acked: &Acked,
    after: &str,
) -> CaseResult {
    let (mut reader, _) = cx.ready("reader", device).await?;
    reader.send(&subscribe(90, conversation, Some(1))).await?;
    subscribed(&mut reader, 90).await?;
    let (entries, _) = replay(&mut reader, conversation).await?;
    let found: BTreeMap<u64, MsgId> = entries.iter().map(|e| (e.seq.get(), e.msg_id)).collect();
    let lost: Vec<u64> = acked
        .iter()
        .filter(|(seq, msg_id)| found.get(seq) != Some(msg_id))
        .map(|(seq, _)| *seq)
        .collect();
    if !lost.is_empty() {
        return Err(Failure::new(
            format!(
                "after {after}, every one of the {} acknowledged entries at its seq",
                acked.len()
            ),
            format!(
                "seqs {lost:?} missing or holding another message (the replay had seqs {:?})",
                found.keys().collect::<Vec<_>>()
            ),
        )
        .into());
    }
    let seqs: Vec<u64> = found.keys().copied().collect();
    check_seqs(
        &format!("after {after}, dense seqs from 1 (REQ-6.2-1)"),
        &seqs,
        1..=seqs.len() as u64,
    )
}

async fn graceful_shutdown(cx: &mut Ctx) -> CaseResult {
    cx.control.require(&[Command::Stop, Command::Start])?;
    within_send_burst(cx, 10 + 2 * IN_FLIGHT)?;
    let (mut a, device, conversation) = with_conversation(cx, "a").await?;
    let mut sent = BTreeMap::new();
    let mut acked = Acked::new();
    // Ten entries acknowledged one by one, then a listener and sends in flight.
    for rid in 1_001..=1_010 {
        let msg_id = send_unanswered(&mut a, rid, conversation).await?;
        sent.insert(rid, msg_id);
        let seq = a
            .expect("Accepted", |f| match f {
                ServerFrame::Accepted(x) if x.rid == rid => Some(x.seq.get()),
                _ => None,
            })
            .await?;
        record(&mut acked, &sent, rid, seq)?;
    }
    // A second device's session, idle (a second session of the same device would replace
    // the first, REQ-5.5-9).
    let (mut b, _) = cx.ready("b", &Device::fresh()).await?;
    for rid in 1_011..1_011 + IN_FLIGHT {
        let msg_id = send_unanswered(&mut a, rid, conversation).await?;
        sent.insert(rid, msg_id);
    }

    let control = cx.control.clone();
    let mut b_sent = BTreeMap::new();
    let mut b_acked = Acked::new();
    let (stopped, a_end, b_end) = tokio::join!(
        control.run(Command::Stop),
        read_until_closed(&mut a, conversation, &mut sent, &mut acked, IN_FLIGHT),
        read_until_closed(&mut b, conversation, &mut b_sent, &mut b_acked, 0),
    );
    // A connection attempt while the server is down must not be taken.
    let taken = if stopped.is_ok() {
        tokio::time::timeout(
            ANSWER_WAIT,
            tokio_tungstenite::connect_async(cx.url.as_str()),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    } else {
        false
    };
    cx.control.start_and_wait(&cx.url).await?;
    stopped?;
    for (name, ending) in [("a (sending)", a_end?), ("b (idle)", b_end?)] {
        if ending.code != Some(4000) {
            let observed = match (ending.ended, ending.code) {
                (false, _) => "the connection still open".to_owned(),
                (true, None) => "the connection ended without a close frame".to_owned(),
                (true, Some(code)) => format!("close {code}"),
            };
            return Err(Failure::new(
                format!("session {name} closed with 4000 by the graceful shutdown"),
                observed,
            )
            .into());
        }
    }
    if taken {
        return Err(Failure::new(
            "no new connection taken once the server has shut down",
            "a WebSocket upgrade after the --stop-command returned",
        )
        .into());
    }
    check_replay(cx, &device, conversation, &acked, "a graceful shutdown").await
}

async fn acknowledged_survives_crash(cx: &mut Ctx) -> CaseResult {
    cx.control.require(&[Command::Kill, Command::Start])?;
    within_send_burst(cx, ROUND_SENDS_MAX * CRASH_ROUNDS as u64)?;
    let (mut a, device, conversation) = with_conversation(cx, "a").await?;
    let mut acked = Acked::new();
    let mut sent = BTreeMap::new();
    for round in 0..CRASH_ROUNDS {
        if round > 0 {
            (a, _) = cx.ready("a", &device).await?;
        }
        // Keep IN_FLIGHT sends in the air; the kill comes after a few are answered, while
        // the rest are being written.
        let first = 1_000 * (round as u64 + 1);
        for rid in first..first + IN_FLIGHT {
            let msg_id = send_unanswered(&mut a, rid, conversation).await?;
            sent.insert(rid, msg_id);
        }
        let mut answered = 0;
        while answered < IN_FLIGHT / 2 {
            match a.next(ANSWER_WAIT).await {
                Observed::Frame(ServerFrame::Accepted(x)) => {
                    record(&mut acked, &sent, x.rid, x.seq.get())?;
                    answered += 1;
                    let rid = sent.keys().next_back().copied().unwrap_or(first) + 1;
                    let msg_id = send_unanswered(&mut a, rid, conversation).await?;
                    sent.insert(rid, msg_id);
                }
                Observed::Frame(ServerFrame::HeartbeatAck(_) | ServerFrame::Error(_)) => {}
                other => {
                    return Err(Failure::new("Accepted", other.to_string()).into());
                }
            }
        }
        let control = cx.control.clone();
        let more = ROUND_SENDS_MAX - IN_FLIGHT - answered;
        let (killed, ended) = tokio::join!(
            control.run(Command::Kill),
            read_until_closed(&mut a, conversation, &mut sent, &mut acked, more),
        );
        cx.control.start_and_wait(&cx.url).await?;
        killed?;
        // A killed server sends no close frame; one that does was not killed (a heartbeat
        // timeout, say, while the command missed the server), and the replay would prove
        // nothing.
        match ended? {
            Ending {
                ended: true,
                code: None,
            } => {}
            other => {
                return Err(Failure::new(
                    "the connection cut without a close frame when the server is killed",
                    match other.code {
                        Some(code) => {
                            format!("close {code} (is the --kill-command killing the server?)")
                        }
                        None => "it stayed open (is the --kill-command killing the server?)".into(),
                    },
                )
                .into());
            }
        }
        check_replay(
            cx,
            &device,
            conversation,
            &acked,
            &format!("crash {} of {CRASH_ROUNDS}", round + 1),
        )
        .await?;
    }
    Ok(())
}
