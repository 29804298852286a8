//! Frame decoding (SPEC.md sections 4.2–4.4): hostile bytes never panic, and whatever
//! decodes re-encodes to a frame that decodes to itself.
#![no_main]

use confab_spec::{ClientFrame, DecodeLimits, ServerFrame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = DecodeLimits::default();
    if let Ok(frame) = ClientFrame::decode(data, &limits) {
        let bytes = frame.encode();
        assert_eq!(ClientFrame::decode(&bytes, &limits).as_ref(), Ok(&frame));
        assert!(bytes.len() <= data.len(), "re-encoding is never longer than the input");
    }
    if let Ok(frame) = ServerFrame::decode(data, &limits) {
        let bytes = frame.encode();
        assert_eq!(ServerFrame::decode(&bytes, &limits).as_ref(), Ok(&frame));
        assert!(bytes.len() <= data.len(), "re-encoding is never longer than the input");
    }
});
