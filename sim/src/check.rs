//! The protocol's invariants, checked on every observation a device reports: each
//! processed entry, each message shown, each accepted send, each new epoch.
//!
//! - **Gap-free, duplicate-free delivery:** each device processes each stream's seqs one
//!   by one from where it started (seq 1, or just after the Commit that added it).
//! - **Same order everywhere:** every device sees the same entry (msg_id, sender, kind) at
//!   a seq, and shows the same message there.
//! - **No phantom message:** every message shown was composed by its sender.
//! - **No acked message lost:** a seq the gateway gave a send holds that message on every
//!   device that reaches it, and at the end every member device reached the head.
//! - **One Commit per epoch** in each conversation's log.
//! - **Epoch agreement:** every member has the same epoch authenticator at each epoch.
//! - **No decryption failure.**
//! - **Room rules hold:** every room Commit a device processes keeps SPEC.md 10.2's rules
//!   as that device sees them (reported by the device, checked in `device::report`).
//! - **Removal is final:** a removed device processes and shows nothing of its
//!   conversation after the Commit that removed it, until a Welcome adds it back.

use std::collections::{BTreeMap, HashMap};

use confab_client::app::{EntryOutcome, EntryRecord};
use confab_spec::frame::EntryBody;
use confab_spec::ids::{ConversationId, DeviceId, MsgId, StreamId};

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The invariant, as named in the module documentation.
    pub invariant: &'static str,
    /// What was observed.
    pub detail: String,
}

impl Violation {
    pub(crate) fn new(invariant: &'static str, detail: String) -> Self {
        Self { invariant, detail }
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.invariant, self.detail)
    }
}

/// One seq of a conversation's log, as the first device to process it saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Canon {
    msg_id: MsgId,
    sender: DeviceId,
    kind: EntryBody,
}

#[derive(Debug, Default)]
struct Log {
    entries: BTreeMap<u64, Canon>,
    /// The message shown at a seq.
    bodies: BTreeMap<u64, Vec<u8>>,
    /// The message the gateway accepted at a seq.
    accepted: BTreeMap<u64, Vec<u8>>,
    /// Epochs a Commit was sequenced in, and at which seq.
    commits: BTreeMap<u64, u64>,
}

/// The invariant checker: feed it observations; it answers the first violation.
#[derive(Debug, Default)]
pub struct Checker {
    logs: BTreeMap<ConversationId, Log>,
    /// The next seq each (device, stream) must process.
    positions: BTreeMap<(usize, StreamId), u64>,
    /// Every message composed, and by whom.
    composed: HashMap<Vec<u8>, DeviceId>,
    authenticators: HashMap<(ConversationId, u64), Vec<u8>>,
    /// The epoch each (device, conversation) joined at from a Welcome.
    joined_at: HashMap<(usize, ConversationId), u64>,
    /// The seq of the Commit that removed a device, while it is out.
    removed_at: HashMap<(usize, ConversationId), u64>,
    /// Application messages of epochs before a device joined, which it cannot read (MLS
    /// gives a joiner no earlier secrets; the gateway keeps them deliverable, REQ-7.2-3).
    pub unreadable_before_join: u64,
    /// Invariant checks made.
    pub checks: u64,
    /// Entries processed by devices (new ones).
    pub processed: u64,
    /// Messages shown by devices.
    pub shown: u64,
    /// Sends the gateway accepted.
    pub accepted: u64,
    /// The hostile member of the `hostile-member` scenario: what it sends may be
    /// unreadable to every member (garbage under a valid header), and is exempt from "no
    /// decryption failure".
    pub hostile: Option<DeviceId>,
    /// Entries of the hostile member that devices could not read.
    pub unreadable_hostile: u64,
}

fn ensure(
    ok: bool,
    invariant: &'static str,
    detail: impl FnOnce() -> String,
) -> Result<(), Violation> {
    if ok {
        Ok(())
    } else {
        Err(Violation::new(invariant, detail()))
    }
}

impl Checker {
    /// Device `device` processed `record`.
    pub fn entry(&mut self, device: usize, record: &EntryRecord) -> Result<(), Violation> {
        let seq = record.seq.get();
        let key = (device, record.stream);
        if record.new {
            self.processed += 1;
            self.checks += 1;
            let expected = *self.positions.get(&key).unwrap_or(&1);
            ensure(seq == expected, "gap-free, duplicate-free delivery", || {
                format!(
                    "device {device} processed seq {seq} of {:?} where seq {expected} was next",
                    record.stream
                )
            })?;
            self.positions.insert(key, seq + 1);
            if let StreamId::Conversation(conversation) = record.stream {
                if let Some(&removed) = self.removed_at.get(&(device, conversation)) {
                    self.checks += 1;
                    ensure(seq <= removed, "removal is final", || {
                        format!(
                            "device {device} processed seq {seq} of {conversation:?}, after the Commit at seq {removed} removed it"
                        )
                    })?;
                }
            }
        }
        if let EntryBody::Welcome {
            conversation,
            commit_seq,
        } = record.kind
        {
            if record.outcome == EntryOutcome::Applied {
                // The device's conversation log starts after the Commit that added it.
                self.positions.insert(
                    (device, StreamId::Conversation(conversation)),
                    commit_seq.get() + 1,
                );
                self.removed_at.remove(&(device, conversation));
                if let Some(epoch) = record.epoch_after {
                    self.joined_at.insert((device, conversation), epoch);
                }
            }
        }
        let StreamId::Conversation(conversation) = record.stream else {
            return Ok(());
        };
        if record.outcome == EntryOutcome::Removed {
            self.removed_at.insert((device, conversation), seq);
        }
        self.checks += 2;
        ensure(record.outcome != EntryOutcome::Forked, "no fork", || {
            format!(
                "device {device} could not apply the Commit at seq {seq} of conversation {conversation:?}"
            )
        })?;
        if record.outcome == EntryOutcome::Undecryptable && Some(record.sender) == self.hostile {
            self.unreadable_hostile += 1;
        } else if record.outcome == EntryOutcome::Undecryptable {
            let before_join = match (record.kind, self.joined_at.get(&(device, conversation))) {
                (EntryBody::Application { epoch }, Some(&joined)) => epoch.0 < joined,
                _ => false,
            };
            ensure(before_join, "no decryption failure", || {
                format!(
                    "device {device} could not decrypt seq {seq} of conversation {conversation:?}"
                )
            })?;
            self.unreadable_before_join += 1;
        }
        let canon = Canon {
            msg_id: record.msg_id,
            sender: record.sender,
            kind: record.kind,
        };
        let log = self.logs.entry(conversation).or_default();
        self.checks += 1;
        match log.entries.get(&seq) {
            Some(first) => ensure(*first == canon, "same order on every device", || {
                format!(
                    "device {device} has {canon:?} at seq {seq} of {conversation:?}, another device had {first:?}"
                )
            }),
            None => {
                if let EntryBody::Commit { epoch } = canon.kind {
                    self.checks += 1;
                    if let Some(other) = log.commits.insert(epoch.0, seq) {
                        return Err(Violation::new(
                            "one Commit per epoch",
                            format!(
                                "conversation {conversation:?} sequenced Commits for epoch {} at seqs {other} and {seq}",
                                epoch.0
                            ),
                        ));
                    }
                }
                log.entries.insert(seq, canon);
                Ok(())
            }
        }
    }

    /// `sender` composed `body` (before any frame carrying it left the device).
    pub fn composed(&mut self, sender: DeviceId, body: Vec<u8>) {
        self.composed.insert(body, sender);
    }

    /// Device `device` showed `body` at `seq` of `conversation`, sent by `sender`.
    pub fn shown(
        &mut self,
        device: usize,
        conversation: ConversationId,
        seq: u64,
        sender: DeviceId,
        body: &[u8],
    ) -> Result<(), Violation> {
        self.shown += 1;
        self.checks += 2;
        if let Some(&removed) = self.removed_at.get(&(device, conversation)) {
            ensure(seq <= removed, "removal is final", || {
                format!(
                    "device {device} shows seq {seq} of {conversation:?}, after the Commit at seq {removed} removed it"
                )
            })?;
        }
        let composer = self.composed.get(body).copied();
        ensure(composer == Some(sender), "no phantom message", || {
            format!(
                "device {device} shows a message at seq {seq} of {conversation:?} from {sender:?} that {}",
                match composer {
                    Some(c) => format!("{c:?} composed"),
                    None => "nobody composed".to_owned(),
                }
            )
        })?;
        let log = self.logs.entry(conversation).or_default();
        if let Some(accepted) = log.accepted.get(&seq) {
            self.checks += 1;
            ensure(accepted == body, "no acked message lost", || {
                format!(
                    "device {device} shows another message at seq {seq} of {conversation:?} than the one the gateway accepted there"
                )
            })?;
        }
        match log.bodies.get(&seq) {
            Some(first) => ensure(first == body, "same order on every device", || {
                format!(
                    "device {device} shows another message at seq {seq} of {conversation:?} than another device"
                )
            }),
            None => {
                log.bodies.insert(seq, body.to_vec());
                Ok(())
            }
        }
    }

    /// The gateway accepted `body` in `conversation` at `seq`.
    pub fn accepted(
        &mut self,
        conversation: ConversationId,
        seq: u64,
        body: &[u8],
    ) -> Result<(), Violation> {
        self.accepted += 1;
        self.checks += 2;
        let log = self.logs.entry(conversation).or_default();
        if let Some(shown) = log.bodies.get(&seq) {
            ensure(shown == body, "no acked message lost", || {
                format!(
                    "seq {seq} of {conversation:?} was given to one send and shows another message"
                )
            })?;
        }
        match log.accepted.insert(seq, body.to_vec()) {
            Some(other) if other != body => Err(Violation::new(
                "no acked message lost",
                format!("seq {seq} of {conversation:?} was given to two different sends"),
            )),
            _ => Ok(()),
        }
    }

    /// Device `device` reached `epoch` of `conversation` with `authenticator`.
    pub fn epoch(
        &mut self,
        device: usize,
        conversation: ConversationId,
        epoch: u64,
        authenticator: Vec<u8>,
    ) -> Result<(), Violation> {
        self.checks += 1;
        match self.authenticators.get(&(conversation, epoch)) {
            Some(first) => ensure(*first == authenticator, "epoch agreement", || {
                format!(
                    "device {device} has another epoch authenticator at epoch {epoch} of {conversation:?} than another member"
                )
            }),
            None => {
                self.authenticators
                    .insert((conversation, epoch), authenticator);
                Ok(())
            }
        }
    }

    /// The devices that do not yet have every entry of the conversations they are in:
    /// `(device, conversation, next seq, head)`. Empty once everyone caught up.
    pub fn lagging(&self) -> Vec<(usize, ConversationId, u64, u64)> {
        let mut lagging = Vec::new();
        for (&(device, stream), &next) in &self.positions {
            let StreamId::Conversation(conversation) = stream else {
                continue;
            };
            let mut head = self.head(&conversation);
            if let Some(&removed) = self.removed_at.get(&(device, conversation)) {
                // A removed device reads up to the Commit that removed it (REQ-7.6-2).
                head = head.min(removed);
            }
            if next <= head {
                lagging.push((device, conversation, next, head));
            }
        }
        lagging
    }

    /// The highest seq of `conversation` anyone saw or was given.
    pub fn head(&self, conversation: &ConversationId) -> u64 {
        self.logs.get(conversation).map_or(0, |log| {
            let seen = log.entries.keys().next_back().copied().unwrap_or(0);
            let given = log.accepted.keys().next_back().copied().unwrap_or(0);
            seen.max(given)
        })
    }

    /// Checks, once everyone caught up, that every accepted message is in the log and
    /// was shown where the gateway put it.
    pub fn final_check(&mut self) -> Result<(), Violation> {
        for (conversation, log) in &self.logs {
            for (seq, body) in &log.accepted {
                self.checks += 1;
                ensure(
                    log.bodies.get(seq) == Some(body),
                    "no acked message lost",
                    || {
                        format!(
                            "the message accepted at seq {seq} of {conversation:?} was never shown"
                        )
                    },
                )?;
            }
        }
        Ok(())
    }

    /// Whether `device` processed the Commit that removed it from `conversation` (and was
    /// not added again since).
    pub fn is_removed(&self, device: usize, conversation: &ConversationId) -> bool {
        self.removed_at.contains_key(&(device, *conversation))
    }

    /// Whether `device` processed entries of `conversation` or joined it.
    pub fn is_member(&self, device: usize, conversation: &ConversationId) -> bool {
        self.positions
            .contains_key(&(device, StreamId::Conversation(*conversation)))
    }
}
