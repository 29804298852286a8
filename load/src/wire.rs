//! Connections to the server under load: loopback TCP from one of many source addresses,
//! a WebSocket with small buffers, and the Confab handshake (SPEC.md 5.2–5.5).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use confab_spec::cbor::DecodeLimits;
use confab_spec::frame::{ClientFrame, Hello, Ready, ServerFrame, Versions};
use confab_spec::identity::{DeviceCertificate, DeviceKeyPair, SystemKeyPair, sign_auth};
use confab_spec::ids::{ConversationId, ProcessId, UnixMs};
use futures_util::{SinkExt, StreamExt};
use rand_core::RngCore;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// A WebSocket over plain TCP.
pub type Ws = WebSocketStream<TcpStream>;

/// How long any single answer may take before the run gives up.
pub const ANSWER_WAIT: Duration = Duration::from_secs(30);

/// A failure of the load run (not a measurement).
#[derive(Debug)]
pub struct LoadError(pub String);

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LoadError {}

/// `Err(LoadError)` from anything displayable, with what was being done.
pub fn fail<T>(what: &str, e: impl std::fmt::Display) -> Result<T, LoadError> {
    Err(LoadError(format!("{what}: {e}")))
}

/// A WebSocket endpoint on this machine.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The server's socket address (a loopback address).
    pub addr: SocketAddr,
    /// The path, `/v1/ws` for a gateway.
    pub path: String,
}

impl Endpoint {
    /// Parses `ws://IP:PORT/PATH`. Only loopback addresses are accepted: this tool sends
    /// floods and must never be pointed at someone else's server.
    pub fn parse(url: &str) -> Result<Self, LoadError> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| LoadError(format!("{url}: only ws:// URLs are supported")))?;
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        let addr: SocketAddr = host.parse().map_err(|_| {
            LoadError(format!(
                "{url}: the host must be an IP address and port, for example 127.0.0.1:8080"
            ))
        })?;
        if !addr.ip().is_loopback() {
            return Err(LoadError(format!(
                "{url}: confab-load targets loopback addresses only"
            )));
        }
        Ok(Self { addr, path })
    }

    /// The URL.
    pub fn url(&self) -> String {
        format!("ws://{}{}", self.addr, self.path)
    }

    /// The origin a device signs (SPEC.md 5.3): scheme, host and port.
    pub fn origin(&self) -> String {
        format!("ws://{}", self.addr)
    }
}

/// The `i`th source address: 127.0.0.2 to 127.0.0.50 in turn, so that tens of thousands
/// of connections do not exhaust one address's ephemeral ports.
pub fn source(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % 49) as u8))
}

/// The WebSocket settings of every load connection: a 4 KiB read buffer, as the gateway
/// uses, so that 19,000 connections fit in the load process too.
fn socket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4_096)
        .write_buffer_size(0)
}

/// Opens a WebSocket to `endpoint` from source address `from`.
pub async fn open(endpoint: &Endpoint, from: IpAddr) -> Result<Ws, LoadError> {
    let attempt = async {
        let socket = TcpSocket::new_v4().or_else(|e| fail("a socket", e))?;
        socket
            .bind(SocketAddr::new(from, 0))
            .or_else(|e| fail(&format!("binding {from}"), e))?;
        let stream = socket
            .connect(endpoint.addr)
            .await
            .or_else(|e| fail(&format!("connecting to {}", endpoint.addr), e))?;
        stream
            .set_nodelay(true)
            .or_else(|e| fail("TCP_NODELAY", e))?;
        let (ws, _) = tokio_tungstenite::client_async_with_config(
            endpoint.url(),
            stream,
            Some(socket_config()),
        )
        .await
        .or_else(|e| fail("the WebSocket upgrade", e))?;
        Ok(ws)
    };
    tokio::time::timeout(ANSWER_WAIT, attempt)
        .await
        .unwrap_or_else(|_| fail("connecting", "no answer within 30 s"))
}

/// A load device: a fresh user (system) with one device.
pub struct Identity {
    system: SystemKeyPair,
    /// The device key.
    pub key: DeviceKeyPair,
    process: ProcessId,
}

impl Identity {
    /// A new user and device from the operating system's randomness.
    pub fn fresh() -> Self {
        let mut process = [0u8; 16];
        rand_core::OsRng.fill_bytes(&mut process);
        Self {
            system: SystemKeyPair::generate(&mut rand_core::OsRng),
            key: DeviceKeyPair::generate(&mut rand_core::OsRng),
            process: ProcessId(process),
        }
    }

    /// The user's system key.
    pub fn system_key(&self) -> confab_spec::ids::SystemKey {
        self.system.public()
    }

    /// A certificate valid from an hour before `now` for a day.
    pub fn certificate(&self, now: UnixMs) -> DeviceCertificate {
        self.system.issue_certificate(
            self.process,
            self.key.public(),
            UnixMs(now.0.saturating_sub(3_600_000)),
            now.plus_ms(86_400_000),
        )
    }
}

/// A fresh random conversation id.
pub fn random_conversation() -> ConversationId {
    let mut id = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut id);
    ConversationId(id)
}

/// Sends one frame.
pub async fn send(ws: &mut Ws, frame: &ClientFrame) -> Result<(), LoadError> {
    ws.send(Message::Binary(frame.encode().into()))
        .await
        .or_else(|e| fail("sending", e))
}

/// The next frame from the server, within [`ANSWER_WAIT`].
pub async fn next(ws: &mut Ws) -> Result<ServerFrame, LoadError> {
    let deadline = Instant::now() + ANSWER_WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = match tokio::time::timeout(left, ws.next()).await {
            Err(_) => return fail("waiting for the server", "no frame within 30 s"),
            Ok(None) => return fail("reading", "the server closed the connection"),
            Ok(Some(Err(e))) => return fail("reading", e),
            Ok(Some(Ok(message))) => message,
        };
        match message {
            Message::Binary(bytes) => {
                return ServerFrame::decode(&bytes, &DecodeLimits::default())
                    .or_else(|e| fail("decoding a server frame", e));
            }
            Message::Close(frame) => {
                let code = frame.map_or(0, |f| u16::from(f.code));
                return fail("reading", format!("the server closed with {code}"));
            }
            _ => {}
        }
    }
}

/// Waits for the first frame `pick` takes (`Ok(Some)`); it skips others (`Ok(None)`)
/// and refuses the unexpected (`Err`), which ends the wait with an error.
pub async fn expect<T>(
    ws: &mut Ws,
    what: &str,
    mut pick: impl FnMut(ServerFrame) -> Result<Option<T>, Box<ServerFrame>>,
) -> Result<T, LoadError> {
    loop {
        match pick(next(ws).await?) {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(frame) => match *frame {
                ServerFrame::Error(e) => {
                    return fail(
                        &format!("waiting for {what}"),
                        format!("Error {} {}", e.code.value(), e.code.name()),
                    );
                }
                other => return fail(&format!("waiting for {what}"), other.name()),
            },
        }
    }
}

/// Hello, Challenge, Auth, Ready: an authenticated session for `identity`.
pub async fn authenticate(
    ws: &mut Ws,
    endpoint: &Endpoint,
    identity: &Identity,
) -> Result<Ready, LoadError> {
    let versions = Versions::new(vec![1]).or_else(|e| fail("Hello", e))?;
    send(
        ws,
        &ClientFrame::Hello(Hello {
            versions,
            resume_token: None,
        }),
    )
    .await?;
    let challenge = expect(ws, "Challenge", |f| match f {
        ServerFrame::Challenge(c) => Ok(Some(c)),
        other => Err(Box::new(other)),
    })
    .await?;
    let now = challenge.server_time_ms;
    let auth = sign_auth(
        &identity.key,
        identity.certificate(now),
        1,
        &endpoint.origin(),
        challenge.nonce,
        now,
    );
    send(ws, &ClientFrame::Auth(auth)).await?;
    expect(ws, "Ready", |f| match f {
        ServerFrame::Ready(r) => Ok(Some(r)),
        other => Err(Box::new(other)),
    })
    .await
}

/// Nanoseconds since the first call in this process: the clock of every latency figure.
pub fn now_ns() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// An application message as the gateway sees it (SPEC.md 7.2): a syntactically valid
/// MLS PrivateMessage for `conversation` at `epoch`, whose ciphertext is filler carrying
/// `sent_ns` and a sender number, `size` bytes in all. The gateway never decrypts
/// (REQ-7.2-2), so real encryption would only spend the load machine's CPU.
pub fn application_message(
    conversation: &ConversationId,
    epoch: u64,
    size: usize,
    sender: u32,
    sent_ns: u64,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(size.max(64));
    m.extend_from_slice(&[0, 1, 0, 2]); // mls10, PrivateMessage
    m.push(32); // group_id<V>
    m.extend_from_slice(conversation.as_bytes());
    m.extend_from_slice(&epoch.to_be_bytes());
    m.push(1); // content_type application
    m.push(0); // authenticated_data<V>, empty
    m.push(0); // encrypted_sender_data<V>, empty
    let header = m.len() + 2;
    let body = size.saturating_sub(header).clamp(12, 16_383);
    m.push(0x40 | (body >> 8) as u8); // ciphertext<V>, two-byte length
    m.push(body as u8);
    m.extend_from_slice(&sent_ns.to_be_bytes());
    m.extend_from_slice(&sender.to_be_bytes());
    m.resize(m.len() + body - 12, 0xA5);
    m
}

/// The send time and sender number carried by a message of [`application_message`].
pub fn stamp_of(message: &[u8]) -> Option<(u64, u32)> {
    let at = 4 + 1 + 32 + 8 + 1 + 1 + 1 + 2;
    let sent = message.get(at..at + 8)?;
    let sender = message.get(at + 8..at + 12)?;
    Some((
        u64::from_be_bytes(sent.try_into().ok()?),
        u32::from_be_bytes(sender.try_into().ok()?),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use confab_spec::mls_framing::{ContentType, Peek, WireFormat, peek};

    #[test]
    fn application_messages_parse_as_the_gateway_reads_them() {
        let conversation = ConversationId([9; 32]);
        for size in [0, 40, 100, 1_000, 20_000] {
            let m = application_message(&conversation, 3, size, 77, 5);
            let Ok(Peek::Framed(f)) = peek(&m) else {
                panic!("size {size}: not a framed message");
            };
            assert_eq!(f.wire_format, WireFormat::PrivateMessage);
            assert_eq!(f.group_id, conversation.as_bytes().to_vec());
            assert_eq!(f.epoch, 3);
            assert_eq!(f.content_type, ContentType::Application);
            assert_eq!(stamp_of(&m), Some((5, 77)));
            if (70..16_000).contains(&size) {
                assert_eq!(m.len(), size);
            }
        }
    }

    #[test]
    fn only_loopback_endpoints_are_accepted() {
        assert!(Endpoint::parse("ws://127.0.0.1:8080/v1/ws").is_ok());
        assert!(Endpoint::parse("ws://10.0.0.1:8080/v1/ws").is_err());
        assert!(Endpoint::parse("wss://127.0.0.1:8080/v1/ws").is_err());
        assert!(Endpoint::parse("ws://example.org:80/v1/ws").is_err());
    }
}
