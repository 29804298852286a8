//! The gateway validates uploaded KeyPackages (SPEC.md section 8, REQ-8-1) with
//! `confab_spec::mls_framing::key_package`. Both engines' KeyPackages must read as
//! ciphersuite 1 with the device's certificate as credential, the certificate's device key
//! as the leaf's signature key, a lifetime around now and a valid signature; any change to
//! the signed bytes must break the signature, and malformed input must be refused.

mod support;

use confab_client::mls::EngineKind;
use confab_spec::DecodeLimits;
use confab_spec::identity::DeviceCertificate;
use confab_spec::mls_framing::{PeekError, key_package};
use support::*;

#[test]
fn both_engines_key_packages_read_and_verify() {
    for kind in EngineKind::ALL {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut device = Device::new(&dir, 1, kind);
        let now_s = now().0 / 1_000;
        for last_resort in [false, true] {
            for bytes in device.engine().key_packages(2, last_resort).expect("kp") {
                let kp = key_package(&bytes).unwrap_or_else(|e| panic!("{kind}: {e}"));
                assert_eq!((kp.cipher_suite, kp.credential_type), (1, 1), "{kind}");
                let cert: DeviceCertificate =
                    confab_spec::cbor::from_slice(&kp.identity, &DecodeLimits::default())
                        .expect("the credential is a device certificate");
                assert_eq!(cert.device_id(), device.id(), "{kind}");
                assert_eq!(kp.signature_key, cert.device_key.0.to_vec(), "{kind}");
                let (from, to) = kp.lifetime.expect("a key_package leaf has a lifetime");
                assert!(from <= now_s && now_s < to, "{kind}: lifetime {from}..{to}");
                assert!(kp.verify_signature(), "{kind}: signature");

                // Any change to the signed part or the signature is caught.
                let mut bad = kp.clone();
                bad.tbs[10] ^= 1;
                assert!(!bad.verify_signature(), "{kind}: tampered tbs");
                let mut bad = kp.clone();
                bad.signature[0] ^= 1;
                assert!(!bad.verify_signature(), "{kind}: tampered signature");
                let mut bad = kp.clone();
                bad.signature_key[0] ^= 1;
                assert!(!bad.verify_signature(), "{kind}: another key");

                // Malformed input is refused, never misread.
                assert_eq!(
                    key_package(&bytes[..bytes.len() - 1]),
                    Err(PeekError::Truncated)
                );
                let mut trailing = bytes.clone();
                trailing.push(0);
                assert!(key_package(&trailing).is_err(), "{kind}: trailing bytes");
            }
        }
        // Not a KeyPackage at all: a group's application message.
        device.engine().create_group(&GROUP).expect("group");
        let message = device.engine().encrypt(&GROUP, b"hi").expect("encrypt");
        assert!(key_package(&message).is_err(), "{kind}: a PrivateMessage");
    }
}
