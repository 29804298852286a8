//! Client mode (`--client-command`): the requirements SPEC.md puts on clients that show on
//! the wire. The client under test connects to the suite's proxy, which forwards to a real
//! gateway; each case has the client act (`init`, `room create`, `send`, `read`, `watch`),
//! steers its connections from the proxy (rewrites `Ready`, refuses or closes connections,
//! swallows frames, answers with errors) and checks what the client sent and when.

use std::time::Duration;

use confab_spec::error::ErrorCode;
use confab_spec::frame::{ClientFrame, ErrorFrame, Send, ServerFrame};
use confab_spec::mls_framing::{self, ContentType, Peek, WireFormat};
use confab_spec::rooms::ROLES_EXTENSION_TYPE;
use tokio::time::Instant;

use crate::case::{Case, CaseResult, Failure};
use crate::client::{ClientUnderTest, Event, PassThrough, Script, Verdict, What, home};

/// How long a case waits for the client to do what an action starts.
const ACTION_WAIT: Duration = Duration::from_secs(10);
use crate::client_case;
use crate::context::Ctx;

pub(super) fn cases() -> Vec<Case> {
    vec![
        client_case!(
            "3.1-1.client-random-process-ids",
            "REQ-3.1-1",
            Must,
            "two devices' process ids look random: distinct, not zero, far apart in bits",
            random_process_ids
        ),
        client_case!(
            "3.4-1.client-keys-sign-their-inputs",
            "REQ-3.4-1",
            Must,
            "the device key is not the system key and signs the auth transcript and MLS content; the system key signs the certificate",
            keys_sign_their_inputs
        ),
        client_case!(
            "3.5-1.client-checks-imported-keys",
            "REQ-3.5-1",
            Must,
            "a backup string whose seed does not derive its public key is refused; a true one is taken",
            checks_imported_keys
        ),
        client_case!(
            "4.2-1.client-canonical-frames",
            "REQ-4.2-1",
            Must,
            "every frame the client sends re-encodes to its own bytes (canonical CBOR)",
            canonical_frames
        ),
        client_case!(
            "4.6-1.client-random-ids",
            "REQ-4.6-1",
            Must,
            "msg_ids and conversation ids look random: distinct, balanced bits, no counters",
            random_ids
        ),
        client_case!(
            "5.4-5.client-signs-its-origin",
            "REQ-5.4-5",
            Must,
            "the client's Auth names the origin of the URL it connected to",
            signs_its_origin
        ),
        client_case!(
            "5.5-8.client-resumes-with-newest-token",
            "REQ-5.5-8",
            Must,
            "every resume presents the token of the latest Ready, never an older one",
            resumes_with_newest_token
        ),
        client_case!(
            "5.6-1.client-heartbeat-interval",
            "REQ-5.6-1",
            Must,
            "the client sends a frame at least every heartbeat_interval_ms of its Ready",
            heartbeat_interval
        ),
        client_case!(
            "5.6-4.client-detects-dead-connection",
            "REQ-5.6-4",
            Must,
            "no frame for heartbeat_timeout_ms after a Heartbeat: the client closes and reconnects",
            dead_connection
        ),
        client_case!(
            "5.7-1.client-no-reconnect-after-41xx",
            "REQ-5.7-1",
            Must,
            "after a close with 4104 the client does not reconnect by itself",
            no_reconnect_after_fatal_close
        ),
        client_case!(
            "5.8-1.client-backoff",
            "REQ-5.8-1",
            Must,
            "failed attempts are retried with growing, jittered delays, not in a storm",
            backoff
        ),
        client_case!(
            "5.8-2.client-retry-after",
            "REQ-5.8-2",
            Must,
            "after an Error with retry_after_ms and a close with 4003 the client waits that long",
            retry_after
        ),
        client_case!(
            "6.3-4.client-resends-same-message",
            "REQ-6.3-4",
            Must,
            "a Send cut off by a dropped connection is sent again with the same msg_id and payload",
            resends_same_message
        ),
        client_case!(
            "6.5-3.client-acks-what-it-stored",
            "REQ-6.5-3",
            Must,
            "killed at its first Ack of the room, the client still shows every acked message afterwards",
            acks_what_it_stored
        ),
        client_case!(
            "6.8-1.client-drops-duplicates",
            "REQ-6.8-1",
            Must,
            "every entry delivered twice: each message is shown once",
            drops_duplicates
        ),
        client_case!(
            "6.8-2.client-resubscribes-at-a-gap",
            "REQ-6.8-2",
            Must,
            "an entry missing from a replay: nothing past it is acked; the client re-subscribes from it",
            resubscribes_at_a_gap
        ),
        client_case!(
            "6.8-3.client-ack-cursor-forward",
            "REQ-6.8-3",
            Must,
            "older entries delivered again after newer ones: the client's acks never go back",
            ack_cursor_forward
        ),
        client_case!(
            "6.8-4.client-refuses-reused-msg-id",
            "REQ-6.8-4",
            Must,
            "an entry reusing a processed msg_id under another seq is not shown",
            refuses_reused_msg_id
        ),
        client_case!(
            "6.8-5.client-reads-past-unreadable",
            "REQ-6.8-5",
            Must,
            "a message nobody can decrypt in the middle of a room: every message after it is shown",
            reads_past_unreadable
        ),
        client_case!(
            "7.7-5.client-stops-at-fork",
            "REQ-7.7-5",
            Must,
            "a room Commit the gateway accepted but the client cannot apply (broken confirmation tag): the client sends nothing more into the room",
            stops_at_fork
        ),
        client_case!(
            "7.1-1.client-ciphersuite",
            "REQ-7.1-1",
            Must,
            "the client's KeyPackages use ciphersuite 0x0001",
            key_package_ciphersuite
        ),
        client_case!(
            "7.1-3.client-rejects-bad-key-packages",
            "REQ-7.1-3",
            Must,
            "a claimed KeyPackage with an expired certificate, or another key than its leaf's, is not added",
            rejects_bad_key_packages
        ),
        client_case!(
            "7.1-2.client-wire-formats",
            "REQ-7.1-2",
            Must,
            "application messages go as PrivateMessage, handshake messages as PublicMessage",
            wire_formats
        ),
        client_case!(
            "7.2-4.client-reads-past-epochs",
            "REQ-7.2-4",
            Must,
            "messages sent 1 to 4 epochs late (app_epoch_lag_max) are all shown",
            reads_past_epochs
        ),
        client_case!(
            "7.4-1.client-keeps-commit-pending",
            "REQ-7.4-1",
            Must,
            "a Commit refused before any Accepted was never merged: the next message is in the old epoch",
            keeps_commit_pending
        ),
        client_case!(
            "7.4-2.client-retries-after-stale-commit",
            "REQ-7.4-2",
            Must,
            "after stale_commit the client processes the winner first, then commits again on top of it",
            retries_after_stale_commit
        ),
        client_case!(
            "7.4-3.client-no-send-with-pending-commit",
            "REQ-7.4-3",
            Must,
            "no application message goes out while a Commit of the client's own is unanswered",
            no_send_with_pending_commit
        ),
        client_case!(
            "10-1.client-roles-capability",
            "REQ-10-1",
            Must,
            "the client's KeyPackages list 0xF0C0 in their capabilities' extensions",
            key_package_capability
        ),
        client_case!(
            "10-2.client-room-extensions",
            "REQ-10-2",
            Must,
            "a room the client created carries required_capabilities and roles naming it owner, no admins",
            room_extensions
        ),
        client_case!(
            "12-1.client-unknown-error-codes",
            "REQ-12-1",
            Must,
            "an unknown 1xx error ends the connection; an unknown 3xx fails only the request",
            unknown_error_codes
        ),
    ]
}

/// Slack for the client's timers and process scheduling on a busy machine.
const TIMER_SLACK: Duration = Duration::from_millis(600);

/// The frames the client sent, with when and on which connection.
pub(super) fn sent(events: &[Event]) -> impl Iterator<Item = (Instant, usize, &ClientFrame)> {
    events.iter().filter_map(|e| match &e.what {
        What::FromClient(Some(f), _) => Some((e.at, e.conn, f)),
        _ => None,
    })
}

/// The certificate of the client's first `Auth`.
pub(super) fn authenticated_as(
    events: &[Event],
) -> Option<confab_spec::identity::DeviceCertificate> {
    sent(events).find_map(|(_, _, f)| match f {
        ClientFrame::Auth(a) => Some(a.certificate.clone()),
        _ => None,
    })
}

/// When connection `conn` was opened, and when the client closed it.
fn opened_at(events: &[Event], conn: usize) -> Option<Instant> {
    events
        .iter()
        .find(|e| e.conn == conn && matches!(e.what, What::Opened))
        .map(|e| e.at)
}

fn closed_at(events: &[Event], conn: usize) -> Option<Instant> {
    events
        .iter()
        .find(|e| e.conn == conn && matches!(e.what, What::ClientClosed(_) | What::ProxyClosed(_)))
        .map(|e| e.at)
}

fn connections(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e.what, What::Opened))
        .count()
}

/// A fresh device of the client under test (`init` under pass-through): its home.
async fn initialised_device(cx: &Ctx) -> Result<tempfile::TempDir, crate::case::Stop> {
    let client = cx.client(Box::new(PassThrough))?;
    let home = home()?;
    client.run_ok(home.path(), &["init"]).await?;
    Ok(home)
}

/// Runs `watch` for `window`, then kills it; returns when the window ended (the kill also
/// ends the client's connection: only what happened before counts).
async fn watch_for(
    client: &ClientUnderTest,
    home: &std::path::Path,
    window: Duration,
) -> Result<Instant, crate::case::Stop> {
    let watch = client.spawn(home, &["watch"])?;
    tokio::time::sleep(window).await;
    let end = Instant::now();
    watch.stop().await;
    Ok(end)
}

/// Sets up a device with a room named `room` under pass-through.
pub(super) async fn device_with_room(
    client: &ClientUnderTest,
    home: &std::path::Path,
    room: &str,
) -> CaseResult {
    client.run_ok(home, &["init"]).await?;
    client.run_ok(home, &["room", "create", room]).await?;
    Ok(())
}

/// The application messages among the `Send`s the client sent.
fn application_sends(events: &[Event]) -> Vec<&Send> {
    sent(events)
        .filter_map(|(_, _, f)| match f {
            ClientFrame::Send(s) if is_application(s) => Some(s),
            _ => None,
        })
        .collect()
}

fn is_application(send: &Send) -> bool {
    matches!(
        mls_framing::peek(send.payload.as_bytes()),
        Ok(Peek::Framed(f)) if f.content_type == ContentType::Application
    )
}

async fn canonical_frames(cx: &mut Ctx) -> CaseResult {
    let client = cx.client(Box::new(PassThrough))?;
    let home = home()?;
    device_with_room(client, home.path(), "canonical").await?;
    client
        .run_ok(home.path(), &["send", "canonical", "a canonical message"])
        .await?;
    client.run_ok(home.path(), &["read", "canonical"]).await?;
    let events = client.proxy.events();
    let mut frames = 0;
    for e in &events {
        if let What::FromClient(frame, bytes) = &e.what {
            frames += 1;
            let Some(frame) = frame else {
                return Err(Failure::new(
                    "every frame to decode under SPEC.md 4.2 (the transcript has the bytes)",
                    format!("an undecodable frame on connection {}", e.conn),
                )
                .into());
            };
            if frame.encode() != *bytes {
                return Err(Failure::new(
                    "every frame in the canonical encoding (it re-encodes to its own bytes)",
                    format!("{} on connection {} does not", frame.name(), e.conn),
                )
                .into());
            }
        }
    }
    if application_sends(&events).is_empty() {
        return Err(Failure::new(
            "the client to send its message",
            format!("no application Send among {frames} frames"),
        )
        .into());
    }
    Ok(())
}

async fn signs_its_origin(cx: &mut Ctx) -> CaseResult {
    let client = cx.client(Box::new(PassThrough))?;
    let home = home()?;
    client.run_ok(home.path(), &["init"]).await?;
    let origin = client.origin();
    let events = client.proxy.events();
    let mut auths = 0;
    for (_, conn, frame) in sent(&events) {
        if let ClientFrame::Auth(auth) = frame {
            auths += 1;
            if auth.origin.as_str() != origin {
                return Err(Failure::new(
                    format!("Auth.origin {origin:?}, the origin of the URL it was given"),
                    format!("{:?} on connection {conn}", auth.origin.as_str()),
                )
                .into());
            }
        }
    }
    if auths == 0 {
        return Err(Failure::new("an Auth", "the client authenticated no connection").into());
    }
    Ok(())
}

async fn keys_sign_their_inputs(cx: &mut Ctx) -> CaseResult {
    use confab_client::mls::Processed;
    use confab_spec::frame::{EntryBody, Subscribe};
    use confab_spec::identity::{AuthTranscript, IdentityError};
    use confab_spec::ids::StreamId;

    let (mut peer, mut member) = invitee_member(cx).await?;
    let invited = hex::encode(member.device.system.public().0);
    let client = cx.client(Box::new(PassThrough))?;
    let home = home()?;
    device_with_room(client, home.path(), "signed").await?;
    client
        .run_ok(home.path(), &["room", "invite", "signed", &invited])
        .await?;
    let text = format!("signed {}", hex::encode(crate::cases::log::random::<8>()));
    client
        .run_ok(home.path(), &["send", "signed", &text])
        .await?;
    let events = client.proxy.events();

    // What each key signed in every Auth: the system key its certificate, the device key the
    // transcript of the connection's Challenge. A device key equal to the system key would
    // make every MLS signature a system-key signature over MLS content.
    let mut device = None;
    for (_, conn, frame) in sent(&events) {
        let ClientFrame::Auth(auth) = frame else {
            continue;
        };
        let certificate = &auth.certificate;
        if certificate.device_key.0 == certificate.system.0 {
            return Err(Failure::new(
                "a device key of its own, not the system key",
                format!("connection {conn}: device key = system key"),
            )
            .into());
        }
        if let Err(IdentityError::BadSignature) =
            certificate.verify(certificate.not_before_ms, 0, |_| None)
        {
            return Err(Failure::new(
                "the system key's signature over the certificate's signing input (SPEC.md 3.2)",
                format!("connection {conn}: a certificate signature that does not verify"),
            )
            .into());
        }
        let challenge = events.iter().find_map(|e| match &e.what {
            What::ToClient(ServerFrame::Challenge(c)) if e.conn == conn => Some(c.version),
            _ => None,
        });
        let Some(version) = challenge else {
            return Err(Failure::new(
                "an Auth after a Challenge",
                format!("connection {conn}: Auth without one"),
            )
            .into());
        };
        let transcript = AuthTranscript {
            version,
            origin: auth.origin.as_str(),
            nonce: auth.nonce,
            time_ms: auth.time_ms,
            process: certificate.process,
        };
        if transcript
            .verify(&certificate.device_key, &auth.signature)
            .is_err()
        {
            return Err(Failure::new(
                "the device key's signature over the auth transcript (SPEC.md 5.3)",
                format!("connection {conn}: an Auth signature that does not verify"),
            )
            .into());
        }
        device.get_or_insert(certificate.clone());
    }
    let Some(certificate) = device else {
        return Err(Failure::new("an Auth", "the client authenticated no connection").into());
    };

    // Every KeyPackage is signed by the device key, over KeyPackageTBS with MLS's label.
    for (_, _, frame) in sent(&events) {
        let ClientFrame::UploadKeyPackages(up) = frame else {
            continue;
        };
        for kp in up.key_packages.iter().chain(up.last_resort.as_ref()) {
            let info = mls_framing::key_package(kp.as_bytes())
                .map_err(|e| Failure::new("KeyPackages that read", e.to_string()))?;
            if info.signature_key != certificate.device_key.0 {
                return Err(Failure::new(
                    format!(
                        "KeyPackages whose leaf signature key is the device key {}",
                        hex::encode(certificate.device_key.0)
                    ),
                    format!("signature key {}", hex::encode(&info.signature_key)),
                )
                .into());
            }
            if !info.verify_signature() {
                return Err(Failure::new(
                    "the device key's signature over the KeyPackageTBS SignContent",
                    "a KeyPackage whose signature does not verify",
                )
                .into());
            }
        }
    }

    // The room: the suite's member joins it (the GroupInfo signature and every member's
    // credential, whose leaf key must be its certificate's device key, are checked on
    // join) and reads the client's message, whose signature over its FramedContentTBS is
    // checked as it is decrypted.
    let room = join_welcome(&mut peer, &mut member, 2).await?;
    peer.send(&ClientFrame::Subscribe(Subscribe {
        rid: 3,
        stream: StreamId::Conversation(room),
        from_seq: Some(confab_spec::ids::Seq::FIRST),
    }))
    .await?;
    peer.expect("Subscribed", |f| match f {
        ServerFrame::Subscribed(s) if s.rid == 3 => Some(()),
        _ => None,
    })
    .await?;
    // The replay: the Commit that added the suite's member, then the message.
    let message = loop {
        let found = peer
            .expect("the client's message in the room", |f| match f {
                ServerFrame::Batch(b) if b.stream == StreamId::Conversation(room) => Some(
                    b.entries
                        .iter()
                        .find(|e| matches!(e.body, EntryBody::Application { .. }))
                        .map(|e| e.payload.clone()),
                ),
                _ => None,
            })
            .await?;
        if let Some(message) = found {
            break message;
        }
    };
    match member.engine.process(&room, message.as_bytes()) {
        Ok(Processed::Application { sender, plaintext })
            if sender == certificate.device_id()
                && confab_spec::content::AppContent::open(&plaintext)
                    .is_some_and(|c| c.text == text.as_bytes()) =>
        {
            Ok(())
        }
        other => Err(Failure::new(
            format!(
                "the message {text:?}, signed by the client's device {:?}",
                certificate.device_id()
            ),
            format!("{other:?}"),
        )
        .into()),
    }
}

/// Rewrites every `Ready` to these heartbeat settings.
struct HeartbeatSettings {
    interval_ms: u64,
    timeout_ms: u64,
}

impl Script for HeartbeatSettings {
    fn on_server_frame(&mut self, _conn: usize, frame: &mut ServerFrame) -> Verdict {
        if let ServerFrame::Ready(ready) = frame {
            ready.heartbeat_interval_ms = self.interval_ms;
            ready.heartbeat_timeout_ms = self.timeout_ms;
        }
        Verdict::Forward
    }
}

/// When the client was given `Ready` on each connection.
fn ready_at(events: &[Event]) -> Vec<(usize, Instant)> {
    events
        .iter()
        .filter_map(|e| match &e.what {
            What::ToClient(ServerFrame::Ready(_)) => Some((e.conn, e.at)),
            _ => None,
        })
        .collect()
}

async fn heartbeat_interval(cx: &mut Ctx) -> CaseResult {
    // Well under the gateway's own interval (1 s on the conformance profile, 15 s by
    // default), with the slack: a client that keeps to the gateway's announced setting
    // instead of its Ready's is caught.
    const INTERVAL_MS: u64 = 300;
    const WATCHED: Duration = Duration::from_secs(4);
    let home = initialised_device(cx).await?;
    let client = cx.client(Box::new(HeartbeatSettings {
        interval_ms: INTERVAL_MS,
        timeout_ms: 60_000,
    }))?;
    let end = watch_for(client, home.path(), WATCHED).await?;
    let events = client.proxy.events();
    let Some(&(conn, ready)) = ready_at(&events).first() else {
        return Err(Failure::new("the client to authenticate", "no Ready reached it").into());
    };
    let mut last = ready;
    let mut heartbeats = 0;
    let limit = Duration::from_millis(INTERVAL_MS) + TIMER_SLACK;
    let mut times: Vec<Instant> = sent(&events)
        .filter(|(at, c, _)| *c == conn && *at > ready)
        .map(|(at, _, f)| {
            if matches!(f, ClientFrame::Heartbeat(_)) {
                heartbeats += 1;
            }
            at
        })
        .collect();
    let closed = closed_at(&events, conn).unwrap_or(end);
    times.push(closed.min(end));
    for at in times {
        let gap = at.saturating_duration_since(last);
        if gap > limit {
            return Err(Failure::new(
                format!("a frame at least every {INTERVAL_MS} ms (heartbeat_interval_ms of its Ready; {} ms allowed)", limit.as_millis()),
                format!("{} ms without one, {} ms after Ready", gap.as_millis(), last.duration_since(ready).as_millis()),
            )
            .into());
        }
        last = at;
    }
    if heartbeats == 0 {
        return Err(Failure::new(
            "Heartbeats while nothing else is sent",
            format!("none in 4 s with an interval of {INTERVAL_MS} ms"),
        )
        .into());
    }
    Ok(())
}

/// Connection 1 gets short heartbeat settings and, once `Ready` went through, nothing more
/// from the gateway; later connections are forwarded unchanged.
struct DeadAfterReady {
    interval_ms: u64,
    timeout_ms: u64,
    ready_sent: bool,
}

impl Script for DeadAfterReady {
    fn on_server_frame(&mut self, conn: usize, frame: &mut ServerFrame) -> Verdict {
        if conn != 1 {
            return Verdict::Forward;
        }
        if self.ready_sent {
            return Verdict::Drop;
        }
        if let ServerFrame::Ready(ready) = frame {
            ready.heartbeat_interval_ms = self.interval_ms;
            ready.heartbeat_timeout_ms = self.timeout_ms;
            self.ready_sent = true;
        }
        Verdict::Forward
    }
}

async fn dead_connection(cx: &mut Ctx) -> CaseResult {
    const TIMEOUT_MS: u64 = 1_500;
    let home = initialised_device(cx).await?;
    let client = cx.client(Box::new(DeadAfterReady {
        interval_ms: 500,
        timeout_ms: TIMEOUT_MS,
        ready_sent: false,
    }))?;
    let end = watch_for(client, home.path(), Duration::from_secs(6)).await?;
    let events = client.proxy.events();
    let Some(&(_, ready)) = ready_at(&events).iter().find(|(c, _)| *c == 1) else {
        return Err(Failure::new("the client to authenticate", "no Ready reached it").into());
    };
    let Some(heartbeat) = sent(&events)
        .find(|(at, c, f)| *c == 1 && *at > ready && matches!(f, ClientFrame::Heartbeat(_)))
        .map(|(at, _, _)| at)
    else {
        return Err(Failure::new(
            "a Heartbeat once heartbeat_interval_ms (500) passed",
            "none on the silent connection",
        )
        .into());
    };
    let closed = events
        .iter()
        .find(|e| e.conn == 1 && e.at < end && matches!(e.what, What::ClientClosed(_)))
        .map(|e| e.at);
    let Some(closed) = closed else {
        return Err(Failure::new(
            format!(
                "the client to close the connection {TIMEOUT_MS} ms after its unanswered Heartbeat"
            ),
            "it kept it open for the 6 s watched",
        )
        .into());
    };
    let waited = closed.saturating_duration_since(heartbeat);
    if waited > Duration::from_millis(TIMEOUT_MS) + TIMER_SLACK {
        return Err(Failure::new(
            format!("a close {TIMEOUT_MS} ms after the unanswered Heartbeat"),
            format!("{} ms after it", waited.as_millis()),
        )
        .into());
    }
    let Some(reopened) = opened_at(&events, 2) else {
        return Err(Failure::new(
            "a reconnect (SPEC.md 5.8) after the dead connection",
            "no new connection",
        )
        .into());
    };
    if reopened < closed {
        return Err(Failure::new("the reconnect after the close", "it came before").into());
    }
    Ok(())
}

/// Closes connection 1 with `code` at the client's first frame after `Ready`.
struct CloseAfterReady {
    code: u16,
    ready_sent: bool,
}

impl Script for CloseAfterReady {
    fn on_server_frame(&mut self, conn: usize, frame: &mut ServerFrame) -> Verdict {
        if conn == 1 && matches!(frame, ServerFrame::Ready(_)) {
            self.ready_sent = true;
        }
        Verdict::Forward
    }

    fn on_client_frame(&mut self, conn: usize, _frame: &ClientFrame) -> Verdict {
        if conn == 1 && self.ready_sent {
            return Verdict::Close {
                error: None,
                code: self.code,
            };
        }
        Verdict::Forward
    }
}

async fn no_reconnect_after_fatal_close(cx: &mut Ctx) -> CaseResult {
    let home = initialised_device(cx).await?;
    let client = cx.client(Box::new(CloseAfterReady {
        code: 4104,
        ready_sent: false,
    }))?;
    watch_for(client, home.path(), Duration::from_secs(4)).await?;
    let events = client.proxy.events();
    if !events
        .iter()
        .any(|e| e.conn == 1 && matches!(e.what, What::ProxyClosed(4104)))
    {
        return Err(Failure::new(
            "the client to send a frame after Ready (the case closes then)",
            "it did not",
        )
        .into());
    }
    let n = connections(&events);
    if n > 1 {
        return Err(Failure::new(
            "no connection after the close with 4104 (a 41xx code: no automatic reconnect)",
            format!("{} more connection(s) in 4 s", n - 1),
        )
        .into());
    }
    Ok(())
}

/// Lets connection 1 reach `Ready` and closes it with 4000 at the client's next frame (a
/// gateway restarting); refuses every later connection with 4000 before the gateway hears
/// of it, so that every reconnection attempt fails.
#[derive(Default)]
struct RestartThenRefuse {
    ready_sent: bool,
}

impl Script for RestartThenRefuse {
    fn on_open(&mut self, conn: usize) -> Option<Verdict> {
        (conn > 1).then_some(Verdict::Close {
            error: None,
            code: 4000,
        })
    }

    fn on_server_frame(&mut self, _conn: usize, frame: &mut ServerFrame) -> Verdict {
        if matches!(frame, ServerFrame::Ready(_)) {
            self.ready_sent = true;
        }
        Verdict::Forward
    }

    fn on_client_frame(&mut self, _conn: usize, _frame: &ClientFrame) -> Verdict {
        if self.ready_sent {
            return Verdict::Close {
                error: None,
                code: 4000,
            };
        }
        Verdict::Forward
    }
}

async fn backoff(cx: &mut Ctx) -> CaseResult {
    // With full jitter (base 250 ms, cap 30 s), attempts 1..=14 after the close
    // wait on average 0.125 + 0.25 + 0.5 + ... s; fitting 14 of them into 5 s needs the
    // five or more waits drawn from [0, 30 s) to be under 5 s each: probability < 1e-5.
    // A client without backoff makes hundreds; one with a fixed 300 ms delay, 16.
    const WINDOW: Duration = Duration::from_secs(5);
    const ATTEMPTS_MAX: usize = 14;
    let home = initialised_device(cx).await?;
    let client = cx.client(Box::<RestartThenRefuse>::default())?;
    watch_for(client, home.path(), WINDOW + Duration::from_secs(1)).await?;
    let events = client.proxy.events();
    let Some(first) = closed_at(&events, 1) else {
        return Err(Failure::new("the client to connect", "it did not").into());
    };
    let retries = events
        .iter()
        .filter(|e| matches!(e.what, What::Opened) && e.at > first && e.at <= first + WINDOW)
        .count();
    if retries > ATTEMPTS_MAX {
        return Err(Failure::new(
            format!("at most {ATTEMPTS_MAX} attempts within 5 s of a close 4000 when every attempt fails (full-jitter backoff from 250 ms)"),
            format!("{retries} attempts"),
        )
        .into());
    }
    Ok(())
}

/// Refuses connections 1 and 2 with an `Error` carrying `retry_after_ms` and a close 4003.
struct Overloaded {
    retry_after_ms: [u64; 2],
}

impl Script for Overloaded {
    fn on_open(&mut self, conn: usize) -> Option<Verdict> {
        let retry_after_ms = *self.retry_after_ms.get(conn.checked_sub(1)?)?;
        let mut error = ErrorFrame::new(ErrorCode::Overloaded);
        error.retry_after_ms = Some(retry_after_ms);
        Some(Verdict::Close {
            error: Some(error),
            code: 4003,
        })
    }
}

async fn retry_after(cx: &mut Ctx) -> CaseResult {
    let waits = [2_000, 1_500];
    let home = initialised_device(cx).await?;
    let client = cx.client(Box::new(Overloaded {
        retry_after_ms: waits,
    }))?;
    watch_for(client, home.path(), Duration::from_secs(8)).await?;
    let events = client.proxy.events();
    for (i, wait) in waits.iter().enumerate() {
        let conn = i + 1;
        let Some(closed) = closed_at(&events, conn) else {
            return Err(Failure::new("the client to connect", "it did not").into());
        };
        let Some(next) = opened_at(&events, conn + 1) else {
            return Err(crate::case::Stop::Skipped(format!(
                "the client did not reconnect after close 4003 (a SHOULD, SPEC.md 5.7), so \
                 its wait cannot be measured (attempt {conn})"
            )));
        };
        let waited = next.saturating_duration_since(closed);
        if waited < Duration::from_millis(*wait) {
            return Err(Failure::new(
                format!("at least retry_after_ms ({wait} ms) before the next attempt"),
                format!("{} ms (attempt {})", waited.as_millis(), conn + 1),
            )
            .into());
        }
    }
    Ok(())
}

/// Swallows the first application `Send` and closes its connection with 4000.
#[derive(Default)]
struct CutFirstSend {
    cut: bool,
}

impl Script for CutFirstSend {
    fn on_client_frame(&mut self, _conn: usize, frame: &ClientFrame) -> Verdict {
        match frame {
            ClientFrame::Send(s) if !self.cut && is_application(s) => {
                self.cut = true;
                Verdict::Close {
                    error: None,
                    code: 4000,
                }
            }
            _ => Verdict::Forward,
        }
    }
}

async fn resends_same_message(cx: &mut Ctx) -> CaseResult {
    let client = cx.client(Box::new(PassThrough))?;
    let home = home()?;
    device_with_room(client, home.path(), "resend").await?;
    let client = cx.client(Box::<CutFirstSend>::default())?;
    let sent = client
        .run(home.path(), &["send", "resend", "sent twice, shown once"])
        .await;
    // A resend under another msg_id is the failure to report, even when it left the
    // client waiting for an answer to the first one until the action timed out.
    if let [first, again, ..] = application_sends(&client.proxy.events())[..] {
        same_message(first, again)?;
    }
    if !sent?.success {
        // A client may leave the message in its outbox and send it on the next
        // connection.
        client.run_ok(home.path(), &["read", "resend"]).await?;
    }
    let events = client.proxy.events();
    let sends = application_sends(&events);
    let Some(first) = sends.first() else {
        return Err(Failure::new("the client to send its message", "no application Send").into());
    };
    let Some(again) = sends.get(1) else {
        return Err(Failure::new(
            "the cut-off Send sent again after reconnecting",
            "it was not sent again",
        )
        .into());
    };
    same_message(first, again)
}

/// `again` is `first` sent again: same msg_id, conversation and payload.
fn same_message(first: &Send, again: &Send) -> CaseResult {
    if again.msg_id != first.msg_id
        || again.payload != first.payload
        || again.conversation != first.conversation
    {
        return Err(Failure::new(
            format!(
                "the same msg_id ({}) and payload",
                hex::encode(first.msg_id.0)
            ),
            format!(
                "msg_id {}, payload {}",
                hex::encode(again.msg_id.0),
                if again.payload == first.payload {
                    "the same"
                } else {
                    "different"
                }
            ),
        )
        .into());
    }
    Ok(())
}

/// Every KeyPackage the client uploaded (`init` publishes its pool).
async fn uploaded_key_packages(
    cx: &mut Ctx,
) -> Result<Vec<mls_framing::KeyPackageInfo>, crate::case::Stop> {
    let client = cx.client(Box::new(PassThrough))?;
    let home = home()?;
    client.run_ok(home.path(), &["init"]).await?;
    let events = client.proxy.events();
    let mut out = Vec::new();
    for (_, _, frame) in sent(&events) {
        if let ClientFrame::UploadKeyPackages(up) = frame {
            for kp in up.key_packages.iter().chain(up.last_resort.as_ref()) {
                let info = mls_framing::key_package(kp.as_bytes()).map_err(|e| {
                    Failure::new(
                        "KeyPackages as RFC 9420 defines them",
                        format!("one does not read: {e}"),
                    )
                })?;
                out.push(info);
            }
        }
    }
    if out.is_empty() {
        return Err(Failure::new("init to publish KeyPackages", "no UploadKeyPackages").into());
    }
    Ok(out)
}

async fn key_package_ciphersuite(cx: &mut Ctx) -> CaseResult {
    for kp in uploaded_key_packages(cx).await? {
        if kp.cipher_suite != 1 {
            return Err(Failure::new(
                "ciphersuite 0x0001 (MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519)",
                format!("a KeyPackage of ciphersuite {:#06x}", kp.cipher_suite),
            )
            .into());
        }
    }
    Ok(())
}

async fn key_package_capability(cx: &mut Ctx) -> CaseResult {
    for kp in uploaded_key_packages(cx).await? {
        if !kp.extension_types.contains(&ROLES_EXTENSION_TYPE) {
            return Err(Failure::new(
                "0xf0c0 among the leaf capabilities' extensions",
                format!("a KeyPackage listing {:04x?}", kp.extension_types),
            )
            .into());
        }
    }
    Ok(())
}

async fn wire_formats(cx: &mut Ctx) -> CaseResult {
    let client = cx.client(Box::new(PassThrough))?;
    let home = home()?;
    device_with_room(client, home.path(), "formats").await?;
    client
        .run_ok(home.path(), &["send", "formats", "one"])
        .await?;
    client
        .run_ok(home.path(), &["send", "formats", "two"])
        .await?;
    let events = client.proxy.events();
    let mut applications = 0;
    for (_, conn, frame) in sent(&events) {
        let ClientFrame::Send(send) = frame else {
            continue;
        };
        let framing = match mls_framing::peek(send.payload.as_bytes()) {
            Ok(Peek::Framed(f)) => f,
            Ok(Peek::Unframed(w)) => {
                return Err(Failure::new(
                    "Send payloads framed as PublicMessage or PrivateMessage",
                    format!("{w:?} on connection {conn}"),
                )
                .into());
            }
            Err(e) => {
                return Err(
                    Failure::new("Send payloads that are MLSMessages", e.to_string()).into(),
                );
            }
        };
        let wanted = match framing.content_type {
            ContentType::Application => {
                applications += 1;
                WireFormat::PrivateMessage
            }
            _ => WireFormat::PublicMessage,
        };
        if framing.wire_format != wanted {
            return Err(Failure::new(
                format!("{:?} content as {wanted:?}", framing.content_type),
                format!("{:?} on connection {conn}", framing.wire_format),
            )
            .into());
        }
    }
    if applications < 2 {
        return Err(Failure::new(
            "two application messages",
            format!("{applications} application Send(s)"),
        )
        .into());
    }
    Ok(())
}

/// Answers the first `Subscribe` on connection 1 itself (the gateway never sees it) with an
/// `Error` of `code`, and `rid` when `with_rid`; forwards the rest.
struct AnswerSubscribe {
    code: u16,
    with_rid: bool,
    answered: bool,
}

impl Script for AnswerSubscribe {
    fn on_client_frame(&mut self, conn: usize, frame: &ClientFrame) -> Verdict {
        let ClientFrame::Subscribe(subscribe) = frame else {
            return Verdict::Forward;
        };
        if conn != 1 || self.answered {
            return Verdict::Forward;
        }
        self.answered = true;
        let mut error = ErrorFrame::new(ErrorCode::from_value(self.code));
        if self.with_rid {
            error.rid = Some(subscribe.rid);
        }
        Verdict::Answer(ServerFrame::Error(error))
    }
}

async fn unknown_error_codes(cx: &mut Ctx) -> CaseResult {
    const WATCHED: Duration = Duration::from_secs(3);
    let client = cx.client(Box::new(PassThrough))?;
    let home = home()?;
    client.run_ok(home.path(), &["init"]).await?;
    // 3xx: the one request failed; the connection stays.
    let client = cx.client(Box::new(AnswerSubscribe {
        code: 399,
        with_rid: true,
        answered: false,
    }))?;
    let end = watch_for(client, home.path(), WATCHED).await?;
    let events = client.proxy.events();
    let Some(answered) = events
        .iter()
        .find(|e| e.conn == 1 && matches!(e.what, What::ToClient(ServerFrame::Error(_))))
        .map(|e| e.at)
    else {
        return Err(
            Failure::new("the client to subscribe", "no Subscribe on its connection").into(),
        );
    };
    if let Some(closed) = closed_at(&events, 1).filter(|at| *at < end) {
        return Err(Failure::new(
            "an unknown 3xx code to fail only its request: the connection stays",
            format!(
                "the client closed the connection {} ms after the Error 399",
                closed.saturating_duration_since(answered).as_millis()
            ),
        )
        .into());
    }
    // 1xx: fatal for the connection.
    let client = cx.client(Box::new(AnswerSubscribe {
        code: 199,
        with_rid: false,
        answered: false,
    }))?;
    let end = watch_for(client, home.path(), WATCHED).await?;
    let events = client.proxy.events();
    if !events
        .iter()
        .any(|e| e.conn == 1 && matches!(e.what, What::ToClient(ServerFrame::Error(_))))
    {
        return Err(
            Failure::new("the client to subscribe", "no Subscribe on its connection").into(),
        );
    }
    // The kill at the end also ends the connection: only a close before it counts.
    match events
        .iter()
        .find(|e| e.conn == 1 && e.at < end && matches!(e.what, What::ClientClosed(_)))
    {
        Some(_) => Ok(()),
        None => Err(Failure::new(
            "an unknown 1xx code to end the connection: the client closes it",
            format!(
                "it kept the connection open for the {} s watched",
                WATCHED.as_secs()
            ),
        )
        .into()),
    }
}

pub(super) fn is_commit(send: &Send) -> bool {
    matches!(
        mls_framing::peek(send.payload.as_bytes()),
        Ok(Peek::Framed(f)) if f.content_type == ContentType::Commit
    )
}

/// Swallows every Commit the client sends (no answer) and remembers the first's msg_id.
#[derive(Default)]
struct SwallowCommits {
    swallowed: Option<confab_spec::ids::MsgId>,
}

impl Script for SwallowCommits {
    fn on_client_frame(&mut self, _conn: usize, frame: &ClientFrame) -> Verdict {
        match frame {
            ClientFrame::Send(s) if is_commit(s) => {
                self.swallowed.get_or_insert(s.msg_id);
                Verdict::Drop
            }
            _ => Verdict::Forward,
        }
    }
}

/// A suite user with KeyPackages on the gateway, for the client to invite.
async fn invitee(cx: &Ctx) -> Result<confab_spec::ids::SystemKey, crate::case::Stop> {
    let (_, member) = invitee_member(cx).await?;
    Ok(member.device.system.public())
}

/// [`invitee`], with its connection and MLS state.
pub(super) async fn invitee_member(
    cx: &Ctx,
) -> Result<(crate::context::Peer, crate::mls::Member), crate::case::Stop> {
    let device = crate::context::Device::fresh();
    let (mut peer, ready) = cx.ready("invitee", &device).await?;
    let mut member = crate::mls::Member::new(
        device,
        confab_client::mls::EngineKind::OpenMls,
        ready.server_time_ms,
    )?;
    let key_packages = member.key_packages(2, false)?;
    let last_resort = member.key_packages(1, true)?.pop();
    peer.send(&ClientFrame::UploadKeyPackages(
        confab_spec::frame::UploadKeyPackages {
            rid: 1,
            key_packages,
            last_resort,
        },
    ))
    .await?;
    peer.expect("KeyPackagesStored", |f| match f {
        ServerFrame::KeyPackagesStored(s) if s.rid == 1 => Some(()),
        _ => None,
    })
    .await?;
    Ok((peer, member))
}

async fn no_send_with_pending_commit(cx: &mut Ctx) -> CaseResult {
    let invited = hex::encode(invitee(cx).await?.0);
    let client = cx.client(Box::new(PassThrough))?;
    let home = home()?;
    device_with_room(client, home.path(), "pending").await?;
    // The invite's Commit never reaches the gateway, and the client hears nothing of it.
    let client = cx.client(Box::<SwallowCommits>::default())?;
    let invite = client.spawn(home.path(), &["room", "invite", "pending", &invited])?;
    let swallowed = client
        .wait_for(ACTION_WAIT, Duration::from_millis(50), |events| {
            sent(events).find_map(|(_, _, f)| match f {
                ClientFrame::Send(s) if is_commit(s) => Some(s.msg_id),
                _ => None,
            })
        })
        .await;
    let Some(swallowed) = swallowed else {
        invite.stop().await;
        return Err(Failure::new("`room invite` to send a Commit", "no Commit within 10 s").into());
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    invite.stop().await;
    let held = client.proxy.events();
    if let Some(s) = application_sends(&held).first() {
        return Err(Failure::new(
            "no application message while the Commit is unanswered",
            format!("msg_id {} sent during the invite", hex::encode(s.msg_id.0)),
        )
        .into());
    }
    // Now a message: the client must first settle the Commit (resend it, get its answer).
    let client = cx.client(Box::new(PassThrough))?;
    client
        .run_ok(home.path(), &["send", "pending", "after the commit"])
        .await?;
    let events = client.proxy.events();
    let mut pending = std::collections::BTreeSet::from([swallowed]);
    let mut commit_of_rid = std::collections::BTreeMap::new();
    let mut applications = 0;
    for e in &events {
        match &e.what {
            What::FromClient(Some(ClientFrame::Send(s)), _) if is_commit(s) => {
                pending.insert(s.msg_id);
                commit_of_rid.insert((e.conn, s.rid), s.msg_id);
            }
            What::FromClient(Some(ClientFrame::Send(s)), _) if is_application(s) => {
                applications += 1;
                if let Some(commit) = pending.first() {
                    return Err(Failure::new(
                        "no application message while a Commit of its own is unanswered",
                        format!(
                            "msg_id {} sent while Commit {} waited for its answer",
                            hex::encode(s.msg_id.0),
                            hex::encode(commit.0)
                        ),
                    )
                    .into());
                }
            }
            What::ToClient(ServerFrame::Accepted(a)) => {
                if let Some(id) = commit_of_rid.get(&(e.conn, a.rid)) {
                    pending.remove(id);
                }
            }
            What::ToClient(ServerFrame::Error(err)) => {
                if let Some(id) = err.rid.and_then(|rid| commit_of_rid.get(&(e.conn, rid))) {
                    pending.remove(id);
                }
            }
            What::ToClient(ServerFrame::Deliver(d)) => {
                pending.remove(&d.entry.msg_id);
            }
            What::ToClient(ServerFrame::Batch(b)) => {
                for entry in &b.entries {
                    pending.remove(&entry.msg_id);
                }
            }
            _ => {}
        }
    }
    if applications == 0 {
        return Err(Failure::new("the message sent", "no application Send").into());
    }
    Ok(())
}

/// Three messages the suite sent into a room it owns and added the client's device to.
struct Delivered {
    /// The texts, in the order sent (entries of increasing seq).
    texts: Vec<String>,
    /// The room.
    room: confab_spec::ids::ConversationId,
    /// The owner's connection.
    peer: crate::context::Peer,
    /// The owner's MLS state.
    owner: crate::mls::Member,
    /// The room's roles.
    roles: confab_spec::rooms::RoomRoles,
    /// The next request id on `peer`.
    rid: u64,
}

impl Delivered {
    /// The owner commits nothing but the room's roles, unchanged (a room's Commits state
    /// them, SPEC.md 10.1), and merges it once accepted: the group moves one epoch on.
    /// Returns the Commit's seq.
    async fn commit_roles(&mut self) -> Result<u64, crate::case::Stop> {
        use crate::cases::log::{random, send_commit};
        use crate::mls::broken;

        let extra = [confab_client::mls::ExtraProposal::GroupContextExtensions(
            self.roles.context_extensions(),
        )];
        let commit = self
            .owner
            .engine
            .commit(&self.room, &[], &[], &extra, true)
            .map_err(|e| broken("commit", e))?;
        self.rid += 1;
        let msg_id = confab_spec::ids::MsgId(random());
        let (seq, _) = send_commit(&mut self.peer, self.rid, self.room, msg_id, &commit)
            .await?
            .map_err(|e| broken("commit", crate::context::describe_error(&e)))?;
        self.owner
            .engine
            .merge_pending_commit(&self.room)
            .map_err(|e| broken("merge", e))?;
        Ok(seq)
    }
}

/// Makes the client's device (`init` under pass-through) a member of a room the suite
/// owns, and sends three messages there; the client has not read anything yet.
async fn suite_room_with_client(
    cx: &Ctx,
    client: &ClientUnderTest,
    home: &std::path::Path,
    client_is_admin: bool,
) -> Result<Delivered, crate::case::Stop> {
    use confab_spec::frame::{ClaimKeyPackages, ConversationKind};
    use confab_spec::ids::{ConversationId, MsgId};
    use confab_spec::rooms::RoomRoles;

    use crate::cases::log::{random, send_mls};
    use crate::mls::{broken, bytes};

    client.run_ok(home, &["init"]).await?;
    let events = client.proxy.events();
    let Some(user) = authenticated_as(&events).map(|c| c.system) else {
        return Err(Failure::new("init to authenticate", "no Auth").into());
    };
    let device = crate::context::Device::fresh();
    let (mut peer, ready) = cx.ready("owner", &device).await?;
    let mut owner = crate::mls::Member::new(
        device,
        confab_client::mls::EngineKind::OpenMls,
        ready.server_time_ms,
    )?;
    let id = ConversationId(random());
    let roles = RoomRoles::new(owner.device.id().system);
    let frame = owner.create_frame(1, id, ConversationKind::Room, &roles.context_extensions())?;
    peer.send(&frame).await?;
    peer.expect("Created", |f| match f {
        ServerFrame::Created(c) if c.rid == 1 => Some(()),
        _ => None,
    })
    .await?;
    peer.send(&ClientFrame::ClaimKeyPackages(ClaimKeyPackages {
        rid: 2,
        user,
        devices: None,
    }))
    .await?;
    let claimed = peer
        .expect("KeyPackagesClaimed", |f| match f {
            ServerFrame::KeyPackagesClaimed(c) if c.rid == 2 => Some(c.claimed.clone()),
            _ => None,
        })
        .await?;
    let packages: Vec<Vec<u8>> = claimed
        .iter()
        .map(|c| c.key_package.as_bytes().to_vec())
        .collect();
    // The room's first Commit states its roles (SPEC.md 10.1), as every client's does;
    // the owner may make the client's user an admin in it.
    let mut roles = roles;
    if client_is_admin {
        roles.admins = vec![user];
    }
    let extra = [confab_client::mls::ExtraProposal::GroupContextExtensions(
        roles.context_extensions(),
    )];
    let out = owner
        .engine
        .commit(&id, &packages, &[], &extra, true)
        .map_err(|e| broken("commit", e))?;
    crate::cases::log::send_commit(&mut peer, 3, id, MsgId(random()), &out)
        .await?
        .map_err(|e| {
            broken(
                "add the client to a room",
                crate::context::describe_error(&e),
            )
        })?;
    owner
        .engine
        .merge_pending_commit(&id)
        .map_err(|e| broken("merge", e))?;
    // The suite's owner is a stranger to the client: a client that holds such invitations
    // as requests (SPEC.md 10.5) accepts it now, before anything is sent into the room. A
    // client that joined at once may refuse the action; that is not this case's concern.
    let acceptor = cx.client(Box::new(PassThrough))?;
    let _ = acceptor.run(home, &["accept", &hex::encode(id.0)]).await?;
    let mut texts = Vec::new();
    for i in 0..3u64 {
        let text = format!("message {i} {}", hex::encode(random::<8>()));
        let payload = owner
            .engine
            .encrypt(&id, text.as_bytes())
            .map_err(|e| broken("encrypt", e))?;
        send_mls(&mut peer, 4 + i, id, MsgId(random()), bytes(payload)?, None)
            .await?
            .map_err(|e| broken("send a message", crate::context::describe_error(&e)))?;
        texts.push(text);
    }
    Ok(Delivered {
        texts,
        room: id,
        peer,
        owner,
        roles,
        rid: 7,
    })
}

/// Whether a frame carries a conversation's entries.
fn conversation_batch(frame: &mut ServerFrame) -> Option<&mut confab_spec::frame::Batch> {
    match frame {
        ServerFrame::Batch(b)
            if matches!(b.stream, confab_spec::ids::StreamId::Conversation(_))
                && !b.entries.is_empty() =>
        {
            Some(b)
        }
        _ => None,
    }
}

/// Delivers every entry of a conversation's replay twice (each right after itself, then
/// the older ones again after the newest: `1 1 2 2 3 3 1 2`).
struct Repeat;

impl Script for Repeat {
    fn on_server_frame(&mut self, _conn: usize, frame: &mut ServerFrame) -> Verdict {
        if let Some(batch) = conversation_batch(frame) {
            let mut entries = Vec::new();
            for e in &batch.entries {
                entries.push(e.clone());
                entries.push(e.clone());
            }
            let n = batch.entries.len();
            entries.extend(batch.entries[..n.saturating_sub(1)].iter().cloned());
            batch.entries = entries;
        }
        Verdict::Forward
    }
}

/// How many times `text` is in `output`.
fn shown(output: &str, text: &str) -> usize {
    output.matches(text).count()
}

async fn drops_duplicates(cx: &mut Ctx) -> CaseResult {
    let client = cx.client(Box::new(PassThrough))?;
    let home = home()?;
    let delivered = suite_room_with_client(cx, client, home.path(), false).await?;
    let client = cx.client(Box::new(Repeat))?;
    let out = client.run_ok(home.path(), &["read"]).await?;
    for text in &delivered.texts {
        let n = shown(&out.stdout, text);
        if n != 1 {
            return Err(Failure::new(
                format!("{text:?} shown once by `read`"),
                format!("shown {n} times"),
            )
            .into());
        }
    }
    Ok(())
}

async fn ack_cursor_forward(cx: &mut Ctx) -> CaseResult {
    let client = cx.client(Box::new(PassThrough))?;
    let home = home()?;
    suite_room_with_client(cx, client, home.path(), false).await?;
    let client = cx.client(Box::new(Repeat))?;
    client.run_ok(home.path(), &["read"]).await?;
    let events = client.proxy.events();
    let mut highest = std::collections::BTreeMap::new();
    let mut acks = 0;
    for (_, conn, frame) in sent(&events) {
        if let ClientFrame::Ack(ack) = frame {
            acks += 1;
            let seq = ack.seq.get();
            let top = highest.entry(ack.stream).or_insert(seq);
            if seq < *top {
                return Err(Failure::new(
                    format!("acks on {:?} that never go below {top}", ack.stream),
                    format!("Ack of seq {seq} on connection {conn}"),
                )
                .into());
            }
            *top = seq;
        }
    }
    if acks == 0 {
        return Err(Failure::new("the client to ack what it read", "no Ack").into());
    }
    Ok(())
}

/// Leaves the second entry out of the first conversation replay of two entries or more.
#[derive(Default)]
struct Gap {
    dropped: Option<(confab_spec::ids::StreamId, u64)>,
}

impl Script for Gap {
    fn on_server_frame(&mut self, _conn: usize, frame: &mut ServerFrame) -> Verdict {
        if self.dropped.is_none()
            && let Some(batch) = conversation_batch(frame)
            && batch.entries.len() >= 2
        {
            let gone = batch.entries.remove(1);
            self.dropped = Some((batch.stream, gone.seq.get()));
        }
        Verdict::Forward
    }
}

async fn resubscribes_at_a_gap(cx: &mut Ctx) -> CaseResult {
    let client = cx.client(Box::new(PassThrough))?;
    let home = home()?;
    let delivered = suite_room_with_client(cx, client, home.path(), false).await?;
    let client = cx.client(Box::<Gap>::default())?;
    let out = client.run_ok(home.path(), &["read"]).await?;
    let events = client.proxy.events();
    // The seq left out: the entry after the first of that batch.
    let Some((stream, missing)) = events.iter().find_map(|e| match &e.what {
        What::ToClient(ServerFrame::Batch(b))
            if matches!(b.stream, confab_spec::ids::StreamId::Conversation(_))
                && b.entries.len() >= 2
                && b.entries[1].seq.get() != b.entries[0].seq.get() + 1 =>
        {
            Some((b.stream, b.entries[0].seq.get() + 1))
        }
        _ => None,
    }) else {
        return Err(Failure::new(
            "the client to replay the room (the case leaves an entry out)",
            "no replay of two entries or more",
        )
        .into());
    };
    let mut gap_seen = false;
    let mut resubscribed = false;
    for e in &events {
        match &e.what {
            What::ToClient(ServerFrame::Batch(b))
                if b.stream == stream
                    && b.entries.len() >= 2
                    && b.entries[1].seq.get() != b.entries[0].seq.get() + 1 =>
            {
                gap_seen = true;
            }
            What::FromClient(Some(ClientFrame::Ack(a)), _)
                if a.stream == stream && gap_seen && !resubscribed && a.seq.get() >= missing =>
            {
                return Err(Failure::new(
                    format!("nothing acked past the gap at seq {missing} before it is filled"),
                    format!("Ack of seq {} on connection {}", a.seq.get(), e.conn),
                )
                .into());
            }
            What::FromClient(Some(ClientFrame::Subscribe(s)), _)
                if gap_seen
                    && s.stream == stream
                    && s.from_seq.is_none_or(|f| f.get() <= missing) =>
            {
                resubscribed = true;
            }
            _ => {}
        }
    }
    if !resubscribed {
        return Err(Failure::new(
            format!("a Subscribe from seq {missing} (the first missing one) after the gap"),
            "none",
        )
        .into());
    }
    for text in &delivered.texts {
        if shown(&out.stdout, text) != 1 {
            return Err(Failure::new(
                format!("{text:?} shown once after the gap was filled"),
                format!("shown {} times", shown(&out.stdout, text)),
            )
            .into());
        }
    }
    Ok(())
}

/// In the first conversation replay, gives the third application entry the msg_id of the
/// second (a gateway fault).
#[derive(Default)]
struct ReuseMsgId {
    done: bool,
}

impl Script for ReuseMsgId {
    fn on_server_frame(&mut self, _conn: usize, frame: &mut ServerFrame) -> Verdict {
        if self.done {
            return Verdict::Forward;
        }
        if let Some(batch) = conversation_batch(frame) {
            let apps: Vec<usize> = batch
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| {
                    matches!(e.body, confab_spec::frame::EntryBody::Application { .. })
                })
                .map(|(i, _)| i)
                .collect();
            if let [_, second, third, ..] = apps[..] {
                batch.entries[third].msg_id = batch.entries[second].msg_id;
                self.done = true;
            }
        }
        Verdict::Forward
    }
}

async fn refuses_reused_msg_id(cx: &mut Ctx) -> CaseResult {
    let client = cx.client(Box::new(PassThrough))?;
    let home = home()?;
    let delivered = suite_room_with_client(cx, client, home.path(), false).await?;
    let client = cx.client(Box::<ReuseMsgId>::default())?;
    let out = client.run(home.path(), &["read"]).await?;
    let events = client.proxy.events();
    let rewritten = events
        .iter()
        .any(|e| matches!(&e.what, What::ToClient(ServerFrame::Batch(b)) if b.entries.len() >= 3));
    if !rewritten {
        return Err(Failure::new(
            "the client to replay the room's three messages at once",
            "no such replay",
        )
        .into());
    }
    for (i, text) in delivered.texts.iter().enumerate() {
        let n = shown(&out.stdout, text);
        let (want, why) = if i == 2 {
            (
                0,
                "not shown: its msg_id was already processed under another seq",
            )
        } else {
            (1, "shown once")
        };
        if n != want {
            return Err(Failure::new(format!("{text:?} {why}"), format!("shown {n} times")).into());
        }
    }
    Ok(())
}

/// Answers the client's `ClaimKeyPackages` itself with one package: `bad`, of `device`.
struct ClaimAnswer {
    device: confab_spec::ids::DeviceId,
    bad: confab_spec::ids::MlsBytes,
}

impl Script for ClaimAnswer {
    fn on_client_frame(&mut self, _conn: usize, frame: &ClientFrame) -> Verdict {
        match frame {
            ClientFrame::ClaimKeyPackages(claim) => Verdict::Answer(
                ServerFrame::KeyPackagesClaimed(confab_spec::frame::KeyPackagesClaimed {
                    rid: claim.rid,
                    user: claim.user,
                    claimed: vec![confab_spec::frame::ClaimedKeyPackage {
                        device: self.device,
                        key_package: self.bad.clone(),
                        last_resort: false,
                    }],
                }),
            ),
            _ => Verdict::Forward,
        }
    }
}

async fn rejects_bad_key_packages(cx: &mut Ctx) -> CaseResult {
    use confab_spec::identity::DeviceKeyPair;
    use confab_spec::ids::UnixMs;
    use confab_spec::session::DeviceCredentials;

    let now = UnixMs(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    );
    let day = 86_400_000;
    // An expired certificate, and a valid one naming another key than the one that signs.
    let expired = crate::context::Device::fresh();
    let expired_credentials = DeviceCredentials {
        key: DeviceKeyPair::from_seed(&expired.key.seed()),
        certificate: expired.certificate_between(UnixMs(now.0 - 2 * day), UnixMs(now.0 - day)),
    };
    let other_key = crate::context::Device::fresh();
    let stranger = crate::context::Device::fresh();
    let stranger_credentials = DeviceCredentials {
        key: DeviceKeyPair::from_seed(&other_key.key.seed()),
        certificate: stranger.certificate_between(UnixMs(now.0 - day), UnixMs(now.0 + day)),
    };
    // And a good one, answered the same way: the client must add that one (so that the
    // case sees a refusal of the bad ones, not of the way they were handed over).
    let good = crate::context::Device::fresh();
    let good_credentials = DeviceCredentials {
        key: DeviceKeyPair::from_seed(&good.key.seed()),
        certificate: good.certificate_between(UnixMs(now.0 - day), UnixMs(now.0 + day)),
    };
    let client = cx.client(Box::new(PassThrough))?;
    let home = home()?;
    device_with_room(client, home.path(), "careful").await?;
    for (what, device, credentials) in [
        ("an expired certificate", expired, expired_credentials),
        (
            "a certificate of another key than the leaf's",
            stranger,
            stranger_credentials,
        ),
        ("", good, good_credentials),
    ] {
        let id = device.id();
        let user = hex::encode(device.system.public().0);
        let mut member = crate::mls::Member::with_credentials(
            device,
            confab_client::mls::EngineKind::OpenMls,
            credentials,
        )?;
        let Some(bad) = member.key_packages(1, false)?.pop() else {
            return Err(crate::mls::broken("make a KeyPackage", "none made"));
        };
        let client = cx.client(Box::new(ClaimAnswer { device: id, bad }))?;
        client
            .run(home.path(), &["room", "invite", "careful", &user])
            .await?;
        let events = client.proxy.events();
        if !sent(&events).any(|(_, _, f)| matches!(f, ClientFrame::ClaimKeyPackages(_))) {
            return Err(Failure::new("`room invite` to claim KeyPackages", "no claim").into());
        }
        let commit =
            sent(&events).find(|(_, _, f)| matches!(f, ClientFrame::Send(s) if is_commit(s)));
        if what.is_empty() {
            if commit.is_none() {
                return Err(Failure::new(
                    "a valid KeyPackage handed over the same way added: a Commit",
                    "no Commit",
                )
                .into());
            }
        } else if let Some((_, conn, _)) = commit {
            return Err(Failure::new(
                format!("a KeyPackage whose leaf has {what} refused: no Commit adding it"),
                format!("a Commit on connection {conn}"),
            )
            .into());
        }
    }
    Ok(())
}

/// Answers every Commit the client sends with `forbidden` (303) itself: the gateway never
/// sees it.
struct RefuseCommits;

impl Script for RefuseCommits {
    fn on_client_frame(&mut self, _conn: usize, frame: &ClientFrame) -> Verdict {
        match frame {
            ClientFrame::Send(s) if is_commit(s) => {
                let mut error = ErrorFrame::new(ErrorCode::Forbidden);
                error.rid = Some(s.rid);
                Verdict::Answer(ServerFrame::Error(error))
            }
            _ => Verdict::Forward,
        }
    }
}

/// The epoch in an MLS message's framing.
fn epoch_of(send: &Send) -> Option<u64> {
    match mls_framing::peek(send.payload.as_bytes()) {
        Ok(Peek::Framed(f)) => Some(f.epoch),
        _ => None,
    }
}

async fn keeps_commit_pending(cx: &mut Ctx) -> CaseResult {
    let invited = hex::encode(invitee(cx).await?.0);
    let client = cx.client(Box::new(PassThrough))?;
    let home = home()?;
    device_with_room(client, home.path(), "early").await?;
    let client = cx.client(Box::new(RefuseCommits))?;
    client
        .run(home.path(), &["room", "invite", "early", &invited])
        .await?;
    let events = client.proxy.events();
    let Some(commit_epoch) = sent(&events).find_map(|(_, _, f)| match f {
        ClientFrame::Send(s) if is_commit(s) => epoch_of(s),
        _ => None,
    }) else {
        return Err(Failure::new("`room invite` to send a Commit", "no Commit").into());
    };
    let client = cx.client(Box::new(PassThrough))?;
    client
        .run_ok(
            home.path(),
            &["send", "early", "in the epoch before the refused Commit"],
        )
        .await?;
    let events = client.proxy.events();
    let sends = application_sends(&events);
    let Some(message) = sends.first() else {
        return Err(Failure::new("the message sent", "no application Send").into());
    };
    let epoch = epoch_of(message).unwrap_or(u64::MAX);
    if epoch != commit_epoch {
        return Err(Failure::new(
            format!(
                "the message in epoch {commit_epoch}, the one the refused Commit was made in (it was never accepted, so never merged)"
            ),
            format!("epoch {epoch}"),
        )
        .into());
    }
    Ok(())
}

/// Closes connections 1 to `closes` with 4000 at the client's first frame after `Ready`.
struct CloseEachAfterReady {
    closes: usize,
    ready_on: std::collections::BTreeSet<usize>,
}

impl Script for CloseEachAfterReady {
    fn on_server_frame(&mut self, conn: usize, frame: &mut ServerFrame) -> Verdict {
        if matches!(frame, ServerFrame::Ready(_)) {
            self.ready_on.insert(conn);
        }
        Verdict::Forward
    }

    fn on_client_frame(&mut self, conn: usize, _frame: &ClientFrame) -> Verdict {
        if conn <= self.closes && self.ready_on.contains(&conn) {
            return Verdict::Close {
                error: None,
                code: 4000,
            };
        }
        Verdict::Forward
    }
}

async fn resumes_with_newest_token(cx: &mut Ctx) -> CaseResult {
    let home = initialised_device(cx).await?;
    let client = cx.client(Box::new(CloseEachAfterReady {
        closes: 3,
        ready_on: Default::default(),
    }))?;
    watch_for(client, home.path(), Duration::from_secs(4)).await?;
    let events = client.proxy.events();
    let mut newest: Option<confab_spec::ids::ResumeToken> = None;
    let mut resumes = 0;
    for e in &events {
        match &e.what {
            What::ToClient(ServerFrame::Ready(ready)) => newest = Some(ready.resume_token.clone()),
            What::FromClient(Some(ClientFrame::Hello(hello)), _) => {
                if let Some(token) = &hello.resume_token {
                    resumes += 1;
                    if Some(token) != newest.as_ref() {
                        return Err(Failure::new(
                            "a resume with the token of the latest Ready",
                            format!(
                                "connection {} presented {}",
                                e.conn,
                                if newest.is_some() {
                                    "an older token"
                                } else {
                                    "a token no Ready gave"
                                }
                            ),
                        )
                        .into());
                    }
                }
            }
            _ => {}
        }
    }
    if resumes < 3 {
        return Err(crate::case::Stop::Skipped(format!(
            "the client resumed {resumes} time(s) after three closes with 4000 (resuming is \
             optional), so which token it keeps cannot be seen"
        )));
    }
    Ok(())
}

/// The suite's invitee subscribes to its inbox (request `rid`) and joins the first Welcome
/// there; the room it joined.
pub(super) async fn join_welcome(
    peer: &mut crate::context::Peer,
    member: &mut crate::mls::Member,
    rid: u64,
) -> Result<confab_spec::ids::ConversationId, crate::case::Stop> {
    use confab_spec::frame::{EntryBody, Subscribe};
    use confab_spec::ids::StreamId;

    peer.send(&ClientFrame::Subscribe(Subscribe {
        rid,
        stream: StreamId::Inbox,
        from_seq: None,
    }))
    .await?;
    peer.expect("Subscribed", |f| match f {
        ServerFrame::Subscribed(s) if s.rid == rid => Some(()),
        _ => None,
    })
    .await?;
    let welcome = peer
        .expect("the Welcome in the invitee's inbox", |f| match f {
            ServerFrame::Batch(b) if b.stream == StreamId::Inbox => b
                .entries
                .iter()
                .find(|e| matches!(e.body, EntryBody::Welcome { .. }))
                .map(|e| e.payload.clone()),
            _ => None,
        })
        .await?;
    Ok(member
        .engine
        .join(welcome.as_bytes())
        .map_err(|e| Failure::new("a Welcome the suite's member can join", e.to_string()))?)
}

async fn room_extensions(cx: &mut Ctx) -> CaseResult {
    use confab_spec::rooms::{
        REQUIRED_CAPABILITIES_EXTENSION_TYPE, ROOM_REQUIRED_CAPABILITIES, RoomRoles,
    };

    let (mut peer, mut member) = invitee_member(cx).await?;
    let invited = hex::encode(member.device.system.public().0);
    let client = cx.client(Box::new(PassThrough))?;
    let home = home()?;
    device_with_room(client, home.path(), "shaped").await?;
    client
        .run_ok(home.path(), &["room", "invite", "shaped", &invited])
        .await?;
    let events = client.proxy.events();
    let Some(creator) = authenticated_as(&events).map(|c| c.system) else {
        return Err(Failure::new("the client to authenticate", "no Auth").into());
    };
    let room = join_welcome(&mut peer, &mut member, 2).await?;
    let extension = |t: u16| {
        member
            .engine
            .context_extension(&room, t)
            .map_err(|e| crate::mls::broken("read the group context", e))
    };
    let required = extension(REQUIRED_CAPABILITIES_EXTENSION_TYPE)?;
    if required.as_deref() != Some(&ROOM_REQUIRED_CAPABILITIES[..]) {
        return Err(Failure::new(
            format!(
                "required_capabilities {}",
                hex::encode(ROOM_REQUIRED_CAPABILITIES)
            ),
            format!("{:?}", required.map(hex::encode)),
        )
        .into());
    }
    let roles = extension(ROLES_EXTENSION_TYPE)?
        .map(|d| RoomRoles::from_extension(&d))
        .transpose()
        .map_err(|e| Failure::new("a roles extension that reads (SPEC.md 10.1)", e.to_string()))?;
    let expected = RoomRoles::new(creator);
    if roles.as_ref() != Some(&expected) {
        return Err(Failure::new(
            format!(
                "roles naming the creator {} as owner and no admins",
                hex::encode(creator.0)
            ),
            format!("{roles:?}"),
        )
        .into());
    }
    Ok(())
}

async fn acks_what_it_stored(cx: &mut Ctx) -> CaseResult {
    let Some(retention_ms) = cx.info.retention_ms.filter(|r| *r <= 10_000) else {
        return Err(crate::case::Stop::Skipped(
            "needs retention_ms of at most 10 s in /v1/info, so that acknowledged entries are \
             gone from the gateway when the client reads again"
                .into(),
        ));
    };
    let client = cx.client(Box::new(PassThrough))?;
    let home = home()?;
    let delivered = suite_room_with_client(cx, client, home.path(), false).await?;
    let client = cx.client(Box::new(PassThrough))?;
    let read = client.spawn(home.path(), &["read"])?;
    // Killed the moment it acks an entry of the room: whatever it acked must be stored.
    let ack = client
        .wait_for(ACTION_WAIT, Duration::from_millis(2), |events| {
            sent(events).find_map(|(_, _, f)| match f {
                ClientFrame::Ack(a)
                    if matches!(a.stream, confab_spec::ids::StreamId::Conversation(_)) =>
                {
                    Some(a.seq.get())
                }
                _ => None,
            })
        })
        .await;
    read.stop().await;
    let Some(acked) = ack else {
        return Err(Failure::new("the client to ack the room's entries it read", "no Ack").into());
    };
    // Retention deletes acknowledged entries: the gateway cannot give them again.
    tokio::time::sleep(Duration::from_millis(retention_ms + 1_500)).await;
    let client = cx.client(Box::new(PassThrough))?;
    let out = client.run(home.path(), &["read"]).await?;
    // The room's log: the Add at seq 1, then the three messages at seqs 2, 3 and 4. Those
    // acknowledged are owed.
    let mut owed = 0;
    for (seq, text) in (2u64..).zip(&delivered.texts) {
        if seq > acked {
            continue;
        }
        owed += 1;
        if shown(&out.stdout, text) == 0 {
            return Err(Failure::new(
                format!("{text:?} (seq {seq}; acknowledged up to {acked}) shown after a restart"),
                format!(
                    "not shown{}",
                    if out.success { "" } else { "; the read failed" }
                ),
            )
            .into());
        }
    }
    if owed == 0 {
        return Err(crate::case::Stop::Skipped(format!(
            "the client's first Ack of the room was of seq {acked}, before any message, so no \
             acknowledged message could be checked"
        )));
    }
    Ok(())
}

/// A Polycentric backup string (SPEC.md 3.5) carrying `seed` and `public_key`.
fn backup_string(seed: &[u8; 32], public_key: &[u8; 32]) -> String {
    use base64::Engine as _;
    // Protobuf by hand: KeyPair { key_type 1, private_key, public_key } inside
    // ExportBundle { key_pair } inside URLInfo { url_type 3, body }.
    let mut key_pair = vec![0x08, 0x01, 0x12, 32];
    key_pair.extend_from_slice(seed);
    key_pair.extend_from_slice(&[0x1a, 32]);
    key_pair.extend_from_slice(public_key);
    let mut bundle = vec![0x0a, key_pair.len() as u8];
    bundle.extend(key_pair);
    let mut url_info = vec![0x08, 0x03, 0x12, bundle.len() as u8];
    url_info.extend(bundle);
    format!(
        "polycentric://{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(url_info)
    )
}

async fn checks_imported_keys(cx: &mut Ctx) -> CaseResult {
    use confab_spec::identity::SystemKeyPair;

    let mine = SystemKeyPair::generate(&mut rand_core::OsRng);
    let someone_else = SystemKeyPair::generate(&mut rand_core::OsRng);
    let forged = backup_string(&mine.seed(), &someone_else.public().0);
    let client = cx.client(Box::new(PassThrough))?;
    let forged_home = home()?;
    let out = client
        .run(forged_home.path(), &["init", "--import", &forged])
        .await?;
    let events = client.proxy.events();
    let authenticated = authenticated_as(&events).map(|c| c.system);
    if out.success || authenticated.is_some() {
        return Err(Failure::new(
            "a backup string whose seed does not derive its public_key refused",
            match authenticated {
                Some(system) => format!("the client authenticated as {}", hex::encode(system.0)),
                None => "the import succeeded".to_owned(),
            },
        )
        .into());
    }
    // The same string with the right key: taken (so the refusal was of the key, not of the
    // string's form).
    let client = cx.client(Box::new(PassThrough))?;
    let true_home = home()?;
    let true_backup = backup_string(&mine.seed(), &mine.public().0);
    client
        .run_ok(true_home.path(), &["init", "--import", &true_backup])
        .await?;
    let events = client.proxy.events();
    let authenticated = authenticated_as(&events).map(|c| c.system);
    if authenticated != Some(mine.public()) {
        return Err(Failure::new(
            "a true backup string imported: the client authenticates as its user",
            format!("{:?}", authenticated.map(|s| hex::encode(s.0))),
        )
        .into());
    }
    Ok(())
}

async fn reads_past_epochs(cx: &mut Ctx) -> CaseResult {
    use confab_spec::ids::MsgId;

    use crate::cases::log::{random, send_mls};
    use crate::mls::{broken, bytes};

    /// SPEC.md 7.2: application messages up to this many epochs old are accepted.
    const APP_EPOCH_LAG_MAX: u64 = 4;
    let client = cx.client(Box::new(PassThrough))?;
    let home = home()?;
    let mut room = suite_room_with_client(cx, client, home.path(), false).await?;
    // One message encrypted in each of four epochs, each followed by a Commit; all four are
    // sent once the group is four epochs on (lags 4, 3, 2 and 1).
    let mut late = Vec::new();
    for i in 0..APP_EPOCH_LAG_MAX {
        let text = format!(
            "late by {} epochs {}",
            APP_EPOCH_LAG_MAX - i,
            hex::encode(random::<8>())
        );
        let payload = room
            .owner
            .engine
            .encrypt(&room.room, text.as_bytes())
            .map_err(|e| broken("encrypt", e))?;
        late.push((text, payload));
        room.commit_roles().await?;
    }
    for (_, payload) in &late {
        room.rid += 1;
        send_mls(
            &mut room.peer,
            room.rid,
            room.room,
            MsgId(random()),
            bytes(payload.clone())?,
            None,
        )
        .await?
        .map_err(|e| broken("send a late message", crate::context::describe_error(&e)))?;
    }
    let client = cx.client(Box::new(PassThrough))?;
    let out = client.run_ok(home.path(), &["read"]).await?;
    for (text, _) in &late {
        if shown(&out.stdout, text) != 1 {
            return Err(Failure::new(
                format!("{text:?} shown (its epoch is within app_epoch_lag_max of the group's)"),
                format!("shown {} times", shown(&out.stdout, text)),
            )
            .into());
        }
    }
    Ok(())
}

/// Swallows the client's first Commit; once `release` is set, closes the connection it
/// came on at the client's next frame there (so that the client sends the Commit again on
/// a new one) and forwards everything else.
struct HoldFirstCommit {
    release: std::sync::Arc<std::sync::atomic::AtomicBool>,
    held_on: Option<usize>,
}

impl Script for HoldFirstCommit {
    fn on_client_frame(&mut self, conn: usize, frame: &ClientFrame) -> Verdict {
        match (self.held_on, frame) {
            (None, ClientFrame::Send(s)) if is_commit(s) => {
                self.held_on = Some(conn);
                Verdict::Drop
            }
            (Some(held), _)
                if held == conn && self.release.load(std::sync::atomic::Ordering::SeqCst) =>
            {
                Verdict::Close {
                    error: None,
                    code: 4000,
                }
            }
            _ => Verdict::Forward,
        }
    }
}

async fn retries_after_stale_commit(cx: &mut Ctx) -> CaseResult {
    let invited = hex::encode(invitee(cx).await?.0);
    let client = cx.client(Box::new(PassThrough))?;
    let home = home()?;
    let mut room = suite_room_with_client(cx, client, home.path(), true).await?;
    let room_id = hex::encode(room.room.0);
    client.run_ok(home.path(), &["read"]).await?;
    let release = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = cx.client(Box::new(HoldFirstCommit {
        release: release.clone(),
        held_on: None,
    }))?;
    let invite = client.spawn(home.path(), &["room", "invite", &room_id, &invited])?;
    let held_epoch = client
        .wait_for(ACTION_WAIT, Duration::from_millis(20), |events| {
            sent(events).find_map(|(_, _, f)| match f {
                ClientFrame::Send(s) if is_commit(s) => epoch_of(s),
                _ => None,
            })
        })
        .await;
    let Some(held_epoch) = held_epoch else {
        invite.stop().await;
        return Err(Failure::new("the admin's `room invite` to send a Commit", "none").into());
    };
    // The owner's Commit wins the epoch the client's was made in.
    let winner_seq = room.commit_roles().await?;
    release.store(true, std::sync::atomic::Ordering::SeqCst);
    // The client resends its Commit, is told stale_commit, and commits again.
    client
        .wait_for(
            ACTION_WAIT + ACTION_WAIT,
            Duration::from_millis(50),
            |events| {
                let commits = sent(events)
                    .filter(|(_, _, f)| matches!(f, ClientFrame::Send(s) if is_commit(s)))
                    .count();
                (commits >= 3).then_some(())
            },
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    invite.stop().await;
    let events = client.proxy.events();
    let mut stale_at = None;
    let mut winner_seen = false;
    let mut commit_rids = std::collections::BTreeSet::new();
    for e in &events {
        match &e.what {
            What::FromClient(Some(ClientFrame::Send(s)), _) if is_commit(s) => {
                let epoch = epoch_of(s).unwrap_or(u64::MAX);
                if stale_at.is_none() {
                    commit_rids.insert((e.conn, s.rid));
                    continue;
                }
                if !winner_seen {
                    return Err(Failure::new(
                        "a new Commit only after the winning Commit was delivered and processed",
                        "a Commit before the winner's entry reached the client",
                    )
                    .into());
                }
                if epoch != held_epoch + 1 {
                    return Err(Failure::new(
                        format!(
                            "the new Commit on top of the winner: epoch {}",
                            held_epoch + 1
                        ),
                        format!("epoch {epoch}"),
                    )
                    .into());
                }
                return Ok(());
            }
            What::ToClient(ServerFrame::Error(err))
                if err.code == ErrorCode::StaleCommit
                    && err
                        .rid
                        .is_some_and(|rid| commit_rids.contains(&(e.conn, rid))) =>
            {
                stale_at = Some(e.at);
            }
            What::ToClient(ServerFrame::Deliver(d)) if d.entry.seq.get() == winner_seq => {
                winner_seen = true;
            }
            What::ToClient(ServerFrame::Batch(b))
                if b.entries.iter().any(|x| x.seq.get() == winner_seq) =>
            {
                winner_seen = true;
            }
            _ => {}
        }
    }
    match stale_at {
        None => Err(crate::case::Stop::Skipped(
            "the client's resent Commit was not answered stale_commit (the gateway or the \
             client took another path), so what follows it cannot be checked"
                .into(),
        )),
        Some(_) => Err(Failure::new(
            "a new Commit (the invite is still needed) after stale_commit",
            "none",
        )
        .into()),
    }
}

/// What the outside can check of ids that must come from a secure random source: they
/// are distinct, none is all zeros, every pair differs in at least a quarter of its bits
/// (random ones differ in half, give or take a few; a counter or a clock changes only a
/// few low bits), and the ones over all of them are within five standard
/// deviations of half. No test can prove randomness; this catches the usual faults (a
/// constant, a counter, a clock, a zeroed buffer).
fn looks_random(what: &str, ids: &[Vec<u8>]) -> Result<(), Failure> {
    let bits = |a: &[u8]| a.iter().map(|b| b.count_ones() as usize).sum::<usize>();
    for (i, a) in ids.iter().enumerate() {
        if a.iter().all(|b| *b == 0) {
            return Err(Failure::new(format!("random {what}s"), "one is all zeros"));
        }
        for b in &ids[i + 1..] {
            let differ: usize = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x ^ y).count_ones() as usize)
                .sum();
            if differ < a.len() * 8 / 4 {
                return Err(Failure::new(
                    format!("random {what}s: any two differ in about half their bits"),
                    format!(
                        "{} and {} differ in {differ} bits",
                        hex::encode(a),
                        hex::encode(b)
                    ),
                ));
            }
        }
    }
    let n: usize = ids.iter().map(|a| a.len() * 8).sum();
    let ones: usize = ids.iter().map(|a| bits(a)).sum();
    let sigma = (n as f64 / 4.0).sqrt();
    if (ones as f64 - n as f64 / 2.0).abs() > 5.0 * sigma {
        return Err(Failure::new(
            format!("random {what}s: about half of their {n} bits set"),
            format!("{ones} set"),
        ));
    }
    Ok(())
}

async fn random_process_ids(cx: &mut Ctx) -> CaseResult {
    let mut ids = Vec::new();
    for _ in 0..3 {
        let client = cx.client(Box::new(PassThrough))?;
        let home = home()?;
        client.run_ok(home.path(), &["init"]).await?;
        let events = client.proxy.events();
        let Some(process) = authenticated_as(&events).map(|c| c.process) else {
            return Err(Failure::new("the client to authenticate", "no Auth").into());
        };
        ids.push(process.0.to_vec());
    }
    looks_random("process id", &ids)?;
    Ok(())
}

async fn random_ids(cx: &mut Ctx) -> CaseResult {
    let home = initialised_device(cx).await?;
    let client = cx.client(Box::new(PassThrough))?;
    for room in ["ids-a", "ids-b", "ids-c"] {
        client
            .run_ok(home.path(), &["room", "create", room])
            .await?;
    }
    for i in 0..6 {
        client
            .run_ok(home.path(), &["send", "ids-a", &format!("message {i}")])
            .await?;
    }
    let events = client.proxy.events();
    let mut conversations = Vec::new();
    let mut msg_ids = Vec::new();
    for (_, _, frame) in sent(&events) {
        match frame {
            ClientFrame::CreateConversation(c) => conversations.push(c.conversation.0.to_vec()),
            ClientFrame::Send(s) if !msg_ids.contains(&s.msg_id.0.to_vec()) => {
                msg_ids.push(s.msg_id.0.to_vec());
            }
            _ => {}
        }
    }
    if conversations.len() < 3 || msg_ids.len() < 6 {
        return Err(Failure::new(
            "three CreateConversation and six Sends",
            format!("{} and {}", conversations.len(), msg_ids.len()),
        )
        .into());
    }
    looks_random("conversation id", &conversations)?;
    looks_random("msg_id", &msg_ids)?;
    Ok(())
}

async fn reads_past_unreadable(cx: &mut Ctx) -> CaseResult {
    use crate::cases::log::{random, send_mls};
    use crate::mls::{broken, bytes};

    let client = cx.client(Box::new(PassThrough))?;
    let home = home()?;
    let mut delivered = suite_room_with_client(cx, client, home.path(), false).await?;
    let room = delivered.room;
    let epoch = delivered
        .owner
        .engine
        .epoch(&room)
        .map_err(|e| broken("read the epoch", e))?;
    // A header of the room's epoch around bytes no key decrypts, then a real message.
    let garbage = confab_spec::mls_write::private_message(&room.0, epoch, &[0xEE; 48]);
    delivered.rid += 1;
    send_mls(
        &mut delivered.peer,
        delivered.rid,
        room,
        confab_spec::ids::MsgId(random()),
        bytes(garbage)?,
        None,
    )
    .await?
    .map_err(|e| broken("send garbage", crate::context::describe_error(&e)))?;
    let after = format!("after the unreadable one {}", hex::encode(random::<8>()));
    let payload = delivered
        .owner
        .engine
        .encrypt(&room, after.as_bytes())
        .map_err(|e| broken("encrypt", e))?;
    delivered.rid += 1;
    send_mls(
        &mut delivered.peer,
        delivered.rid,
        room,
        confab_spec::ids::MsgId(random()),
        bytes(payload)?,
        None,
    )
    .await?
    .map_err(|e| broken("send a message", crate::context::describe_error(&e)))?;
    let client = cx.client(Box::new(PassThrough))?;
    let out = client.run(home.path(), &["read"]).await?;
    for text in delivered.texts.iter().chain([&after]) {
        if shown(&out.stdout, text) == 0 {
            return Err(Failure::new(
                format!("{text:?} shown by `read` (the unreadable entry skipped)"),
                if out.success {
                    "not shown".to_owned()
                } else {
                    format!("`read` failed: {}", out.stderr.trim())
                },
            )
            .into());
        }
    }
    Ok(())
}

async fn stops_at_fork(cx: &mut Ctx) -> CaseResult {
    use crate::cases::log::{random, send_with};
    use crate::mls::broken;

    let (mut peer, mut member) = invitee_member(cx).await?;
    let invited = hex::encode(member.device.system.public().0);
    let client = cx.client(Box::new(PassThrough))?;
    let home = home()?;
    device_with_room(client, home.path(), "forked").await?;
    client
        .run_ok(home.path(), &["room", "invite", "forked", &invited])
        .await?;
    let room = join_welcome(&mut peer, &mut member, 20).await?;
    // The suite's member commits an update restating the roles (SPEC.md 10.1); only its
    // confirmation tag is broken, which the gateway cannot check and every member does.
    let roles = member
        .engine
        .context_extension(&room, ROLES_EXTENSION_TYPE)
        .map_err(|e| broken("read the roles", e))?
        .ok_or_else(|| broken("read the roles", "the room has none"))?;
    let roles = confab_spec::rooms::RoomRoles::from_extension(&roles)
        .map_err(|e| broken("read the roles", e))?;
    let extra = [confab_client::mls::ExtraProposal::GroupContextExtensions(
        roles.context_extensions(),
    )];
    let commit = member
        .engine
        .commit(&room, &[], &[], &extra, true)
        .map_err(|e| broken("commit", e))?;
    member
        .engine
        .discard_pending_commit(&room)
        .map_err(|e| broken("discard", e))?;
    let (commit, group_info) = crate::mls::with_broken_tag(&commit, &member.device.key)?;
    let attached = crate::cases::log::Attached {
        welcome: None,
        group_info: Some(group_info),
    };
    let msg_id = confab_spec::ids::MsgId(random());
    let (fork_seq, _) = send_with(&mut peer, 21, (room, msg_id), commit, attached)
        .await?
        .map_err(|e| broken("send the Commit", crate::context::describe_error(&e)))?;
    // The client reads the Commit, then is asked to send into the room.
    let client = cx.client(Box::new(PassThrough))?;
    client.run(home.path(), &["read", "forked"]).await?;
    let earlier = client.proxy.events();
    resyncs_before_sending_into(
        cx,
        home.path(),
        ("forked", room),
        &earlier,
        &format!(
            "nothing but a resync sent into the room first after the Commit at seq {fork_seq} it could not apply"
        ),
    )
    .await
}

/// Whether `payload` is a resync: an external Commit (SPEC.md 7.10).
pub(super) fn is_resync(payload: &[u8]) -> bool {
    matches!(
        mls_framing::peek(payload),
        Ok(mls_framing::Peek::Framed(f))
            if f.content_type == mls_framing::ContentType::Commit
                && f.sender == Some(mls_framing::Sender::NewMemberCommit)
    )
}

/// Asks the client (on `home`) to `send` into the room it names `room.0`, whose id is
/// `room.1`, after it saw it fork (the proxy's `earlier` events), and fails with
/// `expected` if the first `Send` into that room is anything but a resync: a client sends
/// nothing into a conversation that forked (REQ-7.7-5, REQ-7.8-3) until it is back in by
/// a resync (SPEC.md 7.10), if it gets back in at all.
pub(super) async fn resyncs_before_sending_into(
    cx: &Ctx,
    home: &std::path::Path,
    room: (&str, confab_spec::ids::ConversationId),
    earlier: &[crate::client::Event],
    expected: &str,
) -> CaseResult {
    let client = cx.client(Box::new(PassThrough))?;
    client
        .run(home, &["send", room.0, "into a forked room"])
        .await?;
    let later = client.proxy.events();
    let first = sent(earlier)
        .chain(sent(&later))
        .find_map(|(_, _, f)| match f {
            ClientFrame::Send(s) if s.conversation == room.1 => Some(s.payload.as_bytes()),
            _ => None,
        });
    match first {
        Some(payload) if !is_resync(payload) => Err(Failure::new(
            expected,
            "a Send into it that is not a resync (an external Commit)",
        )
        .into()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::looks_random;

    fn ids(hexes: &[&str]) -> Vec<Vec<u8>> {
        hexes.iter().map(|h| hex::decode(h).expect("hex")).collect()
    }

    #[test]
    fn random_ids_pass_and_counters_zeros_and_repeats_do_not() {
        // Drawn from a secure random source once.
        let random = ids(&[
            "24a059c2ee2636a44a0ffe96c0d5c4aa",
            "be8167d82ea0d4a443c04baf61f9f156",
            "5122d271d44f847651c912710465de5c",
            "582410c30141fa9c9b370db67ec9ef2f",
            "df5344d559ba2216e2133a40c71f3af7",
            "0bc7183dd1e747214ece20b4dc2fa886",
        ]);
        assert!(looks_random("id", &random).is_ok());
        // A random prefix and a counter: neighbours differ in a few low bits.
        let counter: Vec<Vec<u8>> = (1u32..=6)
            .map(|i| {
                let mut id = hex::decode("91b012eb21447a4e2d321af4").expect("hex");
                id.extend(i.to_be_bytes());
                id
            })
            .collect();
        assert!(looks_random("id", &counter).is_err());
        let mut zero = random.clone();
        zero[3] = vec![0; 16];
        assert!(looks_random("id", &zero).is_err());
        let mut repeated = random.clone();
        repeated[5] = random[0].clone();
        assert!(looks_random("id", &repeated).is_err());
        // Every bit of every id set: balanced pairs are impossible, and the count is off.
        assert!(looks_random("id", &[vec![0xff; 16]]).is_err());
    }
}
