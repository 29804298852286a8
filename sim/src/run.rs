//! The orchestrator: builds a turmoil simulation of one gateway host and N device hosts
//! from one seed, drives the scenario's workload and fault schedule between steps, stops
//! on the first broken invariant, and at the end lets the network heal and waits (with a
//! bound) until every device caught up.
//!
//! Network faults follow TCP's semantics as far as turmoil allows: turmoil drops the
//! segments of a partition and never retransmits them, which a real TCP connection would
//! not do, so an outage shorter than the heartbeat deadline is a *hold* (segments are
//! delayed and delivered on release, as retransmission would), and a partition lasts until
//! both ends have declared the connection dead.

use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use confab_client::mls::EngineKind;
use confab_client::mls::signature_memo::{MemoStats, SignatureMemo};
use confab_gateway::durability::SyncPolicy;
use confab_gateway::faults::Faults;
use confab_gateway::handler::GatewayConfig;
use confab_gateway::rate::RateLimit;
use confab_spec::ids::{ConversationId, UnixMs};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore as _, SeedableRng as _};

use crate::check::Violation;
use crate::device::{DeviceSpec, GATEWAY_HOST, GATEWAY_PORT, derive_seed, run_device, user_key};
use crate::gateway::{GatewaySpec, run_gateway};
use crate::scenario::{Scenario, Topology};
use crate::workers::Workers;
use crate::world::{Command, Shared, World};

/// How long the orchestrator waits between workload decisions (simulated).
const DECIDE_EVERY_MS: u64 = 10;
/// The gateway's heartbeat interval in the simulation.
pub const HEARTBEAT_INTERVAL_MS: u64 = 1_000;
/// The gateway's heartbeat timeout in the simulation.
pub const HEARTBEAT_TIMEOUT_MS: u64 = 3_000;
/// A partition lasts this long: past both ends' heartbeat deadlines.
const PARTITION_MS: u64 = 3 * HEARTBEAT_TIMEOUT_MS;
/// Bound on set-up (KeyPackages, DM creation, joins), simulated.
const SET_UP_MS: u64 = 120_000;
/// How often the set-up reports progress, in simulated milliseconds.
const SETUP_REPORT_MS: u64 = 10_000;

/// Signatures the shared memo holds: the soak's messages in flight (a few seconds at 100
/// a second) and a room's leaf signatures, which every joiner checks (1,000).
const SIGNATURE_MEMO_CAPACITY: usize = 16_384;
/// Bound on catching up once faults stop (the liveness invariant), simulated.
const SETTLE_MS: u64 = 120_000;
/// Bound on the time without a completed cycle, simulated.
const CYCLE_MS: u64 = 60_000;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The scenario.
    pub scenario: Scenario,
    /// The seed: one seed, one run.
    pub seed: u64,
    /// Cycles to complete.
    pub cycles: u64,
    /// Devices.
    pub clients: usize,
    /// Deliberately broken gateway behaviours (the self-test); none normally.
    pub gateway_faults: Faults,
    /// The names of those switches, for the replay command.
    pub gateway_fault_names: Vec<String>,
    /// Worker threads for devices' synchronous work, in scenarios that hand it over
    /// ([`crate::workers`]). Any number gives the same run (zero: inline); by default
    /// as many as the machine has cores.
    pub threads: usize,
}

/// The default worker threads: as many as the machine has cores. Not one fewer for the
/// thread that steps the simulation: it waits for the workers part of the time, and on 2
/// cores the soak ran 2.96 s of wall time per simulated second with 2 workers and 3.6 s
/// with 1.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Options {
    /// `scenario` with its defaults and `seed`.
    pub fn new(scenario: Scenario, seed: u64) -> Self {
        Self {
            scenario,
            seed,
            cycles: scenario.default_cycles(),
            clients: scenario.default_clients(),
            gateway_faults: Faults::default(),
            gateway_fault_names: Vec::new(),
            threads: default_threads(),
        }
    }

    /// The command that replays this run.
    pub fn replay_command(&self) -> String {
        let mut command = format!(
            "cargo run --release -p confab-sim -- run --scenario {} --seed {} --cycles {} --clients {}",
            self.scenario, self.seed, self.cycles, self.clients
        );
        for name in &self.gateway_fault_names {
            command.push_str(&format!(" --gateway-fault {name}"));
        }
        command
    }
}

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Cycles done.
    pub cycles: u64,
    /// Cycles to do.
    pub target: u64,
    /// Simulated milliseconds so far.
    pub sim_ms: u64,
    /// Before the cycles: the set-up step, with how many devices are through it of how
    /// many (reported every 10 simulated seconds; a big room takes a while to join).
    pub setting_up: Option<(&'static str, usize, usize)>,
}

/// What a passing run did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// What ran.
    pub options: Options,
    /// Cycles completed.
    pub cycles: u64,
    /// Messages composed.
    pub composed: u64,
    /// Sends the gateway accepted (answers the senders saw).
    pub accepted: u64,
    /// Messages shown, over all devices.
    pub shown: u64,
    /// Entries processed, over all devices.
    pub processed: u64,
    /// Commits made by updates, and races lost.
    pub commits: u64,
    /// Commit races lost and retried.
    pub lost_races: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// Application messages of epochs before a device joined, which it cannot read.
    pub unreadable_before_join: u64,
    /// Sends, updates and membership changes refused for a reason the scenario allows.
    pub refused: u64,
    /// `hostile-member`: acts done, acts the gateway refused, and the hostile member's
    /// entries other devices could not read.
    pub hostile: (u64, u64, u64),
    /// Invariant checks made.
    pub checks: u64,
    /// Simulated time.
    pub sim_ms: u64,
    /// Simulation steps.
    pub steps: u64,
    /// Wall time.
    pub wall: Duration,
    /// The trace digest.
    pub digest: String,
    /// What `presence-scrape` measured (that scenario only).
    pub presence: Option<crate::scrape::ScrapeReport>,
    /// How the shared signature memo answered, in scenarios that share one.
    pub signatures: Option<MemoStats>,
}

/// A failed run: the broken invariant and how to replay it.
#[derive(Debug, Clone)]
pub struct Failure {
    /// What broke.
    pub violation: Violation,
    /// The seed.
    pub seed: u64,
    /// The step it was found at.
    pub step: u64,
    /// The simulated time it was found at.
    pub sim_ms: u64,
    /// The command that replays it.
    pub replay: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invariant broken: {}\n  seed {}, step {}, at {} ms simulated\n  replay: {}",
            self.violation, self.seed, self.step, self.sim_ms, self.replay
        )
    }
}

/// A DM of the topology.
#[derive(Debug, Clone)]
struct Dm {
    creator: usize,
    peer_user: usize,
    members: Vec<usize>,
    conversation: Option<ConversationId>,
}

/// Something that undoes a fault later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restore {
    Repair(usize),
    Release(usize),
    StartGateway,
    StartDevice(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    SetUp,
    Creating,
    Joining,
    Cycles,
    Settling,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GatewayCycle {
    Running { until: u64 },
    Down,
    Recovering,
}

/// Where the multi-device churn is: one remove and re-add at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Churn {
    Steady { until: u64 },
    Removing { by: usize, target: usize },
    Out { target: usize, until: u64 },
    ToppingUp { target: usize },
    Adding { by: usize, target: usize },
}

/// Where the room churn is: one member out and back at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RoomChurn {
    Steady {
        until: u64,
    },
    /// The target asked to leave; a member commits it.
    Leaving {
        target: usize,
    },
    /// `by` (owner or admin) removes the target.
    Removing {
        by: usize,
        target: usize,
    },
    Out {
        target: usize,
        until: u64,
    },
    ToppingUp {
        target: usize,
    },
    /// `by` invites the target back.
    Inviting {
        by: usize,
        target: usize,
    },
    /// Invited; the target joins from its Welcome.
    Rejoining {
        target: usize,
    },
}

/// Each device's state at one decision: connected, running a command, whether its last
/// command did what it asked, and its id.
struct Flags {
    ready: Vec<bool>,
    busy: Vec<bool>,
    ok: Vec<bool>,
    ids: Vec<Option<confab_spec::ids::DeviceId>>,
}

/// The room's admin in `room-churn` (device 0 owns the room).
const ROOM_ADMIN: usize = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    Idle,
    Racing,
}

/// Runs `options`; `progress` is called as cycles complete.
pub fn run(options: &Options, progress: &mut dyn FnMut(Progress)) -> Result<Summary, Failure> {
    if options.scenario == Scenario::PresenceScrape {
        return crate::scrape::run(options, progress);
    }
    let wall = Instant::now();
    let dir = scratch_dir().map_err(|e| setup_failure(options, format!("temp dir: {e}")))?;
    let workers = match options.scenario.offloads_work() {
        true => Some(Arc::new(
            Workers::new(
                options.threads,
                Duration::from_millis(options.scenario.tick_ms()),
                Duration::from_millis(options.scenario.hand_over_ms()),
            )
            .map_err(|e| setup_failure(options, format!("worker threads: {e}")))?,
        )),
        false => None,
    };
    let mut orchestrator = Orchestrator::new(options, dir.path(), workers);
    let result = orchestrator.drive(progress);
    let sim_ms = orchestrator.now();
    let step = orchestrator.step;
    let world = orchestrator.world.borrow();
    match result {
        Err(violation) => Err(Failure {
            violation,
            seed: options.seed,
            step,
            sim_ms,
            replay: options.replay_command(),
        }),
        Ok(()) => {
            let devices = &world.devices;
            Ok(Summary {
                options: options.clone(),
                cycles: orchestrator.cycles,
                composed: devices.iter().map(|d| d.composed).sum(),
                accepted: world.checker.accepted,
                shown: world.checker.shown,
                processed: world.checker.processed,
                commits: devices.iter().map(|d| d.commits).sum(),
                lost_races: devices.iter().map(|d| d.lost_races).sum(),
                faults: orchestrator.faults.clone(),
                unreadable_before_join: world.checker.unreadable_before_join,
                refused: devices.iter().map(|d| d.refused).sum(),
                hostile: (
                    devices.iter().map(|d| d.hostile_acts).sum(),
                    devices.iter().map(|d| d.hostile_refused).sum(),
                    world.checker.unreadable_hostile,
                ),
                checks: world.checker.checks,
                sim_ms,
                steps: step,
                wall: wall.elapsed(),
                digest: world.trace.digest(),
                presence: None,
                signatures: orchestrator.signatures.as_ref().map(|m| m.stats()),
            })
        }
    }
}

/// Where the hosts' files go: RAM (`/dev/shm`) when there is one, since fsync there is
/// free and crashes are simulated in-process anyway; else the system's temp directory.
/// The name carries the process id: a run that was killed cannot remove its files (a
/// 1,000-member soak leaves gigabytes in RAM), so each run first removes those of
/// processes that no longer exist.
pub(crate) fn scratch_dir() -> std::io::Result<tempfile::TempDir> {
    let ram = Path::new("/dev/shm");
    let prefix = format!("{SCRATCH_PREFIX}{}-", std::process::id());
    let builder = {
        let mut b = tempfile::Builder::new();
        b.prefix(&prefix);
        b
    };
    if ram.is_dir() {
        remove_abandoned_scratch(ram);
        if let Ok(dir) = builder.tempdir_in(ram) {
            return Ok(dir);
        }
    }
    builder.tempdir()
}

/// How scratch directories' names begin, before the process id.
const SCRATCH_PREFIX: &str = "confab-sim-";

/// Removes the scratch directories in `parent` left by processes that are gone (known by
/// `/proc`; without it, nothing is removed).
fn remove_abandoned_scratch(parent: &Path) {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SCRATCH_PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !proc.join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn setup_failure(options: &Options, detail: String) -> Failure {
    Failure {
        violation: Violation::new("simulation set-up", detail),
        seed: options.seed,
        step: 0,
        sim_ms: 0,
        replay: options.replay_command(),
    }
}

struct Orchestrator<'a> {
    sim: turmoil::Sim<'a>,
    world: Shared,
    rng: ChaCha20Rng,
    options: Options,
    dms: Vec<Dm>,
    faults: BTreeMap<&'static str, u64>,
    scheduled: Vec<(u64, Restore)>,
    phase: Phase,
    phase_since: u64,
    next_decision: u64,
    cycles: u64,
    last_cycle: u64,
    resumes_before: u64,
    gateway_cycle: GatewayCycle,
    round: Round,
    churn: Churn,
    room_churn: RoomChurn,
    next_sync: u64,
    step: u64,
    reported: u64,
    next_setup_report: u64,
    /// Signatures checked once for all devices, in scenarios that share them.
    signatures: Option<Arc<SignatureMemo>>,
}

/// The engine of device `i`: each user and each DM pair holds both engines.
fn engine_of(i: usize) -> EngineKind {
    if (i / 2 + i) % 2 == 0 {
        EngineKind::OpenMls
    } else {
        EngineKind::MlsRs
    }
}

fn host_name(i: usize) -> String {
    format!("d{i}")
}

impl<'a> Orchestrator<'a> {
    fn new(options: &Options, dir: &Path, workers: Option<Arc<Workers>>) -> Self {
        let clients = match options.scenario.topology() {
            Topology::Pairs => options.clients.max(2) & !1,
            Topology::TwoUsers => options.clients.max(2),
            // An owner, an admin, and at least one member to churn.
            Topology::Room => options.clients.max(3),
        };
        let mut options = options.clone();
        options.clients = clients;
        // The real clock, to the second, is the simulation's epoch: openmls stamps
        // KeyPackage lifetimes from the real clock, so simulated time must be near it.
        // Only the epoch is real; everything recorded is relative to it.
        let epoch_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let epoch = UNIX_EPOCH + Duration::from_secs(epoch_s);
        let start = UnixMs(epoch_s * 1_000);
        let sim = turmoil::Builder::new()
            .simulation_duration(Duration::from_secs(30 * 24 * 3_600))
            .tick_duration(Duration::from_millis(options.scenario.tick_ms()))
            .epoch(epoch)
            .rng_seed(options.seed)
            .min_message_latency(Duration::from_millis(1))
            .max_message_latency(Duration::from_millis(10))
            .ephemeral_ports(1024..=65535)
            .tcp_capacity(4_096)
            .build();
        let world = World::new(clients);
        let origin = format!("ws://{GATEWAY_HOST}:{GATEWAY_PORT}");
        let mut config = GatewayConfig::new(origin.clone());
        // Group commit's syncer is an OS thread on real time: every transaction syncs itself
        // instead, so that one seed replays the same run.
        config.sync = SyncPolicy::EachCommit;
        config.heartbeat_interval_ms = HEARTBEAT_INTERVAL_MS;
        config.heartbeat_timeout_ms = HEARTBEAT_TIMEOUT_MS;
        // The simulation tests recovery, not the connect limit: reconnecting thousands of
        // times must not be throttled.
        config.connects_per_ip = RateLimit {
            per_minute: 1_000_000,
            burst: 10_000,
        };
        // A room's owner claims the KeyPackages of every member it invites.
        config.claims_per_claimer = RateLimit {
            per_minute: 100_000,
            burst: 10_000,
        };
        // Invites come in bursts when a room is set up.
        config.invites_per_user = RateLimit {
            per_minute: 10_000,
            burst: 1_000,
        };
        // Retention (and the flush of the `ack_before_durable` fault) runs every second.
        config.gc_interval_ms = 1_000;
        config.faults = options.gateway_faults;
        let gateway = Rc::new(GatewaySpec {
            config,
            db: dir.join("gateway.db"),
            seed: options.seed,
        });
        let mut orchestrator = Self {
            sim,
            world,
            rng: ChaCha20Rng::from_seed(derive_seed(options.seed, "orchestrator", 0)),
            dms: Vec::new(),
            faults: BTreeMap::new(),
            scheduled: Vec::new(),
            phase: Phase::SetUp,
            phase_since: 0,
            next_decision: 0,
            cycles: 0,
            last_cycle: 0,
            resumes_before: 0,
            gateway_cycle: GatewayCycle::Recovering,
            round: Round::Idle,
            churn: Churn::Steady { until: 0 },
            room_churn: RoomChurn::Steady { until: 0 },
            next_sync: 0,
            step: 0,
            reported: 0,
            next_setup_report: SETUP_REPORT_MS,
            signatures: options
                .scenario
                .shares_signature_checks()
                .then(|| SignatureMemo::new(SIGNATURE_MEMO_CAPACITY)),
            options,
        };
        let w = orchestrator.world.clone();
        orchestrator.sim.host(GATEWAY_HOST, move || {
            run_gateway(w.clone(), gateway.clone())
        });
        let per_host = orchestrator.options.scenario.devices_per_host().max(1);
        let mut specs = Vec::new();
        for i in 0..clients {
            let user = match orchestrator.options.scenario.topology() {
                Topology::TwoUsers => i % 2,
                Topology::Pairs | Topology::Room => i,
            };
            let device_dir = dir.join(host_name(i));
            let spec = Rc::new(DeviceSpec {
                index: i,
                user,
                engine: engine_of(i),
                dir: device_dir,
                seed: orchestrator.options.seed,
                origin: origin.clone(),
                valid_from: UnixMs(start.0 - 60_000),
                valid_until: start.plus_ms(30 * 24 * 3_600_000),
                backoff_base_ms: 20,
                backoff_cap_ms: 2_000,
                key_packages: 8,
                receive_batch: orchestrator.options.scenario.receive_batch_limits(),
                state_write_window: orchestrator.options.scenario.state_write_window(),
                signatures: orchestrator.signatures.clone(),
                keep_messages: orchestrator.options.scenario.keep_messages(),
                workers: workers.clone(),
            });
            let _ = std::fs::create_dir_all(&spec.dir);
            specs.push(spec);
        }
        for (k, group) in specs.chunks(per_host).enumerate() {
            let w = orchestrator.world.clone();
            if let [spec] = group {
                let spec = spec.clone();
                orchestrator.sim.host(host_name(spec.index), move || {
                    run_device(w.clone(), spec.clone())
                });
            } else {
                let group = group.to_vec();
                orchestrator.sim.host(format!("h{k}"), move || {
                    let devices = group.iter().map(|spec| run_device(w.clone(), spec.clone()));
                    let all = futures_util::future::try_join_all(devices);
                    async move { all.await.map(|_| ()) }
                });
            }
        }
        orchestrator.dms = match orchestrator.options.scenario.topology() {
            Topology::Room => vec![Dm {
                creator: 0,
                peer_user: 0,
                members: (0..clients).collect(),
                conversation: None,
            }],
            Topology::TwoUsers => vec![Dm {
                creator: 0,
                peer_user: 1,
                members: (0..clients).collect(),
                conversation: None,
            }],
            Topology::Pairs => (0..clients / 2)
                .map(|k| Dm {
                    creator: 2 * k,
                    peer_user: 2 * k + 1,
                    members: vec![2 * k, 2 * k + 1],
                    conversation: None,
                })
                .collect(),
        };
        orchestrator
    }

    fn now(&self) -> u64 {
        self.sim.elapsed().as_millis() as u64
    }

    fn drive(&mut self, progress: &mut dyn FnMut(Progress)) -> Result<(), Violation> {
        loop {
            if let Err(e) = self.sim.step() {
                return Err(Violation::new("simulation error", e.to_string()));
            }
            self.step += 1;
            if let Some(v) = self.world.borrow_mut().violation.take() {
                return Err(v);
            }
            let now = self.now();
            self.restore_due(now);
            if now < self.next_decision {
                continue;
            }
            self.next_decision = now + DECIDE_EVERY_MS;
            if self.decide(now)? {
                return Ok(());
            }
            // Every 1%: the full soak's percent is a few minutes of wall time.
            let step = (self.options.cycles / 100).max(1);
            if self.cycles >= self.reported + step {
                self.reported = self.cycles - self.cycles % step;
                progress(Progress {
                    cycles: self.cycles,
                    target: self.options.cycles,
                    sim_ms: now,
                    setting_up: None,
                });
            } else if now >= self.next_setup_report {
                self.next_setup_report = now + SETUP_REPORT_MS;
                if let Some(step) = self.setup_progress() {
                    progress(Progress {
                        cycles: 0,
                        target: self.options.cycles,
                        sim_ms: now,
                        setting_up: Some(step),
                    });
                }
            }
        }
    }

    /// The set-up step under way, with the devices through it and all devices.
    fn setup_progress(&self) -> Option<(&'static str, usize, usize)> {
        let w = self.world.borrow();
        let total = w.devices.len();
        match self.phase {
            Phase::SetUp => Some((
                "connecting and uploading KeyPackages",
                w.devices.iter().filter(|d| d.set_up && d.ready).count(),
                total,
            )),
            Phase::Creating => Some(("creating", 0, self.dms.len())),
            Phase::Joining => {
                let members = self.dms.iter().map(|dm| {
                    dm.members
                        .iter()
                        .filter(|&&d| dm.conversation.is_some_and(|c| w.checker.is_member(d, &c)))
                        .count()
                });
                Some(("joining", members.sum(), total))
            }
            Phase::Cycles | Phase::Settling => None,
        }
    }

    fn set_phase(&mut self, phase: Phase, now: u64) {
        self.phase = phase;
        self.phase_since = now;
        self.world
            .borrow_mut()
            .trace
            .record(format_args!("{now} phase {phase:?}"));
    }

    /// One decision; `true` when the run is over and passed.
    fn decide(&mut self, now: u64) -> Result<bool, Violation> {
        let waited = now - self.phase_since;
        match self.phase {
            Phase::SetUp => {
                let ready = {
                    let w = self.world.borrow();
                    w.devices.iter().all(|d| d.set_up && d.ready && !d.busy)
                };
                if ready {
                    for k in 0..self.dms.len() {
                        let (creator, peer) = (self.dms[k].creator, self.dms[k].peer_user);
                        let command = match self.options.scenario.topology() {
                            Topology::Room => Command::CreateRoom,
                            _ => Command::CreateDm {
                                peer: user_key(peer).public(),
                            },
                        };
                        self.command(creator, command);
                    }
                    self.set_phase(Phase::Creating, now);
                } else if waited > SET_UP_MS {
                    return Err(self.stuck("set-up: devices did not all connect and upload"));
                }
            }
            Phase::Creating => {
                let mut done = true;
                {
                    let w = self.world.borrow();
                    for dm in &mut self.dms {
                        let created = &w.devices[dm.creator].created;
                        match created.first() {
                            Some(c) => dm.conversation = Some(*c),
                            None => done = false,
                        }
                    }
                }
                if done {
                    if let (Topology::Room, Some(room)) = (
                        self.options.scenario.topology(),
                        self.dms.first().and_then(|dm| dm.conversation),
                    ) {
                        // The owner invites everyone and names the admin.
                        let users = (1..self.options.clients)
                            .map(|u| user_key(u).public())
                            .collect();
                        self.command(0, Command::Invite { room, users });
                        self.command(
                            0,
                            Command::SetRole {
                                room,
                                user: user_key(ROOM_ADMIN).public(),
                                role: confab_spec::rooms::Role::Admin,
                            },
                        );
                    }
                    self.set_phase(Phase::Joining, now);
                } else if waited > SET_UP_MS {
                    return Err(self.stuck("set-up: DMs were not all created"));
                }
            }
            Phase::Joining => {
                let joined = {
                    let w = self.world.borrow();
                    self.dms.iter().all(|dm| {
                        dm.members
                            .iter()
                            .all(|&d| dm.conversation.is_some_and(|c| w.checker.is_member(d, &c)))
                    }) && w.checker.lagging().is_empty()
                        && w.devices.iter().all(|d| d.ready && !d.busy)
                };
                if joined {
                    self.resumes_before = self.resumes();
                    self.set_phase(Phase::Cycles, now);
                } else if waited > SET_UP_MS {
                    return Err(self.stuck("set-up: devices did not all join their DM"));
                }
            }
            Phase::Cycles => {
                let before = self.cycles;
                self.workload(now);
                if self.cycles != before {
                    self.last_cycle = now;
                } else if now - self.last_cycle.max(self.phase_since) > CYCLE_MS {
                    return Err(self.stuck(&format!(
                        "liveness: no cycle completed for {} s",
                        CYCLE_MS / 1_000
                    )));
                }
                if self.cycles >= self.options.cycles {
                    self.heal(now);
                    self.set_phase(Phase::Settling, now);
                }
            }
            Phase::Settling => {
                let settled = {
                    let w = self.world.borrow();
                    w.devices.iter().all(|d| d.ready && !d.busy) && w.checker.lagging().is_empty()
                };
                if settled {
                    let mut w = self.world.borrow_mut();
                    w.checker.final_check()?;
                    return Ok(true);
                }
                if waited > SETTLE_MS {
                    return Err(self.stuck(&format!(
                        "liveness: not caught up {} s after the faults stopped",
                        SETTLE_MS / 1_000
                    )));
                }
            }
        }
        Ok(false)
    }

    /// A liveness violation naming who is behind.
    fn stuck(&self, what: &str) -> Violation {
        let w = self.world.borrow();
        let mut detail = what.to_owned();
        for (i, d) in w.devices.iter().enumerate() {
            if !d.ready || d.busy || !d.set_up {
                detail.push_str(&format!(
                    "; device {i}: ready {}, busy {}, set up {}",
                    d.ready, d.busy, d.set_up
                ));
            }
        }
        for (device, conversation, next, head) in w.checker.lagging().into_iter().take(8) {
            detail.push_str(&format!(
                "; device {device} at seq {next} of {conversation:?}, head {head}"
            ));
        }
        Violation::new("every device catches up", detail)
    }

    fn resumes(&self) -> u64 {
        self.world.borrow().devices.iter().map(|d| d.resumes).sum()
    }

    fn command(&mut self, device: usize, command: Command) {
        let now = self.now();
        let mut w = self.world.borrow_mut();
        w.trace
            .record(format_args!("{now} command d{device} {command:?}"));
        let slot = &mut w.devices[device];
        if let Some(tx) = &slot.commands {
            if !matches!(command, Command::Drop | Command::LoseDeliveries { .. }) {
                slot.busy = true;
                slot.last_ok = false;
            }
            let _ = tx.send(command);
        }
    }

    fn fault(&mut self, kind: &'static str, target: &str) {
        let now = self.now();
        *self.faults.entry(kind).or_default() += 1;
        self.world
            .borrow_mut()
            .trace
            .record(format_args!("{now} fault {kind} {target}"));
    }

    fn roll(&mut self, per_mille: u32) -> bool {
        self.rng.next_u32() % 1_000 < per_mille
    }

    fn pick(&mut self, n: usize) -> usize {
        (self.rng.next_u64() % n as u64) as usize
    }

    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.rng.next_u64() % (high - low + 1)
    }

    /// Devices ready and idle, in index order.
    fn idle(&self) -> Vec<usize> {
        let w = self.world.borrow();
        (0..w.devices.len())
            .filter(|&i| w.devices[i].ready && !w.devices[i].busy)
            .collect()
    }

    fn conversation_of(&self, device: usize) -> Option<ConversationId> {
        let dm = match self.options.scenario.topology() {
            Topology::TwoUsers | Topology::Room => 0,
            Topology::Pairs => device / 2,
        };
        self.dms.get(dm).and_then(|dm| dm.conversation)
    }

    fn send(&mut self, device: usize) {
        if let Some(conversation) = self.conversation_of(device) {
            self.command(device, Command::Send { conversation });
        }
    }

    /// One network fault between a device and the gateway, or a device crash, if no
    /// fault is under way.
    fn network_fault(&mut self, now: u64, per_mille: u32) {
        if !self.scheduled.is_empty() || !self.roll(per_mille) {
            return;
        }
        let device = self.pick(self.options.clients);
        let host = host_name(device);
        match self.rng.next_u32() % 4 {
            3 => {
                // The app dies mid-flight and restarts from its files.
                self.sim.crash(host.as_str());
                {
                    let mut w = self.world.borrow_mut();
                    let slot = &mut w.devices[device];
                    slot.commands = None;
                    slot.ready = false;
                    slot.busy = false;
                }
                let ms = self.between(100, 3_000);
                self.scheduled
                    .push((now + ms, Restore::StartDevice(device)));
                self.fault("client crash", &host);
            }
            0 => {
                // Shorter than the heartbeat deadline: delayed, as TCP would retransmit.
                let ms = self.between(100, HEARTBEAT_TIMEOUT_MS / 2);
                self.sim.hold(host.as_str(), GATEWAY_HOST);
                self.scheduled.push((now + ms, Restore::Release(device)));
                self.fault("short outage (hold)", &host);
            }
            1 => {
                // Longer than the deadline: both ends give up; the stale segments are
                // delivered to dead connections on release.
                let ms = self.between(HEARTBEAT_TIMEOUT_MS + 500, PARTITION_MS);
                self.sim.hold(host.as_str(), GATEWAY_HOST);
                self.scheduled.push((now + ms, Restore::Release(device)));
                self.fault("long hold", &host);
            }
            _ => {
                self.sim.partition(host.as_str(), GATEWAY_HOST);
                self.scheduled
                    .push((now + PARTITION_MS, Restore::Repair(device)));
                self.fault("partition", &host);
            }
        }
    }

    fn restore_due(&mut self, now: u64) {
        let due: Vec<Restore> = self
            .scheduled
            .iter()
            .filter(|(at, _)| *at <= now)
            .map(|(_, r)| *r)
            .collect();
        if due.is_empty() {
            return;
        }
        self.scheduled.retain(|(at, _)| *at > now);
        for restore in due {
            self.restore(restore, now);
        }
    }

    fn restore(&mut self, restore: Restore, now: u64) {
        match restore {
            Restore::Repair(d) => self.sim.repair(host_name(d).as_str(), GATEWAY_HOST),
            Restore::Release(d) => self.sim.release(host_name(d).as_str(), GATEWAY_HOST),
            Restore::StartGateway => self.sim.bounce(GATEWAY_HOST),
            Restore::StartDevice(d) => self.sim.bounce(host_name(d).as_str()),
        }
        self.world
            .borrow_mut()
            .trace
            .record(format_args!("{now} restore {restore:?}"));
    }

    /// Stops every fault: the network heals and the gateway runs; devices stop losing
    /// frames, and one last message reveals any gap a lost final frame left.
    fn heal(&mut self, now: u64) {
        if self.options.scenario == Scenario::GapRecovery {
            for i in 0..self.options.clients {
                self.command(i, Command::LoseDeliveries { n: 0 });
            }
            self.send(0);
        }
        for (_, restore) in std::mem::take(&mut self.scheduled) {
            self.restore(restore, now);
        }
        if self.gateway_cycle == GatewayCycle::Down {
            self.restore(Restore::StartGateway, now);
            self.gateway_cycle = GatewayCycle::Recovering;
        }
    }

    fn workload(&mut self, now: u64) {
        match self.options.scenario {
            Scenario::DisconnectCycles => {
                for i in self.idle() {
                    if self.roll(30) {
                        self.send(i);
                    } else if self.roll(50) {
                        self.command(i, Command::Drop);
                        self.fault("disconnect", &host_name(i));
                    }
                }
                self.network_fault(now, 5);
                self.cycles = self.resumes() - self.resumes_before;
            }
            Scenario::DuplicateSends => {
                for i in self.idle() {
                    if self.roll(20) {
                        self.send(i);
                    } else if self.roll(30) {
                        // Sent while the connection is down: the session resends it as
                        // soon as it is ready, before the resume completes.
                        self.command(i, Command::Drop);
                        self.send(i);
                        self.fault("send while disconnected", &host_name(i));
                    } else if self.scheduled.is_empty() && self.roll(15) {
                        // The send reaches the gateway; its answer is lost, and so is the
                        // connection: the session resends it after the resume.
                        self.send(i);
                        let host = host_name(i);
                        self.sim.partition_oneway(GATEWAY_HOST, host.as_str());
                        self.scheduled
                            .push((now + PARTITION_MS, Restore::Repair(i)));
                        self.fault("lost answer (one-way partition)", &host);
                    }
                }
                self.cycles = self.resumes() - self.resumes_before;
            }
            Scenario::CommitRace => {
                let all_idle = self.idle().len() == self.options.clients;
                match self.round {
                    Round::Idle if all_idle => {
                        for i in 0..self.options.clients {
                            if let Some(conversation) = self.conversation_of(i) {
                                self.command(i, Command::Update { conversation });
                            }
                        }
                        self.round = Round::Racing;
                    }
                    Round::Racing if all_idle => {
                        self.cycles += 1;
                        self.round = Round::Idle;
                        let i = self.pick(self.options.clients);
                        self.send(i);
                    }
                    _ => {}
                }
                if self.roll(20) {
                    let i = self.pick(self.options.clients);
                    self.command(i, Command::Drop);
                    self.fault("disconnect", &host_name(i));
                }
            }
            Scenario::GapRecovery => {
                for i in self.idle() {
                    if self.roll(40) {
                        self.send(i);
                    } else if self.roll(20) {
                        let n = self.between(1, 3) as u32;
                        self.command(i, Command::LoseDeliveries { n });
                        self.fault("lost live frames", &host_name(i));
                    }
                }
                self.cycles = self.world.borrow().devices.iter().map(|d| d.gaps).sum();
            }
            // Run by `crate::scrape`, never by this orchestrator.
            Scenario::PresenceScrape => {}
            Scenario::RoomChurn => self.room_workload(now),
            Scenario::RoomSoak => self.soak_workload(now),
            Scenario::HostileMember => self.hostile_workload(now),
            Scenario::MultiDeviceChurn => {
                let out = self.churning();
                for i in self.idle() {
                    if Some(i) == out {
                        continue;
                    }
                    if self.roll(30) {
                        self.send(i);
                    } else if self.roll(10) {
                        self.command(i, Command::Drop);
                        self.fault("disconnect", &host_name(i));
                    }
                }
                self.network_fault(now, 3);
                self.churn(now);
            }
            Scenario::GatewayCrash | Scenario::ReconnectStorm => {
                let per_mille = if self.options.scenario == Scenario::ReconnectStorm {
                    2
                } else {
                    40
                };
                for i in self.idle() {
                    if self.roll(per_mille) {
                        self.send(i);
                    }
                }
                self.gateway_cycle(now);
            }
        }
    }

    /// `room-soak`: one message per decision (100 a second) from a random idle member; a
    /// cycle is a simulated second.
    fn soak_workload(&mut self, now: u64) {
        let idle = self.idle();
        if !idle.is_empty() {
            let i = idle[self.pick(idle.len())];
            self.send(i);
        }
        self.cycles = (now - self.phase_since) / 1_000;
    }

    /// `hostile-member`: the last device acts as a hostile member now and then; the others
    /// send and now and then commit an update; a few network faults. A cycle is one
    /// hostile act.
    fn hostile_workload(&mut self, now: u64) {
        let Some(room) = self.conversation_of(0) else {
            return;
        };
        let hostile = self.options.clients - 1;
        let id = self.world.borrow().devices[hostile].id;
        if let Some(id) = id {
            self.world.borrow_mut().checker.hostile = Some(id);
        }
        for i in self.idle() {
            if !self.in_room(i) {
                continue;
            }
            if i == hostile {
                if self.roll(100) {
                    let draw = self.rng.next_u64();
                    self.command(
                        i,
                        Command::Hostile {
                            conversation: room,
                            draw,
                        },
                    );
                }
            } else if self.roll(30) {
                self.send(i);
            } else if self.roll(3) {
                self.command(i, Command::Update { conversation: room });
            }
        }
        self.network_fault(now, 2);
        self.cycles = self.world.borrow().devices[hostile].hostile_acts;
    }

    /// Whether `device` is in the room now, as it processed it.
    fn in_room(&self, device: usize) -> bool {
        let Some(room) = self.conversation_of(device) else {
            return false;
        };
        let w = self.world.borrow();
        w.checker.is_member(device, &room) && !w.checker.is_removed(device, &room)
    }

    /// `room-churn`: members send; everyone syncs now and then (so that the member whose
    /// turn it is commits leave requests); one member at a time goes out (leaving, or
    /// removed by the owner or the admin, often while offline) and is invited back, with
    /// a racing Commit by the other privileged member half the time; network faults and
    /// crashes throughout.
    fn room_workload(&mut self, now: u64) {
        let Some(room) = self.conversation_of(0) else {
            return;
        };
        let churned = self.room_churning();
        for i in self.idle() {
            if Some(i) == churned || !self.in_room(i) {
                continue;
            }
            if self.roll(30) {
                self.send(i);
            } else if self.roll(10) {
                self.command(i, Command::Drop);
                self.fault("disconnect", &host_name(i));
            }
        }
        if now >= self.next_sync {
            self.next_sync = now + 300;
            for i in self.idle() {
                if Some(i) != churned && self.in_room(i) {
                    self.command(i, Command::Sync);
                }
            }
        }
        self.network_fault(now, 5);
        self.room_churn(now, room);
    }

    fn room_churning(&self) -> Option<usize> {
        match self.room_churn {
            RoomChurn::Steady { .. } => None,
            RoomChurn::Leaving { target }
            | RoomChurn::Removing { target, .. }
            | RoomChurn::Out { target, .. }
            | RoomChurn::ToppingUp { target }
            | RoomChurn::Inviting { target, .. }
            | RoomChurn::Rejoining { target } => Some(target),
        }
    }

    /// The owner or the admin, whichever is idle and in the room (the owner first when
    /// both are, by the draw); the other one, to race it, if idle too.
    fn privileged(&mut self) -> Option<(usize, Option<usize>)> {
        let idle = self.idle();
        let mut both = [0, ROOM_ADMIN];
        if self.roll(500) {
            both.swap(0, 1);
        }
        let ok = |s: &Self, d: usize| idle.contains(&d) && s.in_room(d);
        let by = both.into_iter().find(|&d| ok(self, d))?;
        let other = both.into_iter().find(|&d| d != by && ok(self, d));
        Some((by, other))
    }

    /// Half the time, `other` commits an update at once: it races `by`'s Commit.
    fn race(&mut self, other: Option<usize>, room: ConversationId) {
        if let Some(other) = other {
            if self.roll(500) {
                self.command(other, Command::Update { conversation: room });
            }
        }
    }

    fn room_churn(&mut self, now: u64, room: ConversationId) {
        let Flags {
            ready, busy, ok, ..
        } = self.flags();
        let idle = |i: usize| ready[i] && !busy[i];
        match self.room_churn {
            RoomChurn::Steady { until } if now >= until => {
                let members: Vec<usize> = (ROOM_ADMIN + 1..self.options.clients)
                    .filter(|&d| self.in_room(d))
                    .collect();
                if members.is_empty() {
                    return;
                }
                // Offline members are the interesting ones to remove.
                let offline: Vec<usize> = members.iter().copied().filter(|&d| !ready[d]).collect();
                let target = if !offline.is_empty() && self.roll(600) {
                    offline[self.pick(offline.len())]
                } else {
                    members[self.pick(members.len())]
                };
                if idle(target) && self.roll(400) {
                    self.command(target, Command::LeaveRoom { room });
                    self.room_churn = RoomChurn::Leaving { target };
                } else if let Some((by, other)) = self.privileged() {
                    let user = user_key(target).public();
                    self.command(by, Command::RemoveMember { room, user });
                    self.race(other, room);
                    self.room_churn = RoomChurn::Removing { by, target };
                }
            }
            RoomChurn::Leaving { target } => {
                let room_of_target = self.conversation_of(target);
                let removed = room_of_target
                    .is_some_and(|c| self.world.borrow().checker.is_removed(target, &c));
                if removed {
                    let until = now + self.between(200, 2_000);
                    self.room_churn = RoomChurn::Out { target, until };
                } else if !busy[target] && !ok[target] {
                    // The request did not go out (the connection dropped mid-request).
                    self.room_churn = RoomChurn::Steady { until: now + 200 };
                }
            }
            RoomChurn::Removing { by, target } if !busy[by] => {
                self.room_churn = if ok[by] {
                    let until = now + self.between(200, 2_000);
                    RoomChurn::Out { target, until }
                } else {
                    RoomChurn::Steady { until: now + 200 }
                };
            }
            RoomChurn::Out { target, until } if now >= until && idle(target) => {
                // Out of the room (it may only now learn it): it needs a KeyPackage to be
                // invited back.
                self.command(target, Command::TopUp);
                self.room_churn = RoomChurn::ToppingUp { target };
            }
            RoomChurn::ToppingUp { target } if !busy[target] => {
                if let Some((by, other)) = self.privileged() {
                    let users = vec![user_key(target).public()];
                    self.command(by, Command::Invite { room, users });
                    self.race(other, room);
                    self.room_churn = RoomChurn::Inviting { by, target };
                }
            }
            RoomChurn::Inviting { by, target } if !busy[by] => {
                self.room_churn = if ok[by] {
                    RoomChurn::Rejoining { target }
                } else {
                    RoomChurn::Out {
                        target,
                        until: now + 500,
                    }
                };
            }
            RoomChurn::Rejoining { target } if self.in_room(target) => {
                self.cycles += 1;
                let until = now + self.between(200, 1_500);
                self.room_churn = RoomChurn::Steady { until };
            }
            _ => {}
        }
    }

    /// Every device's state, by index, as the churn state machines read it.
    fn flags(&self) -> Flags {
        let w = self.world.borrow();
        Flags {
            ready: w.devices.iter().map(|d| d.ready).collect(),
            busy: w.devices.iter().map(|d| d.busy).collect(),
            ok: w.devices.iter().map(|d| d.last_ok).collect(),
            ids: w.devices.iter().map(|d| d.id).collect(),
        }
    }

    /// The device being removed or added back, if any.
    fn churning(&self) -> Option<usize> {
        match self.churn {
            Churn::Steady { .. } => None,
            Churn::Removing { target, .. }
            | Churn::Out { target, .. }
            | Churn::ToppingUp { target }
            | Churn::Adding { target, .. } => Some(target),
        }
    }

    /// One step of the remove / re-add cycle.
    fn churn(&mut self, now: u64) {
        let Flags {
            ready,
            busy,
            ok,
            ids,
        } = self.flags();
        let idle = |i: usize| ready[i] && !busy[i];
        match self.churn {
            Churn::Steady { until } if now >= until => {
                // Two devices of one user: `by` removes `target` (which may be offline).
                let user = self.pick(2);
                let devices: Vec<usize> = (0..self.options.clients)
                    .filter(|i| i % 2 == user)
                    .collect();
                if devices.len() < 2 {
                    return;
                }
                let by = devices[self.pick(devices.len())];
                let target = devices[(devices.iter().position(|&d| d == by).unwrap_or(0)
                    + 1
                    + self.pick(devices.len() - 1))
                    % devices.len()];
                let Some(device) = ids[target] else { return };
                if idle(by) {
                    self.command(by, Command::RemoveDevice { device });
                    self.churn = Churn::Removing { by, target };
                }
            }
            Churn::Removing { by, target } if !busy[by] => {
                self.churn = if ok[by] {
                    let until = now + self.between(200, 2_000);
                    Churn::Out { target, until }
                } else {
                    Churn::Steady { until: now + 200 }
                };
            }
            Churn::Out { target, until } if now >= until && idle(target) => {
                // The removed device needs a KeyPackage to be added back.
                self.command(target, Command::TopUp);
                self.churn = Churn::ToppingUp { target };
            }
            Churn::ToppingUp { target } if !busy[target] => {
                let by = (0..self.options.clients)
                    .find(|&i| i != target && i % 2 == target % 2 && idle(i));
                if let (Some(by), Some(device)) = (by, ids[target]) {
                    self.command(by, Command::AddDevice { device });
                    self.churn = Churn::Adding { by, target };
                }
            }
            Churn::Adding { by, target } if !busy[by] => {
                if ok[by] {
                    self.cycles += 1;
                    let until = now + self.between(200, 1_500);
                    self.churn = Churn::Steady { until };
                } else {
                    let until = now + 500;
                    self.churn = Churn::Out { target, until };
                }
            }
            _ => {}
        }
    }

    fn gateway_cycle(&mut self, now: u64) {
        match self.gateway_cycle {
            GatewayCycle::Running { until } if now >= until => {
                let crash = self.options.scenario == Scenario::GatewayCrash && self.roll(700);
                if crash {
                    self.sim.crash(GATEWAY_HOST);
                    self.fault("gateway crash", GATEWAY_HOST);
                } else {
                    if let Some(stop) = self.world.borrow_mut().gateway.stop.take() {
                        let _ = stop.send(());
                    }
                    self.fault("gateway stop", GATEWAY_HOST);
                }
                let down = self.between(50, 2_000);
                self.scheduled.push((now + down, Restore::StartGateway));
                self.gateway_cycle = GatewayCycle::Down;
            }
            GatewayCycle::Down
                if !self
                    .scheduled
                    .iter()
                    .any(|(_, r)| *r == Restore::StartGateway) =>
            {
                self.gateway_cycle = GatewayCycle::Recovering;
            }
            GatewayCycle::Recovering => {
                let all_ready = self.world.borrow().devices.iter().all(|d| d.ready);
                if all_ready {
                    if self.phase_since < now && self.world.borrow().gateway.incarnation > 1 {
                        self.cycles += 1;
                    }
                    let up = self.between(300, 1_500);
                    self.gateway_cycle = GatewayCycle::Running { until: now + up };
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_of_processes_that_are_gone_is_removed_and_nothing_else() {
        let parent = tempfile::tempdir().expect("tempdir");
        let mine = format!("{SCRATCH_PREFIX}{}-live", std::process::id());
        // Above Linux's largest pid (2^22), so never a running process.
        let gone = format!("{SCRATCH_PREFIX}4294967295-dead");
        for name in [
            mine.as_str(),
            gone.as_str(),
            "confab-sim-nopid",
            "unrelated",
        ] {
            std::fs::create_dir_all(parent.path().join(name).join("h0")).expect("mkdir");
        }
        remove_abandoned_scratch(parent.path());
        let exists = |name: &str| parent.path().join(name).exists();
        assert!(exists(&mine) && exists("confab-sim-nopid") && exists("unrelated"));
        assert_eq!(
            exists(&gone),
            !Path::new("/proc/self").exists(),
            "removed where /proc tells which processes exist"
        );
    }
}
