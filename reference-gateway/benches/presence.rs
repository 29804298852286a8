//! Is a user who shares nothing told apart from a key nobody holds by timing (SPEC.md
//! REQ-9.2-2)? Measures `WatchPresence` of one target through the gateway's presence on
//! its SQLite store: a user with a full share list (1,000 users, the watcher not among
//! them) against a key with no record, both the first time the gateway loads the target
//! (uncached) and afterwards (cached). After criterion's output a table prints the medians
//! and the ratio user / nobody; the baseline is the key nobody holds, measured in the same
//! run.
//!
//! ```text
//! cargo bench -p confab-gateway --bench presence
//! ```

mod support;

use std::time::Duration;

use confab_gateway::faults::Faults;
use confab_gateway::presence::{Presence, PresenceConfig};
use confab_gateway::rate::RateLimit;
use confab_gateway::store::sqlite::SqliteStore;
use confab_gateway::store::{PresenceStatus, ShareLists, Store};
use confab_spec::frame::{ServerFrame, WatchPresence};
use confab_spec::ids::{DeviceId, ProcessId, SystemKey, UnixMs};
use criterion::{BatchSize, Criterion};
use support::{median, scratch};

const USER: SystemKey = SystemKey([0x11; 32]);
const NOBODY: SystemKey = SystemKey([0x22; 32]);
const NOW: UnixMs = UnixMs(1_800_000_000_000);

fn config() -> PresenceConfig {
    let unlimited = RateLimit {
        per_minute: u32::MAX,
        burst: u32::MAX,
    };
    PresenceConfig {
        watches_per_watcher: unlimited,
        new_watchers_per_target: unlimited,
        ..PresenceConfig::default()
    }
}

fn watcher() -> DeviceId {
    DeviceId {
        system: SystemKey([0x33; 32]),
        process: ProcessId([1; 16]),
    }
}

fn watch(presence: &mut Presence, store: &mut SqliteStore, target: SystemKey) {
    let out = presence
        .watch(
            store,
            NOW,
            1,
            watcher(),
            &WatchPresence {
                rid: 1,
                targets: vec![target],
            },
        )
        .expect("watch");
    assert!(matches!(out.answer, Some(ServerFrame::PresenceStates(_))));
}

fn benches(c: &mut Criterion) {
    let dir = scratch();
    let mut store = SqliteStore::open(&dir.path().join("gw.db")).expect("store");
    let mut lists = ShareLists::default();
    for i in 0..1_000u32 {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&i.to_le_bytes());
        k[31] = 0xAA;
        lists.shared.insert(SystemKey(k));
    }
    store.put_share_lists(&USER, &lists).expect("lists");
    let status = PresenceStatus {
        invisible: false,
        last_seen: Some(NOW),
    };
    store.put_presence_status(&USER, &status).expect("status");
    let mut group = c.benchmark_group("presence");
    group
        .sample_size(50)
        .measurement_time(Duration::from_secs(4));
    for (name, target) in [("user", USER), ("nobody", NOBODY)] {
        group.bench_function(format!("watch_{name}_uncached"), |b| {
            b.iter_batched(
                || Presence::new(config(), Faults::default()),
                |mut p| watch(&mut p, &mut store, target),
                BatchSize::SmallInput,
            )
        });
        let mut p = Presence::new(config(), Faults::default());
        group.bench_function(format!("watch_{name}_cached"), |b| {
            b.iter(|| watch(&mut p, &mut store, target))
        });
    }
    group.finish();
}

fn table() {
    println!(
        "\n| WatchPresence of one target | user sharing with 1,000 others | key nobody holds (baseline) | user / nobody |"
    );
    println!("| --- | ---: | ---: | ---: |");
    for cache in ["uncached", "cached"] {
        let (Some(user), Some(nobody)) = (
            median(&format!("presence/watch_user_{cache}")),
            median(&format!("presence/watch_nobody_{cache}")),
        ) else {
            eprintln!("no presence measurements in target/criterion");
            return;
        };
        println!(
            "| {cache} | {:.1} µs | {:.1} µs | {:.2} |",
            user / 1e3,
            nobody / 1e3,
            user / nobody
        );
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
    table();
}
