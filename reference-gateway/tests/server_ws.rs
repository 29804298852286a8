//! The gateway over real WebSockets on loopback: health and info endpoints, the handshake,
//! a heartbeat, a text message closing with 4100, a newer session of the same device
//! superseding the older one with 4104, shutdown closing sessions with 4000, a revocation
//! closing the revoked device's session with 4105, a slow consumer closed with 4002 while
//! the gateway keeps serving, the per-address connect limit, and `/metrics`.

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
    let Running {
        addr,
        origin,
        stop: stop_tx,
        server,
        _dir,
    } = start(|_| {}).await;

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

static METRICS: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
    std::sync::OnceLock::new();

/// The process-wide Prometheus recorder (the `metrics` facade has one per process).
fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    METRICS
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .expect("recorder")
        })
        .clone()
}

struct Running {
    addr: std::net::SocketAddr,
    origin: String,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

async fn start(edit: impl FnOnce(&mut GatewayConfig)) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("gw.db")).expect("store");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let origin = format!("ws://{addr}");
    let mut config = GatewayConfig::new(origin.clone());
    edit(&mut config);
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::serve(
        listener,
        config,
        store,
        server::Environment {
            metrics: Some(metrics_handle()),
            ..server::Environment::default()
        },
        async {
            let _ = stop_rx.await;
        },
    ));
    Running {
        addr,
        origin,
        stop,
        server,
        _dir: dir,
    }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(std::time::Duration::from_secs(10), self.server)
            .await
            .expect("server stops")
            .expect("join")
            .expect("serve");
    }
}

async fn send_frame(ws: &mut Ws, frame: ClientFrame) {
    ws.send(Message::Binary(frame.encode().into()))
        .await
        .expect("send");
}

#[tokio::test]
async fn a_revocation_closes_the_revoked_devices_session_with_4105() {
    use confab_spec::ids::{ProcessId, UnixMs};
    let gw = start(|_| {}).await;
    let system = SystemKeyPair::from_seed(&[5; 32]);
    let connect = |process: u8| {
        let origin = gw.origin.clone();
        let system = SystemKeyPair::from_seed(&system.seed());
        async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(format!("{origin}/v1/ws"))
                .await
                .expect("ws");
            let key = DeviceKeyPair::from_seed(&[process; 32]);
            support::authenticate_process(
                &mut ws,
                &origin,
                &system,
                &key,
                ProcessId([process; 16]),
            )
            .await
            .expect("handshake");
            ws
        }
    };
    let mut laptop = connect(1).await;
    let mut phone = connect(2).await;
    let now = UnixMs(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64,
    );
    send_frame(
        &mut laptop,
        ClientFrame::RevokeDevice(RevokeDevice {
            rid: 3,
            revocation: system.revoke(ProcessId([2; 16]), now),
        }),
    )
    .await;
    assert_eq!(
        support::recv(&mut laptop).await,
        Some(ServerFrame::Ok(OkFrame { rid: 3 }))
    );
    // Within one second (REQ-3.3-3): the cause, then 4105.
    let within = std::time::Duration::from_secs(1);
    let cause = tokio::time::timeout(within, phone.next())
        .await
        .expect("in time");
    match cause {
        Some(Ok(Message::Binary(b))) => assert!(matches!(
            ServerFrame::decode(&b, &DecodeLimits::default()),
            Ok(ServerFrame::Error(e)) if e.code == confab_spec::error::ErrorCode::AuthCertificateRevoked
        )),
        other => panic!("expected the cause, got {other:?}"),
    }
    match tokio::time::timeout(within, phone.next())
        .await
        .expect("in time")
    {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 4105),
        other => panic!("expected close 4105, got {other:?}"),
    }
    // The laptop's session is untouched.
    send_frame(&mut laptop, ClientFrame::Heartbeat(Heartbeat { nonce: 1 })).await;
    assert_eq!(
        support::recv(&mut laptop).await,
        Some(ServerFrame::HeartbeatAck(HeartbeatAck { nonce: 1 }))
    );
    drop((laptop, phone));
    gw.stop().await;
}

#[tokio::test]
async fn a_slow_consumer_is_closed_with_4002_and_the_gateway_keeps_serving() {
    use confab_client::mls::{EngineKind, open_engine, system_clock};
    use confab_spec::ids::{ConversationId, MlsBytes, MsgId, ProcessId, StreamId, UnixMs};
    use confab_spec::session::DeviceCredentials;
    const QUEUE: usize = 4;
    let gw = start(|c| c.outbound_queue_max = QUEUE).await;
    let system = SystemKeyPair::from_seed(&[6; 32]);
    let key = DeviceKeyPair::from_seed(&[7; 32]);
    let (mut ws, _) = handshake(&gw.origin, &system, &key).await;
    let conv = ConversationId([0x51; 32]);
    let dir = tempfile::tempdir().expect("tempdir");
    let now = system_clock()();
    let credentials = DeviceCredentials {
        certificate: system.issue_certificate(
            ProcessId([3; 16]),
            key.public(),
            UnixMs(now.0 - 60_000),
            now.plus_ms(3_600_000),
        ),
        key: key.clone(),
    };
    let mut engine = open_engine(
        EngineKind::OpenMls,
        &dir.path().join("c.db"),
        credentials,
        system_clock(),
    )
    .expect("engine");
    let roles = confab_spec::rooms::RoomRoles::new(system.public());
    let group_info = engine
        .create_group_with(&conv, &roles.context_extensions())
        .expect("group");
    send_frame(
        &mut ws,
        ClientFrame::CreateConversation(CreateConversation {
            rid: 1,
            conversation: conv,
            kind: ConversationKind::Room,
            group_info: MlsBytes::new(group_info).expect("bytes"),
        }),
    )
    .await;
    assert!(matches!(
        support::recv(&mut ws).await,
        Some(ServerFrame::Created(_))
    ));
    send_frame(
        &mut ws,
        ClientFrame::Subscribe(Subscribe {
            rid: 2,
            stream: StreamId::Conversation(conv),
            from_seq: None,
        }),
    )
    .await;
    assert!(matches!(
        support::recv(&mut ws).await,
        Some(ServerFrame::Subscribed(_))
    ));
    assert!(matches!(
        support::recv(&mut ws).await,
        Some(ServerFrame::Batch(_))
    ));

    // Large application messages, each echoed back live: far more than the socket buffers
    // and the queue hold while the client does not read.
    let payloads: Vec<Vec<u8>> = (0..80u8)
        .map(|i| {
            engine
                .encrypt(&conv, &vec![i; 512 * 1024])
                .expect("encrypt")
        })
        .collect();
    let (mut sink, mut stream) = ws.split();
    let sender = tokio::spawn(async move {
        for (i, payload) in payloads.into_iter().enumerate() {
            let frame = ClientFrame::Send(Send {
                rid: 10 + i as u64,
                conversation: conv,
                msg_id: MsgId([i as u8; 16]),
                payload: MlsBytes::new(payload).expect("bytes"),
                welcome: None,
                group_info: None,
            });
            if sink
                .send(Message::Binary(frame.encode().into()))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Now read: what was flushed before the overflow, then the close.
    let mut frames = 0usize;
    let code = loop {
        match tokio::time::timeout(std::time::Duration::from_secs(5), stream.next()).await {
            Ok(Some(Ok(Message::Binary(_)))) => frames += 1,
            Ok(Some(Ok(Message::Close(Some(frame))))) => break Some(u16::from(frame.code)),
            Ok(Some(Ok(_))) => {}
            other => panic!("expected a close frame, got {other:?} after {frames} frames"),
        }
    };
    assert_eq!(code, Some(4002), "after {frames} frames");
    assert!(
        frames < 160,
        "the connection was closed before every frame was queued"
    );
    sender.abort();

    // The gateway still serves: a new session of the same device resumes by replay and
    // finds every accepted entry, gap-free.
    let (mut ws, _) = handshake(&gw.origin, &system, &key).await;
    send_frame(
        &mut ws,
        ClientFrame::Subscribe(Subscribe {
            rid: 3,
            stream: StreamId::Conversation(conv),
            from_seq: None,
        }),
    )
    .await;
    let Some(ServerFrame::Subscribed(sub)) = support::recv(&mut ws).await else {
        panic!("subscribed expected")
    };
    assert!(sub.head_seq >= 1, "some sends were accepted");
    let Some(ServerFrame::Batch(batch)) = support::recv(&mut ws).await else {
        panic!("batch expected")
    };
    let seqs: Vec<u64> = batch.entries.iter().map(|e| e.seq.get()).collect();
    assert_eq!(seqs.first(), Some(&1));
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "gap-free: {seqs:?}"
    );

    let page = http_get(gw.addr, "/metrics").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    for needle in [
        "confab_closes_total{code=\"4002\"}",
        "confab_sessions_total{how=\"auth\"}",
        "confab_appends_total{kind=\"application\"}",
        "confab_replay_batch_entries",
        "confab_connections_open",
    ] {
        assert!(
            page.contains(needle),
            "{needle} missing from /metrics:\n{page}"
        );
    }
    drop(ws);
    gw.stop().await;
}

#[tokio::test]
async fn connects_beyond_the_per_address_limit_get_429_with_retry_after() {
    let gw = start(|c| {
        c.connects_per_ip.per_minute = 1;
        c.connects_per_ip.burst = 2;
    })
    .await;
    let url = format!("{}/v1/ws", gw.origin);
    let first = tokio_tungstenite::connect_async(&url).await.expect("first");
    let second = tokio_tungstenite::connect_async(&url)
        .await
        .expect("second");
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 429);
            let retry: u64 = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .expect("Retry-After");
            assert!((1..=60).contains(&retry), "retry after {retry} s");
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                .into_owned();
            assert!(body.contains("\"code\":900"), "{body}");
        }
        other => panic!("expected 429, got {other:?}"),
    }
    // Plain HTTP endpoints are not counted.
    assert!(
        http_get(gw.addr, "/healthz")
            .await
            .starts_with("HTTP/1.1 200")
    );
    let info = http_get(gw.addr, "/v1/info").await;
    assert!(
        info.contains("\"connects_per_ip\":{\"burst\":2,\"per_minute\":1}"),
        "{info}"
    );
    drop((first, second));
    gw.stop().await;
}
