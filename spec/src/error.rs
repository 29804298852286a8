//! The error code registry (SPEC.md section 12) and close codes (section 5.7).

use serde::{Deserialize, Serialize};

macro_rules! registry {
    (
        $(#[$meta:meta])*
        pub enum $name:ident : $repr:ty {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal => $wire:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )*
            /// A code this implementation does not know (kept, so it can be reported).
            Unknown($repr),
        }

        impl $name {
            /// Every known value, in registry order.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            /// The numeric value on the wire.
            pub fn value(self) -> $repr {
                match self {
                    $( $name::$variant => $value, )*
                    $name::Unknown(v) => v,
                }
            }

            /// The registry name (`snake_case`, as in SPEC.md).
            pub fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => $wire, )*
                    $name::Unknown(_) => "unknown",
                }
            }

            /// Maps a wire value; unknown values are kept as [`Self::Unknown`].
            pub fn from_value(v: $repr) -> Self {
                match v {
                    $( $value => $name::$variant, )*
                    other => $name::Unknown(other),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{} ({})", self.name(), self.value())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                self.value().serialize(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                Ok(Self::from_value(<$repr>::deserialize(d)?))
            }
        }

        impl<'a> arbitrary::Arbitrary<'a> for $name {
            fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
                Ok(Self::from_value(<$repr>::arbitrary(u)?))
            }
        }
    };
}

registry! {
    /// An error code carried in an `Error` frame (SPEC.md section 12).
    pub enum ErrorCode: u16 {
        /// The bytes break the encoding rules, or a field has the wrong type or size.
        MalformedFrame = 100 => "malformed_frame",
        /// Larger than `frame_bytes_max`.
        FrameTooLarge = 101 => "frame_too_large",
        /// The frame type is not known.
        UnknownFrameType = 102 => "unknown_frame_type",
        /// The frame is not allowed in this state or direction.
        UnexpectedFrame = 103 => "unexpected_frame",
        /// A collection, nesting or text limit was exceeded.
        LimitExceeded = 104 => "limit_exceeded",
        /// No common protocol version.
        UnsupportedVersion = 105 => "unsupported_version",
        /// The certificate or revocation signature does not verify.
        AuthCertificateInvalid = 200 => "auth_certificate_invalid",
        /// The certificate has expired or its lifetime is too long.
        AuthCertificateExpired = 201 => "auth_certificate_expired",
        /// The device has been revoked.
        AuthCertificateRevoked = 202 => "auth_certificate_revoked",
        /// The transcript signature does not verify.
        AuthSignatureInvalid = 203 => "auth_signature_invalid",
        /// The transcript names a nonce that is not this connection's unused nonce.
        AuthNonceInvalid = 204 => "auth_nonce_invalid",
        /// The transcript names another origin.
        AuthOriginMismatch = 205 => "auth_origin_mismatch",
        /// `Auth.time_ms` is too far from the gateway's clock.
        AuthClockSkew = 206 => "auth_clock_skew",
        /// Unknown or expired resume token.
        ResumeTokenInvalid = 208 => "resume_token_invalid",
        /// The resume token was already used.
        ResumeTokenReused = 209 => "resume_token_reused",
        /// The certificate's `not_before_ms` is in the future.
        AuthCertificateNotYetValid = 210 => "auth_certificate_not_yet_valid",
        /// No such conversation.
        ConversationNotFound = 300 => "conversation_not_found",
        /// The device is not a member.
        NotMember = 301 => "not_member",
        /// The conversation id is taken.
        ConversationExists = 302 => "conversation_exists",
        /// The device's role does not allow this.
        Forbidden = 303 => "forbidden",
        /// The msg_id was used with another sender or payload.
        MsgIdConflict = 304 => "msg_id_conflict",
        /// `from_seq` or an ack beyond the head.
        SeqOutOfRange = 305 => "seq_out_of_range",
        /// `Continue` for a stream with no replay in progress.
        NotSubscribed = 306 => "not_subscribed",
        /// The payload or Welcome is larger than `payload_bytes_max`.
        PayloadTooLarge = 307 => "payload_too_large",
        /// The Commit would make the room hold more than `room_members_max` devices.
        RoomFull = 308 => "room_full",
        /// A user would have joined more than `rooms_per_user_max` rooms.
        TooManyRooms = 309 => "too_many_rooms",
        /// A `Send` would pass the sender's daily byte quota or its conversation's retained
        /// byte quota (SPEC.md 11).
        QuotaExceeded = 310 => "quota_exceeded",
        /// A Commit adds a user that does not allow the committer (SPEC.md 8.1, 10.2 rule 8).
        InviteNotAllowed = 311 => "invite_not_allowed",
        /// The payload is not a parseable MLSMessage.
        MlsMalformed = 400 => "mls_malformed",
        /// The MLS group id is not the conversation id.
        MlsGroupMismatch = 401 => "mls_group_mismatch",
        /// A Commit for an epoch already decided.
        StaleCommit = 402 => "stale_commit",
        /// A message for an epoch the conversation has not reached.
        EpochAhead = 403 => "epoch_ahead",
        /// An application message more than `APP_EPOCH_LAG_MAX` epochs old.
        EpochTooOld = 408 => "epoch_too_old",
        /// Wire format or content type not allowed.
        MlsWireFormatNotAllowed = 404 => "mls_wire_format_not_allowed",
        /// Welcome without Adds, or Adds without Welcome.
        WelcomeMismatch = 405 => "welcome_mismatch",
        /// The PublicMessage sender is not the sending device's leaf.
        MlsSenderMismatch = 406 => "mls_sender_mismatch",
        /// The Commit holds a proposal reference.
        MlsCommitByReference = 407 => "mls_commit_by_reference",
        /// A handshake message's signature does not verify under its sender leaf's key in
        /// the group's tracked state (SPEC.md 7.7).
        MlsSignatureInvalid = 409 => "mls_signature_invalid",
        /// A `CreateConversation`'s GroupInfo is not a valid new group of the creating
        /// device (SPEC.md 6.1).
        MlsGroupInfoInvalid = 410 => "mls_group_info_invalid",
        /// A Commit or proposal breaks RFC 9420's validity rules as far as the group's
        /// public state can tell, or Confab's profile (SPEC.md 7.7).
        MlsHandshakeInvalid = 411 => "mls_handshake_invalid",
        /// A Commit adds a KeyPackage that does not verify, has expired, or whose credential
        /// is not a valid, unrevoked device certificate (SPEC.md 7.7).
        MlsKeyPackageInvalid = 412 => "mls_key_package_invalid",
        /// `Send.welcome` is not an MLSMessage carrying a Welcome (SPEC.md 7.5).
        MlsWelcomeInvalid = 413 => "mls_welcome_invalid",
        /// An uploaded KeyPackage failed validation.
        KeyPackageInvalid = 500 => "key_package_invalid",
        /// The target user has no KeyPackages.
        NoKeyPackages = 501 => "no_key_packages",
        /// The device's pool would pass `key_package_pool_max`.
        KeyPackagePoolFull = 502 => "key_package_pool_full",
        /// A watchlist larger than `watchlist_max` for the user.
        WatchlistTooLarge = 600 => "watchlist_too_large",
        /// A share list or blocklist would pass `presence_list_max`.
        PresenceListFull = 601 => "presence_list_full",
        /// Retry after `retry_after_ms`.
        RateLimited = 900 => "rate_limited",
        /// The gateway cannot serve the request now.
        Overloaded = 901 => "overloaded",
        /// The gateway failed; nothing was changed.
        InternalError = 902 => "internal_error",
    }
}

impl ErrorCode {
    /// Whether a client must treat the code as fatal for the connection (SPEC.md section 12):
    /// the `1xx` and `2xx` groups.
    pub fn is_fatal_for_connection(self) -> bool {
        self.value() < 300
    }
}

registry! {
    /// A WebSocket close code (SPEC.md section 5.7).
    pub enum CloseCode: u16 {
        /// Normal closure.
        Normal = 1000 => "normal",
        /// The endpoint is going away.
        GoingAway = 1001 => "going_away",
        /// The gateway is shutting down or restarting.
        ServerRestart = 4000 => "server_restart",
        /// No frame for `heartbeat_timeout_ms` (zombie).
        HeartbeatTimeout = 4001 => "heartbeat_timeout",
        /// The session's outbound queue overflowed.
        SlowConsumer = 4002 => "slow_consumer",
        /// The gateway sheds load.
        Overloaded = 4003 => "overloaded",
        /// `ready` not reached within `auth_timeout_ms`.
        AuthTimeout = 4005 => "auth_timeout",
        /// Too many frames before `Ready`.
        PreAuthFlood = 4006 => "pre_auth_flood",
        /// Malformed, unknown or unexpected frame before auth.
        ProtocolError = 4100 => "protocol_error",
        /// Message larger than `frame_bytes_max`.
        FrameTooLarge = 4101 => "frame_too_large",
        /// No common version.
        UnsupportedVersion = 4102 => "unsupported_version",
        /// Authentication rejected.
        AuthFailed = 4103 => "auth_failed",
        /// The same device opened a newer session.
        SessionSuperseded = 4104 => "session_superseded",
        /// The device was revoked.
        DeviceRevoked = 4105 => "device_revoked",
    }
}

impl CloseCode {
    /// Whether a client may reconnect automatically after this close (SPEC.md section 5.7):
    /// 1000, 1001 and 4000–4099 yes; 4100–4199 no. Other codes are treated as reconnectable
    /// transport failures.
    pub fn may_reconnect(self) -> bool {
        !(4100..=4199).contains(&self.value())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_are_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_value(code.value()), *code);
            assert!(
                seen.insert(code.value()),
                "duplicate value {}",
                code.value()
            );
        }
        assert_eq!(ErrorCode::from_value(777), ErrorCode::Unknown(777));
    }

    #[test]
    fn close_classes() {
        assert!(CloseCode::HeartbeatTimeout.may_reconnect());
        assert!(CloseCode::GoingAway.may_reconnect());
        assert!(!CloseCode::AuthFailed.may_reconnect());
        assert!(!CloseCode::Unknown(4150).may_reconnect());
        assert!(CloseCode::Unknown(4050).may_reconnect());
    }

    #[test]
    fn fatal_groups() {
        assert!(ErrorCode::AuthClockSkew.is_fatal_for_connection());
        assert!(!ErrorCode::StaleCommit.is_fatal_for_connection());
        assert!(ErrorCode::Unknown(150).is_fatal_for_connection());
    }
}
