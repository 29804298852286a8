//! SPEC.md 5.5, 13.1 and 14: what a server's log and metrics must not reveal. Each case
//! does some work with fresh secrets (a token, a signature, payloads, ids) and looks for
//! them in the usual printable encodings: hex (either case), base64 (standard and
//! URL-safe, with and without padding) and a decimal byte list (`[12, 34, ...]`, Rust's
//! `Debug`).
//!
//! `/metrics` is on the server's own origin (SPEC.md 13.1). A server's log is not on the
//! wire, so the log cases need to be told where it is (`confab-conformance --server-log
//! FILE`, the file the server writes its log to, at the most detailed level it has); they
//! are skipped without it, or when the log does not grow while they run (each makes the
//! server refuse something). They read only what the log gained while they ran.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use confab_spec::ServerFrame;
use confab_spec::ids::{MsgId, ResumeToken};

use super::log::{application, create_conversation, random, send_mls};
use crate::case;
use crate::case::{Case, CaseResult, Failure, Stop};
use crate::context::{Ctx, Device};
use crate::info::{get_text, http_url};

/// How long a case gives the server to write its log before reading it.
const LOG_FLUSH: Duration = Duration::from_millis(500);

/// The cases of sections 5.5, 13.1 and 14.
pub fn cases() -> Vec<Case> {
    vec![
        case!(
            "13.1-1.metrics-reveal-nothing",
            "REQ-13.1-1",
            Must,
            "/metrics holds no device id, user key, conversation id, payload, signature or token the case used",
            metrics_reveal_nothing
        ),
        case!(
            "5.5-7.tokens-not-logged",
            "REQ-5.5-7",
            Must,
            "resume tokens (issued, rotated, refused) do not appear in the server's log (needs --server-log; storing only hashes cannot be seen from outside)",
            tokens_not_logged
        ),
        case!(
            "14-1.no-secrets-logged",
            "REQ-14-1",
            Must,
            "payloads (accepted and refused), signatures and tokens do not appear in the server's log (needs --server-log)",
            no_secrets_logged
        ),
    ]
}

/// The log file and its length before the case: the case reads only what comes after.
fn log_mark(cx: &Ctx) -> Result<(PathBuf, u64), Stop> {
    let Some(path) = cx.server_log.clone() else {
        return Err(Stop::Skipped(
            "needs the server's log: run with --server-log FILE".into(),
        ));
    };
    let length = std::fs::metadata(&path)
        .map_err(|e| Stop::Skipped(format!("cannot read --server-log {}: {e}", path.display())))?
        .len();
    Ok((path, length))
}

/// What the log gained since `mark`, after giving the server [`LOG_FLUSH`] to write it.
async fn log_since(path: &Path, mark: u64) -> Result<String, Stop> {
    tokio::time::sleep(LOG_FLUSH).await;
    let bytes = std::fs::read(path)
        .map_err(|e| Stop::Skipped(format!("cannot read --server-log {}: {e}", path.display())))?;
    let start = usize::try_from(mark).unwrap_or(usize::MAX).min(bytes.len());
    Ok(String::from_utf8_lossy(&bytes[start..]).into_owned())
}

/// The printable forms a log line could give `secret`.
pub fn encodings(secret: &[u8]) -> Vec<String> {
    let hex = hex::encode(secret);
    let decimal: Vec<String> = secret.iter().map(u8::to_string).collect();
    vec![
        hex.to_uppercase(),
        hex,
        base64::engine::general_purpose::STANDARD.encode(secret),
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(secret),
        base64::engine::general_purpose::URL_SAFE.encode(secret),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret),
        format!("[{}]", decimal.join(", ")),
    ]
}

/// The names of the `secrets` that appear in `log`, in any of their [`encodings`].
pub fn found_in(log: &str, secrets: &[(&str, Vec<u8>)]) -> Vec<String> {
    secrets
        .iter()
        .filter(|(_, secret)| encodings(secret).iter().any(|e| log.contains(e.as_str())))
        .map(|(name, _)| (*name).to_owned())
        .collect()
}

/// Fails the case if any of `secrets` is in what the log gained since `mark`.
async fn check_log(path: &Path, mark: u64, secrets: &[(&str, Vec<u8>)]) -> CaseResult {
    let log = log_since(path, mark).await?;
    if log.is_empty() {
        return Err(Stop::Skipped(format!(
            "{} did not grow while the case ran (refused requests included): is it the \
             file the server logs to, at its most detailed level?",
            path.display()
        )));
    }
    let found = found_in(&log, secrets);
    if found.is_empty() {
        return Ok(());
    }
    Err(Failure::new(
        "none of the case's secrets in the server's log",
        format!(
            "{} found in the {} bytes the log gained",
            found.join(", "),
            log.len()
        ),
    )
    .into())
}

async fn tokens_not_logged(cx: &mut Ctx) -> CaseResult {
    let (path, mark) = log_mark(cx)?;
    let device = Device::fresh();
    let (a, first) = cx.ready("a", &device).await?;
    drop(a);
    // Resuming rotates the token (REQ-5.5-2); the old one, and a made-up one, are refused.
    let mut b = cx.open("b").await?;
    b.hello(vec![1], Some(first.resume_token.clone())).await?;
    let second = b
        .expect("Ready (resumed) or Challenge", |f| match f {
            ServerFrame::Ready(r) => Some(Some(r.resume_token.clone())),
            ServerFrame::Challenge(_) => Some(None),
            _ => None,
        })
        .await?;
    let bogus = ResumeToken::new(random::<32>().to_vec())
        .map_err(|_| Stop::Skipped("the suite built an invalid token".into()))?;
    for token in [first.resume_token.clone(), bogus.clone()] {
        let mut c = cx.open("c").await?;
        c.hello(vec![1], Some(token)).await?;
        // Whatever the answer (a Challenge, an error, a close), the token was seen.
        let _ = c.next(crate::context::ANSWER_WAIT).await;
    }
    let mut secrets = vec![
        ("the issued token", first.resume_token.as_bytes().to_vec()),
        ("a refused made-up token", bogus.as_bytes().to_vec()),
    ];
    if let Some(second) = second {
        secrets.push(("the rotated token", second.as_bytes().to_vec()));
    }
    check_log(&path, mark, &secrets).await
}

async fn no_secrets_logged(cx: &mut Ctx) -> CaseResult {
    let (path, mark) = log_mark(cx)?;
    let secrets = work_with_secrets(cx).await?;
    check_log(&path, mark, &secrets).await
}

async fn metrics_reveal_nothing(cx: &mut Ctx) -> CaseResult {
    let url = http_url(&cx.url, "/metrics").map_err(|e| Stop::Skipped(e.to_string()))?;
    if let Err(e) = get_text(&url).await {
        return Err(Stop::Skipped(format!(
            "{e}; the case needs the server's /metrics (SPEC.md 13.1)"
        )));
    }
    let secrets = work_with_secrets(cx).await?;
    let metrics = get_text(&url)
        .await
        .map_err(|e| Failure::new(format!("GET {url} answered again"), e.to_string()))?;
    let found = found_in(&metrics, &secrets);
    if found.is_empty() {
        return Ok(());
    }
    Err(Failure::new(
        "no ids, payloads, keys or tokens in metric labels",
        format!("{} found in {url}", found.join(", ")),
    )
    .into())
}

/// Authenticates a fresh device, creates a conversation and sends to it one payload that
/// is accepted and one that is refused; the secrets and ids it used, named.
async fn work_with_secrets(cx: &Ctx) -> Result<Vec<(&'static str, Vec<u8>)>, Stop> {
    let device = Device::fresh();
    let mut a = cx.open("a").await?;
    let (ready, auth) = a.authenticate_with(cx, &device).await?;
    let conversation = create_conversation(&mut a, 1).await?;
    let accepted: [u8; 48] = random();
    let sent = send_mls(
        &mut a,
        2,
        conversation,
        MsgId(random()),
        application(&conversation, &accepted),
        None,
    )
    .await?;
    if sent.is_err() {
        return Err(Failure::new("the message Accepted", format!("{sent:?}")).into());
    }
    // A payload that is not an MLSMessage is refused, and errors are where logs say most.
    let refused: [u8; 48] = random();
    let bytes = confab_spec::ids::MlsBytes::new(refused.to_vec())
        .map_err(|_| Stop::Skipped("the suite built an invalid payload".into()))?;
    let _ = send_mls(&mut a, 3, conversation, MsgId(random()), bytes, None).await?;
    Ok(vec![
        ("an accepted payload", accepted.to_vec()),
        ("a refused payload", refused.to_vec()),
        ("the Auth signature", auth.signature.as_bytes().to_vec()),
        ("the resume token", ready.resume_token.as_bytes().to_vec()),
        ("the device's key", device.key.public().as_bytes().to_vec()),
        ("the user's key", device.system.public().as_bytes().to_vec()),
        (
            "the device's process id",
            device.process.as_bytes().to_vec(),
        ),
        ("the conversation id", conversation.0.to_vec()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_encoding_is_found_and_nothing_else() {
        let secret = [0xDE, 0xAD, 0xBE, 0xEF, 0x01, 0xFF, 0x3E, 0x3F];
        for encoded in encodings(&secret) {
            let log = format!("2026-12-02 INFO something happened token={encoded} done\n");
            assert_eq!(
                found_in(&log, &[("s", secret.to_vec())]),
                vec!["s"],
                "{encoded}"
            );
        }
        let other = [0x11; 8];
        let log = format!("token={}", hex::encode(other));
        assert!(found_in(&log, &[("s", secret.to_vec())]).is_empty());
    }
}
