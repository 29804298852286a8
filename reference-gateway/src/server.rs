//! The network shell: an axum server that runs [`crate::handler::Connection`] over
//! WebSockets at `/v1/ws`, serves `/healthz`, `/metrics` and `/v1/info`, wakes subscribed
//! connections when a stream grows, enforces the auth and heartbeat deadlines, the
//! per-address connect limit and the bounded outbound queue, runs retention, closes the
//! sessions of revoked devices with 4105, and closes every session with 4000 on shutdown.
//!
//! Each connection is two tasks: the actor, which reads frames, runs the handler and puts
//! outgoing frames on a bounded queue without ever waiting for the network, and the writer,
//! which drains that queue into the socket. A full queue closes the session with 4002
//! (SPEC.md REQ-6.4-7); a slow socket therefore delays only its own writer.
//!
//! The fan-out [`Hub`] sends each appended entry to the connections subscribed to its
//! stream. A live subscription whose next seq is the entry's takes it from memory
//! ([`Connection::on_entry`]); any other case (a Commit, an entry out of order, a wake-up
//! without an entry) pulls what the connection has not delivered from the store, so a
//! connection that misses or reorders hub messages loses nothing; one whose hub queue
//! overflowed re-checks all its subscriptions.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use confab_spec::error::{CloseCode, ErrorCode};
use confab_spec::frame::{ErrorFrame, ServerFrame};
use confab_spec::ids::{DeviceId, UnixMs};
use confab_spec::limits;
use futures_util::{SinkExt, StreamExt};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::durability::{GroupCommit, SyncPolicy};
use crate::handler::{Action, Connection, Entropy, GatewayConfig};
use crate::hub::{Appended, Following, Hub};
use crate::presence::Presence;
use crate::rate::RateLimiters;
use crate::store::sqlite::SqliteStore;
use crate::store::{Store as _, StreamKey};
use crate::telemetry;

/// State shared by every connection.
pub struct Shared {
    /// Protocol settings.
    pub config: GatewayConfig,
    /// The durable store (one writer; SQLite serialises writes anyway).
    pub store: Mutex<SqliteStore>,
    hub: Hub,
    shutdown: Shutdown,
    open: OpenConnections,
    /// The live session of each device: its connection, its resume-token chain, and how
    /// to tell it to close (REQ-5.5-9, REQ-5.5-10, REQ-3.3-3).
    sessions: Mutex<HashMap<DeviceId, LiveSession>>,
    next_connection: AtomicU64,
    limiters: RateLimiters,
    /// Presence for every session (SPEC.md 9); locked after `store` when both are needed.
    presence: Mutex<Presence>,
    /// How to wake each connection that has presence events to take.
    presence_wakers: Mutex<HashMap<u64, Arc<Notify>>>,
    metrics: Option<PrometheusHandle>,
    /// Group commit, unless every transaction syncs itself ([`SyncPolicy`]).
    group: Option<Arc<GroupCommit>>,
    clock: WallClock,
    entropy: EntropySource,
}

/// A device's live session, as [`Shared`] knows it.
struct LiveSession {
    /// The connection serving it.
    connection: u64,
    /// Its resume-token chain.
    family: [u8; 16],
    /// Tells the connection to close with a code.
    close: oneshot::Sender<CloseCode>,
}

/// The gateway's wall clock (`UnixMs` for certificates, tokens and `accepted_ms`).
pub type WallClock = Arc<dyn Fn() -> UnixMs + Send + Sync>;

/// Where nonces, session ids and resume tokens come from.
pub type EntropySource = Arc<dyn Fn(&mut [u8]) + Send + Sync>;

/// What the embedding process provides besides the protocol settings. The defaults are
/// the system clock, the OS's randomness and no metrics; the simulator passes a simulated
/// clock and seeded randomness, so that one seed reproduces a run.
#[derive(Clone)]
pub struct Environment {
    /// Renders `/metrics`; `None` serves 404.
    pub metrics: MetricsHandle,
    /// The wall clock.
    pub clock: WallClock,
    /// Randomness.
    pub entropy: EntropySource,
}

impl Default for Environment {
    fn default() -> Self {
        Self {
            metrics: None,
            clock: Arc::new(system_now),
            entropy: Arc::new(|out: &mut [u8]| {
                use rand_core::RngCore as _;
                rand_core::OsRng.fill_bytes(out);
            }),
        }
    }
}

/// The peer's socket address, as the connect limit reads it, and the flag that ends its
/// connection's HTTP request deadline once the upgrade begins.
#[derive(Clone, Debug)]
struct PeerAddr(SocketAddr, Arc<AtomicBool>);

/// Any listener with socket addresses (TCP, or simulated TCP in the simulator), so that
/// [`PeerAddr`] can be read from every accepted connection. It holds every connection to
/// the caps of SPEC.md 11 from the moment it is accepted, before a byte of HTTP is read:
/// beyond `connections_max` open connections, or `connections_per_ip_max` from one
/// address, it closes the new one at once; and a connection that has not begun its
/// WebSocket upgrade within `http_request_timeout_ms` is cut (a slow or half-sent request
/// holds nothing for long).
struct PeerListener<L> {
    inner: L,
    caps: Arc<ConnectionCaps>,
    request_timeout: Duration,
}

impl<L> axum::serve::Listener for PeerListener<L>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    type Io = GuardedIo<L::Io>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, addr) = self.inner.accept().await;
            match self.caps.admit(addr.ip()) {
                Ok(guard) => {
                    let deadline = Box::pin(tokio::time::sleep(self.request_timeout));
                    return (
                        GuardedIo {
                            inner: io,
                            _guard: guard,
                            upgraded: Arc::new(AtomicBool::new(false)),
                            deadline: Some(deadline),
                        },
                        addr,
                    );
                }
                // Closed unread: the peer sees its connection end.
                Err(reason) => telemetry::connection_refused(reason),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl<L> axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, PeerListener<L>>>
    for PeerAddr
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, PeerListener<L>>) -> Self {
        Self(*stream.remote_addr(), stream.io().upgraded.clone())
    }
}

/// Open connections, in all and per source address (SPEC.md 11).
struct ConnectionCaps {
    max: usize,
    per_ip_max: usize,
    open: std::sync::Mutex<(usize, HashMap<std::net::IpAddr, usize>)>,
}

impl ConnectionCaps {
    /// Counts a new connection from `ip` until the guard drops; the cap it would pass.
    fn admit(self: &Arc<Self>, ip: std::net::IpAddr) -> Result<CapGuard, &'static str> {
        let Ok(mut open) = self.open.lock() else {
            return Err("connections_max");
        };
        let (total, per_ip) = &mut *open;
        if *total >= self.max {
            return Err("connections_max");
        }
        let from_ip = per_ip.entry(ip).or_default();
        if *from_ip >= self.per_ip_max {
            return Err("connections_per_ip_max");
        }
        *from_ip += 1;
        *total += 1;
        Ok(CapGuard {
            caps: self.clone(),
            ip,
        })
    }
}

/// One connection counted by [`ConnectionCaps`].
struct CapGuard {
    caps: Arc<ConnectionCaps>,
    ip: std::net::IpAddr,
}

impl Drop for CapGuard {
    fn drop(&mut self) {
        if let Ok(mut open) = self.caps.open.lock() {
            let (total, per_ip) = &mut *open;
            *total = total.saturating_sub(1);
            if let Some(n) = per_ip.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    per_ip.remove(&self.ip);
                }
            }
        }
    }
}

/// An accepted connection, counted against the caps while it lives, and cut if its HTTP
/// request has not led to an upgrade by its deadline.
struct GuardedIo<I> {
    inner: I,
    _guard: CapGuard,
    /// Set when the WebSocket upgrade begins: the deadline no longer applies.
    upgraded: Arc<AtomicBool>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for GuardedIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.upgraded.load(Ordering::Relaxed) {
            this.deadline = None;
        }
        if let Some(deadline) = this.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                this.deadline = None;
                telemetry::connection_refused("http_request_timeout");
                return std::task::Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the HTTP request did not complete within http_request_timeout_ms",
                )));
            }
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for GuardedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Bytes each WebSocket read asks the socket for. It is allocated per connection and
/// dominates an idle connection's memory (tungstenite's default, 128 KiB, would cost
/// 134 KiB per connection; DESIGN.md). Chat frames are mostly far smaller; a larger frame
/// only takes more reads.
const READ_BUFFER_BYTES: usize = 2_048;

/// How long a closing connection may take to flush its queue and close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Where `/metrics` reads from: `None` serves 404.
pub type MetricsHandle = Option<PrometheusHandle>;

/// The gateway's stop signal. A `watch` channel would wake the sessions in a random order
/// (tokio spreads a watch's waiters over shards it picks at random), and the order in which
/// sessions close decides what a simulated run does next: `Notify` wakes them in the
/// order they started waiting, so one seed replays one run.
#[derive(Default)]
struct Shutdown {
    stopping: std::sync::atomic::AtomicBool,
    notify: Notify,
}

impl Shutdown {
    /// Tells every task to stop.
    fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Resolves once [`Shutdown::stop`] was called (at once if it was already).
    async fn stopped(&self) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        // Registered before the flag is read: a stop in between is not missed.
        notified.as_mut().enable();
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        notified.await;
    }
}

/// The WebSocket connections still running. Their tasks outlive the HTTP server's own
/// graceful shutdown (an upgraded connection is no longer the server's), so a shutdown
/// waits here for their closing handshakes: a process that exited at once would cut a busy
/// session off without its 4000 (REQ-5.7-3).
#[derive(Default)]
struct OpenConnections {
    count: AtomicUsize,
    all_closed: Notify,
}

impl OpenConnections {
    /// Counts a connection until the returned guard is dropped.
    fn enter(&self) -> OpenConnection<'_> {
        self.count.fetch_add(1, Ordering::SeqCst);
        OpenConnection(self)
    }

    /// Resolves once no connection is open.
    async fn all_closed(&self) {
        loop {
            let notified = self.all_closed.notified();
            tokio::pin!(notified);
            // Registered before the count is read: the last close in between is not missed.
            notified.as_mut().enable();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One open connection of [`OpenConnections`].
struct OpenConnection<'a>(&'a OpenConnections);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.all_closed.notify_waiters();
        }
    }
}

/// Runs the gateway on `listener` (a TCP listener, or any transport with socket addresses)
/// until `shutdown` resolves, then closes every session with 4000 (SPEC.md REQ-5.7-3) and
/// returns once their closing handshakes are done (each within its grace period).
/// Timers use only `tokio::time`; the wall clock and randomness come from `env`.
pub async fn serve<L>(
    listener: L,
    config: GatewayConfig,
    store: SqliteStore,
    env: Environment,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let limiters = RateLimiters::new(&config);
    let mut store = store;
    store
        .set_faults(config.faults)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    // Under the ack_before_durable fault the database is in memory: nothing to sync.
    let group = if config.sync == SyncPolicy::Group && !config.faults.ack_before_durable {
        let (counters, wal) = store
            .enable_group_commit()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Some((GroupCommit::new(counters), wal))
    } else {
        None
    };
    let presence = Mutex::new(Presence::new(config.presence.clone(), config.faults));
    let shared = Arc::new(Shared {
        config,
        store: Mutex::new(store),
        hub: Hub::default(),
        shutdown: Shutdown::default(),
        open: OpenConnections::default(),
        sessions: Mutex::new(HashMap::new()),
        next_connection: AtomicU64::new(1),
        limiters,
        presence,
        presence_wakers: Mutex::new(HashMap::new()),
        metrics: env.metrics,
        group: group.as_ref().map(|(g, _)| g.clone()),
        clock: env.clock,
        entropy: env.entropy,
    });
    if let Some((group, wal)) = group {
        let weak = Arc::downgrade(&shared);
        group.spawn_syncer(wal, move || {
            let shared = weak.upgrade()?;
            // Under the store lock no store call is half done: the batch holds whole calls.
            let mut store = shared.store.lock().ok()?;
            let group = shared.group.as_ref()?;
            Some(
                store
                    .commit_batch()
                    .map(|()| group.barrier())
                    .map_err(|e| e.to_string()),
            )
        })?;
    }
    let gc = tokio::spawn(retention(shared.clone()));
    let presence_ticks = tokio::spawn(presence_ticker(shared.clone()));
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics_page))
        .route("/v1/info", get(info))
        .route("/v1/ws", get(upgrade))
        .with_state(shared.clone());
    let stopping = shared.clone();
    let hygiene = !shared.config.faults.no_connection_hygiene;
    let listener = PeerListener {
        inner: listener,
        caps: Arc::new(ConnectionCaps {
            max: shared.config.connections_max,
            per_ip_max: if hygiene {
                shared.config.connections_per_ip_max
            } else {
                usize::MAX
            },
            open: std::sync::Mutex::new((0, HashMap::new())),
        }),
        request_timeout: Duration::from_millis(if hygiene {
            shared.config.http_request_timeout_ms
        } else {
            86_400_000
        }),
    };
    let result = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<PeerAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        stopping.shutdown.stop();
    })
    .await;
    // Every session was told to close when the shutdown began; each takes at most its
    // grace period from then.
    let _ = tokio::time::timeout(
        CLOSE_GRACE + Duration::from_secs(1),
        shared.open.all_closed(),
    )
    .await;
    gc.abort();
    presence_ticks.abort();
    result
}

/// Runs retention every `gc_interval_ms` (SPEC.md 6.7), in slices so that the store lock
/// is never held for long, and forgets idle per-address rate-limit state.
async fn retention(shared: Arc<Shared>) {
    const SLICE: u64 = 10_000;
    let interval = Duration::from_millis(shared.config.gc_interval_ms.max(1));
    loop {
        tokio::select! {
            biased;
            () = shared.shutdown.stopped() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        loop {
            let report = match shared.store.lock() {
                Ok(mut store) => {
                    store.collect_garbage(&shared.config.retention, (shared.clock)(), SLICE)
                }
                Err(_) => return,
            };
            match report {
                Ok(report) => {
                    telemetry::gc_deleted(report.entries_deleted);
                    if report.entries_deleted > 0 {
                        tracing::info!(
                            entries = report.entries_deleted,
                            streams = report.streams_advanced,
                            tokens = report.tokens_deleted,
                            "retention"
                        );
                    }
                    if !report.more {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "retention failed; retrying next interval");
                    break;
                }
            }
            tokio::task::yield_now().await;
        }
        if let Ok(mut store) = shared.store.lock() {
            if let Err(e) = store.flush() {
                tracing::warn!(error = %e, "flush failed");
            }
        }
        shared.limiters.forget_idle((shared.clock)());
        if let Ok(presence) = shared.presence.lock() {
            presence.forget_idle_limits();
        }
    }
}

/// How often presence publishes due transitions and bucket changes (SPEC.md 9.1 allows
/// one second of processing).
const PRESENCE_TICK: Duration = Duration::from_millis(500);

/// Publishes due presence transitions and wakes the watchers they concern.
async fn presence_ticker(shared: Arc<Shared>) {
    loop {
        tokio::select! {
            biased;
            () = shared.shutdown.stopped() => return,
            _ = tokio::time::sleep(PRESENCE_TICK) => {}
        }
        let woken = match (shared.store.lock(), shared.presence.lock()) {
            (Ok(mut store), Ok(mut presence)) => presence.advance(
                &mut *store,
                &mut EnvEntropy(&shared.entropy),
                (shared.clock)(),
            ),
            _ => return,
        };
        match woken {
            Ok(sessions) => wake_presence(&shared, &sessions),
            Err(e) => tracing::warn!(error = %e, "presence pass failed; retrying next tick"),
        }
    }
}

/// Wakes the connections that have presence events to take.
fn wake_presence(shared: &Shared, sessions: &std::collections::BTreeSet<u64>) {
    if sessions.is_empty() {
        return;
    }
    if let Ok(wakers) = shared.presence_wakers.lock() {
        for id in sessions {
            if let Some(w) = wakers.get(id) {
                w.notify_one();
            }
        }
    }
}

/// Runs one presence frame of connection `id` and returns its answer.
fn on_presence(
    shared: &Shared,
    id: u64,
    device: DeviceId,
    frame: &confab_spec::frame::ClientFrame,
) -> Option<ServerFrame> {
    use confab_spec::frame::ClientFrame;
    let now = (shared.clock)();
    let outcome = match (shared.store.lock(), shared.presence.lock()) {
        (Ok(mut store), Ok(mut presence)) => match frame {
            ClientFrame::SetPresence(f) => presence.set_presence(
                &mut *store,
                &mut EnvEntropy(&shared.entropy),
                now,
                device,
                f,
            ),
            ClientFrame::WatchPresence(f) => presence.watch(&mut *store, now, id, device, f),
            ClientFrame::UpdatePresenceLists(f) => {
                presence.update_lists(&mut *store, now, device, f)
            }
            ClientFrame::UpdateInviteSettings(f) => {
                presence.update_invites(&mut *store, now, device, f)
            }
            _ => return None,
        },
        _ => {
            return Some(ServerFrame::Error(ErrorFrame {
                rid: frame.rid(),
                ..ErrorFrame::new(ErrorCode::Overloaded)
            }));
        }
    };
    match outcome {
        Ok(outcome) => {
            wake_presence(shared, &outcome.wake);
            outcome.answer
        }
        Err(e) => {
            tracing::warn!(error = %e, "presence request failed");
            Some(ServerFrame::Error(ErrorFrame {
                rid: frame.rid(),
                ..ErrorFrame::new(ErrorCode::InternalError)
            }))
        }
    }
}

/// Serves `/metrics` alone on `listener` (the gateway's `metrics_listen`, a private
/// address), until the process ends.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
) -> std::io::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    handle.render(),
                )
            }
        }),
    );
    axum::serve(listener, app).await
}

async fn metrics_page(State(shared): State<Arc<Shared>>) -> Response {
    match &shared.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled").into_response(),
    }
}

async fn info(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let c = &shared.config;
    Json(serde_json::json!({
        "versions": [limits::PROTOCOL_VERSION],
        "origin": c.origin,
        "heartbeat_interval_ms": c.heartbeat_interval_ms,
        "heartbeat_timeout_ms": c.heartbeat_timeout_ms,
        "auth_timeout_ms": c.auth_timeout_ms,
        "clock_skew_max_ms": c.clock_skew_max_ms,
        "resume_token_ttl_ms": c.resume_token_ttl_ms,
        "retention_ms": c.retention.retention_ms,
        "retention_unacked_ms": c.retention.retention_unacked_ms,
        // Both sync policies flush to the disk before an entry is acknowledged (README,
        // "Durability").
        "durability": "power_loss",
        "gc_interval_ms": c.gc_interval_ms,
        "outbound_queue_max": c.outbound_queue_max,
        "outbound_queue_bytes_max": c.outbound_queue_bytes(),
        "limits": {
            "frame_bytes_max": c.limits.frame_bytes_max,
            "collection_len_max": c.limits.collection_len_max,
            "nesting_depth_max": c.limits.nesting_depth_max,
            "text_bytes_max": c.limits.text_bytes_max,
            "replay_batch_max": c.limits.replay_batch_max,
            "pending_sends_max": c.limits.pending_sends_max,
            "key_packages_per_upload_max": c.limits.key_packages_per_upload_max,
            "pre_auth_frames_max": c.pre_auth_frames_max,
            "watchlist_max": c.presence.watchlist_max,
            "presence_list_max": c.presence.list_max,
            "room_members_max": c.rooms.members_max,
            "rooms_per_user_max": c.rooms.rooms_per_user_max,
            "bytes_per_user_per_day": c.bytes_per_user_per_day,
            "conversation_bytes_max": c.conversation_bytes_max,
            "connections_max": c.connections_max,
            "connections_per_ip_max": c.connections_per_ip_max,
            "http_request_timeout_ms": c.http_request_timeout_ms,
            "payload_bytes_max": limits::payload_bytes_max(
                usize::try_from(c.limits.frame_bytes_max).unwrap_or(usize::MAX)
            ),
        },
        "rate_limits": rate_limits(&shared),
        "presence": {
            "presence_ttl_min_ms": c.presence.ttl_min_ms,
            "presence_ttl_max_ms": c.presence.ttl_max_ms,
            "presence_grace_ms": c.presence.grace_ms,
            "presence_jitter_ms": c.presence.jitter_ms,
        },
        "key_package_low_watermark": c.key_package_low_watermark,
        "key_package_pool_max": c.key_package_pool_max,
    }))
}

/// Every enforced rate limit, for `/v1/info` (SPEC.md 11).
fn rate_limits(shared: &Shared) -> serde_json::Value {
    let mut all = shared.limiters.announce();
    if let (Some(map), Ok(presence)) = (all.as_object_mut(), shared.presence.lock()) {
        for l in presence.limiters() {
            let limit = l.limit();
            map.insert(
                l.name().to_owned(),
                serde_json::json!({"per_minute": limit.per_minute, "burst": limit.burst}),
            );
        }
    }
    all
}

/// Refuses a connection over `connects_per_ip` with 429 before the upgrade (SPEC.md 11).
fn rate_limited(retry_after_ms: u64) -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(
            header::RETRY_AFTER,
            retry_after_ms.div_ceil(1_000).to_string(),
        )],
        Json(serde_json::json!({
            "code": ErrorCode::RateLimited.value(),
            "retry_after_ms": retry_after_ms,
        })),
    )
        .into_response()
}

async fn upgrade(
    ws: WebSocketUpgrade,
    ConnectInfo(PeerAddr(peer, upgraded)): ConnectInfo<PeerAddr>,
    State(shared): State<Arc<Shared>>,
) -> Response {
    // The request is complete: its deadline ends here (the session's own deadlines take
    // over: auth_timeout_ms, heartbeats).
    upgraded.store(true, Ordering::Relaxed);
    if let Err(retry_after_ms) = shared
        .limiters
        .connects_per_ip
        .check(&peer.ip(), (shared.clock)())
    {
        return rate_limited(retry_after_ms);
    }
    let max = if shared.config.faults.no_frame_size_limit {
        usize::MAX // broken on purpose
    } else {
        usize::try_from(shared.config.limits.frame_bytes_max).unwrap_or(usize::MAX)
    };
    ws.read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| connection(socket, shared))
}

/// [`Entropy`] from the environment's source.
struct EnvEntropy<'a>(&'a EntropySource);

impl Entropy for EnvEntropy<'_> {
    fn fill(&mut self, out: &mut [u8]) {
        (self.0)(out);
    }
}

/// The system's wall clock.
pub fn system_now() -> UnixMs {
    UnixMs(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    )
}

/// What the actor hands the writer.
enum Outbound {
    /// A binary frame, and the group-commit barrier it waits for ([`crate::durability`]).
    /// Boxed: the queue allocates its first block of slots up front, and a small slot
    /// keeps that block (and so every idle connection) small.
    Frame(Box<(Bytes, u64)>),
    /// Flush what is queued, send this close code and stop.
    Close(CloseCode),
}

/// The writer task: drains the queue into the socket until a close or a broken socket. An
/// `abort` (a slow consumer) skips what is still queued and closes at once.
async fn writer(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut queue: mpsc::Receiver<Outbound>,
    queued_bytes: Arc<AtomicUsize>,
    abort: oneshot::Receiver<CloseCode>,
    group: Option<Arc<GroupCommit>>,
) {
    let mut abort = Some(abort);
    let mut durable = group.as_ref().map(|g| g.durable());
    let mut unflushed = false;
    loop {
        let item = tokio::select! {
            biased;
            code = async {
                match abort.as_mut() {
                    Some(rx) => rx.await.ok(),
                    None => std::future::pending().await,
                }
            } => match code {
                Some(code) => Outbound::Close(code),
                None => {
                    abort = None;
                    continue;
                }
            },
            item = queue.recv() => match item {
                Some(item) => item,
                None => return,
            },
        };
        let message = match item {
            Outbound::Frame(frame) => {
                let (bytes, barrier) = *frame;
                // Nothing leaves before what it depends on is durable; what is already
                // written goes out first rather than wait with it.
                if let (Some(group), Some(durable)) = (&group, durable.as_mut()) {
                    if *durable.borrow() < barrier {
                        if unflushed && sink.flush().await.is_err() {
                            return;
                        }
                        if !group.wait(durable, barrier).await {
                            return;
                        }
                    }
                }
                queued_bytes.fetch_sub(bytes.len(), Ordering::Relaxed);
                Message::Binary(bytes)
            }
            Outbound::Close(code) => {
                telemetry::closed(code);
                tracing::debug!(code = code.value(), "closing session");
                let frame = CloseFrame {
                    code: code.value(),
                    reason: code.name().into(),
                };
                let _ = sink.send(Message::Close(Some(frame))).await;
                return;
            }
        };
        // One write for everything queued: under fanout a frame rarely comes alone.
        if sink.feed(message).await.is_err() {
            return;
        }
        unflushed = true;
        if queue.is_empty() {
            if sink.flush().await.is_err() {
                return;
            }
            unflushed = false;
        }
    }
}

/// The actor's side of the queue.
struct Outbox {
    queue: mpsc::Sender<Outbound>,
    /// A close reserved at creation: it goes after the frames already queued.
    close: Option<mpsc::OwnedPermit<Outbound>>,
    /// A close that skips the queue, for a slow consumer whose queue is full.
    abort: Option<oneshot::Sender<CloseCode>>,
    /// Bytes in the queue now, and the most it may hold.
    queued_bytes: Arc<AtomicUsize>,
    queued_bytes_max: usize,
    group: Option<Arc<GroupCommit>>,
}

impl Outbox {
    /// Queues one frame; `Err` with 4002 when the queue is full (REQ-6.4-7).
    fn frame(&mut self, frame: &ServerFrame) -> Result<(), CloseCode> {
        if let ServerFrame::Error(e) = frame {
            telemetry::error_sent(e.code);
            // The detail is a ShortText, which never carries payloads, keys or tokens.
            tracing::debug!(
                code = e.code.value(),
                name = e.code.name(),
                rid = ?e.rid,
                detail = e.detail.as_ref().map_or("", |d| d.as_str()),
                "error sent"
            );
        }
        self.bytes(Bytes::from(frame.encode()))
    }

    /// Queues one frame already encoded; `Err` as for [`Outbox::frame`].
    fn bytes(&mut self, bytes: Bytes) -> Result<(), CloseCode> {
        let len = bytes.len();
        if self.queued_bytes.fetch_add(len, Ordering::Relaxed) + len > self.queued_bytes_max {
            return Err(CloseCode::SlowConsumer);
        }
        let barrier = self.group.as_ref().map_or(0, |g| g.barrier());
        match self
            .queue
            .try_send(Outbound::Frame(Box::new((bytes, barrier))))
        {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(CloseCode::SlowConsumer),
            // The writer is gone: the socket broke.
            Err(mpsc::error::TrySendError::Closed(_)) => Err(CloseCode::ServerRestart),
        }
    }

    /// Queues the close; frames queued before it are flushed first, except for a slow
    /// consumer, which the client recovers from by replay.
    fn close(&mut self, code: CloseCode) {
        if code == CloseCode::SlowConsumer {
            if let Some(abort) = self.abort.take() {
                let _ = abort.send(code);
                return;
            }
        }
        if let Some(permit) = self.close.take() {
            permit.send(Outbound::Close(code));
        }
    }
}

/// Queues the handler's frames and performs its other actions; the close code, if the
/// handler asked to close or the queue overflowed.
fn apply(shared: &Shared, id: u64, outbox: &mut Outbox, actions: Vec<Action>) -> Option<CloseCode> {
    for action in actions {
        match action {
            Action::Send(frame) => {
                if let Err(code) = outbox.frame(&frame) {
                    return Some(code);
                }
            }
            Action::SendEncoded(bytes) => {
                if let Err(code) = outbox.bytes(Bytes::from_owner(bytes)) {
                    return Some(code);
                }
            }
            Action::Close(code) => return Some(code),
            Action::Appended { stream, entry, .. } => {
                shared.hub.publish(&Appended { stream, entry });
            }
            Action::Presence { device, frame } => {
                if let Some(answer) = on_presence(shared, id, device, &frame) {
                    if let Err(code) = outbox.frame(&answer) {
                        return Some(code);
                    }
                }
            }
            Action::Revoked { device } => {
                // Close the device's session, wherever it is (REQ-3.3-3).
                if let Ok(mut sessions) = shared.sessions.lock() {
                    if let Some(session) = sessions.remove(&device) {
                        let _ = session.close.send(CloseCode::DeviceRevoked);
                    }
                }
            }
            Action::ChainReused { device, family } => {
                // A token of this chain was used twice: whoever holds the session that
                // descends from it may be the thief (REQ-5.5-10).
                if let Ok(mut sessions) = shared.sessions.lock() {
                    if sessions.get(&device).is_some_and(|s| s.family == family) {
                        if let Some(session) = sessions.remove(&device) {
                            let _ = session.close.send(CloseCode::AuthFailed);
                        }
                    }
                }
            }
        }
    }
    None
}

/// Delivers everything new on `streams` to the live subscriptions of `conn`, one bounded
/// read at a time, so that a far-behind subscription fills the queue (and is closed with
/// 4002) instead of memory.
fn pull(
    shared: &Shared,
    id: u64,
    conn: &mut Connection,
    outbox: &mut Outbox,
    streams: &[StreamKey],
) -> Option<CloseCode> {
    for stream in streams {
        loop {
            let actions = match shared.store.lock() {
                Ok(store) => conn.on_appended(&shared.config, &*store, stream),
                Err(_) => return Some(CloseCode::Overloaded),
            };
            match actions {
                Ok(actions) if !actions.is_empty() => {
                    if let Some(code) = apply(shared, id, outbox, actions) {
                        return Some(code);
                    }
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "live delivery read failed");
                    return Some(CloseCode::Overloaded);
                }
            }
        }
    }
    None
}

async fn connection(socket: WebSocket, shared: Arc<Shared>) {
    let _open = shared.open.enter();
    let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
    telemetry::connections_open(1.0);
    let (sink, mut stream) = socket.split();
    let (queue, outbound) = mpsc::channel(shared.config.outbound_queue_max.max(1) + 1);
    let (abort, abort_rx) = oneshot::channel();
    let queued_bytes = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn(writer(
        sink,
        outbound,
        queued_bytes.clone(),
        abort_rx,
        shared.group.clone(),
    ));
    let close = queue.clone().try_reserve_owned().ok();
    let mut outbox = Outbox {
        queue,
        close,
        abort: Some(abort),
        queued_bytes,
        queued_bytes_max: shared.config.outbound_queue_bytes(),
        group: shared.group.clone(),
    };
    let mut device = None;
    let code = run_connection(&mut stream, &shared, id, &mut device, &mut outbox).await;
    let closing = code.is_some();
    if let Some(code) = code {
        outbox.close(code);
    }
    drop(outbox);
    // The closing handshake (RFC 6455 7.1.1), within the grace period: the writer flushes
    // and sends the close frame while unread input is discarded up to the peer's close, so
    // that the close is not turned into a TCP reset that would destroy it. A socket that
    // does not drain in time is dropped.
    let mut writer = writer;
    let drain = async {
        if !closing {
            return;
        }
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    };
    let flushed = async {
        let _ = (&mut writer).await;
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, async { tokio::join!(flushed, drain) }).await;
    writer.abort();
    if let Ok(mut wakers) = shared.presence_wakers.lock() {
        wakers.remove(&id);
    }
    if let Ok(mut presence) = shared.presence.lock() {
        presence.unwatch(id);
    }
    // Forget this session unless a newer one already took the device's place.
    if let (Some(d), Ok(mut sessions)) = (device, shared.sessions.lock()) {
        if sessions.get(&d).is_some_and(|s| s.connection == id) {
            sessions.remove(&d);
        }
    }
    telemetry::connections_open(-1.0);
}

/// Makes this connection the device's session of chain `family`; a previous one is told
/// to close with 4104. Called with the store locked, in the same critical section as the
/// `Ready` that authenticated it: a revocation or a token reuse stored after that finds the
/// session here, and one stored before it refused the `Ready` (REQ-3.3-3).
fn register(
    shared: &Shared,
    id: u64,
    device: DeviceId,
    family: [u8; 16],
) -> oneshot::Receiver<CloseCode> {
    let (tx, rx) = oneshot::channel();
    if let Ok(mut sessions) = shared.sessions.lock() {
        let session = LiveSession {
            connection: id,
            family,
            close: tx,
        };
        if let Some(older) = sessions.insert(device, session) {
            let _ = older.close.send(CloseCode::SessionSuperseded);
        }
    }
    rx
}

/// A connection's [`Following`], which stops following when the connection ends.
struct Followed<'a>(&'a Hub, Following);

impl Drop for Followed<'_> {
    fn drop(&mut self) {
        self.1.leave(self.0);
    }
}

/// The actor: returns the close code to send, or `None` when the peer went away.
async fn run_connection(
    socket: &mut futures_util::stream::SplitStream<WebSocket>,
    shared: &Shared,
    id: u64,
    registered: &mut Option<DeviceId>,
    outbox: &mut Outbox,
) -> Option<CloseCode> {
    let mut kicked: Option<oneshot::Receiver<CloseCode>> = None;
    // When the device's certificate expires, the session ends (REQ-5.5-11).
    let mut expires: Option<tokio::time::Instant> = None;
    let mut conn = Connection::new();
    let mut following = Followed(&shared.hub, Following::new(id));
    let presence_events = Arc::new(Notify::new());
    if let Ok(mut wakers) = shared.presence_wakers.lock() {
        wakers.insert(id, presence_events.clone());
    }
    let auth_deadline =
        tokio::time::Instant::now() + Duration::from_millis(shared.config.auth_timeout_ms);
    let heartbeat_timeout = Duration::from_millis(shared.config.heartbeat_timeout_ms);
    let mut last_frame = tokio::time::Instant::now();
    loop {
        let deadline = if conn.device().is_none() {
            auth_deadline
        } else {
            last_frame + heartbeat_timeout
        };
        let code = tokio::select! {
            biased;
            () = shared.shutdown.stopped() => Some(CloseCode::ServerRestart),
            Ok(code) = async { match kicked.as_mut() { Some(rx) => rx.await, None => std::future::pending().await } } => {
                let cause = match code {
                    CloseCode::DeviceRevoked => Some(ErrorCode::AuthCertificateRevoked),
                    CloseCode::AuthFailed => Some(ErrorCode::ResumeTokenReused),
                    _ => None,
                };
                if let Some(cause) = cause {
                    let _ = outbox.frame(&ServerFrame::Error(ErrorFrame::new(cause)));
                }
                Some(code)
            }
            () = async { match expires { Some(at) => tokio::time::sleep_until(at).await, None => std::future::pending().await } } => {
                let frame = ServerFrame::Error(ErrorFrame::new(ErrorCode::AuthCertificateExpired));
                let _ = outbox.frame(&frame);
                Some(CloseCode::AuthFailed)
            }
            _ = tokio::time::sleep_until(deadline) => Some(if conn.device().is_none() {
                CloseCode::AuthTimeout
            } else {
                CloseCode::HeartbeatTimeout
            }),
            message = socket.next() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    last_frame = tokio::time::Instant::now();
                    let actions = match shared.store.lock() {
                        Ok(mut store) => {
                            let now = (shared.clock)();
                            let actions = conn.handle(&shared.config, &mut *store, &shared.limiters, &mut EnvEntropy(&shared.entropy), now, &bytes);
                            // Registered before the store is released (see `register`).
                            if let (None, Some(device), Some((family, not_after))) =
                                (*registered, conn.device(), conn.session())
                            {
                                *registered = Some(device);
                                kicked = Some(register(shared, id, device, family));
                                if !shared.config.faults.session_outlives_certificate {
                                    expires = Some(
                                        tokio::time::Instant::now()
                                            + Duration::from_millis(not_after.0.saturating_sub(now.0)),
                                    );
                                }
                            }
                            actions
                        }
                        Err(_) => vec![Action::Close(CloseCode::Overloaded)],
                    };
                    let code = apply(shared, id, outbox, actions);
                    // Follow the streams subscribed now; a stream newly followed is read
                    // once, for what was appended between its Subscribe and now.
                    let new = following.1.follow(&shared.hub, conn.subscribed_streams());
                    if code.is_none() && !new.is_empty() {
                        pull(shared, id, &mut conn, outbox, &new)
                    } else {
                        code
                    }
                }
                Some(Ok(Message::Text(_))) => Some(CloseCode::ProtocolError),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => None,
                Some(Ok(Message::Close(_))) | None => return None,
                // An oversize message or a broken socket.
                Some(Err(_)) => Some(CloseCode::FrameTooLarge),
            },
            () = presence_events.notified() => {
                let events = match shared.presence.lock() {
                    Ok(mut presence) => presence.take_events(id),
                    Err(_) => return Some(CloseCode::Overloaded),
                };
                telemetry::presence_events(events.len());
                events.iter().find_map(|frame| outbox.frame(frame).err())
            }
            appended = following.1.next() => {
                let Appended { stream, entry } = appended;
                let code = match entry.and_then(|e| conn.on_entry(&shared.config, &stream, &e)) {
                    Some(actions) => apply(shared, id, outbox, actions),
                    None => pull(shared, id, &mut conn, outbox, &[stream]),
                };
                if code.is_none() && following.1.take_lagged() {
                    let mut all = conn.subscribed_streams();
                    all.sort_unstable(); // the same order on every run of a seed
                    pull(shared, id, &mut conn, outbox, &all)
                } else {
                    code
                }
            }
        };
        if code.is_some() {
            return code;
        }
    }
}
