//! The gateway over real WebSockets on loopback: health and info endpoints, the handshake,
//! a heartbeat, a text message closing with 4100, a newer session of the same device
//! superseding the older one with 4104, and shutdown closing sessions with 4000.

mod support;

use confab_gateway::handler::GatewayConfig;
use confab_gateway::server;
use confab_gateway::store::sqlite::SqliteStore;
use confab_spec::frame::*;
use confab_spec::identity::{DeviceKeyPair, SystemKeyPair};
use confab_spec::{DecodeLimits, ServerFrame};
use futures_util::{SinkExt, StreamExt};
use support::{Ws, authenticate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

async fn next_frame(
    ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> Message {
    tokio::time::timeout(std::time::Duration::from_secs(5), ws.next())
        .await
        .expect("timely")
        .expect("open")
        .expect("ok")
}

/// Connects and authenticates the device `key` of `system`; returns the socket and Ready.
async fn handshake(origin: &str, system: &SystemKeyPair, key: &DeviceKeyPair) -> (Ws, Ready) {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{origin}/v1/ws"))
        .await
        .expect("ws");
    let ready = authenticate(&mut ws, origin, system, key)
        .await
        .expect("handshake");
    (ws, ready)
}

#[tokio::test]
async fn handshake_heartbeat_and_close_codes_over_websockets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("gw.db")).expect("store");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let origin = format!("ws://{addr}");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::serve(
        listener,
        GatewayConfig::new(origin.clone()),
        store,
        None,
        async {
            let _ = stop_rx.await;
        },
    ));

    assert!(http_get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
    let info = http_get(addr, "/v1/info").await;
    assert!(
        info.contains("\"frame_bytes_max\":1048576") && info.contains(&origin),
        "{info}"
    );

    // Handshake.
    let system = SystemKeyPair::from_seed(&[1; 32]);
    let key = DeviceKeyPair::from_seed(&[2; 32]);
    let (mut ws, ready) = handshake(&origin, &system, &key).await;
    assert_eq!(ready.device.system, system.public());

    // Heartbeat.
    ws.send(Message::Binary(
        ClientFrame::Heartbeat(Heartbeat { nonce: 77 })
            .encode()
            .into(),
    ))
    .await
    .expect("hb");
    let Message::Binary(b) = next_frame(&mut ws).await else {
        panic!("binary expected")
    };
    assert_eq!(
        ServerFrame::decode(&b, &DecodeLimits::default()),
        Ok(ServerFrame::HeartbeatAck(HeartbeatAck { nonce: 77 }))
    );

    // A text message is a protocol error: close 4100.
    let (mut ws2, _) = tokio_tungstenite::connect_async(format!("{origin}/v1/ws"))
        .await
        .expect("ws2");
    ws2.send(Message::Text("hello".into())).await.expect("text");
    match next_frame(&mut ws2).await {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 4100),
        other => panic!("expected close 4100, got {other:?}"),
    }

    // A newer session of the same device supersedes this one: 4104.
    let (mut ws, _) = {
        let newer = handshake(&origin, &system, &key).await;
        match next_frame(&mut ws).await {
            Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 4104),
            other => panic!("expected close 4104, got {other:?}"),
        }
        newer
    };

    // Shutdown closes the live session with 4000 (reconnect).
    let _ = stop_tx.send(());
    match next_frame(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 4000),
        other => panic!("expected close 4000, got {other:?}"),
    }
    drop(ws);
    tokio::time::timeout(std::time::Duration::from_secs(5), server)
        .await
        .expect("server stops")
        .expect("join")
        .expect("serve");
}
