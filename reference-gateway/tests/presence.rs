//! Presence (SPEC.md section 9) through the gateway's sans-IO [`Presence`]: a model-based
//! property test over random leases, watchlists, share lists, blocklists and time, plus
//! one test per rule (clamping, lapse bound, invisible, flapping, shared jitter, caps,
//! blocking, both rate limits, persistence).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use confab_gateway::faults::Faults;
use confab_gateway::handler::Entropy;
use confab_gateway::presence::{Presence, PresenceConfig};
use confab_gateway::rate::RateLimit;
use confab_gateway::store::sqlite::SqliteStore;
use confab_spec::error::ErrorCode;
use confab_spec::frame::*;
use confab_spec::ids::{DeviceId, ProcessId, SystemKey, UnixMs};
use proptest::prelude::*;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

const TICK_MS: u64 = 500;
const T0: UnixMs = UnixMs(1_800_000_000_000);

struct Rng(ChaCha8Rng);
impl Entropy for Rng {
    fn fill(&mut self, out: &mut [u8]) {
        self.0.fill_bytes(out);
    }
}

fn user(i: u8) -> SystemKey {
    SystemKey([i + 1; 32])
}

fn device(i: u8, d: u8) -> DeviceId {
    DeviceId {
        system: user(i),
        process: ProcessId([d + 1; 16]),
    }
}

fn generous() -> RateLimit {
    RateLimit {
        per_minute: 100_000,
        burst: 100_000,
    }
}

/// Settings with short times, and rate limits out of the way unless a test sets them.
fn config() -> PresenceConfig {
    PresenceConfig {
        ttl_min_ms: 1_000,
        ttl_max_ms: 60_000,
        grace_ms: 1_000,
        jitter_ms: 5_000,
        watchlist_max: 16,
        list_max: 8,
        watches_per_watcher: generous(),
        new_watchers_per_target: generous(),
        updates_per_user: generous(),
    }
}

/// A gateway's presence with its store, a clock and every session's inbox.
struct Gw {
    presence: Presence,
    store: SqliteStore,
    rng: Rng,
    now: UnixMs,
    /// Events taken per session, in order.
    events: HashMap<u64, Vec<PresenceChanged>>,
    dir: tempfile::TempDir,
}

impl Gw {
    fn new(config: PresenceConfig) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("gw.db")).expect("store");
        Self {
            presence: Presence::new(config, Faults::default()),
            store,
            rng: Rng(ChaCha8Rng::seed_from_u64(7)),
            now: T0,
            events: HashMap::new(),
            dir,
        }
    }

    fn collect(&mut self, wake: &BTreeSet<u64>) {
        for s in wake {
            for f in self.presence.take_events(*s) {
                let ServerFrame::PresenceChanged(c) = f else {
                    panic!("take_events returned {f:?}");
                };
                self.events.entry(*s).or_default().push(c);
            }
        }
    }

    fn set(&mut self, d: DeviceId, mode: PresenceMode, ttl_ms: u64) -> ServerFrame {
        let out = self
            .presence
            .set_presence(
                &mut self.store,
                &mut self.rng,
                self.now,
                d,
                &SetPresence {
                    rid: 1,
                    mode,
                    ttl_ms,
                },
            )
            .expect("set_presence");
        self.collect(&out.wake);
        out.answer.expect("answer")
    }

    fn watch(&mut self, session: u64, d: DeviceId, targets: &[SystemKey]) -> ServerFrame {
        let out = self
            .presence
            .watch(
                &mut self.store,
                self.now,
                session,
                d,
                &WatchPresence {
                    rid: 2,
                    targets: targets.to_vec(),
                },
            )
            .expect("watch");
        self.collect(&out.wake);
        out.answer.expect("answer")
    }

    fn lists(
        &mut self,
        d: DeviceId,
        share: &[SystemKey],
        unshare: &[SystemKey],
        block: &[SystemKey],
        unblock: &[SystemKey],
    ) -> ServerFrame {
        let opt = |v: &[SystemKey]| (!v.is_empty()).then(|| v.to_vec());
        let out = self
            .presence
            .update_lists(
                &mut self.store,
                self.now,
                d,
                &UpdatePresenceLists {
                    rid: 3,
                    share: opt(share),
                    unshare: opt(unshare),
                    block: opt(block),
                    unblock: opt(unblock),
                },
            )
            .expect("update_lists");
        self.collect(&out.wake);
        out.answer.expect("answer")
    }

    /// Advances the clock in ticks of 500 ms, as the server does.
    fn advance(&mut self, ms: u64) {
        let end = self.now.plus_ms(ms);
        while self.now < end {
            self.now = self.now.plus_ms(TICK_MS.min(end.0 - self.now.0));
            let wake = self
                .presence
                .advance(&mut self.store, &mut self.rng, self.now)
                .expect("advance");
            self.collect(&wake);
        }
    }

    /// The latest state `session` was told of `target` after its watch answer `states`.
    fn latest(&self, session: u64, target: SystemKey, answered: PresenceState) -> PresenceState {
        self.events
            .get(&session)
            .and_then(|e| e.iter().rev().find(|c| c.target == target))
            .map_or(answered, |c| c.state)
    }
}

fn states(answer: &ServerFrame) -> Vec<PresenceState> {
    match answer {
        ServerFrame::PresenceStates(s) => s.states.iter().map(|s| s.state).collect(),
        other => panic!("expected PresenceStates, got {other:?}"),
    }
}

fn error_code(answer: &ServerFrame) -> Option<(ErrorCode, Option<u64>)> {
    match answer {
        ServerFrame::Error(e) => Some((e.code, e.retry_after_ms)),
        _ => None,
    }
}

#[test]
fn leases_are_clamped_and_offline_releases() {
    let mut gw = Gw::new(config());
    let lease = |f: ServerFrame| match f {
        ServerFrame::PresenceLease(l) => (l.mode, l.ttl_ms),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        lease(gw.set(device(0, 0), PresenceMode::Online, 5)),
        (PresenceMode::Online, 1_000)
    );
    assert_eq!(
        lease(gw.set(device(0, 0), PresenceMode::Online, 10_000_000)),
        (PresenceMode::Online, 60_000)
    );
    assert_eq!(
        lease(gw.set(device(0, 0), PresenceMode::Offline, 10_000)),
        (PresenceMode::Offline, 0)
    );
}

#[test]
fn a_lapsed_lease_is_published_within_ttl_grace_and_jitter_and_buckets_age() {
    let mut gw = Gw::new(config());
    let (alice, bob) = (device(0, 0), device(1, 0));
    gw.lists(alice, &[bob.system], &[], &[], &[]);
    gw.set(alice, PresenceMode::Online, 10_000);
    gw.advance(5_000 + TICK_MS);
    assert_eq!(
        states(&gw.watch(9, bob, &[alice.system])),
        [PresenceState::Online]
    );
    // No renewal: offline no later than ttl + grace + jitter (+ one tick).
    gw.advance(10_000 + 1_000 + 5_000 + TICK_MS);
    assert_eq!(
        gw.latest(9, alice.system, PresenceState::Online),
        PresenceState::WithinHour
    );
    gw.advance(3_600_000);
    assert_eq!(
        gw.latest(9, alice.system, PresenceState::Online),
        PresenceState::Today
    );
    let told: Vec<PresenceState> = gw.events[&9].iter().map(|c| c.state).collect();
    assert_eq!(told, [PresenceState::WithinHour, PresenceState::Today]);
}

#[test]
fn invisible_looks_like_going_offline_and_last_seen_stops_advancing() {
    let mut gw = Gw::new(config());
    let (alice, bob) = (device(0, 0), device(1, 0));
    gw.lists(alice, &[bob.system], &[], &[], &[]);
    gw.set(alice, PresenceMode::Online, 60_000);
    gw.advance(6_000);
    assert_eq!(
        states(&gw.watch(9, bob, &[alice.system])),
        [PresenceState::Online]
    );
    gw.set(alice, PresenceMode::Invisible, 60_000);
    gw.advance(6_000);
    assert_eq!(
        gw.latest(9, alice.system, PresenceState::Online),
        PresenceState::WithinHour
    );
    // Alice stays invisible and keeps renewing for two hours: her bucket ages as if she
    // had gone offline, because her last-seen does not advance.
    for _ in 0..(2 * 3_600 / 30) {
        gw.set(alice, PresenceMode::Invisible, 60_000);
        gw.advance(30_000);
    }
    assert_eq!(
        gw.latest(9, alice.system, PresenceState::Online),
        PresenceState::Today
    );
    // Invisible Alice can still watch (SPEC.md 9.1).
    gw.lists(bob, &[alice.system], &[], &[], &[]);
    gw.set(bob, PresenceMode::Online, 60_000);
    gw.advance(6_000);
    assert_eq!(
        states(&gw.watch(1, alice, &[bob.system])),
        [PresenceState::Online]
    );
    // Going online clears invisible mode.
    gw.set(alice, PresenceMode::Online, 60_000);
    gw.advance(6_000);
    assert_eq!(
        gw.latest(9, alice.system, PresenceState::Online),
        PresenceState::Online
    );
}

#[test]
fn a_transition_undone_within_the_jitter_is_never_shown_and_watchers_see_it_together() {
    // A long jitter: a reconnect within it is invisible to watchers.
    let mut gw = Gw::new(PresenceConfig {
        jitter_ms: 1_000_000,
        ..config()
    });
    let (alice, bob, carol) = (device(0, 0), device(1, 0), device(2, 0));
    gw.lists(alice, &[bob.system, carol.system], &[], &[], &[]);
    gw.watch(1, bob, &[alice.system]);
    gw.watch(2, carol, &[alice.system]);
    let mut undone = 0;
    for _ in 0..20 {
        gw.set(alice, PresenceMode::Online, 10_000);
        gw.advance(TICK_MS);
        if gw.events.is_empty() {
            gw.set(alice, PresenceMode::Offline, 0);
            gw.advance(TICK_MS);
            undone += 1;
        }
    }
    assert!(undone > 0, "the jitter never delayed a transition");
    // Eventually she is shown online, to both watchers in the same tick.
    gw.set(alice, PresenceMode::Online, 60_000);
    let mut waited = 0;
    while gw.events.is_empty() {
        gw.set(alice, PresenceMode::Online, 60_000);
        gw.advance(TICK_MS);
        waited += TICK_MS;
        assert!(waited <= 1_000_000 + TICK_MS, "never published");
    }
    assert_eq!(
        gw.events.len(),
        2,
        "both watchers are told in the same tick"
    );
    for s in [1, 2] {
        let told: Vec<PresenceState> = gw.events[&s].iter().map(|c| c.state).collect();
        assert_eq!(told, [PresenceState::Online], "session {s}");
    }
}

#[test]
fn watchlists_are_capped_per_user_over_its_sessions() {
    let mut gw = Gw::new(PresenceConfig {
        watchlist_max: 3,
        ..config()
    });
    let keys: Vec<SystemKey> = (10..16).map(user).collect();
    assert!(error_code(&gw.watch(1, device(0, 0), &keys[..3])).is_none());
    // Another device of the same user: the union counts.
    assert_eq!(
        error_code(&gw.watch(2, device(0, 1), &keys[2..4])),
        Some((ErrorCode::WatchlistTooLarge, None))
    );
    assert!(error_code(&gw.watch(2, device(0, 1), &keys[1..3])).is_none());
    // Another user has its own allowance.
    assert!(error_code(&gw.watch(3, device(1, 0), &keys[3..6])).is_none());
    // The refused session kept its previous watchlist: replacing it within the cap works.
    assert!(error_code(&gw.watch(1, device(0, 0), &keys[..2])).is_none());
}

#[test]
fn list_caps_refuse_and_change_nothing() {
    let mut gw = Gw::new(config());
    let alice = device(0, 0);
    let many: Vec<SystemKey> = (10..19).map(user).collect();
    assert_eq!(
        error_code(&gw.lists(alice, &many, &[], &[], &[])),
        Some((ErrorCode::PresenceListFull, None))
    );
    let ServerFrame::PresenceLists(l) = gw.lists(alice, &[], &[], &[], &[]) else {
        panic!("query");
    };
    assert!(l.shared.is_empty() && l.blocked.is_empty());
    assert_eq!(
        error_code(&gw.lists(alice, &[], &[], &many, &[])),
        Some((ErrorCode::PresenceListFull, None))
    );
}

#[test]
fn unsharing_and_blocking_take_effect_at_once_and_look_alike() {
    let mut gw = Gw::new(config());
    let (alice, bob, carol) = (device(0, 0), device(1, 0), device(2, 0));
    gw.lists(alice, &[bob.system, carol.system], &[], &[], &[]);
    gw.set(alice, PresenceMode::Online, 60_000);
    gw.advance(6_000);
    gw.watch(1, bob, &[alice.system]);
    gw.watch(2, carol, &[alice.system]);
    gw.lists(alice, &[], &[], &[bob.system], &[]);
    gw.lists(alice, &[], &[carol.system], &[], &[]);
    // Told at once, with no time passing, and identically.
    for s in [1, 2] {
        assert_eq!(
            gw.latest(s, alice.system, PresenceState::Online),
            PresenceState::Unavailable
        );
    }
    // Nothing more reaches them while Alice comes and goes.
    gw.set(alice, PresenceMode::Offline, 0);
    gw.advance(3_700_000);
    assert_eq!(gw.events[&1].len(), 1);
    assert_eq!(gw.events[&2].len(), 1);
    // A blocked user stays blocked even on the share list.
    gw.lists(alice, &[bob.system], &[], &[], &[]);
    assert_eq!(
        states(&gw.watch(1, bob, &[alice.system])),
        [PresenceState::Unavailable]
    );
}

#[test]
fn the_per_watcher_limit_refuses_with_a_wait_and_keeps_the_watchlist() {
    let mut gw = Gw::new(PresenceConfig {
        watches_per_watcher: RateLimit {
            per_minute: 6,
            burst: 3,
        },
        ..config()
    });
    let (alice, bob) = (device(0, 0), device(1, 0));
    gw.lists(alice, &[bob.system], &[], &[], &[]);
    for _ in 0..3 {
        assert!(error_code(&gw.watch(1, bob, &[alice.system])).is_none());
    }
    // Every device of the user shares the bucket.
    let (code, wait) = error_code(&gw.watch(2, device(1, 1), &[alice.system])).expect("limited");
    assert_eq!(code, ErrorCode::RateLimited);
    assert!(wait.is_some_and(|w| w > 0 && w <= 10_000), "{wait:?}");
    // The first session still receives events.
    gw.set(alice, PresenceMode::Online, 60_000);
    gw.advance(6_000);
    assert_eq!(
        gw.latest(1, alice.system, PresenceState::Longer),
        PresenceState::Online
    );
}

#[test]
fn the_per_target_limit_treats_users_and_unknown_keys_alike_and_spares_contacts() {
    let mut gw = Gw::new(PresenceConfig {
        new_watchers_per_target: RateLimit {
            per_minute: 1,
            burst: 5,
        },
        ..config()
    });
    let alice = device(0, 0);
    let friend = device(1, 0);
    let nobody = SystemKey([0xEE; 32]);
    gw.lists(alice, &[friend.system], &[], &[], &[]);
    gw.set(alice, PresenceMode::Online, 60_000);
    gw.advance(6_000);
    // Rotating identities probe Alice and a key nobody holds, in turn.
    let mut seen = Vec::new();
    for i in 0..8u8 {
        let mut answers = Vec::new();
        for (j, target) in [alice.system, nobody].into_iter().enumerate() {
            let bot = device(100 + i, j as u8);
            let answer = gw.watch(1_000 + u64::from(i) * 2 + j as u64, bot, &[target]);
            answers.push(match error_code(&answer) {
                Some((code, _)) => Err(code),
                None => Ok(states(&answer)),
            });
        }
        assert_eq!(
            answers[0], answers[1],
            "probe {i}: Alice and nobody answered differently"
        );
        seen.push(answers[0].clone());
    }
    assert_eq!(
        seen.iter().filter(|a| a.is_ok()).count(),
        5,
        "exactly the burst gets through: {seen:?}"
    );
    assert!(
        seen.iter()
            .flatten()
            .all(|s| s == &[PresenceState::Unavailable])
    );
    // A contact is never counted or refused by it.
    assert_eq!(
        states(&gw.watch(1, friend, &[alice.system])),
        [PresenceState::Online]
    );
}

#[test]
fn lists_invisible_mode_and_last_seen_survive_a_restart() {
    let mut gw = Gw::new(config());
    let (alice, bob) = (device(0, 0), device(1, 0));
    gw.lists(alice, &[bob.system], &[], &[device(2, 0).system], &[]);
    gw.set(alice, PresenceMode::Online, 2_000);
    gw.advance(20_000);
    gw.set(alice, PresenceMode::Invisible, 2_000);
    let path = gw.dir.path().join("gw.db");
    let mut gw2 = Gw::new(config());
    gw2.store = SqliteStore::open(&path).expect("reopen");
    gw2.now = gw.now;
    let ServerFrame::PresenceLists(l) = gw2.lists(alice, &[], &[], &[], &[]) else {
        panic!("query");
    };
    assert_eq!(l.shared, [bob.system]);
    assert_eq!(l.blocked, [device(2, 0).system]);
    assert!(l.invisible);
    assert_eq!(
        states(&gw2.watch(1, bob, &[alice.system])),
        [PresenceState::WithinHour],
        "last seen was stored"
    );
}

// ---------------------------------------------------------------------------------------
// The model-based property test.

const USERS: u8 = 4;
const DEVICES: u8 = 2;

#[derive(Debug, Clone)]
enum Op {
    Set {
        u: u8,
        d: u8,
        mode: PresenceMode,
        ttl_ms: u64,
    },
    Watch {
        u: u8,
        d: u8,
        targets: Vec<u8>,
    },
    Lists {
        u: u8,
        share: Vec<u8>,
        unshare: Vec<u8>,
        block: Vec<u8>,
        unblock: Vec<u8>,
    },
    Unwatch {
        u: u8,
        d: u8,
    },
    Advance {
        ms: u64,
    },
}

/// Target indices: users 0..4, then two keys nobody holds.
fn target_key(i: u8) -> SystemKey {
    if i < USERS {
        user(i)
    } else {
        SystemKey([0xE0 + i; 32])
    }
}

fn keys() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(0..USERS + 2, 0..4)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..USERS, 0..DEVICES, prop_oneof![Just(PresenceMode::Online), Just(PresenceMode::Invisible), Just(PresenceMode::Offline)], 500u64..30_000)
            .prop_map(|(u, d, mode, ttl_ms)| Op::Set { u, d, mode, ttl_ms }),
        2 => (0..USERS, 0..DEVICES, keys()).prop_map(|(u, d, targets)| Op::Watch { u, d, targets }),
        2 => (0..USERS, keys(), keys(), keys(), keys()).prop_map(|(u, share, unshare, block, unblock)| Op::Lists { u, share, unshare, block, unblock }),
        1 => (0..USERS, 0..DEVICES).prop_map(|(u, d)| Op::Unwatch { u, d }),
        4 => (1u64..40_000).prop_map(|ms| Op::Advance { ms }),
    ]
}

/// What the model knows: lists, leases, invisible flags, and when each user's real
/// online state last changed.
#[derive(Default)]
struct Model {
    shared: BTreeMap<u8, BTreeSet<SystemKey>>,
    blocked: BTreeMap<u8, BTreeSet<SystemKey>>,
    invisible: BTreeMap<u8, bool>,
    leases: BTreeMap<(u8, u8), UnixMs>,
    real: BTreeMap<u8, (bool, UnixMs)>,
}

impl Model {
    fn online(&self, u: u8, now: UnixMs, grace: u64) -> bool {
        !self.invisible.get(&u).copied().unwrap_or(false)
            && self
                .leases
                .iter()
                .any(|((uu, _), end)| *uu == u && end.plus_ms(grace) > now)
    }

    fn refresh(&mut self, now: UnixMs, grace: u64) {
        for u in 0..USERS {
            let on = self.online(u, now, grace);
            let entry = self.real.entry(u).or_insert((false, T0));
            if entry.0 != on {
                *entry = (on, now);
            }
        }
    }

    fn visible(&self, watcher: SystemKey, t: u8) -> bool {
        t < USERS
            && (watcher == user(t)
                || (self.shared.get(&t).is_some_and(|s| s.contains(&watcher))
                    && !self.blocked.get(&t).is_some_and(|s| s.contains(&watcher))))
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// After every step, for every watching session and target:
    /// - a watcher that may not see the target knows `unavailable` (REQ-9.2-1/2, REQ-9.3-1);
    /// - one that may sees anything else;
    /// - events come only for a change (REQ-9.2-4);
    /// - once the target's real state has been stable for the jitter plus a tick, the
    ///   watcher knows it: online exactly when the model says so (REQ-9.1-2, REQ-9.1-3).
    #[test]
    fn watchers_know_what_they_may_and_nothing_else(ops in prop::collection::vec(op(), 1..60)) {
        let cfg = config();
        let (grace, jitter) = (cfg.grace_ms, cfg.jitter_ms);
        let mut gw = Gw::new(cfg);
        let mut model = Model::default();
        // Per session: watcher, and the latest known state per target index.
        let mut known: BTreeMap<u64, (SystemKey, BTreeMap<u8, PresenceState>)> = BTreeMap::new();
        let session = |u: u8, d: u8| u64::from(u) * 10 + u64::from(d);
        for op in ops {
            let before: HashMap<u64, usize> = gw.events.iter().map(|(s, e)| (*s, e.len())).collect();
            match &op {
                Op::Set { u, d, mode, ttl_ms } => {
                    let answer = gw.set(device(*u, *d), *mode, *ttl_ms);
                    let ServerFrame::PresenceLease(l) = answer else { panic!("{answer:?}") };
                    match mode {
                        PresenceMode::Offline => { model.leases.remove(&(*u, *d)); }
                        PresenceMode::Online | PresenceMode::Invisible => {
                            model.leases.insert((*u, *d), gw.now.plus_ms(l.ttl_ms));
                        }
                    }
                    match mode {
                        PresenceMode::Online => { model.invisible.insert(*u, false); }
                        PresenceMode::Invisible => { model.invisible.insert(*u, true); }
                        PresenceMode::Offline => {}
                    }
                }
                Op::Watch { u, d, targets } => {
                    let keys: Vec<SystemKey> = targets.iter().map(|t| target_key(*t)).collect();
                    let answer = gw.watch(session(*u, *d), device(*u, *d), &keys);
                    let got = states(&answer);
                    prop_assert_eq!(got.len(), keys.len());
                    let map = targets.iter().copied().zip(got).collect();
                    known.insert(session(*u, *d), (user(*u), map));
                }
                Op::Lists { u, share, unshare, block, unblock } => {
                    let k = |v: &Vec<u8>| v.iter().map(|t| target_key(*t)).collect::<Vec<_>>();
                    let answer = gw.lists(device(*u, 0), &k(share), &k(unshare), &k(block), &k(unblock));
                    let ServerFrame::PresenceLists(l) = answer else { panic!("{answer:?}") };
                    model.shared.insert(*u, l.shared.into_iter().collect());
                    model.blocked.insert(*u, l.blocked.into_iter().collect());
                }
                Op::Unwatch { u, d } => {
                    gw.presence.unwatch(session(*u, *d));
                    known.remove(&session(*u, *d));
                }
                Op::Advance { ms } => {
                    let end = gw.now.plus_ms(*ms);
                    while gw.now < end {
                        gw.advance(TICK_MS.min(end.0 - gw.now.0));
                        model.refresh(gw.now, grace);
                    }
                }
            }
            model.refresh(gw.now, grace);
            // Fold new events into what each session knows; each must be a change.
            for (s, events) in &gw.events {
                let from = before.get(s).copied().unwrap_or(0);
                for c in &events[from..] {
                    let Some((_, map)) = known.get_mut(s) else {
                        prop_assert!(false, "event for session {s} that watches nothing");
                        unreachable!()
                    };
                    let Some(t) = (0..USERS + 2).find(|t| target_key(*t) == c.target) else {
                        prop_assert!(false, "event about a key nobody watches");
                        unreachable!()
                    };
                    let previous = map.insert(t, c.state);
                    prop_assert_ne!(previous, Some(c.state), "event without a change");
                }
            }
            for (s, (watcher, map)) in &known {
                for (t, state) in map {
                    if !model.visible(*watcher, *t) {
                        prop_assert_eq!(*state, PresenceState::Unavailable, "session {} target {}", s, t);
                        continue;
                    }
                    prop_assert_ne!(*state, PresenceState::Unavailable, "session {} target {}", s, t);
                    let (real, since) = model.real.get(t).copied().unwrap_or((false, T0));
                    if gw.now.0 >= since.0 + jitter + TICK_MS {
                        prop_assert_eq!(*state == PresenceState::Online, real,
                            "session {} target {} at +{} ms, real state since +{} ms", s, t,
                            gw.now.0 - T0.0, since.0 - T0.0);
                    }
                }
            }
        }
    }
}
