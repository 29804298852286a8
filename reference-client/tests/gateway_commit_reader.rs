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
