//! The scenarios `confab-sim list` shows: what each one stresses, what a cycle is, and the
//! defaults CI runs.

use confab_client::app::receive_batch::ReceiveBatchLimits;
use confab_client::mls::unwritten::StateWriteWindow;

/// A named workload and fault schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scenario {
    /// Devices' connections are dropped over and over (with partitions and holds mixed
    /// in) while they send; each resume is a cycle.
    DisconnectCycles,
    /// Hundreds of devices in DM pairs reconnect at once after a gateway bounce; each
    /// bounce after which every device is back is a cycle.
    ReconnectStorm,
    /// Devices send while disconnected and lose the gateway's answers, so the session
    /// resends before and after the resume completes; each resume is a cycle.
    DuplicateSends,
    /// Every member commits in the same epoch at once; each round is a cycle.
    CommitRace,
    /// The gateway process crashes (memory lost, store kept) or stops, and comes back;
    /// each restart after which every device is back is a cycle.
    GatewayCrash,
    /// Devices lose live frames (as behind a faulty intermediary) and must find the gap
    /// and replay; each gap found and repaired is a cycle.
    GapRecovery,
    /// Two users with two devices each: a device removes its sibling from the DM and adds
    /// it back, under disconnects, partitions and crashes; each remove and re-add is a
    /// cycle.
    MultiDeviceChurn,
    /// Bots with rotating identities try large watchlists, watchlist churn and probing
    /// while normal users watch their contacts (SPEC.md 9); a cycle is one simulated
    /// minute. `--clients` is the number of normal users.
    PresenceScrape,
    /// One user per device in one room (SPEC.md 10): members leave and are invited back,
    /// the owner and the admin remove members (often offline at the time) and invite them
    /// back, their Commits race; devices drop, crash and are partitioned meanwhile. A
    /// cycle is one member out and back in.
    RoomChurn,
    /// Phase 4's exit test: one room of `--clients` members (1,000 by default) on one
    /// device each, 100 messages a second from random members, no faults; every message
    /// reaches every member, in order, decrypted, and every member agrees on every epoch.
    /// A cycle is one simulated second (the default is one hour).
    RoomSoak,
    /// One room in which the last device is a hostile member: throughout the room's life
    /// it sends garbage, garbage under a valid header, unsigned and forged Commits, and
    /// replays of its own old Commits, while the others talk and commit (SPEC.md 7.7). The
    /// gateway must refuse every forged handshake; honest members never stop, agree on
    /// every epoch and lose nothing an honest member sent. A cycle is one hostile act.
    HostileMember,
}

/// How the devices are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// Two users; device `i` belongs to user `i % 2`; device 0 creates one DM holding
    /// every device.
    TwoUsers,
    /// One user per device; device `2k` creates a DM with device `2k + 1`.
    Pairs,
    /// One user per device, all in one room that device 0 creates and owns; device 1 is
    /// an admin.
    Room,
}

impl Scenario {
    /// Every scenario, in `list` order.
    pub const ALL: [Scenario; 11] = [
        Scenario::DisconnectCycles,
        Scenario::ReconnectStorm,
        Scenario::DuplicateSends,
        Scenario::CommitRace,
        Scenario::GatewayCrash,
        Scenario::GapRecovery,
        Scenario::MultiDeviceChurn,
        Scenario::PresenceScrape,
        Scenario::RoomChurn,
        Scenario::RoomSoak,
        Scenario::HostileMember,
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::DisconnectCycles => "disconnect-cycles",
            Scenario::ReconnectStorm => "reconnect-storm",
            Scenario::DuplicateSends => "duplicate-sends",
            Scenario::CommitRace => "commit-race",
            Scenario::GatewayCrash => "gateway-crash",
            Scenario::GapRecovery => "gap-recovery",
            Scenario::MultiDeviceChurn => "multi-device-churn",
            Scenario::PresenceScrape => "presence-scrape",
            Scenario::RoomChurn => "room-churn",
            Scenario::RoomSoak => "room-soak",
            Scenario::HostileMember => "hostile-member",
        }
    }

    /// The scenario called `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// One line on what it does.
    pub fn description(self) -> &'static str {
        match self {
            Scenario::DisconnectCycles => {
                "forced disconnects, partitions and holds while sending; cycle = one resume"
            }
            Scenario::ReconnectStorm => {
                "every device reconnects at once after a gateway bounce; cycle = one bounce"
            }
            Scenario::DuplicateSends => {
                "sends while disconnected and lost acks, resent before and after resume; cycle = one resume"
            }
            Scenario::CommitRace => "every member commits in the same epoch; cycle = one round",
            Scenario::GatewayCrash => {
                "gateway crash (memory lost, store kept) or stop, and restart; cycle = one restart"
            }
            Scenario::GapRecovery => {
                "devices lose live frames and must find the gap and replay; cycle = one gap repaired"
            }
            Scenario::MultiDeviceChurn => {
                "2 users x 2 devices: remove a device and add it back under faults; cycle = one remove and re-add"
            }
            Scenario::PresenceScrape => {
                "bots scrape presence (rotating identities, big watchlists, churn, probing) while users watch contacts; cycle = one simulated minute"
            }
            Scenario::RoomChurn => {
                "a room: leaves, removals of offline members, re-invites, racing Commits, under faults; cycle = one member out and back"
            }
            Scenario::RoomSoak => {
                "a 1,000-member room at 100 messages a second, everything delivered and decrypted everywhere; cycle = one simulated second"
            }
            Scenario::HostileMember => {
                "a room member sends garbage, forged and replayed handshakes; the gateway refuses them, honest members agree and lose nothing; cycle = one hostile act"
            }
        }
    }

    /// Cycles run by default (CI runs these).
    pub fn default_cycles(self) -> u64 {
        match self {
            Scenario::DisconnectCycles => 10_000,
            Scenario::ReconnectStorm => 3,
            Scenario::DuplicateSends => 300,
            Scenario::CommitRace => 40,
            Scenario::GatewayCrash => 30,
            Scenario::GapRecovery => 200,
            Scenario::MultiDeviceChurn => 20,
            Scenario::PresenceScrape => 10,
            Scenario::RoomChurn => 30,
            Scenario::RoomSoak => 3_600,
            Scenario::HostileMember => 200,
        }
    }

    /// Devices by default.
    pub fn default_clients(self) -> usize {
        match self {
            Scenario::ReconnectStorm => 200,
            Scenario::PresenceScrape => 8,
            Scenario::RoomChurn => 6,
            Scenario::RoomSoak => 1_000,
            Scenario::HostileMember => 5,
            _ => 4,
        }
    }

    /// The simulation's time step in milliseconds. Each step runs every host, so with
    /// hundreds of hosts a coarser step keeps the run short; message latencies (1 to 10 ms)
    /// are then rounded to it.
    pub fn tick_ms(self) -> u64 {
        match self {
            Scenario::ReconnectStorm => 5,
            Scenario::RoomSoak => 10,
            _ => 1,
        }
    }

    /// Devices that share one simulated host (one network address). turmoil delivers
    /// messages by scanning every link for every host at every step, so a step costs
    /// hosts × links: with 1,000 hosts that scan was 95% of a run. Scenarios that fault
    /// single devices (crashes, partitions, bounces) need a host per device; the soak has
    /// no faults.
    pub fn devices_per_host(self) -> usize {
        match self {
            Scenario::RoomSoak => 25,
            _ => 1,
        }
    }

    /// When its clients' receive batches end. The soak's members read 100 messages a
    /// second: a batch of up to a second records them in one transaction of the client's
    /// store and acknowledges them with one Ack, and a member shows a message up to a
    /// second after it arrives. (Before the state-write window, each batch's end also
    /// wrote the member's MLS state, which in a room of 1,000 costs milliseconds: 16.9 s
    /// of wall time per simulated second with one-second batches, 10.2 s with five-second
    /// ones; with the window, one and five seconds both cost about 7.2 s.) Other scenarios
    /// keep the client's default, as the CLI runs it.
    pub fn receive_batch_limits(self) -> ReceiveBatchLimits {
        match self {
            Scenario::RoomSoak => ReceiveBatchLimits {
                entries: 512,
                window_ms: 1_000,
            },
            _ => ReceiveBatchLimits::default(),
        }
    }

    /// How long its clients' receive batches may leave the MLS state they advanced
    /// unwritten ([`confab_client::mls::unwritten`]). The soak's members write it once a
    /// minute instead of at every batch's end: each batch still records, shows and
    /// acknowledges its messages, and any send writes it at once. `room-churn` writes it
    /// every five seconds, so that its crashes also land on unwritten state (the crash
    /// goes back to the state last written, and nothing may be lost or shown twice). The
    /// other scenarios write it at every batch's end, as the CLI does.
    pub fn state_write_window(self) -> StateWriteWindow {
        match self {
            Scenario::RoomSoak => StateWriteWindow { ms: 60_000 },
            Scenario::RoomChurn => StateWriteWindow { ms: 5_000 },
            _ => StateWriteWindow::default(),
        }
    }

    /// Whether its devices check each signature once between them
    /// ([`confab_client::mls::signature_memo`]): each of the soak's 1,000 members checks
    /// the same signature of every message, and at ~50 µs each that alone was 5 s of wall
    /// time per simulated second. The answer is the same (verification is a pure function
    /// and the memo is keyed by all of its input); the other scenarios check every
    /// signature on every device.
    pub fn shares_signature_checks(self) -> bool {
        matches!(self, Scenario::RoomSoak)
    }

    /// Messages each client keeps per conversation (`None`: all). The soak's members
    /// receive 100 messages a second: kept whole, 1,000 members' stores grow by 110 MB a
    /// simulated second (the files are in RAM). The simulator checks deliveries as the
    /// clients report them, not by reading their stores.
    pub fn keep_messages(self) -> Option<std::num::NonZeroU32> {
        match self {
            Scenario::RoomSoak => std::num::NonZeroU32::new(100),
            _ => None,
        }
    }

    /// Whether its devices hand their synchronous work (decrypting, recording and
    /// acknowledging what they receive) to worker threads ([`crate::workers`]): the soak's
    /// 1,000 members receiving 100 messages a second keep one core busy with little else.
    /// Each hand-over delays the device [`Scenario::hand_over_ms`]; the run does not depend on
    /// the number of workers.
    pub fn offloads_work(self) -> bool {
        matches!(self, Scenario::RoomSoak)
    }

    /// The simulated time a device sleeps after handing a received batch's work to a
    /// worker, before it takes the result ([`crate::workers::Workers::sleep`]). The soak's is 30 steps: its
    /// members then take about 30 entries per job instead of one or two, and the workers
    /// are done before the device needs its client back. Measured on 2 cores (seed 1, 40
    /// simulated seconds, 2 workers): 2.96 s of wall time per simulated second at 1.5
    /// steps, 2.27 at 5, 1.91 at 15, 1.55 at 30 (sends then slept as long; they now sleep
    /// 1.5 steps, [`crate::workers::Workers::send_sleep`]).
    pub fn hand_over_ms(self) -> u64 {
        match self {
            Scenario::RoomSoak => 300,
            _ => (self.tick_ms() * 3).div_ceil(2),
        }
    }

    /// How its devices are grouped.
    pub fn topology(self) -> Topology {
        match self {
            Scenario::ReconnectStorm => Topology::Pairs,
            Scenario::RoomChurn | Scenario::RoomSoak | Scenario::HostileMember => Topology::Room,
            _ => Topology::TwoUsers,
        }
    }
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
