//! SPEC.md section 8: the KeyPackage directory, with real KeyPackages.

use std::collections::HashSet;

use confab_spec::ErrorCode;
use confab_spec::ServerFrame;
use confab_spec::frame::{
    ClaimKeyPackages, ClaimedKeyPackage, ClientFrame, KeyPackagesStored, ListDevices, RevokeDevice,
    UploadKeyPackages,
};
use confab_spec::ids::{DeviceId, MlsBytes, SystemKey};

use crate::case;
use crate::case::{Case, CaseResult, Failure, Stop};
use crate::context::{Ctx, Device, Peer};
use crate::mls::{Member, PAIR};

/// The cases of section 8.
pub fn cases() -> Vec<Case> {
    vec![
        case!(
            "5.9-2.detail-without-payload",
            "REQ-5.9-2",
            Must,
            "an error's detail quotes no part of the payload or key it is about",
            detail_without_payload
        ),
        case!(
            "11-1.rate-limited",
            "REQ-11-1",
            Must,
            "a request over a rate limit is rate_limited (900) with retry_after_ms",
            claims_rate_limited
        ),
        case!(
            "8-1.invalid-package",
            "REQ-8-1",
            Must,
            "an upload with a tampered KeyPackage is key_package_invalid (500) and stores nothing",
            invalid_package
        ),
        case!(
            "8-1.other-device",
            "REQ-8-1",
            Must,
            "an upload with another device's KeyPackage is key_package_invalid (500)",
            other_device
        ),
        case!(
            "8-2.one-time",
            "REQ-8-2",
            Must,
            "claims hand out each package once, then no_key_packages (501)",
            one_time
        ),
        case!(
            "8-3.last-resort",
            "REQ-8-3",
            Must,
            "the last-resort package is handed out, marked, only when the pool is empty, and kept",
            last_resort
        ),
        case!(
            "8-6.last-resort-claimed",
            "REQ-8-6",
            Must,
            "the owner sees last_resort_claimed until it uploads a new last-resort package",
            last_resort_claimed
        ),
        case!(
            "8-4.claim-needs-auth",
            "REQ-8-4",
            Must,
            "a claim before Ready is unexpected_frame (103)",
            claim_needs_auth
        ),
        case!(
            "8-5.claims-rate-limited",
            "REQ-8-5",
            Must,
            "claims beyond the announced per-claimer burst are rate_limited (900) with retry_after_ms",
            claims_rate_limited
        ),
        case!(
            "8-10.claims-per-pair",
            "REQ-8-10",
            Must,
            "one user claiming one target from several devices is held to the per-pair burst, and another user's claim of that target still passes",
            claims_per_pair
        ),
        case!(
            "8-7.revoked-device",
            "REQ-8-7",
            Must,
            "a revoked device's packages are not handed out",
            revoked_device
        ),
        case!(
            "8-8.own-devices-only",
            "REQ-8-8",
            Must,
            "ListDevices lists the caller's own devices with packages, and nobody else's",
            own_devices_only
        ),
        case!(
            "8-9.listed-devices",
            "REQ-8-9",
            Must,
            "a claim naming devices returns packages of those devices only",
            listed_devices
        ),
    ]
}

/// A ready session for a new member on `kind`.
pub(super) async fn member(
    cx: &Ctx,
    name: &str,
    device: Device,
    kind: usize,
) -> Result<(Peer, Member), Stop> {
    let (peer, ready) = cx.ready(name, &device).await?;
    let member = Member::new(device, PAIR[kind % 2], ready.server_time_ms)?;
    Ok((peer, member))
}

/// Uploads; the answer (stored status or error code).
pub(super) async fn upload(
    peer: &mut Peer,
    rid: u64,
    key_packages: Vec<MlsBytes>,
    last_resort: Option<MlsBytes>,
) -> Result<Result<KeyPackagesStored, ErrorCode>, Stop> {
    peer.send(&ClientFrame::UploadKeyPackages(UploadKeyPackages {
        rid,
        key_packages,
        last_resort,
    }))
    .await?;
    peer.expect("KeyPackagesStored or Error", |f| match f {
        ServerFrame::KeyPackagesStored(s) if s.rid == rid => Some(Ok(s.clone())),
        ServerFrame::Error(e) if e.rid == Some(rid) => Some(Err(e.code)),
        _ => None,
    })
    .await
}

/// Claims; the packages (or the error code).
pub(super) async fn claim(
    peer: &mut Peer,
    rid: u64,
    user: SystemKey,
    devices: Option<Vec<DeviceId>>,
) -> Result<Result<Vec<ClaimedKeyPackage>, ErrorCode>, Stop> {
    peer.send(&ClientFrame::ClaimKeyPackages(ClaimKeyPackages {
        rid,
        user,
        devices,
    }))
    .await?;
    peer.expect("KeyPackagesClaimed or Error", |f| match f {
        ServerFrame::KeyPackagesClaimed(c) if c.rid == rid => Some(Ok(c.claimed.clone())),
        ServerFrame::Error(e) if e.rid == Some(rid) => Some(Err(e.code)),
        _ => None,
    })
    .await
}

pub(super) fn stored(
    answer: Result<KeyPackagesStored, ErrorCode>,
) -> Result<KeyPackagesStored, Stop> {
    answer
        .map_err(|code| Failure::new("KeyPackagesStored", format!("Error {}", code.name())).into())
}

async fn invalid_package(cx: &mut Ctx) -> CaseResult {
    let (mut a, mut m) = member(cx, "a", Device::fresh(), 0).await?;
    let mut packages = m.key_packages(2, false)?;
    let mut tampered = packages[1].as_bytes().to_vec();
    if let Some(last) = tampered.last_mut() {
        *last ^= 1; // inside the signature
    }
    packages[1] = crate::mls::bytes(tampered)?;
    let answer = upload(&mut a, 2, packages, None).await?;
    if answer.as_ref().err() != Some(&ErrorCode::KeyPackageInvalid) {
        return Err(Failure::new("Error 500 key_package_invalid", format!("{answer:?}")).into());
    }
    let status = stored(upload(&mut a, 3, vec![], None).await?)?;
    if status.pool_count != 0 {
        return Err(Failure::new(
            "nothing stored (pool_count 0)",
            format!("pool_count {}", status.pool_count),
        )
        .into());
    }
    Ok(())
}

async fn other_device(cx: &mut Ctx) -> CaseResult {
    let (mut a, _) = member(cx, "a", Device::fresh(), 0).await?;
    let (_b, mut other) = member(cx, "b", Device::fresh(), 1).await?;
    let answer = upload(&mut a, 2, other.key_packages(1, false)?, None).await?;
    if answer.as_ref().err() != Some(&ErrorCode::KeyPackageInvalid) {
        return Err(Failure::new("Error 500 key_package_invalid", format!("{answer:?}")).into());
    }
    Ok(())
}

async fn one_time(cx: &mut Ctx) -> CaseResult {
    let owner = Device::fresh();
    let user = owner.system.public();
    let (mut o, mut m) = member(cx, "owner", owner, 0).await?;
    stored(upload(&mut o, 2, m.key_packages(3, false)?, None).await?)?;
    let (mut c1, _) = cx.ready("claimer1", &Device::fresh()).await?;
    let (mut c2, _) = cx.ready("claimer2", &Device::fresh()).await?;
    let mut seen = HashSet::new();
    for i in 0..3u64 {
        let peer = if i % 2 == 0 { &mut c1 } else { &mut c2 };
        let claimed = claim(peer, 10 + i, user, None).await?;
        let Ok([one]) = claimed.as_deref() else {
            return Err(Failure::new("one package", format!("{claimed:?}")).into());
        };
        if !seen.insert(one.key_package.as_bytes().to_vec()) {
            return Err(Failure::new("a package never handed out before", "a repeat").into());
        }
    }
    let fourth = claim(&mut c1, 20, user, None).await?;
    if fourth.as_ref().err() != Some(&ErrorCode::NoKeyPackages) {
        return Err(Failure::new("Error 501 no_key_packages", format!("{fourth:?}")).into());
    }
    Ok(())
}

async fn last_resort(cx: &mut Ctx) -> CaseResult {
    let owner = Device::fresh();
    let user = owner.system.public();
    let (mut o, mut m) = member(cx, "owner", owner, 1).await?;
    let last = m.key_packages(1, true)?.pop();
    stored(upload(&mut o, 2, m.key_packages(1, false)?, last.clone()).await?)?;
    let (mut c, _) = cx.ready("claimer", &Device::fresh()).await?;
    let mut flags = Vec::new();
    for rid in 10..13 {
        match claim(&mut c, rid, user, None).await? {
            Ok(p) if p.len() == 1 => {
                flags.push((p[0].last_resort, Some(&p[0].key_package) == last.as_ref()))
            }
            other => return Err(Failure::new("one package per claim", format!("{other:?}")).into()),
        }
    }
    if flags != [(false, false), (true, true), (true, true)] {
        return Err(Failure::new(
            "the pool package, then the last-resort package (marked) twice",
            format!("(last_resort, is the last-resort package) per claim: {flags:?}"),
        )
        .into());
    }
    Ok(())
}

async fn last_resort_claimed(cx: &mut Ctx) -> CaseResult {
    let owner = Device::fresh();
    let user = owner.system.public();
    let (mut o, mut m) = member(cx, "owner", owner, 0).await?;
    let last = m.key_packages(1, true)?.pop();
    let before = stored(upload(&mut o, 2, vec![], last).await?)?;
    let (mut c, _) = cx.ready("claimer", &Device::fresh()).await?;
    claim(&mut c, 10, user, None)
        .await?
        .map_err(|code| Failure::new("a claim", code.name()))?;
    let after = stored(upload(&mut o, 3, vec![], None).await?)?;
    let fresh = m.key_packages(1, true)?.pop();
    let renewed = stored(upload(&mut o, 4, vec![], fresh).await?)?;
    let observed = (
        before.last_resort_claimed,
        after.last_resort_claimed,
        renewed.last_resort_claimed,
    );
    if observed != (false, true, false) || !after.last_resort_present {
        return Err(Failure::new(
            "last_resort_claimed false, then true after a claim, false after a new upload",
            format!("{observed:?}"),
        )
        .into());
    }
    Ok(())
}

async fn claim_needs_auth(cx: &mut Ctx) -> CaseResult {
    let mut a = cx.open("a").await?;
    a.send(&ClientFrame::ClaimKeyPackages(ClaimKeyPackages {
        rid: 1,
        user: Device::fresh().system.public(),
        devices: None,
    }))
    .await?;
    a.expect_error(ErrorCode::UnexpectedFrame, None).await?;
    Ok(())
}

async fn claims_rate_limited(cx: &mut Ctx) -> CaseResult {
    let Some((_, burst)) = cx.info.rate_limit("claims_per_claimer") else {
        return Err(Stop::Skipped(
            "/v1/info announces no rate_limits.claims_per_claimer".into(),
        ));
    };
    if burst > 1_000 {
        return Err(Stop::Skipped(format!(
            "claims_per_claimer burst {burst} is over the suite's 1,000"
        )));
    }
    let (mut a, _) = cx.ready("claimer", &Device::fresh()).await?;
    // Targets that do not exist: each claim is cheap and ends no_key_packages until limited.
    for i in 0..burst {
        let target = Device::fresh().system.public();
        match claim(&mut a, 100 + i, target, None).await? {
            Err(ErrorCode::NoKeyPackages) => {}
            other => {
                return Err(Failure::new(
                    format!("no_key_packages for claims 1..={burst}"),
                    format!("claim {}: {other:?}", i + 1),
                )
                .into());
            }
        }
    }
    let rid = 100 + burst;
    a.send(&ClientFrame::ClaimKeyPackages(ClaimKeyPackages {
        rid,
        user: Device::fresh().system.public(),
        devices: None,
    }))
    .await?;
    let limited = a.expect_error(ErrorCode::RateLimited, Some(rid)).await?;
    match limited.retry_after_ms {
        Some(ms) if ms > 0 => Ok(()),
        other => Err(Failure::new("retry_after_ms greater than 0", format!("{other:?}")).into()),
    }
}

async fn claims_per_pair(cx: &mut Ctx) -> CaseResult {
    let limits = ["claims_per_pair", "claims_per_target", "claims_per_claimer"]
        .map(|name| cx.info.rate_limit(name).map(|(_, burst)| burst));
    let [Some(pair), Some(target), Some(claimer)] = limits else {
        return Err(Stop::Skipped(
            "/v1/info does not announce claims_per_pair, claims_per_target and claims_per_claimer"
                .into(),
        ));
    };
    if pair >= target {
        return Err(Failure::new(
            "a claims_per_pair burst below claims_per_target's",
            format!("{pair} and {target}"),
        )
        .into());
    }
    if target > 500 {
        return Err(Stop::Skipped(format!(
            "claims_per_target burst {target} is over the suite's 500"
        )));
    }
    // The target: one device with only a last-resort package, handed out again and again.
    let (mut t, mut tm) = member(cx, "target", Device::fresh(), 0).await?;
    let last_resort = tm.key_packages(1, true)?.pop();
    stored(upload(&mut t, 1, Vec::new(), last_resort).await?)?;
    let user = tm.device.system.public();
    // One claiming user with enough devices to pass the target's burst on the per-device
    // limit alone: each device claims until it is limited.
    let devices = target.div_ceil(claimer.max(1)) + 1;
    let first = Device::fresh();
    let mut granted = 0;
    let mut rid = 10;
    for d in 0..devices {
        let device = if d == 0 {
            first.clone()
        } else {
            first.sibling()
        };
        let (mut a, _) = cx.ready(&format!("claimer device {d}"), &device).await?;
        loop {
            rid += 1;
            match claim(&mut a, rid, user, None).await? {
                Ok(_) => granted += 1,
                Err(ErrorCode::RateLimited) => break,
                Err(code) => {
                    return Err(Failure::new(
                        "KeyPackagesClaimed or rate_limited",
                        format!("Error {}", code.name()),
                    )
                    .into());
                }
            }
            if granted > target {
                break;
            }
        }
    }
    if granted > pair {
        return Err(Failure::new(
            format!("at most claims_per_pair's burst ({pair}) claims of one target by one user"),
            format!("{granted} granted over {devices} devices"),
        )
        .into());
    }
    let (mut b, _) = cx.ready("another claimer", &Device::fresh()).await?;
    match claim(&mut b, 1, user, None).await? {
        Ok(_) => Ok(()),
        Err(code) => Err(Failure::new(
            "another user's claim of the same target granted",
            format!("Error {}", code.name()),
        )
        .into()),
    }
}

async fn revoked_device(cx: &mut Ctx) -> CaseResult {
    let owner = Device::fresh();
    let user = owner.system.public();
    let sibling = owner.sibling();
    let process = owner.process;
    let (mut o, mut m) = member(cx, "owner", owner, 0).await?;
    stored(upload(&mut o, 2, m.key_packages(2, false)?, None).await?)?;
    let (mut s, ready) = cx.ready("sibling", &sibling).await?;
    s.send(&ClientFrame::RevokeDevice(RevokeDevice {
        rid: 3,
        revocation: sibling.system.revoke(process, ready.server_time_ms),
    }))
    .await?;
    s.expect("Ok", |f| {
        matches!(f, ServerFrame::Ok(ok) if ok.rid == 3).then_some(())
    })
    .await?;
    let (mut c, _) = cx.ready("claimer", &Device::fresh()).await?;
    let answer = claim(&mut c, 4, user, None).await?;
    if answer.as_ref().err() != Some(&ErrorCode::NoKeyPackages) {
        return Err(Failure::new("Error 501 no_key_packages", format!("{answer:?}")).into());
    }
    Ok(())
}

/// `ListDevices`: (device, pool_count) as listed.
async fn list_devices(peer: &mut Peer) -> Result<Vec<(DeviceId, u64)>, Stop> {
    peer.send(&ClientFrame::ListDevices(ListDevices { rid: 9 }))
        .await?;
    peer.expect("Devices", |f| match f {
        ServerFrame::Devices(d) if d.rid == 9 => {
            Some(d.devices.iter().map(|d| (d.device, d.pool_count)).collect())
        }
        _ => None,
    })
    .await
}

async fn own_devices_only(cx: &mut Ctx) -> CaseResult {
    let first = Device::fresh();
    let second = first.sibling();
    let (ids, mut expected) = (vec![first.id(), second.id()], Vec::new());
    let (mut a1, mut m1) = member(cx, "a1", first, 0).await?;
    let (mut a2, mut m2) = member(cx, "a2", second, 1).await?;
    stored(upload(&mut a1, 2, m1.key_packages(2, false)?, None).await?)?;
    stored(upload(&mut a2, 2, m2.key_packages(1, false)?, None).await?)?;
    expected.push((ids[0], 2));
    expected.push((ids[1], 1));
    expected.sort();
    let seen = list_devices(&mut a1).await?;
    if seen != expected {
        return Err(Failure::new(format!("{expected:?}"), format!("{seen:?}")).into());
    }
    let (mut b, _) = cx.ready("b", &Device::fresh()).await?;
    let stranger = list_devices(&mut b).await?;
    if !stranger.is_empty() {
        return Err(Failure::new(
            "another user's ListDevices lists none of these",
            format!("{stranger:?}"),
        )
        .into());
    }
    Ok(())
}

async fn listed_devices(cx: &mut Ctx) -> CaseResult {
    let first = Device::fresh();
    let second = first.sibling();
    let user = first.system.public();
    let wanted = second.id();
    let (mut a1, mut m1) = member(cx, "a1", first, 0).await?;
    let (mut a2, mut m2) = member(cx, "a2", second, 1).await?;
    stored(upload(&mut a1, 2, m1.key_packages(1, false)?, None).await?)?;
    stored(upload(&mut a2, 2, m2.key_packages(1, false)?, None).await?)?;
    let (mut c, _) = cx.ready("claimer", &Device::fresh()).await?;
    let claimed = claim(&mut c, 5, user, Some(vec![wanted])).await?;
    match claimed.as_deref() {
        Ok([one]) if one.device == wanted => {}
        other => {
            return Err(
                Failure::new(format!("one package, of {wanted:?}"), format!("{other:?}")).into(),
            );
        }
    }
    // The other device's package is still there.
    let rest = claim(&mut c, 6, user, None).await?;
    match rest.as_deref() {
        Ok([one]) if one.device != wanted => Ok(()),
        other => Err(Failure::new(
            "the other device's package, untouched",
            format!("{other:?}"),
        )
        .into()),
    }
}

async fn detail_without_payload(cx: &mut Ctx) -> CaseResult {
    let device = Device::fresh();
    let key_hex = hex::encode(device.key.public().as_bytes());
    let (mut a, mut m) = member(cx, "a", device, 1).await?;
    let mut package = m.key_packages(1, false)?.remove(0).as_bytes().to_vec();
    if let Some(last) = package.last_mut() {
        *last ^= 1;
    }
    let package_hex = hex::encode(&package);
    a.send(&ClientFrame::UploadKeyPackages(UploadKeyPackages {
        rid: 2,
        key_packages: vec![crate::mls::bytes(package)?],
        last_resort: None,
    }))
    .await?;
    let error = a
        .expect_error(ErrorCode::KeyPackageInvalid, Some(2))
        .await?;
    let Some(detail) = error.detail.map(|d| d.as_str().to_lowercase()) else {
        return Ok(()); // no detail, nothing quoted
    };
    // Any 8 bytes of the package or of the key, as hex, would be a quote.
    let quoted = (0..package_hex.len().saturating_sub(16))
        .step_by(2)
        .map(|i| &package_hex[i..i + 16])
        .chain(
            (0..key_hex.len() - 16)
                .step_by(2)
                .map(|i| &key_hex[i..i + 16]),
        )
        .any(|window| detail.contains(window));
    if quoted {
        return Err(Failure::new("a detail without payload or key bytes", detail).into());
    }
    Ok(())
}
