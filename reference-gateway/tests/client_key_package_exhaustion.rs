//! KeyPackage exhaustion with the reference client against the gateway (SPEC.md section 8):
//! a drainer opens DM after DM with Bob until his pool is empty, keeps going on his
//! last-resort package, and is then rate limited with a time to retry. Alice, a legitimate
//! contact, still starts a DM with Bob and they talk. Bob joins every DM (the last-resort
//! package serves several), learns that his last-resort package was used, and rotates it
//! and refills his pool. Bob runs each engine in turn; the others run the other one.

mod app_support;

use app_support::{Gateway, device, pump_until, receive, user};
use confab_client::app::{Client, ClientError};
use confab_client::mls::EngineKind;
use confab_gateway::rate::RateLimit;

/// Conversations `c` is in.
fn conversations(c: &Client) -> usize {
    c.store().conversations().expect("conversations").len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_pool_degrades_to_last_resort_then_rate_limits_the_drainer() {
    for kb in EngineKind::ALL {
        let other = if kb == EngineKind::OpenMls {
            EngineKind::MlsRs
        } else {
            EngineKind::OpenMls
        };
        let dir = tempfile::tempdir().expect("tempdir");
        // Each DM a client creates makes two claims (the peer's devices and its own user's
        // other devices): ten claims are five DMs.
        let gateway = Gateway::start(dir.path(), |c| {
            c.claims_per_claimer = RateLimit {
                per_minute: 1,
                burst: 10,
            };
            c.claims_per_target = RateLimit {
                per_minute: 1,
                burst: 8,
            };
        })
        .await;
        let o = gateway.origin.clone();
        let mut bob = device(dir.path(), &o, 2, 2, kb);
        let mut mallory = device(dir.path(), &o, 6, 6, other);
        let mut alice = device(dir.path(), &o, 1, 1, other);
        for c in [&mut bob, &mut mallory, &mut alice] {
            c.connect().await.expect("connect");
        }
        let pool = bob.top_up_key_packages(3).await.expect("top up");
        assert_eq!((pool.pool_count, pool.last_resort_rotated), (3, true));

        // Three DMs empty the pool; two more get the last-resort package.
        for _ in 0..5 {
            mallory
                .create_dm(user(2).public())
                .await
                .expect("a DM while the directory serves");
        }
        // The sixth is limited, and says when to try again.
        match mallory.create_dm(user(2).public()).await {
            Err(ClientError::RateLimited { retry_after_ms }) => {
                assert!(
                    retry_after_ms > 0 && retry_after_ms <= 60_000,
                    "{retry_after_ms}"
                );
            }
            other => panic!("{kb}: expected rate_limited, got {other:?}"),
        }
        // A different claimer still starts a DM with Bob (on the last-resort package).
        let dm = alice.create_dm(user(2).public()).await.expect("alice's DM");
        alice.send_text(dm, b"still reachable").await.expect("send");
        let mut seen = Vec::new();
        receive(&mut bob, &mut seen, 1).await;
        assert_eq!(seen, vec![b"still reachable".to_vec()], "{kb}");
        // Bob is in all six DMs: three joined from pool packages, three from the same
        // last-resort package.
        pump_until(&mut bob, "bob to join every DM", |c| conversations(c) == 6).await;
        // His next top-up sees the used last-resort package, replaces it and refills.
        let pool = bob.top_up_key_packages(3).await.expect("top up");
        assert_eq!(
            (pool.pool_count, pool.uploaded, pool.last_resort_rotated),
            (3, 3, true),
            "{kb}"
        );
        let again = bob.top_up_key_packages(3).await.expect("top up");
        assert!(!again.last_resort_rotated, "the new one is unused");

        drop((bob, mallory, alice));
        gateway.stop().await;
    }
}
