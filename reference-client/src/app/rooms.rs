//! Rooms (SPEC.md section 10): create, invite, remove, promote and demote, leave, and the
//! Commits of leave requests. Every room Commit states the roles it leaves the room with
//! (REQ-10-3), computed from this device's MLS group at the moment the Commit is made, so
//! a retry after a lost race is judged on the winner's roles.

use std::collections::BTreeSet;

use confab_spec::frame::{ClaimedKeyPackage, ConversationKind};
use confab_spec::ids::{ConversationId, DeviceId, Seq, SystemKey};
use confab_spec::rooms::{ROLES_EXTENSION_TYPE, Role, RoomRoles};

use super::{Client, ClientError, member};
use crate::mls::{CommitOutput, EngineError, ExtraProposal, MlsEngine};
use crate::store::ConversationRecord;

/// A room Commit another member made, as [`check_processed`] judges it.
pub(super) struct Change<'a> {
    pub(super) committer: SystemKey,
    pub(super) before: &'a RoomRoles,
    pub(super) added: &'a [DeviceId],
    pub(super) removed: &'a [DeviceId],
    /// The leave requests known before the Commit.
    pub(super) leaving: &'a [DeviceId],
}

/// Checks a processed room Commit against rules 1–6 of SPEC.md 10.2 on the group as it is
/// now: `Err(rule)` when the gateway accepted a Commit that breaks one.
pub(super) fn check_processed(
    engine: &dyn MlsEngine,
    room: &ConversationId,
    change: &Change<'_>,
) -> Result<Result<(), String>, EngineError> {
    let after = roles_in(engine, room)?;
    let present: BTreeSet<SystemKey> = engine
        .members(room)?
        .into_iter()
        .map(|(_, d)| d.system)
        .collect();
    let removed: Vec<(DeviceId, bool)> = change
        .removed
        .iter()
        .map(|d| (*d, change.leaving.contains(d)))
        .collect();
    Ok(
        confab_spec::rooms::check_commit(&confab_spec::rooms::CommitView {
            committer: change.committer,
            before: change.before,
            after: after.as_ref(),
            added: change.added,
            removed: &removed,
            present_after: &present,
        })
        .map_err(|v| v.to_string()),
    )
}

/// Users one [`Client::invite_many`] Commit adds at most (within the default burst of
/// `invites_per_user`, SPEC.md 10.4).
pub const INVITES_PER_COMMIT: usize = 50;

/// What [`Client::invite_many`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InviteReport {
    /// Users whose devices were added.
    pub invited: usize,
    /// Commits made.
    pub commits: usize,
    /// Users skipped: none of their devices has a KeyPackage.
    pub without_packages: Vec<SystemKey>,
}

/// A user in a room, as this device's MLS group sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomMember {
    /// The user.
    pub user: SystemKey,
    /// Its role.
    pub role: Role,
    /// Its devices in the room, with their leaves, by leaf.
    pub devices: Vec<(u32, DeviceId)>,
}

/// The roles of `room` in `engine`'s group (`None`: not a room, or no such group).
pub(super) fn roles_in(
    engine: &dyn MlsEngine,
    room: &ConversationId,
) -> Result<Option<RoomRoles>, EngineError> {
    let data = match engine.context_extension(room, ROLES_EXTENSION_TYPE) {
        Ok(data) => data,
        Err(EngineError::GroupNotFound | EngineError::Removed) => return Ok(None),
        Err(e) => return Err(e),
    };
    data.map(|d| {
        RoomRoles::from_extension(&d)
            .map_err(|e| EngineError::Malformed(format!("room roles: {e}")))
    })
    .transpose()
}

/// A Commit in `room` of `adds` (KeyPackages with their devices) and `removes`, stating
/// the roles `change` makes of the current ones, without the users the Commit leaves with
/// no device (SPEC.md 10.2, rule 6). Devices already added or removed (by a Commit that
/// won meanwhile) are left out; `None` when nothing is left to do.
fn room_commit(
    engine: &mut dyn MlsEngine,
    room: &ConversationId,
    adds: &[(DeviceId, Vec<u8>)],
    removes: &[DeviceId],
    change: &dyn Fn(&RoomRoles) -> RoomRoles,
    force_path: bool,
) -> Result<Option<CommitOutput>, EngineError> {
    let roles = roles_in(engine, room)?.ok_or_else(|| EngineError::Other("not a room".into()))?;
    let members = engine.members(room)?;
    let is_member = |d: &DeviceId| members.iter().any(|(_, m)| m == d);
    let adds: Vec<&(DeviceId, Vec<u8>)> = adds.iter().filter(|(d, _)| !is_member(d)).collect();
    let removes: Vec<DeviceId> = removes.iter().copied().filter(is_member).collect();
    let mut present: BTreeSet<SystemKey> = members
        .iter()
        .map(|(_, d)| *d)
        .filter(|d| !removes.contains(d))
        .map(|d| d.system)
        .collect();
    present.extend(adds.iter().map(|(d, _)| d.system));
    let stated = change(&roles).retain_present(|u| present.contains(u));
    if adds.is_empty() && removes.is_empty() && stated == roles && !force_path {
        return Ok(None);
    }
    let packages: Vec<Vec<u8>> = adds.iter().map(|(_, kp)| kp.clone()).collect();
    engine
        .commit(
            room,
            &packages,
            &removes,
            &[ExtraProposal::GroupContextExtensions(
                stated.context_extensions(),
            )],
            force_path,
        )
        .map(Some)
}

/// [`room_commit`] of `adds` and `removes` when `room` is a room, else `other` (a DM).
pub(super) fn commit_any(
    engine: &mut dyn MlsEngine,
    room: &ConversationId,
    adds: &[(DeviceId, Vec<u8>)],
    removes: &[DeviceId],
    force_path: bool,
    other: impl FnOnce(&mut dyn MlsEngine) -> Result<CommitOutput, EngineError>,
) -> Result<Option<CommitOutput>, EngineError> {
    if roles_in(engine, room)?.is_some() {
        room_commit(engine, room, adds, removes, &|r| r.clone(), force_path)
    } else {
        other(engine).map(Some)
    }
}

impl Client {
    /// Creates a room with this user as its owner (SPEC.md 10.1): the MLS group carries the
    /// roles from the start. `name` is this device's name for it.
    pub async fn create_room(&mut self, name: &str) -> Result<ConversationId, ClientError> {
        if self.store.room_named(name)?.is_some() {
            return Err(ClientError::NameTaken(name.to_owned()));
        }
        let roles = RoomRoles::new(self.device.system);
        let room = self
            .create_conversation(ConversationKind::Room, &roles.context_extensions())
            .await?;
        self.store.add_conversation(&ConversationRecord {
            id: room,
            kind: ConversationKind::Room,
            peer: None,
            removed: false,
        })?;
        self.store.set_room_name(&room, name)?;
        self.follow(confab_spec::ids::StreamId::Conversation(room))?;
        // This user's other devices join at once, as in a DM (nobody else can add them
        // later without being an admin, and they may not be online to ask).
        match self.claim(self.device.system, None).await {
            Ok(own) if !own.is_empty() => {
                let adds = packages_of(own);
                self.commit_in_room(room, adds, Vec::new(), &|r| r.clone())
                    .await?;
            }
            Ok(_) | Err(ClientError::NoKeyPackages) => {}
            Err(e) => return Err(e),
        }
        Ok(room)
    }

    /// Invites `user` to `room`: claims a KeyPackage of each of their devices and commits
    /// the Adds with the Welcome. Only the owner and admins may (the gateway refuses others
    /// with `forbidden`). `None` when every device of theirs with a package is in already.
    pub async fn invite(
        &mut self,
        room: ConversationId,
        user: SystemKey,
    ) -> Result<Option<Seq>, ClientError> {
        self.check_room(&room)?;
        let claimed = self.claim(user, None).await?;
        if claimed.is_empty() {
            return Err(ClientError::NoKeyPackages);
        }
        let adds = packages_of(claimed);
        self.commit_in_room(room, adds, Vec::new(), &|r| r.clone())
            .await
    }

    /// Invites `users` to `room` with one Commit per [`INVITES_PER_COMMIT`] users (a large
    /// room is filled in a few Commits, not one per user). Users with no KeyPackage are
    /// skipped and returned.
    pub async fn invite_many(
        &mut self,
        room: ConversationId,
        users: &[SystemKey],
    ) -> Result<InviteReport, ClientError> {
        self.check_room(&room)?;
        let mut report = InviteReport::default();
        for chunk in users.chunks(INVITES_PER_COMMIT) {
            let mut adds = Vec::new();
            for &user in chunk {
                match self.claim(user, None).await {
                    Ok(claimed) if !claimed.is_empty() => adds.extend(packages_of(claimed)),
                    Ok(_) | Err(ClientError::NoKeyPackages) => report.without_packages.push(user),
                    Err(e) => return Err(e),
                }
            }
            if adds.is_empty() {
                continue;
            }
            let users_added = {
                let mut u: Vec<SystemKey> = adds.iter().map(|(d, _)| d.system).collect();
                u.dedup();
                u.len()
            };
            if self
                .commit_in_room(room, adds, Vec::new(), &|r| r.clone())
                .await?
                .is_some()
            {
                report.commits += 1;
                report.invited += users_added;
            }
        }
        Ok(report)
    }

    /// Removes every device of `user` from `room` (the owner removes anyone; an admin
    /// removes members; anyone removes its own user's devices). A removed role holder loses
    /// its role in the same Commit. `None` when `user` has no device in the room.
    pub async fn remove_member(
        &mut self,
        room: ConversationId,
        user: SystemKey,
    ) -> Result<Option<Seq>, ClientError> {
        self.check_room(&room)?;
        let devices: Vec<DeviceId> = self
            .engine
            .members(&room)?
            .into_iter()
            .map(|(_, d)| d)
            .filter(|d| d.system == user && *d != self.device)
            .collect();
        if devices.is_empty() {
            return Ok(None);
        }
        self.commit_in_room(room, Vec::new(), devices, &|r| r.clone())
            .await
    }

    /// Gives `user` the role `role` in `room` (the owner promotes and demotes admins, and
    /// hands ownership over with [`Role::Owner`], keeping no role itself; an admin may only
    /// step down). `None` when `user` already has it.
    pub async fn set_role(
        &mut self,
        room: ConversationId,
        user: SystemKey,
        role: Role,
    ) -> Result<Option<Seq>, ClientError> {
        self.check_room(&room)?;
        let present = self
            .engine
            .members(&room)?
            .iter()
            .any(|(_, d)| d.system == user);
        if !present {
            return Err(ClientError::NotInRoom);
        }
        self.commit_in_room(room, Vec::new(), Vec::new(), &move |r| {
            r.with_role(user, role)
        })
        .await
    }

    /// Asks to leave `room`: a Remove proposal for each of this user's devices in it
    /// (SPEC.md 10.3). Another member commits them; this device learns it is out from that
    /// Commit.
    pub async fn leave_room(&mut self, room: ConversationId) -> Result<(), ClientError> {
        self.check_room(&room)?;
        let own: Vec<DeviceId> = self
            .engine
            .members(&room)?
            .into_iter()
            .map(|(_, d)| d)
            .filter(|d| d.system == self.device.system)
            .collect();
        for device in own {
            let proposal = if device == self.device {
                self.engine.leave(&room)?
            } else {
                self.engine.propose_remove(&room, &device)?
            };
            self.send(room, proposal, super::Attached::default(), None)
                .await?;
            // Known as leaving from now on, whether or not the echo is read by this process.
            self.store.add_leave_request(&room, &device)?;
        }
        Ok(())
    }

    /// The roles of `room` as this device's group holds them (`None`: not a room here).
    pub fn room_roles(&self, room: &ConversationId) -> Result<Option<RoomRoles>, ClientError> {
        Ok(roles_in(&*self.engine, room)?)
    }

    /// The users in `room` with their roles and devices: the owner first, then admins, then
    /// members, each by user key.
    pub fn room_members(&self, room: &ConversationId) -> Result<Vec<RoomMember>, ClientError> {
        let roles = self.room_roles(room)?.ok_or(ClientError::NotARoom)?;
        let mut users: Vec<RoomMember> = Vec::new();
        for (leaf, device) in self.engine.members(room)? {
            match users.iter_mut().find(|u| u.user == device.system) {
                Some(u) => u.devices.push((leaf, device)),
                None => users.push(RoomMember {
                    user: device.system,
                    role: roles.role_of(&device.system),
                    devices: vec![(leaf, device)],
                }),
            }
        }
        users.sort_by(|a, b| b.role.cmp(&a.role).then(a.user.cmp(&b.user)));
        Ok(users)
    }

    /// Commits the leave requests of every room where this device is the member device
    /// with the lowest leaf among those not leaving (SPEC.md 10.3: one member does it, so
    /// members do not race). Returns the number of rooms committed in.
    pub async fn commit_leave_requests(&mut self) -> Result<usize, ClientError> {
        let mut committed = 0;
        for c in self.store.conversations()? {
            if c.removed || c.kind != ConversationKind::Room {
                continue;
            }
            let members = match self.engine.members(&c.id) {
                Ok(m) => m,
                Err(EngineError::GroupNotFound | EngineError::Removed) => continue,
                Err(e) => return Err(e.into()),
            };
            let devices: Vec<DeviceId> = members.iter().map(|(_, d)| *d).collect();
            self.store.retain_leave_requests(&c.id, &devices)?;
            let leaving = self.store.leave_requests(&c.id)?;
            if leaving.is_empty() {
                continue;
            }
            let designated = members
                .iter()
                .filter(|(_, d)| !leaving.contains(d))
                .map(|(leaf, d)| (*leaf, *d))
                .min();
            if designated.map(|(_, d)| d) != Some(self.device) {
                continue;
            }
            if self
                .commit_in_room(c.id, Vec::new(), Vec::new(), &|r| r.clone())
                .await?
                .is_some()
            {
                committed += 1;
            }
        }
        Ok(committed)
    }

    /// Commits in a room with [`room_commit`], retrying on lost races; the removals of
    /// pending leave requests go along with it.
    async fn commit_in_room(
        &mut self,
        room: ConversationId,
        adds: Vec<(DeviceId, Vec<u8>)>,
        removes: Vec<DeviceId>,
        change: &dyn Fn(&RoomRoles) -> RoomRoles,
    ) -> Result<Option<Seq>, ClientError> {
        let leaving = self.store.leave_requests(&room)?;
        if leaving.contains(&self.device) {
            // Its own Remove proposal sits in its MLS state: it commits nothing more here.
            return Err(ClientError::Leaving);
        }
        let mut removes = removes;
        for device in leaving {
            if !removes.contains(&device) {
                removes.push(device);
            }
        }
        self.commit(room, |engine| {
            room_commit(engine, &room, &adds, &removes, change, false)
        })
        .await
    }

    fn check_room(&self, room: &ConversationId) -> Result<(), ClientError> {
        if !member(&*self.engine, room, self.device)? {
            return Err(ClientError::NotInRoom);
        }
        if roles_in(&*self.engine, room)?.is_none() {
            return Err(ClientError::NotARoom);
        }
        Ok(())
    }
}

fn packages_of(claimed: Vec<ClaimedKeyPackage>) -> Vec<(DeviceId, Vec<u8>)> {
    claimed
        .into_iter()
        .map(|p| (p.device, p.key_package.as_bytes().to_vec()))
        .collect()
}
