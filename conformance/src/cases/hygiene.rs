//! SPEC.md 11, what one peer may hold. Connection hygiene works below HTTP, on bare TCP
//! connections: a half-sent request header (a "slowloris") must be cut within
//! `http_request_timeout_ms`, and a connection beyond `connections_per_ip_max` must be
//! closed as it is accepted, before the server reads anything. Storage quotas: a user's
//! bytes per UTC day and a conversation's retained bytes, each refused with
//! `quota_exceeded` exactly when a `Send` would pass it.

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
        case!(
            "11-4.daily-bytes",
            "REQ-11-4",
            Must,
            "a user's Sends are refused with quota_exceeded (310) and retry_after_ms once they would pass bytes_per_user_per_day; a resend of an accepted one is still a duplicate",
            daily_bytes
        ),
        case!(
            "11-4.conversation-bytes",
            "REQ-11-4",
            Must,
            "two members' Sends into one conversation are refused with quota_exceeded (310) once its retained bytes would pass conversation_bytes_max",
            conversation_bytes
        ),
    ]
}

/// The most Sends a quota case makes.
const QUOTA_SENDS_MAX: u64 = 64;

/// Sends application messages of `size` bytes into `conversation` until one is refused,
/// at most `max` of them; the bytes accepted, the first refusal and the msg_id of the
/// first accepted message.
async fn fill(
    peer: &mut crate::context::Peer,
    conversation: confab_spec::ids::ConversationId,
    size: usize,
    max: u64,
    rid: &mut u64,
) -> Result<
    (
        u64,
        Option<confab_spec::frame::ErrorFrame>,
        Option<confab_spec::ids::MsgId>,
    ),
    Stop,
> {
    use crate::cases::log::{application_of_size, random, send_mls};
    let mut accepted = 0u64;
    let mut first = None;
    for _ in 0..max {
        *rid += 1;
        let msg_id = confab_spec::ids::MsgId(random());
        let payload = application_of_size(&conversation, size);
        let bytes = payload.as_bytes().len() as u64;
        match send_mls(peer, *rid, conversation, msg_id, payload, None).await? {
            Ok(_) => {
                accepted += bytes;
                first.get_or_insert(msg_id);
            }
            Err(e) if e.code == confab_spec::ErrorCode::RateLimited => {
                let wait = e.retry_after_ms.unwrap_or(1_000).min(5_000);
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            Err(e) => return Ok((accepted, Some(e), first)),
        }
    }
    Ok((accepted, None, first))
}

async fn daily_bytes(cx: &mut Ctx) -> CaseResult {
    use crate::cases::log::{create_conversation, payload_bytes_max, send_mls};
    let Some(quota) = cx.info.limits.bytes_per_user_per_day else {
        return Err(
            Failure::new("limits.bytes_per_user_per_day in /v1/info", "not announced").into(),
        );
    };
    let size = payload_bytes_max(cx).max(1);
    let sends = quota / size as u64 + 1;
    if sends > QUOTA_SENDS_MAX {
        return Err(Stop::Skipped(format!(
            "reaching bytes_per_user_per_day {quota} takes {sends} Sends of {size} bytes, over the suite's {QUOTA_SENDS_MAX}"
        )));
    }
    let (mut a, _) = cx.ready("a", &crate::context::Device::fresh()).await?;
    let conversation = create_conversation(&mut a, 1).await?;
    let mut rid = 10;
    let (accepted, refusal, first) = fill(&mut a, conversation, size, sends + 1, &mut rid).await?;
    let Some(refusal) = refusal else {
        return Err(Failure::new(
            format!("quota_exceeded once {quota} bytes would be passed"),
            format!("{accepted} bytes accepted, nothing refused"),
        )
        .into());
    };
    if refusal.code != confab_spec::ErrorCode::QuotaExceeded {
        return Err(Failure::new(
            "Error 310 quota_exceeded",
            crate::context::describe_error(&refusal),
        )
        .into());
    }
    if accepted > quota || accepted + size as u64 <= quota {
        return Err(Failure::new(
            format!("the refusal exactly when {size} more bytes would pass {quota}"),
            format!("refused after {accepted} bytes"),
        )
        .into());
    }
    match refusal.retry_after_ms {
        Some(ms) if ms > 0 && ms <= 86_400_000 => {}
        other => {
            return Err(Failure::new(
                "retry_after_ms until the next UTC day (1 ms to 24 h)",
                format!("{other:?}"),
            )
            .into());
        }
    }
    // A resend of an accepted message is answered as a duplicate, quota or not.
    let Some(first) = first else {
        return Ok(());
    };
    rid += 1;
    // The same bytes as the first message (the suite writes them deterministically).
    let resend = crate::cases::log::application_of_size(&conversation, size);
    match send_mls(&mut a, rid, conversation, first, resend, None).await? {
        Ok((_, true)) => Ok(()),
        other => Err(Failure::new(
            "a resend of an accepted message answered Accepted, duplicate, over the quota",
            format!("{other:?}"),
        )
        .into()),
    }
}

async fn conversation_bytes(cx: &mut Ctx) -> CaseResult {
    use crate::cases::log::payload_bytes_max;
    let (Some(cap), Some(daily)) = (
        cx.info.limits.conversation_bytes_max,
        cx.info.limits.bytes_per_user_per_day,
    ) else {
        return Err(Failure::new(
            "limits.conversation_bytes_max and limits.bytes_per_user_per_day in /v1/info",
            "not announced",
        )
        .into());
    };
    let size = payload_bytes_max(cx).max(1) as u64;
    let sends = cap / size + 1;
    if sends > QUOTA_SENDS_MAX {
        return Err(Stop::Skipped(format!(
            "reaching conversation_bytes_max {cap} takes {sends} Sends of {size} bytes, over the suite's {QUOTA_SENDS_MAX}"
        )));
    }
    // Two members, each under its own daily quota, share the conversation's.
    let half = cap.div_ceil(2) / size + 1;
    if half * size + size > daily {
        return Err(Stop::Skipped(format!(
            "two users cannot fill conversation_bytes_max {cap} under bytes_per_user_per_day {daily}"
        )));
    }
    let mut p = crate::cases::groups::Pair::joined(cx).await?;
    let c = p.conversation;
    let mut rid = 100;
    let (by_a, refusal, _) = fill(&mut p.a, c, size as usize, half, &mut rid).await?;
    if let Some(e) = refusal {
        return Err(Failure::new(
            format!("{half} Sends of {size} bytes by A accepted (under both quotas)"),
            crate::context::describe_error(&e),
        )
        .into());
    }
    let (by_b, refusal, _) = fill(&mut p.b, c, size as usize, sends, &mut rid).await?;
    // The Commit that added B is in the log too (a few hundred bytes): the conversation
    // holds a little more than the two members' messages.
    let total = by_a + by_b;
    match refusal {
        Some(e) if e.code == confab_spec::ErrorCode::QuotaExceeded => {
            if total > cap || total + size + 16_384 <= cap {
                return Err(Failure::new(
                    format!("the refusal when {size} more bytes would pass {cap}"),
                    format!("refused after {total} bytes of messages"),
                )
                .into());
            }
            Ok(())
        }
        Some(e) => Err(Failure::new(
            "Error 310 quota_exceeded",
            crate::context::describe_error(&e),
        )
        .into()),
        None => Err(Failure::new(
            format!("quota_exceeded once {cap} bytes would be retained"),
            format!("{total} bytes accepted, nothing refused"),
        )
        .into()),
    }
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
