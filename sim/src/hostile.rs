//! The `hostile-member` scenario's hostile acts (SPEC.md 7.7): a member of the room, with
//! its own valid device key, sends what no honest client would. Each act says what the
//! gateway must answer; an act the gateway answers otherwise fails the run.
//!
//! | draw % 6 | act | the gateway must |
//! | --- | --- | --- |
//! | 0 | random bytes | refuse it |
//! | 1 | a PrivateMessage header of the current epoch around random bytes | accept it (it cannot read it); members show it unreadable |
//! | 2 | an empty Commit of the current epoch with no signature, path or tags | refuse it (409) |
//! | 3 | a Remove of another member without a path, correctly signed | refuse it (411) |
//! | 4 | its own real update Commit with one signature byte flipped | refuse it (409) |
//! | 5 | a replay of one of its own Commits from an earlier epoch (made and discarded then) | refuse it (402) |
//!
//! The real Commits it makes for acts 4 and 5 are discarded at once, so its own group state
//! stays the others'. When the hostile member's group is behind the gateway's, its
//! forgeries are stale (402) before anything else, which is a refusal too; what must never
//! happen is a forgery accepted.

use confab_client::app::{Client, ClientError};
use confab_spec::error::ErrorCode;
use confab_spec::identity::DeviceKeyPair;
use confab_spec::ids::ConversationId;
use confab_spec::mls_write::{self, WriteCommit, WriteProposal};

/// What the gateway did with one act.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    /// Accepted, as it must be (garbage under a valid header).
    AcceptedAsExpected,
    /// Refused, as it must be.
    Refused,
    /// Nothing was sent (no old Commit to replay yet).
    Skipped,
}

/// Why an act failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActError {
    /// The gateway answered what it must not: the invariant "the gateway refuses forged
    /// handshakes" is broken.
    Gateway(String),
    /// The hostile member's own client failed (not the gateway's fault).
    Client(String),
}

/// Does the act `draw` picks; `Err` when the gateway answered what it must not, or the
/// hostile client failed.
pub async fn act(
    client: &mut Client,
    key: &DeviceKeyPair,
    conversation: ConversationId,
    draw: u64,
    stash: &mut Vec<(u64, Vec<u8>)>,
) -> Result<Answered, ActError> {
    let epoch = client
        .engine()
        .epoch(&conversation)
        .map_err(|e| ActError::Client(format!("hostile: epoch: {e}")))?;
    let leaf = own_leaf(client, &conversation).map_err(ActError::Client)?;
    // A Commit of this epoch, kept to replay once the epoch has passed.
    if stash.iter().all(|(e, _)| *e != epoch) {
        if let Ok(update) = client.engine_mut().self_update(&conversation) {
            stash.push((epoch, update.commit));
        }
        client
            .engine_mut()
            .discard_pending_commit(&conversation)
            .map_err(|e| ActError::Client(format!("hostile: discard: {e}")))?;
    }
    let noise = noise(draw);
    let (payload, must) = match draw % 6 {
        0 => (noise, Must::Refuse(None)),
        1 => (
            mls_write::private_message(&conversation.0, epoch, &noise),
            Must::Accept,
        ),
        2 => {
            let content = mls_write::commit_content(
                &conversation.0,
                epoch,
                leaf,
                &WriteCommit {
                    proposals: Vec::new(),
                    path: None,
                },
            );
            (
                mls_write::public_message(&content, &[], true),
                Must::Refuse(Some(ErrorCode::MlsSignatureInvalid)),
            )
        }
        3 => {
            let context = context(client, &conversation).map_err(ActError::Client)?;
            let victim = client
                .engine()
                .members(&conversation)
                .map_err(|e| ActError::Client(format!("hostile: members: {e}")))?
                .into_iter()
                .map(|(l, _)| l)
                .find(|l| *l != leaf)
                .unwrap_or(0);
            let content = mls_write::commit_content(
                &conversation.0,
                epoch,
                leaf,
                &WriteCommit {
                    proposals: vec![WriteProposal::Remove(victim)],
                    path: None,
                },
            );
            let signature = mls_write::sign_content(key, &content, &context);
            (
                mls_write::public_message(&content, &signature, true),
                Must::Refuse(Some(ErrorCode::MlsHandshakeInvalid)),
            )
        }
        4 => {
            let Some((_, commit)) = stash.iter().find(|(e, _)| *e == epoch) else {
                return Ok(Answered::Skipped);
            };
            let mut parts = confab_spec::mls_framing::public_message_parts(commit)
                .map_err(|e| ActError::Client(format!("hostile: parts: {e}")))?;
            if let Some(b) = parts.signature.first_mut() {
                *b ^= 0x01;
            }
            (
                parts.to_message(),
                Must::Refuse(Some(ErrorCode::MlsSignatureInvalid)),
            )
        }
        _ => {
            let old: Vec<&(u64, Vec<u8>)> = stash.iter().filter(|(e, _)| *e < epoch).collect();
            if old.is_empty() {
                return Ok(Answered::Skipped);
            }
            let (_, commit) = old[(draw / 6) as usize % old.len()];
            (commit.clone(), Must::Refuse(Some(ErrorCode::StaleCommit)))
        }
    };
    let result = client.send_raw(conversation, payload).await;
    judge(draw % 6, must, result)
}

/// What the gateway must answer.
#[derive(Debug, Clone, Copy)]
enum Must {
    Accept,
    /// Refuse, with this code when one is named.
    Refuse(Option<ErrorCode>),
}

fn judge(
    act: u64,
    must: Must,
    result: Result<confab_spec::ids::Seq, ClientError>,
) -> Result<Answered, ActError> {
    match (must, result) {
        (Must::Accept, Ok(_)) => Ok(Answered::AcceptedAsExpected),
        // Its group was behind the gateway's by more than the lag applications may have.
        (
            Must::Accept,
            Err(ClientError::SendRefused {
                code: ErrorCode::EpochTooOld,
                ..
            }),
        ) => Ok(Answered::Refused),
        (Must::Refuse(None), Err(ClientError::SendRefused { .. })) => Ok(Answered::Refused),
        // A forgery for the epoch the hostile member is in, when the gateway has moved on,
        // is stale before it is anything else (SPEC.md 7.7's order).
        (Must::Refuse(Some(code)), Err(ClientError::SendRefused { code: got, .. }))
            if got == code || got == ErrorCode::StaleCommit =>
        {
            Ok(Answered::Refused)
        }
        // The connection dropped before the answer: the act's outcome is unknown.
        (_, Err(ClientError::Interrupted | ClientError::RateLimited { .. })) => {
            Ok(Answered::Skipped)
        }
        (must, result) => Err(ActError::Gateway(format!(
            "the gateway must answer hostile act {act} with {must:?}; it answered {result:?}"
        ))),
    }
}

fn own_leaf(client: &Client, conversation: &ConversationId) -> Result<u32, String> {
    let me = client.device();
    client
        .engine()
        .members(conversation)
        .map_err(|e| format!("hostile: members: {e}"))?
        .into_iter()
        .find(|(_, d)| *d == me)
        .map(|(l, _)| l)
        .ok_or_else(|| "hostile: not a member".to_owned())
}

fn context(client: &mut Client, conversation: &ConversationId) -> Result<Vec<u8>, String> {
    let info = client
        .engine_mut()
        .group_info(conversation)
        .map_err(|e| format!("hostile: group info: {e}"))?;
    mls_write::group_context_of(&info).map_err(|e| format!("hostile: group context: {e}"))
}

/// 8 to 71 bytes drawn from `draw`.
fn noise(draw: u64) -> Vec<u8> {
    let len = 8 + (draw >> 8) as usize % 64;
    let mut x = draw | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
