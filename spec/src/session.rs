//! The sans-IO client session (SPEC.md sections 5 and 6.8).
//!
//! [`ClientSession`] holds everything a client connection needs to remember: the
//! handshake, the resume token, heartbeats and zombie detection, reconnect backoff with
//! full jitter, the outbox of unanswered sends (resent with the same `msg_id` after every
//! reconnect), and per-stream `next_seq` and ack cursors with gap detection and
//! de-duplication. It performs no I/O and reads no clock: the driver feeds it
//! `(now, input)` through [`ClientSession::handle`], then drains
//! [`ClientSession::poll_output`] and arms a timer for [`ClientSession::poll_timeout`].
//!
//! Connections are numbered ([`ConnId`]). Every transport input names its connection, and
//! input for a connection the session has already abandoned is ignored, so a driver that
//! delivers stale frames from a dead socket cannot corrupt the session.

use std::collections::{BTreeMap, HashMap, VecDeque};

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::cbor::DecodeLimits;
use crate::error::{CloseCode, ErrorCode};
use crate::frame::{
    self, ClientFrame, ConversationKind, CreateConversation, Entry, Hello, ServerFrame,
    SessionLimits, Versions,
};
use crate::identity::{DeviceCertificate, DeviceKeyPair, sign_auth};
use crate::ids::{
    ConversationId, Epoch, MlsBytes, MsgId, ResumeToken, Seq, SessionId, StreamId, UnixMs,
};
use crate::limits;

/// Settings of a client session. Defaults follow SPEC.md.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The gateway origin the client signs (SPEC.md section 5.3).
    pub origin: String,
    /// Versions offered in `Hello`.
    pub versions: Vec<u64>,
    /// Give up on a connection attempt after this long.
    pub connect_timeout_ms: u64,
    /// Give up on a handshake (`Hello` to `Ready`) after this long.
    pub handshake_timeout_ms: u64,
    /// `backoff_base_ms` (SPEC.md section 5.8).
    pub backoff_base_ms: u64,
    /// `backoff_cap_ms`.
    pub backoff_cap_ms: u64,
    /// Most unanswered sends kept in the outbox.
    pub pending_sends_max: usize,
    /// How many recent msg_ids per stream are remembered for de-duplication.
    pub dedup_window: usize,
    /// Limits applied when decoding frames before `Ready` announces the gateway's.
    pub decode_limits: DecodeLimits,
    /// Deliberately broken behaviours; all off by default.
    pub faults: SessionFaults,
}

/// Deliberately broken behaviours of the session, for the self-test of the conformance
/// suite's client mode: each switch makes the session break one MUST of SPEC.md, so a test
/// can show that the suite notices. All are off by default; only code that builds a
/// [`SessionConfig`] can turn one on (the `confab` CLI never does).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionFaults {
    /// Never send a heartbeat (REQ-5.6-1).
    pub no_heartbeat: bool,
    /// Reconnect at once after every failure, without backoff (REQ-5.8-1).
    pub no_backoff: bool,
    /// Ignore a connection-level `retry_after_ms` (REQ-5.8-2).
    pub ignore_retry_after: bool,
    /// Reconnect after a close code that forbids it (REQ-5.7-1).
    pub reconnect_after_fatal_close: bool,
    /// Resume with the first resume token ever received, not the newest (REQ-5.5-8).
    pub keep_first_resume_token: bool,
    /// Give a resent message a new msg_id (REQ-6.3-4).
    pub new_msg_id_on_resend: bool,
}

impl SessionConfig {
    /// Defaults for `origin`.
    pub fn new(origin: impl Into<String>) -> Self {
        Self {
            origin: origin.into(),
            versions: vec![limits::PROTOCOL_VERSION],
            connect_timeout_ms: 10_000,
            handshake_timeout_ms: limits::AUTH_TIMEOUT_MS_DEFAULT,
            backoff_base_ms: limits::BACKOFF_BASE_MS,
            backoff_cap_ms: limits::BACKOFF_CAP_MS,
            pending_sends_max: limits::PENDING_SENDS_MAX_DEFAULT as usize,
            dedup_window: 1_024,
            decode_limits: DecodeLimits::default(),
            faults: SessionFaults::default(),
        }
    }
}

/// A device's credentials: its key and its certificate.
#[derive(Debug, Clone)]
pub struct DeviceCredentials {
    /// The device key pair.
    pub key: DeviceKeyPair,
    /// The certificate binding it to its system.
    pub certificate: DeviceCertificate,
}

/// Names one transport connection attempt.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    arbitrary::Arbitrary,
)]
#[serde(transparent)]
pub struct ConnId(pub u64);

/// Something that happened, fed to [`ClientSession::handle`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, arbitrary::Arbitrary)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Input {
    /// The application wants to be connected.
    Start,
    /// The application wants to disconnect and stay disconnected.
    Stop,
    /// The transport for `conn` is open.
    Connected {
        /// The connection.
        conn: ConnId,
    },
    /// The transport for `conn` closed or could not be opened.
    Closed {
        /// The connection.
        conn: ConnId,
        /// The WebSocket close code, if one was received.
        code: Option<u16>,
    },
    /// A decoded frame arrived on `conn`.
    Frame {
        /// The connection.
        conn: ConnId,
        /// The frame.
        frame: ServerFrame,
    },
    /// Raw bytes of one binary WebSocket message arrived on `conn`.
    Bytes {
        /// The connection.
        conn: ConnId,
        /// The message.
        #[serde(with = "hex_bytes")]
        bytes: Vec<u8>,
    },
    /// A timer armed from [`ClientSession::poll_timeout`] fired (or any wake-up).
    Timeout,
    /// Send an MLS message; the `msg_id` was fixed when the message was composed.
    Send {
        /// Target conversation.
        conversation: ConversationId,
        /// Idempotency key.
        msg_id: MsgId,
        /// The MLSMessage.
        payload: MlsBytes,
        /// The Welcome for a Commit that adds members.
        welcome: Option<MlsBytes>,
        /// With a Commit, the GroupInfo of the epoch it opens (SPEC.md 7.10).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group_info: Option<MlsBytes>,
    },
    /// Create a conversation.
    CreateConversation {
        /// Its id.
        conversation: ConversationId,
        /// Its kind.
        kind: ConversationKind,
        /// The GroupInfo of the creator's new MLS group (SPEC.md 6.1).
        group_info: MlsBytes,
    },
    /// Follow a stream, from `from_seq` or from where the session is.
    Subscribe {
        /// The stream.
        stream: StreamId,
        /// Where to start (never before entries already delivered).
        from_seq: Option<Seq>,
    },
    /// The application durably processed every entry of `stream` up to `seq`.
    Ack {
        /// The stream.
        stream: StreamId,
        /// The highest processed seq.
        seq: Seq,
    },
}

/// What the driver must do, or what the application must know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Output {
    /// Open a new transport and report it as `conn`.
    Connect {
        /// The connection's id.
        conn: ConnId,
    },
    /// Send this frame on `conn`.
    Transmit {
        /// The connection.
        conn: ConnId,
        /// The frame.
        frame: ClientFrame,
    },
    /// Close `conn`; the session has already moved on and wants no report of the close.
    Close {
        /// The connection.
        conn: ConnId,
        /// The close code to send.
        code: u16,
    },
    /// Something the application should see.
    Event(Event),
}

/// Events for the application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// Authenticated.
    Ready {
        /// The session id.
        session_id: SessionId,
        /// Whether the resume token was accepted.
        resumed: bool,
    },
    /// The next entry of a stream, in order. Process it, store the result, then ack it.
    Delivered {
        /// The stream.
        stream: StreamId,
        /// The entry.
        entry: Entry,
    },
    /// A send was sequenced (durably acknowledged by the gateway).
    SendAccepted {
        /// The conversation.
        conversation: ConversationId,
        /// The message.
        msg_id: MsgId,
        /// Its seq.
        seq: Seq,
        /// The gateway had already sequenced it.
        duplicate: bool,
    },
    /// A send was refused and removed from the outbox.
    SendRejected {
        /// The conversation.
        conversation: ConversationId,
        /// The message.
        msg_id: MsgId,
        /// Why.
        code: ErrorCode,
        /// The current epoch, for `stale_commit` and `epoch_ahead`.
        epoch: Option<Epoch>,
        /// The winning Commit's seq, for `stale_commit`.
        seq: Option<Seq>,
    },
    /// A conversation was created.
    Created {
        /// The conversation.
        conversation: ConversationId,
    },
    /// A stream's replay is starting.
    Subscribed {
        /// The stream.
        stream: StreamId,
        /// The head at subscription time.
        head_seq: u64,
        /// The gateway's ack cursor for this device.
        ack_cursor: u64,
    },
    /// The stream's replay reached the head; delivery is live.
    Live {
        /// The stream.
        stream: StreamId,
    },
    /// The gateway cannot replay gap-free; the stream is no longer followed.
    ContinuityLost {
        /// The stream.
        stream: StreamId,
        /// The seq the session needed.
        from_seq: Seq,
        /// The lowest retained seq.
        oldest_seq: u64,
        /// The head.
        head_seq: u64,
    },
    /// An entry arrived ahead of `expected`; a replay from `expected` was requested.
    GapDetected {
        /// The stream.
        stream: StreamId,
        /// The seq the session needed.
        expected: Seq,
        /// The seq that arrived.
        received: Seq,
    },
    /// An entry below `next_seq` arrived again and was dropped.
    DuplicateDropped {
        /// The stream.
        stream: StreamId,
        /// Its seq.
        seq: Seq,
    },
    /// The gateway sent a msg_id the session already delivered under another seq. The
    /// entry is skipped (not delivered); `seq` is consumed. A gateway fault.
    DuplicateMsgId {
        /// The stream.
        stream: StreamId,
        /// The seq skipped.
        seq: Seq,
        /// The seq the msg_id was first delivered at.
        first_seq: Seq,
    },
    /// The gateway ended a subscription, or refused it for good: `code` is `None` when the
    /// gateway sent `Unsubscribed` on its own (the device was removed from the conversation,
    /// SPEC.md REQ-7.6-3), else the error that refused the `Subscribe` (`not_member`, ...).
    /// The session no longer follows the stream.
    SubscriptionEnded {
        /// The stream.
        stream: StreamId,
        /// The refusal, if it was one.
        code: Option<ErrorCode>,
    },
    /// A request other than a send or a subscription failed.
    RequestFailed {
        /// The request id.
        rid: u64,
        /// Why.
        code: ErrorCode,
        /// For `rate_limited` and `overloaded`: when to try again.
        retry_after_ms: Option<u64>,
    },
    /// The gateway broke the protocol; the connection was dropped.
    ProtocolViolation {
        /// What went wrong.
        detail: String,
    },
    /// A gateway answer the session does not interpret (KeyPackage directory, `Ok`, ...).
    Response {
        /// The frame.
        frame: ServerFrame,
    },
    /// The connection is gone; the session reconnects at `reconnect_at`.
    Disconnected {
        /// When the next attempt starts.
        reconnect_at: UnixMs,
        /// The close code, if any.
        close: Option<u16>,
    },
    /// The session stopped and will not reconnect by itself (SPEC.md section 5.7).
    Stopped {
        /// The close code, if any.
        close: Option<u16>,
        /// The last error the gateway sent, if any.
        error: Option<ErrorCode>,
    },
}

/// Errors from the application-facing inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The outbox already holds `pending_sends_max` messages.
    #[error("outbox full")]
    OutboxFull,
    /// An ack for a seq the session has not delivered yet.
    #[error("ack beyond the last delivered entry")]
    AckBeyondDelivered,
    /// A message with this msg_id is pending with a different payload.
    #[error("msg_id already pending with a different payload")]
    MsgIdConflict,
    /// The request needs an authenticated connection and is not queued.
    #[error("not connected")]
    NotReady,
}

/// The client session state machine.
pub struct ClientSession {
    config: SessionConfig,
    credentials: DeviceCredentials,
    rng: ChaCha8Rng,
    conn: ConnState,
    next_conn: u64,
    attempt: u32,
    resume_token: Option<ResumeToken>,
    not_before: UnixMs,
    last_error: Option<ErrorCode>,
    next_rid: u64,
    requests: HashMap<u64, Request>,
    outbox: Vec<PendingSend>,
    streams: BTreeMap<StreamId, StreamState>,
    heartbeat_nonce: u64,
    outputs: VecDeque<Output>,
}

#[derive(Debug)]
enum ConnState {
    Idle,
    Waiting {
        until: UnixMs,
    },
    Connecting {
        conn: ConnId,
        since: UnixMs,
    },
    Handshake {
        conn: ConnId,
        since: UnixMs,
        phase: Handshake,
    },
    Ready(Box<Live>),
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handshake {
    /// `Hello` sent; `Challenge` expected, or `Ready` if a resume token was offered.
    AwaitChallenge { offered_token: bool },
    /// `Auth` sent.
    AwaitReady,
}

#[derive(Debug)]
struct Live {
    conn: ConnId,
    heartbeat_interval_ms: u64,
    heartbeat_timeout_ms: u64,
    limits: SessionLimits,
    last_sent: UnixMs,
    last_recv: UnixMs,
    heartbeat_outstanding: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
enum Request {
    Send(MsgId),
    Subscribe(StreamId),
    Create,
    Other,
}

#[derive(Debug)]
struct PendingSend {
    conversation: ConversationId,
    msg_id: MsgId,
    payload: MlsBytes,
    welcome: Option<MlsBytes>,
    group_info: Option<MlsBytes>,
    in_flight: Option<u64>,
    retry_at: Option<UnixMs>,
    /// Whether it went out at least once.
    transmitted: bool,
}

#[derive(Debug)]
struct StreamState {
    next_seq: Seq,
    acked: u64,
    wanted: bool,
    sub: Sub,
    /// The rid of the latest `Subscribe` of the stream: an `Unsubscribed` the gateway
    /// sends on its own ends only the subscription it names (REQ-7.6-3), never a newer one.
    sub_rid: Option<u64>,
    recent_order: VecDeque<MsgId>,
    recent: HashMap<MsgId, Seq>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sub {
    Off,
    Requested { rid: u64 },
    Replaying,
    Live,
}

impl StreamState {
    fn new() -> Self {
        Self {
            next_seq: Seq::FIRST,
            acked: 0,
            wanted: false,
            sub: Sub::Off,
            sub_rid: None,
            recent_order: VecDeque::new(),
            recent: HashMap::new(),
        }
    }
}

impl ClientSession {
    /// A session for `credentials`; `seed` drives the backoff jitter and nothing else.
    pub fn new(config: SessionConfig, credentials: DeviceCredentials, seed: u64) -> Self {
        Self {
            config,
            credentials,
            rng: ChaCha8Rng::seed_from_u64(seed),
            conn: ConnState::Idle,
            next_conn: 1,
            attempt: 0,
            resume_token: None,
            not_before: UnixMs(0),
            last_error: None,
            next_rid: 1,
            requests: HashMap::new(),
            outbox: Vec::new(),
            streams: BTreeMap::new(),
            heartbeat_nonce: 0,
            outputs: VecDeque::new(),
        }
    }

    /// Restores a stream's position from the application's store, before `Start`:
    /// `next_seq` is one more than the last entry processed, `acked` the last one acked.
    pub fn restore_stream(&mut self, stream: StreamId, next_seq: Seq, acked: u64) {
        let s = self.streams.entry(stream).or_insert_with(StreamState::new);
        s.next_seq = next_seq;
        s.acked = acked.min(next_seq.get() - 1);
    }

    /// The next seq the session expects on `stream`.
    pub fn next_seq(&self, stream: &StreamId) -> Seq {
        self.streams.get(stream).map_or(Seq::FIRST, |s| s.next_seq)
    }

    /// The session's ack cursor on `stream`.
    pub fn ack_cursor(&self, stream: &StreamId) -> u64 {
        self.streams.get(stream).map_or(0, |s| s.acked)
    }

    /// Messages sent but not yet answered, in composition order.
    pub fn pending_sends(&self) -> impl Iterator<Item = (ConversationId, MsgId)> + '_ {
        self.outbox.iter().map(|p| (p.conversation, p.msg_id))
    }

    /// The limits the gateway announced in `Ready`, while connected.
    pub fn limits(&self) -> Option<&SessionLimits> {
        match &self.conn {
            ConnState::Ready(live) => Some(&live.limits),
            _ => None,
        }
    }

    /// Whether the session is authenticated on a live connection.
    pub fn is_ready(&self) -> bool {
        matches!(self.conn, ConnState::Ready(_))
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When the session next needs [`Input::Timeout`], if ever.
    pub fn poll_timeout(&self) -> Option<UnixMs> {
        let mut t: Option<UnixMs> = None;
        let mut at = |x: UnixMs| t = Some(t.map_or(x, |cur| cur.min(x)));
        match &self.conn {
            ConnState::Idle | ConnState::Stopped => {}
            ConnState::Waiting { until } => at(*until),
            ConnState::Connecting { since, .. } => {
                at(since.plus_ms(self.config.connect_timeout_ms))
            }
            ConnState::Handshake { since, .. } => {
                at(since.plus_ms(self.config.handshake_timeout_ms))
            }
            ConnState::Ready(live) => {
                at(live.last_sent.plus_ms(live.heartbeat_interval_ms));
                if live.heartbeat_outstanding.is_some() {
                    at(live.last_recv.plus_ms(live.heartbeat_timeout_ms));
                }
                for p in &self.outbox {
                    if let Some(r) = p.retry_at {
                        at(r);
                    }
                }
            }
        }
        t
    }

    /// Sends a request the session does not track itself (the KeyPackage directory,
    /// revocations): `make` builds the frame around the rid the session assigns, which is
    /// returned. The answer arrives as [`Event::Response`] carrying that rid, or as
    /// [`Event::RequestFailed`]. Like `CreateConversation`, a request is not queued across
    /// reconnects: it needs a ready session, and a request lost with its connection is
    /// answered by neither event, so the application retries after the next `Ready`.
    pub fn request(
        &mut self,
        now: UnixMs,
        make: impl FnOnce(u64) -> ClientFrame,
    ) -> Result<u64, SessionError> {
        if !self.is_ready() {
            return Err(SessionError::NotReady);
        }
        let rid = self.rid(Request::Other);
        self.transmit(now, make(rid));
        Ok(rid)
    }

    /// Feeds one input at `now`. Application inputs may be refused with a [`SessionError`];
    /// nothing changes then.
    pub fn handle(&mut self, now: UnixMs, input: Input) -> Result<(), SessionError> {
        match input {
            Input::Start => self.start(now),
            Input::Stop => self.stop(),
            Input::Connected { conn } => self.on_connected(now, conn),
            Input::Closed { conn, code } => self.on_closed(now, conn, code),
            Input::Frame { conn, frame } => self.on_frame(now, conn, frame),
            Input::Bytes { conn, bytes } => {
                if self.current_conn() == Some(conn) {
                    let limits = match &self.conn {
                        ConnState::Ready(live) => live.limits.decode_limits(),
                        _ => self.config.decode_limits,
                    };
                    match ServerFrame::decode(&bytes, &limits) {
                        Ok(frame) => self.on_frame(now, conn, frame),
                        Err(e) => self.violation(now, format!("undecodable frame: {e}")),
                    }
                }
            }
            Input::Timeout => self.on_timeout(now),
            Input::Send {
                conversation,
                msg_id,
                payload,
                welcome,
                group_info,
            } => {
                return self.send(now, conversation, msg_id, payload, (welcome, group_info));
            }
            Input::CreateConversation {
                conversation,
                kind,
                group_info,
            } => {
                if let ConnState::Ready(_) = self.conn {
                    let rid = self.rid(Request::Create);
                    self.transmit(
                        now,
                        ClientFrame::CreateConversation(CreateConversation {
                            rid,
                            conversation,
                            kind,
                            group_info,
                        }),
                    );
                } else {
                    // Creation is not idempotent across reconnects (a retry after a lost
                    // answer meets conversation_exists), so it is not queued: the
                    // application retries once the session is ready.
                    return Err(SessionError::NotReady);
                }
            }
            Input::Subscribe { stream, from_seq } => {
                let s = self.streams.entry(stream).or_insert_with(StreamState::new);
                if let Some(from) = from_seq {
                    // Never step back over entries already delivered (SPEC.md 6.8).
                    s.next_seq = s.next_seq.max(from);
                }
                s.wanted = true;
                if self.is_ready() {
                    self.request_subscribe(now, stream);
                }
            }
            Input::Ack { stream, seq } => {
                let s = self.streams.entry(stream).or_insert_with(StreamState::new);
                if seq >= s.next_seq {
                    return Err(SessionError::AckBeyondDelivered);
                }
                if seq.get() > s.acked {
                    s.acked = seq.get();
                    if self.is_ready() {
                        self.transmit(now, ClientFrame::Ack(frame::Ack { stream, seq }));
                    }
                }
            }
        }
        Ok(())
    }

    fn start(&mut self, now: UnixMs) {
        if matches!(self.conn, ConnState::Idle | ConnState::Stopped) {
            self.attempt = 0;
            self.connect(now);
        }
    }

    fn stop(&mut self) {
        if let Some(conn) = self.current_conn() {
            self.outputs.push_back(Output::Close {
                conn,
                code: CloseCode::Normal.value(),
            });
        }
        self.reset_connection_state();
        self.conn = ConnState::Stopped;
        self.event(Event::Stopped {
            close: None,
            error: None,
        });
    }

    fn connect(&mut self, now: UnixMs) {
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        self.conn = ConnState::Connecting { conn, since: now };
        self.outputs.push_back(Output::Connect { conn });
    }

    fn current_conn(&self) -> Option<ConnId> {
        match &self.conn {
            ConnState::Connecting { conn, .. } | ConnState::Handshake { conn, .. } => Some(*conn),
            ConnState::Ready(live) => Some(live.conn),
            _ => None,
        }
    }

    fn on_connected(&mut self, now: UnixMs, conn: ConnId) {
        if !matches!(self.conn, ConnState::Connecting { conn: c, .. } if c == conn) {
            return;
        }
        let offered_token = self.resume_token.is_some();
        self.conn = ConnState::Handshake {
            conn,
            since: now,
            phase: Handshake::AwaitChallenge { offered_token },
        };
        let versions =
            Versions::new(self.config.versions.clone()).unwrap_or_else(|_| Versions::current());
        let hello = Hello {
            versions,
            resume_token: self.resume_token.clone(),
        };
        self.outputs.push_back(Output::Transmit {
            conn,
            frame: ClientFrame::Hello(hello),
        });
    }

    fn on_closed(&mut self, now: UnixMs, conn: ConnId, code: Option<u16>) {
        if self.current_conn() != Some(conn) {
            return;
        }
        let fatal = code.is_some_and(|c| !CloseCode::from_value(c).may_reconnect())
            && !self.config.faults.reconnect_after_fatal_close;
        if fatal {
            self.reset_connection_state();
            self.conn = ConnState::Stopped;
            let error = self.last_error.take();
            self.event(Event::Stopped { close: code, error });
        } else {
            self.schedule_reconnect(now, code);
        }
    }

    /// Drops the current connection (if any) and waits a full-jitter backoff delay.
    fn schedule_reconnect(&mut self, now: UnixMs, close: Option<u16>) {
        self.reset_connection_state();
        let exp = self
            .config
            .backoff_base_ms
            .saturating_mul(1u64 << self.attempt.min(20));
        let ceiling = exp.min(self.config.backoff_cap_ms);
        let delay = if self.config.faults.no_backoff {
            0
        } else {
            self.rng.next_u64() % (ceiling + 1)
        };
        self.attempt = self.attempt.saturating_add(1);
        let until = now.plus_ms(delay).max(self.not_before);
        self.conn = ConnState::Waiting { until };
        self.event(Event::Disconnected {
            reconnect_at: until,
            close,
        });
    }

    fn reset_connection_state(&mut self) {
        self.requests.clear();
        for p in &mut self.outbox {
            p.in_flight = None;
        }
        for s in self.streams.values_mut() {
            s.sub = Sub::Off;
        }
    }

    /// Closes the current connection (normally) and reconnects after a backoff delay.
    fn abandon_connection(&mut self, now: UnixMs) {
        if let Some(conn) = self.current_conn() {
            self.outputs.push_back(Output::Close {
                conn,
                code: CloseCode::Normal.value(),
            });
        }
        self.schedule_reconnect(now, None);
    }

    /// Closes the current connection because the gateway broke the protocol.
    fn violation(&mut self, now: UnixMs, detail: String) {
        if let Some(conn) = self.current_conn() {
            self.outputs.push_back(Output::Close {
                conn,
                code: CloseCode::ProtocolError.value(),
            });
        }
        self.event(Event::ProtocolViolation { detail });
        self.schedule_reconnect(now, None);
    }

    fn on_timeout(&mut self, now: UnixMs) {
        match &mut self.conn {
            ConnState::Waiting { until } if now >= *until => self.connect(now),
            ConnState::Connecting { conn, since }
                if now.since(*since) >= self.config.connect_timeout_ms =>
            {
                let conn = *conn;
                self.outputs.push_back(Output::Close {
                    conn,
                    code: CloseCode::Normal.value(),
                });
                self.schedule_reconnect(now, None);
            }
            ConnState::Handshake { conn, since, .. }
                if now.since(*since) >= self.config.handshake_timeout_ms =>
            {
                let conn = *conn;
                self.outputs.push_back(Output::Close {
                    conn,
                    code: CloseCode::Normal.value(),
                });
                self.schedule_reconnect(now, None);
            }
            ConnState::Ready(live) => {
                let conn = live.conn;
                if live.heartbeat_outstanding.is_some()
                    && now.since(live.last_recv) >= live.heartbeat_timeout_ms
                {
                    // Zombie: nothing heard since a heartbeat went out (REQ-5.6-4).
                    self.outputs.push_back(Output::Close {
                        conn,
                        code: CloseCode::Normal.value(),
                    });
                    self.schedule_reconnect(now, None);
                    return;
                }
                if now.since(live.last_sent) >= live.heartbeat_interval_ms
                    && !self.config.faults.no_heartbeat
                {
                    self.heartbeat_nonce += 1;
                    let nonce = self.heartbeat_nonce;
                    if let ConnState::Ready(live) = &mut self.conn {
                        live.heartbeat_outstanding.get_or_insert(nonce);
                    }
                    self.transmit(now, ClientFrame::Heartbeat(frame::Heartbeat { nonce }));
                }
                let due: Vec<usize> = (0..self.outbox.len())
                    .filter(|&i| self.outbox[i].retry_at.is_some_and(|r| now >= r))
                    .collect();
                for i in due {
                    self.outbox[i].retry_at = None;
                    self.transmit_send(now, i);
                }
            }
            _ => {}
        }
    }

    fn send(
        &mut self,
        now: UnixMs,
        conversation: ConversationId,
        msg_id: MsgId,
        payload: MlsBytes,
        (welcome, group_info): (Option<MlsBytes>, Option<MlsBytes>),
    ) -> Result<(), SessionError> {
        if let Some(existing) = self
            .outbox
            .iter()
            .find(|p| p.msg_id == msg_id && p.conversation == conversation)
        {
            return if existing.payload == payload
                && existing.welcome == welcome
                && existing.group_info == group_info
            {
                Ok(())
            } else {
                Err(SessionError::MsgIdConflict)
            };
        }
        if self.outbox.len() >= self.config.pending_sends_max {
            return Err(SessionError::OutboxFull);
        }
        self.outbox.push(PendingSend {
            conversation,
            msg_id,
            payload,
            welcome,
            group_info,
            in_flight: None,
            retry_at: None,
            transmitted: false,
        });
        if self.is_ready() {
            self.transmit_send(now, self.outbox.len() - 1);
        }
        Ok(())
    }

    fn transmit_send(&mut self, now: UnixMs, index: usize) {
        if self.config.faults.new_msg_id_on_resend && self.outbox[index].transmitted {
            let mut fresh = [0u8; 16];
            self.rng.fill_bytes(&mut fresh);
            self.outbox[index].msg_id = MsgId(fresh);
        }
        self.outbox[index].transmitted = true;
        let msg_id = self.outbox[index].msg_id;
        let rid = self.rid(Request::Send(msg_id));
        let p = &mut self.outbox[index];
        p.in_flight = Some(rid);
        let frame = ClientFrame::Send(frame::Send {
            rid,
            conversation: p.conversation,
            msg_id: p.msg_id,
            payload: p.payload.clone(),
            welcome: p.welcome.clone(),
            group_info: p.group_info.clone(),
        });
        self.transmit(now, frame);
    }

    fn request_subscribe(&mut self, now: UnixMs, stream: StreamId) {
        let rid = self.rid(Request::Subscribe(stream));
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        s.sub = Sub::Requested { rid };
        s.sub_rid = Some(rid);
        let from_seq = Some(s.next_seq);
        self.transmit(
            now,
            ClientFrame::Subscribe(frame::Subscribe {
                rid,
                stream,
                from_seq,
            }),
        );
    }

    fn rid(&mut self, request: Request) -> u64 {
        let rid = self.next_rid;
        self.next_rid += 1;
        self.requests.insert(rid, request);
        rid
    }

    fn transmit(&mut self, now: UnixMs, frame: ClientFrame) {
        if let ConnState::Ready(live) = &mut self.conn {
            live.last_sent = now;
            let conn = live.conn;
            self.outputs.push_back(Output::Transmit { conn, frame });
        }
    }

    fn event(&mut self, event: Event) {
        self.outputs.push_back(Output::Event(event));
    }

    fn on_frame(&mut self, now: UnixMs, conn: ConnId, frame: ServerFrame) {
        if self.current_conn() != Some(conn) {
            return;
        }
        match &mut self.conn {
            ConnState::Handshake { phase, .. } => {
                let phase = *phase;
                self.on_handshake_frame(now, conn, phase, frame);
            }
            ConnState::Ready(live) => {
                live.last_recv = now;
                self.on_ready_frame(now, frame);
            }
            _ => self.violation(
                now,
                format!("{} before the transport was open", frame.name()),
            ),
        }
    }

    fn on_handshake_frame(
        &mut self,
        now: UnixMs,
        conn: ConnId,
        phase: Handshake,
        frame: ServerFrame,
    ) {
        match (phase, frame) {
            (Handshake::AwaitChallenge { .. }, ServerFrame::Challenge(ch)) => {
                if !self.config.versions.contains(&ch.version) {
                    return self.violation(
                        now,
                        format!("gateway picked version {} we did not offer", ch.version),
                    );
                }
                // A Challenge after a resume offer means the token was not accepted.
                self.resume_token = None;
                let auth = sign_auth(
                    &self.credentials.key,
                    self.credentials.certificate.clone(),
                    ch.version,
                    &self.config.origin,
                    ch.nonce,
                    now,
                );
                if let ConnState::Handshake { phase, .. } = &mut self.conn {
                    *phase = Handshake::AwaitReady;
                }
                self.outputs.push_back(Output::Transmit {
                    conn,
                    frame: ClientFrame::Auth(auth),
                });
            }
            (
                Handshake::AwaitReady
                | Handshake::AwaitChallenge {
                    offered_token: true,
                },
                ServerFrame::Ready(ready),
            ) => {
                self.on_ready(now, conn, ready);
            }
            (_, ServerFrame::Error(e)) if ends_connection(e.code) => {
                self.last_error = Some(e.code);
                self.abandon_connection(now);
            }
            (_, ServerFrame::Error(e)) => {
                if matches!(
                    e.code,
                    ErrorCode::ResumeTokenInvalid | ErrorCode::ResumeTokenReused
                ) {
                    self.resume_token = None;
                } else {
                    self.last_error = Some(e.code);
                }
                if let Some(ms) = e
                    .retry_after_ms
                    .filter(|_| !self.config.faults.ignore_retry_after)
                {
                    self.not_before = now.plus_ms(ms);
                }
            }
            (_, other) => self.violation(now, format!("{} during the handshake", other.name())),
        }
    }

    fn on_ready(&mut self, now: UnixMs, conn: ConnId, ready: frame::Ready) {
        self.attempt = 0;
        self.last_error = None;
        if !(self.config.faults.keep_first_resume_token && self.resume_token.is_some()) {
            self.resume_token = Some(ready.resume_token);
        }
        let interval = ready.heartbeat_interval_ms.max(1);
        self.conn = ConnState::Ready(Box::new(Live {
            conn,
            heartbeat_interval_ms: interval,
            heartbeat_timeout_ms: ready.heartbeat_timeout_ms.max(interval),
            limits: ready.limits,
            last_sent: now,
            last_recv: now,
            heartbeat_outstanding: None,
        }));
        self.event(Event::Ready {
            session_id: ready.session_id,
            resumed: ready.resumed,
        });
        // Re-establish: acks the gateway may have missed, subscriptions from where we are,
        // and every unanswered send with its original msg_id (SPEC.md 6.3).
        let acks: Vec<(StreamId, Seq)> = self
            .streams
            .iter()
            .filter_map(|(id, s)| Seq::new(s.acked).map(|seq| (*id, seq)))
            .collect();
        for (stream, seq) in acks {
            self.transmit(now, ClientFrame::Ack(frame::Ack { stream, seq }));
        }
        let wanted: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(_, s)| s.wanted)
            .map(|(id, _)| *id)
            .collect();
        for stream in wanted {
            self.request_subscribe(now, stream);
        }
        for i in 0..self.outbox.len() {
            self.outbox[i].retry_at = None;
            self.transmit_send(now, i);
        }
    }

    fn on_ready_frame(&mut self, now: UnixMs, frame: ServerFrame) {
        match frame {
            ServerFrame::HeartbeatAck(ack) => {
                if let ConnState::Ready(live) = &mut self.conn {
                    if live.heartbeat_outstanding.is_some_and(|n| n <= ack.nonce) {
                        live.heartbeat_outstanding = None;
                    }
                }
            }
            ServerFrame::Accepted(a) => match self.requests.remove(&a.rid) {
                Some(Request::Send(msg_id)) if msg_id == a.msg_id => {
                    self.outbox.retain(|p| p.msg_id != msg_id);
                    self.event(Event::SendAccepted {
                        conversation: a.conversation,
                        msg_id,
                        seq: a.seq,
                        duplicate: a.duplicate,
                    });
                }
                _ => self.violation(now, "Accepted for an unknown request".into()),
            },
            ServerFrame::Error(e) => self.on_error(now, e),
            // A `CreateConversation` made with `request` is answered like any request.
            ServerFrame::Created(c) => match self.requests.remove(&c.rid) {
                Some(Request::Other) => self.event(Event::Response {
                    frame: ServerFrame::Created(c),
                }),
                _ => self.event(Event::Created {
                    conversation: c.conversation,
                }),
            },
            ServerFrame::Subscribed(s) => {
                let Some(Request::Subscribe(stream)) = self.requests.remove(&s.rid) else {
                    return self.violation(now, "Subscribed for an unknown request".into());
                };
                if let Some(st) = self.streams.get_mut(&stream) {
                    if st.sub == (Sub::Requested { rid: s.rid }) {
                        st.sub = Sub::Replaying;
                        self.event(Event::Subscribed {
                            stream,
                            head_seq: s.head_seq,
                            ack_cursor: s.ack_cursor,
                        });
                    }
                }
            }
            ServerFrame::Batch(b) => self.on_batch(now, b),
            ServerFrame::Deliver(d) => {
                let Some(sub) = self.streams.get(&d.stream).map(|s| s.sub) else {
                    return;
                };
                match sub {
                    Sub::Live => {
                        let _ = self.accept_entry(now, d.stream, d.entry);
                    }
                    // Frames of an abandoned subscription may still arrive: take the next
                    // entry in order, drop the rest silently.
                    Sub::Requested { .. } | Sub::Replaying => {
                        if self
                            .streams
                            .get(&d.stream)
                            .is_some_and(|s| d.entry.seq <= s.next_seq)
                        {
                            let _ = self.accept_entry(now, d.stream, d.entry);
                        }
                    }
                    Sub::Off => {}
                }
            }
            ServerFrame::ContinuityLost(c) => {
                if let Some(Request::Subscribe(stream)) = self.requests.remove(&c.rid) {
                    if let Some(st) = self.streams.get_mut(&stream) {
                        st.sub = Sub::Off;
                        st.wanted = false;
                    }
                    self.event(Event::ContinuityLost {
                        stream,
                        from_seq: c.from_seq,
                        oldest_seq: c.oldest_seq,
                        head_seq: c.head_seq,
                    });
                }
            }
            ServerFrame::Unsubscribed(u) => {
                let requested = self.requests.remove(&u.rid).is_some();
                if let Some(st) = self.streams.get_mut(&u.stream) {
                    if !requested && st.sub_rid != Some(u.rid) {
                        // The end of a subscription this session already replaced with a
                        // newer `Subscribe` (a device removed and added again, whose
                        // Welcome was read before its old replay ended): frames of an
                        // abandoned subscription may still arrive, and end nothing.
                        return;
                    }
                    st.sub = Sub::Off;
                    if !requested && st.wanted {
                        // The gateway ended it (REQ-7.6-3): do not follow it again.
                        st.wanted = false;
                        self.event(Event::SubscriptionEnded {
                            stream: u.stream,
                            code: None,
                        });
                    }
                }
            }
            ServerFrame::Challenge(_) | ServerFrame::Ready(_) => {
                self.violation(now, "handshake frame after Ready".into());
            }
            other => {
                if let Some(rid) = other.rid() {
                    self.requests.remove(&rid);
                }
                self.event(Event::Response { frame: other });
            }
        }
    }

    fn on_error(&mut self, now: UnixMs, e: frame::ErrorFrame) {
        if ends_connection(e.code) {
            // Its request (if any) is resent or re-made on the next connection.
            self.last_error = Some(e.code);
            self.abandon_connection(now);
            return;
        }
        let Some(rid) = e.rid else {
            // Connection-level error; the gateway closes next.
            self.last_error = Some(e.code);
            if let Some(ms) = e
                .retry_after_ms
                .filter(|_| !self.config.faults.ignore_retry_after)
            {
                self.not_before = now.plus_ms(ms);
            }
            return;
        };
        let transient = matches!(
            e.code,
            ErrorCode::RateLimited | ErrorCode::Overloaded | ErrorCode::InternalError
        );
        match self.requests.remove(&rid) {
            Some(Request::Send(msg_id)) => {
                let Some(i) = self.outbox.iter().position(|p| p.msg_id == msg_id) else {
                    return;
                };
                if transient {
                    let wait = e.retry_after_ms.unwrap_or(self.config.backoff_base_ms);
                    self.outbox[i].in_flight = None;
                    self.outbox[i].retry_at = Some(now.plus_ms(wait));
                } else {
                    let p = self.outbox.remove(i);
                    self.event(Event::SendRejected {
                        conversation: p.conversation,
                        msg_id,
                        code: e.code,
                        epoch: e.epoch,
                        seq: e.seq,
                    });
                }
            }
            Some(Request::Subscribe(stream)) => {
                if let Some(st) = self.streams.get_mut(&stream) {
                    if st.sub_rid != Some(rid) {
                        // The refusal of a `Subscribe` this session already replaced with a
                        // newer one (a device removed and added again: its old cursor is
                        // refused `not_member` while its Welcome's subscription is on its
                        // way): it ends nothing.
                        return;
                    }
                    st.sub = Sub::Off;
                    st.wanted = transient;
                }
                if !transient {
                    self.event(Event::SubscriptionEnded {
                        stream,
                        code: Some(e.code),
                    });
                }
            }
            Some(Request::Create | Request::Other) | None => {
                self.event(Event::RequestFailed {
                    rid,
                    code: e.code,
                    retry_after_ms: e.retry_after_ms,
                });
            }
        }
    }

    fn on_batch(&mut self, now: UnixMs, b: frame::Batch) {
        let Some(st) = self.streams.get(&b.stream) else {
            return;
        };
        if st.sub != Sub::Replaying {
            return; // a batch of an abandoned replay
        }
        if b.entries.is_empty() && b.more {
            return self.violation(now, "empty Batch with more".into());
        }
        let mut last = None;
        for entry in b.entries {
            last = Some(entry.seq);
            if self.accept_entry(now, b.stream, entry).is_err() {
                return; // gap: a new replay was requested
            }
        }
        if b.more {
            if let Some(after_seq) = last {
                self.transmit(
                    now,
                    ClientFrame::Continue(frame::Continue {
                        stream: b.stream,
                        after_seq,
                    }),
                );
            }
        } else if let Some(st) = self.streams.get_mut(&b.stream) {
            st.sub = Sub::Live;
            self.event(Event::Live { stream: b.stream });
        }
    }

    /// Applies SPEC.md section 6.8 to one entry. `Err` means a gap was found and a replay
    /// from `next_seq` was requested.
    fn accept_entry(&mut self, now: UnixMs, stream: StreamId, entry: Entry) -> Result<(), ()> {
        let window = self.config.dedup_window;
        let Some(st) = self.streams.get_mut(&stream) else {
            return Ok(());
        };
        let seq = entry.seq;
        if seq < st.next_seq {
            self.event(Event::DuplicateDropped { stream, seq });
            return Ok(());
        }
        if seq > st.next_seq {
            let expected = st.next_seq;
            let requested = matches!(st.sub, Sub::Requested { .. });
            if !requested {
                self.event(Event::GapDetected {
                    stream,
                    expected,
                    received: seq,
                });
                self.request_subscribe(now, stream);
            }
            return Err(());
        }
        let Some(next) = seq.next() else {
            return Ok(()); // the seq space is exhausted; nothing can follow
        };
        st.next_seq = next;
        if let Some(&first_seq) = st.recent.get(&entry.msg_id) {
            self.event(Event::DuplicateMsgId {
                stream,
                seq,
                first_seq,
            });
            return Ok(());
        }
        st.recent.insert(entry.msg_id, seq);
        st.recent_order.push_back(entry.msg_id);
        while st.recent_order.len() > window {
            if let Some(old) = st.recent_order.pop_front() {
                st.recent.remove(&old);
            }
        }
        self.event(Event::Delivered { stream, entry });
        Ok(())
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        hex::decode(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// Whether the client must end the connection on this error itself: an *unknown* code of
/// the 1xx or 2xx group is fatal for the connection (SPEC.md 12, REQ-12-1). Known codes of
/// those groups come before a close of the gateway's, which decides what follows.
fn ends_connection(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::Unknown(_)) && code.is_fatal_for_connection()
}
