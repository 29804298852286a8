//! Runs a sans-IO [`ClientSession`] over a real WebSocket (tokio-tungstenite): connects when
//! the session asks, feeds it every received message, timer and close, and writes what it
//! transmits. The application owns the [`Transport`] and calls [`Transport::next_event`]
//! in a loop; between events it gives the session inputs through [`Transport::session`].
//!
//! `wss://` URLs use TLS (rustls with the *ring* provider) and trust the Mozilla root
//! programme's certificates (webpki-roots) plus any added with
//! [`Transport::trust_pem`], for gateways behind a private CA.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

use crate::environment::{Environment, Io};
use confab_spec::cbor::DecodeLimits;
use confab_spec::frame::ServerFrame;
use confab_spec::limits;
use confab_spec::session::{ClientSession, ConnId, Event, Input, Output};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<Box<dyn Io>>>;

type Connecting = Pin<Box<dyn Future<Output = Result<Ws, String>> + Send>>;

pub use crate::environment::system_now;

/// Why certificates to trust were refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The text is not PEM certificates.
    #[error("not a PEM certificate file: {0}")]
    Pem(String),
    /// The file holds no certificate.
    #[error("the file holds no certificate")]
    NoCertificates,
    /// A certificate cannot be used as a trust anchor.
    #[error("unusable certificate: {0}")]
    Invalid(String),
}

/// Bytes each WebSocket read asks the socket for. tungstenite zeroes the free part of its
/// read buffer before every read, so its default (128 KiB) cost a 128 KiB memset per
/// frame read (10% of the samples in a profile of a 200-member `room-soak`). Bigger frames
/// only take more reads.
const READ_BUFFER_BYTES: usize = 8 * 1_024;

/// A [`ClientSession`] connected to one gateway URL.
pub struct Transport {
    session: ClientSession,
    url: String,
    socket: Option<(ConnId, Ws)>,
    connecting: Option<(ConnId, Connecting)>,
    roots: rustls::RootCertStore,
    tls: Arc<rustls::ClientConfig>,
    env: Environment,
    /// An output taken from the session and not yet done (see `next_event`).
    held: Option<Output>,
    /// Live `Deliver` frames still to drop ([`Transport::lose_deliveries`]).
    lose_deliveries: u32,
    deliveries_lost: u64,
}

/// Whether `bytes` decode as a `Deliver` frame.
fn is_deliver(bytes: &[u8]) -> bool {
    matches!(
        ServerFrame::decode(bytes, &DecodeLimits::default()),
        Ok(ServerFrame::Deliver(_))
    )
}

/// A TLS client configuration trusting `roots`.
fn tls_config(roots: rustls::RootCertStore) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        // Fails only for a provider without cipher suites for TLS 1.2 and 1.3; ring has them.
        .unwrap_or_else(|_| unreachable!("ring supports the default TLS versions"));
    Arc::new(builder.with_root_certificates(roots).with_no_client_auth())
}

impl Transport {
    /// A transport for `session` to the gateway at `url` (`ws://HOST:PORT/v1/ws`). Nothing
    /// happens until the session is started (`Input::Start`) and `next_event` is called.
    pub fn new(session: ClientSession, url: impl Into<String>) -> Self {
        Self::with_environment(session, url, Environment::default())
    }

    /// [`Transport::new`] on the given clock, randomness and dialer (the simulator's).
    pub fn with_environment(
        session: ClientSession,
        url: impl Into<String>,
        env: Environment,
    ) -> Self {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        Self {
            session,
            url: url.into(),
            socket: None,
            connecting: None,
            tls: tls_config(roots.clone()),
            roots,
            env,
            held: None,
            lose_deliveries: 0,
            deliveries_lost: 0,
        }
    }

    /// Also trusts the certificates in `pem` (for example a private CA's) for `wss://`.
    /// Returns how many were added.
    pub fn trust_pem(&mut self, pem: &[u8]) -> Result<usize, TlsError> {
        let certificates = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem(e.to_string()))?;
        if certificates.is_empty() {
            return Err(TlsError::NoCertificates);
        }
        for c in &certificates {
            self.roots
                .add(c.clone())
                .map_err(|e| TlsError::Invalid(e.to_string()))?;
        }
        self.tls = tls_config(self.roots.clone());
        Ok(certificates.len())
    }

    /// The session, to give it inputs (sends, subscriptions, acks, requests).
    pub fn session(&mut self) -> &mut ClientSession {
        &mut self.session
    }

    /// The gateway URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The clock, randomness and dialer this transport runs on.
    pub fn environment(&self) -> &Environment {
        &self.env
    }

    /// Drops the next `n` live `Deliver` frames that arrive (replacing any count still
    /// pending; 0 stops), as a faulty intermediary would, so that the session must find
    /// the gap and ask for a replay. For fault injection (the simulator) and tests.
    pub fn lose_deliveries(&mut self, n: u32) {
        self.lose_deliveries = n;
    }

    /// `Deliver` frames dropped so far by [`Transport::lose_deliveries`].
    pub fn deliveries_lost(&self) -> u64 {
        self.deliveries_lost
    }

    /// Drops the connection without a close handshake, as a network failure would; the
    /// session reconnects and resumes. For fault injection (the simulator) and tests.
    pub fn drop_connection(&mut self) {
        // An attempt still in progress is abandoned too, and the session told at once (it
        // would otherwise wait for its connect timeout).
        if let Some((conn, _)) = self.connecting.take() {
            self.input(Input::Closed { conn, code: None });
        }
        if let Some((conn, _)) = self.socket.take() {
            self.input(Input::Closed { conn, code: None });
        }
    }

    /// Performs I/O until the session has something to say, and returns it.
    ///
    /// Cancel-safe: a frame taken from the session is held until the socket accepted it,
    /// so dropping this future (in a `select!`) loses nothing; the next call goes on.
    pub async fn next_event(&mut self) -> Event {
        loop {
            loop {
                let output = match self.held.take() {
                    Some(output) => output,
                    None => match self.session.poll_output() {
                        Some(output) => output,
                        None => break,
                    },
                };
                match output {
                    Output::Event(event) => return event,
                    Output::Connect { conn } => self.connect(conn),
                    Output::Transmit { conn, frame } => {
                        let Some((current, ws)) = self.socket.as_mut() else {
                            continue;
                        };
                        if *current != conn {
                            continue;
                        }
                        // Held while waiting for room in the socket: cancel-safe.
                        self.held = Some(Output::Transmit { conn, frame });
                        let ready = std::future::poll_fn(|cx| ws.poll_ready_unpin(cx)).await;
                        let Some(Output::Transmit { frame, .. }) = self.held.take() else {
                            continue;
                        };
                        let message = Message::Binary(frame.encode().into());
                        if ready.and_then(|()| ws.start_send_unpin(message)).is_err() {
                            self.socket = None;
                            self.input(Input::Closed { conn, code: None });
                        }
                    }
                    Output::Close { conn, code } => {
                        if let Some((current, mut ws)) = self.socket.take() {
                            if current == conn {
                                let frame = CloseFrame {
                                    code: code.into(),
                                    reason: "".into(),
                                };
                                let _ = tokio::time::timeout(
                                    Duration::from_secs(1),
                                    ws.close(Some(frame)),
                                )
                                .await;
                            } else {
                                self.socket = Some((current, ws));
                            }
                        }
                    }
                    // A newer session crate may add outputs; there is nothing to do for
                    // one this transport does not know.
                    _ => {}
                }
            }
            // Frames taken by the socket go out now (flushing is cancel-safe too).
            if let Some((conn, ws)) = self.socket.as_mut() {
                let conn = *conn;
                if ws.flush().await.is_err() {
                    self.socket = None;
                    self.input(Input::Closed { conn, code: None });
                    continue;
                }
            }
            self.wait().await;
        }
    }

    fn input(&mut self, input: Input) {
        // Transport inputs are never refused; application inputs do not pass here.
        let _ = self.session.handle((self.env.clock)(), input);
    }

    fn connect(&mut self, conn: ConnId) {
        self.socket = None;
        let url = self.url.clone();
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .max_message_size(Some(limits::FRAME_BYTES_MAX_DEFAULT))
            .max_frame_size(Some(limits::FRAME_BYTES_MAX_DEFAULT));
        let tls = tokio_tungstenite::Connector::Rustls(self.tls.clone());
        let dialer = self.env.dialer.clone();
        self.connecting = Some((
            conn,
            Box::pin(async move {
                use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
                let request = url.into_client_request().map_err(|e| e.to_string())?;
                let uri = request.uri();
                let host = uri.host().ok_or("the URL has no host")?;
                let host = host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned();
                let tls_scheme = uri.scheme_str() == Some("wss");
                let port = uri.port_u16().unwrap_or(if tls_scheme { 443 } else { 80 });
                let stream = dialer(host, port).await.map_err(|e| e.to_string())?;
                // The connector is used for wss:// only.
                tokio_tungstenite::client_async_tls_with_config(
                    request,
                    stream,
                    Some(config),
                    Some(tls),
                )
                .await
                .map(|(ws, _)| ws)
                .map_err(|e| e.to_string())
            }),
        ));
    }

    /// Waits for one thing to happen: the connection attempt ends, a message or close
    /// arrives, or the session's timer fires.
    async fn wait(&mut self) {
        let sleep = match self.session.poll_timeout() {
            Some(at) => Duration::from_millis(at.0.saturating_sub((self.env.clock)().0)),
            None => Duration::from_secs(3_600),
        };
        tokio::select! {
            biased;
            result = async {
                match self.connecting.as_mut() {
                    Some((_, attempt)) => attempt.await,
                    None => std::future::pending().await,
                }
            } => {
                let Some((conn, _)) = self.connecting.take() else { return };
                match result {
                    Ok(ws) => {
                        self.socket = Some((conn, ws));
                        self.input(Input::Connected { conn });
                    }
                    Err(_) => self.input(Input::Closed { conn, code: None }),
                }
            }
            message = async {
                match self.socket.as_mut() {
                    Some((_, ws)) => ws.next().await,
                    None => std::future::pending().await,
                }
            } => {
                let Some((conn, _)) = self.socket.as_ref().map(|(c, _)| (*c, ())) else { return };
                match message {
                    Some(Ok(Message::Binary(bytes))) => {
                        if self.lose_deliveries > 0 && is_deliver(&bytes) {
                            self.lose_deliveries -= 1;
                            self.deliveries_lost += 1;
                        } else {
                            self.input(Input::Bytes { conn, bytes: bytes.to_vec() });
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        self.socket = None;
                        let code = frame.map(|f| u16::from(f.code));
                        self.input(Input::Closed { conn, code });
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => {
                        self.socket = None;
                        self.input(Input::Closed { conn, code: None });
                    }
                }
            }
            _ = tokio::time::sleep(sleep) => self.input(Input::Timeout),
        }
    }
}
