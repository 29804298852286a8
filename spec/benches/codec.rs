//! The frame codec against a plain CBOR round trip of the same bytes.
//!
//! For each frame (a live `Deliver` of a 100-byte message, a replay `Batch` of 100 such
//! entries, a client `Send`) it measures Confab's strict decode (typed, deterministic
//! encoding checked, limits enforced) plus encode, and the baseline in the same run:
//! `ciborium` decoding the same bytes into a generic `Value` and encoding it again. A
//! table of medians and ratios follows criterion's output.
//!
//! ```text
//! cargo bench -p confab-spec --bench codec
//! ```

mod support;

use confab_spec::cbor::DecodeLimits;
use confab_spec::frame::{Batch, ClientFrame, Deliver, Entry, EntryBody, Send, ServerFrame};
use confab_spec::ids::{
    ConversationId, DeviceId, Epoch, MlsBytes, MsgId, ProcessId, Seq, StreamId, SystemKey, UnixMs,
};
use criterion::Criterion;
use support::median;

const CONV: ConversationId = ConversationId([0x42; 32]);

fn entry(seq: u64) -> Entry {
    Entry {
        seq: Seq::new(seq).expect("seq"),
        msg_id: {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&seq.to_be_bytes());
            MsgId(id)
        },
        sender: DeviceId {
            system: SystemKey([7; 32]),
            process: ProcessId([8; 16]),
        },
        accepted_ms: UnixMs(1_767_225_600_000 + seq),
        payload: MlsBytes::new(vec![0xA5; 100]).expect("payload"),
        body: EntryBody::Application { epoch: Epoch(3) },
    }
}

/// (name, encoded frame, is it a server frame).
fn frames() -> Vec<(&'static str, Vec<u8>, bool)> {
    let deliver = ServerFrame::Deliver(Deliver {
        stream: StreamId::Conversation(CONV),
        entry: entry(1),
    });
    let batch = ServerFrame::Batch(Batch {
        stream: StreamId::Conversation(CONV),
        entries: (1..=100).map(entry).collect(),
        more: true,
    });
    let send = ClientFrame::Send(Send {
        rid: 9,
        conversation: CONV,
        msg_id: MsgId([1; 16]),
        payload: MlsBytes::new(vec![0xA5; 100]).expect("payload"),
        welcome: None,
        group_info: None,
    });
    vec![
        ("deliver_100B", deliver.encode(), true),
        ("batch_100x100B", batch.encode(), true),
        ("send_100B", send.encode(), false),
    ]
}

fn confab_round_trip(bytes: &[u8], server: bool, limits: &DecodeLimits) -> Vec<u8> {
    if server {
        ServerFrame::decode(bytes, limits).expect("decode").encode()
    } else {
        ClientFrame::decode(bytes, limits).expect("decode").encode()
    }
}

fn ciborium_round_trip(bytes: &[u8]) -> Vec<u8> {
    let value: ciborium::Value = ciborium::de::from_reader(bytes).expect("decode");
    let mut out = Vec::with_capacity(bytes.len());
    ciborium::ser::into_writer(&value, &mut out).expect("encode");
    out
}

fn benches(c: &mut Criterion) {
    let limits = DecodeLimits::default();
    let mut group = c.benchmark_group("codec");
    for (name, bytes, server) in frames() {
        // Both round trips reproduce the bytes exactly, so they do the same work.
        assert_eq!(confab_round_trip(&bytes, server, &limits), bytes);
        assert_eq!(ciborium_round_trip(&bytes), bytes);
        group.bench_function(format!("confab_{name}"), |b| {
            b.iter(|| confab_round_trip(std::hint::black_box(&bytes), server, &limits))
        });
        group.bench_function(format!("ciborium_{name}"), |b| {
            b.iter(|| ciborium_round_trip(std::hint::black_box(&bytes)))
        });
    }
    group.finish();
}

fn table() {
    println!(
        "\n| frame | bytes | Confab decode+encode | ciborium Value round trip (baseline) | ×ciborium |"
    );
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (name, bytes, _) in frames() {
        let (Some(confab), Some(base)) = (
            median("codec", &format!("confab_{name}")),
            median("codec", &format!("ciborium_{name}")),
        ) else {
            eprintln!("no codec measurements for {name} in target/criterion");
            continue;
        };
        println!(
            "| {name} | {} | {:.2} µs | {:.2} µs | {:.2} |",
            bytes.len(),
            confab / 1e3,
            base / 1e3,
            confab / base
        );
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
    table();
}
