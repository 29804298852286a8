//! The network shell: an axum server that runs [`crate::handler::Connection`] over
//! WebSockets at `/v1/ws`, serves `/healthz` and `/v1/info`, wakes subscribed connections
//! when a stream grows, enforces the auth and heartbeat deadlines, and closes every
//! session with 4000 on shutdown.
//!
//! The fan-out hub is a `tokio::sync::broadcast` of stream keys. It carries wake-ups, not
//! entries: a connection pulls what it has not delivered from the store, so a lagging
//! receiver loses nothing; it re-checks all its subscriptions instead.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use confab_spec::error::CloseCode;
use confab_spec::ids::{DeviceId, UnixMs};
use confab_spec::limits;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, oneshot, watch};

use crate::handler::{Action, Connection, Entropy, GatewayConfig};
use crate::store::StreamKey;
use crate::store::sqlite::SqliteStore;

/// State shared by every connection.
pub struct Shared {
    /// Protocol settings.
    pub config: GatewayConfig,
    /// The durable store (one writer; SQLite serialises writes anyway).
    pub store: Mutex<SqliteStore>,
    hub: broadcast::Sender<StreamKey>,
    shutdown: watch::Receiver<bool>,
    /// The live session of each device: a newer one supersedes it (REQ-5.5-9).
    sessions: Mutex<HashMap<DeviceId, (u64, oneshot::Sender<()>)>>,
    next_connection: AtomicU64,
}

/// Bound of the hub's wake-up queue per receiver; a receiver that lags re-checks all its
/// subscriptions.
const HUB_CAPACITY: usize = 1_024;

/// Runs the gateway on `listener` until `shutdown` resolves, then closes every session
/// with 4000 (SPEC.md REQ-5.7-3).
pub async fn serve(
    listener: TcpListener,
    config: GatewayConfig,
    store: SqliteStore,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (hub, _) = broadcast::channel(HUB_CAPACITY);
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        config,
        store: Mutex::new(store),
        hub,
        shutdown: stop_rx,
        sessions: Mutex::new(HashMap::new()),
        next_connection: AtomicU64::new(1),
    });
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/info", get(info))
        .route("/v1/ws", get(upgrade))
        .with_state(shared);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        })
        .await
}

async fn info(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let c = &shared.config;
    Json(serde_json::json!({
        "versions": [limits::PROTOCOL_VERSION],
        "origin": c.origin,
        "heartbeat_interval_ms": c.heartbeat_interval_ms,
        "heartbeat_timeout_ms": c.heartbeat_timeout_ms,
        "auth_timeout_ms": limits::AUTH_TIMEOUT_MS_DEFAULT,
        "clock_skew_max_ms": c.clock_skew_max_ms,
        "resume_token_ttl_ms": c.resume_token_ttl_ms,
        "limits": {
            "frame_bytes_max": c.limits.frame_bytes_max,
            "collection_len_max": c.limits.collection_len_max,
            "nesting_depth_max": c.limits.nesting_depth_max,
            "text_bytes_max": c.limits.text_bytes_max,
            "replay_batch_max": c.limits.replay_batch_max,
            "pending_sends_max": c.limits.pending_sends_max,
            "key_packages_per_upload_max": c.limits.key_packages_per_upload_max,
            "pre_auth_frames_max": c.pre_auth_frames_max,
        },
    }))
}

async fn upgrade(ws: WebSocketUpgrade, State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let max = usize::try_from(shared.config.limits.frame_bytes_max).unwrap_or(usize::MAX);
    ws.read_buffer_size(4_096)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| connection(socket, shared))
}

struct OsEntropy;

impl Entropy for OsEntropy {
    fn fill(&mut self, out: &mut [u8]) {
        use rand_core::RngCore as _;
        rand_core::OsRng.fill_bytes(out);
    }
}

fn now() -> UnixMs {
    UnixMs(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    )
}

async fn close(socket: &mut WebSocket, code: CloseCode) {
    let frame = CloseFrame {
        code: code.value(),
        reason: code.name().into(),
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
}

/// Sends the handler's frames; returns the close code if it asked to close.
async fn apply(
    socket: &mut WebSocket,
    shared: &Shared,
    actions: Vec<Action>,
) -> Result<Option<CloseCode>, axum::Error> {
    for action in actions {
        match action {
            Action::Send(frame) => socket.send(Message::Binary(frame.encode().into())).await?,
            Action::Close(code) => return Ok(Some(code)),
            Action::Appended { stream, .. } => {
                let _ = shared.hub.send(stream);
            }
        }
    }
    Ok(None)
}

/// Delivers everything new on `streams` to a live subscription of `conn`.
fn pull(shared: &Shared, conn: &mut Connection, streams: &[StreamKey]) -> Vec<Action> {
    let Ok(store) = shared.store.lock() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for stream in streams {
        loop {
            match conn.on_appended(&shared.config, &*store, stream) {
                Ok(actions) if !actions.is_empty() => out.extend(actions),
                _ => break,
            }
        }
    }
    out
}

async fn connection(socket: WebSocket, shared: Arc<Shared>) {
    let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
    let mut device = None;
    run_connection(socket, &shared, id, &mut device).await;
    // Forget this session unless a newer one already took the device's place.
    if let (Some(d), Ok(mut sessions)) = (device, shared.sessions.lock()) {
        if sessions.get(&d).is_some_and(|(owner, _)| *owner == id) {
            sessions.remove(&d);
        }
    }
}

/// Makes this connection the device's session; a previous one is told to close with 4104.
fn register(shared: &Shared, id: u64, device: DeviceId) -> oneshot::Receiver<()> {
    let (tx, rx) = oneshot::channel();
    if let Ok(mut sessions) = shared.sessions.lock() {
        if let Some((_, older)) = sessions.insert(device, (id, tx)) {
            let _ = older.send(());
        }
    }
    rx
}

async fn run_connection(
    mut socket: WebSocket,
    shared: &Shared,
    id: u64,
    registered: &mut Option<DeviceId>,
) {
    let mut superseded: Option<oneshot::Receiver<()>> = None;
    let mut conn = Connection::new();
    let mut hub = shared.hub.subscribe();
    let mut shutdown = shared.shutdown.clone();
    let auth_deadline =
        tokio::time::Instant::now() + Duration::from_millis(limits::AUTH_TIMEOUT_MS_DEFAULT);
    let heartbeat_timeout = Duration::from_millis(shared.config.heartbeat_timeout_ms);
    let mut last_frame = tokio::time::Instant::now();
    loop {
        let deadline = if conn.device().is_none() {
            auth_deadline
        } else {
            last_frame + heartbeat_timeout
        };
        if registered.is_none() {
            if let Some(device) = conn.device() {
                *registered = Some(device);
                superseded = Some(register(shared, id, device));
            }
        }
        let code = tokio::select! {
            biased;
            _ = shutdown.changed() => Some(CloseCode::ServerRestart),
            Ok(()) = async { match superseded.as_mut() { Some(rx) => rx.await, None => std::future::pending().await } } => {
                Some(CloseCode::SessionSuperseded)
            }
            _ = tokio::time::sleep_until(deadline) => Some(if conn.device().is_none() {
                CloseCode::AuthTimeout
            } else {
                CloseCode::HeartbeatTimeout
            }),
            message = socket.recv() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    last_frame = tokio::time::Instant::now();
                    let actions = match shared.store.lock() {
                        Ok(mut store) => conn.handle(&shared.config, &mut *store, &mut OsEntropy, now(), &bytes),
                        Err(_) => vec![Action::Close(CloseCode::Overloaded)],
                    };
                    match apply(&mut socket, shared, actions).await {
                        Ok(code) => code,
                        Err(_) => return,
                    }
                }
                Some(Ok(Message::Text(_))) => Some(CloseCode::ProtocolError),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => None,
                Some(Ok(Message::Close(_))) | None => return,
                // An oversize message or a broken socket.
                Some(Err(_)) => Some(CloseCode::FrameTooLarge),
            },
            woken = hub.recv() => {
                let streams = match woken {
                    Ok(stream) => vec![stream],
                    Err(broadcast::error::RecvError::Lagged(_)) => conn.subscribed_streams(),
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let actions = pull(shared, &mut conn, &streams);
                match apply(&mut socket, shared, actions).await {
                    Ok(code) => code,
                    Err(_) => return,
                }
            }
        };
        if let Some(code) = code {
            close(&mut socket, code).await;
            return;
        }
    }
}
