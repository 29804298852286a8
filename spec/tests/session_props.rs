//! Properties of the client session state machine (SPEC.md sections 5 and 6.8), driven
//! against an honest in-memory gateway over a hostile network: frames are dropped,
//! duplicated, reordered and replayed stale; connections die; time jumps.
//!
//! Invariants checked after every step:
//! - delivered seqs are strictly increasing with no gap (each is the previous plus one);
//! - no msg_id is delivered twice, and every delivered entry is the one the gateway logged;
//! - the ack cursor, and every `Ack` the session sends, never moves backwards.
//!
//! Liveness, checked at the end: once the network heals, every logged entry is delivered
//! and every application send is accepted.

use std::collections::{HashMap, HashSet, VecDeque};

use confab_spec::frame::*;
use confab_spec::ids::*;
use confab_spec::session::{ConnId, Event, Input, Output};
use confab_spec::vectors::{T0, fixture, fixture_session};
use proptest::prelude::*;

const CONV: ConversationId = ConversationId([0xC0; 32]);
const STREAM: StreamId = StreamId::Conversation(CONV);

#[derive(Debug, Clone)]
enum Op {
    Append(u8),
    Deliver(u8),
    Drop,
    Duplicate,
    Swap,
    Stale(u16),
    Disconnect(Option<u16>),
    Tick(u32),
    AppAck,
    AppAckOld(u16),
    AppSend,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u8..6).prop_map(Op::Append),
        6 => (1u8..8).prop_map(Op::Deliver),
        1 => Just(Op::Drop),
        1 => Just(Op::Duplicate),
        1 => Just(Op::Swap),
        1 => any::<u16>().prop_map(Op::Stale),
        1 => prop_oneof![Just(None), Just(Some(1006u16)), Just(Some(4001)), Just(Some(4000)), Just(Some(4002))].prop_map(Op::Disconnect),
        2 => (0u32..60_000).prop_map(Op::Tick),
        2 => Just(Op::AppAck),
        1 => any::<u16>().prop_map(Op::AppAckOld),
        2 => Just(Op::AppSend),
    ]
}

enum ServerSub {
    AwaitContinue { next: u64 },
    Live { next: u64 },
}

/// An honest gateway for one conversation, with a network queue towards the client.
struct Gateway {
    log: Vec<Entry>,
    batch_max: usize,
    conn: Option<ConnId>,
    sub: Option<ServerSub>,
    queue: VecDeque<ServerFrame>,
    ack_cursor: u64,
    sent_ids: HashMap<MsgId, Seq>,
    next_msg: u32,
}

impl Gateway {
    fn head(&self) -> u64 {
        self.log.len() as u64
    }

    fn append(&mut self, msg_id: MsgId) -> Seq {
        let seq = Seq::new(self.head() + 1).expect("seq in range");
        let (_, _, cert) = fixture();
        self.log.push(Entry {
            seq,
            msg_id,
            sender: cert.device_id(),
            accepted_ms: T0,
            payload: MlsBytes::new(msg_id.0.to_vec()).expect("16 bytes"),
            body: EntryBody::Application { epoch: Epoch(0) },
        });
        if let Some(ServerSub::Live { next }) = &mut self.sub {
            if *next == seq.get() {
                *next += 1;
                self.queue.push_back(ServerFrame::Deliver(Deliver {
                    stream: STREAM,
                    entry: self.log[seq.get() as usize - 1].clone(),
                }));
            }
        }
        seq
    }

    fn external_append(&mut self) {
        self.next_msg += 1;
        let mut id = [0xEE; 16];
        id[..4].copy_from_slice(&self.next_msg.to_be_bytes());
        self.append(MsgId(id));
    }

    fn batch_from(&mut self, from: u64) {
        let head = self.head();
        let last = head.min(from + self.batch_max as u64 - 1);
        let entries: Vec<Entry> = if from <= head {
            self.log[from as usize - 1..last as usize].to_vec()
        } else {
            vec![]
        };
        let more = !entries.is_empty() && last < head;
        self.sub = Some(if more {
            ServerSub::AwaitContinue { next: last + 1 }
        } else {
            ServerSub::Live { next: head + 1 }
        });
        self.queue.push_back(ServerFrame::Batch(Batch {
            stream: STREAM,
            entries,
            more,
        }));
    }

    fn handle(&mut self, frame: ClientFrame) -> Result<(), TestCaseError> {
        let (_, _, cert) = fixture();
        match frame {
            ClientFrame::Hello(h) => {
                if h.resume_token.is_some() {
                    self.queue.push_back(ready(&cert, true));
                } else {
                    self.queue.push_back(ServerFrame::Challenge(Challenge {
                        version: 1,
                        nonce: Nonce([1; 32]),
                        server_time_ms: T0,
                    }));
                }
            }
            ClientFrame::Auth(_) => self.queue.push_back(ready(&cert, false)),
            ClientFrame::Heartbeat(h) => self
                .queue
                .push_back(ServerFrame::HeartbeatAck(HeartbeatAck { nonce: h.nonce })),
            ClientFrame::Subscribe(s) => {
                let from = s.from_seq.map_or(self.ack_cursor + 1, Seq::get);
                prop_assert!(from <= self.head() + 1, "subscribe beyond head");
                self.queue.push_back(ServerFrame::Subscribed(Subscribed {
                    rid: s.rid,
                    stream: s.stream,
                    from_seq: Seq::new(from).expect("from >= 1"),
                    head_seq: self.head(),
                    ack_cursor: self.ack_cursor,
                    oldest_seq: 1,
                }));
                self.batch_from(from);
            }
            ClientFrame::Continue(c) => {
                if let Some(ServerSub::AwaitContinue { next }) = self.sub {
                    prop_assert_eq!(
                        c.after_seq.get() + 1,
                        next,
                        "Continue names the batch's last seq"
                    );
                    self.batch_from(next);
                }
            }
            ClientFrame::Ack(a) => {
                prop_assert!(a.seq.get() <= self.head(), "ack beyond head");
                prop_assert!(
                    a.seq.get() >= self.ack_cursor,
                    "Ack frame moved backwards: {} < {}",
                    a.seq.get(),
                    self.ack_cursor
                );
                self.ack_cursor = a.seq.get();
            }
            ClientFrame::Send(s) => {
                let (seq, duplicate) = match self.sent_ids.get(&s.msg_id) {
                    Some(seq) => (*seq, true),
                    None => {
                        let seq = self.append(s.msg_id);
                        self.sent_ids.insert(s.msg_id, seq);
                        (seq, false)
                    }
                };
                self.queue.push_back(ServerFrame::Accepted(Accepted {
                    rid: s.rid,
                    conversation: s.conversation,
                    msg_id: s.msg_id,
                    seq,
                    duplicate,
                }));
            }
            other => prop_assert!(false, "unexpected client frame {}", other.name()),
        }
        Ok(())
    }
}

fn ready(cert: &confab_spec::identity::DeviceCertificate, resumed: bool) -> ServerFrame {
    ServerFrame::Ready(Ready {
        session_id: SessionId([2; 16]),
        resume_token: ResumeToken::new(vec![3; 32]).expect("valid"),
        resume_token_ttl_ms: 3_600_000,
        heartbeat_interval_ms: 15_000,
        heartbeat_timeout_ms: 45_000,
        resumed,
        server_time_ms: T0,
        device: cert.device_id(),
        limits: SessionLimits {
            replay_batch_max: 3,
            ..SessionLimits::default()
        },
    })
}

struct Harness {
    session: confab_spec::session::ClientSession,
    gw: Gateway,
    now: UnixMs,
    delivered: Vec<Seq>,
    delivered_ids: HashSet<MsgId>,
    app_sends: Vec<MsgId>,
    accepted: HashSet<MsgId>,
    last_cursor: u64,
}

impl Harness {
    fn new(seed: u64) -> Self {
        Self {
            session: fixture_session(seed),
            gw: Gateway {
                log: vec![],
                batch_max: 3,
                conn: None,
                sub: None,
                queue: VecDeque::new(),
                ack_cursor: 0,
                sent_ids: HashMap::new(),
                next_msg: 0,
            },
            now: T0,
            delivered: vec![],
            delivered_ids: HashSet::new(),
            app_sends: vec![],
            accepted: HashSet::new(),
            last_cursor: 0,
        }
    }

    fn input(&mut self, input: Input) -> Result<(), TestCaseError> {
        let _ = self.session.handle(self.now, input);
        self.drain()
    }

    fn drain(&mut self) -> Result<(), TestCaseError> {
        while let Some(out) = self.session.poll_output() {
            match out {
                Output::Connect { conn } => {
                    self.gw.conn = Some(conn);
                    self.gw.sub = None;
                    self.gw.queue.clear();
                    let _ = self.session.handle(self.now, Input::Connected { conn });
                }
                Output::Transmit { conn, frame } => {
                    if self.gw.conn == Some(conn) {
                        self.gw.handle(frame)?;
                    }
                }
                Output::Close { conn, .. } => {
                    if self.gw.conn == Some(conn) {
                        self.gw.conn = None;
                        self.gw.sub = None;
                        self.gw.queue.clear();
                    }
                }
                Output::Event(e) => self.check_event(e)?,
                other => prop_assert!(false, "unknown output {:?}", other),
            }
        }
        let cursor = self.session.ack_cursor(&STREAM);
        prop_assert!(cursor >= self.last_cursor, "ack cursor moved backwards");
        self.last_cursor = cursor;
        Ok(())
    }

    fn check_event(&mut self, e: Event) -> Result<(), TestCaseError> {
        match e {
            Event::Delivered { entry, .. } => {
                let expected = self.delivered.last().map_or(1, |s| s.get() + 1);
                prop_assert_eq!(
                    entry.seq.get(),
                    expected,
                    "delivered seqs must be gap-free and increasing"
                );
                prop_assert!(
                    self.delivered_ids.insert(entry.msg_id),
                    "msg_id delivered twice"
                );
                prop_assert_eq!(
                    &self.gw.log[entry.seq.get() as usize - 1],
                    &entry,
                    "delivered entry differs from the log"
                );
                self.delivered.push(entry.seq);
            }
            Event::DuplicateMsgId { .. } => {
                prop_assert!(false, "honest gateway never repeats a msg_id")
            }
            Event::SendAccepted { msg_id, .. } => {
                prop_assert!(self.accepted.insert(msg_id), "send accepted twice");
            }
            Event::SendRejected { .. }
            | Event::ProtocolViolation { .. }
            | Event::Stopped { .. } => {
                prop_assert!(false, "unexpected event {:?}", e);
            }
            _ => {}
        }
        Ok(())
    }

    fn deliver_one(&mut self) -> Result<(), TestCaseError> {
        if let (Some(conn), Some(frame)) = (self.gw.conn, self.gw.queue.pop_front()) {
            self.input(Input::Frame { conn, frame })?;
        }
        Ok(())
    }

    fn tick(&mut self, ms: u64) -> Result<(), TestCaseError> {
        self.now = self.now.plus_ms(ms);
        if self.session.poll_timeout().is_some_and(|t| t <= self.now) {
            self.input(Input::Timeout)?;
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Append(n) => (0..*n).for_each(|_| self.gw.external_append()),
            Op::Deliver(n) => {
                for _ in 0..*n {
                    self.deliver_one()?;
                }
            }
            Op::Drop => {
                self.gw.queue.pop_front();
            }
            Op::Duplicate => {
                // TCP never repeats a frame; a faulty or multi-node gateway may repeat an entry.
                if let (Some(conn), Some(frame @ ServerFrame::Deliver(_))) =
                    (self.gw.conn, self.gw.queue.front().cloned())
                {
                    self.input(Input::Frame { conn, frame })?;
                }
            }
            Op::Swap => {
                let entries = |f: Option<&ServerFrame>| matches!(f, Some(ServerFrame::Deliver(_)));
                if entries(self.gw.queue.front()) && entries(self.gw.queue.get(1)) {
                    self.gw.queue.swap(0, 1);
                }
            }
            Op::Stale(i) => {
                // Stale entries can only follow a Ready on the same connection.
                if let (Some(conn), false, true) = (
                    self.gw.conn,
                    self.gw.log.is_empty(),
                    self.session.is_ready(),
                ) {
                    let entry = self.gw.log[*i as usize % self.gw.log.len()].clone();
                    self.input(Input::Frame {
                        conn,
                        frame: ServerFrame::Deliver(Deliver {
                            stream: STREAM,
                            entry,
                        }),
                    })?;
                }
            }
            Op::Disconnect(code) => {
                if let Some(conn) = self.gw.conn.take() {
                    self.gw.queue.clear();
                    self.gw.sub = None;
                    self.input(Input::Closed { conn, code: *code })?;
                }
            }
            Op::Tick(ms) => self.tick(u64::from(*ms))?,
            Op::AppAck => {
                if let Some(&seq) = self.delivered.last() {
                    self.input(Input::Ack {
                        stream: STREAM,
                        seq,
                    })?;
                }
            }
            Op::AppAckOld(i) => {
                if !self.delivered.is_empty() {
                    let seq = self.delivered[*i as usize % self.delivered.len()];
                    self.input(Input::Ack {
                        stream: STREAM,
                        seq,
                    })?;
                }
            }
            Op::AppSend => {
                let mut id = [0xA5; 16];
                id[..8].copy_from_slice(&(self.app_sends.len() as u64).to_be_bytes());
                let msg_id = MsgId(id);
                self.app_sends.push(msg_id);
                let payload = MlsBytes::new(id.to_vec()).expect("16 bytes");
                let r = self.session.handle(
                    self.now,
                    Input::Send {
                        conversation: CONV,
                        msg_id,
                        payload,
                        welcome: None,
                        group_info: None,
                    },
                );
                prop_assert!(r.is_ok(), "send refused: {r:?}");
                self.drain()?;
            }
        }
        Ok(())
    }

    /// Heals the network: deliver everything, reconnect when needed, until caught up.
    fn heal(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..500 {
            if !self.gw.queue.is_empty() && self.gw.conn.is_some() {
                self.deliver_one()?;
            } else if self.session.is_ready() {
                let caught_up = self.delivered.len() as u64 == self.gw.head();
                let sent = self.app_sends.iter().all(|m| self.accepted.contains(m));
                if caught_up && sent {
                    return Ok(());
                }
                // A dropped Subscribed/Batch stalls the replay; real connections that lose
                // frames die, so model the heartbeat timeout by dropping the connection.
                self.apply(&Op::Disconnect(Some(4001)))?;
            } else {
                // Waiting for a reconnect or stuck in a handshake whose frame was dropped:
                // let the session's own timers act.
                let wake = self
                    .session
                    .poll_timeout()
                    .map_or(1, |t| t.since(self.now).max(1));
                self.tick(wake)?;
            }
        }
        prop_assert!(
            false,
            "did not catch up: delivered {} of {}",
            self.delivered.len(),
            self.gw.head()
        );
        Ok(())
    }
}

fn run(seed: u64, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut h = Harness::new(seed);
    h.input(Input::Start)?;
    h.input(Input::Subscribe {
        stream: STREAM,
        from_seq: None,
    })?;
    for op in ops {
        h.apply(op)?;
    }
    h.heal()?;
    prop_assert_eq!(h.delivered.len() as u64, h.gw.head());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn delivery_is_gap_free_exactly_once_and_acks_are_monotonic(
        seed in any::<u64>(),
        ops in prop::collection::vec(op(), 0..150),
    ) {
        run(seed, &ops)?;
    }
}

#[test]
fn a_long_chaotic_run_converges() {
    // A fixed, long schedule that exercises every operation many times.
    let ops: Vec<Op> = (0..5_000u32)
        .map(|i| match i % 11 {
            0 => Op::Append(3),
            1 | 2 => Op::Deliver(4),
            3 if i % 7 == 0 => Op::Drop,
            4 if i % 5 == 0 => Op::Duplicate,
            5 => Op::Swap,
            6 => Op::Stale((i * 31) as u16),
            7 if i % 97 == 0 => Op::Disconnect(Some(4001)),
            8 => Op::Tick(i * 13 % 20_000),
            9 if i % 3 == 0 => Op::AppAckOld(i as u16),
            9 => Op::AppAck,
            10 => Op::AppSend,
            _ => Op::Deliver(1),
        })
        .collect();
    if let Err(e) = run(42, &ops) {
        panic!("{e}");
    }
}

/// `ClientSession::request` (the directory and revocations): refused before `Ready`, then
/// sent with a fresh rid whose answer, or error, comes back as an event naming that rid.
#[test]
fn requests_carry_the_assigned_rid_to_their_answer() {
    use confab_spec::error::ErrorCode;
    use confab_spec::session::SessionError;
    let (system, _, cert) = fixture();
    let mut s = fixture_session(1);
    let claim = |rid| {
        ClientFrame::ClaimKeyPackages(ClaimKeyPackages {
            rid,
            user: system.public(),
            devices: None,
        })
    };
    assert_eq!(s.request(T0, claim), Err(SessionError::NotReady));
    s.handle(T0, Input::Start).expect("start");
    let Some(Output::Connect { conn }) = s.poll_output() else {
        panic!("connect expected")
    };
    s.handle(T0, Input::Connected { conn }).expect("connected");
    let challenge = ServerFrame::Challenge(Challenge {
        version: 1,
        nonce: Nonce([5; 32]),
        server_time_ms: T0,
    });
    s.handle(
        T0,
        Input::Frame {
            conn,
            frame: challenge,
        },
    )
    .expect("challenge");
    s.handle(
        T0,
        Input::Frame {
            conn,
            frame: ready(&cert, false),
        },
    )
    .expect("ready");
    while s.poll_output().is_some() {}
    assert!(s.is_ready());

    let first = s.request(T0, claim).expect("sent");
    let second = s.request(T0, claim).expect("sent");
    assert_ne!(first, second);
    let mut sent = vec![];
    while let Some(out) = s.poll_output() {
        if let Output::Transmit {
            frame: ClientFrame::ClaimKeyPackages(c),
            ..
        } = out
        {
            sent.push(c.rid);
        }
    }
    assert_eq!(sent, vec![first, second]);
    let answer = ServerFrame::KeyPackagesClaimed(KeyPackagesClaimed {
        rid: first,
        user: system.public(),
        claimed: vec![],
    });
    s.handle(
        T0,
        Input::Frame {
            conn,
            frame: answer.clone(),
        },
    )
    .expect("answer");
    let refusal = ServerFrame::Error(ErrorFrame {
        code: ErrorCode::RateLimited,
        rid: Some(second),
        retry_after_ms: Some(2_000),
        epoch: None,
        seq: None,
        detail: None,
    });
    s.handle(
        T0,
        Input::Frame {
            conn,
            frame: refusal,
        },
    )
    .expect("error");
    let events: Vec<Event> = std::iter::from_fn(|| s.poll_output())
        .filter_map(|o| match o {
            Output::Event(e) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(
        events,
        vec![
            Event::Response { frame: answer },
            Event::RequestFailed {
                rid: second,
                code: ErrorCode::RateLimited,
                retry_after_ms: Some(2_000),
            },
        ]
    );
}

/// A ready session on connection `conn`, its outputs drained.
fn ready_session(seed: u64) -> (confab_spec::session::ClientSession, ConnId) {
    let (_, _, cert) = fixture();
    let mut s = fixture_session(seed);
    s.handle(T0, Input::Start).expect("start");
    let Some(Output::Connect { conn }) = s.poll_output() else {
        panic!("connect expected")
    };
    s.handle(T0, Input::Connected { conn }).expect("connected");
    let challenge = ServerFrame::Challenge(Challenge {
        version: 1,
        nonce: Nonce([5; 32]),
        server_time_ms: T0,
    });
    for frame in [challenge, ready(&cert, false)] {
        s.handle(T0, Input::Frame { conn, frame })
            .expect("handshake");
    }
    while s.poll_output().is_some() {}
    assert!(s.is_ready());
    (s, conn)
}

/// Hands `frame` to the session; the events it led to.
fn events_of(
    s: &mut confab_spec::session::ClientSession,
    conn: ConnId,
    frame: ServerFrame,
) -> Vec<Event> {
    s.handle(T0, Input::Frame { conn, frame }).expect("frame");
    let mut events = Vec::new();
    while let Some(out) = s.poll_output() {
        if let Output::Event(e) = out {
            events.push(e);
        }
    }
    events
}

/// Subscribes to `STREAM` from `from`; the rid of the one `Subscribe` sent.
fn subscribe_from(s: &mut confab_spec::session::ClientSession, from: u64) -> u64 {
    s.handle(
        T0,
        Input::Subscribe {
            stream: STREAM,
            from_seq: Seq::new(from),
        },
    )
    .expect("subscribe");
    let mut rids = Vec::new();
    while let Some(out) = s.poll_output() {
        if let Output::Transmit {
            frame: ClientFrame::Subscribe(sub),
            ..
        } = out
        {
            rids.push(sub.rid);
        }
    }
    assert_eq!(rids.len(), 1, "one Subscribe sent");
    rids[0]
}

fn subscribed_frame(rid: u64, from: u64) -> ServerFrame {
    ServerFrame::Subscribed(Subscribed {
        rid,
        stream: STREAM,
        from_seq: Seq::new(from).expect("seq"),
        head_seq: 10,
        ack_cursor: 0,
        oldest_seq: 1,
    })
}

fn ended(events: &[Event]) -> bool {
    events
        .iter()
        .any(|e| matches!(e, Event::SubscriptionEnded { stream, .. } if *stream == STREAM))
}

fn subscribed(events: &[Event]) -> bool {
    events
        .iter()
        .any(|e| matches!(e, Event::Subscribed { stream, .. } if *stream == STREAM))
}

/// REQ-7.6-3 ends the subscription the `Unsubscribed` names. A device removed while
/// offline and added again may read its new Welcome (and subscribe anew) before the old
/// replay, which ends with its removal, has finished: the old subscription's
/// `Unsubscribed` then arrives after the new `Subscribe` and must end nothing, or the
/// device would never read the conversation again. The newest subscription's
/// `Unsubscribed` still ends it.
#[test]
fn the_end_of_a_replaced_subscription_ends_nothing() {
    let (mut s, conn) = ready_session(3);
    let old = subscribe_from(&mut s, 1);
    events_of(&mut s, conn, subscribed_frame(old, 1));
    // The Welcome of the re-add is read: the stream is subscribed again from after it.
    let new = subscribe_from(&mut s, 8);
    assert_ne!(old, new);
    let unsubscribed = |rid| {
        ServerFrame::Unsubscribed(Unsubscribed {
            rid,
            stream: STREAM,
        })
    };
    let events = events_of(&mut s, conn, unsubscribed(old));
    assert!(
        !ended(&events),
        "a stale Unsubscribed ended the stream: {events:?}"
    );
    let events = events_of(&mut s, conn, subscribed_frame(new, 8));
    assert!(
        subscribed(&events),
        "the new subscription goes on: {events:?}"
    );
    let events = events_of(&mut s, conn, unsubscribed(new));
    assert!(ended(&events), "the current subscription's end: {events:?}");
}

/// The same with a refusal: the old cursor of a device removed and added again falls
/// between its removal and its new arrival, and is refused `not_member` (REQ-7.6-4) after
/// the Welcome's `Subscribe` left. The refusal names the old request and ends nothing (the
/// simulator's `multi-device-churn` seed 434855367 stalled this way: the device never read
/// the conversation again); a refusal of the newest `Subscribe` still ends the stream.
#[test]
fn the_refusal_of_a_replaced_subscribe_ends_nothing() {
    use confab_spec::error::ErrorCode;
    let (mut s, conn) = ready_session(4);
    let old = subscribe_from(&mut s, 435);
    let new = subscribe_from(&mut s, 457);
    assert_ne!(old, new);
    let refusal = |rid| {
        ServerFrame::Error(ErrorFrame {
            code: ErrorCode::NotMember,
            rid: Some(rid),
            retry_after_ms: None,
            epoch: None,
            seq: None,
            detail: None,
        })
    };
    let events = events_of(&mut s, conn, refusal(old));
    assert!(
        !ended(&events),
        "a stale refusal ended the stream: {events:?}"
    );
    let events = events_of(&mut s, conn, subscribed_frame(new, 457));
    assert!(
        subscribed(&events),
        "the new subscription goes on: {events:?}"
    );
    let newest = subscribe_from(&mut s, 460);
    let events = events_of(&mut s, conn, refusal(newest));
    assert!(ended(&events), "the newest Subscribe's refusal: {events:?}");
}
