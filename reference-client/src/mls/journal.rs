//! The decryption journal: the outcome of an application message, kept in the engine's
//! SQLite file from no later than the moment its secret is consumed until the client
//! recorded it (SPEC.md REQ-6.5-3, REQ-6.8-1).
//!
//! A PrivateMessage can be decrypted once: the ratchet deletes its key. If the device
//! crashes after the engine stored the state that consumed the key and before the client
//! stored the plaintext, a replay of the entry cannot be decrypted again and the message
//! would be lost. With the journal, processing the same `(group, seq)` again returns the
//! journaled outcome; the client releases it once its own store holds the message.

use confab_spec::ids::{ConversationId, DeviceId};
use rusqlite::{Connection, OptionalExtension, params};

use super::{EngineError, Processed};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS confab_decrypted (
    grp BLOB NOT NULL,
    seq INTEGER NOT NULL,
    sender BLOB NOT NULL,
    plaintext BLOB NOT NULL,
    PRIMARY KEY (grp, seq)
) WITHOUT ROWID;";

fn storage(e: rusqlite::Error) -> EngineError {
    EngineError::Storage(e.to_string())
}

fn seq_key(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// Creates the journal's table if it is missing.
pub fn create(conn: &Connection) -> Result<(), EngineError> {
    conn.execute_batch(SCHEMA).map_err(storage)
}

/// The journaled outcome of `(group, seq)`, an application message.
pub fn get(
    conn: &Connection,
    group: &ConversationId,
    seq: u64,
) -> Result<Option<Processed>, EngineError> {
    let row: Option<(Vec<u8>, Vec<u8>)> = conn
        .prepare_cached(
            "SELECT sender, plaintext FROM confab_decrypted WHERE grp = ?1 AND seq = ?2",
        )
        .map_err(storage)?
        .query_row(params![group.0.as_slice(), seq_key(seq)], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()
        .map_err(storage)?;
    row.map(|(sender, plaintext)| {
        let sender = DeviceId::from_slice(&sender)
            .map_err(|_| EngineError::Storage("journaled sender is unreadable".into()))?;
        Ok(Processed::Application { sender, plaintext })
    })
    .transpose()
}

/// Journals the outcome of `(group, seq)`.
pub fn put(
    conn: &Connection,
    group: &ConversationId,
    seq: u64,
    sender: &DeviceId,
    plaintext: &[u8],
) -> Result<(), EngineError> {
    conn.prepare_cached("INSERT OR REPLACE INTO confab_decrypted (grp, seq, sender, plaintext) VALUES (?1, ?2, ?3, ?4)").map_err(storage)?.execute(params![
            group.0.as_slice(),
            seq_key(seq),
            sender.to_bytes().as_slice(),
            plaintext
        ],
    )
    .map_err(storage)?;
    Ok(())
}

/// Drops the outcome of `(group, seq)` (the client recorded it).
pub fn release(conn: &Connection, group: &ConversationId, seq: u64) -> Result<(), EngineError> {
    conn.prepare_cached("DELETE FROM confab_decrypted WHERE grp = ?1 AND seq = ?2")
        .map_err(storage)?
        .execute(params![group.0.as_slice(), seq_key(seq)])
        .map_err(storage)?;
    Ok(())
}
