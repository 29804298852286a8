//! Consent with the reference client against the gateway (SPEC.md 8.1, 10.2 rule 8 and
//! 10.5), in every engine pairing: a user whose policy is `allowed` cannot be claimed or
//! added by anyone off its allow list (the claim looks like one of a key nobody holds);
//! an invitation from a user never talked with is held as a request, joined on accept
//! (with everything sent meanwhile readable) and forgotten on decline, leaving the
//! invitee's conversations and room count as they were; an invitation from a known user
//! joins at once.

mod app_support;

use app_support::{Gateway, device, pump_until, receive, user};
use confab_client::app::ClientError;
use confab_client::mls::EngineKind;
use confab_spec::ErrorCode;
use confab_spec::frame::InvitePolicy;

const PAIRINGS: [(EngineKind, EngineKind); 4] = [
    (EngineKind::OpenMls, EngineKind::OpenMls),
    (EngineKind::OpenMls, EngineKind::MlsRs),
    (EngineKind::MlsRs, EngineKind::OpenMls),
    (EngineKind::MlsRs, EngineKind::MlsRs),
];

fn other(kind: EngineKind) -> EngineKind {
    match kind {
        EngineKind::OpenMls => EngineKind::MlsRs,
        EngineKind::MlsRs => EngineKind::OpenMls,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_requests_accept_and_decline() {
    for (ka, kb) in PAIRINGS {
        let dir = tempfile::tempdir().expect("tempdir");
        let gateway = Gateway::start(dir.path(), |_| {}).await;
        let origin = &gateway.origin;
        let mut alice = device(dir.path(), origin, 10, 10, ka);
        let mut bob = device(dir.path(), origin, 20, 20, kb);
        // Carol runs the engine Bob does not, so every room below mixes engines.
        let mut carol = device(dir.path(), origin, 30, 30, other(kb));
        bob.set_hold_requests(true);
        for c in [&mut alice, &mut bob, &mut carol] {
            c.connect().await.expect("connect");
            c.top_up_key_packages(4).await.expect("top up");
        }
        let (alice_key, bob_key) = (user(10).public(), user(20).public());

        // Bob lets nobody in: Alice's claim is answered as for a key nobody holds.
        let settings = bob
            .update_invite_settings(Some(InvitePolicy::Allowed), vec![], vec![])
            .await
            .expect("settings");
        assert_eq!(settings.policy, InvitePolicy::Allowed);
        assert!(matches!(
            alice.create_dm(bob_key).await,
            Err(ClientError::NoKeyPackages)
        ));
        // Allowed, Alice opens a DM; Bob never talked with her: a request.
        let settings = bob
            .update_invite_settings(None, vec![alice_key], vec![])
            .await
            .expect("allow alice");
        assert_eq!(settings.allowed, vec![alice_key]);
        let dm = alice.create_dm(bob_key).await.expect("dm");
        alice.send_text(dm, b"hi bob").await.expect("send");
        pump_until(&mut bob, "the request", |b| {
            b.requests().is_ok_and(|r| r.len() == 1)
        })
        .await;
        let request = bob.requests().expect("requests").remove(0);
        assert_eq!(request.conversation, dm, "{ka:?}/{kb:?}");
        assert_eq!(request.inviter.system, alice_key);
        assert!(
            bob.store()
                .conversations()
                .expect("conversations")
                .is_empty(),
            "nothing joined before accepting"
        );
        // Accepted: what Alice sent meanwhile is read, and the DM works both ways.
        bob.accept_request(&dm).await.expect("accept");
        assert!(bob.requests().expect("requests").is_empty());
        let mut seen = Vec::new();
        receive(&mut bob, &mut seen, 1).await;
        assert_eq!(seen, vec![b"hi bob".to_vec()], "{ka:?}/{kb:?}");
        bob.send_text(dm, b"hi alice").await.expect("bob sends");
        let mut seen = Vec::new();
        receive(&mut alice, &mut seen, 2).await;
        assert_eq!(seen.last(), Some(&b"hi alice".to_vec()));

        // Carol, a stranger, is not on Bob's list: the gateway refuses her Add outright.
        let room = carol.create_room("carols").await.expect("room");
        assert!(matches!(
            carol.invite(room, bob_key).await,
            Err(ClientError::NoKeyPackages)
        ));
        // Under `everyone` her invitation reaches Bob as a request, and Bob declines it.
        bob.update_invite_settings(Some(InvitePolicy::Everyone), vec![], vec![])
            .await
            .expect("everyone");
        carol.invite(room, bob_key).await.expect("invite");
        pump_until(&mut bob, "the room request", |b| {
            b.requests().is_ok_and(|r| r.len() == 1)
        })
        .await;
        assert!(bob.decline_request(&room).expect("decline"));
        assert!(bob.requests().expect("requests").is_empty());
        assert_eq!(
            bob.store().conversations().expect("conversations").len(),
            1,
            "only the DM: the declined room left nothing"
        );
        assert!(matches!(
            bob.accept_request(&room).await,
            Err(ClientError::NoSuchRequest)
        ));

        // Alice is known now (the DM): her invitation joins at once.
        let book = alice.create_room("book").await.expect("alice's room");
        alice.invite(book, bob_key).await.expect("invite bob");
        pump_until(&mut bob, "joining alice's room", |b| {
            b.store()
                .conversations()
                .is_ok_and(|cs| cs.iter().any(|c| c.id == book))
        })
        .await;
        assert!(bob.requests().expect("requests").is_empty());
        bob.take_received(); // its own messages' echoes
        alice.send_text(book, b"chapter one").await.expect("send");
        let mut seen = Vec::new();
        receive(&mut bob, &mut seen, 1).await;
        assert_eq!(seen, vec![b"chapter one".to_vec()], "{ka:?}/{kb:?}");
        gateway.stop().await;
    }
}

/// An invitation never accepted costs the invitee no room (SPEC.md 10.4): with
/// `rooms_per_user_max` 2, a user invited to three rooms by strangers still creates its own
/// rooms; joining past the limit is refused with `too_many_rooms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_invitations_count_toward_no_room_limit() {
    for (ka, kb) in [
        (EngineKind::OpenMls, EngineKind::MlsRs),
        (EngineKind::MlsRs, EngineKind::OpenMls),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let gateway = Gateway::start(dir.path(), |c| c.rooms.rooms_per_user_max = 2).await;
        let origin = &gateway.origin;
        let mut victim = device(dir.path(), origin, 20, 20, kb);
        victim.set_hold_requests(true);
        victim.connect().await.expect("connect");
        victim.top_up_key_packages(6).await.expect("top up");
        let victim_key = user(20).public();
        for (i, u) in [40u8, 41, 42].into_iter().enumerate() {
            let mut stranger = device(dir.path(), origin, u, u, ka);
            stranger.connect().await.expect("connect");
            let room = stranger
                .create_room(&format!("spam-{i}"))
                .await
                .expect("room");
            stranger.invite(room, victim_key).await.expect("invite");
        }
        pump_until(&mut victim, "three requests", |v| {
            v.requests().is_ok_and(|r| r.len() == 3)
        })
        .await;
        // Both of the victim's own rooms fit; the requests took nothing.
        let first = victim.create_room("mine-1").await.expect("own room 1");
        victim.create_room("mine-2").await.expect("own room 2");
        assert!(matches!(
            victim.create_room("mine-3").await,
            Err(ClientError::Refused(ErrorCode::TooManyRooms))
        ));
        // Joining a third room is refused by the gateway until one is left.
        let request = victim.requests().expect("requests").remove(0);
        assert!(matches!(
            victim.accept_request(&request.conversation).await,
            Err(ClientError::Refused(ErrorCode::TooManyRooms))
        ));
        // The refusal touched nothing else: the victim's own room still works.
        victim.send_text(first, b"still mine").await.expect("send");
        gateway.stop().await;
    }
}
