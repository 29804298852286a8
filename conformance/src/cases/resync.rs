//! SPEC.md 7.10: every Commit publishes the GroupInfo of the epoch it opens, the server
//! verifies and keeps it and serves it to members, and a member device gets back into a
//! conversation by a resync (an external Commit replacing its own leaf).

use confab_client::mls::{EngineKind, Processed};
use confab_spec::ErrorCode;
use confab_spec::ServerFrame;
use confab_spec::frame::{ClientFrame, ErrorFrame, GetGroupInfo, GroupInfoFrame};
use confab_spec::ids::{ConversationId, MsgId};
use confab_spec::mls_framing::{group_info_parts, public_message_parts};

use crate::case;
use crate::case::{Case, CaseResult, Failure, Stop};
use crate::cases::groups::{Pair, update};
use crate::cases::handshake::{accepted, refused};
use crate::cases::log::{Attached, random, send_commit, send_with};
use crate::context::{Ctx, Device, Peer};
use crate::mls::{Member, broken, bytes};

pub(super) fn cases() -> Vec<Case> {
    vec![
        case!(
            "7.10-2.commit-group-info-verified",
            "REQ-7.10-2",
            Must,
            "a Commit without its GroupInfo, with the GroupInfo of the epoch before, or with one whose confirmation tag is not the Commit's, is mls_group_info_invalid (410); with its own it is accepted",
            commit_group_info_verified
        ),
        case!(
            "7.10-3.group-info-kept",
            "REQ-7.10-3",
            Must,
            "GetGroupInfo gives the creation's GroupInfo with seq 0 and epoch 0, then the GroupInfo of the latest Commit with its seq and epoch",
            group_info_kept
        ),
        case!(
            "7.10-4.group-info-members-only",
            "REQ-7.10-4",
            Must,
            "GetGroupInfo is not_member (301) for a device outside the conversation and conversation_not_found (300) for an unknown one; a member gets the tree when the GroupInfo holds none",
            group_info_members_only
        ),
        case!(
            "7.10-5.resync-accepted",
            "REQ-7.10-5",
            Must,
            "a member's external Commit replacing its own leaf is accepted and the others can apply it and read the member after it; one removing another member's leaf is mls_handshake_invalid (411); one from a device outside the conversation is not_member (301)",
            resync_accepted
        ),
    ]
}

/// The conversation's GroupInfo, which `who` must be given.
pub(super) async fn group_info_of(
    peer: &mut Peer,
    rid: u64,
    conversation: ConversationId,
    who: &str,
) -> Result<GroupInfoFrame, Stop> {
    get_group_info(peer, rid, conversation).await?.map_err(|e| {
        Failure::new(
            format!("{who}'s GetGroupInfo answered"),
            format!("Error {}", e.code.name()),
        )
        .into()
    })
}

/// Asks for the conversation's GroupInfo.
async fn get_group_info(
    peer: &mut Peer,
    rid: u64,
    conversation: ConversationId,
) -> Result<Result<GroupInfoFrame, ErrorFrame>, Stop> {
    peer.send(&ClientFrame::GetGroupInfo(GetGroupInfo {
        rid,
        conversation,
    }))
    .await?;
    peer.expect("GroupInfo or Error for the GetGroupInfo", |f| match f {
        ServerFrame::GroupInfo(g) if g.rid == rid => Some(Ok(g.clone())),
        ServerFrame::Error(e) if e.rid == Some(rid) => Some(Err(e.clone())),
        _ => None,
    })
    .await
}

async fn commit_group_info_verified(cx: &mut Ctx) -> CaseResult {
    let mut p = Pair::joined(cx).await?;
    let c = p.conversation;
    // The GroupInfo of the epoch the Commit starts from, signed by the same member.
    let before = bytes(
        p.am.engine
            .group_info(&c)
            .map_err(|e| broken("export a GroupInfo", e))?,
    )?;
    let real = update(&mut p.am, &c)?;
    let commit = bytes(real.commit.clone())?;
    let with = |group_info| Attached {
        welcome: None,
        group_info,
    };
    let answer = send_with(
        &mut p.a,
        3,
        (c, MsgId(random())),
        commit.clone(),
        with(None),
    )
    .await?;
    refused(
        answer,
        ErrorCode::MlsGroupInfoInvalid,
        "a Commit without its GroupInfo",
    )?;
    let answer = send_with(
        &mut p.a,
        4,
        (c, MsgId(random())),
        commit.clone(),
        with(Some(before)),
    )
    .await?;
    refused(
        answer,
        ErrorCode::MlsGroupInfoInvalid,
        "a Commit with the GroupInfo of the epoch before it",
    )?;
    // The right GroupInfo but for its confirmation tag, signed again by the committer.
    let info = real
        .group_info
        .as_deref()
        .ok_or_else(|| broken("publish a GroupInfo", "the engine made none"))?;
    let mut parts = group_info_parts(info).map_err(|e| broken("read a GroupInfo", e))?;
    if let Some(byte) = parts.confirmation_tag.first_mut() {
        *byte ^= 0x01;
    }
    let other_tag = bytes(confab_spec::mls_write::group_info(&parts, &p.am.device.key))?;
    let answer = send_with(
        &mut p.a,
        5,
        (c, MsgId(random())),
        commit,
        with(Some(other_tag)),
    )
    .await?;
    refused(
        answer,
        ErrorCode::MlsGroupInfoInvalid,
        "a Commit with a GroupInfo whose confirmation tag is not the Commit's",
    )?;
    accepted(
        send_commit(&mut p.a, 6, c, MsgId(random()), &real).await?,
        "the same Commit with its own GroupInfo",
    )?;
    Ok(())
}

async fn group_info_kept(cx: &mut Ctx) -> CaseResult {
    let mut p = Pair::new(cx).await?;
    let c = p.conversation;
    let created = get_group_info(&mut p.a, 10, c).await?.map_err(|e| {
        Failure::new(
            "the creation's GroupInfo",
            format!("Error {}", e.code.name()),
        )
    })?;
    if (created.seq, created.epoch.0, &created.group_info) != (0, 0, &p.created_group_info) {
        return Err(Failure::new(
            "seq 0, epoch 0 and the GroupInfo of the CreateConversation",
            format!(
                "seq {}, epoch {}, {} GroupInfo",
                created.seq,
                created.epoch.0,
                if created.group_info == p.created_group_info {
                    "the same"
                } else {
                    "another"
                }
            ),
        )
        .into());
    }
    let kp: Vec<Vec<u8>> =
        p.bm.key_packages(1, false)?
            .iter()
            .map(|k| k.as_bytes().to_vec())
            .collect();
    let add =
        p.am.engine
            .add_members(&c, &kp)
            .map_err(|e| broken("add a member", e))?;
    let seq = accepted(
        send_commit(&mut p.a, 11, c, MsgId(random()), &add).await?,
        "the adding Commit",
    )?;
    let kept = get_group_info(&mut p.a, 12, c)
        .await?
        .map_err(|e| Failure::new("the Commit's GroupInfo", format!("Error {}", e.code.name())))?;
    let published = add.group_info.clone().map(bytes).transpose()?;
    if (kept.seq, kept.epoch.0, Some(&kept.group_info)) != (seq, 1, published.as_ref()) {
        return Err(Failure::new(
            format!("seq {seq}, epoch 1 and the GroupInfo the Commit carried"),
            format!(
                "seq {}, epoch {}, {} GroupInfo",
                kept.seq,
                kept.epoch.0,
                if Some(&kept.group_info) == published.as_ref() {
                    "the same"
                } else {
                    "another"
                }
            ),
        )
        .into());
    }
    Ok(())
}

/// Whether an MLSMessage carrying a GroupInfo holds the `ratchet_tree` extension (type 2).
fn holds_tree(group_info: &[u8]) -> Result<bool, Stop> {
    group_info_parts(group_info)
        .and_then(|p| p.has_extension(2))
        .map_err(|e| broken("read a GroupInfo", e))
}

async fn group_info_members_only(cx: &mut Ctx) -> CaseResult {
    let mut p = Pair::joined(cx).await?;
    let c = p.conversation;
    let outsider = Device::fresh();
    let (mut o, _) = cx.ready("outsider", &outsider).await?;
    let answer = get_group_info(&mut o, 2, c).await?;
    refused(
        answer,
        ErrorCode::NotMember,
        "GetGroupInfo of a device outside it",
    )?;
    let answer = get_group_info(&mut o, 3, ConversationId(random())).await?;
    refused(
        answer,
        ErrorCode::ConversationNotFound,
        "GetGroupInfo of an unknown conversation",
    )?;
    let info = group_info_of(&mut p.b, 10, c, "B").await?;
    if !holds_tree(info.group_info.as_bytes())? && info.ratchet_tree.is_none() {
        return Err(Failure::new(
            "the ratchet tree beside a GroupInfo that holds none",
            "no tree",
        )
        .into());
    }
    Ok(())
}

async fn resync_accepted(cx: &mut Ctx) -> CaseResult {
    let mut p = Pair::joined(cx).await?;
    let c = p.conversation;
    let now = confab_spec::ids::UnixMs(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    );
    // B's resync with its Remove turned to A's leaf and signed again by B: an external
    // Commit removing another member.
    let with_tree =
        p.am.engine
            .group_info(&c)
            .map_err(|e| broken("export a GroupInfo", e))?;
    let leaf_of = |m: &Member| -> Result<u32, Stop> {
        m.engine
            .members(&c)
            .map_err(|e| broken("read the members", e))?
            .into_iter()
            .find(|(_, d)| *d == m.device.id())
            .map(|(l, _)| l)
            .ok_or_else(|| broken("read the members", "a member is not in its group"))
    };
    let (a_leaf, b_leaf) = (leaf_of(&p.am)?, leaf_of(&p.bm)?);
    let mut twin = Member::new(p.bm.device.clone(), EngineKind::MlsRs, now)?;
    let (_, honest) = twin
        .engine
        .join_external(&with_tree, Some(b_leaf), &[])
        .map_err(|e| broken("make an external Commit", e))?;
    let mut parts = public_message_parts(&honest).map_err(|e| broken("read a Commit", e))?;
    // ProposalOrRef `proposal` (1), Proposal `remove` (3), the removed leaf.
    let mut remove = vec![0x01, 0x00, 0x03];
    remove.extend_from_slice(&b_leaf.to_be_bytes());
    let at = parts
        .content
        .windows(remove.len())
        .position(|w| w == remove.as_slice())
        .ok_or_else(|| broken("find the Remove in an external Commit", "absent"))?;
    parts.content[at + 3..at + 7].copy_from_slice(&a_leaf.to_be_bytes());
    let context = confab_spec::mls_write::group_context_of(&with_tree)
        .map_err(|e| broken("read a GroupInfo", e))?;
    parts.signature =
        confab_spec::mls_write::sign_content(&p.bm.device.key, &parts.content, &context);
    let answer = send_with(
        &mut p.b,
        3,
        (c, MsgId(random())),
        bytes(parts.to_message())?,
        Attached::default(),
    )
    .await?;
    refused(
        answer,
        ErrorCode::MlsHandshakeInvalid,
        "B's external Commit removing A's leaf",
    )?;
    // A device outside the conversation joining by itself.
    let stranger = Device::fresh();
    let (mut s, _) = cx.ready("stranger", &stranger).await?;
    let mut sm = Member::new(stranger, EngineKind::MlsRs, now)?;
    let (_, commit) = sm
        .engine
        .join_external(&with_tree, None, &[])
        .map_err(|e| broken("make an external Commit", e))?;
    let answer = send_with(
        &mut s,
        2,
        (c, MsgId(random())),
        bytes(commit)?,
        Attached::default(),
    )
    .await?;
    refused(
        answer,
        ErrorCode::NotMember,
        "an external Commit of a device outside the conversation",
    )?;
    // B's resync from the GroupInfo the server keeps: accepted, and A applies it.
    let info = group_info_of(&mut p.b, 10, c, "B").await?;
    let resync =
        p.bm.engine
            .resync(
                &c,
                info.group_info.as_bytes(),
                info.ratchet_tree.as_ref().map(|t| t.as_bytes()),
            )
            .map_err(|e| {
                Failure::new(
                    "a GroupInfo and tree a member can resync from",
                    e.to_string(),
                )
            })?;
    accepted(
        send_commit(&mut p.b, 11, c, MsgId(random()), &resync).await?,
        "B's resync",
    )?;
    match p.am.engine.process(&c, &resync.commit) {
        Ok(Processed::Commit { .. }) => {}
        other => return Err(broken("apply B's resync", format!("{other:?}"))),
    }
    let message =
        p.bm.engine
            .encrypt(&c, b"back in")
            .map_err(|e| broken("encrypt", e))?;
    accepted(
        send_with(
            &mut p.b,
            12,
            (c, MsgId(random())),
            bytes(message.clone())?,
            Attached::default(),
        )
        .await?,
        "B's message after its resync",
    )?;
    match p.am.engine.process(&c, &message) {
        Ok(Processed::Application { plaintext, .. }) if plaintext == b"back in" => Ok(()),
        other => Err(broken("read B's message", format!("{other:?}"))),
    }
}
