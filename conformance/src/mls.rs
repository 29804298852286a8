//! Real MLS inputs for the cases that need them (KeyPackages, Commits, Welcomes): a
//! [`Member`] is a suite device with an MLS engine of the reference client. Cases that
//! build groups mix the two engines (openmls and mls-rs), so a server is exercised with
//! the output of both.

use confab_client::mls::{EngineKind, MlsEngine, open_engine, system_clock};
use confab_spec::frame::{ClientFrame, ConversationKind, CreateConversation};
use confab_spec::identity::DeviceKeyPair;
use confab_spec::ids::{ConversationId, MlsBytes, UnixMs};
use confab_spec::rooms::RoomRoles;
use confab_spec::session::DeviceCredentials;

use crate::case::Stop;
use crate::context::Device;

/// A suite device with MLS state in a temporary directory.
pub struct Member {
    /// The device.
    pub device: Device,
    /// Its MLS engine.
    pub engine: Box<dyn MlsEngine>,
    _dir: tempfile::TempDir,
}

/// The suite's own failure (not the server's): the case cannot run.
pub fn broken(what: &str, e: impl std::fmt::Display) -> Stop {
    Stop::Skipped(format!("the suite could not {what}: {e}"))
}

impl Member {
    /// A member for `device` on engine `kind`, its credential valid from an hour before
    /// `now` for a day (SPEC.md 7.1: the credential is the device certificate).
    pub fn new(device: Device, kind: EngineKind, now: UnixMs) -> Result<Self, Stop> {
        let certificate = device.certificate_between(
            UnixMs(now.0.saturating_sub(3_600_000)),
            now.plus_ms(86_400_000),
        );
        let key = DeviceKeyPair::from_seed(&device.key.seed());
        Self::with_credentials(device, kind, DeviceCredentials { key, certificate })
    }

    /// A member for `device` on engine `kind` signing with `credentials` as they are (a
    /// case may give it an expired certificate, or one naming another key).
    pub fn with_credentials(
        device: Device,
        kind: EngineKind,
        credentials: DeviceCredentials,
    ) -> Result<Self, Stop> {
        let dir = tempfile::tempdir().map_err(|e| broken("make a directory", e))?;
        let engine = open_engine(
            kind,
            &dir.path().join("mls.db"),
            credentials,
            system_clock(),
        )
        .map_err(|e| broken("open an MLS engine", e))?;
        Ok(Self {
            device,
            engine,
            _dir: dir,
        })
    }

    /// `count` KeyPackages (last-resort ones with `last_resort`).
    pub fn key_packages(&mut self, count: usize, last_resort: bool) -> Result<Vec<MlsBytes>, Stop> {
        self.engine
            .key_packages(count, last_resort)
            .map_err(|e| broken("make KeyPackages", e))?
            .into_iter()
            .map(|kp| MlsBytes::new(kp).map_err(|e| broken("wrap a KeyPackage", e)))
            .collect()
    }
}

impl Member {
    /// Creates the MLS group of a new conversation with these group context extensions and
    /// returns the `CreateConversation` that hands its GroupInfo to the server (SPEC.md
    /// 6.1).
    pub fn create_frame(
        &mut self,
        rid: u64,
        conversation: ConversationId,
        kind: ConversationKind,
        extensions: &[(u16, Vec<u8>)],
    ) -> Result<ClientFrame, Stop> {
        let group_info = self
            .engine
            .create_group_with(&conversation, extensions)
            .map_err(|e| broken("create a group", e))?;
        Ok(ClientFrame::CreateConversation(CreateConversation {
            rid,
            conversation,
            kind,
            group_info: bytes(group_info)?,
        }))
    }
}

/// A `CreateConversation` from `device` (authenticated at server time `now`) for a group
/// the suite never commits in: made by a member that is dropped at once. A room gets the
/// roles naming `device`'s user as owner (SPEC.md 10.1).
pub fn create_frame(
    device: &Device,
    now: UnixMs,
    rid: u64,
    conversation: ConversationId,
    kind: ConversationKind,
) -> Result<ClientFrame, Stop> {
    let mut member = Member::new(device.clone(), EngineKind::MlsRs, now)?;
    let extensions = match kind {
        ConversationKind::Room => RoomRoles::new(device.id().system).context_extensions(),
        _ => Vec::new(),
    };
    member.create_frame(rid, conversation, kind, &extensions)
}

/// Bytes from the engine as a payload.
pub fn bytes(v: Vec<u8>) -> Result<MlsBytes, Stop> {
    MlsBytes::new(v).map_err(|e| broken("wrap an MLS message", e))
}

/// The two engines, for the two members of a case: mixed.
pub const PAIR: [EngineKind; 2] = [EngineKind::OpenMls, EngineKind::MlsRs];

/// The GroupInfo `sent` (a Commit built from `real`'s content, with other bytes where only
/// members could tell) leads to: `real`'s GroupInfo with `sent`'s confirmation tag, signed
/// again by `key` (SPEC.md 7.10). What a member that sends a Commit by hand publishes.
pub fn group_info_for(
    real: &confab_client::mls::CommitOutput,
    sent: &[u8],
    key: &DeviceKeyPair,
) -> Result<MlsBytes, Stop> {
    let info = real
        .group_info
        .as_deref()
        .ok_or_else(|| broken("publish a GroupInfo", "the engine made none"))?;
    let mut parts = confab_spec::mls_framing::group_info_parts(info)
        .map_err(|e| broken("read a GroupInfo", e))?;
    let tag = confab_spec::mls_framing::public_message_parts(sent)
        .map_err(|e| broken("read a Commit", e))?
        .confirmation_tag
        .ok_or_else(|| broken("read a Commit", "no confirmation tag"))?;
    parts.confirmation_tag = tag;
    bytes(confab_spec::mls_write::group_info(&parts, key))
}

/// `real` (a Commit of the member whose device key is `key`) with its confirmation tag
/// broken, and the GroupInfo it leads to: a Commit the gateway must sequence (it cannot
/// check tags) and no member can apply.
pub fn with_broken_tag(
    real: &confab_client::mls::CommitOutput,
    key: &DeviceKeyPair,
) -> Result<(MlsBytes, MlsBytes), Stop> {
    let mut parts = confab_spec::mls_framing::public_message_parts(&real.commit)
        .map_err(|e| broken("read a Commit", e))?;
    if let Some(byte) = parts.confirmation_tag.as_mut().and_then(|t| t.first_mut()) {
        *byte ^= 0x01;
    }
    let commit = parts.to_message();
    let group_info = group_info_for(real, &commit, key)?;
    Ok((bytes(commit)?, group_info))
}
