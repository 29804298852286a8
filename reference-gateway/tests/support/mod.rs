//! Client-side helpers shared by the gateway's tests: signing an `Auth` and the WebSocket
//! handshake.

#![allow(dead_code)]

use std::time::Duration;

use confab_spec::frame::{Auth, ClientFrame, Hello, Ready, Versions};
use confab_spec::identity::{DeviceCertificate, DeviceKeyPair, SystemKeyPair};
use confab_spec::ids::{Nonce, ProcessId, UnixMs};
use confab_spec::{DecodeLimits, ServerFrame};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// A client WebSocket.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// An `Auth` for `certificate`, signed by `key` over the transcript of SPEC.md 5.3.
pub fn sign_auth(
    certificate: DeviceCertificate,
    key: &DeviceKeyPair,
    origin: &str,
    nonce: Nonce,
    time_ms: UnixMs,
) -> Auth {
    confab_spec::identity::sign_auth(key, certificate, 1, origin, nonce, time_ms)
}

/// The next binary frame, decoded; `None` on anything else or after 5 s.
pub async fn recv(ws: &mut Ws) -> Option<ServerFrame> {
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Binary(b)))) => ServerFrame::decode(&b, &DecodeLimits::default()).ok(),
        _ => None,
    }
}

/// Hello, Challenge, Auth, Ready for device `key` (process 3) of `system`, with a
/// certificate valid around the gateway's clock. `None` if any step fails.
pub async fn authenticate(
    ws: &mut Ws,
    origin: &str,
    system: &SystemKeyPair,
    key: &DeviceKeyPair,
) -> Option<Ready> {
    authenticate_process(ws, origin, system, key, ProcessId([3; 16])).await
}

/// [`authenticate`] for the device `process` of `system`.
pub async fn authenticate_process(
    ws: &mut Ws,
    origin: &str,
    system: &SystemKeyPair,
    key: &DeviceKeyPair,
    process: ProcessId,
) -> Option<Ready> {
    let hello = ClientFrame::Hello(Hello {
        versions: Versions::current(),
        resume_token: None,
    });
    ws.send(Message::Binary(hello.encode().into())).await.ok()?;
    let Some(ServerFrame::Challenge(ch)) = recv(ws).await else {
        return None;
    };
    let now = ch.server_time_ms;
    let certificate = system.issue_certificate(
        process,
        key.public(),
        UnixMs(now.0 - 60_000),
        now.plus_ms(3_600_000),
    );
    let auth = sign_auth(certificate, key, origin, ch.nonce, now);
    ws.send(Message::Binary(ClientFrame::Auth(auth).encode().into()))
        .await
        .ok()?;
    match recv(ws).await {
        Some(ServerFrame::Ready(ready)) => Some(ready),
        _ => None,
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

/// Starts the real `confab-gateway` binary on `port` with the database `db`.
pub fn start_gateway(db: &std::path::Path, port: u16) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_confab-gateway"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--db"])
        .arg(db)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn confab-gateway")
}

/// A PrivateMessage header for `conversation` at epoch 0, with `body` (under 256 bytes) as
/// ciphertext. The gateway reads only the framing (SPEC.md 7.2).
pub fn private_message(
    conversation: confab_spec::ids::ConversationId,
    body: &[u8],
) -> confab_spec::ids::MlsBytes {
    let mut m = vec![0, 1, 0, 2, 32];
    m.extend_from_slice(&conversation.0);
    m.extend_from_slice(&0u64.to_be_bytes());
    m.push(1);
    m.extend_from_slice(&[0, 0, body.len() as u8]);
    m.extend_from_slice(body);
    confab_spec::ids::MlsBytes::new(m).expect("bytes")
}

/// A `CreateConversation` of a room `conversation` by the device `process` of `system`
/// (device key `key`), for tests that send only application messages: the GroupInfo of a
/// new group made by a throwaway mls-rs engine, its certificate valid around `now`
/// (SPEC.md 6.1).
pub fn create_room(
    system: &SystemKeyPair,
    key: &DeviceKeyPair,
    process: ProcessId,
    conversation: confab_spec::ids::ConversationId,
    rid: u64,
    now: UnixMs,
) -> ClientFrame {
    let dir = tempfile::tempdir().expect("tempdir");
    let credentials = confab_spec::session::DeviceCredentials {
        certificate: system.issue_certificate(
            process,
            key.public(),
            UnixMs(now.0.saturating_sub(3_600_000)),
            now.plus_ms(86_400_000),
        ),
        key: key.clone(),
    };
    let mut engine = confab_client::mls::open_engine(
        confab_client::mls::EngineKind::MlsRs,
        &dir.path().join("creator.db"),
        credentials,
        confab_client::mls::system_clock(),
    )
    .expect("engine");
    let roles = confab_spec::rooms::RoomRoles::new(system.public());
    let group_info = engine
        .create_group_with(&conversation, &roles.context_extensions())
        .expect("group");
    ClientFrame::CreateConversation(confab_spec::frame::CreateConversation {
        rid,
        conversation,
        kind: confab_spec::frame::ConversationKind::Room,
        group_info: confab_spec::ids::MlsBytes::new(group_info).expect("bytes"),
    })
}
