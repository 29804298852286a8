//! SPEC.md section 4: WebSocket use, CBOR rules, the envelope, limits, versions.

use confab_spec::ErrorCode;
use confab_spec::frame::{ClientFrame, Heartbeat, Subscribe};
use confab_spec::ids::{ConversationId, StreamId};

use crate::case;
use crate::case::{Case, CaseResult, Failure};
use crate::context::{Ctx, Device, Observed};

/// The cases of section 4.
pub fn cases() -> Vec<Case> {
    vec![
        case!(
            "5.7-2.protocol-error",
            "REQ-5.7-2",
            Must,
            "the cause 'protocol error' (a text message) closes with 4100",
            text_message
        ),
        case!(
            "5.7-2.frame-too-large",
            "REQ-5.7-2",
            Must,
            "the cause 'message over frame_bytes_max' closes with 4101",
            oversize_message
        ),
        case!(
            "4.1-1.text-message",
            "REQ-4.1-1",
            Must,
            "a text WebSocket message closes the connection with 4100",
            text_message
        ),
        case!(
            "4.1-2.one-frame-per-message",
            "REQ-4.1-2",
            Must,
            "every message the server sends holds exactly one frame",
            one_frame_per_message
        ),
        case!(
            "4.2-2.non-shortest-integer",
            "REQ-4.2-2",
            Must,
            "a non-shortest integer is malformed_frame (100)",
            non_shortest_integer
        ),
        case!(
            "4.2-2.indefinite-length",
            "REQ-4.2-2",
            Must,
            "an indefinite-length map is malformed_frame (100)",
            indefinite_length
        ),
        case!(
            "4.2-2.repeated-key",
            "REQ-4.2-2",
            Must,
            "a repeated map key is malformed_frame (100)",
            repeated_key
        ),
        case!(
            "4.2-2.out-of-order-key",
            "REQ-4.2-2",
            Must,
            "map keys out of order are malformed_frame (100)",
            out_of_order_key
        ),
        case!(
            "4.2-2.tag",
            "REQ-4.2-2",
            Must,
            "a CBOR tag is malformed_frame (100)",
            tag
        ),
        case!(
            "4.2-2.float",
            "REQ-4.2-2",
            Must,
            "a float is malformed_frame (100)",
            float
        ),
        case!(
            "4.2-2.trailing-bytes",
            "REQ-4.2-2",
            Must,
            "bytes after the frame are malformed_frame (100)",
            trailing_bytes
        ),
        case!(
            "4.2-3.unknown-key",
            "REQ-4.2-3",
            Must,
            "an unknown map key is ignored with its value",
            unknown_key
        ),
        case!(
            "4.3-1.unknown-frame-type",
            "REQ-4.3-1",
            Must,
            "an unknown frame type is unknown_frame_type (102)",
            unknown_frame_type
        ),
        case!(
            "4.3-2.wrong-state",
            "REQ-4.3-2",
            Must,
            "a frame not allowed before Hello is unexpected_frame (103), then close 4100",
            wrong_state
        ),
        case!(
            "4.3-3.rid-copied",
            "REQ-4.3-3",
            Must,
            "the error for a request carries the request's rid",
            rid_copied
        ),
        case!(
            "4.4-1.frame-bytes-max",
            "REQ-4.4-1",
            Must,
            "frame_bytes_max is at least 65,536 in /v1/info and in Ready",
            frame_bytes_max
        ),
        case!(
            "4.4-2.oversize-message",
            "REQ-4.4-2",
            Must,
            "a message over frame_bytes_max closes the connection with 4101",
            oversize_message
        ),
        case!(
            "4.4-4.pre-auth-flood",
            "REQ-4.4-4",
            Must,
            "the frame after pre_auth_frames_max before Ready closes with 4006 (heartbeats count)",
            pre_auth_flood
        ),
        case!(
            "4.4-3.collection-too-long",
            "REQ-4.4-3",
            Must,
            "an array declared longer than collection_len_max is limit_exceeded (104)",
            collection_too_long
        ),
        case!(
            "4.4-3.nesting-too-deep",
            "REQ-4.4-3",
            Must,
            "nesting deeper than nesting_depth_max is limit_exceeded (104)",
            nesting_too_deep
        ),
        case!(
            "4.5-1.no-common-version",
            "REQ-4.5-1",
            Must,
            "a Hello without a supported version is unsupported_version (105), then close 4102",
            no_common_version
        ),
        case!(
            "4.5-2.version-from-the-list",
            "REQ-4.5-2",
            Must,
            "the version in Challenge is one the client listed",
            version_from_the_list
        ),
    ]
}

/// A `Heartbeat` (type 3) whose map body is `body` (the bytes after the envelope's type).
fn heartbeat_with(header: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![header, 0x00, 0x03];
    v.extend_from_slice(body);
    v
}

/// After Ready, `bytes` must be answered `malformed_frame`.
async fn malformed(cx: &mut Ctx, bytes: Vec<u8>, what: &str) -> CaseResult {
    let (mut a, _) = cx.ready("a", &Device::fresh()).await?;
    a.send_bytes(bytes, what).await?;
    a.expect_error(ErrorCode::MalformedFrame, None).await?;
    Ok(())
}

async fn text_message(cx: &mut Ctx) -> CaseResult {
    let (mut a, _) = cx.ready("a", &Device::fresh()).await?;
    a.send_text("hello").await?;
    a.expect_close(4100).await
}

async fn one_frame_per_message(cx: &mut Ctx) -> CaseResult {
    // The Peer decodes every message as exactly one frame (trailing bytes fail decoding,
    // which fails the case); a handshake and several pipelined heartbeats exercise it.
    let (mut a, _) = cx.ready("a", &Device::fresh()).await?;
    for nonce in 1..=5 {
        a.send(&ClientFrame::Heartbeat(Heartbeat { nonce })).await?;
    }
    for nonce in 1..=5 {
        match a.next(crate::context::ANSWER_WAIT).await {
            Observed::Frame(confab_spec::ServerFrame::HeartbeatAck(h)) if h.nonce == nonce => {}
            other => {
                return Err(Failure::new(
                    format!("HeartbeatAck {nonce}, alone in its message"),
                    other.to_string(),
                )
                .into());
            }
        }
    }
    Ok(())
}

async fn non_shortest_integer(cx: &mut Ctx) -> CaseResult {
    // {0: 3, 1: 5} with 5 encoded in two bytes.
    malformed(
        cx,
        heartbeat_with(0xA2, &[0x01, 0x18, 0x05]),
        "Heartbeat, nonce 5 as 0x1805",
    )
    .await
}

async fn indefinite_length(cx: &mut Ctx) -> CaseResult {
    malformed(
        cx,
        vec![0xBF, 0x00, 0x03, 0x01, 0x05, 0xFF],
        "Heartbeat as an indefinite map",
    )
    .await
}

async fn repeated_key(cx: &mut Ctx) -> CaseResult {
    malformed(
        cx,
        heartbeat_with(0xA3, &[0x01, 0x05, 0x01, 0x06]),
        "Heartbeat with key 1 twice",
    )
    .await
}

async fn out_of_order_key(cx: &mut Ctx) -> CaseResult {
    // {1: 5, 0: 3}
    malformed(
        cx,
        vec![0xA2, 0x01, 0x05, 0x00, 0x03],
        "Heartbeat with key 1 before key 0",
    )
    .await
}

async fn tag(cx: &mut Ctx) -> CaseResult {
    malformed(
        cx,
        heartbeat_with(0xA2, &[0x01, 0xC1, 0x05]),
        "Heartbeat, nonce tagged 1",
    )
    .await
}

async fn float(cx: &mut Ctx) -> CaseResult {
    malformed(
        cx,
        heartbeat_with(0xA2, &[0x01, 0xF9, 0x3C, 0x00]),
        "Heartbeat, nonce 1.0 (half float)",
    )
    .await
}

async fn trailing_bytes(cx: &mut Ctx) -> CaseResult {
    malformed(
        cx,
        heartbeat_with(0xA2, &[0x01, 0x05, 0x00]),
        "Heartbeat and one more byte",
    )
    .await
}

async fn unknown_key(cx: &mut Ctx) -> CaseResult {
    let (mut a, _) = cx.ready("a", &Device::fresh()).await?;
    // {0: 3, 1: 7, 99: [1, "x"]}
    let bytes = heartbeat_with(0xA3, &[0x01, 0x07, 0x18, 0x63, 0x82, 0x01, 0x61, b'x']);
    a.send_bytes(bytes, "Heartbeat nonce 7 with unknown key 99")
        .await?;
    a.expect("HeartbeatAck 7", |f| match f {
        confab_spec::ServerFrame::HeartbeatAck(h) if h.nonce == 7 => Some(()),
        _ => None,
    })
    .await
}

async fn unknown_frame_type(cx: &mut Ctx) -> CaseResult {
    let (mut a, _) = cx.ready("a", &Device::fresh()).await?;
    // {0: 60, 1: 1}: type 60 is a client type no revision assigns yet.
    a.send_bytes(
        vec![0xA2, 0x00, 0x18, 0x3C, 0x01, 0x01],
        "a frame of type 60",
    )
    .await?;
    a.expect_error(ErrorCode::UnknownFrameType, None).await?;
    Ok(())
}

async fn pre_auth_flood(cx: &mut Ctx) -> CaseResult {
    let max = cx.info.limits.pre_auth_frames_max;
    let mut a = cx.open("a").await?;
    // Heartbeats are allowed before Ready (SPEC.md 5.1), so a flood of them is what
    // pre_auth_frames_max bounds: each is answered until the limit, the next closes.
    for nonce in 1..=max {
        a.send(&ClientFrame::Heartbeat(Heartbeat { nonce })).await?;
        a.expect(
            &format!("HeartbeatAck {nonce} (frame {nonce} of {max} before Ready)"),
            |f| {
                matches!(f, confab_spec::ServerFrame::HeartbeatAck(h) if h.nonce == nonce)
                    .then_some(())
            },
        )
        .await?;
    }
    a.send(&ClientFrame::Heartbeat(Heartbeat { nonce: max + 1 }))
        .await?;
    a.expect_close(4006).await
}

async fn wrong_state(cx: &mut Ctx) -> CaseResult {
    let mut a = cx.open("a").await?;
    a.send(&ClientFrame::Subscribe(Subscribe {
        rid: 1,
        stream: StreamId::Inbox,
        from_seq: None,
    }))
    .await?;
    a.expect_error(ErrorCode::UnexpectedFrame, None).await?;
    a.expect_close(4100).await
}

async fn rid_copied(cx: &mut Ctx) -> CaseResult {
    let (mut a, _) = cx.ready("a", &Device::fresh()).await?;
    a.send(&ClientFrame::Subscribe(Subscribe {
        rid: 4242,
        stream: StreamId::Conversation(ConversationId([0x5A; 32])),
        from_seq: None,
    }))
    .await?;
    a.expect_error(ErrorCode::ConversationNotFound, Some(4242))
        .await?;
    Ok(())
}

async fn frame_bytes_max(cx: &mut Ctx) -> CaseResult {
    let announced = cx.info.limits.frame_bytes_max;
    if announced < 65_536 {
        return Err(
            Failure::new("/v1/info frame_bytes_max >= 65536", announced.to_string()).into(),
        );
    }
    let (_, ready) = cx.ready("a", &Device::fresh()).await?;
    if ready.limits.frame_bytes_max < 65_536 {
        return Err(Failure::new(
            "Ready limits.frame_bytes_max >= 65536",
            ready.limits.frame_bytes_max.to_string(),
        )
        .into());
    }
    Ok(())
}

async fn oversize_message(cx: &mut Ctx) -> CaseResult {
    let (mut a, _) = cx.ready("a", &Device::fresh()).await?;
    let size = usize::try_from(cx.info.limits.frame_bytes_max).unwrap_or(usize::MAX) + 1;
    a.send_bytes(vec![0u8; size], &format!("{size} zero bytes"))
        .await?;
    a.expect_close(4101).await
}

async fn collection_too_long(cx: &mut Ctx) -> CaseResult {
    let (mut a, _) = cx.ready("a", &Device::fresh()).await?;
    // UploadKeyPackages {0: 11, 1: 1, 2: array declared with 2^32 - 1 entries, none sent}.
    let bytes = vec![
        0xA3, 0x00, 0x0B, 0x01, 0x01, 0x02, 0x9A, 0xFF, 0xFF, 0xFF, 0xFF,
    ];
    a.send_bytes(
        bytes,
        "UploadKeyPackages whose array declares 4294967295 entries",
    )
    .await?;
    a.expect_error(ErrorCode::LimitExceeded, None).await?;
    Ok(())
}

async fn nesting_too_deep(cx: &mut Ctx) -> CaseResult {
    let (mut a, _) = cx.ready("a", &Device::fresh()).await?;
    // {0: 3, 1: 1, 99: [[[[...]]]]} nested nesting_depth_max + 1 deep under the envelope.
    let levels = usize::try_from(cx.info.limits.nesting_depth_max).unwrap_or(8) + 1;
    let mut bytes = vec![0xA3, 0x00, 0x03, 0x01, 0x01, 0x18, 0x63];
    bytes.extend(std::iter::repeat_n(0x81, levels));
    bytes.push(0x00);
    a.send_bytes(bytes, "Heartbeat with an unknown key nested too deep")
        .await?;
    a.expect_error(ErrorCode::LimitExceeded, None).await?;
    Ok(())
}

async fn no_common_version(cx: &mut Ctx) -> CaseResult {
    let mut a = cx.open("a").await?;
    a.hello(vec![99], None).await?;
    a.expect_error(ErrorCode::UnsupportedVersion, None).await?;
    a.expect_close(4102).await
}

async fn version_from_the_list(cx: &mut Ctx) -> CaseResult {
    let mut a = cx.open("a").await?;
    a.hello(vec![99, 1, 98], None).await?;
    let version = a
        .expect("Challenge", |f| match f {
            confab_spec::ServerFrame::Challenge(c) => Some(c.version),
            _ => None,
        })
        .await?;
    if version != 1 {
        return Err(Failure::new(
            "version 1 (the only one listed that v1 defines)",
            version.to_string(),
        )
        .into());
    }
    Ok(())
}
