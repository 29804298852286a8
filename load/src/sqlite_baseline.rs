//! The append baseline: SQLite itself, in this process, on the same disk as the
//! gateway's database, writing the rows an append writes (the entry and its stream's new
//! head) with the same journal (WAL) and sync setting (`synchronous=FULL`), either one
//! row per transaction or `rows_per_transaction` rows per transaction (the gateway's
//! group commit, at the batch size it reached).

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{Connection, TransactionBehavior, params};
use serde::Serialize;

use crate::stats::Latency;
use crate::wire::{LoadError, fail};

/// What the baseline measured.
#[derive(Debug, Clone, Serialize)]
pub struct SqliteResult {
    /// Rows (appends) per transaction.
    pub rows_per_transaction: usize,
    /// Rows per second.
    pub rows_per_s: f64,
    /// Time per transaction (each is one fsync).
    pub commit_latency: Latency,
}

const SCHEMA: &str = "
PRAGMA journal_mode=WAL;
PRAGMA synchronous=FULL;
CREATE TABLE streams (stream BLOB PRIMARY KEY, head_seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE entries (
    stream BLOB NOT NULL, seq INTEGER NOT NULL, msg_id BLOB NOT NULL, sender BLOB NOT NULL,
    kind INTEGER NOT NULL, epoch INTEGER, accepted_ms INTEGER NOT NULL,
    payload BLOB NOT NULL, payload_hash BLOB NOT NULL,
    PRIMARY KEY (stream, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX entries_msg_id ON entries (stream, msg_id);
";

/// Inserts rows of `payload` bytes into `streams` streams for `duration`.
pub fn run(
    dir: &Path,
    rows_per_transaction: usize,
    streams: usize,
    payload: usize,
    duration: Duration,
) -> Result<SqliteResult, LoadError> {
    let path = dir.join(format!("baseline-{rows_per_transaction}.db"));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let mut conn = Connection::open(&path).or_else(|e| fail("opening the baseline", e))?;
    conn.execute_batch(SCHEMA)
        .or_else(|e| fail("creating the baseline", e))?;
    let streams = streams.max(1);
    for s in 0..streams {
        conn.execute(
            "INSERT INTO streams VALUES (?1, 0)",
            [(s as u64).to_be_bytes().to_vec()],
        )
        .or_else(|e| fail("baseline", e))?;
    }
    let body = vec![0xA5u8; payload];
    let hash = [7u8; 32];
    let sender = [9u8; 48];
    let mut heads = vec![0u64; streams];
    let mut commits = Vec::new();
    let mut rows = 0u64;
    let started = Instant::now();
    let mut next_stream = 0;
    while started.elapsed() < duration {
        let t = Instant::now();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .or_else(|e| fail("baseline", e))?;
        for _ in 0..rows_per_transaction.max(1) {
            let s = next_stream;
            next_stream = (next_stream + 1) % streams;
            heads[s] += 1;
            let key = (s as u64).to_be_bytes();
            let mut msg_id = [0u8; 16];
            msg_id[..8].copy_from_slice(&rows.to_be_bytes());
            tx.execute(
                "UPDATE streams SET head_seq = ?2 WHERE stream = ?1",
                params![key.as_slice(), heads[s] as i64],
            )
            .or_else(|e| fail("baseline", e))?;
            tx.execute(
                "INSERT INTO entries VALUES (?1, ?2, ?3, ?4, 1, 0, 0, ?5, ?6)",
                params![
                    key.as_slice(),
                    heads[s] as i64,
                    msg_id.as_slice(),
                    sender.as_slice(),
                    body.as_slice(),
                    hash.as_slice()
                ],
            )
            .or_else(|e| fail("baseline", e))?;
            rows += 1;
        }
        tx.commit().or_else(|e| fail("baseline", e))?;
        commits.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(conn);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    Ok(SqliteResult {
        rows_per_transaction: rows_per_transaction.max(1),
        rows_per_s: rows as f64 / seconds,
        commit_latency: Latency::of(&mut commits),
    })
}
