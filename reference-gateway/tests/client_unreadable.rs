//! A client never wedges (SPEC.md 6.8 and 7.7), with the reference client against the
//! gateway, in every engine pairing: a member's garbage in the middle of a DM is shown as
//! unreadable, with its reason, and every message after it is read; a Commit the gateway
//! accepted but a member cannot apply (its confirmation tag is broken, which only members
//! can check) marks the conversation forked there, is shown, and stops sending into it.
//! And a sender's message numbers (SPEC.md 7.9) show copies and messages that never came.

mod app_support;

use std::time::Duration;

use app_support::{Gateway, device, device_key, pump_until, user};
use confab_client::app::{Client, ClientError};
use confab_client::mls::{CommitOutput, EngineKind};
use confab_client::store::Message;
use confab_spec::ids::{ConversationId, Seq};
use confab_spec::mls_framing::{group_info_parts, public_message_parts};
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
        let fork_seq = unappliable_commit(&mut alice, c).await;
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

/// Syncs `c` (SPEC.md 7.10: a forked conversation resyncs there); panics after 20 s.
async fn sync(c: &mut Client) {
    tokio::time::timeout(Duration::from_secs(20), c.sync())
        .await
        .expect("timely")
        .expect("sync");
}

/// Pumps `c` until it has read a message with `text`; panics after 20 s.
async fn read_text(c: &mut Client, text: &[u8], pairing: (EngineKind, EngineKind)) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        for m in c.take_received() {
            if m.unreadable.is_none() && m.body == text {
                return;
            }
            seen.push(m);
        }
        tokio::time::timeout_at(deadline, c.pump())
            .await
            .unwrap_or_else(|_| panic!("{pairing:?}: never read {text:?}; saw {seen:?}"))
            .expect("pump");
    }
}

/// Alice (device 10) sends her real update Commit with its confirmation tag broken, and
/// the GroupInfo it leads to: its signature and path verify, so the gateway sequences it;
/// no member's engine can apply it. Alice's own state never takes it. Its seq.
async fn unappliable_commit(alice: &mut Client, c: ConversationId) -> Seq {
    let update = alice.engine_mut().self_update(&c).expect("commit");
    alice
        .engine_mut()
        .discard_pending_commit(&c)
        .expect("discard");
    let (commit, group_info) = broken_tag(&update, 10);
    alice
        .send_raw_commit(c, commit, group_info)
        .await
        .expect("the gateway cannot see the tag")
}

/// `update` (a Commit of device `process`) with its confirmation tag broken, and the
/// GroupInfo it leads to, with the same tag, signed again: what a hostile member sends so
/// that the gateway sequences a Commit nobody can apply (the gateway cannot check tags).
fn broken_tag(update: &CommitOutput, process: u8) -> (Vec<u8>, Vec<u8>) {
    let mut parts = public_message_parts(&update.commit).expect("parts");
    if let Some(tag) = parts.confirmation_tag.as_mut().and_then(|t| t.first_mut()) {
        *tag ^= 0x01;
    }
    let info = update
        .group_info
        .as_deref()
        .expect("a Commit publishes its GroupInfo");
    let mut info_parts = group_info_parts(info).expect("GroupInfo parts");
    assert_eq!(
        info_parts.to_message(),
        info,
        "a GroupInfo cut into parts is the same GroupInfo"
    );
    info_parts.confirmation_tag = parts.confirmation_tag.clone().expect("a Commit's tag");
    let info = mls_write::group_info(&info_parts, &device_key(process));
    (parts.to_message(), info)
}

/// A Commit nobody can apply no longer kills a conversation (SPEC.md 7.10), in every
/// pairing: Alice sequences an update whose confirmation tag is broken, with the GroupInfo
/// it leads to. Bob cannot apply it and forks; at his next sync he resyncs from that
/// GroupInfo (a new epoch from his own secrets). Alice, whose own state never took her
/// broken Commit, cannot apply Bob's resync, forks there, and resyncs from Bob's GroupInfo.
/// Then both agree on the group, nobody is forked, and they talk both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_resync_after_a_commit_nobody_can_apply() {
    for (ka, kb) in PAIRINGS {
        let dir = tempfile::tempdir().expect("tempdir");
        let gateway = Gateway::start(dir.path(), |_| {}).await;
        let (mut alice, mut bob, c) = dm(dir.path(), &gateway.origin, ka, kb).await;
        alice.send_text(c, b"before").await.expect("send");
        let fork_seq = unappliable_commit(&mut alice, c).await;
        let seen = messages(&mut bob, 2).await;
        assert_eq!(seen[1].seq, fork_seq, "{ka}->{kb}: {seen:?}");
        assert!(
            bob.store().forked(&c).expect("store").is_some(),
            "{ka}->{kb}: Bob forked"
        );
        sync(&mut bob).await;
        assert!(
            bob.store().forked(&c).expect("store").is_none(),
            "{ka}->{kb}: Bob resynced"
        );
        let (count, last) = bob.store().resyncs(&c).expect("store");
        assert_eq!(count, 1, "{ka}->{kb}");
        let (from, at) = last.expect("the resync is recorded");
        assert_eq!(
            from, fork_seq,
            "{ka}->{kb}: it ended the fork at the broken Commit"
        );
        assert!(at > fork_seq);
        // Alice's state never took her broken Commit: Bob's resync is a fork to her.
        pump_until(&mut alice, "Alice forks at Bob's resync", |a| {
            a.store().forked(&c).expect("store").is_some()
        })
        .await;
        let observer = alice.observe();
        sync(&mut alice).await;
        assert!(
            alice.store().forked(&c).expect("store").is_none(),
            "{ka}->{kb}: Alice resynced: {:?}",
            observer.lock().expect("observer").resync_failures
        );
        assert_eq!(alice.store().resyncs(&c).expect("store").0, 1, "{ka}->{kb}");
        let epoch = alice.engine().epoch(&c).expect("epoch");
        pump_until(&mut bob, "Bob takes Alice's resync", |b| {
            b.engine().epoch(&c).expect("epoch") == epoch
        })
        .await;
        assert_eq!(
            alice.engine().epoch_authenticator(&c).expect("auth"),
            bob.engine().epoch_authenticator(&c).expect("auth"),
            "{ka}->{kb}: one group again"
        );
        bob.send_text(c, b"from bob, after")
            .await
            .expect("bob sends again");
        alice
            .send_text(c, b"from alice, after")
            .await
            .expect("alice sends again");
        read_text(&mut alice, b"from bob, after", (ka, kb)).await;
        read_text(&mut bob, b"from alice, after", (ka, kb)).await;
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
