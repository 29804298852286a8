//! `resume`: a device comes back to a backlog of B entries and replays it (SPEC.md 6.4:
//! `Batch` frames, one `Continue` each). Reports entries per second, the time from
//! `Subscribe` to the last entry (as the client sees it, an upper bound on the gateway's
//! share) and the gateway's CPU time over the replay.

use std::time::{Duration, Instant};

use confab_spec::frame::{ClientFrame, Continue, ConversationKind, ServerFrame, Subscribe};
use confab_spec::ids::{Seq, StreamId};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;

use crate::progress::Progress;
use crate::setup;
use crate::target::Target;
use crate::wire::{self, Identity, LoadError};

/// What `resume` does.
#[derive(Debug, Clone)]
pub struct ResumeParams {
    /// Backlog entries.
    pub backlog: usize,
    /// Bytes per message.
    pub payload: usize,
    /// Replays of the same backlog (the first reads a cold cache).
    pub repeats: usize,
}

/// One replay.
#[derive(Debug, Clone, Serialize)]
pub struct Replay {
    /// From `Subscribe` sent to the last entry received, ms.
    pub catch_up_ms: f64,
    /// Entries per second over that time.
    pub entries_per_s: f64,
    /// The gateway's CPU time (user + system) over that time, ms (10 ms resolution).
    pub gateway_cpu_ms: Option<f64>,
    /// `Batch` frames (one round trip each).
    pub batches: usize,
}

/// What `resume` measured.
#[derive(Debug, Clone, Serialize)]
pub struct ResumeResult {
    /// Backlog entries.
    pub backlog: usize,
    /// Bytes per message.
    pub payload_bytes: usize,
    /// Each replay, in order.
    pub replays: Vec<Replay>,
    /// The fastest catch-up, ms.
    pub best_catch_up_ms: f64,
}

/// Runs `resume` against a gateway.
pub async fn run(target: &Target, params: &ResumeParams) -> Result<ResumeResult, LoadError> {
    let endpoint = &target.endpoint;
    let writer = Identity::fresh();
    let reader = Identity::fresh();
    let mut ws = wire::open(endpoint, wire::source(0)).await?;
    wire::authenticate(&mut ws, endpoint, &writer).await?;
    let c = setup::conversation(
        &writer,
        ws,
        std::slice::from_ref(&reader),
        ConversationKind::DirectMessage,
        0,
    )
    .await?;
    let mut progress = Progress::new("resume: writing the backlog".into());
    let (mut sink, mut stream) = c.creator_ws.split();
    let window = 256usize;
    let (mut sent, mut answered) = (0usize, 0usize);
    while answered < params.backlog {
        while sent < params.backlog && sent - answered < window {
            sent += 1;
            let frame = setup::application_send(
                1_000 + sent as u64,
                c.conversation,
                c.epoch,
                params.payload,
                0,
                wire::now_ns(),
            )?;
            sink.feed(Message::Binary(frame.into()))
                .await
                .or_else(|e| wire::fail("sending", e))?;
        }
        sink.flush().await.or_else(|e| wire::fail("sending", e))?;
        let message = tokio::time::timeout(wire::ANSWER_WAIT, stream.next())
            .await
            .or_else(|_| wire::fail("resume", "no answer within 30 s"))?;
        match message {
            Some(Ok(Message::Binary(bytes))) => {
                match ServerFrame::decode(&bytes, &Default::default()) {
                    Ok(ServerFrame::Accepted(_)) => answered += 1,
                    Ok(ServerFrame::Error(e)) => {
                        return wire::fail(
                            "writing the backlog",
                            format!("Error {}", e.code.name()),
                        );
                    }
                    _ => {}
                }
            }
            Some(Ok(_)) => {}
            _ => return wire::fail("writing the backlog", "the server closed the connection"),
        }
        progress.show(answered, params.backlog);
    }
    progress.finish(&format!("{} entries", params.backlog));
    let first = c.head + 1;
    let last = c.head + params.backlog as u64;
    let mut ws = wire::open(endpoint, wire::source(1)).await?;
    wire::authenticate(&mut ws, endpoint, &reader).await?;
    let stream_id = StreamId::Conversation(c.conversation);
    let mut replays = Vec::new();
    for repeat in 0..params.repeats.max(1) {
        let cpu_before = target.cpu_time();
        let started = Instant::now();
        let rid = 10 + repeat as u64;
        wire::send(
            &mut ws,
            &ClientFrame::Subscribe(Subscribe {
                rid,
                stream: stream_id,
                from_seq: Seq::new(first),
            }),
        )
        .await?;
        let mut next = first;
        let mut batches = 0;
        let deadline = Instant::now() + Duration::from_secs(120);
        while next <= last {
            if Instant::now() > deadline {
                return wire::fail("resume", "the replay took more than 120 s");
            }
            match wire::next(&mut ws).await? {
                ServerFrame::Batch(b) => {
                    batches += 1;
                    for entry in &b.entries {
                        if entry.seq.get() != next {
                            return wire::fail(
                                "resume",
                                format!("expected seq {next}, got {}", entry.seq.get()),
                            );
                        }
                        next += 1;
                    }
                    if b.more {
                        let Some(after) = b.entries.last().map(|e| e.seq) else {
                            return wire::fail("resume", "an empty Batch with more");
                        };
                        wire::send(
                            &mut ws,
                            &ClientFrame::Continue(Continue {
                                stream: stream_id,
                                after_seq: after,
                            }),
                        )
                        .await?;
                    }
                }
                ServerFrame::Error(e) => {
                    return wire::fail("resume", format!("Error {}", e.code.name()));
                }
                _ => {}
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = match (cpu_before, target.cpu_time()) {
            (Some(a), Some(b)) => Some((b - a).as_secs_f64() * 1000.0),
            _ => None,
        };
        replays.push(Replay {
            catch_up_ms: elapsed * 1000.0,
            entries_per_s: params.backlog as f64 / elapsed,
            gateway_cpu_ms: cpu,
            batches,
        });
    }
    let best = replays
        .iter()
        .map(|r| r.catch_up_ms)
        .fold(f64::INFINITY, f64::min);
    let _ = ws.close(None).await;
    Ok(ResumeResult {
        backlog: params.backlog,
        payload_bytes: params.payload,
        replays,
        best_catch_up_ms: best,
    })
}
