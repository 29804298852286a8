//! Receive batches: a device in a busy conversation decrypts application messages as they
//! come but writes its MLS state, and acknowledges, once per batch: when the batch holds
//! [`ReceiveBatchLimits::entries`] entries (by default [`RECEIVE_BATCH_ENTRIES`]),
//! [`ReceiveBatchLimits::window_ms`] after it opened (by default [`RECEIVE_BATCH_MS`]),
//! before any other event is handled, and at the end of [`super::Client::sync`].
//!
//! The window is the longest a message waits to be shown, so the default is short; a
//! device that only reads (a bot, an archive) can take longer windows. In a room of 1,000
//! a write of the MLS state costs milliseconds (openmls writes the member lists of its
//! past epochs with it), so how many messages share one write decides what a member pays
//! per message: a state-write window ([`crate::mls::unwritten`],
//! [`super::Client::set_state_write_window`]) lets one write cover many batches.
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

/// When a receive batch ends ([`super::Client::set_receive_batch_limits`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceiveBatchLimits {
    /// Entries after which a batch ends (at least 1).
    pub entries: u32,
    /// How long a batch stays open, in milliseconds: the longest a message waits to be
    /// shown and acknowledged.
    pub window_ms: u64,
}

impl Default for ReceiveBatchLimits {
    fn default() -> Self {
        Self {
            entries: RECEIVE_BATCH_ENTRIES,
            window_ms: RECEIVE_BATCH_MS,
        }
    }
}

/// An open batch.
#[derive(Debug)]
pub(super) struct ReceiveBatch {
    /// When it ends at the latest.
    pub due: UnixMs,
    /// Entries after which it ends.
    pub entries: u32,
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
    pub fn open(now: UnixMs, limits: ReceiveBatchLimits) -> Self {
        Self {
            due: now.plus_ms(limits.window_ms),
            entries: limits.entries.max(1),
            deliveries: Vec::new(),
        }
    }

    /// Adds an entry; whether the batch is full.
    pub fn add(&mut self, delivery: Delivery) -> bool {
        self.deliveries.push(delivery);
        self.deliveries.len() >= self.entries as usize
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

    /// An entry of the inbox at `seq`, without message.
    fn entry(seq: u64) -> Delivery {
        Delivery {
            stream: StreamId::Inbox,
            seq: Seq::new(seq).expect("seq"),
            message: None,
            record: None,
            journaled: None,
        }
    }

    #[test]
    fn a_batch_keeps_the_highest_seq_per_stream_and_fills_up() {
        let mut batch = ReceiveBatch::open(UnixMs(1_000), ReceiveBatchLimits::default());
        assert_eq!(batch.due, UnixMs(1_000 + RECEIVE_BATCH_MS));
        let seq = |n| Seq::new(n).expect("seq");
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

    #[test]
    fn a_batch_follows_the_limits_it_was_opened_with() {
        let limits = ReceiveBatchLimits {
            entries: 2,
            window_ms: 5_000,
        };
        let mut batch = ReceiveBatch::open(UnixMs(1_000), limits);
        assert_eq!(batch.due, UnixMs(6_000));
        assert!(!batch.add(entry(1)));
        assert!(batch.add(entry(2)), "full at two entries");
        // No limit below one entry: a batch of zero would never end by size.
        let mut one = ReceiveBatch::open(
            UnixMs(0),
            ReceiveBatchLimits {
                entries: 0,
                window_ms: 0,
            },
        );
        assert!(one.add(entry(1)));
    }
}
