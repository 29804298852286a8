//! SPEC.md section 9: presence leases, watching, share lists and blocklists, buckets and
//! the per-target rate limit. Cases that wait for a transition need the server's
//! `presence_jitter_ms` (and for a lapse `presence_ttl_min_ms + presence_grace_ms`) to be
//! short; they are skipped with that reason otherwise. The reference gateway's conformance
//! profile sets them to a few seconds.

use std::time::{Duration, Instant};

use confab_spec::ErrorCode;
use confab_spec::ServerFrame;
use confab_spec::frame::{
    ClientFrame, ErrorFrame, Heartbeat, PresenceLease, PresenceLists, PresenceMode, PresenceState,
    SetPresence, UpdatePresenceLists, WatchPresence,
};
use confab_spec::ids::SystemKey;

use crate::case;
use crate::case::{Case, CaseResult, Failure, Stop};
use crate::context::{Ctx, Device, Observed, Peer, describe_error};
use crate::info::PresenceInfo;

/// Longest transition wait the suite accepts (jitter, or lease plus grace plus jitter).
const WAIT_MAX: Duration = Duration::from_secs(20);
/// Slack on top of a server's announced times: processing (one second, REQ-9.1-2) and
/// the network.
const SLACK: Duration = Duration::from_millis(4_000);

/// The cases of section 9.
pub fn cases() -> Vec<Case> {
    vec![
        case!(
            "9.1-1.lease-clamped",
            "REQ-9.1-1",
            Must,
            "SetPresence is answered with the lease clamped to the announced bounds, 0 for offline",
            lease_clamped
        ),
        case!(
            "9.1-2.lapse-published",
            "REQ-9.1-2",
            Must,
            "a lease that is not renewed is published offline within ttl + grace + jitter",
            lapse_published
        ),
        case!(
            "9.1-3.invisible",
            "REQ-9.1-3",
            Must,
            "invisible mode is published as going offline and stays so while renewed",
            invisible
        ),
        case!(
            "9.2-1.share-list-only",
            "REQ-9.2-1",
            Must,
            "a target is visible to its share list and itself, unavailable to others",
            share_list_only
        ),
        case!(
            "9.2-2.like-nobody",
            "REQ-9.2-2",
            Must,
            "an online user that shares nothing is answered exactly like a key nobody holds",
            like_nobody
        ),
        case!(
            "9.2-3.watchlist-cap",
            "REQ-9.2-3",
            Must,
            "a watchlist over watchlist_max is watchlist_too_large (600); the old one stays",
            watchlist_cap
        ),
        case!(
            "9.2-4.changes-only",
            "REQ-9.2-4",
            Must,
            "PresenceChanged comes for a change, and not for a renewal",
            changes_only
        ),
        case!(
            "9.3-1.block-at-once",
            "REQ-9.3-1",
            Must,
            "blocking a watcher tells it unavailable at once and nothing after",
            block_at_once
        ),
        case!(
            "9.3-2.list-cap",
            "REQ-9.3-2",
            Must,
            "a share list over presence_list_max is presence_list_full (601) and unchanged",
            list_cap
        ),
        case!(
            "9.4-1.buckets",
            "REQ-9.4-1",
            Must,
            "a user who just went offline is in the within_hour bucket",
            buckets
        ),
        case!(
            "9.5-1.per-target-alike",
            "REQ-9.5-1",
            Must,
            "rotating watchers are limited per target the same for a user and for a key nobody holds",
            per_target_alike
        ),
    ]
}

fn settings(cx: &Ctx) -> Result<PresenceInfo, Stop> {
    cx.info
        .presence
        .clone()
        .ok_or_else(|| Stop::Skipped("/v1/info announces no presence settings".into()))
}

/// The longest time a transition takes to be published, if the suite can wait for it.
fn transition_wait(cx: &Ctx) -> Result<Duration, Stop> {
    let p = settings(cx)?;
    let wait = Duration::from_millis(p.presence_jitter_ms) + SLACK;
    if wait > WAIT_MAX {
        return Err(Stop::Skipped(format!(
            "presence_jitter_ms {} is over the suite's {} s wait",
            p.presence_jitter_ms,
            WAIT_MAX.as_secs()
        )));
    }
    Ok(wait)
}

async fn set(
    peer: &mut Peer,
    rid: u64,
    mode: PresenceMode,
    ttl_ms: u64,
) -> Result<PresenceLease, Stop> {
    peer.send(&ClientFrame::SetPresence(SetPresence { rid, mode, ttl_ms }))
        .await?;
    peer.expect("PresenceLease", |f| match f {
        ServerFrame::PresenceLease(l) if l.rid == rid => Some(l.clone()),
        _ => None,
    })
    .await
}

async fn watch(
    peer: &mut Peer,
    rid: u64,
    targets: Vec<SystemKey>,
) -> Result<Result<Vec<PresenceState>, ErrorFrame>, Stop> {
    let n = targets.len();
    peer.send(&ClientFrame::WatchPresence(WatchPresence { rid, targets }))
        .await?;
    let answer = peer
        .expect("PresenceStates or Error", |f| match f {
            ServerFrame::PresenceStates(s) if s.rid == rid => {
                Some(Ok(s.states.iter().map(|s| s.state).collect::<Vec<_>>()))
            }
            ServerFrame::Error(e) if e.rid == Some(rid) => Some(Err(e.clone())),
            _ => None,
        })
        .await?;
    if let Ok(states) = &answer {
        if states.len() != n {
            return Err(Failure::new(
                format!("PresenceStates with {n} states, in the order requested"),
                format!("{} states", states.len()),
            )
            .into());
        }
    }
    Ok(answer)
}

async fn watch_ok(
    peer: &mut Peer,
    rid: u64,
    targets: Vec<SystemKey>,
) -> Result<Vec<PresenceState>, Stop> {
    watch(peer, rid, targets)
        .await?
        .map_err(|e| Failure::new("PresenceStates", describe_error(&e)).into())
}

async fn lists(
    peer: &mut Peer,
    rid: u64,
    share: Vec<SystemKey>,
    block: Vec<SystemKey>,
) -> Result<Result<PresenceLists, ErrorFrame>, Stop> {
    let some = |v: Vec<SystemKey>| (!v.is_empty()).then_some(v);
    peer.send(&ClientFrame::UpdatePresenceLists(UpdatePresenceLists {
        rid,
        share: some(share),
        unshare: None,
        block: some(block),
        unblock: None,
    }))
    .await?;
    peer.expect("PresenceLists or Error", |f| match f {
        ServerFrame::PresenceLists(l) if l.rid == rid => Some(Ok(l.clone())),
        ServerFrame::Error(e) if e.rid == Some(rid) => Some(Err(e.clone())),
        _ => None,
    })
    .await
}

async fn share(peer: &mut Peer, rid: u64, with: Vec<SystemKey>) -> Result<(), Stop> {
    lists(peer, rid, with, vec![])
        .await?
        .map(|_| ())
        .map_err(|e| Failure::new("PresenceLists", describe_error(&e)).into())
}

/// How often a waiting case sends heartbeats, well inside any heartbeat timeout the
/// suite accepts.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(800);

/// Sends a heartbeat on `peer` and on `also`, so that neither session times out while a
/// case waits for a transition (their acks are skipped by later reads).
async fn keep_alive(peer: &mut Peer, also: &mut Option<&mut Peer>) -> Result<(), Stop> {
    let beat = ClientFrame::Heartbeat(Heartbeat { nonce: 1 });
    peer.send(&beat).await?;
    if let Some(other) = also {
        other.send(&beat).await?;
    }
    Ok(())
}

/// Waits up to `within` for `PresenceChanged` of `target` to `state` while keeping `peer`
/// and `also` alive; other presence changes of the target on the way are allowed and
/// returned.
async fn changed_to(
    peer: &mut Peer,
    mut also: Option<&mut Peer>,
    target: SystemKey,
    state: PresenceState,
    within: Duration,
) -> Result<Vec<PresenceState>, Stop> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Failure::new(
                format!(
                    "PresenceChanged {} within {} ms",
                    state.name(),
                    within.as_millis()
                ),
                format!("changes seen: {seen:?}, then nothing"),
            )
            .into());
        }
        match peer.next(left.min(HEARTBEAT_EVERY)).await {
            Observed::Frame(ServerFrame::PresenceChanged(c)) if c.target == target => {
                seen.push(c.state);
                if c.state == state {
                    return Ok(seen);
                }
            }
            Observed::Frame(ServerFrame::HeartbeatAck(_)) => {}
            Observed::Silence => keep_alive(peer, &mut also).await?,
            other => {
                return Err(Failure::new(
                    format!("PresenceChanged {}", state.name()),
                    other.to_string(),
                )
                .into());
            }
        }
    }
}

/// Nothing about presence may arrive for `wait` (heartbeats keep `peer` alive).
async fn no_change(peer: &mut Peer, wait: Duration, expected: &str) -> Result<(), Stop> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        match peer.next(left.min(HEARTBEAT_EVERY)).await {
            Observed::Silence => keep_alive(peer, &mut None).await?,
            Observed::Frame(ServerFrame::HeartbeatAck(_)) => {}
            other => return Err(Failure::new(expected, other.to_string()).into()),
        }
    }
}

/// A target that shares with a watcher, and the watcher's peer watching it; what the
/// watcher was first told.
async fn sharing_pair(cx: &Ctx) -> Result<(Peer, Device, Peer, Device, Vec<PresenceState>), Stop> {
    let target = Device::fresh();
    let watcher = Device::fresh();
    let (mut t, _) = cx.ready("target", &target).await?;
    let (mut w, _) = cx.ready("watcher", &watcher).await?;
    share(&mut t, 1, vec![watcher.system.public()]).await?;
    let first = watch_ok(&mut w, 2, vec![target.system.public()]).await?;
    Ok((t, target, w, watcher, first))
}

/// The target goes online (request `rid`) and the watcher sees it within `wait`.
async fn go_online(
    t: &mut Peer,
    w: &mut Peer,
    target: &Device,
    rid: u64,
    wait: Duration,
) -> Result<(), Stop> {
    set(t, rid, PresenceMode::Online, 60_000).await?;
    changed_to(
        w,
        Some(t),
        target.system.public(),
        PresenceState::Online,
        wait,
    )
    .await?;
    Ok(())
}

/// A target that shares with `watcher` and is published online, and the watcher's peer
/// watching it.
async fn online_pair(cx: &Ctx, wait: Duration) -> Result<(Peer, Device, Peer, Device), Stop> {
    let (mut t, target, mut w, watcher, first) = sharing_pair(cx).await?;
    if first != [PresenceState::Longer] {
        return Err(Failure::new(
            "longer for a contact never seen online",
            format!("{first:?}"),
        )
        .into());
    }
    go_online(&mut t, &mut w, &target, 3, wait).await?;
    Ok((t, target, w, watcher))
}

async fn lease_clamped(cx: &mut Ctx) -> CaseResult {
    let p = settings(cx)?;
    let (mut a, _) = cx.ready("device", &Device::fresh()).await?;
    let checks = [
        (PresenceMode::Online, 1, p.presence_ttl_min_ms),
        (PresenceMode::Invisible, u64::MAX / 2, p.presence_ttl_max_ms),
        (PresenceMode::Offline, 60_000, 0),
    ];
    for (i, (mode, asked, granted)) in checks.into_iter().enumerate() {
        let lease = set(&mut a, 10 + i as u64, mode, asked).await?;
        if lease.ttl_ms != granted || lease.mode != mode {
            return Err(Failure::new(
                format!("PresenceLease {mode:?} ttl_ms {granted} for a request of {asked}"),
                format!("{:?} ttl_ms {}", lease.mode, lease.ttl_ms),
            )
            .into());
        }
    }
    Ok(())
}

async fn lapse_published(cx: &mut Ctx) -> CaseResult {
    let p = settings(cx)?;
    let wait = transition_wait(cx)?;
    let lapse = Duration::from_millis(p.presence_ttl_min_ms + p.presence_grace_ms) + wait;
    if lapse > WAIT_MAX {
        return Err(Stop::Skipped(format!(
            "presence_ttl_min_ms + presence_grace_ms + presence_jitter_ms is over the suite's {} s",
            WAIT_MAX.as_secs()
        )));
    }
    let (mut t, target, mut w, _) = online_pair(cx, wait).await?;
    // The shortest lease, not renewed.
    set(&mut t, 4, PresenceMode::Online, 1).await?;
    changed_to(
        &mut w,
        None,
        target.system.public(),
        PresenceState::WithinHour,
        lapse,
    )
    .await?;
    Ok(())
}

async fn invisible(cx: &mut Ctx) -> CaseResult {
    let wait = transition_wait(cx)?;
    let (mut t, target, mut w, _) = online_pair(cx, wait).await?;
    set(&mut t, 4, PresenceMode::Invisible, 60_000).await?;
    changed_to(
        &mut w,
        Some(&mut t),
        target.system.public(),
        PresenceState::WithinHour,
        wait,
    )
    .await?;
    // Renewing an invisible lease changes nothing a watcher sees.
    for rid in 5..8 {
        set(&mut t, rid, PresenceMode::Invisible, 60_000).await?;
    }
    no_change(
        &mut w,
        wait,
        "no PresenceChanged while the target stays invisible",
    )
    .await
}

async fn share_list_only(cx: &mut Ctx) -> CaseResult {
    let wait = transition_wait(cx)?;
    let (mut t, target, _w, _) = online_pair(cx, wait).await?;
    let (mut stranger, _) = cx.ready("stranger", &Device::fresh()).await?;
    let key = target.system.public();
    let seen = watch_ok(&mut stranger, 10, vec![key]).await?;
    if seen != [PresenceState::Unavailable] {
        return Err(Failure::new(
            "unavailable to a user not on the share list",
            format!("{seen:?}"),
        )
        .into());
    }
    let own = watch_ok(&mut t, 11, vec![key]).await?;
    if own != [PresenceState::Online] {
        return Err(Failure::new("online to the target's own user", format!("{own:?}")).into());
    }
    Ok(())
}

async fn like_nobody(cx: &mut Ctx) -> CaseResult {
    let wait = transition_wait(cx)?;
    // An online user with a share list that does not name the watcher.
    let (_t, target, _w, _) = online_pair(cx, wait).await?;
    let nobody = Device::fresh().system.public();
    let (mut stranger, _) = cx.ready("stranger", &Device::fresh()).await?;
    let one = watch(&mut stranger, 10, vec![target.system.public()]).await?;
    let other = watch(&mut stranger, 11, vec![nobody]).await?;
    let both = watch(&mut stranger, 12, vec![target.system.public(), nobody]).await?;
    let answer = |a: &Result<Vec<PresenceState>, ErrorFrame>| match a {
        Ok(s) => format!("{s:?}"),
        Err(e) => describe_error(e),
    };
    if one != other
        || one != Ok(vec![PresenceState::Unavailable])
        || both != Ok(vec![PresenceState::Unavailable; 2])
    {
        return Err(Failure::new(
            "[Unavailable] for the user and for nobody, [Unavailable, Unavailable] for both",
            format!(
                "user {}, nobody {}, both {}",
                answer(&one),
                answer(&other),
                answer(&both)
            ),
        )
        .into());
    }
    no_change(&mut stranger, wait, "no PresenceChanged to a stranger").await
}

async fn watchlist_cap(cx: &mut Ctx) -> CaseResult {
    let wait = transition_wait(cx)?;
    let Some(max) = cx.info.limits.watchlist_max else {
        return Err(Stop::Skipped(
            "/v1/info announces no limits.watchlist_max".into(),
        ));
    };
    if max >= cx.info.limits.collection_len_max {
        return Err(Stop::Skipped(format!(
            "watchlist_max {max} does not fit one frame under collection_len_max"
        )));
    }
    let (mut t, target, mut w, _, _) = sharing_pair(cx).await?;
    let over: Vec<SystemKey> = (0..=max).map(|_| Device::fresh().system.public()).collect();
    match watch(&mut w, 3, over).await? {
        Err(e) if e.code == ErrorCode::WatchlistTooLarge => {}
        other => {
            return Err(Failure::new(
                format!("Error 600 watchlist_too_large for {} targets", max + 1),
                match other {
                    Ok(s) => format!("PresenceStates with {} states", s.len()),
                    Err(e) => describe_error(&e),
                },
            )
            .into());
        }
    }
    // The previous watchlist is still in force.
    go_online(&mut t, &mut w, &target, 4, wait).await
}

async fn changes_only(cx: &mut Ctx) -> CaseResult {
    let wait = transition_wait(cx)?;
    let (mut t, _, mut w, _) = online_pair(cx, wait).await?;
    for rid in 10..14 {
        set(&mut t, rid, PresenceMode::Online, 60_000).await?;
    }
    no_change(&mut w, wait, "no PresenceChanged for lease renewals").await
}

async fn block_at_once(cx: &mut Ctx) -> CaseResult {
    let wait = transition_wait(cx)?;
    let (mut t, target, mut w, watcher) = online_pair(cx, wait).await?;
    match lists(&mut t, 10, vec![], vec![watcher.system.public()]).await? {
        Ok(l) if l.blocked.contains(&watcher.system.public()) => {}
        other => {
            return Err(Failure::new(
                "PresenceLists naming the blocked user",
                format!("{other:?}"),
            )
            .into());
        }
    }
    // At once: well within the jitter a transition could take.
    changed_to(
        &mut w,
        Some(&mut t),
        target.system.public(),
        PresenceState::Unavailable,
        SLACK,
    )
    .await?;
    set(&mut t, 11, PresenceMode::Offline, 0).await?;
    no_change(&mut w, wait, "nothing more for a blocked watcher").await
}

async fn list_cap(cx: &mut Ctx) -> CaseResult {
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
    match lists(&mut a, 1, full, vec![]).await? {
        Ok(l) if l.shared.len() as u64 == max => {}
        other => {
            return Err(Failure::new(
                format!("a share list of {max} accepted"),
                match other {
                    Ok(l) => format!("{} shared", l.shared.len()),
                    Err(e) => describe_error(&e),
                },
            )
            .into());
        }
    }
    match lists(&mut a, 2, vec![Device::fresh().system.public()], vec![]).await? {
        Err(e) if e.code == ErrorCode::PresenceListFull => {}
        other => {
            return Err(Failure::new("Error 601 presence_list_full", format!("{other:?}")).into());
        }
    }
    match lists(&mut a, 3, vec![], vec![]).await? {
        Ok(l) if l.shared.len() as u64 == max => Ok(()),
        other => Err(Failure::new(
            format!("the share list unchanged at {max}"),
            format!("{:?}", other.map(|l| l.shared.len())),
        )
        .into()),
    }
}

async fn buckets(cx: &mut Ctx) -> CaseResult {
    let wait = transition_wait(cx)?;
    let (mut t, target, mut w, _) = online_pair(cx, wait).await?;
    set(&mut t, 10, PresenceMode::Offline, 0).await?;
    let seen = changed_to(
        &mut w,
        Some(&mut t),
        target.system.public(),
        PresenceState::WithinHour,
        wait,
    )
    .await?;
    if seen != [PresenceState::WithinHour] {
        return Err(Failure::new("online, then within_hour", format!("{seen:?}")).into());
    }
    let again = watch_ok(&mut w, 11, vec![target.system.public()]).await?;
    if again != [PresenceState::WithinHour] {
        return Err(Failure::new("within_hour when watched again", format!("{again:?}")).into());
    }
    Ok(())
}

async fn per_target_alike(cx: &mut Ctx) -> CaseResult {
    let Some((_, burst)) = cx.info.rate_limit("presence_new_watchers_per_target") else {
        return Err(Stop::Skipped(
            "/v1/info announces no rate_limits.presence_new_watchers_per_target".into(),
        ));
    };
    if burst > 100 {
        return Err(Stop::Skipped(format!(
            "presence_new_watchers_per_target burst {burst} is over the suite's 100"
        )));
    }
    let target = Device::fresh();
    let (mut t, _) = cx.ready("target", &target).await?;
    set(&mut t, 1, PresenceMode::Online, 60_000).await?;
    share(&mut t, 2, vec![Device::fresh().system.public()]).await?;
    let nobody = Device::fresh().system.public();
    let mut refused_at = None;
    for i in 0..=burst {
        let mut answers = Vec::new();
        for key in [target.system.public(), nobody] {
            let (mut bot, _) = cx.ready("bot", &Device::fresh()).await?;
            answers.push(match watch(&mut bot, 1, vec![key]).await? {
                Ok(states) => Ok(states),
                Err(e) if e.code == ErrorCode::RateLimited && e.retry_after_ms.is_some() => {
                    Err(e.code)
                }
                Err(e) => {
                    return Err(
                        Failure::new("PresenceStates or rate_limited", describe_error(&e)).into(),
                    );
                }
            });
        }
        if answers[0] != answers[1] {
            return Err(Failure::new(
                "the same answer for a user and for a key nobody holds",
                format!(
                    "watcher {}: user {:?}, nobody {:?}",
                    i + 1,
                    answers[0],
                    answers[1]
                ),
            )
            .into());
        }
        if answers[0].is_err() {
            refused_at = Some(i + 1);
            break;
        }
    }
    match refused_at {
        Some(_) => Ok(()),
        None => Err(Failure::new(
            format!("rate_limited by watcher {} (burst {burst})", burst + 1),
            "every watcher was answered",
        )
        .into()),
    }
}
