//! Property tests of the frame codec (SPEC.md sections 4.2–4.4).

use arbitrary::{Arbitrary, Unstructured};
use confab_spec::{ClientFrame, DecodeLimits, ServerFrame};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 2_000,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Every client frame survives encode → decode unchanged, and its encoding is canonical
    /// (re-encoding the decoded frame gives the same bytes).
    #[test]
    fn client_frames_round_trip(seed in prop::collection::vec(any::<u8>(), 0..2048)) {
        let mut u = Unstructured::new(&seed);
        if let Ok(frame) = ClientFrame::arbitrary(&mut u) {
            let bytes = frame.encode();
            let decoded = ClientFrame::decode(&bytes, &DecodeLimits::default());
            prop_assert_eq!(decoded.as_ref(), Ok(&frame));
            prop_assert_eq!(decoded.map(|f| f.encode()), Ok(bytes));
        }
    }

    /// The same for server frames.
    #[test]
    fn server_frames_round_trip(seed in prop::collection::vec(any::<u8>(), 0..4096)) {
        let mut u = Unstructured::new(&seed);
        if let Ok(frame) = ServerFrame::arbitrary(&mut u) {
            let bytes = frame.encode();
            let decoded = ServerFrame::decode(&bytes, &DecodeLimits::default());
            prop_assert_eq!(decoded.as_ref(), Ok(&frame));
            prop_assert_eq!(decoded.map(|f| f.encode()), Ok(bytes));
        }
    }

    /// Arbitrary bytes never panic the decoders; whatever decodes re-encodes to a frame
    /// that decodes to itself.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(f) = ClientFrame::decode(&bytes, &DecodeLimits::default()) {
            prop_assert_eq!(ClientFrame::decode(&f.encode(), &DecodeLimits::default()), Ok(f));
        }
        if let Ok(f) = ServerFrame::decode(&bytes, &DecodeLimits::default()) {
            prop_assert_eq!(ServerFrame::decode(&f.encode(), &DecodeLimits::default()), Ok(f));
        }
    }

    /// Valid frames with bytes flipped, truncated or extended never panic the decoder, and a
    /// mutation that still decodes without unknown keys is canonical: its bytes are exactly
    /// the re-encoding.
    #[test]
    fn mutated_frames_never_panic(
        seed in prop::collection::vec(any::<u8>(), 0..1024),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut u = Unstructured::new(&seed);
        let Ok(frame) = ServerFrame::arbitrary(&mut u) else { return Ok(()) };
        let mut bytes = frame.encode();
        for (i, b) in &flips {
            let i = i.index(bytes.len());
            bytes[i] ^= b;
        }
        let truncated = &bytes[..cut.index(bytes.len() + 1)];
        for candidate in [&bytes[..], truncated] {
            if let Ok(f) = ServerFrame::decode(candidate, &DecodeLimits::default()) {
                let re = f.encode();
                prop_assert_eq!(ServerFrame::decode(&re, &DecodeLimits::default()), Ok(f));
            }
        }
    }

    /// The gateway's MLS readers never panic on hostile bytes, including bytes that start
    /// like a PublicMessage Commit.
    #[test]
    fn mls_readers_never_panic(tail in prop::collection::vec(any::<u8>(), 0..512), header in 0u8..3) {
        let mut bytes = match header {
            0 => vec![],
            1 => vec![0, 1, 0, 1],
            _ => vec![0, 1, 0, 5, 0, 1],
        };
        bytes.extend_from_slice(&tail);
        let _ = confab_spec::mls_framing::peek(&bytes);
        let _ = confab_spec::mls_framing::commit_contents(&bytes);
        let _ = confab_spec::mls_framing::proposal_contents(&bytes);
        let _ = confab_spec::rooms::RoomRoles::from_extension(&bytes);
        if let Ok(kp) = confab_spec::mls_framing::key_package(&bytes) {
            let _ = kp.verify_signature();
        }
    }

    /// A frame larger than frame_bytes_max is refused before it is parsed.
    #[test]
    fn oversize_frames_are_refused(extra in 1usize..64) {
        let limits = DecodeLimits { frame_bytes_max: 64, ..DecodeLimits::default() };
        let bytes = vec![0xa1u8; 64 + extra];
        let err = ClientFrame::decode(&bytes, &limits).map(|_| ()).map_err(|e| e.code());
        prop_assert_eq!(err, Err(confab_spec::ErrorCode::FrameTooLarge));
    }
}

/// The generators above reach every frame type, so the round-trip properties cover them all.
#[test]
fn generators_cover_every_frame_type() {
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    let bytes = |i: u64, len: usize| {
        let mut v = vec![0u8; len];
        rand_chacha::ChaCha8Rng::seed_from_u64(i).fill_bytes(&mut v);
        v
    };
    let mut client = std::collections::BTreeSet::new();
    let mut server = std::collections::BTreeSet::new();
    for i in 0..4_000u64 {
        let seed = bytes(i, 1024);
        if let Ok(f) = ClientFrame::arbitrary(&mut Unstructured::new(&seed)) {
            client.insert(f.frame_type());
        }
        if let Ok(f) = ServerFrame::arbitrary(&mut Unstructured::new(&seed)) {
            server.insert(f.frame_type());
        }
    }
    assert_eq!(client.into_iter().collect::<Vec<_>>(), ClientFrame::TYPES);
    assert_eq!(server.into_iter().collect::<Vec<_>>(), ServerFrame::TYPES);
}
