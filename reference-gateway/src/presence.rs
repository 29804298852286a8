//! Presence (SPEC.md section 9), sans-IO: leases, watchlists, share lists and blocklists,
//! coarse buckets, jittered transitions and the presence rate limits.
//!
//! One [`Presence`] serves the whole gateway. The network shell calls it with a session id
//! (its connection number) for each presence frame, calls [`Presence::advance`] about once a
//! second, and after each call wakes the sessions it names; a woken session takes its
//! queued `PresenceChanged` frames with [`Presence::take_events`]. Queued events are
//! coalesced per target (the latest state wins), so a session's queue never holds more
//! than its watchlist.
//!
//! What a watcher may know of a target is a *view*: `unavailable` unless the watcher is the
//! target's own user or on its share list and not blocked, else the bucket of the target's
//! *published* state. The published state follows the real one (leases, invisible flag)
//! after a random delay drawn once per transition, and a transition undone before it is
//! published is dropped. Share lists, blocklists, the invisible flag and the published
//! last-seen are stored; leases live in memory (clients renew them after a reconnect).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use confab_spec::error::ErrorCode;
use confab_spec::frame::{
    ErrorFrame, InviteSettings, PresenceChanged, PresenceLease, PresenceLists, PresenceMode,
    PresenceOf, PresenceState, PresenceStates, ServerFrame, SetPresence, UpdateInviteSettings,
    UpdatePresenceLists, WatchPresence,
};
use confab_spec::ids::{DeviceId, SystemKey, UnixMs};

use crate::faults::Faults;
use crate::handler::Entropy;
use crate::rate::{Limiter, RateLimit};
use crate::store::{PresenceStatus, ShareLists, Store, StoreError};
use crate::telemetry;

const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;
const WEEK_MS: u64 = 7 * DAY_MS;
/// Loaded users kept in memory although nothing needs them (a cache of stored records).
const IDLE_USERS_KEPT: usize = 10_000;

/// Presence settings (SPEC.md section 9), announced in `/v1/info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceConfig {
    /// `presence_ttl_min_ms`.
    pub ttl_min_ms: u64,
    /// `presence_ttl_max_ms`.
    pub ttl_max_ms: u64,
    /// `presence_grace_ms`.
    pub grace_ms: u64,
    /// `presence_jitter_ms`.
    pub jitter_ms: u64,
    /// `watchlist_max`.
    pub watchlist_max: u64,
    /// `presence_list_max`.
    pub list_max: u64,
    /// `presence_watches_per_watcher`.
    pub watches_per_watcher: RateLimit,
    /// `presence_new_watchers_per_target`.
    pub new_watchers_per_target: RateLimit,
    /// `presence_updates_per_user`.
    pub updates_per_user: RateLimit,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            ttl_min_ms: 10_000,
            ttl_max_ms: 300_000,
            grace_ms: 10_000,
            jitter_ms: 30_000,
            watchlist_max: 200,
            list_max: 1_000,
            watches_per_watcher: RateLimit {
                per_minute: 6,
                burst: 12,
            },
            new_watchers_per_target: RateLimit {
                per_minute: 1,
                burst: 20,
            },
            updates_per_user: RateLimit {
                per_minute: 60,
                burst: 60,
            },
        }
    }
}

/// The bucket of a published state at `now` (SPEC.md 9.4).
pub fn bucket(online: bool, last_seen: Option<UnixMs>, now: UnixMs) -> PresenceState {
    if online {
        return PresenceState::Online;
    }
    let Some(seen) = last_seen else {
        return PresenceState::Longer;
    };
    let age = now.0.saturating_sub(seen.0);
    if age < HOUR_MS {
        PresenceState::WithinHour
    } else if age < DAY_MS {
        PresenceState::Today
    } else if age < WEEK_MS {
        PresenceState::ThisWeek
    } else {
        PresenceState::Longer
    }
}

/// Whether `watcher` may see `target`, given whether `target` shares with it and blocks
/// it (REQ-9.2-1).
fn visible(
    faults: Faults,
    (shared, blocked): (bool, bool),
    watcher: &SystemKey,
    target: &SystemKey,
) -> bool {
    faults.presence_to_everyone || watcher == target || (shared && !blocked)
}

/// One user's presence as the gateway holds it. Its lists stay in the store: visibility
/// is looked up per watcher when it starts watching (one indexed lookup, whatever the
/// lists' length) and updated when the lists change.
#[derive(Debug, Default)]
struct User {
    status: PresenceStatus,
    /// Each leasing device's lease end.
    leases: HashMap<DeviceId, UnixMs>,
    /// What watchers are shown: online or not.
    published_online: bool,
    /// A transition drawn but not yet published: when, and to what.
    pending: Option<(UnixMs, bool)>,
}

impl User {
    fn online_now(&self, now: UnixMs, grace_ms: u64) -> bool {
        !self.status.invisible && self.leases.values().any(|end| end.plus_ms(grace_ms) > now)
    }
}

/// One watched target of a session.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// Whether the watcher may see the target.
    visible: bool,
    /// The state last told (or queued) to the session.
    state: PresenceState,
}

/// One session's watchlist.
#[derive(Debug)]
struct Watch {
    watcher: SystemKey,
    /// Each target.
    seen: HashMap<SystemKey, Seen>,
    /// Events not yet taken, latest state per target.
    queued: BTreeMap<SystemKey, PresenceState>,
}

/// The gateway's presence state. See the module documentation.
pub struct Presence {
    config: PresenceConfig,
    faults: Faults,
    users: HashMap<SystemKey, User>,
    watches: HashMap<u64, Watch>,
    /// Sessions watching each target.
    watchers_of: HashMap<SystemKey, BTreeSet<u64>>,
    /// Sessions of each watching user.
    sessions_of: HashMap<SystemKey, BTreeSet<u64>>,
    /// When a user must be looked at again: a lease lapse, a pending transition, a bucket
    /// boundary. Stale entries are harmless.
    timers: BTreeSet<(UnixMs, SystemKey)>,
    watches_per_watcher: Limiter<SystemKey>,
    new_watchers_per_target: Limiter<SystemKey>,
    updates_per_user: Limiter<SystemKey>,
}

/// What a presence request produced: the answer for the requesting session, and the
/// sessions that have new events to take.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The answer (or error) to send to the requesting session.
    pub answer: Option<ServerFrame>,
    /// Sessions with new queued events.
    pub wake: BTreeSet<u64>,
}

fn refused(code: ErrorCode, rid: u64, retry_after_ms: Option<u64>, detail: &str) -> ServerFrame {
    ServerFrame::Error(ErrorFrame {
        rid: Some(rid),
        retry_after_ms,
        detail: confab_spec::ids::ShortText::new(detail.to_owned()).ok(),
        ..ErrorFrame::new(code)
    })
}

/// An outcome that only refuses request `rid`.
fn refusal(code: ErrorCode, rid: u64, retry_after_ms: Option<u64>, detail: &str) -> Outcome {
    Outcome {
        answer: Some(refused(code, rid, retry_after_ms, detail)),
        wake: BTreeSet::new(),
    }
}

/// Charges `key` one token of `limiter`; the refusal of request `rid` if it has none.
fn charge(limiter: &Limiter<SystemKey>, key: &SystemKey, now: UnixMs, rid: u64) -> Option<Outcome> {
    let wait = limiter.check(key, now).err()?;
    Some(refusal(
        ErrorCode::RateLimited,
        rid,
        Some(wait),
        limiter.name(),
    ))
}

/// The next bucket boundary (an hour, a day, a week after `last_seen`) after `now`.
fn next_boundary(last_seen: UnixMs, now: UnixMs) -> Option<UnixMs> {
    [HOUR_MS, DAY_MS, WEEK_MS]
        .iter()
        .map(|d| last_seen.plus_ms(*d))
        .find(|t| *t > now)
}

impl Presence {
    /// Empty presence state with these settings (and, in self-tests only, broken
    /// behaviours).
    pub fn new(config: PresenceConfig, faults: Faults) -> Self {
        Self {
            faults,
            watches_per_watcher: Limiter::new(
                "presence_watches_per_watcher",
                config.watches_per_watcher,
            ),
            new_watchers_per_target: Limiter::new(
                "presence_new_watchers_per_target",
                config.new_watchers_per_target,
            ),
            updates_per_user: Limiter::new("presence_updates_per_user", config.updates_per_user),
            config,
            users: HashMap::new(),
            watches: HashMap::new(),
            watchers_of: HashMap::new(),
            sessions_of: HashMap::new(),
            timers: BTreeSet::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &PresenceConfig {
        &self.config
    }

    /// The presence rate limits, for `/v1/info`.
    pub fn limiters(&self) -> [&Limiter<SystemKey>; 3] {
        [
            &self.watches_per_watcher,
            &self.new_watchers_per_target,
            &self.updates_per_user,
        ]
    }

    fn user(&mut self, store: &dyn Store, key: &SystemKey) -> Result<&mut User, StoreError> {
        if !self.users.contains_key(key) {
            let status = store.presence_status(key)?;
            self.users.insert(
                *key,
                User {
                    status,
                    ..User::default()
                },
            );
        }
        self.users
            .get_mut(key)
            .ok_or_else(|| StoreError::Corrupt("presence user vanished".into()))
    }

    /// What a watcher that may (`visible`) or may not see `target` is told of it.
    fn view(&self, visible: bool, target: &SystemKey, now: UnixMs) -> PresenceState {
        match self.users.get(target) {
            Some(u) if visible => bucket(u.published_online, u.status.last_seen, now),
            _ => PresenceState::Unavailable,
        }
    }

    /// Recomputes every watching session's view of `target` and queues the changes.
    fn notify(&mut self, target: &SystemKey, now: UnixMs, wake: &mut BTreeSet<u64>) {
        let Some(sessions) = self.watchers_of.get(target) else {
            return;
        };
        let sessions: Vec<u64> = sessions.iter().copied().collect();
        for session in sessions {
            let Some(seen) = self.watches.get(&session).and_then(|w| w.seen.get(target)) else {
                continue;
            };
            let state = self.view(seen.visible, target, now);
            if let Some(w) = self.watches.get_mut(&session) {
                if let Some(seen) = w.seen.get_mut(target) {
                    if seen.state != state {
                        seen.state = state;
                        w.queued.insert(*target, state);
                        wake.insert(session);
                    }
                }
            }
        }
    }

    /// Brings `key`'s published state up to date and schedules its next look.
    fn evaluate(
        &mut self,
        store: &mut dyn Store,
        entropy: &mut dyn Entropy,
        key: &SystemKey,
        now: UnixMs,
        wake: &mut BTreeSet<u64>,
    ) -> Result<(), StoreError> {
        let grace = self.config.grace_ms;
        let jitter = self.config.jitter_ms;
        let watched = self.watchers_of.contains_key(key);
        let user = self.user(&*store, key)?;
        user.leases.retain(|_, end| end.plus_ms(grace) > now);
        let want = user.online_now(now, grace);
        let mut timers = Vec::new();
        if user
            .pending
            .is_some_and(|(_, to)| to == user.published_online)
            || want == user.published_online
        {
            // Undone before it was published: nobody sees it.
            user.pending = None;
        } else if user.pending.is_none() {
            let mut b = [0u8; 8];
            entropy.fill(&mut b);
            // Uniform in [0, jitter]; no overflow for any configured jitter.
            let draw = u64::from_le_bytes(b);
            let delay = jitter.checked_add(1).map_or(draw, |span| draw % span);
            user.pending = Some((now.plus_ms(delay), want));
        }
        let mut published = false;
        if let Some((due, to)) = user.pending {
            if due <= now {
                user.pending = None;
                user.published_online = to;
                // Last seen is the published time of the transition: it reveals nothing
                // finer than the transition itself did.
                user.status.last_seen = Some(due);
                store.put_presence_status(key, &user.status)?;
                telemetry::presence_transition();
                published = true;
            } else {
                timers.push(due);
            }
        }
        if let Some(end) = user.leases.values().min() {
            timers.push(end.plus_ms(grace));
        }
        if watched && !user.published_online {
            if let Some(next) = user.status.last_seen.and_then(|t| next_boundary(t, now)) {
                timers.push(next);
            }
        }
        for t in timers {
            self.timers.insert((t, *key));
        }
        if published || watched {
            self.notify(key, now, wake);
        }
        Ok(())
    }

    /// `SetPresence` from `device` (SPEC.md 9.1).
    pub fn set_presence(
        &mut self,
        store: &mut dyn Store,
        entropy: &mut dyn Entropy,
        now: UnixMs,
        device: DeviceId,
        request: &SetPresence,
    ) -> Result<Outcome, StoreError> {
        let mut outcome = Outcome::default();
        if let Some(refusal) = charge(&self.updates_per_user, &device.system, now, request.rid) {
            return Ok(refusal);
        }
        let ttl_ms = match request.mode {
            PresenceMode::Offline => 0,
            // Never `clamp`: it panics if a misconfigured minimum is above the maximum;
            // the maximum wins then.
            _ => request
                .ttl_ms
                .max(self.config.ttl_min_ms)
                .min(self.config.ttl_max_ms),
        };
        let user = self.user(&*store, &device.system)?;
        let invisible = match request.mode {
            PresenceMode::Online => false,
            PresenceMode::Invisible => true,
            PresenceMode::Offline => user.status.invisible,
        };
        if request.mode == PresenceMode::Offline {
            user.leases.remove(&device);
        } else {
            user.leases.insert(device, now.plus_ms(ttl_ms));
        }
        if user.status.invisible != invisible {
            user.status.invisible = invisible;
            store.put_presence_status(&device.system, &user.status)?;
        }
        self.evaluate(store, entropy, &device.system, now, &mut outcome.wake)?;
        outcome.answer = Some(ServerFrame::PresenceLease(PresenceLease {
            rid: request.rid,
            mode: request.mode,
            ttl_ms,
        }));
        Ok(outcome)
    }

    /// `WatchPresence` from session `session` of `device` (SPEC.md 9.2, 9.5).
    pub fn watch(
        &mut self,
        store: &mut dyn Store,
        now: UnixMs,
        session: u64,
        device: DeviceId,
        request: &WatchPresence,
    ) -> Result<Outcome, StoreError> {
        let mut outcome = Outcome::default();
        let watcher = device.system;
        if let Some(refusal) = charge(&self.watches_per_watcher, &watcher, now, request.rid) {
            return Ok(refusal);
        }
        let wanted: BTreeSet<SystemKey> = request.targets.iter().copied().collect();
        // The user's watchlist is the union over its sessions (REQ-9.2-3).
        let mut union = wanted.clone();
        for other in self.sessions_of.get(&watcher).into_iter().flatten() {
            if *other != session {
                if let Some(w) = self.watches.get(other) {
                    union.extend(w.seen.keys().copied());
                }
            }
        }
        if union.len() as u64 > self.config.watchlist_max {
            return Ok(refusal(
                ErrorCode::WatchlistTooLarge,
                request.rid,
                None,
                "watchlist_max",
            ));
        }
        // Every target is loaded and checked the same way, whether or not it belongs to
        // anyone (REQ-9.2-2, REQ-9.5-1).
        let before: BTreeSet<SystemKey> = self
            .watches
            .get(&session)
            .map(|w| w.seen.keys().copied().collect())
            .unwrap_or_default();
        let mut limited = None;
        let mut visibility = HashMap::new();
        for target in &wanted {
            self.user(&*store, target)?;
            let may_see = visible(
                self.faults,
                store.share_of(target, &watcher)?,
                &watcher,
                target,
            );
            visibility.insert(*target, may_see);
            let counted = !may_see && !self.faults.no_presence_target_limit;
            if counted && !before.contains(target) {
                if let Err(wait) = self.new_watchers_per_target.check(target, now) {
                    limited = Some(limited.map_or(wait, |w: u64| w.max(wait)));
                }
            }
        }
        if let Some(wait) = limited {
            return Ok(refusal(
                ErrorCode::RateLimited,
                request.rid,
                Some(wait),
                self.new_watchers_per_target.name(),
            ));
        }
        self.unwatch(session);
        if !wanted.is_empty() {
            let mut seen = HashMap::new();
            for target in &wanted {
                let visible = visibility.get(target).copied().unwrap_or(false);
                let state = self.view(visible, target, now);
                seen.insert(*target, Seen { visible, state });
                self.watchers_of.entry(*target).or_default().insert(session);
            }
            self.watches.insert(
                session,
                Watch {
                    watcher,
                    seen,
                    queued: BTreeMap::new(),
                },
            );
            self.sessions_of.entry(watcher).or_default().insert(session);
            // Bucket boundaries of offline targets now matter.
            for target in &wanted {
                let offline_since = self
                    .users
                    .get(target)
                    .filter(|u| !u.published_online)
                    .and_then(|u| u.status.last_seen);
                if let Some(next) = offline_since.and_then(|t| next_boundary(t, now)) {
                    self.timers.insert((next, *target));
                }
            }
        }
        let states = request
            .targets
            .iter()
            .map(|target| PresenceOf {
                target: *target,
                state: self.view(
                    visibility.get(target).copied().unwrap_or(false),
                    target,
                    now,
                ),
            })
            .collect();
        outcome.answer = Some(ServerFrame::PresenceStates(PresenceStates {
            rid: request.rid,
            states,
        }));
        Ok(outcome)
    }

    /// `UpdatePresenceLists` from `device` (SPEC.md 9.3).
    pub fn update_lists(
        &mut self,
        store: &mut dyn Store,
        now: UnixMs,
        device: DeviceId,
        request: &UpdatePresenceLists,
    ) -> Result<Outcome, StoreError> {
        let mut outcome = Outcome::default();
        let key = device.system;
        // Queries are charged too: each reads the whole lists.
        if let Some(refusal) = charge(&self.updates_per_user, &key, now, request.rid) {
            return Ok(refusal);
        }
        let list_max = self.config.list_max;
        let invisible = self.user(&*store, &key)?.status.invisible;
        let before = store.share_lists(&key)?;
        let mut lists = before.clone();
        for k in request.share.iter().flatten() {
            lists.shared.insert(*k);
        }
        for k in request.unshare.iter().flatten() {
            lists.shared.remove(k);
        }
        for k in request.block.iter().flatten() {
            lists.blocked.insert(*k);
        }
        for k in request.unblock.iter().flatten() {
            lists.blocked.remove(k);
        }
        if lists.shared.len() as u64 > list_max || lists.blocked.len() as u64 > list_max {
            return Ok(refusal(
                ErrorCode::PresenceListFull,
                request.rid,
                None,
                "presence_list_max",
            ));
        }
        if lists != before {
            store.put_share_lists(&key, &lists)?;
            // At once, also for existing subscriptions (REQ-9.3-1).
            self.reshare(&key, &lists);
            self.notify(&key, now, &mut outcome.wake);
        }
        outcome.answer = Some(ServerFrame::PresenceLists(PresenceLists {
            rid: request.rid,
            shared: lists.shared.into_iter().collect(),
            blocked: lists.blocked.into_iter().collect(),
            invisible,
        }));
        Ok(outcome)
    }

    /// `UpdateInviteSettings` from `device` (SPEC.md 8.1): the user's invite policy and
    /// allow list, changed and answered at once (REQ-8-11); the list is bounded by
    /// `presence_list_max` (REQ-8-12). It shares `presence_updates_per_user` with the
    /// presence settings, queries included.
    pub fn update_invites(
        &mut self,
        store: &mut dyn Store,
        now: UnixMs,
        device: DeviceId,
        request: &UpdateInviteSettings,
    ) -> Result<Outcome, StoreError> {
        let key = device.system;
        if let Some(refusal) = charge(&self.updates_per_user, &key, now, request.rid) {
            return Ok(refusal);
        }
        let before = store.invite_settings(&key)?;
        let mut settings = before.clone();
        if let Some(policy) = request.policy {
            settings.policy = policy;
        }
        settings
            .allowed
            .extend(request.allow.iter().flatten().copied());
        if !self.faults.disallow_ignored {
            for k in request.disallow.iter().flatten() {
                settings.allowed.remove(k);
            }
        }
        if settings.allowed.len() as u64 > self.config.list_max
            && !self.faults.invite_list_unbounded
        {
            return Ok(refusal(
                ErrorCode::PresenceListFull,
                request.rid,
                None,
                "presence_list_max",
            ));
        }
        if settings != before {
            store.put_invite_settings(&key, &settings)?;
        }
        Ok(Outcome {
            answer: Some(ServerFrame::InviteSettings(InviteSettings {
                rid: request.rid,
                policy: settings.policy,
                allowed: settings.allowed.into_iter().collect(),
            })),
            wake: BTreeSet::new(),
        })
    }

    /// `target`'s lists are now `lists`: every session watching it learns whether its
    /// watcher may still (or now) see it.
    fn reshare(&mut self, target: &SystemKey, lists: &ShareLists) {
        let faults = self.faults;
        for session in self.watchers_of.get(target).into_iter().flatten() {
            if let Some(w) = self.watches.get_mut(session) {
                let shared = (
                    lists.shared.contains(&w.watcher),
                    lists.blocked.contains(&w.watcher),
                );
                let may_see = visible(faults, shared, &w.watcher, target);
                if let Some(seen) = w.seen.get_mut(target) {
                    seen.visible = may_see;
                }
            }
        }
    }

    /// Ends `session`'s watchlist (its connection closed, or it is being replaced).
    pub fn unwatch(&mut self, session: u64) {
        let Some(w) = self.watches.remove(&session) else {
            return;
        };
        for target in w.seen.keys() {
            if let Some(s) = self.watchers_of.get_mut(target) {
                s.remove(&session);
                if s.is_empty() {
                    self.watchers_of.remove(target);
                }
            }
        }
        if let Some(s) = self.sessions_of.get_mut(&w.watcher) {
            s.remove(&session);
            if s.is_empty() {
                self.sessions_of.remove(&w.watcher);
            }
        }
    }

    /// The queued `PresenceChanged` frames of `session`, in target order.
    pub fn take_events(&mut self, session: u64) -> Vec<ServerFrame> {
        let Some(w) = self.watches.get_mut(&session) else {
            return Vec::new();
        };
        std::mem::take(&mut w.queued)
            .into_iter()
            .map(|(target, state)| ServerFrame::PresenceChanged(PresenceChanged { target, state }))
            .collect()
    }

    /// Publishes what is due at `now`: lapsed leases, drawn transitions, bucket changes.
    /// Returns the sessions with new events.
    pub fn advance(
        &mut self,
        store: &mut dyn Store,
        entropy: &mut dyn Entropy,
        now: UnixMs,
    ) -> Result<BTreeSet<u64>, StoreError> {
        let mut wake = BTreeSet::new();
        while let Some(&(at, key)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            if self.users.contains_key(&key) {
                self.evaluate(store, entropy, &key, now, &mut wake)?;
            }
        }
        self.forget_idle();
        Ok(wake)
    }

    /// Drops cached users that nothing needs (no lease, no pending transition, unwatched)
    /// once there are many of them; their records are stored.
    fn forget_idle(&mut self) {
        if self.users.len() <= IDLE_USERS_KEPT {
            return;
        }
        let watchers_of = &self.watchers_of;
        self.users.retain(|key, u| {
            !u.leases.is_empty() || u.pending.is_some() || watchers_of.contains_key(key)
        });
    }

    /// Forgets limiter buckets that are full again (the retention pass calls this).
    pub fn forget_idle_limits(&self) {
        for l in self.limiters() {
            l.forget_idle();
        }
    }
}
