//! Every case, by SPEC.md section.

mod client;
pub mod consent;
mod directory;
mod framing;
mod groups;
mod handshake;
mod hostile;
mod hygiene;
mod leaks;
pub mod log;
mod presence;
mod restart;
mod resync;
mod retention;
mod rooms;
mod session;

use crate::case;
use crate::case::{Case, CaseResult, Failure};
use crate::context::Ctx;

/// Every case of the suite, in SPEC.md order.
pub fn all() -> Vec<Case> {
    let mut all = Vec::new();
    all.extend(session::cases());
    all.extend(framing::cases());
    all.extend(log::cases());
    all.extend(retention::cases());
    all.extend(directory::cases());
    all.extend(consent::cases());
    all.extend(groups::cases());
    all.extend(handshake::cases());
    all.extend(resync::cases());
    all.extend(hygiene::cases());
    all.extend(presence::cases());
    all.extend(rooms::cases());
    all.extend(leaks::cases());
    all.extend(restart::cases());
    all.extend(client::cases());
    all.extend(hostile::cases());
    all.push(case!(
        "13.2-1.info",
        "REQ-13.2-1",
        Must,
        "/v1/info is served without authentication and names the limits",
        info
    ));
    all.sort_by(|a, b| {
        section_order(a.id)
            .cmp(&section_order(b.id))
            .then(a.id.cmp(b.id))
    });
    all
}

/// `3.3-1.x` → (3, 3, 1): sections sort numerically.
fn section_order(id: &str) -> Vec<u64> {
    id.split(['.', '-'])
        .map_while(|part| part.parse().ok())
        .collect()
}

async fn info(cx: &mut Ctx) -> CaseResult {
    // The run read it before the first case, with no credentials; check what it holds.
    let l = &cx.info.limits;
    if cx.info.versions.is_empty() || l.frame_bytes_max == 0 || l.replay_batch_max == 0 {
        return Err(Failure::new(
            "versions and every limit of SPEC.md 4.4",
            format!("{:?}", cx.info),
        )
        .into());
    }
    Ok(())
}
