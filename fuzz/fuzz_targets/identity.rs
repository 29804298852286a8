//! Device certificates, revocations and the auth transcript (SPEC.md sections 3 and 5.4):
//! hostile bytes and fields never panic verification, and nothing forged verifies.
#![no_main]

use arbitrary::Arbitrary;
use confab_spec::frame::Auth;
use confab_spec::identity::{AuthExpectation, DeviceCertificate, Revocation, verify_auth};
use confab_spec::ids::{Nonce, UnixMs};
use confab_spec::vectors::{ORIGIN, fixture};
use confab_spec::{DecodeLimits, cbor};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Case<'a> {
    CertificateBytes(&'a [u8], u64),
    RevocationBytes(&'a [u8]),
    Certificate(DeviceCertificate, u64),
    Auth(Auth, [u8; 32], u64),
}

fuzz_target!(|case: Case<'_>| {
    let (system, _, genuine) = fixture();
    match case {
        Case::CertificateBytes(bytes, now) => {
            if let Ok(cert) = cbor::from_slice::<DeviceCertificate>(bytes, &DecodeLimits::default()) {
                let verdict = cert.verify(UnixMs(now), 300_000, |_| None);
                if verdict.is_ok() {
                    // Only the fixture's system key signs anything here.
                    assert!(cert.system != system.public() || cert.signing_input() == genuine.signing_input());
                }
            }
        }
        Case::RevocationBytes(bytes) => {
            if let Ok(rev) = cbor::from_slice::<Revocation>(bytes, &DecodeLimits::default()) {
                let _ = rev.verify();
            }
        }
        Case::Certificate(cert, now) => {
            let ok = cert.verify(UnixMs(now), 300_000, |_| None).is_ok();
            assert!(!ok || cert.system != system.public() || cert.signing_input() == genuine.signing_input());
        }
        Case::Auth(auth, nonce, now) => {
            let expected = AuthExpectation {
                origin: ORIGIN,
                nonce: Nonce(nonce),
                version: 1,
                now: UnixMs(now),
                clock_skew_max_ms: 300_000,
            };
            let _ = verify_auth(&auth, &expected, |_| None);
        }
    }
});
