//! The client session state machine fed arbitrary input sequences from a hostile gateway
//! and application: it never panics, delivered seqs only increase per stream, and the ack
//! cursor never moves backwards.
#![no_main]

use std::collections::HashMap;

use confab_spec::ids::{StreamId, UnixMs};
use confab_spec::session::{Event, Input, Output};
use confab_spec::vectors::{T0, fixture_session};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|steps: Vec<(u16, Input)>| {
    let mut session = fixture_session(1);
    let mut now = T0;
    let mut last_delivered: HashMap<StreamId, u64> = HashMap::new();
    let mut cursors: HashMap<StreamId, u64> = HashMap::new();
    for (delta, input) in steps.into_iter().take(512) {
        now = UnixMs(now.0 + u64::from(delta));
        let stream = match &input {
            Input::Ack { stream, .. } | Input::Subscribe { stream, .. } => Some(*stream),
            _ => None,
        };
        let _ = session.handle(now, input);
        while let Some(out) = session.poll_output() {
            if let Output::Event(Event::Delivered { stream, entry }) = out {
                let last = last_delivered.entry(stream).or_insert(0);
                assert!(entry.seq.get() > *last, "delivered seqs must increase");
                *last = entry.seq.get();
                assert!(entry.seq < session.next_seq(&stream) || entry.seq.next().is_none());
            }
        }
        if let Some(stream) = stream {
            let c = session.ack_cursor(&stream);
            let prev = cursors.entry(stream).or_insert(0);
            assert!(c >= *prev, "ack cursor moved backwards");
            *prev = c;
        }
        if let Some(t) = session.poll_timeout() {
            assert!(t.0 < u64::MAX, "timeouts are finite");
        }
    }
});
