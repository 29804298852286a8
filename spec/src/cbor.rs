//! Strict deterministic CBOR (SPEC.md section 4.2) with explicit limits (section 4.4).
//!
//! The reader accepts exactly the canonical encoding the writer produces: shortest integer
//! and length forms, definite lengths, unsigned map keys in strictly ascending order, no
//! tags, floats or `null`. Every length is checked against the remaining input and the
//! configured limits before anything is allocated, so hostile bytes cost at most their own
//! size in memory.

use ciborium_ll::{Decoder, Encoder, Header};

use crate::error::ErrorCode;

/// Limits applied while decoding one frame (SPEC.md section 4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted frame, in bytes (`frame_bytes_max`).
    pub frame_bytes_max: usize,
    /// Largest array or map length (`collection_len_max`).
    pub collection_len_max: usize,
    /// Deepest nesting of arrays and maps; the envelope is depth 1 (`nesting_depth_max`).
    pub nesting_depth_max: usize,
    /// Longest text string in bytes (`text_bytes_max`).
    pub text_bytes_max: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            frame_bytes_max: crate::limits::FRAME_BYTES_MAX_DEFAULT,
            collection_len_max: crate::limits::COLLECTION_LEN_MAX_DEFAULT,
            nesting_depth_max: crate::limits::NESTING_DEPTH_MAX_DEFAULT,
            text_bytes_max: crate::limits::TEXT_BYTES_MAX_DEFAULT,
        }
    }
}

/// Why a frame could not be decoded. Each variant names the error code the peer is sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes break the encoding rules, or a field has the wrong type or size.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    /// A collection, nesting or text limit was exceeded.
    #[error("limit exceeded: {0}")]
    LimitExceeded(&'static str),
    /// The whole frame is larger than `frame_bytes_max`.
    #[error("frame of {len} bytes exceeds frame_bytes_max {max}")]
    TooLarge {
        /// Size of the frame received.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The frame type is not in the registry.
    #[error("unknown frame type {0}")]
    UnknownType(u64),
    /// The frame type exists but is sent by the other side.
    #[error("frame type {0} is not sent in this direction")]
    WrongDirection(u64),
}

impl DecodeError {
    /// The error code SPEC.md section 12 assigns to this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::Malformed(_) => ErrorCode::MalformedFrame,
            DecodeError::LimitExceeded(_) => ErrorCode::LimitExceeded,
            DecodeError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::UnknownType(_) => ErrorCode::UnknownFrameType,
            DecodeError::WrongDirection(_) => ErrorCode::UnexpectedFrame,
        }
    }
}

/// A value with a canonical CBOR encoding.
pub trait Cbor: Sized {
    /// Appends the canonical encoding of `self`.
    fn encode(&self, w: &mut Writer);
    /// Reads one value, enforcing the encoding rules and limits.
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError>;
}

/// Encodes `value` to canonical CBOR bytes.
pub fn to_vec<T: Cbor>(value: &T) -> Vec<u8> {
    let mut w = Writer::new();
    value.encode(&mut w);
    w.into_bytes()
}

/// Decodes exactly one value from `bytes`; trailing bytes are an error.
pub fn from_slice<T: Cbor>(bytes: &[u8], limits: &DecodeLimits) -> Result<T, DecodeError> {
    if bytes.len() > limits.frame_bytes_max {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max: limits.frame_bytes_max,
        });
    }
    let mut r = Reader::new(bytes, limits);
    let value = T::decode(&mut r)?;
    r.finish()?;
    Ok(value)
}

/// Canonical CBOR writer over a growable buffer.
#[derive(Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Self {
        Self { buf: Vec::new() }
    }

    /// The bytes written so far.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// Writes an unsigned integer in its shortest form.
    pub fn uint(&mut self, v: u64) {
        self.push(Header::Positive(v));
    }

    /// Writes a byte string.
    pub fn bytes(&mut self, v: &[u8]) {
        self.push(Header::Bytes(Some(v.len())));
        self.buf.extend_from_slice(v);
    }

    /// Writes a text string.
    pub fn text(&mut self, v: &str) {
        self.push(Header::Text(Some(v.len())));
        self.buf.extend_from_slice(v.as_bytes());
    }

    /// Writes `true` or `false`.
    pub fn bool(&mut self, v: bool) {
        self.push(Header::Simple(if v { 21 } else { 20 }));
    }

    /// Writes an array header of `len` items.
    pub fn array(&mut self, len: usize) {
        self.push(Header::Array(Some(len)));
    }

    /// Writes a map header of `len` pairs.
    pub fn map(&mut self, len: usize) {
        self.push(Header::Map(Some(len)));
    }

    fn push(&mut self, h: Header) {
        // ciborium-ll writes the shortest head form. Writing into a Vec cannot fail, so
        // the io::Result carries no information here.
        let mut enc = Encoder::from(&mut self.buf);
        let written = enc.push(h);
        debug_assert!(written.is_ok());
    }
}

/// Strict CBOR reader over one frame's bytes.
pub struct Reader<'a> {
    dec: Decoder<&'a [u8]>,
    total: usize,
    limits: DecodeLimits,
    depth: usize,
}

impl<'a> Reader<'a> {
    /// A reader over `bytes` with `limits`.
    pub fn new(bytes: &'a [u8], limits: &DecodeLimits) -> Self {
        Self {
            dec: Decoder::from(bytes),
            total: bytes.len(),
            limits: *limits,
            depth: 0,
        }
    }

    /// Fails unless every byte was consumed.
    pub fn finish(&mut self) -> Result<(), DecodeError> {
        if self.dec.offset() != self.total {
            return Err(DecodeError::Malformed("trailing bytes after frame"));
        }
        Ok(())
    }

    fn remaining(&mut self) -> usize {
        self.total - self.dec.offset()
    }

    /// Pulls one header and checks that it used the shortest form.
    fn header(&mut self) -> Result<Header, DecodeError> {
        let start = self.dec.offset();
        let h = self
            .dec
            .pull()
            .map_err(|_| DecodeError::Malformed("truncated or invalid CBOR header"))?;
        let used = self.dec.offset() - start;
        let arg = match h {
            Header::Positive(v) | Header::Tag(v) | Header::Negative(v) => Some(v),
            Header::Bytes(Some(n))
            | Header::Text(Some(n))
            | Header::Array(Some(n))
            | Header::Map(Some(n)) => Some(n as u64),
            Header::Bytes(None) | Header::Text(None) | Header::Array(None) | Header::Map(None) => {
                return Err(DecodeError::Malformed("indefinite length"));
            }
            Header::Break => return Err(DecodeError::Malformed("unexpected break")),
            Header::Float(_) => return Err(DecodeError::Malformed("floats are not allowed")),
            Header::Simple(20 | 21) => {
                if used != 1 {
                    return Err(DecodeError::Malformed("non-shortest simple value"));
                }
                None
            }
            Header::Simple(_) => return Err(DecodeError::Malformed("simple value not allowed")),
        };
        if let Some(v) = arg {
            if used != canonical_head_len(v) {
                return Err(DecodeError::Malformed("non-shortest integer or length"));
            }
        }
        match h {
            Header::Negative(_) => Err(DecodeError::Malformed("negative integers are not allowed")),
            Header::Tag(_) => Err(DecodeError::Malformed("tags are not allowed")),
            _ => Ok(h),
        }
    }

    /// Reads an unsigned integer.
    pub fn uint(&mut self) -> Result<u64, DecodeError> {
        match self.header()? {
            Header::Positive(v) => Ok(v),
            _ => Err(DecodeError::Malformed("expected unsigned integer")),
        }
    }

    /// Reads a boolean.
    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.header()? {
            Header::Simple(21) => Ok(true),
            Header::Simple(20) => Ok(false),
            _ => Err(DecodeError::Malformed("expected boolean")),
        }
    }

    /// Reads a byte string of at most `max` bytes.
    pub fn bytes(&mut self, max: usize) -> Result<Vec<u8>, DecodeError> {
        match self.header()? {
            Header::Bytes(Some(n)) => self.body(n, max, "byte string too long"),
            _ => Err(DecodeError::Malformed("expected byte string")),
        }
    }

    /// Reads a byte string of exactly `N` bytes.
    pub fn bytes_fixed<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let v = self.bytes(N)?;
        v.try_into()
            .map_err(|_| DecodeError::Malformed("byte string has the wrong length"))
    }

    /// Reads a UTF-8 text string within `text_bytes_max`.
    pub fn text(&mut self) -> Result<String, DecodeError> {
        match self.header()? {
            Header::Text(Some(n)) => {
                if n > self.limits.text_bytes_max {
                    return Err(DecodeError::LimitExceeded("text_bytes_max"));
                }
                let body = self.body(n, n, "text too long")?;
                String::from_utf8(body).map_err(|_| DecodeError::Malformed("invalid UTF-8"))
            }
            _ => Err(DecodeError::Malformed("expected text string")),
        }
    }

    /// Reads an array header; the caller then reads that many items and calls [`Reader::leave`].
    pub fn array(&mut self) -> Result<usize, DecodeError> {
        match self.header()? {
            Header::Array(Some(n)) => self.enter(n),
            _ => Err(DecodeError::Malformed("expected array")),
        }
    }

    /// Reads a map header; the caller then reads the pairs through [`MapKeys`] and calls
    /// [`Reader::leave`].
    pub fn map(&mut self) -> Result<MapKeys, DecodeError> {
        match self.header()? {
            Header::Map(Some(n)) => {
                let n = self.enter(n)?;
                Ok(MapKeys {
                    left: n,
                    last: None,
                })
            }
            _ => Err(DecodeError::Malformed("expected map")),
        }
    }

    /// Marks the end of the innermost array or map.
    pub fn leave(&mut self) {
        self.depth = self.depth.saturating_sub(1);
    }

    /// Skips one well-formed value (an unknown field's value), under the same limits.
    pub fn skip(&mut self) -> Result<(), DecodeError> {
        match self.header()? {
            Header::Positive(_) | Header::Simple(_) => Ok(()),
            Header::Bytes(Some(n)) => self.discard(n),
            Header::Text(Some(n)) => {
                if n > self.limits.text_bytes_max {
                    return Err(DecodeError::LimitExceeded("text_bytes_max"));
                }
                let body = self.body(n, n, "text too long")?;
                std::str::from_utf8(&body).map_err(|_| DecodeError::Malformed("invalid UTF-8"))?;
                Ok(())
            }
            Header::Array(Some(n)) => {
                let n = self.enter(n)?;
                for _ in 0..n {
                    self.skip()?;
                }
                self.leave();
                Ok(())
            }
            Header::Map(Some(n)) => {
                let n = self.enter(n)?;
                let mut keys = MapKeys {
                    left: n,
                    last: None,
                };
                while keys.next(self)?.is_some() {
                    self.skip()?;
                }
                self.leave();
                Ok(())
            }
            _ => Err(DecodeError::Malformed("unexpected item")),
        }
    }

    fn enter(&mut self, n: usize) -> Result<usize, DecodeError> {
        if n > self.limits.collection_len_max {
            return Err(DecodeError::LimitExceeded("collection_len_max"));
        }
        // Every item takes at least one byte: a length beyond the input is a lie.
        if n > self.remaining() {
            return Err(DecodeError::Malformed("collection longer than the frame"));
        }
        self.depth += 1;
        if self.depth > self.limits.nesting_depth_max {
            return Err(DecodeError::LimitExceeded("nesting_depth_max"));
        }
        Ok(n)
    }

    fn body(&mut self, n: usize, max: usize, why: &'static str) -> Result<Vec<u8>, DecodeError> {
        if n > max {
            return Err(DecodeError::Malformed(why));
        }
        if n > self.remaining() {
            return Err(DecodeError::Malformed("string longer than the frame"));
        }
        let mut buf = vec![0u8; n];
        use ciborium_io::Read as _;
        self.dec
            .read_exact(&mut buf)
            .map_err(|_| DecodeError::Malformed("truncated string"))?;
        Ok(buf)
    }

    fn discard(&mut self, n: usize) -> Result<(), DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Malformed("string longer than the frame"));
        }
        let mut chunk = [0u8; 256];
        let mut left = n;
        use ciborium_io::Read as _;
        while left > 0 {
            let take = left.min(chunk.len());
            self.dec
                .read_exact(&mut chunk[..take])
                .map_err(|_| DecodeError::Malformed("truncated string"))?;
            left -= take;
        }
        Ok(())
    }
}

/// Iterates the keys of a map, enforcing unsigned keys in strictly ascending order.
pub struct MapKeys {
    left: usize,
    last: Option<u64>,
}

impl MapKeys {
    /// The next key, or `None` after the last pair. The caller reads or skips the value.
    pub fn next(&mut self, r: &mut Reader<'_>) -> Result<Option<u64>, DecodeError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let key = match r.header()? {
            Header::Positive(k) => k,
            _ => return Err(DecodeError::Malformed("map keys must be unsigned integers")),
        };
        if let Some(last) = self.last {
            if key <= last {
                return Err(DecodeError::Malformed("map keys out of order or repeated"));
            }
        }
        self.last = Some(key);
        Ok(Some(key))
    }
}

/// Length of the shortest head (initial byte plus argument) for argument `v`.
fn canonical_head_len(v: u64) -> usize {
    match v {
        0..=23 => 1,
        24..=0xff => 2,
        0x100..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}

impl Cbor for u64 {
    fn encode(&self, w: &mut Writer) {
        w.uint(*self);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.uint()
    }
}

impl Cbor for bool {
    fn encode(&self, w: &mut Writer) {
        w.bool(*self);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.bool()
    }
}

impl Cbor for String {
    fn encode(&self, w: &mut Writer) {
        w.text(self);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.text()
    }
}

impl<T: Cbor> Cbor for Vec<T> {
    fn encode(&self, w: &mut Writer) {
        w.array(self.len());
        for item in self {
            item.encode(w);
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let n = r.array()?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(T::decode(r)?);
        }
        r.leave();
        Ok(out)
    }
}

/// A type encoded as a CBOR map of numbered fields (generated by `cbor_map!`).
pub trait MapFields: Sized {
    /// Number of fields present (optional fields that are `None` are absent).
    fn field_count(&self) -> usize;
    /// Writes the present fields, keys ascending.
    fn encode_fields(&self, w: &mut Writer);
    /// Reads the remaining pairs of a map whose header was already read.
    fn decode_fields(r: &mut Reader<'_>, keys: &mut MapKeys) -> Result<Self, DecodeError>;
}

/// Declares a struct encoded as a CBOR map with numbered keys (ascending), plus its
/// [`MapFields`] and [`Cbor`] implementations. Fields are `req` (always present) or `opt`
/// (absent when `None`).
macro_rules! cbor_map {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* $key:literal $kind:ident $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        #[derive(arbitrary::Arbitrary)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $crate::cbor::cbor_map!(@ty $kind $ty), )*
        }

        impl $crate::cbor::MapFields for $name {
            fn field_count(&self) -> usize {
                0 $( + $crate::cbor::cbor_map!(@present $kind self.$field) )*
            }
            fn encode_fields(&self, w: &mut $crate::cbor::Writer) {
                $( $crate::cbor::cbor_map!(@encode $kind w, $key, &self.$field); )*
            }
            fn decode_fields(
                r: &mut $crate::cbor::Reader<'_>,
                keys: &mut $crate::cbor::MapKeys,
            ) -> Result<Self, $crate::cbor::DecodeError> {
                $( let mut $field: Option<$ty> = None; )*
                while let Some(key) = keys.next(r)? {
                    match key {
                        $( $key => $field = Some(<$ty as $crate::cbor::Cbor>::decode(r)?), )*
                        _ => r.skip()?,
                    }
                }
                Ok(Self {
                    $( $field: $crate::cbor::cbor_map!(@finish $kind $field, $name, $field), )*
                })
            }
        }

        impl $crate::cbor::Cbor for $name {
            fn encode(&self, w: &mut $crate::cbor::Writer) {
                w.map($crate::cbor::MapFields::field_count(self));
                $crate::cbor::MapFields::encode_fields(self, w);
            }
            fn decode(r: &mut $crate::cbor::Reader<'_>) -> Result<Self, $crate::cbor::DecodeError> {
                let mut keys = r.map()?;
                let value = <Self as $crate::cbor::MapFields>::decode_fields(r, &mut keys)?;
                r.leave();
                Ok(value)
            }
        }
    };
    (@ty req $ty:ty) => { $ty };
    (@ty opt $ty:ty) => { Option<$ty> };
    (@present req $e:expr) => { 1 };
    (@present opt $e:expr) => { usize::from($e.is_some()) };
    (@encode req $w:ident, $key:literal, $v:expr) => {{
        $w.uint($key);
        $crate::cbor::Cbor::encode($v, $w);
    }};
    (@encode opt $w:ident, $key:literal, $v:expr) => {{
        if let Some(v) = $v {
            $w.uint($key);
            $crate::cbor::Cbor::encode(v, $w);
        }
    }};
    (@finish req $v:ident, $name:ident, $field:ident) => {
        $v.ok_or($crate::cbor::DecodeError::Malformed(
            concat!("missing field ", stringify!($name), ".", stringify!($field)),
        ))?
    };
    (@finish opt $v:ident, $name:ident, $field:ident) => { $v };
}
pub(crate) use cbor_map;

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> DecodeLimits {
        DecodeLimits::default()
    }

    #[test]
    fn rejects_non_shortest_integers() {
        // 5 encoded with a one-byte argument.
        assert_eq!(
            from_slice::<u64>(&[0x18, 0x05], &limits()),
            Err(DecodeError::Malformed("non-shortest integer or length"))
        );
        assert_eq!(from_slice::<u64>(&[0x18, 0x18], &limits()), Ok(24));
    }

    #[test]
    fn rejects_indefinite_and_trailing() {
        assert!(matches!(
            from_slice::<Vec<u64>>(&[0x9f, 0x01, 0xff], &limits()),
            Err(DecodeError::Malformed(_))
        ));
        assert_eq!(
            from_slice::<u64>(&[0x01, 0x01], &limits()),
            Err(DecodeError::Malformed("trailing bytes after frame"))
        );
    }

    #[test]
    fn lying_lengths_do_not_allocate() {
        // An array claiming 2^32 items in a 5-byte frame.
        let err = from_slice::<Vec<u64>>(&[0x9a, 0xff, 0xff, 0xff, 0xff], &limits());
        assert_eq!(err, Err(DecodeError::LimitExceeded("collection_len_max")));
        // A byte string claiming 1000 bytes with 2 present.
        let mut r = Reader::new(&[0x59, 0x03, 0xe8, 0, 0], &limits());
        assert_eq!(
            r.bytes(4096),
            Err(DecodeError::Malformed("string longer than the frame"))
        );
    }

    #[test]
    fn nesting_limit_is_enforced() {
        let mut bytes = vec![0x81; 9];
        bytes.push(0x00);
        let mut r = Reader::new(&bytes, &limits());
        assert_eq!(
            r.skip(),
            Err(DecodeError::LimitExceeded("nesting_depth_max"))
        );
    }

    #[test]
    fn writer_output_round_trips() {
        let v: Vec<u64> = vec![0, 23, 24, 255, 256, 65_535, 65_536, u64::MAX];
        let bytes = to_vec(&v);
        assert_eq!(from_slice::<Vec<u64>>(&bytes, &limits()), Ok(v));
    }
}
