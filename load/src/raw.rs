//! The baseline: a minimal axum WebSocket server that does the same fanout as a gateway
//! with no authentication, no storage and no protocol. The load modes drive it exactly as
//! they drive a gateway, so Confab's figures can be given as ratios to it.
//!
//! Its protocol, one binary message each: `[1, topic: u32]` subscribes the connection to a
//! topic (one per connection); `[2, topic: u32, payload..]` sends `payload` to every
//! subscriber of the topic. Anything else is ignored (the load modes' heartbeats).
//! `GET /stats` answers the number of messages dropped for slow subscribers (a
//! `tokio::sync::broadcast` drops rather than waits).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::broadcast;

/// Messages a topic holds for a subscriber that has not taken them yet.
const TOPIC_BUFFER: usize = 4_096;

/// Message tags.
pub const SUBSCRIBE: u8 = 1;
/// Message tags.
pub const PUBLISH: u8 = 2;

#[derive(Default)]
struct Hub {
    topics: Mutex<HashMap<u32, broadcast::Sender<Bytes>>>,
    dropped: AtomicU64,
}

impl Hub {
    fn topic(&self, id: u32) -> Option<broadcast::Sender<Bytes>> {
        let mut topics = self.topics.lock().ok()?;
        Some(
            topics
                .entry(id)
                .or_insert_with(|| broadcast::channel(TOPIC_BUFFER).0)
                .clone(),
        )
    }
}

/// Serves the baseline on `listen` until the process is killed.
pub async fn serve(listen: SocketAddr) -> std::io::Result<()> {
    let hub = Arc::new(Hub::default());
    let app = Router::new()
        .route("/v1/ws", get(upgrade))
        .route("/stats", get(stats))
        .with_state(hub);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    axum::serve(listener, app).await
}

async fn stats(State(hub): State<Arc<Hub>>) -> String {
    format!("dropped {}\n", hub.dropped.load(Ordering::Relaxed))
}

async fn upgrade(ws: WebSocketUpgrade, State(hub): State<Arc<Hub>>) -> Response {
    // The same read buffer as the gateway's (DESIGN.md: the default costs 134 KiB each).
    ws.read_buffer_size(2_048)
        .on_upgrade(move |socket| connection(socket, hub))
}

fn topic_of(message: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(message.get(1..5)?.try_into().ok()?))
}

async fn connection(socket: WebSocket, hub: Arc<Hub>) {
    let (mut sink, mut stream) = socket.split();
    let mut subscription: Option<broadcast::Receiver<Bytes>> = None;
    loop {
        tokio::select! {
            biased;
            message = stream.next() => {
                let Some(Ok(message)) = message else { return };
                let Message::Binary(bytes) = message else { continue };
                match (bytes.first(), topic_of(&bytes)) {
                    (Some(&SUBSCRIBE), Some(id)) => {
                        subscription = hub.topic(id).map(|t| t.subscribe());
                    }
                    (Some(&PUBLISH), Some(id)) => {
                        if let Some(topic) = hub.topic(id) {
                            let _ = topic.send(bytes.slice(5..));
                        }
                    }
                    _ => {}
                }
            }
            received = async {
                match subscription.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => match received {
                Ok(payload) => {
                    if sink.send(Message::Binary(payload)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    hub.dropped.fetch_add(n, Ordering::Relaxed);
                }
                Err(broadcast::error::RecvError::Closed) => subscription = None,
            },
        }
    }
}
