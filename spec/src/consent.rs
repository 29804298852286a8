//! Consent (SPEC.md section 8.1): whether a user allows another to claim its KeyPackages
//! and add it to conversations. One pure decision, used by the gateway for claims and for
//! rule 8 of section 10.2, and by tests that drive it without a store.

use crate::frame::InvitePolicy;
use crate::ids::SystemKey;

/// What a target user's settings say about one other user: the target's policy, and
/// whether the other is on the target's allow list and on its blocklist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConsentOf {
    /// The target's invite policy.
    pub policy: InvitePolicy,
    /// The other user is on the target's allow list.
    pub allowed: bool,
    /// The other user is on the target's blocklist (SPEC.md 9.3).
    pub blocked: bool,
}

/// Whether `target` allows `other` (SPEC.md 8.1): a user always allows itself; a blocked
/// user is never allowed; otherwise the policy `everyone` allows anyone and `allowed`
/// only the users on the allow list.
pub fn allows(target: &SystemKey, other: &SystemKey, consent: ConsentOf) -> bool {
    if target == other {
        return true;
    }
    if consent.blocked {
        return false;
    }
    match consent.policy {
        InvitePolicy::Everyone => true,
        InvitePolicy::Allowed => consent.allowed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(b: u8) -> SystemKey {
        SystemKey([b; 32])
    }

    proptest! {
        /// The table of SPEC.md 8.1, over every combination.
        #[test]
        fn allows_follows_the_table(
            same in any::<bool>(),
            everyone in any::<bool>(),
            allowed in any::<bool>(),
            blocked in any::<bool>(),
        ) {
            let target = key(1);
            let other = if same { key(1) } else { key(2) };
            let policy = if everyone { InvitePolicy::Everyone } else { InvitePolicy::Allowed };
            let got = allows(&target, &other, ConsentOf { policy, allowed, blocked });
            let expected = same || (!blocked && (everyone || allowed));
            prop_assert_eq!(got, expected);
        }
    }

    #[test]
    fn a_blocked_user_on_the_allow_list_is_not_allowed() {
        let c = ConsentOf {
            policy: InvitePolicy::Allowed,
            allowed: true,
            blocked: true,
        };
        assert!(!allows(&key(1), &key(2), c));
        assert!(allows(&key(1), &key(1), c));
    }
}
