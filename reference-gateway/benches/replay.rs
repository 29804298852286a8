//! Replay throughput: a device subscribes to a conversation with a backlog of 10,000
//! entries and drives the replay with `Continue` through the gateway's connection handler
//! on the SQLite store, with every frame encoded as the network shell would send it. The
//! baseline, measured in the same run, is SQLite alone reading the same rows in the same
//! pages. After criterion's output a table prints entries per second and the ratio.
//!
//! ```text
//! cargo bench -p confab-gateway --bench replay
//! ```
//!
//! The database lives in /dev/shm when it exists, so the figures measure the gateway and
//! SQLite, not the disk.

mod support;

use std::time::Duration;

use support::{Counter, median, now, scratch};

use confab_gateway::handler::{Action, Connection, GatewayConfig};
use confab_gateway::rate::RateLimiters;
use confab_gateway::store::sqlite::SqliteStore;
use confab_gateway::store::{AppendKind, AppendRequest, Store};
use confab_spec::frame::*;
use confab_spec::ids::*;
use criterion::{Criterion, Throughput};

const ORIGIN: &str = "wss://bench.test";
const CONV: ConversationId = ConversationId([0x42; 32]);
const BACKLOG: u64 = 10_000;
const PAYLOAD: usize = 256;

/// Replays the whole backlog through the handler; returns the entries delivered.
fn replay(
    config: &GatewayConfig,
    store: &mut SqliteStore,
    limiters: &RateLimiters,
    conn: &mut Connection,
) -> u64 {
    let stream = StreamId::Conversation(CONV);
    let mut out = conn.handle(
        config,
        store,
        limiters,
        &mut Counter(1),
        now(),
        &ClientFrame::Subscribe(Subscribe {
            rid: 1,
            stream,
            from_seq: Seq::new(1),
        })
        .encode(),
    );
    let mut delivered = 0;
    loop {
        let mut next = None;
        for action in &out {
            if let Action::Send(frame) = action {
                let bytes = frame.encode();
                std::hint::black_box(&bytes);
                if let ServerFrame::Batch(b) = frame {
                    delivered += b.entries.len() as u64;
                    if b.more {
                        next = b.entries.last().map(|e| e.seq);
                    }
                }
            }
        }
        let Some(after_seq) = next else {
            return delivered;
        };
        out = conn.handle(
            config,
            store,
            limiters,
            &mut Counter(1),
            now(),
            &ClientFrame::Continue(Continue { stream, after_seq }).encode(),
        );
    }
}

/// SQLite alone: the same rows, in pages of `replay_batch_max`.
fn baseline(db: &rusqlite::Connection, page: i64) -> u64 {
    let mut stmt = db
        .prepare_cached(
            "SELECT seq, msg_id, sender, kind, epoch, conversation, commit_seq, accepted_ms, payload
             FROM entries WHERE stream = ?1 AND seq >= ?2 ORDER BY seq LIMIT ?3",
        )
        .expect("prepare");
    let key = [&[1u8][..], &CONV.0].concat();
    let mut from = 1i64;
    let mut read = 0u64;
    loop {
        type Row = (
            i64,
            Vec<u8>,
            Vec<u8>,
            i64,
            Option<i64>,
            Option<Vec<u8>>,
            Option<i64>,
            i64,
            Vec<u8>,
        );
        let rows: Vec<Row> = stmt
            .query_map(rusqlite::params![key, from, page], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                ))
            })
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        let Some(last) = rows.last() else {
            return read;
        };
        from = last.0 + 1;
        read += rows.len() as u64;
        std::hint::black_box(&rows);
    }
}

fn benches(c: &mut Criterion) {
    let dir = scratch();
    let path = dir.path().join("gw.db");
    let config = GatewayConfig::new(ORIGIN);
    let mut store = SqliteStore::open(&path).expect("store");
    let mut entropy = Counter(7);
    let limiters = RateLimiters::new(&config);
    let mut conn = support::ready(&config, &mut store, &limiters, &mut entropy, ORIGIN);
    let creator = conn.device().expect("device");
    store
        .create_conversation(
            &CONV,
            ConversationKind::Room,
            &support::new_room(&creator),
            u64::MAX,
            now(),
        )
        .expect("create");
    for i in 0..BACKLOG {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&i.to_be_bytes());
        store
            .append(&AppendRequest {
                conversation: CONV,
                sender: creator,
                msg_id: MsgId(id),
                payload: MlsBytes::new(vec![(i % 251) as u8; PAYLOAD]).expect("payload"),
                kind: AppendKind::Application { epoch: Epoch(0) },
                now: now(),
                rooms: Default::default(),
                bytes_max: u64::MAX,
            })
            .expect("append");
    }
    let mut group = c.benchmark_group("replay");
    group
        .throughput(Throughput::Elements(BACKLOG))
        .sample_size(20)
        .measurement_time(Duration::from_secs(8));
    group.bench_function("gateway_handler_10k", |b| {
        b.iter(|| assert_eq!(replay(&config, &mut store, &limiters, &mut conn), BACKLOG))
    });
    let raw = rusqlite::Connection::open(&path).expect("raw");
    let page = config.limits.replay_batch_max as i64;
    group.bench_function("sqlite_baseline_10k", |b| {
        b.iter(|| assert_eq!(baseline(&raw, page), BACKLOG))
    });
    group.finish();
}

fn table() {
    let (Some(gateway), Some(sqlite)) = (
        median("replay/gateway_handler_10k"),
        median("replay/sqlite_baseline_10k"),
    ) else {
        eprintln!("no replay measurements in target/criterion");
        return;
    };
    let rate = |ns: f64| BACKLOG as f64 / (ns / 1e9);
    println!("\n| replay of {BACKLOG} entries of {PAYLOAD} B | median | entries/s | ×SQLite |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| SQLite alone (baseline) | {:.1} ms | {:.0} | 1.0 |",
        sqlite / 1e6,
        rate(sqlite)
    );
    println!(
        "| gateway handler (subscribe, batches, Continue, encode) | {:.1} ms | {:.0} | {:.2} |",
        gateway / 1e6,
        rate(gateway),
        gateway / sqlite
    );
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
    table();
}
