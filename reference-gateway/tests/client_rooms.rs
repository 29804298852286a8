//! Rooms (SPEC.md section 10) with the reference client against the gateway over real
//! WebSockets, in mixed groups of both engines: a room with three people (create, invite,
//! promote, an admin invites, messages reach everyone, a member leaves and reads nothing
//! after, the owner removes an admin), every governance refusal the client can provoke
//! (`forbidden` for a member inviting, an admin removing the owner, a member promoting
//! itself; a user who blocks you looks like a key nobody holds), and the room limits
//! (`room_full`; `too_many_rooms` when creating, or opening a room one was invited to).

mod app_support;

use app_support::{Gateway, device, pump_until, receive, user};
use confab_client::app::{Client, ClientError};
use confab_client::mls::EngineKind;
use confab_spec::error::ErrorCode;
use confab_spec::frame::ConversationKind;
use confab_spec::ids::ConversationId;
use confab_spec::rooms::Role;

fn refused(result: Result<Option<confab_spec::ids::Seq>, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::SendRefused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Pumps `c` until it holds `room` as a room it is in.
async fn until_joined(c: &mut Client, room: ConversationId, who: &str) {
    pump_until(c, &format!("{who} joins"), |c| {
        c.store()
            .conversations()
            .expect("conversations")
            .iter()
            .any(|r| r.id == room && !r.removed && r.kind == ConversationKind::Room)
    })
    .await;
}

/// Pumps `c` until its group of `room` is at `epoch`.
async fn until_epoch(c: &mut Client, room: ConversationId, epoch: u64, who: &str) {
    pump_until(c, &format!("{who} reaches epoch {epoch}"), |c| {
        c.engine().epoch(&room).is_ok_and(|e| e >= epoch)
    })
    .await;
}

fn assert_agree(clients: &[&Client], room: ConversationId) {
    let first = clients[0].engine();
    for c in &clients[1..] {
        assert_eq!(c.engine().epoch(&room).ok(), first.epoch(&room).ok());
        assert_eq!(
            c.engine().epoch_authenticator(&room).ok(),
            first.epoch_authenticator(&room).ok(),
            "members disagree on the epoch authenticator"
        );
        assert_eq!(c.room_roles(&room).ok(), clients[0].room_roles(&room).ok());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_with_three_people_in_mixed_engines() {
    for [ka, kb, kc] in [
        [EngineKind::OpenMls, EngineKind::MlsRs, EngineKind::OpenMls],
        [EngineKind::MlsRs, EngineKind::OpenMls, EngineKind::MlsRs],
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let gateway = Gateway::start(dir.path(), |_| {}).await;
        let origin = gateway.origin.clone();
        let mut alice = device(dir.path(), &origin, 10, 10, ka);
        let mut bob = device(dir.path(), &origin, 20, 20, kb);
        let mut carol = device(dir.path(), &origin, 30, 30, kc);
        let mut dave = device(dir.path(), &origin, 40, 40, kb);
        for c in [&mut alice, &mut bob, &mut carol, &mut dave] {
            c.connect().await.expect("connect");
            c.top_up_key_packages(5).await.expect("top up");
        }
        let (a, b, c, d) = (
            user(10).public(),
            user(20).public(),
            user(30).public(),
            user(40).public(),
        );

        let room = alice.create_room("club").await.expect("create");
        assert!(matches!(
            alice.create_room("club").await,
            Err(ClientError::NameTaken(_))
        ));
        let roles = alice.room_roles(&room).expect("roles").expect("a room");
        assert_eq!((roles.owner, roles.admins.len()), (Some(a), 0));
        alice.invite(room, b).await.expect("invite bob");
        until_joined(&mut bob, room, "bob").await;
        assert_eq!(bob.room_roles(&room).expect("roles"), Some(roles.clone()));

        // A member may not invite (rule 2).
        assert_eq!(refused(bob.invite(room, c).await), ErrorCode::Forbidden);
        // The owner promotes bob; now he may.
        alice.set_role(room, b, Role::Admin).await.expect("promote");
        until_epoch(&mut bob, room, 2, "bob").await;
        assert_eq!(
            bob.room_roles(&room).expect("roles").map(|r| r.role_of(&b)),
            Some(Role::Admin)
        );
        bob.invite(room, c).await.expect("the admin invites carol");
        until_joined(&mut carol, room, "carol").await;
        until_epoch(&mut alice, room, 3, "alice").await;
        assert_agree(&[&alice, &bob, &carol], room);

        // Messages reach everyone.
        alice.send_text(room, b"welcome").await.expect("send");
        carol.send_text(room, b"thanks").await.expect("send");
        let mut seen = Vec::new();
        receive(&mut bob, &mut seen, 2).await;
        assert_eq!(seen, vec![b"welcome".to_vec(), b"thanks".to_vec()]);

        // An admin may not remove the owner (rule 3); a member may not promote itself
        // (rule 5).
        assert_eq!(
            refused(bob.remove_member(room, a).await),
            ErrorCode::Forbidden
        );
        assert_eq!(
            refused(carol.set_role(room, c, Role::Admin).await),
            ErrorCode::Forbidden
        );
        // Nobody invites a user who blocks them: to a blocked user the blocker looks like a
        // key nobody holds (SPEC.md 8.1, REQ-8-13), so the claim already finds nothing (an
        // Add made with packages claimed earlier is refused by rule 7: conformance case
        // 10-5.invitee-blocks).
        dave.update_presence_lists(vec![], vec![], vec![a], vec![])
            .await
            .expect("dave blocks alice");
        assert!(matches!(
            alice.invite(room, d).await,
            Err(ClientError::NoKeyPackages)
        ));

        // Carol leaves: her proposal is committed by the member with the lowest leaf
        // (alice, who created the room), whoever that is.
        let before = alice.engine().epoch(&room).expect("epoch");
        carol.leave_room(room).await.expect("leave");
        pump_until(&mut alice, "the leave request", |c| {
            !c.store()
                .leave_requests(&room)
                .expect("requests")
                .is_empty()
        })
        .await;
        alice.sync().await.expect("alice commits the leave");
        assert_eq!(alice.engine().epoch(&room).expect("epoch"), before + 1);
        pump_until(&mut carol, "carol's removal", |c| {
            c.store()
                .conversations()
                .expect("conversations")
                .iter()
                .any(|r| r.id == room && r.removed)
        })
        .await;
        until_epoch(&mut bob, room, before + 1, "bob").await;
        assert_eq!(
            alice
                .room_members(&room)
                .expect("members")
                .iter()
                .map(|m| (m.user, m.role))
                .collect::<Vec<_>>(),
            vec![(a, Role::Owner), (b, Role::Admin)]
        );
        // A verified leave request (SPEC.md 7.8) is read as what it is by every member,
        // the leaver included: nobody shows it as unreadable.
        for (name, c) in [("alice", &alice), ("bob", &bob), ("carol", &carol)] {
            let unreadable: Vec<String> = c
                .store()
                .messages(&room, 0, 100)
                .expect("messages")
                .into_iter()
                .filter_map(|m| m.unreadable)
                .collect();
            assert!(unreadable.is_empty(), "{name}: {unreadable:?}");
        }
        carol.take_received();
        alice.send_text(room, b"after carol").await.expect("send");
        let mut bob_seen = Vec::new();
        receive(&mut bob, &mut bob_seen, 1).await;
        assert_eq!(bob_seen, vec![b"after carol".to_vec()]);
        // Carol reads nothing sent after her removal (the gateway stops her stream).
        for _ in 0..20 {
            let _ = tokio::time::timeout(std::time::Duration::from_millis(50), carol.pump()).await;
        }
        assert!(carol.take_received().is_empty(), "a removed member read on");

        // The owner removes the admin; he loses his role in the same Commit.
        alice.remove_member(room, b).await.expect("remove bob");
        let roles = alice.room_roles(&room).expect("roles").expect("room");
        assert!(roles.admins.is_empty(), "a removed admin keeps no role");
        gateway.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_limits_are_enforced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = Gateway::start(dir.path(), |c| {
        c.rooms.members_max = 2;
        c.rooms.rooms_per_user_max = 2;
    })
    .await;
    let origin = gateway.origin.clone();
    let mut alice = device(dir.path(), &origin, 10, 10, EngineKind::OpenMls);
    let mut bob = device(dir.path(), &origin, 20, 20, EngineKind::MlsRs);
    let mut carol = device(dir.path(), &origin, 30, 30, EngineKind::OpenMls);
    for c in [&mut alice, &mut bob, &mut carol] {
        c.connect().await.expect("connect");
        c.top_up_key_packages(5).await.expect("top up");
    }
    let (b, c) = (user(20).public(), user(30).public());
    let first = alice.create_room("one").await.expect("first room");
    alice
        .invite(first, b)
        .await
        .expect("bob is invited to the first");
    until_joined(&mut bob, first, "bob").await;
    // Two devices is the most the room holds.
    assert_eq!(refused(alice.invite(first, c).await), ErrorCode::RoomFull);
    let second = alice.create_room("two").await.expect("second room");
    alice
        .invite(second, b)
        .await
        .expect("bob is invited to the second");
    until_joined(&mut bob, second, "bob").await;
    // Alice is in two rooms: a third is refused.
    match alice.create_room("three").await {
        Err(ClientError::Refused(code)) => assert_eq!(code, ErrorCode::TooManyRooms),
        other => panic!("a third room: {other:?}"),
    }
    // Bob has joined two rooms: carol's invitation costs him nothing and is accepted, but
    // his device cannot open her room (SPEC.md 10.4).
    let hers = carol.create_room("hers").await.expect("carol's room");
    carol
        .invite(hers, b)
        .await
        .expect("an invitation is accepted");
    let stream = confab_spec::ids::StreamId::Conversation(hers);
    pump_until(&mut bob, "bob's subscription refused", |c| {
        c.subscription_refusal(&stream).is_some()
    })
    .await;
    assert_eq!(
        bob.subscription_refusal(&stream),
        Some(ErrorCode::TooManyRooms)
    );
    gateway.stop().await;
}

/// SPEC.md 10.5: a client checks every room Commit it processes. Against a gateway that
/// skips the room rules (the `no_room_rules` fault), a member's invite goes through, and
/// the owner's client reports the rule it broke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_skips_the_room_rules_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = Gateway::start(dir.path(), |c| c.faults.no_room_rules = true).await;
    let origin = gateway.origin.clone();
    let mut alice = device(dir.path(), &origin, 10, 10, EngineKind::MlsRs);
    let mut bob = device(dir.path(), &origin, 20, 20, EngineKind::OpenMls);
    let mut carol = device(dir.path(), &origin, 30, 30, EngineKind::MlsRs);
    for c in [&mut alice, &mut bob, &mut carol] {
        c.connect().await.expect("connect");
        c.top_up_key_packages(5).await.expect("top up");
    }
    let observer = alice.observe();
    let room = alice.create_room("r").await.expect("create");
    alice
        .invite(room, user(20).public())
        .await
        .expect("invite bob");
    until_joined(&mut bob, room, "bob").await;
    assert!(
        observer
            .lock()
            .expect("observer")
            .governance_faults
            .is_empty(),
        "nothing to report yet"
    );
    // Bob is a member: a correct gateway refuses this.
    bob.invite(room, user(30).public())
        .await
        .expect("the faulty gateway accepts");
    until_epoch(&mut alice, room, 2, "alice").await;
    let faults = observer.lock().expect("observer").governance_faults.clone();
    assert_eq!(faults.len(), 1, "{faults:?}");
    assert!(faults[0].starts_with("rule 2"), "{faults:?}");
    gateway.stop().await;
}
