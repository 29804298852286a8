//! `fanout`: one sender per room into `rooms` rooms of `members` subscribed devices, at an
//! offered rate that doubles every step. Per step: deliveries per second and
//! send-to-deliver latency (p50/p99/p999). The knee is the step with the most deliveries
//! per second whose p99 stays within the bound and that delivered everything.
//!
//! Against the raw baseline the same clients publish to and subscribe to topics.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use confab_spec::cbor::DecodeLimits;
use confab_spec::frame::{Ack, ClientFrame, ConversationKind, Heartbeat, ServerFrame, Subscribe};
use confab_spec::ids::{ConversationId, Seq, StreamId};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::progress::Progress;
use crate::raw;
use crate::setup;
use crate::stats::Latency;
use crate::target::Target;
use crate::wire::{self, Identity, LoadError, Ws, now_ns};

/// What `fanout` does.
#[derive(Debug, Clone)]
pub struct FanoutParams {
    /// Rooms, each with one sender.
    pub rooms: usize,
    /// Subscribed devices per room (besides the sender).
    pub members: usize,
    /// Bytes per message.
    pub payload: usize,
    /// Messages per second (all rooms together) of the first step; each step doubles it.
    pub start_rate: f64,
    /// Most steps.
    pub max_steps: usize,
    /// Length of a step.
    pub step: Duration,
    /// The start of each step left out of its figures.
    pub warmup: Duration,
    /// The p99 latency a step must stay within to count.
    pub p99_bound: Duration,
}

/// Steps at most (fixed-size step tables).
pub const STEPS_MAX: usize = 16;

/// One step of the sweep.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// Offered messages per second, all rooms together.
    pub offered_msgs_per_s: f64,
    /// Messages sent in the measured window.
    pub sent: u64,
    /// sent × members.
    pub expected: u64,
    /// Deliveries of those messages.
    pub delivered: u64,
    /// Deliveries per second over the measured window.
    pub deliveries_per_s: f64,
    /// Send-to-deliver latency.
    pub latency: Latency,
    /// Delivered everything, within the p99 bound.
    pub ok: bool,
}

/// What `fanout` measured on one server.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutResult {
    /// `confab` or `raw`.
    pub target: String,
    /// Rooms.
    pub rooms: usize,
    /// Subscribers per room.
    pub members: usize,
    /// Bytes per message.
    pub payload_bytes: usize,
    /// The p99 bound, ms.
    pub p99_bound_ms: u64,
    /// The sweep.
    pub steps: Vec<Step>,
    /// The index of the knee in `steps`.
    pub knee: Option<usize>,
    /// Entries a subscriber saw skipped (seq gaps) or twice; 0 and 0 on a correct server.
    pub gaps: u64,
    /// See `gaps`.
    pub duplicates: u64,
    /// Subscribers the server closed during the run.
    pub closed: u64,
    /// Sends the server refused (Error frames), all steps.
    pub refused: u64,
}

/// When each step started (ns), shared with every task; unset steps are `u64::MAX`.
struct Schedule {
    starts: [AtomicU64; STEPS_MAX],
    warmup_ns: u64,
    /// Messages sent in each step's measured window.
    sent: [AtomicU64; STEPS_MAX],
    /// Deliveries so far, and those over the bound (the controller's live view).
    delivered: AtomicU64,
    late: AtomicU64,
    bound_us: u64,
    closed: AtomicU64,
    refused: AtomicU64,
}

impl Schedule {
    /// The step whose measured window holds `t`.
    fn window_of(&self, t: u64) -> Option<usize> {
        for i in (0..STEPS_MAX).rev() {
            let start = self.starts[i].load(Ordering::Relaxed);
            if start != u64::MAX && t >= start {
                return (t >= start + self.warmup_ns).then_some(i);
            }
        }
        None
    }
}

/// What one subscriber saw.
#[derive(Default)]
struct Seen {
    latencies: Vec<Vec<u32>>,
    gaps: u64,
    duplicates: u64,
}

impl Seen {
    /// Nothing seen yet, a latency list per step.
    fn new() -> Self {
        Self {
            latencies: vec![Vec::new(); STEPS_MAX],
            ..Self::default()
        }
    }

    fn record(&mut self, schedule: &Schedule, payload: &[u8]) {
        let now = now_ns();
        let Some((sent, _)) = wire::stamp_of(payload) else {
            return;
        };
        let us = (now.saturating_sub(sent) / 1_000).min(u64::from(u32::MAX)) as u32;
        schedule.delivered.fetch_add(1, Ordering::Relaxed);
        if u64::from(us) > schedule.bound_us {
            schedule.late.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(i) = schedule.window_of(sent) {
            self.latencies[i].push(us);
        }
    }
}

/// A subscriber of a gateway conversation, from seq `from`.
async fn confab_subscriber(
    mut ws: Ws,
    conversation: ConversationId,
    from: u64,
    schedule: Arc<Schedule>,
    mut stop: watch::Receiver<bool>,
) -> Seen {
    let mut seen = Seen::new();
    let stream = StreamId::Conversation(conversation);
    let mut next = from;
    let mut acked = from - 1;
    let limits = DecodeLimits::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            message = ws.next() => {
                let bytes = match message {
                    Some(Ok(Message::Binary(bytes))) => bytes,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        schedule.closed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Some(Ok(_)) => continue,
                };
                let entries = match ServerFrame::decode(&bytes, &limits) {
                    Ok(ServerFrame::Deliver(d)) => vec![d.entry],
                    Ok(ServerFrame::Batch(b)) => b.entries,
                    _ => continue,
                };
                for entry in entries {
                    let seq = entry.seq.get();
                    if seq < next {
                        seen.duplicates += 1;
                        continue;
                    }
                    if seq > next {
                        seen.gaps += seq - next;
                    }
                    next = seq + 1;
                    seen.record(&schedule, entry.payload.as_bytes());
                }
            }
            _ = tick.tick() => {
                // Acknowledge once a second, as a client does, and heartbeat.
                ticks += 1;
                if next - 1 > acked {
                    if let Some(seq) = Seq::new(next - 1) {
                        let ack = ClientFrame::Ack(Ack { stream, seq });
                        let _ = ws.send(Message::Binary(ack.encode().into())).await;
                        acked = next - 1;
                    }
                } else if ticks % 10 == 0 {
                    let hb = ClientFrame::Heartbeat(Heartbeat { nonce: ticks });
                    let _ = ws.send(Message::Binary(hb.encode().into())).await;
                }
            }
        }
    }
    seen
}

/// A subscriber of a raw-server topic.
async fn raw_subscriber(
    mut ws: Ws,
    schedule: Arc<Schedule>,
    mut stop: watch::Receiver<bool>,
) -> Seen {
    let mut seen = Seen::new();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            message = ws.next() => match message {
                Some(Ok(Message::Binary(bytes))) => seen.record(&schedule, &bytes),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    schedule.closed.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Some(Ok(_)) => {}
            },
        }
    }
    seen
}

/// How a sender frames a message.
#[derive(Clone)]
enum Room {
    Confab {
        conversation: ConversationId,
        epoch: u64,
    },
    Raw {
        topic: u32,
    },
}

/// Most sends a gateway sender keeps unanswered; beyond it the step is over capacity.
const IN_FLIGHT_MAX: u64 = 20_000;

/// Sends at the rate in `rate` (messages per second) until `stop`.
async fn sender(
    ws: Ws,
    room: Room,
    index: u32,
    payload: usize,
    mut rate: watch::Receiver<f64>,
    schedule: Arc<Schedule>,
    mut stop: watch::Receiver<bool>,
) {
    let (mut sink, mut stream) = ws.split();
    let answered = Arc::new(AtomicU64::new(0));
    let reader = {
        let answered = answered.clone();
        let schedule = schedule.clone();
        tokio::spawn(async move {
            let limits = DecodeLimits::default();
            while let Some(Ok(message)) = stream.next().await {
                if let Message::Binary(bytes) = message {
                    match ServerFrame::decode(&bytes, &limits) {
                        Ok(ServerFrame::Accepted(_)) => {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(ServerFrame::Error(_)) => {
                            answered.fetch_add(1, Ordering::Relaxed);
                            schedule.refused.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
            }
        })
    };
    let mut rid = 1_000u64;
    let mut phase_start = tokio::time::Instant::now();
    let mut phase_sent = 0u64;
    let mut current = *rate.borrow();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_heartbeat = tokio::time::Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            _ = rate.changed() => {
                current = *rate.borrow();
                phase_start = tokio::time::Instant::now();
                phase_sent = 0;
            }
            _ = tick.tick() => {
                let due = (current * phase_start.elapsed().as_secs_f64()) as u64;
                let mut fed = false;
                while phase_sent < due {
                    if matches!(room, Room::Confab { .. })
                        && rid - 1_000 - answered.load(Ordering::Relaxed) >= IN_FLIGHT_MAX
                    {
                        // Over capacity: what is not sent shows as a shortfall.
                        phase_sent = due;
                        break;
                    }
                    let t = now_ns();
                    let bytes = match &room {
                        Room::Confab { conversation, epoch } => {
                            rid += 1;
                            let Ok(bytes) = setup::application_send(
                                rid, *conversation, *epoch, payload, index, t,
                            ) else {
                                break;
                            };
                            bytes
                        }
                        Room::Raw { topic } => {
                            let mut m = vec![raw::PUBLISH];
                            m.extend_from_slice(&topic.to_be_bytes());
                            m.extend_from_slice(&wire::application_message(
                                &ConversationId([0; 32]), 0, payload, index, t,
                            ));
                            m
                        }
                    };
                    if let Some(i) = schedule.window_of(t) {
                        schedule.sent[i].fetch_add(1, Ordering::Relaxed);
                    }
                    if sink.feed(Message::Binary(bytes.into())).await.is_err() {
                        break;
                    }
                    fed = true;
                    phase_sent += 1;
                }
                if !fed && last_heartbeat.elapsed() > Duration::from_secs(10) {
                    if let Room::Confab { .. } = room {
                        let hb = ClientFrame::Heartbeat(Heartbeat { nonce: rid });
                        let _ = sink.feed(Message::Binary(hb.encode().into())).await;
                        fed = true;
                    }
                    last_heartbeat = tokio::time::Instant::now();
                }
                if fed && sink.flush().await.is_err() {
                    break;
                }
            }
        }
    }
    reader.abort();
}

/// Runs `fanout` against `target`.
pub async fn run(target: &Target, params: &FanoutParams) -> Result<FanoutResult, LoadError> {
    let steps = params.max_steps.clamp(1, STEPS_MAX - 1);
    let schedule = Arc::new(Schedule {
        starts: std::array::from_fn(|_| AtomicU64::new(u64::MAX)),
        warmup_ns: params.warmup.as_nanos() as u64,
        sent: std::array::from_fn(|_| AtomicU64::new(0)),
        delivered: AtomicU64::new(0),
        late: AtomicU64::new(0),
        bound_us: params.p99_bound.as_micros() as u64,
        closed: AtomicU64::new(0),
        refused: AtomicU64::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let (rate_tx, rate_rx) = watch::channel(0.0f64);
    let mut subscribers = tokio::task::JoinSet::new();
    let mut senders = tokio::task::JoinSet::new();
    let endpoint = &target.endpoint;
    let mut progress = Progress::new(format!("fanout {}: setting up rooms", target.name));
    let mut connection = 0usize;
    for r in 0..params.rooms {
        progress.show(r, params.rooms);
        let creator = Identity::fresh();
        let mut creator_ws = wire::open(endpoint, wire::source(connection)).await?;
        connection += 1;
        let room = if target.name == "confab" {
            wire::authenticate(&mut creator_ws, endpoint, &creator).await?;
            let members: Vec<Identity> = (0..params.members).map(|_| Identity::fresh()).collect();
            let c = setup::conversation(&creator, creator_ws, &members, ConversationKind::Room, r)
                .await?;
            for member in &members {
                let mut ws = wire::open(endpoint, wire::source(connection)).await?;
                connection += 1;
                wire::authenticate(&mut ws, endpoint, member).await?;
                let from = c.head + 1;
                wire::send(
                    &mut ws,
                    &ClientFrame::Subscribe(Subscribe {
                        rid: 1,
                        stream: StreamId::Conversation(c.conversation),
                        from_seq: Seq::new(from),
                    }),
                )
                .await?;
                wire::expect(&mut ws, "Subscribed", |f| match f {
                    ServerFrame::Subscribed(s) if s.rid == 1 => Ok(Some(())),
                    ServerFrame::Error(e) => Err(Box::new(ServerFrame::Error(e))),
                    _ => Ok(None),
                })
                .await?;
                subscribers.spawn(confab_subscriber(
                    ws,
                    c.conversation,
                    from,
                    schedule.clone(),
                    stop_rx.clone(),
                ));
            }
            let room = Room::Confab {
                conversation: c.conversation,
                epoch: c.epoch,
            };
            (c.creator_ws, room)
        } else {
            let topic = r as u32;
            for _ in 0..params.members {
                let mut ws = wire::open(endpoint, wire::source(connection)).await?;
                connection += 1;
                let mut m = vec![raw::SUBSCRIBE];
                m.extend_from_slice(&topic.to_be_bytes());
                ws.send(Message::Binary(m.into()))
                    .await
                    .or_else(|e| wire::fail("subscribing", e))?;
                subscribers.spawn(raw_subscriber(ws, schedule.clone(), stop_rx.clone()));
            }
            (creator_ws, Room::Raw { topic })
        };
        senders.spawn(sender(
            room.0,
            room.1,
            r as u32,
            params.payload,
            rate_rx.clone(),
            schedule.clone(),
            stop_rx.clone(),
        ));
    }
    progress.finish(&format!(
        "{} rooms of {} subscribers",
        params.rooms, params.members
    ));
    // Subscriptions settle before the first message.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut progress = Progress::new(format!("fanout {}", target.name));
    let mut rate = params.start_rate;
    let mut ran = 0;
    for i in 0..steps {
        schedule.starts[i].store(now_ns(), Ordering::Relaxed);
        let _ = rate_tx.send(rate / params.rooms as f64);
        let delivered = schedule.delivered.load(Ordering::Relaxed);
        let late = schedule.late.load(Ordering::Relaxed);
        tokio::time::sleep(params.step).await;
        ran = i + 1;
        let delivered = schedule.delivered.load(Ordering::Relaxed) - delivered;
        let late = schedule.late.load(Ordering::Relaxed) - late;
        let expected = rate * params.step.as_secs_f64() * params.members as f64;
        progress.note(&format!(
            "step {}: {rate:.0} msg/s offered, {:.0} deliveries/s, {:.1}% over {} ms",
            i + 1,
            delivered as f64 / params.step.as_secs_f64(),
            100.0 * late as f64 / (delivered.max(1)) as f64,
            params.p99_bound.as_millis()
        ));
        let saturated = (delivered as f64) < 0.9 * expected
            || late as f64 > 0.01 * delivered as f64
            || schedule.closed.load(Ordering::Relaxed) > 0;
        if saturated {
            break;
        }
        rate *= 2.0;
    }
    // The step after the last one begins (so that the last window closes), with no sends.
    if ran < STEPS_MAX {
        schedule.starts[ran].store(now_ns(), Ordering::Relaxed);
    }
    let _ = rate_tx.send(0.0);
    // Drain: until deliveries stop for a second, at most 30 s.
    let mut last = schedule.delivered.load(Ordering::Relaxed);
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = schedule.delivered.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let _ = stop_tx.send(true);
    while senders.join_next().await.is_some() {}
    let mut latencies: Vec<Vec<u32>> = vec![Vec::new(); STEPS_MAX];
    let (mut gaps, mut duplicates) = (0, 0);
    while let Some(seen) = subscribers.join_next().await {
        let seen = seen.or_else(|e| wire::fail("a subscriber task", e))?;
        gaps += seen.gaps;
        duplicates += seen.duplicates;
        for (all, mine) in latencies.iter_mut().zip(seen.latencies) {
            all.extend(mine);
        }
    }
    let mut rate = params.start_rate;
    let mut result_steps = Vec::new();
    for (i, samples) in latencies.iter_mut().enumerate().take(ran) {
        let start = schedule.starts[i].load(Ordering::Relaxed);
        let end = schedule.starts[i + 1].load(Ordering::Relaxed);
        let window_s = (end.saturating_sub(start + schedule.warmup_ns)) as f64 / 1e9;
        let sent = schedule.sent[i].load(Ordering::Relaxed);
        let expected = sent * params.members as u64;
        let delivered = samples.len() as u64;
        let latency = Latency::of(samples);
        result_steps.push(Step {
            offered_msgs_per_s: rate,
            sent,
            expected,
            delivered,
            deliveries_per_s: delivered as f64 / window_s.max(1e-9),
            ok: delivered >= expected && latency.p99_us <= schedule.bound_us,
            latency,
        });
        rate *= 2.0;
    }
    let knee = result_steps
        .iter()
        .enumerate()
        .filter(|(_, s)| s.ok)
        .max_by(|a, b| a.1.deliveries_per_s.total_cmp(&b.1.deliveries_per_s))
        .map(|(i, _)| i);
    Ok(FanoutResult {
        target: target.name.to_owned(),
        rooms: params.rooms,
        members: params.members,
        payload_bytes: params.payload,
        p99_bound_ms: params.p99_bound.as_millis() as u64,
        steps: result_steps,
        knee,
        gaps,
        duplicates,
        closed: schedule.closed.load(Ordering::Relaxed),
        refused: schedule.refused.load(Ordering::Relaxed),
    })
}
