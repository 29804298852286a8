//! Importing a Polycentric identity (SPEC.md 3.5, REQ-3.5-1): a backup string encoded byte
//! by byte the way Polycentric's apps encode it (protobuf `URLInfo` → `ExportBundle` with
//! events → `KeyPair`, base64url) imports to the same system key, padded or not, and every
//! malformed string is refused with the error that names what is wrong.

use base64::Engine as _;
use confab_client::identity::{ImportError, export_backup, import_backup};
use confab_spec::identity::SystemKeyPair;
use proptest::prelude::*;

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_varint(tag: u64, v: u64, out: &mut Vec<u8>) {
    varint(tag << 3, out);
    varint(v, out);
}

fn field_bytes(tag: u64, bytes: &[u8], out: &mut Vec<u8>) {
    varint((tag << 3) | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// The backup bytes as Polycentric writes them, with an `events` field that importers skip.
fn polycentric_bytes(url_type: u64, key_type: u64, seed: &[u8], public: &[u8]) -> Vec<u8> {
    let mut key_pair = Vec::new();
    field_varint(1, key_type, &mut key_pair);
    field_bytes(2, seed, &mut key_pair);
    field_bytes(3, public, &mut key_pair);
    let mut event = Vec::new();
    field_bytes(1, b"signed-event-bytes", &mut event);
    let mut events = Vec::new();
    field_bytes(1, &event, &mut events);
    let mut bundle = Vec::new();
    field_bytes(1, &key_pair, &mut bundle);
    field_bytes(2, &events, &mut bundle);
    let mut info = Vec::new();
    field_varint(1, url_type, &mut info);
    field_bytes(2, &bundle, &mut info);
    info
}

fn string(bytes: &[u8], padded: bool) -> String {
    let engine = if padded {
        base64::engine::general_purpose::URL_SAFE
    } else {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
    };
    format!("polycentric://{}", engine.encode(bytes))
}

proptest! {
    #[test]
    fn polycentric_backups_import_to_the_same_system(seed in any::<[u8; 32]>(), padded in any::<bool>()) {
        let system = SystemKeyPair::from_seed(&seed);
        let public = system.public().0;
        let backup = string(&polycentric_bytes(3, 1, &seed, &public), padded);
        let imported = import_backup(&backup).expect("imports");
        prop_assert_eq!(imported.public(), system.public());
        prop_assert_eq!(imported.seed(), seed);
        // Confab's own export reads back the same.
        prop_assert_eq!(import_backup(&export_backup(&system)).expect("round trip").seed(), seed);
    }

    #[test]
    fn arbitrary_strings_never_panic(tail in ".{0,200}") {
        let _ = import_backup(&format!("polycentric://{tail}"));
        let _ = import_backup(&tail);
    }
}

#[test]
fn malformed_backups_are_refused_with_what_is_wrong() {
    let seed = [7u8; 32];
    let public = SystemKeyPair::from_seed(&seed).public().0;
    let other = SystemKeyPair::from_seed(&[8; 32]).public().0;
    let cases: Vec<(String, ImportError)> = vec![
        ("https://polycentric.io/x".into(), ImportError::NotABackup),
        ("polycentric://not base64!".into(), ImportError::Base64),
        (
            string(&[0xff, 0xff, 0xff], false),
            ImportError::Protobuf("URLInfo"),
        ),
        (
            string(&polycentric_bytes(2, 1, &seed, &public), false),
            ImportError::NotAnIdentity(2),
        ),
        (
            string(&polycentric_bytes(3, 0, &seed, &public), false),
            ImportError::KeyType(0),
        ),
        (
            string(&polycentric_bytes(3, 1, &seed[..31], &public), false),
            ImportError::SeedLength(31),
        ),
        (
            string(&polycentric_bytes(3, 1, &seed, &other), true),
            ImportError::KeyMismatch,
        ),
        (
            {
                let mut info = Vec::new();
                field_varint(1, 3, &mut info);
                field_bytes(2, &[], &mut info);
                string(&info, false)
            },
            ImportError::NoKeyPair,
        ),
    ];
    for (backup, expected) in cases {
        let got = import_backup(&backup).map(|s| s.public());
        assert_eq!(got, Err(expected.clone()), "{backup}");
        // Every message says what to do or check, in words.
        assert!(expected.to_string().len() > 20);
    }
    // Surrounding whitespace (a pasted line) is fine.
    let backup = format!(
        "  {}\n",
        string(&polycentric_bytes(3, 1, &seed, &public), true)
    );
    assert_eq!(
        import_backup(&backup).map(|s| s.public()),
        Ok(SystemKeyPair::from_seed(&seed).public())
    );
}
