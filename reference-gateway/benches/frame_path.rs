//! The gateway's per-frame path without the network: the connection handler on the
//! SQLite store (in /dev/shm, so the figures measure the gateway, not the disk), with
//! every answer encoded as the network shell would send it. Each is measured beside its
//! floor in the same run:
//!
//! | path | baseline |
//! | --- | --- |
//! | `Heartbeat` → `HeartbeatAck` | decoding the frame and encoding the answer |
//! | `Send` (100 B) → `Accepted` | SQLite alone running the same transaction on its own database (read the conversation, the msg_id, the roster and the head; move the head; insert the entry) |
//! | a live entry → `Deliver` (the hub's in-memory path) | encoding the `Deliver` |
//!
//! ```text
//! cargo bench -p confab-gateway --bench frame_path
//! ```

mod support;

use std::time::Duration;

use support::{Counter, median, now, scratch};

use confab_gateway::handler::{Action, GatewayConfig, LiveEntry};
use confab_gateway::rate::RateLimiters;
use confab_gateway::store::sqlite::SqliteStore;
use confab_gateway::store::{Store, StreamKey};
use confab_spec::cbor::DecodeLimits;
use confab_spec::frame::*;
use confab_spec::ids::*;
use criterion::Criterion;

const ORIGIN: &str = "wss://bench.test";
const CONV: ConversationId = ConversationId([0x42; 32]);

/// A syntactically valid PrivateMessage of `CONV` at epoch 0 (the gateway reads only the
/// header, SPEC.md 7.2).
fn application(n: u64) -> MlsBytes {
    let mut m = vec![0, 1, 0, 2, 32];
    m.extend_from_slice(&CONV.0);
    m.extend_from_slice(&0u64.to_be_bytes());
    m.extend_from_slice(&[1, 0, 0, 0x40, 40]);
    m.extend_from_slice(&n.to_be_bytes());
    m.resize(100, 0xA5);
    MlsBytes::new(m).expect("payload")
}

fn encode_all(actions: &[Action]) -> usize {
    actions
        .iter()
        .map(|a| match a {
            Action::Send(frame) => std::hint::black_box(frame.encode()).len(),
            Action::SendEncoded(bytes) => bytes.len(),
            _ => 0,
        })
        .sum()
}

/// SQLite alone: the rows and reads of one append, in one transaction.
fn sqlite_append(db: &mut rusqlite::Connection, n: u64, payload: &[u8]) {
    let tx = db
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .expect("tx");
    let key = [&[1u8][..], &CONV.0].concat();
    let sender = [9u8; 48];
    let mut msg_id = [0u8; 16];
    msg_id[..8].copy_from_slice(&n.to_be_bytes());
    let _: i64 = tx
        .prepare_cached("SELECT epoch FROM conversations WHERE id = ?1")
        .and_then(|mut s| s.query_row([CONV.0.as_slice()], |r| r.get(0)))
        .expect("conversation");
    let existing: Option<i64> = tx
        .prepare_cached("SELECT seq FROM entries WHERE stream = ?1 AND msg_id = ?2")
        .and_then(|mut s| {
            let mut rows = s.query(rusqlite::params![key, msg_id.as_slice()])?;
            rows.next()?.map(|r| r.get(0)).transpose()
        })
        .expect("dedup");
    assert!(existing.is_none());
    let _: bool = tx
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM roster WHERE conversation = ?1 AND device = ?2)",
        )
        .and_then(|mut s| {
            s.query_row(
                rusqlite::params![CONV.0.as_slice(), sender.as_slice()],
                |r| r.get(0),
            )
        })
        .expect("member");
    let head: i64 = tx
        .prepare_cached("SELECT head_seq FROM streams WHERE stream = ?1")
        .and_then(|mut s| s.query_row([key.as_slice()], |r| r.get::<_, i64>(0)))
        .expect("head")
        + 1;
    tx.prepare_cached("UPDATE streams SET head_seq = ?2 WHERE stream = ?1")
        .and_then(|mut s| s.execute(rusqlite::params![key, head]))
        .expect("move head");
    tx.prepare_cached(
        "INSERT INTO entries (stream, seq, msg_id, sender, kind, epoch, accepted_ms, payload, payload_hash)
         VALUES (?1, ?2, ?3, ?4, 1, 0, ?5, ?6, ?7)",
    )
    .and_then(|mut s| {
        s.execute(rusqlite::params![key, head, msg_id.as_slice(), sender.as_slice(), 0i64, payload, [7u8; 32].as_slice()])
    })
    .expect("insert");
    tx.commit().expect("commit");
}

fn benches(c: &mut Criterion) {
    let dir = scratch();
    let config = GatewayConfig::new(ORIGIN);
    let limits = DecodeLimits::default();
    let mut store = SqliteStore::open(&dir.path().join("gw.db")).expect("store");
    let limiters = RateLimiters::new(&config);
    let mut sender = support::ready(&config, &mut store, &limiters, &mut Counter(7), ORIGIN);
    let device = sender.device().expect("device");
    store
        .create_conversation(
            &CONV,
            ConversationKind::Room,
            &support::new_room(&device),
            u64::MAX,
            now(),
        )
        .expect("create");
    let mut entropy = Counter(1);
    let mut group = c.benchmark_group("frame_path");
    group.measurement_time(Duration::from_secs(5));

    let heartbeat = ClientFrame::Heartbeat(Heartbeat { nonce: 7 }).encode();
    group.bench_function("gateway_heartbeat", |b| {
        b.iter(|| {
            let out = sender.handle(
                &config,
                &mut store,
                &limiters,
                &mut entropy,
                now(),
                &heartbeat,
            );
            encode_all(&out)
        })
    });
    group.bench_function("codec_heartbeat", |b| {
        b.iter(|| {
            let ClientFrame::Heartbeat(h) =
                ClientFrame::decode(&heartbeat, &limits).expect("decode")
            else {
                unreachable!()
            };
            std::hint::black_box(
                ServerFrame::HeartbeatAck(HeartbeatAck { nonce: h.nonce }).encode(),
            )
        })
    });

    let mut n = 0u64;
    group.bench_function("gateway_send_100B", |b| {
        b.iter(|| {
            n += 1;
            let mut msg_id = [0u8; 16];
            msg_id[..8].copy_from_slice(&n.to_be_bytes());
            let send = ClientFrame::Send(Send {
                rid: n,
                conversation: CONV,
                msg_id: MsgId(msg_id),
                payload: application(n),
                welcome: None,
                group_info: None,
            });
            let out = sender.handle(
                &config,
                &mut store,
                &limiters,
                &mut entropy,
                now(),
                &send.encode(),
            );
            assert!(matches!(
                out.first(),
                Some(Action::Send(ServerFrame::Accepted(_)))
            ));
            encode_all(&out)
        })
    });
    // The baseline has a database of its own, with the gateway's schema and the same
    // conversation, so that it shares no connection or cache with the gateway's.
    let base_path = dir.path().join("baseline.db");
    SqliteStore::open(&base_path)
        .expect("baseline store")
        .create_conversation(
            &CONV,
            ConversationKind::Room,
            &support::new_room(&device),
            u64::MAX,
            now(),
        )
        .expect("baseline conversation");
    let mut raw = rusqlite::Connection::open(&base_path).expect("raw");
    raw.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;")
        .expect("baseline setup");
    raw.execute(
        "INSERT INTO streams (stream, head_seq, oldest_seq) VALUES (?1, 0, 1)",
        [[&[1u8][..], &CONV.0].concat()],
    )
    .expect("baseline stream");
    let payload = application(0);
    let mut m = 1u64 << 40; // msg_ids apart from the gateway's
    group.bench_function("sqlite_send_100B", |b| {
        b.iter(|| {
            m += 1;
            sqlite_append(&mut raw, m, payload.as_bytes())
        })
    });

    // A live subscriber taking entries from the hub.
    let mut subscriber = support::ready(&config, &mut store, &limiters, &mut Counter(8), ORIGIN);
    let (head, _) = store
        .bounds(&StreamKey::Conversation(CONV))
        .expect("bounds");
    let subscribe = ClientFrame::Subscribe(Subscribe {
        rid: 1,
        stream: StreamId::Conversation(CONV),
        from_seq: Seq::new(head + 1),
    });
    let out = subscriber.handle(
        &config,
        &mut store,
        &limiters,
        &mut entropy,
        now(),
        &subscribe.encode(),
    );
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::Send(ServerFrame::Batch(b)) if !b.more))
    );
    let stream = StreamKey::Conversation(CONV);
    let mut seq = head;
    let entry = |seq: u64| Entry {
        seq: Seq::new(seq).expect("seq"),
        msg_id: MsgId([1; 16]),
        sender: device,
        accepted_ms: now(),
        payload: application(seq),
        body: EntryBody::Application { epoch: Epoch(0) },
    };
    group.bench_function("gateway_live_deliver", |b| {
        b.iter(|| {
            seq += 1;
            let out = subscriber
                .on_entry(&config, &stream, &LiveEntry::new(&stream, entry(seq)))
                .expect("delivered from memory");
            encode_all(&out)
        })
    });
    group.bench_function("codec_deliver", |b| {
        b.iter(|| {
            std::hint::black_box(
                ServerFrame::Deliver(Deliver {
                    stream: StreamId::Conversation(CONV),
                    entry: entry(7),
                })
                .encode(),
            )
        })
    });
    group.finish();
}

fn table() {
    println!("\n| per-frame path | gateway | baseline | ×baseline |");
    println!("| --- | ---: | ---: | ---: |");
    for (what, gateway, base, base_name) in [
        (
            "Heartbeat → HeartbeatAck",
            "gateway_heartbeat",
            "codec_heartbeat",
            "decode + encode",
        ),
        (
            "Send 100 B → Accepted",
            "gateway_send_100B",
            "sqlite_send_100B",
            "SQLite, same transaction",
        ),
        (
            "live entry → Deliver",
            "gateway_live_deliver",
            "codec_deliver",
            "encode",
        ),
    ] {
        let (Some(g), Some(b)) = (
            median(&format!("frame_path/{gateway}")),
            median(&format!("frame_path/{base}")),
        ) else {
            eprintln!("no measurements for {what} in target/criterion");
            continue;
        };
        println!(
            "| {what} | {:.2} µs | {:.2} µs ({base_name}) | {:.2} |",
            g / 1e3,
            b / 1e3,
            g / b
        );
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
    table();
}
