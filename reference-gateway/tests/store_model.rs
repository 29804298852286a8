//! The SQLite store against a small in-memory model of SPEC.md sections 6 and 7, over
//! random operation sequences including reopening the database: every outcome must match
//! the model, seqs stay dense, a msg_id is sequenced once, one Commit is accepted per
//! epoch, Welcomes reach exactly the devices a Commit adds, and cursors never go back.

use std::collections::{BTreeMap, HashMap};

use confab_gateway::store::sqlite::SqliteStore;
use confab_gateway::store::{AppendKind, AppendOutcome, AppendRequest, Store, StreamKey};
use confab_spec::frame::{ConversationKind, EntryBody};
use confab_spec::ids::{
    ConversationId, DeviceId, Epoch, MlsBytes, MsgId, ProcessId, Seq, SystemKey, UnixMs,
};
use proptest::prelude::*;

const CONV: ConversationId = ConversationId([7; 32]);

fn device(n: u8) -> DeviceId {
    DeviceId {
        system: SystemKey([n; 32]),
        process: ProcessId([n; 16]),
    }
}

#[derive(Debug, Clone)]
enum Op {
    App {
        sender: u8,
        msg: u8,
        variant: u8,
        epoch_delta: i8,
    },
    Commit {
        sender: u8,
        msg: u8,
        epoch_delta: i8,
        remove: Option<u8>,
        add: bool,
    },
    Ack {
        device: u8,
        seq: u8,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u8..6, 0u8..24, 0u8..2, -1i8..=1).prop_map(|(sender, msg, variant, epoch_delta)| Op::App { sender, msg, variant, epoch_delta }),
        3 => (0u8..6, 0u8..24, -1i8..=1, proptest::option::of(0u8..6), any::<bool>())
            .prop_map(|(sender, msg, epoch_delta, remove, add)| Op::Commit { sender, msg, epoch_delta, remove, add }),
        2 => (0u8..8, 0u8..40).prop_map(|(device, seq)| Op::Ack { device, seq }),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Default)]
struct Model {
    epoch: u64,
    epoch_seq: u64,
    log: Vec<(MsgId, DeviceId, Vec<u8>)>,
    roster: BTreeMap<u32, DeviceId>,
    inbox: HashMap<DeviceId, Vec<u64>>,
    cursors: HashMap<DeviceId, u64>,
    next_device: u8,
}

fn msg_id(n: u8) -> MsgId {
    MsgId([n; 16])
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.db");
    let mut store = SqliteStore::open(&path).expect("open");
    let creator = device(0);
    prop_assert!(
        store
            .create_conversation(&CONV, ConversationKind::Room, &creator, UnixMs(1))
            .expect("create")
    );
    prop_assert!(
        !store
            .create_conversation(&CONV, ConversationKind::Room, &creator, UnixMs(1))
            .expect("again")
    );
    let mut m = Model {
        next_device: 10,
        ..Model::default()
    };
    m.roster.insert(0, creator);
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Reopen => {
                drop(store);
                store = SqliteStore::open(&path).expect("reopen");
            }
            Op::Ack { device: d, seq } => {
                let dev = device(*d);
                let Some(seq) = Seq::new(u64::from(*seq)) else {
                    continue;
                };
                let got = store
                    .ack(&StreamKey::Conversation(CONV), &dev, seq)
                    .expect("ack");
                let head = m.log.len() as u64;
                let expected = (seq.get() <= head).then(|| {
                    let c = m.cursors.entry(dev).or_insert(0);
                    *c = (*c).max(seq.get());
                    *c
                });
                prop_assert_eq!(got, expected, "step {}: ack", step);
            }
            Op::App {
                sender,
                msg,
                epoch_delta,
                ..
            }
            | Op::Commit {
                sender,
                msg,
                epoch_delta,
                ..
            } => {
                let members: Vec<DeviceId> = m.roster.values().copied().collect();
                let sender = members
                    .get(*sender as usize % (members.len() + 1))
                    .copied()
                    .unwrap_or(device(99));
                let epoch = (m.epoch as i64 + i64::from(*epoch_delta)).max(0) as u64;
                let is_commit = matches!(op, Op::Commit { .. });
                let mut payload = vec![if is_commit { 0xC0 } else { 0xA0 }, *msg];
                if let Op::App { variant, .. } = op {
                    payload.push(*variant);
                }
                let (kind, added, removed_leaves) = match op {
                    Op::Commit { remove, add, .. } => {
                        let removed: Vec<u32> = remove
                            .map(|r| m.roster.keys().copied().filter(|l| *l != 0).nth(r as usize))
                            .into_iter()
                            .flatten()
                            .collect();
                        let added: Vec<DeviceId> = if *add {
                            vec![device(m.next_device)]
                        } else {
                            vec![]
                        };
                        let welcome = (!added.is_empty())
                            .then(|| MlsBytes::new(vec![0x3E, *msg]).expect("bytes"));
                        (
                            AppendKind::Commit {
                                epoch: Epoch(epoch),
                                removed_leaves: removed.clone(),
                                added: added.clone(),
                                welcome,
                            },
                            added,
                            removed,
                        )
                    }
                    _ => (
                        AppendKind::Application {
                            epoch: Epoch(epoch),
                        },
                        vec![],
                        vec![],
                    ),
                };
                let request = AppendRequest {
                    conversation: CONV,
                    sender,
                    msg_id: msg_id(*msg),
                    payload: MlsBytes::new(payload.clone()).expect("bytes"),
                    kind,
                    now: UnixMs(step as u64),
                };
                let got = store.append(&request).expect("append");
                // The model's decision, in SPEC.md's order.
                let expected =
                    if let Some(pos) = m.log.iter().position(|(id, _, _)| *id == msg_id(*msg)) {
                        let (_, s, p) = &m.log[pos];
                        if *s == sender && *p == payload {
                            AppendOutcome::Duplicate {
                                seq: Seq::new(pos as u64 + 1).expect("seq"),
                            }
                        } else {
                            AppendOutcome::Conflict
                        }
                    } else if !members.contains(&sender) {
                        AppendOutcome::NotMember
                    } else if epoch > m.epoch {
                        AppendOutcome::EpochAhead {
                            epoch: Epoch(m.epoch),
                        }
                    } else if is_commit && epoch < m.epoch {
                        AppendOutcome::StaleCommit {
                            epoch: Epoch(m.epoch),
                            epoch_seq: m.epoch_seq,
                        }
                    } else {
                        m.log.push((msg_id(*msg), sender, payload));
                        let seq = m.log.len() as u64;
                        if is_commit {
                            m.epoch += 1;
                            m.epoch_seq = seq;
                            for l in &removed_leaves {
                                m.roster.remove(l);
                            }
                            for d in &added {
                                let leaf = (0u32..)
                                    .find(|l| !m.roster.contains_key(l))
                                    .expect("a free leaf");
                                m.roster.insert(leaf, *d);
                                m.inbox.entry(*d).or_default().push(seq);
                                m.next_device += 1;
                            }
                        }
                        AppendOutcome::Appended {
                            seq: Seq::new(seq).expect("seq"),
                        }
                    };
                prop_assert_eq!(&got, &expected, "step {}: append {:?}", step, op);
            }
        }
        // The whole durable state matches the model after every step.
        let log = store
            .read(&StreamKey::Conversation(CONV), Seq::FIRST, 10_000)
            .expect("read");
        prop_assert_eq!(log.len(), m.log.len());
        for (i, e) in log.iter().enumerate() {
            prop_assert_eq!(e.seq.get(), i as u64 + 1, "dense seqs");
            prop_assert_eq!(e.msg_id, m.log[i].0);
            prop_assert_eq!(e.payload.as_bytes(), m.log[i].2.as_slice());
        }
        let state = store.conversation(&CONV).expect("state").expect("exists");
        prop_assert_eq!(
            (state.epoch.0, state.epoch_seq, state.head_seq),
            (m.epoch, m.epoch_seq, m.log.len() as u64)
        );
        let roster: BTreeMap<u32, DeviceId> =
            store.roster(&CONV).expect("roster").into_iter().collect();
        prop_assert_eq!(&roster, &m.roster);
        for (d, seqs) in &m.inbox {
            let inbox = store
                .read(&StreamKey::Inbox(*d), Seq::FIRST, 100)
                .expect("inbox");
            let got: Vec<u64> = inbox
                .iter()
                .map(|e| match e.body {
                    EntryBody::Welcome {
                        conversation,
                        commit_seq,
                    } if conversation == CONV => commit_seq.get(),
                    _ => 0,
                })
                .collect();
            prop_assert_eq!(&got, seqs, "welcomes of {:?}", d);
        }
        for (d, c) in &m.cursors {
            prop_assert_eq!(
                store
                    .cursor(&StreamKey::Conversation(CONV), d)
                    .expect("cursor"),
                *c
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
        run(&ops)?;
    }
}

#[test]
fn acknowledged_entries_survive_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.db");
    let creator = device(0);
    {
        let mut store = SqliteStore::open(&path).expect("open");
        store
            .create_conversation(&CONV, ConversationKind::DirectMessage, &creator, UnixMs(1))
            .expect("create");
        for n in 0..100u8 {
            let outcome = store
                .append(&AppendRequest {
                    conversation: CONV,
                    sender: creator,
                    msg_id: msg_id(n),
                    payload: MlsBytes::new(vec![n]).expect("bytes"),
                    kind: AppendKind::Application { epoch: Epoch(0) },
                    now: UnixMs(2),
                })
                .expect("append");
            assert_eq!(
                outcome,
                AppendOutcome::Appended {
                    seq: Seq::new(u64::from(n) + 1).expect("seq")
                }
            );
        }
    }
    let store = SqliteStore::open(&path).expect("reopen");
    let log = store
        .read(&StreamKey::Conversation(CONV), Seq::FIRST, 1_000)
        .expect("read");
    assert_eq!(log.len(), 100);
    assert!(
        log.iter()
            .enumerate()
            .all(|(i, e)| e.seq.get() == i as u64 + 1 && e.payload.as_bytes() == [i as u8])
    );
    assert_eq!(
        store
            .bounds(&StreamKey::Conversation(CONV))
            .expect("bounds"),
        (100, 1)
    );
}
