//! Phase 0 exit criteria of the roadmap, as tests.
//!
//! - Two devices exchange 1,000 messages with engine reloads from SQLite at random points,
//!   including between creating a Commit and merging it, in every engine pairing: no fork
//!   (equal epoch authenticators after every Commit) and no decryption failure.
//! - A property test over random operation sequences in mixed groups of 2–8 members:
//!   send, update, add, remove, reload, and concurrent Commits where the gateway's order
//!   picks one winner. Every member agrees on the epoch authenticator after every step.

mod support;

use confab_client::mls::{EngineKind, Processed};
use proptest::prelude::*;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use support::*;

fn deliver_app(from: &mut Device, to: &mut Device, text: &[u8]) {
    let ct = from.engine().encrypt(&GROUP, text).expect("encrypt");
    match to.engine().process(&GROUP, &ct) {
        Ok(Processed::Application { sender, plaintext }) => {
            assert_eq!(sender, from.id());
            assert_eq!(plaintext, text);
        }
        other => panic!("{} -> {}: decryption failed: {other:?}", from.kind, to.kind),
    }
}

#[test]
fn thousand_messages_with_random_reloads_in_every_pairing() {
    for (ka, kb) in pairings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut devices = [Device::new(&dir, 1, ka), Device::new(&dir, 2, kb)];
        let mut rng = ChaCha8Rng::seed_from_u64(0xC0FFEE);
        {
            let [a, b] = &mut devices;
            a.engine().create_group(&GROUP).expect("create");
            let kp = b.engine().key_packages(1, false).expect("kp");
            let out = a.engine().add_members(&GROUP, &kp).expect("add");
            a.reload(); // reload with a pending commit
            a.engine()
                .merge_pending_commit(&GROUP)
                .expect("merge after reload");
            b.engine()
                .join(out.welcome.as_deref().expect("welcome"))
                .expect("join");
        }
        let (mut reloads, mut commits) = (0, 0);
        for i in 0..1_000u32 {
            let s = (rng.next_u32() % 2) as usize;
            let (sender, receiver) = {
                let [a, b] = &mut devices;
                if s == 0 { (a, b) } else { (b, a) }
            };
            if rng.next_u32() % 10 == 0 {
                sender.reload();
                reloads += 1;
            }
            if i % 50 == 49 {
                let out = sender.engine().self_update(&GROUP).expect("update");
                if rng.next_u32() % 2 == 0 {
                    sender.reload(); // in the middle of a pending commit
                    reloads += 1;
                }
                sender.engine().merge_pending_commit(&GROUP).expect("merge");
                assert!(matches!(
                    receiver.engine().process(&GROUP, &out.commit),
                    Ok(Processed::Commit { .. })
                ));
                commits += 1;
                assert_agree(&[&devices[0], &devices[1]], &GROUP);
                continue;
            }
            deliver_app(sender, receiver, format!("message {i}").as_bytes());
            if rng.next_u32() % 10 == 0 {
                receiver.reload();
                reloads += 1;
            }
        }
        assert_agree(&[&devices[0], &devices[1]], &GROUP);
        assert!(
            reloads > 150 && commits == 20,
            "{ka}/{kb}: {reloads} reloads, {commits} commits"
        );
    }
}

/// One operation of the group property test.
#[derive(Debug, Clone)]
enum Op {
    Send(u8),
    Update(u8),
    Add(u8, bool),
    Remove(u8, u8),
    Reload(u8),
    Race(u8, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u8>().prop_map(Op::Send),
        2 => any::<u8>().prop_map(Op::Update),
        2 => (any::<u8>(), any::<bool>()).prop_map(|(c, k)| Op::Add(c, k)),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(c, r)| Op::Remove(c, r)),
        2 => any::<u8>().prop_map(Op::Reload),
        2 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Op::Race(a, b)),
    ]
}

fn kind(flag: bool) -> EngineKind {
    if flag {
        EngineKind::OpenMls
    } else {
        EngineKind::MlsRs
    }
}

/// Applies `commit` from `members[committer]` everywhere: the committer merges on echo,
/// the others process it.
fn fan_out_commit(members: &mut [Device], committer: usize, commit: &[u8]) {
    members[committer]
        .engine()
        .merge_pending_commit(&GROUP)
        .expect("merge on echo");
    for (i, m) in members.iter_mut().enumerate() {
        if i != committer {
            let r = m.engine().process(&GROUP, commit);
            assert!(
                matches!(r, Ok(Processed::Commit { .. })),
                "{} failed to process a commit: {r:?}",
                m.kind
            );
        }
    }
}

fn run(first: bool, second: bool, ops: &[Op]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut next_seed = 3u8;
    let mut members = vec![
        Device::new(&dir, 1, kind(first)),
        Device::new(&dir, 2, kind(second)),
    ];
    members[0].engine().create_group(&GROUP).expect("create");
    let kp = members[1].engine().key_packages(1, false).expect("kp");
    let out = members[0].engine().add_members(&GROUP, &kp).expect("add");
    members[0]
        .engine()
        .merge_pending_commit(&GROUP)
        .expect("merge");
    members[1]
        .engine()
        .join(out.welcome.as_deref().expect("welcome"))
        .expect("join");
    for op in ops {
        let n = members.len();
        match *op {
            Op::Send(s) => {
                let s = s as usize % n;
                let ct = members[s]
                    .engine()
                    .encrypt(&GROUP, b"payload")
                    .expect("encrypt");
                for (i, m) in members.iter_mut().enumerate() {
                    if i != s {
                        assert!(
                            matches!(
                                m.engine().process(&GROUP, &ct),
                                Ok(Processed::Application { .. })
                            ),
                            "decryption failure"
                        );
                    }
                }
            }
            Op::Update(c) => {
                let c = c as usize % n;
                let out = members[c].engine().self_update(&GROUP).expect("update");
                fan_out_commit(&mut members, c, &out.commit);
            }
            Op::Add(c, k) => {
                if n >= 8 {
                    continue;
                }
                let c = c as usize % n;
                let mut joiner = Device::new(&dir, next_seed, kind(k));
                next_seed += 1;
                let kp = joiner.engine().key_packages(1, false).expect("kp");
                let out = members[c].engine().add_members(&GROUP, &kp).expect("add");
                fan_out_commit(&mut members, c, &out.commit);
                joiner
                    .engine()
                    .join(out.welcome.as_deref().expect("welcome"))
                    .expect("join");
                members.push(joiner);
            }
            Op::Remove(c, r) => {
                if n <= 2 {
                    continue;
                }
                let c = c as usize % n;
                let r = (c + 1 + r as usize % (n - 1)) % n;
                let victim = members[r].id();
                let out = members[c]
                    .engine()
                    .remove_members(&GROUP, &[victim])
                    .expect("remove");
                fan_out_commit(&mut members, c, &out.commit);
                let removed = members.remove(r);
                drop(removed);
            }
            Op::Reload(d) => {
                let d = d as usize % n;
                members[d].reload();
            }
            Op::Race(a, b) => {
                let a = a as usize % n;
                let b = b as usize % n;
                if a == b {
                    continue;
                }
                // Both commit in the same epoch; the gateway accepts a's.
                let winner = members[a].engine().self_update(&GROUP).expect("a commits");
                let _loser = members[b].engine().self_update(&GROUP).expect("b commits");
                members[b]
                    .engine()
                    .discard_pending_commit(&GROUP)
                    .expect("b discards on stale_commit");
                fan_out_commit(&mut members, a, &winner.commit);
            }
        }
        let refs: Vec<&Device> = members.iter().collect();
        assert_agree(&refs, &GROUP);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn mixed_groups_agree_after_every_step(first: bool, second: bool, ops in prop::collection::vec(op(), 1..25)) {
        run(first, second, &ops);
    }
}
