//! The decryption journal: the outcome of an application message, kept in the engine's
//! SQLite file from no later than the moment its secret is consumed until the client
//! recorded it (SPEC.md REQ-6.5-3, REQ-6.8-1).
//!
//! A PrivateMessage can be decrypted once: the ratchet deletes its key. If the device
//! crashes after the engine stored the state that consumed the key and before the client
//! stored the plaintext, a replay of the entry cannot be decrypted again and the message
//! would be lost. With the journal, processing the same `(group, seq)` again returns the
//! journaled outcome; the client releases it once its own store holds the message.
//!
//! In a receive batch the engines keep the outcomes in memory ([`Journal::record`]) and
//! write them ([`Journal::flush`]) in the transaction that stores the consumed secrets,
//! or before it: an outcome the client released before that (the usual case: it records a
//! whole batch before the engine writes its state) is never written at all. [`Journal`]
//! also knows which outcomes the table holds, so that the lookup before each entry costs
//! no query when there are none.

use std::collections::{HashMap, HashSet};

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

/// An engine's journal: the outcomes waiting in memory and the keys of those in the table.
#[derive(Debug, Default)]
pub struct Journal {
    /// Outcomes recorded in the open receive batch and not written yet.
    pending: HashMap<(ConversationId, u64), (DeviceId, Vec<u8>)>,
    /// The `(group, seq)` of every row of the table.
    stored: HashSet<(ConversationId, u64)>,
}

impl Journal {
    /// Creates the table if it is missing and reads which outcomes it holds.
    pub fn open(conn: &Connection) -> Result<Self, EngineError> {
        conn.execute_batch(SCHEMA).map_err(storage)?;
        let mut journal = Self::default();
        journal.reload(conn)?;
        Ok(journal)
    }

    /// Reads again which outcomes the table holds (after a transaction that wrote some was
    /// rolled back).
    pub fn reload(&mut self, conn: &Connection) -> Result<(), EngineError> {
        let mut statement = conn
            .prepare("SELECT grp, seq FROM confab_decrypted")
            .map_err(storage)?;
        let rows = statement
            .query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))
            .map_err(storage)?;
        self.stored.clear();
        for row in rows {
            let (group, seq) = row.map_err(storage)?;
            let group = <[u8; 32]>::try_from(group.as_slice())
                .map_err(|_| EngineError::Storage("journaled group id is unreadable".into()))?;
            self.stored
                .insert((ConversationId(group), u64::try_from(seq).unwrap_or(0)));
        }
        Ok(())
    }

    /// The outcome of `(group, seq)`, recorded or journaled.
    pub fn get(
        &self,
        conn: &Connection,
        group: &ConversationId,
        seq: u64,
    ) -> Result<Option<Processed>, EngineError> {
        if let Some((sender, plaintext)) = self.pending.get(&(*group, seq)) {
            return Ok(Some(Processed::Application {
                sender: *sender,
                plaintext: plaintext.clone(),
            }));
        }
        if !self.stored.contains(&(*group, seq)) {
            return Ok(None);
        }
        get(conn, group, seq)
    }

    /// Keeps the outcome of `(group, seq)` in memory until [`Journal::flush`] or
    /// [`Journal::release`]. Only for a batch whose secrets are written after a flush.
    pub fn record(
        &mut self,
        group: &ConversationId,
        seq: u64,
        sender: &DeviceId,
        plaintext: &[u8],
    ) {
        self.pending
            .insert((*group, seq), (*sender, plaintext.to_vec()));
    }

    /// Notes that `(group, seq)` was journaled with [`put`] (outside a batch, in the
    /// transaction that stores the consumed secret).
    pub fn note_stored(&mut self, group: &ConversationId, seq: u64) {
        self.stored.insert((*group, seq));
    }

    /// Writes every recorded outcome to the table (in the caller's transaction, which must
    /// commit no later than the state that consumed their secrets).
    pub fn flush(&mut self, conn: &Connection) -> Result<(), EngineError> {
        let mut pending: Vec<_> = self.pending.drain().collect();
        // In key order: the same writes on every run of a simulation's seed.
        pending.sort_unstable_by_key(|(key, _)| *key);
        for ((group, seq), (sender, plaintext)) in pending {
            put(conn, &group, seq, &sender, &plaintext)?;
            self.stored.insert((group, seq));
        }
        Ok(())
    }

    /// Drops the outcome of `(group, seq)` (the client recorded it); a recorded one never
    /// reaches the table.
    pub fn release(
        &mut self,
        conn: &Connection,
        group: &ConversationId,
        seq: u64,
    ) -> Result<(), EngineError> {
        if self.pending.remove(&(*group, seq)).is_some() || !self.stored.remove(&(*group, seq)) {
            return Ok(());
        }
        release(conn, group, seq)
    }
}

/// The journaled outcome of `(group, seq)`, an application message.
fn get(
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

/// Journals the outcome of `(group, seq)` in the table.
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

/// Drops the outcome of `(group, seq)` from the table.
fn release(conn: &Connection, group: &ConversationId, seq: u64) -> Result<(), EngineError> {
    conn.prepare_cached("DELETE FROM confab_decrypted WHERE grp = ?1 AND seq = ?2")
        .map_err(storage)?
        .execute(params![group.0.as_slice(), seq_key(seq)])
        .map_err(storage)?;
    Ok(())
}
