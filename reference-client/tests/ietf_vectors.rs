//! The IETF MLS test vectors that exercise what Confab relies on, run through the public
//! APIs of both engines. The vectors live in `../shared/mls-vectors/` beside the checkout;
//! `CONFAB_SHARED_DIR` overrides the location. Where they are missing the tests say so
//! loudly and pass, unless `CI=true`, where missing data is a failure.

use std::path::PathBuf;

use confab_spec::mls_framing::{self, ContentType, Peek, Sender, WireFormat};
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use serde_json::Value;

fn shared_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("CONFAB_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    if dir.join("mls-vectors").is_dir() {
        return Some(dir);
    }
    let msg = format!(
        "IETF MLS vectors not found at {} (set CONFAB_SHARED_DIR)",
        dir.display()
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg}");
    }
    eprintln!("\n!!! SKIPPED: {msg}\n");
    None
}

fn load(name: &str) -> Option<Vec<Value>> {
    let path = shared_dir()?.join("mls-vectors").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

fn unhex(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().expect("hex string")).expect("hex")
}

const MLS_MESSAGES: [&str; 7] = [
    "mls_welcome",
    "mls_group_info",
    "mls_key_package",
    "public_message_application",
    "public_message_proposal",
    "public_message_commit",
    "private_message",
];

#[test]
fn messages_decode_and_reencode_byte_for_byte_in_both_engines() {
    let Some(vectors) = load("messages.json") else {
        return;
    };
    let mut checked = 0;
    for (i, v) in vectors.iter().enumerate() {
        for field in MLS_MESSAGES {
            let bytes = unhex(&v[field]);
            let o = openmls::prelude::MlsMessageIn::tls_deserialize_exact(bytes.as_slice())
                .unwrap_or_else(|e| panic!("vector {i} {field}: openmls decode: {e}"));
            assert_eq!(
                o.tls_serialize_detached().expect("openmls encode"),
                bytes,
                "vector {i} {field}: openmls"
            );
            let r = mls_rs::MlsMessage::from_bytes(&bytes)
                .unwrap_or_else(|e| panic!("vector {i} {field}: mls-rs decode: {e}"));
            assert_eq!(
                r.to_bytes().expect("mls-rs encode"),
                bytes,
                "vector {i} {field}: mls-rs"
            );
            checked += 1;
        }
        let tree = unhex(&v["ratchet_tree"]);
        let o = openmls::prelude::RatchetTreeIn::tls_deserialize_exact(tree.as_slice())
            .unwrap_or_else(|e| panic!("vector {i} ratchet_tree: openmls: {e}"));
        assert_eq!(
            o.tls_serialize_detached().expect("encode"),
            tree,
            "vector {i} ratchet_tree: openmls"
        );
        let r = mls_rs::group::ExportedTree::from_bytes(&tree)
            .unwrap_or_else(|e| panic!("vector {i} ratchet_tree: mls-rs: {e}"));
        assert_eq!(
            r.to_bytes().expect("encode"),
            tree,
            "vector {i} ratchet_tree: mls-rs"
        );
    }
    assert_eq!(checked, vectors.len() * MLS_MESSAGES.len());
}

#[test]
fn framing_peek_agrees_with_both_engines_on_every_message() {
    let Some(vectors) = load("messages.json") else {
        return;
    };
    let mut framed = 0;
    for (i, v) in vectors.iter().enumerate() {
        for field in MLS_MESSAGES {
            let bytes = unhex(&v[field]);
            let peek =
                mls_framing::peek(&bytes).unwrap_or_else(|e| panic!("vector {i} {field}: {e}"));
            let r = mls_rs::MlsMessage::from_bytes(&bytes).expect("mls-rs decode");
            let o = openmls::prelude::MlsMessageIn::tls_deserialize_exact(bytes.as_slice())
                .expect("openmls decode");
            match (&peek, r.description(), o.extract()) {
                (
                    Peek::Framed(f),
                    mls_rs::MlsMessageDescription::PublicProtocolMessage {
                        group_id,
                        epoch_id,
                        content_type,
                        sender,
                        ..
                    },
                    openmls::prelude::MlsMessageBodyIn::PublicMessage(pm),
                ) => {
                    assert_eq!(f.wire_format, WireFormat::PublicMessage);
                    assert_eq!(
                        (f.group_id.as_slice(), f.epoch),
                        (group_id, epoch_id),
                        "vector {i} {field}: mls-rs"
                    );
                    assert_eq!(
                        (f.group_id.as_slice(), f.epoch),
                        (pm.group_id().as_slice(), pm.epoch().as_u64()),
                        "vector {i} {field}: openmls"
                    );
                    assert_eq!(
                        content_code(f.content_type),
                        content_type as u8,
                        "vector {i} {field}: mls-rs content type"
                    );
                    assert_eq!(
                        content_code(f.content_type),
                        pm.content_type() as u8,
                        "vector {i} {field}: openmls content type"
                    );
                    let leaf = match f.sender {
                        Some(Sender::Member(l)) => Some(l),
                        _ => None,
                    };
                    let rs_leaf = match sender {
                        mls_rs::group::Sender::Member(l) => Some(l),
                        _ => None,
                    };
                    let om_leaf = match pm.sender() {
                        openmls::prelude::Sender::Member(l) => Some(l.u32()),
                        _ => None,
                    };
                    assert_eq!(leaf, rs_leaf, "vector {i} {field}: sender (mls-rs)");
                    assert_eq!(leaf, om_leaf, "vector {i} {field}: sender (openmls)");
                    framed += 1;
                }
                (
                    Peek::Framed(f),
                    mls_rs::MlsMessageDescription::PrivateProtocolMessage {
                        group_id,
                        epoch_id,
                        content_type,
                    },
                    openmls::prelude::MlsMessageBodyIn::PrivateMessage(pm),
                ) => {
                    assert_eq!(f.wire_format, WireFormat::PrivateMessage);
                    assert_eq!(
                        (f.group_id.as_slice(), f.epoch),
                        (group_id, epoch_id),
                        "vector {i} {field}: mls-rs"
                    );
                    assert_eq!(
                        (f.group_id.as_slice(), f.epoch),
                        (pm.group_id().as_slice(), pm.epoch().as_u64()),
                        "vector {i} {field}: openmls"
                    );
                    assert_eq!(
                        content_code(f.content_type),
                        content_type as u8,
                        "vector {i} {field}: mls-rs content type"
                    );
                    assert_eq!(
                        content_code(f.content_type),
                        pm.content_type() as u8,
                        "vector {i} {field}: openmls content type"
                    );
                    assert_eq!(f.sender, None);
                    framed += 1;
                }
                (Peek::Unframed(w), _, _) => {
                    let expected = match field {
                        "mls_welcome" => WireFormat::Welcome,
                        "mls_group_info" => WireFormat::GroupInfo,
                        _ => WireFormat::KeyPackage,
                    };
                    assert_eq!(*w, expected, "vector {i} {field}");
                }
                (p, d, _) => panic!("vector {i} {field}: peek {p:?} disagrees with mls-rs {d:?}"),
            }
        }
    }
    assert_eq!(
        framed,
        vectors.len() * 4,
        "every framed message was compared"
    );
}

fn content_code(c: ContentType) -> u8 {
    match c {
        ContentType::Application => 1,
        ContentType::Proposal => 2,
        ContentType::Commit => 3,
        _ => 0,
    }
}
