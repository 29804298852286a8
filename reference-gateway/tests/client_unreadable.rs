//! A client never wedges (SPEC.md 6.8 and 7.7), with the reference client against the
//! gateway, in every engine pairing: a member's garbage in the middle of a DM is shown as
//! unreadable, with its reason, and every message after it is read; a Commit the gateway
//! accepted but a member cannot apply (its confirmation tag is broken, which only members
//! can check) marks the conversation forked there, is shown, and stops sending into it.
//! And a sender's message numbers (SPEC.md 7.9) show copies and messages that never came.

mod app_support;

use std::time::Duration;

use app_support::{Gateway, device, user};
use confab_client::app::{Client, ClientError};
use confab_client::mls::EngineKind;
use confab_client::store::Message;
use confab_spec::ids::ConversationId;
use confab_spec::mls_framing::public_message_parts;
use confab_spec::mls_write;

const PAIRINGS: [(EngineKind, EngineKind); 4] = [
    (EngineKind::OpenMls, EngineKind::OpenMls),
    (EngineKind::OpenMls, EngineKind::MlsRs),
    (EngineKind::MlsRs, EngineKind::OpenMls),
    (EngineKind::MlsRs, EngineKind::MlsRs),
];

/// The next `n` messages `c` records (readable or not), in order.
async fn messages(c: &mut Client, n: usize) -> Vec<Message> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while seen.len() < n {
        seen.extend(c.take_received());
        if seen.len() >= n {
            break;
        }
        tokio::time::timeout_at(deadline, c.pump())
            .await
            .expect("timely")
            .expect("pump");
    }
    seen
}

/// Alice (engine `ka`) and Bob (`kb`) in a DM Alice created.
async fn dm(
    dir: &std::path::Path,
    origin: &str,
    ka: EngineKind,
    kb: EngineKind,
) -> (Client, Client, ConversationId) {
    let mut alice = device(dir, origin, 10, 10, ka);
    let mut bob = device(dir, origin, 20, 20, kb);
    alice.connect().await.expect("alice connects");
    bob.connect().await.expect("bob connects");
    bob.top_up_key_packages(3).await.expect("top up");
    let conversation = alice.create_dm(user(20).public()).await.expect("dm");
    (alice, bob, conversation)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_a_dm_is_shown_unreadable_and_the_rest_is_read() {
    for (ka, kb) in PAIRINGS {
        let dir = tempfile::tempdir().expect("tempdir");
        let gateway = Gateway::start(dir.path(), |_| {}).await;
        let (mut alice, mut bob, c) = dm(dir.path(), &gateway.origin, ka, kb).await;
        alice.send_text(c, b"one").await.expect("send");
        // A header of this DM's epoch around bytes no key decrypts: the gateway cannot
        // tell, every member must skip it.
        let epoch = alice.engine().epoch(&c).expect("epoch");
        let garbage = mls_write::private_message(&c.0, epoch, &[0xEE; 64]);
        let garbage_seq = alice
            .send_raw(c, garbage)
            .await
            .expect("the gateway takes it");
        alice
            .send_text(c, b"two")
            .await
            .expect("send after the garbage");
        let seen = messages(&mut bob, 3).await;
        let shown: Vec<(u64, &[u8], bool)> = seen
            .iter()
            .map(|m| (m.seq.get(), m.body.as_slice(), m.unreadable.is_some()))
            .collect();
        assert_eq!(
            shown,
            vec![
                (2, b"one".as_slice(), false),
                (garbage_seq.get(), b"".as_slice(), true),
                (4, b"two".as_slice(), false)
            ],
            "{ka}->{kb}"
        );
        let reason = seen[1].unreadable.clone().unwrap_or_default();
        assert!(!reason.is_empty(), "{ka}->{kb}: a reason is given");
        // Kept with its reason, not only shown once.
        let stored = bob.store().messages(&c, 0, 10).expect("messages");
        assert_eq!(stored.len(), 3, "{ka}->{kb}");
        assert_eq!(stored[1].unreadable.as_deref(), Some(reason.as_str()));
        // And Bob is not stuck: he answers, Alice reads it.
        bob.send_text(c, b"three").await.expect("bob sends");
        // Alice's log as she shows it: her own two messages (her garbage has no text to
        // show her), then Bob's answer.
        let back: Vec<Vec<u8>> = messages(&mut alice, 3)
            .await
            .into_iter()
            .map(|m| m.body)
            .collect();
        assert_eq!(
            back,
            [b"one".to_vec(), b"two".to_vec(), b"three".to_vec()],
            "{ka}->{kb}"
        );
        gateway.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_a_member_cannot_apply_forks_the_conversation_and_stops_its_sends() {
    for (ka, kb) in PAIRINGS {
        let dir = tempfile::tempdir().expect("tempdir");
        let gateway = Gateway::start(dir.path(), |_| {}).await;
        let (mut alice, mut bob, c) = dm(dir.path(), &gateway.origin, ka, kb).await;
        alice.send_text(c, b"before").await.expect("send");
        assert_eq!(messages(&mut bob, 1).await[0].body, b"before");
        // Alice's real update Commit with its confirmation tag broken: its signature and
        // path verify, so the gateway sequences it; Bob's engine refuses it.
        let update = alice.engine_mut().self_update(&c).expect("commit");
        alice
            .engine_mut()
            .discard_pending_commit(&c)
            .expect("discard");
        let mut parts = public_message_parts(&update.commit).expect("parts");
        if let Some(tag) = parts.confirmation_tag.as_mut().and_then(|t| t.first_mut()) {
            *tag ^= 0x01;
        }
        let fork_seq = alice
            .send_raw(c, parts.to_message())
            .await
            .expect("the gateway cannot see the tag");
        let seen = messages(&mut bob, 1).await;
        assert_eq!(seen[0].seq, fork_seq, "{ka}->{kb}");
        assert!(
            seen[0].unreadable.is_some(),
            "{ka}->{kb}: shown as unreadable"
        );
        let (at, _) = bob
            .store()
            .forked(&c)
            .expect("store")
            .expect("the conversation is marked forked");
        assert_eq!(at, fork_seq);
        match bob.send_text(c, b"into the fork").await {
            Err(ClientError::Forked { seq, .. }) => assert_eq!(seq, fork_seq),
            other => panic!("{ka}->{kb}: a send into a forked conversation: {other:?}"),
        }
        gateway.stop().await;
    }
}

/// SPEC.md 7.9 in every pairing: a member's messages carry the numbers 1, 2, 3 and are
/// shown as they are; a copy of an old number is shown as out of order, and a number that
/// skips one says one message never arrived (a member's own bytes stand in for what a
/// withholding gateway would do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_numbers_show_what_never_arrived() {
    use confab_client::store::Irregular;
    use confab_spec::content::AppContent;
    for (ka, kb) in PAIRINGS {
        let dir = tempfile::tempdir().expect("tempdir");
        let gateway = Gateway::start(dir.path(), |_| {}).await;
        let (mut alice, mut bob, c) = dm(dir.path(), &gateway.origin, ka, kb).await;
        for text in [b"one".as_slice(), b"two", b"three"] {
            alice.send_text(c, text).await.expect("send");
        }
        let seen = messages(&mut bob, 3).await;
        let numbered: Vec<(Option<u64>, Option<Irregular>)> =
            seen.iter().map(|m| (m.counter, m.irregular)).collect();
        assert_eq!(
            numbered,
            vec![(Some(1), None), (Some(2), None), (Some(3), None)],
            "{ka}->{kb}"
        );
        assert_eq!(seen[2].body, b"three", "{ka}->{kb}: the text, not the map");
        for (counter, text) in [(2, b"again".as_slice()), (5, b"after a gap")] {
            let sealed = AppContent {
                text: text.to_vec(),
                counter,
            }
            .seal();
            let payload = alice.engine_mut().encrypt(&c, &sealed).expect("encrypt");
            alice.send_raw(c, payload).await.expect("send");
        }
        let flagged: Vec<(Vec<u8>, Option<Irregular>)> = messages(&mut bob, 2)
            .await
            .into_iter()
            .map(|m| (m.body, m.irregular))
            .collect();
        assert_eq!(
            flagged,
            vec![
                (b"again".to_vec(), Some(Irregular::Stale)),
                (b"after a gap".to_vec(), Some(Irregular::Missing(1)))
            ],
            "{ka}->{kb}"
        );
        let suspicions = bob.store().suspicions().expect("suspicions");
        assert_eq!(
            (suspicions.missing, suspicions.out_of_order),
            (1, 1),
            "{ka}->{kb}"
        );
    }
}
