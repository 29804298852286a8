//! What the gateway's benchmarks share: a scratch directory in RAM and criterion's
//! medians, read back to print ratios against the baseline measured in the same run.

#![allow(dead_code)] // each bench uses a part

use std::path::PathBuf;

/// A temporary directory in /dev/shm when there is one (the figures then measure the
/// gateway and SQLite, not the disk).
pub fn scratch() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("tempdir")
}

/// The median of benchmark `id` ("group/function") in ns, from criterion's output of
/// this run.
pub fn median(id: &str) -> Option<f64> {
    let root = PathBuf::from(
        std::env::var("CARGO_TARGET_DIR")
            .unwrap_or_else(|_| format!("{}/../target", env!("CARGO_MANIFEST_DIR"))),
    )
    .join("criterion");
    let text = std::fs::read_to_string(root.join(id).join("new/estimates.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["median"]["point_estimate"].as_f64()
}

use confab_gateway::handler::{Action, Connection, Entropy, GatewayConfig};
use confab_gateway::rate::RateLimiters;
use confab_gateway::store::sqlite::SqliteStore;
use confab_spec::frame::{ClientFrame, Hello, ServerFrame, Versions};
use confab_spec::identity::{DeviceKeyPair, SystemKeyPair};
use confab_spec::ids::{ProcessId, UnixMs};

/// Deterministic entropy for nonces and tokens (benchmarks need no secrecy).
pub struct Counter(pub u64);

impl Entropy for Counter {
    fn fill(&mut self, out: &mut [u8]) {
        for b in out.iter_mut() {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1);
            *b = (self.0 >> 33) as u8;
        }
    }
}

/// The wall clock.
pub fn now() -> UnixMs {
    UnixMs(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64,
    )
}

/// An authenticated connection of the bench device (always the same device), signed for
/// `origin`; `entropy` must differ between connections (a repeated nonce is refused).
pub fn ready(
    config: &GatewayConfig,
    store: &mut SqliteStore,
    limiters: &RateLimiters,
    entropy: &mut Counter,
    origin: &str,
) -> Connection {
    let system = SystemKeyPair::from_seed(&[1; 32]);
    let key = DeviceKeyPair::from_seed(&[2; 32]);
    let t = now();
    let certificate = system.issue_certificate(
        ProcessId([3; 16]),
        key.public(),
        UnixMs(t.0 - 60_000),
        t.plus_ms(3_600_000),
    );
    let mut conn = Connection::new();
    let hello = ClientFrame::Hello(Hello {
        versions: Versions::current(),
        resume_token: None,
    });
    let out = conn.handle(config, store, limiters, entropy, t, &hello.encode());
    let Some(Action::Send(ServerFrame::Challenge(ch))) = out.first() else {
        panic!("challenge expected")
    };
    let auth = confab_spec::identity::sign_auth(&key, certificate, 1, origin, ch.nonce, t);
    let out = conn.handle(
        config,
        store,
        limiters,
        entropy,
        t,
        &ClientFrame::Auth(auth).encode(),
    );
    assert!(matches!(
        out.first(),
        Some(Action::Send(ServerFrame::Ready(_)))
    ));
    conn
}

/// A room's new group of `creator` as the store keeps it, its state a stand-in: the
/// benchmarks send application messages, which the gateway never verifies against it.
pub fn new_room(
    creator: &confab_spec::ids::DeviceId,
) -> confab_gateway::tracked_group::TrackedGroup {
    confab_gateway::tracked_group::TrackedGroup {
        epoch: confab_spec::ids::Epoch(0),
        snapshot: Vec::new(),
        members: vec![(0, *creator)],
        extensions: confab_spec::rooms::RoomRoles::new(creator.system).context_extensions(),
        group_info: None,
    }
}
