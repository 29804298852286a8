//! Receive batches: a device in a busy conversation decrypts application messages as they
//! come but writes its MLS state, and acknowledges, once per batch: when the batch holds
//! [`RECEIVE_BATCH_ENTRIES`] entries, [`RECEIVE_BATCH_MS`] after it opened, before any
//! other event is handled, and at the end of [`super::Client::sync`].
//!
//! The batch's entries are recorded in the client's store in one transaction when it
//! ends, then the engine's state is written, then the entries are acknowledged
//! (REQ-6.5-3). A crash inside a batch loses nothing: the engine's durable state from
//! before the batch still holds the keys of the batch's messages (or its journal their
//! outcomes, when an operation wrote the state early), and the unacknowledged entries come
//! again. Only application messages are batched; any other entry ends the batch first.

use std::collections::BTreeMap;

use confab_spec::ids::{ConversationId, Seq, StreamId, UnixMs};

use crate::store::Message;

/// Entries after which a batch ends.
pub const RECEIVE_BATCH_ENTRIES: u32 = 64;

/// How long a batch stays open, in milliseconds: the longest an acknowledgement waits.
pub const RECEIVE_BATCH_MS: u64 = 100;

/// An open batch.
#[derive(Debug)]
pub(super) struct ReceiveBatch {
    /// When it ends at the latest.
    pub due: UnixMs,
    /// The entries to record in the store, show, report and acknowledge.
    pub deliveries: Vec<Delivery>,
}

/// An entry of a batch, processed and waiting to be recorded.
#[derive(Debug)]
pub(super) struct Delivery {
    /// Its stream.
    pub stream: StreamId,
    /// Its seq.
    pub seq: Seq,
    /// The message it holds, if any.
    pub message: Option<Message>,
    /// Its report to the observer, if there is one (`new` is set when it is recorded).
    pub record: Option<super::EntryRecord>,
    /// The group whose engine journaled its decryption, released once the store holds it.
    pub journaled: Option<ConversationId>,
}

impl ReceiveBatch {
    /// A batch opened at `now`.
    pub fn open(now: UnixMs) -> Self {
        Self {
            due: now.plus_ms(RECEIVE_BATCH_MS),
            deliveries: Vec::new(),
        }
    }

    /// Adds an entry; whether the batch is full.
    pub fn add(&mut self, delivery: Delivery) -> bool {
        self.deliveries.push(delivery);
        self.deliveries.len() >= RECEIVE_BATCH_ENTRIES as usize
    }

    /// The highest seq to acknowledge per stream once the batch is written.
    pub fn acks(&self) -> BTreeMap<StreamId, Seq> {
        let mut acks = BTreeMap::new();
        for d in &self.deliveries {
            let ack = acks.entry(d.stream).or_insert(d.seq);
            *ack = (*ack).max(d.seq);
        }
        acks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_keeps_the_highest_seq_per_stream_and_fills_up() {
        let mut batch = ReceiveBatch::open(UnixMs(1_000));
        assert_eq!(batch.due, UnixMs(1_000 + RECEIVE_BATCH_MS));
        let seq = |n| Seq::new(n).expect("seq");
        let entry = |n| Delivery {
            stream: StreamId::Inbox,
            seq: seq(n),
            message: None,
            record: None,
            journaled: None,
        };
        let mut full = false;
        for n in [5, 3, 9, 4] {
            full |= batch.add(entry(n));
        }
        assert!(!full);
        assert_eq!(batch.acks().get(&StreamId::Inbox), Some(&seq(9)));
        let filled = (4..RECEIVE_BATCH_ENTRIES).map(|n| batch.add(entry(u64::from(n) + 10)));
        assert_eq!(
            filled.filter(|f| *f).count(),
            1,
            "full exactly at the limit"
        );
    }
}
