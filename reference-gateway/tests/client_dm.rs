//! MVP-1's core flow with the reference client (`confab_client::app`) against the gateway
//! over real WebSockets, in every engine pairing: Bob keeps KeyPackages in the directory,
//! Alice creates a DM (claim, create, add, Commit + Welcome, apply on acceptance), both
//! exchange messages, both commit an update in the same epoch (one wins, the other retries
//! on top of it); each side stores the same messages at the same seqs, and both agree on
//! the epoch and its authenticator. Two crashes of Bob: his store rewound behind his MLS
//! state (he must not stall), and a crash between decrypting a message and recording it
//! (the engine's journal must give the message back).

mod app_support;

use std::time::Duration;

use app_support::{Gateway, device, receive, user};
use confab_client::app::Client;
use confab_client::mls::EngineKind;
use confab_spec::identity::SystemKeyPair;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dm_in_every_engine_pairing() {
    for (ka, kb) in [
        (EngineKind::OpenMls, EngineKind::OpenMls),
        (EngineKind::OpenMls, EngineKind::MlsRs),
        (EngineKind::MlsRs, EngineKind::OpenMls),
        (EngineKind::MlsRs, EngineKind::MlsRs),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let gateway = Gateway::start(dir.path(), |_| {}).await;
        let origin = gateway.origin.clone();

        let mut alice = device(dir.path(), &origin, 10, 10, ka);
        let mut bob = device(dir.path(), &origin, 20, 20, kb);
        let bob_system = user(20);
        alice.connect().await.expect("alice connects");
        bob.connect().await.expect("bob connects");
        let pool = bob.top_up_key_packages(5).await.expect("top up");
        assert_eq!(
            (pool.pool_count, pool.uploaded, pool.last_resort_rotated),
            (5, 5, true)
        );
        // A second call finds the pool full enough and the last-resort package unused.
        let again = bob.top_up_key_packages(5).await.expect("top up");
        assert_eq!((again.uploaded, again.last_resort_rotated), (0, false));

        // A user with no KeyPackages cannot be added, and says so.
        let stranger = SystemKeyPair::from_seed(&[99; 32]).public();
        assert!(matches!(
            alice.create_dm(stranger).await,
            Err(confab_client::app::ClientError::NoKeyPackages)
        ));
        let dm = alice.create_dm(bob_system.public()).await.expect("dm");
        let seq = alice.send_text(dm, b"hi bob").await.expect("send");
        assert_eq!(seq.get(), 2, "the Commit is seq 1, the message seq 2");
        let mut bob_seen = Vec::new();
        receive(&mut bob, &mut bob_seen, 1).await;
        assert_eq!(bob_seen, vec![b"hi bob".to_vec()], "{ka}/{kb}");
        bob.send_text(dm, b"hi alice").await.expect("reply");
        let mut alice_seen = Vec::new();
        receive(&mut alice, &mut alice_seen, 2).await;
        assert_eq!(
            alice_seen,
            vec![b"hi bob".to_vec(), b"hi alice".to_vec()],
            "{ka}/{kb}"
        );
        receive(&mut bob, &mut bob_seen, 2).await;
        assert_eq!(bob_seen, vec![b"hi bob".to_vec(), b"hi alice".to_vec()]);

        // A commit race: both update in the same epoch; one wins, the other retries on top,
        // and both end in the same epoch with the same authenticator.
        let (ua, ub) = tokio::join!(alice.update(dm), bob.update(dm));
        let (ua, ub) = (ua.expect("alice's update"), ub.expect("bob's update"));
        assert_ne!(ua, ub);
        assert_eq!(
            alice.lost_commit_races() + bob.lost_commit_races(),
            1,
            "{ka}/{kb}: both committed in epoch 1, one lost and retried"
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while alice.engine().epoch(&dm).expect("epoch") < 3 {
            tokio::time::timeout_at(deadline, alice.pump())
                .await
                .expect("timely")
                .expect("pump");
        }
        while bob.engine().epoch(&dm).expect("epoch") < 3 {
            tokio::time::timeout_at(deadline, bob.pump())
                .await
                .expect("timely")
                .expect("pump");
        }
        assert_eq!(alice.engine().epoch(&dm).expect("epoch"), 3, "{ka}/{kb}");
        assert_eq!(bob.engine().epoch(&dm).expect("epoch"), 3, "{ka}/{kb}");
        // Messages still flow after the race.
        alice.send_text(dm, b"after the race").await.expect("send");
        receive(&mut bob, &mut bob_seen, 3).await;
        assert_eq!(bob_seen[2], b"after the race".to_vec());

        // Both stores hold the same messages at the same seqs; both groups agree.
        let stored = |c: &Client| -> Vec<(u64, Vec<u8>)> {
            c.store()
                .messages(&dm, 0, 100)
                .expect("messages")
                .into_iter()
                .map(|m| (m.seq.get(), m.body))
                .collect()
        };
        receive(&mut alice, &mut alice_seen, 3).await;
        let mine = stored(&alice);
        assert_eq!(
            mine,
            vec![
                (2, b"hi bob".to_vec()),
                (3, b"hi alice".to_vec()),
                (6, b"after the race".to_vec())
            ],
            "the two updates are seqs 4 and 5"
        );
        assert_eq!(mine, stored(&bob));
        assert_eq!(
            alice.engine().epoch_authenticator(&dm).expect("auth"),
            bob.engine().epoch_authenticator(&dm).expect("auth")
        );
        // A crash between the engine and the local store: Bob's MLS state has applied
        // everything, but his store's cursor is back at seq 2. On reconnecting he replays
        // entries his group has already consumed; he must record them and go on, not
        // stall on them, and later messages must still decrypt. (Bob syncs first, which
        // ends his receive batch: everything he received is in his MLS state.)
        tokio::time::timeout(Duration::from_secs(20), bob.sync())
            .await
            .expect("timely")
            .expect("bob syncs");
        drop(bob);
        let bob_db = rusqlite::Connection::open(dir.path().join("confab-20.db")).expect("bob's db");
        bob_db
            .execute(
                "UPDATE cursors SET next_seq = 2, acked = 1 WHERE length(stream) = 33",
                [],
            )
            .expect("rewind");
        drop(bob_db);
        let mut bob = device(dir.path(), &origin, 20, 20, kb);
        tokio::time::timeout(Duration::from_secs(20), bob.connect())
            .await
            .expect("timely")
            .expect("bob reconnects");
        tokio::time::timeout(Duration::from_secs(20), bob.sync())
            .await
            .expect("timely")
            .expect("bob catches up without stalling");
        assert_eq!(bob.engine().epoch(&dm).expect("epoch"), 3);
        alice.send_text(dm, b"after the crash").await.expect("send");
        let mut again = Vec::new();
        receive(&mut bob, &mut again, 1).await;
        assert_eq!(again, vec![b"after the crash".to_vec()], "{ka}/{kb}");

        // A crash between decrypting and recording (Bob's engine once per engine): another
        // process holds his database's write lock, so after his engine decrypted the
        // message (consuming its key) his store cannot record it and he fails. Reopened,
        // he gets the message from the engine's journal, with its text.
        if ka != kb {
            let bob_db = rusqlite::Connection::open(dir.path().join("confab-20.db")).expect("db");
            bob_db.execute_batch("BEGIN IMMEDIATE").expect("lock");
            alice.send_text(dm, b"while locked").await.expect("send");
            let failed = tokio::time::timeout(Duration::from_secs(20), async {
                loop {
                    if let Err(e) = bob.pump().await {
                        return e;
                    }
                }
            })
            .await
            .expect("bob's store fails within the busy timeout");
            assert!(
                matches!(failed, confab_client::app::ClientError::Store(_)),
                "{failed:?}"
            );
            drop(bob);
            bob_db.execute_batch("ROLLBACK").expect("unlock");
            bob = device(dir.path(), &origin, 20, 20, kb);
            bob.connect().await.expect("bob reconnects");
            bob.sync().await.expect("bob catches up");
            let last = bob.store().messages(&dm, 0, 100).expect("messages");
            assert_eq!(
                last.last().map(|m| m.body.as_slice()),
                Some(&b"while locked"[..]),
                "{ka}/{kb}: the decrypted message survives the crash"
            );
        }

        drop((alice, bob));
        gateway.stop().await;
    }
}
