//! The gateway reads membership changes from Commits (SPEC.md 7.6) with
//! `confab_spec::mls_framing::commit_contents`. Here both engines produce real Commits and
//! the reader must find exactly the devices they add and the leaves they remove.

mod support;

use confab_client::mls::{EngineKind, credential_identity};
use confab_spec::mls_framing::{CommitProposal, commit_contents};
use support::*;

#[test]
fn adds_and_removes_are_read_from_both_engines_commits() {
    for kind in EngineKind::ALL {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = Device::new(&dir, 1, kind);
        let mut b = Device::new(&dir, 2, EngineKind::OpenMls);
        let mut c = Device::new(&dir, 3, EngineKind::MlsRs);
        a.engine().create_group(&GROUP).expect("create");
        let kps = [
            b.engine().key_packages(1, false).expect("kp"),
            c.engine().key_packages(1, false).expect("kp"),
        ]
        .concat();
        let out = a.engine().add_members(&GROUP, &kps).expect("add");
        let read = commit_contents(&out.commit).expect("parse add commit");
        assert_eq!(
            read.by_reference, 0,
            "{kind}: Confab commits carry proposals by value"
        );
        let identities: Vec<Vec<u8>> = read
            .by_value
            .iter()
            .filter_map(|p| match p {
                CommitProposal::Add {
                    credential_type: 1,
                    identity,
                } => Some(identity.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            identities,
            vec![
                credential_identity(&b.credentials.certificate),
                credential_identity(&c.credentials.certificate)
            ],
            "{kind}: added devices"
        );
        assert_eq!(read.framing.epoch, 0);
        a.engine().merge_pending_commit(&GROUP).expect("merge");

        let leaf_of_c = a
            .get()
            .members(&GROUP)
            .expect("members")
            .into_iter()
            .find(|(_, d)| *d == c.id())
            .map(|(l, _)| l)
            .expect("c is a member");
        let out = a
            .engine()
            .remove_members(&GROUP, &[c.id()])
            .expect("remove");
        let read = commit_contents(&out.commit).expect("parse remove commit");
        assert_eq!(
            read.by_value,
            vec![CommitProposal::Remove { leaf: leaf_of_c }],
            "{kind}: removal"
        );
        a.engine().merge_pending_commit(&GROUP).expect("merge");

        let out = a.engine().self_update(&GROUP).expect("update");
        let read = commit_contents(&out.commit).expect("parse update commit");
        assert!(
            read.by_value.is_empty() && read.by_reference == 0,
            "{kind}: an update commit has no proposals"
        );
        assert_eq!(read.framing.epoch, 2);
    }
}

/// A room's roles travel in the `confab_room_roles` group context extension (SPEC.md 10.1):
/// both engines create a group with it, state new roles in a Commit's GroupContextExtensions
/// proposal, and the gateway's reader finds them; every member, whatever its engine, then
/// holds the same roles. A leave request (a Remove proposal of one's own leaf) reads as one.
#[test]
fn room_roles_travel_in_commits_of_both_engines() {
    use confab_client::mls::ExtraProposal;
    use confab_spec::mls_framing::proposal_contents;
    use confab_spec::rooms::{ROLES_EXTENSION_TYPE, Role, RoomRoles};
    for kind in EngineKind::ALL {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = Device::new(&dir, 1, kind);
        let mut b = Device::new(&dir, 2, EngineKind::OpenMls);
        let mut c = Device::new(&dir, 3, EngineKind::MlsRs);
        let roles = RoomRoles::new(a.id().system);
        a.engine()
            .create_group_with(&GROUP, &roles.context_extensions())
            .expect("create room");
        let kps = [
            b.engine().key_packages(1, false).expect("kp"),
            c.engine().key_packages(1, true).expect("last-resort kp"),
        ]
        .concat();
        // REQ-10-1: every KeyPackage (last-resort ones too) lists the roles extension.
        for kp in &kps {
            let info = confab_spec::mls_framing::key_package(kp).expect("a KeyPackage");
            assert!(
                info.extension_types.contains(&ROLES_EXTENSION_TYPE),
                "capabilities list {:?}",
                info.extension_types
            );
        }
        let promoted = roles.with_role(b.id().system, Role::Admin);
        let out = a
            .engine()
            .commit(
                &GROUP,
                &kps,
                &[],
                &[ExtraProposal::GroupContextExtensions(
                    promoted.context_extensions(),
                )],
                false,
            )
            .expect("add with roles");
        let read = commit_contents(&out.commit).expect("parse");
        let stated: Vec<RoomRoles> = read
            .by_value
            .iter()
            .filter_map(|p| match p {
                CommitProposal::GroupContextExtensions { extensions } => extensions
                    .iter()
                    .find(|(t, _)| *t == ROLES_EXTENSION_TYPE)
                    .map(|(_, d)| RoomRoles::from_extension(d).expect("roles decode")),
                _ => None,
            })
            .collect();
        assert_eq!(
            stated,
            vec![promoted.clone()],
            "{kind}: roles read from the Commit"
        );
        a.engine().merge_pending_commit(&GROUP).expect("merge");
        let welcome = out.welcome.expect("welcome");
        b.engine().join(&welcome).expect("b joins");
        c.engine().join(&welcome).expect("c joins");
        for d in [&a, &b, &c] {
            let data = d
                .get()
                .context_extension(&GROUP, ROLES_EXTENSION_TYPE)
                .expect("read")
                .expect("roles present");
            assert_eq!(
                RoomRoles::from_extension(&data),
                Ok(promoted.clone()),
                "{kind}"
            );
        }
        // The admin (openmls) promotes nobody but restates the roles while updating.
        let out = b
            .engine()
            .commit(
                &GROUP,
                &[],
                &[],
                &[ExtraProposal::GroupContextExtensions(
                    promoted.context_extensions(),
                )],
                false,
            )
            .expect("admin commit");
        b.engine().merge_pending_commit(&GROUP).expect("merge");
        a.engine()
            .process(&GROUP, &out.commit)
            .expect("a processes");
        c.engine()
            .process(&GROUP, &out.commit)
            .expect("c processes");
        assert_agree(&[&a, &b, &c], &GROUP);
        // c (mls-rs) asks to leave: a Remove proposal of its own leaf.
        let leave = c.engine().leave(&GROUP).expect("leave");
        let (framing, proposal) = proposal_contents(&leave).expect("parse leave");
        let leaf_of_c = c
            .get()
            .members(&GROUP)
            .expect("members")
            .into_iter()
            .find(|(_, d)| *d == c.id())
            .map(|(l, _)| l)
            .expect("c is a member");
        assert_eq!(proposal, CommitProposal::Remove { leaf: leaf_of_c });
        assert_eq!(
            framing.sender,
            Some(confab_spec::mls_framing::Sender::Member(leaf_of_c))
        );
    }
}
