//! SPEC.md section 8.1: consent. Who may claim a user's KeyPackages is the user's choice,
//! and a claim it does not allow looks exactly like a claim of a key nobody holds. (Rule 8
//! of section 10.2, consent to Adds, is checked with the room cases.)

use confab_spec::ErrorCode;
use confab_spec::ServerFrame;
use confab_spec::frame::{ClaimKeyPackages, ClientFrame, ErrorFrame, InvitePolicy};
use confab_spec::frame::{InviteSettings, UpdateInviteSettings, UpdatePresenceLists};
use confab_spec::ids::SystemKey;

use crate::case;
use crate::case::{Case, CaseResult, Failure, Stop};
use crate::cases::directory::{claim, member, stored, upload};
use crate::context::{Ctx, Device, Peer};

/// The cases of section 8.1.
pub fn cases() -> Vec<Case> {
    vec![
        case!(
            "8-11.settings-apply",
            "REQ-8-11",
            Must,
            "invite settings are answered as set and decide the next claim: allowed with an empty list refuses, allow admits, disallow refuses again, everyone admits",
            settings_apply
        ),
        case!(
            "8-12.allow-list-full",
            "REQ-8-12",
            Must,
            "an allow list over presence_list_max is presence_list_full (601) and unchanged",
            allow_list_full
        ),
        case!(
            "8-13.refused-claim-like-unknown-key",
            "REQ-8-13",
            Must,
            "a claim the target does not allow is answered exactly like a claim of a key nobody holds, and consumes no package",
            refused_claim_like_unknown_key
        ),
        case!(
            "8-13.blocked-claimer",
            "REQ-8-13",
            Must,
            "a claim by a user the target blocks is answered like a claim of a key nobody holds, whatever the policy",
            blocked_claimer
        ),
    ]
}

/// Sends `UpdateInviteSettings`; the settings or the error.
pub(super) async fn settings(
    peer: &mut Peer,
    rid: u64,
    policy: Option<InvitePolicy>,
    allow: Option<Vec<SystemKey>>,
    disallow: Option<Vec<SystemKey>>,
) -> Result<Result<InviteSettings, ErrorFrame>, Stop> {
    peer.send(&ClientFrame::UpdateInviteSettings(UpdateInviteSettings {
        rid,
        policy,
        allow,
        disallow,
    }))
    .await?;
    peer.expect("InviteSettings or Error", |f| match f {
        ServerFrame::InviteSettings(s) if s.rid == rid => Some(Ok(s.clone())),
        ServerFrame::Error(e) if e.rid == Some(rid) => Some(Err(e.clone())),
        _ => None,
    })
    .await
}

/// `settings`, which must answer `InviteSettings` equal to `expected`.
async fn settings_as(
    peer: &mut Peer,
    rid: u64,
    update: (
        Option<InvitePolicy>,
        Option<Vec<SystemKey>>,
        Option<Vec<SystemKey>>,
    ),
    expected: (InvitePolicy, &[SystemKey]),
    what: &str,
) -> CaseResult {
    let (policy, allow, disallow) = update;
    match settings(peer, rid, policy, allow, disallow).await? {
        Ok(s) if s.policy == expected.0 && s.allowed == expected.1 => Ok(()),
        other => Err(Failure::new(
            format!(
                "{what}: InviteSettings {{policy {:?}, allowed {} users}}",
                expected.0,
                expected.1.len()
            ),
            match other {
                Ok(s) => format!("policy {:?}, allowed {} users", s.policy, s.allowed.len()),
                Err(e) => format!("Error {}", e.code.name()),
            },
        )
        .into()),
    }
}

/// The claim of `user` by `peer`, which must be granted (`true`) or answered
/// `no_key_packages` (`false`).
async fn claim_is(
    peer: &mut Peer,
    rid: u64,
    user: SystemKey,
    granted: bool,
    what: &str,
) -> CaseResult {
    let answer = claim(peer, rid, user, None).await?;
    match (&answer, granted) {
        (Ok(p), true) if !p.is_empty() => Ok(()),
        (Err(ErrorCode::NoKeyPackages), false) => Ok(()),
        _ => Err(Failure::new(
            format!(
                "{what}: {}",
                if granted {
                    "KeyPackagesClaimed"
                } else {
                    "Error 501 no_key_packages"
                }
            ),
            format!("{answer:?}"),
        )
        .into()),
    }
}

async fn settings_apply(cx: &mut Ctx) -> CaseResult {
    let (mut t, mut tm) = member(cx, "target", Device::fresh(), 0).await?;
    stored(upload(&mut t, 1, tm.key_packages(4, false)?, None).await?)?;
    let user = tm.device.system.public();
    let claimer_device = Device::fresh();
    let claimer = claimer_device.system.public();
    let (mut c, _) = cx.ready("claimer", &claimer_device).await?;
    settings_as(
        &mut t,
        2,
        (None, None, None),
        (InvitePolicy::Everyone, &[]),
        "the default",
    )
    .await?;
    settings_as(
        &mut t,
        3,
        (Some(InvitePolicy::Allowed), None, None),
        (InvitePolicy::Allowed, &[]),
        "policy allowed",
    )
    .await?;
    claim_is(
        &mut c,
        10,
        user,
        false,
        "a claim under allowed, not on the list",
    )
    .await?;
    settings_as(
        &mut t,
        4,
        (None, Some(vec![claimer]), None),
        (InvitePolicy::Allowed, &[claimer]),
        "allow the claimer",
    )
    .await?;
    claim_is(&mut c, 11, user, true, "a claim by an allowed user").await?;
    settings_as(
        &mut t,
        5,
        (None, None, Some(vec![claimer])),
        (InvitePolicy::Allowed, &[]),
        "disallow the claimer",
    )
    .await?;
    claim_is(&mut c, 12, user, false, "a claim after disallow").await?;
    settings_as(
        &mut t,
        6,
        (Some(InvitePolicy::Everyone), None, None),
        (InvitePolicy::Everyone, &[]),
        "policy everyone",
    )
    .await?;
    claim_is(&mut c, 13, user, true, "a claim under everyone").await
}

async fn allow_list_full(cx: &mut Ctx) -> CaseResult {
    let Some(max) = cx.info.limits.presence_list_max else {
        return Err(Stop::Skipped(
            "/v1/info announces no limits.presence_list_max".into(),
        ));
    };
    if max > cx.info.limits.collection_len_max || max > 5_000 {
        return Err(Stop::Skipped(format!(
            "presence_list_max {max} does not fit one frame, or is over the suite's 5,000"
        )));
    }
    let (mut a, _) = cx.ready("device", &Device::fresh()).await?;
    let full: Vec<SystemKey> = (0..max).map(|_| Device::fresh().system.public()).collect();
    match settings(&mut a, 1, None, Some(full), None).await? {
        Ok(s) if s.allowed.len() as u64 == max => {}
        other => {
            return Err(Failure::new(
                format!("an allow list of {max} accepted"),
                format!("{:?}", other.map(|s| s.allowed.len()).map_err(|e| e.code)),
            )
            .into());
        }
    }
    match settings(
        &mut a,
        2,
        None,
        Some(vec![Device::fresh().system.public()]),
        None,
    )
    .await?
    {
        Err(e) if e.code == ErrorCode::PresenceListFull => {}
        other => {
            return Err(Failure::new(
                "Error 601 presence_list_full",
                format!("{:?}", other.map(|s| s.allowed.len()).map_err(|e| e.code)),
            )
            .into());
        }
    }
    match settings(&mut a, 3, None, None, None).await? {
        Ok(s) if s.allowed.len() as u64 == max => Ok(()),
        other => Err(Failure::new(
            format!("the allow list unchanged at {max}"),
            format!("{:?}", other.map(|s| s.allowed.len()).map_err(|e| e.code)),
        )
        .into()),
    }
}

/// The `Error` answering a claim of `user` by `peer` (a grant is a failure), without its
/// rid.
async fn refusal_of(
    peer: &mut Peer,
    rid: u64,
    user: SystemKey,
    what: &str,
) -> Result<ErrorFrame, Stop> {
    peer.send(&ClientFrame::ClaimKeyPackages(ClaimKeyPackages {
        rid,
        user,
        devices: None,
    }))
    .await?;
    let answer = peer
        .expect("KeyPackagesClaimed or Error", |f| match f {
            ServerFrame::KeyPackagesClaimed(c) if c.rid == rid => Some(Err(c.claimed.len())),
            ServerFrame::Error(e) if e.rid == Some(rid) => Some(Ok(e.clone())),
            _ => None,
        })
        .await?;
    match answer {
        Ok(e) => Ok(ErrorFrame { rid: None, ..e }),
        Err(n) => Err(Failure::new(
            format!("{what}: Error 501 no_key_packages"),
            format!("KeyPackagesClaimed with {n} packages"),
        )
        .into()),
    }
}

/// The target's pool as its owner sees it now.
async fn pool_count(t: &mut Peer, rid: u64) -> Result<u64, Stop> {
    Ok(stored(upload(t, rid, vec![], None).await?)?.pool_count)
}

async fn refused_claim_like_unknown_key(cx: &mut Ctx) -> CaseResult {
    let (mut t, mut tm) = member(cx, "target", Device::fresh(), 1).await?;
    stored(upload(&mut t, 1, tm.key_packages(2, false)?, None).await?)?;
    let user = tm.device.system.public();
    settings_as(
        &mut t,
        2,
        (Some(InvitePolicy::Allowed), None, None),
        (InvitePolicy::Allowed, &[]),
        "policy allowed",
    )
    .await?;
    let (mut c, _) = cx.ready("claimer", &Device::fresh()).await?;
    like_unknown_key(&mut c, &mut t, user, "a claim the target does not allow").await
}

/// `c`'s claim of `user` (`what`) is answered exactly as its claim of a key nobody holds,
/// `no_key_packages`, and the target `t` (which uploaded two packages) still has both
/// (REQ-8-13).
async fn like_unknown_key(c: &mut Peer, t: &mut Peer, user: SystemKey, what: &str) -> CaseResult {
    let refused = refusal_of(c, 10, user, what).await?;
    let nobody = refusal_of(
        c,
        11,
        Device::fresh().system.public(),
        "a claim of a key nobody holds",
    )
    .await?;
    if refused != nobody {
        return Err(Failure::new(
            format!("the same Error as for a key nobody holds: {nobody:?}"),
            format!("{refused:?}"),
        )
        .into());
    }
    if refused.code != ErrorCode::NoKeyPackages {
        return Err(Failure::new("Error 501 no_key_packages", format!("{refused:?}")).into());
    }
    let left = pool_count(t, 90).await?;
    if left != 2 {
        return Err(Failure::new(
            "the target's pool untouched (2 packages)",
            format!("{left} packages"),
        )
        .into());
    }
    Ok(())
}

async fn blocked_claimer(cx: &mut Ctx) -> CaseResult {
    let (mut t, mut tm) = member(cx, "target", Device::fresh(), 0).await?;
    stored(upload(&mut t, 1, tm.key_packages(2, false)?, None).await?)?;
    let user = tm.device.system.public();
    let claimer_device = Device::fresh();
    let claimer = claimer_device.system.public();
    let (mut c, _) = cx.ready("claimer", &claimer_device).await?;
    // Allowed by name, and blocked: the block wins.
    settings_as(
        &mut t,
        2,
        (None, Some(vec![claimer]), None),
        (InvitePolicy::Everyone, &[claimer]),
        "allow the claimer",
    )
    .await?;
    t.send(&ClientFrame::UpdatePresenceLists(UpdatePresenceLists {
        rid: 3,
        share: None,
        unshare: None,
        block: Some(vec![claimer]),
        unblock: None,
    }))
    .await?;
    t.expect("PresenceLists", |f| match f {
        ServerFrame::PresenceLists(l) if l.rid == 3 => Some(Ok(())),
        ServerFrame::Error(e) if e.rid == Some(3) => Some(Err(e.code)),
        _ => None,
    })
    .await?
    .map_err(|code| Failure::new("PresenceLists", format!("Error {}", code.name())))?;
    like_unknown_key(&mut c, &mut t, user, "a claim by a blocked user").await
}
