//! What a case works with: the server's URL and announced settings, fresh identities,
//! and connections ([`Peer`]) that record every frame in the case's transcript.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use confab_spec::frame::{Auth, Challenge, ClientFrame, ErrorFrame, Hello, Ready, Versions};
use confab_spec::identity::{DeviceCertificate, DeviceKeyPair, SystemKeyPair, sign_auth};
use confab_spec::ids::{DeviceId, Nonce, ProcessId, ResumeToken, UnixMs};
use confab_spec::{DecodeLimits, ServerFrame};
use futures_util::{SinkExt, StreamExt};
use rand_core::RngCore as _;
use tokio_tungstenite::tungstenite::Message;

use crate::case::{Failure, Stop};
use crate::info::Info;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long a case waits for an answer that should come at once.
pub const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// The longest a case waits in all for a server's connection rate limit (SPEC.md 11).
pub const RATE_LIMIT_WAIT_MAX: Duration = Duration::from_secs(20);

/// How long a case listens to conclude that nothing more comes.
pub const SILENCE_WAIT: Duration = Duration::from_millis(300);

/// One frame or event in a case's transcript.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Record {
    /// Milliseconds since the case started.
    pub at_ms: u64,
    /// Which connection of the case (`a`, `b`, ...).
    pub peer: String,
    /// `sent` or `received`.
    pub direction: &'static str,
    /// The frame, decoded for reading (or what was sent or happened instead).
    pub frame: String,
    /// The message's bytes in hex (at most 512 bytes shown).
    pub hex: String,
}

/// The transcript of a case, shared by its connections.
#[derive(Debug, Clone)]
pub struct Transcript {
    started: tokio::time::Instant,
    records: Arc<Mutex<Vec<Record>>>,
}

impl Default for Transcript {
    fn default() -> Self {
        Self {
            started: tokio::time::Instant::now(),
            records: Arc::default(),
        }
    }
}

impl Transcript {
    pub(crate) fn push(&self, peer: &str, direction: &'static str, frame: String, bytes: &[u8]) {
        const SHOWN: usize = 512;
        let mut hex = hex::encode(&bytes[..bytes.len().min(SHOWN)]);
        if bytes.len() > SHOWN {
            hex.push_str(&format!("… ({} bytes)", bytes.len()));
        }
        let record = Record {
            at_ms: self.started.elapsed().as_millis() as u64,
            peer: peer.to_owned(),
            direction,
            frame,
            hex,
        };
        if let Ok(mut records) = self.records.lock() {
            records.push(record);
        }
    }

    /// Whether `other` is this transcript (a clone of it), not another case's.
    pub fn same(&self, other: &Transcript) -> bool {
        Arc::ptr_eq(&self.records, &other.records)
    }

    /// The records so far.
    pub fn records(&self) -> Vec<Record> {
        self.records.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

/// What the run knows: the server and the transcript of the current case.
pub struct Ctx {
    /// The WebSocket URL (`ws://host:port/v1/ws`).
    pub url: String,
    /// The origin the suite signs (`ws://host:port`).
    pub origin: String,
    /// What `GET /v1/info` announced.
    pub info: Info,
    /// The current case's transcript.
    pub transcript: Transcript,
    /// The server's log file, when the run was told it (`--server-log`).
    pub server_log: Option<std::path::PathBuf>,
    /// The commands that stop, kill and start the server, as far as the run was given them.
    pub control: crate::control::ServerControl,
    /// The client under test, in client mode.
    pub client: Option<crate::client::ClientUnderTest>,
}

impl Ctx {
    /// A context for the server at `url`.
    pub fn new(url: String, info: Info) -> Self {
        Self {
            origin: origin_of(&url),
            url,
            info,
            transcript: Transcript::default(),
            server_log: None,
            control: crate::control::ServerControl::default(),
            client: None,
        }
    }

    /// The client under test, its proxy set to follow `script` from now on with a fresh
    /// record; a case without one (a run without `--client-command`) is skipped.
    pub fn client(
        &self,
        script: Box<dyn crate::client::Script>,
    ) -> Result<&crate::client::ClientUnderTest, Stop> {
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| Stop::Skipped("a client case: run with --client-command".into()))?;
        client.proxy.reset(script, self.transcript.clone());
        Ok(client)
    }

    /// Opens a WebSocket to the server, named `name` in the transcript. A server that
    /// limits connections per address (SPEC.md 11, HTTP 429) is given the time its
    /// `Retry-After` asks for, up to [`RATE_LIMIT_WAIT_MAX`] in all.
    pub async fn open(&self, name: &str) -> Result<Peer, Stop> {
        self.open_with(name, None).await
    }

    /// [`Ctx::open`] with the socket's send and receive buffers set to `socket_buffers`
    /// bytes (`SO_SNDBUF`, `SO_RCVBUF`, which also stop the kernel from growing them): for a
    /// case that stops reading and wants the server's queue, not the client's kernel, to
    /// fill up.
    pub async fn open_with(&self, name: &str, socket_buffers: Option<u32>) -> Result<Peer, Stop> {
        let mut waited = Duration::ZERO;
        loop {
            let connect = async {
                let Some(bytes) = socket_buffers else {
                    return tokio_tungstenite::connect_async(self.url.as_str()).await;
                };
                let stream = connect_tcp(&self.url, bytes)
                    .await
                    .map_err(tokio_tungstenite::tungstenite::Error::Io)?;
                tokio_tungstenite::client_async_tls(self.url.as_str(), stream).await
            };
            let connected = tokio::time::timeout(ANSWER_WAIT, connect).await;
            let error = match connected {
                Ok(Ok((ws, _))) => {
                    return Ok(Peer {
                        ws,
                        name: name.to_owned(),
                        transcript: self.transcript.clone(),
                        limits: self.info.decode_limits(),
                        largest_received: 0,
                        authenticated: None,
                    });
                }
                Ok(Err(e)) => e,
                Err(_) => {
                    return Err(Failure::new("a WebSocket upgrade", "no answer within 5 s").into());
                }
            };
            let retry_after = match &error {
                tokio_tungstenite::tungstenite::Error::Http(response)
                    if response.status().as_u16() == 429 =>
                {
                    response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs)
                }
                _ => None,
            };
            match retry_after {
                Some(wait) if waited + wait <= RATE_LIMIT_WAIT_MAX => {
                    self.transcript.push(
                        name,
                        "received",
                        format!("HTTP 429, retrying after {} s", wait.as_secs()),
                        &[],
                    );
                    tokio::time::sleep(wait).await;
                    waited += wait;
                }
                _ => return Err(Failure::new("a WebSocket upgrade", format!("{error}")).into()),
            }
        }
    }

    /// [`Ctx::ready`] on a connection opened with [`Ctx::open_with`].
    pub async fn ready_with(
        &self,
        name: &str,
        device: &Device,
        socket_buffers: Option<u32>,
    ) -> Result<(Peer, Ready), Stop> {
        let mut peer = self.open_with(name, socket_buffers).await?;
        let ready = peer.authenticate(self, device).await?;
        Ok((peer, ready))
    }

    /// Opens a connection and authenticates `device` on it (Hello, Challenge, Auth, Ready).
    pub async fn ready(&self, name: &str, device: &Device) -> Result<(Peer, Ready), Stop> {
        self.ready_with(name, device, None).await
    }

    /// A bare TCP connection to the server's host and port, nothing sent (the cases of
    /// connection hygiene, SPEC.md 11).
    pub async fn tcp(&self) -> std::io::Result<tokio::net::TcpStream> {
        connect_tcp(&self.url, 65_536).await
    }
}

/// A TCP connection to the host of a `ws://` or `wss://` URL, its send and receive buffers
/// set to `buffers` bytes before connecting.
async fn connect_tcp(url: &str, buffers: u32) -> std::io::Result<tokio::net::TcpStream> {
    let origin = origin_of(url);
    let default_port = if origin.starts_with("wss://") {
        443
    } else {
        80
    };
    let authority = origin.split_once("://").map_or(origin.as_str(), |(_, a)| a);
    let address = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_owned()
    } else {
        format!("{authority}:{default_port}")
    };
    let mut last = std::io::Error::other(format!("{address} resolves to no address"));
    for addr in tokio::net::lookup_host(address).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_recv_buffer_size(buffers)?;
        socket.set_send_buffer_size(buffers)?;
        match socket.connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The origin a client signs for a gateway URL: scheme, host and port.
pub fn origin_of(url: &str) -> String {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => url[..after_scheme + i].to_owned(),
        None => url.to_owned(),
    }
}

/// A fresh identity: a new system (user) and one device of it.
pub struct Device {
    /// The user's system key.
    pub system: SystemKeyPair,
    /// The device key.
    pub key: DeviceKeyPair,
    /// The device's process id.
    pub process: ProcessId,
}

impl Clone for Device {
    fn clone(&self) -> Self {
        Self {
            system: SystemKeyPair::from_seed(&self.system.seed()),
            key: self.key.clone(),
            process: self.process,
        }
    }
}

impl Device {
    /// A new user with one device, from the operating system's random source.
    pub fn fresh() -> Self {
        Self::of(SystemKeyPair::generate(&mut rand_core::OsRng))
    }

    /// Another device of `system`.
    pub fn of(system: SystemKeyPair) -> Self {
        let mut process = [0u8; 16];
        rand_core::OsRng.fill_bytes(&mut process);
        Self {
            system,
            key: DeviceKeyPair::generate(&mut rand_core::OsRng),
            process: ProcessId(process),
        }
    }

    /// Another, new device of the same user.
    pub fn sibling(&self) -> Self {
        Self::of(SystemKeyPair::from_seed(&self.system.seed()))
    }

    /// The device's id.
    pub fn id(&self) -> DeviceId {
        DeviceId {
            system: self.system.public(),
            process: self.process,
        }
    }

    /// A certificate valid from one minute before `now` for an hour.
    pub fn certificate(&self, now: UnixMs) -> DeviceCertificate {
        self.certificate_between(UnixMs(now.0.saturating_sub(60_000)), now.plus_ms(3_600_000))
    }

    /// A certificate valid over `[not_before, not_after)`.
    pub fn certificate_between(&self, not_before: UnixMs, not_after: UnixMs) -> DeviceCertificate {
        self.system
            .issue_certificate(self.process, self.key.public(), not_before, not_after)
    }

    /// An `Auth` with `certificate`, signed over the transcript for `origin`, `nonce`, `time`.
    pub fn auth(
        &self,
        certificate: DeviceCertificate,
        origin: &str,
        nonce: Nonce,
        time_ms: UnixMs,
    ) -> Auth {
        sign_auth(&self.key, certificate, 1, origin, nonce, time_ms)
    }
}

/// What a connection observed next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// A frame.
    Frame(ServerFrame),
    /// The server closed the connection, with this close code if it sent one.
    Closed(Option<u16>),
    /// Nothing within the wait.
    Silence,
    /// A message that is not one valid frame (the decoder's reason).
    Undecodable(String),
}

impl std::fmt::Display for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Observed::Frame(ServerFrame::Error(e)) => write!(f, "{}", describe_error(e)),
            Observed::Frame(frame) => write!(f, "{}", frame.name()),
            Observed::Closed(Some(code)) => write!(f, "close {code}"),
            Observed::Closed(None) => write!(f, "the connection closed without a close code"),
            Observed::Silence => write!(f, "nothing"),
            Observed::Undecodable(why) => write!(f, "a message that is not one frame ({why})"),
        }
    }
}

/// `Error code (rid)` for messages.
pub fn describe_error(e: &ErrorFrame) -> String {
    match e.rid {
        Some(rid) => format!("Error {} {} for rid {rid}", e.code.value(), e.code.name()),
        None => format!("Error {} {}", e.code.value(), e.code.name()),
    }
}

/// One WebSocket connection of a case; every frame in and out goes to the transcript.
pub struct Peer {
    ws: Ws,
    name: String,
    transcript: Transcript,
    limits: DecodeLimits,
    largest_received: usize,
    /// The device this connection authenticated as, and the server's time then.
    authenticated: Option<(Device, UnixMs)>,
}

impl Peer {
    /// The device this connection authenticated as and the server's time at its
    /// `Challenge`, once [`Peer::authenticate`] succeeded.
    pub fn authenticated(&self) -> Option<(&Device, UnixMs)> {
        self.authenticated.as_ref().map(|(d, t)| (d, *t))
    }

    /// Sends a frame.
    pub async fn send(&mut self, frame: &ClientFrame) -> Result<(), Stop> {
        let bytes = frame.encode();
        self.transcript
            .push(&self.name, "sent", format!("{frame:?}"), &bytes);
        self.write(Message::Binary(bytes.into())).await
    }

    /// Sends raw bytes as one binary message; `what` says what they are.
    pub async fn send_bytes(&mut self, bytes: Vec<u8>, what: &str) -> Result<(), Stop> {
        self.transcript
            .push(&self.name, "sent", what.to_owned(), &bytes);
        self.write(Message::Binary(bytes.into())).await
    }

    /// Sends a text message.
    pub async fn send_text(&mut self, text: &str) -> Result<(), Stop> {
        self.transcript.push(
            &self.name,
            "sent",
            format!("text message {text:?}"),
            text.as_bytes(),
        );
        self.write(Message::Text(text.into())).await
    }

    async fn write(&mut self, message: Message) -> Result<(), Stop> {
        // The server may already have closed; what it did shows in the next read.
        let _ = self.ws.send(message).await;
        Ok(())
    }

    /// The next frame or close, waiting at most `wait`.
    pub async fn next(&mut self, wait: Duration) -> Observed {
        loop {
            let message = match tokio::time::timeout(wait, self.ws.next()).await {
                Err(_) => return Observed::Silence,
                Ok(message) => message,
            };
            match message {
                Some(Ok(Message::Binary(bytes))) => {
                    self.largest_received = self.largest_received.max(bytes.len());
                    match ServerFrame::decode(&bytes, &self.limits) {
                        Ok(frame) => {
                            self.transcript.push(
                                &self.name,
                                "received",
                                format!("{frame:?}"),
                                &bytes,
                            );
                            return Observed::Frame(frame);
                        }
                        Err(e) => {
                            self.transcript.push(
                                &self.name,
                                "received",
                                format!("undecodable frame: {e}"),
                                &bytes,
                            );
                            return Observed::Undecodable(e.to_string());
                        }
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map(|f| u16::from(f.code));
                    self.transcript
                        .push(&self.name, "received", format!("close {code:?}"), &[]);
                    return Observed::Closed(code);
                }
                Some(Ok(Message::Text(t))) => {
                    self.transcript.push(
                        &self.name,
                        "received",
                        "text message (not allowed, REQ-4.1-1)".into(),
                        t.as_bytes(),
                    );
                    return Observed::Closed(None);
                }
                Some(Ok(_)) => continue, // ping, pong
                Some(Err(_)) | None => {
                    self.transcript
                        .push(&self.name, "received", "connection closed".into(), &[]);
                    return Observed::Closed(None);
                }
            }
        }
    }

    /// The next frame that `pick` accepts (heartbeat acks are skipped); a failure naming
    /// `expected` if anything else comes first or nothing comes in time.
    pub async fn expect<T>(
        &mut self,
        expected: &str,
        mut pick: impl FnMut(&ServerFrame) -> Option<T>,
    ) -> Result<T, Stop> {
        loop {
            match self.next(ANSWER_WAIT).await {
                Observed::Frame(f) => match pick(&f) {
                    Some(v) => return Ok(v),
                    None if matches!(f, ServerFrame::HeartbeatAck(_)) => continue,
                    None => {
                        return Err(Failure::new(expected, Observed::Frame(f).to_string()).into());
                    }
                },
                other => return Err(Failure::new(expected, other.to_string()).into()),
            }
        }
    }

    /// The next frame must be an `Error` with `code` (and `rid`, when given).
    pub async fn expect_error(
        &mut self,
        code: confab_spec::ErrorCode,
        rid: Option<u64>,
    ) -> Result<ErrorFrame, Stop> {
        let expected = match rid {
            Some(rid) => format!("Error {} {} for rid {rid}", code.value(), code.name()),
            None => format!("Error {} {}", code.value(), code.name()),
        };
        self.expect(&expected, |f| match f {
            ServerFrame::Error(e) if e.code == code && (rid.is_none() || e.rid == rid) => {
                Some(e.clone())
            }
            _ => None,
        })
        .await
    }

    /// The server must close the connection with `code` (frames before the close are
    /// allowed, as long as they are `Error` frames).
    pub async fn expect_close(&mut self, code: u16) -> Result<(), Stop> {
        let expected = format!("close {code}");
        loop {
            match self.next(ANSWER_WAIT).await {
                Observed::Closed(Some(c)) if c == code => return Ok(()),
                Observed::Frame(ServerFrame::Error(_) | ServerFrame::HeartbeatAck(_)) => {}
                other => return Err(Failure::new(expected, other.to_string()).into()),
            }
        }
    }

    /// Nothing but heartbeat acks may arrive for [`SILENCE_WAIT`].
    pub async fn expect_silence(&mut self, expected: &str) -> Result<(), Stop> {
        loop {
            match self.next(SILENCE_WAIT).await {
                Observed::Silence => return Ok(()),
                Observed::Frame(ServerFrame::HeartbeatAck(_)) => {}
                other => return Err(Failure::new(expected, other.to_string()).into()),
            }
        }
    }

    /// The size of the largest message received so far, in bytes.
    pub fn largest_received(&self) -> usize {
        self.largest_received
    }

    /// Sends `Hello` with `versions` and an optional resume token.
    pub async fn hello(
        &mut self,
        versions: Vec<u64>,
        resume_token: Option<ResumeToken>,
    ) -> Result<(), Stop> {
        let versions = Versions::new(versions)
            .map_err(|_| Stop::Skipped("the suite built an invalid Hello".into()))?;
        self.send(&ClientFrame::Hello(Hello {
            versions,
            resume_token,
        }))
        .await
    }

    /// Sends `Hello` for version 1 without a token; the `Challenge` that must answer it.
    pub async fn challenge(&mut self) -> Result<Challenge, Stop> {
        self.hello(vec![1], None).await?;
        self.expect("Challenge", |f| match f {
            ServerFrame::Challenge(c) => Some(c.clone()),
            _ => None,
        })
        .await
    }

    /// Hello, Challenge, Auth (with a certificate valid around the server's clock), Ready.
    pub async fn authenticate(&mut self, cx: &Ctx, device: &Device) -> Result<Ready, Stop> {
        Ok(self.authenticate_with(cx, device).await?.0)
    }

    /// [`Peer::authenticate`], also giving the `Auth` frame it sent.
    pub async fn authenticate_with(
        &mut self,
        cx: &Ctx,
        device: &Device,
    ) -> Result<(Ready, Auth), Stop> {
        let challenge = self.challenge().await?;
        let now = challenge.server_time_ms;
        let auth = device.auth(device.certificate(now), &cx.origin, challenge.nonce, now);
        self.send(&ClientFrame::Auth(auth.clone())).await?;
        let ready = self
            .expect("Ready", |f| match f {
                ServerFrame::Ready(r) => Some(r.clone()),
                _ => None,
            })
            .await?;
        self.authenticated = Some((device.clone(), now));
        Ok((ready, auth))
    }
}
