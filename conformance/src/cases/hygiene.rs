//! SPEC.md 11, connection hygiene: what a connection that never completes its request, or
//! one too many from one address, may hold. The cases work below HTTP, on bare TCP
//! connections: a half-sent request header (a "slowloris") must be cut within
//! `http_request_timeout_ms`, and a connection beyond `connections_per_ip_max` must be
//! closed as it is accepted, before the server reads anything.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::case;
use crate::case::{Case, CaseResult, Failure, Stop};
use crate::context::Ctx;

/// The cases of SPEC.md 11's connection limits.
pub fn cases() -> Vec<Case> {
    vec![
        case!(
            "11-3.slow-request-cut",
            "REQ-11-3",
            Must,
            "a connection that sends half a request header is closed within http_request_timeout_ms",
            slow_request_cut
        ),
        case!(
            "11-3.connections-per-ip",
            "REQ-11-3",
            Must,
            "with connections_per_ip_max connections open from one address, one more is closed at once, unread",
            connections_per_ip
        ),
    ]
}

/// The longest deadline the suite waits out.
const TIMEOUT_MAX_MS: u64 = 20_000;
/// The most connections the suite opens at once.
const CONNECTIONS_MAX: u64 = 300;

/// Whether the server closes `stream` within `wait`: it reads to the end (or to a reset).
async fn closed_within(stream: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            // Bytes (an error page, say) before the close are fine; read on.
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

fn tcp_error(e: std::io::Error) -> Stop {
    Stop::Skipped(format!("the suite could not open a TCP connection: {e}"))
}

async fn slow_request_cut(cx: &mut Ctx) -> CaseResult {
    let Some(timeout_ms) = cx.info.limits.http_request_timeout_ms else {
        return Err(Failure::new(
            "limits.http_request_timeout_ms in /v1/info",
            "not announced",
        )
        .into());
    };
    if timeout_ms > TIMEOUT_MAX_MS {
        return Err(Stop::Skipped(format!(
            "http_request_timeout_ms {timeout_ms} is over the suite's {TIMEOUT_MAX_MS}"
        )));
    }
    let mut stream = cx.tcp().await.map_err(tcp_error)?;
    // Half a request: the header never ends (over TLS, a handshake that never starts does
    // the same).
    if !cx.url.starts_with("wss://") {
        let _ = stream
            .write_all(b"GET /v1/ws HTTP/1.1\r\nHost: conformance\r\nUpgrade: websocket\r\n")
            .await;
    }
    let wait = Duration::from_millis(timeout_ms + 3_000);
    if closed_within(&mut stream, wait).await {
        Ok(())
    } else {
        Err(Failure::new(
            format!("the connection closed within {timeout_ms} ms and 3 s of slack"),
            format!("still open after {} ms", wait.as_millis()),
        )
        .into())
    }
}

async fn connections_per_ip(cx: &mut Ctx) -> CaseResult {
    let (Some(per_ip), Some(timeout_ms)) = (
        cx.info.limits.connections_per_ip_max,
        cx.info.limits.http_request_timeout_ms,
    ) else {
        return Err(Failure::new(
            "limits.connections_per_ip_max and limits.http_request_timeout_ms in /v1/info",
            "not announced",
        )
        .into());
    };
    if per_ip > CONNECTIONS_MAX {
        return Err(Stop::Skipped(format!(
            "connections_per_ip_max {per_ip} is over the suite's {CONNECTIONS_MAX}"
        )));
    }
    let started = tokio::time::Instant::now();
    let mut held = Vec::new();
    for _ in 0..per_ip {
        held.push(cx.tcp().await.map_err(tcp_error)?);
    }
    let mut extra = cx.tcp().await.map_err(tcp_error)?;
    // Closed as it is accepted: well before the request deadline would close it anyway.
    let elapsed = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let left = timeout_ms.saturating_sub(elapsed);
    if left < 500 {
        return Err(Stop::Skipped(format!(
            "opening {per_ip} connections took {elapsed} ms of the {timeout_ms} ms request deadline"
        )));
    }
    let wait = Duration::from_millis((left / 2).min(2_000));
    let closed = closed_within(&mut extra, wait).await;
    drop(held);
    if closed {
        Ok(())
    } else {
        Err(Failure::new(
            format!("connection {} from this address closed at once", per_ip + 1),
            format!("still open after {} ms", wait.as_millis()),
        )
        .into())
    }
}
