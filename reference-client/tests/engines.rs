//! The two MLS engines behind one trait, in every pairing (openmls↔openmls, mls-rs↔mls-rs,
//! openmls↔mls-rs both ways): joins, messages, commits, removal, the pending-commit life
//! cycle, typed errors and certificate checks.

mod support;

use confab_client::mls::{EngineError, EngineKind, Processed};
use support::*;

#[test]
fn two_devices_join_talk_update_and_agree_in_every_pairing() {
    for (ka, kb) in pairings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = Device::new(&dir, 1, ka);
        let mut b = Device::new(&dir, 2, kb);
        a.engine().create_group(&GROUP).expect("create");
        let kp = b.engine().key_packages(1, false).expect("key package");
        let out = a.engine().add_members(&GROUP, &kp).expect("add");
        assert!(a.engine().has_pending_commit(&GROUP).expect("pending"));
        a.engine().merge_pending_commit(&GROUP).expect("merge");
        let joined = b
            .engine()
            .join(out.welcome.as_deref().expect("welcome"))
            .expect("join");
        assert_eq!(joined, GROUP);
        assert_agree(&[&a, &b], &GROUP);

        let ct = a
            .engine()
            .encrypt(&GROUP, b"hello from a")
            .expect("encrypt");
        match b.engine().process(&GROUP, &ct).expect("decrypt") {
            Processed::Application { sender, plaintext } => {
                assert_eq!(sender, a.id());
                assert_eq!(plaintext, b"hello from a");
            }
            other => panic!("{ka}->{kb}: unexpected {other:?}"),
        }
        let ct = b
            .engine()
            .encrypt(&GROUP, b"hello from b")
            .expect("encrypt");
        assert!(matches!(
            a.engine().process(&GROUP, &ct),
            Ok(Processed::Application { .. })
        ));

        let update = b.engine().self_update(&GROUP).expect("update");
        b.engine()
            .merge_pending_commit(&GROUP)
            .expect("merge update");
        match a
            .engine()
            .process(&GROUP, &update.commit)
            .expect("process update")
        {
            Processed::Commit {
                sender,
                epoch,
                added,
                removed,
                self_removed,
                external,
            } => {
                assert_eq!(sender, Some(b.id()));
                assert_eq!(epoch, 2);
                assert!(added.is_empty() && removed.is_empty() && !self_removed && !external);
            }
            other => panic!("{ka}->{kb}: unexpected {other:?}"),
        }
        assert_agree(&[&a, &b], &GROUP);
    }
}

#[test]
fn rejected_commit_is_discarded_and_the_winner_applies() {
    // Both members commit in the same epoch; the gateway accepts A's. B discards its own
    // and processes A's (SPEC.md 7.4).
    for (ka, kb) in pairings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut a, mut b) = two_member_group(&dir, ka, kb);

        let winner = a.engine().self_update(&GROUP).expect("a commits");
        let _loser = b.engine().self_update(&GROUP).expect("b commits");
        assert_eq!(
            b.engine().encrypt(&GROUP, b"x"),
            Err(EngineError::PendingCommit)
        );
        a.engine()
            .merge_pending_commit(&GROUP)
            .expect("a merges on echo");
        b.engine()
            .discard_pending_commit(&GROUP)
            .expect("b discards");
        assert_eq!(
            b.engine().discard_pending_commit(&GROUP),
            Err(EngineError::NoPendingCommit)
        );
        assert!(matches!(
            b.engine().process(&GROUP, &winner.commit),
            Ok(Processed::Commit { .. })
        ));
        assert_agree(&[&a, &b], &GROUP);
    }
}

#[test]
fn three_members_add_remove_and_removed_member_cannot_read() {
    for (ka, kb) in pairings() {
        let kc = if ka == kb {
            EngineKind::ALL
                .into_iter()
                .find(|k| *k != ka)
                .expect("other")
        } else {
            ka
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = Device::new(&dir, 1, ka);
        let mut b = Device::new(&dir, 2, kb);
        let mut c = Device::new(&dir, 3, kc);
        a.engine().create_group(&GROUP).expect("create");
        let kps = [
            b.engine().key_packages(1, false).expect("kp"),
            c.engine().key_packages(1, false).expect("kp"),
        ]
        .concat();
        let out = a.engine().add_members(&GROUP, &kps).expect("add two");
        a.engine().merge_pending_commit(&GROUP).expect("merge");
        let welcome = out.welcome.expect("welcome");
        b.engine().join(&welcome).expect("b joins");
        c.engine().join(&welcome).expect("c joins");
        assert_agree(&[&a, &b, &c], &GROUP);

        let out = b
            .engine()
            .remove_members(&GROUP, &[c.id()])
            .expect("remove c");
        b.engine().merge_pending_commit(&GROUP).expect("merge");
        match a
            .engine()
            .process(&GROUP, &out.commit)
            .expect("a processes")
        {
            Processed::Commit { removed, .. } => assert_eq!(removed, vec![c.id()]),
            other => panic!("unexpected {other:?}"),
        }
        match c
            .engine()
            .process(&GROUP, &out.commit)
            .expect("c processes its removal")
        {
            Processed::Commit { self_removed, .. } => {
                assert!(self_removed, "{kc} must learn it was removed")
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_agree(&[&a, &b], &GROUP);
        let after = a
            .engine()
            .encrypt(&GROUP, b"after removal")
            .expect("encrypt");
        assert!(
            c.engine().process(&GROUP, &after).is_err(),
            "{kc}: removed member decrypted"
        );
        assert!(matches!(
            b.engine().process(&GROUP, &after),
            Ok(Processed::Application { .. })
        ));
    }
}

#[test]
fn typed_errors_wrong_epoch_and_secret_reuse() {
    for (ka, kb) in pairings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut a, mut b) = two_member_group(&dir, ka, kb);

        // Replaying an application message needs a consumed secret.
        let ct = a.engine().encrypt(&GROUP, b"once").expect("encrypt");
        b.engine().process(&GROUP, &ct).expect("first");
        let replay = b.engine().process(&GROUP, &ct);
        assert!(
            matches!(replay, Err(EngineError::SecretReused(_))),
            "{ka}->{kb}: replay gave {replay:?}"
        );

        // A commit for an epoch the receiver has left is a wrong-epoch error.
        let stale = a.engine().self_update(&GROUP).expect("commit");
        a.engine().merge_pending_commit(&GROUP).expect("merge");
        b.engine().process(&GROUP, &stale.commit).expect("apply");
        let again = b.engine().process(&GROUP, &stale.commit);
        assert!(
            matches!(again, Err(EngineError::WrongEpoch(_))),
            "{ka}->{kb}: stale commit gave {again:?}"
        );
        assert_eq!(
            a.engine().epoch(&ConversationIdExt::other()),
            Err(EngineError::GroupNotFound)
        );
    }
}

/// The decryption journal: processing the same entry again (a replay after a crash
/// between the engine and the client's store) returns the first outcome, also from a
/// reopened engine; once released, the consumed key makes it fail as a replay.
#[test]
fn journaled_entries_survive_reprocessing_until_released() {
    for (ka, kb) in pairings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut a, mut b) = two_member_group(&dir, ka, kb);
        let ct = a
            .engine()
            .encrypt(&GROUP, b"exactly once")
            .expect("encrypt");
        let first = b.engine().process_entry(&GROUP, 7, &ct).expect("first");
        let expected = Processed::Application {
            sender: a.id(),
            plaintext: b"exactly once".to_vec(),
        };
        assert_eq!(first, expected, "{ka}->{kb}");
        b.reload();
        assert_eq!(
            b.engine().process_entry(&GROUP, 7, &ct).expect("again"),
            expected,
            "{ka}->{kb}: from the journal"
        );
        // Another seq is another entry: its key is gone.
        assert!(b.engine().process_entry(&GROUP, 8, &ct).is_err());
        b.engine().release_processed(&GROUP, 7).expect("release");
        let replay = b.engine().process_entry(&GROUP, 7, &ct);
        assert!(
            matches!(replay, Err(EngineError::SecretReused(_))),
            "{ka}->{kb}: after release {replay:?}"
        );
    }
}

#[test]
fn members_with_invalid_certificates_are_rejected() {
    use confab_spec::identity::{DeviceKeyPair, SystemKeyPair};
    use confab_spec::ids::{ProcessId, UnixMs};
    use confab_spec::session::DeviceCredentials;
    for (ka, kb) in pairings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = Device::new(&dir, 1, ka);
        a.engine().create_group(&GROUP).expect("create");
        // An expired certificate.
        let system = SystemKeyPair::from_seed(&[9; 32]);
        let key = DeviceKeyPair::from_seed(&[10; 32]);
        let expired = system.issue_certificate(
            ProcessId([9; 16]),
            key.public(),
            UnixMs(now().0 - 10_000_000),
            UnixMs(now().0 - 1_000),
        );
        let mut bad = Device::with_credentials(
            &dir,
            9,
            kb,
            DeviceCredentials {
                key,
                certificate: expired,
            },
        );
        match bad.engine().key_packages(1, false) {
            // An engine may refuse to sign a KeyPackage with its own invalid credential.
            Err(e) => assert!(
                matches!(e, EngineError::InvalidCertificate(_)),
                "{kb}: {e:?}"
            ),
            Ok(kp) => {
                let added = a.engine().add_members(&GROUP, &kp);
                assert!(
                    matches!(added, Err(EngineError::InvalidCertificate(_))),
                    "{ka} added an expired device: {added:?}"
                );
                assert!(
                    !a.engine().has_pending_commit(&GROUP).expect("pending"),
                    "{ka}: a failed add left a pending commit"
                );
            }
        }
        // A certificate for another device key.
        let system = SystemKeyPair::from_seed(&[11; 32]);
        let key = DeviceKeyPair::from_seed(&[12; 32]);
        let other_key = DeviceKeyPair::from_seed(&[13; 32]);
        let wrong = system.issue_certificate(
            ProcessId([11; 16]),
            other_key.public(),
            UnixMs(now().0 - 1_000),
            UnixMs(now().0 + 1_000_000),
        );
        let mut bad = Device::with_credentials(
            &dir,
            11,
            kb,
            DeviceCredentials {
                key,
                certificate: wrong,
            },
        );
        match bad.engine().key_packages(1, false) {
            // mls-rs refuses to sign with a key pair that does not match.
            Err(e) => assert!(
                matches!(
                    e,
                    EngineError::InvalidCertificate(_) | EngineError::Other(_)
                ),
                "{kb}: {e:?}"
            ),
            Ok(kp) => {
                let added = a.engine().add_members(&GROUP, &kp);
                // The leaf names the certificate's key but is signed by another: the
                // leaf signature fails before the certificate check can.
                assert!(
                    matches!(
                        added,
                        Err(EngineError::InvalidCertificate(_) | EngineError::Malformed(_))
                    ),
                    "{ka} added a device whose key is not its certificate's: {added:?}"
                );
            }
        }
    }
}

struct ConversationIdExt;
impl ConversationIdExt {
    fn other() -> confab_spec::ids::ConversationId {
        confab_spec::ids::ConversationId([0x99; 32])
    }
}

#[test]
fn a_last_resort_key_package_admits_its_owner_to_two_groups() {
    use confab_spec::ids::ConversationId;
    for (ka, kb) in pairings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = Device::new(&dir, 1, ka);
        let mut b = Device::new(&dir, 2, kb);
        let kp = b.engine().key_packages(1, true).expect("last resort");
        for g in [ConversationId([1; 32]), ConversationId([2; 32])] {
            a.engine().create_group(&g).expect("create");
            let out = a
                .engine()
                .add_members(&g, &kp)
                .unwrap_or_else(|e| panic!("{ka}->{kb}: add: {e}"));
            a.engine().merge_pending_commit(&g).expect("merge");
            let joined = b.engine().join(out.welcome.as_deref().expect("welcome"));
            assert_eq!(
                joined,
                Ok(g),
                "{ka}->{kb}: joining with a reused last-resort package"
            );
            assert_agree(&[&a, &b], &g);
        }
    }
}

/// Receive batches: application messages processed in a batch are written when it ends
/// (explicitly, or by any other operation, which ends it first); a crash inside a batch
/// leaves the state from before it, from which the batch's messages decrypt again.
#[test]
fn receive_batches_are_written_at_their_end_and_lose_nothing_in_a_crash() {
    for (ka, kb) in pairings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut a, mut b) = two_member_group(&dir, ka, kb);
        let mut sent = Vec::new();
        for i in 0..9u8 {
            let text = vec![i; 40];
            let ct = a.engine().encrypt(&GROUP, &text).expect("encrypt");
            sent.push((text, ct));
        }
        let sender = a.id();
        let expect = |text: &[u8]| Processed::Application {
            sender,
            plaintext: text.to_vec(),
        };
        // A crash inside a batch: its messages (released, as a client does once it stored
        // them) decrypt again after the restart.
        b.engine().begin_receive_batch().expect("begin");
        for (seq, (text, ct)) in (1..).zip(&sent[..3]) {
            let got = b.engine().process_entry(&GROUP, seq, ct).expect("in batch");
            assert_eq!(got, expect(text), "{ka}->{kb}");
            b.engine().release_processed(&GROUP, seq).expect("release");
        }
        b.reload();
        for (seq, (text, ct)) in (1..).zip(&sent[..3]) {
            let got = b.engine().process_entry(&GROUP, seq, ct);
            assert_eq!(
                got,
                Ok(expect(text)),
                "{ka}->{kb}: after a crash in a batch"
            );
            b.engine().release_processed(&GROUP, seq).expect("release");
        }
        b.reload();
        // An ended batch is durable: its keys are gone after a restart.
        b.engine().begin_receive_batch().expect("begin");
        for (seq, (_, ct)) in (4..).zip(&sent[3..6]) {
            b.engine().process_entry(&GROUP, seq, ct).expect("in batch");
            b.engine().release_processed(&GROUP, seq).expect("release");
        }
        // Making KeyPackages inside a batch works (and ends it): mls-rs writes them through
        // a connection of its own.
        let kp = b
            .engine()
            .key_packages(1, false)
            .expect("key package in a batch");
        assert_eq!(kp.len(), 1);
        b.engine().end_receive_batch().expect("end");
        b.reload();
        let replay = b.engine().process_entry(&GROUP, 4, &sent[3].1);
        assert!(
            matches!(replay, Err(EngineError::SecretReused(_))),
            "{ka}->{kb}: an ended batch was written: {replay:?}"
        );
        // Sending ends the batch before it encrypts.
        b.engine().begin_receive_batch().expect("begin");
        b.engine()
            .process_entry(&GROUP, 7, &sent[6].1)
            .expect("in batch");
        b.engine().release_processed(&GROUP, 7).expect("release");
        let reply = b.engine().encrypt(&GROUP, b"reply").expect("encrypt");
        b.reload();
        let replay = b.engine().process_entry(&GROUP, 7, &sent[6].1);
        assert!(
            matches!(replay, Err(EngineError::SecretReused(_))),
            "{ka}->{kb}: encrypt wrote the batch first: {replay:?}"
        );
        assert!(matches!(
            a.engine().process(&GROUP, &reply),
            Ok(Processed::Application { .. })
        ));
        // A Commit inside a batch: the batch is written, then the Commit.
        b.engine().begin_receive_batch().expect("begin");
        b.engine()
            .process_entry(&GROUP, 8, &sent[7].1)
            .expect("in batch");
        b.engine().release_processed(&GROUP, 8).expect("release");
        let update = a.engine().self_update(&GROUP).expect("update");
        a.engine().merge_pending_commit(&GROUP).expect("merge");
        b.engine()
            .process(&GROUP, &update.commit)
            .expect("commit in a batch");
        b.reload();
        assert_agree(&[&a, &b], &GROUP);
        let replay = b.engine().process_entry(&GROUP, 8, &sent[7].1);
        assert!(replay.is_err(), "{ka}->{kb}: {replay:?}");
        // The last message, from the epoch before the Commit, still decrypts.
        let got = b.engine().process_entry(&GROUP, 9, &sent[8].1);
        assert_eq!(got, Ok(expect(&sent[8].0)), "{ka}->{kb}: past epoch");
    }
}

/// The journal in a receive batch: an outcome the client has not released when the batch
/// ends (at its end, or early, by an operation that ends it) is journaled with the state
/// that consumed its key, so the entry gives it again after a restart; a released one
/// is gone with its key.
#[test]
fn unreleased_outcomes_are_journaled_when_a_batch_ends() {
    for (ka, kb) in pairings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut a, mut b) = two_member_group(&dir, ka, kb);
        let sent: Vec<(Vec<u8>, Vec<u8>)> = (0..4u8)
            .map(|i| {
                let text = vec![i; 24];
                let ct = a.engine().encrypt(&GROUP, &text).expect("encrypt");
                (text, ct)
            })
            .collect();
        let expect = |text: &[u8]| Processed::Application {
            sender: a.id(),
            plaintext: text.to_vec(),
        };
        b.engine().begin_receive_batch().expect("begin");
        for (seq, (_, ct)) in (1..).zip(&sent[..2]) {
            b.engine().process_entry(&GROUP, seq, ct).expect("in batch");
        }
        b.engine().release_processed(&GROUP, 1).expect("release");
        b.engine().end_receive_batch().expect("end");
        b.reload();
        assert_eq!(
            b.engine().process_entry(&GROUP, 2, &sent[1].1),
            Ok(expect(&sent[1].0)),
            "{ka}->{kb}: unreleased at the batch's end"
        );
        let released = b.engine().process_entry(&GROUP, 1, &sent[0].1);
        assert!(
            matches!(released, Err(EngineError::SecretReused(_))),
            "{ka}->{kb}: released: {released:?}"
        );
        // Ended early: sending ends the batch before it encrypts.
        b.engine().begin_receive_batch().expect("begin");
        b.engine()
            .process_entry(&GROUP, 3, &sent[2].1)
            .expect("in batch");
        b.engine().encrypt(&GROUP, b"reply").expect("encrypt");
        b.reload();
        assert_eq!(
            b.engine().process_entry(&GROUP, 3, &sent[2].1),
            Ok(expect(&sent[2].0)),
            "{ka}->{kb}: unreleased when a send ended the batch"
        );
        b.engine().release_processed(&GROUP, 3).expect("release");
        let gone = b.engine().process_entry(&GROUP, 3, &sent[2].1);
        assert!(
            matches!(gone, Err(EngineError::SecretReused(_))),
            "{ka}->{kb}: released after the restart: {gone:?}"
        );
        // A send that fails in a batch (a Commit of its own is pending) loses nothing.
        b.engine().self_update(&GROUP).expect("pending commit");
        b.engine().begin_receive_batch().expect("begin");
        b.engine()
            .process_entry(&GROUP, 4, &sent[3].1)
            .expect("in batch");
        let refused = b.engine().encrypt(&GROUP, b"not now");
        assert!(
            matches!(refused, Err(EngineError::PendingCommit)),
            "{ka}->{kb}: {refused:?}"
        );
        b.engine().end_receive_batch().expect("end");
        b.reload();
        assert_eq!(
            b.engine().process_entry(&GROUP, 4, &sent[3].1),
            Ok(expect(&sent[3].0)),
            "{ka}->{kb}: after a refused send in a batch"
        );
    }
}

/// A state-write window: batches that end leave the state they advanced in memory, so a
/// crash goes back to the state last written, from which every message read since decrypts
/// again (nothing is lost). The state is written once the window passes, once one sender's
/// unwritten messages reach the bound, and before any other operation.
#[test]
fn a_state_write_window_defers_writes_and_loses_nothing_in_a_crash() {
    use confab_client::mls::unwritten::{MAX_UNWRITTEN_PER_SENDER, StateWriteWindow};
    const HOUR: StateWriteWindow = StateWriteWindow { ms: 3_600_000 };
    for (ka, kb) in pairings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut a, mut b) = two_member_group(&dir, ka, kb);
        let count = MAX_UNWRITTEN_PER_SENDER as usize + 16;
        let sent: Vec<(Vec<u8>, Vec<u8>)> = (0..count)
            .map(|i| {
                let text = (i as u32).to_le_bytes().to_vec();
                let ct = a.engine().encrypt(&GROUP, &text).expect("encrypt");
                (text, ct)
            })
            .collect();
        let sender = a.id();
        let expect = |i: usize| Processed::Application {
            sender,
            plaintext: sent[i].0.clone(),
        };
        // Entry `seq` holds `sent[seq - 1]`; a batch reads and releases `range`.
        let batch = |b: &mut Device, range: std::ops::Range<usize>| {
            b.engine().begin_receive_batch().expect("begin");
            for i in range {
                let got = b.engine().process_entry(&GROUP, i as u64 + 1, &sent[i].1);
                assert_eq!(got, Ok(expect(i)), "{ka}->{kb}: entry {}", i + 1);
                b.engine()
                    .release_processed(&GROUP, i as u64 + 1)
                    .expect("release");
            }
            b.engine().end_receive_batch().expect("end");
        };
        let written = |b: &mut Device, i: usize| {
            matches!(
                b.engine().process_entry(&GROUP, i as u64 + 1, &sent[i].1),
                Err(EngineError::SecretReused(_))
            )
        };

        // Two batches end unwritten: after a crash both decrypt again, and a message after
        // them too (the older state ratchets forward).
        b.engine().set_state_write_window(HOUR);
        batch(&mut b, 0..3);
        batch(&mut b, 3..5);
        let due = b.get().unwritten_due_in();
        assert!(
            due.is_some_and(|ms| ms > 0),
            "{ka}->{kb}: unwritten, not due: {due:?}"
        );
        b.reload();
        assert_eq!(b.get().unwritten_due_in(), None, "{ka}->{kb}");
        batch(&mut b, 0..6);
        b.reload();
        assert!(
            written(&mut b, 5),
            "{ka}->{kb}: no window, written at the end"
        );

        // Any other operation writes the state first.
        b.engine().set_state_write_window(HOUR);
        batch(&mut b, 6..9);
        let reply = b.engine().encrypt(&GROUP, b"reply").expect("encrypt");
        assert_eq!(b.get().unwritten_due_in(), None, "{ka}->{kb}");
        b.reload();
        assert!(written(&mut b, 8), "{ka}->{kb}: a send wrote the state");
        assert!(matches!(
            a.engine().process(&GROUP, &reply),
            Ok(Processed::Application { .. })
        ));

        // One sender's unwritten messages reach the bound: written at that batch's end.
        let (first, bound) = (9, MAX_UNWRITTEN_PER_SENDER as usize);
        b.engine().set_state_write_window(HOUR);
        batch(&mut b, first..first + bound - 1);
        assert!(
            b.get().unwritten_due_in().is_some_and(|ms| ms > 0),
            "{ka}->{kb}"
        );
        b.reload();
        assert!(
            !written(&mut b, first),
            "{ka}->{kb}: below the bound, unwritten"
        );
        // That read outside a batch wrote the state and journaled the outcome.
        b.engine()
            .release_processed(&GROUP, first as u64 + 1)
            .expect("release");
        b.engine().set_state_write_window(HOUR);
        batch(&mut b, first + 1..first + 1 + bound);
        assert_eq!(b.get().unwritten_due_in(), None, "{ka}->{kb}");
        b.reload();
        assert!(
            written(&mut b, first + bound),
            "{ka}->{kb}: written at the bound"
        );

        // The window passes: written at the next batch's end.
        let last = first + 1 + bound;
        b.engine()
            .set_state_write_window(StateWriteWindow { ms: 1 });
        b.engine().begin_receive_batch().expect("begin");
        let got = b
            .engine()
            .process_entry(&GROUP, last as u64 + 1, &sent[last].1);
        assert_eq!(got, Ok(expect(last)), "{ka}->{kb}");
        b.engine()
            .release_processed(&GROUP, last as u64 + 1)
            .expect("release");
        std::thread::sleep(std::time::Duration::from_millis(5));
        b.engine().end_receive_batch().expect("end");
        b.reload();
        assert!(
            written(&mut b, last),
            "{ka}->{kb}: written once the window passed"
        );
        // And the messages after it still decrypt.
        batch(&mut b, last + 1..count);
    }
}

#[test]
fn a_shared_signature_memo_answers_a_repeated_check_and_changes_no_outcome() {
    use confab_client::mls::signature_memo::SignatureMemo;
    for (ka, kb) in pairings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let memo = SignatureMemo::new(1_024);
        let mut devices: Vec<Device> = [(1, ka), (2, kb), (3, kb)]
            .into_iter()
            .map(|(seed, kind)| {
                let mut d = Device::new(&dir, seed, kind);
                d.reload_with(Some(memo.clone()));
                d
            })
            .collect();
        let [a, b, c] = &mut devices[..] else {
            unreachable!()
        };
        a.engine().create_group(&GROUP).expect("create");
        let mut kps = b.engine().key_packages(1, false).expect("key package");
        kps.extend(c.engine().key_packages(1, false).expect("key package"));
        let out = a.engine().add_members(&GROUP, &kps).expect("add");
        a.engine().merge_pending_commit(&GROUP).expect("merge");
        for d in [&mut *b, &mut *c] {
            d.engine()
                .join(out.welcome.as_deref().expect("welcome"))
                .expect("join");
        }
        assert_agree(&[a, b, c], &GROUP);

        let ct = a
            .engine()
            .encrypt(&GROUP, b"checked once")
            .expect("encrypt");
        let before = memo.stats();
        let at_b = b.engine().process(&GROUP, &ct).expect("b decrypts");
        let after_b = memo.stats();
        let at_c = c.engine().process(&GROUP, &ct).expect("c decrypts");
        let after_c = memo.stats();
        assert_eq!(at_b, at_c, "{ka}->{kb}: the same outcome");
        assert!(
            matches!(&at_c, Processed::Application { plaintext, .. } if plaintext == b"checked once"),
            "{ka}->{kb}: {at_c:?}"
        );
        assert_eq!(after_b.misses, before.misses + 1, "{ka}->{kb}: b checks it");
        assert_eq!(after_c.misses, after_b.misses, "{ka}->{kb}: c does not");
        assert_eq!(
            after_c.hits,
            after_b.hits + 1,
            "{ka}->{kb}: the memo answers c"
        );

        // The memo answers signature checks only: the same message again is still refused
        // (its key is used up).
        assert!(
            c.engine().process(&GROUP, &ct).is_err(),
            "{ka}->{kb}: replay"
        );
    }
}

/// REQ-7.2-4: a member keeps the secrets of `app_epoch_lag_max` past epochs, so a message
/// the gateway still accepts (at most that many epochs old, REQ-7.2-3) is readable.
#[test]
fn messages_up_to_app_epoch_lag_max_epochs_old_are_readable() {
    use confab_spec::limits::APP_EPOCH_LAG_MAX;
    for (ka, kb) in pairings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut a, mut b) = two_member_group(&dir, ka, kb);
        let start = b.get().epoch(&GROUP).expect("epoch");
        // Both composed by `a` at the starting epoch, which `a` keeps (it never processes
        // `b`'s Commits here).
        let oldest = a.engine().encrypt(&GROUP, b"lag max").expect("encrypt");
        let too_old = a.engine().encrypt(&GROUP, b"lag max + 1").expect("encrypt");
        for _ in 0..APP_EPOCH_LAG_MAX {
            b.engine().self_update(&GROUP).expect("update");
            b.engine().merge_pending_commit(&GROUP).expect("merge");
        }
        assert_eq!(
            b.get().epoch(&GROUP).expect("epoch"),
            start + APP_EPOCH_LAG_MAX
        );
        match b.engine().process(&GROUP, &oldest) {
            Ok(Processed::Application { plaintext, .. }) => assert_eq!(plaintext, b"lag max"),
            other => panic!("{ka}->{kb}: {APP_EPOCH_LAG_MAX} epochs old: {other:?}"),
        }
        b.engine().self_update(&GROUP).expect("update");
        b.engine().merge_pending_commit(&GROUP).expect("merge");
        assert!(
            b.engine().process(&GROUP, &too_old).is_err(),
            "{ka}->{kb}: more than {APP_EPOCH_LAG_MAX} epochs old is gone (secrets deleted)"
        );
    }
}

/// A member that missed a Commit (stale, as after a fork) gets back in by a resync from
/// the GroupInfo of the current epoch (SPEC.md 7.10), in every pairing: every Commit
/// publishes its epoch's GroupInfo, the resync replaces the member's own leaf, the others
/// see the same device (neither added nor removed), and all agree and talk again.
#[test]
fn a_stale_member_resyncs_and_the_group_agrees_in_every_pairing() {
    for (ka, kb) in pairings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut a, mut b) = two_member_group(&dir, ka, kb);
        let update = a.engine().self_update(&GROUP).expect("update");
        a.engine().merge_pending_commit(&GROUP).expect("merge");
        let published = update
            .group_info
            .as_deref()
            .expect("a Commit publishes its GroupInfo");
        // B never sees A's update: its state is one epoch behind, as a forked one is.
        assert_eq!(b.engine().epoch(&GROUP).expect("epoch"), 1);
        assert_eq!(
            &published[..4],
            &[0, 1, 0, 4],
            "{ka}: an MLSMessage carrying a GroupInfo"
        );
        // The gateway serves the tree beside a GroupInfo without one; here the GroupInfo
        // export with the tree stands in for both.
        let info = a.engine().group_info(&GROUP).expect("group info with tree");
        let resync = b.engine().resync(&GROUP, &info, None).expect("resync");
        assert!(resync.welcome.is_none());
        assert!(
            resync.group_info.is_some(),
            "{ka}->{kb}: a resync publishes too"
        );
        match a
            .engine()
            .process(&GROUP, &resync.commit)
            .expect("process resync")
        {
            Processed::Commit {
                sender,
                added,
                removed,
                self_removed,
                external,
                ..
            } => {
                assert_eq!(sender, Some(b.id()), "{ka}->{kb}");
                assert!(external, "{ka}->{kb}");
                assert!(
                    added.is_empty() && removed.is_empty() && !self_removed,
                    "{ka}->{kb}: a resync moves a device, it neither adds nor removes one: \
                     {added:?} {removed:?}"
                );
            }
            other => panic!("{ka}->{kb}: unexpected {other:?}"),
        }
        assert_agree(&[&a, &b], &GROUP);
        assert_eq!(a.engine().members(&GROUP).expect("members").len(), 2);
        let ct = b.engine().encrypt(&GROUP, b"back").expect("encrypt");
        match a.engine().process(&GROUP, &ct).expect("decrypt") {
            Processed::Application { sender, plaintext } => {
                assert_eq!((sender, plaintext.as_slice()), (b.id(), b"back".as_slice()));
            }
            other => panic!("{ka}->{kb}: unexpected {other:?}"),
        }
        let ct = a
            .engine()
            .encrypt(&GROUP, b"welcome back")
            .expect("encrypt");
        assert!(matches!(
            b.engine().process(&GROUP, &ct),
            Ok(Processed::Application { .. })
        ));
    }
}
