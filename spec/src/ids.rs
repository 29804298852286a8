//! Identifiers and common wire types (SPEC.md section 4.6). Each is a newtype whose
//! constructor enforces the size or range the spec gives it, so a decoded value is valid.

use serde::{Deserialize, Serialize};

use crate::cbor::{Cbor, DecodeError, Reader, Writer};

/// Declares a fixed-size byte-string identifier: hex in JSON and `Debug`, a CBOR byte
/// string of exactly `$len` bytes on the wire.
macro_rules! fixed_bytes {
    ($(#[$meta:meta])* $name:ident, $len:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[derive(arbitrary::Arbitrary)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// Length on the wire, in bytes.
            pub const LEN: usize = $len;

            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }

            /// Parses exactly `LEN` bytes.
            pub fn from_slice(bytes: &[u8]) -> Result<Self, DecodeError> {
                bytes
                    .try_into()
                    .map(Self)
                    .map_err(|_| DecodeError::Malformed(concat!(stringify!($name), " has the wrong length")))
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}({})", stringify!($name), hex::encode(self.0))
            }
        }

        impl Cbor for $name {
            fn encode(&self, w: &mut Writer) {
                w.bytes(&self.0);
            }
            fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
                let v = r.bytes($len)?;
                Self::from_slice(&v)
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&hex::encode(self.0))
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                let bytes = hex::decode(&text).map_err(serde::de::Error::custom)?;
                Self::from_slice(&bytes).map_err(serde::de::Error::custom)
            }
        }
    };
}

fixed_bytes!(
    /// A Polycentric system: an ed25519 public key. A Confab user.
    SystemKey,
    32
);
fixed_bytes!(
    /// A device of a system: 16 random bytes.
    ProcessId,
    16
);
fixed_bytes!(
    /// A device's ed25519 public key, bound to its system by a device certificate.
    DevicePublicKey,
    32
);
fixed_bytes!(
    /// A conversation, equal to its MLS group id.
    ConversationId,
    32
);
fixed_bytes!(
    /// A client-chosen message id that makes a send idempotent.
    MsgId,
    16
);
fixed_bytes!(
    /// A gateway session.
    SessionId,
    16
);
fixed_bytes!(
    /// A gateway challenge nonce.
    Nonce,
    32
);
fixed_bytes!(
    /// An ed25519 signature.
    Signature,
    64
);

/// A device, globally: `system || process` (48 bytes on the wire).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, arbitrary::Arbitrary)]
pub struct DeviceId {
    /// The device's system (user).
    pub system: SystemKey,
    /// The device's process id.
    pub process: ProcessId,
}

impl DeviceId {
    /// Length on the wire.
    pub const LEN: usize = 48;

    /// The 48 wire bytes.
    pub fn to_bytes(&self) -> [u8; 48] {
        let mut out = [0u8; 48];
        out[..32].copy_from_slice(&self.system.0);
        out[32..].copy_from_slice(&self.process.0);
        out
    }

    /// Parses exactly 48 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() != Self::LEN {
            return Err(DecodeError::Malformed("DeviceId has the wrong length"));
        }
        Ok(Self {
            system: SystemKey::from_slice(&bytes[..32])?,
            process: ProcessId::from_slice(&bytes[32..])?,
        })
    }
}

impl Cbor for DeviceId {
    fn encode(&self, w: &mut Writer) {
        w.bytes(&self.to_bytes());
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let v = r.bytes(Self::LEN)?;
        Self::from_slice(&v)
    }
}

impl Serialize for DeviceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.to_bytes()))
    }
}

impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(&text).map_err(serde::de::Error::custom)?;
        Self::from_slice(&bytes).map_err(serde::de::Error::custom)
    }
}

/// A stream the gateway sequences: a conversation's log or the device's own inbox.
/// On the wire: an empty byte string for the inbox, 32 bytes for a conversation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, arbitrary::Arbitrary)]
pub enum StreamId {
    /// The authenticated device's inbox (Welcome messages).
    Inbox,
    /// A conversation's log.
    Conversation(ConversationId),
}

impl Cbor for StreamId {
    fn encode(&self, w: &mut Writer) {
        match self {
            StreamId::Inbox => w.bytes(&[]),
            StreamId::Conversation(c) => w.bytes(&c.0),
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let v = r.bytes(ConversationId::LEN)?;
        if v.is_empty() {
            Ok(StreamId::Inbox)
        } else {
            Ok(StreamId::Conversation(ConversationId::from_slice(&v)?))
        }
    }
}

impl Serialize for StreamId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            StreamId::Inbox => s.serialize_str(""),
            StreamId::Conversation(c) => c.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for StreamId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(StreamId::Inbox);
        }
        let bytes = hex::decode(&text).map_err(serde::de::Error::custom)?;
        Ok(StreamId::Conversation(
            ConversationId::from_slice(&bytes).map_err(serde::de::Error::custom)?,
        ))
    }
}

/// Declares a bounded variable-length byte string (hex in JSON).
macro_rules! var_bytes {
    ($(#[$meta:meta])* $name:ident, $min:expr, $max:expr) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Hash)]
        pub struct $name(Vec<u8>);

        impl $name {
            /// Shortest accepted length.
            pub const MIN: usize = $min;
            /// Longest accepted length (the frame limit bounds it further).
            pub const MAX: usize = $max;

            /// Wraps `bytes` if their length is within bounds.
            pub fn new(bytes: Vec<u8>) -> Result<Self, DecodeError> {
                if bytes.len() < Self::MIN || bytes.len() > Self::MAX {
                    return Err(DecodeError::Malformed(concat!(stringify!($name), " has the wrong length")));
                }
                Ok(Self(bytes))
            }

            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8] {
                &self.0
            }

            /// Unwraps the raw bytes.
            pub fn into_bytes(self) -> Vec<u8> {
                self.0
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                // Never print contents: payloads and tokens must not reach logs.
                write!(f, "{}({} bytes)", stringify!($name), self.0.len())
            }
        }

        impl Cbor for $name {
            fn encode(&self, w: &mut Writer) {
                w.bytes(&self.0);
            }
            fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
                Self::new(r.bytes(Self::MAX)?)
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&hex::encode(&self.0))
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                let bytes = hex::decode(&text).map_err(serde::de::Error::custom)?;
                Self::new(bytes).map_err(serde::de::Error::custom)
            }
        }

        impl<'a> arbitrary::Arbitrary<'a> for $name {
            fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
                let len = u.int_in_range(Self::MIN..=Self::MAX.min(Self::MIN + 256))?;
                Ok(Self(u.bytes(len)?.to_vec()))
            }
        }
    };
}

var_bytes!(
    /// An opaque resume token (SPEC.md section 5.5). A secret: `Debug` never prints it.
    ResumeToken,
    16,
    64
);
var_bytes!(
    /// A serialized MLSMessage (RFC 9420 section 6), opaque to the codec.
    MlsBytes,
    1,
    usize::MAX
);

/// A short human-readable text (at most [`ShortText::MAX`] bytes of UTF-8), for example an
/// error's `detail`. Never carries payloads, keys or tokens.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize)]
#[serde(transparent)]
pub struct ShortText(String);

impl ShortText {
    /// Longest accepted text, in bytes (the default `text_bytes_max`).
    pub const MAX: usize = crate::limits::TEXT_BYTES_MAX_DEFAULT;

    /// Wraps `text` if it fits.
    pub fn new(text: impl Into<String>) -> Result<Self, DecodeError> {
        let text = text.into();
        if text.len() > Self::MAX {
            return Err(DecodeError::LimitExceeded("text_bytes_max"));
        }
        Ok(Self(text))
    }

    /// Truncates `text` at a character boundary to fit.
    pub fn truncated(text: &str) -> Self {
        let mut end = text.len().min(Self::MAX);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Self(text[..end].to_string())
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Cbor for ShortText {
    fn encode(&self, w: &mut Writer) {
        w.text(&self.0);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Self::new(r.text()?)
    }
}

impl<'de> Deserialize<'de> for ShortText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl<'a> arbitrary::Arbitrary<'a> for ShortText {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Self::truncated(&String::arbitrary(u)?))
    }
}

/// A per-stream sequence number, `1 <= seq < 2^63` (SPEC.md section 6.2).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize)]
pub struct Seq(u64);

impl Seq {
    /// The first seq of every stream.
    pub const FIRST: Seq = Seq(1);
    /// One past the largest seq.
    pub const LIMIT: u64 = 1 << 63;

    /// `Some` if `v` is a valid seq.
    pub fn new(v: u64) -> Option<Self> {
        (1..Self::LIMIT).contains(&v).then_some(Seq(v))
    }

    /// The numeric value.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The following seq, `None` at the end of the range.
    pub fn next(self) -> Option<Seq> {
        Seq::new(self.0 + 1)
    }
}

impl<'de> Deserialize<'de> for Seq {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Seq::new(u64::deserialize(d)?).ok_or_else(|| serde::de::Error::custom("seq out of range"))
    }
}

impl Cbor for Seq {
    fn encode(&self, w: &mut Writer) {
        w.uint(self.0);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Seq::new(r.uint()?).ok_or(DecodeError::Malformed("seq out of range"))
    }
}

impl<'a> arbitrary::Arbitrary<'a> for Seq {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Seq(u.int_in_range(1..=Seq::LIMIT - 1)?))
    }
}

/// Milliseconds since the Unix epoch (SPEC.md section 1).
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Debug,
    Serialize,
    Deserialize,
    Default,
    arbitrary::Arbitrary,
)]
#[serde(transparent)]
pub struct UnixMs(pub u64);

impl UnixMs {
    /// `self + ms`, saturating.
    pub fn plus_ms(self, ms: u64) -> UnixMs {
        UnixMs(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self`, 0 if `earlier` is later.
    pub fn since(self, earlier: UnixMs) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl Cbor for UnixMs {
    fn encode(&self, w: &mut Writer) {
        w.uint(self.0);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(UnixMs(r.uint()?))
    }
}

/// An MLS epoch (SPEC.md section 7.3).
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Debug,
    Serialize,
    Deserialize,
    Default,
    arbitrary::Arbitrary,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl Cbor for Epoch {
    fn encode(&self, w: &mut Writer) {
        w.uint(self.0);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Epoch(r.uint()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cbor::{DecodeLimits, from_slice, to_vec};

    #[test]
    fn stream_id_wire_forms() {
        assert_eq!(to_vec(&StreamId::Inbox), vec![0x40]);
        let conv = StreamId::Conversation(ConversationId([7; 32]));
        assert_eq!(
            from_slice::<StreamId>(&to_vec(&conv), &DecodeLimits::default()),
            Ok(conv)
        );
        // 16 bytes is neither form.
        let mut w = Writer::new();
        w.bytes(&[0; 16]);
        assert!(from_slice::<StreamId>(&w.into_bytes(), &DecodeLimits::default()).is_err());
    }

    #[test]
    fn seq_bounds() {
        assert_eq!(Seq::new(0), None);
        assert_eq!(Seq::new(Seq::LIMIT), None);
        assert_eq!(Seq::new(Seq::LIMIT - 1).and_then(Seq::next), None);
        assert_eq!(
            from_slice::<Seq>(&[0x00], &DecodeLimits::default()),
            Err(DecodeError::Malformed("seq out of range"))
        );
    }

    #[test]
    fn secrets_are_not_printed() {
        let token = ResumeToken::new(vec![0xAB; 32]).expect("valid length");
        assert_eq!(format!("{token:?}"), "ResumeToken(32 bytes)");
    }
}
