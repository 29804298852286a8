//! SPEC.md 6.1 and 7.7: the server verifies the GroupInfo a conversation starts from and
//! every handshake message against the group's public state, so that no member can break a
//! conversation. The hostile member writes its own MLS messages ([`confab_spec::mls_write`]):
//! an unsigned Commit, a Commit signed with another member's key, an Add of a forged or
//! expired KeyPackage, a Remove without a path, each signed correctly where only the one
//! flaw should be refused. Groups mix the engines: A runs openmls, B mls-rs.

use confab_spec::ErrorCode;
use confab_spec::ServerFrame;
use confab_spec::frame::{
    ClientFrame, ConversationKind, CreateConversation, ErrorFrame, RevokeDevice,
};
use confab_spec::identity::DeviceKeyPair;
use confab_spec::ids::{ConversationId, MlsBytes, MsgId, UnixMs};
use confab_spec::mls_write::{self, WriteCommit, WriteProposal};
use confab_spec::session::DeviceCredentials;

use crate::case;
use crate::case::{Case, CaseResult, Failure, Stop};
use crate::cases::groups::{Pair, update};
use crate::cases::log::{Attached, random, send_commit, send_mls, send_with};
use crate::context::{Ctx, Device, Peer};
use crate::mls::{Member, broken, bytes};

/// The cases of SPEC.md 6.1 (the GroupInfo) and 7.5 and 7.7 (verification).
pub fn cases() -> Vec<Case> {
    vec![
        case!(
            "6.1-3.group-info-verified",
            "REQ-6.1-3",
            Must,
            "a GroupInfo that is a KeyPackage, another device's group, another group id, a room without roles or badly signed is mls_group_info_invalid (410) and creates nothing",
            group_info_verified
        ),
        case!(
            "6.1-2.removed-member-commit",
            "REQ-6.1-2",
            Must,
            "a Commit from a device removed from the conversation is not_member (301)",
            removed_member_commit
        ),
        case!(
            "7.5-3.welcome-verified",
            "REQ-7.5-3",
            Must,
            "a Commit adding a device whose Welcome is a KeyPackage, or a Welcome for another KeyPackage, is mls_welcome_invalid (413)",
            welcome_verified
        ),
        case!(
            "7.6-4.joiner-reads-from-its-commit",
            "REQ-7.6-4",
            Must,
            "a device added after two messages cannot subscribe from seq 1 (not_member); without from_seq its subscription starts after the Commit that added it",
            joiner_reads_from_its_commit
        ),
        case!(
            "7.7-1.state-follows-commits",
            "REQ-7.7-1",
            Must,
            "a member added by an accepted Commit can commit next, and the adder after it: the tracked state moved with each Commit",
            state_follows_commits
        ),
        case!(
            "7.7-2.unsigned-commit",
            "REQ-7.7-2",
            Must,
            "an empty Commit without signature, path or tags is mls_signature_invalid (409) and the group goes on",
            unsigned_commit
        ),
        case!(
            "7.7-2.commit-signed-by-another-member",
            "REQ-7.7-2",
            Must,
            "a member's Commit signed with another member's key is mls_signature_invalid (409)",
            commit_signed_by_another_member
        ),
        case!(
            "7.7-3.add-forged-key-package",
            "REQ-7.7-3",
            Must,
            "a signed Commit adding a KeyPackage whose signature is broken is mls_key_package_invalid (412)",
            add_forged_key_package
        ),
        case!(
            "7.7-3.add-expired-or-revoked-certificate",
            "REQ-7.7-3",
            Must,
            "a Commit adding a KeyPackage whose certificate expired, or whose device was revoked, is mls_key_package_invalid (412)",
            add_expired_or_revoked_certificate
        ),
        case!(
            "7.7-4.remove-without-path",
            "REQ-7.7-4",
            Must,
            "a signed Commit removing a member without a path, and a standalone Update proposal, are mls_handshake_invalid (411)",
            remove_without_path
        ),
    ]
}

/// The group context of `m`'s current epoch in `conversation`, read from a GroupInfo.
fn context(m: &mut Member, conversation: &ConversationId) -> Result<Vec<u8>, Stop> {
    let info = m
        .engine
        .group_info(conversation)
        .map_err(|e| broken("export a GroupInfo", e))?;
    mls_write::group_context_of(&info).map_err(|e| broken("read a GroupInfo", e))
}

/// A Commit of the member at `leaf`, written by hand and signed with `key` in the epoch
/// whose context is `context`.
fn forged_commit(
    conversation: &ConversationId,
    epoch: u64,
    leaf: u32,
    commit: &WriteCommit,
    key: &DeviceKeyPair,
    context: &[u8],
) -> Result<MlsBytes, Stop> {
    let content = mls_write::commit_content(&conversation.0, epoch, leaf, commit);
    let signature = mls_write::sign_content(key, &content, context);
    bytes(mls_write::public_message(&content, &signature, true))
}

fn epoch_of(m: &Member, conversation: &ConversationId) -> Result<u64, Stop> {
    m.engine
        .epoch(conversation)
        .map_err(|e| broken("read the epoch", e))
}

/// The answer to a `Send` must be the Error `code`.
pub(crate) fn refused<T: Answer>(
    answer: Result<T, ErrorFrame>,
    code: ErrorCode,
    what: &str,
) -> Result<(), Stop> {
    match answer {
        Err(e) if e.code == code => Ok(()),
        Err(e) => Err(Failure::new(
            format!("{what}: Error {} {}", code.value(), code.name()),
            format!("Error {} {}", e.code.value(), e.code.name()),
        )
        .into()),
        Ok(answer) => Err(Failure::new(
            format!("{what}: Error {} {}", code.value(), code.name()),
            answer.describe(),
        )
        .into()),
    }
}

/// A request's answer other than an `Error`, as a failure names it.
pub(crate) trait Answer {
    /// What the server answered.
    fn describe(&self) -> String;
}

/// A `Send`'s `Accepted`: `(seq, duplicate)`.
impl Answer for (u64, bool) {
    fn describe(&self) -> String {
        format!("Accepted at seq {}", self.0)
    }
}

impl Answer for confab_spec::frame::GroupInfoFrame {
    fn describe(&self) -> String {
        format!("a GroupInfo (epoch {}, seq {})", self.epoch.0, self.seq)
    }
}

/// The answer to a `Send` must be `Accepted`.
pub(crate) fn accepted(answer: Result<(u64, bool), ErrorFrame>, what: &str) -> Result<u64, Stop> {
    answer.map(|(seq, _)| seq).map_err(|e| {
        Failure::new(
            format!("{what}: Accepted"),
            format!("Error {} {}", e.code.value(), e.code.name()),
        )
        .into()
    })
}

/// Sends a `CreateConversation`; `Ok` for `Created`, the code of an `Error`.
async fn create(peer: &mut Peer, frame: &ClientFrame) -> Result<Result<(), ErrorCode>, Stop> {
    let rid = frame.rid().unwrap_or(0);
    peer.send(frame).await?;
    peer.expect("Created or Error", |f| match f {
        ServerFrame::Created(c) if c.rid == rid => Some(Ok(())),
        ServerFrame::Error(e) if e.rid == Some(rid) => Some(Err(e.code)),
        _ => None,
    })
    .await
}

fn creation(
    rid: u64,
    conversation: ConversationId,
    kind: ConversationKind,
    group_info: Vec<u8>,
) -> Result<ClientFrame, Stop> {
    Ok(ClientFrame::CreateConversation(CreateConversation {
        rid,
        conversation,
        kind,
        group_info: bytes(group_info)?,
    }))
}

async fn group_info_verified(cx: &mut Ctx) -> CaseResult {
    let da = Device::fresh();
    let (mut a, ready) = cx.ready("a", &da).await?;
    let now = ready.server_time_ms;
    let mut am = Member::new(da, crate::mls::PAIR[0], now)?;
    let mut other = Member::new(Device::fresh(), crate::mls::PAIR[1], now)?;
    let refuse = |what: &'static str, frame: ClientFrame| (what, frame);
    let taken = ConversationId(random());
    let mut variants = Vec::new();
    // A KeyPackage where the GroupInfo belongs.
    let key_package = am.key_packages(1, false)?;
    let kp = key_package
        .first()
        .ok_or_else(|| broken("make a KeyPackage", "none"))?;
    variants.push(refuse(
        "a KeyPackage as group_info",
        creation(
            0,
            ConversationId(random()),
            ConversationKind::DirectMessage,
            kp.as_bytes().to_vec(),
        )?,
    ));
    // Another device's group, for the id A then creates properly.
    let theirs = other
        .engine
        .create_group(&taken)
        .map_err(|e| broken("create a group", e))?;
    variants.push(refuse(
        "the GroupInfo of another device's group",
        creation(0, taken, ConversationKind::DirectMessage, theirs)?,
    ));
    // A's own group, under another conversation id.
    let elsewhere = ConversationId(random());
    let info = am
        .engine
        .create_group(&elsewhere)
        .map_err(|e| broken("create a group", e))?;
    variants.push(refuse(
        "the GroupInfo of a group with another id",
        creation(
            0,
            ConversationId(random()),
            ConversationKind::DirectMessage,
            info,
        )?,
    ));
    // A room whose group context has no roles.
    let bare = ConversationId(random());
    let info = am
        .engine
        .create_group(&bare)
        .map_err(|e| broken("create a group", e))?;
    variants.push(refuse(
        "a room whose group context has no roles",
        creation(0, bare, ConversationKind::Room, info)?,
    ));
    // A's own group with its GroupInfo's signature broken (its last byte).
    let flipped = ConversationId(random());
    let mut info = am
        .engine
        .create_group(&flipped)
        .map_err(|e| broken("create a group", e))?;
    if let Some(last) = info.last_mut() {
        *last ^= 0x01;
    }
    variants.push(refuse(
        "a GroupInfo whose signature does not verify",
        creation(0, flipped, ConversationKind::DirectMessage, info)?,
    ));
    for (i, (what, frame)) in variants.into_iter().enumerate() {
        let ClientFrame::CreateConversation(mut c) = frame else {
            continue;
        };
        c.rid = 10 + i as u64;
        match create(&mut a, &ClientFrame::CreateConversation(c)).await? {
            Err(ErrorCode::MlsGroupInfoInvalid) => {}
            other => {
                return Err(Failure::new(
                    format!("{what}: Error 410 mls_group_info_invalid"),
                    format!("{other:?}"),
                )
                .into());
            }
        }
    }
    // The refusals created nothing: the id of the refused foreign group is still free.
    let frame = am.create_frame(30, taken, ConversationKind::DirectMessage, &[])?;
    match create(&mut a, &frame).await? {
        Ok(()) => Ok(()),
        Err(code) => Err(Failure::new(
            "A's own GroupInfo for the id a refused GroupInfo named: Created",
            format!("Error {} {}", code.value(), code.name()),
        )
        .into()),
    }
}

async fn removed_member_commit(cx: &mut Ctx) -> CaseResult {
    let mut p = Pair::joined(cx).await?;
    let c = p.conversation;
    // B prepares a Commit in epoch 1; A then removes B.
    let theirs = update(&mut p.bm, &c)?;
    let removal =
        p.am.engine
            .remove_members(&c, &[p.bm.device.id()])
            .map_err(|e| broken("remove a member", e))?;
    accepted(
        send_commit(&mut p.a, 3, c, MsgId(random()), &removal).await?,
        "A's Commit removing B",
    )?;
    let answer = send_commit(&mut p.b, 4, c, MsgId(random()), &theirs).await?;
    refused(answer, ErrorCode::NotMember, "a Commit of the removed B")
}

async fn welcome_verified(cx: &mut Ctx) -> CaseResult {
    let mut p = Pair::new(cx).await?;
    let c = p.conversation;
    let kps = p.bm.key_packages(2, false)?;
    let (Some(first), Some(second)) = (kps.first(), kps.get(1)) else {
        return Err(broken("make KeyPackages", "too few"));
    };
    let add =
        p.am.engine
            .add_members(&c, &[first.as_bytes().to_vec()])
            .map_err(|e| broken("add a member", e))?;
    let commit = bytes(add.commit.clone())?;
    let group_info = Attached::of(&add)?.group_info;
    // The KeyPackage itself as the Welcome.
    let answer = send_mls(
        &mut p.a,
        2,
        c,
        MsgId(random()),
        commit.clone(),
        Some(first.clone()),
    )
    .await?;
    refused(
        answer,
        ErrorCode::MlsWelcomeInvalid,
        "a KeyPackage as the Welcome",
    )?;
    // A real Welcome, for the other KeyPackage: from a Commit of another group of A.
    let decoy = ConversationId(random());
    p.am.engine
        .create_group(&decoy)
        .map_err(|e| broken("create a group", e))?;
    let elsewhere =
        p.am.engine
            .add_members(&decoy, &[second.as_bytes().to_vec()])
            .map_err(|e| broken("add a member", e))?;
    let wrong = bytes(
        elsewhere
            .welcome
            .ok_or_else(|| broken("add a member", "no Welcome"))?,
    )?;
    let answer = send_mls(&mut p.a, 3, c, MsgId(random()), commit.clone(), Some(wrong)).await?;
    refused(
        answer,
        ErrorCode::MlsWelcomeInvalid,
        "a Welcome for another KeyPackage",
    )?;
    // The Commit with its own Welcome is accepted: only the Welcomes were wrong.
    let welcome = bytes(
        add.welcome
            .ok_or_else(|| broken("add a member", "no Welcome"))?,
    )?;
    let attached = Attached {
        welcome: Some(welcome),
        group_info,
    };
    accepted(
        send_with(&mut p.a, 4, (c, MsgId(random())), commit, attached).await?,
        "the same Commit with its own Welcome",
    )?;
    Ok(())
}

async fn joiner_reads_from_its_commit(cx: &mut Ctx) -> CaseResult {
    use confab_spec::frame::Subscribe;
    use confab_spec::ids::{Seq, StreamId};
    let mut p = Pair::new(cx).await?;
    let c = p.conversation;
    for i in 0..2u8 {
        let message = mls_write::private_message(&c.0, 0, &[i; 32]);
        accepted(
            send_mls(
                &mut p.a,
                10 + u64::from(i),
                c,
                MsgId(random()),
                bytes(message)?,
                None,
            )
            .await?,
            "a message before B is added",
        )?;
    }
    let (commit_seq, _) = p.add_b(20).await?;
    p.b.send(&ClientFrame::Subscribe(Subscribe {
        rid: 30,
        stream: StreamId::Conversation(c),
        from_seq: Seq::new(1),
    }))
    .await?;
    p.b.expect_error(ErrorCode::NotMember, Some(30)).await?;
    p.b.send(&ClientFrame::Subscribe(Subscribe {
        rid: 31,
        stream: StreamId::Conversation(c),
        from_seq: None,
    }))
    .await?;
    let subscribed =
        p.b.expect("Subscribed", |f| match f {
            ServerFrame::Subscribed(s) if s.rid == 31 => Some(s.clone()),
            _ => None,
        })
        .await?;
    if subscribed.from_seq.get() != commit_seq + 1 {
        return Err(Failure::new(
            format!(
                "a subscription from seq {} (after the adding Commit)",
                commit_seq + 1
            ),
            format!("from seq {}", subscribed.from_seq.get()),
        )
        .into());
    }
    Ok(())
}

async fn state_follows_commits(cx: &mut Ctx) -> CaseResult {
    let mut p = Pair::joined(cx).await?;
    let c = p.conversation;
    let theirs = update(&mut p.bm, &c)?;
    accepted(
        send_commit(&mut p.b, 3, c, MsgId(random()), &theirs).await?,
        "a Commit of B, added by the previous Commit",
    )?;
    p.bm.engine
        .merge_pending_commit(&c)
        .map_err(|e| broken("merge", e))?;
    p.am.engine
        .process(&c, &theirs.commit)
        .map_err(|e| broken("process", e))?;
    let ours = update(&mut p.am, &c)?;
    accepted(
        send_commit(&mut p.a, 4, c, MsgId(random()), &ours).await?,
        "a Commit of A on top of B's",
    )?;
    Ok(())
}

async fn unsigned_commit(cx: &mut Ctx) -> CaseResult {
    let mut p = Pair::joined(cx).await?;
    let c = p.conversation;
    let epoch = epoch_of(&p.am, &c)?;
    // A header and an empty proposal list: no signature, no path, no tags.
    let content = mls_write::commit_content(
        &c.0,
        epoch,
        0,
        &WriteCommit {
            proposals: Vec::new(),
            path: None,
        },
    );
    let mut garbage = Vec::from([0x00, 0x01, 0x00, 0x01]);
    garbage.extend_from_slice(&content);
    let answer = send_mls(&mut p.a, 3, c, MsgId(random()), bytes(garbage)?, None).await?;
    match answer {
        // Parsed whole, it ends too early; read as far as it goes, it is unsigned.
        Err(e)
            if matches!(
                e.code,
                ErrorCode::MlsMalformed | ErrorCode::MlsSignatureInvalid
            ) => {}
        other => refused(
            other,
            ErrorCode::MlsSignatureInvalid,
            "a Commit that ends after its content",
        )?,
    }
    let unsigned = mls_write::public_message(&content, &[], true);
    let answer = send_mls(&mut p.a, 4, c, MsgId(random()), bytes(unsigned)?, None).await?;
    refused(
        answer,
        ErrorCode::MlsSignatureInvalid,
        "a Commit with an empty signature",
    )?;
    // The group lives on: a real Commit takes the epoch.
    let commit = update(&mut p.am, &c)?;
    accepted(
        send_commit(&mut p.a, 5, c, MsgId(random()), &commit).await?,
        "A's real Commit after the refused ones",
    )?;
    Ok(())
}

async fn commit_signed_by_another_member(cx: &mut Ctx) -> CaseResult {
    let mut p = Pair::joined(cx).await?;
    let c = p.conversation;
    let context = context(&mut p.am, &c)?;
    let real =
        p.am.engine
            .self_update(&c)
            .map_err(|e| broken("commit", e))?;
    let parts = confab_spec::mls_framing::public_message_parts(&real.commit)
        .map_err(|e| broken("read a Commit", e))?;
    let signature = mls_write::sign_content(&p.bm.device.key, &parts.content, &context);
    let forged = mls_write::public_message(&parts.content, &signature, true);
    let answer = send_mls(&mut p.a, 3, c, MsgId(random()), bytes(forged)?, None).await?;
    refused(
        answer,
        ErrorCode::MlsSignatureInvalid,
        "A's Commit signed with B's key",
    )?;
    // Signed with A's own key the same content is accepted: only the signature differed.
    // (Its confirmation tag is a stand-in, so its GroupInfo states that tag, signed by A.)
    let signature = mls_write::sign_content(&p.am.device.key, &parts.content, &context);
    let resigned = mls_write::public_message(&parts.content, &signature, true);
    let group_info = crate::mls::group_info_for(&real, &resigned, &p.am.device.key)?;
    let attached = Attached {
        welcome: None,
        group_info: Some(group_info),
    };
    accepted(
        send_with(
            &mut p.a,
            4,
            (c, MsgId(random())),
            bytes(resigned)?,
            attached,
        )
        .await?,
        "the same Commit signed with A's key",
    )?;
    Ok(())
}

/// A's Commit adding `key_package` (an MLSMessage), written by hand without a path (an
/// Add needs none), correctly signed.
fn add_commit(p: &mut Pair, key_package: &[u8]) -> Result<MlsBytes, Stop> {
    let c = p.conversation;
    let context = context(&mut p.am, &c)?;
    let epoch = epoch_of(&p.am, &c)?;
    let body = key_package
        .get(4..)
        .ok_or_else(|| broken("read a KeyPackage", "too short"))?;
    forged_commit(
        &c,
        epoch,
        0,
        &WriteCommit {
            proposals: vec![WriteProposal::Add(body.to_vec())],
            path: None,
        },
        &p.am.device.key,
        &context,
    )
}

async fn add_forged_key_package(cx: &mut Ctx) -> CaseResult {
    let mut p = Pair::new(cx).await?;
    let c = p.conversation;
    let kp = p.bm.key_packages(1, false)?;
    let mut forged = kp
        .first()
        .ok_or_else(|| broken("make a KeyPackage", "none"))?
        .as_bytes()
        .to_vec();
    // The KeyPackage's signature is its last field.
    if let Some(last) = forged.last_mut() {
        *last ^= 0x01;
    }
    let commit = add_commit(&mut p, &forged)?;
    let answer = send_mls(&mut p.a, 2, c, MsgId(random()), commit, None).await?;
    refused(
        answer,
        ErrorCode::MlsKeyPackageInvalid,
        "an Add of a KeyPackage with a broken signature",
    )
}

async fn add_expired_or_revoked_certificate(cx: &mut Ctx) -> CaseResult {
    let mut p = Pair::new(cx).await?;
    let c = p.conversation;
    let now = UnixMs(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    );
    let day = 86_400_000;
    let expired = Device::fresh();
    let credentials = DeviceCredentials {
        key: DeviceKeyPair::from_seed(&expired.key.seed()),
        certificate: expired.certificate_between(UnixMs(now.0 - 2 * day), UnixMs(now.0 - day)),
    };
    let mut member = Member::with_credentials(expired, crate::mls::PAIR[1], credentials)?;
    let kp = member.key_packages(1, false)?;
    let kp = kp
        .first()
        .ok_or_else(|| broken("make a KeyPackage", "none"))?;
    let commit = add_commit(&mut p, kp.as_bytes())?;
    let answer = send_mls(&mut p.a, 2, c, MsgId(random()), commit, None).await?;
    refused(
        answer,
        ErrorCode::MlsKeyPackageInvalid,
        "an Add of a KeyPackage whose certificate expired yesterday",
    )?;
    // B's KeyPackage is valid; then B's user revokes B, and A's engine (which knows
    // nothing of revocations) adds it.
    let kp = p.bm.key_packages(1, false)?;
    let kp = kp
        .first()
        .ok_or_else(|| broken("make a KeyPackage", "none"))?;
    let revocation =
        p.bm.device
            .system
            .revoke(p.bm.device.process, UnixMs(now.0 - 1_000));
    p.b.send(&ClientFrame::RevokeDevice(RevokeDevice {
        rid: 3,
        revocation,
    }))
    .await?;
    p.b.expect("Ok for the revocation", |f| {
        matches!(f, ServerFrame::Ok(ok) if ok.rid == 3).then_some(())
    })
    .await?;
    let add =
        p.am.engine
            .add_members(&c, &[kp.as_bytes().to_vec()])
            .map_err(|e| broken("add a member", e))?;
    let answer = send_commit(&mut p.a, 4, c, MsgId(random()), &add).await?;
    refused(
        answer,
        ErrorCode::MlsKeyPackageInvalid,
        "an Add of a KeyPackage of a revoked device",
    )
}

async fn remove_without_path(cx: &mut Ctx) -> CaseResult {
    let mut p = Pair::joined(cx).await?;
    let c = p.conversation;
    let context = context(&mut p.am, &c)?;
    let epoch = epoch_of(&p.am, &c)?;
    let commit = forged_commit(
        &c,
        epoch,
        0,
        &WriteCommit {
            proposals: vec![WriteProposal::Remove(1)],
            path: None,
        },
        &p.am.device.key,
        &context,
    )?;
    let answer = send_mls(&mut p.a, 3, c, MsgId(random()), commit, None).await?;
    refused(
        answer,
        ErrorCode::MlsHandshakeInvalid,
        "a signed Remove Commit without a path",
    )?;
    let proposal =
        p.bm.engine
            .propose_update(&c)
            .map_err(|e| broken("propose an update", e))?;
    let answer = send_mls(&mut p.b, 4, c, MsgId(random()), bytes(proposal)?, None).await?;
    refused(
        answer,
        ErrorCode::MlsHandshakeInvalid,
        "a standalone Update proposal",
    )
}
