//! The client's side of presence (SPEC.md section 9): which lease it wants, when to renew
//! it, its watchlist, and what it knows of the users it watches. [`crate::app::Client`]
//! drives it: it renews the lease at half its length while it pumps, and after every
//! `Ready` takes the lease again and watches again (a watchlist belongs to its session).

use std::collections::{BTreeMap, HashSet};

use confab_spec::frame::{PresenceMode, PresenceOf, PresenceState};
use confab_spec::ids::{SystemKey, UnixMs};

/// The lease the reference client asks for; it renews at half of what is granted.
pub const LEASE_TTL_MS: u64 = 60_000;
/// How long to wait before renewing again after a renewal that got no lease.
const RETRY_MS: u64 = 1_000;

/// What the client wants of presence and what it knows.
#[derive(Debug, Default)]
pub struct Tracker {
    /// `Online` or `Invisible` while the device should hold a lease.
    mode: Option<PresenceMode>,
    /// When to send the next renewal.
    renew_at: Option<UnixMs>,
    /// The users to watch, kept across reconnects.
    watchlist: Vec<SystemKey>,
    /// Requests the client sent on its own (renewals, watching again); their answers are
    /// handled here.
    own_requests: HashSet<u64>,
    /// The latest state of each watched user.
    states: BTreeMap<SystemKey, PresenceState>,
    /// Changes not yet taken by the application.
    changes: Vec<(SystemKey, PresenceState)>,
}

impl Tracker {
    /// The mode to hold a lease in, if any.
    pub fn mode(&self) -> Option<PresenceMode> {
        self.mode
    }

    /// The application chose `mode` (offline: no lease).
    pub fn set_mode(&mut self, mode: PresenceMode) {
        self.mode = (mode != PresenceMode::Offline).then_some(mode);
        if self.mode.is_none() {
            self.renew_at = None;
        }
    }

    /// A lease of `ttl_ms` was granted at `now`.
    pub fn granted(&mut self, now: UnixMs, ttl_ms: u64) {
        if self.mode.is_some() {
            self.renew_at = Some(now.plus_ms((ttl_ms / 2).max(RETRY_MS)));
        }
    }

    /// A renewal failed at `now`; try again after `retry_after_ms` (or a second).
    pub fn renewal_failed(&mut self, now: UnixMs, retry_after_ms: Option<u64>) {
        if self.mode.is_some() {
            self.renew_at = Some(now.plus_ms(retry_after_ms.unwrap_or(RETRY_MS).max(1)));
        }
    }

    /// Milliseconds until the next renewal is due (0: now), if a lease is wanted.
    pub fn renew_in(&self, now: UnixMs) -> Option<u64> {
        self.mode?;
        Some(self.renew_at.map_or(0, |t| t.0.saturating_sub(now.0)))
    }

    /// A new session is ready at `now`: renew at once; whether to watch again.
    pub fn on_ready(&mut self, now: UnixMs) -> bool {
        if self.mode.is_some() {
            self.renew_at = Some(now);
        }
        !self.watchlist.is_empty()
    }

    /// The users watched.
    pub fn watchlist(&self) -> &[SystemKey] {
        &self.watchlist
    }

    /// The application watches `targets` from now on.
    pub fn set_watchlist(&mut self, targets: Vec<SystemKey>) {
        self.states.retain(|k, _| targets.contains(k));
        self.watchlist = targets;
    }

    /// Remembers that `rid` was sent by the client on its own.
    pub fn own_request(&mut self, rid: u64) {
        self.own_requests.insert(rid);
    }

    /// Whether `rid` is one of the client's own requests (and forgets it).
    pub fn take_own_request(&mut self, rid: u64) -> bool {
        self.own_requests.remove(&rid)
    }

    /// A target's state was told: recorded, and queued as a change if it is one.
    pub fn observe(&mut self, target: SystemKey, state: PresenceState) {
        if !self.watchlist.contains(&target) {
            return;
        }
        if self.states.insert(target, state) != Some(state) {
            self.changes.push((target, state));
        }
    }

    /// A `PresenceStates` answer.
    pub fn observe_all(&mut self, states: &[PresenceOf]) {
        for s in states {
            self.observe(s.target, s.state);
        }
    }

    /// The latest known state of each watched user.
    pub fn states(&self) -> &BTreeMap<SystemKey, PresenceState> {
        &self.states
    }

    /// The changes since the last call, in arrival order.
    pub fn take_changes(&mut self) -> Vec<(SystemKey, PresenceState)> {
        std::mem::take(&mut self.changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_half_the_lease_and_at_once_after_a_reconnect() {
        let mut t = Tracker::default();
        let now = UnixMs(1_000_000);
        assert_eq!(t.renew_in(now), None, "no lease wanted");
        t.set_mode(PresenceMode::Online);
        assert_eq!(t.renew_in(now), Some(0));
        t.granted(now, 60_000);
        assert_eq!(t.renew_in(now), Some(30_000));
        assert_eq!(t.renew_in(now.plus_ms(40_000)), Some(0));
        assert!(!t.on_ready(now.plus_ms(1)), "nothing to watch");
        assert_eq!(t.renew_in(now.plus_ms(1)), Some(0));
        t.renewal_failed(now, Some(5_000));
        assert_eq!(t.renew_in(now), Some(5_000));
        t.set_mode(PresenceMode::Offline);
        assert_eq!(t.renew_in(now), None);
    }

    #[test]
    fn only_changes_of_watched_users_are_queued() {
        let mut t = Tracker::default();
        let (a, b) = (SystemKey([1; 32]), SystemKey([2; 32]));
        t.set_watchlist(vec![a]);
        assert!(t.on_ready(UnixMs(0)));
        t.observe(a, PresenceState::Longer);
        t.observe(a, PresenceState::Longer);
        t.observe(b, PresenceState::Online);
        t.observe(a, PresenceState::Online);
        assert_eq!(
            t.take_changes(),
            [(a, PresenceState::Longer), (a, PresenceState::Online)]
        );
        assert!(t.take_changes().is_empty());
        t.set_watchlist(vec![b]);
        assert!(!t.states().contains_key(&a));
    }
}
