//! `append`: sustained sends with acks. Each connection sends into its own conversation,
//! keeping `window` sends unanswered; an `Accepted` is the gateway's promise that the
//! entry is durable (SPEC.md 6.3). Reports appends per second and ack latency.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use confab_spec::frame::{ConversationKind, ServerFrame};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::Barrier;
use tokio_tungstenite::tungstenite::Message;

use crate::progress::Progress;
use crate::setup;
use crate::stats::Latency;
use crate::target::Target;
use crate::wire::{self, Identity, LoadError, now_ns};

/// What `append` does.
#[derive(Debug, Clone)]
pub struct AppendParams {
    /// Connections, each sending into its own conversation.
    pub connections: usize,
    /// Unanswered sends per connection.
    pub window: usize,
    /// Bytes per message.
    pub payload: usize,
    /// Measured time.
    pub duration: Duration,
    /// Time before it, left out of the figures.
    pub warmup: Duration,
}

/// What `append` measured.
#[derive(Debug, Clone, Serialize)]
pub struct AppendResult {
    /// Connections.
    pub connections: usize,
    /// Window per connection.
    pub window: usize,
    /// Bytes per message.
    pub payload_bytes: usize,
    /// Sends accepted in the measured window.
    pub accepted: u64,
    /// Sends refused (Error frames), whole run.
    pub refused: u64,
    /// Accepted per second.
    pub appends_per_s: f64,
    /// Send-to-Accepted latency.
    pub ack_latency: Latency,
    /// Appends per WAL sync in the window (group commit batches them), when the
    /// gateway's metrics say.
    pub appends_per_sync: Option<f64>,
}

struct Outcome {
    latencies: Vec<u32>,
    refused: u64,
}

async fn connection(
    endpoint: wire::Endpoint,
    i: usize,
    params: AppendParams,
    start: Arc<Barrier>,
    window: (u64, u64),
) -> Result<Outcome, LoadError> {
    let identity = Identity::fresh();
    let mut ws = wire::open(&endpoint, wire::source(i)).await?;
    wire::authenticate(&mut ws, &endpoint, &identity).await?;
    let conversation = wire::random_conversation();
    let create = setup::creation(&identity, 1, conversation, ConversationKind::DirectMessage)?;
    wire::send(&mut ws, &create).await?;
    wire::expect(&mut ws, "Created", |f| match f {
        ServerFrame::Created(_) => Ok(Some(())),
        other => Err(Box::new(other)),
    })
    .await?;
    start.wait().await;
    let (measure_from, measure_to) = window;
    let (mut sink, mut stream) = ws.split();
    let mut in_flight: HashMap<u64, u64> = HashMap::new();
    let mut rid = 1u64;
    let mut outcome = Outcome {
        latencies: Vec::new(),
        refused: 0,
    };
    loop {
        let now = now_ns();
        while in_flight.len() < params.window && now < measure_to {
            rid += 1;
            let t = now_ns();
            let frame = setup::application_send(rid, conversation, 0, params.payload, i as u32, t)?;
            sink.feed(Message::Binary(frame.into()))
                .await
                .or_else(|e| wire::fail("sending", e))?;
            in_flight.insert(rid, t);
        }
        sink.flush().await.or_else(|e| wire::fail("sending", e))?;
        if in_flight.is_empty() {
            break;
        }
        let message = tokio::time::timeout(wire::ANSWER_WAIT, stream.next())
            .await
            .or_else(|_| wire::fail("append", "no answer within 30 s"))?;
        let Some(Ok(Message::Binary(bytes))) = message else {
            match message {
                Some(Ok(_)) => continue,
                _ => return wire::fail("append", "the server closed the connection"),
            }
        };
        let frame = ServerFrame::decode(&bytes, &Default::default())
            .or_else(|e| wire::fail("decoding", e))?;
        let (answered, accepted) = match frame {
            ServerFrame::Accepted(a) => (a.rid, true),
            ServerFrame::Error(e) => match e.rid {
                Some(rid) => (rid, false),
                None => continue,
            },
            _ => continue,
        };
        let Some(sent) = in_flight.remove(&answered) else {
            continue;
        };
        if !accepted {
            outcome.refused += 1;
        } else if sent >= measure_from && sent < measure_to {
            let us = (now_ns().saturating_sub(sent) / 1_000).min(u64::from(u32::MAX));
            outcome.latencies.push(us as u32);
        }
    }
    Ok(outcome)
}

/// Runs `append` against `target`.
pub async fn run(target: &Target, params: &AppendParams) -> Result<AppendResult, LoadError> {
    let mut progress = Progress::new("append".into());
    let start = Arc::new(Barrier::new(params.connections + 1));
    // The window is fixed once every connection is ready (the barrier).
    let setup_allowance =
        Duration::from_secs(5) + Duration::from_millis(params.connections as u64 * 20);
    let begin = now_ns() + setup_allowance.as_nanos() as u64;
    let measure_from = begin + params.warmup.as_nanos() as u64;
    let measure_to = measure_from + params.duration.as_nanos() as u64;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..params.connections {
        tasks.spawn(connection(
            target.endpoint.clone(),
            i,
            params.clone(),
            start.clone(),
            (measure_from, measure_to),
        ));
    }
    if tokio::time::timeout(setup_allowance, start.wait())
        .await
        .is_err()
    {
        while let Some(done) = tasks.join_next().await {
            if let Ok(Err(e)) = done {
                return Err(e);
            }
        }
        return wire::fail("append", "the connections were not set up in time");
    }
    if now_ns() > begin {
        return wire::fail(
            "append",
            "setting up the connections took longer than allowed",
        );
    }
    tokio::time::sleep(Duration::from_nanos(measure_from - now_ns())).await;
    let appends_before = target.metric("confab_appends_total");
    let syncs_before = target.metric("confab_store_syncs_total");
    let mut elapsed = 0;
    while now_ns() < measure_to {
        progress.show(elapsed, params.duration.as_secs() as usize);
        tokio::time::sleep(Duration::from_secs(1)).await;
        elapsed += 1;
    }
    let appends_after = target.metric("confab_appends_total");
    let syncs_after = target.metric("confab_store_syncs_total");
    let mut latencies = Vec::new();
    let mut refused = 0;
    while let Some(done) = tasks.join_next().await {
        let outcome = done.or_else(|e| wire::fail("an append task", e))??;
        latencies.extend(outcome.latencies);
        refused += outcome.refused;
    }
    progress.finish("done");
    let appends_per_sync = match (appends_before, appends_after, syncs_before, syncs_after) {
        (Some(a0), Some(a1), Some(s0), Some(s1)) if s1 > s0 => Some((a1 - a0) / (s1 - s0)),
        _ => None,
    };
    let accepted = latencies.len() as u64;
    Ok(AppendResult {
        connections: params.connections,
        window: params.window,
        payload_bytes: params.payload,
        accepted,
        refused,
        appends_per_s: accepted as f64 / params.duration.as_secs_f64(),
        ack_latency: Latency::of(&mut latencies),
        appends_per_sync,
    })
}
