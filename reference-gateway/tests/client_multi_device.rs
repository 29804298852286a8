//! Phase 2's multi-device test with the reference client against the gateway over real
//! WebSockets: two users with two devices each share a DM while devices are added,
//! removed, added again and revoked. Every device that is a member when a message is sent
//! stores it (decrypted, or from its outbox for the sender), and no device stores a message
//! sent while it was not a member. All members agree on the epoch authenticator. Run with
//! both engines and with a mixed group.

mod app_support;

use std::collections::BTreeSet;

use app_support::{Gateway, device, pump_until, user};
use confab_client::app::{Client, ClientError, DeviceChange};
use confab_client::mls::EngineKind::{self, MlsRs, OpenMls};
use confab_spec::ids::{ConversationId, DeviceId};

/// The texts `c` stored for `dm`.
fn texts(c: &Client, dm: &ConversationId) -> BTreeSet<String> {
    c.store()
        .messages(dm, 0, 1_000)
        .expect("messages")
        .into_iter()
        .map(|m| String::from_utf8(m.body).expect("utf-8"))
        .collect()
}

/// Pumps `c` until it stored `text` in `dm`.
async fn until_stored(c: &mut Client, dm: ConversationId, text: &str) {
    let what = format!("{} to store {text:?}", c.device().process.0[0]);
    pump_until(c, &what, |c| texts(c, &dm).contains(text)).await;
}

/// Pumps `c` until its group reached `epoch`.
async fn until_epoch(c: &mut Client, dm: ConversationId, epoch: u64) {
    let what = format!("{} to reach epoch {epoch}", c.device().process.0[0]);
    pump_until(c, &what, |c| {
        c.engine().epoch(&dm).is_ok_and(|e| e >= epoch)
    })
    .await;
}

/// Whether `c` is in `dm` and not removed from it.
fn joined(c: &Client, dm: ConversationId) -> bool {
    c.store()
        .conversations()
        .expect("conversations")
        .iter()
        .any(|r| r.id == dm && !r.removed)
}

/// The devices the directory lists to `c`'s user.
async fn devices(c: &mut Client) -> Vec<DeviceId> {
    let listed = c.devices().await.expect("devices");
    listed.iter().map(|d| d.device).collect()
}

fn set(texts: &[&str]) -> BTreeSet<String> {
    texts.iter().map(|t| (*t).to_owned()).collect()
}

async fn two_users_two_devices(engines: [EngineKind; 4]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = Gateway::start(dir.path(), |_| {}).await;
    let o = gateway.origin.clone();
    let path = dir.path();
    // Alice (user 1) has devices 11 and 12; Bob (user 2) has 21 and 22.
    let mut a1 = device(path, &o, 1, 11, engines[0]);
    let mut a2 = device(path, &o, 1, 12, engines[1]);
    let mut b1 = device(path, &o, 2, 21, engines[2]);
    let mut b2 = device(path, &o, 2, 22, engines[3]);
    for c in [&mut a1, &mut b1, &mut b2] {
        c.connect().await.expect("connect");
        c.top_up_key_packages(5).await.expect("top up");
    }
    let id = |c: &Client| -> DeviceId { c.device() };
    let (a2_id, b2_id) = (id(&a2), id(&b2));

    // Alice's first device makes the DM: both of Bob's devices are in it.
    let dm = a1.create_dm(user(2).public()).await.expect("dm");
    a1.send_text(dm, b"m1").await.expect("m1");
    until_stored(&mut b1, dm, "m1").await;
    until_stored(&mut b2, dm, "m1").await;

    // Alice's second device appears and is added from her first one; it sees what is
    // sent from then on, not m1.
    a2.connect().await.expect("connect");
    a2.top_up_key_packages(5).await.expect("top up");
    let listed = devices(&mut a1).await;
    let mut both = vec![id(&a1), a2_id];
    both.sort();
    assert_eq!(listed, both, "Alice's devices list each other, not Bob's");
    assert_eq!(
        a1.add_device(a2_id).await.expect("add"),
        DeviceChange {
            conversations: 1,
            unchanged: 0
        }
    );
    // Adding it again changes nothing.
    assert_eq!(a1.add_device(a2_id).await.expect("again").conversations, 0);
    pump_until(&mut a2, "a2 to join", |c| joined(c, dm)).await;
    // Devices of other users and this device itself are refused, specifically.
    assert!(matches!(
        a1.add_device(id(&b1)).await,
        Err(ClientError::NotOwnDevice)
    ));
    assert!(matches!(
        a1.remove_device(id(&a1)).await,
        Err(ClientError::ThisDevice)
    ));

    // A message is for the members of the epoch it is sent in: the sender catches up
    // with the Commits first (a message sent in an older epoch is delivered, REQ-7.2-3,
    // but a device added since cannot decrypt it).
    let epoch = a1.engine().epoch(&dm).expect("epoch");
    until_epoch(&mut b2, dm, epoch).await;
    b2.send_text(dm, b"m2").await.expect("m2");
    for c in [&mut a1, &mut a2, &mut b1] {
        until_stored(c, dm, "m2").await;
    }

    // Bob removes his second device; it learns of it from the Commit.
    assert_eq!(
        b1.remove_device(b2_id).await.expect("remove").conversations,
        1
    );
    pump_until(&mut b2, "b2 to see its removal", |c| !joined(c, dm)).await;
    let epoch = b1.engine().epoch(&dm).expect("epoch");
    until_epoch(&mut a2, dm, epoch).await;
    a2.send_text(dm, b"m3").await.expect("m3");
    for c in [&mut a1, &mut b1] {
        until_stored(c, dm, "m3").await;
    }

    // ... and adds it again: it rejoins from the new Welcome and decrypts what follows.
    assert_eq!(b1.add_device(b2_id).await.expect("re-add").conversations, 1);
    pump_until(&mut b2, "b2 to rejoin", |c| joined(c, dm)).await;
    let epoch = b1.engine().epoch(&dm).expect("epoch");
    until_epoch(&mut a1, dm, epoch).await;
    a1.send_text(dm, b"m4").await.expect("m4");
    for c in [&mut a2, &mut b1, &mut b2] {
        until_stored(c, dm, "m4").await;
    }

    // Alice revokes her second device: the gateway closes it, it leaves the DM.
    let revocation = user(1).revoke(a2_id.process, confab_client::transport::system_now());
    assert_eq!(
        a1.revoke_device(revocation)
            .await
            .expect("revoke")
            .conversations,
        1
    );
    let listed = devices(&mut a1).await;
    assert_eq!(listed, vec![id(&a1)], "a revoked device is not listed");
    let epoch = a1.engine().epoch(&dm).expect("epoch");
    until_epoch(&mut b2, dm, epoch).await;
    b2.send_text(dm, b"m5").await.expect("m5");
    for c in [&mut a1, &mut b1] {
        until_stored(c, dm, "m5").await;
    }

    // Every device stored exactly what was sent while it was a member.
    assert_eq!(
        texts(&a1, &dm),
        set(&["m1", "m2", "m3", "m4", "m5"]),
        "{engines:?}"
    );
    assert_eq!(texts(&a2, &dm), set(&["m2", "m3", "m4"]), "{engines:?}");
    assert_eq!(
        texts(&b1, &dm),
        set(&["m1", "m2", "m3", "m4", "m5"]),
        "{engines:?}"
    );
    pump_until(&mut b2, "b2's own m5", |c| texts(c, &dm).contains("m5")).await;
    assert_eq!(
        texts(&b2, &dm),
        set(&["m1", "m2", "m4", "m5"]),
        "{engines:?}"
    );

    // The current members agree on the epoch and its authenticator.
    let epoch = a1.engine().epoch(&dm).expect("epoch");
    for c in [&mut b1, &mut b2] {
        until_epoch(c, dm, epoch).await;
    }
    let authenticator = a1.engine().epoch_authenticator(&dm).expect("authenticator");
    for c in [&b1, &b2] {
        assert_eq!(c.engine().epoch(&dm).expect("epoch"), epoch, "{engines:?}");
        assert_eq!(
            c.engine().epoch_authenticator(&dm).expect("authenticator"),
            authenticator,
            "{engines:?}"
        );
    }
    drop((a1, a2, b1, b2));
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_two_devices_openmls() {
    two_users_two_devices([OpenMls; 4]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_two_devices_mls_rs() {
    two_users_two_devices([MlsRs; 4]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_two_devices_mixed() {
    two_users_two_devices([OpenMls, MlsRs, MlsRs, OpenMls]).await;
}
