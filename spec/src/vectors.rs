//! The test-vector generator behind `vectors/` (run `cargo run -p confab-spec --bin
//! confab-vectors -- --write`). Every key is derived from a fixed seed and ed25519 is
//! deterministic, so the output is reproducible byte for byte; `spec/tests/vectors.rs`
//! fails if the checked-in files differ from what this produces.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::ErrorCode;
use crate::frame::*;
use crate::identity::{
    AuthExpectation, AuthTranscript, DeviceCertificate, DeviceKeyPair, IdentityError,
    SystemKeyPair, verify_auth,
};
use crate::ids::*;
use crate::session::{ClientSession, ConnId, DeviceCredentials, Input, Output, SessionConfig};

/// One generated file: its name under `vectors/` and its JSON text.
pub struct VectorFile {
    /// File name, for example `frames.json`.
    pub name: &'static str,
    /// Pretty-printed JSON with a trailing newline.
    pub text: String,
}

/// The origin every vector signs.
pub const ORIGIN: &str = "wss://chat.example.org";
/// The reference time of the vectors: 2026-01-01T00:00:00Z.
pub const T0: UnixMs = UnixMs(1_767_225_600_000);
const DAY_MS: u64 = 24 * 3600 * 1000;

/// A frame vector as stored in `frames.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct FrameVector {
    /// A short unique name.
    pub name: String,
    /// `client` or `server`.
    pub direction: String,
    /// The frame as JSON (externally tagged by frame name).
    pub value: Value,
    /// The exact canonical encoding, hex.
    pub hex: String,
}

/// An invalid frame vector: bytes a receiver must reject, and the error code it sends.
#[derive(Debug, Serialize, Deserialize)]
pub struct InvalidFrameVector {
    /// A short unique name.
    pub name: String,
    /// `client` or `server`: which side's decoder is exercised.
    pub direction: String,
    /// The bytes, hex.
    pub hex: String,
    /// The error code (SPEC.md section 12) the receiver answers.
    pub error_code: u16,
}

/// Produces every vector file.
pub fn generate() -> Vec<VectorFile> {
    vec![
        file("frames.json", frames()),
        file("invalid-frames.json", invalid_frames()),
        file("certificates.json", certificates()),
        file("auth.json", auth()),
        file("session.json", session()),
        file("safety-numbers.json", safety_numbers()),
        file("content.json", content()),
    ]
}

fn file(name: &'static str, value: Value) -> VectorFile {
    let mut text = serde_json::to_string_pretty(&value).unwrap_or_default();
    text.push('\n');
    VectorFile { name, text }
}

/// The fixed identity of the vectors: system seed 0x01.., device seed 0x02.., process 0x03...
pub fn fixture() -> (SystemKeyPair, DeviceKeyPair, DeviceCertificate) {
    let system = SystemKeyPair::from_seed(&[1; 32]);
    let device = DeviceKeyPair::from_seed(&[2; 32]);
    let cert = system.issue_certificate(
        ProcessId([3; 16]),
        device.public(),
        T0,
        T0.plus_ms(90 * DAY_MS),
    );
    (system, device, cert)
}

fn mls(tag: u8, len: usize) -> MlsBytes {
    // Stand-in MLSMessage bytes: the codec treats payloads as opaque.
    let mut v = vec![0x00, 0x01, 0x00, tag];
    v.resize(len.max(4), 0xAB);
    MlsBytes::new(v).unwrap_or_else(|_| unreachable!("length is at least 4"))
}

fn seq(v: u64) -> Seq {
    Seq::new(v).unwrap_or(Seq::FIRST)
}

fn token() -> ResumeToken {
    ResumeToken::new(vec![0x5A; 32]).unwrap_or_else(|_| unreachable!("32 bytes is in range"))
}

/// Sample entries of every kind.
pub fn sample_entries() -> Vec<Entry> {
    let (_, _, cert) = fixture();
    let sender = cert.device_id();
    let conv = ConversationId([0xC0; 32]);
    vec![
        Entry {
            seq: seq(1),
            msg_id: MsgId([0x11; 16]),
            sender,
            accepted_ms: T0,
            payload: mls(2, 40),
            body: EntryBody::Application { epoch: Epoch(3) },
        },
        Entry {
            seq: seq(2),
            msg_id: MsgId([0x12; 16]),
            sender,
            accepted_ms: T0.plus_ms(1),
            payload: mls(1, 60),
            body: EntryBody::Commit { epoch: Epoch(3) },
        },
        Entry {
            seq: seq(3),
            msg_id: MsgId([0x13; 16]),
            sender,
            accepted_ms: T0.plus_ms(2),
            payload: mls(1, 30),
            body: EntryBody::Proposal { epoch: Epoch(4) },
        },
        Entry {
            seq: seq(4),
            msg_id: MsgId([0x14; 16]),
            sender,
            accepted_ms: T0.plus_ms(3),
            payload: mls(3, 80),
            body: EntryBody::Welcome {
                conversation: conv,
                commit_seq: seq(2),
            },
        },
    ]
}

/// Named sample frames of both directions.
pub struct SampleFrames {
    /// Client frames.
    pub client: Vec<(&'static str, ClientFrame)>,
    /// Server frames.
    pub server: Vec<(&'static str, ServerFrame)>,
}

/// One sample of every frame type, plus variants with optional fields.
pub fn sample_frames() -> SampleFrames {
    let (system, device, cert) = fixture();
    let conv = ConversationId([0xC0; 32]);
    let stream = StreamId::Conversation(conv);
    let versions = Versions::new(vec![1]).unwrap_or_else(|_| unreachable!());
    let transcript = AuthTranscript {
        version: 1,
        origin: ORIGIN,
        nonce: Nonce([0x4E; 32]),
        time_ms: T0.plus_ms(1_000),
        process: cert.process,
    };
    let client = vec![
        (
            "hello",
            ClientFrame::Hello(Hello {
                versions: versions.clone(),
                resume_token: None,
            }),
        ),
        (
            "hello-resume",
            ClientFrame::Hello(Hello {
                versions: Versions::new(vec![1, 2]).unwrap_or_else(|_| unreachable!()),
                resume_token: Some(token()),
            }),
        ),
        (
            "auth",
            ClientFrame::Auth(Auth {
                certificate: cert.clone(),
                time_ms: transcript.time_ms,
                signature: device.sign_transcript(&transcript),
                origin: ShortText::truncated(ORIGIN),
                nonce: transcript.nonce,
            }),
        ),
        ("heartbeat", ClientFrame::Heartbeat(Heartbeat { nonce: 42 })),
        (
            "create-conversation",
            ClientFrame::CreateConversation(CreateConversation {
                rid: 1,
                conversation: conv,
                kind: ConversationKind::DirectMessage,
                group_info: mls(4, 120),
            }),
        ),
        (
            "create-room",
            ClientFrame::CreateConversation(CreateConversation {
                rid: 2,
                conversation: conv,
                kind: ConversationKind::Room,
                group_info: mls(4, 160),
            }),
        ),
        (
            "send",
            ClientFrame::Send(Send {
                rid: 3,
                conversation: conv,
                msg_id: MsgId([0x11; 16]),
                payload: mls(2, 40),
                welcome: None,
                group_info: None,
            }),
        ),
        (
            "send-commit-welcome",
            ClientFrame::Send(Send {
                rid: 4,
                conversation: conv,
                msg_id: MsgId([0x12; 16]),
                payload: mls(1, 60),
                welcome: Some(mls(3, 80)),
                group_info: Some(mls(4, 48)),
            }),
        ),
        (
            "get-group-info",
            ClientFrame::GetGroupInfo(GetGroupInfo {
                rid: 22,
                conversation: conv,
            }),
        ),
        (
            "subscribe",
            ClientFrame::Subscribe(Subscribe {
                rid: 5,
                stream,
                from_seq: Some(seq(1)),
            }),
        ),
        (
            "subscribe-inbox-from-cursor",
            ClientFrame::Subscribe(Subscribe {
                rid: 6,
                stream: StreamId::Inbox,
                from_seq: None,
            }),
        ),
        (
            "continue",
            ClientFrame::Continue(Continue {
                stream,
                after_seq: seq(256),
            }),
        ),
        (
            "unsubscribe",
            ClientFrame::Unsubscribe(Unsubscribe { rid: 7, stream }),
        ),
        (
            "ack",
            ClientFrame::Ack(Ack {
                stream,
                seq: seq(300),
            }),
        ),
        (
            "revoke-device",
            ClientFrame::RevokeDevice(RevokeDevice {
                rid: 8,
                revocation: system.revoke(ProcessId([4; 16]), T0),
            }),
        ),
        (
            "upload-key-packages",
            ClientFrame::UploadKeyPackages(UploadKeyPackages {
                rid: 9,
                key_packages: vec![mls(5, 50), mls(5, 51)],
                last_resort: Some(mls(5, 52)),
            }),
        ),
        (
            "upload-key-packages-query",
            ClientFrame::UploadKeyPackages(UploadKeyPackages {
                rid: 10,
                key_packages: vec![],
                last_resort: None,
            }),
        ),
        (
            "claim-key-packages",
            ClientFrame::ClaimKeyPackages(ClaimKeyPackages {
                rid: 11,
                user: system.public(),
                devices: None,
            }),
        ),
        (
            "claim-key-packages-of-devices",
            ClientFrame::ClaimKeyPackages(ClaimKeyPackages {
                rid: 12,
                user: system.public(),
                devices: Some(vec![cert.device_id()]),
            }),
        ),
        (
            "list-devices",
            ClientFrame::ListDevices(ListDevices { rid: 13 }),
        ),
        (
            "set-presence-online",
            ClientFrame::SetPresence(SetPresence {
                rid: 14,
                mode: PresenceMode::Online,
                ttl_ms: 60_000,
            }),
        ),
        (
            "set-presence-invisible",
            ClientFrame::SetPresence(SetPresence {
                rid: 15,
                mode: PresenceMode::Invisible,
                ttl_ms: 60_000,
            }),
        ),
        (
            "set-presence-offline",
            ClientFrame::SetPresence(SetPresence {
                rid: 16,
                mode: PresenceMode::Offline,
                ttl_ms: 0,
            }),
        ),
        (
            "watch-presence",
            ClientFrame::WatchPresence(WatchPresence {
                rid: 17,
                targets: vec![system.public(), SystemKey([0x77; 32])],
            }),
        ),
        (
            "update-presence-lists",
            ClientFrame::UpdatePresenceLists(UpdatePresenceLists {
                rid: 18,
                share: Some(vec![SystemKey([0x77; 32])]),
                unshare: None,
                block: Some(vec![SystemKey([0x66; 32])]),
                unblock: None,
            }),
        ),
        (
            "update-invite-settings",
            ClientFrame::UpdateInviteSettings(UpdateInviteSettings {
                rid: 20,
                policy: Some(InvitePolicy::Allowed),
                allow: Some(vec![SystemKey([0x77; 32])]),
                disallow: Some(vec![SystemKey([0x66; 32])]),
            }),
        ),
        (
            "update-invite-settings-query",
            ClientFrame::UpdateInviteSettings(UpdateInviteSettings {
                rid: 21,
                policy: None,
                allow: None,
                disallow: None,
            }),
        ),
        (
            "update-presence-lists-query",
            ClientFrame::UpdatePresenceLists(UpdatePresenceLists {
                rid: 19,
                share: None,
                unshare: None,
                block: None,
                unblock: None,
            }),
        ),
    ];
    let entries = sample_entries();
    let server = vec![
        (
            "challenge",
            ServerFrame::Challenge(Challenge {
                version: 1,
                nonce: Nonce([0x4E; 32]),
                server_time_ms: T0,
            }),
        ),
        (
            "ready",
            ServerFrame::Ready(Ready {
                session_id: SessionId([0x5E; 16]),
                resume_token: token(),
                resume_token_ttl_ms: 3_600_000,
                heartbeat_interval_ms: 15_000,
                heartbeat_timeout_ms: 45_000,
                resumed: false,
                server_time_ms: T0,
                device: cert.device_id(),
                limits: SessionLimits::default(),
            }),
        ),
        (
            "heartbeat-ack",
            ServerFrame::HeartbeatAck(HeartbeatAck { nonce: 42 }),
        ),
        (
            "created",
            ServerFrame::Created(Created {
                rid: 1,
                conversation: conv,
            }),
        ),
        (
            "accepted",
            ServerFrame::Accepted(Accepted {
                rid: 3,
                conversation: conv,
                msg_id: MsgId([0x11; 16]),
                seq: seq(1),
                duplicate: false,
            }),
        ),
        (
            "accepted-duplicate",
            ServerFrame::Accepted(Accepted {
                rid: 12,
                conversation: conv,
                msg_id: MsgId([0x11; 16]),
                seq: seq(1),
                duplicate: true,
            }),
        ),
        (
            "subscribed",
            ServerFrame::Subscribed(Subscribed {
                rid: 5,
                stream,
                from_seq: seq(1),
                head_seq: 4,
                ack_cursor: 0,
                oldest_seq: 1,
            }),
        ),
        (
            "batch",
            ServerFrame::Batch(Batch {
                stream,
                entries: entries[..3].to_vec(),
                more: true,
            }),
        ),
        (
            "batch-empty",
            ServerFrame::Batch(Batch {
                stream,
                entries: vec![],
                more: false,
            }),
        ),
        (
            "deliver",
            ServerFrame::Deliver(Deliver {
                stream,
                entry: entries[0].clone(),
            }),
        ),
        (
            "deliver-welcome",
            ServerFrame::Deliver(Deliver {
                stream: StreamId::Inbox,
                entry: entries[3].clone(),
            }),
        ),
        (
            "continuity-lost",
            ServerFrame::ContinuityLost(ContinuityLost {
                rid: 5,
                stream,
                from_seq: seq(1),
                oldest_seq: 1_000,
                head_seq: 1_500,
            }),
        ),
        (
            "unsubscribed",
            ServerFrame::Unsubscribed(Unsubscribed { rid: 7, stream }),
        ),
        (
            "error-stale-commit",
            ServerFrame::Error(ErrorFrame {
                code: ErrorCode::StaleCommit,
                rid: Some(4),
                retry_after_ms: None,
                epoch: Some(Epoch(4)),
                seq: Some(seq(2)),
                detail: None,
            }),
        ),
        (
            "error-rate-limited",
            ServerFrame::Error(ErrorFrame {
                code: ErrorCode::RateLimited,
                rid: Some(11),
                retry_after_ms: Some(2_000),
                epoch: None,
                seq: None,
                detail: Some(ShortText::truncated("claims_per_target")),
            }),
        ),
        (
            "error-connection",
            ServerFrame::Error(ErrorFrame {
                code: ErrorCode::AuthClockSkew,
                rid: None,
                retry_after_ms: None,
                epoch: None,
                seq: None,
                detail: None,
            }),
        ),
        ("ok", ServerFrame::Ok(OkFrame { rid: 8 })),
        (
            "key-packages-stored",
            ServerFrame::KeyPackagesStored(KeyPackagesStored {
                rid: 9,
                pool_count: 2,
                low_watermark: 10,
                last_resort_present: true,
                last_resort_claimed: false,
            }),
        ),
        (
            "key-packages-claimed",
            ServerFrame::KeyPackagesClaimed(KeyPackagesClaimed {
                rid: 11,
                user: system.public(),
                claimed: vec![ClaimedKeyPackage {
                    device: cert.device_id(),
                    key_package: mls(5, 50),
                    last_resort: false,
                }],
            }),
        ),
        (
            "devices",
            ServerFrame::Devices(Devices {
                rid: 13,
                devices: vec![DeviceStatus {
                    device: cert.device_id(),
                    pool_count: 12,
                    last_resort_present: true,
                }],
            }),
        ),
        (
            "presence-lease",
            ServerFrame::PresenceLease(PresenceLease {
                rid: 14,
                mode: PresenceMode::Online,
                ttl_ms: 60_000,
            }),
        ),
        (
            "presence-states",
            ServerFrame::PresenceStates(PresenceStates {
                rid: 17,
                states: vec![
                    PresenceOf {
                        target: system.public(),
                        state: PresenceState::Online,
                    },
                    PresenceOf {
                        target: SystemKey([0x77; 32]),
                        state: PresenceState::Unavailable,
                    },
                ],
            }),
        ),
        (
            "presence-changed",
            ServerFrame::PresenceChanged(PresenceChanged {
                target: system.public(),
                state: PresenceState::WithinHour,
            }),
        ),
        (
            "group-info",
            ServerFrame::GroupInfo(GroupInfoFrame {
                rid: 22,
                conversation: conv,
                epoch: Epoch(2),
                seq: 7,
                group_info: mls(4, 48),
                ratchet_tree: Some(
                    MlsBytes::new(vec![0x01, 0x01, 0x20, 0xCD])
                        .unwrap_or_else(|_| unreachable!("4 bytes")),
                ),
            }),
        ),
        (
            "invite-settings",
            ServerFrame::InviteSettings(InviteSettings {
                rid: 20,
                policy: InvitePolicy::Allowed,
                allowed: vec![SystemKey([0x77; 32])],
            }),
        ),
        (
            "presence-lists",
            ServerFrame::PresenceLists(PresenceLists {
                rid: 18,
                shared: vec![SystemKey([0x77; 32])],
                blocked: vec![SystemKey([0x66; 32])],
                invisible: false,
            }),
        ),
    ];
    SampleFrames { client, server }
}

fn frames() -> Value {
    let SampleFrames { client, server } = sample_frames();
    let mut out = Vec::new();
    for (name, f) in client {
        out.push(FrameVector {
            name: name.into(),
            direction: "client".into(),
            value: to_json(&f),
            hex: hex::encode(f.encode()),
        });
    }
    for (name, f) in server {
        out.push(FrameVector {
            name: name.into(),
            direction: "server".into(),
            value: to_json(&f),
            hex: hex::encode(f.encode()),
        });
    }
    json!({
        "description": "One value of every frame type in SPEC.md Appendix A with its exact canonical CBOR encoding. Decoding `hex` must give `value`; encoding `value` must give `hex`.",
        "vectors": out,
    })
}

fn to_json<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Invalid frames and the error each must produce.
pub fn invalid_frame_cases() -> Vec<InvalidFrameVector> {
    let c = |name: &str, direction: &str, hex: &str, code: ErrorCode| InvalidFrameVector {
        name: name.into(),
        direction: direction.into(),
        hex: hex.into(),
        error_code: code.value(),
    };
    vec![
        c("not-a-map", "client", "8100", ErrorCode::MalformedFrame),
        c("empty", "client", "", ErrorCode::MalformedFrame),
        c("missing-type", "client", "a10105", ErrorCode::MalformedFrame),
        c("non-shortest-type", "client", "a200180301182a", ErrorCode::MalformedFrame),
        c("keys-out-of-order", "client", "a3000302070107", ErrorCode::MalformedFrame),
        c("repeated-key", "client", "a3000301070107", ErrorCode::MalformedFrame),
        c("indefinite-map", "client", "bf000301 07ff", ErrorCode::MalformedFrame),
        c("negative-key", "client", "a200032007", ErrorCode::MalformedFrame),
        c("float-value", "client", "a20003 01f93c00", ErrorCode::MalformedFrame),
        c("tagged-value", "client", "a20003 01c107", ErrorCode::MalformedFrame),
        c("null-value", "client", "a20003 01f6", ErrorCode::MalformedFrame),
        c("trailing-bytes", "client", "a20003010700", ErrorCode::MalformedFrame),
        c("missing-required-field", "client", "a10003", ErrorCode::MalformedFrame),
        c("wrong-field-type", "client", "a200030141 07", ErrorCode::MalformedFrame),
        c("msg-id-wrong-length", "client", "a5000501010258200000000000000000000000000000000000000000000000000000000000000000034100044101", ErrorCode::MalformedFrame),
        c("seq-zero", "client", "a30009014002 00", ErrorCode::MalformedFrame),
        c("invalid-utf8-in-unknown-field", "client", "a30003 0107 1863 61ff", ErrorCode::MalformedFrame),
        c("unknown-type", "client", "a100183f", ErrorCode::UnknownFrameType),
        c("server-type-from-client", "client", "a1001840", ErrorCode::UnexpectedFrame),
        c("client-type-from-server", "server", "a10001", ErrorCode::UnexpectedFrame),
        c("collection-too-long", "client", "a300030107 1863990800", ErrorCode::LimitExceeded),
        c("nesting-too-deep", "client", "a300030107 18638181818181818181 00", ErrorCode::LimitExceeded),
        c("text-too-long", "client", "a300030107 1863 7901 01", ErrorCode::LimitExceeded),
    ]
    .into_iter()
    .map(|mut v| {
        v.hex.retain(|ch| !ch.is_whitespace());
        v
    })
    .collect()
}

fn invalid_frames() -> Value {
    json!({
        "description": "Bytes a receiver must reject, with the error code it answers (SPEC.md sections 4.2-4.4). `direction` names the sender whose frames the receiver expects.",
        "limits": {"frame_bytes_max": crate::limits::FRAME_BYTES_MAX_DEFAULT, "collection_len_max": crate::limits::COLLECTION_LEN_MAX_DEFAULT, "nesting_depth_max": crate::limits::NESTING_DEPTH_MAX_DEFAULT, "text_bytes_max": crate::limits::TEXT_BYTES_MAX_DEFAULT},
        "vectors": invalid_frame_cases(),
    })
}

fn content() -> Value {
    use crate::content::AppContent;
    let cases = [
        (b"hello".to_vec(), 1u64),
        ("grüße 👋".as_bytes().to_vec(), 24),
        (Vec::new(), 65_536),
    ];
    let vectors: Vec<Value> = cases
        .into_iter()
        .map(|(text, counter)| {
            let sealed = AppContent {
                text: text.clone(),
                counter,
            }
            .seal();
            json!({"text": hex::encode(&text), "counter": counter, "plaintext": hex::encode(sealed)})
        })
        .collect();
    let not_content: Vec<Value> = [
        ("UTF-8 text", b"hello".to_vec()),
        (
            "counter 0",
            AppContent {
                text: b"x".to_vec(),
                counter: 0,
            }
            .seal(),
        ),
        (
            "keys out of order",
            hex::decode("a2024101016178").unwrap_or_default(),
        ),
        (
            "an extra key",
            hex::decode("a301417802010300").unwrap_or_default(),
        ),
        (
            "text as a text string",
            hex::decode("a2016178020a").unwrap_or_default(),
        ),
    ]
    .into_iter()
    .map(|(why, bytes)| json!({"why": why, "plaintext": hex::encode(bytes)}))
    .collect();
    json!({
        "description": "The plaintext of application messages (SPEC.md 7.9): the content map of each text and counter, and plaintexts that are not a content map (shown as they are, with no counter).",
        "vectors": vectors,
        "not_content": not_content,
    })
}

fn safety_numbers() -> Value {
    let (system, _, _) = fixture();
    let keys = [
        system.public(),
        SystemKeyPair::from_seed(&[9; 32]).public(),
        crate::ids::SystemKey([0; 32]),
        crate::ids::SystemKey([0xFF; 32]),
    ];
    let mut vectors = Vec::new();
    for (i, a) in keys.iter().enumerate() {
        for b in &keys[i + 1..] {
            vectors.push(json!({
                "a": hex::encode(a.0),
                "b": hex::encode(b.0),
                "safety_number": crate::safety::safety_number(a, b),
            }));
        }
    }
    json!({
        "description": "Safety numbers (SPEC.md 3.6) of pairs of system keys; the same for (b, a).",
        "vectors": vectors,
    })
}

/// Verdict of a certificate check as a JSON string: `valid` or the error code name.
pub fn verdict(r: Result<(), IdentityError>) -> String {
    match r {
        Ok(()) => "valid".into(),
        Err(e) => e.code().name().into(),
    }
}

fn certificates() -> Value {
    let (system, device, cert) = fixture();
    let other = SystemKeyPair::from_seed(&[9; 32]);
    let mut forged = other.issue_certificate(
        cert.process,
        device.public(),
        cert.not_before_ms,
        cert.not_after_ms,
    );
    forged.system = system.public();
    let too_long =
        system.issue_certificate(cert.process, device.public(), T0, T0.plus_ms(401 * DAY_MS));
    let inverted = system.issue_certificate(cert.process, device.public(), T0, T0);
    let revocation = system.revoke(cert.process, T0.plus_ms(DAY_MS));
    let cases: Vec<(&str, &DeviceCertificate, UnixMs, bool)> = vec![
        ("valid", &cert, T0.plus_ms(DAY_MS / 2), false),
        ("expired", &cert, cert.not_after_ms, false),
        ("not-yet-valid", &cert, UnixMs(T0.0 - 600_000), false),
        (
            "not-yet-valid-within-skew",
            &cert,
            UnixMs(T0.0 - 200_000),
            false,
        ),
        ("bad-signature", &forged, T0.plus_ms(DAY_MS / 2), false),
        ("lifetime-too-long", &too_long, T0.plus_ms(DAY_MS), false),
        ("empty-validity", &inverted, T0, false),
        ("revoked", &cert, T0.plus_ms(2 * DAY_MS), true),
        ("before-revocation", &cert, T0.plus_ms(DAY_MS / 2), true),
    ];
    let skew = crate::limits::CLOCK_SKEW_MAX_MS_DEFAULT;
    let vectors: Vec<Value> = cases
        .into_iter()
        .map(|(name, c, now, revoked)| {
            let rev = revoked.then_some(revocation.revoked_at_ms);
            json!({
                "name": name,
                "certificate": to_json(c),
                "certificate_hex": hex::encode(crate::cbor::to_vec(c)),
                "signing_input_hex": hex::encode(c.signing_input()),
                "now_ms": now,
                "revocation": if revoked { to_json(&revocation) } else { Value::Null },
                "verdict": verdict(c.verify(now, skew, |_| rev)),
            })
        })
        .collect();
    json!({
        "description": "Device certificates (SPEC.md section 3.2) checked at `now_ms` with clock_skew_max_ms 300000, optionally with a revocation (section 3.3). `verdict` is `valid` or the error code name of SPEC.md section 12.",
        "system_seed": hex::encode(system.seed()),
        "system_key": to_json(&system.public()),
        "device_seed": hex::encode(device.seed()),
        "clock_skew_max_ms": skew,
        "revocation_hex": hex::encode(crate::cbor::to_vec(&revocation)),
        "revocation_signing_input_hex": hex::encode({
            let mut w = crate::cbor::Writer::new();
            w.array(4);
            w.text(crate::identity::DEVICE_REVOCATION_TAG);
            w.bytes(&revocation.system.0);
            w.bytes(&revocation.process.0);
            w.uint(revocation.revoked_at_ms.0);
            w.into_bytes()
        }),
        "vectors": vectors,
    })
}

fn auth() -> Value {
    let (system, device, cert) = fixture();
    let nonce = Nonce([0x4E; 32]);
    let now = T0.plus_ms(DAY_MS);
    let skew = crate::limits::CLOCK_SKEW_MAX_MS_DEFAULT;
    let sign = |origin: &str, nonce: Nonce, time_ms: UnixMs, key: &DeviceKeyPair| {
        let t = AuthTranscript {
            version: 1,
            origin,
            nonce,
            time_ms,
            process: cert.process,
        };
        (
            t.signing_input(),
            Auth {
                certificate: cert.clone(),
                time_ms,
                signature: key.sign_transcript(&t),
                origin: ShortText::truncated(origin),
                nonce,
            },
        )
    };
    let wrong_key = DeviceKeyPair::from_seed(&[7; 32]);
    let expired_cert = system.issue_certificate(
        cert.process,
        device.public(),
        UnixMs(T0.0 - 2 * DAY_MS),
        UnixMs(T0.0 - DAY_MS),
    );
    let cases: Vec<(&str, (Vec<u8>, Auth))> = vec![
        ("valid", sign(ORIGIN, nonce, now, &device)),
        (
            "valid-within-skew",
            sign(ORIGIN, nonce, UnixMs(now.0 - 299_000), &device),
        ),
        (
            "clock-skew",
            sign(ORIGIN, nonce, now.plus_ms(301_000), &device),
        ),
        (
            "other-origin",
            sign("wss://evil.example", nonce, now, &device),
        ),
        ("other-nonce", sign(ORIGIN, Nonce([0x4F; 32]), now, &device)),
        ("wrong-device-key", sign(ORIGIN, nonce, now, &wrong_key)),
        ("origin-swapped-after-signing", {
            let (input, mut a) = sign("wss://evil.example", nonce, now, &device);
            a.origin = ShortText::truncated(ORIGIN);
            (input, a)
        }),
        ("nonce-swapped-after-signing", {
            let (input, mut a) = sign(ORIGIN, Nonce([0x4F; 32]), now, &device);
            a.nonce = nonce;
            (input, a)
        }),
        ("expired-certificate", {
            let (input, mut a) = sign(ORIGIN, nonce, now, &device);
            a.certificate = expired_cert.clone();
            (input, a)
        }),
    ];
    let vectors: Vec<Value> = cases
        .into_iter()
        .map(|(name, (input, a))| {
            let result = verify_auth(&a, &AuthExpectation { origin: ORIGIN, nonce, version: 1, now, clock_skew_max_ms: skew }, |_| None);
            json!({
                "name": name,
                "signing_input_hex": hex::encode(input),
                "auth_frame_hex": hex::encode(ClientFrame::Auth(a.clone()).encode()),
                "auth": to_json(&a),
                "verdict": match result { Ok(()) => "valid".to_string(), Err(code) => code.name().to_string() },
            })
        })
        .collect();
    json!({
        "description": "Auth frames (SPEC.md sections 5.3 and 5.4) checked by a gateway with the given origin, this connection's nonce, version and clock, and no revocations. `verdict` is `valid` or the code of the first failing check of the table in SPEC.md 5.4.",
        "gateway": {"origin": ORIGIN, "nonce": to_json(&nonce), "version": 1, "now_ms": now, "clock_skew_max_ms": skew},
        "device_seed": hex::encode(device.seed()),
        "vectors": vectors,
    })
}

/// A step of a session transcript.
#[derive(Debug, Serialize, Deserialize)]
pub struct SessionStep {
    /// The time of the input.
    pub at_ms: UnixMs,
    /// The input.
    pub input: Input,
    /// Everything the session emitted in response, in order.
    pub outputs: Vec<Output>,
    /// `poll_timeout` after the step.
    pub next_timeout_ms: Option<UnixMs>,
}

/// Builds a session for the fixture device with `seed`.
pub fn fixture_session(seed: u64) -> ClientSession {
    let (_, key, certificate) = fixture();
    ClientSession::new(
        SessionConfig::new(ORIGIN),
        DeviceCredentials { key, certificate },
        seed,
    )
}

/// Runs `inputs` through a fresh fixture session and records each step.
pub fn run_session(seed: u64, inputs: Vec<(UnixMs, Input)>) -> Vec<SessionStep> {
    let mut s = fixture_session(seed);
    inputs
        .into_iter()
        .map(|(at, input)| {
            let result = s.handle(at, input.clone());
            let mut outputs = Vec::new();
            while let Some(o) = s.poll_output() {
                outputs.push(o);
            }
            if let Err(e) = result {
                outputs.push(Output::Event(crate::session::Event::ProtocolViolation {
                    detail: format!("refused: {e}"),
                }));
            }
            SessionStep {
                at_ms: at,
                input,
                outputs,
                next_timeout_ms: s.poll_timeout(),
            }
        })
        .collect()
}

/// A named input script for the session transcripts.
pub struct SessionScript {
    /// Short unique name.
    pub name: &'static str,
    /// What it shows.
    pub description: &'static str,
    /// Timed inputs.
    pub inputs: Vec<(UnixMs, Input)>,
}

/// The input scripts of `session.json`.
pub fn session_scripts() -> Vec<SessionScript> {
    let (_, _, cert) = fixture();
    let conv = ConversationId([0xC0; 32]);
    let stream = StreamId::Conversation(conv);
    let c1 = ConnId(1);
    let c2 = ConnId(2);
    let t = |ms: u64| T0.plus_ms(ms);
    let entry = |n: u64, id: u8| Entry {
        seq: seq(n),
        msg_id: MsgId([id; 16]),
        sender: cert.device_id(),
        accepted_ms: T0,
        payload: mls(2, 8),
        body: EntryBody::Application { epoch: Epoch(1) },
    };
    let ready = |resumed: bool| {
        ServerFrame::Ready(Ready {
            session_id: SessionId([0x5E; 16]),
            resume_token: token(),
            resume_token_ttl_ms: 3_600_000,
            heartbeat_interval_ms: 15_000,
            heartbeat_timeout_ms: 45_000,
            resumed,
            server_time_ms: T0,
            device: cert.device_id(),
            limits: SessionLimits {
                replay_batch_max: 2,
                ..SessionLimits::default()
            },
        })
    };
    let frame = |conn: ConnId, frame: ServerFrame| Input::Frame { conn, frame };
    let challenge = ServerFrame::Challenge(Challenge {
        version: 1,
        nonce: Nonce([0x4E; 32]),
        server_time_ms: T0,
    });
    let handshake = |conn: ConnId, at: u64| {
        vec![
            (t(at), Input::Connected { conn }),
            (t(at + 1), frame(conn, challenge.clone())),
            (t(at + 2), frame(conn, ready(false))),
        ]
    };
    let mut connect_and_replay = vec![(t(0), Input::Start)];
    connect_and_replay.extend(handshake(c1, 10));
    connect_and_replay.extend([
        (
            t(20),
            Input::Subscribe {
                stream,
                from_seq: None,
            },
        ),
        (
            t(21),
            frame(
                c1,
                ServerFrame::Subscribed(Subscribed {
                    rid: 1,
                    stream,
                    from_seq: seq(1),
                    head_seq: 3,
                    ack_cursor: 0,
                    oldest_seq: 1,
                }),
            ),
        ),
        (
            t(22),
            frame(
                c1,
                ServerFrame::Batch(Batch {
                    stream,
                    entries: vec![entry(1, 1), entry(2, 2)],
                    more: true,
                }),
            ),
        ),
        (
            t(23),
            frame(
                c1,
                ServerFrame::Batch(Batch {
                    stream,
                    entries: vec![entry(3, 3)],
                    more: false,
                }),
            ),
        ),
        (
            t(24),
            frame(
                c1,
                ServerFrame::Deliver(Deliver {
                    stream,
                    entry: entry(4, 4),
                }),
            ),
        ),
        (
            t(25),
            Input::Ack {
                stream,
                seq: seq(4),
            },
        ),
        (
            t(26),
            Input::Send {
                conversation: conv,
                msg_id: MsgId([0x77; 16]),
                payload: mls(2, 8),
                welcome: None,
                group_info: None,
            },
        ),
        (
            t(27),
            frame(
                c1,
                ServerFrame::Accepted(Accepted {
                    rid: 2,
                    conversation: conv,
                    msg_id: MsgId([0x77; 16]),
                    seq: seq(5),
                    duplicate: false,
                }),
            ),
        ),
    ]);

    let mut gaps = vec![(t(0), Input::Start)];
    gaps.extend(handshake(c1, 10));
    gaps.extend([
        (
            t(20),
            Input::Subscribe {
                stream,
                from_seq: None,
            },
        ),
        (
            t(21),
            frame(
                c1,
                ServerFrame::Subscribed(Subscribed {
                    rid: 1,
                    stream,
                    from_seq: seq(1),
                    head_seq: 0,
                    ack_cursor: 0,
                    oldest_seq: 1,
                }),
            ),
        ),
        (
            t(22),
            frame(
                c1,
                ServerFrame::Batch(Batch {
                    stream,
                    entries: vec![],
                    more: false,
                }),
            ),
        ),
        (
            t(23),
            frame(
                c1,
                ServerFrame::Deliver(Deliver {
                    stream,
                    entry: entry(1, 1),
                }),
            ),
        ),
        (
            t(24),
            frame(
                c1,
                ServerFrame::Deliver(Deliver {
                    stream,
                    entry: entry(1, 1),
                }),
            ),
        ),
        (
            t(25),
            frame(
                c1,
                ServerFrame::Deliver(Deliver {
                    stream,
                    entry: entry(3, 3),
                }),
            ),
        ),
        (
            t(26),
            frame(
                c1,
                ServerFrame::Deliver(Deliver {
                    stream,
                    entry: entry(4, 4),
                }),
            ),
        ),
        (
            t(27),
            frame(
                c1,
                ServerFrame::Subscribed(Subscribed {
                    rid: 2,
                    stream,
                    from_seq: seq(2),
                    head_seq: 4,
                    ack_cursor: 0,
                    oldest_seq: 1,
                }),
            ),
        ),
        (
            t(28),
            frame(
                c1,
                ServerFrame::Batch(Batch {
                    stream,
                    entries: vec![entry(2, 2), entry(3, 3)],
                    more: true,
                }),
            ),
        ),
        (
            t(29),
            frame(
                c1,
                ServerFrame::Batch(Batch {
                    stream,
                    entries: vec![entry(4, 2)],
                    more: false,
                }),
            ),
        ),
    ]);

    let mut resume = vec![(t(0), Input::Start)];
    resume.extend(handshake(c1, 10));
    resume.extend([
        (
            t(20),
            Input::Subscribe {
                stream,
                from_seq: Some(seq(7)),
            },
        ),
        (
            t(21),
            Input::Send {
                conversation: conv,
                msg_id: MsgId([0x77; 16]),
                payload: mls(2, 8),
                welcome: None,
                group_info: None,
            },
        ),
        (
            t(30),
            Input::Closed {
                conn: c1,
                code: Some(4001),
            },
        ),
        (
            t(31),
            frame(c1, ServerFrame::HeartbeatAck(HeartbeatAck { nonce: 1 })),
        ),
        (t(300), Input::Timeout),
        (t(301), Input::Connected { conn: c2 }),
        (t(302), frame(c2, ready(true))),
        (
            t(303),
            frame(
                c2,
                ServerFrame::Accepted(Accepted {
                    rid: 4,
                    conversation: conv,
                    msg_id: MsgId([0x77; 16]),
                    seq: seq(9),
                    duplicate: true,
                }),
            ),
        ),
    ]);

    let mut zombie = vec![(t(0), Input::Start)];
    zombie.extend(handshake(c1, 10));
    zombie.extend([
        (t(15_012), Input::Timeout),
        (
            t(20_000),
            frame(c1, ServerFrame::HeartbeatAck(HeartbeatAck { nonce: 1 })),
        ),
        (t(35_000), Input::Timeout),
        (t(79_999), Input::Timeout),
        (t(80_000), Input::Timeout),
        (
            t(80_001),
            frame(c1, ServerFrame::HeartbeatAck(HeartbeatAck { nonce: 2 })),
        ),
    ]);

    let fatal = vec![
        (t(0), Input::Start),
        (t(10), Input::Connected { conn: c1 }),
        (t(11), frame(c1, challenge.clone())),
        (
            t(12),
            frame(
                c1,
                ServerFrame::Error(ErrorFrame {
                    code: ErrorCode::AuthCertificateRevoked,
                    rid: None,
                    retry_after_ms: None,
                    epoch: None,
                    seq: None,
                    detail: None,
                }),
            ),
        ),
        (
            t(13),
            Input::Closed {
                conn: c1,
                code: Some(4103),
            },
        ),
        (t(60_000), Input::Timeout),
    ];

    let mut stale = vec![(t(0), Input::Start)];
    stale.extend(handshake(c1, 10));
    stale.extend([
        (
            t(20),
            Input::Send {
                conversation: conv,
                msg_id: MsgId([0x21; 16]),
                payload: mls(1, 8),
                welcome: None,
                group_info: None,
            },
        ),
        (
            t(21),
            frame(
                c1,
                ServerFrame::Error(ErrorFrame {
                    code: ErrorCode::StaleCommit,
                    rid: Some(1),
                    retry_after_ms: None,
                    epoch: Some(Epoch(5)),
                    seq: Some(seq(40)),
                    detail: None,
                }),
            ),
        ),
        (
            t(22),
            Input::Send {
                conversation: conv,
                msg_id: MsgId([0x22; 16]),
                payload: mls(2, 8),
                welcome: None,
                group_info: None,
            },
        ),
        (
            t(23),
            frame(
                c1,
                ServerFrame::Error(ErrorFrame {
                    code: ErrorCode::RateLimited,
                    rid: Some(2),
                    retry_after_ms: Some(1_000),
                    epoch: None,
                    seq: None,
                    detail: None,
                }),
            ),
        ),
        (t(1_023), Input::Timeout),
    ]);

    vec![
        SessionScript {
            name: "connect-replay-live",
            description: "Handshake, replay across a batch boundary with Continue, switch to live, ack, send and accept.",
            inputs: connect_and_replay,
        },
        SessionScript {
            name: "duplicates-and-gaps",
            description: "A duplicate is dropped, a gap triggers one re-subscribe from next_seq, stale frames of the old subscription are ignored, a repeated msg_id is skipped.",
            inputs: gaps,
        },
        SessionScript {
            name: "resume-and-resend",
            description: "Subscription from a restored position; a zombie close (4001) schedules a jittered reconnect; stale frames of the dead connection are ignored; the resume token is offered; subscriptions and the unanswered send are re-issued with the same msg_id.",
            inputs: resume,
        },
        SessionScript {
            name: "heartbeat-and-zombie",
            description: "Heartbeat after the interval, acked; a second heartbeat is not acked within heartbeat_timeout_ms, so the connection is dropped and a reconnect scheduled.",
            inputs: zombie,
        },
        SessionScript {
            name: "fatal-close",
            description: "A 4103 close after an auth error stops the session: no reconnect is scheduled.",
            inputs: fatal,
        },
        SessionScript {
            name: "send-rejections",
            description: "stale_commit removes the send and reports the current epoch and winning seq; rate_limited keeps it and resends after retry_after_ms.",
            inputs: stale,
        },
    ]
}

fn session() -> Value {
    let seed = 7;
    let transcripts: Vec<Value> = session_scripts()
        .into_iter()
        .map(|script| {
            json!({ "name": script.name, "description": script.description, "steps": run_session(seed, script.inputs) })
        })
        .collect();
    json!({
        "description": "Client session state machine transcripts (SPEC.md sections 5 and 6.8): inputs at times, and the exact outputs of the reference machine. The fixture device is certificates.json's. Reconnect times depend on the reference jitter RNG (ChaCha8 seeded with `seed`); another implementation checks that they lie within the full-jitter bound of SPEC.md 5.8.",
        "seed": seed,
        "origin": ORIGIN,
        "transcripts": transcripts,
    })
}
