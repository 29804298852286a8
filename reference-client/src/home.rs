//! A device's state directory (`confab --home DIR`): `settings.toml` (gateway URL, MLS
//! engine), `confab.db` (identity, contacts, conversations, cursors, outbox, messages) and
//! `mls.db` (the MLS engine's state).

use std::path::{Path, PathBuf};
use std::time::Duration;

use confab_spec::identity::{DeviceCertificate, DeviceKeyPair, SystemKeyPair};
use confab_spec::ids::{ProcessId, UnixMs};
use confab_spec::session::{ClientSession, DeviceCredentials, SessionConfig};
use rand_core::RngCore as _;

use crate::app::Client;
use crate::faults::Faults;
use crate::identity::{ImportError, import_backup};
use crate::mls::{EngineError, EngineKind, open_engine, system_clock};
use crate::store::{ClientStore, StoreError, StoredIdentity};
use crate::transport::{Transport, system_now};

/// How long a device certificate issued by `init` is valid (SPEC.md 3.2 recommends 90 days
/// or less).
pub const CERTIFICATE_LIFETIME_MS: u64 = 90 * 86_400_000;

/// The files of a home directory.
pub const HOME_FILES: &[&str] = &[
    "settings.toml",
    "confab.db",
    "confab.db-wal",
    "confab.db-shm",
    "mls.db",
    "mls.db-wal",
    "mls.db-shm",
];

/// The databases among [`HOME_FILES`], created empty at mode 0600 before SQLite opens them.
const DATABASES: &[&str] = &["confab.db", "mls.db"];

/// What `settings.toml` holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Settings {
    /// The gateway's WebSocket URL, e.g. `ws://127.0.0.1:8080/v1/ws`.
    pub server: String,
    /// `openmls` or `mls-rs`.
    pub engine: String,
    /// PEM certificates to trust for a `wss://` gateway besides the public roots (a
    /// private CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The presence this device keeps while a long-running command (`watch`,
    /// `watch-presence`) runs: `online` or `invisible`; absent is offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<String>,
}

/// Why the state directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    /// `init` has not been run for this directory.
    #[error("no identity in {0}: run `confab init` first")]
    NotInitialised(PathBuf),
    /// `init` was run already.
    #[error("{0} already holds an identity; use another --home to create a second one")]
    AlreadyInitialised(PathBuf),
    /// The backup string was refused.
    #[error("cannot import the identity: {0}")]
    Import(#[from] ImportError),
    /// An unknown engine name.
    #[error("unknown MLS engine {0:?}: use openmls or mls-rs")]
    Engine(String),
    /// The directory or a file in it cannot be used.
    #[error("{path}: {error}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What failed.
        error: String,
    },
    /// The local database failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The MLS state failed to open.
    #[error("MLS state: {0}")]
    Mls(#[from] EngineError),
    /// The stored certificate does not decode.
    #[error("the stored device certificate is unreadable")]
    Certificate,
    /// The operation needs the user's system key, which this device does not hold.
    #[error(
        "this device does not hold the user's secret key; do this on the device where you created or imported the identity"
    )]
    NoSystemKey,
    /// `init --link` was run, and the certificate has not been installed yet.
    #[error(
        "{0} waits for its certificate: run `confab device link REQUEST` on a device that holds your identity (`confab link` shows the request), then `confab link CERT` here"
    )]
    AwaitingLink(PathBuf),
    /// A link string was refused.
    #[error("{0}")]
    Link(#[from] crate::link::LinkError),
}

/// A state directory.
pub struct Home {
    dir: PathBuf,
    faults: Faults,
}

impl Home {
    /// The directory `dir` (not touched until used).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            faults: Faults::default(),
        }
    }

    /// The same directory, with deliberately broken behaviours switched on (for the
    /// conformance suite's self-test).
    pub fn with_faults(self, faults: Faults) -> Self {
        Self { faults, ..self }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io(&self, path: &Path, e: impl std::fmt::Display) -> HomeError {
        HomeError::Io {
            path: path.to_path_buf(),
            error: e.to_string(),
        }
    }

    /// The local store (created if missing).
    pub fn local_store(&self) -> Result<ClientStore, HomeError> {
        self.make_private()?;
        Ok(ClientStore::open(&self.dir.join("confab.db"))?)
    }

    /// Makes the directory readable by its owner only: created (or tightened) to mode
    /// 0700, its databases created empty at 0600 before SQLite opens them (SQLite gives its
    /// `-wal` and `-shm` files the database's mode), and any file of it that a looser
    /// umask or an older version left readable by others tightened to 0600. The files hold
    /// the device key, the system key where there is one, and the message history.
    fn make_private(&self) -> Result<(), HomeError> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
            let private = |path: &Path, mode: u32| {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| self.io(path, e))
            };
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .map_err(|e| self.io(&self.dir, e))?;
            private(&self.dir, 0o700)?;
            for name in HOME_FILES {
                let path = self.dir.join(name);
                if DATABASES.contains(name) {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .mode(0o600)
                        .open(&path)
                        .map_err(|e| self.io(&path, e))?;
                }
                match std::fs::metadata(&path) {
                    Ok(m) if m.permissions().mode() & 0o077 != 0 => private(&path, 0o600)?,
                    _ => {}
                }
            }
        }
        #[cfg(not(unix))]
        std::fs::create_dir_all(&self.dir).map_err(|e| self.io(&self.dir, e))?;
        Ok(())
    }

    /// Writes `settings.toml`, readable by its owner only.
    fn write_settings(&self, settings: &Settings) -> Result<(), HomeError> {
        let path = self.dir.join("settings.toml");
        let text = toml::to_string(settings).map_err(|e| self.io(&path, e))?;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&path).map_err(|e| self.io(&path, e))?;
        std::io::Write::write_all(&mut file, text.as_bytes()).map_err(|e| self.io(&path, e))
    }

    /// Creates the identity: a new system key, or the one in a Polycentric `backup`, and a
    /// key, process id and certificate for this device.
    pub fn init(
        &self,
        backup: Option<&str>,
        settings: &Settings,
    ) -> Result<StoredIdentity, HomeError> {
        EngineKind::parse(&settings.engine)
            .ok_or_else(|| HomeError::Engine(settings.engine.clone()))?;
        let mut store = self.local_store()?;
        if store.identity()?.is_some() {
            return Err(HomeError::AlreadyInitialised(self.dir.clone()));
        }
        let system = match backup {
            Some(b) => import_backup(b)?,
            None => SystemKeyPair::generate(&mut rand_core::OsRng),
        };
        let device = if self.faults.device_key_is_system_key {
            DeviceKeyPair::from_seed(&system.seed())
        } else {
            DeviceKeyPair::generate(&mut rand_core::OsRng)
        };
        let mut process = [0u8; 16];
        rand_core::OsRng.fill_bytes(&mut process);
        let now = system_now();
        let certificate = system.issue_certificate(
            ProcessId(process),
            device.public(),
            UnixMs(now.0.saturating_sub(60_000)),
            now.plus_ms(CERTIFICATE_LIFETIME_MS),
        );
        let identity = StoredIdentity {
            system_seed: Some(system.seed()),
            system: system.public(),
            device_seed: device.seed(),
            certificate: confab_spec::cbor::to_vec(&certificate),
        };
        self.write_settings(settings)?;
        store.set_identity(&identity)?;
        Ok(identity)
    }

    /// Starts a device that will get its certificate from another of the user's devices
    /// (device linking, [`crate::link`]): makes its key and process id and returns the
    /// request to show. Run again before the certificate is installed, it returns the same
    /// request.
    pub fn init_link(&self, settings: &Settings) -> Result<crate::link::LinkRequest, HomeError> {
        EngineKind::parse(&settings.engine)
            .ok_or_else(|| HomeError::Engine(settings.engine.clone()))?;
        let mut store = self.local_store()?;
        if store.identity()?.is_some() {
            return Err(HomeError::AlreadyInitialised(self.dir.clone()));
        }
        if store.pending_device()?.is_none() {
            let device = DeviceKeyPair::generate(&mut rand_core::OsRng);
            let mut process = [0u8; 16];
            rand_core::OsRng.fill_bytes(&mut process);
            store.set_pending_device(&device.seed(), &ProcessId(process))?;
            self.write_settings(settings)?;
        }
        self.link_request()
    }

    /// The link request of this device: the pending one, or, for a device that has its
    /// identity, one for a new certificate of the same key (a renewal).
    pub fn link_request(&self) -> Result<crate::link::LinkRequest, HomeError> {
        let store = self.local_store()?;
        let (seed, process) = match store.identity()? {
            Some(identity) => (identity.device_seed, self.identity()?.1.certificate.process),
            None => store
                .pending_device()?
                .ok_or_else(|| HomeError::NotInitialised(self.dir.clone()))?,
        };
        Ok(crate::link::LinkRequest {
            process,
            device_key: DeviceKeyPair::from_seed(&seed).public(),
        })
    }

    /// Installs the certificate another device issued for this one's link request (or a
    /// renewal for the same key and user). The system key is never stored here.
    pub fn finish_link(&self, text: &str) -> Result<StoredIdentity, HomeError> {
        let request = self.link_request()?;
        let certificate = crate::link::accept_certificate(text, &request, system_now())?;
        let mut store = self.local_store()?;
        let (system_seed, device_seed) = match store.identity()? {
            Some(current) if current.system != certificate.system => {
                return Err(crate::link::LinkError::OtherUser.into());
            }
            Some(current) => (current.system_seed, current.device_seed),
            None => match store.pending_device()? {
                Some((seed, _)) => (None, seed),
                None => return Err(HomeError::NotInitialised(self.dir.clone())),
            },
        };
        let identity = StoredIdentity {
            system_seed,
            system: certificate.system,
            device_seed,
            certificate: confab_spec::cbor::to_vec(&certificate),
        };
        store.complete_link(&identity)?;
        Ok(identity)
    }

    /// Issues a certificate for another device's link request: only a device that holds
    /// the system key can. Returns the certificate string to give the new device.
    pub fn issue_link(&self, request: &crate::link::LinkRequest) -> Result<String, HomeError> {
        let (identity, _) = self.identity()?;
        let seed = identity.system_seed.ok_or(HomeError::NoSystemKey)?;
        let now = system_now();
        let certificate = SystemKeyPair::from_seed(&seed).issue_certificate(
            request.process,
            request.device_key,
            UnixMs(now.0.saturating_sub(60_000)),
            now.plus_ms(CERTIFICATE_LIFETIME_MS),
        );
        Ok(crate::link::encode_certificate(&certificate))
    }

    /// Replaces the stored settings.
    pub fn save_settings(&self, settings: &Settings) -> Result<(), HomeError> {
        self.make_private()?;
        self.write_settings(settings)
    }

    /// The stored settings.
    pub fn settings(&self) -> Result<Settings, HomeError> {
        let path = self.dir.join("settings.toml");
        let text = std::fs::read_to_string(&path)
            .map_err(|_| HomeError::NotInitialised(self.dir.clone()))?;
        toml::from_str(&text).map_err(|e| self.io(&path, e))
    }

    /// The identity and this device's credentials.
    pub fn identity(&self) -> Result<(StoredIdentity, DeviceCredentials), HomeError> {
        let store = self.local_store()?;
        let identity = match store.identity()? {
            Some(identity) => identity,
            None if store.pending_device()?.is_some() => {
                return Err(HomeError::AwaitingLink(self.dir.clone()));
            }
            None => return Err(HomeError::NotInitialised(self.dir.clone())),
        };
        let certificate: DeviceCertificate = confab_spec::cbor::from_slice(
            &identity.certificate,
            &confab_spec::DecodeLimits::default(),
        )
        .map_err(|_| HomeError::Certificate)?;
        let credentials = DeviceCredentials {
            key: DeviceKeyPair::from_seed(&identity.device_seed),
            certificate,
        };
        Ok((identity, credentials))
    }

    /// A client for this device, talking to `server` (or the stored one).
    pub fn client(&self, server: Option<&str>) -> Result<Client, HomeError> {
        let settings = self.settings()?;
        let (_, credentials) = self.identity()?;
        let kind = EngineKind::parse(&settings.engine)
            .ok_or_else(|| HomeError::Engine(settings.engine.clone()))?;
        let engine = open_engine(
            kind,
            &self.dir.join("mls.db"),
            credentials.clone(),
            system_clock(),
        )?;
        let url = server.unwrap_or(&settings.server).to_owned();
        let mut config = SessionConfig::new(origin_of(&url));
        config.connect_timeout_ms = Duration::from_secs(5).as_millis() as u64;
        config.faults = self.faults.session;
        let mut seed = [0u8; 8];
        rand_core::OsRng.fill_bytes(&mut seed);
        let session = ClientSession::new(config, credentials, u64::from_le_bytes(seed));
        let mut transport = Transport::new(session, url);
        if let Some(path) = &settings.ca_file {
            let pem = std::fs::read(path).map_err(|e| self.io(path, e))?;
            transport.trust_pem(&pem).map_err(|e| self.io(path, e))?;
        }
        Ok(Client::new(transport, engine, self.local_store()?).with_faults(self.faults))
    }
}

/// The origin a client signs for a gateway URL: scheme, host and port, without the path
/// (`ws://127.0.0.1:8080/v1/ws` → `ws://127.0.0.1:8080`).
pub fn origin_of(url: &str) -> String {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => url[..after_scheme + i].to_owned(),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    /// Every file of a home, and the directory, are its owner's only: at `init`, after the
    /// MLS state and the WAL files exist, and after an older version left them open to
    /// everyone.
    #[cfg(unix)]
    #[test]
    fn a_home_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let parent = tempfile::tempdir().expect("tempdir");
        let dir = parent.path().join("home");
        let home = Home::new(&dir);
        let settings = Settings {
            server: "ws://127.0.0.1:1/v1/ws".into(),
            engine: "mls-rs".into(),
            ca_file: None,
            presence: None,
        };
        home.init(None, &settings).expect("init");
        let _client = home.client(None).expect("client");
        let check = |when: &str| {
            assert_eq!(mode(&dir), 0o700, "{when}: the directory");
            let mut files = 0;
            for entry in std::fs::read_dir(&dir).expect("read_dir") {
                let path = entry.expect("entry").path();
                assert_eq!(mode(&path), 0o600, "{when}: {}", path.display());
                files += 1;
            }
            assert!(
                files >= 4,
                "{when}: settings, both databases and a WAL: {files}"
            );
        };
        check("after init");
        // An older version's home: everything readable by everyone.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for name in HOME_FILES {
            let path = dir.join(name);
            if path.exists() {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
                    .expect("chmod");
            }
        }
        drop(_client);
        let _client = home.client(None).expect("client again");
        check("after the next use");
    }

    #[test]
    fn origins_drop_the_path() {
        assert_eq!(
            origin_of("ws://127.0.0.1:8080/v1/ws"),
            "ws://127.0.0.1:8080"
        );
        assert_eq!(
            origin_of("wss://chat.example.org/v1/ws"),
            "wss://chat.example.org"
        );
        assert_eq!(origin_of("ws://host:1"), "ws://host:1");
    }
}
