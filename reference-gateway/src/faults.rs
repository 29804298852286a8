//! Deliberately broken behaviours, for the self-tests of the conformance suite and the
//! simulator: each switch makes the gateway break one MUST of SPEC.md, so a test can
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
    /// Deliver every live entry twice (REQ-6.4-4: live delivery in seq order).
    pub deliver_twice: bool,
    /// Answer sends before their entries are durable: the SQLite store keeps the database in
    /// memory and writes it to disk only at each retention pass, so a crash loses accepted
    /// entries (REQ-6.3-1).
    pub ack_before_durable: bool,
    /// Show every user's presence to every watcher, share list or not (REQ-9.2-1).
    pub presence_to_everyone: bool,
    /// Skip the per-target presence limit (REQ-9.5-1 and section 9.5).
    pub no_presence_target_limit: bool,
    /// Accept every room Commit whatever the committer's role (REQ-10-4); stated roles
    /// are taken as they come.
    pub no_room_rules: bool,
    /// Sequence handshake messages that fail MLS verification, with the tracked group left
    /// as it was (REQ-7.7-2, REQ-7.7-3, REQ-7.7-4).
    pub no_handshake_verification: bool,
    /// Create conversations from any GroupInfo, verified or not (REQ-6.1-3).
    pub no_group_info_check: bool,
    /// Store any bytes as a Commit's Welcome (REQ-7.5-3).
    pub no_welcome_check: bool,
    /// Keep the tracked group state of a conversation's creation: accepted Commits update
    /// the roster but not the state (REQ-7.7-1).
    pub stale_group_state: bool,
    /// Limit claims per claimer and per target, but not per (claimer, target) (REQ-8-10).
    pub no_claim_pair_limit: bool,
    /// Hold connections without a request deadline or a per-address cap (REQ-11-3).
    pub no_connection_hygiene: bool,
    /// Store whatever a user or a conversation sends, without byte quotas (REQ-11-4).
    pub no_storage_quotas: bool,
    /// Leave the session of a resume-token chain open when a token of it is reused
    /// (REQ-5.5-10).
    pub reuse_keeps_sessions: bool,
    /// Keep a session open after its device's certificate expired (REQ-5.5-11).
    pub session_outlives_certificate: bool,
    /// Replay a conversation to a device from before the Commit that added it (REQ-7.6-4).
    pub joiner_reads_history: bool,
    /// Accept Commits adding users that do not allow the committer (REQ-10-9).
    pub no_invite_consent: bool,
    /// Claim a non-allowing target's packages, then answer `no_key_packages` as if
    /// nothing had happened: the answer looks right, a package is gone (REQ-8-13).
    pub refused_claim_consumes: bool,
    /// Parse `UpdateInviteSettings.disallow` and never apply it (REQ-8-11).
    pub disallow_ignored: bool,
    /// Let the allow list grow past `presence_list_max` (REQ-8-12).
    pub invite_list_unbounded: bool,
    /// Count the rooms a user was added to, joined or not, toward
    /// `rooms_per_user_max` (REQ-10-8).
    pub invites_count_toward_rooms: bool,
    /// Sequence a Commit whatever its GroupInfo, or without one (REQ-7.10-2).
    pub no_commit_group_info_check: bool,
    /// Keep the GroupInfo of a conversation's creation only: Commits' GroupInfos are checked and dropped (REQ-7.10-3).
    pub group_info_not_kept: bool,
    /// Serve a conversation's GroupInfo to any device that asks (REQ-7.10-4).
    pub group_info_to_anyone: bool,
    /// Refuse every external Commit as a sender mismatch, as before resyncs (REQ-7.10-5).
    pub refuse_resyncs: bool,
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
            "deliver_twice" => &mut f.deliver_twice,
            "ack_before_durable" => &mut f.ack_before_durable,
            "presence_to_everyone" => &mut f.presence_to_everyone,
            "no_presence_target_limit" => &mut f.no_presence_target_limit,
            "no_room_rules" => &mut f.no_room_rules,
            "no_handshake_verification" => &mut f.no_handshake_verification,
            "no_group_info_check" => &mut f.no_group_info_check,
            "no_welcome_check" => &mut f.no_welcome_check,
            "stale_group_state" => &mut f.stale_group_state,
            "no_claim_pair_limit" => &mut f.no_claim_pair_limit,
            "no_connection_hygiene" => &mut f.no_connection_hygiene,
            "no_storage_quotas" => &mut f.no_storage_quotas,
            "reuse_keeps_sessions" => &mut f.reuse_keeps_sessions,
            "session_outlives_certificate" => &mut f.session_outlives_certificate,
            "joiner_reads_history" => &mut f.joiner_reads_history,
            "no_invite_consent" => &mut f.no_invite_consent,
            "refused_claim_consumes" => &mut f.refused_claim_consumes,
            "disallow_ignored" => &mut f.disallow_ignored,
            "invite_list_unbounded" => &mut f.invite_list_unbounded,
            "invites_count_toward_rooms" => &mut f.invites_count_toward_rooms,
            "no_commit_group_info_check" => &mut f.no_commit_group_info_check,
            "group_info_not_kept" => &mut f.group_info_not_kept,
            "group_info_to_anyone" => &mut f.group_info_to_anyone,
            "refuse_resyncs" => &mut f.refuse_resyncs,
            _ => return None,
        };
        *switch = true;
        Some(f)
    }

    /// The switches on in `self` or in `other`.
    pub fn union(self, other: Self) -> Self {
        Self {
            no_msg_id_dedup: self.no_msg_id_dedup || other.no_msg_id_dedup,
            skip_seq_on_replay: self.skip_seq_on_replay || other.skip_seq_on_replay,
            two_commits_per_epoch: self.two_commits_per_epoch || other.two_commits_per_epoch,
            no_token_rotation: self.no_token_rotation || other.no_token_rotation,
            accept_expired_certificate: self.accept_expired_certificate
                || other.accept_expired_certificate,
            accept_any_nonce: self.accept_any_nonce || other.accept_any_nonce,
            double_claim: self.double_claim || other.double_claim,
            no_frame_size_limit: self.no_frame_size_limit || other.no_frame_size_limit,
            deliver_twice: self.deliver_twice || other.deliver_twice,
            ack_before_durable: self.ack_before_durable || other.ack_before_durable,
            presence_to_everyone: self.presence_to_everyone || other.presence_to_everyone,
            no_presence_target_limit: self.no_presence_target_limit
                || other.no_presence_target_limit,
            no_room_rules: self.no_room_rules || other.no_room_rules,
            no_handshake_verification: self.no_handshake_verification
                || other.no_handshake_verification,
            no_group_info_check: self.no_group_info_check || other.no_group_info_check,
            no_welcome_check: self.no_welcome_check || other.no_welcome_check,
            stale_group_state: self.stale_group_state || other.stale_group_state,
            no_claim_pair_limit: self.no_claim_pair_limit || other.no_claim_pair_limit,
            no_connection_hygiene: self.no_connection_hygiene || other.no_connection_hygiene,
            no_storage_quotas: self.no_storage_quotas || other.no_storage_quotas,
            reuse_keeps_sessions: self.reuse_keeps_sessions || other.reuse_keeps_sessions,
            session_outlives_certificate: self.session_outlives_certificate
                || other.session_outlives_certificate,
            joiner_reads_history: self.joiner_reads_history || other.joiner_reads_history,
            no_invite_consent: self.no_invite_consent || other.no_invite_consent,
            refused_claim_consumes: self.refused_claim_consumes || other.refused_claim_consumes,
            disallow_ignored: self.disallow_ignored || other.disallow_ignored,
            invite_list_unbounded: self.invite_list_unbounded || other.invite_list_unbounded,
            invites_count_toward_rooms: self.invites_count_toward_rooms
                || other.invites_count_toward_rooms,
            no_commit_group_info_check: self.no_commit_group_info_check
                || other.no_commit_group_info_check,
            group_info_not_kept: self.group_info_not_kept || other.group_info_not_kept,
            group_info_to_anyone: self.group_info_to_anyone || other.group_info_to_anyone,
            refuse_resyncs: self.refuse_resyncs || other.refuse_resyncs,
        }
    }

    /// Every switch's name.
    pub const NAMES: [&'static str; 32] = [
        "no_msg_id_dedup",
        "skip_seq_on_replay",
        "two_commits_per_epoch",
        "no_token_rotation",
        "accept_expired_certificate",
        "accept_any_nonce",
        "double_claim",
        "no_frame_size_limit",
        "deliver_twice",
        "ack_before_durable",
        "presence_to_everyone",
        "no_presence_target_limit",
        "no_room_rules",
        "no_handshake_verification",
        "no_group_info_check",
        "no_welcome_check",
        "stale_group_state",
        "no_claim_pair_limit",
        "no_connection_hygiene",
        "no_storage_quotas",
        "reuse_keeps_sessions",
        "session_outlives_certificate",
        "joiner_reads_history",
        "no_invite_consent",
        "refused_claim_consumes",
        "disallow_ignored",
        "invite_list_unbounded",
        "invites_count_toward_rooms",
        "no_commit_group_info_check",
        "group_info_not_kept",
        "group_info_to_anyone",
        "refuse_resyncs",
    ];
}
