//! Pins a discrepancy the interop harness found: an openmls 0.9 committer that mixes PSK
//! proposals by reference and by value produces a Commit whose confirmation tag no
//! receiver (openmls or mls-rs) accepts, while mls-rs committing the same proposals is
//! accepted by both. Confab never commits PSKs, and the harness reports such steps as
//! unsupported by openmls. If this test starts failing, openmls fixed it: drop the guard
//! `OPENMLS_MIXED_PSKS` in `src/interop.rs`.

mod support;

use confab_client::mls::{EngineKind, ExtraProposal, Processed};
use support::*;

fn setup(dir: &tempfile::TempDir, committer: EngineKind, receiver: EngineKind) -> (Device, Device) {
    let (mut a, mut b) = two_member_group(dir, committer, receiver);
    for (id, secret) in [(b"p1", [1u8; 32]), (b"p2", [2u8; 32])] {
        a.engine().install_external_psk(id, &secret).expect("psk");
        b.engine().install_external_psk(id, &secret).expect("psk");
    }
    (a, b)
}

/// `by_reference` and `by_value` PSKs committed by `a`; returns whether `b` accepts it.
fn commit_psks(a: &mut Device, b: &mut Device, by_reference: bool, by_value: bool) -> bool {
    if by_reference {
        let p = a
            .engine()
            .propose_extra(&GROUP, &ExtraProposal::ExternalPsk(b"p1".to_vec()))
            .expect("propose");
        b.engine().process(&GROUP, &p).expect("proposal");
    }
    let extra = if by_value {
        vec![ExtraProposal::ExternalPsk(b"p2".to_vec())]
    } else {
        vec![]
    };
    let out = a
        .engine()
        .commit(&GROUP, &[], &[], &extra, false)
        .expect("commit");
    a.engine().merge_pending_commit(&GROUP).expect("merge");
    matches!(
        b.engine().process(&GROUP, &out.commit),
        Ok(Processed::Commit { .. })
    )
}

#[test]
fn psk_commits_interoperate_except_openmls_mixing_reference_and_value() {
    for (committer, receiver) in pairings() {
        for (by_reference, by_value) in [(true, false), (false, true), (true, true)] {
            let dir = tempfile::tempdir().expect("tempdir");
            let (mut a, mut b) = setup(&dir, committer, receiver);
            let accepted = commit_psks(&mut a, &mut b, by_reference, by_value);
            let known_bug = committer == EngineKind::OpenMls && by_reference && by_value;
            assert_eq!(
                accepted, !known_bug,
                "{committer} -> {receiver}, by reference {by_reference}, by value {by_value}"
            );
        }
    }
}
