//! Identity (SPEC.md section 3): system keys, device keys, device certificates,
//! revocations, and the signed auth transcript (section 5.3).
//!
//! Every signature covers the deterministic CBOR encoding of an array that starts with a
//! domain tag (section 3.4), and every verification is strict (`verify_strict`).

use ed25519_dalek::{SigningKey, Verifier as _, VerifyingKey};
use rand_core::{CryptoRng, RngCore};

use crate::cbor::{Writer, cbor_map};
use crate::error::ErrorCode;
use crate::frame::Auth;
use crate::ids::{
    DeviceId, DevicePublicKey, Nonce, ProcessId, ShortText, Signature, SystemKey, UnixMs,
};
use crate::limits::CERTIFICATE_LIFETIME_MAX_MS;

/// Domain tag of device certificates.
pub const DEVICE_CERTIFICATE_TAG: &str = "confab/v1/device-certificate";
/// Domain tag of revocations.
pub const DEVICE_REVOCATION_TAG: &str = "confab/v1/device-revocation";
/// Domain tag of the auth transcript.
pub const AUTH_TAG: &str = "confab/v1/auth";

cbor_map! {
    /// A device certificate (SPEC.md section 3.2): the system key's signature binding a
    /// device key to `(system, process)` for a validity window.
    pub struct DeviceCertificate {
        /// The issuing system.
        1 req system: SystemKey,
        /// The device's process id.
        2 req process: ProcessId,
        /// The device's ed25519 public key.
        3 req device_key: DevicePublicKey,
        /// Start of validity.
        4 req not_before_ms: UnixMs,
        /// End of validity (exclusive).
        5 req not_after_ms: UnixMs,
        /// System-key signature over the signing input.
        6 req signature: Signature,
    }
}

cbor_map! {
    /// A revocation (SPEC.md section 3.3) of every certificate of `(system, process)`.
    pub struct Revocation {
        /// The revoking system.
        1 req system: SystemKey,
        /// The revoked device's process id.
        2 req process: ProcessId,
        /// When the revocation takes effect.
        3 req revoked_at_ms: UnixMs,
        /// System-key signature over the signing input.
        4 req signature: Signature,
    }
}

/// Why a certificate, revocation or transcript was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The system key's signature does not verify (or the key is not a valid point).
    #[error("certificate or revocation signature does not verify")]
    BadSignature,
    /// `not_after_ms` has passed.
    #[error("certificate expired")]
    Expired,
    /// `not_after_ms <= not_before_ms`, or the lifetime is above the bound.
    #[error("certificate validity window is invalid or too long")]
    InvalidValidity,
    /// `not_before_ms` is further in the future than the allowed skew.
    #[error("certificate not yet valid")]
    NotYetValid,
    /// The device has been revoked.
    #[error("device revoked")]
    Revoked,
    /// The transcript signature does not verify under the device key.
    #[error("auth transcript signature does not verify")]
    BadTranscriptSignature,
}

impl IdentityError {
    /// The error code SPEC.md assigns to this rejection.
    pub fn code(self) -> ErrorCode {
        match self {
            IdentityError::BadSignature => ErrorCode::AuthCertificateInvalid,
            IdentityError::Expired | IdentityError::InvalidValidity => {
                ErrorCode::AuthCertificateExpired
            }
            IdentityError::NotYetValid => ErrorCode::AuthCertificateNotYetValid,
            IdentityError::Revoked => ErrorCode::AuthCertificateRevoked,
            IdentityError::BadTranscriptSignature => ErrorCode::AuthSignatureInvalid,
        }
    }
}

/// A system's signing key (the Polycentric identity key). It signs only certificates and
/// revocations.
pub struct SystemKeyPair(SigningKey);

impl SystemKeyPair {
    /// A fresh key from `rng`.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        Self(SigningKey::generate(rng))
    }

    /// The key with this 32-byte seed (for example, imported from a Polycentric backup).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(SigningKey::from_bytes(seed))
    }

    /// The 32-byte seed. A secret.
    pub fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The system key.
    pub fn public(&self) -> SystemKey {
        SystemKey(self.0.verifying_key().to_bytes())
    }

    /// Issues a certificate for `device_key` as `process`, valid in `[not_before, not_after)`.
    pub fn issue_certificate(
        &self,
        process: ProcessId,
        device_key: DevicePublicKey,
        not_before_ms: UnixMs,
        not_after_ms: UnixMs,
    ) -> DeviceCertificate {
        let system = self.public();
        let input =
            certificate_signing_input(&system, &process, &device_key, not_before_ms, not_after_ms);
        DeviceCertificate {
            system,
            process,
            device_key,
            not_before_ms,
            not_after_ms,
            signature: sign(&self.0, &input),
        }
    }

    /// Revokes every certificate of `process`, effective at `revoked_at_ms`.
    pub fn revoke(&self, process: ProcessId, revoked_at_ms: UnixMs) -> Revocation {
        let system = self.public();
        let input = revocation_signing_input(&system, &process, revoked_at_ms);
        Revocation {
            system,
            process,
            revoked_at_ms,
            signature: sign(&self.0, &input),
        }
    }
}

impl std::fmt::Debug for SystemKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SystemKeyPair({:?})", self.public())
    }
}

/// A device's signing key. It signs only auth transcripts (and, through the MLS engine,
/// MLS content as the leaf signature key).
#[derive(Clone)]
pub struct DeviceKeyPair(SigningKey);

impl DeviceKeyPair {
    /// A fresh key from `rng`.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        Self(SigningKey::generate(rng))
    }

    /// The key with this 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(SigningKey::from_bytes(seed))
    }

    /// The 32-byte seed. A secret.
    pub fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The device public key.
    pub fn public(&self) -> DevicePublicKey {
        DevicePublicKey(self.0.verifying_key().to_bytes())
    }

    /// Signs an auth transcript.
    pub fn sign_transcript(&self, transcript: &AuthTranscript<'_>) -> Signature {
        sign(&self.0, &transcript.signing_input())
    }
}

impl std::fmt::Debug for DeviceKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceKeyPair({:?})", self.public())
    }
}

impl DeviceCertificate {
    /// The device this certificate names.
    pub fn device_id(&self) -> DeviceId {
        DeviceId {
            system: self.system,
            process: self.process,
        }
    }

    /// The bytes the system key signs (SPEC.md section 3.2).
    pub fn signing_input(&self) -> Vec<u8> {
        certificate_signing_input(
            &self.system,
            &self.process,
            &self.device_key,
            self.not_before_ms,
            self.not_after_ms,
        )
    }

    /// Checks the certificate at `now` (SPEC.md sections 3.2 and 5.4, in the order of the
    /// table in 5.4). `revoked_at` returns the effective time of a known revocation of the
    /// device, if any.
    pub fn verify(
        &self,
        now: UnixMs,
        clock_skew_max_ms: u64,
        revoked_at: impl FnOnce(&DeviceId) -> Option<UnixMs>,
    ) -> Result<(), IdentityError> {
        verify(&self.system.0, &self.signing_input(), &self.signature)
            .map_err(|()| IdentityError::BadSignature)?;
        if self.not_after_ms <= self.not_before_ms
            || self.not_after_ms.since(self.not_before_ms) > CERTIFICATE_LIFETIME_MAX_MS
        {
            return Err(IdentityError::InvalidValidity);
        }
        if now >= self.not_after_ms {
            return Err(IdentityError::Expired);
        }
        if self.not_before_ms > now.plus_ms(clock_skew_max_ms) {
            return Err(IdentityError::NotYetValid);
        }
        if let Some(at) = revoked_at(&self.device_id()) {
            if at <= now {
                return Err(IdentityError::Revoked);
            }
        }
        Ok(())
    }
}

impl Revocation {
    /// The device revoked.
    pub fn device_id(&self) -> DeviceId {
        DeviceId {
            system: self.system,
            process: self.process,
        }
    }

    /// Checks the system key's signature.
    pub fn verify(&self) -> Result<(), IdentityError> {
        let input = revocation_signing_input(&self.system, &self.process, self.revoked_at_ms);
        verify(&self.system.0, &input, &self.signature).map_err(|()| IdentityError::BadSignature)
    }
}

/// Why an MLS member credential was refused (SPEC.md 7.1, REQ-7.1-3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// The basic credential's identity is not a device certificate.
    #[error("credential is not a device certificate")]
    NotACertificate,
    /// The certificate is not valid at the time of processing.
    #[error("certificate: {0}")]
    Certificate(IdentityError),
    /// The leaf's signature key is not the certificate's device key.
    #[error("leaf signature key is not the certificate's device key")]
    KeyMismatch,
}

/// Checks an MLS member credential (SPEC.md 7.1): `identity`, a basic credential's
/// identity, is a device certificate valid at `now` (with `clock_skew_max_ms` on its start,
/// and not revoked by then according to `revoked_at`) whose device key is `signature_key`,
/// the leaf's signature key. Returns the device it names. Clients and the gateway apply the
/// same check.
pub fn verify_member_credential(
    identity: &[u8],
    signature_key: &[u8],
    now: UnixMs,
    clock_skew_max_ms: u64,
    revoked_at: impl FnOnce(&DeviceId) -> Option<UnixMs>,
) -> Result<DeviceId, CredentialError> {
    let certificate = certificate_of_credential(identity)?;
    certificate
        .verify(now, clock_skew_max_ms, revoked_at)
        .map_err(CredentialError::Certificate)?;
    if certificate.device_key.as_bytes().as_slice() != signature_key {
        return Err(CredentialError::KeyMismatch);
    }
    Ok(certificate.device_id())
}

/// The device certificate in a basic credential's identity, unchecked (for members already
/// admitted).
pub fn certificate_of_credential(identity: &[u8]) -> Result<DeviceCertificate, CredentialError> {
    crate::cbor::from_slice(identity, &crate::DecodeLimits::default())
        .map_err(|_| CredentialError::NotACertificate)
}

/// The auth transcript (SPEC.md section 5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthTranscript<'a> {
    /// The version from `Challenge`.
    pub version: u64,
    /// The origin the client intended to reach, for example `wss://chat.example.org`.
    pub origin: &'a str,
    /// The nonce from `Challenge`.
    pub nonce: Nonce,
    /// Equal to `Auth.time_ms`.
    pub time_ms: UnixMs,
    /// The certificate's process id.
    pub process: ProcessId,
}

impl AuthTranscript<'_> {
    /// The bytes the device key signs.
    pub fn signing_input(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.array(6);
        w.text(AUTH_TAG);
        w.uint(self.version);
        w.text(self.origin);
        w.bytes(&self.nonce.0);
        w.uint(self.time_ms.0);
        w.bytes(&self.process.0);
        w.into_bytes()
    }

    /// Checks `signature` under `device_key`.
    pub fn verify(
        &self,
        device_key: &DevicePublicKey,
        signature: &Signature,
    ) -> Result<(), IdentityError> {
        verify(&device_key.0, &self.signing_input(), signature)
            .map_err(|()| IdentityError::BadTranscriptSignature)
    }
}

/// What the gateway expects of an `Auth` on one connection (SPEC.md section 5.4).
#[derive(Debug, Clone, Copy)]
pub struct AuthExpectation<'a> {
    /// The gateway's configured origin.
    pub origin: &'a str,
    /// The nonce this connection's `Challenge` carried (not yet used).
    pub nonce: Nonce,
    /// The version the `Challenge` named.
    pub version: u64,
    /// The gateway's clock.
    pub now: UnixMs,
    /// `clock_skew_max_ms`.
    pub clock_skew_max_ms: u64,
}

/// The `Auth` answering a `Challenge` of `version` with `nonce`: `certificate`, and the
/// device key's signature over the transcript of SPEC.md 5.3 for `origin` (truncated to a
/// `ShortText` as it travels) and `time_ms`.
pub fn sign_auth(
    key: &DeviceKeyPair,
    certificate: DeviceCertificate,
    version: u64,
    origin: &str,
    nonce: Nonce,
    time_ms: UnixMs,
) -> Auth {
    let origin = ShortText::truncated(origin);
    let transcript = AuthTranscript {
        version,
        origin: origin.as_str(),
        nonce,
        time_ms,
        process: certificate.process,
    };
    Auth {
        signature: key.sign_transcript(&transcript),
        certificate,
        time_ms,
        origin,
        nonce,
    }
}

/// Gateway-side verification of an `Auth` frame, in the order of the table in SPEC.md
/// section 5.4; the first failing check names the error code.
pub fn verify_auth(
    auth: &Auth,
    expected: &AuthExpectation<'_>,
    revoked_at: impl FnOnce(&DeviceId) -> Option<UnixMs>,
) -> Result<(), ErrorCode> {
    auth.certificate
        .verify(expected.now, expected.clock_skew_max_ms, revoked_at)
        .map_err(IdentityError::code)?;
    if auth.time_ms.0.abs_diff(expected.now.0) > expected.clock_skew_max_ms {
        return Err(ErrorCode::AuthClockSkew);
    }
    if auth.nonce != expected.nonce {
        return Err(ErrorCode::AuthNonceInvalid);
    }
    if auth.origin.as_str() != expected.origin {
        return Err(ErrorCode::AuthOriginMismatch);
    }
    let transcript = AuthTranscript {
        version: expected.version,
        origin: auth.origin.as_str(),
        nonce: auth.nonce,
        time_ms: auth.time_ms,
        process: auth.certificate.process,
    };
    transcript
        .verify(&auth.certificate.device_key, &auth.signature)
        .map_err(IdentityError::code)
}

fn certificate_signing_input(
    system: &SystemKey,
    process: &ProcessId,
    device_key: &DevicePublicKey,
    not_before_ms: UnixMs,
    not_after_ms: UnixMs,
) -> Vec<u8> {
    let mut w = Writer::new();
    w.array(6);
    w.text(DEVICE_CERTIFICATE_TAG);
    w.bytes(&system.0);
    w.bytes(&process.0);
    w.bytes(&device_key.0);
    w.uint(not_before_ms.0);
    w.uint(not_after_ms.0);
    w.into_bytes()
}

fn revocation_signing_input(
    system: &SystemKey,
    process: &ProcessId,
    revoked_at_ms: UnixMs,
) -> Vec<u8> {
    let mut w = Writer::new();
    w.array(4);
    w.text(DEVICE_REVOCATION_TAG);
    w.bytes(&system.0);
    w.bytes(&process.0);
    w.uint(revoked_at_ms.0);
    w.into_bytes()
}

fn sign(key: &SigningKey, input: &[u8]) -> Signature {
    use ed25519_dalek::Signer as _;
    Signature(key.sign(input).to_bytes())
}

fn verify(public: &[u8; 32], input: &[u8], signature: &Signature) -> Result<(), ()> {
    let key = VerifyingKey::from_bytes(public).map_err(|_| ())?;
    let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
    // verify_strict rejects small-order keys and non-canonical signatures (REQ-3.4-2).
    key.verify_strict(input, &sig).map_err(|_| ())?;
    // `Verifier::verify` is the permissive variant; keep the import explicit for clarity.
    let _ = VerifyingKey::verify;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (SystemKeyPair, DeviceKeyPair, DeviceCertificate) {
        let system = SystemKeyPair::from_seed(&[1; 32]);
        let device = DeviceKeyPair::from_seed(&[2; 32]);
        let cert = system.issue_certificate(
            ProcessId([3; 16]),
            device.public(),
            UnixMs(1_000),
            UnixMs(10_000),
        );
        (system, device, cert)
    }

    #[test]
    fn certificate_validity_window() {
        let (_, _, cert) = setup();
        assert_eq!(cert.verify(UnixMs(5_000), 0, |_| None), Ok(()));
        assert_eq!(
            cert.verify(UnixMs(10_000), 0, |_| None),
            Err(IdentityError::Expired)
        );
        assert_eq!(
            cert.verify(UnixMs(500), 0, |_| None),
            Err(IdentityError::NotYetValid)
        );
        assert_eq!(cert.verify(UnixMs(500), 500, |_| None), Ok(()));
    }

    #[test]
    fn tampered_certificate_is_rejected() {
        let (_, _, mut cert) = setup();
        cert.not_after_ms = UnixMs(20_000);
        assert_eq!(
            cert.verify(UnixMs(5_000), 0, |_| None),
            Err(IdentityError::BadSignature)
        );
    }

    #[test]
    fn revocation_applies_from_its_time() {
        let (system, _, cert) = setup();
        let rev = system.revoke(cert.process, UnixMs(6_000));
        assert_eq!(rev.verify(), Ok(()));
        let at = |_: &DeviceId| Some(rev.revoked_at_ms);
        assert_eq!(cert.verify(UnixMs(5_999), 0, at), Ok(()));
        assert_eq!(
            cert.verify(UnixMs(6_000), 0, at),
            Err(IdentityError::Revoked)
        );
    }

    #[test]
    fn transcript_binds_every_field() {
        let (_, device, cert) = setup();
        let t = AuthTranscript {
            version: 1,
            origin: "wss://chat.example.org",
            nonce: Nonce([9; 32]),
            time_ms: UnixMs(5_000),
            process: cert.process,
        };
        let sig = device.sign_transcript(&t);
        assert_eq!(t.verify(&cert.device_key, &sig), Ok(()));
        let other_origin = AuthTranscript {
            origin: "wss://evil.example",
            ..t
        };
        assert_eq!(
            other_origin.verify(&cert.device_key, &sig),
            Err(IdentityError::BadTranscriptSignature)
        );
        let other_nonce = AuthTranscript {
            nonce: Nonce([8; 32]),
            ..t
        };
        assert_eq!(
            other_nonce.verify(&cert.device_key, &sig),
            Err(IdentityError::BadTranscriptSignature)
        );
    }

    #[test]
    fn domain_tags_separate_signatures() {
        // A certificate signature must not verify as a revocation over the same fields.
        let (system, _, cert) = setup();
        let forged = Revocation {
            system: system.public(),
            process: cert.process,
            revoked_at_ms: UnixMs(1_000),
            signature: cert.signature,
        };
        assert_eq!(forged.verify(), Err(IdentityError::BadSignature));
    }
}
