//! A device host: the reference client (`confab_client::app::Client`, its session, MLS
//! engine and SQLite store) on simulated TCP, a simulated clock and seeded randomness.
//! It runs the commands the orchestrator sends and reports everything it processes to the
//! [`World`](crate::world::World)'s checker. A crash drops the client mid-flight; the
//! restarted software reopens the same files, as a restarted app would.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use confab_client::app::receive_batch::ReceiveBatchLimits;
use confab_client::app::{Client, ClientError, Observer, Woken};
use confab_client::environment::{Dialing, Entropy, Environment, Io};
use confab_client::mls::signature_memo::SignatureMemo;
use confab_client::mls::unwritten::StateWriteWindow;
use confab_client::mls::{EngineKind, open_engine_with};
use confab_client::store::ClientStore;
use confab_client::transport::Transport;
use confab_spec::identity::{DeviceKeyPair, SystemKeyPair};
use confab_spec::ids::{ConversationId, DeviceId, ProcessId, UnixMs};
use confab_spec::session::{ClientSession, DeviceCredentials, SessionConfig};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore as _, SeedableRng as _};
use tokio::sync::mpsc;

use crate::check::Violation;
use crate::workers::Workers;
use crate::world::{Command, Shared};

/// The gateway's host name and port in the simulation.
pub const GATEWAY_HOST: &str = "gateway";
/// The gateway's port.
pub const GATEWAY_PORT: u16 = 443;

/// The simulated wall clock: the simulation's epoch plus its elapsed time (on a worker,
/// the time its job was handed over at: [`crate::workers`]).
pub fn sim_now() -> UnixMs {
    let now = turmoil::since_epoch().or_else(crate::workers::frozen_since_epoch);
    UnixMs(now.map_or(0, |d| d.as_millis() as u64))
}

/// Milliseconds of simulated time since the start (on a worker, at the time its job was
/// handed over).
pub fn sim_ms() -> u64 {
    let elapsed = turmoil::sim_elapsed().or_else(crate::workers::frozen_elapsed);
    elapsed.map_or(0, |d| d.as_millis() as u64)
}

/// Events a device host takes from its transport for one job on a worker (the soak's
/// receive batches hold up to 512 entries).
const EVENTS_PER_JOB: usize = 512;

/// Randomness from a seed, shareable across threads (the environment types require it).
pub fn seeded_entropy(seed: [u8; 32]) -> Entropy {
    let rng = Mutex::new(ChaCha20Rng::from_seed(seed));
    Arc::new(move |out: &mut [u8]| {
        if let Ok(mut rng) = rng.lock() {
            rng.fill_bytes(out);
        }
    })
}

/// A 32-byte seed for `what` from the run's seed.
pub fn derive_seed(seed: u64, what: &str, n: u64) -> [u8; 32] {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    hasher.update(seed.to_le_bytes());
    hasher.update(what.as_bytes());
    hasher.update(n.to_le_bytes());
    hasher.finalize().into()
}

/// The system key of user `user` (users are numbered from 0).
pub fn user_key(user: usize) -> SystemKeyPair {
    SystemKeyPair::from_seed(&derive_seed(0, "user", user as u64))
}

/// What a device host is.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// Its index in the world.
    pub index: usize,
    /// Its user.
    pub user: usize,
    /// Its MLS engine.
    pub engine: EngineKind,
    /// Where its files live (kept across crashes).
    pub dir: PathBuf,
    /// The run's seed.
    pub seed: u64,
    /// The gateway origin.
    pub origin: String,
    /// Its certificate's validity.
    pub valid_from: UnixMs,
    /// Its certificate's expiry.
    pub valid_until: UnixMs,
    /// The session's reconnect backoff base (SPEC.md 5.8).
    pub backoff_base_ms: u64,
    /// The session's reconnect backoff cap.
    pub backoff_cap_ms: u64,
    /// KeyPackages to upload at the start.
    pub key_packages: u64,
    /// When its client's receive batches end.
    pub receive_batch: ReceiveBatchLimits,
    /// How long its client's receive batches may leave the MLS state unwritten.
    pub state_write_window: StateWriteWindow,
    /// Signatures checked once for all devices, if the scenario shares them.
    pub signatures: Option<Arc<SignatureMemo>>,
    /// Messages its client keeps per conversation (`None`: all).
    pub keep_messages: Option<NonZeroU32>,
    /// Where its client's synchronous work runs, if the scenario hands it to workers
    /// ([`crate::workers`]); `None`: inline, as each event arrives.
    pub workers: Option<Arc<Workers>>,
}

impl DeviceSpec {
    pub(crate) fn credentials(&self) -> DeviceCredentials {
        let system = user_key(self.user);
        let key = DeviceKeyPair::from_seed(&derive_seed(0, "device", self.index as u64));
        let mut process = [0u8; 16];
        process[..8].copy_from_slice(&(self.index as u64).to_le_bytes());
        let certificate = system.issue_certificate(
            ProcessId(process),
            key.public(),
            self.valid_from,
            self.valid_until,
        );
        DeviceCredentials { key, certificate }
    }

    /// The device's id.
    pub fn id(&self) -> DeviceId {
        self.credentials().certificate.device_id()
    }

    fn open(&self, incarnation: u32) -> Result<(Client, Observer), String> {
        let n = (self.index as u64) << 32 | u64::from(incarnation);
        let jitter = u64::from_le_bytes(
            derive_seed(self.seed, "jitter", n)[..8]
                .try_into()
                .unwrap_or_default(),
        );
        let mut client = sim_client(&ClientParts {
            credentials: self.credentials(),
            engine: self.engine,
            dir: &self.dir,
            origin: &self.origin,
            backoff_base_ms: self.backoff_base_ms,
            backoff_cap_ms: self.backoff_cap_ms,
            jitter,
            entropy: derive_seed(self.seed, "device", n),
            signatures: self.signatures.clone(),
            keep_messages: self.keep_messages,
        })?;
        client.set_receive_batch_limits(self.receive_batch);
        client.set_state_write_window(self.state_write_window);
        let observer = client.observe();
        Ok((client, observer))
    }
}

/// What a simulated client is made of.
pub struct ClientParts<'a> {
    /// Its device key and certificate.
    pub credentials: DeviceCredentials,
    /// Its MLS engine.
    pub engine: EngineKind,
    /// Where its files live.
    pub dir: &'a std::path::Path,
    /// The gateway origin.
    pub origin: &'a str,
    /// The session's reconnect backoff base (SPEC.md 5.8).
    pub backoff_base_ms: u64,
    /// The session's reconnect backoff cap.
    pub backoff_cap_ms: u64,
    /// The session's backoff jitter seed.
    pub jitter: u64,
    /// The seed of its randomness (msg_ids, nonces).
    pub entropy: [u8; 32],
    /// Signatures checked once for all devices, if the scenario shares them.
    pub signatures: Option<Arc<SignatureMemo>>,
    /// Messages it keeps per conversation (`None`: all).
    pub keep_messages: Option<NonZeroU32>,
}

/// A reference client on simulated TCP, the simulated clock and seeded randomness, with
/// its files in `parts.dir`.
pub fn sim_client(parts: &ClientParts<'_>) -> Result<Client, String> {
    let engine = open_engine_with(
        parts.engine,
        &parts.dir.join("mls.db"),
        parts.credentials.clone(),
        Arc::new(sim_now),
        parts.signatures.clone(),
    )
    .map_err(|e| format!("engine: {e}"))?;
    let mut store =
        ClientStore::open(&parts.dir.join("client.db")).map_err(|e| format!("store: {e}"))?;
    store.set_message_retention(parts.keep_messages);
    let mut config = SessionConfig::new(parts.origin.to_owned());
    config.backoff_base_ms = parts.backoff_base_ms;
    config.backoff_cap_ms = parts.backoff_cap_ms;
    let session = ClientSession::new(config, parts.credentials.clone(), parts.jitter);
    let env = Environment {
        clock: Arc::new(sim_now),
        entropy: seeded_entropy(parts.entropy),
        dialer: Arc::new(|host: String, port: u16| -> Dialing {
            Box::pin(async move {
                let stream = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
                Ok(Box::new(stream) as Box<dyn Io>)
            })
        }),
    };
    let url = format!("{}/v1/ws", parts.origin);
    Ok(Client::new(
        Transport::with_environment(session, url, env),
        engine,
        store,
    ))
}

/// The device host's software: runs until crashed (or until a violation was found).
pub async fn run_device(world: Shared, spec: Rc<DeviceSpec>) -> turmoil::Result {
    let i = spec.index;
    let (commands, mut inbox) = mpsc::unbounded_channel();
    let incarnation = {
        let mut w = world.borrow_mut();
        let slot = &mut w.devices[i];
        slot.incarnation += 1;
        slot.ready = false;
        slot.busy = false;
        // A crash may have come while the client was on a worker.
        slot.handed_over = false;
        slot.commands = Some(commands);
        slot.id = Some(spec.id());
        slot.incarnation
    };
    let (mut client, observer) = loop {
        let (mut client, observer) = spec.open(incarnation)?;
        match client.connect().await {
            Ok(()) => break (client, observer),
            // The gateway is down: try again later, as an app would.
            Err(ClientError::Unreachable(_)) => {
                drop(client);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return fail(&world, i, format!("connect: {e}")),
        }
    };
    while !world.borrow().devices[i].set_up {
        match client.top_up_key_packages(spec.key_packages).await {
            Ok(_) => world.borrow_mut().devices[i].set_up = true,
            Err(ClientError::Interrupted) => {}
            Err(e) => return fail(&world, i, format!("KeyPackage upload: {e}")),
        }
    }
    let mut seen = 0;
    loop {
        report(&world, i, &observer, &mut seen);
        report_client(&world, i, &mut client);
        if world.borrow().violation.is_some() {
            return Ok(());
        }
        enum Step {
            Command(Option<Command>),
            Pumped(Result<Option<Woken>, ClientError>),
        }
        // With workers the host only waits here, and the work is handed over below.
        let pumped = async {
            match spec.workers {
                None => client.pump().await.map(|()| None),
                Some(_) => client.wait(EVENTS_PER_JOB).await.map(Some),
            }
        };
        // `Client::pump` and `Client::wait` are cancel-safe: a command may interrupt them.
        let step = tokio::select! {
            biased;
            command = inbox.recv() => Step::Command(command),
            result = pumped => Step::Pumped(result),
        };
        match step {
            Step::Command(None) => return Ok(()),
            Step::Command(Some(command)) => {
                world.borrow_mut().devices[i].busy = true;
                // What the client processes meanwhile is reported as it happens.
                let reporter = async {
                    loop {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        report(&world, i, &observer, &mut seen);
                    }
                };
                let (back, result) = tokio::select! {
                    biased;
                    done = execute(&world, &spec, client, command) => done,
                    () = reporter => return fail(&world, i, "the reporter stopped".to_owned()),
                };
                client = back;
                world.borrow_mut().devices[i].busy = false;
                if let Err(e) = result {
                    return fail(&world, i, e);
                }
            }
            Step::Pumped(Ok(None)) => {}
            Step::Pumped(Ok(Some(woken))) => {
                let (back, result) =
                    hand_over(&world, &spec, client, Job::Work, move |c| c.work(woken)).await;
                client = back;
                if let Err(e) = result {
                    return fail(&world, i, format!("client: {e}"));
                }
            }
            Step::Pumped(Err(e)) => return fail(&world, i, format!("client: {e}")),
        }
    }
}

/// Records a client failure as a violation; the run stops on it.
fn fail(world: &Shared, device: usize, what: String) -> turmoil::Result {
    world.borrow_mut().check(Err(Violation::new(
        "no client error",
        format!("device {device}: {what}"),
    )));
    Ok(())
}

/// Reports what the client's observer recorded since the last report (entries processed,
/// connection state, resumes) to the checker and the trace.
fn report(world: &Shared, i: usize, observer: &Observer, seen_readies: &mut u64) {
    if world.borrow().devices[i].handed_over {
        return;
    }
    let Ok(mut observed) = observer.lock() else {
        return;
    };
    let log = std::mem::take(&mut observed.log);
    let (ready, readies) = (observed.ready, observed.readies);
    let (duplicates, duplicate_msg_ids, gaps, lost) = (
        observed.duplicates,
        observed.duplicate_msg_ids,
        observed.gaps,
        observed.lost_deliveries,
    );
    let governance_faults = std::mem::take(&mut observed.governance_faults);
    drop(observed);
    let mut guard = world.borrow_mut();
    let w = &mut *guard;
    let now = sim_ms();
    if duplicates > 0 {
        w.check(Err(Violation::new(
            "no entry delivered twice",
            format!("device {i} was sent {duplicates} entries again on a connection (REQ-6.4-4)"),
        )));
    }
    if duplicate_msg_ids > 0 {
        w.check(Err(Violation::new(
            "each message appended once",
            format!("device {i} got {duplicate_msg_ids} msg_ids again under new seqs (REQ-6.3-2)"),
        )));
    }
    if gaps > lost {
        // The session repairs a gap by asking for a replay, so it would stay invisible to
        // the user; but a gateway never leaves one on a connection (REQ-6.4-1, REQ-6.4-4).
        // Gaps made on purpose (frames the device was told to lose) do not count.
        w.check(Err(Violation::new(
            "gap-free, duplicate-free delivery",
            format!(
                "device {i}'s session found {gaps} gaps in what the gateway sent, {lost} made on purpose (REQ-6.4-1)"
            ),
        )));
    }
    if let Some(rule) = governance_faults.first() {
        w.check(Err(Violation::new(
            "room rules hold",
            format!("device {i} processed a room Commit the gateway accepted that breaks {rule}"),
        )));
    }
    w.devices[i].gaps = gaps;
    for record in &log {
        w.trace.record(format_args!(
            "{now} d{i} {:?} {} {} {:?} {:?} {}",
            record.stream,
            record.seq.get(),
            hex::encode(record.msg_id.0),
            record.kind,
            record.outcome,
            record.new
        ));
        let result = w.checker.entry(i, record);
        w.check(result);
    }
    let slot = &mut w.devices[i];
    if readies > *seen_readies {
        let mut resumes = readies - *seen_readies;
        if !slot.connected_once {
            // The very first connect is not a resume.
            resumes -= 1;
            slot.connected_once = true;
        }
        slot.resumes += resumes;
        *seen_readies = readies;
    }
    slot.ready = ready;
}

/// Reports what only the client itself can tell: messages shown, and new epochs with their
/// authenticators.
fn report_client(world: &Shared, i: usize, client: &mut Client) {
    let received = client.take_received();
    let mut guard = world.borrow_mut();
    let w = &mut *guard;
    let now = sim_ms();
    // Unreadable entries are the checker's `entry` concern (their outcome); only messages
    // shown with a text are checked against what was composed.
    for m in received.iter().filter(|m| m.unreadable.is_none()) {
        let result = w
            .checker
            .shown(i, m.conversation, m.seq.get(), m.sender, &m.body);
        w.check(result);
    }
    let conversations: Vec<_> = w.conversations.clone();
    for c in conversations {
        // A removed device's group state is no member's view any more.
        if w.checker.is_removed(i, &c) {
            continue;
        }
        let Ok(epoch) = client.engine().epoch(&c) else {
            continue;
        };
        if w.devices[i].epochs.get(&c) == Some(&epoch) {
            continue;
        }
        w.devices[i].epochs.insert(c, epoch);
        if let Ok(authenticator) = client.engine().epoch_authenticator(&c) {
            w.trace
                .record(format_args!("{now} d{i} epoch {c:?} {epoch}"));
            let result = w.checker.epoch(i, c, epoch, authenticator);
            w.check(result);
        }
    }
}

/// What a job handed to a worker is, which sets how long its device sleeps meanwhile.
#[derive(Clone, Copy)]
enum Job {
    /// Handling received events: [`crate::workers::Workers::sleep`].
    Work,
    /// Encrypting a send: [`crate::workers::Workers::send_sleep`].
    Send,
}

/// Runs `job` on `client` on a worker if the scenario has them (sleeping the workers'
/// fixed delay for that kind of job meanwhile), else here; gives the client back with the
/// job's result.
async fn hand_over<T: Send + 'static>(
    world: &Shared,
    spec: &DeviceSpec,
    mut client: Client,
    kind: Job,
    job: impl FnOnce(&mut Client) -> T + Send + 'static,
) -> (Client, T) {
    let Some(workers) = &spec.workers else {
        let result = job(&mut client);
        return (client, result);
    };
    // The reporter of a running command must not read the observer meanwhile.
    world.borrow_mut().devices[spec.index].handed_over = true;
    let pending = workers.run(move || {
        let result = job(&mut client);
        (client, result)
    });
    // Always the same simulated delay, however fast the worker is.
    let sleep = match kind {
        Job::Work => workers.sleep(),
        Job::Send => workers.send_sleep(),
    };
    tokio::time::sleep(sleep).await;
    let back = pending.wait();
    world.borrow_mut().devices[spec.index].handed_over = false;
    back
}

/// Runs one command; the client comes back with the outcome (a send's encryption may run
/// on a worker: [`hand_over`]).
async fn execute(
    world: &Shared,
    spec: &DeviceSpec,
    mut client: Client,
    command: Command,
) -> (Client, Result<(), String>) {
    let result = match command {
        Command::Send { conversation } => {
            let (back, result) = send(world, spec, client, conversation).await;
            client = back;
            result
        }
        command => execute_here(world, spec, &mut client, command).await,
    };
    (client, result)
}

/// `Command::Send`: a fresh message, encrypted on a worker if the scenario has them.
async fn send(
    world: &Shared,
    spec: &DeviceSpec,
    mut client: Client,
    conversation: ConversationId,
) -> (Client, Result<(), String>) {
    let i = spec.index;
    let body = {
        let mut w = world.borrow_mut();
        let slot = &mut w.devices[i];
        slot.composed += 1;
        let body = format!("m{i}.{}", slot.composed).into_bytes();
        w.checker.composed(spec.id(), body.clone());
        body
    };
    let composed = match client.ready_to_compose(conversation).await {
        Ok(()) => {
            let text = body.clone();
            let (back, composed) = hand_over(world, spec, client, Job::Send, move |c| {
                c.compose_text(conversation, &text)
            })
            .await;
            client = back;
            composed
        }
        Err(e) => Err(e),
    };
    let sent = match composed {
        Ok(composed) => client.send_composed(composed).await,
        Err(e) => Err(e),
    };
    let result = match sent {
        Ok(seq) => {
            let mut w = world.borrow_mut();
            let result = w.checker.accepted(conversation, seq.get(), &body);
            w.check(result);
            Ok(())
        }
        // Refused, or sent from a group this device was just removed from (the
        // orchestrator's view of membership can lag the device's).
        Err(
            ClientError::SendRefused { .. }
            | ClientError::Engine(confab_client::mls::EngineError::Removed),
        ) => {
            world.borrow_mut().devices[i].refused += 1;
            Ok(())
        }
        Err(e) => Err(format!("send: {e}")),
    };
    (client, result)
}

/// Every command but `Send`, on the client in place.
async fn execute_here(
    world: &Shared,
    spec: &DeviceSpec,
    client: &mut Client,
    command: Command,
) -> Result<(), String> {
    let i = spec.index;
    match command {
        Command::CreateDm { peer } => {
            let conversation = client
                .create_dm(peer)
                .await
                .map_err(|e| format!("create_dm: {e}"))?;
            let mut w = world.borrow_mut();
            w.devices[i].created.push(conversation);
            if !w.conversations.contains(&conversation) {
                w.conversations.push(conversation);
            }
        }
        // `execute` gives sends to `send`, which may hand the client over.
        Command::Send { .. } => return Err("a send runs through `send`".to_owned()),
        Command::Update { conversation } => {
            let lost_before = client.lost_commit_races();
            let result = client.update(conversation).await;
            let mut w = world.borrow_mut();
            let slot = &mut w.devices[i];
            slot.lost_races += u64::from(client.lost_commit_races() - lost_before);
            match result {
                Ok(_) => slot.commits += 1,
                Err(ClientError::SendRefused { .. }) => slot.refused += 1,
                Err(e) => return Err(format!("update: {e}")),
            }
        }
        Command::CreateRoom => {
            let room = client
                .create_room(&format!("room{i}"))
                .await
                .map_err(|e| format!("create_room: {e}"))?;
            let mut w = world.borrow_mut();
            w.devices[i].created.push(room);
            if !w.conversations.contains(&room) {
                w.conversations.push(room);
            }
        }
        Command::Invite { room, users } => {
            let result = client.invite_many(room, &users).await.map(|_| ());
            return allowed(world, i, result, "invite");
        }
        Command::RemoveMember { room, user } => {
            let result = client.remove_member(room, user).await.map(|_| ());
            return allowed(world, i, result, "remove_member");
        }
        Command::SetRole { room, user, role } => {
            let result = client.set_role(room, user, role).await.map(|_| ());
            return allowed(world, i, result, "set_role");
        }
        Command::LeaveRoom { room } => {
            let result = client.leave_room(room).await;
            return allowed(world, i, result, "leave_room");
        }
        Command::Sync => {
            let result = client.sync().await;
            return allowed(world, i, result, "sync");
        }
        Command::Drop => client.drop_connection(),
        Command::LoseDeliveries { n } => client.lose_deliveries(n),
        Command::Hostile { conversation, draw } => {
            let mut stash = std::mem::take(&mut world.borrow_mut().devices[i].hostile_stash);
            let key = spec.credentials().key;
            let result = crate::hostile::act(client, &key, conversation, draw, &mut stash).await;
            let mut w = world.borrow_mut();
            let slot = &mut w.devices[i];
            slot.hostile_stash = stash;
            slot.hostile_acts += 1;
            match result {
                Ok(crate::hostile::Answered::Refused) => slot.hostile_refused += 1,
                Ok(_) => {}
                Err(crate::hostile::ActError::Client(e)) => return Err(e),
                Err(crate::hostile::ActError::Gateway(e)) => {
                    w.check(Err(Violation::new(
                        "the gateway refuses forged handshakes",
                        format!("device {i}: {e}"),
                    )));
                    return Ok(());
                }
            }
        }
        Command::RemoveDevice { device } => {
            let result = client.remove_device(device).await;
            return allowed(world, i, result.map(|_| ()), "remove_device");
        }
        Command::AddDevice { device } => {
            let result = client.add_device(device).await;
            return allowed(world, i, result.map(|_| ()), "add_device");
        }
        Command::TopUp => {
            let result = client.top_up_key_packages(spec.key_packages).await;
            return allowed(world, i, result.map(|_| ()), "top_up_key_packages");
        }
    }
    world.borrow_mut().devices[i].last_ok = true;
    Ok(())
}

/// Records a membership command's result: done, refused for a reason the churn allows
/// (a lost race, no KeyPackage, a rate limit, a connection dropped mid-request; the
/// orchestrator tries again), or failed.
fn allowed(
    world: &Shared,
    i: usize,
    result: Result<(), ClientError>,
    what: &str,
) -> Result<(), String> {
    let mut w = world.borrow_mut();
    let slot = &mut w.devices[i];
    slot.last_ok = result.is_ok();
    match result {
        Ok(()) => Ok(()),
        Err(
            ClientError::SendRefused { .. }
            | ClientError::NoKeyPackages
            | ClientError::RateLimited { .. }
            | ClientError::Interrupted
            // Membership moved on under the command (a race the scenario makes on purpose):
            // removed meanwhile, or already leaving.
            | ClientError::NotInRoom
            | ClientError::Leaving
            | ClientError::Engine(confab_client::mls::EngineError::Removed),
        ) => {
            slot.refused += 1;
            Ok(())
        }
        Err(e) => Err(format!("{what}: {e}")),
    }
}
