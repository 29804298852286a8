//! The SQLite store against a small in-memory model of SPEC.md sections 6 and 7, over
//! random operation sequences including reopening the database and retention passes:
//! every outcome must match the model, seqs stay dense, a msg_id is sequenced once while
//! its entry is retained, one Commit is accepted per epoch, Welcomes reach exactly the
//! devices a Commit adds, cursors never go back, and retention deletes exactly the prefix
//! SPEC.md 6.7 allows (never an entry a current member has not acked within its bound).

use std::collections::{BTreeMap, HashMap};

use confab_gateway::store::sqlite::SqliteStore;
use confab_gateway::store::{
    AppendKind, AppendOutcome, AppendRequest, CreateOutcome, RetentionPolicy, RoomLimits, Store,
    StreamKey,
};
use confab_gateway::tracked_group::TrackedGroup;
use confab_spec::frame::{ConversationKind, EntryBody};
use confab_spec::ids::{
    ConversationId, DeviceId, Epoch, MlsBytes, MsgId, ProcessId, Seq, SystemKey, UnixMs,
};
use confab_spec::rooms::RoomRoles;
use proptest::prelude::*;

const CONV: ConversationId = ConversationId([7; 32]);

/// Device `n`. Every device belongs to one user, so that any member may add and remove
/// any other under the room rules (SPEC.md 10.2: a user manages its own devices); the
/// rules themselves are checked in `rooms_governance.rs`.
fn device(n: u8) -> DeviceId {
    DeviceId {
        system: USER,
        process: ProcessId([n; 16]),
    }
}

const USER: SystemKey = SystemKey([1; 32]);

/// A new group of `creator` as the gateway would have verified it (SPEC.md 6.1); the
/// store keeps its state without reading it.
fn new_group(creator: &DeviceId) -> TrackedGroup {
    TrackedGroup {
        epoch: Epoch(0),
        snapshot: vec![0x60, 0],
        members: vec![(0, *creator)],
        extensions: RoomRoles::new(creator.system).context_extensions(),
        group_info: Some(vec![0x47, 0]),
    }
}

/// `conversation_bytes_max` of the model's runs: payloads are 2 or 3 bytes, so a long run
/// reaches it and retention makes room again (SPEC.md 11).
const BYTES_MAX: u64 = 48;

/// No room limit gets in the model's way.
const NO_LIMITS: RoomLimits = RoomLimits {
    members_max: u64::MAX,
    rooms_per_user_max: u64::MAX,
};

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
    /// One device acks `head - back` (beyond the head when `back < 0`).
    Ack {
        device: u8,
        back: i8,
    },
    /// Every member acks `head - back`.
    AckAll {
        back: u8,
    },
    Reopen,
    /// A retention pass at `step + advance`.
    Gc {
        advance: u8,
    },
}

/// The model's retention: short enough that random runs reach both bounds.
const POLICY: RetentionPolicy = RetentionPolicy {
    retention_ms: 3,
    retention_unacked_ms: 12,
};

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u8..6, 0u8..24, 0u8..2, -1i8..=1).prop_map(|(sender, msg, variant, epoch_delta)| Op::App { sender, msg, variant, epoch_delta }),
        3 => (0u8..6, 0u8..24, -1i8..=1, proptest::option::of(0u8..6), any::<bool>())
            .prop_map(|(sender, msg, epoch_delta, remove, add)| Op::Commit { sender, msg, epoch_delta, remove, add }),
        3 => (0u8..8, -3i8..12).prop_map(|(device, back)| Op::Ack { device, back }),
        1 => (0u8..6).prop_map(|back| Op::AckAll { back }),
        1 => Just(Op::Reopen),
        2 => (0u8..30).prop_map(|advance| Op::Gc { advance }),
    ]
}

#[derive(Default)]
struct Model {
    epoch: u64,
    epoch_seq: u64,
    /// Every entry ever sequenced, with its accept time; seq = index + 1.
    log: Vec<(MsgId, DeviceId, Vec<u8>, u64)>,
    /// The lowest retained seq.
    oldest: u64,
    roster: BTreeMap<u32, DeviceId>,
    /// The tracked group state of the last accepted Commit (SPEC.md 7.7).
    group_state: Vec<u8>,
    /// The GroupInfo kept: (epoch, seq, bytes).
    group_info: (u64, u64, Vec<u8>),
    /// Per device: (commit seq, accept time) of each Welcome, and how many were deleted.
    inbox: HashMap<DeviceId, (Vec<(u64, u64)>, usize)>,
    cursors: HashMap<DeviceId, u64>,
    next_device: u8,
}

fn msg_id(n: u8) -> MsgId {
    MsgId([n; 16])
}

/// Appends an application message `n` (msg_id and payload both from `n`) by `sender`.
fn append_application(
    store: &mut SqliteStore,
    sender: &DeviceId,
    n: u8,
    now: UnixMs,
) -> AppendOutcome {
    store
        .append(&AppendRequest {
            conversation: CONV,
            sender: *sender,
            msg_id: msg_id(n),
            payload: MlsBytes::new(vec![n]).expect("bytes"),
            kind: AppendKind::Application { epoch: Epoch(0) },
            now,
            rooms: NO_LIMITS,
            bytes_max: u64::MAX,
        })
        .expect("append")
}

/// Opens the store; with `grouped`, under group commit (store calls share batches, each
/// a savepoint; the test commits batches now and then, and dropping the store commits the
/// open one).
fn open(path: &std::path::Path, grouped: bool) -> SqliteStore {
    let mut store = SqliteStore::open(path).expect("open");
    if grouped {
        store.enable_group_commit().expect("group commit");
    }
    store
}

fn run(ops: &[Op], grouped: bool) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.db");
    let mut store = open(&path, grouped);
    let creator = device(0);
    prop_assert_eq!(
        store
            .create_conversation(
                &CONV,
                ConversationKind::Room,
                &new_group(&creator),
                u64::MAX,
                UnixMs(1)
            )
            .expect("create"),
        CreateOutcome::Created
    );
    prop_assert_eq!(
        store
            .create_conversation(
                &CONV,
                ConversationKind::Room,
                &new_group(&creator),
                u64::MAX,
                UnixMs(1)
            )
            .expect("again"),
        CreateOutcome::Exists
    );
    let mut m = Model {
        next_device: 10,
        oldest: 1,
        ..Model::default()
    };
    m.roster.insert(0, creator);
    m.group_state = new_group(&creator).snapshot;
    m.group_info = (0, 0, vec![0x47, 0]);
    for (step, op) in ops.iter().enumerate() {
        if grouped && step % 3 == 2 {
            store.commit_batch().expect("commit the batch");
        }
        match op {
            Op::Reopen => {
                drop(store);
                store = open(&path, grouped);
            }
            Op::Gc { advance } => {
                let now = step as u64 + u64::from(*advance);
                let report = store
                    .collect_garbage(&POLICY, UnixMs(now), 1_000)
                    .expect("gc");
                let aged = now.saturating_sub(POLICY.retention_ms);
                let abandoned = now.saturating_sub(POLICY.retention_unacked_ms);
                let head = m.log.len() as u64;
                let acked_by_all = m
                    .roster
                    .values()
                    .map(|d| m.cursors.get(d).copied().unwrap_or(0))
                    .min()
                    .unwrap_or(head);
                let before = m.oldest;
                while m.oldest <= head {
                    let accepted = m.log[m.oldest as usize - 1].3;
                    let deletable =
                        accepted < aged && (m.oldest <= acked_by_all || accepted < abandoned);
                    if !deletable {
                        break;
                    }
                    m.oldest += 1;
                }
                let mut deleted = m.oldest - before;
                for (welcomes, gone) in m.inbox.values_mut() {
                    // Nobody acks inboxes here: only the unacked bound frees them.
                    while *gone < welcomes.len()
                        && welcomes[*gone].1 < aged
                        && welcomes[*gone].1 < abandoned
                    {
                        *gone += 1;
                        deleted += 1;
                    }
                }
                prop_assert_eq!(report.entries_deleted, deleted, "step {}: gc", step);
                prop_assert!(!report.more);
            }
            Op::Ack { .. } | Op::AckAll { .. } => {
                let head = m.log.len() as u64;
                let members: Vec<DeviceId> = m.roster.values().copied().collect();
                let acks: Vec<(DeviceId, i64)> = match op {
                    // Mostly members, sometimes a device that is not one.
                    Op::Ack { device: d, back } => vec![(
                        members
                            .get(*d as usize % (members.len() + 1))
                            .copied()
                            .unwrap_or(device(*d + 100)),
                        head as i64 - i64::from(*back),
                    )],
                    Op::AckAll { back } => members
                        .iter()
                        .map(|d| (*d, head as i64 - i64::from(*back)))
                        .collect(),
                    _ => vec![],
                };
                for (dev, seq) in acks {
                    let Some(seq) = u64::try_from(seq).ok().and_then(Seq::new) else {
                        continue;
                    };
                    let got = store
                        .ack(&StreamKey::Conversation(CONV), &dev, seq)
                        .expect("ack");
                    let expected = (seq.get() <= head).then(|| {
                        let c = m.cursors.entry(dev).or_insert(0);
                        *c = (*c).max(seq.get());
                        *c
                    });
                    prop_assert_eq!(got, expected, "step {}: ack", step);
                }
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
                        // The group after it, as the handler's verification would give it:
                        // removals blank leaves, adds take the leftmost blanks (RFC 9420
                        // 12.3); a state the store must keep with the entry.
                        let mut after = m.roster.clone();
                        for l in &removed {
                            after.remove(l);
                        }
                        for d in &added {
                            let leaf = (0u32..).find(|l| !after.contains_key(l)).expect("a leaf");
                            after.insert(leaf, *d);
                        }
                        let next = TrackedGroup {
                            epoch: Epoch(epoch + 1),
                            snapshot: vec![0x61, step as u8, (step >> 8) as u8],
                            members: after.into_iter().collect(),
                            extensions: RoomRoles::new(USER).context_extensions(),
                            // Every other Commit publishes a GroupInfo (SPEC.md 7.10).
                            group_info: (step % 2 == 0).then(|| vec![0x47, step as u8]),
                        };
                        (
                            AppendKind::Commit {
                                epoch: Epoch(epoch),
                                welcome,
                                roles: Some(Ok(RoomRoles::new(USER))),
                                next: Some(Box::new(next)),
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
                    rooms: NO_LIMITS,
                    bytes_max: BYTES_MAX,
                };
                let got = store.append(&request).expect("append");
                // The model's decision, in SPEC.md's order.
                let retained = m.oldest as usize - 1;
                let expected = if let Some(pos) = m.log[retained..]
                    .iter()
                    .position(|(id, _, _, _)| *id == msg_id(*msg))
                    .map(|p| p + retained)
                {
                    let (_, s, p, _) = &m.log[pos];
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
                } else if m.log[retained..]
                    .iter()
                    .map(|(_, _, p, _)| p.len() as u64)
                    .sum::<u64>()
                    + payload.len() as u64
                    > BYTES_MAX
                {
                    AppendOutcome::ConversationFull
                } else {
                    m.log.push((msg_id(*msg), sender, payload, step as u64));
                    let seq = m.log.len() as u64;
                    if is_commit {
                        m.epoch += 1;
                        m.epoch_seq = seq;
                        m.group_state = vec![0x61, step as u8, (step >> 8) as u8];
                        if step % 2 == 0 {
                            m.group_info = (m.epoch, seq, vec![0x47, step as u8]);
                        }
                        for l in &removed_leaves {
                            m.roster.remove(l);
                        }
                        for d in &added {
                            let leaf = (0u32..)
                                .find(|l| !m.roster.contains_key(l))
                                .expect("a free leaf");
                            m.roster.insert(leaf, *d);
                            m.inbox.entry(*d).or_default().0.push((seq, step as u64));
                            // Its cursor starts at the Commit that added it (REQ-7.6-4).
                            let c = m.cursors.entry(*d).or_insert(0);
                            *c = (*c).max(seq);
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
            .read(
                &StreamKey::Conversation(CONV),
                Seq::FIRST,
                10_000,
                usize::MAX,
            )
            .expect("read");
        let retained = &m.log[m.oldest as usize - 1..];
        prop_assert_eq!(log.len(), retained.len());
        for (i, e) in log.iter().enumerate() {
            prop_assert_eq!(e.seq.get(), m.oldest + i as u64, "dense seqs");
            prop_assert_eq!(e.msg_id, retained[i].0);
            prop_assert_eq!(e.payload.as_bytes(), retained[i].2.as_slice());
        }
        prop_assert_eq!(
            store
                .bounds(&StreamKey::Conversation(CONV))
                .expect("bounds"),
            (m.log.len() as u64, m.oldest)
        );
        let state = store.conversation(&CONV).expect("state").expect("exists");
        prop_assert_eq!(
            (
                state.epoch.0,
                state.epoch_seq,
                state.head_seq,
                state.oldest_seq
            ),
            (m.epoch, m.epoch_seq, m.log.len() as u64, m.oldest)
        );
        let roster: BTreeMap<u32, DeviceId> =
            store.roster(&CONV).expect("roster").into_iter().collect();
        prop_assert_eq!(&roster, &m.roster);
        // The tracked state moves with its Commit's entry, across reopening (REQ-7.7-1).
        prop_assert_eq!(
            store.group_state(&CONV).expect("group state"),
            Some(m.group_state.clone())
        );
        // So does the latest GroupInfo a Commit carried (REQ-7.10-3).
        let kept = store.group_info(&CONV).expect("group info").expect("kept");
        prop_assert_eq!(
            (kept.epoch.0, kept.seq, kept.group_info),
            m.group_info.clone()
        );
        for (d, (welcomes, gone)) in &m.inbox {
            let seqs: Vec<u64> = welcomes[*gone..].iter().map(|(s, _)| *s).collect();
            let inbox = store
                .read(&StreamKey::Inbox(*d), Seq::FIRST, 100, usize::MAX)
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
            prop_assert_eq!(&got, &seqs, "welcomes of {:?}", d);
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
        run(&ops, false)?;
    }

    #[test]
    fn store_matches_the_model_under_group_commit(ops in prop::collection::vec(op(), 1..60)) {
        run(&ops, true)?;
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
            .create_conversation(
                &CONV,
                ConversationKind::DirectMessage,
                &new_group(&creator),
                u64::MAX,
                UnixMs(1),
            )
            .expect("create");
        for n in 0..100u8 {
            let outcome = append_application(&mut store, &creator, n, UnixMs(2));
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
        .read(
            &StreamKey::Conversation(CONV),
            Seq::FIRST,
            1_000,
            usize::MAX,
        )
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

#[test]
fn retention_runs_in_bounded_slices_and_only_advances_oldest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = SqliteStore::open(&dir.path().join("gw.db")).expect("open");
    let creator = device(0);
    store
        .create_conversation(
            &CONV,
            ConversationKind::Room,
            &new_group(&creator),
            u64::MAX,
            UnixMs(1),
        )
        .expect("create");
    for n in 0..25u8 {
        append_application(&mut store, &creator, n, UnixMs(10));
    }
    let stream = StreamKey::Conversation(CONV);
    store
        .ack(&stream, &creator, Seq::new(25).expect("seq"))
        .expect("ack");
    let policy = RetentionPolicy {
        retention_ms: 5,
        retention_unacked_ms: 1_000,
    };
    // Not old enough yet: nothing goes, however acked.
    let report = store.collect_garbage(&policy, UnixMs(15), 10).expect("gc");
    assert_eq!((report.entries_deleted, report.more), (0, false));
    let mut oldest = vec![];
    for _ in 0..3 {
        let report = store.collect_garbage(&policy, UnixMs(16), 10).expect("gc");
        oldest.push((
            report.entries_deleted,
            report.more,
            store.bounds(&stream).expect("b"),
        ));
    }
    assert_eq!(
        oldest,
        vec![
            (10, true, (25, 11)),
            (10, true, (25, 21)),
            (5, false, (25, 26))
        ]
    );
    // The head survives an emptied log: the next entry is 26, not 1.
    let next = append_application(&mut store, &creator, 200, UnixMs(17));
    assert_eq!(
        next,
        AppendOutcome::Appended {
            seq: Seq::new(26).expect("seq")
        }
    );
}

#[test]
fn revocations_take_effect_no_later_than_when_stored() {
    use confab_spec::identity::SystemKeyPair;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = SqliteStore::open(&dir.path().join("gw.db")).expect("open");
    let system = SystemKeyPair::from_seed(&[3; 32]);
    let process = ProcessId([4; 16]);
    let revoked = DeviceId {
        system: system.public(),
        process,
    };
    assert_eq!(store.revoked_at(&revoked).expect("lookup"), None);
    // Dated in the future: effective when stored.
    let at = store
        .store_revocation(&system.revoke(process, UnixMs(5_000)), UnixMs(1_000))
        .expect("store");
    assert_eq!(at, UnixMs(1_000));
    // A later one never moves it forward; an earlier one moves it back.
    let later = store
        .store_revocation(&system.revoke(process, UnixMs(9_000)), UnixMs(9_500))
        .expect("store");
    assert_eq!(later, UnixMs(1_000));
    let earlier = store
        .store_revocation(&system.revoke(process, UnixMs(400)), UnixMs(9_600))
        .expect("store");
    assert_eq!(earlier, UnixMs(400));
    drop(store);
    let store = SqliteStore::open(&dir.path().join("gw.db")).expect("reopen");
    assert_eq!(
        store.revoked_at(&revoked).expect("lookup"),
        Some(UnixMs(400))
    );
    let other = DeviceId {
        system: system.public(),
        process: ProcessId([5; 16]),
    };
    assert_eq!(store.revoked_at(&other).expect("lookup"), None);
}

#[test]
fn concurrent_claims_never_hand_out_a_package_twice() {
    use confab_gateway::store::{StoredKeyPackage, UploadOutcome};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.db");
    let owner = device(1);
    let now = UnixMs(1_000_000);
    {
        let mut store = SqliteStore::open(&path).expect("open");
        let packages: Vec<StoredKeyPackage> = (0..60u16)
            .map(|i| StoredKeyPackage {
                bytes: i.to_be_bytes().to_vec(),
                not_after_s: 10_000,
            })
            .collect();
        let last = StoredKeyPackage {
            bytes: b"last".to_vec(),
            not_after_s: 10_000,
        };
        let outcome = store
            .upload_key_packages(&owner, &packages, Some(&last), 100, now)
            .expect("upload");
        assert!(
            matches!(outcome, UploadOutcome::Stored(s) if s.pool_count == 60 && s.last_resort_present)
        );
    }
    // Four claimers, each with its own connection to the database, race for the pool.
    let claims: Vec<Vec<(Vec<u8>, bool)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4u8)
            .map(|t| {
                let path = path.clone();
                scope.spawn(move || {
                    let mut store = SqliteStore::open(&path).expect("open");
                    (0..20)
                        .flat_map(|_| {
                            store
                                .claim_key_packages(&owner.system, &device(50 + t), None, now)
                                .expect("claim")
                        })
                        .map(|c| (c.key_package, c.last_resort))
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("join"))
            .collect()
    });
    let all: Vec<(Vec<u8>, bool)> = claims.into_iter().flatten().collect();
    assert_eq!(all.len(), 80, "every claim found a package");
    let pooled: std::collections::HashSet<&Vec<u8>> = all
        .iter()
        .filter(|(_, last)| !last)
        .map(|(p, _)| p)
        .collect();
    assert_eq!(
        pooled.len(),
        60,
        "each pool package handed out exactly once"
    );
    assert_eq!(all.iter().filter(|(_, last)| !last).count(), 60);
    assert!(
        all.iter()
            .filter(|(_, last)| *last)
            .all(|(p, _)| p == b"last")
    );
    // The owner sees the pool empty and the last-resort package claimed.
    let mut store = SqliteStore::open(&path).expect("open");
    let status = store
        .upload_key_packages(&owner, &[], None, 100, now)
        .expect("status");
    assert!(matches!(
        status,
        UploadOutcome::Stored(s) if s.pool_count == 0 && s.last_resort_present && s.last_resort_claimed
    ));
    // Expired packages are never handed out; the claimer itself is never served.
    store
        .upload_key_packages(
            &owner,
            &[StoredKeyPackage {
                bytes: b"old".to_vec(),
                not_after_s: 1_001,
            }],
            None,
            100,
            now,
        )
        .expect("upload");
    let later = UnixMs(1_002_000);
    let claimed = store
        .claim_key_packages(&owner.system, &device(9), None, later)
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    assert!(claimed[0].last_resort);
    assert!(
        store
            .claim_key_packages(&owner.system, &owner, None, later)
            .expect("claim")
            .is_empty()
    );
}

/// Under group commit a store call's writes are in the open batch: invisible to another
/// connection to the database, and counted in the barrier, until the batch commits; a
/// refused call inside the batch undoes only itself.
#[test]
fn group_commit_batches_are_invisible_until_committed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.db");
    let mut store = SqliteStore::open(&path).expect("open");
    let (counters, _wal) = store.enable_group_commit().expect("group commit");
    let before = counters.barrier();
    let creator = device(0);
    store
        .create_conversation(
            &CONV,
            ConversationKind::Room,
            &new_group(&creator),
            u64::MAX,
            UnixMs(1),
        )
        .expect("create");
    assert!(matches!(
        append_application(&mut store, &creator, 1, UnixMs(2)),
        AppendOutcome::Appended { .. }
    ));
    assert!(counters.is_open());
    assert_eq!(
        counters.barrier(),
        before + 1,
        "the writes are in the next commit"
    );
    // A refused append (a sender that is not a member) inside the same batch.
    let outsider = device(9);
    let refused = store
        .append(&AppendRequest {
            conversation: CONV,
            sender: outsider,
            msg_id: MsgId([9; 16]),
            payload: MlsBytes::new(vec![1]).expect("payload"),
            kind: AppendKind::Application { epoch: Epoch(0) },
            now: UnixMs(3),
            rooms: NO_LIMITS,
            bytes_max: u64::MAX,
        })
        .expect("append");
    assert!(matches!(refused, AppendOutcome::NotMember));
    let other = rusqlite::Connection::open(&path).expect("second connection");
    let count = |c: &rusqlite::Connection| -> i64 {
        c.query_row("SELECT count(*) FROM entries", [], |r| r.get(0))
            .expect("count")
    };
    assert_eq!(
        count(&other),
        0,
        "uncommitted batch seen by another connection"
    );
    store.commit_batch().expect("commit");
    assert!(!counters.is_open());
    assert_eq!(counters.barrier(), before + 1);
    assert_eq!(count(&other), 1, "the batch holds the one accepted append");
    // Nothing open: committing again changes nothing.
    store.commit_batch().expect("commit nothing");
    assert_eq!(counters.barrier(), before + 1);
}

/// A database of schema 7 (before streams counted their bytes) is migrated: the count is
/// recomputed from the retained entries, so `conversation_bytes_max` holds from the first
/// append after the upgrade.
#[test]
fn stream_bytes_are_recomputed_for_older_databases() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.db");
    let creator = device(0);
    {
        let mut store = SqliteStore::open(&path).expect("open");
        store
            .create_conversation(
                &CONV,
                ConversationKind::DirectMessage,
                &new_group(&creator),
                u64::MAX,
                UnixMs(1),
            )
            .expect("create");
        for n in 0..10u8 {
            append_application(&mut store, &creator, n, UnixMs(2));
        }
    }
    {
        let conn = rusqlite::Connection::open(&path).expect("raw");
        conn.execute_batch("ALTER TABLE streams DROP COLUMN bytes; PRAGMA user_version = 7;")
            .expect("back to schema 7");
    }
    let mut store = SqliteStore::open(&path).expect("migrates");
    // Ten one-byte payloads are retained: an eleventh fits under 11 bytes, a twelfth not.
    let append = |store: &mut SqliteStore, n: u8| {
        store
            .append(&AppendRequest {
                conversation: CONV,
                sender: creator,
                msg_id: msg_id(n),
                payload: MlsBytes::new(vec![n]).expect("bytes"),
                kind: AppendKind::Application { epoch: Epoch(0) },
                now: UnixMs(3),
                rooms: NO_LIMITS,
                bytes_max: 11,
            })
            .expect("append")
    };
    assert!(matches!(
        append(&mut store, 10),
        AppendOutcome::Appended { .. }
    ));
    assert_eq!(append(&mut store, 11), AppendOutcome::ConversationFull);
}

/// A database of schema 8 (before invited and joined users were told apart) is migrated:
/// every user with a device in a room counted as joined before and still does, so
/// `rooms_per_user_max` holds across the upgrade (SPEC.md 10.4).
#[test]
fn room_members_count_as_joined_after_the_upgrade() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.db");
    let creator = device(0);
    let mut room = new_group(&creator);
    room.extensions = confab_spec::rooms::RoomRoles::new(creator.system).context_extensions();
    {
        let mut store = SqliteStore::open(&path).expect("open");
        let created = store
            .create_conversation(&CONV, ConversationKind::Room, &room, 1, UnixMs(1))
            .expect("create");
        assert_eq!(created, confab_gateway::store::CreateOutcome::Created);
    }
    {
        let conn = rusqlite::Connection::open(&path).expect("raw");
        conn.execute_batch(
            "DROP TABLE joined; DROP TABLE invite_policies; PRAGMA user_version = 8;",
        )
        .expect("back to schema 8");
    }
    let mut store = SqliteStore::open(&path).expect("migrates");
    let another = store
        .create_conversation(
            &ConversationId([0x55; 32]),
            ConversationKind::Room,
            &room,
            1,
            UnixMs(2),
        )
        .expect("create");
    assert_eq!(
        another,
        confab_gateway::store::CreateOutcome::TooManyRooms,
        "the creator's room counts as joined after the upgrade"
    );
}
