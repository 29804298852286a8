//! State shared by the simulated hosts and the orchestrator: each device's slot (its
//! command queue and what it reports), the gateway's incarnation, the invariant checker,
//! and the trace digest. Hosts run on one thread inside turmoil, so it is an
//! `Rc<RefCell<World>>`, borrowed briefly and never across an `await`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use confab_spec::ids::{ConversationId, DeviceId, SystemKey};
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::check::{Checker, Violation};

/// Shared world.
pub type Shared = Rc<RefCell<World>>;

/// What the orchestrator asks a device to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Create a DM with every device of `peer` and this user's other devices.
    CreateDm {
        /// The other user.
        peer: SystemKey,
    },
    /// Create a room (SPEC.md 10) owned by this device's user.
    CreateRoom,
    /// Invite these users to `room`, one Commit each.
    Invite {
        /// The room.
        room: ConversationId,
        /// The users.
        users: Vec<SystemKey>,
    },
    /// Remove every device of `user` from `room`.
    RemoveMember {
        /// The room.
        room: ConversationId,
        /// The user.
        user: SystemKey,
    },
    /// Give `user` the role `role` in `room`.
    SetRole {
        /// The room.
        room: ConversationId,
        /// The user.
        user: SystemKey,
        /// The role.
        role: confab_spec::rooms::Role,
    },
    /// Ask to leave `room` (Remove proposals of this user's devices).
    LeaveRoom {
        /// The room.
        room: ConversationId,
    },
    /// Catch up, and commit the leave requests this device is the one to commit.
    Sync,
    /// Send a fresh message to `conversation`.
    Send {
        /// Where.
        conversation: ConversationId,
    },
    /// Commit an update in `conversation` (commit races).
    Update {
        /// Where.
        conversation: ConversationId,
    },
    /// Drop the connection abruptly; the session reconnects and resumes.
    Drop,
    /// Remove another device of this user from every conversation.
    RemoveDevice {
        /// The device.
        device: DeviceId,
    },
    /// Add another device of this user to every conversation.
    AddDevice {
        /// The device.
        device: DeviceId,
    },
    /// Top the KeyPackage pool up.
    TopUp,
    /// Drop the next live `Deliver` frames that arrive (a faulty intermediary).
    LoseDeliveries {
        /// How many.
        n: u32,
    },
    /// Act as a hostile member of `conversation` once: the act is drawn from `draw`
    /// ([`crate::hostile`]).
    Hostile {
        /// Where.
        conversation: ConversationId,
        /// The orchestrator's random draw (the run stays one seed's).
        draw: u64,
    },
}

/// One device as the world sees it.
#[derive(Debug, Default)]
pub struct DeviceSlot {
    /// Its identity.
    pub id: Option<DeviceId>,
    /// Commands for its current incarnation (`None` while crashed).
    pub commands: Option<mpsc::UnboundedSender<Command>>,
    /// Connected and authenticated.
    pub ready: bool,
    /// Running a command.
    pub busy: bool,
    /// Its client is on a worker ([`crate::workers`]): what it records meanwhile is
    /// reported once it is back, never at a moment that depends on the worker's speed.
    pub handed_over: bool,
    /// Its KeyPackages are uploaded.
    pub set_up: bool,
    /// Starts of its software (1 + crashes).
    pub incarnation: u32,
    /// It was ready at least once.
    pub connected_once: bool,
    /// Conversations it created.
    pub created: Vec<ConversationId>,
    /// Times it went from not ready to ready after its first connect.
    pub resumes: u64,
    /// Messages it composed.
    pub composed: u64,
    /// Commits it made (updates).
    pub commits: u64,
    /// Commit races it lost and retried.
    pub lost_races: u64,
    /// Conversations it created or joined, with the last epoch it reported.
    pub epochs: BTreeMap<ConversationId, u64>,
    /// Whether its last command did what it asked.
    pub last_ok: bool,
    /// Gaps its session found and repaired by replay.
    pub gaps: u64,
    /// Sends and updates refused for a reason the scenario allows.
    pub refused: u64,
    /// Hostile acts done.
    pub hostile_acts: u64,
    /// Hostile acts the gateway refused, as it must.
    pub hostile_refused: u64,
    /// The hostile member's own Commits, by epoch, made and discarded to replay later.
    pub hostile_stash: Vec<(u64, Vec<u8>)>,
}

/// The gateway as the world sees it.
#[derive(Debug, Default)]
pub struct GatewaySlot {
    /// Starts of its software.
    pub incarnation: u32,
    /// Ends the current incarnation gracefully (closing sessions with 4000).
    pub stop: Option<oneshot::Sender<()>>,
}

/// Everything shared.
#[derive(Debug, Default)]
pub struct World {
    /// The devices, by index.
    pub devices: Vec<DeviceSlot>,
    /// The gateway.
    pub gateway: GatewaySlot,
    /// The invariant checker.
    pub checker: Checker,
    /// The first violation; the run stops on it.
    pub violation: Option<Violation>,
    /// Conversations created, in order.
    pub conversations: Vec<ConversationId>,
    /// The protocol-level trace.
    pub trace: Trace,
}

impl World {
    /// A world of `devices` devices.
    pub fn new(devices: usize) -> Shared {
        let mut world = World::default();
        world.devices.resize_with(devices, DeviceSlot::default);
        Rc::new(RefCell::new(world))
    }

    /// Records `result`'s violation, keeping the first.
    pub fn check(&mut self, result: Result<(), Violation>) {
        if let Err(v) = result {
            self.violation.get_or_insert(v);
        }
    }
}

impl Default for Trace {
    fn default() -> Self {
        Self {
            hasher: Sha256::default(),
            echo: std::env::var_os("CONFAB_SIM_TRACE").is_some(),
            events: 0,
        }
    }
}

impl std::fmt::Debug for Trace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trace")
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

/// A digest of the protocol-level events of a run (seqs, msg_ids, epochs, fault times);
/// two runs of one seed must produce the same digest.
#[derive(Clone)]
pub struct Trace {
    hasher: Sha256,
    /// Print every event to stderr (`CONFAB_SIM_TRACE=1`), to read what led to a failure.
    echo: bool,
    /// Events recorded.
    pub events: u64,
}

impl Trace {
    /// Adds one event line.
    pub fn record(&mut self, line: std::fmt::Arguments<'_>) {
        self.events += 1;
        if self.echo {
            let line = line.to_string();
            eprintln!("trace: {line}");
            self.hasher.update(line.as_bytes());
        } else {
            // Formatted straight into the hash (a soak records 100,000 lines a simulated
            // second): the same bytes as the line, without building it.
            let _ = std::io::Write::write_fmt(&mut self.hasher, line);
        }
        self.hasher.update(b"\n");
    }

    /// The digest so far, in hex.
    pub fn digest(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(echo: bool) -> Trace {
        Trace {
            hasher: Sha256::new(),
            echo,
            events: 0,
        }
    }

    #[test]
    fn a_line_hashed_as_formatted_is_the_line_hashed_whole() {
        let (mut direct, mut echoed) = (trace(false), trace(true));
        for n in 0..3u64 {
            let id = [n as u8; 4];
            direct.record(format_args!("{n} d{n} {id:?} {}", hex::encode(id)));
            echoed.record(format_args!("{n} d{n} {id:?} {}", hex::encode(id)));
        }
        let mut whole = Sha256::new();
        whole.update(b"0 d0 [0, 0, 0, 0] 00000000\n1 d1 [1, 1, 1, 1] 01010101\n");
        whole.update(b"2 d2 [2, 2, 2, 2] 02020202\n");
        assert_eq!(direct.digest(), hex::encode(whole.finalize()));
        assert_eq!(direct.digest(), echoed.digest());
        assert_eq!(direct.events, 3);
    }
}
