//! What verifying handshake messages costs the gateway (SPEC.md 7.7), against what a member
//! pays to process the same Commit, measured in the same run.
//!
//! A room of 1,000 members is built by Adds (a mls-rs creator; one openmls and one mls-rs
//! member follow along), every Commit verified on the way as the gateway would. Then, for a
//! self-update Commit of the creator (the steady state of a room: a path through the tree):
//! - `verify_1000/gateway`: `tracked_group::verify_commit` from the stored state's bytes to
//!   the next state's bytes (decode, verify, apply, encode; the SQLite write is not in it);
//! - `verify_1000/member_openmls`, `verify_1000/member_mlsrs`: a member engine processing
//!   the same kind of Commit, its state written durably, as clients do.
//!
//! After criterion's output a table prints the medians, the gateway's ratio to each member,
//! and the tracked state's size at 3, 103 and 1,000 members.
//!
//! Run: `cargo bench -p confab-gateway --bench verify`.

use std::time::Duration;

use confab_client::mls::{EngineKind, MlsEngine, open_engine, system_clock};
use confab_gateway::tracked_group::{self, Revocations, TrackedGroup};
use confab_spec::frame::ConversationKind;
use confab_spec::identity::{DeviceKeyPair, SystemKeyPair};
use confab_spec::ids::{ConversationId, ProcessId, UnixMs};
use confab_spec::session::DeviceCredentials;
use criterion::Criterion;

mod support;

const ROOM: ConversationId = ConversationId([0x7E; 32]);
const MEMBERS: u32 = 1_000;

fn credentials(seed: u32) -> DeviceCredentials {
    let mut s = [0u8; 32];
    s[..4].copy_from_slice(&seed.to_be_bytes());
    let system = SystemKeyPair::from_seed(&s);
    s[31] = 1;
    let key = DeviceKeyPair::from_seed(&s);
    let now = system_clock()();
    DeviceCredentials {
        certificate: system.issue_certificate(
            ProcessId([seed as u8; 16]),
            key.public(),
            UnixMs(now.0 - 3_600_000),
            now.plus_ms(86_400_000),
        ),
        key,
    }
}

fn engine(dir: &tempfile::TempDir, kind: EngineKind, seed: u32) -> Box<dyn MlsEngine> {
    let path = dir.path().join(format!("{}-{seed}.db", kind.name()));
    open_engine(kind, &path, credentials(seed), system_clock()).expect("engine")
}

fn now() -> UnixMs {
    system_clock()()
}

/// The room, its tracked state, the creator and the two followers; the tracked state's
/// size at 3, 103 and 1,000 members.
struct Room {
    creator: Box<dyn MlsEngine>,
    openmls: Box<dyn MlsEngine>,
    mlsrs: Box<dyn MlsEngine>,
    tracked: TrackedGroup,
    sizes: Vec<(usize, usize)>,
}

fn build(dir: &tempfile::TempDir) -> Room {
    let mut creator = engine(dir, EngineKind::MlsRs, 1);
    let info = creator.create_group(&ROOM).expect("create");
    let creator_device = credentials(1).certificate.device_id();
    let none = Revocations::new();
    let mut tracked = tracked_group::observe_new_group(
        &info,
        &ROOM,
        ConversationKind::DirectMessage,
        &creator_device,
        now(),
        &none,
    )
    .expect("the GroupInfo verifies");
    let mut openmls = engine(dir, EngineKind::OpenMls, 2);
    let mut mlsrs = engine(dir, EngineKind::MlsRs, 3);
    let mut sizes = Vec::new();
    let mut seed = 10;
    let mut joiners: Vec<&mut Box<dyn MlsEngine>> = vec![&mut openmls, &mut mlsrs];
    let mut first = true;
    while tracked.members.len() < MEMBERS as usize {
        let want = (MEMBERS as usize - tracked.members.len()).min(if first { 1 } else { 100 });
        let mut kps = Vec::new();
        if first {
            for j in joiners.iter_mut() {
                kps.extend(j.key_packages(1, false).expect("kp"));
            }
        } else {
            for _ in 0..want {
                seed += 1;
                kps.extend(
                    engine(dir, EngineKind::MlsRs, seed)
                        .key_packages(1, false)
                        .expect("kp"),
                );
            }
        }
        let add = creator.add_members(&ROOM, &kps).expect("add");
        tracked = tracked_group::verify_commit(
            &tracked.snapshot,
            &tracked_group::CommitInput {
                commit: &add.commit,
                welcome: add.welcome.as_deref(),
                group_info: add.group_info.as_deref(),
                check_group_info: true,
                resync: None,
            },
            now(),
            &none,
        )
        .expect("the Commit verifies");
        creator.merge_pending_commit(&ROOM).expect("merge");
        if first {
            let welcome = add.welcome.expect("welcome");
            for j in joiners.iter_mut() {
                j.join(&welcome).expect("join");
            }
            first = false;
        } else {
            for j in joiners.iter_mut() {
                j.process(&ROOM, &add.commit).expect("process");
            }
        }
        let n = tracked.members.len();
        if n == 3 || n == 103 || n == MEMBERS as usize {
            sizes.push((n, tracked.snapshot.len()));
        }
    }
    Room {
        creator,
        openmls,
        mlsrs,
        tracked,
        sizes,
    }
}

fn benches(c: &mut Criterion, room: &mut Room) {
    let none = Revocations::new();
    let mut group = c.benchmark_group("verify_1000");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(15));
    // The gateway: the same Commit against the same stored state, every iteration.
    let commit = room.creator.self_update(&ROOM).expect("commit");
    group.bench_function("gateway", |b| {
        b.iter(|| {
            let input = tracked_group::CommitInput {
                commit: &commit.commit,
                welcome: None,
                group_info: commit.group_info.as_deref(),
                check_group_info: true,
                resync: None,
            };
            tracked_group::verify_commit(&room.tracked.snapshot, &input, now(), &none)
                .expect("verifies")
        })
    });
    room.creator.discard_pending_commit(&ROOM).expect("discard");
    // A member: a fresh Commit each iteration (the other follower keeps up, unmeasured).
    let Room {
        creator,
        openmls,
        mlsrs,
        ..
    } = room;
    // Setup and routine both reach the followers, one after the other.
    let openmls = std::cell::RefCell::new(openmls);
    let mlsrs = std::cell::RefCell::new(mlsrs);
    for (name, openmls_measured) in [("member_openmls", true), ("member_mlsrs", false)] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let out = creator.self_update(&ROOM).expect("commit");
                    creator.merge_pending_commit(&ROOM).expect("merge");
                    let other = if openmls_measured { &mlsrs } else { &openmls };
                    other
                        .borrow_mut()
                        .process(&ROOM, &out.commit)
                        .expect("process");
                    out.commit
                },
                |commit| {
                    let measured = if openmls_measured { &openmls } else { &mlsrs };
                    measured
                        .borrow_mut()
                        .process(&ROOM, &commit)
                        .expect("process")
                },
                criterion::BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

fn main() {
    let dir = support::scratch();
    eprintln!("building a room of {MEMBERS} members...");
    let mut room = build(&dir);
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c, &mut room);
    c.final_summary();
    let gateway = support::median("verify_1000/gateway");
    println!();
    println!("| what | median | gateway / it |");
    println!("| --- | ---: | ---: |");
    if let Some(g) = gateway {
        println!(
            "| gateway verifies a self-update Commit, 1,000 members | {:.2} ms | 1.00 |",
            g / 1e6
        );
    }
    for (label, id) in [
        (
            "an openmls member processes one",
            "verify_1000/member_openmls",
        ),
        ("a mls-rs member processes one", "verify_1000/member_mlsrs"),
    ] {
        if let (Some(g), Some(m)) = (gateway, support::median(id)) {
            println!("| {label} | {:.2} ms | {:.2} |", m / 1e6, g / m);
        }
    }
    println!();
    println!("| members | tracked state (bytes) |");
    println!("| ---: | ---: |");
    for (n, bytes) in &room.sizes {
        println!("| {n} | {bytes} |");
    }
}
