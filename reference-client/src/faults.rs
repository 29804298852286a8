//! Deliberately broken behaviours, for the self-test of the conformance suite's client mode:
//! each switch makes the client break one MUST of SPEC.md, so a test can show that the suite
//! notices. All are off by default and none can be set from the settings file or the
//! `confab` command line; only code can turn one on (the test-only example
//! `confab_with_faults`).

use confab_spec::session::SessionFaults;

/// The switches; each names the requirement it breaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// The session's switches (heartbeats, backoff, resume tokens, resends).
    pub session: SessionFaults,
    /// Make the device key the system key, so that every MLS signature is one by the
    /// system key (REQ-3.4-1).
    pub device_key_is_system_key: bool,
    /// Number msg_ids with a counter instead of drawing them at random (REQ-4.6-1).
    pub counter_msg_ids: bool,
    /// Merge its own Commit before the gateway accepted it (REQ-7.4-1).
    pub merge_before_accepted: bool,
    /// Stop processing a stream at an entry it cannot read, as clients did before
    /// SPEC.md 6.8 said otherwise (REQ-6.8-5).
    pub stop_at_unreadable: bool,
    /// Keep sending into a conversation whose Commit it could not apply (REQ-7.7-5).
    pub send_after_fork: bool,
    /// Show a message as from the sender the gateway names, not the one MLS
    /// authenticated (REQ-7.8-1).
    pub trust_gateway_sender: bool,
    /// Act on a proposal as the gateway labels it, without MLS verifying it (REQ-7.8-2).
    pub trust_gateway_proposals: bool,
    /// Judge a room Commit on the committer the gateway names, and merge one that breaks
    /// the room's rules with nothing but a note (REQ-7.8-3).
    pub accept_rule_breaking_commits: bool,
    /// Never compare a sender's message numbers, so withheld messages go unnoticed
    /// (REQ-7.9-2).
    pub ignore_missing_messages: bool,
    /// Send the bare text as the plaintext, with no counter (REQ-7.9-1).
    pub unnumbered_messages: bool,
    /// Show the plaintext decrypted earlier for a payload that comes again under a new
    /// seq and msg_id, instead of finding its key used (REQ-6.8-5).
    pub reuse_decrypted_payloads: bool,
    /// Send Commits without the GroupInfo of the epoch they open (REQ-7.10-1).
    pub no_group_info: bool,
    /// Stay forked: never rejoin a forked conversation by a resync (REQ-7.10-6).
    pub no_resync: bool,
}

impl Faults {
    /// The names [`Faults::only`] takes.
    pub const NAMES: &'static [&'static str] = &[
        "no_heartbeat",
        "no_backoff",
        "ignore_retry_after",
        "reconnect_after_fatal_close",
        "keep_first_resume_token",
        "new_msg_id_on_resend",
        "device_key_is_system_key",
        "counter_msg_ids",
        "merge_before_accepted",
        "stop_at_unreadable",
        "send_after_fork",
        "trust_gateway_sender",
        "trust_gateway_proposals",
        "accept_rule_breaking_commits",
        "ignore_missing_messages",
        "unnumbered_messages",
        "reuse_decrypted_payloads",
        "no_group_info",
        "no_resync",
    ];

    /// One switch on, by its name (the field's name); `None` for an unknown name.
    pub fn only(name: &str) -> Option<Self> {
        let mut f = Self::default();
        let switch = match name {
            "no_heartbeat" => &mut f.session.no_heartbeat,
            "no_backoff" => &mut f.session.no_backoff,
            "ignore_retry_after" => &mut f.session.ignore_retry_after,
            "reconnect_after_fatal_close" => &mut f.session.reconnect_after_fatal_close,
            "keep_first_resume_token" => &mut f.session.keep_first_resume_token,
            "new_msg_id_on_resend" => &mut f.session.new_msg_id_on_resend,
            "device_key_is_system_key" => &mut f.device_key_is_system_key,
            "counter_msg_ids" => &mut f.counter_msg_ids,
            "merge_before_accepted" => &mut f.merge_before_accepted,
            "stop_at_unreadable" => &mut f.stop_at_unreadable,
            "send_after_fork" => &mut f.send_after_fork,
            "trust_gateway_sender" => &mut f.trust_gateway_sender,
            "trust_gateway_proposals" => &mut f.trust_gateway_proposals,
            "accept_rule_breaking_commits" => &mut f.accept_rule_breaking_commits,
            "ignore_missing_messages" => &mut f.ignore_missing_messages,
            "unnumbered_messages" => &mut f.unnumbered_messages,
            "reuse_decrypted_payloads" => &mut f.reuse_decrypted_payloads,
            "no_group_info" => &mut f.no_group_info,
            "no_resync" => &mut f.no_resync,
            _ => return None,
        };
        *switch = true;
        Some(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_turns_on_exactly_one_switch() {
        let mut seen = Vec::new();
        for name in Faults::NAMES {
            let f = Faults::only(name).unwrap_or_else(|| panic!("{name} is not a switch"));
            assert_ne!(f, Faults::default(), "{name} turns nothing on");
            assert!(
                !seen.contains(&f),
                "{name} turns on the same switch as another"
            );
            seen.push(f);
        }
        assert_eq!(Faults::only("no_such_fault"), None);
    }
}
