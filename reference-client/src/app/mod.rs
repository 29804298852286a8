//! The client application: one device's [`Transport`] (session + WebSocket), MLS engine and
//! local [`ClientStore`], tied together. Every `async` method pumps the transport while it
//! waits, so incoming entries are processed whenever the application waits for anything.
//!
//! What it does: keep the KeyPackage pool topped up (rotating a used last-resort package),
//! create a DM (claim, create the group, add, send the Commit with its Welcome, apply the
//! Commit when the gateway accepts it), commit updates with retries after a lost race,
//! send text through the outbox, and receive: join from Welcomes in the inbox, decrypt or
//! apply conversation entries, record them with the cursor in one transaction, then
//! acknowledge (SPEC.md REQ-6.5-3).
//!
//! Multi-device: a DM holds every device of both users (the creator claims its own other
//! devices too); [`Client::add_device`] adds a new device of the user to every
//! conversation, [`Client::remove_device`] removes one, [`Client::revoke_device`] revokes
//! it at the gateway and removes it. A removed device that is added again rejoins from
//! the new Welcome and continues after the Commit that re-added it.
//!
//! Large rooms: application messages are received in batches
//! ([`receive_batch`]): decrypted one by one, the MLS state written and the entries
//! acknowledged once per batch.
//!
//! Crash safety: an application message's plaintext is journaled by the engine no later
//! than the state that consumed its key, and released once the store recorded it
//! ([`crate::mls::journal`]); a Welcome's join is recorded with the conversation's cursor
//! in one transaction, and a join the store missed is recognised by the group being there.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use confab_spec::error::ErrorCode;
use confab_spec::frame::{
    ClaimKeyPackages, ClaimedKeyPackage, ClientFrame, ConversationKind, DeviceStatus, Entry,
    EntryBody, GetGroupInfo, KeyPackagesStored, ListDevices, PresenceLease, PresenceLists,
    PresenceMode, PresenceOf, PresenceState, RevokeDevice, ServerFrame, SetPresence,
    UpdatePresenceLists, UploadKeyPackages, WatchPresence,
};
use confab_spec::identity::Revocation;
use confab_spec::ids::{
    ConversationId, DeviceId, Epoch, MlsBytes, MsgId, Seq, StreamId, SystemKey, UnixMs,
};
use confab_spec::limits;
use confab_spec::mls_framing::{self, CommitProposal};
use confab_spec::session::{Event, Input, SessionError};

use crate::faults::Faults;
use crate::mls::{CommitOutput, EngineError, MlsEngine, Processed};
use crate::presence::{LEASE_TTL_MS, Tracker};
use crate::store::{
    ClientStore, ConversationRecord, InvitationRequest, Message, OutboxItem, StoreError,
};
use crate::transport::Transport;

pub mod receive_batch;
mod requests;
mod rooms;
mod verify;
pub use verify::DeviceChanges;

pub use rooms::{INVITES_PER_COMMIT, InviteReport, RoomMember};

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The MLS engine failed.
    #[error("MLS: {0}")]
    Engine(#[from] EngineError),
    /// The local database failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The session refused the input (for example, not connected yet).
    #[error("session: {0}")]
    Session(#[from] SessionError),
    /// The gateway refused the request.
    #[error("the gateway refused the request: {0:?}")]
    Refused(ErrorCode),
    /// The gateway limits how often this is done; try again after `retry_after_ms`.
    #[error("rate limited by the gateway: try again in {} s", retry_after_ms.div_ceil(1000))]
    RateLimited {
        /// How long to wait.
        retry_after_ms: u64,
    },
    /// The device is not one of this user's.
    #[error("that device belongs to another user")]
    NotOwnDevice,
    /// An operation on this device itself that another device must do.
    #[error("this is the device you are using: do it from another of your devices")]
    ThisDevice,
    /// The gateway refused a send.
    #[error("the gateway refused the message: {code:?}")]
    SendRefused {
        /// Why.
        code: ErrorCode,
        /// For `stale_commit`: the current epoch.
        epoch: Option<Epoch>,
        /// For `stale_commit`: the seq of the Commit that opened it.
        seq: Option<Seq>,
    },
    /// The peer has no device with a KeyPackage.
    #[error("the user has no KeyPackages: none of their devices can be added now")]
    NoKeyPackages,
    /// The gateway could not be reached (connection attempts failed before any `Ready`).
    #[error("cannot reach the gateway after {0} attempts")]
    Unreachable(u32),
    /// The gateway refused this device for good (revoked or expired certificate, ...);
    /// the session does not reconnect.
    #[error("the gateway refused this device: {}", .0.map_or("closed for good", |c| c.name()))]
    Stopped(Option<ErrorCode>),
    /// The connection dropped after the request was sent and before the gateway answered;
    /// it may or may not have been carried out. Try again.
    #[error("the connection dropped before the gateway answered; try again")]
    Interrupted,
    /// The gateway answered with something else than the request calls for.
    #[error("unexpected answer from the gateway")]
    Unexpected,
    /// Another room already has this name on this device.
    #[error("a room is already called {0:?}")]
    NameTaken(String),
    /// The conversation is not a room.
    #[error("that conversation is not a room")]
    NotARoom,
    /// This device, or the user named, is not in the room.
    #[error("not in that room")]
    NotInRoom,
    /// This device asked to leave the room; it makes no more changes there.
    #[error("you are leaving that room")]
    Leaving,
    /// A Commit the gateway accepted at `seq` could not be applied here: the conversation
    /// has forked, and nothing more is sent into it until it is recovered.
    #[error("this conversation forked at [{}] ({reason}): sending into it is stopped until it is recovered", seq.get())]
    Forked {
        /// The seq of the Commit this device could not apply.
        seq: Seq,
        /// Why it could not.
        reason: String,
    },
    /// No invitation request for that conversation is held.
    #[error("no invitation request for that conversation")]
    NoSuchRequest,
    /// The invitation can no longer be used (its Welcome does not open here, or the
    /// conversation was joined otherwise); it was dropped.
    #[error("that invitation can no longer be used ({0}); it was dropped")]
    StaleRequest(String),
}

/// Why an entry could not be read, for the user: short, without any of its bytes.
pub fn unreadable_reason(e: &EngineError) -> String {
    match e {
        EngineError::WrongEpoch(_) => "sent in a group epoch this device does not have".into(),
        EngineError::SecretReused(_) => {
            "its key was already used (a replay, or a sender restored from an old copy)".into()
        }
        EngineError::UnknownMember(_) => "its sender is not a member".into(),
        EngineError::InvalidCertificate(_) => "its sender's certificate is not valid".into(),
        EngineError::Malformed(_) => "malformed, or a bad signature".into(),
        EngineError::GroupNotFound => "this device is not in the group".into(),
        EngineError::Removed => "this device was removed from the group".into(),
        other => {
            let text = other.to_string();
            text.chars().take(120).collect()
        }
    }
}

/// What the KeyPackage pool looks like after [`Client::top_up_key_packages`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolReport {
    /// Packages in the pool now.
    pub pool_count: u64,
    /// Packages uploaded by this call.
    pub uploaded: u64,
    /// Whether the last-resort package was replaced (it was used, or missing).
    pub last_resort_rotated: bool,
}

/// One device's client.
pub struct Client {
    transport: Transport,
    engine: Box<dyn MlsEngine>,
    store: ClientStore,
    device: DeviceId,
    ready: bool,
    responses: HashMap<u64, Result<ServerFrame, ClientError>>,
    sends: HashMap<MsgId, Result<Seq, ClientError>>,
    received: Vec<Message>,
    followed: HashSet<StreamId>,
    live: HashSet<StreamId>,
    failed_attempts: u32,
    lost_commit_races: u32,
    stopped: Option<Option<ErrorCode>>,
    /// Sends issued by [`Client::send`] in this process, waiting for their answer.
    in_flight: HashSet<MsgId>,
    /// `Ready` events so far: which connection a request was sent on.
    connections: u64,
    /// Outbox messages of an earlier process sent again, whose answer nobody waits for.
    resent: HashSet<MsgId>,
    /// This device's handshake messages (Commits, leave requests) the gateway accepted
    /// whose echo has not been processed yet, by msg_id, with their bytes: the echo is
    /// recognised as this device's own by them, not by the gateway's label (SPEC.md 7.8).
    accepted_commits: HashMap<MsgId, Vec<u8>>,
    /// Only with the fault `reuse_decrypted_payloads`: what payloads decrypted to.
    decrypted: HashMap<Vec<u8>, (DeviceId, Vec<u8>)>,
    observer: Option<Observer>,
    presence: Tracker,
    /// The receive batch open now, if any.
    receive_batch: Option<receive_batch::ReceiveBatch>,
    /// When receive batches end.
    receive_batch_limits: receive_batch::ReceiveBatchLimits,
    /// Deliberately broken behaviours ([`crate::faults`]); all off but in self-tests.
    faults: Faults,
    /// Hold Welcomes from users never talked with as requests ([`Client::set_hold_requests`]).
    hold_requests: bool,
    /// Subscriptions the gateway refused for a reason other than membership (for example
    /// `too_many_rooms`), until the stream is subscribed again.
    refused_subscriptions: HashMap<StreamId, ErrorCode>,
    /// msg_ids numbered so far under [`Faults::counter_msg_ids`].
    msg_id_counter: std::cell::Cell<u64>,
    /// Events [`Client::wait`] took from the transport that [`Client::work`] has not
    /// handled yet.
    pending_events: VecDeque<Event>,
}

/// A text message encrypted and given its msg_id by [`Client::compose_text`], not sent yet.
#[derive(Debug)]
#[must_use = "a composed text is sent by Client::send_composed"]
pub struct ComposedText {
    conversation: ConversationId,
    /// The sealed content (SPEC.md 7.9), kept in the outbox and encrypted again if need be.
    text: Vec<u8>,
    payload: Vec<u8>,
    msg_id: MsgId,
}

/// What a Commit's `Send` carries beside its payload (SPEC.md 7.5, 7.10).
#[derive(Debug, Clone, Default)]
pub(crate) struct Attached {
    /// The Welcome for the devices it adds.
    welcome: Option<Vec<u8>>,
    /// The GroupInfo of the epoch it opens.
    group_info: Option<Vec<u8>>,
}

/// What woke a client in [`Client::wait`], for [`Client::work`] to handle.
#[derive(Debug)]
#[must_use = "the events taken are handled by Client::work"]
pub struct Woken {
    /// The timer fired while the presence lease was due for renewal.
    renew: bool,
}

/// What a client reports to its observer as it goes ([`Client::observe`]).
#[derive(Debug, Default)]
pub struct Observed {
    /// Entries processed since the observer last took them.
    pub log: Vec<EntryRecord>,
    /// Connected and authenticated.
    pub ready: bool,
    /// Times the session became ready (the first connect and every resume).
    pub readies: u64,
    /// Entries the gateway sent again on a connection (the session dropped them).
    pub duplicates: u64,
    /// Entries carrying a msg_id already delivered under another seq (skipped).
    pub duplicate_msg_ids: u64,
    /// Gaps the session found (and asked a replay for).
    pub gaps: u64,
    /// `Deliver` frames dropped on purpose ([`Client::lose_deliveries`]).
    pub lost_deliveries: u64,
    /// Room Commits the gateway accepted that break the room rules as this device sees
    /// them (SPEC.md 10.5: a faulty gateway), with the rule each broke.
    pub governance_faults: Vec<String>,
    /// Messages whose gateway label named another sender than MLS authenticated
    /// (REQ-7.8-1).
    pub relabelled: u64,
    /// Messages whose number showed earlier ones missing, or that came out of order
    /// (REQ-7.9-2).
    pub irregular: u64,
    /// Resyncs of forked conversations accepted (SPEC.md 7.10).
    pub resyncs: u64,
    /// Why resyncs failed (the conversation stayed forked, to be tried again).
    pub resync_failures: Vec<String>,
}

/// A shared view of a client's [`Observed`].
pub type Observer = Arc<Mutex<Observed>>;

/// What a device did with one delivered entry ([`Client::observe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryOutcome {
    /// An application message decrypted (or one's own, from the outbox) and shown.
    Shown,
    /// An application message that could not be decrypted: recorded as unreadable.
    Undecryptable,
    /// A Commit of another member that this device could not apply: the conversation has
    /// forked here (recorded as unreadable and as a fork).
    Forked,
    /// A Commit or Proposal applied, or a Welcome joined.
    Applied,
    /// A Welcome from a user this device had never talked with, held as an invitation
    /// request ([`Client::set_hold_requests`]).
    Requested,
    /// A Commit that removed this device from the group, applied.
    Removed,
    /// Nothing to do: an entry from before a crash, a Welcome this device cannot use, or
    /// one's own message whose plaintext is gone.
    Ignored,
}

/// One entry as this device processed it, for observers such as the simulator's
/// invariant checks ([`Client::observe`]). No plaintext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryRecord {
    /// The stream.
    pub stream: StreamId,
    /// The entry's seq.
    pub seq: Seq,
    /// Its msg_id.
    pub msg_id: MsgId,
    /// Its sender.
    pub sender: DeviceId,
    /// Its body's kind and epoch (an entry's body holds no payload).
    pub kind: EntryBody,
    /// Whether the store took it as new (`false`: a duplicate, not shown again).
    pub new: bool,
    /// What was done with it.
    pub outcome: EntryOutcome,
    /// The epoch of the entry's group on this device afterwards (for a Welcome, of the
    /// group joined); `None` without the group.
    pub epoch_after: Option<u64>,
}

/// Connection attempts [`Client::connect`] makes before it reports the gateway unreachable.
pub const CONNECT_ATTEMPTS: u32 = 3;

/// Times a Commit is tried before the client gives up on losing races.
pub const COMMIT_ATTEMPTS: u32 = 8;

/// What [`Client::add_device`], [`Client::remove_device`] and [`Client::revoke_device`]
/// changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceChange {
    /// Conversations a Commit was made in.
    pub conversations: usize,
    /// Conversations where nothing was needed (the device already was, or was not, there).
    pub unchanged: usize,
}

impl DeviceChange {
    fn count(&mut self, committed: Option<Seq>) {
        match committed {
            Some(_) => self.conversations += 1,
            None => self.unchanged += 1,
        }
    }
}

impl Client {
    /// A client for the device `engine` acts for.
    pub fn new(transport: Transport, engine: Box<dyn MlsEngine>, store: ClientStore) -> Self {
        let device = engine.device();
        Self {
            transport,
            engine,
            store,
            device,
            ready: false,
            responses: HashMap::new(),
            sends: HashMap::new(),
            received: Vec::new(),
            followed: HashSet::new(),
            live: HashSet::new(),
            failed_attempts: 0,
            lost_commit_races: 0,
            stopped: None,
            in_flight: HashSet::new(),
            connections: 0,
            resent: HashSet::new(),
            accepted_commits: HashMap::new(),
            decrypted: HashMap::new(),
            observer: None,
            presence: Tracker::default(),
            receive_batch: None,
            receive_batch_limits: receive_batch::ReceiveBatchLimits::default(),
            faults: Faults::default(),
            msg_id_counter: std::cell::Cell::new(0),
            pending_events: VecDeque::new(),
            hold_requests: false,
            refused_subscriptions: HashMap::new(),
        }
    }

    /// The same client with deliberately broken behaviours switched on (for the
    /// conformance suite's self-test). The session's switches are set where the session
    /// is built ([`confab_spec::session::SessionConfig::faults`]).
    pub fn with_faults(self, faults: Faults) -> Self {
        Self { faults, ..self }
    }

    /// Holds Welcomes from users this device has never talked with (not its own user, not
    /// a contact, in no conversation with it) as invitation requests for its user to
    /// accept or decline (SPEC.md 10.5), instead of joining at once. Off by default (the
    /// simulator and tests join at once); the `confab` CLI turns it on.
    pub fn set_hold_requests(&mut self, hold: bool) {
        self.hold_requests = hold;
    }

    /// Sets when receive batches end ([`receive_batch`]); batches opened from now on
    /// follow them.
    pub fn set_receive_batch_limits(&mut self, limits: receive_batch::ReceiveBatchLimits) {
        self.receive_batch_limits = limits;
    }

    /// Lets receive batches leave the MLS state they advanced unwritten for up to `window`
    /// ([`crate::mls::unwritten`]): each batch still records, shows and acknowledges its
    /// messages when it ends, but one write of the state covers many batches. The client
    /// wakes up to write it when it is due. The default writes it at every batch's end.
    pub fn set_state_write_window(&mut self, window: crate::mls::unwritten::StateWriteWindow) {
        self.engine.set_state_write_window(window);
    }

    /// This device.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// How many of this client's Commits lost a race (`stale_commit`) and were retried.
    pub fn lost_commit_races(&self) -> u32 {
        self.lost_commit_races
    }

    /// The MLS engine (read-only: epochs, members, authenticators).
    pub fn engine(&self) -> &dyn MlsEngine {
        &*self.engine
    }

    /// The MLS engine, to change: for tests and simulations that make what the client
    /// never would (a Commit to tamper with, then discard). Whatever is done through it
    /// bypasses the client's discipline (echo before apply, the outbox).
    pub fn engine_mut(&mut self) -> &mut dyn MlsEngine {
        &mut *self.engine
    }

    /// The local store.
    pub fn store(&self) -> &ClientStore {
        &self.store
    }

    /// Starts reporting to an [`Observer`], which can be read while an operation of this
    /// client runs (for the simulator's invariant checks).
    pub fn observe(&mut self) -> Observer {
        self.observer
            .get_or_insert_with(|| {
                Arc::new(Mutex::new(Observed {
                    ready: self.ready,
                    ..Observed::default()
                }))
            })
            .clone()
    }

    fn observed(&self, change: impl FnOnce(&mut Observed)) {
        if let Some(observer) = &self.observer {
            if let Ok(mut observed) = observer.lock() {
                change(&mut observed);
            }
        }
    }

    /// Drops the next `n` live `Deliver` frames (see [`Transport::lose_deliveries`]); the
    /// observer counts those dropped as `lost_deliveries`. For fault injection.
    pub fn lose_deliveries(&mut self, n: u32) {
        self.transport.lose_deliveries(n);
    }

    /// Drops the connection as a network failure would; the session reconnects and
    /// resumes by itself. For fault injection.
    pub fn drop_connection(&mut self) {
        self.transport.drop_connection();
    }

    /// Messages received (or echoed back) since the last call, in delivery order.
    pub fn take_received(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.received)
    }

    /// Connects, and follows the inbox and every known conversation from its cursor. Gives
    /// up with [`ClientError::Unreachable`] after [`CONNECT_ATTEMPTS`] failed attempts;
    /// once connected, the session reconnects by itself.
    pub async fn connect(&mut self) -> Result<(), ClientError> {
        self.input(Input::Start)?;
        self.follow(StreamId::Inbox)?;
        for c in self.store.conversations()? {
            if !c.removed {
                self.follow(StreamId::Conversation(c.id))?;
            }
        }
        while !self.ready {
            if self.failed_attempts >= CONNECT_ATTEMPTS {
                self.input(Input::Stop)?;
                return Err(ClientError::Unreachable(self.failed_attempts));
            }
            self.pump().await?;
        }
        Ok(())
    }

    /// Pumps until every followed stream (the inbox, every conversation, and those joined
    /// meanwhile) has replayed to its head and is live: the device has caught up.
    pub async fn sync(&mut self) -> Result<(), ClientError> {
        while !self.ready || !self.followed.is_subset(&self.live) {
            self.pump().await?;
        }
        // Leave requests this device is the one to commit (SPEC.md 10.3). A refusal is
        // not the caller's problem: another member commits them later.
        match self.commit_leave_requests().await {
            Ok(_) | Err(ClientError::SendRefused { .. } | ClientError::RateLimited { .. }) => {
                Ok(())
            }
            Err(e) => Err(e),
        }?;
        self.resync_forked().await?;
        self.end_receive_batch()
    }

    /// Gets back into every conversation that forked here and this device is still in, by
    /// a resync (SPEC.md 7.10, REQ-7.10-6). One that cannot be resynced now (a Commit won
    /// the epoch meanwhile, the GroupInfo is older than the log, the gateway refused)
    /// stays forked and is tried again at the next sync; the number of resyncs is
    /// returned.
    pub async fn resync_forked(&mut self) -> Result<usize, ClientError> {
        // A client that sends into a fork (the `send_after_fork` fault) does not know it
        // is one, so it does not resync either.
        if self.faults.no_resync || self.faults.send_after_fork {
            return Ok(0);
        }
        let mut done = 0;
        for conversation in self.store.forked_conversations()? {
            if !self
                .followed
                .contains(&StreamId::Conversation(conversation))
            {
                continue;
            }
            match self.resync(conversation).await {
                Ok(_) => done += 1,
                Err(
                    e @ (ClientError::SendRefused { .. }
                    | ClientError::Refused(_)
                    | ClientError::RateLimited { .. }
                    | ClientError::Interrupted
                    | ClientError::Engine(_)),
                ) => {
                    self.observed(|o| o.resync_failures.push(e.to_string()));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// One resync of `conversation`: the gateway's GroupInfo, an external Commit that
    /// replaces this device's leaf, sent with the new epoch's GroupInfo. Its seq once
    /// accepted; the fork is then over.
    async fn resync(&mut self, conversation: ConversationId) -> Result<Seq, ClientError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let answer = self
                .request(|rid| ClientFrame::GetGroupInfo(GetGroupInfo { rid, conversation }))
                .await?;
            let ServerFrame::GroupInfo(info) = answer else {
                return Err(ClientError::Unexpected);
            };
            self.end_receive_batch()?;
            let output = self.engine.resync(
                &conversation,
                info.group_info.as_bytes(),
                info.ratchet_tree.as_ref().map(|t| t.as_bytes()),
            )?;
            match self.send_commit(conversation, output).await {
                Ok(seq) => {
                    self.store.set_resynced(&conversation, seq)?;
                    self.observed(|o| o.resyncs += 1);
                    return Ok(seq);
                }
                // Another Commit won the epoch: its GroupInfo is the one to use now.
                Err(ClientError::SendRefused {
                    code: ErrorCode::StaleCommit,
                    ..
                }) if attempts < COMMIT_ATTEMPTS => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Why the gateway refused to let this device follow `stream`, if it did for a reason
    /// other than membership (for example `too_many_rooms`, SPEC.md 10.4), until the
    /// stream is subscribed again.
    pub fn subscription_refusal(&self, stream: &StreamId) -> Option<ErrorCode> {
        self.refused_subscriptions.get(stream).copied()
    }

    /// Whether the session is connected and authenticated.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Runs the transport once: waits for one event (or a timer) and handles it.
    /// [`Client::wait`] and [`Client::work`] are its two halves.
    pub async fn pump(&mut self) -> Result<(), ClientError> {
        let woken = self.wait(1).await?;
        self.work(woken)
    }

    /// The waiting half of [`Client::pump`]: waits until there is something to do and
    /// takes up to `max_events` transport events that are ready (at least one unless a
    /// timer fired), keeping them in the client until [`Client::work`] handles them. It
    /// decrypts and writes nothing, and it is cancel-safe: nothing taken from the
    /// transport is dropped.
    pub async fn wait(&mut self, max_events: usize) -> Result<Woken, ClientError> {
        if let Some(error) = self.stopped {
            return Err(ClientError::Stopped(error));
        }
        if !self.pending_events.is_empty() {
            return Ok(Woken { renew: false });
        }
        let now = self.now();
        let renew_in = self.presence.renew_in(now).filter(|_| self.ready);
        let batch_in = self
            .receive_batch
            .as_ref()
            .map(|b| b.due.0.saturating_sub(now.0));
        // Unwritten MLS state is written when it is due, at the latest when the open batch
        // ends (which writes what is due).
        let state_in = match self.receive_batch {
            None => self.engine.unwritten_due_in(),
            Some(_) => None,
        };
        let wake_in = renew_in.into_iter().chain(batch_in).chain(state_in).min();
        let event = match wake_in {
            Some(0) => None,
            // Biased: an unbiased select draws its order from a random number, which would
            // make simulations unrepeatable.
            Some(ms) => tokio::select! {
                biased;
                event = self.transport.next_event() => Some(event),
                () = tokio::time::sleep(std::time::Duration::from_millis(ms)) => None,
            },
            None => Some(self.transport.next_event().await),
        };
        let Some(event) = event else {
            return Ok(Woken {
                renew: renew_in.is_some(),
            });
        };
        self.pending_events.push_back(event);
        // More events that are ready now, without waiting (`next_event` is cancel-safe).
        while self.pending_events.len() < max_events {
            use futures_util::FutureExt as _;
            match self.transport.next_event().now_or_never() {
                Some(event) => self.pending_events.push_back(event),
                None => break,
            }
        }
        Ok(Woken { renew: false })
    }

    /// The working half of [`Client::pump`]: handles the events [`Client::wait`] took
    /// (decrypting, recording and acknowledging entries) or the timer that woke it. It
    /// does no network I/O and awaits nothing (frames it answers with go out as the
    /// client next waits), so it may run on another thread than the one that waits. An
    /// event whose handling fails stays taken: the next `work` handles the events after it.
    pub fn work(&mut self, woken: Woken) -> Result<(), ClientError> {
        let lost = self.transport.deliveries_lost();
        self.observed(|o| o.lost_deliveries = lost);
        if self.pending_events.is_empty() {
            let now = self.now();
            if self.receive_batch.as_ref().is_some_and(|b| b.due <= now) {
                self.end_receive_batch()?;
            }
            if self.receive_batch.is_none() && self.engine.unwritten_due_in() == Some(0) {
                self.engine.end_receive_batch()?;
            }
            if woken.renew && self.presence.renew_in(now) == Some(0) {
                self.renew_presence();
            }
            return Ok(());
        }
        while let Some(event) = self.pending_events.pop_front() {
            self.on_event(event)?;
        }
        Ok(())
    }

    /// Takes, renews or releases this device's presence lease (SPEC.md 9.1). While the
    /// mode is online or invisible the client renews the lease at half its length as it
    /// pumps, and takes it again after every reconnect.
    pub async fn set_presence(&mut self, mode: PresenceMode) -> Result<PresenceLease, ClientError> {
        self.presence.set_mode(mode);
        let ttl_ms = if mode == PresenceMode::Offline {
            0
        } else {
            LEASE_TTL_MS
        };
        match self
            .request(|rid| ClientFrame::SetPresence(SetPresence { rid, mode, ttl_ms }))
            .await?
        {
            ServerFrame::PresenceLease(lease) => {
                self.presence.granted(self.now(), lease.ttl_ms);
                Ok(lease)
            }
            _ => Err(ClientError::Unexpected),
        }
    }

    /// Watches `targets` (replacing the watchlist; empty stops watching) and returns their
    /// states. Changes are then collected as the client pumps
    /// ([`Client::take_presence_changes`]), and the client watches again after a reconnect.
    pub async fn watch_presence(
        &mut self,
        targets: Vec<SystemKey>,
    ) -> Result<Vec<PresenceOf>, ClientError> {
        let answer = self
            .request(|rid| {
                ClientFrame::WatchPresence(WatchPresence {
                    rid,
                    targets: targets.clone(),
                })
            })
            .await?;
        let ServerFrame::PresenceStates(states) = answer else {
            return Err(ClientError::Unexpected);
        };
        self.presence.set_watchlist(targets);
        self.presence.observe_all(&states.states);
        Ok(states.states)
    }

    /// Changes this user's presence share list and blocklist (any field may be empty; all
    /// empty is a query) and returns the lists.
    pub async fn update_presence_lists(
        &mut self,
        share: Vec<SystemKey>,
        unshare: Vec<SystemKey>,
        block: Vec<SystemKey>,
        unblock: Vec<SystemKey>,
    ) -> Result<PresenceLists, ClientError> {
        let some = |v: Vec<SystemKey>| (!v.is_empty()).then_some(v);
        let frame = UpdatePresenceLists {
            rid: 0,
            share: some(share),
            unshare: some(unshare),
            block: some(block),
            unblock: some(unblock),
        };
        match self
            .request(|rid| ClientFrame::UpdatePresenceLists(UpdatePresenceLists { rid, ..frame }))
            .await?
        {
            ServerFrame::PresenceLists(lists) => Ok(lists),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// The latest known presence of each watched user.
    pub fn presence_states(&self) -> &std::collections::BTreeMap<SystemKey, PresenceState> {
        self.presence.states()
    }

    /// Presence changes of watched users since the last call, in arrival order.
    pub fn take_presence_changes(&mut self) -> Vec<(SystemKey, PresenceState)> {
        self.presence.take_changes()
    }

    /// Sends a lease renewal without waiting for its answer (handled in `on_event`).
    fn renew_presence(&mut self) {
        let now = self.now();
        let Some(mode) = self.presence.mode() else {
            return;
        };
        let sent = self.transport.session().request(now, |rid| {
            ClientFrame::SetPresence(SetPresence {
                rid,
                mode,
                ttl_ms: LEASE_TTL_MS,
            })
        });
        match sent {
            Ok(rid) => {
                self.presence.own_request(rid);
                // Until the answer comes, do not send another.
                self.presence.granted(now, LEASE_TTL_MS);
            }
            Err(_) => self.presence.renewal_failed(now, None),
        }
    }

    /// After a reconnect: take the lease again and watch again.
    fn resume_presence(&mut self) {
        let now = self.now();
        if self.presence.on_ready(now) {
            let targets = self.presence.watchlist().to_vec();
            if let Ok(rid) = self.transport.session().request(now, |rid| {
                ClientFrame::WatchPresence(WatchPresence { rid, targets })
            }) {
                self.presence.own_request(rid);
            }
        }
    }

    /// An answer to one of the client's own presence requests.
    fn on_own_presence_answer(&mut self, frame: ServerFrame) {
        match frame {
            ServerFrame::PresenceLease(lease) => self.presence.granted(self.now(), lease.ttl_ms),
            ServerFrame::PresenceStates(states) => self.presence.observe_all(&states.states),
            _ => {}
        }
    }

    /// Keeps at least `target` KeyPackages in the pool (uploading when it fell below the
    /// gateway's low watermark) and a last-resort package that nobody used yet.
    pub async fn top_up_key_packages(&mut self, target: u64) -> Result<PoolReport, ClientError> {
        let status = self.upload(Vec::new(), None).await?;
        let mut report = PoolReport {
            pool_count: status.pool_count,
            uploaded: 0,
            last_resort_rotated: false,
        };
        let missing = if status.pool_count < status.low_watermark.max(1) {
            target.saturating_sub(status.pool_count)
        } else {
            0
        };
        let rotate = !status.last_resort_present || status.last_resort_claimed;
        if missing == 0 && !rotate {
            return Ok(report);
        }
        // Uploads in batches the gateway accepts (`key_packages_per_upload_max`).
        let per_upload = self
            .transport
            .session()
            .limits()
            .map_or(limits::KEY_PACKAGES_PER_UPLOAD_MAX_DEFAULT, |l| {
                l.key_packages_per_upload_max
            })
            .max(1);
        let mut last = if rotate {
            self.engine.key_packages(1, true)?.pop()
        } else {
            None
        };
        let mut left = missing;
        let mut status = None;
        while left > 0 || last.is_some() {
            let count = left.min(per_upload);
            let packages = self.engine.key_packages(count as usize, false)?;
            status = Some(self.upload(packages, last.take()).await?);
            left -= count;
        }
        report.pool_count = status.map_or(report.pool_count, |s| s.pool_count);
        report.uploaded = missing;
        report.last_resort_rotated = rotate;
        Ok(report)
    }

    /// Creates a DM with `peer`: claims a KeyPackage of every device of theirs, makes the
    /// group, and commits the Add with its Welcome; the Commit is applied once the gateway
    /// accepted it (SPEC.md 7.4).
    pub async fn create_dm(&mut self, peer: SystemKey) -> Result<ConversationId, ClientError> {
        let mut claimed = self.claim(peer, None).await?;
        if claimed.is_empty() {
            return Err(ClientError::NoKeyPackages);
        }
        // This user's other devices join too (a user without any is fine).
        match self.claim(self.device.system, None).await {
            Ok(own) => claimed.extend(own),
            Err(ClientError::NoKeyPackages) => {}
            Err(e) => return Err(e),
        }
        let packages: Vec<Vec<u8>> = claimed
            .iter()
            .map(|p| p.key_package.as_bytes().to_vec())
            .collect();
        let conversation = self
            .create_conversation(ConversationKind::DirectMessage, &[])
            .await?;
        let add = self.engine.add_members(&conversation, &packages)?;
        self.store.add_conversation(&ConversationRecord {
            id: conversation,
            kind: ConversationKind::DirectMessage,
            peer: Some(peer),
            removed: false,
        })?;
        let sent = self.send_commit(conversation, add).await;
        match sent {
            Ok(_) => self.engine.merge_pending_commit(&conversation)?,
            Err(e) => {
                self.engine.discard_pending_commit(&conversation)?;
                return Err(e);
            }
        }
        self.follow(StreamId::Conversation(conversation))?;
        Ok(conversation)
    }

    /// Creates a conversation with a fresh random id (REQ-4.6-1): its MLS group with these
    /// group context extensions, then the conversation at the gateway from the group's
    /// GroupInfo (SPEC.md 6.1); a refusal (`too_many_rooms`, `rate_limited`, ...) is the
    /// error, and leaves the new group unused in the engine's state.
    async fn create_conversation(
        &mut self,
        kind: ConversationKind,
        extensions: &[(u16, Vec<u8>)],
    ) -> Result<ConversationId, ClientError> {
        let mut id = [0u8; 32];
        self.random(&mut id);
        let conversation = ConversationId(id);
        let group_info = self.engine.create_group_with(&conversation, extensions)?;
        let group_info = MlsBytes::new(group_info)
            .map_err(|_| ClientError::Refused(ErrorCode::PayloadTooLarge))?;
        match self
            .request(|rid| {
                ClientFrame::CreateConversation(confab_spec::frame::CreateConversation {
                    rid,
                    conversation,
                    kind,
                    group_info: group_info.clone(),
                })
            })
            .await?
        {
            ServerFrame::Created(c) if c.conversation == conversation => Ok(conversation),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// Commits an update of this device's leaf (fresh keys). When another member's Commit
    /// wins the epoch (`stale_commit`), this device discards its own, processes the winner
    /// and tries again on top of it (SPEC.md 7.3, 7.4), up to [`COMMIT_ATTEMPTS`] times.
    pub async fn update(&mut self, conversation: ConversationId) -> Result<Seq, ClientError> {
        let seq = self
            .commit(conversation, |engine| {
                rooms::commit_any(engine, &conversation, &[], &[], true, |e| {
                    e.self_update(&conversation)
                })
            })
            .await?;
        seq.ok_or(ClientError::Unexpected)
    }

    /// This user's devices in the directory (those with KeyPackages), this one included.
    pub async fn devices(&mut self) -> Result<Vec<DeviceStatus>, ClientError> {
        match self
            .request(|rid| ClientFrame::ListDevices(ListDevices { rid }))
            .await?
        {
            ServerFrame::Devices(d) => Ok(d.devices),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// Adds `device`, a new device of this user that published KeyPackages, to every
    /// conversation this device is in and `device` is not, one Commit each (claiming one
    /// of its packages for each).
    pub async fn add_device(&mut self, device: DeviceId) -> Result<DeviceChange, ClientError> {
        self.check_own(device)?;
        let mut change = DeviceChange::default();
        for c in self.active_conversations()? {
            if self.is_member(&c, device)? {
                change.count(None);
                continue;
            }
            let claimed = self.claim(self.device.system, Some(vec![device])).await?;
            let Some(package) = claimed.into_iter().find(|p| p.device == device) else {
                return Err(ClientError::NoKeyPackages);
            };
            let package = package.key_package.as_bytes().to_vec();
            let committed = self
                .commit(c, |engine| {
                    if member(engine, &c, device)? {
                        return Ok(None); // a winning Commit added it meanwhile
                    }
                    let add = [(device, package.clone())];
                    rooms::commit_any(engine, &c, &add, &[], false, |e| {
                        e.add_members(&c, std::slice::from_ref(&package))
                    })
                })
                .await?;
            change.count(committed);
        }
        Ok(change)
    }

    /// Removes `device` (another device of this user) from every conversation it is in.
    /// It keeps working elsewhere until it is revoked ([`Client::revoke_device`]), and can
    /// be added again with [`Client::add_device`].
    pub async fn remove_device(&mut self, device: DeviceId) -> Result<DeviceChange, ClientError> {
        self.check_own(device)?;
        let mut change = DeviceChange::default();
        for c in self.active_conversations()? {
            if !self.is_member(&c, device)? {
                change.count(None);
                continue;
            }
            let committed = self
                .commit(c, |engine| {
                    if !member(engine, &c, device)? {
                        return Ok(None);
                    }
                    rooms::commit_any(engine, &c, &[], &[device], false, |e| {
                        e.remove_members(&c, &[device])
                    })
                })
                .await?;
            change.count(committed);
        }
        Ok(change)
    }

    /// Revokes a device of this user at the gateway (SPEC.md 3.3: its sessions close and
    /// its KeyPackages are withdrawn), then removes it from every conversation.
    /// `revocation` is signed with the user's system key.
    pub async fn revoke_device(
        &mut self,
        revocation: Revocation,
    ) -> Result<DeviceChange, ClientError> {
        let device = revocation.device_id();
        self.check_own(device)?;
        match self
            .request(move |rid| ClientFrame::RevokeDevice(RevokeDevice { rid, revocation }))
            .await?
        {
            ServerFrame::Ok(_) => {}
            _ => return Err(ClientError::Unexpected),
        }
        self.remove_device(device).await
    }

    fn check_own(&self, device: DeviceId) -> Result<(), ClientError> {
        if device.system != self.device.system {
            return Err(ClientError::NotOwnDevice);
        }
        if device == self.device {
            return Err(ClientError::ThisDevice);
        }
        Ok(())
    }

    fn active_conversations(&self) -> Result<Vec<ConversationId>, ClientError> {
        Ok(self
            .store
            .conversations()?
            .into_iter()
            .filter(|c| !c.removed)
            .map(|c| c.id)
            .collect())
    }

    /// Whether `device` is a member of `conversation` in this device's view of the group.
    pub fn is_member(
        &self,
        conversation: &ConversationId,
        device: DeviceId,
    ) -> Result<bool, ClientError> {
        Ok(member(&*self.engine, conversation, device)?)
    }

    /// Claims KeyPackages of `user` (of `devices` only, when given).
    async fn claim(
        &mut self,
        user: SystemKey,
        devices: Option<Vec<DeviceId>>,
    ) -> Result<Vec<ClaimedKeyPackage>, ClientError> {
        match self
            .request(move |rid| {
                ClientFrame::ClaimKeyPackages(ClaimKeyPackages { rid, user, devices })
            })
            .await?
        {
            ServerFrame::KeyPackagesClaimed(c) => Ok(c.claimed),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// Commits what `make` creates (nothing when it returns `None`, for example because a
    /// winning Commit already did it). When another member's Commit wins the epoch
    /// (`stale_commit`), this device discards its own, processes the winner and asks `make`
    /// again on top of it (SPEC.md 7.3, 7.4), up to [`COMMIT_ATTEMPTS`] times.
    async fn commit(
        &mut self,
        conversation: ConversationId,
        mut make: impl FnMut(&mut dyn MlsEngine) -> Result<Option<CommitOutput>, EngineError>,
    ) -> Result<Option<Seq>, ClientError> {
        self.check_not_forked(&conversation)?;
        self.settle_resent_commit(conversation).await?;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let Some(commit) = make(&mut *self.engine)? else {
                return Ok(None);
            };
            if self.faults.merge_before_accepted {
                self.engine.merge_pending_commit(&conversation)?;
            }
            match self.send_commit(conversation, commit).await {
                Ok(seq) => {
                    self.apply_own_commit(conversation).await?;
                    return Ok(Some(seq));
                }
                Err(ClientError::SendRefused {
                    code: ErrorCode::StaleCommit,
                    epoch: Some(epoch),
                    ..
                }) if attempts < COMMIT_ATTEMPTS => {
                    self.lost_commit_races += 1;
                    if self.engine.has_pending_commit(&conversation)? {
                        self.engine.discard_pending_commit(&conversation)?;
                    }
                    // The winner arrives on the subscription: wait until it is applied.
                    while self.engine.epoch(&conversation)? < epoch.0 {
                        if !self
                            .followed
                            .contains(&StreamId::Conversation(conversation))
                        {
                            return Err(EngineError::Removed.into()); // the winner removed us
                        }
                        self.pump().await?;
                    }
                }
                Err(e) => {
                    if self.engine.has_pending_commit(&conversation)? {
                        self.engine.discard_pending_commit(&conversation)?;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Sends `text` to `conversation`; returns its seq once the gateway accepted it. Its
    /// three steps are public for a caller that runs the synchronous one elsewhere:
    /// [`Client::ready_to_compose`], [`Client::compose_text`], [`Client::send_composed`].
    pub async fn send_text(
        &mut self,
        conversation: ConversationId,
        text: &[u8],
    ) -> Result<Seq, ClientError> {
        self.ready_to_compose(conversation).await?;
        let composed = self.compose_text(conversation, text)?;
        self.send_composed(composed).await
    }

    /// Waits until `conversation` can take a new application message: no application
    /// message is sent while a Commit of this device's is pending (REQ-7.4-3), so one an
    /// earlier process sent is settled first. Then call [`Client::compose_text`].
    pub async fn ready_to_compose(
        &mut self,
        conversation: ConversationId,
    ) -> Result<(), ClientError> {
        self.settle_resent_commit(conversation).await
    }

    /// Encrypts `text` for `conversation` and gives it its msg_id, after
    /// [`Client::ready_to_compose`]. Synchronous: it writes the engine's state and
    /// awaits nothing, so it may run on another thread. Nothing is sent until
    /// [`Client::send_composed`].
    pub fn compose_text(
        &mut self,
        conversation: ConversationId,
        text: &[u8],
    ) -> Result<ComposedText, ClientError> {
        self.check_not_forked(&conversation)?;
        // Numbered before it is encrypted (REQ-7.9-1): a number is never used twice, and
        // one taken by a message a crash lost shows as missing, which it is.
        let counter = self.store.take_sent_counter(&conversation)?;
        let sealed = if self.faults.unnumbered_messages {
            text.to_vec()
        } else {
            confab_spec::content::AppContent {
                text: text.to_vec(),
                counter,
            }
            .seal()
        };
        let payload = self.encrypt(&conversation, &sealed)?;
        Ok(ComposedText {
            conversation,
            text: sealed,
            payload,
            msg_id: self.new_msg_id(),
        })
    }

    /// Sends what [`Client::compose_text`] composed and returns its seq once the gateway
    /// accepted it. Refused as too old for its epoch, it catches up, encrypts the text
    /// again and sends it under the same msg_id.
    pub async fn send_composed(&mut self, composed: ComposedText) -> Result<Seq, ClientError> {
        let ComposedText {
            conversation,
            text,
            mut payload,
            msg_id,
        } = composed;
        loop {
            match self
                .send_as(
                    msg_id,
                    conversation,
                    payload,
                    Attached::default(),
                    Some(text.clone()),
                )
                .await
            {
                // Sent too long after its epoch (the device was cut off while the group
                // moved on): catch up, encrypt it again and send it under the same msg_id;
                // the refused ciphertext was never appended (SPEC.md 7.2).
                Err(ClientError::SendRefused {
                    code: ErrorCode::EpochTooOld,
                    epoch: Some(current),
                    ..
                }) if self.catch_up(conversation, current).await? => {
                    payload = self.encrypt(&conversation, &text)?;
                }
                other => return other,
            }
        }
    }

    /// Encrypts an application message. The open receive batch ends first: the engine
    /// writes its state before a ciphertext leaves it, and with the batch's outcomes
    /// released that one write is all it costs (in the batch, they would be journaled and
    /// the entries after it read outside any batch, a write each).
    /// Refuses to send into a conversation that forked here (SPEC.md 7.7): whatever this
    /// device sent would be in a group the others no longer share.
    fn check_not_forked(&self, conversation: &ConversationId) -> Result<(), ClientError> {
        if self.faults.send_after_fork {
            return Ok(());
        }
        match self.store.forked(conversation)? {
            Some((seq, reason)) => Err(ClientError::Forked { seq, reason }),
            None => Ok(()),
        }
    }

    fn encrypt(
        &mut self,
        conversation: &ConversationId,
        text: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        self.end_receive_batch()?;
        Ok(self.engine.encrypt(conversation, text)?)
    }

    /// Applies this device's accepted Commit when its entry is processed, in seq order, so
    /// that entries sequenced before it are read in the epoch they were sent in (merging
    /// at `Accepted` would leave them to past-epoch secrets; SPEC.md 7.4 allows either).
    /// Merges at once if the conversation is no longer followed.
    async fn apply_own_commit(&mut self, conversation: ConversationId) -> Result<(), ClientError> {
        let stream = StreamId::Conversation(conversation);
        while self.engine.has_pending_commit(&conversation)? {
            if !self.followed.contains(&stream) {
                self.engine.merge_pending_commit(&conversation)?;
                break;
            }
            self.pump().await?;
        }
        // Merged by its echo, or without one: nothing of it is left to recognise.
        self.accepted_commits
            .retain(|_, payload| !is_commit_of(payload, &conversation));
        Ok(())
    }

    /// Pumps until this device's group reached `epoch` (`false` if it stopped following
    /// the conversation first, for example because it was removed).
    async fn catch_up(
        &mut self,
        conversation: ConversationId,
        epoch: Epoch,
    ) -> Result<bool, ClientError> {
        let stream = StreamId::Conversation(conversation);
        while self.engine.epoch(&conversation)? < epoch.0 {
            if !self.followed.contains(&stream) {
                return Ok(false);
            }
            self.pump().await?;
        }
        Ok(true)
    }

    fn new_msg_id(&self) -> MsgId {
        let mut id = [0u8; 16];
        if self.faults.counter_msg_ids {
            let n = self.msg_id_counter.get() + 1;
            self.msg_id_counter.set(n);
            let numbered = self.now().0.wrapping_mul(1_000).wrapping_add(n);
            id[8..].copy_from_slice(&numbered.to_be_bytes());
            return MsgId(id);
        }
        self.random(&mut id);
        MsgId(id)
    }

    /// Composes a message into the outbox (its msg_id fixed now, REQ-6.3-4), hands it to
    /// the session and waits for the gateway's answer.
    async fn send(
        &mut self,
        conversation: ConversationId,
        payload: Vec<u8>,
        attached: Attached,
        plaintext: Option<Vec<u8>>,
    ) -> Result<Seq, ClientError> {
        let msg_id = self.new_msg_id();
        self.send_as(msg_id, conversation, payload, attached, plaintext)
            .await
    }

    /// Sends a Commit the engine made, with its Welcome and GroupInfo.
    async fn send_commit(
        &mut self,
        conversation: ConversationId,
        output: CommitOutput,
    ) -> Result<Seq, ClientError> {
        let group_info = output.group_info.filter(|_| !self.faults.no_group_info);
        let attached = Attached {
            welcome: output.welcome,
            group_info,
        };
        self.send(conversation, output.commit, attached, None).await
    }

    /// Sends `payload` into `conversation` as it is, under a fresh msg_id, and returns its
    /// seq once the gateway accepted it: bytes no MLS engine made, for tests and
    /// simulations of a hostile member (garbage, replays, forged handshakes). The CLI never
    /// calls it.
    pub async fn send_raw(
        &mut self,
        conversation: ConversationId,
        payload: Vec<u8>,
    ) -> Result<Seq, ClientError> {
        self.send(conversation, payload, Attached::default(), None)
            .await
    }

    /// [`Client::send_raw`] for a Commit: `commit` with `group_info` as they are (a
    /// hostile member's Commit that no member can apply, and the GroupInfo it leads to).
    pub async fn send_raw_commit(
        &mut self,
        conversation: ConversationId,
        commit: Vec<u8>,
        group_info: Vec<u8>,
    ) -> Result<Seq, ClientError> {
        let attached = Attached {
            welcome: None,
            group_info: Some(group_info),
        };
        self.send(conversation, commit, attached, None).await
    }

    /// [`Client::send`] under a given msg_id.
    async fn send_as(
        &mut self,
        msg_id: MsgId,
        conversation: ConversationId,
        payload: Vec<u8>,
        Attached {
            welcome,
            group_info,
        }: Attached,
        plaintext: Option<Vec<u8>>,
    ) -> Result<Seq, ClientError> {
        let has_plaintext = plaintext.is_some();
        let payload_kept = if has_plaintext {
            Vec::new()
        } else {
            payload.clone()
        };
        self.store.outbox_put(&OutboxItem {
            msg_id,
            conversation,
            payload: payload.clone(),
            welcome: welcome.clone(),
            group_info: group_info.clone(),
            plaintext,
            composed: self.now(),
        })?;
        let bytes = |b: Vec<u8>| {
            MlsBytes::new(b).map_err(|_| ClientError::Refused(ErrorCode::PayloadTooLarge))
        };
        self.input(Input::Send {
            conversation,
            msg_id,
            payload: bytes(payload)?,
            welcome: welcome.map(bytes).transpose()?,
            group_info: group_info.map(bytes).transpose()?,
        })?;
        self.in_flight.insert(msg_id);
        loop {
            if let Some(result) = self.sends.remove(&msg_id) {
                self.in_flight.remove(&msg_id);
                // An accepted handshake message has nothing left to show; an application
                // message waits in the outbox for its echo (its plaintext is shown then).
                if result.is_err() || !has_plaintext {
                    self.store.outbox_remove(&msg_id)?;
                }
                if result.is_ok() && !has_plaintext {
                    // Its echo merges it (apply_own_commit).
                    self.accepted_commits.insert(msg_id, payload_kept);
                }
                return result;
            }
            self.pump().await?;
        }
    }

    async fn upload(
        &mut self,
        key_packages: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
    ) -> Result<KeyPackagesStored, ClientError> {
        let wrap = |b: Vec<u8>| MlsBytes::new(b).map_err(|_| ClientError::Unexpected);
        let key_packages = key_packages
            .into_iter()
            .map(wrap)
            .collect::<Result<Vec<_>, _>>()?;
        let last_resort = last_resort.map(wrap).transpose()?;
        match self
            .request(move |rid| {
                ClientFrame::UploadKeyPackages(UploadKeyPackages {
                    rid,
                    key_packages,
                    last_resort,
                })
            })
            .await?
        {
            ServerFrame::KeyPackagesStored(s) => Ok(s),
            _ => Err(ClientError::Unexpected),
        }
    }

    async fn request(
        &mut self,
        make: impl FnOnce(u64) -> ClientFrame,
    ) -> Result<ServerFrame, ClientError> {
        loop {
            while !self.ready {
                self.pump().await?;
            }
            if self.transport.session().is_ready() {
                break;
            }
            // The session lost the connection before this client saw the event; nothing
            // is sent yet. Wait for the next `Ready`.
            self.ready = false;
        }
        let now = self.now();
        let rid = self.transport.session().request(now, make)?;
        let connection = self.connections;
        loop {
            if let Some(answer) = self.responses.remove(&rid) {
                return answer;
            }
            // The session forgets a connection's requests when it drops (the answer can
            // no longer come); whether the gateway carried it out is unknown.
            if !self.ready || self.connections != connection {
                return Err(ClientError::Interrupted);
            }
            self.pump().await?;
        }
    }

    fn input(&mut self, input: Input) -> Result<(), ClientError> {
        let now = self.now();
        Ok(self.transport.session().handle(now, input)?)
    }

    fn now(&self) -> UnixMs {
        (self.transport.environment().clock)()
    }

    fn random(&self, out: &mut [u8]) {
        (self.transport.environment().entropy)(out)
    }

    fn follow(&mut self, stream: StreamId) -> Result<(), ClientError> {
        let from_seq = self.store.cursor(&stream)?.map(|c| c.next_seq);
        self.subscribe(stream, from_seq)
    }

    fn subscribe(&mut self, stream: StreamId, from_seq: Option<Seq>) -> Result<(), ClientError> {
        self.followed.insert(stream);
        self.live.remove(&stream);
        self.refused_subscriptions.remove(&stream);
        self.input(Input::Subscribe { stream, from_seq })
    }

    fn on_event(&mut self, event: Event) -> Result<(), ClientError> {
        if !matches!(event, Event::Delivered { .. } | Event::SendAccepted { .. }) {
            // Whatever else happens sees the received entries written and acknowledged.
            // A send's acceptance only hands its seq to the caller, and the send already
            // ended the batch it was encrypted in: the entries after it stay batched.
            self.end_receive_batch()?;
        }
        match event {
            Event::Ready { .. } => {
                self.ready = true;
                self.connections += 1;
                self.failed_attempts = 0;
                self.resume_presence();
                self.observed(|o| {
                    o.ready = true;
                    o.readies += 1;
                });
            }
            Event::Disconnected { .. } => {
                if !self.ready {
                    self.failed_attempts += 1;
                }
                self.ready = false;
                self.live.clear();
                self.observed(|o| o.ready = false);
            }
            Event::Stopped { error, .. } => {
                self.stopped = Some(error);
                self.ready = false;
                self.live.clear();
                self.observed(|o| o.ready = false);
            }
            Event::Live { stream } => {
                self.live.insert(stream);
                if let StreamId::Conversation(c) = stream {
                    self.resend_outbox(c)?;
                }
            }
            Event::Response { frame } => {
                if let ServerFrame::PresenceChanged(c) = &frame {
                    self.presence.observe(c.target, c.state);
                } else if let Some(rid) = frame.rid() {
                    if self.presence.take_own_request(rid) {
                        self.on_own_presence_answer(frame);
                    } else {
                        self.responses.insert(rid, Ok(frame));
                    }
                }
            }
            Event::RequestFailed {
                rid,
                retry_after_ms,
                ..
            } if self.presence.take_own_request(rid) => {
                self.presence.renewal_failed(self.now(), retry_after_ms);
            }
            Event::RequestFailed {
                rid,
                code,
                retry_after_ms,
            } => {
                let error = match code {
                    ErrorCode::NoKeyPackages => ClientError::NoKeyPackages,
                    ErrorCode::RateLimited => ClientError::RateLimited {
                        retry_after_ms: retry_after_ms.unwrap_or(1_000),
                    },
                    code => ClientError::Refused(code),
                };
                self.responses.insert(rid, Err(error));
            }
            Event::SubscriptionEnded { stream, code } => {
                self.followed.remove(&stream);
                self.live.remove(&stream);
                if let Some(code) = code.filter(|c| *c != ErrorCode::NotMember) {
                    self.refused_subscriptions.insert(stream, code);
                }
                if let (StreamId::Conversation(c), None | Some(ErrorCode::NotMember)) =
                    (stream, code)
                {
                    self.store.set_removed(&c)?;
                }
            }
            // A resent message (the guard forgets it) stays in the outbox until its echo;
            // nobody waits for its answer.
            Event::SendAccepted { msg_id, seq, .. } if !self.resent.remove(&msg_id) => {
                self.sends.insert(msg_id, Ok(seq));
            }
            Event::SendRejected {
                conversation,
                msg_id,
                code,
                epoch,
                seq,
            } => {
                if self.resent.remove(&msg_id) {
                    let handshake = self.store.outbox_plaintext(&msg_id)?.is_none();
                    if handshake {
                        // A resent Commit refused (another won its epoch, or it is too
                        // old): it will never apply.
                        self.store.outbox_remove(&msg_id)?;
                        if self.engine.has_pending_commit(&conversation)? {
                            self.engine.discard_pending_commit(&conversation)?;
                        }
                    } else if code == ErrorCode::EpochTooOld {
                        // Resent after the group moved on: encrypted again (the stream is
                        // live, so this device is at the current epoch) and sent again.
                        self.reencrypt_outbox(msg_id)?;
                    } else {
                        // Refused for good: given up.
                        self.store.outbox_remove(&msg_id)?;
                    }
                } else {
                    self.sends
                        .insert(msg_id, Err(ClientError::SendRefused { code, epoch, seq }));
                }
            }
            Event::Delivered { stream, entry } => self.on_entry(stream, entry)?,
            Event::DuplicateDropped { .. } => self.observed(|o| o.duplicates += 1),
            Event::DuplicateMsgId { .. } => self.observed(|o| o.duplicate_msg_ids += 1),
            Event::GapDetected { .. } => self.observed(|o| o.gaps += 1),
            _ => {}
        }
        Ok(())
    }

    /// Waits until a Commit of this device's that an earlier process sent and
    /// [`Client::resend_outbox`] sent again has its outcome (merged at its entry, or
    /// discarded when refused), so that nothing is sent in an epoch the Commit may end.
    async fn settle_resent_commit(
        &mut self,
        conversation: ConversationId,
    ) -> Result<(), ClientError> {
        let stream = StreamId::Conversation(conversation);
        while self.followed.contains(&stream)
            && self.engine.has_pending_commit(&conversation)?
            && self.store.outbox()?.iter().any(|i| {
                i.conversation == conversation
                    && is_commit(&i.payload)
                    && !self.in_flight.contains(&i.msg_id)
            })
        {
            self.pump().await?;
        }
        Ok(())
    }

    /// Sends again the messages of `conversation` that an earlier process put in the
    /// outbox and that have no outcome yet (the stream is caught up, so an echo would have
    /// been delivered by now): application messages whose echo has not come, and a Commit
    /// the engine still holds pending, which would otherwise block the group for good
    /// (REQ-6.3-4, 7.4). They keep their msg_ids, so the gateway answers one it already
    /// accepted with its seq instead of appending it twice (SPEC.md 6.3). A pending Commit
    /// that never reached the outbox was never sent: it is discarded.
    fn resend_outbox(&mut self, conversation: ConversationId) -> Result<(), ClientError> {
        let pending_commit = self.engine.has_pending_commit(&conversation)?;
        let mut commit_in_outbox = false;
        for item in self.store.outbox()? {
            if item.conversation != conversation {
                continue;
            }
            let commit = is_commit(&item.payload);
            if self.in_flight.contains(&item.msg_id) || self.resent.contains(&item.msg_id) {
                commit_in_outbox |= commit;
                continue;
            }
            if item.plaintext.is_none() && !commit {
                continue; // a proposal: left as it is
            }
            if commit {
                if !pending_commit || commit_in_outbox {
                    // A Commit whose outcome the log already gave.
                    self.store.outbox_remove(&item.msg_id)?;
                    continue;
                }
                commit_in_outbox = true;
            }
            let (Ok(payload), Ok(welcome), Ok(group_info)) = (
                MlsBytes::new(item.payload),
                item.welcome.map(MlsBytes::new).transpose(),
                item.group_info.map(MlsBytes::new).transpose(),
            ) else {
                self.store.outbox_remove(&item.msg_id)?;
                continue;
            };
            self.input(Input::Send {
                conversation,
                msg_id: item.msg_id,
                payload,
                welcome,
                group_info,
            })?;
            self.resent.insert(item.msg_id);
        }
        if pending_commit && !commit_in_outbox {
            self.engine.discard_pending_commit(&conversation)?;
        }
        Ok(())
    }

    /// Encrypts an outbox message again in its conversation's current epoch and sends it
    /// under its msg_id.
    fn reencrypt_outbox(&mut self, msg_id: MsgId) -> Result<(), ClientError> {
        let Some(item) = self
            .store
            .outbox()?
            .into_iter()
            .find(|i| i.msg_id == msg_id)
        else {
            return Ok(());
        };
        let Some(plaintext) = item.plaintext.clone() else {
            return Ok(());
        };
        let conversation = item.conversation;
        let payload = self.encrypt(&conversation, &plaintext)?;
        self.store.outbox_remove(&msg_id)?;
        self.store.outbox_put(&OutboxItem {
            payload: payload.clone(),
            ..item
        })?;
        let payload =
            MlsBytes::new(payload).map_err(|_| ClientError::Refused(ErrorCode::PayloadTooLarge))?;
        self.input(Input::Send {
            conversation,
            msg_id,
            payload,
            welcome: None,
            group_info: None,
        })?;
        self.resent.insert(msg_id);
        Ok(())
    }

    /// Processes one delivered entry, records it with the cursor, then acknowledges it; an
    /// application message's recording and acknowledgement wait for its receive batch's
    /// end ([`receive_batch`]).
    fn on_entry(&mut self, stream: StreamId, entry: Entry) -> Result<(), ClientError> {
        let seq = entry.seq;
        if matches!(entry.body, EntryBody::Application { .. }) {
            self.begin_receive_batch()?;
        } else {
            // Commits, proposals and Welcomes are applied and recorded one at a time.
            self.end_receive_batch()?;
        }
        let mut message = None;
        let mut journaled = None;
        let mut outcome = EntryOutcome::Ignored;
        match (stream, &entry.body) {
            (
                StreamId::Inbox,
                EntryBody::Welcome {
                    conversation,
                    commit_seq,
                },
            ) => {
                let stream = StreamId::Conversation(*conversation);
                let from_seq = Seq::new(commit_seq.get() + 1).unwrap_or(Seq::FIRST);
                let past = self
                    .store
                    .cursor(&stream)?
                    .is_some_and(|c| c.next_seq > *commit_seq);
                let held = !past
                    && self.hold_requests
                    && !self.knows(&entry.sender.system, conversation)?;
                if held {
                    // Nothing is joined or answered: the user decides (SPEC.md 10.5).
                    self.store.hold_request(&InvitationRequest {
                        conversation: *conversation,
                        inviter: entry.sender,
                        commit_seq: *commit_seq,
                        welcome: entry.payload.as_bytes().to_vec(),
                        received: entry.accepted_ms,
                    })?;
                    outcome = EntryOutcome::Requested;
                }
                let joined = !past
                    && !held
                    && match self.engine.join(entry.payload.as_bytes()) {
                        Ok(group) => group == *conversation,
                        // The join happened before a crash kept the store from recording
                        // it (the KeyPackage is consumed now): the group is there.
                        Err(_) => member(&*self.engine, conversation, self.device)?,
                    };
                if joined {
                    let record = self.joined_record(conversation, entry.sender.system)?;
                    // The group starts after the Commit that added this device.
                    self.store.join_conversation(&record, from_seq, seq)?;
                    self.subscribe(stream, Some(from_seq))?;
                    outcome = EntryOutcome::Applied;
                }
                // Otherwise the Welcome is one this device cannot use (already past it, or
                // not decryptable), or one held as a request: recorded as processed so it
                // is not retried.
            }
            (StreamId::Conversation(c), EntryBody::Application { .. }) => {
                let mut unreadable = None;
                // Who sent it is what MLS says, not the gateway's label (SPEC.md 7.8).
                let mut author = entry.sender;
                let own = self.is_own(&entry)?;
                let body = if own {
                    // One's own message, recognised by its msg_id and its very bytes: the
                    // plaintext kept in the outbox.
                    author = self.device;
                    // Bytes sent without a plaintext (`send_raw`) have nothing to show.
                    self.store.outbox_plaintext(&entry.msg_id)?
                } else {
                    // Journaled by the engine until the store below holds it, so a crash in
                    // between does not lose it (its key is gone once it is decrypted).
                    journaled = Some(c);
                    let cached = self.decrypted.get(entry.payload.as_bytes()).cloned();
                    let processed = match cached {
                        Some((sender, plaintext)) => {
                            Ok(Processed::Application { sender, plaintext })
                        }
                        None => self
                            .engine
                            .process_entry(&c, seq.get(), entry.payload.as_bytes()),
                    };
                    match processed {
                        Ok(Processed::Application { plaintext, sender }) => {
                            if self.faults.reuse_decrypted_payloads {
                                self.decrypted.insert(
                                    entry.payload.as_bytes().to_vec(),
                                    (sender, plaintext.clone()),
                                );
                            }
                            author = sender;
                            Some(plaintext)
                        }
                        Ok(_) => {
                            unreadable = Some("not an application message".to_owned());
                            None
                        }
                        // The state could not be read or written: nothing is recorded, the
                        // entry is processed again.
                        Err(e @ EngineError::Storage(_)) => return Err(e.into()),
                        Err(e) if self.faults.stop_at_unreadable => return Err(e.into()),
                        // Anything else is the message's own fault: recorded as unreadable
                        // with its reason, and the stream goes on (never wedged on it).
                        Err(e) => {
                            unreadable = Some(unreadable_reason(&e));
                            None
                        }
                    }
                };
                if self.faults.trust_gateway_sender {
                    author = entry.sender;
                }
                if !own
                    && entry.sender == self.device
                    && unreadable.is_some()
                    && !self.store.holds_message(&c, &entry.msg_id)?
                {
                    // Sent under this device's name but not from this device's outbox:
                    // another copy of this device's files sends too (its MLS state is this
                    // one's old state: what the two send reuses keys), or the gateway made
                    // it up. Said as such, not as a stranger's garbage.
                    let reason = "sent in this device's name, not by it: a copy of this \
                                  device's files is in use elsewhere (stop using one of them), \
                                  or the gateway forged it";
                    unreadable = Some(reason.to_owned());
                    // The keys this device sends with are known elsewhere: it stops sending
                    // until a resync gives it new ones (SPEC.md 7.10).
                    self.store.set_forked(&c, seq, reason)?;
                }
                if body.is_some() {
                    outcome = EntryOutcome::Shown;
                } else if unreadable.is_some() {
                    outcome = EntryOutcome::Undecryptable;
                }
                // A label that disagrees with MLS is the gateway's fault: the message is
                // shown as its author's and flagged with the label (REQ-7.8-1).
                let relabelled = (body.is_some() && author != entry.sender).then_some(entry.sender);
                if relabelled.is_some() {
                    self.observed(|o| o.relabelled += 1);
                }
                // The content's number tells whether the author's earlier messages all
                // arrived (SPEC.md 7.9); one's own and a legacy plaintext have none to judge.
                let content = body
                    .as_deref()
                    .and_then(confab_spec::content::AppContent::open);
                let counter = content.as_ref().map(|c| c.counter);
                let irregular = match (counter, own || self.faults.ignore_missing_messages) {
                    (Some(n), false) => self.irregular(&c, &author, n)?,
                    _ => None,
                };
                if irregular.is_some() {
                    self.observed(|o| o.irregular += 1);
                }
                let body = match content {
                    Some(content) => Some(content.text),
                    None => body,
                };
                message = match (body, unreadable) {
                    (Some(body), _) => Some(Message {
                        conversation: c,
                        seq,
                        sender: author,
                        msg_id: entry.msg_id,
                        accepted: entry.accepted_ms,
                        body,
                        unreadable: None,
                        gateway_sender: relabelled,
                        counter,
                        irregular,
                    }),
                    (None, Some(reason)) => {
                        Some(unreadable_message(c, &entry, entry.sender, reason))
                    }
                    (None, None) => None,
                };
            }
            (StreamId::Conversation(c), EntryBody::Proposal { .. }) => {
                // A proposal is verified by MLS (signature, membership tag, a member's)
                // and not kept: Commits carry every proposal by value (REQ-7.3-3). A Remove
                // of a device of the proposer's own user is a leave request (SPEC.md 10.3),
                // kept until a Commit removes that device; the proposer is the one MLS
                // authenticated, never the gateway's label (REQ-7.8-2).
                outcome = EntryOutcome::Applied;
                let proposer = if self.faults.trust_gateway_proposals {
                    Ok(Some(entry.sender))
                } else if self.is_own(&entry)? {
                    // This device's own leave request, by its bytes: nothing to verify.
                    self.accepted_commits.remove(&entry.msg_id);
                    Ok(Some(self.device))
                } else {
                    self.engine.verify_proposal(&c, entry.payload.as_bytes())
                };
                match proposer {
                    Ok(proposer) => {
                        if let (Some(proposer), Ok((_, CommitProposal::Remove { leaf }))) = (
                            proposer,
                            mls_framing::proposal_contents(entry.payload.as_bytes()),
                        ) {
                            let target = self
                                .engine
                                .members(&c)?
                                .into_iter()
                                .find(|(l, _)| *l == leaf)
                                .map(|(_, d)| d);
                            if let Some(device) = target.filter(|d| d.system == proposer.system) {
                                self.store.add_leave_request(&c, &device)?;
                            }
                        }
                    }
                    Err(e @ EngineError::Storage(_)) => return Err(e.into()),
                    // The echo of this device's own leave request, read by a later process
                    // (an engine may refuse to process its own message): known already.
                    Err(_)
                        if entry.sender == self.device
                            && self.store.leave_requests(&c)?.contains(&self.device) => {}
                    Err(e) => {
                        // Nothing is done on it; the user is told (SPEC.md 6.8).
                        outcome = EntryOutcome::Undecryptable;
                        message = Some(unreadable_message(
                            c,
                            &entry,
                            entry.sender,
                            format!(
                                "a request to change the group that MLS does not confirm ({}); ignored",
                                unreadable_reason(&e)
                            ),
                        ));
                    }
                }
            }
            (StreamId::Conversation(c), EntryBody::Commit { epoch })
                if epoch.0 < self.engine.epoch(&c)? =>
            {
                // The group is past this epoch: the entry was applied before the store
                // recorded it (a crash between the two). Applying it again would fail and
                // stall the stream; it is recorded as processed.
            }
            (StreamId::Conversation(c), EntryBody::Commit { .. }) => {
                outcome = EntryOutcome::Applied;
                // One's own Commit is the one the outbox holds, byte for byte; any other
                // goes through MLS, whoever the gateway says made it (SPEC.md 7.8).
                let own = self.is_own(&entry)?;
                if own {
                    self.accepted_commits.remove(&entry.msg_id);
                    // Applied when the gateway accepted it; after a crash in between, now.
                    if self.engine.has_pending_commit(&c)? {
                        self.engine.merge_pending_commit(&c)?;
                    }
                    // A Commit an earlier process sent has its outcome.
                    self.resent.remove(&entry.msg_id);
                    self.store.outbox_remove(&entry.msg_id)?;
                } else {
                    // The gateway accepted this Commit for the epoch: a pending Commit of
                    // our own for the same epoch has lost and is discarded (SPEC.md 7.3).
                    if self.engine.has_pending_commit(&c)? {
                        self.engine.discard_pending_commit(&c)?;
                    }
                    // A room's Commit is checked against the room rules (SPEC.md 10.5) on
                    // the roles and leave requests from before it.
                    let before = rooms::roles_in(&*self.engine, &c)?;
                    let leaving = match before {
                        Some(_) => self.store.leave_requests(&c)?,
                        None => Vec::new(),
                    };
                    let processed = match self.engine.process(&c, entry.payload.as_bytes()) {
                        Ok(processed) => Some(processed),
                        Err(e @ EngineError::Storage(_)) => return Err(e.into()),
                        Err(e) if self.faults.stop_at_unreadable => return Err(e.into()),
                        Err(e) => {
                            // The gateway sequenced a Commit this device cannot apply: the
                            // group has forked here. Recorded, shown, and the stream goes
                            // on; nothing more is sent into it (SPEC.md 7.7).
                            let reason = unreadable_reason(&e);
                            self.store.set_forked(&c, seq, &reason)?;
                            message = Some(unreadable_message(
                                c,
                                &entry,
                                entry.sender,
                                format!(
                                    "a change to the group could not be applied ({reason}); \
                                     this conversation has forked"
                                ),
                            ));
                            outcome = EntryOutcome::Forked;
                            None
                        }
                    };
                    if let Some(Processed::Commit {
                        sender,
                        self_removed,
                        added,
                        removed,
                        ..
                    }) = &processed
                    {
                        if let (Some(before), false) = (&before, *self_removed) {
                            // The committer is the member MLS authenticated (REQ-7.8-3).
                            let committer = if self.faults.accept_rule_breaking_commits {
                                Some(entry.sender)
                            } else {
                                *sender
                            };
                            let verdict = match committer {
                                Some(committer) => rooms::check_processed(
                                    &*self.engine,
                                    &c,
                                    &rooms::Change {
                                        committer: committer.system,
                                        before,
                                        added,
                                        removed,
                                        leaving: &leaving,
                                    },
                                )?,
                                None => Err("a Commit by a non-member".to_owned()),
                            };
                            if let Err(rule) = verdict {
                                self.observed(|o| o.governance_faults.push(rule.clone()));
                                if !self.faults.accept_rule_breaking_commits {
                                    // The gateway sequenced what it must refuse: the
                                    // members that check, and those that do not, no
                                    // longer agree on the room. A fork (REQ-7.8-3).
                                    let reason = format!(
                                        "a change to the room that breaks its rules ({rule}), which the gateway should have refused"
                                    );
                                    self.store.set_forked(&c, seq, &reason)?;
                                    message = Some(unreadable_message(
                                        c,
                                        &entry,
                                        committer.unwrap_or(entry.sender),
                                        format!("{reason}; this conversation has forked"),
                                    ));
                                    outcome = EntryOutcome::Forked;
                                }
                            }
                        }
                        if *self_removed {
                            // Removed: the gateway ends the subscription after this entry.
                            self.store.set_removed(&c)?;
                            outcome = EntryOutcome::Removed;
                        }
                    }
                }
                // A leave request ends with the Commit that removes its device: a device
                // added back later is not removed again on an old request (SPEC.md 10.3).
                if outcome == EntryOutcome::Applied && !self.store.leave_requests(&c)?.is_empty() {
                    let members: Vec<DeviceId> = self
                        .engine
                        .members(&c)?
                        .into_iter()
                        .map(|(_, d)| d)
                        .collect();
                    self.store.retain_leave_requests(&c, &members)?;
                }
            }
            _ => {}
        }
        // A Welcome's join recorded the inbox entry with the conversation already.
        let joined = matches!(stream, StreamId::Inbox) && outcome == EntryOutcome::Applied;
        let group = match (stream, &entry.body) {
            (StreamId::Conversation(c), _) => Some(c),
            (StreamId::Inbox, EntryBody::Welcome { conversation, .. }) => Some(*conversation),
            _ => None,
        };
        let epoch_after = match (&self.observer, group) {
            (Some(_), Some(c)) => self.engine.epoch(&c).ok(),
            _ => None,
        };
        let record = self.observer.is_some().then_some(EntryRecord {
            epoch_after,
            stream,
            seq,
            msg_id: entry.msg_id,
            sender: entry.sender,
            kind: entry.body,
            new: false,
            outcome,
        });
        if let Some(batch) = self.receive_batch.as_mut() {
            // Recorded, shown and acknowledged with the rest of the batch: a message is
            // shown once it is durable, so a crash before that shows it once, after.
            let full = batch.add(receive_batch::Delivery {
                stream,
                seq,
                message,
                record,
                journaled,
            });
            if full {
                self.end_receive_batch()?;
            }
            return Ok(());
        }
        let new = self.store.deliver(&stream, seq, message.as_ref())? || joined;
        self.record_delivery(new, message, record);
        if let Some(c) = journaled {
            self.engine.release_processed(&c, seq.get())?;
        }
        self.acknowledge(stream, seq)
    }

    /// What the number `counter` of a message from `sender` says of the sender's messages
    /// before it (REQ-7.9-2): against the highest read before, stored or in the open
    /// receive batch.
    fn irregular(
        &self,
        conversation: &ConversationId,
        sender: &DeviceId,
        counter: u64,
    ) -> Result<Option<crate::store::Irregular>, ClientError> {
        use confab_spec::content::{CounterCheck, check_counter};
        let stored = self.store.sender_counter(conversation, sender)?;
        let batched = self.receive_batch.as_ref().and_then(|b| {
            b.deliveries
                .iter()
                .filter_map(|d| d.message.as_ref())
                .filter(|m| m.conversation == *conversation && m.sender == *sender)
                .filter_map(|m| m.counter)
                .max()
        });
        let highest = stored.max(batched);
        Ok(match check_counter(highest, counter) {
            CounterCheck::First | CounterCheck::Next => None,
            CounterCheck::Missing(n) => Some(crate::store::Irregular::Missing(n)),
            CounterCheck::Stale => Some(crate::store::Irregular::Stale),
        })
    }

    /// Whether `entry` is this device's own message: one it holds in its outbox, or a Commit
    /// the gateway accepted, with the same msg_id and the very same bytes. The gateway's
    /// label plays no part (REQ-7.8-1).
    fn is_own(&self, entry: &Entry) -> Result<bool, ClientError> {
        if self.faults.trust_gateway_sender {
            return Ok(entry.sender == self.device);
        }
        let payload = entry.payload.as_bytes();
        Ok(self
            .accepted_commits
            .get(&entry.msg_id)
            .is_some_and(|p| p.as_slice() == payload)
            || self.store.outbox_holds(&entry.msg_id, payload)?)
    }

    /// Shows a recorded entry's message if it is `new`, and reports the entry.
    fn record_delivery(
        &mut self,
        new: bool,
        message: Option<Message>,
        record: Option<EntryRecord>,
    ) {
        if let (true, Some(m)) = (new, message) {
            self.received.push(m);
        }
        if let Some(record) = record {
            self.observed(|o| o.log.push(EntryRecord { new, ..record }));
        }
    }

    fn acknowledge(&mut self, stream: StreamId, seq: Seq) -> Result<(), ClientError> {
        self.input(Input::Ack { stream, seq })?;
        self.store.set_acked(&stream, seq)?;
        Ok(())
    }

    /// Opens a receive batch, unless one is open.
    fn begin_receive_batch(&mut self) -> Result<(), ClientError> {
        // Also when the client's batch is open: an engine operation in between (a Commit
        // sent meanwhile) ended the engine's, and the entries after it belong in one too.
        self.engine.begin_receive_batch()?;
        if self.receive_batch.is_none() {
            self.receive_batch = Some(receive_batch::ReceiveBatch::open(
                self.now(),
                self.receive_batch_limits,
            ));
        }
        Ok(())
    }

    /// Ends the open receive batch: records its entries in the store (one transaction),
    /// releases their journaled outcomes, writes the engine's state, then acknowledges the
    /// entries (REQ-6.5-3). Nothing without a batch.
    ///
    /// In this order a crash loses nothing: before the store's write the engine's durable
    /// state (or, if an operation ended the engine's batch early, its journal) still
    /// yields the messages, and the unacknowledged entries come again.
    fn end_receive_batch(&mut self) -> Result<(), ClientError> {
        let Some(batch) = self.receive_batch.take() else {
            return Ok(());
        };
        let new = self.store.deliver_all(
            batch
                .deliveries
                .iter()
                .map(|d| (d.stream, d.seq, d.message.as_ref())),
        )?;
        for d in &batch.deliveries {
            if let Some(c) = &d.journaled {
                self.engine.release_processed(c, d.seq.get())?;
            }
        }
        self.engine.end_receive_batch()?;
        let acks = batch.acks();
        for (delivery, new) in batch.deliveries.into_iter().zip(new) {
            self.record_delivery(new, delivery.message, delivery.record);
        }
        for (stream, seq) in acks {
            self.acknowledge(stream, seq)?;
        }
        Ok(())
    }
}

/// The record of an entry of conversation `c` that could not be read or applied, shown in
/// its place with `reason` (SPEC.md 6.8); `sender` is whom it is attributed to.
fn unreadable_message(
    c: ConversationId,
    entry: &Entry,
    sender: DeviceId,
    reason: String,
) -> Message {
    Message {
        conversation: c,
        seq: entry.seq,
        sender,
        msg_id: entry.msg_id,
        accepted: entry.accepted_ms,
        body: Vec::new(),
        unreadable: Some(reason),
        gateway_sender: None,
        counter: None,
        irregular: None,
    }
}

/// Whether `device` is a member of `group` in `engine`'s view (false without the group).
fn member(
    engine: &dyn MlsEngine,
    group: &ConversationId,
    device: DeviceId,
) -> Result<bool, EngineError> {
    match engine.members(group) {
        Ok(members) => Ok(members.iter().any(|(_, d)| *d == device)),
        Err(EngineError::GroupNotFound | EngineError::Removed) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether `payload` is a PublicMessage of `group` (by its group id).
fn is_commit_of(payload: &[u8], group: &ConversationId) -> bool {
    matches!(
        confab_spec::mls_framing::peek(payload),
        Ok(confab_spec::mls_framing::Peek::Framed(f)) if f.group_id == group.0
    )
}

/// Whether an outbox payload is a Commit (a PublicMessage of content type commit).
fn is_commit(payload: &[u8]) -> bool {
    matches!(
        confab_spec::mls_framing::peek(payload),
        Ok(confab_spec::mls_framing::Peek::Framed(f))
            if f.content_type == confab_spec::mls_framing::ContentType::Commit
    )
}
