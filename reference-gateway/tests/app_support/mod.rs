//! Helpers for tests that run the reference client (`confab_client::app`) against an
//! in-process gateway over real WebSockets on loopback.

#![allow(dead_code)] // each test file uses a part

use std::time::Duration;

use confab_client::app::Client;
use confab_client::mls::{EngineKind, open_engine, system_clock};
use confab_client::store::ClientStore;
use confab_client::transport::{Transport, system_now};
use confab_gateway::handler::GatewayConfig;
use confab_gateway::server;
use confab_gateway::store::sqlite::SqliteStore;
use confab_spec::identity::{DeviceKeyPair, SystemKeyPair};
use confab_spec::ids::{ProcessId, UnixMs};
use confab_spec::session::{ClientSession, DeviceCredentials, SessionConfig};

/// A gateway serving on a loopback port until [`Gateway::stop`].
pub struct Gateway {
    /// `ws://127.0.0.1:PORT`.
    pub origin: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Gateway {
    /// Starts a gateway on a fresh SQLite file in `dir`; `configure` adjusts its config.
    pub async fn start(dir: &std::path::Path, configure: impl FnOnce(&mut GatewayConfig)) -> Self {
        let store = SqliteStore::open(&dir.join("gw.db")).expect("store");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let origin = format!("ws://{}", listener.local_addr().expect("addr"));
        let mut config = GatewayConfig::new(origin.clone());
        configure(&mut config);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(
            listener,
            config,
            store,
            server::Environment::default(),
            async {
                let _ = stopped.await;
            },
        ));
        Self { origin, stop, task }
    }

    /// Stops the gateway and waits (at most 10 s) for it to finish.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// The user whose system key has seed `[user; 32]`.
pub fn user(user: u8) -> SystemKeyPair {
    SystemKeyPair::from_seed(&[user; 32])
}

/// A client for device `process` of user `user` (system seed `[user; 32]`), with its
/// files in `dir` and the given engine. Reopening with the same arguments reopens the
/// same device.
pub fn device(
    dir: &std::path::Path,
    origin: &str,
    user: u8,
    process: u8,
    kind: EngineKind,
) -> Client {
    device_with(dir, origin, user, process, kind, |_| {})
}

/// [`device`], with `configure` applied to its transport (for example, to trust a CA).
pub fn device_with(
    dir: &std::path::Path,
    origin: &str,
    user: u8,
    process: u8,
    kind: EngineKind,
    configure: impl FnOnce(&mut Transport),
) -> Client {
    let system = self::user(user);
    let key = device_key(process);
    let now = system_now();
    let certificate = system.issue_certificate(
        ProcessId([process; 16]),
        key.public(),
        UnixMs(now.0 - 60_000),
        now.plus_ms(3_600_000),
    );
    let credentials = DeviceCredentials { key, certificate };
    let engine = open_engine(
        kind,
        &dir.join(format!("mls-{process}.db")),
        credentials.clone(),
        system_clock(),
    )
    .expect("engine");
    let store = ClientStore::open(&dir.join(format!("confab-{process}.db"))).expect("store");
    let session = ClientSession::new(SessionConfig::new(origin), credentials, u64::from(process));
    let mut transport = Transport::new(session, format!("{origin}/v1/ws"));
    configure(&mut transport);
    Client::new(transport, engine, store)
}

/// The device key of device `process` ([`device`]).
pub fn device_key(process: u8) -> DeviceKeyPair {
    DeviceKeyPair::from_seed(&[process.wrapping_add(1); 32])
}

/// Pumps `c` until `done(c)` holds; panics after 20 s, naming `what`.
pub async fn pump_until(c: &mut Client, what: &str, mut done: impl FnMut(&Client) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done(c) {
        tokio::time::timeout_at(deadline, c.pump())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
}

/// Pumps `c` until it has received `n` messages in all; their bodies.
pub async fn receive(c: &mut Client, seen: &mut Vec<Vec<u8>>, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.len() < n {
        seen.extend(c.take_received().into_iter().map(|m| m.body));
        if seen.len() >= n {
            break;
        }
        tokio::time::timeout_at(deadline, c.pump())
            .await
            .expect("timely")
            .expect("pump");
    }
}
