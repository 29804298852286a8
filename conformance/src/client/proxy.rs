//! The proxy of client mode: the client under test connects to it, and it forwards every
//! frame to and from a real gateway, recording each one and letting the current case's
//! [`Script`] drop, rewrite or answer frames and close connections (a man in the middle,
//! which the gateway cannot tell from the network).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use confab_spec::DecodeLimits;
use confab_spec::frame::{ClientFrame, ErrorFrame, ServerFrame};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use crate::context::Transcript;

/// How long the proxy waits for the client's close frame after sending its own.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// What to do with a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Pass it on (as the script may have rewritten it).
    Forward,
    /// Swallow it.
    Drop,
    /// Swallow a client's frame and answer it with this frame, as if from the gateway.
    Answer(ServerFrame),
    /// Swallow it, send the client `error` (if any), close the client's connection with
    /// `code` and the gateway's normally.
    Close {
        /// An `Error` frame to send first.
        error: Option<ErrorFrame>,
        /// The WebSocket close code.
        code: u16,
    },
}

/// A case's plan for the connections the client opens; connections are numbered from 1
/// in the order they are opened since the script was set.
pub trait Script: Send {
    /// A connection was opened; `Some(verdict)` (a [`Verdict::Close`]) refuses it before
    /// the gateway hears of it.
    fn on_open(&mut self, _conn: usize) -> Option<Verdict> {
        None
    }
    /// A frame from the client, before it goes to the gateway.
    fn on_client_frame(&mut self, _conn: usize, _frame: &ClientFrame) -> Verdict {
        Verdict::Forward
    }
    /// A frame from the gateway, before it goes to the client; it may be rewritten.
    fn on_server_frame(&mut self, _conn: usize, _frame: &mut ServerFrame) -> Verdict {
        Verdict::Forward
    }
}

/// Forwards everything unchanged.
pub struct PassThrough;

impl Script for PassThrough {}

/// What the proxy saw.
#[derive(Debug, Clone)]
pub enum What {
    /// The client opened a WebSocket connection.
    Opened,
    /// The client sent a frame (`None`: it did not decode; the error is in the transcript).
    FromClient(Option<ClientFrame>, Vec<u8>),
    /// A frame went to the client (from the gateway, possibly rewritten, or the proxy's).
    ToClient(ServerFrame),
    /// The client closed its connection: with a close frame and its code, or (`None`)
    /// without one.
    ClientClosed(Option<u16>),
    /// The proxy closed the client's connection with this code.
    ProxyClosed(u16),
}

/// One thing the proxy saw, when, and on which connection.
#[derive(Debug, Clone)]
pub struct Event {
    /// When.
    pub at: Instant,
    /// The connection (1, 2, ... since the script was set).
    pub conn: usize,
    /// What.
    pub what: What,
}

struct State {
    script: Box<dyn Script>,
    /// Connections opened under the current script.
    opened: usize,
    /// The current script's generation: connections of an older one are only forwarded.
    generation: u64,
    /// How many scripts the current case has set (its phases), for the transcript's names.
    phase: u64,
    events: Vec<Event>,
    transcript: Transcript,
}

/// A running proxy in front of one gateway.
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    /// Listens on `listen` and forwards to the gateway at `upstream` (its WebSocket URL).
    pub async fn start(listen: SocketAddr, upstream: String) -> std::io::Result<Self> {
        Self::start_on(TcpListener::bind(listen).await?, upstream)
    }

    /// [`Proxy::start`] on a listener already bound.
    pub fn start_on(listener: TcpListener, upstream: String) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            script: Box::new(PassThrough),
            opened: 0,
            generation: 0,
            phase: 0,
            events: Vec::new(),
            transcript: Transcript::default(),
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let conn = Connection::open(&shared);
                tokio::spawn(conn.serve(tcp, upstream.clone()));
            }
        });
        Ok(Self { addr, state, task })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts a new case: `script` decides from now on, connections count from 1 again,
    /// the events seen so far are forgotten and frames go to `transcript`.
    pub fn reset(&self, script: Box<dyn Script>, transcript: Transcript) {
        if let Ok(mut s) = self.state.lock() {
            s.script = script;
            s.opened = 0;
            s.generation += 1;
            s.phase = if s.transcript.same(&transcript) {
                s.phase + 1
            } else {
                1
            };
            s.events.clear();
            s.transcript = transcript;
        }
    }

    /// Everything seen since the last [`Proxy::reset`].
    pub fn events(&self) -> Vec<Event> {
        self.state
            .lock()
            .map(|s| s.events.clone())
            .unwrap_or_default()
    }
}

/// One client connection's handle on the shared state.
struct Connection {
    state: Arc<Mutex<State>>,
    generation: u64,
    conn: usize,
}

enum Step {
    Continue,
    End,
}

impl Connection {
    fn open(state: &Arc<Mutex<State>>) -> Self {
        let (generation, conn) = match state.lock() {
            Ok(mut s) => {
                s.opened += 1;
                (s.generation, s.opened)
            }
            Err(_) => (0, 0),
        };
        Self {
            state: state.clone(),
            generation,
            conn,
        }
    }

    /// Records `what` (if the connection belongs to the current case) and writes it to the
    /// transcript.
    fn record(&self, what: What, direction: &'static str, text: String, bytes: &[u8]) {
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        if s.generation != self.generation {
            return;
        }
        let peer = match s.phase {
            1 => format!("client#{}", self.conn),
            phase => format!("phase {phase} client#{}", self.conn),
        };
        s.transcript.push(&peer, direction, text, bytes);
        s.events.push(Event {
            at: Instant::now(),
            conn: self.conn,
            what,
        });
    }

    /// Asks the current script (older connections are forwarded unchanged).
    fn ask<T>(&self, default: T, f: impl FnOnce(&mut dyn Script, usize) -> T) -> T {
        match self.state.lock() {
            Ok(mut s) if s.generation == self.generation => f(s.script.as_mut(), self.conn),
            _ => default,
        }
    }

    async fn serve(self, tcp: TcpStream, upstream: String) {
        let Ok(mut client) = tokio_tungstenite::accept_async(tcp).await else {
            return;
        };
        self.record(What::Opened, "event", "connection opened".into(), &[]);
        if let Some(Verdict::Close { error, code }) = self.ask(None, |s, c| s.on_open(c)) {
            self.close_client(&mut client, error, code).await;
            return;
        }
        let mut server = match tokio_tungstenite::connect_async(upstream.as_str()).await {
            Ok((ws, _)) => ws,
            Err(e) => {
                self.record(
                    What::ProxyClosed(1011),
                    "event",
                    format!("the gateway is unreachable ({e}): closing with 1011"),
                    &[],
                );
                let _ = client.close(Some(close_frame(1011))).await;
                return;
            }
        };
        let limits = DecodeLimits::default();
        loop {
            let step = tokio::select! {
                message = client.next() => {
                    self.relay_client(message, &mut client, &mut server, &limits).await
                }
                message = server.next() => {
                    self.relay_server(message, &mut client, &mut server, &limits).await
                }
            };
            if let Step::End = step {
                return;
            }
        }
    }

    async fn relay_client<C, S>(
        &self,
        message: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
        client: &mut C,
        server: &mut S,
        limits: &DecodeLimits,
    ) -> Step
    where
        C: SinkExt<Message>
            + StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
            + Unpin,
        S: SinkExt<Message> + Unpin,
    {
        match message {
            Some(Ok(Message::Binary(bytes))) => {
                let decoded = ClientFrame::decode(&bytes, limits);
                let text = match &decoded {
                    Ok(f) => format!("{f:?}"),
                    Err(e) => format!("undecodable frame: {e}"),
                };
                let frame = decoded.ok();
                self.record(
                    What::FromClient(frame.clone(), bytes.to_vec()),
                    "sent",
                    text,
                    &bytes,
                );
                let verdict = match &frame {
                    Some(f) => self.ask(Verdict::Forward, |s, c| s.on_client_frame(c, f)),
                    None => Verdict::Forward,
                };
                match verdict {
                    Verdict::Forward => {
                        let _ = server.send(Message::Binary(bytes)).await;
                        Step::Continue
                    }
                    Verdict::Drop => Step::Continue,
                    Verdict::Answer(answer) => {
                        self.deliver(client, answer).await;
                        Step::Continue
                    }
                    Verdict::Close { error, code } => {
                        let _ = server.send(Message::Close(Some(close_frame(1000)))).await;
                        self.close_client(client, error, code).await;
                        Step::End
                    }
                }
            }
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map(|f| u16::from(f.code));
                self.record(
                    What::ClientClosed(code),
                    "sent",
                    format!("close {code:?}"),
                    &[],
                );
                let _ = server.send(Message::Close(Some(close_frame(1000)))).await;
                // Answer the client's close so that its handshake completes.
                let _ = client.send(Message::Close(None)).await;
                Step::End
            }
            Some(Ok(Message::Text(text))) => {
                self.record(
                    What::FromClient(None, text.as_bytes().to_vec()),
                    "sent",
                    format!("text message {:?}", text.as_str()),
                    text.as_bytes(),
                );
                let _ = server.send(Message::Text(text)).await;
                Step::Continue
            }
            Some(Ok(_)) => Step::Continue,
            Some(Err(_)) | None => {
                self.record(
                    What::ClientClosed(None),
                    "sent",
                    "connection ended without a close frame".into(),
                    &[],
                );
                Step::End
            }
        }
    }

    async fn relay_server<C, S>(
        &self,
        message: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
        client: &mut C,
        server: &mut S,
        limits: &DecodeLimits,
    ) -> Step
    where
        C: SinkExt<Message>
            + StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
            + Unpin,
        S: SinkExt<Message> + Unpin,
    {
        match message {
            Some(Ok(Message::Binary(bytes))) => {
                let Ok(mut frame) = ServerFrame::decode(&bytes, limits) else {
                    // Not the client's behaviour under test: pass it on unread.
                    let _ = client.send(Message::Binary(bytes)).await;
                    return Step::Continue;
                };
                match self.ask(Verdict::Forward, |s, c| s.on_server_frame(c, &mut frame)) {
                    Verdict::Forward => {
                        self.deliver(client, frame).await;
                        Step::Continue
                    }
                    Verdict::Drop => Step::Continue,
                    Verdict::Answer(answer) => {
                        // Sent in place of the gateway's frame.
                        self.deliver(client, answer).await;
                        Step::Continue
                    }
                    Verdict::Close { error, code } => {
                        let _ = server.send(Message::Close(Some(close_frame(1000)))).await;
                        self.close_client(client, error, code).await;
                        Step::End
                    }
                }
            }
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map_or(1000, |f| u16::from(f.code));
                self.close_client(client, None, code).await;
                Step::End
            }
            Some(Ok(_)) => Step::Continue,
            Some(Err(_)) | None => {
                // The gateway went away without a close: so does the client's connection.
                self.record(
                    What::ProxyClosed(1006),
                    "event",
                    "the gateway's connection ended: dropping the client's".into(),
                    &[],
                );
                Step::End
            }
        }
    }

    /// Sends `frame` to the client and records it.
    async fn deliver<C>(&self, client: &mut C, frame: ServerFrame)
    where
        C: SinkExt<Message> + Unpin,
    {
        let bytes = frame.encode();
        self.record(
            What::ToClient(frame.clone()),
            "received",
            format!("{frame:?}"),
            &bytes,
        );
        let _ = client.send(Message::Binary(bytes.into())).await;
    }

    /// Sends `error` (if any), then a close with `code`, and reads what the client still
    /// sends until its close frame (or [`CLOSE_GRACE`]).
    async fn close_client<C>(&self, client: &mut C, error: Option<ErrorFrame>, code: u16)
    where
        C: SinkExt<Message>
            + StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
            + Unpin,
    {
        if let Some(error) = error {
            self.deliver(client, ServerFrame::Error(error)).await;
        }
        self.record(
            What::ProxyClosed(code),
            "received",
            format!("close {code}"),
            &[],
        );
        let _ = client.send(Message::Close(Some(close_frame(code)))).await;
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            while let Some(Ok(message)) = client.next().await {
                if let Message::Close(_) = message {
                    break;
                }
            }
        })
        .await;
    }
}

fn close_frame(code: u16) -> CloseFrame {
    CloseFrame {
        code: code.into(),
        reason: "".into(),
    }
}
