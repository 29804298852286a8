//! `idle`: N authenticated connections that only heartbeat; the server's resident memory
//! per connection, sampled over the hold time to show whether it stays flat.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use confab_spec::frame::{ClientFrame, Heartbeat};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::progress::Progress;
use crate::target::Target;
use crate::wire::{self, Identity, LoadError};

/// What `idle` does.
#[derive(Debug, Clone)]
pub struct IdleParams {
    /// Connections to hold.
    pub connections: usize,
    /// How long to hold them once all are up.
    pub hold: Duration,
    /// How often to sample the server's memory while holding.
    pub sample_every: Duration,
}

/// Connections opened at once.
const CONNECT_CONCURRENCY: usize = 128;

/// One memory sample.
#[derive(Debug, Clone, Serialize)]
pub struct RssSample {
    /// Seconds since all connections were up.
    pub at_s: f64,
    /// The server's resident memory, KiB.
    pub rss_kib: u64,
    /// (rss - rss before connecting) / connections, KiB.
    pub per_connection_kib: f64,
}

/// What `idle` measured on one server.
#[derive(Debug, Clone, Serialize)]
pub struct IdleResult {
    /// `confab` or `raw`.
    pub target: String,
    /// Connections asked for.
    pub connections: usize,
    /// Connections that authenticated (the raw server: that upgraded).
    pub connected: usize,
    /// Connections the server closed or broke while held (should be 0).
    pub lost: usize,
    /// Seconds to open and authenticate all of them.
    pub connect_s: f64,
    /// Resident memory before the first connection, KiB.
    pub rss_before_kib: Option<u64>,
    /// Samples over the hold time.
    pub samples: Vec<RssSample>,
    /// Smallest and largest per-connection figure over the samples, KiB.
    pub per_connection_kib_min: Option<f64>,
    /// See `per_connection_kib_min`.
    pub per_connection_kib_max: Option<f64>,
    /// Server CPU time spent while holding, per connection per minute, microseconds.
    pub hold_cpu_us_per_connection_minute: Option<f64>,
}

/// What every held connection shares.
#[derive(Clone)]
struct Holding {
    gateway: bool,
    endpoint: wire::Endpoint,
    connect: Arc<Semaphore>,
    connected: Arc<AtomicUsize>,
    lost: Arc<AtomicUsize>,
    stop: watch::Receiver<bool>,
    interval: Duration,
}

/// Holds connection `i` until `stop`; heartbeats every `interval` (or the gateway's,
/// when shorter).
async fn hold(i: usize, h: Holding) -> Result<(), LoadError> {
    let Holding {
        gateway: target_is_gateway,
        endpoint,
        connect,
        connected,
        lost,
        mut stop,
        interval,
    } = h;
    let permit = connect
        .acquire_owned()
        .await
        .or_else(|e| wire::fail("a permit", e))?;
    let mut ws = wire::open(&endpoint, wire::source(i)).await?;
    let mut interval = interval;
    if target_is_gateway {
        let ready = wire::authenticate(&mut ws, &endpoint, &Identity::fresh()).await?;
        interval = interval.min(Duration::from_millis(ready.heartbeat_interval_ms));
    }
    drop(permit);
    connected.fetch_add(1, Ordering::Relaxed);
    let mut nonce = 0u64;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => {
                let _ = ws.close(None).await;
                return Ok(());
            }
            message = ws.next() => match message {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    lost.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Some(Ok(_)) => {}
            },
            _ = tick.tick() => {
                nonce += 1;
                let bytes = if target_is_gateway {
                    ClientFrame::Heartbeat(Heartbeat { nonce }).encode()
                } else {
                    vec![0] // ignored by the raw server, but the same traffic
                };
                if ws.send(Message::Binary(bytes.into())).await.is_err() {
                    lost.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
            }
        }
    }
}

/// Runs `idle` against `target`.
pub async fn run(target: &Target, params: &IdleParams) -> Result<IdleResult, LoadError> {
    let gateway = target.name == "confab";
    let rss_before = target.rss_kib();
    let connected = Arc::new(AtomicUsize::new(0));
    let lost = Arc::new(AtomicUsize::new(0));
    let semaphore = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let holding = Holding {
        gateway,
        endpoint: target.endpoint.clone(),
        connect: semaphore,
        connected: connected.clone(),
        lost: lost.clone(),
        stop: stop_rx,
        interval: Duration::from_secs(15),
    };
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..params.connections {
        tasks.spawn(hold(i, holding.clone()));
    }
    let mut progress = Progress::new(format!("idle {}: connecting", target.name));
    let mut failed = 0usize;
    let deadline =
        started + Duration::from_secs(120) + Duration::from_millis(params.connections as u64 * 10);
    loop {
        let up = connected.load(Ordering::Relaxed);
        progress.show(up, params.connections);
        if up + failed >= params.connections {
            break;
        }
        if Instant::now() > deadline {
            return wire::fail(
                "idle",
                format!("only {up} of {} connections up in time", params.connections),
            );
        }
        // Failures end their task early; count them as they come.
        while let Some(done) = tasks.try_join_next() {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    failed += 1;
                    if failed == 1 {
                        progress.note(&format!("a connection failed: {e}"));
                    }
                }
                Err(e) => return wire::fail("a connection task", e),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let connect_s = started.elapsed().as_secs_f64();
    progress.finish(&format!(
        "{} of {} up in {connect_s:.1} s",
        connected.load(Ordering::Relaxed),
        params.connections
    ));
    let n = connected.load(Ordering::Relaxed).max(1) as f64;
    let held = Instant::now();
    let cpu_before = target.cpu_time();
    let mut samples = Vec::new();
    let mut progress = Progress::new(format!("idle {}: holding", target.name));
    loop {
        let at = held.elapsed();
        if let (Some(rss), Some(before)) = (target.rss_kib(), rss_before) {
            samples.push(RssSample {
                at_s: at.as_secs_f64(),
                rss_kib: rss,
                per_connection_kib: rss.saturating_sub(before) as f64 / n,
            });
        }
        progress.show(at.as_secs() as usize, params.hold.as_secs() as usize);
        if at >= params.hold {
            break;
        }
        tokio::time::sleep(params.sample_every.min(params.hold - at)).await;
    }
    let hold_cpu = match (cpu_before, target.cpu_time()) {
        (Some(a), Some(b)) => {
            let minutes = held.elapsed().as_secs_f64() / 60.0;
            Some((b - a).as_micros() as f64 / n / minutes.max(1e-9))
        }
        _ => None,
    };
    progress.finish("done");
    let _ = stop_tx.send(true);
    let closing = async { while tasks.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(Duration::from_secs(60), closing).await;
    let per: Vec<f64> = samples.iter().map(|s| s.per_connection_kib).collect();
    Ok(IdleResult {
        target: target.name.to_owned(),
        connections: params.connections,
        connected: connected.load(Ordering::Relaxed),
        lost: lost.load(Ordering::Relaxed),
        connect_s,
        rss_before_kib: rss_before,
        per_connection_kib_min: per.iter().copied().reduce(f64::min),
        per_connection_kib_max: per.iter().copied().reduce(f64::max),
        samples,
        hold_cpu_us_per_connection_minute: hold_cpu,
    })
}
