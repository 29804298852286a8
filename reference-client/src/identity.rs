//! Identities (SPEC.md section 3): importing a Polycentric identity from its backup string
//! (section 3.5) and the messages that string is made of.
//!
//! ```text
//! polycentric://<base64url, padded or not>
//!   URLInfo      { uint64 url_type = 1; bytes body = 2; }      url_type 3: ExportBundle
//!   ExportBundle { KeyPair key_pair = 1; Events events = 2; }
//!   KeyPair      { uint64 key_type = 1; bytes private_key = 2; bytes public_key = 3; }
//! ```
//!
//! Polycentric's code uses `key_type` 1 for ed25519. Confab takes `private_key` as the
//! system key's seed and checks that it derives `public_key` (REQ-3.5-1). The events of
//! the bundle are not read.

use base64::Engine as _;
use confab_spec::identity::SystemKeyPair;

/// The backup string's scheme.
pub const BACKUP_PREFIX: &str = "polycentric://";

/// `URLInfo.url_type` of an exported identity.
pub const URL_TYPE_EXPORT_BUNDLE: u64 = 3;

/// `KeyPair.key_type` of ed25519 in Polycentric's code.
pub const KEY_TYPE_ED25519: u64 = 1;

/// Polycentric's `URLInfo`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UrlInfo {
    /// What `body` holds.
    #[prost(uint64, tag = "1")]
    pub url_type: u64,
    /// The encoded message.
    #[prost(bytes = "vec", tag = "2")]
    pub body: Vec<u8>,
}

/// Polycentric's `ExportBundle`; its events (field 2) are skipped.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportBundle {
    /// The system's key pair.
    #[prost(message, optional, tag = "1")]
    pub key_pair: Option<KeyPair>,
}

/// Polycentric's `KeyPair`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyPair {
    /// The algorithm (1: ed25519).
    #[prost(uint64, tag = "1")]
    pub key_type: u64,
    /// The private key (for ed25519, the 32-byte seed).
    #[prost(bytes = "vec", tag = "2")]
    pub private_key: Vec<u8>,
    /// The public key.
    #[prost(bytes = "vec", tag = "3")]
    pub public_key: Vec<u8>,
}

/// Why a backup string was refused. Each says what to check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    /// The string does not start with `polycentric://`.
    #[error("not a Polycentric backup string: it must start with \"polycentric://\"")]
    NotABackup,
    /// The part after the scheme is not base64url.
    #[error("the backup string is damaged: the part after \"polycentric://\" is not base64url")]
    Base64,
    /// The decoded bytes are not the protobuf messages of a backup.
    #[error("the backup string is damaged: {0} does not decode")]
    Protobuf(&'static str),
    /// A Polycentric link of another kind (a post, a profile, ...).
    #[error("this Polycentric link is not an identity backup (url_type {0}, expected 3)")]
    NotAnIdentity(u64),
    /// No key pair in the bundle.
    #[error("the backup holds no key pair")]
    NoKeyPair,
    /// A key type Confab does not support.
    #[error("unsupported key type {0} (Confab supports ed25519, key_type 1)")]
    KeyType(u64),
    /// The private key is not a 32-byte seed.
    #[error("the private key has {0} bytes; an ed25519 seed has 32")]
    SeedLength(usize),
    /// The seed does not derive the stated public key (REQ-3.5-1).
    #[error("the private key does not match the public key in the backup")]
    KeyMismatch,
}

/// Reads a Polycentric backup string into the system key it holds (SPEC.md 3.5).
pub fn import_backup(backup: &str) -> Result<SystemKeyPair, ImportError> {
    use prost::Message as _;
    let encoded = backup
        .trim()
        .strip_prefix(BACKUP_PREFIX)
        .ok_or(ImportError::NotABackup)?;
    let config = base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent);
    let bytes = base64::engine::GeneralPurpose::new(&base64::alphabet::URL_SAFE, config)
        .decode(encoded)
        .map_err(|_| ImportError::Base64)?;
    let info = UrlInfo::decode(bytes.as_slice()).map_err(|_| ImportError::Protobuf("URLInfo"))?;
    if info.url_type != URL_TYPE_EXPORT_BUNDLE {
        return Err(ImportError::NotAnIdentity(info.url_type));
    }
    let bundle = ExportBundle::decode(info.body.as_slice())
        .map_err(|_| ImportError::Protobuf("ExportBundle"))?;
    let pair = bundle.key_pair.ok_or(ImportError::NoKeyPair)?;
    if pair.key_type != KEY_TYPE_ED25519 {
        return Err(ImportError::KeyType(pair.key_type));
    }
    let seed: [u8; 32] = pair
        .private_key
        .as_slice()
        .try_into()
        .map_err(|_| ImportError::SeedLength(pair.private_key.len()))?;
    let system = SystemKeyPair::from_seed(&seed);
    if system.public().0.as_slice() != pair.public_key.as_slice() {
        return Err(ImportError::KeyMismatch);
    }
    Ok(system)
}

/// Writes `system` as a backup string (url_type 3, no events), as Polycentric's apps do;
/// for tests and for moving an identity between Confab installations.
pub fn export_backup(system: &SystemKeyPair) -> String {
    use prost::Message as _;
    let bundle = ExportBundle {
        key_pair: Some(KeyPair {
            key_type: KEY_TYPE_ED25519,
            private_key: system.seed().to_vec(),
            public_key: system.public().0.to_vec(),
        }),
    };
    let info = UrlInfo {
        url_type: URL_TYPE_EXPORT_BUNDLE,
        body: bundle.encode_to_vec(),
    };
    format!(
        "{BACKUP_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(info.encode_to_vec())
    )
}
