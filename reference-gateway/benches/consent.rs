//! What a KeyPackage claim costs the gateway when the target does not allow the claimer
//! (SPEC.md 8.1, REQ-8-13), beside a claim of a key nobody holds in the same run: the two
//! answers must be alike, in time as in bytes. The connection handler on the SQLite store
//! (in /dev/shm), every answer encoded, rate limits raised out of the way:
//!
//! | path | what |
//! | --- | --- |
//! | `claims/unknown_key` | a claim of a key nobody holds → `no_key_packages` (the baseline) |
//! | `claims/not_allowed` | a claim of a user with three devices whose policy is `allowed`, the claimer off its list → `no_key_packages` |
//! | `claims/allowed` | the same user claimed by a user it allows → its three last-resort packages |
//!
//! After criterion's output a table prints the medians and each one's ratio to the
//! baseline.
//!
//! ```text
//! cargo bench -p confab-gateway --bench consent
//! ```

mod support;

use std::time::Duration;

use support::{Counter, median, now, scratch};

use confab_gateway::handler::{Action, GatewayConfig, RateLimit};
use confab_gateway::rate::RateLimiters;
use confab_gateway::store::sqlite::SqliteStore;
use confab_gateway::store::{InviteSettingsOf, Store, StoredKeyPackage};
use confab_spec::ErrorCode;
use confab_spec::frame::*;
use confab_spec::ids::*;
use criterion::Criterion;

const ORIGIN: &str = "wss://bench.test";

fn claim(rid: u64, user: SystemKey) -> Vec<u8> {
    ClientFrame::ClaimKeyPackages(ClaimKeyPackages {
        rid,
        user,
        devices: None,
    })
    .encode()
}

fn benches(c: &mut Criterion) {
    let dir = scratch();
    let unlimited = RateLimit {
        per_minute: u32::MAX,
        burst: u32::MAX,
    };
    let mut config = GatewayConfig::new(ORIGIN);
    config.claims_per_claimer = unlimited;
    config.claims_per_target = unlimited;
    config.claims_per_pair = unlimited;
    let mut store = SqliteStore::open(&dir.path().join("gw.db")).expect("store");
    let limiters = RateLimiters::new(&config);
    let mut claimer = support::ready(&config, &mut store, &limiters, &mut Counter(7), ORIGIN);
    let claimer_user = claimer.device().expect("device").system;
    // Two targets with three devices each, every device with a last-resort package (handed
    // out again and again): one lets nobody in, the other allows the claimer.
    let target = |b: u8| SystemKey([b; 32]);
    let far = now().0 / 1_000 + 86_400;
    for (user, allowed) in [(target(0xA0), false), (target(0xB0), true)] {
        for p in 0..3u8 {
            let device = DeviceId {
                system: user,
                process: ProcessId([p + 1; 16]),
            };
            let package = StoredKeyPackage {
                bytes: vec![p + 1; 600],
                not_after_s: far,
            };
            store
                .upload_key_packages(&device, &[], Some(&package), 10, now())
                .expect("upload");
        }
        store
            .put_invite_settings(
                &user,
                &InviteSettingsOf {
                    policy: InvitePolicy::Allowed,
                    allowed: if allowed {
                        [claimer_user].into_iter().collect()
                    } else {
                        Default::default()
                    },
                },
            )
            .expect("settings");
    }
    let mut entropy = Counter(1);
    let mut group = c.benchmark_group("claims");
    group.measurement_time(Duration::from_secs(5));
    let mut rid = 0u64;
    let cases = [
        ("unknown_key", target(0xC0), false),
        ("not_allowed", target(0xA0), false),
        ("allowed", target(0xB0), true),
    ];
    for (name, user, granted) in cases {
        group.bench_function(name, |b| {
            b.iter(|| {
                rid += 1;
                let out = claimer.handle(
                    &config,
                    &mut store,
                    &limiters,
                    &mut entropy,
                    now(),
                    &claim(rid, user),
                );
                let answer = match out.first() {
                    Some(Action::Send(frame)) => frame,
                    other => panic!("{name}: {other:?}"),
                };
                match (answer, granted) {
                    (ServerFrame::KeyPackagesClaimed(k), true) => assert_eq!(k.claimed.len(), 3),
                    (ServerFrame::Error(e), false) => {
                        assert_eq!(e.code, ErrorCode::NoKeyPackages)
                    }
                    other => panic!("{name}: {other:?}"),
                }
                std::hint::black_box(answer.encode()).len()
            })
        });
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
    let base = median("claims/unknown_key");
    println!("\n| claim | median | ratio to a key nobody holds |");
    println!("| --- | --- | --- |");
    for name in ["unknown_key", "not_allowed", "allowed"] {
        let m = median(&format!("claims/{name}"));
        match (m, base) {
            (Some(m), Some(b)) => println!("| {name} | {:.1} µs | {:.2} |", m / 1_000.0, m / b),
            _ => println!("| {name} | (no estimate) | |"),
        }
    }
}
