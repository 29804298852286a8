//! Presence with the reference client against the gateway over real WebSockets (SPEC.md
//! section 9), with short leases so that it runs in seconds: the client renews its lease
//! on its own, keeps it and its watchlist across reconnects, a device that vanishes is
//! published offline within ttl + grace + jitter, and a block reaches the watcher at
//! once. Presence does not touch MLS; the two devices still run different engines.

mod app_support;

use std::time::Duration;

use app_support::{Gateway, device, user};
use confab_client::app::Client;
use confab_client::mls::EngineKind::{MlsRs, OpenMls};
use confab_spec::frame::{PresenceMode, PresenceState};
use confab_spec::ids::SystemKey;
use tokio::time::Instant;

const LEASE_MS: u64 = 1_000;
const GRACE_MS: u64 = 300;
const JITTER_MS: u64 = 300;
/// The server's publishing tick (500 ms, twice: lapse and publication) plus scheduling
/// slack on a loaded 2-core CI machine. That a block is queued before the answer (no
/// jitter, no tick) is checked without time in `tests/presence.rs`.
const SLACK_MS: u64 = 5_000;

/// Pumps both clients for `ms`.
async fn pump_both_for(a: &mut Client, b: &mut Client, ms: u64) {
    let end = Instant::now() + Duration::from_millis(ms);
    loop {
        let step = tokio::time::timeout_at(end, async {
            tokio::select! {
                r = a.pump() => r,
                r = b.pump() => r,
            }
        })
        .await;
        match step {
            Err(_) => return,
            Ok(result) => result.expect("pump"),
        }
    }
}

/// Pumps `watcher` (and `other`, when given) until it knows `state` for `target`; the
/// time it took.
async fn until_state(
    watcher: &mut Client,
    mut other: Option<&mut Client>,
    target: SystemKey,
    state: PresenceState,
) -> Duration {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(20);
    while watcher.presence_states().get(&target) != Some(&state) {
        let step = tokio::time::timeout_at(deadline, async {
            match other.as_deref_mut() {
                Some(o) => tokio::select! {
                    r = watcher.pump() => r,
                    r = o.pump() => r,
                },
                None => watcher.pump().await,
            }
        })
        .await;
        step.unwrap_or_else(|_| panic!("timed out waiting for {state:?}"))
            .expect("pump");
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_renew_by_themselves_survive_reconnects_lapse_and_blocks_apply_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = Gateway::start(dir.path(), |c| {
        c.presence.ttl_min_ms = 200;
        c.presence.ttl_max_ms = LEASE_MS;
        c.presence.grace_ms = GRACE_MS;
        c.presence.jitter_ms = JITTER_MS;
    })
    .await;
    let (alice_key, bob_key) = (user(1).public(), user(2).public());
    let mut alice = device(dir.path(), &gw.origin, 1, 1, OpenMls);
    let mut bob = device(dir.path(), &gw.origin, 2, 2, MlsRs);
    alice.connect().await.expect("alice connects");
    bob.connect().await.expect("bob connects");

    let lists = alice
        .update_presence_lists(vec![bob_key], vec![], vec![], vec![])
        .await
        .expect("share");
    assert_eq!(lists.shared, [bob_key]);
    let first = bob.watch_presence(vec![alice_key]).await.expect("watch");
    assert_eq!(first[0].state, PresenceState::Longer);
    // Asked for a minute, granted the gateway's maximum.
    let lease = alice
        .set_presence(PresenceMode::Online)
        .await
        .expect("online");
    assert_eq!(lease.ttl_ms, LEASE_MS);
    until_state(&mut bob, Some(&mut alice), alice_key, PresenceState::Online).await;
    assert_eq!(
        bob.take_presence_changes(),
        [
            (alice_key, PresenceState::Longer),
            (alice_key, PresenceState::Online)
        ]
    );

    // Four leases long, Alice's client renews by itself: Bob sees no change.
    pump_both_for(&mut alice, &mut bob, 4 * LEASE_MS).await;
    assert!(bob.take_presence_changes().is_empty(), "a renewal showed");

    // Both connections drop: Alice's client takes its lease again and Bob's watches again
    // after the reconnect; nobody sees a change, and Bob still hears of changes after.
    alice.drop_connection();
    bob.drop_connection();
    pump_both_for(&mut alice, &mut bob, 3 * LEASE_MS).await;
    assert!(alice.is_ready() && bob.is_ready(), "both reconnected");
    assert!(bob.take_presence_changes().is_empty(), "a reconnect showed");

    // Alice's device vanishes without releasing its lease.
    drop(alice);
    let took = until_state(&mut bob, None, alice_key, PresenceState::WithinHour).await;
    let bound = Duration::from_millis(LEASE_MS + GRACE_MS + JITTER_MS + SLACK_MS);
    assert!(
        took <= bound,
        "published offline after {took:?}, bound {bound:?}"
    );

    // She comes back (same device, new process) and goes invisible: Bob sees her come
    // online only if the jitter lets the first transition through; either way invisible
    // ends at "within the hour" again.
    let mut alice = device(dir.path(), &gw.origin, 1, 1, OpenMls);
    alice.connect().await.expect("alice reconnects");
    alice
        .set_presence(PresenceMode::Online)
        .await
        .expect("online");
    until_state(&mut bob, Some(&mut alice), alice_key, PresenceState::Online).await;
    alice
        .set_presence(PresenceMode::Invisible)
        .await
        .expect("invisible");
    until_state(
        &mut bob,
        Some(&mut alice),
        alice_key,
        PresenceState::WithinHour,
    )
    .await;
    let lists = alice
        .update_presence_lists(vec![], vec![], vec![], vec![])
        .await
        .expect("query");
    assert!(lists.invisible);

    // A block reaches Bob at once, with no jitter.
    alice
        .set_presence(PresenceMode::Online)
        .await
        .expect("online");
    until_state(&mut bob, Some(&mut alice), alice_key, PresenceState::Online).await;
    alice
        .update_presence_lists(vec![], vec![], vec![bob_key], vec![])
        .await
        .expect("block");
    let took = until_state(&mut bob, None, alice_key, PresenceState::Unavailable).await;
    assert!(
        took < Duration::from_millis(SLACK_MS),
        "block took {took:?}"
    );
    gw.stop().await;
}
