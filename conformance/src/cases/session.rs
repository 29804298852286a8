//! SPEC.md sections 3.3, 5 and 5.9: authentication, resume tokens, heartbeats, the one
//! session per device, revocation; and section 11's limit on upgrades per address.

use std::collections::HashSet;
use std::time::Duration;

use confab_spec::ErrorCode;
use confab_spec::ServerFrame;
use confab_spec::frame::{Challenge, ClientFrame, Heartbeat, RevokeDevice};
use confab_spec::identity::SystemKeyPair;
use confab_spec::ids::{DevicePublicKey, ResumeToken, Signature, UnixMs};

use crate::case;
use crate::case::{Case, CaseResult, Failure, Stop};
use crate::context::{ANSWER_WAIT, Ctx, Device, Observed, Peer};

/// The cases of sections 3.3, 5 and 5.9.
pub fn cases() -> Vec<Case> {
    vec![
        case!(
            "11-2.connect-limit",
            "REQ-11-2",
            Must,
            "an upgrade beyond connects_per_ip is HTTP 429 with Retry-After and {code: 900, retry_after_ms}",
            connect_limit
        ),
        case!(
            "5.7-2.superseded",
            "REQ-5.7-2",
            Must,
            "the cause 'another connection of the device became ready' closes with 4104",
            one_session_per_device
        ),
        case!(
            "5.7-2.revoked",
            "REQ-5.7-2",
            Must,
            "the cause 'the device was revoked' closes with 4105",
            revocation_closes_sessions
        ),
        case!(
            "3.3-2.revocation-kept",
            "REQ-3.3-2",
            Must,
            "a stored revocation keeps refusing the device on later connections",
            revocation_kept
        ),
        case!(
            "5.1-1.auth-timeout-silent",
            "REQ-5.1-1",
            Must,
            "a connection that sends nothing is closed with 4005 after auth_timeout_ms",
            auth_timeout_silent
        ),
        case!(
            "5.1-1.auth-timeout-after-hello",
            "REQ-5.1-1",
            Must,
            "a connection that never answers its Challenge is closed with 4005 after auth_timeout_ms",
            auth_timeout_after_hello
        ),
        case!(
            "3.2-1.expired-certificate",
            "REQ-3.2-1",
            Must,
            "a certificate past not_after is rejected (201)",
            certificate_expired
        ),
        case!(
            "3.2-2.inverted-lifetime",
            "REQ-3.2-2",
            Must,
            "a certificate with not_after <= not_before is rejected (201)",
            lifetime_inverted
        ),
        case!(
            "3.4-2.non-canonical-signature",
            "REQ-3.4-2",
            Must,
            "a transcript signature with a non-canonical S (S + L) is rejected",
            non_canonical_signature
        ),
        case!(
            "3.4-2.small-order-key",
            "REQ-3.4-2",
            Must,
            "a device key of small order, with a signature that only weak verification accepts, is rejected",
            small_order_key
        ),
        case!(
            "5.5-1.token-properties",
            "REQ-5.5-1",
            Must,
            "resume tokens have at least 128 bits, differ, and resume the device they were issued to",
            token_properties
        ),
        case!(
            "5.6-3.zombie",
            "REQ-5.6-3",
            Must,
            "a session silent for heartbeat_timeout_ms is closed with 4001",
            zombie
        ),
        case!(
            "5.2-1.fresh-nonces",
            "REQ-5.2-1",
            Must,
            "every Challenge carries a nonce never sent before",
            fresh_nonces
        ),
        case!(
            "5.4-1.certificate-invalid",
            "REQ-5.4-1",
            Must,
            "a certificate not signed by its system is auth_certificate_invalid (200), close 4103",
            certificate_invalid
        ),
        case!(
            "5.4-1.lifetime-inverted",
            "REQ-5.4-1",
            Must,
            "a certificate with not_after <= not_before is auth_certificate_expired (201), close 4103",
            lifetime_inverted
        ),
        case!(
            "5.4-1.certificate-expired",
            "REQ-5.4-1",
            Must,
            "an expired certificate is auth_certificate_expired (201), close 4103",
            certificate_expired
        ),
        case!(
            "5.4-1.certificate-not-yet-valid",
            "REQ-5.4-1",
            Must,
            "a certificate valid only beyond the clock skew is auth_certificate_not_yet_valid (210), close 4103",
            certificate_not_yet_valid
        ),
        case!(
            "5.4-1.clock-skew",
            "REQ-5.4-1",
            Must,
            "an Auth time beyond clock_skew_max_ms is auth_clock_skew (206), close 4103",
            clock_skew
        ),
        case!(
            "5.4-1.nonce-of-another-challenge",
            "REQ-5.4-1",
            Must,
            "an Auth with another connection's nonce is auth_nonce_invalid (204), close 4103",
            nonce_of_another_challenge
        ),
        case!(
            "5.4-1.signature-invalid",
            "REQ-5.4-1",
            Must,
            "a transcript signature by another key is auth_signature_invalid (203), close 4103",
            signature_invalid
        ),
        case!(
            "5.4-2.first-failing-check",
            "REQ-5.4-2",
            Must,
            "an Auth failing several checks is answered with the first in the table's order",
            first_failing_check
        ),
        case!(
            "5.4-3.nonce-used-once",
            "REQ-5.4-3",
            Must,
            "a nonce accepted once is refused on another connection (204)",
            nonce_used_once
        ),
        case!(
            "5.4-4.other-origin",
            "REQ-5.4-4",
            Must,
            "a transcript signed for another origin is auth_origin_mismatch (205), close 4103",
            other_origin
        ),
        case!(
            "5.5-2.token-rotates",
            "REQ-5.5-2",
            Must,
            "a resume is Ready with resumed true and a new token",
            token_rotates
        ),
        case!(
            "5.5-10.reuse-ends-chain-session",
            "REQ-5.5-10",
            Must,
            "when a used token comes back, the session resumed from it is closed with 209 and 4103",
            reuse_ends_chain_session
        ),
        case!(
            "5.5-11.session-ends-at-certificate-expiry",
            "REQ-5.5-11",
            Must,
            "a session whose certificate expires two seconds after Ready is closed with 201 and 4103",
            session_ends_at_certificate_expiry
        ),
        case!(
            "5.5-3.token-reuse",
            "REQ-5.5-3",
            Must,
            "a used token is resume_token_reused (209), and the token issued in its place stops working",
            token_reuse
        ),
        case!(
            "5.5-4.unknown-token",
            "REQ-5.5-4",
            Must,
            "an unknown token is resume_token_invalid (208)",
            unknown_token
        ),
        case!(
            "5.5-5.challenge-after-rejection",
            "REQ-5.5-5",
            Must,
            "after rejecting a token the server sends a Challenge on the same connection",
            challenge_after_rejection
        ),
        case!(
            "5.5-6.revoked-since-issue",
            "REQ-5.5-6",
            Must,
            "a token of a device revoked since is auth_certificate_revoked (202), close 4103",
            revoked_since_issue
        ),
        case!(
            "5.5-9.one-session-per-device",
            "REQ-5.5-9",
            Must,
            "a second Ready for a device closes the older connection with 4104",
            one_session_per_device
        ),
        case!(
            "5.6-2.heartbeat-ack",
            "REQ-5.6-2",
            Must,
            "every Heartbeat is answered by a HeartbeatAck with its nonce",
            heartbeat_ack
        ),
        case!(
            "5.6-2.heartbeat-before-ready",
            "REQ-5.6-2",
            Must,
            "a Heartbeat before Ready is answered too, and the handshake goes on",
            heartbeat_before_ready
        ),
        case!(
            "5.9-1.revoke-other-system",
            "REQ-5.9-1",
            Must,
            "revoking a device of another system is forbidden (303)",
            revoke_other_system
        ),
        case!(
            "3.3-1.revocation-signature",
            "REQ-3.3-1",
            Must,
            "a revocation with a bad signature is refused (200) and not stored",
            revocation_signature
        ),
        case!(
            "3.3-3.revocation-closes-sessions",
            "REQ-3.3-3",
            Must,
            "revoking a connected device sends it Error 202 and closes it with 4105 within 1 s",
            revocation_closes_sessions
        ),
        case!(
            "3.3-4.future-revocation",
            "REQ-3.3-4",
            Must,
            "a revocation dated in the future takes effect when stored",
            future_revocation
        ),
    ]
}

/// Opens a connection, sends Hello and returns the Challenge.
async fn challenge(cx: &Ctx, name: &str) -> Result<(Peer, Challenge), Stop> {
    let mut peer = cx.open(name).await?;
    let challenge = peer.challenge().await?;
    Ok((peer, challenge))
}

/// Sends `make(challenge)` as the Auth and expects `code`, then close 4103.
async fn auth_refused(
    cx: &mut Ctx,
    code: ErrorCode,
    make: impl FnOnce(&Ctx, &Device, &Challenge) -> confab_spec::frame::Auth,
) -> CaseResult {
    let device = Device::fresh();
    let (mut a, ch) = challenge(cx, "a").await?;
    a.send(&ClientFrame::Auth(make(cx, &device, &ch))).await?;
    a.expect_error(code, None).await?;
    a.expect_close(4103).await
}

fn day(n: u64) -> u64 {
    n * 86_400_000
}

async fn fresh_nonces(cx: &mut Ctx) -> CaseResult {
    let mut seen = HashSet::new();
    for i in 0..16 {
        let (_, ch) = challenge(cx, &format!("c{i}")).await?;
        if !seen.insert(ch.nonce) {
            return Err(
                Failure::new("16 distinct nonces", format!("a repeat at connection {i}")).into(),
            );
        }
    }
    Ok(())
}

async fn certificate_invalid(cx: &mut Ctx) -> CaseResult {
    auth_refused(cx, ErrorCode::AuthCertificateInvalid, |cx, d, ch| {
        let now = ch.server_time_ms;
        let mut cert = d.certificate(now);
        // Signed by another system than the one it names.
        let other = SystemKeyPair::generate(&mut rand_core::OsRng);
        cert.signature = other
            .issue_certificate(
                cert.process,
                cert.device_key,
                cert.not_before_ms,
                cert.not_after_ms,
            )
            .signature;
        d.auth(cert, &cx.origin, ch.nonce, now)
    })
    .await
}

async fn lifetime_inverted(cx: &mut Ctx) -> CaseResult {
    auth_refused(cx, ErrorCode::AuthCertificateExpired, |cx, d, ch| {
        let now = ch.server_time_ms;
        let cert = d.certificate_between(now.plus_ms(60_000), now);
        d.auth(cert, &cx.origin, ch.nonce, now)
    })
    .await
}

async fn certificate_expired(cx: &mut Ctx) -> CaseResult {
    auth_refused(cx, ErrorCode::AuthCertificateExpired, |cx, d, ch| {
        let now = ch.server_time_ms;
        let cert = d.certificate_between(UnixMs(now.0 - day(2)), UnixMs(now.0 - day(1)));
        d.auth(cert, &cx.origin, ch.nonce, now)
    })
    .await
}

async fn certificate_not_yet_valid(cx: &mut Ctx) -> CaseResult {
    auth_refused(cx, ErrorCode::AuthCertificateNotYetValid, |cx, d, ch| {
        let now = ch.server_time_ms;
        let start = now.plus_ms(cx.info.clock_skew_max_ms + 3_600_000);
        let cert = d.certificate_between(start, start.plus_ms(day(1)));
        d.auth(cert, &cx.origin, ch.nonce, now)
    })
    .await
}

async fn clock_skew(cx: &mut Ctx) -> CaseResult {
    auth_refused(cx, ErrorCode::AuthClockSkew, |cx, d, ch| {
        let now = ch.server_time_ms;
        let time = UnixMs(now.0 - cx.info.clock_skew_max_ms - 60_000);
        d.auth(d.certificate(now), &cx.origin, ch.nonce, time)
    })
    .await
}

async fn nonce_of_another_challenge(cx: &mut Ctx) -> CaseResult {
    let (_other, other) = challenge(cx, "other").await?;
    auth_refused(cx, ErrorCode::AuthNonceInvalid, move |cx, d, ch| {
        let now = ch.server_time_ms;
        d.auth(d.certificate(now), &cx.origin, other.nonce, now)
    })
    .await
}

async fn signature_invalid(cx: &mut Ctx) -> CaseResult {
    auth_refused(cx, ErrorCode::AuthSignatureInvalid, |cx, d, ch| {
        let now = ch.server_time_ms;
        let mut auth = d.auth(d.certificate(now), &cx.origin, ch.nonce, now);
        // The same transcript signed by a key the certificate does not name.
        let impostor = Device::fresh();
        auth.signature = impostor
            .auth(d.certificate(now), &cx.origin, ch.nonce, now)
            .signature;
        auth
    })
    .await
}

async fn first_failing_check(cx: &mut Ctx) -> CaseResult {
    // Expired (check 3), off the clock (6), wrong origin (8) and a bad signature (9):
    // the answer is the expiry.
    auth_refused(cx, ErrorCode::AuthCertificateExpired, |_, d, ch| {
        let now = ch.server_time_ms;
        let cert = d.certificate_between(UnixMs(now.0 - day(2)), UnixMs(now.0 - day(1)));
        let mut auth = d.auth(
            cert,
            "wss://elsewhere.invalid",
            ch.nonce,
            UnixMs(now.0 - day(1)),
        );
        auth.signature = Device::fresh()
            .auth(auth.certificate.clone(), "x", ch.nonce, now)
            .signature;
        auth
    })
    .await
}

async fn nonce_used_once(cx: &mut Ctx) -> CaseResult {
    let device = Device::fresh();
    let (mut a, ch) = challenge(cx, "a").await?;
    let now = ch.server_time_ms;
    let auth = device.auth(device.certificate(now), &cx.origin, ch.nonce, now);
    a.send(&ClientFrame::Auth(auth.clone())).await?;
    a.expect("Ready", |f| {
        matches!(f, ServerFrame::Ready(_)).then_some(())
    })
    .await?;
    // The same Auth, whole, on another connection: its nonce is used (and not this
    // connection's).
    let (mut b, _) = challenge(cx, "b").await?;
    b.send(&ClientFrame::Auth(auth)).await?;
    b.expect_error(ErrorCode::AuthNonceInvalid, None).await?;
    b.expect_close(4103).await
}

async fn other_origin(cx: &mut Ctx) -> CaseResult {
    auth_refused(cx, ErrorCode::AuthOriginMismatch, |_, d, ch| {
        let now = ch.server_time_ms;
        d.auth(d.certificate(now), "wss://elsewhere.invalid", ch.nonce, now)
    })
    .await
}

/// Hello with `token`; the answer frame (Ready, or Error then Challenge).
async fn resume(cx: &Ctx, name: &str, token: ResumeToken) -> Result<(Peer, ServerFrame), Stop> {
    let mut peer = cx.open(name).await?;
    peer.hello(vec![1], Some(token)).await?;
    let answer = peer.expect("Ready or Error", |f| Some(f.clone())).await?;
    Ok((peer, answer))
}

async fn token_rotates(cx: &mut Ctx) -> CaseResult {
    let device = Device::fresh();
    let (a, first) = cx.ready("a", &device).await?;
    drop(a);
    let (_b, answer) = resume(cx, "b", first.resume_token.clone()).await?;
    match answer {
        ServerFrame::Ready(r)
            if r.resumed
                && r.resume_token != first.resume_token
                && r.session_id == first.session_id =>
        {
            Ok(())
        }
        other => Err(Failure::new(
            "Ready with resumed true, the same session_id and a new token",
            format!("{other:?}"),
        )
        .into()),
    }
}

async fn token_reuse(cx: &mut Ctx) -> CaseResult {
    let device = Device::fresh();
    let (a, first) = cx.ready("a", &device).await?;
    drop(a);
    let (b, answer) = resume(cx, "b", first.resume_token.clone()).await?;
    let ServerFrame::Ready(second) = answer else {
        return Err(Failure::new("Ready for a valid token", format!("{answer:?}")).into());
    };
    drop(b);
    let (_c, answer) = resume(cx, "c", first.resume_token.clone()).await?;
    if !matches!(&answer, ServerFrame::Error(e) if e.code == ErrorCode::ResumeTokenReused) {
        return Err(Failure::new("Error 209 resume_token_reused", format!("{answer:?}")).into());
    }
    let (_d, answer) = resume(cx, "d", second.resume_token).await?;
    match answer {
        ServerFrame::Error(e)
            if matches!(
                e.code,
                ErrorCode::ResumeTokenInvalid | ErrorCode::ResumeTokenReused
            ) =>
        {
            Ok(())
        }
        other => Err(Failure::new(
            "the descendant token refused (208 or 209)",
            format!("{other:?}"),
        )
        .into()),
    }
}

async fn reuse_ends_chain_session(cx: &mut Ctx) -> CaseResult {
    let device = Device::fresh();
    let (a, first) = cx.ready("a", &device).await?;
    drop(a);
    // The resumed session, open; then the first token comes back on another connection.
    let (mut b, answer) = resume(cx, "b", first.resume_token.clone()).await?;
    if !matches!(answer, ServerFrame::Ready(_)) {
        return Err(Failure::new("Ready for a valid token", format!("{answer:?}")).into());
    }
    let (_c, answer) = resume(cx, "c", first.resume_token).await?;
    if !matches!(&answer, ServerFrame::Error(e) if e.code == ErrorCode::ResumeTokenReused) {
        return Err(Failure::new("Error 209 resume_token_reused", format!("{answer:?}")).into());
    }
    b.expect_error(ErrorCode::ResumeTokenReused, None).await?;
    b.expect_close(4103).await
}

async fn session_ends_at_certificate_expiry(cx: &mut Ctx) -> CaseResult {
    const LIFETIME_MS: u64 = 2_000;
    let device = Device::fresh();
    let mut a = cx.open("a").await?;
    let challenge = a.challenge().await?;
    let now = challenge.server_time_ms;
    let certificate = device.certificate_between(
        UnixMs(now.0.saturating_sub(60_000)),
        now.plus_ms(LIFETIME_MS),
    );
    a.send(&ClientFrame::Auth(device.auth(
        certificate,
        &cx.origin,
        challenge.nonce,
        now,
    )))
    .await?;
    a.expect("Ready", |f| {
        matches!(f, ServerFrame::Ready(_)).then_some(())
    })
    .await?;
    // Heartbeats keep the session alive meanwhile (it must end for its certificate, not
    // for silence).
    let started = tokio::time::Instant::now();
    let mut nonce = 0;
    let error = loop {
        nonce += 1;
        a.send(&ClientFrame::Heartbeat(Heartbeat { nonce })).await?;
        match a.next(Duration::from_millis(500)).await {
            Observed::Frame(ServerFrame::Error(e)) => break e,
            Observed::Frame(_) | Observed::Silence => {}
            other => {
                return Err(Failure::new(
                    "Error 201 auth_certificate_expired, then close 4103",
                    format!("{other:?}"),
                )
                .into());
            }
        }
        if started.elapsed() > Duration::from_millis(LIFETIME_MS + 5_000) {
            return Err(Failure::new(
                format!("the session closed when its certificate expired ({LIFETIME_MS} ms)"),
                "still open 5 s later",
            )
            .into());
        }
    };
    if error.code != ErrorCode::AuthCertificateExpired {
        return Err(Failure::new(
            "Error 201 auth_certificate_expired",
            crate::context::describe_error(&error),
        )
        .into());
    }
    a.expect_close(4103).await
}

async fn unknown_token(cx: &mut Ctx) -> CaseResult {
    let token = ResumeToken::new(vec![0x42; 32]).map_err(|_| Stop::Skipped("token".into()))?;
    let (_a, answer) = resume(cx, "a", token).await?;
    match answer {
        ServerFrame::Error(e) if e.code == ErrorCode::ResumeTokenInvalid => Ok(()),
        other => Err(Failure::new("Error 208 resume_token_invalid", format!("{other:?}")).into()),
    }
}

async fn challenge_after_rejection(cx: &mut Ctx) -> CaseResult {
    let token = ResumeToken::new(vec![0x43; 32]).map_err(|_| Stop::Skipped("token".into()))?;
    let (mut a, _) = resume(cx, "a", token).await?;
    let ch = a
        .expect("Challenge after the Error", |f| match f {
            ServerFrame::Challenge(c) => Some(c.clone()),
            _ => None,
        })
        .await?;
    // The connection goes on to authenticate normally.
    let device = Device::fresh();
    let now = ch.server_time_ms;
    a.send(&ClientFrame::Auth(device.auth(
        device.certificate(now),
        &cx.origin,
        ch.nonce,
        now,
    )))
    .await?;
    a.expect("Ready", |f| {
        matches!(f, ServerFrame::Ready(_)).then_some(())
    })
    .await
}

/// Revokes `target` (a device of `by`'s system) from `by`'s session; expects `Ok`.
async fn revoke(by: &mut Peer, target: &Device, at: UnixMs) -> CaseResult {
    by.send(&ClientFrame::RevokeDevice(RevokeDevice {
        rid: 77,
        revocation: target.system.revoke(target.process, at),
    }))
    .await?;
    by.expect("Ok for rid 77", |f| match f {
        ServerFrame::Ok(o) if o.rid == 77 => Some(()),
        _ => None,
    })
    .await
}

async fn revoked_since_issue(cx: &mut Ctx) -> CaseResult {
    let device = Device::fresh();
    let (a, first) = cx.ready("a", &device).await?;
    drop(a);
    let sibling = device.sibling();
    let (mut s, ready) = cx.ready("sibling", &sibling).await?;
    revoke(&mut s, &device, ready.server_time_ms).await?;
    let (mut b, answer) = resume(cx, "b", first.resume_token).await?;
    match answer {
        ServerFrame::Error(e) if e.code == ErrorCode::AuthCertificateRevoked => {
            b.expect_close(4103).await
        }
        other => Err(Failure::new(
            "Error 202 auth_certificate_revoked, close 4103",
            format!("{other:?}"),
        )
        .into()),
    }
}

async fn one_session_per_device(cx: &mut Ctx) -> CaseResult {
    let device = Device::fresh();
    let (mut a, _) = cx.ready("a", &device).await?;
    let (_b, _) = cx.ready("b", &device).await?;
    a.expect_close(4104).await
}

async fn heartbeat_before_ready(cx: &mut Ctx) -> CaseResult {
    let device = Device::fresh();
    let mut a = cx.open("a").await?;
    a.send(&ClientFrame::Heartbeat(Heartbeat { nonce: 7 }))
        .await?;
    a.expect("HeartbeatAck 7 in state opened (SPEC.md 5.1)", |f| {
        matches!(f, ServerFrame::HeartbeatAck(h) if h.nonce == 7).then_some(())
    })
    .await?;
    // It changed no state: the handshake goes on as usual.
    a.authenticate(cx, &device).await?;
    Ok(())
}

async fn heartbeat_ack(cx: &mut Ctx) -> CaseResult {
    let (mut a, _) = cx.ready("a", &Device::fresh()).await?;
    for nonce in [0, 1, u64::MAX] {
        a.send(&ClientFrame::Heartbeat(Heartbeat { nonce })).await?;
        a.expect(&format!("HeartbeatAck {nonce}"), |f| match f {
            ServerFrame::HeartbeatAck(h) if h.nonce == nonce => Some(()),
            _ => None,
        })
        .await?;
    }
    Ok(())
}

async fn revoke_other_system(cx: &mut Ctx) -> CaseResult {
    let (mut a, ready) = cx.ready("a", &Device::fresh()).await?;
    let victim = Device::fresh();
    a.send(&ClientFrame::RevokeDevice(RevokeDevice {
        rid: 5,
        revocation: victim.system.revoke(victim.process, ready.server_time_ms),
    }))
    .await?;
    a.expect_error(ErrorCode::Forbidden, Some(5)).await?;
    // The victim still authenticates.
    cx.ready("victim", &victim).await.map(|_| ())
}

async fn revocation_signature(cx: &mut Ctx) -> CaseResult {
    let device = Device::fresh();
    let sibling = device.sibling();
    let (mut s, ready) = cx.ready("sibling", &sibling).await?;
    let mut revocation = device.system.revoke(device.process, ready.server_time_ms);
    revocation.signature = SystemKeyPair::generate(&mut rand_core::OsRng)
        .revoke(device.process, ready.server_time_ms)
        .signature;
    s.send(&ClientFrame::RevokeDevice(RevokeDevice {
        rid: 6,
        revocation,
    }))
    .await?;
    s.expect_error(ErrorCode::AuthCertificateInvalid, Some(6))
        .await?;
    cx.ready("device", &device).await.map(|_| ())
}

async fn revocation_closes_sessions(cx: &mut Ctx) -> CaseResult {
    let device = Device::fresh();
    let (mut d, _) = cx.ready("device", &device).await?;
    let sibling = device.sibling();
    let (mut s, ready) = cx.ready("sibling", &sibling).await?;
    revoke(&mut s, &device, ready.server_time_ms).await?;
    let started = tokio::time::Instant::now();
    d.expect_error(ErrorCode::AuthCertificateRevoked, None)
        .await?;
    d.expect_close(4105).await?;
    let took = started.elapsed();
    if took > std::time::Duration::from_secs(1) {
        return Err(Failure::new("close 4105 within 1 s", format!("after {took:?}")).into());
    }
    Ok(())
}

async fn future_revocation(cx: &mut Ctx) -> CaseResult {
    let device = Device::fresh();
    let (mut d, _) = cx.ready("device", &device).await?;
    let sibling = device.sibling();
    let (mut s, ready) = cx.ready("sibling", &sibling).await?;
    revoke(&mut s, &device, ready.server_time_ms.plus_ms(day(30))).await?;
    d.expect_close(4105).await?;
    let (mut again, ch) = challenge(cx, "again").await?;
    let now = ch.server_time_ms;
    again
        .send(&ClientFrame::Auth(device.auth(
            device.certificate(now),
            &cx.origin,
            ch.nonce,
            now,
        )))
        .await?;
    again
        .expect_error(ErrorCode::AuthCertificateRevoked, None)
        .await?;
    again.expect_close(4103).await
}

/// The order of the ed25519 base point, little-endian.
const ED25519_L: [u8; 32] = [
    0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

async fn non_canonical_signature(cx: &mut Ctx) -> CaseResult {
    let device = Device::fresh();
    let (mut a, ch) = challenge(cx, "a").await?;
    let now = ch.server_time_ms;
    let mut auth = device.auth(device.certificate(now), &cx.origin, ch.nonce, now);
    // S + L: the same signature for weak verifiers, not canonical for strict ones.
    let mut carry = 0u16;
    for (i, l) in ED25519_L.iter().enumerate() {
        let sum = u16::from(auth.signature.0[32 + i]) + u16::from(*l) + carry;
        auth.signature.0[32 + i] = sum as u8;
        carry = sum >> 8;
    }
    a.send(&ClientFrame::Auth(auth)).await?;
    a.expect_error(ErrorCode::AuthSignatureInvalid, None)
        .await?;
    a.expect_close(4103).await
}

async fn small_order_key(cx: &mut Ctx) -> CaseResult {
    let device = Device::fresh();
    let (mut a, ch) = challenge(cx, "a").await?;
    let now = ch.server_time_ms;
    // The identity point as device key; R = identity and S = 0 satisfy the weak
    // verification equation for any message.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let certificate = device.system.issue_certificate(
        device.process,
        DevicePublicKey(identity),
        UnixMs(now.0 - 60_000),
        now.plus_ms(3_600_000),
    );
    let mut auth = device.auth(certificate, &cx.origin, ch.nonce, now);
    let mut forged = [0u8; 64];
    forged[0] = 1;
    auth.signature = Signature(forged);
    a.send(&ClientFrame::Auth(auth)).await?;
    a.expect("Error 200 or 203", |f| match f {
        ServerFrame::Error(e)
            if matches!(
                e.code,
                ErrorCode::AuthCertificateInvalid | ErrorCode::AuthSignatureInvalid
            ) =>
        {
            Some(())
        }
        _ => None,
    })
    .await?;
    a.expect_close(4103).await
}

async fn token_properties(cx: &mut Ctx) -> CaseResult {
    let device = Device::fresh();
    let (a, first) = cx.ready("a", &device).await?;
    drop(a);
    let (_b, second) = cx.ready("b", &Device::fresh()).await?;
    let (t1, t2) = (
        first.resume_token.as_bytes(),
        second.resume_token.as_bytes(),
    );
    if t1.len() < 16 || t1 == t2 {
        return Err(Failure::new(
            "tokens of at least 16 bytes that differ",
            format!("{} and {} bytes, equal: {}", t1.len(), t2.len(), t1 == t2),
        )
        .into());
    }
    let (_c, answer) = resume(cx, "c", first.resume_token.clone()).await?;
    match answer {
        ServerFrame::Ready(r) if r.device == device.id() => Ok(()),
        other => Err(Failure::new(
            "Ready for the device the token was issued to",
            format!("{other:?}"),
        )
        .into()),
    }
}

async fn zombie(cx: &mut Ctx) -> CaseResult {
    let timeout = cx.info.heartbeat_timeout_ms;
    if timeout > 10_000 {
        return Err(Stop::Skipped(format!(
            "needs heartbeat_timeout_ms of at most 10,000 (the server announces {timeout}); \
             the reference gateway's conformance profile sets it"
        )));
    }
    let (mut a, _) = cx.ready("a", &Device::fresh()).await?;
    let started = tokio::time::Instant::now();
    match a
        .next(std::time::Duration::from_millis(timeout + 2_000))
        .await
    {
        Observed::Closed(Some(4001)) => {
            let after = started.elapsed().as_millis() as u64;
            if after + 200 < timeout {
                return Err(Failure::new(
                    format!("close 4001 after about {timeout} ms"),
                    format!("after {after} ms"),
                )
                .into());
            }
            Ok(())
        }
        other => Err(Failure::new(
            format!("close 4001 within {} ms", timeout + 2_000),
            other.to_string(),
        )
        .into()),
    }
}

/// Refuses `device` on a fresh connection with `auth_certificate_revoked`, close 4103.
async fn refused_as_revoked(cx: &Ctx, name: &str, device: &Device) -> CaseResult {
    let (mut peer, ch) = challenge(cx, name).await?;
    let now = ch.server_time_ms;
    peer.send(&ClientFrame::Auth(device.auth(
        device.certificate(now),
        &cx.origin,
        ch.nonce,
        now,
    )))
    .await?;
    peer.expect_error(ErrorCode::AuthCertificateRevoked, None)
        .await?;
    peer.expect_close(4103).await
}

async fn revocation_kept(cx: &mut Ctx) -> CaseResult {
    let device = Device::fresh();
    let sibling = device.sibling();
    let (mut s, ready) = cx.ready("sibling", &sibling).await?;
    revoke(&mut s, &device, ready.server_time_ms).await?;
    drop(s);
    for name in ["later", "later-again"] {
        refused_as_revoked(cx, name, &device).await?;
    }
    Ok(())
}

/// Waits for close 4005 on `peer`, which was opened at `opened`.
async fn auth_timeout_close(cx: &Ctx, peer: &mut Peer, opened: tokio::time::Instant) -> CaseResult {
    let timeout = cx.info.auth_timeout_ms;
    let wait = std::time::Duration::from_millis(timeout + 2_000);
    match peer.next(wait.saturating_sub(opened.elapsed())).await {
        Observed::Closed(Some(4005)) => {
            let after = opened.elapsed().as_millis() as u64;
            if after + 200 < timeout {
                return Err(Failure::new(
                    format!("close 4005 after about {timeout} ms"),
                    format!("after {after} ms"),
                )
                .into());
            }
            Ok(())
        }
        other => Err(Failure::new(
            format!("close 4005 within {} ms", timeout + 2_000),
            other.to_string(),
        )
        .into()),
    }
}

/// Skips when the server's `auth_timeout_ms` would make the case slow.
fn short_auth_timeout(cx: &Ctx) -> CaseResult {
    let timeout = cx.info.auth_timeout_ms;
    if timeout > 10_000 {
        return Err(Stop::Skipped(format!(
            "needs auth_timeout_ms of at most 10,000 (the server announces {timeout}); \
             the reference gateway's conformance profile sets it"
        )));
    }
    Ok(())
}

async fn auth_timeout_silent(cx: &mut Ctx) -> CaseResult {
    short_auth_timeout(cx)?;
    let opened = tokio::time::Instant::now();
    let mut a = cx.open("a").await?;
    auth_timeout_close(cx, &mut a, opened).await
}

async fn auth_timeout_after_hello(cx: &mut Ctx) -> CaseResult {
    short_auth_timeout(cx)?;
    let opened = tokio::time::Instant::now();
    let (mut a, _) = challenge(cx, "a").await?;
    auth_timeout_close(cx, &mut a, opened).await
}

/// Concurrent upgrades per wave of the connect-limit case.
const CONNECT_WAVE: u64 = 32;

/// Most upgrades the connect-limit case makes before it gives up on seeing a 429.
const CONNECTS_MAX: u64 = 3_000;

/// The largest `connects_per_ip` burst the connect-limit case tries to exceed.
const CONNECT_BURST_MAX: u64 = 1_000;

async fn connect_limit(cx: &mut Ctx) -> CaseResult {
    let Some((per_minute, burst)) = cx.info.rate_limit("connects_per_ip") else {
        return Err(Stop::Skipped(
            "/v1/info announces no connects_per_ip limit".into(),
        ));
    };
    if burst > CONNECT_BURST_MAX {
        return Err(Stop::Skipped(format!(
            "needs a connects_per_ip burst of at most {CONNECT_BURST_MAX} to exceed it; the \
             server announces {burst} (the reference gateway's conformance profile sets 200)"
        )));
    }
    let started = std::time::Instant::now();
    let mut opened = 0u64;
    loop {
        // A wave of upgrades at once, each dropped as soon as it is answered.
        let wave = (0..CONNECT_WAVE).map(|_| {
            tokio::time::timeout(
                ANSWER_WAIT,
                tokio_tungstenite::connect_async(cx.url.as_str()),
            )
        });
        for answer in futures_util::future::join_all(wave).await {
            match answer {
                Ok(Ok(_)) => opened += 1,
                Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response)))
                    if response.status().as_u16() == 429 =>
                {
                    let result = check_rate_limited(&response);
                    // Let the bucket refill for the cases after this one.
                    let wait = retry_after_seconds(&response).unwrap_or(1).min(20);
                    tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
                    return result;
                }
                Ok(Err(e)) => {
                    return Err(Failure::new("an upgrade, or HTTP 429", e.to_string()).into());
                }
                Err(_) => {
                    return Err(Failure::new("an upgrade, or HTTP 429", "no answer in 5 s").into());
                }
            }
        }
        let refilled = per_minute.saturating_mul(started.elapsed().as_millis() as u64) / 60_000;
        if opened > burst + refilled + CONNECT_WAVE {
            return Err(Failure::new(
                format!(
                    "HTTP 429 once upgrades from one address exceed connects_per_ip ({burst} at \
                     once, {per_minute} a minute)"
                ),
                format!(
                    "{opened} upgrades in {} ms, none refused",
                    started.elapsed().as_millis()
                ),
            )
            .into());
        }
        if opened >= CONNECTS_MAX {
            return Err(Stop::Skipped(format!(
                "{opened} upgrades could not outrun the limit's refill of {per_minute} a minute"
            )));
        }
    }
}

/// `Retry-After` as whole seconds.
fn retry_after_seconds(
    response: &tokio_tungstenite::tungstenite::http::Response<Option<Vec<u8>>>,
) -> Option<u64> {
    response
        .headers()
        .get("retry-after")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A 429 must carry `Retry-After` (whole seconds, rounded up) and the JSON body
/// `{"code": 900, "retry_after_ms": N}` that agrees with it.
fn check_rate_limited(
    response: &tokio_tungstenite::tungstenite::http::Response<Option<Vec<u8>>>,
) -> CaseResult {
    let expected = "HTTP 429 with Retry-After = ceil(retry_after_ms / 1000) and the body \
                    {\"code\": 900, \"retry_after_ms\": N}";
    let body = response.body().as_deref().unwrap_or_default();
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let code = json.as_ref().and_then(|j| j.get("code")?.as_u64());
    let retry_after_ms = json
        .as_ref()
        .and_then(|j| j.get("retry_after_ms")?.as_u64());
    let header = retry_after_seconds(response);
    match (code, retry_after_ms, header) {
        (Some(900), Some(ms), Some(seconds)) if ms.div_ceil(1_000) == seconds => Ok(()),
        _ => Err(Failure::new(
            expected,
            format!(
                "Retry-After {:?}, body {:?}",
                response.headers().get("retry-after"),
                String::from_utf8_lossy(body)
            ),
        )
        .into()),
    }
}
