//! MLS engine benchmarks, openmls and mls-rs side by side, with the floor of one
//! application message measured in the same run: raw Ed25519 sign+verify plus AES-128-GCM
//! seal+open of 1 KiB. After criterion's own output, a table prints every median and its
//! ratio to that floor.
//!
//! ```text
//! cargo bench -p confab-client --bench mls_engines
//! ```
//!
//! Engine state lives in /dev/shm when it exists, so the figures measure MLS and SQLite,
//! not the disk's fsync.

use std::path::PathBuf;
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes128Gcm, Nonce};
use confab_client::mls::{EngineKind, MlsEngine, open_engine, system_clock};
use confab_spec::identity::{DeviceKeyPair, SystemKeyPair};
use confab_spec::ids::{ConversationId, ProcessId, UnixMs};
use confab_spec::session::DeviceCredentials;
use criterion::Criterion;
use ed25519_dalek::{Signer, Verifier};

fn scratch() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("tempdir")
}

fn credentials(seed: u32) -> DeviceCredentials {
    let mut s = [7u8; 32];
    s[..4].copy_from_slice(&seed.to_be_bytes());
    let system = SystemKeyPair::from_seed(&s);
    s[31] = 1;
    let key = DeviceKeyPair::from_seed(&s);
    let mut p = [0u8; 16];
    p[..4].copy_from_slice(&seed.to_be_bytes());
    let now = system_clock()();
    let certificate = system.issue_certificate(
        ProcessId(p),
        key.public(),
        UnixMs(now.0 - 3_600_000),
        now.plus_ms(7 * 24 * 3_600_000),
    );
    DeviceCredentials { key, certificate }
}

struct Dev {
    kind: EngineKind,
    path: PathBuf,
    creds: DeviceCredentials,
    engine: Box<dyn MlsEngine>,
}

fn device(dir: &tempfile::TempDir, kind: EngineKind, seed: u32) -> Dev {
    let path = dir.path().join(format!("{}-{seed}.db", kind.name()));
    let creds = credentials(seed);
    let engine = open_engine(kind, &path, creds.clone(), system_clock()).expect("open");
    Dev {
        kind,
        path,
        creds,
        engine,
    }
}

fn group_id(n: u64) -> ConversationId {
    let mut g = [0u8; 32];
    g[..8].copy_from_slice(&n.to_be_bytes());
    ConversationId(g)
}

/// A group of `size` members created by `creator`; returns the other members.
fn build_group(
    dir: &tempfile::TempDir,
    creator: &mut Dev,
    id: &ConversationId,
    size: u32,
    kind: EngineKind,
) -> Vec<Dev> {
    creator.engine.create_group(id).expect("create");
    let mut members = Vec::new();
    let mut seed = 1_000_000;
    let mut added = 0u32;
    while added + 1 < size {
        let batch = (size - 1 - added).min(100);
        added += batch;
        let mut kps = Vec::new();
        let mut joiners = Vec::new();
        for _ in 0..batch {
            seed += 1;
            let mut d = device(dir, kind, seed);
            kps.extend(d.engine.key_packages(1, false).expect("kp"));
            joiners.push(d);
        }
        let out = creator.engine.add_members(id, &kps).expect("add");
        creator.engine.merge_pending_commit(id).expect("merge");
        for m in &mut members {
            let m: &mut Dev = m;
            m.engine.process(id, &out.commit).expect("process add");
        }
        // Only the first joiner of the first batch follows along (to decrypt); the rest
        // are dropped to keep the benchmark's memory flat.
        let welcome = out.welcome.expect("welcome");
        if members.is_empty() {
            let mut first = joiners.remove(0);
            first.engine.join(&welcome).expect("join");
            members.push(first);
        }
    }
    let roster = creator.engine.members(id).expect("members");
    assert_eq!(roster.len(), size as usize, "the group has {size} members");
    members
}

fn benches(c: &mut Criterion) {
    let payload = vec![0x5Au8; 1024];

    // The floor: what one application message costs with the bare primitives.
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let verifying = key.verifying_key();
    let aead = Aes128Gcm::new_from_slice(&[9; 16]).expect("key");
    c.bench_function("floor/ed25519_sign_verify+aes128gcm_seal_open_1KiB", |b| {
        b.iter(|| {
            let ct = aead
                .encrypt(Nonce::from_slice(&[1; 12]), payload.as_slice())
                .expect("seal");
            let sig = key.sign(&ct);
            verifying.verify(&ct, &sig).expect("verify");
            aead.decrypt(Nonce::from_slice(&[1; 12]), ct.as_slice())
                .expect("open")
        })
    });

    for kind in EngineKind::ALL {
        let dir = scratch();
        let name = kind.name();
        let mut a = device(&dir, kind, 1);
        let mut b = device(&dir, kind, 2);

        // Devices of their own, so that thousands of stored KeyPackages and groups do not
        // weigh on the other measurements.
        let mut kp_dev = device(&dir, kind, 50);
        c.bench_function(&format!("{name}/key_package"), |bench| {
            bench.iter(|| kp_dev.engine.key_packages(1, false).expect("kp"))
        });
        let mut group_dev = device(&dir, kind, 51);
        let mut n = 1_000u64;
        c.bench_function(&format!("{name}/create_group"), |bench| {
            bench.iter(|| {
                n += 1;
                group_dev.engine.create_group(&group_id(n)).expect("create")
            })
        });

        for count in [1u32, 10, 100] {
            let mut seed = 100 + count * 1_000;
            let mut group_n = 0u64;
            let mut group_bench = c.benchmark_group(format!("{name}/add_members"));
            group_bench.sample_size(10);
            group_bench.bench_function(format!("{count}"), |bench| {
                // Setup (a fresh group, `count` key packages) is excluded from the timing.
                bench.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        group_n += 1;
                        let group = group_id(2_000_000 + u64::from(count) * 100_000 + group_n);
                        a.engine.create_group(&group).expect("create");
                        let kps: Vec<Vec<u8>> = (0..count)
                            .flat_map(|_| {
                                seed += 1;
                                device(&dir, kind, seed)
                                    .engine
                                    .key_packages(1, false)
                                    .expect("kp")
                            })
                            .collect();
                        let start = std::time::Instant::now();
                        a.engine.add_members(&group, &kps).expect("add");
                        a.engine.merge_pending_commit(&group).expect("merge");
                        total += start.elapsed();
                    }
                    total
                })
            });
            group_bench.finish();
        }

        // Two-member group for messages and reloads.
        let pair = group_id(7);
        a.engine.create_group(&pair).expect("create");
        let kp = b.engine.key_packages(1, false).expect("kp");
        let out = a.engine.add_members(&pair, &kp).expect("add");
        a.engine.merge_pending_commit(&pair).expect("merge");
        b.engine.join(&out.welcome.expect("welcome")).expect("join");
        c.bench_function(&format!("{name}/encrypt_decrypt_1KiB"), |bench| {
            bench.iter(|| {
                let ct = a.engine.encrypt(&pair, &payload).expect("encrypt");
                b.engine.process(&pair, &ct).expect("decrypt")
            })
        });
        c.bench_function(&format!("{name}/persist_reload"), |bench| {
            bench.iter(|| {
                a.engine =
                    open_engine(a.kind, &a.path, a.creds.clone(), system_clock()).expect("reopen");
                a.engine.epoch(&pair).expect("load")
            })
        });

        // A commit in a group of 1,000.
        let big = group_id(9);
        let mut creator = device(&dir, kind, 3);
        let mut followers = build_group(&dir, &mut creator, &big, 1_000, kind);
        let mut commit_group = c.benchmark_group(format!("{name}/commit_in_1000"));
        commit_group
            .sample_size(10)
            .measurement_time(Duration::from_secs(20));
        // One member receiving one message, with its state written durably: the cost a
        // member of a large room pays per message (issue 9's room-soak), against
        // `encrypt_decrypt_1KiB` in a group of two.
        if let Some(follower) = followers.first_mut() {
            commit_group.bench_function("receive_1KiB", |bench| {
                let seq = std::cell::Cell::new(0u64);
                bench.iter_batched(
                    || creator.engine.encrypt(&big, &payload).expect("encrypt"),
                    |ct| {
                        seq.set(seq.get() + 1);
                        let out = follower
                            .engine
                            .process_entry(&big, seq.get(), &ct)
                            .expect("decrypt");
                        follower
                            .engine
                            .release_processed(&big, seq.get())
                            .expect("release");
                        out
                    },
                    criterion::BatchSize::SmallInput,
                )
            });
        }
        // The same in a receive batch of 64 (the client's `RECEIVE_BATCH_ENTRIES`): the
        // state is written once per batch. Per message: the median / 64.
        if let Some(follower) = followers.first_mut() {
            commit_group.bench_function("receive_64x1KiB_batched", |bench| {
                let seq = std::cell::Cell::new(1_000_000u64);
                bench.iter_batched(
                    || {
                        (0..64)
                            .map(|_| creator.engine.encrypt(&big, &payload).expect("encrypt"))
                            .collect::<Vec<_>>()
                    },
                    |cts| {
                        follower.engine.begin_receive_batch().expect("begin");
                        for ct in &cts {
                            seq.set(seq.get() + 1);
                            follower
                                .engine
                                .process_entry(&big, seq.get(), ct)
                                .expect("decrypt");
                            follower
                                .engine
                                .release_processed(&big, seq.get())
                                .expect("release");
                        }
                        follower.engine.end_receive_batch().expect("end")
                    },
                    criterion::BatchSize::PerIteration,
                )
            });
        }
        commit_group.bench_function("self_update", |bench| {
            bench.iter(|| {
                creator.engine.self_update(&big).expect("commit");
                creator.engine.merge_pending_commit(&big).expect("merge")
            })
        });
        commit_group.finish();
    }
}

/// Prints every benchmark's median with its ratio to the floor, engines side by side.
fn ratio_table() {
    let root = PathBuf::from(
        std::env::var("CARGO_TARGET_DIR")
            .unwrap_or_else(|_| format!("{}/../target", env!("CARGO_MANIFEST_DIR"))),
    )
    .join("criterion");
    let median = |id: &str| -> Option<f64> {
        let text = std::fs::read_to_string(root.join(id).join("new/estimates.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v["median"]["point_estimate"].as_f64()
    };
    let floor = median("floor_ed25519_sign_verify+aes128gcm_seal_open_1KiB");
    let Some(floor) = floor else {
        eprintln!("no floor measurement found under {}", root.display());
        return;
    };
    println!(
        "\nfloor (Ed25519 sign+verify + AES-128-GCM seal+open, 1 KiB): {:.1} µs\n",
        floor / 1e3
    );
    println!("| operation | openmls | ×floor | mls-rs | ×floor |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    // (label, benchmark id, messages per iteration)
    let ops = [
        ("key_package", "key_package", 1.0),
        ("create_group", "create_group", 1.0),
        ("add_members/1", "add_members/1", 1.0),
        ("add_members/10", "add_members/10", 1.0),
        ("add_members/100", "add_members/100", 1.0),
        ("encrypt_decrypt_1KiB", "encrypt_decrypt_1KiB", 1.0),
        ("persist_reload", "persist_reload", 1.0),
        (
            "commit_in_1000/receive_1KiB",
            "commit_in_1000/receive_1KiB",
            1.0,
        ),
        (
            "commit_in_1000/receive_1KiB in a batch of 64 (per message)",
            "commit_in_1000/receive_64x1KiB_batched",
            64.0,
        ),
        (
            "commit_in_1000/self_update",
            "commit_in_1000/self_update",
            1.0,
        ),
    ];
    for (label, id, per) in ops {
        // criterion stores "engine/op" benchmarks under "engine_op".
        let cell = |engine: &str| match median(&format!("{engine}_{id}")) {
            Some(ns) => format!("{:.1} µs | {:.1}", ns / per / 1e3, ns / per / floor),
            None => "– | –".into(),
        };
        println!("| {label} | {} | {} |", cell("openmls"), cell("mls-rs"));
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
    ratio_table();
}
