//! The client's local store against a model, over random sequences of deliveries
//! (in order, replayed, out of order), acks, outbox puts and reopenings: a seq is recorded
//! once, the cursor only moves forward, a duplicate changes nothing, one's own delivered
//! message leaves the outbox, and everything survives reopening the file. With a retention
//! limit only the newest messages stay, and dropped ones are still recognised as processed.

use std::collections::BTreeMap;

use confab_client::store::{
    ClientStore, ConversationRecord, Message, OutboxItem, StoreError, StoredIdentity,
};
use confab_spec::frame::ConversationKind;
use confab_spec::ids::{
    ConversationId, DeviceId, MsgId, ProcessId, Seq, StreamId, SystemKey, UnixMs,
};
use proptest::prelude::*;

const CONV: ConversationId = ConversationId([9; 32]);
const STREAM: StreamId = StreamId::Conversation(CONV);

fn sender() -> DeviceId {
    DeviceId {
        system: SystemKey([1; 32]),
        process: ProcessId([2; 16]),
    }
}

#[derive(Debug, Clone)]
enum Op {
    Deliver { seq: u8, with_message: bool },
    Ack { seq: u8 },
    Compose { id: u8 },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (1u8..30, any::<bool>()).prop_map(|(seq, with_message)| Op::Deliver { seq, with_message }),
        2 => (1u8..30).prop_map(|seq| Op::Ack { seq }),
        2 => (0u8..30).prop_map(|id| Op::Compose { id }),
        1 => Just(Op::Reopen),
    ]
}

/// The message at `seq`; every fifth is an unreadable entry, kept with its reason.
fn message(seq: u8) -> Message {
    let unreadable = seq % 5 == 0;
    Message {
        conversation: CONV,
        seq: Seq::new(u64::from(seq)).expect("seq"),
        sender: sender(),
        msg_id: MsgId([seq; 16]),
        accepted: UnixMs(1_000 + u64::from(seq)),
        body: if unreadable { Vec::new() } else { vec![seq; 3] },
        unreadable: unreadable.then(|| format!("reason {seq}")),
        // Every seventh names another sender, as a relabelling gateway would.
        gateway_sender: (seq % 7 == 0).then_some(DeviceId {
            system: SystemKey([seq; 32]),
            process: ProcessId([seq; 16]),
        }),
        counter: (seq % 3 != 0).then_some(u64::from(seq)),
        irregular: match seq % 11 {
            0 => Some(confab_client::store::Irregular::Stale),
            4 => Some(confab_client::store::Irregular::Missing(u64::from(seq))),
            _ => None,
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_the_model(
        ops in prop::collection::vec(op(), 1..60),
        keep in prop::option::of(1u32..6),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("confab.db");
        let keep = keep.and_then(std::num::NonZeroU32::new);
        let mut store = ClientStore::open(&path).expect("open");
        store.set_message_retention(keep);
        let (mut next, mut acked) = (1u64, 0u64);
        let mut messages: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut outbox: Vec<u8> = Vec::new();
        for op in &ops {
            match *op {
                Op::Deliver { seq, with_message } => {
                    let m = message(seq);
                    let fresh = store
                        .deliver(&STREAM, m.seq, with_message.then_some(&m))
                        .expect("deliver");
                    prop_assert_eq!(fresh, u64::from(seq) >= next, "duplicate detection");
                    if fresh {
                        next = u64::from(seq) + 1;
                        if with_message {
                            messages.entry(u64::from(seq)).or_insert(m.body.clone());
                            outbox.retain(|id| *id != seq);
                            // Retention keeps the newest `keep` messages.
                            while keep.is_some_and(|k| messages.len() > k.get() as usize) {
                                messages.pop_first();
                            }
                        }
                    }
                }
                Op::Ack { seq } => {
                    // A client acks only what it processed (REQ-6.5-3).
                    if next > 1 {
                        let seq = u64::from(seq).min(next - 1);
                        store.set_acked(&STREAM, Seq::new(seq).expect("seq")).expect("ack");
                        acked = acked.max(seq);
                    }
                }
                Op::Compose { id } => {
                    store.outbox_put(&OutboxItem {
                        msg_id: MsgId([id; 16]),
                        conversation: CONV,
                        payload: vec![id],
                        welcome: None,
                        // A Commit's GroupInfo is kept for its resend (SPEC.md 7.10).
                        group_info: (id % 2 == 0).then(|| vec![0x47, id]),
                        plaintext: Some(vec![id]),
                        composed: UnixMs(5),
                    }).expect("put");
                    if !outbox.contains(&id) {
                        outbox.push(id);
                    }
                }
                Op::Reopen => {
                    drop(store);
                    store = ClientStore::open(&path).expect("reopen");
                    store.set_message_retention(keep);
                }
            }
            if let Some(c) = store.cursor(&STREAM).expect("cursor") {
                prop_assert_eq!(c.acked, acked);
            }
            let stored: BTreeMap<u64, Vec<u8>> = store
                .messages(&CONV, 0, 1_000)
                .expect("messages")
                .into_iter()
                .map(|m| (m.seq.get(), m.body))
                .collect();
            prop_assert_eq!(&stored, &messages);
            let items = store.outbox().expect("outbox");
            let ids: Vec<u8> = items.iter().map(|o| o.msg_id.0[0]).collect();
            prop_assert_eq!(&ids, &outbox, "outbox order and removal");
            for o in &items {
                let id = o.msg_id.0[0];
                prop_assert_eq!(&o.group_info, &(id % 2 == 0).then(|| vec![0x47, id]));
            }
        }
    }
}

#[test]
fn identity_contacts_and_conversations_persist() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("confab.db");
    let identity = StoredIdentity {
        system_seed: Some([4; 32]),
        system: SystemKey([5; 32]),
        device_seed: [6; 32],
        certificate: vec![7; 40],
    };
    {
        let mut store = ClientStore::open(&path).expect("open");
        assert_eq!(store.identity().expect("identity"), None);
        store.set_identity(&identity).expect("set");
        store.add_contact("bob", &SystemKey([8; 32])).expect("bob");
        assert!(matches!(
            store.add_contact("bob", &SystemKey([9; 32])),
            Err(StoreError::ContactExists(name)) if name == "bob"
        ));
        assert!(matches!(
            store.add_contact("bobby", &SystemKey([8; 32])),
            Err(StoreError::ContactExists(_))
        ));
        store
            .add_contact("alice", &SystemKey([3; 32]))
            .expect("alice");
        let dm = ConversationRecord {
            id: CONV,
            kind: ConversationKind::DirectMessage,
            peer: Some(SystemKey([8; 32])),
            removed: false,
        };
        assert!(store.add_conversation(&dm).expect("add"));
        assert!(!store.add_conversation(&dm).expect("again"));
    }
    let mut store = ClientStore::open(&path).expect("reopen");
    assert_eq!(store.identity().expect("identity"), Some(identity.clone()));
    // Debug output never shows the keys.
    let shown = format!("{identity:?}");
    assert!(
        !shown.contains("[4, 4") && !shown.contains("6, 6"),
        "{shown}"
    );
    assert_eq!(
        store.contacts().expect("contacts"),
        vec![
            ("alice".to_owned(), SystemKey([3; 32])),
            ("bob".to_owned(), SystemKey([8; 32]))
        ]
    );
    assert!(store.remove_contact("alice").expect("remove"));
    assert!(!store.remove_contact("alice").expect("again"));
    assert_eq!(store.conversations().expect("conversations").len(), 1);

    // Removed, then added again by a Welcome: a member again, the conversation's cursor
    // moved forward past the Commit that re-added this device, the inbox entry recorded.
    store.set_removed(&CONV).expect("removed");
    assert!(store.conversations().expect("conversations")[0].removed);
    let dm = store.conversations().expect("conversations")[0].clone();
    let seq = |v| Seq::new(v).expect("seq");
    let next = |store: &ClientStore, s| store.cursor(&s).expect("cursor").map(|c| c.next_seq);
    assert!(store.join_conversation(&dm, seq(40), seq(7)).expect("join"));
    assert!(!store.conversations().expect("conversations")[0].removed);
    assert_eq!(next(&store, StreamId::Conversation(CONV)), Some(seq(40)));
    assert_eq!(next(&store, StreamId::Inbox), Some(seq(8)));
    // The same Welcome replayed changes nothing, and no cursor ever moves back.
    store.set_removed(&CONV).expect("removed");
    assert!(
        !store
            .join_conversation(&dm, seq(30), seq(7))
            .expect("again")
    );
    assert!(store.conversations().expect("conversations")[0].removed);
    assert!(
        store
            .join_conversation(&dm, seq(30), seq(9))
            .expect("later")
    );
    assert_eq!(next(&store, StreamId::Conversation(CONV)), Some(seq(40)));
}

/// A database written by the first schema (no `removed` column) opens and reads.
#[test]
fn version_1_databases_are_migrated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("confab.db");
    {
        let conn = rusqlite::Connection::open(&path).expect("open");
        conn.execute_batch(
            "CREATE TABLE conversations (id BLOB PRIMARY KEY, kind INTEGER NOT NULL, peer BLOB);
             INSERT INTO conversations VALUES (x'C0C0C0C0C0C0C0C0C0C0C0C0C0C0C0C0C0C0C0C0C0C0C0C0C0C0C0C0C0C0C0C0', 1, NULL);
             PRAGMA user_version = 1;",
        )
        .expect("v1");
    }
    let store = ClientStore::open(&path).expect("migrates");
    let conversations = store.conversations().expect("conversations");
    assert_eq!(conversations.len(), 1);
    assert!(!conversations[0].removed);
    // Version 4's columns: no fork recorded yet, and one can be.
    let id = conversations[0].id;
    assert_eq!(store.forked(&id).expect("forked"), None);
    drop(store);
    let mut store = ClientStore::open(&path).expect("reopens");
    let seq = confab_spec::ids::Seq::new(7).expect("seq");
    store.set_forked(&id, seq, "a reason").expect("fork");
    assert_eq!(
        store.forked(&id).expect("forked"),
        Some((seq, "a reason".to_owned()))
    );
    assert_eq!(store.forked_conversations().expect("forked"), vec![id]);
    // Version 10's resyncs: one ends the fork and is counted, where it ended it too.
    let resync = confab_spec::ids::Seq::new(9).expect("seq");
    store.set_resynced(&id, resync).expect("resynced");
    assert_eq!(store.forked(&id).expect("forked"), None);
    assert_eq!(
        store.resyncs(&id).expect("resyncs"),
        (1, Some((seq, resync)))
    );
    assert!(store.forked_conversations().expect("forked").is_empty());
    store.set_forked(&id, seq, "a reason").expect("fork again");
    // Version 9's message numbers: a conversation from before numbers from 1.
    assert_eq!(store.take_sent_counter(&id).expect("counter"), 1);
    assert_eq!(store.take_sent_counter(&id).expect("counter"), 2);
    // Version 5's table: invitation requests, none yet, and one can be held.
    assert!(store.requests().expect("requests").is_empty());
    let request = confab_client::store::InvitationRequest {
        conversation: confab_spec::ids::ConversationId([9; 32]),
        inviter: conversations[0].peer.map_or(
            confab_spec::ids::DeviceId {
                system: confab_spec::ids::SystemKey([3; 32]),
                process: confab_spec::ids::ProcessId([4; 16]),
            },
            |system| confab_spec::ids::DeviceId {
                system,
                process: confab_spec::ids::ProcessId([4; 16]),
            },
        ),
        commit_seq: seq,
        welcome: vec![1, 2, 3],
        received: confab_spec::ids::UnixMs(5),
    };
    store.hold_request(&request).expect("hold");
    assert_eq!(store.requests().expect("requests"), vec![request]);
    drop(store);
    let conn = rusqlite::Connection::open(&path).expect("open");
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("version");
    assert_eq!(version, 10);
}

/// A version 5 database (messages without `gateway_sender`) keeps its messages, and a
/// relabelled message recorded after the migration keeps the gateway's label.
#[test]
fn version_5_messages_gain_the_gateway_label() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("confab.db");
    {
        let conn = rusqlite::Connection::open(&path).expect("open");
        conn.execute_batch(
            "CREATE TABLE conversations (id BLOB PRIMARY KEY, kind INTEGER NOT NULL, peer BLOB,
                 removed INTEGER NOT NULL DEFAULT 0, forked_seq INTEGER, forked_reason TEXT);
             CREATE TABLE messages (conversation BLOB NOT NULL, seq INTEGER NOT NULL,
                 sender BLOB NOT NULL, msg_id BLOB NOT NULL, accepted_ms INTEGER NOT NULL,
                 body BLOB NOT NULL, unreadable TEXT, PRIMARY KEY (conversation, seq)) WITHOUT ROWID;
             PRAGMA user_version = 5;",
        )
        .expect("v5");
        let old = message(1);
        conn.execute(
            "INSERT INTO messages VALUES (?1, 1, ?2, ?3, 1001, ?4, NULL)",
            rusqlite::params![
                CONV.0.as_slice(),
                old.sender.to_bytes().as_slice(),
                old.msg_id.0.as_slice(),
                old.body
            ],
        )
        .expect("a v5 message");
    }
    let mut store = ClientStore::open(&path).expect("migrates");
    let relabelled = message(7);
    assert!(relabelled.gateway_sender.is_some());
    store
        .deliver(
            &StreamId::Conversation(CONV),
            relabelled.seq,
            Some(&relabelled),
        )
        .expect("deliver");
    drop(store);
    let store = ClientStore::open(&path).expect("reopens");
    let kept = store.messages(&CONV, 0, 10).expect("messages");
    let old = Message {
        counter: None,
        ..message(1)
    };
    assert_eq!(kept, vec![old, relabelled]);
    assert_eq!(store.suspicions().expect("suspicions").relabelled, 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Invitation requests are bounded: whatever arrives, at most `REQUESTS_MAX` are kept,
    /// the newest, one per conversation (a newer Welcome to the same conversation replaces
    /// the older), and a dropped or declined one is gone.
    #[test]
    fn requests_are_bounded_and_keep_the_newest(
        arrivals in prop::collection::vec((0u8..160, 0u64..1_000_000), 1..260),
        declined in prop::collection::vec(0u8..160, 0..10),
    ) {
        use confab_client::store::{InvitationRequest, REQUESTS_MAX};
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = ClientStore::open(&dir.path().join("confab.db")).expect("open");
        let mut model: BTreeMap<u8, u64> = BTreeMap::new();
        for (i, (conversation, received)) in arrivals.iter().enumerate() {
            store
                .hold_request(&InvitationRequest {
                    conversation: ConversationId([*conversation; 32]),
                    inviter: sender(),
                    commit_seq: Seq::new(i as u64 + 1).expect("seq"),
                    welcome: vec![*conversation],
                    received: UnixMs(*received),
                })
                .expect("hold");
            model.insert(*conversation, *received);
            // The model keeps the newest REQUESTS_MAX by (received desc, conversation asc).
            let mut by_age: Vec<(u64, u8)> = model.iter().map(|(c, r)| (*r, *c)).collect();
            by_age.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            for (_, c) in by_age.into_iter().skip(REQUESTS_MAX) {
                model.remove(&c);
            }
        }
        for c in &declined {
            let had = model.remove(c).is_some();
            prop_assert_eq!(store.drop_request(&ConversationId([*c; 32])).expect("drop"), had);
        }
        let held = store.requests().expect("requests");
        prop_assert!(held.len() <= REQUESTS_MAX);
        let got: BTreeMap<u8, u64> = held
            .iter()
            .map(|r| (r.conversation.0[0], r.received.0))
            .collect();
        prop_assert_eq!(got, model);
        // Oldest first.
        prop_assert!(held.windows(2).all(|w| w[0].received <= w[1].received));
    }
}
