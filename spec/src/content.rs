//! The plaintext of an application message (SPEC.md 7.9): the text, and the sender device's
//! number for it in its conversation, so that every receiver can tell when a sender's
//! messages did not all arrive (a gateway that withholds some) or came twice or late.

use crate::DecodeLimits;
use crate::cbor::{Reader, Writer};

/// An application message's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppContent {
    /// The message (UTF-8 for text; shown as such).
    pub text: Vec<u8>,
    /// The sender device's number for this message in its conversation: 1 for the first
    /// it sent there, one more for each after it.
    pub counter: u64,
}

impl AppContent {
    /// The content as the plaintext MLS encrypts: the deterministic CBOR map
    /// `{1: text (bytes), 2: counter (uint)}`.
    pub fn seal(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.map(2);
        w.uint(1);
        w.bytes(&self.text);
        w.uint(2);
        w.uint(self.counter);
        w.into_bytes()
    }

    /// Reads a plaintext; `None` when it is not a content map exactly as [`AppContent::seal`]
    /// writes one (a client that does not follow SPEC.md 7.9 sent it; UTF-8 text can never
    /// pass for one, since a map's first byte is not a valid first byte of UTF-8).
    pub fn open(plaintext: &[u8]) -> Option<Self> {
        let limits = DecodeLimits {
            frame_bytes_max: plaintext.len(),
            collection_len_max: 2,
            nesting_depth_max: 1,
            text_bytes_max: 0,
        };
        let mut r = Reader::new(plaintext, &limits);
        let mut keys = r.map().ok()?;
        let (mut text, mut counter) = (None, None);
        while let Some(key) = keys.next(&mut r).ok()? {
            match key {
                1 => text = Some(r.bytes(plaintext.len()).ok()?),
                2 => counter = Some(r.uint().ok()?),
                _ => return None,
            }
        }
        r.leave();
        r.finish().ok()?;
        Some(Self {
            text: text?,
            counter: counter.filter(|c| *c >= 1)?,
        })
    }
}

/// What a receiver makes of a sender's counter, given the highest it read from that
/// sender device in the conversation before (REQ-7.9-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterCheck {
    /// The first message read from this sender: nothing to compare with.
    First,
    /// The next one.
    Next,
    /// This many of the sender's messages before it never arrived or could not be read.
    Missing(u64),
    /// At or below one already read: a copy, or one delivered out of its order.
    Stale,
}

/// Judges `counter` against the highest counter read before from the same sender.
pub fn check_counter(highest_before: Option<u64>, counter: u64) -> CounterCheck {
    match highest_before {
        None => CounterCheck::First,
        Some(h) if counter == h.saturating_add(1) => CounterCheck::Next,
        Some(h) if counter > h => CounterCheck::Missing(counter - h - 1),
        Some(_) => CounterCheck::Stale,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Sealed content opens to itself; text never opens as content.
        #[test]
        fn content_round_trips_and_text_is_not_content(text: Vec<u8>, counter in 1u64.., plain: String) {
            let content = AppContent { text, counter };
            prop_assert_eq!(AppContent::open(&content.seal()), Some(content));
            prop_assert_eq!(AppContent::open(plain.as_bytes()), None);
        }

        /// Whatever the bytes, opening them never panics, and what opens seals to the
        /// same bytes (one encoding per content).
        #[test]
        fn anything_opens_canonically_or_not_at_all(bytes: Vec<u8>) {
            if let Some(content) = AppContent::open(&bytes) {
                prop_assert_eq!(content.seal(), bytes);
            }
        }

        /// Counters read in any order: the missing ones are counted exactly, each number
        /// read twice or late is stale.
        #[test]
        fn missing_counters_are_counted(mut read in prop::collection::vec(1u64..40, 1..30)) {
            read.dedup();
            let first = read[0];
            let mut highest: Option<u64> = None;
            let mut missing = 0;
            let mut seen = std::collections::BTreeSet::new();
            for c in read {
                match check_counter(highest, c) {
                    CounterCheck::First => prop_assert!(highest.is_none()),
                    CounterCheck::Next => prop_assert_eq!(Some(c - 1), highest),
                    CounterCheck::Missing(n) => { prop_assert_eq!(n, c - highest.unwrap_or(0) - 1); missing += n; }
                    CounterCheck::Stale => prop_assert!(highest.is_some_and(|h| c <= h)),
                }
                seen.insert(c);
                highest = Some(highest.map_or(c, |h| h.max(c)));
            }
            // Every number from the first one read (the baseline) to the highest is either
            // read or counted as missing (late arrivals were counted as missing first).
            let highest = highest.unwrap_or(first);
            let in_span = seen.range(first..=highest).count() as u64;
            prop_assert!(missing + in_span > highest - first);
        }
    }

    #[test]
    fn a_counter_of_zero_is_not_content() {
        let sealed = AppContent {
            text: b"x".to_vec(),
            counter: 0,
        }
        .seal();
        assert_eq!(AppContent::open(&sealed), None);
    }
}
