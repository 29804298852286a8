//! The client session state machine on its hot path: a live subscription taking
//! `Deliver` frames as WebSocket bytes (decode, seq and duplicate checks, the delivered
//! event). The baseline in the same run is decoding the same bytes alone, so the ratio is
//! what the state machine adds to the codec. A table follows criterion's output.
//!
//! ```text
//! cargo bench -p confab-spec --bench session
//! ```

mod support;

use confab_spec::cbor::DecodeLimits;
use confab_spec::frame::{
    Batch, Challenge, ClientFrame, Deliver, Entry, EntryBody, Ready, ServerFrame, SessionLimits,
    Subscribed,
};
use confab_spec::ids::{
    ConversationId, DeviceId, Epoch, MlsBytes, MsgId, Nonce, ProcessId, ResumeToken, Seq,
    SessionId, StreamId, SystemKey,
};
use confab_spec::session::{ClientSession, ConnId, Event, Input, Output};
use confab_spec::vectors::{T0, fixture, fixture_session};
use criterion::{BatchSize, Criterion, Throughput};
use support::median;

const CONV: ConversationId = ConversationId([0x42; 32]);
const STREAM: StreamId = StreamId::Conversation(CONV);
const FRAMES: u64 = 1_000;

fn deliver(seq: u64) -> Vec<u8> {
    ServerFrame::Deliver(Deliver {
        stream: STREAM,
        entry: Entry {
            seq: Seq::new(seq).expect("seq"),
            msg_id: {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&seq.to_be_bytes());
                MsgId(id)
            },
            sender: DeviceId {
                system: SystemKey([7; 32]),
                process: ProcessId([8; 16]),
            },
            accepted_ms: T0,
            payload: MlsBytes::new(vec![0xA5; 100]).expect("payload"),
            body: EntryBody::Application { epoch: Epoch(3) },
        },
    })
    .encode()
}

/// Feeds `input` and answers what the session transmits, as a gateway would, until it
/// is quiet; returns the entries delivered.
fn step(s: &mut ClientSession, conn: &mut Option<ConnId>, input: Input) -> u64 {
    let _ = s.handle(T0, input);
    let mut delivered = 0;
    let mut answers = Vec::new();
    loop {
        while let Some(out) = s.poll_output() {
            match out {
                Output::Connect { conn: c } => {
                    *conn = Some(c);
                    answers.push(Input::Connected { conn: c });
                }
                Output::Transmit { conn: c, frame } => {
                    let reply = match frame {
                        ClientFrame::Hello(_) => vec![ServerFrame::Challenge(Challenge {
                            version: 1,
                            nonce: Nonce([5; 32]),
                            server_time_ms: T0,
                        })],
                        ClientFrame::Auth(_) => vec![ServerFrame::Ready(Ready {
                            session_id: SessionId([2; 16]),
                            resume_token: ResumeToken::new(vec![3; 32]).expect("token"),
                            resume_token_ttl_ms: 3_600_000,
                            heartbeat_interval_ms: 15_000,
                            heartbeat_timeout_ms: 45_000,
                            resumed: false,
                            server_time_ms: T0,
                            device: fixture().2.device_id(),
                            limits: SessionLimits::default(),
                        })],
                        ClientFrame::Subscribe(sub) => vec![
                            ServerFrame::Subscribed(Subscribed {
                                rid: sub.rid,
                                stream: STREAM,
                                from_seq: Seq::new(1).expect("seq"),
                                head_seq: 0,
                                ack_cursor: 0,
                                oldest_seq: 1,
                            }),
                            ServerFrame::Batch(Batch {
                                stream: STREAM,
                                entries: vec![],
                                more: false,
                            }),
                        ],
                        _ => vec![],
                    };
                    answers.extend(
                        reply
                            .into_iter()
                            .map(|frame| Input::Frame { conn: c, frame }),
                    );
                }
                Output::Event(Event::Delivered { .. }) => delivered += 1,
                _ => {}
            }
        }
        if answers.is_empty() {
            return delivered;
        }
        for input in std::mem::take(&mut answers) {
            let _ = s.handle(T0, input);
        }
    }
}

/// A session with a live subscription to `STREAM` from seq 1.
fn live() -> (ClientSession, ConnId) {
    let mut s = fixture_session(1);
    let mut conn = None;
    step(&mut s, &mut conn, Input::Start);
    assert!(s.is_ready(), "the session authenticates");
    step(
        &mut s,
        &mut conn,
        Input::Subscribe {
            stream: STREAM,
            from_seq: Seq::new(1),
        },
    );
    (s, conn.expect("connected"))
}

fn benches(c: &mut Criterion) {
    let frames: Vec<Vec<u8>> = (1..=FRAMES).map(deliver).collect();
    let limits = DecodeLimits::default();
    let mut group = c.benchmark_group("session");
    group.throughput(Throughput::Elements(FRAMES));
    // The session really delivers every frame once, in order.
    {
        let (mut s, conn) = live();
        let mut none = Some(conn);
        let delivered: u64 = frames
            .iter()
            .map(|b| {
                step(
                    &mut s,
                    &mut none,
                    Input::Bytes {
                        conn,
                        bytes: b.clone(),
                    },
                )
            })
            .sum();
        assert_eq!(delivered, FRAMES);
    }
    group.bench_function("live_deliver_1k", |b| {
        b.iter_batched(
            live,
            |(mut s, conn)| {
                let mut c = Some(conn);
                for bytes in &frames {
                    step(
                        &mut s,
                        &mut c,
                        Input::Bytes {
                            conn,
                            bytes: bytes.clone(),
                        },
                    );
                }
                s
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function("decode_only_1k", |b| {
        b.iter(|| {
            for bytes in &frames {
                let copy = bytes.clone(); // the session takes ownership of each message
                std::hint::black_box(ServerFrame::decode(&copy, &limits).expect("decode"));
            }
        })
    });
    group.finish();
}

fn table() {
    let (Some(session), Some(decode)) = (
        median("session", "live_deliver_1k"),
        median("session", "decode_only_1k"),
    ) else {
        eprintln!("no session measurements in target/criterion");
        return;
    };
    let per = |ns: f64| ns / FRAMES as f64;
    println!("\n| {FRAMES} live Deliver frames of 100 B | per frame | frames/s | ×decode |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| decode alone (baseline) | {:.0} ns | {:.0} | 1.0 |",
        per(decode),
        1e9 / per(decode)
    );
    println!(
        "| client session (decode, checks, event) | {:.0} ns | {:.0} | {:.2} |",
        per(session),
        1e9 / per(session),
        session / decode
    );
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
    table();
}
