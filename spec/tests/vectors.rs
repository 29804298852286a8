//! The checked-in vectors match the generator, and every vector holds when read back the
//! way another implementation would read it: from the JSON files alone.

use std::path::PathBuf;

use confab_spec::frame::{Auth, ClientFrame, ServerFrame};
use confab_spec::identity::{AuthExpectation, DeviceCertificate, verify_auth};
use confab_spec::ids::{Nonce, UnixMs};
use confab_spec::session::{Input, Output};
use confab_spec::{DecodeLimits, ErrorCode, cbor, vectors};
use serde_json::Value;

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../vectors")
}

fn load(name: &str) -> Value {
    let path = vectors_dir().join(name);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

fn unhex(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().expect("hex string")).expect("valid hex")
}

#[test]
fn checked_in_files_match_the_generator() {
    for file in vectors::generate() {
        let path = vectors_dir().join(file.name);
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            current == file.text,
            "{} differs from the generator; run `cargo run -p confab-spec --bin confab-vectors -- --write`",
            path.display()
        );
    }
}

#[test]
fn every_frame_type_has_a_vector() {
    let v = load("frames.json");
    let mut client_types = std::collections::BTreeSet::new();
    let mut server_types = std::collections::BTreeSet::new();
    for vector in v["vectors"].as_array().expect("vectors") {
        let bytes = unhex(&vector["hex"]);
        match vector["direction"].as_str() {
            Some("client") => {
                let f = ClientFrame::decode(&bytes, &DecodeLimits::default()).expect("decodes");
                client_types.insert(f.frame_type());
            }
            _ => {
                let f = ServerFrame::decode(&bytes, &DecodeLimits::default()).expect("decodes");
                server_types.insert(f.frame_type());
            }
        }
    }
    assert_eq!(
        client_types.into_iter().collect::<Vec<_>>(),
        ClientFrame::TYPES
    );
    assert_eq!(
        server_types.into_iter().collect::<Vec<_>>(),
        ServerFrame::TYPES
    );
}

#[test]
fn frames_decode_to_their_value_and_encode_to_their_bytes() {
    let v = load("frames.json");
    let vectors = v["vectors"].as_array().expect("vectors");
    assert!(vectors.len() >= 30);
    for vector in vectors {
        let name = vector["name"].as_str().unwrap_or("?");
        let bytes = unhex(&vector["hex"]);
        let (decoded, from_value, reencoded) = match vector["direction"].as_str() {
            Some("client") => {
                let d = ClientFrame::decode(&bytes, &DecodeLimits::default()).expect(name);
                let f: ClientFrame = serde_json::from_value(vector["value"].clone()).expect(name);
                (
                    serde_json::to_value(&d).expect(name),
                    f.encode(),
                    d.encode(),
                )
            }
            _ => {
                let d = ServerFrame::decode(&bytes, &DecodeLimits::default()).expect(name);
                let f: ServerFrame = serde_json::from_value(vector["value"].clone()).expect(name);
                (
                    serde_json::to_value(&d).expect(name),
                    f.encode(),
                    d.encode(),
                )
            }
        };
        assert_eq!(decoded, vector["value"], "{name}: decoded value");
        assert_eq!(from_value, bytes, "{name}: encoding of the value");
        assert_eq!(reencoded, bytes, "{name}: re-encoding");
    }
}

#[test]
fn frames_are_valid_cbor_for_a_general_decoder() {
    // An independent CBOR implementation (ciborium) reads every frame as a map.
    let v = load("frames.json");
    for vector in v["vectors"].as_array().expect("vectors") {
        let bytes = unhex(&vector["hex"]);
        let value: ciborium::Value =
            ciborium::de::from_reader(bytes.as_slice()).expect("ciborium decodes");
        assert!(value.is_map(), "{}", vector["name"]);
    }
}

#[test]
fn invalid_frames_get_their_error_codes() {
    let v = load("invalid-frames.json");
    let vectors = v["vectors"].as_array().expect("vectors");
    assert!(vectors.len() >= 20);
    for vector in vectors {
        let name = vector["name"].as_str().unwrap_or("?");
        let bytes = unhex(&vector["hex"]);
        let expected = ErrorCode::from_value(vector["error_code"].as_u64().expect("code") as u16);
        let got = match vector["direction"].as_str() {
            Some("client") => ClientFrame::decode(&bytes, &DecodeLimits::default()).map(|_| ()),
            _ => ServerFrame::decode(&bytes, &DecodeLimits::default()).map(|_| ()),
        };
        match got {
            Ok(()) => panic!("{name}: decoded but must be rejected"),
            Err(e) => assert_eq!(e.code(), expected, "{name}: {e}"),
        }
    }
}

#[test]
fn certificate_verdicts_hold() {
    let v = load("certificates.json");
    let skew = v["clock_skew_max_ms"].as_u64().expect("skew");
    let vectors = v["vectors"].as_array().expect("vectors");
    for vector in vectors {
        let name = vector["name"].as_str().unwrap_or("?");
        let bytes = unhex(&vector["certificate_hex"]);
        let cert: DeviceCertificate =
            cbor::from_slice(&bytes, &DecodeLimits::default()).expect(name);
        assert_eq!(
            hex::encode(cert.signing_input()),
            vector["signing_input_hex"].as_str().unwrap_or(""),
            "{name}"
        );
        let now = UnixMs(vector["now_ms"].as_u64().expect("now"));
        let revoked_at = vector["revocation"]["revoked_at_ms"].as_u64().map(UnixMs);
        let verdict = vectors::verdict(cert.verify(now, skew, |_| revoked_at));
        assert_eq!(verdict, vector["verdict"].as_str().unwrap_or(""), "{name}");
    }
    let verdicts: Vec<&str> = vectors
        .iter()
        .filter_map(|v| v["verdict"].as_str())
        .collect();
    for needed in [
        "valid",
        "auth_certificate_expired",
        "auth_certificate_invalid",
        "auth_certificate_revoked",
        "auth_certificate_not_yet_valid",
    ] {
        assert!(
            verdicts.contains(&needed),
            "no certificate vector with verdict {needed}"
        );
    }
}

#[test]
fn auth_verdicts_hold() {
    let v = load("auth.json");
    let g = &v["gateway"];
    let origin = g["origin"].as_str().expect("origin");
    let nonce = Nonce(unhex(&g["nonce"]).try_into().expect("32 bytes"));
    let now = UnixMs(g["now_ms"].as_u64().expect("now"));
    let skew = g["clock_skew_max_ms"].as_u64().expect("skew");
    let mut verdicts = std::collections::BTreeSet::new();
    for vector in v["vectors"].as_array().expect("vectors") {
        let name = vector["name"].as_str().unwrap_or("?");
        let frame =
            ClientFrame::decode(&unhex(&vector["auth_frame_hex"]), &DecodeLimits::default())
                .expect(name);
        let ClientFrame::Auth(auth) = frame else {
            panic!("{name}: not an Auth frame")
        };
        let parsed: Auth = serde_json::from_value(vector["auth"].clone()).expect(name);
        assert_eq!(parsed, auth, "{name}");
        let expected = AuthExpectation {
            origin,
            nonce,
            version: 1,
            now,
            clock_skew_max_ms: skew,
        };
        let verdict = match verify_auth(&auth, &expected, |_| None) {
            Ok(()) => "valid".to_string(),
            Err(code) => code.name().to_string(),
        };
        assert_eq!(verdict, vector["verdict"].as_str().unwrap_or(""), "{name}");
        verdicts.insert(verdict);
    }
    for needed in [
        "valid",
        "auth_clock_skew",
        "auth_nonce_invalid",
        "auth_origin_mismatch",
        "auth_signature_invalid",
        "auth_certificate_expired",
    ] {
        assert!(
            verdicts.contains(needed),
            "no auth vector with verdict {needed}"
        );
    }
}

#[test]
fn session_transcripts_replay_exactly() {
    let v = load("session.json");
    let seed = v["seed"].as_u64().expect("seed");
    for t in v["transcripts"].as_array().expect("transcripts") {
        let name = t["name"].as_str().unwrap_or("?");
        let steps = t["steps"].as_array().expect("steps");
        let inputs: Vec<(UnixMs, Input)> = steps
            .iter()
            .map(|s| {
                (
                    UnixMs(s["at_ms"].as_u64().expect("at")),
                    serde_json::from_value(s["input"].clone()).expect(name),
                )
            })
            .collect();
        let replayed = vectors::run_session(seed, inputs);
        for (i, (step, expected)) in replayed.iter().zip(steps).enumerate() {
            let expected_outputs: Vec<Output> =
                serde_json::from_value(expected["outputs"].clone()).expect(name);
            assert_eq!(step.outputs, expected_outputs, "{name}, step {i}");
            assert_eq!(
                step.next_timeout_ms.map(|t| t.0),
                expected["next_timeout_ms"].as_u64(),
                "{name}, step {i}: next timeout"
            );
        }
    }
}

#[test]
fn safety_numbers_hold_in_both_orders() {
    use confab_spec::ids::SystemKey;
    use confab_spec::safety::safety_number;
    let file = load("safety-numbers.json");
    let vectors = file["vectors"].as_array().expect("vectors");
    assert!(vectors.len() >= 6);
    let key = |v: &Value| SystemKey(unhex(v).try_into().expect("32 bytes"));
    for v in vectors {
        let (a, b) = (key(&v["a"]), key(&v["b"]));
        let expected = v["safety_number"].as_str().expect("a number");
        assert_eq!(safety_number(&a, &b), expected);
        assert_eq!(safety_number(&b, &a), expected);
    }
}

#[test]
fn content_maps_open_and_the_rest_does_not() {
    use confab_spec::content::AppContent;
    let file = load("content.json");
    for v in file["vectors"].as_array().expect("vectors") {
        let content = AppContent::open(&unhex(&v["plaintext"])).expect("a content map");
        assert_eq!(content.text, unhex(&v["text"]));
        assert_eq!(Some(content.counter), v["counter"].as_u64());
    }
    let refused = file["not_content"].as_array().expect("not_content");
    assert_eq!(refused.len(), 5);
    for v in refused {
        assert_eq!(
            AppContent::open(&unhex(&v["plaintext"])),
            None,
            "{}",
            v["why"]
        );
    }
}
