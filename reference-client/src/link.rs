//! Device linking: a new device gets its certificate from a device that holds the system
//! key, and never holds the system key itself (SPEC.md 14, "Who holds which key").
//!
//! 1. The new device (`init --link`) makes its device key and process id and shows a
//!    *link request*: `confab-link:` and the hex of the process id and the device's public
//!    key, with a six-digit check code.
//! 2. The device with the system key (`device link REQUEST`) shows the same check code, so
//!    the user sees that the request was not swapped on its way, and prints a
//!    *certificate string*: `confab-cert:` and the hex of the CBOR device certificate.
//! 3. The new device (`link CERT`) takes the certificate only if it names its own process
//!    id and key and verifies now.
//!
//! Neither string holds a secret; both may travel over any channel (a chat, an e-mail, a
//! QR code). The same steps renew a linked device's certificate before it expires.

use confab_spec::identity::{DeviceCertificate, IdentityError};
use confab_spec::ids::{DevicePublicKey, ProcessId, UnixMs};
use sha2::{Digest as _, Sha512};

/// The start of a link request.
pub const REQUEST_PREFIX: &str = "confab-link:";

/// The start of a certificate string.
pub const CERTIFICATE_PREFIX: &str = "confab-cert:";

/// Longest certificate string taken (a certificate is about 190 bytes of CBOR).
pub const CERTIFICATE_STRING_MAX: usize = 2_048;

/// What a new device asks to be certified as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkRequest {
    /// The new device's process id.
    pub process: ProcessId,
    /// The new device's public key.
    pub device_key: DevicePublicKey,
}

/// Why a link string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// Not a string of the expected kind.
    #[error("not a {0} (it starts with `{1}`)")]
    Format(&'static str, &'static str),
    /// The certificate does not decode.
    #[error("the certificate does not decode")]
    Certificate,
    /// The certificate names another device or key.
    #[error(
        "the certificate is for another device: run `confab device link` with this device's request"
    )]
    OtherDevice,
    /// The certificate is for another user than this device already belongs to.
    #[error("the certificate is of another user than this device's")]
    OtherUser,
    /// The certificate does not verify now.
    #[error("the certificate is not valid now: {0}")]
    Invalid(String),
}

impl LinkRequest {
    /// The request as the new device shows it.
    pub fn encode(&self) -> String {
        format!(
            "{REQUEST_PREFIX}{}{}",
            hex::encode(self.process.0),
            hex::encode(self.device_key.0)
        )
    }

    /// Reads a request (surrounding whitespace ignored).
    pub fn decode(text: &str) -> Result<Self, LinkError> {
        let bad = LinkError::Format("link request", REQUEST_PREFIX);
        let body = text
            .trim()
            .strip_prefix(REQUEST_PREFIX)
            .ok_or(bad.clone())?;
        let bytes = hex::decode(body).map_err(|_| bad.clone())?;
        if bytes.len() != 48 {
            return Err(bad);
        }
        let (process, key) = bytes.split_at(16);
        Ok(Self {
            process: ProcessId(process.try_into().map_err(|_| bad.clone())?),
            device_key: DevicePublicKey(key.try_into().map_err(|_| bad)?),
        })
    }

    /// Six digits both devices show, so the user sees that the device that signs got the
    /// request the new device made: from SHA-512 over a label and the request's bytes.
    pub fn check_code(&self) -> String {
        let mut hash = Sha512::new();
        hash.update(b"confab link check v1");
        hash.update(self.process.0);
        hash.update(self.device_key.0);
        let digest = hash.finalize();
        let value = digest[..4]
            .iter()
            .fold(0u32, |n, b| (n << 8) | u32::from(*b));
        format!("{:06}", value % 1_000_000)
    }
}

/// A certificate as the signing device prints it.
pub fn encode_certificate(certificate: &DeviceCertificate) -> String {
    format!(
        "{CERTIFICATE_PREFIX}{}",
        hex::encode(confab_spec::cbor::to_vec(certificate))
    )
}

/// Reads a certificate string and checks that it certifies `request` (this device) and
/// verifies at `now`.
pub fn accept_certificate(
    text: &str,
    request: &LinkRequest,
    now: UnixMs,
) -> Result<DeviceCertificate, LinkError> {
    let bad = LinkError::Format("certificate string", CERTIFICATE_PREFIX);
    let text = text.trim();
    if text.len() > CERTIFICATE_STRING_MAX {
        return Err(bad);
    }
    let body = text.strip_prefix(CERTIFICATE_PREFIX).ok_or(bad.clone())?;
    let bytes = hex::decode(body).map_err(|_| bad)?;
    let certificate: DeviceCertificate =
        confab_spec::cbor::from_slice(&bytes, &confab_spec::DecodeLimits::default())
            .map_err(|_| LinkError::Certificate)?;
    if certificate.process != request.process || certificate.device_key != request.device_key {
        return Err(LinkError::OtherDevice);
    }
    // The signing device's clock may run ahead of this one's, as a gateway allows
    // (`clock_skew_max_ms`, SPEC.md 5.4).
    certificate
        .verify(now, confab_spec::limits::CLOCK_SKEW_MAX_MS_DEFAULT, |_| {
            None
        })
        .map_err(|e: IdentityError| LinkError::Invalid(e.to_string()))?;
    Ok(certificate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use confab_spec::identity::{DeviceKeyPair, SystemKeyPair};
    use proptest::prelude::*;

    const NOW: UnixMs = UnixMs(1_800_000_000_000);

    fn request(seed: u8) -> (LinkRequest, DeviceKeyPair) {
        let key = DeviceKeyPair::from_seed(&[seed; 32]);
        (
            LinkRequest {
                process: ProcessId([seed ^ 0x55; 16]),
                device_key: key.public(),
            },
            key,
        )
    }

    fn certify(system: &SystemKeyPair, r: &LinkRequest) -> DeviceCertificate {
        system.issue_certificate(
            r.process,
            r.device_key,
            UnixMs(NOW.0 - 60_000),
            NOW.plus_ms(86_400_000),
        )
    }

    #[test]
    fn a_certificate_for_this_device_is_taken_and_any_other_refused() {
        let system = SystemKeyPair::from_seed(&[1; 32]);
        let (mine, _) = request(2);
        let (theirs, _) = request(3);
        let text = encode_certificate(&certify(&system, &mine));
        assert!(accept_certificate(&format!(" {text}\n"), &mine, NOW).is_ok());
        assert_eq!(
            accept_certificate(&text, &theirs, NOW),
            Err(LinkError::OtherDevice)
        );
        assert!(matches!(
            accept_certificate(&text, &mine, NOW.plus_ms(2 * 86_400_000)),
            Err(LinkError::Invalid(_))
        ));
        // Issued by a device whose clock runs four minutes ahead: taken.
        let ahead = system.issue_certificate(
            mine.process,
            mine.device_key,
            NOW.plus_ms(240_000),
            NOW.plus_ms(86_400_000),
        );
        assert!(accept_certificate(&encode_certificate(&ahead), &mine, NOW).is_ok());
        assert!(matches!(
            accept_certificate("confab-link:00", &mine, NOW),
            Err(LinkError::Format(..))
        ));
        // Signed by another system for the right device, then claimed to be of this one.
        let mut forged = certify(&SystemKeyPair::from_seed(&[9; 32]), &mine);
        forged.system = system.public();
        assert!(matches!(
            accept_certificate(&encode_certificate(&forged), &mine, NOW),
            Err(LinkError::Invalid(_))
        ));
    }

    proptest! {
        /// A request reads back as itself, its check code is six digits, and a request
        /// with any byte changed reads as another request (never as this one).
        #[test]
        fn requests_round_trip_and_changes_show(seed: u8, at in 0usize..48, flip in 1u8..) {
            let (r, _) = request(seed);
            let text = r.encode();
            prop_assert_eq!(LinkRequest::decode(&text), Ok(r));
            let code = r.check_code();
            prop_assert!(code.len() == 6 && code.bytes().all(|d| d.is_ascii_digit()));
            let mut bytes = hex::decode(&text[REQUEST_PREFIX.len()..]).expect("hex");
            bytes[at] ^= flip;
            let changed = LinkRequest::decode(&format!("{REQUEST_PREFIX}{}", hex::encode(bytes)));
            prop_assert!(changed.is_ok_and(|c| c != r));
        }

        /// Whatever the text, reading it never panics.
        #[test]
        fn any_text_is_read_or_refused(text in ".{0,200}") {
            let (r, _) = request(1);
            let _ = LinkRequest::decode(&text);
            let _ = accept_certificate(&text, &r, NOW);
        }
    }
}
