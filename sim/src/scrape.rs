//! The `presence-scrape` scenario (SPEC.md section 9): bots try to turn presence into a
//! tracking tool while normal users watch their contacts, all against the real gateway
//! with its default presence settings and limits.
//!
//! - **Normal users** (`--clients`, default 8) share presence with each other, watch each
//!   other, and go online and offline every 60 to 180 simulated seconds.
//! - **Bots** (4 hosts) rotate identities (a fresh system key per attempt, as anyone can
//!   make) and run three strategies in turn: a watchlist over `watchlist_max`; watchlist
//!   churn (re-watching as fast as they can on one identity); and probing: a fresh
//!   identity watches one normal user or a key nobody holds. Every user has a paired key
//!   nobody holds that carries the same load, so that the per-target limit is seen to
//!   treat both alike. Bots are given a generous per-address
//!   connect limit: they stand for a botnet behind many addresses.
//!
//! Asserted at the end (a cycle is one simulated minute):
//! - bots learn nothing: every state answered to a bot is `unavailable`, and no bot ever
//!   receives a `PresenceChanged`;
//! - a watchlist over the cap is refused (`watchlist_too_large`, or a rate limit first);
//! - churn is throttled: each churning identity is refused (`rate_limited`) no later than
//!   its `burst + 1`-th watch;
//! - probing is throttled per target: the new watchers a target (user or key nobody
//!   holds) admits stay within `burst + per_minute × minutes`, and a probe is refused
//!   with `rate_limited`, never answered differently;
//! - normal users see every transition of their contacts, in order, none invented, each
//!   within `presence_jitter_ms` plus the publishing tick plus 2 s of the change.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use confab_client::app::{Client, ClientError};
use confab_client::mls::EngineKind;
use confab_gateway::durability::SyncPolicy;
use confab_gateway::handler::GatewayConfig;
use confab_gateway::rate::RateLimit;
use confab_spec::error::ErrorCode;
use confab_spec::frame::{PresenceMode, PresenceState};
use confab_spec::identity::{DeviceKeyPair, SystemKeyPair};
use confab_spec::ids::{ProcessId, SystemKey, UnixMs};
use confab_spec::session::DeviceCredentials;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore as _, SeedableRng as _};

use crate::check::Violation;
use crate::device::{ClientParts, GATEWAY_HOST, GATEWAY_PORT, derive_seed, sim_client, sim_ms};
use crate::gateway::{GatewaySpec, run_gateway};
use crate::run::{Failure, Options, Progress, Summary, scratch_dir};
use crate::world::{Trace, World};

/// Bot hosts.
const BOTS: usize = 4;
/// Keys a bot puts in an oversized watchlist (over the default `watchlist_max` of 200).
const LARGE_WATCHLIST: usize = 300;
/// Watches a churning identity attempts before giving up on it.
const CHURN_ATTEMPTS: u32 = 40;
/// When normal users start going on and offline: after everyone watches.
const FIRST_TOGGLE_MS: u64 = 20_000;
/// Normal users stay in one state this long at least (longer than the jitter, so no
/// transition is undone before it is published).
const DWELL_MIN_MS: u64 = 60_000;
/// ... and at most this long.
const DWELL_MAX_MS: u64 = 180_000;
/// Slack on top of jitter and tick for a transition to reach a watcher (network, pumping).
const DELIVERY_SLACK_MS: u64 = 2_000;
/// The gateway's publishing tick (`confab_gateway::server`).
const PUBLISH_TICK_MS: u64 = 500;

/// What the presence-scrape run measured.
#[derive(Debug, Clone, Default)]
pub struct ScrapeReport {
    /// Bot identities used.
    pub bot_identities: u64,
    /// Watch requests bots sent.
    pub bot_watches: u64,
    /// Of those, refused with `rate_limited`.
    pub bot_rate_limited: u64,
    /// Of those, refused with `watchlist_too_large`.
    pub bot_too_large: u64,
    /// States answered to bots, all `unavailable`.
    pub bot_states_seen: u64,
    /// What bots learned: states other than `unavailable`, answered or sent as events. A
    /// leak also stops the run, so a passing run reports 0.
    pub bot_leaks: u64,
    /// The most watches a churning identity got through before its first refusal.
    pub churn_most_before_refusal: u32,
    /// New watchers admitted (a key entering a bot session's watchlist) for the most
    /// probed user, and for the most probed key nobody holds.
    pub probes_admitted_user: u64,
    /// See `probes_admitted_user`.
    pub probes_admitted_nobody: u64,
    /// Probes (single-key watches) refused with `rate_limited`, of users and of keys
    /// nobody holds.
    pub probes_refused_user: u64,
    /// See `probes_refused_user`.
    pub probes_refused_nobody: u64,
    /// Transitions of normal users.
    pub transitions: u64,
    /// Transitions delivered to watching normal users (every watcher, every transition).
    pub deliveries: u64,
    /// Delivery latency from the change, in ms: median, 99th percentile, maximum.
    pub latency_ms: (u64, u64, u64),
    /// The bound asserted on it.
    pub latency_bound_ms: u64,
}

/// One change of a normal user: when it was asked, when the gateway answered, and to what.
#[derive(Debug, Clone, Copy)]
struct Change {
    sent: u64,
    acked: u64,
    online: bool,
}

/// What one normal user saw of another: when it started watching, and each state it
/// learned with the simulated time it learned it.
type Watched = (u64, Vec<(u64, PresenceState)>);

/// What the hosts report.
#[derive(Debug, Default)]
struct ScrapeWorld {
    violation: Option<Violation>,
    trace: Trace,
    /// Per normal user: its changes.
    changes: BTreeMap<usize, Vec<Change>>,
    /// Per (watcher, target): when watching started, and (time, state) seen.
    seen: BTreeMap<(usize, usize), Watched>,
    report: ScrapeReport,
    /// New watchers admitted and refused, per probed key.
    probes: BTreeMap<SystemKey, (u64, u64)>,
    /// Normal users that shared their presence with the others.
    shared: usize,
    /// The probed keys that belong to nobody.
    nobody_keys: std::collections::BTreeSet<SystemKey>,
}

type Shared = Rc<RefCell<ScrapeWorld>>;

fn violation(world: &Shared, invariant: &'static str, detail: String) {
    let mut w = world.borrow_mut();
    if w.violation.is_none() {
        w.violation = Some(Violation::new(invariant, detail));
    }
}

/// Everything a host needs to make clients.
struct HostSpec {
    dir: PathBuf,
    origin: String,
    seed: u64,
    start: UnixMs,
    users: usize,
    config: GatewayConfig,
}

impl HostSpec {
    fn user_key(&self, user: usize) -> SystemKeyPair {
        SystemKeyPair::from_seed(&derive_seed(self.seed, "scrape-user", user as u64))
    }

    /// A key nobody holds, paired with normal user `user` for probing.
    fn nobody(&self, user: usize) -> SystemKey {
        SystemKeyPair::from_seed(&derive_seed(self.seed, "scrape-nobody", user as u64)).public()
    }

    fn client(&self, system: &SystemKeyPair, name: &str, n: u64) -> Result<Client, String> {
        let key = DeviceKeyPair::from_seed(&derive_seed(self.seed, name, n));
        let mut process = [0u8; 16];
        process[..8].copy_from_slice(&n.to_le_bytes());
        let certificate = system.issue_certificate(
            ProcessId(process),
            key.public(),
            UnixMs(self.start.0 - 60_000),
            self.start.plus_ms(30 * 24 * 3_600_000),
        );
        let dir = self.dir.join(format!("{name}-{n}"));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        sim_client(&ClientParts {
            credentials: DeviceCredentials { key, certificate },
            engine: EngineKind::OpenMls,
            dir: &dir,
            origin: &self.origin,
            backoff_base_ms: 100,
            backoff_cap_ms: 5_000,
            jitter: n,
            entropy: derive_seed(self.seed, name, n),
            signatures: None,
            keep_messages: None,
        })
    }
}

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// Pumps `client` for `ms`, recording what it learns with `seen`.
async fn pump_for(
    client: &mut Client,
    ms: u64,
    mut seen: impl FnMut(&mut Client),
) -> Result<(), ClientError> {
    let until = tokio::time::Instant::now() + Duration::from_millis(ms);
    loop {
        tokio::select! {
            biased;
            result = client.pump() => result?,
            () = tokio::time::sleep_until(until) => return Ok(()),
        }
        seen(client);
    }
}

/// A normal user: shares with and watches every other normal user, and goes online and
/// offline.
async fn run_user(world: Shared, spec: Rc<HostSpec>, user: usize) -> turmoil::Result {
    let me = spec.user_key(user);
    let mut client = spec.client(&me, "user", user as u64)?;
    let mut rng = ChaCha20Rng::from_seed(derive_seed(spec.seed, "user-toggles", user as u64));
    let others: Vec<usize> = (0..spec.users).filter(|u| *u != user).collect();
    let keys: Vec<SystemKey> = others.iter().map(|u| spec.user_key(*u).public()).collect();
    let step = async {
        client.connect().await?;
        client
            .update_presence_lists(keys.clone(), vec![], vec![], vec![])
            .await?;
        // Everyone shares before anyone watches: a contact that has not shared yet is
        // rightly `unavailable`, which the end check would take for a leak.
        world.borrow_mut().shared += 1;
        while world.borrow().shared < spec.users {
            pump_for(&mut client, 100, |_| {}).await?;
        }
        let states = client.watch_presence(keys.clone()).await?;
        let now = sim_ms();
        {
            let mut w = world.borrow_mut();
            for (s, other) in states.iter().zip(&others) {
                w.seen.insert((user, *other), (now, vec![(now, s.state)]));
            }
        }
        client.take_presence_changes();
        let index: BTreeMap<SystemKey, usize> =
            keys.iter().copied().zip(others.iter().copied()).collect();
        let record = |client: &mut Client| {
            let now = sim_ms();
            let mut w = world.borrow_mut();
            for (key, state) in client.take_presence_changes() {
                if let Some(other) = index.get(&key) {
                    if let Some((_, seen)) = w.seen.get_mut(&(user, *other)) {
                        seen.push((now, state));
                    }
                    w.trace
                        .record(format_args!("{now} u{user} sees u{other} {}", state.name()));
                }
            }
        };
        let first = FIRST_TOGGLE_MS + rng.next_u64() % 40_000;
        pump_for(&mut client, first.saturating_sub(sim_ms()), record).await?;
        let mut online = false;
        loop {
            online = !online;
            let sent = sim_ms();
            let mode = if online {
                PresenceMode::Online
            } else {
                PresenceMode::Offline
            };
            client.set_presence(mode).await?;
            let acked = sim_ms();
            {
                let mut w = world.borrow_mut();
                w.changes.entry(user).or_default().push(Change {
                    sent,
                    acked,
                    online,
                });
                w.trace
                    .record(format_args!("{acked} u{user} online={online}"));
            }
            record(&mut client);
            let dwell = DWELL_MIN_MS + rng.next_u64() % (DWELL_MAX_MS - DWELL_MIN_MS);
            pump_for(&mut client, dwell, record).await?;
        }
        #[allow(unreachable_code)]
        Ok::<(), ClientError>(())
    };
    if let Err(e) = step.await {
        violation(&world, "no client error", format!("user {user}: {e}"));
    }
    Ok(())
}

/// What a bot learned from one watch.
fn bot_saw(world: &Shared, bot: usize, states: &[confab_spec::frame::PresenceOf]) {
    let mut w = world.borrow_mut();
    w.report.bot_watches += 1;
    w.report.bot_states_seen += states.len() as u64;
    w.report.bot_leaks += states
        .iter()
        .filter(|s| s.state != PresenceState::Unavailable)
        .count() as u64;
    if let Some(s) = states
        .iter()
        .find(|s| s.state != PresenceState::Unavailable)
    {
        w.violation.get_or_insert(Violation::new(
            "bots learn nothing about non-contacts",
            format!("bot {bot} was told {} for a user", s.state.name()),
        ));
    }
}

/// A bot: rotates identities and strategies.
async fn run_bot(world: Shared, spec: Rc<HostSpec>, bot: usize) -> turmoil::Result {
    let mut rng = ChaCha20Rng::from_seed(derive_seed(spec.seed, "bot", bot as u64));
    let burst = spec.config.presence.watches_per_watcher.burst;
    for n in 0u64.. {
        let id = (bot as u64) << 32 | n;
        let system = SystemKeyPair::from_seed(&derive_seed(spec.seed, "bot-identity", id));
        let mut client = match spec.client(&system, "bot", id) {
            Ok(c) => c,
            Err(e) => {
                violation(&world, "simulation set-up", e);
                return Ok(());
            }
        };
        world.borrow_mut().report.bot_identities += 1;
        if let Err(e) = client.connect().await {
            violation(&world, "no client error", format!("bot {bot} connect: {e}"));
            return Ok(());
        }
        let target = (rng.next_u64() % spec.users as u64) as usize;
        let outcome: Result<(), ClientError> = match n % 3 {
            // A watchlist over the cap.
            0 => {
                let mut keys: Vec<SystemKey> =
                    (0..spec.users).map(|u| spec.user_key(u).public()).collect();
                while keys.len() < LARGE_WATCHLIST {
                    let mut k = [0u8; 32];
                    rng.fill_bytes(&mut k);
                    keys.push(SystemKey(k));
                }
                match client.watch_presence(keys).await {
                    Err(ClientError::Refused(ErrorCode::WatchlistTooLarge)) => {
                        let mut w = world.borrow_mut();
                        w.report.bot_watches += 1;
                        w.report.bot_too_large += 1;
                        Ok(())
                    }
                    Err(ClientError::RateLimited { .. }) => {
                        let mut w = world.borrow_mut();
                        w.report.bot_watches += 1;
                        w.report.bot_rate_limited += 1;
                        Ok(())
                    }
                    Ok(states) => {
                        violation(
                            &world,
                            "an oversized watchlist is refused",
                            format!("bot {bot} watched {} keys", states.len()),
                        );
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            // Churn on one identity until refused.
            1 => {
                let mut done = Ok(());
                // The session's watchlist: a key counts against its target's limit when
                // it enters it (SPEC.md 9.5).
                let mut watching = std::collections::BTreeSet::new();
                for attempt in 1..=CHURN_ATTEMPTS {
                    // Users and their paired keys nobody holds, so that both kinds of
                    // target carry the same load.
                    let k = 1 + (rng.next_u64() % 3) as usize;
                    let keys: Vec<SystemKey> = (0..k)
                        .flat_map(|i| {
                            let u = (target + i) % spec.users;
                            [spec.user_key(u).public(), spec.nobody(u)]
                        })
                        .collect();
                    match client.watch_presence(keys.clone()).await {
                        Ok(states) => {
                            bot_saw(&world, bot, &states);
                            let mut w = world.borrow_mut();
                            for key in &keys {
                                if !watching.contains(key) {
                                    w.probes.entry(*key).or_default().0 += 1;
                                }
                            }
                            watching = keys.into_iter().collect();
                        }
                        Err(ClientError::RateLimited { .. }) => {
                            let mut w = world.borrow_mut();
                            w.report.bot_watches += 1;
                            w.report.bot_rate_limited += 1;
                            let before = attempt - 1;
                            w.report.churn_most_before_refusal =
                                w.report.churn_most_before_refusal.max(before);
                            if before > burst {
                                w.violation.get_or_insert(Violation::new(
                                    "churn is throttled within burst + 1 watches",
                                    format!("bot {bot} identity {n}: {before} watches before the first refusal (burst {burst})"),
                                ));
                            }
                            break;
                        }
                        Err(e) => {
                            done = Err(e);
                            break;
                        }
                    }
                    if attempt == CHURN_ATTEMPTS {
                        violation(
                            &world,
                            "churn is throttled within burst + 1 watches",
                            format!("bot {bot} identity {n}: never refused"),
                        );
                    }
                }
                done
            }
            // Probe one user, or the key nobody holds that is paired with it.
            _ => {
                let key = if rng.next_u64() % 2 == 0 {
                    spec.user_key(target).public()
                } else {
                    spec.nobody(target)
                };
                match client.watch_presence(vec![key]).await {
                    Ok(states) => {
                        bot_saw(&world, bot, &states);
                        world.borrow_mut().probes.entry(key).or_default().0 += 1;
                        Ok(())
                    }
                    Err(ClientError::RateLimited { .. }) => {
                        let mut w = world.borrow_mut();
                        w.report.bot_watches += 1;
                        w.report.bot_rate_limited += 1;
                        w.probes.entry(key).or_default().1 += 1;
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
        };
        if let Err(e) = outcome {
            violation(
                &world,
                "no client error",
                format!("bot {bot} identity {n}: {e}"),
            );
            return Ok(());
        }
        // Anything that arrives after is a leak: bots are nobody's contacts.
        let _ = pump_for(&mut client, 50, |_| {}).await;
        let leaks = client
            .take_presence_changes()
            .iter()
            .filter(|(_, s)| *s != PresenceState::Unavailable)
            .count();
        world.borrow_mut().report.bot_leaks += leaks as u64;
        if leaks > 0 {
            violation(
                &world,
                "bots learn nothing about non-contacts",
                format!("bot {bot} identity {n} received a presence change"),
            );
        }
        drop(client);
        let _ = std::fs::remove_dir_all(spec.dir.join(format!("bot-{id}")));
        world
            .borrow_mut()
            .trace
            .record(format_args!("{} bot {bot} identity {n} done", sim_ms()));
        sleep_ms(200 + rng.next_u64() % 800).await;
    }
    Ok(())
}

/// Runs `presence-scrape` for `options.cycles` simulated minutes.
pub fn run(options: &Options, progress: &mut dyn FnMut(Progress)) -> Result<Summary, Failure> {
    let wall = Instant::now();
    let fail = |violation: Violation, step: u64, sim_ms: u64| Failure {
        violation,
        seed: options.seed,
        step,
        sim_ms,
        replay: options.replay_command(),
    };
    let dir = scratch_dir().map_err(|e| {
        fail(
            Violation::new("simulation set-up", format!("temp dir: {e}")),
            0,
            0,
        )
    })?;
    let epoch_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let epoch = UNIX_EPOCH + Duration::from_secs(epoch_s);
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(30 * 24 * 3_600))
        .tick_duration(Duration::from_millis(5))
        .epoch(epoch)
        .rng_seed(options.seed)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(10))
        .ephemeral_ports(1024..=65535)
        .build();
    let origin = format!("ws://{GATEWAY_HOST}:{GATEWAY_PORT}");
    let mut config = GatewayConfig::new(origin.clone());
    // Group commit's syncer is an OS thread on real time: every transaction syncs itself
    // instead, so that one seed replays the same run.
    config.sync = SyncPolicy::EachCommit;
    // Bots stand for a botnet behind many addresses: the per-address connect limit is not
    // what stops them here.
    config.connects_per_ip = RateLimit {
        per_minute: 1_000_000,
        burst: 10_000,
    };
    config.faults = options.gateway_faults;
    let users = options.clients.max(2);
    let spec = Rc::new(HostSpec {
        dir: dir.path().to_path_buf(),
        origin,
        seed: options.seed,
        start: UnixMs(epoch_s * 1_000),
        users,
        config: config.clone(),
    });
    let world: Shared = Rc::new(RefCell::new(ScrapeWorld {
        nobody_keys: (0..users).map(|u| spec.nobody(u)).collect(),
        ..ScrapeWorld::default()
    }));
    let gateway_world = World::new(0);
    let gateway = Rc::new(GatewaySpec {
        config: config.clone(),
        db: dir.path().join("gateway.db"),
        seed: options.seed,
    });
    sim.host(GATEWAY_HOST, move || {
        run_gateway(gateway_world.clone(), gateway.clone())
    });
    for user in 0..users {
        let (w, s) = (world.clone(), spec.clone());
        sim.host(format!("u{user}"), move || {
            run_user(w.clone(), s.clone(), user)
        });
    }
    for bot in 0..BOTS {
        let (w, s) = (world.clone(), spec.clone());
        sim.host(format!("b{bot}"), move || {
            run_bot(w.clone(), s.clone(), bot)
        });
    }
    let end_ms = options.cycles.max(1) * 60_000;
    let mut step = 0u64;
    let mut reported = 0;
    loop {
        if let Err(e) = sim.step() {
            return Err(fail(
                Violation::new("simulation error", e.to_string()),
                step,
                sim_ms_of(&sim),
            ));
        }
        step += 1;
        let now = sim_ms_of(&sim);
        if let Some(v) = world.borrow_mut().violation.take() {
            return Err(fail(v, step, now));
        }
        let minutes = now / 60_000;
        if minutes > reported {
            reported = minutes;
            progress(Progress {
                cycles: minutes,
                target: options.cycles,
                sim_ms: now,
                setting_up: None,
            });
        }
        if now >= end_ms {
            break;
        }
    }
    let mut w = world.borrow_mut();
    let report = check(&mut w, &config, end_ms).map_err(|v| fail(v, step, end_ms))?;
    let digest = w.trace.digest();
    Ok(Summary {
        options: options.clone(),
        cycles: options.cycles,
        composed: 0,
        accepted: 0,
        shown: 0,
        processed: 0,
        commits: 0,
        lost_races: 0,
        faults: BTreeMap::new(),
        unreadable_before_join: 0,
        hostile: (0, 0, 0),
        refused: report.bot_rate_limited + report.bot_too_large,
        checks: report.bot_watches + report.deliveries,
        sim_ms: end_ms,
        steps: step,
        wall: wall.elapsed(),
        digest,
        presence: Some(report),
        signatures: None,
    })
}

fn sim_ms_of(sim: &turmoil::Sim<'_>) -> u64 {
    sim.elapsed().as_millis() as u64
}

/// The end-of-run assertions of the module documentation.
fn check(
    w: &mut ScrapeWorld,
    config: &GatewayConfig,
    end_ms: u64,
) -> Result<ScrapeReport, Violation> {
    let mut report = w.report.clone();
    let p = &config.presence;
    // Probing is throttled per target, alike for users and keys nobody holds.
    let minutes = end_ms.div_ceil(60_000);
    let allowed = u64::from(p.new_watchers_per_target.burst)
        + u64::from(p.new_watchers_per_target.per_minute) * minutes;
    for (key, (admitted, _)) in &w.probes {
        if *admitted > allowed {
            return Err(Violation::new(
                "probing is throttled per target",
                format!(
                    "{} new watchers admitted for {}, at most {allowed}",
                    admitted,
                    hex::encode(&key.0[..6])
                ),
            ));
        }
    }
    // Normal users see every transition, in order, none invented, within the bound.
    let bound = p.jitter_ms + PUBLISH_TICK_MS + DELIVERY_SLACK_MS;
    report.latency_bound_ms = bound;
    let mut latencies = Vec::new();
    for ((watcher, target), (since, seen)) in &w.seen {
        if *since >= FIRST_TOGGLE_MS {
            return Err(Violation::new(
                "normal users watch before anyone goes online",
                format!("u{watcher} watched at {since} ms"),
            ));
        }
        let changes = w.changes.get(target).cloned().unwrap_or_default();
        // The online/offline flips the watcher saw.
        let mut flips: Vec<(u64, bool)> = Vec::new();
        let mut last = None;
        for (t, state) in seen {
            if *state == PresenceState::Unavailable {
                return Err(Violation::new(
                    "contacts see presence",
                    format!("u{watcher} was told u{target} is unavailable"),
                ));
            }
            let online = *state == PresenceState::Online;
            if last != Some(online) {
                if last.is_some() {
                    flips.push((*t, online));
                }
                last = Some(online);
            }
        }
        let due: Vec<&Change> = changes
            .iter()
            .filter(|c| c.acked + bound <= end_ms)
            .collect();
        if flips.len() > changes.len() {
            return Err(Violation::new(
                "no invented transition",
                format!(
                    "u{watcher} saw {} flips of u{target}, who made {}",
                    flips.len(),
                    changes.len()
                ),
            ));
        }
        for (i, change) in due.iter().enumerate() {
            let Some((t, online)) = flips.get(i) else {
                return Err(Violation::new(
                    "every transition reaches every watching contact",
                    format!(
                        "u{watcher} never saw u{target} go online={} at {} ms",
                        change.online, change.acked
                    ),
                ));
            };
            if *online != change.online || *t < change.sent || *t > change.acked + bound {
                return Err(Violation::new(
                    "every transition reaches every watching contact within the bound",
                    format!(
                        "u{watcher} saw u{target} online={online} at {t} ms for the change to online={} sent at {} ms, acked at {} ms (bound {bound} ms)",
                        change.online, change.sent, change.acked
                    ),
                ));
            }
            latencies.push(t - change.sent);
        }
    }
    report.transitions = w.changes.values().map(|c| c.len() as u64).sum();
    report.deliveries = latencies.len() as u64;
    if report.deliveries == 0 {
        return Err(Violation::new(
            "normal users see transitions",
            "no transition was delivered in the run".into(),
        ));
    }
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    report.latency_ms = (at(0.5), at(0.99), at(1.0));
    let probed = |nobody: bool| {
        w.probes
            .iter()
            .filter(|(k, _)| w.nobody_keys.contains(k) == nobody)
            .map(|(_, v)| *v)
            .fold((0, 0), |(a, r), (aa, rr)| (a.max(aa), r + rr))
    };
    let (admitted_user, refused_user) = probed(false);
    let (admitted_nobody, refused_nobody) = probed(true);
    report.probes_admitted_user = admitted_user;
    report.probes_refused_user = refused_user;
    report.probes_admitted_nobody = admitted_nobody;
    report.probes_refused_nobody = refused_nobody;
    if report.bot_rate_limited == 0 {
        return Err(Violation::new(
            "bots are throttled",
            "no bot watch was refused".into(),
        ));
    }
    Ok(report)
}
