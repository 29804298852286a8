//! The `confab-gateway` binary's own settings, on real sockets: `/metrics` moves to
//! `metrics_listen` when it is set (SPEC.md 13.1: metrics are for operators, on a private
//! address), and the public listener no longer serves it.

mod support;

use std::io::{Read, Write};
use std::time::Duration;

/// The status line and body of `GET path` on `port`, or `None` if nothing answers.
fn get(port: u16, path: &str) -> Option<(String, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_owned(), body.to_owned()))
}

#[test]
fn metrics_listen_takes_metrics_off_the_public_listener() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, metrics_port) = (support::free_port(), support::free_port());
    let mut gateway = std::process::Command::new(env!("CARGO_BIN_EXE_confab-gateway"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            &format!("127.0.0.1:{metrics_port}"),
            "--db",
        ])
        .arg(dir.path().join("gw.db"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let public = loop {
        if let Some(answer) = get(port, "/metrics") {
            break answer;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // One WebSocket connection, so that the gateway has recorded a metric.
    let mut ws = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        ws,
        "GET /v1/ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .expect("upgrade");
    let mut answer = [0u8; 12];
    ws.read_exact(&mut answer).expect("the upgrade's answer");
    assert_eq!(&answer, b"HTTP/1.1 101");
    let private = get(metrics_port, "/metrics");
    drop(ws);
    let _ = gateway.kill();
    let _ = gateway.wait();
    assert!(public.0.contains(" 404"), "public /metrics: {}", public.0);
    let (status, body) = private.expect("the metrics address answers");
    assert!(status.contains(" 200"), "private /metrics: {status}");
    assert!(body.contains("confab_"), "the gateway's metrics are there");
}
