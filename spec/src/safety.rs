//! Safety numbers (SPEC.md 3.6): a number two users compare out of band to confirm that
//! each holds the other's true system key. Both compute the same number from the two keys,
//! in either order.

use sha2::{Digest as _, Sha512};

use crate::ids::SystemKey;

/// The label hashed before the keys, so the number is of Confab's and nothing else's.
pub const SAFETY_NUMBER_LABEL: &[u8] = b"confab safety number v1";

/// Groups of five digits in a safety number.
pub const SAFETY_NUMBER_GROUPS: usize = 12;

/// The safety number of users `a` and `b`: SHA-512 of the label, then the smaller key,
/// then the larger (by their bytes); each of the first twelve 5-byte chunks of the hash,
/// read big-endian, modulo 100,000, as five decimal digits; the twelve groups joined by
/// spaces. The same for `(a, b)` and `(b, a)`.
pub fn safety_number(a: &SystemKey, b: &SystemKey) -> String {
    let (low, high) = if a.0 <= b.0 { (a, b) } else { (b, a) };
    let mut hash = Sha512::new();
    hash.update(SAFETY_NUMBER_LABEL);
    hash.update(low.0);
    hash.update(high.0);
    let digest = hash.finalize();
    let groups: Vec<String> = digest
        .chunks_exact(5)
        .take(SAFETY_NUMBER_GROUPS)
        .map(|chunk| {
            let value = chunk.iter().fold(0u64, |n, b| (n << 8) | u64::from(*b));
            format!("{:05}", value % 100_000)
        })
        .collect();
    groups.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Symmetric, twelve groups of five digits, and different for a different key.
        #[test]
        fn both_users_compute_the_same_number(a: [u8; 32], b: [u8; 32], c: [u8; 32]) {
            let (a, b, c) = (SystemKey(a), SystemKey(b), SystemKey(c));
            let n = safety_number(&a, &b);
            prop_assert_eq!(&n, &safety_number(&b, &a));
            let groups: Vec<&str> = n.split(' ').collect();
            prop_assert_eq!(groups.len(), SAFETY_NUMBER_GROUPS);
            prop_assert!(groups.iter().all(|g| g.len() == 5 && g.bytes().all(|d| d.is_ascii_digit())));
            if c != a && c != b {
                prop_assert_ne!(n, safety_number(&a, &c));
            }
        }
    }
}
