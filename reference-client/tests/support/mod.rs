//! Test helpers: devices with certificates, engines in temporary directories, and group
//! agreement checks.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use confab_client::mls::signature_memo::SignatureMemo;
use confab_client::mls::{Clock, EngineKind, MlsEngine, open_engine, open_engine_with};
use confab_spec::identity::{DeviceKeyPair, SystemKeyPair};
use confab_spec::ids::{ConversationId, DeviceId, ProcessId, UnixMs};
use confab_spec::session::DeviceCredentials;

const DAY_MS: u64 = 24 * 3600 * 1000;

/// The wall clock: openmls reads it for KeyPackage lifetimes whatever the engine is told,
/// so certificates in tests are issued around the real time.
pub fn clock() -> Clock {
    confab_client::mls::system_clock()
}

pub fn now() -> UnixMs {
    clock()()
}

/// One device: its credentials, engine kind, state path and open engine.
pub struct Device {
    pub credentials: DeviceCredentials,
    pub kind: EngineKind,
    pub path: PathBuf,
    pub engine: Option<Box<dyn MlsEngine>>,
}

impl Device {
    pub fn new(dir: &tempfile::TempDir, seed: u8, kind: EngineKind) -> Self {
        let system = SystemKeyPair::from_seed(&[seed; 32]);
        let key = DeviceKeyPair::from_seed(&[seed.wrapping_add(100); 32]);
        let certificate = system.issue_certificate(
            ProcessId([seed; 16]),
            key.public(),
            UnixMs(now().0 - DAY_MS),
            UnixMs(now().0 + 30 * DAY_MS),
        );
        Self::with_credentials(dir, seed, kind, DeviceCredentials { key, certificate })
    }

    pub fn with_credentials(
        dir: &tempfile::TempDir,
        seed: u8,
        kind: EngineKind,
        credentials: DeviceCredentials,
    ) -> Self {
        let path = dir.path().join(format!("device-{seed}-{}.db", kind.name()));
        let engine = open_engine(kind, &path, credentials.clone(), clock()).expect("open engine");
        Self {
            credentials,
            kind,
            path,
            engine: Some(engine),
        }
    }

    pub fn id(&self) -> DeviceId {
        self.credentials.certificate.device_id()
    }

    pub fn engine(&mut self) -> &mut dyn MlsEngine {
        self.engine.as_deref_mut().expect("engine open")
    }

    pub fn get(&self) -> &dyn MlsEngine {
        self.engine.as_deref().expect("engine open")
    }

    /// Drops the engine and opens it again from its SQLite state.
    pub fn reload(&mut self) {
        self.reload_with(None);
    }

    /// [`Device::reload`], checking signatures through `signatures`.
    pub fn reload_with(&mut self, signatures: Option<Arc<SignatureMemo>>) {
        self.engine = None;
        self.engine = Some(
            open_engine_with(
                self.kind,
                &self.path,
                self.credentials.clone(),
                clock(),
                signatures,
            )
            .expect("reopen engine"),
        );
    }
}

pub const GROUP: ConversationId = ConversationId([0x42; 32]);

/// `a` (seed 1) creates GROUP and adds `b` (seed 2), which joins: a two-member group.
pub fn two_member_group(
    dir: &tempfile::TempDir,
    ka: EngineKind,
    kb: EngineKind,
) -> (Device, Device) {
    let mut a = Device::new(dir, 1, ka);
    let mut b = Device::new(dir, 2, kb);
    a.engine().create_group(&GROUP).expect("create");
    let kp = b.engine().key_packages(1, false).expect("kp");
    let out = a.engine().add_members(&GROUP, &kp).expect("add");
    a.engine().merge_pending_commit(&GROUP).expect("merge");
    b.engine()
        .join(out.welcome.as_deref().expect("welcome"))
        .expect("join");
    (a, b)
}

/// Every engine pairing, openmls and mls-rs in both directions.
pub fn pairings() -> Vec<(EngineKind, EngineKind)> {
    let mut out = Vec::new();
    for a in EngineKind::ALL {
        for b in EngineKind::ALL {
            out.push((a, b));
        }
    }
    out
}

/// Asserts that every device agrees on epoch, authenticator, exporter and roster.
pub fn assert_agree(devices: &[&Device], group: &ConversationId) {
    let first = devices[0].get();
    let epoch = first.epoch(group).expect("epoch");
    let auth = first.epoch_authenticator(group).expect("authenticator");
    let export = first
        .export_secret(group, "confab test", b"ctx", 32)
        .expect("export");
    let members = first.members(group).expect("members");
    for d in &devices[1..] {
        let e = d.get();
        assert_eq!(e.epoch(group).expect("epoch"), epoch, "{} epoch", d.kind);
        assert_eq!(
            e.epoch_authenticator(group).expect("auth"),
            auth,
            "{} authenticator at epoch {epoch}",
            d.kind
        );
        assert_eq!(
            e.export_secret(group, "confab test", b"ctx", 32)
                .expect("export"),
            export,
            "{} exporter",
            d.kind
        );
        assert_eq!(
            e.members(group).expect("members"),
            members,
            "{} roster",
            d.kind
        );
    }
}
