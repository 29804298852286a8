//! Deliberately broken behaviours, for the self-tests of the conformance suite (and later
//! the simulator): each switch makes the gateway break one MUST of SPEC.md, so a test can
//! show that the suite notices. All are off by default and none can be set from the
//! settings file or the command line; only code that builds a [`crate::handler::GatewayConfig`]
//! can turn one on.

/// The switches; each names the requirement it breaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Forget msg_id de-duplication: a resent message is appended again (REQ-6.3-2).
    pub no_msg_id_dedup: bool,
    /// Leave the second entry out of every replay batch (REQ-6.4-1).
    pub skip_seq_on_replay: bool,
    /// Accept a Commit for an epoch already decided (REQ-7.3-1).
    pub two_commits_per_epoch: bool,
    /// Answer a resume with the token that was presented instead of a new one (REQ-5.5-2).
    pub no_token_rotation: bool,
    /// Accept an expired device certificate (REQ-5.4-1).
    pub accept_expired_certificate: bool,
    /// Accept an `Auth` whose nonce is not this connection's challenge (REQ-5.4-3).
    pub accept_any_nonce: bool,
    /// Hand out a pool KeyPackage without removing it (REQ-8-2).
    pub double_claim: bool,
    /// Accept messages of any size (REQ-4.4-2).
    pub no_frame_size_limit: bool,
}

impl Faults {
    /// One switch on, by its name (the field's name); `None` for an unknown name.
    pub fn only(name: &str) -> Option<Self> {
        let mut f = Self::default();
        let switch = match name {
            "no_msg_id_dedup" => &mut f.no_msg_id_dedup,
            "skip_seq_on_replay" => &mut f.skip_seq_on_replay,
            "two_commits_per_epoch" => &mut f.two_commits_per_epoch,
            "no_token_rotation" => &mut f.no_token_rotation,
            "accept_expired_certificate" => &mut f.accept_expired_certificate,
            "accept_any_nonce" => &mut f.accept_any_nonce,
            "double_claim" => &mut f.double_claim,
            "no_frame_size_limit" => &mut f.no_frame_size_limit,
            _ => return None,
        };
        *switch = true;
        Some(f)
    }

    /// Every switch's name.
    pub const NAMES: [&'static str; 8] = [
        "no_msg_id_dedup",
        "skip_seq_on_replay",
        "two_commits_per_epoch",
        "no_token_rotation",
        "accept_expired_certificate",
        "accept_any_nonce",
        "double_claim",
        "no_frame_size_limit",
    ];
}
