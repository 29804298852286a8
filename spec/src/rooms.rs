//! Rooms and governance (SPEC.md section 10): the `confab_room_roles` group context
//! extension and the rules a room Commit must keep.
//!
//! The gateway judges every room Commit with [`check_commit`] before it sequences it
//! (REQ-10-4); clients use the same function to build Commits the gateway will accept and
//! to check the Commits they process (section 10.5).

use std::collections::BTreeSet;

use crate::cbor::{self, cbor_map};
use crate::ids::{DeviceId, SystemKey};

/// The extension type of `confab_room_roles` (SPEC.md 10.1), from RFC 9420's private-use
/// range.
pub const ROLES_EXTENSION_TYPE: u16 = 0xF0C0;

/// The extension type of `required_capabilities` (RFC 9420 section 11.1).
pub const REQUIRED_CAPABILITIES_EXTENSION_TYPE: u16 = 0x0003;

/// The `required_capabilities` of a room's group context: extension types `[0xF0C0]`, no
/// proposal types, no credential types (SPEC.md 10.1).
pub const ROOM_REQUIRED_CAPABILITIES: [u8; 5] = [0x02, 0xF0, 0xC0, 0x00, 0x00];

/// Default `room_members_max`: most member devices (leaves) in one room (SPEC.md 10.4).
pub const ROOM_MEMBERS_MAX_DEFAULT: u64 = 2_000;

/// Default `rooms_per_user_max`: most rooms one user has joined (SPEC.md 10.4).
pub const ROOMS_PER_USER_MAX_DEFAULT: u64 = 500;

/// Most admins a roles extension may list: a room cannot have more admins than devices.
pub const ADMINS_MAX: usize = ROOM_MEMBERS_MAX_DEFAULT as usize;

cbor_map! {
    /// The roles of a room: the `extension_data` of `confab_room_roles` (SPEC.md 10.1).
    /// Decode it with [`RoomRoles::from_extension`], which also checks its form.
    pub struct RoomRoles {
        /// The owner, absent when the room has none.
        1 opt owner: SystemKey,
        /// The admins, strictly ascending, never the owner.
        2 req admins: Vec<SystemKey>,
    }
}

/// A user's role in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Any other user with a device in the room.
    Member,
    /// Invites and removes members.
    Admin,
    /// Invites and removes anyone, and names the admins.
    Owner,
}

impl Role {
    /// `owner`, `admin` or `member`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }
}

/// Why extension data is not a valid `confab_room_roles`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolesError {
    /// Not the deterministic CBOR of the map.
    #[error("roles do not decode: {0}")]
    Decode(String),
    /// Admins not strictly ascending (unsorted or repeated).
    #[error("admins are not strictly ascending")]
    Unsorted,
    /// The owner is also listed as an admin.
    #[error("the owner is listed as an admin")]
    OwnerListed,
}

impl RoomRoles {
    /// The roles of a new room: `owner`, no admins.
    pub fn new(owner: SystemKey) -> Self {
        Self {
            owner: Some(owner),
            admins: Vec::new(),
        }
    }

    /// Decodes and checks extension data (SPEC.md 10.1).
    pub fn from_extension(data: &[u8]) -> Result<Self, RolesError> {
        let limits = crate::DecodeLimits {
            collection_len_max: ADMINS_MAX,
            ..crate::DecodeLimits::default()
        };
        let roles: RoomRoles =
            cbor::from_slice(data, &limits).map_err(|e| RolesError::Decode(e.to_string()))?;
        if !roles.admins.windows(2).all(|w| w[0] < w[1]) {
            return Err(RolesError::Unsorted);
        }
        if roles.owner.is_some_and(|o| roles.admins.contains(&o)) {
            return Err(RolesError::OwnerListed);
        }
        Ok(roles)
    }

    /// The extension data: deterministic CBOR.
    pub fn to_extension(&self) -> Vec<u8> {
        cbor::to_vec(self)
    }

    /// The `(type, data)` pair of the extension, as the MLS engines take it.
    pub fn extension(&self) -> (u16, Vec<u8>) {
        (ROLES_EXTENSION_TYPE, self.to_extension())
    }

    /// A room's group context extensions with these roles, as `(type, data)` pairs:
    /// `required_capabilities` then `confab_room_roles` (SPEC.md 10.1). Room Commits state
    /// the whole list.
    pub fn context_extensions(&self) -> Vec<(u16, Vec<u8>)> {
        vec![
            (
                REQUIRED_CAPABILITIES_EXTENSION_TYPE,
                ROOM_REQUIRED_CAPABILITIES.to_vec(),
            ),
            self.extension(),
        ]
    }

    /// `user`'s role (any user not named is a member, or not in the room at all).
    pub fn role_of(&self, user: &SystemKey) -> Role {
        if self.owner.as_ref() == Some(user) {
            Role::Owner
        } else if self.admins.binary_search(user).is_ok() {
            Role::Admin
        } else {
            Role::Member
        }
    }

    /// These roles with `user` set to `role` (an owner already there is replaced by a new
    /// one and keeps no role).
    pub fn with_role(&self, user: SystemKey, role: Role) -> Self {
        let mut admins: BTreeSet<SystemKey> = self.admins.iter().copied().collect();
        let mut owner = self.owner;
        admins.remove(&user);
        if owner == Some(user) {
            owner = None;
        }
        match role {
            Role::Owner => owner = Some(user),
            Role::Admin => {
                admins.insert(user);
            }
            Role::Member => {}
        }
        Self {
            owner,
            admins: admins.into_iter().collect(),
        }
    }

    /// These roles without the users for which `present` is false (rule 6: a role holder
    /// that leaves the room loses its role in the same Commit).
    pub fn retain_present(&self, present: impl Fn(&SystemKey) -> bool) -> Self {
        Self {
            owner: self.owner.filter(|o| present(o)),
            admins: self.admins.iter().copied().filter(|a| present(a)).collect(),
        }
    }
}

/// A room Commit as the rules of SPEC.md 10.2 see it.
#[derive(Debug, Clone)]
pub struct CommitView<'a> {
    /// The committer's user.
    pub committer: SystemKey,
    /// The roles before the Commit.
    pub before: &'a RoomRoles,
    /// The roles the Commit states (`None`: it carries no roles extension).
    pub after: Option<&'a RoomRoles>,
    /// The devices it adds.
    pub added: &'a [DeviceId],
    /// The devices it removes, each with whether it asked to leave (SPEC.md 10.3).
    pub removed: &'a [(DeviceId, bool)],
    /// The users with a device in the roster after the Commit.
    pub present_after: &'a BTreeSet<SystemKey>,
}

/// Which rule of SPEC.md 10.2 a Commit breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// Rule 1: no roles extension.
    #[error("rule 1: a room Commit must state the roles (confab_room_roles)")]
    NoRoles,
    /// Rule 2: a member added another user.
    #[error("rule 2: only the owner and admins may add other users")]
    AddNotAllowed,
    /// Rule 3: a removal the committer may not make.
    #[error("rule 3: the committer may not remove that device")]
    RemoveNotAllowed,
    /// Rule 4: the owner changed without a transfer or departure.
    #[error("rule 4: only the owner may change the owner")]
    OwnerChange,
    /// Rule 5: the admins changed in a way the committer may not.
    #[error("rule 5: only the owner may name admins; an admin may only drop itself")]
    AdminChange,
    /// Rule 6: a role holder is not present after the Commit.
    #[error("rule 6: every role holder must be in the room after the Commit")]
    AbsentRoleHolder,
}

/// Checks rules 1–6 of SPEC.md 10.2 (rule 7, blocks, needs the invitees' blocklists and is
/// checked by the gateway alone).
pub fn check_commit(c: &CommitView<'_>) -> Result<(), Violation> {
    let after = c.after.ok_or(Violation::NoRoles)?;
    let role = c.before.role_of(&c.committer);
    let privileged = role != Role::Member;
    if !privileged && c.added.iter().any(|d| d.system != c.committer) {
        return Err(Violation::AddNotAllowed);
    }
    for (device, leaving) in c.removed {
        let target = device.system;
        let allowed = target == c.committer
            || *leaving
            || role == Role::Owner
            || (role == Role::Admin && c.before.role_of(&target) == Role::Member);
        if !allowed {
            return Err(Violation::RemoveNotAllowed);
        }
    }
    let present = |u: &SystemKey| c.present_after.contains(u);
    if after.owner != c.before.owner {
        let owner_left = after.owner.is_none() && !c.before.owner.as_ref().is_some_and(present);
        if role != Role::Owner && !owner_left {
            return Err(Violation::OwnerChange);
        }
    }
    let before_admins: BTreeSet<&SystemKey> = c.before.admins.iter().collect();
    let after_admins: BTreeSet<&SystemKey> = after.admins.iter().collect();
    if role != Role::Owner {
        // Admins named by anyone but the owner: only the old owner moving down counts as a
        // change the owner made, and that is a transfer the owner committed.
        if after_admins.difference(&before_admins).next().is_some() {
            return Err(Violation::AdminChange);
        }
        if before_admins
            .difference(&after_admins)
            .any(|a| **a != c.committer && present(a))
        {
            return Err(Violation::AdminChange);
        }
    }
    if after.owner.as_ref().is_some_and(|o| !present(o)) || !after.admins.iter().all(present) {
        return Err(Violation::AbsentRoleHolder);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ProcessId;
    use proptest::prelude::*;

    fn user(n: u8) -> SystemKey {
        SystemKey([n; 32])
    }

    fn device(n: u8) -> DeviceId {
        DeviceId {
            system: user(n),
            process: ProcessId([n; 16]),
        }
    }

    #[test]
    fn roles_round_trip_and_reject_bad_forms() {
        let roles = RoomRoles::new(user(1))
            .with_role(user(3), Role::Admin)
            .with_role(user(2), Role::Admin);
        assert_eq!(roles.admins, vec![user(2), user(3)]);
        assert_eq!(
            RoomRoles::from_extension(&roles.to_extension()),
            Ok(roles.clone())
        );
        let unsorted = RoomRoles {
            owner: None,
            admins: vec![user(3), user(2)],
        };
        assert_eq!(
            RoomRoles::from_extension(&unsorted.to_extension()),
            Err(RolesError::Unsorted)
        );
        let listed = RoomRoles {
            owner: Some(user(2)),
            admins: vec![user(2)],
        };
        assert_eq!(
            RoomRoles::from_extension(&listed.to_extension()),
            Err(RolesError::OwnerListed)
        );
        assert!(matches!(
            RoomRoles::from_extension(b"\xff"),
            Err(RolesError::Decode(_))
        ));
        assert_eq!(roles.role_of(&user(1)), Role::Owner);
        assert_eq!(roles.role_of(&user(2)), Role::Admin);
        assert_eq!(roles.role_of(&user(9)), Role::Member);
        // Promoting a new owner drops the old one, which keeps no role.
        let moved = roles.with_role(user(2), Role::Owner);
        assert_eq!(moved.owner, Some(user(2)));
        assert_eq!(moved.admins, vec![user(3)]);
    }

    /// Users 1 (owner), 2 (admin), 3 and 4 (members), each with one device, all present.
    fn room() -> (RoomRoles, BTreeSet<SystemKey>) {
        (
            RoomRoles::new(user(1)).with_role(user(2), Role::Admin),
            (1..=4).map(user).collect(),
        )
    }

    fn check(
        committer: u8,
        before: &RoomRoles,
        after: &RoomRoles,
        added: &[DeviceId],
        removed: &[(DeviceId, bool)],
    ) -> Result<(), Violation> {
        let mut present: BTreeSet<SystemKey> = (1..=4).map(user).collect();
        present.extend(added.iter().map(|d| d.system));
        for (d, _) in removed {
            present.remove(&d.system);
        }
        check_commit(&CommitView {
            committer: user(committer),
            before,
            after: Some(after),
            added,
            removed,
            present_after: &present,
        })
    }

    #[test]
    fn the_rules_of_section_10_2() {
        let (r, present) = room();
        // Rule 1.
        assert_eq!(
            check_commit(&CommitView {
                committer: user(1),
                before: &r,
                after: None,
                added: &[],
                removed: &[],
                present_after: &present,
            }),
            Err(Violation::NoRoles)
        );
        // Rule 2: owner and admin add others; a member only its own devices.
        assert_eq!(check(1, &r, &r, &[device(7)], &[]), Ok(()));
        assert_eq!(check(2, &r, &r, &[device(7)], &[]), Ok(()));
        assert_eq!(
            check(3, &r, &r, &[device(7)], &[]),
            Err(Violation::AddNotAllowed)
        );
        let own = DeviceId {
            system: user(3),
            process: ProcessId([9; 16]),
        };
        assert_eq!(check(3, &r, &r, &[own], &[]), Ok(()));
        // Rule 3.
        assert_eq!(check(2, &r, &r, &[], &[(device(3), false)]), Ok(()));
        assert_eq!(
            check(3, &r, &r, &[], &[(device(4), false)]),
            Err(Violation::RemoveNotAllowed)
        );
        assert_eq!(check(3, &r, &r, &[], &[(device(4), true)]), Ok(()));
        let no_admin = r.with_role(user(2), Role::Member);
        assert_eq!(check(1, &r, &no_admin, &[], &[(device(2), false)]), Ok(()));
        // An admin may not remove the owner (whose removal would also drop the owner).
        let no_owner = RoomRoles {
            owner: None,
            admins: vec![user(2)],
        };
        assert_eq!(
            check(2, &r, &no_owner, &[], &[(device(1), false)]),
            Err(Violation::RemoveNotAllowed)
        );
        // Rule 4: the owner leaving (its leave request committed by a member) leaves no owner.
        assert_eq!(check(3, &r, &no_owner, &[], &[(device(1), true)]), Ok(()));
        assert_eq!(
            check(2, &r, &no_owner, &[], &[]),
            Err(Violation::OwnerChange)
        );
        assert_eq!(
            check(1, &r, &r.with_role(user(3), Role::Owner), &[], &[]),
            Ok(())
        );
        assert_eq!(
            check(2, &r, &r.with_role(user(2), Role::Owner), &[], &[]),
            Err(Violation::OwnerChange)
        );
        // Rule 5.
        assert_eq!(
            check(1, &r, &r.with_role(user(3), Role::Admin), &[], &[]),
            Ok(())
        );
        assert_eq!(
            check(2, &r, &r.with_role(user(3), Role::Admin), &[], &[]),
            Err(Violation::AdminChange)
        );
        assert_eq!(
            check(2, &r, &no_admin, &[], &[]),
            Ok(()),
            "an admin steps down"
        );
        let two = r.with_role(user(3), Role::Admin);
        assert_eq!(
            check(2, &two, &two.with_role(user(3), Role::Member), &[], &[]),
            Err(Violation::AdminChange)
        );
        // Rule 6: removing an admin's last device must drop its role.
        assert_eq!(
            check(1, &r, &r, &[], &[(device(2), false)]),
            Err(Violation::AbsentRoleHolder)
        );
        assert_eq!(
            check(1, &r, &r.with_role(user(8), Role::Admin), &[], &[]),
            Err(Violation::AbsentRoleHolder)
        );
        // An admin leaving drops out of the admins, whoever commits it.
        assert_eq!(check(4, &r, &no_admin, &[], &[(device(2), true)]), Ok(()));
    }

    proptest! {
        /// A member (no role) can never change the roles of others, whatever it states.
        #[test]
        fn members_never_change_other_roles(
            owner in proptest::option::of(1u8..6),
            admins in proptest::collection::btree_set(1u8..6, 0..4),
            new_owner in proptest::option::of(1u8..6),
            new_admins in proptest::collection::btree_set(1u8..6, 0..4),
        ) {
            let roles = |o: Option<u8>, a: &BTreeSet<u8>| RoomRoles {
                owner: o.map(user),
                admins: a.iter().copied().filter(|x| Some(*x) != o).map(user).collect(),
            };
            let before = roles(owner, &admins);
            let after = roles(new_owner, &new_admins);
            let committer = user(9);
            let present: BTreeSet<SystemKey> = (1..=9).map(user).collect();
            let result = check_commit(&CommitView {
                committer,
                before: &before,
                after: Some(&after),
                added: &[],
                removed: &[],
                present_after: &present,
            });
            if before != after {
                prop_assert!(result.is_err());
            } else {
                prop_assert_eq!(result, Ok(()));
            }
        }
    }
}
