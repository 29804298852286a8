//! Groups whose state receive batches advanced in memory and did not write yet, and when
//! that state must be written ([`StateWriteWindow`]).
//!
//! By default an engine writes the state a receive batch advanced when the batch ends.
//! With a state-write window, a batch's end may leave it in memory for up to the window,
//! so that in a busy room one write covers the messages of many batches (issue 9's soak:
//! a write of a 1,000-member group's state costs milliseconds). What a batch ends with is
//! unchanged: its outcomes are released (the client recorded them) or journaled, so the
//! client acknowledges the batch's entries as before.
//!
//! A crash before the write leaves the older state on disk. Nothing is lost: the entries
//! after the acknowledged ones come again, and the older state decrypts them by ratcheting
//! forward past the generations that were already read. It only holds the keys of those
//! generations for longer (the forward secrecy the window trades). Ratcheting forward has
//! a bound in both engines (openmls 1,000 generations, mls-rs 1,024), so a group is also
//! written once any one sender's unwritten messages reach [`MAX_UNWRITTEN_PER_SENDER`].
//!
//! Any other operation on the engine (encrypting, a Commit, a Welcome) writes every
//! unwritten group first, so nothing leaves the process from a state that is not durable.

use std::collections::{BTreeMap, HashMap};

use confab_spec::ids::{ConversationId, DeviceId, UnixMs};

/// The most application messages of one sender a group's unwritten state may have read:
/// a quarter of the smaller of the engines' forward-ratchet bounds (openmls 1,000,
/// mls-rs 1,024), so that the older state on disk reaches any later message of that
/// sender with a wide margin.
pub const MAX_UNWRITTEN_PER_SENDER: u32 = 256;

/// How long receive batches may leave the state they advanced unwritten.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateWriteWindow {
    /// Milliseconds from the first unwritten message of a group to its write; 0 (the
    /// default) writes at the end of every batch.
    pub ms: u64,
}

/// What a group read since its state was last written.
#[derive(Debug)]
struct Unwritten {
    /// When its first unwritten message was read.
    since: UnixMs,
    /// Unwritten messages per sender.
    per_sender: HashMap<DeviceId, u32>,
    /// The largest of `per_sender`.
    most: u32,
}

/// The groups with unwritten state, in id order (the same writes on every run of a
/// simulation's seed).
#[derive(Debug, Default)]
pub struct UnwrittenGroups {
    window: StateWriteWindow,
    groups: BTreeMap<ConversationId, Unwritten>,
}

impl UnwrittenGroups {
    /// Sets the window; groups already unwritten keep their age.
    pub fn set_window(&mut self, window: StateWriteWindow) {
        self.window = window;
    }

    /// What `group` read since its last write, from `now` if nothing.
    fn unwritten(&mut self, group: &ConversationId, now: UnixMs) -> &mut Unwritten {
        self.groups.entry(*group).or_insert_with(|| Unwritten {
            since: now,
            per_sender: HashMap::new(),
            most: 0,
        })
    }

    /// Notes that `group`'s state in memory read a message of `sender` at `now`.
    pub fn read(&mut self, group: &ConversationId, sender: &DeviceId, now: UnixMs) {
        let entry = self.unwritten(group, now);
        let count = entry.per_sender.entry(*sender).or_insert(0);
        *count += 1;
        entry.most = entry.most.max(*count);
    }

    /// Notes that `group` changed in memory in a way that is not an application message
    /// (its state must be written at the batch's end whatever the window).
    pub fn changed(&mut self, group: &ConversationId, now: UnixMs) {
        self.unwritten(group, now).most = MAX_UNWRITTEN_PER_SENDER;
    }

    /// Milliseconds from `now` until `u` is due to be written (0: due now): when the window
    /// has passed since its first unwritten message, or at once without a window or at
    /// the bound per sender.
    fn due_in_of(&self, u: &Unwritten, now: UnixMs) -> u64 {
        if self.window.ms == 0 || u.most >= MAX_UNWRITTEN_PER_SENDER {
            0
        } else {
            (u.since.0 + self.window.ms).saturating_sub(now.0)
        }
    }

    /// Takes the groups whose state must be written at a batch's end at `now`
    /// ([`UnwrittenGroups::due_in`] is 0 for them). The others stay unwritten.
    pub fn take_due(&mut self, now: UnixMs) -> Vec<ConversationId> {
        let due: Vec<ConversationId> = self
            .groups
            .iter()
            .filter(|(_, u)| self.due_in_of(u, now) == 0)
            .map(|(id, _)| *id)
            .collect();
        for id in &due {
            self.groups.remove(id);
        }
        due
    }

    /// Milliseconds from `now` until a group's state is due to be written (0: due now);
    /// `None` if every state is written.
    pub fn due_in(&self, now: UnixMs) -> Option<u64> {
        self.groups.values().map(|u| self.due_in_of(u, now)).min()
    }

    /// Takes every group with unwritten state (before any other operation).
    pub fn take_all(&mut self) -> Vec<ConversationId> {
        std::mem::take(&mut self.groups).into_keys().collect()
    }

    /// Forgets `group` (its state in memory was dropped and is reloaded from disk).
    pub fn forget(&mut self, group: &ConversationId) {
        self.groups.remove(group);
    }

    /// Forgets every group (every cached state was dropped).
    pub fn clear(&mut self) {
        self.groups.clear();
    }

    /// Whether `group` has unwritten state.
    pub fn contains(&self, group: &ConversationId) -> bool {
        self.groups.contains_key(group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u8) -> ConversationId {
        ConversationId([n; 32])
    }

    fn device(n: u8) -> DeviceId {
        DeviceId::from_slice(&[n; DeviceId::LEN]).expect("a device id's length")
    }

    #[test]
    fn without_a_window_every_batch_end_writes() {
        let mut u = UnwrittenGroups::default();
        u.read(&id(1), &device(1), UnixMs(0));
        assert_eq!(u.take_due(UnixMs(0)), vec![id(1)]);
        assert!(u.take_due(UnixMs(0)).is_empty());
    }

    #[test]
    fn a_change_that_is_not_a_message_is_due_at_once() {
        let mut u = UnwrittenGroups::default();
        u.set_window(StateWriteWindow { ms: 60_000 });
        u.changed(&id(1), UnixMs(0));
        assert_eq!(u.take_due(UnixMs(1)), vec![id(1)]);
    }

    proptest! {
        /// With a window, a group is written no later than the window after its first
        /// unwritten message and before any sender's unwritten messages pass the bound;
        /// no group is written earlier than either.
        #[test]
        fn writes_come_within_the_window_and_the_bound(
            reads in proptest::collection::vec((0u8..3, 0u8..4, 0u64..2_000), 1..3_000),
            window in 1u64..100_000,
        ) {
            let mut u = UnwrittenGroups::default();
            u.set_window(StateWriteWindow { ms: window });
            let mut now = 0u64;
            // Per group: when its first unwritten message was read, and per sender counts.
            let mut model: BTreeMap<u8, (u64, HashMap<u8, u32>)> = BTreeMap::new();
            for (group, sender, step) in reads {
                now += step;
                u.read(&id(group), &device(sender), UnixMs(now));
                let m = model.entry(group).or_insert((now, HashMap::new()));
                *m.1.entry(sender).or_insert(0) += 1;
                let due = u.take_due(UnixMs(now));
                for (g, (since, counts)) in &model {
                    let most = counts.values().copied().max().unwrap_or(0);
                    prop_assert!(most <= MAX_UNWRITTEN_PER_SENDER);
                    let must = now - since >= window || most >= MAX_UNWRITTEN_PER_SENDER;
                    prop_assert_eq!(due.contains(&id(*g)), must, "group {} at {}", g, now);
                }
                model.retain(|g, _| !due.contains(&id(*g)));
                for g in model.keys() {
                    prop_assert!(u.contains(&id(*g)));
                }
                // What stays is due later, when its window passes.
                let soonest = model.values().map(|(since, _)| since + window - now).min();
                prop_assert_eq!(u.due_in(UnixMs(now)), soonest);
            }
        }
    }
}
