//! The gateway's per-connection protocol logic, sans-IO (SPEC.md sections 4–7): it takes
//! one WebSocket message and returns the frames to send and whether to close. The network
//! shell (axum) and the simulator drive it; a fan-out hub calls
//! [`Connection::on_appended`] on every connection when a stream grows.
//!

use std::collections::HashMap;

use confab_spec::consent;
use confab_spec::error::{CloseCode, ErrorCode};
use confab_spec::frame::{
    self, Accepted, Batch, ClaimedKeyPackage, ClientFrame, ContinuityLost, Created, Deliver,
    DeviceStatus, Devices, Entry, EntryBody, ErrorFrame, HeartbeatAck, KeyPackagesClaimed,
    KeyPackagesStored, OkFrame, Ready, ServerFrame, SessionLimits, Subscribed, Unsubscribed,
};
use confab_spec::identity::{AuthExpectation, DeviceCertificate, verify_auth};
use confab_spec::ids::{
    DeviceId, Epoch, MlsBytes, Nonce, ResumeToken, Seq, SessionId, ShortText, StreamId, UnixMs,
};
use confab_spec::limits;
use confab_spec::mls_framing::{self, CommitProposal, ContentType, Peek, Sender, WireFormat};

use crate::faults::Faults;
pub use crate::rate::RateLimit;
use crate::rate::RateLimiters;
use crate::store::{
    AppendKind, AppendOutcome, AppendRequest, CreateOutcome, IssuedToken, JoinOutcome, PoolStatus,
    Redeemed, RetentionPolicy, RoomLimits, Store, StoreError, StoredKeyPackage, StreamKey,
    UploadOutcome,
};
use crate::telemetry;
use crate::tracked_group::{self, Revocations, TrackedGroup};
use sha2::{Digest, Sha256};

/// Settings the handler enforces and announces.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The gateway's origin, as clients sign it (SPEC.md 5.3).
    pub origin: String,
    /// `heartbeat_interval_ms`.
    pub heartbeat_interval_ms: u64,
    /// `heartbeat_timeout_ms`.
    pub heartbeat_timeout_ms: u64,
    /// `auth_timeout_ms`: a connection not `Ready` this long after the upgrade is closed
    /// with 4005 (SPEC.md 5.1).
    pub auth_timeout_ms: u64,
    /// `clock_skew_max_ms`.
    pub clock_skew_max_ms: u64,
    /// `resume_token_ttl_ms`.
    pub resume_token_ttl_ms: u64,
    /// Limits announced in `Ready` and enforced on decode.
    pub limits: SessionLimits,
    /// `pre_auth_frames_max`.
    pub pre_auth_frames_max: u64,
    /// `retention_ms` and `retention_unacked_ms` (SPEC.md 6.7).
    pub retention: RetentionPolicy,
    /// How often the gateway runs retention.
    pub gc_interval_ms: u64,
    /// Frames a session's outbound queue holds before the session is closed with 4002
    /// (SPEC.md 6.4).
    pub outbound_queue_max: usize,
    /// Bytes a session's outbound queue holds before the session is closed with 4002; at
    /// least twice `frame_bytes_max`.
    pub outbound_queue_bytes_max: usize,
    /// `connects_per_ip` (SPEC.md 11).
    pub connects_per_ip: RateLimit,
    /// `connections_max`: connections open at once, in all (SPEC.md 11); one more is
    /// closed as it is accepted.
    pub connections_max: usize,
    /// `connections_per_ip_max`: connections open at once from one source address.
    pub connections_per_ip_max: usize,
    /// `http_request_timeout_ms`: how long a connection has to send its HTTP request and
    /// begin the WebSocket upgrade; plain HTTP connections (`/v1/info`, `/metrics`) are
    /// closed after it too.
    pub http_request_timeout_ms: u64,
    /// `bytes_per_user_per_day`: payload and Welcome bytes one user may append in a UTC
    /// day (SPEC.md 11).
    pub bytes_per_user_per_day: u64,
    /// `conversation_bytes_max`: payload bytes a conversation's log may retain.
    pub conversation_bytes_max: u64,
    /// `claims_per_claimer` (SPEC.md 11).
    pub claims_per_claimer: RateLimit,
    /// `claims_per_target` (SPEC.md 11).
    pub claims_per_target: RateLimit,
    /// `claims_per_pair`: claims of one target by one claiming user (SPEC.md 8, 11); its
    /// burst stays below `claims_per_target`'s so that one claimer never takes a target's
    /// whole allowance.
    pub claims_per_pair: RateLimit,
    /// `sends_per_device` (SPEC.md 11).
    pub sends_per_device: RateLimit,
    /// `creates_per_system` (SPEC.md 11).
    pub creates_per_system: RateLimit,
    /// `invites_per_user` (SPEC.md 10.4).
    pub invites_per_user: RateLimit,
    /// `room_members_max` and `rooms_per_user_max` (SPEC.md 10.4).
    pub rooms: RoomLimits,
    /// `key_package_low_watermark`: the pool size below which the owner should upload
    /// more (SPEC.md 8).
    pub key_package_low_watermark: u64,
    /// `key_package_pool_max`: the most packages a device's pool holds (SPEC.md 8).
    pub key_package_pool_max: u64,
    /// Presence settings (SPEC.md 9).
    pub presence: crate::presence::PresenceConfig,
    /// Deliberately broken behaviours for self-tests; all off by default.
    pub faults: Faults,
    /// When writes are made durable (config key `fsync`).
    pub sync: crate::durability::SyncPolicy,
}

impl GatewayConfig {
    /// The bytes a session's outbound queue holds, as enforced and announced:
    /// `outbound_queue_bytes_max`, but at least two frames of `frame_bytes_max`, so that
    /// the largest frame never closes a session that reads.
    pub fn outbound_queue_bytes(&self) -> usize {
        self.outbound_queue_bytes_max
            .max(2 * usize::try_from(self.limits.frame_bytes_max).unwrap_or(usize::MAX / 2))
    }

    /// Defaults of SPEC.md for `origin`.
    pub fn new(origin: impl Into<String>) -> Self {
        Self {
            origin: origin.into(),
            heartbeat_interval_ms: limits::HEARTBEAT_INTERVAL_MS_DEFAULT,
            heartbeat_timeout_ms: limits::HEARTBEAT_TIMEOUT_MS_DEFAULT,
            auth_timeout_ms: limits::AUTH_TIMEOUT_MS_DEFAULT,
            clock_skew_max_ms: limits::CLOCK_SKEW_MAX_MS_DEFAULT,
            resume_token_ttl_ms: 3_600_000,
            limits: SessionLimits::default(),
            pre_auth_frames_max: limits::PRE_AUTH_FRAMES_MAX_DEFAULT,
            retention: RetentionPolicy::default(),
            gc_interval_ms: 60_000,
            outbound_queue_max: 1_024,
            outbound_queue_bytes_max: 8 * 1_048_576,
            connects_per_ip: RateLimit {
                per_minute: 20,
                burst: 40,
            },
            bytes_per_user_per_day: 256 * 1_048_576,
            conversation_bytes_max: 4 * 1_073_741_824,
            connections_max: 16_000,
            connections_per_ip_max: 256,
            http_request_timeout_ms: 10_000,
            claims_per_claimer: RateLimit {
                per_minute: 30,
                burst: 30,
            },
            claims_per_target: RateLimit {
                per_minute: 60,
                burst: 60,
            },
            claims_per_pair: RateLimit {
                per_minute: 6,
                burst: 10,
            },
            sends_per_device: RateLimit {
                per_minute: 3_000,
                burst: 200,
            },
            creates_per_system: RateLimit {
                per_minute: 1,
                burst: 30,
            },
            invites_per_user: RateLimit {
                per_minute: 30,
                burst: 100,
            },
            rooms: RoomLimits::default(),
            key_package_low_watermark: 10,
            key_package_pool_max: 200,
            presence: crate::presence::PresenceConfig::default(),
            faults: Faults::default(),
            sync: crate::durability::SyncPolicy::default(),
        }
    }
}

/// What the network shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this frame.
    Send(ServerFrame),
    /// Send this frame, already encoded: a [`LiveEntry`]'s `Deliver`, encoded once for
    /// every subscriber.
    SendEncoded(std::sync::Arc<[u8]>),
    /// Close the connection with this code (after sending what precedes it).
    Close(CloseCode),
    /// A stream grew to `seq`: the hub calls `on_entry` or `on_appended` on every
    /// connection.
    Appended {
        /// The stream.
        stream: StreamKey,
        /// Its new head.
        seq: Seq,
        /// The entry itself, when live subscribers may take it without reading the store:
        /// application messages and proposals (a Commit may end subscriptions, REQ-7.6-3,
        /// so it always goes through the store).
        entry: Option<std::sync::Arc<LiveEntry>>,
    },
    /// A revocation of `device` was stored: close its sessions with 4105 (REQ-3.3-3).
    Revoked {
        /// The revoked device.
        device: DeviceId,
    },
    /// A resume token of `family` was used twice: close `device`'s session if it descends
    /// from that chain, with `resume_token_reused` and 4103 (REQ-5.5-10).
    ChainReused {
        /// The device the token was bound to.
        device: DeviceId,
        /// The chain.
        family: [u8; 16],
    },
    /// A presence frame (SPEC.md 9) from `device`: the shell passes it to the gateway's
    /// [`crate::presence::Presence`], which serves every session.
    Presence {
        /// The authenticated device.
        device: DeviceId,
        /// `SetPresence`, `WatchPresence`, `UpdatePresenceLists` or `UpdateInviteSettings`.
        frame: ClientFrame,
    },
}

/// Randomness the handler needs (nonces, session ids, tokens), injected for determinism.
pub trait Entropy {
    /// Fills `out` with random bytes.
    fn fill(&mut self, out: &mut [u8]);
}

#[derive(Debug)]
enum State {
    Opened,
    Challenged { version: u64, nonce: Nonce },
    Ready { device: DeviceId },
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sub {
    /// A batch ending at `next - 1` awaits the client's `Continue`.
    AwaitContinue { rid: u64, next: u64 },
    /// Replay is done; entries from `next` are delivered as they arrive.
    Live { rid: u64, next: u64 },
}

/// The server side of one connection.
pub struct Connection {
    state: State,
    frames_before_ready: u64,
    subscriptions: HashMap<StreamKey, Sub>,
    /// Once `Ready`: the session's resume-token chain and the end of its certificate.
    session: Option<([u8; 16], UnixMs)>,
}

impl Default for Connection {
    fn default() -> Self {
        Self::new()
    }
}

impl Connection {
    /// A freshly upgraded connection.
    pub fn new() -> Self {
        Self {
            state: State::Opened,
            frames_before_ready: 0,
            subscriptions: HashMap::new(),
            session: None,
        }
    }

    /// Once `Ready`: the session's resume-token chain, and when its device's certificate
    /// expires (the session ends then, REQ-5.5-11).
    pub fn session(&self) -> Option<([u8; 16], UnixMs)> {
        self.session
    }

    /// The authenticated device, once `Ready` was sent.
    pub fn device(&self) -> Option<DeviceId> {
        match self.state {
            State::Ready { device } => Some(device),
            _ => None,
        }
    }

    /// The streams this connection follows.
    pub fn subscribed_streams(&self) -> Vec<StreamKey> {
        self.subscriptions.keys().copied().collect()
    }

    /// Handles one binary WebSocket message.
    pub fn handle(
        &mut self,
        config: &GatewayConfig,
        store: &mut dyn Store,
        limiters: &RateLimiters,
        entropy: &mut dyn Entropy,
        now: UnixMs,
        message: &[u8],
    ) -> Vec<Action> {
        let mut out = Vec::new();
        if matches!(self.state, State::Closed) {
            return out;
        }
        let ready = matches!(self.state, State::Ready { .. });
        if !ready {
            self.frames_before_ready += 1;
            if self.frames_before_ready > config.pre_auth_frames_max {
                return self.close(out, CloseCode::PreAuthFlood);
            }
        }
        let mut decode_limits = config.limits.decode_limits();
        if config.faults.no_frame_size_limit {
            decode_limits.frame_bytes_max = usize::MAX;
        }
        let frame = match ClientFrame::decode(message, &decode_limits) {
            Ok(f) => f,
            Err(e) => {
                out.push(error(e.code(), None, Some(&e.to_string())));
                if e.code() == ErrorCode::FrameTooLarge {
                    return self.close(out, CloseCode::FrameTooLarge);
                }
                if !ready {
                    return self.close(out, CloseCode::ProtocolError);
                }
                return out;
            }
        };
        let result = match (&self.state, frame) {
            (State::Opened, ClientFrame::Hello(hello)) => {
                self.on_hello(config, store, entropy, now, &hello, &mut out)
            }
            (State::Challenged { version, nonce }, ClientFrame::Auth(auth)) => {
                let (version, nonce) = (*version, *nonce);
                self.on_auth(config, store, entropy, now, version, nonce, &auth, &mut out)
            }
            (State::Ready { device }, frame) => {
                let device = *device;
                self.on_ready_frame(config, store, limiters, now, device, frame, &mut out)
            }
            // Answered in every state (SPEC.md 5.1); before Ready it counts toward
            // `pre_auth_frames_max` like any frame.
            (State::Opened | State::Challenged { .. }, ClientFrame::Heartbeat(h)) => {
                out.push(heartbeat_ack(&h));
                Ok(())
            }
            (_, frame) => {
                out.push(error(
                    ErrorCode::UnexpectedFrame,
                    frame.rid(),
                    Some(&format!("{} is not allowed now", frame.name())),
                ));
                if ready {
                    Ok(())
                } else {
                    return self.close(out, CloseCode::ProtocolError);
                }
            }
        };
        if let Err(e) = result {
            // The store failed: nothing changed; the client retries. What failed is for the
            // operator's log, not for the peer (it can name tables, paths or SQL).
            tracing::warn!(error = %e, "a store call failed");
            out.push(error(
                ErrorCode::InternalError,
                None,
                Some("the gateway's storage failed; nothing was changed, try again"),
            ));
        }
        out
    }

    /// A stream grew: deliver what a live subscription has not seen yet, in seq order.
    pub fn on_appended(
        &mut self,
        config: &GatewayConfig,
        store: &dyn Store,
        stream: &StreamKey,
    ) -> Result<Vec<Action>, StoreError> {
        let mut out = Vec::new();
        let Some(Sub::Live { rid, next }) = self.subscriptions.get(stream).copied() else {
            return Ok(out);
        };
        let Some(from) = Seq::new(next) else {
            return Ok(out);
        };
        if self.lost_continuity(store, *stream, rid, from, &mut out)? {
            return Ok(out);
        }
        let (entries, end) = self.read_member(
            config,
            store,
            stream,
            from,
            config.limits.replay_batch_max as usize,
        )?;
        let mut next = next;
        for entry in entries {
            if entry.seq.get() != next {
                break;
            }
            next += 1;
            if config.faults.deliver_twice {
                out.push(Action::Send(ServerFrame::Deliver(Deliver {
                    stream: wire_stream(stream),
                    entry: entry.clone(),
                })));
            }
            out.push(Action::Send(ServerFrame::Deliver(Deliver {
                stream: wire_stream(stream),
                entry,
            })));
        }
        telemetry::live_delivered(out.len());
        if end.is_some_and(|end| next > end) {
            self.end_subscription(*stream, rid, &mut out);
        } else {
            self.subscriptions.insert(*stream, Sub::Live { rid, next });
        }
        Ok(out)
    }

    /// Delivers `entry`, just appended to `stream`, from memory: `Some` with what to send
    /// (nothing when this connection has no live subscription to the stream or already
    /// has the entry), or `None` when the entry is not the next one the subscription
    /// expects and the caller must read the store with [`Self::on_appended`] instead.
    /// Only application messages and proposals come this way; a Commit, which may end the
    /// subscription (REQ-7.6-3), always goes through the store, so a subscription that
    /// reaches an entry past a removing Commit has already ended.
    pub fn on_entry(
        &mut self,
        config: &GatewayConfig,
        stream: &StreamKey,
        live: &LiveEntry,
    ) -> Option<Vec<Action>> {
        let entry = &live.entry;
        let Some(Sub::Live { rid, next }) = self.subscriptions.get(stream).copied() else {
            return Some(Vec::new());
        };
        let seq = entry.seq.get();
        if seq < next {
            return Some(Vec::new());
        }
        if seq > next
            || matches!(
                entry.body,
                EntryBody::Commit { .. } | EntryBody::Welcome { .. }
            )
        {
            return None;
        }
        let deliver = || Action::SendEncoded(live.deliver_frame());
        let mut out = vec![deliver()];
        if config.faults.deliver_twice {
            out.push(deliver());
        }
        telemetry::live_delivered(out.len());
        self.subscriptions
            .insert(*stream, Sub::Live { rid, next: seq + 1 });
        Some(out)
    }

    /// Up to `limit` entries of `stream` from `from` (bounded by `frame_bytes_max`) that this
    /// device may read, and the last seq it may read at all: the Commit that removed it, if
    /// one did at or after `from` (REQ-7.6-2). Inboxes have no end.
    fn read_member(
        &self,
        config: &GatewayConfig,
        store: &dyn Store,
        stream: &StreamKey,
        from: Seq,
        limit: usize,
    ) -> Result<(Vec<Entry>, Option<u64>), StoreError> {
        let end = match (stream, self.device()) {
            (StreamKey::Conversation(c), Some(device)) => {
                store.departure(c, &device, from.get())?
            }
            _ => None,
        };
        let mut entries = store.read(stream, from, limit, batch_bytes_max(config))?;
        if let Some(end) = end {
            entries.retain(|e| e.seq.get() <= end);
        }
        Ok((entries, end))
    }

    /// The device was removed and has been delivered the removing Commit: the subscription
    /// ends with `Unsubscribed` (REQ-7.6-3).
    fn end_subscription(&mut self, stream: StreamKey, rid: u64, out: &mut Vec<Action>) {
        self.subscriptions.remove(&stream);
        out.push(Action::Send(ServerFrame::Unsubscribed(Unsubscribed {
            rid,
            stream: wire_stream(&stream),
        })));
    }

    /// Retention deleted entries this subscription still needed: answers `ContinuityLost`
    /// and ends the subscription (REQ-6.6-1).
    fn lost_continuity(
        &mut self,
        store: &dyn Store,
        stream: StreamKey,
        rid: u64,
        from_seq: Seq,
        out: &mut Vec<Action>,
    ) -> Result<bool, StoreError> {
        let (head_seq, oldest_seq) = store.bounds(&stream)?;
        if from_seq.get() >= oldest_seq {
            return Ok(false);
        }
        self.subscriptions.remove(&stream);
        out.push(Action::Send(ServerFrame::ContinuityLost(ContinuityLost {
            rid,
            stream: wire_stream(&stream),
            from_seq,
            oldest_seq,
            head_seq,
        })));
        Ok(true)
    }

    fn close(&mut self, mut out: Vec<Action>, code: CloseCode) -> Vec<Action> {
        self.state = State::Closed;
        out.push(Action::Close(code));
        out
    }

    fn on_hello(
        &mut self,
        config: &GatewayConfig,
        store: &mut dyn Store,
        entropy: &mut dyn Entropy,
        now: UnixMs,
        hello: &frame::Hello,
        out: &mut Vec<Action>,
    ) -> Result<(), StoreError> {
        let Some(version) = hello
            .versions
            .as_slice()
            .iter()
            .copied()
            .filter(|v| *v == limits::PROTOCOL_VERSION)
            .max()
        else {
            out.push(error(ErrorCode::UnsupportedVersion, None, None));
            let taken = std::mem::take(out);
            *out = self.close(taken, CloseCode::UnsupportedVersion);
            return Ok(());
        };
        if let Some(token) = &hello.resume_token {
            let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            telemetry::reconnect();
            match store.redeem_token(&hash, now)? {
                Redeemed::Valid(t) if now >= t.certificate_not_after => {
                    // The certificate expired since the token was issued (REQ-5.5-6).
                    self.reject_auth(out, ErrorCode::AuthCertificateExpired);
                    return Ok(());
                }
                Redeemed::Valid(t) if store.revoked_at(&t.device)?.is_some_and(|at| at <= now) => {
                    // The device was revoked since the token was issued (REQ-5.5-6).
                    self.reject_auth(out, ErrorCode::AuthCertificateRevoked);
                    return Ok(());
                }
                Redeemed::Valid(t) => {
                    // Broken on purpose (a fault switch): the same token back.
                    let reused = config
                        .faults
                        .no_token_rotation
                        .then(|| token.as_bytes().to_vec());
                    return self.ready(
                        config,
                        store,
                        entropy,
                        now,
                        t.device,
                        t.session,
                        t.family,
                        t.certificate_not_after,
                        true,
                        reused,
                        out,
                    );
                }
                Redeemed::Reused { device, family } => {
                    telemetry::auth_rejected(ErrorCode::ResumeTokenReused);
                    out.push(error(ErrorCode::ResumeTokenReused, None, None));
                    if !config.faults.reuse_keeps_sessions {
                        out.push(Action::ChainReused { device, family });
                    }
                }
                Redeemed::Invalid => {
                    telemetry::auth_rejected(ErrorCode::ResumeTokenInvalid);
                    out.push(error(ErrorCode::ResumeTokenInvalid, None, None));
                }
            }
        }
        // No token, or a rejected one: a fresh challenge on the same connection (REQ-5.5-5).
        let mut nonce = [0u8; 32];
        entropy.fill(&mut nonce);
        let nonce = Nonce(nonce);
        self.state = State::Challenged { version, nonce };
        out.push(Action::Send(ServerFrame::Challenge(frame::Challenge {
            version,
            nonce,
            server_time_ms: now,
        })));
        Ok(())
    }

    /// Enters `ready`: issues the next resume token of `family` and sends `Ready` (with the
    /// presented token again instead, when the `no_token_rotation` fault is on).
    #[allow(clippy::too_many_arguments)]
    fn ready(
        &mut self,
        config: &GatewayConfig,
        store: &mut dyn Store,
        entropy: &mut dyn Entropy,
        now: UnixMs,
        device: DeviceId,
        session: [u8; 16],
        family: [u8; 16],
        certificate_not_after: UnixMs,
        resumed: bool,
        reused_token: Option<Vec<u8>>,
        out: &mut Vec<Action>,
    ) -> Result<(), StoreError> {
        let token = match reused_token {
            Some(token) => token,
            None => {
                let mut token = vec![0u8; 32];
                entropy.fill(&mut token);
                store.issue_token(&IssuedToken {
                    hash: Sha256::digest(&token).into(),
                    device,
                    session,
                    family,
                    expires: now.plus_ms(config.resume_token_ttl_ms),
                    certificate_not_after,
                })?;
                token
            }
        };
        let resume_token = ResumeToken::new(token)
            .map_err(|e| StoreError::Corrupt(format!("resume token: {e}")))?;
        self.state = State::Ready { device };
        self.session = Some((family, certificate_not_after));
        telemetry::session_ready(resumed);
        out.push(Action::Send(ServerFrame::Ready(Ready {
            session_id: SessionId(session),
            resume_token,
            resume_token_ttl_ms: config.resume_token_ttl_ms,
            heartbeat_interval_ms: config.heartbeat_interval_ms,
            heartbeat_timeout_ms: config.heartbeat_timeout_ms,
            resumed,
            server_time_ms: now,
            device,
            limits: config.limits.clone(),
        })));
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn on_auth(
        &mut self,
        config: &GatewayConfig,
        store: &mut dyn Store,
        entropy: &mut dyn Entropy,
        now: UnixMs,
        version: u64,
        nonce: Nonce,
        auth: &frame::Auth,
        out: &mut Vec<Action>,
    ) -> Result<(), StoreError> {
        let expected = AuthExpectation {
            origin: &config.origin,
            nonce,
            version,
            now,
            clock_skew_max_ms: config.clock_skew_max_ms,
        };
        let revoked = store.revoked_at(&auth.certificate.device_id())?;
        if let Err(code) = verify_auth(auth, &expected, |_| revoked) {
            let tolerated = (code == ErrorCode::AuthCertificateExpired
                && config.faults.accept_expired_certificate)
                || (code == ErrorCode::AuthNonceInvalid && config.faults.accept_any_nonce);
            if !tolerated {
                self.reject_auth(out, code);
                return Ok(());
            }
        }
        let (mut session, mut family) = ([0u8; 16], [0u8; 16]);
        entropy.fill(&mut session);
        entropy.fill(&mut family);
        let device = auth.certificate.device_id();
        let not_after = auth.certificate.not_after_ms;
        self.ready(
            config, store, entropy, now, device, session, family, not_after, false, None, out,
        )
    }

    /// Answers `code` and closes with 4103 (SPEC.md 5.4, 5.5).
    fn reject_auth(&mut self, out: &mut Vec<Action>, code: ErrorCode) {
        telemetry::auth_rejected(code);
        out.push(error(code, None, None));
        let taken = std::mem::take(out);
        *out = self.close(taken, CloseCode::AuthFailed);
    }

    #[allow(clippy::too_many_arguments)]
    fn on_ready_frame(
        &mut self,
        config: &GatewayConfig,
        store: &mut dyn Store,
        limiters: &RateLimiters,
        now: UnixMs,
        device: DeviceId,
        frame: ClientFrame,
        out: &mut Vec<Action>,
    ) -> Result<(), StoreError> {
        match frame {
            ClientFrame::Heartbeat(h) => out.push(heartbeat_ack(&h)),
            ClientFrame::CreateConversation(c) => {
                if let Err(retry_after_ms) = limiters.creates_per_system.check(&device.system, now)
                {
                    out.push(rate_limited(Some(c.rid), retry_after_ms));
                    return Ok(());
                }
                self.on_create(config, store, now, device, c, out)?;
            }
            ClientFrame::Send(s) => {
                if let Err(retry_after_ms) = limiters.sends_per_device.check(&device, now) {
                    out.push(rate_limited(Some(s.rid), retry_after_ms));
                    return Ok(());
                }
                self.on_send(config, store, limiters, now, device, s, out)?
            }
            ClientFrame::Subscribe(s) => self.on_subscribe(config, store, device, s, out)?,
            ClientFrame::Continue(c) => {
                let stream = stream_key(&c.stream, device);
                match self.subscriptions.get(&stream) {
                    Some(Sub::AwaitContinue { rid, next }) if c.after_seq.get() + 1 == *next => {
                        let (rid, next) = (*rid, *next);
                        self.batch(config, store, stream, rid, next, out)?;
                    }
                    _ => out.push(error(ErrorCode::NotSubscribed, None, None)),
                }
            }
            ClientFrame::Unsubscribe(u) => {
                self.subscriptions.remove(&stream_key(&u.stream, device));
                out.push(Action::Send(ServerFrame::Unsubscribed(Unsubscribed {
                    rid: u.rid,
                    stream: u.stream,
                })));
            }
            ClientFrame::Ack(a) => {
                let stream = stream_key(&a.stream, device);
                if let Some(code) = self.read_access(store, &stream, device, a.seq.get())? {
                    out.push(error(code, None, None));
                } else if store.ack(&stream, &device, a.seq)?.is_none() {
                    out.push(error(ErrorCode::SeqOutOfRange, None, None));
                } else {
                    telemetry::acked();
                }
            }
            ClientFrame::RevokeDevice(r) => {
                let revoked = r.revocation.device_id();
                if r.revocation.system != device.system {
                    out.push(error(ErrorCode::Forbidden, Some(r.rid), None));
                } else if r.revocation.verify().is_err() {
                    out.push(error(ErrorCode::AuthCertificateInvalid, Some(r.rid), None));
                } else {
                    store.store_revocation(&r.revocation, now)?;
                    telemetry::revocation_stored();
                    out.push(Action::Send(ServerFrame::Ok(OkFrame { rid: r.rid })));
                    out.push(Action::Revoked { device: revoked });
                    if revoked == device {
                        out.push(error(ErrorCode::AuthCertificateRevoked, None, None));
                        let taken = std::mem::take(out);
                        *out = self.close(taken, CloseCode::DeviceRevoked);
                    }
                }
            }
            ClientFrame::UploadKeyPackages(u) => {
                on_upload(config, store, now, device, u, out)?;
            }
            ClientFrame::ClaimKeyPackages(c) => {
                // The pair before the target: a claimer held back by its own pair limit
                // takes nothing from what other claimers of the target may use (REQ-8-10).
                let limited = limiters
                    .claims_per_claimer
                    .check(&device, now)
                    .and_then(|()| {
                        if config.faults.no_claim_pair_limit {
                            return Ok(());
                        }
                        limiters
                            .claims_per_pair
                            .check(&(device.system, c.user), now)
                    })
                    .and_then(|()| limiters.claims_per_target.check(&c.user, now));
                if let Err(retry_after_ms) = limited {
                    out.push(rate_limited(Some(c.rid), retry_after_ms));
                    return Ok(());
                }
                // A target that does not allow the claimer is answered as a key nobody
                // holds, after the same limits, the same lookups and the same claim
                // transaction, which then considers no device and consumes nothing
                // (REQ-8-13).
                let consent = store.consent_of(&c.user, &device.system)?;
                let allowed = consent::allows(&c.user, &device.system, consent);
                let only = if allowed || config.faults.refused_claim_consumes {
                    c.devices.as_deref()
                } else {
                    Some(&[][..])
                };
                let claimed = store.claim_key_packages(&c.user, &device, only, now)?;
                if claimed.is_empty() || !allowed {
                    out.push(error(ErrorCode::NoKeyPackages, Some(c.rid), None));
                    return Ok(());
                }
                let mut packages = Vec::with_capacity(claimed.len());
                for p in claimed {
                    packages.push(ClaimedKeyPackage {
                        device: p.device,
                        key_package: MlsBytes::new(p.key_package)
                            .map_err(|e| StoreError::Corrupt(format!("key package: {e}")))?,
                        last_resort: p.last_resort,
                    });
                }
                out.push(Action::Send(ServerFrame::KeyPackagesClaimed(
                    KeyPackagesClaimed {
                        rid: c.rid,
                        user: c.user,
                        claimed: packages,
                    },
                )));
            }
            ClientFrame::ListDevices(l) => {
                let devices = store
                    .devices(&device.system, now)?
                    .into_iter()
                    .map(|d| DeviceStatus {
                        device: d.device,
                        pool_count: d.pool_count,
                        last_resort_present: d.last_resort_present,
                    })
                    .collect();
                out.push(Action::Send(ServerFrame::Devices(Devices {
                    rid: l.rid,
                    devices,
                })));
            }
            ClientFrame::GetGroupInfo(g) => {
                out.push(group_info_answer(config, store, device, &g)?);
            }
            frame @ (ClientFrame::SetPresence(_)
            | ClientFrame::WatchPresence(_)
            | ClientFrame::UpdatePresenceLists(_)
            | ClientFrame::UpdateInviteSettings(_)) => {
                out.push(Action::Presence { device, frame });
            }
            other => out.push(error(
                ErrorCode::UnexpectedFrame,
                other.rid(),
                Some(&format!(
                    "{} is not implemented by this gateway yet",
                    other.name()
                )),
            )),
        }
        Ok(())
    }

    /// `CreateConversation` (SPEC.md 6.1): the id must be free, then the GroupInfo must be
    /// a valid new group of this device (REQ-6.1-3); the conversation starts from it.
    fn on_create(
        &mut self,
        config: &GatewayConfig,
        store: &mut dyn Store,
        now: UnixMs,
        device: DeviceId,
        c: frame::CreateConversation,
        out: &mut Vec<Action>,
    ) -> Result<(), StoreError> {
        let rid = Some(c.rid);
        if store.conversation(&c.conversation)?.is_some() {
            out.push(error(ErrorCode::ConversationExists, rid, None));
            return Ok(());
        }
        if c.group_info.as_bytes().len() > payload_bytes_max(config) {
            out.push(error(ErrorCode::PayloadTooLarge, rid, None));
            return Ok(());
        }
        let revocations = revocations_of(store, [device])?;
        let group = match tracked_group::observe_new_group(
            c.group_info.as_bytes(),
            &c.conversation,
            c.kind,
            &device,
            now,
            &revocations,
        ) {
            Ok(group) => group,
            Err(refusal) if config.faults.no_group_info_check => {
                tracing::debug!(detail = %refusal.detail, "fault: GroupInfo taken unverified");
                unverified_new_group(c.kind, device)
            }
            Err(refusal) => {
                out.push(error(refusal.code, rid, Some(&refusal.detail)));
                return Ok(());
            }
        };
        match store.create_conversation(
            &c.conversation,
            c.kind,
            &group,
            config.rooms.rooms_per_user_max,
            now,
        )? {
            CreateOutcome::Created => out.push(Action::Send(ServerFrame::Created(Created {
                rid: c.rid,
                conversation: c.conversation,
            }))),
            CreateOutcome::Exists => out.push(error(ErrorCode::ConversationExists, rid, None)),
            CreateOutcome::TooManyRooms => out.push(error(ErrorCode::TooManyRooms, rid, None)),
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn on_send(
        &mut self,
        config: &GatewayConfig,
        store: &mut dyn Store,
        limiters: &RateLimiters,
        now: UnixMs,
        device: DeviceId,
        s: frame::Send,
        out: &mut Vec<Action>,
    ) -> Result<(), StoreError> {
        let rid = Some(s.rid);
        let payload_max = payload_bytes_max(config);
        if s.payload.as_bytes().len() > payload_max
            || s.welcome
                .as_ref()
                .is_some_and(|w| w.as_bytes().len() > payload_max)
        {
            out.push(error(ErrorCode::PayloadTooLarge, rid, None));
            return Ok(());
        }
        // The sender's daily bytes (SPEC.md 11); a resend of a sequenced msg_id is answered
        // as section 6.3 says whatever the quota.
        let bytes = (s.payload.as_bytes().len()
            + s.welcome.as_ref().map_or(0, |w| w.as_bytes().len())) as u64;
        let quotas = !config.faults.no_storage_quotas;
        let sequenced = store.sequenced(&s.conversation, &s.msg_id)?;
        if quotas && !sequenced {
            if let Err(retry_after_ms) = limiters.bytes_per_user.allows(&device.system, bytes, now)
            {
                out.push(Action::Send(ServerFrame::Error(ErrorFrame {
                    code: ErrorCode::QuotaExceeded,
                    rid,
                    retry_after_ms: Some(retry_after_ms),
                    epoch: None,
                    seq: None,
                    detail: Some(ShortText::truncated("bytes_per_user_per_day")),
                })));
                return Ok(());
            }
        }
        // The first Send of a user's device to a room joins the user, as a Subscribe does
        // (REQ-10-8); a resend was counted when it was first sent.
        if !sequenced
            && store.join(&s.conversation, &device, config.rooms.rooms_per_user_max)?
                == JoinOutcome::TooManyRooms
        {
            out.push(error(
                ErrorCode::TooManyRooms,
                rid,
                Some("this user has joined rooms_per_user_max rooms"),
            ));
            return Ok(());
        }
        let kind = match classify(config, store, &s, device, now)? {
            Ok(kind) => kind,
            Err(refusal) => {
                out.push(Action::Send(ServerFrame::Error(ErrorFrame {
                    code: refusal.code,
                    rid,
                    retry_after_ms: None,
                    epoch: refusal.epoch,
                    seq: refusal.seq,
                    detail: refusal.detail.as_deref().map(ShortText::truncated),
                })));
                return Ok(());
            }
        };
        // `invites_per_user`: one token per user whose first device the Commit adds
        // (SPEC.md 10.4).
        let mut added = Vec::new();
        if let AppendKind::Commit {
            next: Some(next), ..
        } = &kind
        {
            let roster = store.roster(&s.conversation)?;
            added = tracked_group::membership_change(&roster, &next.members)
                .added
                .into_iter()
                .map(|(_, d)| d)
                .collect();
            if !added.is_empty() {
                let present: std::collections::BTreeSet<_> =
                    roster.into_iter().map(|(_, d)| d.system).collect();
                let invited: std::collections::BTreeSet<_> = added
                    .iter()
                    .map(|d| d.system)
                    .filter(|u| *u != device.system && !present.contains(u))
                    .collect();
                let n = u32::try_from(invited.len()).unwrap_or(u32::MAX);
                if let Err(retry_after_ms) =
                    limiters.invites_per_user.check_n(&device.system, n, now)
                {
                    out.push(rate_limited(rid, retry_after_ms));
                    return Ok(());
                }
            }
        }
        // What live subscribers receive, built before the payload moves into the store.
        let live_body = match kind {
            AppendKind::Application { epoch } => Some(EntryBody::Application { epoch }),
            AppendKind::Proposal { epoch, .. } => Some(EntryBody::Proposal { epoch }),
            AppendKind::Commit { .. } => None,
        };
        let live_payload = live_body.map(|_| s.payload.clone());
        let outcome = store.append(&AppendRequest {
            conversation: s.conversation,
            sender: device,
            msg_id: s.msg_id,
            payload: s.payload,
            kind: kind.clone(),
            now,
            rooms: config.rooms,
            bytes_max: if quotas {
                config.conversation_bytes_max
            } else {
                u64::MAX
            },
        })?;
        let accepted = |seq: Seq, duplicate: bool| {
            Action::Send(ServerFrame::Accepted(Accepted {
                rid: s.rid,
                conversation: s.conversation,
                msg_id: s.msg_id,
                seq,
                duplicate,
            }))
        };
        if matches!(kind, AppendKind::Commit { .. }) {
            telemetry::commit(match outcome {
                AppendOutcome::Appended { .. } => "accepted",
                AppendOutcome::Duplicate { .. } => "duplicate",
                AppendOutcome::StaleCommit { .. } => "stale",
                _ => "rejected",
            });
        }
        match outcome {
            AppendOutcome::Appended { seq } => {
                limiters.bytes_per_user.charge(&device.system, bytes, now);
                telemetry::appended(match kind {
                    AppendKind::Application { .. } => "application",
                    AppendKind::Proposal { .. } => "proposal",
                    AppendKind::Commit { .. } => "commit",
                });
                out.push(accepted(seq, false));
                let stream = StreamKey::Conversation(s.conversation);
                let entry = live_body.zip(live_payload).map(|(body, payload)| {
                    let entry = Entry {
                        seq,
                        msg_id: s.msg_id,
                        sender: device,
                        accepted_ms: now,
                        payload,
                        body,
                    };
                    std::sync::Arc::new(LiveEntry::new(&stream, entry))
                });
                out.push(Action::Appended { stream, seq, entry });
                if matches!(kind, AppendKind::Commit { .. }) {
                    for d in added {
                        let (head, _) = store.bounds(&StreamKey::Inbox(d))?;
                        if let Some(seq) = Seq::new(head) {
                            out.push(Action::Appended {
                                stream: StreamKey::Inbox(d),
                                seq,
                                entry: None,
                            });
                        }
                    }
                }
            }
            AppendOutcome::Duplicate { seq } => out.push(accepted(seq, true)),
            AppendOutcome::Conflict => out.push(error(ErrorCode::MsgIdConflict, rid, None)),
            AppendOutcome::StaleCommit { epoch, epoch_seq } => {
                out.push(Action::Send(ServerFrame::Error(ErrorFrame {
                    code: ErrorCode::StaleCommit,
                    rid,
                    retry_after_ms: None,
                    epoch: Some(epoch),
                    seq: Seq::new(epoch_seq),
                    detail: None,
                })))
            }
            AppendOutcome::EpochAhead { epoch } | AppendOutcome::EpochTooOld { epoch } => {
                let code = match outcome {
                    AppendOutcome::EpochAhead { .. } => ErrorCode::EpochAhead,
                    _ => ErrorCode::EpochTooOld,
                };
                out.push(Action::Send(ServerFrame::Error(ErrorFrame {
                    code,
                    rid,
                    retry_after_ms: None,
                    epoch: Some(epoch),
                    seq: None,
                    detail: None,
                })))
            }
            AppendOutcome::WelcomeMismatch => {
                out.push(error(ErrorCode::WelcomeMismatch, rid, None))
            }
            AppendOutcome::Unverified => {
                tracing::error!("a Commit reached the store unverified");
                out.push(error(ErrorCode::InternalError, rid, None))
            }
            AppendOutcome::NotMember => out.push(error(ErrorCode::NotMember, rid, None)),
            AppendOutcome::NotFound => out.push(error(ErrorCode::ConversationNotFound, rid, None)),
            AppendOutcome::Forbidden(why) => out.push(error(ErrorCode::Forbidden, rid, Some(&why))),
            AppendOutcome::RoomFull => out.push(error(
                ErrorCode::RoomFull,
                rid,
                Some("the room would pass room_members_max"),
            )),
            AppendOutcome::ConversationFull => out.push(error(
                ErrorCode::QuotaExceeded,
                rid,
                Some("conversation_bytes_max"),
            )),
            AppendOutcome::InviteNotAllowed => out.push(error(
                ErrorCode::InviteNotAllowed,
                rid,
                Some("rule 8: an invitee does not allow the committer"),
            )),
        }
        Ok(())
    }

    fn on_subscribe(
        &mut self,
        config: &GatewayConfig,
        store: &mut dyn Store,
        device: DeviceId,
        s: frame::Subscribe,
        out: &mut Vec<Action>,
    ) -> Result<(), StoreError> {
        let stream = stream_key(&s.stream, device);
        let cursor = store.cursor(&stream, &device)?;
        let from = s.from_seq.map_or(cursor + 1, Seq::get);
        if let Some(code) = self.read_access(store, &stream, device, from)? {
            out.push(error(code, Some(s.rid), None));
            return Ok(());
        }
        // Nothing from before the Commit that added the device (REQ-7.6-4).
        if let StreamKey::Conversation(c) = &stream {
            let arrived = store.arrival(c, &device)?;
            if arrived.is_some_and(|a| from < a) && !config.faults.joiner_reads_history {
                out.push(error(
                    ErrorCode::NotMember,
                    Some(s.rid),
                    Some("from_seq is before the Commit that added this device"),
                ));
                return Ok(());
            }
        }
        // The first Subscribe of a user's device to a room joins the user (REQ-10-8).
        if let StreamKey::Conversation(c) = &stream {
            if store.join(c, &device, config.rooms.rooms_per_user_max)? == JoinOutcome::TooManyRooms
            {
                out.push(error(
                    ErrorCode::TooManyRooms,
                    Some(s.rid),
                    Some("this user has joined rooms_per_user_max rooms"),
                ));
                return Ok(());
            }
        }
        let (head, oldest) = store.bounds(&stream)?;
        if from > head + 1 {
            out.push(error(ErrorCode::SeqOutOfRange, Some(s.rid), None));
            return Ok(());
        }
        let Some(from_seq) = Seq::new(from) else {
            out.push(error(ErrorCode::SeqOutOfRange, Some(s.rid), None));
            return Ok(());
        };
        // A restart discards the old subscription's state (REQ-6.4-5).
        self.subscriptions.remove(&stream);
        if from < oldest {
            out.push(Action::Send(ServerFrame::ContinuityLost(ContinuityLost {
                rid: s.rid,
                stream: s.stream,
                from_seq,
                oldest_seq: oldest,
                head_seq: head,
            })));
            return Ok(());
        }
        out.push(Action::Send(ServerFrame::Subscribed(Subscribed {
            rid: s.rid,
            stream: s.stream,
            from_seq,
            head_seq: head,
            ack_cursor: cursor,
            oldest_seq: oldest,
        })));
        self.batch(config, store, stream, s.rid, from, out)
    }

    /// Sends the next replay batch from `from` (SPEC.md 6.4) and records what follows.
    fn batch(
        &mut self,
        config: &GatewayConfig,
        store: &dyn Store,
        stream: StreamKey,
        rid: u64,
        from: u64,
        out: &mut Vec<Action>,
    ) -> Result<(), StoreError> {
        let max = config.limits.replay_batch_max.max(1) as usize;
        let Some(from_seq) = Seq::new(from) else {
            return Ok(());
        };
        // Retention may have passed the replay while it waited for `Continue`.
        if self.lost_continuity(store, stream, rid, from_seq, out)? {
            return Ok(());
        }
        let (mut entries, end) = self.read_member(config, store, &stream, from_seq, max)?;
        if config.faults.skip_seq_on_replay && entries.len() > 2 {
            entries.remove(1); // broken on purpose
        }
        telemetry::replay_batch(entries.len());
        let (head, _) = store.bounds(&stream)?;
        let head = end.map_or(head, |end| head.min(end));
        let last = entries.last().map_or(from - 1, |e| e.seq.get());
        let more = !entries.is_empty() && last < head;
        self.subscriptions.insert(
            stream,
            if more {
                Sub::AwaitContinue {
                    rid,
                    next: last + 1,
                }
            } else {
                Sub::Live {
                    rid,
                    next: last + 1,
                }
            },
        );
        out.push(Action::Send(ServerFrame::Batch(Batch {
            stream: wire_stream(&stream),
            entries,
            more,
        })));
        if !more && end.is_some_and(|end| last >= end) {
            self.end_subscription(stream, rid, out);
        }
        Ok(())
    }

    /// `None` when `device` may read `stream` from `from_seq`, else the error code. A
    /// removed device may still read up to the Commit that removed it (REQ-7.6-2).
    fn read_access(
        &self,
        store: &dyn Store,
        stream: &StreamKey,
        device: DeviceId,
        from_seq: u64,
    ) -> Result<Option<ErrorCode>, StoreError> {
        match stream {
            StreamKey::Inbox(_) => Ok(None),
            StreamKey::Conversation(c) => {
                if store.conversation(c)?.is_none() {
                    return Ok(Some(ErrorCode::ConversationNotFound));
                }
                let member = store.roster(c)?.iter().any(|(_, d)| *d == device)
                    || store.departure(c, &device, from_seq)?.is_some();
                Ok((!member).then_some(ErrorCode::NotMember))
            }
        }
    }
}

/// `UploadKeyPackages` (SPEC.md section 8): validates every package, then stores them all
/// or none.
fn on_upload(
    config: &GatewayConfig,
    store: &mut dyn Store,
    now: UnixMs,
    device: DeviceId,
    u: frame::UploadKeyPackages,
    out: &mut Vec<Action>,
) -> Result<(), StoreError> {
    let rid = Some(u.rid);
    if u.key_packages.len() as u64 > config.limits.key_packages_per_upload_max {
        out.push(error(
            ErrorCode::KeyPackageInvalid,
            rid,
            Some("more packages than key_packages_per_upload_max"),
        ));
        return Ok(());
    }
    let revoked = store.revoked_at(&device)?;
    let mut packages = Vec::with_capacity(u.key_packages.len());
    for (i, bytes) in u.key_packages.iter().enumerate() {
        match validate_key_package(bytes.as_bytes(), device, now, revoked) {
            Ok(p) => packages.push(p),
            Err(why) => {
                out.push(error(
                    ErrorCode::KeyPackageInvalid,
                    rid,
                    Some(&format!("key package {i}: {why}")),
                ));
                return Ok(());
            }
        }
    }
    let last_resort = match &u.last_resort {
        Some(bytes) => match validate_key_package(bytes.as_bytes(), device, now, revoked) {
            Ok(p) => Some(p),
            Err(why) => {
                out.push(error(
                    ErrorCode::KeyPackageInvalid,
                    rid,
                    Some(&format!("last-resort key package: {why}")),
                ));
                return Ok(());
            }
        },
        None => None,
    };
    let stored = |status: PoolStatus| {
        Action::Send(ServerFrame::KeyPackagesStored(KeyPackagesStored {
            rid: u.rid,
            pool_count: status.pool_count,
            low_watermark: config.key_package_low_watermark,
            last_resort_present: status.last_resort_present,
            last_resort_claimed: status.last_resort_claimed,
        }))
    };
    match store.upload_key_packages(
        &device,
        &packages,
        last_resort.as_ref(),
        config.key_package_pool_max,
        now,
    )? {
        UploadOutcome::Stored(status) => out.push(stored(status)),
        UploadOutcome::PoolFull(_) => out.push(error(
            ErrorCode::KeyPackagePoolFull,
            rid,
            Some("the pool would pass key_package_pool_max"),
        )),
    }
    Ok(())
}

/// REQ-8-1: the package parses, uses ciphersuite 1, is signed by its leaf's key, and its
/// credential is a certificate of the uploading device, valid now and for that key; its
/// lifetime contains now.
fn validate_key_package(
    bytes: &[u8],
    device: DeviceId,
    now: UnixMs,
    revoked: Option<UnixMs>,
) -> Result<StoredKeyPackage, &'static str> {
    let kp = mls_framing::key_package(bytes).map_err(|_| "does not parse")?;
    if kp.cipher_suite != 1 {
        return Err("ciphersuite is not 0x0001");
    }
    if kp.credential_type != 1 {
        return Err("credential is not basic");
    }
    let cert = confab_spec::cbor::from_slice::<DeviceCertificate>(
        &kp.identity,
        &confab_spec::DecodeLimits::default(),
    )
    .map_err(|_| "credential is not a device certificate")?;
    if cert.device_id() != device {
        return Err("credential names another device");
    }
    if kp.signature_key != cert.device_key.0 {
        return Err("leaf signature key is not the certificate's device key");
    }
    cert.verify(now, limits::CLOCK_SKEW_MAX_MS_DEFAULT, |_| revoked)
        .map_err(|_| "certificate is not valid now")?;
    let now_s = now.0 / 1_000;
    let Some((not_before, not_after)) = kp.lifetime else {
        return Err("leaf has no lifetime");
    };
    // A device whose clock runs ahead makes packages that start "in the future"; the same
    // skew as for certificates is allowed (SPEC.md 8).
    let skew_s = limits::CLOCK_SKEW_MAX_MS_DEFAULT / 1_000;
    if now_s.saturating_add(skew_s) < not_before || now_s >= not_after {
        return Err("lifetime does not contain now");
    }
    if !kp.verify_signature() {
        return Err("signature does not verify");
    }
    Ok(StoredKeyPackage {
        bytes: bytes.to_vec(),
        not_after_s: not_after,
    })
}

/// Why a `Send` is refused before the store sees it.
struct Refusal {
    code: ErrorCode,
    epoch: Option<Epoch>,
    seq: Option<Seq>,
    detail: Option<String>,
}

impl From<tracked_group::Refusal> for Refusal {
    fn from(r: tracked_group::Refusal) -> Self {
        Refusal {
            code: r.code,
            epoch: None,
            seq: None,
            detail: Some(r.detail),
        }
    }
}

/// The largest `payload`, `welcome` or `group_info` a frame may carry.
fn payload_bytes_max(config: &GatewayConfig) -> usize {
    limits::payload_bytes_max(usize::try_from(config.limits.frame_bytes_max).unwrap_or(usize::MAX))
}

/// `GetGroupInfo` (SPEC.md 7.10, REQ-7.10-4): the GroupInfo kept for the conversation,
/// with the tracked tree when it carries none, to member devices only.
fn group_info_answer(
    config: &GatewayConfig,
    store: &dyn Store,
    device: DeviceId,
    g: &frame::GetGroupInfo,
) -> Result<Action, StoreError> {
    let rid = Some(g.rid);
    if store.conversation(&g.conversation)?.is_none() {
        return Ok(error(ErrorCode::ConversationNotFound, rid, None));
    }
    if !config.faults.group_info_to_anyone
        && !store
            .roster(&g.conversation)?
            .iter()
            .any(|(_, d)| *d == device)
    {
        return Ok(error(ErrorCode::NotMember, rid, None));
    }
    let (Some(kept), Some(snapshot)) = (
        store.group_info(&g.conversation)?,
        store.group_state(&g.conversation)?,
    ) else {
        return Ok(error(
            ErrorCode::ConversationNotFound,
            rid,
            Some("the gateway keeps no GroupInfo for this conversation"),
        ));
    };
    let tree = match tracked_group::tree_to_serve(&snapshot, &kept.group_info) {
        Ok(tree) => tree,
        Err(refusal) => return Ok(error(refusal.code, rid, Some(&refusal.detail))),
    };
    let size = kept.group_info.len() + tree.as_ref().map_or(0, Vec::len);
    if size > payload_bytes_max(config) {
        return Ok(error(
            ErrorCode::PayloadTooLarge,
            rid,
            Some("the GroupInfo and the tree do not fit in one frame"),
        ));
    }
    let bytes =
        |b: Vec<u8>| MlsBytes::new(b).map_err(|e| StoreError::Corrupt(format!("group info: {e}")));
    Ok(Action::Send(ServerFrame::GroupInfo(
        frame::GroupInfoFrame {
            rid: g.rid,
            conversation: g.conversation,
            epoch: kept.epoch,
            seq: kept.seq,
            group_info: bytes(kept.group_info)?,
            ratchet_tree: tree.map(bytes).transpose()?,
        },
    )))
}

/// The known revocations of `devices`, for credential checks.
fn revocations_of(
    store: &dyn Store,
    devices: impl IntoIterator<Item = DeviceId>,
) -> Result<Revocations, StoreError> {
    let mut revocations = Revocations::new();
    for device in devices {
        if let Some(at) = store.revoked_at(&device)? {
            revocations.insert(device, at);
        }
    }
    Ok(revocations)
}

/// Applies SPEC.md 7.2, 7.3 and 7.7 to a `Send`: what the payload is, or why it is
/// refused. A handshake message for the conversation's current epoch from a member, whose
/// msg_id is new, is verified against the tracked group; any other is left to the store,
/// which answers it as a duplicate, a conflict, `not_member`, `stale_commit` or
/// `epoch_ahead` and never appends it unverified.
fn classify(
    config: &GatewayConfig,
    store: &dyn Store,
    s: &frame::Send,
    device: DeviceId,
    now: UnixMs,
) -> Result<Result<AppendKind, Refusal>, StoreError> {
    let refuse = |code| {
        Ok(Err(Refusal {
            code,
            epoch: None,
            seq: None,
            detail: None,
        }))
    };
    let framing = match mls_framing::peek(s.payload.as_bytes()) {
        Ok(Peek::Framed(f)) => f,
        Ok(Peek::Unframed(_)) => return refuse(ErrorCode::MlsWireFormatNotAllowed),
        Err(_) => return refuse(ErrorCode::MlsMalformed),
    };
    if framing.group_id != s.conversation.0 {
        return refuse(ErrorCode::MlsGroupMismatch);
    }
    let epoch = Epoch(framing.epoch);
    match (framing.wire_format, framing.content_type) {
        (WireFormat::PrivateMessage, ContentType::Application) => {
            Ok(Ok(AppendKind::Application { epoch }))
        }
        (WireFormat::PublicMessage, ContentType::Proposal | ContentType::Commit) => {
            // The PublicMessage sender must be the sending device's own leaf (406), but for
            // an external Commit of a member device: a resync (SPEC.md 7.10).
            let roster = store.roster(&s.conversation)?;
            let own_leaf = roster.iter().find(|(_, d)| *d == device).map(|(l, _)| *l);
            let resync = match (own_leaf, framing.sender, framing.content_type) {
                (Some(leaf), Some(Sender::NewMemberCommit), ContentType::Commit)
                    if !config.faults.refuse_resyncs =>
                {
                    Some((device, leaf))
                }
                _ => None,
            };
            if own_leaf.is_some()
                && resync.is_none()
                && framing.sender != own_leaf.map(Sender::Member)
            {
                return refuse(ErrorCode::MlsSenderMismatch);
            }
            let current = store.conversation(&s.conversation)?.map(|c| c.epoch);
            let fresh = own_leaf.is_some() && !store.sequenced(&s.conversation, &s.msg_id)?;
            let verify = fresh && current == Some(epoch);
            if framing.content_type == ContentType::Proposal {
                return classify_proposal(config, store, s, device, epoch, verify, now);
            }
            // The `two_commits_per_epoch` fault lets a stale Commit through: it takes the
            // epoch unverified, the group as it was.
            let stale =
                config.faults.two_commits_per_epoch && fresh && current.is_some_and(|c| c > epoch);
            classify_commit(
                config,
                store,
                s,
                CommitFrom { device, resync },
                epoch,
                (verify, stale),
                now,
            )
        }
        _ => refuse(ErrorCode::MlsWireFormatNotAllowed),
    }
}

/// A standalone proposal: a leave request, verified when `verify` (SPEC.md 7.7, 10.3).
fn classify_proposal(
    config: &GatewayConfig,
    store: &dyn Store,
    s: &frame::Send,
    device: DeviceId,
    epoch: Epoch,
    verify: bool,
    now: UnixMs,
) -> Result<Result<AppendKind, Refusal>, StoreError> {
    let framed = match mls_framing::proposal_contents(s.payload.as_bytes()) {
        Ok((_, CommitProposal::Remove { leaf })) => Some(leaf),
        Ok(_) => None,
        Err(_) => {
            return Ok(Err(Refusal::from(tracked_group::Refusal {
                code: ErrorCode::MlsMalformed,
                detail: "the proposal does not parse".into(),
            })));
        }
    };
    if !verify {
        return Ok(Ok(AppendKind::Proposal {
            epoch,
            removes: framed,
        }));
    }
    let Some(snapshot) = store.group_state(&s.conversation)? else {
        return Ok(Err(untracked()));
    };
    let revocations = revocations_of(store, [device])?;
    match tracked_group::verify_proposal(&snapshot, s.payload.as_bytes(), now, &revocations) {
        Ok(verified) => Ok(Ok(AppendKind::Proposal {
            epoch,
            removes: Some(verified.removes),
        })),
        Err(refusal) if config.faults.no_handshake_verification => {
            tracing::debug!(detail = %refusal.detail, "fault: proposal taken unverified");
            Ok(Ok(AppendKind::Proposal {
                epoch,
                removes: framed,
            }))
        }
        Err(refusal) => Ok(Err(refusal.into())),
    }
}

/// Who sent a Commit: the device, and for an external Commit of a member device, the
/// device with the leaf the gateway maps to it (a resync, SPEC.md 7.10).
struct CommitFrom {
    device: DeviceId,
    resync: Option<(DeviceId, u32)>,
}

/// A Commit: all proposals by value (REQ-7.3-3), verified with its Welcome and GroupInfo
/// when `verify` (SPEC.md 7.5, 7.7, 7.10); taken unverified when `stale` (the
/// `two_commits_per_epoch` fault).
fn classify_commit(
    config: &GatewayConfig,
    store: &dyn Store,
    s: &frame::Send,
    CommitFrom { device, resync }: CommitFrom,
    epoch: Epoch,
    (verify, stale): (bool, bool),
    now: UnixMs,
) -> Result<Result<AppendKind, Refusal>, StoreError> {
    let contents = match mls_framing::commit_contents(s.payload.as_bytes()) {
        Ok(c) => c,
        Err(_) => {
            return Ok(Err(Refusal::from(tracked_group::Refusal {
                code: ErrorCode::MlsMalformed,
                detail: "the Commit does not parse".into(),
            })));
        }
    };
    if contents.by_reference > 0 {
        return Ok(Err(Refusal {
            code: ErrorCode::MlsCommitByReference,
            epoch: None,
            seq: None,
            detail: None,
        }));
    }
    let mut adds = Vec::new();
    let mut roles = None;
    for p in &contents.by_value {
        match p {
            CommitProposal::Add { identity, .. } => {
                if let Ok(cert) = confab_spec::identity::certificate_of_credential(identity) {
                    adds.push(cert.device_id());
                }
            }
            CommitProposal::GroupContextExtensions { extensions } => {
                roles = extensions
                    .iter()
                    .find(|(t, _)| *t == confab_spec::rooms::ROLES_EXTENSION_TYPE)
                    .map(|(_, data)| confab_spec::rooms::RoomRoles::from_extension(data));
            }
            _ => {}
        }
    }
    if resync.is_some() {
        // A resync changes no role and cannot carry a roles proposal (SPEC.md 7.10): the
        // rules judge it with the roles restated.
        roles = store.room_roles(&s.conversation)?.map(Ok);
    }
    let commit = |next| {
        Ok(Ok(AppendKind::Commit {
            epoch,
            welcome: s.welcome.clone(),
            roles: roles.clone(),
            next,
        }))
    };
    if stale {
        let snapshot = store.group_state(&s.conversation)?.unwrap_or_default();
        let next = unverified_next(store, s, epoch, snapshot, roles.clone())?;
        return commit(Some(Box::new(next)));
    }
    if !verify {
        return commit(None);
    }
    let Some(snapshot) = store.group_state(&s.conversation)? else {
        return Ok(Err(untracked()));
    };
    let revocations = revocations_of(store, adds.into_iter().chain([device]))?;
    let input = tracked_group::CommitInput {
        commit: s.payload.as_bytes(),
        welcome: s
            .welcome
            .as_ref()
            .map(|w| w.as_bytes())
            .filter(|_| !config.faults.no_welcome_check),
        group_info: s.group_info.as_ref().map(|g| g.as_bytes()),
        check_group_info: !config.faults.no_commit_group_info_check,
        resync,
    };
    let verified = tracked_group::verify_commit(&snapshot, &input, now, &revocations);
    match verified {
        Ok(next) => commit(Some(Box::new(next))),
        Err(refusal)
            if config.faults.no_handshake_verification
                && refusal.code != ErrorCode::MlsWelcomeInvalid =>
        {
            tracing::debug!(detail = %refusal.detail, "fault: Commit taken unverified");
            let next = unverified_next(store, s, epoch, snapshot, roles.clone())?;
            commit(Some(Box::new(next)))
        }
        Err(refusal) => Ok(Err(refusal.into())),
    }
}

/// A conversation the gateway holds no group state for: created before it tracked groups.
fn untracked() -> Refusal {
    Refusal::from(tracked_group::Refusal {
        code: ErrorCode::MlsHandshakeInvalid,
        detail: "the gateway holds no group state for this conversation".into(),
    })
}

/// The `no_handshake_verification` fault: the group after an unverified Commit is the
/// group before it, one epoch on.
fn unverified_next(
    store: &dyn Store,
    s: &frame::Send,
    epoch: Epoch,
    snapshot: Vec<u8>,
    stated: Option<Result<confab_spec::rooms::RoomRoles, confab_spec::rooms::RolesError>>,
) -> Result<TrackedGroup, StoreError> {
    let roles = match stated {
        Some(Ok(roles)) => Some(roles),
        _ => store.room_roles(&s.conversation)?,
    };
    Ok(TrackedGroup {
        epoch: Epoch(epoch.0 + 1),
        snapshot,
        members: store.roster(&s.conversation)?,
        extensions: roles.map(|r| r.context_extensions()).unwrap_or_default(),
        group_info: None,
    })
}

/// The `no_group_info_check` fault: a new group taken on the creator's word.
fn unverified_new_group(kind: frame::ConversationKind, creator: DeviceId) -> TrackedGroup {
    TrackedGroup {
        epoch: Epoch(0),
        snapshot: Vec::new(),
        members: vec![(0, creator)],
        extensions: match kind {
            frame::ConversationKind::Room => {
                confab_spec::rooms::RoomRoles::new(creator.system).context_extensions()
            }
            _ => Vec::new(),
        },
        group_info: None,
    }
}

/// The entry bytes one `Batch` may carry so that it fits in `frame_bytes_max`.
fn batch_bytes_max(config: &GatewayConfig) -> usize {
    usize::try_from(config.limits.frame_bytes_max)
        .unwrap_or(usize::MAX)
        .saturating_sub(limits::FRAME_ENVELOPE_BYTES_MAX)
}

fn stream_key(stream: &StreamId, device: DeviceId) -> StreamKey {
    match stream {
        StreamId::Inbox => StreamKey::Inbox(device),
        StreamId::Conversation(c) => StreamKey::Conversation(*c),
    }
}

/// An application message or proposal that live subscribers take from memory
/// ([`Connection::on_entry`]), with its `Deliver` frame encoded once for all of them (a
/// room's message is delivered to every subscribed member device).
#[derive(Debug)]
pub struct LiveEntry {
    stream: StreamId,
    entry: Entry,
    deliver: std::sync::OnceLock<std::sync::Arc<[u8]>>,
}

/// Equal when the stream and the entry are; the encoding is a cache.
impl PartialEq for LiveEntry {
    fn eq(&self, other: &Self) -> bool {
        self.stream == other.stream && self.entry == other.entry
    }
}

impl Eq for LiveEntry {}

impl LiveEntry {
    /// `entry`, appended to `stream`.
    pub fn new(stream: &StreamKey, entry: Entry) -> Self {
        Self {
            stream: wire_stream(stream),
            entry,
            deliver: std::sync::OnceLock::new(),
        }
    }

    /// Its `Deliver` frame, encoded on first use.
    pub fn deliver_frame(&self) -> std::sync::Arc<[u8]> {
        self.deliver
            .get_or_init(|| {
                ServerFrame::Deliver(Deliver {
                    stream: self.stream,
                    entry: self.entry.clone(),
                })
                .encode()
                .into()
            })
            .clone()
    }
}

fn wire_stream(stream: &StreamKey) -> StreamId {
    match stream {
        StreamKey::Inbox(_) => StreamId::Inbox,
        StreamKey::Conversation(c) => StreamId::Conversation(*c),
    }
}

/// `rate_limited` (900) with the wait (REQ-11-1).
fn rate_limited(rid: Option<u64>, retry_after_ms: u64) -> Action {
    Action::Send(ServerFrame::Error(ErrorFrame {
        rid,
        retry_after_ms: Some(retry_after_ms),
        ..ErrorFrame::new(ErrorCode::RateLimited)
    }))
}

/// The answer to a `Heartbeat` (SPEC.md 5.6), in any state.
fn heartbeat_ack(heartbeat: &frame::Heartbeat) -> Action {
    Action::Send(ServerFrame::HeartbeatAck(HeartbeatAck {
        nonce: heartbeat.nonce,
    }))
}

fn error(code: ErrorCode, rid: Option<u64>, detail: Option<&str>) -> Action {
    Action::Send(ServerFrame::Error(ErrorFrame {
        rid,
        detail: detail.map(ShortText::truncated),
        ..ErrorFrame::new(code)
    }))
}
