//! The `confab` command line (the `confab` binary is [`main`]): chat from the command line.
//!
//! ```text
//! confab [--home DIR] [--server URL] [--engine openmls|mls-rs] [--ca-file PEM] [--json] <command>
//!   init [--import BACKUP | --link]   create an identity (or import a Polycentric one), or
//!                              a linked device that never holds the secret user key
//!   link [CERT]                on a linked device: show its request, or install its certificate
//!   whoami                     your user key (give it to contacts) and this device
//!   export                     print the identity's backup string (for a new device)
//!   device list | add DEVICE | remove DEVICE | revoke DEVICE | link REQUEST
//!   contacts add NAME KEY | list | remove NAME | verify NAME [--confirm]
//!   dm NAME                    start a DM with a contact
//!   room create ROOM | invite ROOM USER.. | remove ROOM USER.. | leave ROOM
//!        promote ROOM USER | demote ROOM USER | list | members ROOM
//!   send NAME|ROOM|CONVERSATION TEXT
//!   read [NAME|ROOM|CONVERSATION]   catch up and print messages
//!   watch                      print messages as they arrive; survives reconnects
//!   status                     connection, KeyPackage pool, pending outbox
//!   presence online | invisible | offline
//!   presence share NAME.. | unshare NAME.. | block NAME.. | unblock NAME.. | lists
//!   watch-presence [NAME..]    print contacts' presence and its changes
//!   invites show | everyone | allowed | allow NAME.. | disallow NAME..
//!   requests                   invitations from users you never talked with
//!   accept ID | decline ID     join an invitation, or forget it (nobody is told)
//! ```

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::app::{Client, ClientError};
use crate::faults::Faults;
use crate::home::{Home, HomeError, Settings};
use crate::store::{Irregular, Message};
use clap::{Parser, Subcommand};
use confab_spec::error::ErrorCode;
use confab_spec::frame::{ConversationKind, InvitePolicy, PresenceMode, PresenceState};
use confab_spec::identity::SystemKeyPair;
use confab_spec::ids::{ConversationId, DeviceId, ProcessId, Seq, SystemKey};
use confab_spec::rooms::Role;

/// Confab: end-to-end-encrypted chat on MLS for Polycentric identities.
#[derive(Parser)]
#[command(name = "confab", version, about)]
struct Cli {
    /// State directory of this device [default: $CONFAB_HOME, else ~/.confab].
    #[arg(long, global = true, env = "CONFAB_HOME")]
    home: Option<PathBuf>,
    /// The gateway's WebSocket URL [default: the one given at init, else
    /// ws://127.0.0.1:8080/v1/ws].
    #[arg(long, global = true, env = "CONFAB_SERVER")]
    server: Option<String>,
    /// MLS engine for a new device (init only): openmls or mls-rs [default: openmls].
    #[arg(long, global = true)]
    engine: Option<String>,
    /// PEM certificates to trust for a wss:// gateway besides the public roots, e.g. a
    /// private CA (init only; kept in the settings).
    #[arg(long, global = true)]
    ca_file: Option<PathBuf>,
    /// Print JSON (one object per line) instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create an identity and this device, or import an identity with --import.
    Init {
        /// A Polycentric backup string (polycentric://…).
        #[arg(long, conflicts_with = "link")]
        import: Option<String>,
        /// Make this a linked device: it gets its certificate from a device that holds
        /// your identity (`device link`) and never holds your secret user key.
        #[arg(long)]
        link: bool,
    },
    /// On a device made with `init --link`: with no argument, show its link request; with
    /// the certificate string `device link` printed, install it (also to renew it).
    Link {
        /// The certificate string (confab-cert:…).
        certificate: Option<String>,
    },
    /// Show your user key (share it with contacts) and this device.
    Whoami,
    /// Print this identity's Polycentric backup string. It holds your secret user key:
    /// use it only to set up another device with `confab init --import`.
    Export,
    /// Manage this user's devices.
    Device {
        #[command(subcommand)]
        action: DeviceAction,
    },
    /// Manage contacts.
    Contacts {
        #[command(subcommand)]
        action: ContactsAction,
    },
    /// Start a DM with a contact.
    Dm {
        /// The contact's name.
        name: String,
    },
    /// Invite-only rooms: you own the rooms you create; you and your admins invite.
    Room {
        #[command(subcommand)]
        action: RoomAction,
    },
    /// Send a message.
    Send {
        /// A contact with a DM, a room's name, or a conversation id (hex, or its start).
        to: String,
        /// The text.
        text: String,
    },
    /// Catch up and print messages.
    Read {
        /// A contact with a DM, a room's name, or a conversation id [default: all].
        conversation: Option<String>,
    },
    /// Print messages as they arrive (Ctrl-C stops).
    Watch,
    /// Show the connection, the KeyPackage pool and the outbox.
    Status,
    /// Your presence, and who may see it.
    Presence {
        #[command(subcommand)]
        action: PresenceAction,
    },
    /// Print the presence of contacts (default: all) and its changes (Ctrl-C stops).
    WatchPresence {
        /// Contacts (names or user keys).
        names: Vec<String>,
    },
    /// Who may start a DM with you or add you to a room (kept by the gateway).
    Invites {
        #[command(subcommand)]
        action: InvitesAction,
    },
    /// Invitations from users you never talked with, waiting for `accept` or `decline`.
    Requests,
    /// Join the conversation of an invitation request.
    Accept {
        /// The conversation id from `confab requests` (hex, or its start).
        id: String,
    },
    /// Forget an invitation request; nobody is told, not even the gateway.
    Decline {
        /// The conversation id from `confab requests` (hex, or its start).
        id: String,
    },
}

#[derive(Subcommand)]
enum InvitesAction {
    /// Show the policy and the allow list.
    Show,
    /// Anyone you do not block may invite you (the default); strangers' invitations wait
    /// in `confab requests`.
    Everyone,
    /// Only the users on your allow list may invite you; to anyone else you look like a
    /// key nobody holds.
    Allowed,
    /// Put users (contact names or user keys) on the allow list.
    Allow { names: Vec<String> },
    /// Take users off the allow list.
    Disallow { names: Vec<String> },
}

#[derive(Subcommand)]
enum PresenceAction {
    /// Show as online to the users you share presence with, while `watch` or
    /// `watch-presence` runs.
    Online,
    /// Show as offline to everyone (your last-seen stops), and still watch others.
    Invisible,
    /// Release this device's presence now.
    Offline,
    /// Let these users (contact names or user keys) see your presence.
    Share { names: Vec<String> },
    /// Stop sharing your presence with these users.
    Unshare { names: Vec<String> },
    /// Block these users: they see nothing of your presence.
    Block { names: Vec<String> },
    /// Unblock these users.
    Unblock { names: Vec<String> },
    /// Show who you share presence with and whom you block.
    Lists,
}

#[derive(Subcommand)]
enum RoomAction {
    /// Create a room; ROOM is your name for it (others name it as they like).
    Create { room: String },
    /// Invite users (contact names or user keys): their devices join the room. Owner and
    /// admins only.
    Invite { room: String, users: Vec<String> },
    /// Remove users from the room. The owner removes anyone, admins remove members.
    Remove { room: String, users: Vec<String> },
    /// Leave the room: a member commits your removal (you see it on your next command).
    Leave { room: String },
    /// Make a member an admin (owner only); with --owner, hand the room over to them.
    Promote {
        room: String,
        user: String,
        /// Make them the owner; you keep no role.
        #[arg(long)]
        owner: bool,
    },
    /// Make an admin a plain member again (owner only; an admin may demote itself).
    Demote { room: String, user: String },
    /// Your rooms: name, id, your role, members.
    List,
    /// A room's members and their roles.
    Members { room: String },
}

#[derive(Subcommand)]
enum DeviceAction {
    /// List your devices that the gateway knows (those that published KeyPackages).
    List,
    /// Add a new device to all your conversations. Set it up first with
    /// `confab --home NEW init --link` and `device link`; DEVICE is the id it prints.
    Add { device: String },
    /// Certify a new device from its link request (what `init --link` printed on it); prints
    /// the certificate string to give it. Only a device that holds your secret user key can.
    Link { request: String },
    /// Remove a device from all your conversations (it can be added again).
    Remove { device: String },
    /// Revoke a device for good (lost or stolen) and remove it from all conversations.
    Revoke { device: String },
}

#[derive(Subcommand)]
enum ContactsAction {
    /// Add a contact: a name of your choice and their user key (from `confab whoami`).
    Add { name: String, key: String },
    /// List contacts.
    List,
    /// Remove a contact.
    Remove { name: String },
    /// Show the safety number to compare with a contact out of band, and the contact's
    /// devices; with --confirm, mark the contact verified (the numbers matched).
    Verify {
        name: String,
        /// The numbers matched: remember the contact and its devices as verified.
        #[arg(long)]
        confirm: bool,
    },
}

/// A user error, printed without a backtrace.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{0}")]
    Home(#[from] HomeError),
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("cannot reach the gateway at {0} (is it running? is --server right?)")]
    Unreachable(String),
    #[error("{0}")]
    Usage(String),
}

const DEFAULT_SERVER: &str = "ws://127.0.0.1:8080/v1/ws";
/// KeyPackages kept in the directory for others to start DMs.
const POOL_TARGET: u64 = 20;

/// The `confab` command line on this process's arguments.
pub fn main() -> ExitCode {
    run_with_faults(std::env::args_os(), Faults::default())
}

/// The command line on `args` (the first is the program's name), with the deliberately
/// broken behaviours `faults` switched on (for the conformance suite's self-test; the
/// `confab` binary never turns one on).
pub fn run_with_faults(args: impl IntoIterator<Item = OsString>, faults: Faults) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let home = Home::new(cli.home.clone().unwrap_or_else(default_home)).with_faults(faults);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, home)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn default_home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".confab")
}

/// A device of this user, named by its id (32 hex digits, from `confab whoami`).
fn parse_device(user: SystemKey, s: &str) -> Result<DeviceId, CliError> {
    let process: [u8; 16] = hex::decode(s.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| CliError::Usage(format!("{s:?} is not a device id (32 hex digits)")))?;
    Ok(DeviceId {
        system: user,
        process: ProcessId(process),
    })
}

fn hex_key(key: &SystemKey) -> String {
    hex::encode(key.0)
}

fn parse_key(s: &str) -> Result<SystemKey, CliError> {
    let bytes = hex::decode(s.trim())
        .map_err(|_| CliError::Usage(format!("{s:?} is not a user key (64 hex digits)")))?;
    let key: [u8; 32] = bytes
        .try_into()
        .map_err(|_| CliError::Usage(format!("{s:?} is not a user key (64 hex digits)")))?;
    Ok(SystemKey(key))
}

/// A user named by a contact name or a user key.
fn user_of(client: &Client, name: &str) -> Result<SystemKey, CliError> {
    if let Some((_, key)) = client
        .store()
        .contacts()?
        .into_iter()
        .find(|(n, _)| n == name)
    {
        return Ok(key);
    }
    parse_key(name).map_err(|_| {
        CliError::Usage(format!(
            "{name:?} is neither a contact nor a user key (64 hex digits)"
        ))
    })
}

fn users_of(client: &Client, names: &[String]) -> Result<Vec<SystemKey>, CliError> {
    names.iter().map(|n| user_of(client, n)).collect()
}

/// A contact's name for a user key, or the key's start.
fn name_of(client: &Client, key: &SystemKey) -> String {
    client
        .store()
        .contacts()
        .ok()
        .and_then(|c| c.into_iter().find(|(_, k)| k == key))
        .map_or_else(|| hex_key(key)[..12].to_owned(), |(n, _)| n)
}

fn presence_name(state: PresenceState) -> &'static str {
    match state {
        PresenceState::Online => "online",
        PresenceState::WithinHour => "seen within the hour",
        PresenceState::Today => "seen today",
        PresenceState::ThisWeek => "seen this week",
        PresenceState::Longer => "not seen for a week or more",
        PresenceState::Unavailable => "shares no presence with you",
    }
}

fn print_presence(client: &Client, key: &SystemKey, state: PresenceState, json: bool) {
    let name = name_of(client, key);
    if json {
        println!(
            "{}",
            serde_json::json!({"user": hex_key(key), "name": name, "presence": state.name()})
        );
    } else {
        println!("{name}: {}", presence_name(state));
    }
}

/// Takes the lease the settings ask for (`confab presence online|invisible`); the client
/// renews it while the command runs.
async fn keep_presence(home: &Home, client: &mut Client) -> Result<(), CliError> {
    let mode = match home.settings()?.presence.as_deref() {
        Some("online") => PresenceMode::Online,
        Some("invisible") => PresenceMode::Invisible,
        _ => return Ok(()),
    };
    client.set_presence(mode).await?;
    Ok(())
}

/// Connects within 10 s, or says the gateway is unreachable. Invitations from users never
/// talked with are held as requests (`confab requests`).
async fn connect(home: &Home, server: Option<&str>) -> Result<Client, CliError> {
    let mut client = home.client(server)?;
    client.set_hold_requests(true);
    let url = server
        .map(str::to_owned)
        .or_else(|| home.settings().ok().map(|s| s.server))
        .unwrap_or_default();
    match tokio::time::timeout(Duration::from_secs(10), client.connect()).await {
        Ok(Ok(())) => {}
        Ok(Err(ClientError::Unreachable(_))) | Err(_) => return Err(CliError::Unreachable(url)),
        Ok(Err(e)) => return Err(e.into()),
    }
    match tokio::time::timeout(Duration::from_secs(30), client.sync()).await {
        Ok(result) => result?,
        Err(_) => return Err(CliError::Unreachable(url)),
    }
    Ok(client)
}

/// A conversation named by a contact (its DM), a room's name, or its id (hex, or the start
/// of it when only one conversation starts so).
fn conversation(client: &Client, name: &str) -> Result<ConversationId, CliError> {
    let store = client.store();
    if let Some(room) = store.room_named(name)? {
        return Ok(room);
    }
    if name.len() >= 8 && name.len() < 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        let lower = name.to_ascii_lowercase();
        let matches: Vec<ConversationId> = store
            .conversations()?
            .into_iter()
            .map(|c| c.id)
            .filter(|id| hex::encode(id.0).starts_with(&lower))
            .collect();
        return match matches.as_slice() {
            [one] => Ok(*one),
            [] => Err(CliError::Usage(format!(
                "no conversation starts with {name}"
            ))),
            _ => Err(CliError::Usage(format!(
                "several conversations start with {name}: give more of the id"
            ))),
        };
    }
    if let Some((_, key)) = store.contacts()?.into_iter().find(|(n, _)| n == name) {
        return store
            .conversations()?
            .into_iter()
            .find(|c| c.peer == Some(key) && !c.removed)
            .map(|c| c.id)
            .ok_or_else(|| {
                CliError::Usage(format!("no DM with {name} yet: run `confab dm {name}`"))
            });
    }
    let bytes = hex::decode(name)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| {
            CliError::Usage(format!(
                "{name:?} is neither a contact nor a conversation id"
            ))
        })?;
    Ok(ConversationId(bytes))
}

/// The invitation request whose conversation id is `id` or starts with it.
fn request_of(client: &Client, id: &str) -> Result<ConversationId, CliError> {
    let lower = id.trim().to_ascii_lowercase();
    if lower.is_empty() || !lower.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CliError::Usage(format!(
            "{id:?} is not a conversation id (hex, or its start)"
        )));
    }
    let matches: Vec<ConversationId> = client
        .requests()?
        .into_iter()
        .map(|r| r.conversation)
        .filter(|c| hex::encode(c.0).starts_with(&lower))
        .collect();
    match matches.as_slice() {
        [one] => Ok(*one),
        [] => Err(CliError::Usage(format!(
            "no invitation request starts with {id}: see `confab requests`"
        ))),
        _ => Err(CliError::Usage(format!(
            "several invitation requests start with {id}: give more of the id"
        ))),
    }
}

/// Tells the user (on stderr, in text mode) how many invitation requests wait, when there
/// are more than `before`; returns how many wait.
fn note_requests(client: &Client, before: usize, json: bool) -> Result<usize, CliError> {
    let n = client.requests()?.len();
    if n > before && !json {
        eprintln!(
            "{n} invitation request{} from users you never talked with: `confab requests`",
            if n == 1 { "" } else { "s" }
        );
    }
    Ok(n)
}

/// Prints the invite settings.
fn print_invites(client: &Client, settings: &confab_spec::frame::InviteSettings, json: bool) {
    let policy = match settings.policy {
        InvitePolicy::Everyone => "everyone",
        InvitePolicy::Allowed => "allowed",
    };
    let names: Vec<String> = settings
        .allowed
        .iter()
        .map(|k| name_of(client, k))
        .collect();
    if json {
        println!(
            "{}",
            serde_json::json!({"policy": policy, "allowed": names})
        );
    } else {
        let who = match settings.policy {
            InvitePolicy::Everyone => {
                "everyone you do not block (strangers wait in `confab requests`)"
            }
            InvitePolicy::Allowed => "only the users on your allow list",
        };
        println!("who may invite you  {who}");
        println!("allow list          {}", names.join(", "));
    }
}

fn sender_name(client: &Client, m: &Message) -> String {
    device_name(client, &m.sender)
}

/// A device's user as the user knows it: "me", a contact's name, or the start of the key.
fn device_name(client: &Client, device: &DeviceId) -> String {
    if device.system == client.device().system {
        return "me".into();
    }
    client
        .store()
        .contacts()
        .ok()
        .and_then(|c| c.into_iter().find(|(_, k)| *k == device.system))
        .map_or_else(|| hex_key(&device.system)[..12].to_owned(), |(n, _)| n)
}

/// Why a message's header is flagged, when the gateway named another sender than MLS
/// authenticated (SPEC.md 7.8): the message is shown as its author's, with the label.
fn relabel_note(client: &Client, m: &Message) -> Option<String> {
    let said = m.gateway_sender?;
    let name = device_name(client, &said);
    Some(if said.system == m.sender.system {
        let whose = if name == "me" {
            "my".to_owned()
        } else {
            format!("{name}'s")
        };
        format!(
            "the gateway said it came from {whose} device {}…",
            hex::encode(&said.process.0[..2])
        )
    } else {
        format!("the gateway said it came from {name}")
    })
}

fn print_message(client: &Client, m: &Message, json: bool) {
    let from = sender_name(client, m);
    if let Some(reason) = &m.unreadable {
        // Never dropped silently (SPEC.md 7.7): the entry is shown with why it could not
        // be read. The sender is the one the gateway names; MLS could not confirm it.
        let device = hex::encode(&m.sender.process.0[..2]);
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "conversation": hex::encode(m.conversation.0),
                    "seq": m.seq.get(),
                    "from": from,
                    "device": hex::encode(m.sender.process.0),
                    "accepted_ms": m.accepted.0,
                    "unreadable": reason,
                })
            );
        } else {
            let whose = if from == "me" {
                "my".to_owned()
            } else {
                format!("{from}'s")
            };
            println!(
                "[{}] (a message from {whose} device {device}… could not be read: {reason})",
                m.seq.get()
            );
        }
        return;
    }
    let text = String::from_utf8_lossy(&m.body);
    let relabelled = relabel_note(client, m);
    if json {
        let mut line = serde_json::json!({
            "conversation": hex::encode(m.conversation.0),
            "seq": m.seq.get(),
            "from": from,
            "accepted_ms": m.accepted.0,
            "text": text,
        });
        if let Some(said) = &m.gateway_sender {
            line["gateway_said_from"] = serde_json::json!(device_name(client, said));
            line["gateway_said_device"] = serde_json::json!(hex::encode(said.process.0));
        }
        match m.irregular {
            Some(Irregular::Missing(n)) => line["missing_before"] = serde_json::json!(n),
            Some(Irregular::Stale) => line["out_of_order"] = serde_json::json!(true),
            None => {}
        }
        println!("{line}");
    } else {
        if let Some(Irregular::Missing(n)) = m.irregular {
            // What the gateway did not deliver is said where it is missing (SPEC.md 7.9).
            println!(
                "! {n} earlier message{} from {from} never arrived (held back by the gateway, or unreadable)",
                if n == 1 { "" } else { "s" }
            );
        }
        let mut notes: Vec<String> = relabelled.into_iter().collect();
        if m.irregular == Some(Irregular::Stale) {
            notes.push("out of order, or a copy".into());
        }
        // The text is someone else's: it may not forge lines or reach the terminal raw.
        let header = if notes.is_empty() {
            format!("[{}] {from}: ", m.seq.get())
        } else {
            format!("[{}] {from} (! {}): ", m.seq.get(), notes.join("; "))
        };
        println!("{}", crate::display::message(&header, &text));
    }
}

/// Prints a contact's safety number, its devices, and what changed since it was verified.
fn print_verification(
    name: &str,
    changes: &crate::app::DeviceChanges,
    confirmed: bool,
    json: bool,
) {
    let short = |p: &ProcessId| format!("{}…", hex::encode(&p.0[..2]));
    let list = |set: &std::collections::BTreeSet<ProcessId>| {
        set.iter().map(short).collect::<Vec<_>>().join(", ")
    };
    if json {
        let hexes = |set: &std::collections::BTreeSet<ProcessId>| {
            set.iter().map(|p| hex::encode(p.0)).collect::<Vec<_>>()
        };
        println!(
            "{}",
            serde_json::json!({
                "name": name,
                "safety_number": changes.safety_number,
                "verified_ms": changes.verified_at.map(|t| t.0),
                "devices": hexes(&changes.now),
                "new_devices": hexes(&changes.added),
                "gone_devices": hexes(&changes.gone),
            })
        );
        return;
    }
    if confirmed {
        println!(
            "{name} verified, with {} device(s) seen now",
            changes.now.len()
        );
        return;
    }
    println!("safety number with {name}; compare it with {name} in person or on a call:");
    let groups: Vec<&str> = changes.safety_number.split(' ').collect();
    for line in groups.chunks(4) {
        println!("  {}", line.join(" "));
    }
    if changes.now.is_empty() {
        println!("{name}'s devices: none in your conversations yet");
    } else {
        println!(
            "{name}'s devices in your conversations: {}",
            list(&changes.now)
        );
    }
    match changes.verified_at {
        None => println!(
            "not verified: if the numbers match, run `confab contacts verify {name} --confirm`"
        ),
        Some(_) => {
            println!("verified");
            if !changes.added.is_empty() {
                println!(
                    "! new since you verified: {}; ask {name} whether they added it (a device they do not know of means their key is in someone else's hands), then verify again",
                    list(&changes.added)
                );
            }
            if !changes.gone.is_empty() {
                println!("gone since you verified: {}", list(&changes.gone));
            }
        }
    }
}

/// Warns, on standard error, of contacts verified earlier that now have devices the user
/// did not verify (`contacts list --json` has them for a program).
fn warn_device_changes(client: &Client) -> Result<(), CliError> {
    for (name, key) in client.store().contacts()? {
        let changes = client.device_changes(&key)?;
        if changes.verified_at.is_some() && !changes.added.is_empty() {
            eprintln!(
                "! {name} has {} device(s) you did not verify: `confab contacts verify {name}`",
                changes.added.len()
            );
        }
    }
    Ok(())
}

/// Prints a new device's link request.
fn print_link_request(request: &crate::link::LinkRequest, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({"request": request.encode(), "check_code": request.check_code(),
                "device": hex::encode(request.process.0)})
        );
    } else {
        println!(
            "on a device that holds your identity, run: confab device link {}",
            request.encode()
        );
        println!(
            "check code {} (that device shows it too)",
            request.check_code()
        );
        println!("then here: confab link CERT, with the certificate string it prints");
    }
}

/// Tells the user a conversation forked here (a Commit this device could not apply).
fn print_fork(conversation: &ConversationId, seq: Seq, reason: &str, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "conversation": hex::encode(conversation.0),
                "forked_at": seq.get(),
                "reason": reason,
            })
        );
    } else {
        println!(
            "! conversation {} forked at [{}]: {reason}; this device no longer shares the \
             group with the others, and sending into it is stopped",
            &hex::encode(conversation.0)[..8],
            seq.get()
        );
    }
}

/// Tells the user this device got back into a conversation that had forked here, by a
/// resync at `at` (SPEC.md 7.10): what came between could not be read.
fn print_resync(conversation: &ConversationId, (from, at): (Seq, Seq), json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "conversation": hex::encode(conversation.0),
                "resynced_at": at.get(),
                "fork_ended": from.get(),
            })
        );
    } else {
        println!(
            "! conversation {} had forked at [{}]; this device got back in at [{}] with new \
             keys, and what came between could not be read",
            &hex::encode(conversation.0)[..8],
            from.get(),
            at.get()
        );
    }
}

async fn run(cli: Cli, home: Home) -> Result<(), CliError> {
    let server = cli.server.as_deref();
    match cli.command {
        Command::Init { import, link } => {
            let settings = Settings {
                server: server.unwrap_or(DEFAULT_SERVER).to_owned(),
                engine: cli.engine.unwrap_or_else(|| "openmls".into()),
                ca_file: cli.ca_file.map(|p| std::path::absolute(&p).unwrap_or(p)),
                presence: None,
            };
            if link {
                let request = home.init_link(&settings)?;
                print_link_request(&request, cli.json);
                return Ok(());
            }
            let identity = home.init(import.as_deref(), &settings)?;
            let mut client = connect(&home, None).await?;
            let pool = client.top_up_key_packages(POOL_TARGET).await?;
            let device = hex::encode(client.device().process.0);
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"user": hex_key(&identity.system), "device": device,
                        "key_packages": pool.pool_count})
                );
            } else {
                println!("created your identity in {}", home.dir().display());
                println!(
                    "your user key (give it to your contacts): {}",
                    hex_key(&identity.system)
                );
                println!("this device: {device}");
                println!("{} KeyPackages published", pool.pool_count);
                if import.is_some() {
                    println!(
                        "to join your conversations, run on one of your other devices: confab device add {device}"
                    );
                }
            }
        }
        Command::Whoami => {
            let (identity, credentials) = home.identity()?;
            let device = credentials.certificate.device_id();
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"user": hex_key(&identity.system), "device": hex::encode(device.process.0)})
                );
            } else {
                println!("user   {}", hex_key(&identity.system));
                println!("device {}", hex::encode(device.process.0));
            }
        }
        Command::Link { certificate: None } => {
            print_link_request(&home.link_request()?, cli.json);
        }
        Command::Link {
            certificate: Some(text),
        } => {
            let identity = home.finish_link(&text)?;
            let mut client = connect(&home, server).await?;
            let pool = client.top_up_key_packages(POOL_TARGET).await?;
            let device = hex::encode(client.device().process.0);
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"user": hex_key(&identity.system), "device": device,
                        "key_packages": pool.pool_count})
                );
            } else {
                println!(
                    "linked: this device holds a certificate of user {}",
                    hex_key(&identity.system)
                );
                println!("this device: {device}");
                println!(
                    "next, on a device already in your conversations: confab device add {device}"
                );
            }
        }
        Command::Export => {
            let (identity, _) = home.identity()?;
            let seed = identity.system_seed.ok_or(HomeError::NoSystemKey)?;
            let backup = crate::identity::export_backup(&SystemKeyPair::from_seed(&seed));
            if cli.json {
                println!("{}", serde_json::json!({ "backup": backup }));
            } else {
                println!("{backup}");
            }
        }
        Command::Device {
            action: DeviceAction::Link { request },
        } => {
            let request = crate::link::LinkRequest::decode(&request).map_err(HomeError::from)?;
            let certificate = home.issue_link(&request)?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"device": hex::encode(request.process.0),
                        "check_code": request.check_code(), "certificate": certificate})
                );
            } else {
                println!(
                    "check code {} (the new device shows the same; if not, do not use this)",
                    request.check_code()
                );
                println!("give the new device this, with `confab link CERT`:");
                println!("{certificate}");
            }
        }
        Command::Device { action } => {
            let (identity, _) = home.identity()?;
            let mut client = connect(&home, server).await?;
            let change = match action {
                DeviceAction::List => {
                    let conversations: Vec<_> = client
                        .store()
                        .conversations()?
                        .into_iter()
                        .filter(|c| !c.removed)
                        .collect();
                    for d in client.devices().await? {
                        let mut joined = 0;
                        for c in &conversations {
                            joined += usize::from(client.is_member(&c.id, d.device)?);
                        }
                        let id = hex::encode(d.device.process.0);
                        let this = d.device == client.device();
                        if cli.json {
                            println!(
                                "{}",
                                serde_json::json!({"device": id, "this_device": this,
                                    "key_packages": d.pool_count, "last_resort": d.last_resort_present,
                                    "conversations": joined, "of": conversations.len()})
                            );
                        } else {
                            println!(
                                "{id}{}  key packages {:>3}  in {joined} of {} conversations",
                                if this { " (this device)" } else { "" },
                                d.pool_count,
                                conversations.len()
                            );
                        }
                    }
                    return Ok(());
                }
                DeviceAction::Add { device } => {
                    client
                        .add_device(parse_device(identity.system, &device)?)
                        .await?
                }
                DeviceAction::Remove { device } => {
                    client
                        .remove_device(parse_device(identity.system, &device)?)
                        .await?
                }
                DeviceAction::Link { .. } => return Ok(()), // handled above, offline
                DeviceAction::Revoke { device } => {
                    let device = parse_device(identity.system, &device)?;
                    let seed = identity.system_seed.ok_or(HomeError::NoSystemKey)?;
                    let now = crate::transport::system_now();
                    let revocation = SystemKeyPair::from_seed(&seed).revoke(device.process, now);
                    client.revoke_device(revocation).await?
                }
            };
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"conversations": change.conversations, "unchanged": change.unchanged})
                );
            } else {
                println!(
                    "done: {} conversations changed, {} needed nothing",
                    change.conversations, change.unchanged
                );
            }
        }
        Command::Contacts { action } => {
            home.identity()?;
            let mut store = home.local_store()?;
            match action {
                ContactsAction::Add { name, key } => {
                    store.add_contact(&name, &parse_key(&key)?)?;
                    if !cli.json {
                        println!("added {name}");
                    }
                }
                ContactsAction::List => {
                    let client = home.client(server)?;
                    for (name, key) in store.contacts()? {
                        let changes = client.device_changes(&key)?;
                        if cli.json {
                            println!(
                                "{}",
                                serde_json::json!({"name": name, "user": hex_key(&key),
                                    "verified_ms": changes.verified_at.map(|t| t.0),
                                    "new_devices": changes.added.len()})
                            );
                        } else {
                            let verified = match (changes.verified_at, changes.added.len()) {
                                (None, _) => "not verified".to_owned(),
                                (Some(_), 0) => "verified".to_owned(),
                                (Some(_), n) => format!(
                                    "verified, but {n} device{} since: `confab contacts verify {name}`",
                                    if n == 1 { "" } else { "s" }
                                ),
                            };
                            println!("{name}\t{}\t{verified}", hex_key(&key));
                        }
                    }
                }
                ContactsAction::Verify { name, confirm } => {
                    let key = store
                        .contacts()?
                        .into_iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, k)| k)
                        .ok_or_else(|| CliError::Usage(format!("no contact named {name}")))?;
                    let mut client = home.client(server)?;
                    if confirm {
                        client.mark_verified(&key)?;
                    }
                    print_verification(&name, &client.device_changes(&key)?, confirm, cli.json);
                }
                ContactsAction::Remove { name } => {
                    if !store.remove_contact(&name)? {
                        return Err(CliError::Usage(format!("no contact named {name}")));
                    }
                }
            }
        }
        Command::Dm { name } => {
            let mut client = connect(&home, server).await?;
            let key = client
                .store()
                .contacts()?
                .into_iter()
                .find(|(n, _)| *n == name)
                .map(|(_, k)| k)
                .ok_or_else(|| {
                    CliError::Usage(format!(
                        "no contact named {name}: `confab contacts add {name} KEY`"
                    ))
                })?;
            if let Some(existing) = client
                .store()
                .conversations()?
                .into_iter()
                .find(|c| c.peer == Some(key) && !c.removed)
            {
                println!("{}", hex::encode(existing.id.0));
                return Ok(());
            }
            let dm = client.create_dm(key).await?;
            client.top_up_key_packages(POOL_TARGET).await?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"conversation": hex::encode(dm.0), "with": name})
                );
            } else {
                println!("{}", hex::encode(dm.0));
            }
        }
        Command::Room { action } => room(&home, server, cli.json, action).await?,
        Command::Send { to, text } => {
            let mut client = connect(&home, server).await?;
            let dm = conversation(&client, &to)?;
            let seq = client.send_text(dm, text.as_bytes()).await?;
            client.top_up_key_packages(POOL_TARGET).await?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"conversation": hex::encode(dm.0), "seq": seq.get()})
                );
            }
        }
        Command::Read {
            conversation: which,
        } => {
            let mut client = connect(&home, server).await?;
            client.top_up_key_packages(POOL_TARGET).await?;
            let wanted = which.map(|w| conversation(&client, &w)).transpose()?;
            for c in client.store().conversations()? {
                if wanted.is_some_and(|w| w != c.id) {
                    continue;
                }
                let resynced = client.store().resyncs(&c.id)?.1;
                for m in client.store().messages(&c.id, 0, usize::MAX)? {
                    print_message(&client, &m, cli.json);
                    if let Some(resync) = resynced.filter(|(_, at)| m.seq < *at) {
                        // Said once, after the last message before the resync.
                        let next = client.store().messages(&c.id, m.seq.get(), 1)?;
                        if next.first().is_none_or(|n| n.seq > resync.1) {
                            print_resync(&c.id, resync, cli.json);
                        }
                    }
                }
                if let Some((seq, reason)) = client.store().forked(&c.id)? {
                    print_fork(&c.id, seq, &reason, cli.json);
                }
            }
            note_requests(&client, 0, cli.json)?;
            warn_device_changes(&client)?;
        }
        Command::Watch => {
            let mut client = connect(&home, server).await?;
            client.top_up_key_packages(POOL_TARGET).await?;
            keep_presence(&home, &mut client).await?;
            client.take_received();
            // A long-running device commits the leave requests that are its turn (SPEC.md
            // 10.3) every few seconds, as other commands do when they start.
            let mut leaves = tokio::time::interval(Duration::from_secs(5));
            let mut requests = note_requests(&client, 0, cli.json)?;
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                    _ = leaves.tick() => {
                        match client.commit_leave_requests().await {
                            Ok(_) | Err(ClientError::SendRefused { .. } | ClientError::RateLimited { .. }) => {}
                            Err(e) => return Err(e.into()),
                        }
                        // And gets back into conversations that forked (SPEC.md 7.10).
                        let forked = client.store().forked_conversations()?;
                        if client.resync_forked().await? > 0 {
                            for c in forked {
                                if let (_, Some(resync)) = client.store().resyncs(&c)? {
                                    if client.store().forked(&c)?.is_none() {
                                        print_resync(&c, resync, cli.json);
                                    }
                                }
                            }
                        }
                    }
                    result = client.pump() => result?,
                }
                for m in client.take_received() {
                    print_message(&client, &m, cli.json);
                    if m.unreadable.is_some() {
                        if let Some((seq, reason)) = client.store().forked(&m.conversation)? {
                            if seq == m.seq {
                                print_fork(&m.conversation, seq, &reason, cli.json);
                            }
                        }
                    }
                }
                requests = note_requests(&client, requests, cli.json)?;
            }
        }
        Command::Presence { action } => {
            let mut client = connect(&home, server).await?;
            let mode = match action {
                PresenceAction::Online => Some(PresenceMode::Online),
                PresenceAction::Invisible => Some(PresenceMode::Invisible),
                PresenceAction::Offline => Some(PresenceMode::Offline),
                _ => None,
            };
            if let Some(mode) = mode {
                let lease = client.set_presence(mode).await?;
                let mut settings = home.settings()?;
                settings.presence = match mode {
                    PresenceMode::Online => Some("online".into()),
                    PresenceMode::Invisible => Some("invisible".into()),
                    PresenceMode::Offline => None,
                };
                home.save_settings(&settings)?;
                if cli.json {
                    println!(
                        "{}",
                        serde_json::json!({"presence": format!("{mode:?}").to_lowercase(), "lease_ms": lease.ttl_ms})
                    );
                } else if mode == PresenceMode::Offline {
                    println!("offline");
                } else {
                    println!(
                        "{}: kept while `confab watch` or `confab watch-presence` runs (lease {} s, renewed)",
                        format!("{mode:?}").to_lowercase(),
                        lease.ttl_ms / 1_000
                    );
                }
                return Ok(());
            }
            let (share, unshare, block, unblock) = match action {
                PresenceAction::Share { names } => {
                    (users_of(&client, &names)?, vec![], vec![], vec![])
                }
                PresenceAction::Unshare { names } => {
                    (vec![], users_of(&client, &names)?, vec![], vec![])
                }
                PresenceAction::Block { names } => {
                    (vec![], vec![], users_of(&client, &names)?, vec![])
                }
                PresenceAction::Unblock { names } => {
                    (vec![], vec![], vec![], users_of(&client, &names)?)
                }
                _ => (vec![], vec![], vec![], vec![]),
            };
            let lists = client
                .update_presence_lists(share, unshare, block, unblock)
                .await?;
            let names = |keys: &[SystemKey]| -> Vec<String> {
                keys.iter().map(|k| name_of(&client, k)).collect()
            };
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"shared": names(&lists.shared), "blocked": names(&lists.blocked), "invisible": lists.invisible})
                );
            } else {
                println!("shared with  {}", names(&lists.shared).join(", "));
                println!("blocked      {}", names(&lists.blocked).join(", "));
                println!("invisible    {}", lists.invisible);
            }
        }
        Command::Invites { action } => {
            let mut client = connect(&home, server).await?;
            let (policy, allow, disallow) = match action {
                InvitesAction::Show => (None, vec![], vec![]),
                InvitesAction::Everyone => (Some(InvitePolicy::Everyone), vec![], vec![]),
                InvitesAction::Allowed => (Some(InvitePolicy::Allowed), vec![], vec![]),
                InvitesAction::Allow { names } | InvitesAction::Disallow { names }
                    if names.is_empty() =>
                {
                    return Err(CliError::Usage(
                        "name at least one user (a contact name or a user key)".into(),
                    ));
                }
                InvitesAction::Allow { names } => (None, users_of(&client, &names)?, vec![]),
                InvitesAction::Disallow { names } => (None, vec![], users_of(&client, &names)?),
            };
            let settings = client
                .update_invite_settings(policy, allow, disallow)
                .await?;
            print_invites(&client, &settings, cli.json);
        }
        Command::Requests => {
            let client = connect(&home, server).await?;
            let requests = client.requests()?;
            if requests.is_empty() && !cli.json {
                println!("no invitation requests");
            }
            for r in requests {
                let id = hex::encode(r.conversation.0);
                let from = hex_key(&r.inviter.system);
                if cli.json {
                    println!(
                        "{}",
                        serde_json::json!({"conversation": id, "from": from, "received_ms": r.received.0})
                    );
                } else {
                    println!(
                        "{}  from {}  (`confab accept {}` or `confab decline {}`)",
                        &id[..8],
                        from,
                        &id[..8],
                        &id[..8]
                    );
                }
            }
        }
        Command::Accept { id } => {
            let mut client = connect(&home, server).await?;
            let conversation = request_of(&client, &id)?;
            let record = client.accept_request(&conversation).await?;
            let kind = match record.kind {
                ConversationKind::Room => "room",
                ConversationKind::DirectMessage => "DM",
            };
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"conversation": hex::encode(conversation.0), "kind": kind})
                );
            } else {
                println!(
                    "joined the {kind} {}: `confab read {}` shows it",
                    &hex::encode(conversation.0)[..8],
                    &hex::encode(conversation.0)[..8]
                );
            }
        }
        Command::Decline { id } => {
            let mut client = home.client(server)?;
            let conversation = request_of(&client, &id)?;
            client.decline_request(&conversation)?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"declined": hex::encode(conversation.0)})
                );
            } else {
                println!("declined; nobody is told");
            }
        }
        Command::WatchPresence { names } => {
            let mut client = connect(&home, server).await?;
            let targets = if names.is_empty() {
                client
                    .store()
                    .contacts()?
                    .into_iter()
                    .map(|(_, k)| k)
                    .collect()
            } else {
                users_of(&client, &names)?
            };
            if targets.is_empty() {
                return Err(CliError::Usage(
                    "no contacts to watch: `confab contacts add NAME KEY`".into(),
                ));
            }
            keep_presence(&home, &mut client).await?;
            for s in client.watch_presence(targets).await? {
                print_presence(&client, &s.target, s.state, cli.json);
            }
            client.take_presence_changes();
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                    result = client.pump() => result?,
                }
                for (key, state) in client.take_presence_changes() {
                    print_presence(&client, &key, state, cli.json);
                }
            }
        }
        Command::Status => {
            let mut client = connect(&home, server).await?;
            let pool = client.top_up_key_packages(POOL_TARGET).await?;
            let outbox = client.store().outbox()?.len();
            let conversations = client.store().conversations()?.len();
            let suspicions = client.store().suspicions()?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"connected": client.is_ready(), "key_packages": pool.pool_count,
                        "uploaded": pool.uploaded, "outbox": outbox, "conversations": conversations,
                        "relabelled": suspicions.relabelled, "unreadable": suspicions.unreadable,
                        "forked": suspicions.forked, "missing": suspicions.missing,
                        "out_of_order": suspicions.out_of_order, "resynced": suspicions.resynced})
                );
            } else {
                println!("connected      {}", client.is_ready());
                println!(
                    "key packages   {} (uploaded {} now)",
                    pool.pool_count, pool.uploaded
                );
                println!("outbox         {outbox} pending");
                println!("conversations  {conversations}");
                // What the gateway got wrong, as far as this device can tell (SPEC.md 7.8).
                println!(
                    "suspect        {} mislabelled, {} unreadable, {} forked, {} never arrived, {} out of order",
                    suspicions.relabelled,
                    suspicions.unreadable,
                    suspicions.forked,
                    suspicions.missing,
                    suspicions.out_of_order
                );
                println!(
                    "resynced       {} (forks this device got back from)",
                    suspicions.resynced
                );
            }
        }
    }
    Ok(())
}

/// Why the gateway refused a room change, in words.
fn room_refusal(e: ClientError, what: &str) -> CliError {
    match e {
        ClientError::SendRefused {
            code: ErrorCode::Forbidden,
            ..
        } => CliError::Usage(format!(
            "the room's rules do not allow you to {what} (the owner and admins invite and remove; the owner names admins; nobody invites a user who blocks them)"
        )),
        ClientError::SendRefused {
            code: ErrorCode::RoomFull,
            ..
        } => CliError::Usage("the room is full (the gateway's room_members_max)".into()),
        ClientError::SendRefused {
            code: ErrorCode::TooManyRooms,
            ..
        }
        | ClientError::Refused(ErrorCode::TooManyRooms) => CliError::Usage(
            "too many rooms: that user is in the gateway's rooms_per_user_max rooms already".into(),
        ),
        other => other.into(),
    }
}

fn room_of(client: &Client, name: &str) -> Result<ConversationId, CliError> {
    let id = conversation(client, name)?;
    match client.room_roles(&id)? {
        Some(_) => Ok(id),
        None => Err(CliError::Usage(format!(
            "{name:?} is not a room you are in"
        ))),
    }
}

async fn room(
    home: &Home,
    server: Option<&str>,
    json: bool,
    action: RoomAction,
) -> Result<(), CliError> {
    let mut client = connect(home, server).await?;
    let say = |text: String, value: serde_json::Value| {
        if json {
            println!("{value}");
        } else {
            println!("{text}");
        }
    };
    match action {
        RoomAction::Create { room } => {
            let id = client
                .create_room(&room)
                .await
                .map_err(|e| room_refusal(e, "create a room"))?;
            client.top_up_key_packages(POOL_TARGET).await?;
            say(
                format!(
                    "created {room} ({}); invite with `confab room invite {room} NAME`",
                    hex::encode(id.0)
                ),
                serde_json::json!({"room": hex::encode(id.0), "name": room}),
            );
        }
        RoomAction::Invite { room, users } => {
            let id = room_of(&client, &room)?;
            for name in users {
                let user = user_of(&client, &name)?;
                match client.invite(id, user).await {
                    Ok(Some(seq)) => say(
                        format!("invited {name}"),
                        serde_json::json!({"invited": name, "seq": seq.get()}),
                    ),
                    Ok(None) => say(
                        format!("{name} is in the room already"),
                        serde_json::json!({"invited": name, "already": true}),
                    ),
                    Err(ClientError::NoKeyPackages) => {
                        return Err(CliError::Usage(format!(
                            "{name} has no KeyPackages: they must run confab once to publish some"
                        )));
                    }
                    Err(e) => return Err(room_refusal(e, "invite")),
                }
            }
        }
        RoomAction::Remove { room, users } => {
            let id = room_of(&client, &room)?;
            for name in users {
                let user = user_of(&client, &name)?;
                match client.remove_member(id, user).await {
                    Ok(Some(seq)) => say(
                        format!("removed {name}"),
                        serde_json::json!({"removed": name, "seq": seq.get()}),
                    ),
                    Ok(None) => say(
                        format!("{name} is not in the room"),
                        serde_json::json!({"removed": name, "absent": true}),
                    ),
                    Err(e) => return Err(room_refusal(e, "remove them")),
                }
            }
        }
        RoomAction::Leave { room } => {
            let id = room_of(&client, &room)?;
            client.leave_room(id).await?;
            say(
                format!("asked to leave {room}: a member commits it; you read nothing after that"),
                serde_json::json!({"left": hex::encode(id.0)}),
            );
        }
        RoomAction::Promote { room, user, owner } => {
            let id = room_of(&client, &room)?;
            let key = user_of(&client, &user)?;
            let role = if owner { Role::Owner } else { Role::Admin };
            match client.set_role(id, key, role).await {
                Ok(_) => say(
                    format!("{user} is now {}", role.name()),
                    serde_json::json!({"user": user, "role": role.name()}),
                ),
                Err(ClientError::NotInRoom) => {
                    return Err(CliError::Usage(format!("{user} is not in the room")));
                }
                Err(e) => return Err(room_refusal(e, "promote them")),
            }
        }
        RoomAction::Demote { room, user } => {
            let id = room_of(&client, &room)?;
            let key = user_of(&client, &user)?;
            match client.set_role(id, key, Role::Member).await {
                Ok(_) => say(
                    format!("{user} is now a member"),
                    serde_json::json!({"user": user, "role": "member"}),
                ),
                Err(ClientError::NotInRoom) => {
                    return Err(CliError::Usage(format!("{user} is not in the room")));
                }
                Err(e) => return Err(room_refusal(e, "demote them")),
            }
        }
        RoomAction::List => {
            for c in client.store().conversations()? {
                if c.kind != ConversationKind::Room || c.removed {
                    continue;
                }
                let Some(roles) = client.room_roles(&c.id)? else {
                    continue;
                };
                let name = client.store().room_name(&c.id)?;
                let members = client.room_members(&c.id)?.len();
                let role = roles.role_of(&client.device().system).name();
                let id = hex::encode(c.id.0);
                say(
                    format!(
                        "{}  {}  {role}  {members} members",
                        name.as_deref().unwrap_or("-"),
                        &id[..16]
                    ),
                    serde_json::json!({"room": id, "name": name, "role": role, "members": members}),
                );
            }
        }
        RoomAction::Members { room } => {
            let id = room_of(&client, &room)?;
            for m in client.room_members(&id)? {
                let name = if m.user == client.device().system {
                    "me".to_owned()
                } else {
                    name_of(&client, &m.user)
                };
                say(
                    format!("{name}  {}  {} devices", m.role.name(), m.devices.len()),
                    serde_json::json!({"user": hex_key(&m.user), "name": name,
                        "role": m.role.name(), "devices": m.devices.len()}),
                );
            }
        }
    }
    Ok(())
}
