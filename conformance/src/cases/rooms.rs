//! SPEC.md section 10 with real MLS rooms: the governance rules a server enforces on room
//! Commits, leave requests, and the room limits. Each room mixes the engines: members
//! alternate openmls and mls-rs, starting with the owner on openmls.

use confab_spec::ErrorCode;
use confab_spec::ServerFrame;
use confab_spec::frame::{ClientFrame, ConversationKind, InvitePolicy, UpdatePresenceLists};
use confab_spec::ids::{ConversationId, DeviceId, MsgId, SystemKey};
use confab_spec::rooms::{Role, RoomRoles};

use crate::case;
use crate::case::{Case, CaseResult, Failure, Stop};
use crate::cases::log::{random, send_commit, send_mls};
use crate::context::{Ctx, Device, Peer};
use crate::mls::{Member, PAIR, broken, bytes};
use confab_client::mls::ExtraProposal;

/// The cases of section 10.
pub fn cases() -> Vec<Case> {
    vec![
        case!(
            "10-3.roles-in-every-commit",
            "REQ-10-3",
            Must,
            "a room Commit without the confab_room_roles extension is forbidden (303); with it, accepted",
            roles_in_every_commit
        ),
        case!(
            "10-4.member-adds",
            "REQ-10-4",
            Must,
            "a member adding another user is forbidden (303); the owner adding them is accepted",
            member_adds
        ),
        case!(
            "10-4.admin-removes-owner",
            "REQ-10-4",
            Must,
            "an admin (named by the owner) removing the owner is forbidden; removing a member is accepted",
            admin_removes_owner
        ),
        case!(
            "10-4.member-names-admin",
            "REQ-10-4",
            Must,
            "a member stating itself an admin is forbidden; the owner naming it is accepted",
            member_names_admin
        ),
        case!(
            "10-4.absent-role-holder",
            "REQ-10-4",
            Must,
            "removing an admin's last device while still stating it an admin is forbidden; dropping the role is accepted",
            absent_role_holder
        ),
        case!(
            "10-5.dm-third-user",
            "REQ-10-5",
            Must,
            "a Commit adding a third user's device to a direct message is forbidden (303)",
            dm_third_user
        ),
        case!(
            "10-5.invitee-blocks",
            "REQ-10-5",
            Must,
            "adding a user whose blocklist holds the committer is forbidden (303)",
            invitee_blocks
        ),
        case!(
            "10-6.leave-request",
            "REQ-10-6",
            Must,
            "a member removing another is forbidden until that one asked to leave (a Remove proposal of its own leaf); then, in a later epoch, accepted",
            leave_request
        ),
        case!(
            "10-7.room-full",
            "REQ-10-7",
            Must,
            "a Commit that would pass room_members_max is room_full (308)",
            room_full
        ),
        case!(
            "10-8.too-many-rooms",
            "REQ-10-8",
            Must,
            "creating a room, or joining one by a Subscribe, beyond rooms_per_user_max is too_many_rooms (309); the invitation itself is accepted",
            too_many_rooms
        ),
        case!(
            "10-8.invitations-cost-nothing",
            "REQ-10-8",
            Must,
            "a user invited to rooms_per_user_max rooms it never opened can still create a room and join another",
            invitations_cost_nothing
        ),
        case!(
            "10-9.invite-not-allowed",
            "REQ-10-9",
            Must,
            "adding a user whose policy is allowed and whose allow list lacks the committer is invite_not_allowed (311); once allowed, accepted",
            invite_not_allowed
        ),
        case!(
            "10-9.dm-invite-not-allowed",
            "REQ-10-9",
            Must,
            "a direct message adding a user that does not allow its creator is invite_not_allowed (311)",
            dm_invite_not_allowed
        ),
    ]
}

/// One suite device in a room: its connection and MLS state.
struct Seat {
    peer: Peer,
    member: Member,
}

/// A room: seat 0 is the owner, who created it; seats join as they are added.
struct Room {
    id: ConversationId,
    seats: Vec<Seat>,
    /// Whether each seat is in the group (joined and not removed).
    joined: Vec<bool>,
    rid: u64,
}

impl Room {
    /// A room of `kind` (a room, or a direct message for the cases of REQ-10-5) created by
    /// a fresh owner, with `others` more fresh devices connected and not added.
    async fn new(cx: &Ctx, kind: ConversationKind, others: usize) -> Result<Self, Stop> {
        let mut seats = Vec::new();
        let mut now = None;
        for i in 0..=others {
            let device = Device::fresh();
            let (peer, ready) = cx.ready(&format!("d{i}"), &device).await?;
            let now = *now.get_or_insert(ready.server_time_ms);
            let member = Member::new(device, PAIR[i % 2], now)?;
            seats.push(Seat { peer, member });
        }
        let mut room = Self {
            id: ConversationId([0; 32]),
            joined: vec![false; seats.len()],
            seats,
            rid: 0,
        };
        room.renew(kind).await?;
        room.rid = 10;
        Ok(room)
    }

    fn device(&self, seat: usize) -> DeviceId {
        self.seats[seat].member.device.id()
    }

    fn user(&self, seat: usize) -> confab_spec::ids::SystemKey {
        self.device(seat).system
    }

    /// Seat `by` commits adding `adds` and removing `removes`, stating `roles` (none for
    /// `None`): the server's answer. An accepted Commit is merged by `by`, the added seats
    /// join from its Welcome, and every other seat in the group processes it; a refused
    /// one is discarded.
    async fn commit(
        &mut self,
        by: usize,
        adds: &[usize],
        removes: &[usize],
        roles: Option<&RoomRoles>,
    ) -> Result<Result<u64, ErrorCode>, Stop> {
        let mut packages = Vec::new();
        for &a in adds {
            let kp = self.seats[a].member.key_packages(1, false)?;
            packages.extend(kp.into_iter().map(|k| k.as_bytes().to_vec()));
        }
        let removed: Vec<DeviceId> = removes.iter().map(|&r| self.device(r)).collect();
        let extra: Vec<ExtraProposal> = roles
            .map(|r| ExtraProposal::GroupContextExtensions(r.context_extensions()))
            .into_iter()
            .collect();
        let id = self.id;
        let out = self.seats[by]
            .member
            .engine
            .commit(&id, &packages, &removed, &extra, roles.is_some())
            .map_err(|e| broken("commit", e))?;
        self.rid += 1;
        let rid = self.rid;
        let answer = send_commit(&mut self.seats[by].peer, rid, id, MsgId(random()), &out).await?;
        let engine = &mut self.seats[by].member.engine;
        let seq = match answer {
            Ok((seq, _)) => {
                engine
                    .merge_pending_commit(&id)
                    .map_err(|e| broken("merge", e))?;
                seq
            }
            Err(e) => {
                engine
                    .discard_pending_commit(&id)
                    .map_err(|e| broken("discard", e))?;
                return Ok(Err(e.code));
            }
        };
        for seat in 0..self.seats.len() {
            if seat == by || !self.joined[seat] || adds.contains(&seat) {
                continue;
            }
            if removes.contains(&seat) {
                self.joined[seat] = false;
                continue;
            }
            self.seats[seat]
                .member
                .engine
                .process(&id, &out.commit)
                .map_err(|e| broken("process a Commit", e))?;
        }
        if let Some(welcome) = &out.welcome {
            for &a in adds {
                self.seats[a]
                    .member
                    .engine
                    .join(welcome)
                    .map_err(|e| broken("join", e))?;
                self.joined[a] = true;
            }
        }
        Ok(Ok(seq))
    }

    /// The owner creates a conversation of `kind` (another one, after the first) with the
    /// same seats; the room's id becomes the new one's and only the owner is in it.
    async fn renew(&mut self, kind: ConversationKind) -> Result<(), Stop> {
        self.id = ConversationId(random());
        self.rid += 1;
        let rid = self.rid;
        let owner = &mut self.seats[0];
        let extensions = match kind {
            ConversationKind::Room => {
                RoomRoles::new(owner.member.device.id().system).context_extensions()
            }
            _ => Vec::new(),
        };
        let frame = owner.member.create_frame(rid, self.id, kind, &extensions)?;
        owner.peer.send(&frame).await?;
        owner
            .peer
            .expect("Created", |f| match f {
                ServerFrame::Created(c) if c.rid == rid => Some(Ok(())),
                ServerFrame::Error(e) if e.rid == Some(rid) => Some(Err(e.code)),
                _ => None,
            })
            .await?
            .map_err(|code| Failure::new("Created", format!("Error {}", code.name())))?;
        self.joined = vec![false; self.seats.len()];
        self.joined[0] = true;
        Ok(())
    }

    /// Seat `seat` subscribes to the room: `Ok` for `Subscribed`, else the error code.
    async fn subscribe(&mut self, seat: usize) -> Result<Result<(), ErrorCode>, Stop> {
        self.rid += 1;
        let rid = self.rid;
        let peer = &mut self.seats[seat].peer;
        peer.send(&crate::cases::log::subscribe(rid, self.id, None))
            .await?;
        peer.expect("Subscribed or Error", |f| match f {
            ServerFrame::Subscribed(s) if s.rid == rid => Some(Ok(())),
            ServerFrame::Error(e) if e.rid == Some(rid) => Some(Err(e.code)),
            _ => None,
        })
        .await
    }

    /// Seat `seat` sets its user's invite settings (SPEC.md 8.1).
    async fn invite_settings(
        &mut self,
        seat: usize,
        policy: Option<InvitePolicy>,
        allow: Option<Vec<SystemKey>>,
    ) -> Result<(), Stop> {
        self.rid += 1;
        crate::cases::consent::settings(&mut self.seats[seat].peer, self.rid, policy, allow, None)
            .await?
            .map(|_| ())
            .map_err(|e| Failure::new("InviteSettings", format!("Error {}", e.code.name())).into())
    }

    /// A room whose owner added `members` more seats (roles unchanged).
    async fn with_members(cx: &Ctx, members: usize) -> Result<Self, Stop> {
        let mut room = Self::new(cx, ConversationKind::Room, members).await?;
        let roles = RoomRoles::new(room.user(0));
        let seats: Vec<usize> = (1..=members).collect();
        room.commit(0, &seats, &[], Some(&roles))
            .await?
            .map_err(|code| accepted_expected("the owner's Adds", code))?;
        Ok(room)
    }
}

fn accepted_expected(what: &str, code: ErrorCode) -> Stop {
    Failure::new(format!("{what} Accepted"), format!("Error {}", code.name())).into()
}

fn expect_refusal(what: &str, expected: ErrorCode, answer: Result<u64, ErrorCode>) -> CaseResult {
    match answer {
        Err(code) if code == expected => Ok(()),
        Err(code) => Err(Failure::new(
            format!("{what}: Error {} ({})", expected.name(), expected.value()),
            format!("Error {}", code.name()),
        )
        .into()),
        Ok(seq) => Err(Failure::new(
            format!("{what}: Error {} ({})", expected.name(), expected.value()),
            format!("Accepted at seq {seq}"),
        )
        .into()),
    }
}

async fn roles_in_every_commit(cx: &mut Ctx) -> CaseResult {
    let mut room = Room::with_members(cx, 1).await?;
    let without = room.commit(0, &[], &[], None).await?;
    expect_refusal("a room Commit without roles", ErrorCode::Forbidden, without)?;
    let roles = RoomRoles::new(room.user(0));
    room.commit(0, &[], &[], Some(&roles))
        .await?
        .map_err(|code| accepted_expected("the same Commit stating the roles", code))?;
    Ok(())
}

async fn member_adds(cx: &mut Ctx) -> CaseResult {
    let mut room = Room::new(cx, ConversationKind::Room, 2).await?;
    let roles = RoomRoles::new(room.user(0));
    room.commit(0, &[1], &[], Some(&roles))
        .await?
        .map_err(|code| accepted_expected("the owner adding a user", code))?;
    let by_member = room.commit(1, &[2], &[], Some(&roles)).await?;
    expect_refusal("a member adding a user", ErrorCode::Forbidden, by_member)?;
    room.commit(0, &[2], &[], Some(&roles))
        .await?
        .map_err(|code| accepted_expected("the owner adding the same user", code))?;
    Ok(())
}

async fn admin_removes_owner(cx: &mut Ctx) -> CaseResult {
    let mut room = Room::with_members(cx, 2).await?;
    let admin = RoomRoles::new(room.user(0)).with_role(room.user(1), Role::Admin);
    room.commit(0, &[], &[], Some(&admin))
        .await?
        .map_err(|code| accepted_expected("the owner naming an admin", code))?;
    let without_owner = RoomRoles {
        owner: None,
        admins: admin.admins.clone(),
    };
    let removal = room.commit(1, &[], &[0], Some(&without_owner)).await?;
    expect_refusal("an admin removing the owner", ErrorCode::Forbidden, removal)?;
    room.commit(1, &[], &[2], Some(&admin))
        .await?
        .map_err(|code| accepted_expected("the admin removing a member", code))?;
    Ok(())
}

async fn member_names_admin(cx: &mut Ctx) -> CaseResult {
    let mut room = Room::with_members(cx, 1).await?;
    let promoted = RoomRoles::new(room.user(0)).with_role(room.user(1), Role::Admin);
    let by_self = room.commit(1, &[], &[], Some(&promoted)).await?;
    expect_refusal(
        "a member naming itself admin",
        ErrorCode::Forbidden,
        by_self,
    )?;
    room.commit(0, &[], &[], Some(&promoted))
        .await?
        .map_err(|code| accepted_expected("the owner naming it", code))?;
    Ok(())
}

async fn absent_role_holder(cx: &mut Ctx) -> CaseResult {
    let mut room = Room::with_members(cx, 1).await?;
    let admin = RoomRoles::new(room.user(0)).with_role(room.user(1), Role::Admin);
    room.commit(0, &[], &[], Some(&admin))
        .await?
        .map_err(|code| accepted_expected("the owner naming an admin", code))?;
    let kept = room.commit(0, &[], &[1], Some(&admin)).await?;
    expect_refusal(
        "removing the admin's only device while stating it admin",
        ErrorCode::Forbidden,
        kept,
    )?;
    room.commit(0, &[], &[1], Some(&RoomRoles::new(room.user(0))))
        .await?
        .map_err(|code| accepted_expected("removing it and its role", code))?;
    Ok(())
}

async fn dm_third_user(cx: &mut Ctx) -> CaseResult {
    let mut dm = Room::new(cx, ConversationKind::DirectMessage, 2).await?;
    dm.commit(0, &[1], &[], None)
        .await?
        .map_err(|code| accepted_expected("adding the peer to the DM", code))?;
    let third = dm.commit(0, &[2], &[], None).await?;
    expect_refusal("adding a third user to a DM", ErrorCode::Forbidden, third)
}

async fn invitee_blocks(cx: &mut Ctx) -> CaseResult {
    let mut room = Room::new(cx, ConversationKind::Room, 1).await?;
    let owner = room.user(0);
    let invitee = &mut room.seats[1].peer;
    invitee
        .send(&ClientFrame::UpdatePresenceLists(UpdatePresenceLists {
            rid: 2,
            share: None,
            unshare: None,
            block: Some(vec![owner]),
            unblock: None,
        }))
        .await?;
    invitee
        .expect("PresenceLists", |f| match f {
            ServerFrame::PresenceLists(l) if l.rid == 2 => Some(Ok(())),
            ServerFrame::Error(e) if e.rid == Some(2) => Some(Err(e.code)),
            _ => None,
        })
        .await?
        .map_err(|code| Failure::new("PresenceLists", format!("Error {}", code.name())))?;
    let roles = RoomRoles::new(owner);
    let add = room.commit(0, &[1], &[], Some(&roles)).await?;
    expect_refusal(
        "adding a user who blocks the committer",
        ErrorCode::Forbidden,
        add,
    )
}

async fn leave_request(cx: &mut Ctx) -> CaseResult {
    let mut room = Room::with_members(cx, 2).await?;
    let roles = RoomRoles::new(room.user(0));
    let early = room.commit(1, &[], &[2], Some(&roles)).await?;
    expect_refusal(
        "a member removing another that did not ask to leave",
        ErrorCode::Forbidden,
        early,
    )?;
    // Seat 2 asks to leave; an unrelated Commit moves the epoch on; seat 1 commits it.
    let id = room.id;
    let proposal = room.seats[2]
        .member
        .engine
        .leave(&id)
        .map_err(|e| broken("propose to leave", e))?;
    room.rid += 1;
    let rid = room.rid;
    send_mls(
        &mut room.seats[2].peer,
        rid,
        id,
        MsgId(random()),
        bytes(proposal)?,
        None,
    )
    .await?
    .map_err(|e| accepted_expected("the leave request", e.code))?;
    room.commit(0, &[], &[], Some(&roles))
        .await?
        .map_err(|code| accepted_expected("an update by the owner", code))?;
    room.commit(1, &[], &[2], Some(&roles))
        .await?
        .map_err(|code| accepted_expected("a member committing the leave, an epoch later", code))?;
    Ok(())
}

async fn room_full(cx: &mut Ctx) -> CaseResult {
    let Some(max) = cx.info.limits.room_members_max else {
        return Err(Stop::Skipped(
            "the server does not announce room_members_max".into(),
        ));
    };
    if max > 16 {
        return Err(Stop::Skipped(format!(
            "needs room_members_max of at most 16 (the conformance profile sets 4); the server announces {max}"
        )));
    }
    let members = usize::try_from(max).unwrap_or(16);
    let mut room = Room::new(cx, ConversationKind::Room, members).await?;
    let roles = RoomRoles::new(room.user(0));
    let fill: Vec<usize> = (1..members).collect();
    room.commit(0, &fill, &[], Some(&roles))
        .await?
        .map_err(|code| accepted_expected("filling the room to room_members_max", code))?;
    let over = room.commit(0, &[members], &[], Some(&roles)).await?;
    expect_refusal("one device more", ErrorCode::RoomFull, over)
}

async fn too_many_rooms(cx: &mut Ctx) -> CaseResult {
    let Some(max) = cx.info.limits.rooms_per_user_max else {
        return Err(Stop::Skipped(
            "the server does not announce rooms_per_user_max".into(),
        ));
    };
    if max > 8 {
        return Err(Stop::Skipped(format!(
            "needs rooms_per_user_max of at most 8 (the conformance profile sets 3); the server announces {max}"
        )));
    }
    // Seat 1 creates rooms up to the limit; then it creates one more, and is added to one.
    let mut room = Room::new(cx, ConversationKind::Room, 1).await?;
    let peer = &mut room.seats[1].peer;
    for n in 0..=max {
        let rid = 100 + n;
        let frame = crate::cases::log::creation(
            peer,
            rid,
            ConversationId(random()),
            ConversationKind::Room,
        )?;
        peer.send(&frame).await?;
        let answer = peer
            .expect("Created or Error", |f| match f {
                ServerFrame::Created(c) if c.rid == rid => Some(Ok(())),
                ServerFrame::Error(e) if e.rid == Some(rid) => Some(Err(e.code)),
                _ => None,
            })
            .await?;
        match (n < max, answer) {
            (true, Ok(())) => {}
            (true, Err(code)) => return Err(accepted_expected("a room within the limit", code)),
            (false, answer) => expect_refusal(
                "a room beyond rooms_per_user_max",
                ErrorCode::TooManyRooms,
                answer.map(|()| 0),
            )?,
        }
    }
    // An invitation costs the invitee nothing: the Add is accepted; joining is refused.
    let roles = RoomRoles::new(room.user(0));
    room.commit(0, &[1], &[], Some(&roles))
        .await?
        .map_err(|code| {
            accepted_expected("inviting a user who joined rooms_per_user_max rooms", code)
        })?;
    let joined = room.subscribe(1).await?;
    expect_refusal(
        "subscribing to a room beyond rooms_per_user_max",
        ErrorCode::TooManyRooms,
        joined.map(|()| 0),
    )
}

async fn invitations_cost_nothing(cx: &mut Ctx) -> CaseResult {
    let Some(max) = cx.info.limits.rooms_per_user_max else {
        return Err(Stop::Skipped(
            "the server does not announce rooms_per_user_max".into(),
        ));
    };
    if max > 8 {
        return Err(Stop::Skipped(format!(
            "needs rooms_per_user_max of at most 8 (the conformance profile sets 3); the server announces {max}"
        )));
    }
    // The owner invites seat 1 into `max` rooms; seat 1 never opens them.
    let mut room = Room::new(cx, ConversationKind::Room, 1).await?;
    for n in 0..max {
        if n > 0 {
            room.renew(ConversationKind::Room).await?;
        }
        let roles = RoomRoles::new(room.user(0));
        room.commit(0, &[1], &[], Some(&roles))
            .await?
            .map_err(|code| accepted_expected("an invitation", code))?;
    }
    // Seat 1 creates a room of its own, then joins the last room it was invited to.
    let rid = 900;
    let peer = &mut room.seats[1].peer;
    let frame =
        crate::cases::log::creation(peer, rid, ConversationId(random()), ConversationKind::Room)?;
    peer.send(&frame).await?;
    peer.expect("Created or Error", |f| match f {
        ServerFrame::Created(c) if c.rid == rid => Some(Ok(())),
        ServerFrame::Error(e) if e.rid == Some(rid) => Some(Err(e.code)),
        _ => None,
    })
    .await?
    .map_err(|code| {
        accepted_expected(
            &format!("creating a room after invitations to {max} rooms never opened"),
            code,
        )
    })?;
    room.subscribe(1)
        .await?
        .map_err(|code| accepted_expected("joining a room it was invited to (Subscribed)", code))
}

async fn invite_not_allowed(cx: &mut Ctx) -> CaseResult {
    let mut room = Room::new(cx, ConversationKind::Room, 1).await?;
    let owner = room.user(0);
    room.invite_settings(1, Some(InvitePolicy::Allowed), None)
        .await?;
    let roles = RoomRoles::new(owner);
    let add = room.commit(0, &[1], &[], Some(&roles)).await?;
    expect_refusal(
        "adding a user that does not allow the committer",
        ErrorCode::InviteNotAllowed,
        add,
    )?;
    room.invite_settings(1, None, Some(vec![owner])).await?;
    room.commit(0, &[1], &[], Some(&roles))
        .await?
        .map_err(|code| accepted_expected("adding a user that allows the committer", code))?;
    Ok(())
}

async fn dm_invite_not_allowed(cx: &mut Ctx) -> CaseResult {
    let mut room = Room::new(cx, ConversationKind::DirectMessage, 1).await?;
    room.invite_settings(1, Some(InvitePolicy::Allowed), None)
        .await?;
    let add = room.commit(0, &[1], &[], None).await?;
    expect_refusal(
        "a direct message adding a user that does not allow its creator",
        ErrorCode::InviteNotAllowed,
        add,
    )
}
