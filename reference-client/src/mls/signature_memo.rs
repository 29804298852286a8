//! A memo of signatures already found valid, shared by the engines of many devices that
//! run in one process (the simulator's 1,000-member room): every member of a room checks
//! the same signature on the same message with the same key, and Ed25519 verification
//! (~50 µs here) was the largest cost left once state writes were batched.
//!
//! Verification is a pure function of (scheme, public key, signature, message), so
//! answering a repeated question from the memo changes no outcome: the memo is keyed by
//! the exact bytes of all four (no hash stands in for them), holds only successes (a
//! failure is checked again every time), and forgets the oldest entry when full. An engine
//! opened without a memo ([`super::open_engine`]) verifies every signature itself; the CLI
//! and the gateway never use one.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

/// Signatures found valid, shared between engines ([`super::open_engine_with`]).
#[derive(Debug)]
pub struct SignatureMemo {
    capacity: usize,
    inner: Mutex<Memo>,
}

#[derive(Debug, Default)]
struct Memo {
    valid: HashSet<Arc<[u8]>>,
    order: VecDeque<Arc<[u8]>>,
    hits: u64,
    misses: u64,
}

/// Whose verification a memo entry stands for. openmls and mls-rs may differ at the edges
/// of what they accept (strict or lenient Ed25519), so neither answers for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verifier {
    /// `openmls_rust_crypto`, by signature scheme.
    OpenMls,
    /// `mls_rs_crypto_rustcrypto`, by cipher suite.
    MlsRs,
}

/// How often the memo answered ([`SignatureMemo::stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoStats {
    /// Verifications answered from the memo.
    pub hits: u64,
    /// Verifications computed.
    pub misses: u64,
}

impl SignatureMemo {
    /// A memo that holds at most `capacity` signatures (at least one).
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity: capacity.max(1),
            inner: Mutex::new(Memo::default()),
        })
    }

    /// Checks a signature: answers from the memo when this exact question was answered
    /// "valid" before, otherwise runs `verify` and remembers a success.
    pub fn verify<E>(
        &self,
        verifier: Verifier,
        scheme: u16,
        public_key: &[u8],
        signature: &[u8],
        message: &[u8],
        verify: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), E> {
        let key = question(verifier, scheme, public_key, signature, message);
        {
            let mut memo = self.lock();
            if memo.valid.contains(&key[..]) {
                memo.hits += 1;
                return Ok(());
            }
            memo.misses += 1;
        }
        verify()?;
        let mut memo = self.lock();
        let key: Arc<[u8]> = key.into();
        if memo.valid.insert(key.clone()) {
            memo.order.push_back(key);
            while memo.order.len() > self.capacity {
                if let Some(oldest) = memo.order.pop_front() {
                    memo.valid.remove(&oldest);
                }
            }
        }
        Ok(())
    }

    /// How often it answered so far.
    pub fn stats(&self) -> MemoStats {
        let memo = self.lock();
        MemoStats {
            hits: memo.hits,
            misses: memo.misses,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Memo> {
        // A panic while holding the lock leaves a consistent memo (every change is one
        // insert or remove), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The memo's key: every input, length-prefixed so that no two questions share bytes.
fn question(
    verifier: Verifier,
    scheme: u16,
    public_key: &[u8],
    signature: &[u8],
    message: &[u8],
) -> Vec<u8> {
    let mut key = Vec::with_capacity(15 + public_key.len() + signature.len() + message.len());
    key.push(verifier as u8);
    key.extend_from_slice(&scheme.to_be_bytes());
    for part in [public_key, signature] {
        key.extend_from_slice(&(part.len() as u64).to_be_bytes()[2..]);
        key.extend_from_slice(part);
    }
    key.extend_from_slice(message);
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The memo answers exactly what `verify` would: a question is answered from the
        /// memo only after the same question succeeded, and failures are never remembered.
        #[test]
        fn the_memo_answers_only_questions_that_succeeded_before(
            questions in proptest::collection::vec(
                (0u16..2, proptest::collection::vec(0u8..3, 0..3),
                 proptest::collection::vec(0u8..3, 0..3),
                 proptest::collection::vec(0u8..3, 0..3)),
                1..60,
            ),
            capacity in 1usize..8,
        ) {
            // A "signature scheme" under which a signature is valid when it equals the
            // key followed by the message, with the last byte of the message ignored.
            let valid = |pk: &[u8], sig: &[u8], msg: &[u8]| {
                let mut expected = pk.to_vec();
                expected.extend_from_slice(&msg[..msg.len().saturating_sub(1)]);
                sig == expected.as_slice()
            };
            let memo = SignatureMemo::new(capacity);
            let mut computed = 0u64;
            for (scheme, pk, sig, msg) in &questions {
                let answer = memo.verify(Verifier::OpenMls, *scheme, pk, sig, msg, || {
                    computed += 1;
                    if valid(pk, sig, msg) { Ok(()) } else { Err(()) }
                });
                prop_assert_eq!(answer.is_ok(), valid(pk, sig, msg));
            }
            let stats = memo.stats();
            prop_assert_eq!(stats.misses, computed);
            prop_assert_eq!(stats.hits + stats.misses, questions.len() as u64);
            prop_assert!(memo.lock().order.len() <= capacity);
        }
    }

    #[test]
    fn a_repeated_valid_question_is_answered_from_the_memo() {
        let memo = SignatureMemo::new(4);
        let mut calls = 0;
        for _ in 0..3 {
            let answer: Result<(), ()> =
                memo.verify(Verifier::MlsRs, 1, b"pk", b"sig", b"msg", || {
                    calls += 1;
                    Ok(())
                });
            assert!(answer.is_ok());
        }
        assert_eq!(calls, 1);
        // The same bytes split differently between key and signature are another question.
        let answer: Result<(), ()> =
            memo.verify(Verifier::MlsRs, 1, b"pks", b"ig", b"msg", || Err(()));
        assert!(answer.is_err());
        // So is the same question to the other engine's verifier.
        let answer: Result<(), ()> =
            memo.verify(Verifier::OpenMls, 1, b"pk", b"sig", b"msg", || Err(()));
        assert!(answer.is_err());
        assert_eq!(memo.stats(), MemoStats { hits: 2, misses: 3 });
    }
}
