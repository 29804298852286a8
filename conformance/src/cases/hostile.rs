//! Client mode against a hostile gateway (SPEC.md 6.8, 7.8 and 7.9): the suite's proxy stands where the
//! gateway is and lies the way a gateway can. It holds no member's keys, so everything it
//! makes up is the gateway's word only: a relabelled sender, a proposal with no valid
//! signature, a Commit the real gateway refused. The client must believe MLS instead.
//!
//! Each case sets up a room the client owns (`room create`, `room invite`) with the suite's
//! members in it, lets a member send a message through the real gateway, and has the proxy
//! rewrite that entry on its way to the client's `read`.

use confab_spec::frame::{ClientFrame, Entry, EntryBody, ServerFrame};
use confab_spec::ids::{DeviceId, MsgId};
use confab_spec::mls_framing::{self, CommitProposal};
use confab_spec::rooms::{ROLES_EXTENSION_TYPE, RoomRoles};

use super::client::{
    authenticated_as, device_with_room, invitee_member, is_commit, join_welcome,
    resyncs_before_sending_into, sent,
};
use super::log::{random, send_commit, send_mls};
use crate::case::{Case, CaseResult, Failure, Stop};
use crate::client::{ClientUnderTest, PassThrough, Script, Verdict, home};
use crate::client_case;
use crate::context::{Ctx, Peer, describe_error};
use crate::mls::{Member, broken, bytes};
use confab_client::mls::CommitOutput;

pub(super) fn cases() -> Vec<Case> {
    vec![
        client_case!(
            "7.7-5.client-equivocated-commit",
            "REQ-7.7-5",
            Must,
            "shown another valid Commit of the same member for the epoch than the others applied, the client forks at the others' next Commit and sends nothing more into the room",
            equivocated_commit
        ),
        client_case!(
            "7.8-1.client-authenticated-sender",
            "REQ-7.8-1",
            Must,
            "a member's message the gateway labels as another member's, or as the client's own, is shown as the member's",
            authenticated_sender
        ),
        client_case!(
            "7.8-2.client-verifies-proposals",
            "REQ-7.8-2",
            Must,
            "a leave request the gateway forged (no valid signature) is not committed",
            verifies_proposals
        ),
        client_case!(
            "7.8-3.client-rule-breaking-commit",
            "REQ-7.8-3",
            Must,
            "a room Commit that breaks the room rules, delivered as if accepted, forks the room: nothing more is sent into it",
            rule_breaking_commit
        ),
        client_case!(
            "6.8-5.client-replayed-payload",
            "REQ-6.8-5",
            Must,
            "a member's message the gateway delivers again under a new seq and msg_id is not shown twice",
            replayed_payload
        ),
        client_case!(
            "7.9-1.client-numbers-its-messages",
            "REQ-7.9-1",
            Must,
            "the client's first two messages in a room carry the content map with counters 1 and 2",
            numbers_its_messages
        ),
        client_case!(
            "7.10-1.client-publishes-group-info",
            "REQ-7.10-1",
            Must,
            "every Commit the client sends carries the GroupInfo of the epoch it opens",
            publishes_group_info
        ),
        client_case!(
            "7.10-6.client-resyncs",
            "REQ-7.10-6",
            Must,
            "after a Commit it cannot apply, the client's first Send into the room is a resync, which the others apply, and its message after it is readable",
            resyncs_after_fork
        ),
        client_case!(
            "7.9-2.client-reports-withheld-messages",
            "REQ-7.9-2",
            Must,
            "a member's message left out of the log (the rest renumbered) is reported as never arrived, naming the sender",
            reports_withheld_messages
        ),
    ]
}

/// The room's name on the client.
const ROOM: &str = "hostile";

/// Rewrites, on its way to the client, the entry of the conversation stream whose msg_id
/// is the target's (in a replay `Batch` or a live `Deliver`).
struct RewriteEntry {
    target: MsgId,
    rewrite: Box<dyn Fn(&mut Entry) + Send>,
}

impl Script for RewriteEntry {
    fn on_server_frame(&mut self, _conn: usize, frame: &mut ServerFrame) -> Verdict {
        let entries: Vec<&mut Entry> = match frame {
            ServerFrame::Batch(b) => b.entries.iter_mut().collect(),
            ServerFrame::Deliver(d) => vec![&mut d.entry],
            _ => Vec::new(),
        };
        for entry in entries {
            if entry.msg_id == self.target {
                (self.rewrite)(entry);
            }
        }
        Verdict::Forward
    }
}

/// A room the client created and owns, with `count` suite members it invited and that
/// joined; the client has not read anything since.
struct HostileRoom {
    room: confab_spec::ids::ConversationId,
    client_device: DeviceId,
    members: Vec<(Peer, Member)>,
    home: tempfile::TempDir,
}

async fn client_room_with_members(cx: &Ctx, count: usize) -> Result<HostileRoom, Stop> {
    let client = cx.client(Box::new(PassThrough))?;
    let home = home()?;
    client.run_ok(home.path(), &["init"]).await?;
    let client_device = authenticated_as(&client.proxy.events())
        .map(|c| DeviceId {
            system: c.system,
            process: c.process,
        })
        .ok_or_else(|| Failure::new("init to authenticate", "no Auth"))?;
    client
        .run_ok(home.path(), &["room", "create", ROOM])
        .await?;
    let mut members = Vec::new();
    let mut room = None;
    for _ in 0..count {
        let (mut peer, mut member) = invitee_member(cx).await?;
        let key = hex::encode(member.device.system.public().0);
        let client = cx.client(Box::new(PassThrough))?;
        client
            .run_ok(home.path(), &["room", "invite", ROOM, &key])
            .await?;
        let joined = join_welcome(&mut peer, &mut member, 20).await?;
        if room.is_some_and(|r| r != joined) {
            return Err(broken("join the client's room", "two rooms"));
        }
        room = Some(joined);
        members.push((peer, member));
    }
    // The members added after the first catch up on the Commits that added the others.
    let room = room.ok_or_else(|| broken("join the client's room", "no member"))?;
    Ok(HostileRoom {
        room,
        client_device,
        members,
        home,
    })
}

/// A member sends `text` into the room (request `rid`); its msg_id.
async fn member_says(
    peer: &mut Peer,
    member: &mut Member,
    room: confab_spec::ids::ConversationId,
    rid: u64,
    text: &str,
) -> Result<MsgId, Stop> {
    let payload = member
        .engine
        .encrypt(&room, text.as_bytes())
        .map_err(|e| broken("encrypt", e))?;
    let msg_id = MsgId(random());
    send_mls(peer, rid, room, msg_id, bytes(payload)?, None)
        .await?
        .map_err(|e| broken("send a message", describe_error(&e)))?;
    Ok(msg_id)
}

/// The start of a user's system key in hex, as the client-mode contract names an unnamed
/// sender (at least 8 digits).
fn key_prefix(device: &DeviceId) -> String {
    hex::encode(device.system.0)[..8].to_owned()
}

/// The line of `output` that shows `text`, if any.
fn line_of<'a>(output: &'a str, text: &str) -> Option<&'a str> {
    output.lines().find(|l| l.contains(text))
}

/// Whether `line` names `author` before (or instead of) `other`.
fn names_first(line: &str, author: &str, other: &str) -> bool {
    match (line.find(author), line.find(other)) {
        (Some(a), Some(o)) => a < o,
        (Some(_), None) => true,
        _ => false,
    }
}

async fn authenticated_sender(cx: &mut Ctx) -> CaseResult {
    let mut setup = client_room_with_members(cx, 2).await?;
    let room = setup.room;
    let (author, other) = {
        let (a, b) = setup.members.split_at_mut(1);
        (&mut a[0], &b[0])
    };
    let author_device = author.1.device.id();
    let other_device = other.1.device.id();
    let as_other = format!("relabelled as another {}", hex::encode(random::<8>()));
    let as_client = format!("relabelled as yours {}", hex::encode(random::<8>()));
    let first = member_says(&mut author.0, &mut author.1, room, 30, &as_other).await?;
    let second = member_says(&mut author.0, &mut author.1, room, 31, &as_client).await?;
    let client_device = setup.client_device;
    let client = cx.client(Box::new(RewriteBoth {
        first: (first, other_device),
        second: (second, client_device),
    }))?;
    let out = read_room(client, setup.home.path()).await?;
    let author_key = key_prefix(&author_device);
    let other_key = key_prefix(&other_device);
    let client_key = key_prefix(&client_device);
    match line_of(&out, &as_other) {
        Some(line) if names_first(line, &author_key, &other_key) => {}
        Some(line) => {
            return Err(Failure::new(
                format!(
                    "the message the gateway labelled as {other_key}…'s shown as its author {author_key}…'s (or not at all)"
                ),
                format!("{line:?}"),
            )
            .into());
        }
        None => {}
    }
    // A message labelled as the client's own is not the client's: it is the author's, and
    // shown (the client knows what it sent itself).
    match line_of(&out, &as_client) {
        Some(line) if names_first(line, &author_key, &client_key) => Ok(()),
        Some(line) => Err(Failure::new(
            format!(
                "the message the gateway labelled as the client's own shown as {author_key}…'s"
            ),
            format!("{line:?}"),
        )
        .into()),
        None => Err(Failure::new(
            format!(
                "the message the gateway labelled as the client's own shown as {author_key}…'s"
            ),
            "not shown",
        )
        .into()),
    }
}

/// Relabels two entries: each msg_id's entry gets its sender.
struct RewriteBoth {
    first: (MsgId, DeviceId),
    second: (MsgId, DeviceId),
}

impl Script for RewriteBoth {
    fn on_server_frame(&mut self, conn: usize, frame: &mut ServerFrame) -> Verdict {
        for (target, sender) in [self.first, self.second] {
            RewriteEntry {
                target,
                rewrite: Box::new(move |e| e.sender = sender),
            }
            .on_server_frame(conn, frame);
        }
        Verdict::Forward
    }
}

/// Runs `read ROOM` and returns what it printed; it must succeed.
async fn read_room(client: &ClientUnderTest, home: &std::path::Path) -> Result<String, Stop> {
    Ok(client.run_ok(home, &["read", ROOM]).await?.stdout)
}

async fn verifies_proposals(cx: &mut Ctx) -> CaseResult {
    let mut setup = client_room_with_members(cx, 1).await?;
    let room = setup.room;
    let (peer, member) = &mut setup.members[0];
    let device = member.device.id();
    let (leaf, epoch) = member_leaf(member, room, device)?;
    let carrier = member_says(peer, member, room, 30, "carrier").await?;
    // A Remove of the member's own leaf "from" the member: a leave request as the gateway
    // could make one up, with a signature and tags of the right sizes and no key behind.
    let content = confab_spec::mls_write::proposal_content(
        &room.0,
        epoch,
        leaf,
        &confab_spec::mls_write::WriteProposal::Remove(leaf),
    );
    let forged = confab_spec::mls_write::public_message(&content, &[0x5A; 64], false);
    let forged = bytes(forged)?;
    let client = cx.client(Box::new(RewriteEntry {
        target: carrier,
        rewrite: Box::new(move |e| {
            e.sender = device;
            e.body = EntryBody::Proposal {
                epoch: confab_spec::ids::Epoch(epoch),
            };
            e.payload = forged.clone();
        }),
    }))?;
    // `read` catches up (a client commits leave requests it sees when it catches up, as
    // the reference client does) and a `send` gives it a reason to commit as well.
    client.run(setup.home.path(), &["read", ROOM]).await?;
    let mut events = client.proxy.events();
    let client = cx.client(Box::new(PassThrough))?;
    client
        .run(
            setup.home.path(),
            &["send", ROOM, "after the forged request"],
        )
        .await?;
    events.extend(client.proxy.events());
    let removals = sent(&events)
        .filter_map(|(_, _, f)| match f {
            ClientFrame::Send(s) if s.conversation == room && is_commit(s) => Some(s),
            _ => None,
        })
        .filter(|s| {
            mls_framing::commit_contents(s.payload.as_bytes()).is_ok_and(|c| {
                c.by_value
                    .iter()
                    .any(|p| matches!(p, CommitProposal::Remove { leaf: l } if *l == leaf))
            })
        })
        .count();
    if removals > 0 {
        return Err(Failure::new(
            format!("no Commit removing leaf {leaf} on a leave request with no valid signature"),
            format!("{removals} such Commit(s) sent"),
        )
        .into());
    }
    Ok(())
}

/// The leaf of `device` in `room` as `member` sees it, and the room's epoch.
fn member_leaf(
    member: &Member,
    room: confab_spec::ids::ConversationId,
    device: DeviceId,
) -> Result<(u32, u64), Stop> {
    let leaf = member
        .engine
        .members(&room)
        .map_err(|e| broken("read the members", e))?
        .into_iter()
        .find(|(_, d)| *d == device)
        .map(|(l, _)| l)
        .ok_or_else(|| broken("read the members", "the member is not in its own group"))?;
    let epoch = member
        .engine
        .epoch(&room)
        .map_err(|e| broken("read the epoch", e))?;
    Ok((leaf, epoch))
}

/// The member commits its roles again, unchanged (SPEC.md 10.1): a valid Commit of a plain
/// member, with its GroupInfo; the member keeps it pending.
fn restate_roles(
    member: &mut Member,
    room: confab_spec::ids::ConversationId,
) -> Result<CommitOutput, Stop> {
    commit_roles(member, room, |_| {})
}

/// The member commits the room's roles as `change` leaves them, with its GroupInfo; the
/// member keeps it pending.
fn commit_roles(
    member: &mut Member,
    room: confab_spec::ids::ConversationId,
    change: impl FnOnce(&mut RoomRoles),
) -> Result<CommitOutput, Stop> {
    let roles = member
        .engine
        .context_extension(&room, ROLES_EXTENSION_TYPE)
        .map_err(|e| broken("read the roles", e))?
        .ok_or_else(|| broken("read the roles", "the room has none"))?;
    let mut roles = RoomRoles::from_extension(&roles).map_err(|e| broken("read the roles", e))?;
    change(&mut roles);
    let extra = [confab_client::mls::ExtraProposal::GroupContextExtensions(
        roles.context_extensions(),
    )];
    member
        .engine
        .commit(&room, &[], &[], &extra, true)
        .map_err(|e| broken("commit", e))
}

async fn equivocated_commit(cx: &mut Ctx) -> CaseResult {
    let mut setup = client_room_with_members(cx, 1).await?;
    let room = setup.room;
    let (peer, member) = &mut setup.members[0];
    // Two valid Commits of the member for one epoch: the gateway sequences the second, the
    // proxy shows the client the first in its place.
    let shown = restate_roles(member, room)?;
    member
        .engine
        .discard_pending_commit(&room)
        .map_err(|e| broken("discard", e))?;
    let sequenced = restate_roles(member, room)?;
    let msg_id = MsgId(random());
    send_commit(peer, 30, room, msg_id, &sequenced)
        .await?
        .map_err(|e| broken("send the Commit", describe_error(&e)))?;
    member
        .engine
        .merge_pending_commit(&room)
        .map_err(|e| broken("merge", e))?;
    // The others go on in their epoch: a message, then another Commit.
    member_says(
        peer,
        member,
        room,
        31,
        "in the epoch the client does not have",
    )
    .await?;
    let next = restate_roles(member, room)?;
    send_commit(peer, 32, room, MsgId(random()), &next)
        .await?
        .map_err(|e| broken("send the next Commit", describe_error(&e)))?;
    member
        .engine
        .merge_pending_commit(&room)
        .map_err(|e| broken("merge", e))?;
    let shown = bytes(shown.commit)?;
    let client = cx.client(Box::new(RewriteEntry {
        target: msg_id,
        rewrite: Box::new(move |e| e.payload = shown.clone()),
    }))?;
    client.run(setup.home.path(), &["read", ROOM]).await?;
    let earlier = client.proxy.events();
    resyncs_before_sending_into(
        cx,
        setup.home.path(),
        (ROOM, room),
        &earlier,
        "nothing but a resync sent into the room first once the others' next Commit did not apply",
    )
    .await
}

async fn rule_breaking_commit(cx: &mut Ctx) -> CaseResult {
    let mut setup = client_room_with_members(cx, 1).await?;
    let room = setup.room;
    let (peer, member) = &mut setup.members[0];
    let device = member.device.id();
    // The member, neither owner nor admin, names itself an admin: rule 5 of SPEC.md 10.2.
    // The gateway would refuse it (REQ-10-4); the proxy delivers it as if accepted.
    let epoch = member
        .engine
        .epoch(&room)
        .map_err(|e| broken("read the epoch", e))?;
    let commit = commit_roles(member, room, |roles| roles.admins.push(device.system))?;
    member
        .engine
        .discard_pending_commit(&room)
        .map_err(|e| broken("discard", e))?;
    let carrier = member_says(peer, member, room, 30, "carrier").await?;
    let commit = bytes(commit.commit)?;
    let client = cx.client(Box::new(RewriteEntry {
        target: carrier,
        rewrite: Box::new(move |e| {
            e.sender = device;
            e.body = EntryBody::Commit {
                epoch: confab_spec::ids::Epoch(epoch),
            };
            e.payload = commit.clone();
        }),
    }))?;
    client.run(setup.home.path(), &["read", ROOM]).await?;
    let earlier = client.proxy.events();
    resyncs_before_sending_into(
        cx,
        setup.home.path(),
        (ROOM, room),
        &earlier,
        "nothing but a resync sent into the room first after a Commit by a plain member naming itself admin",
    )
    .await
}

async fn numbers_its_messages(cx: &mut Ctx) -> CaseResult {
    use confab_client::mls::Processed;
    use confab_spec::content::AppContent;

    let mut setup = client_room_with_members(cx, 1).await?;
    let room = setup.room;
    let client = cx.client(Box::new(PassThrough))?;
    client
        .run_ok(setup.home.path(), &["send", ROOM, "first"])
        .await?;
    let mut events = client.proxy.events();
    let client = cx.client(Box::new(PassThrough))?;
    client
        .run_ok(setup.home.path(), &["send", ROOM, "second"])
        .await?;
    events.extend(client.proxy.events());
    let member = &mut setup.members[0].1;
    let mut counters = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (_, _, frame) in sent(&events) {
        let ClientFrame::Send(send) = frame else {
            continue;
        };
        // A resend carries the same msg_id; the member decrypts each message once.
        if send.conversation != room || is_commit(send) || !seen.insert(send.msg_id) {
            continue;
        }
        let content = match member.engine.process(&room, send.payload.as_bytes()) {
            Ok(Processed::Application { plaintext, .. }) => AppContent::open(&plaintext),
            other => {
                return Err(Failure::new(
                    "the client's message, decrypted by the suite's member",
                    format!("{other:?}"),
                )
                .into());
            }
        };
        counters.push(content.map(|c| (String::from_utf8_lossy(&c.text).into_owned(), c.counter)));
    }
    let expected = vec![
        Some(("first".to_owned(), 1)),
        Some(("second".to_owned(), 2)),
    ];
    if counters != expected {
        return Err(Failure::new(
            "the contents {1: \"first\", 2: 1} and {1: \"second\", 2: 2} (SPEC.md 7.9)",
            format!("{counters:?} (None: not a content map)"),
        )
        .into());
    }
    Ok(())
}

/// Leaves entry `seq` of `stream` out of everything the client is shown, and renumbers
/// the later entries (and the seqs `Subscribed` reports) so the log still looks whole: a
/// gateway withholding one message.
struct Withhold {
    stream: confab_spec::ids::StreamId,
    seq: u64,
}

impl Withhold {
    fn shift(&self, seq: &mut confab_spec::ids::Seq) {
        if seq.get() > self.seq {
            *seq = confab_spec::ids::Seq::new(seq.get() - 1).unwrap_or(*seq);
        }
    }
}

impl Script for Withhold {
    fn on_server_frame(&mut self, _conn: usize, frame: &mut ServerFrame) -> Verdict {
        match frame {
            ServerFrame::Batch(b) if b.stream == self.stream => {
                b.entries.retain(|e| e.seq.get() != self.seq);
                for e in &mut b.entries {
                    self.shift(&mut e.seq);
                }
            }
            ServerFrame::Deliver(d) if d.stream == self.stream => {
                if d.entry.seq.get() == self.seq {
                    return Verdict::Drop;
                }
                self.shift(&mut d.entry.seq);
            }
            ServerFrame::Subscribed(s) if s.stream == self.stream => {
                self.shift(&mut s.from_seq);
                for v in [&mut s.head_seq, &mut s.ack_cursor] {
                    if *v >= self.seq {
                        *v -= 1;
                    }
                }
                if s.oldest_seq > self.seq {
                    s.oldest_seq -= 1;
                }
            }
            _ => {}
        }
        Verdict::Forward
    }
}

async fn reports_withheld_messages(cx: &mut Ctx) -> CaseResult {
    let mut setup = client_room_with_members(cx, 1).await?;
    let room = setup.room;
    let (peer, member) = &mut setup.members[0];
    let author = key_prefix(&member.device.id());
    let nonce = hex::encode(random::<8>());
    let texts: Vec<String> = (1..=3).map(|i| format!("numbered {i} {nonce}")).collect();
    let mut withheld = None;
    for (i, text) in texts.iter().enumerate() {
        let content = confab_spec::content::AppContent {
            text: text.as_bytes().to_vec(),
            counter: i as u64 + 1,
        }
        .seal();
        let payload = member
            .engine
            .encrypt(&room, &content)
            .map_err(|e| broken("encrypt", e))?;
        let (seq, _) = send_mls(
            peer,
            30 + i as u64,
            room,
            MsgId(random()),
            bytes(payload)?,
            None,
        )
        .await?
        .map_err(|e| broken("send a message", describe_error(&e)))?;
        if i == 1 {
            withheld = Some(seq);
        }
    }
    let seq = withheld.ok_or_else(|| broken("send", "no second message"))?;
    let client = cx.client(Box::new(Withhold {
        stream: confab_spec::ids::StreamId::Conversation(room),
        seq,
    }))?;
    let out = read_room(client, setup.home.path()).await?;
    let lines: Vec<&str> = out.lines().collect();
    let third = lines.iter().position(|l| l.contains(&texts[2]));
    let report = lines
        .iter()
        .position(|l| l.contains("never arrived") && l.contains(&author));
    match (report, third) {
        (Some(r), Some(t)) if r <= t => Ok(()),
        _ => Err(Failure::new(
            format!(
                "before the third message, a line naming {author}… that says its earlier message never arrived"
            ),
            format!("{out:?}"),
        )
        .into()),
    }
}

async fn replayed_payload(cx: &mut Ctx) -> CaseResult {
    let mut setup = client_room_with_members(cx, 1).await?;
    let room = setup.room;
    let (peer, member) = &mut setup.members[0];
    let text = format!("said once {}", hex::encode(random::<8>()));
    let payload = member
        .engine
        .encrypt(&room, text.as_bytes())
        .map_err(|e| broken("encrypt", e))?;
    let payload = bytes(payload)?;
    send_mls(peer, 30, room, MsgId(random()), payload.clone(), None)
        .await?
        .map_err(|e| broken("send a message", describe_error(&e)))?;
    let carrier = member_says(peer, member, room, 31, "carrier").await?;
    // The carrier's entry, with its own seq and msg_id, carries the first message's bytes.
    let client = cx.client(Box::new(RewriteEntry {
        target: carrier,
        rewrite: Box::new(move |e| e.payload = payload.clone()),
    }))?;
    let out = read_room(client, setup.home.path()).await?;
    match out.matches(&text).count() {
        1 => Ok(()),
        n => Err(Failure::new(
            format!("{text:?} shown once (its copy's key is used up: unreadable)"),
            format!("shown {n} times: {out:?}"),
        )
        .into()),
    }
}

/// The epoch of the GroupContext inside an MLSMessage carrying a GroupInfo.
fn group_info_epoch(group_info: &[u8]) -> Option<u64> {
    mls_framing::group_info_parts(group_info)
        .and_then(|p| p.epoch())
        .ok()
}

async fn publishes_group_info(cx: &mut Ctx) -> CaseResult {
    let (mut peer, mut member) = invitee_member(cx).await?;
    let invited = hex::encode(member.device.system.public().0);
    let client = cx.client(Box::new(PassThrough))?;
    let home = home()?;
    device_with_room(client, home.path(), "published").await?;
    client
        .run(home.path(), &["room", "invite", "published", &invited])
        .await?;
    let events = client.proxy.events();
    let commits: Vec<&confab_spec::frame::Send> = sent(&events)
        .filter_map(|(_, _, f)| match f {
            ClientFrame::Send(s) if is_commit(s) => Some(s),
            _ => None,
        })
        .collect();
    if commits.is_empty() {
        return Err(Failure::new("the invitation sent as a Commit", "no Commit").into());
    }
    for s in commits {
        let epoch = match mls_framing::peek(s.payload.as_bytes()) {
            Ok(mls_framing::Peek::Framed(f)) => f.epoch,
            _ => return Err(broken("read the client's Commit", "not a Commit")),
        };
        let published = s
            .group_info
            .as_ref()
            .and_then(|g| group_info_epoch(g.as_bytes()));
        if published != Some(epoch + 1) {
            return Err(Failure::new(
                format!(
                    "a Commit of epoch {epoch} with the GroupInfo of epoch {}",
                    epoch + 1
                ),
                match (&s.group_info, published) {
                    (None, _) => "no group_info".to_owned(),
                    (Some(_), None) => "a group_info that is not a GroupInfo".to_owned(),
                    (Some(_), Some(e)) => format!("the GroupInfo of epoch {e}"),
                },
            )
            .into());
        }
    }
    // The member joined from the Welcome of a Commit with a GroupInfo: the room works.
    join_welcome(&mut peer, &mut member, 20).await?;
    Ok(())
}

async fn resyncs_after_fork(cx: &mut Ctx) -> CaseResult {
    use super::log::{Attached, replay, send_with, subscribe, subscribed};
    use confab_client::mls::Processed;

    let (mut peer, mut member) = invitee_member(cx).await?;
    let invited = hex::encode(member.device.system.public().0);
    let client = cx.client(Box::new(PassThrough))?;
    let home = home()?;
    device_with_room(client, home.path(), "back").await?;
    client
        .run_ok(home.path(), &["room", "invite", "back", &invited])
        .await?;
    let room = join_welcome(&mut peer, &mut member, 20).await?;
    // The member's Commit with a broken confirmation tag, and the GroupInfo it leads to:
    // the gateway sequences it, nobody can apply it.
    let real = restate_roles(&mut member, room)?;
    member
        .engine
        .discard_pending_commit(&room)
        .map_err(|e| broken("discard", e))?;
    let (commit, group_info) = crate::mls::with_broken_tag(&real, &member.device.key)?;
    let attached = Attached {
        welcome: None,
        group_info: Some(group_info),
    };
    let (fork_seq, _) = send_with(&mut peer, 21, (room, MsgId(random())), commit, attached)
        .await?
        .map_err(|e| broken("send the Commit", describe_error(&e)))?;
    // The member gets back in first, from that GroupInfo: its resync publishes a GroupInfo
    // the client can use.
    let info = super::resync::group_info_of(&mut peer, 22, room, "the member").await?;
    let resync = member
        .engine
        .resync(
            &room,
            info.group_info.as_bytes(),
            info.ratchet_tree.as_ref().map(|t| t.as_bytes()),
        )
        .map_err(|e| broken("resync", e))?;
    super::log::send_commit(&mut peer, 23, room, MsgId(random()), &resync)
        .await?
        .map_err(|e| broken("send the resync", describe_error(&e)))?;
    let text = format!("back after the fork {}", hex::encode(random::<8>()));
    let client = cx.client(Box::new(PassThrough))?;
    client.run(home.path(), &["send", "back", &text]).await?;
    let events = client.proxy.events();
    let first = sent(&events).find_map(|(_, _, f)| match f {
        ClientFrame::Send(s) if s.conversation == room => Some(s.payload.as_bytes()),
        _ => None,
    });
    match first {
        Some(p) if super::client::is_resync(p) => {}
        Some(_) => {
            return Err(Failure::new(
                format!("a resync first into the room that forked at seq {fork_seq}"),
                "a Send that is not a resync",
            )
            .into());
        }
        None => {
            return Err(Failure::new(
                format!("a resync into the room that forked at seq {fork_seq}"),
                "nothing sent into it",
            )
            .into());
        }
    }
    // The member reads what came after its own resync: the client's resync applies, and
    // the client's message decrypts to its text.
    peer.send(&subscribe(24, room, Some(fork_seq + 2))).await?;
    subscribed(&mut peer, 24).await?;
    let (entries, _) = replay(&mut peer, room).await?;
    let mut resynced = false;
    for e in &entries {
        match member.engine.process(&room, e.payload.as_bytes()) {
            Ok(Processed::Commit { external: true, .. }) => resynced = true,
            Ok(Processed::Application { plaintext, .. }) if resynced => {
                let shown = confab_spec::content::AppContent::open(&plaintext)
                    .map_or(plaintext.clone(), |c| c.text);
                if shown == text.as_bytes() {
                    return Ok(());
                }
            }
            _ => {}
        }
    }
    Err(Failure::new(
        "the client's resync applied by the member, then its message readable",
        if resynced {
            "the resync applied, the message not found or unreadable"
        } else {
            "no resync the member could apply"
        },
    )
    .into())
}

#[cfg(test)]
mod tests {
    use super::names_first;

    #[test]
    fn the_author_must_be_named_first() {
        assert!(names_first("[4] aaaa: hi", "aaaa", "bbbb"));
        assert!(names_first("[4] aaaa (! said bbbb): hi", "aaaa", "bbbb"));
        assert!(!names_first("[4] bbbb: hi", "aaaa", "bbbb"));
        assert!(!names_first("[4] bbbb (aaaa): hi", "aaaa", "bbbb"));
        assert!(!names_first("[4] me: hi", "aaaa", "bbbb"));
    }
}
