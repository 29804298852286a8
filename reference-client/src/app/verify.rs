//! Safety numbers on the client's side (SPEC.md 3.6): the number to compare with a contact,
//! marking the contact verified, and the contact's devices this device sees now against
//! those it saw then. Every device it counts is a member of a shared MLS group, so its
//! certificate was signed by the contact's system key: a device the contact does not know
//! of means the system key is in someone else's hands.

use std::collections::BTreeSet;

use confab_spec::ids::{ProcessId, SystemKey};

use super::{Client, ClientError};
use crate::mls::EngineError;

/// A contact's devices now, against those seen when the user verified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceChanges {
    /// The safety number of this user and the contact.
    pub safety_number: String,
    /// Whether the user verified the contact, and when.
    pub verified_at: Option<confab_spec::ids::UnixMs>,
    /// The contact's devices in groups shared with this device now.
    pub now: BTreeSet<ProcessId>,
    /// Devices seen now and not when verified (empty when never verified).
    pub added: BTreeSet<ProcessId>,
    /// Devices seen when verified and not now (removed from every shared group, or
    /// revoked).
    pub gone: BTreeSet<ProcessId>,
}

impl Client {
    /// The devices of `user` in the groups this device shares with it.
    pub fn devices_seen(&self, user: &SystemKey) -> Result<BTreeSet<ProcessId>, ClientError> {
        let mut seen = BTreeSet::new();
        for c in self.store.conversations()? {
            if c.removed {
                continue;
            }
            match self.engine.members(&c.id) {
                Ok(members) => seen.extend(
                    members
                        .into_iter()
                        .filter(|(_, d)| d.system == *user)
                        .map(|(_, d)| d.process),
                ),
                Err(EngineError::GroupNotFound | EngineError::Removed) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(seen)
    }

    /// `user`'s safety number with this user, and its devices now against those seen when
    /// it was verified.
    pub fn device_changes(&self, user: &SystemKey) -> Result<DeviceChanges, ClientError> {
        let now = self.devices_seen(user)?;
        let verification = self.store.verified(user)?;
        let then: BTreeSet<ProcessId> = verification
            .as_ref()
            .map(|v| v.devices.iter().copied().collect())
            .unwrap_or_default();
        let verified = verification.is_some();
        Ok(DeviceChanges {
            safety_number: confab_spec::safety::safety_number(&self.device.system, user),
            verified_at: verification.map(|v| v.at),
            added: if verified {
                now.difference(&then).copied().collect()
            } else {
                BTreeSet::new()
            },
            gone: then.difference(&now).copied().collect(),
            now,
        })
    }

    /// Marks `user` verified (its safety number compared out of band and found right), with
    /// the devices seen now; later ones are reported by [`Client::device_changes`].
    pub fn mark_verified(&mut self, user: &SystemKey) -> Result<(), ClientError> {
        let devices: Vec<ProcessId> = self.devices_seen(user)?.into_iter().collect();
        let now = self.now();
        self.store.set_verified(user, &devices, now)?;
        Ok(())
    }
}
