//! The gateway's connection handler end to end with real MLS from both engines (every
//! pairing): handshake, conversation creation, a Commit with its Welcome delivered through
//! the inbox, live delivery through the hub call, echo with seq, duplicate resend, a commit
//! race with stale_commit naming the winner, replay across batch boundaries with Continue,
//! membership and auth rejections, and hostile bytes before authentication.

mod support;

use confab_client::mls::{CommitOutput, EngineKind, MlsEngine, open_engine, system_clock};
use confab_gateway::handler::{Action, Connection, Entropy, GatewayConfig};
use confab_gateway::rate::RateLimiters;
use confab_gateway::store::sqlite::SqliteStore;
use confab_gateway::store::{Store, StreamKey};
use confab_spec::error::{CloseCode, ErrorCode};
use confab_spec::frame::*;
use confab_spec::identity::{DeviceKeyPair, SystemKeyPair};
use confab_spec::ids::*;
use confab_spec::session::DeviceCredentials;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

const ORIGIN: &str = "wss://gateway.test";
const CONV: ConversationId = ConversationId([0x44; 32]);

struct Rng(ChaCha8Rng);
impl Entropy for Rng {
    fn fill(&mut self, out: &mut [u8]) {
        self.0.fill_bytes(out);
    }
}

struct Client {
    creds: DeviceCredentials,
    conn: Connection,
    engine: Box<dyn MlsEngine>,
    next_rid: u64,
}

struct World {
    config: GatewayConfig,
    limiters: RateLimiters,
    store: SqliteStore,
    rng: Rng,
    now: UnixMs,
    _dir: tempfile::TempDir,
}

fn credentials(seed: u8) -> DeviceCredentials {
    let system = SystemKeyPair::from_seed(&[seed; 32]);
    let key = DeviceKeyPair::from_seed(&[seed.wrapping_add(50); 32]);
    let now = system_clock()();
    let certificate = system.issue_certificate(
        ProcessId([seed; 16]),
        key.public(),
        UnixMs(now.0 - 3_600_000),
        now.plus_ms(86_400_000),
    );
    DeviceCredentials { key, certificate }
}

impl World {
    fn new(replay_batch_max: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("gw.db")).expect("store");
        let mut config = GatewayConfig::new(ORIGIN);
        config.limits.replay_batch_max = replay_batch_max;
        Self {
            limiters: RateLimiters::new(&config),
            config,
            store,
            rng: Rng(ChaCha8Rng::seed_from_u64(9)),
            now: system_clock()(),
            _dir: dir,
        }
    }

    fn send(&mut self, c: &mut Client, frame: ClientFrame) -> Vec<Action> {
        self.feed(&mut c.conn, &frame.encode())
    }

    /// Hands one WebSocket message to `conn`; what it does in answer.
    fn feed(&mut self, conn: &mut Connection, message: &[u8]) -> Vec<Action> {
        conn.handle(
            &self.config,
            &mut self.store,
            &self.limiters,
            &mut self.rng,
            self.now,
            message,
        )
    }

    fn client(&mut self, seed: u8, kind: EngineKind, dir: &tempfile::TempDir) -> Client {
        let creds = credentials(seed);
        let engine = open_engine(
            kind,
            &dir.path().join(format!("c{seed}.db")),
            creds.clone(),
            system_clock(),
        )
        .expect("engine");
        let (conn, _) = authenticate(self, &creds);
        Client {
            creds,
            conn,
            engine,
            next_rid: 1,
        }
    }

    /// Runs the hub: every client gets `on_appended` for every grown stream.
    fn fan_out(
        &mut self,
        actions: &[Action],
        clients: &mut [&mut Client],
    ) -> Vec<Vec<ServerFrame>> {
        let mut delivered = vec![Vec::new(); clients.len()];
        for a in actions {
            if let Action::Appended { stream, .. } = a {
                for (i, c) in clients.iter_mut().enumerate() {
                    let own = match stream {
                        StreamKey::Inbox(d) => Some(*d) == c.conn.device(),
                        StreamKey::Conversation(_) => true,
                    };
                    if own {
                        for out in c
                            .conn
                            .on_appended(&self.config, &self.store, stream)
                            .expect("hub")
                        {
                            if let Action::Send(f) = out {
                                delivered[i].push(f);
                            }
                        }
                    }
                }
            }
        }
        delivered
    }
}

/// A `CreateConversation` of `CONV` by `c`: creates its MLS group (a room's with the
/// roles naming `c`'s user as owner) and carries the group's GroupInfo (SPEC.md 6.1).
fn creation(c: &mut Client, rid: u64, kind: ConversationKind) -> ClientFrame {
    let extensions = match kind {
        ConversationKind::Room => {
            confab_spec::rooms::RoomRoles::new(c.creds.certificate.system).context_extensions()
        }
        _ => Vec::new(),
    };
    let group_info = c
        .engine
        .create_group_with(&CONV, &extensions)
        .expect("create the group");
    ClientFrame::CreateConversation(CreateConversation {
        rid,
        conversation: CONV,
        kind,
        group_info: MlsBytes::new(group_info).expect("bytes"),
    })
}

fn auth_for(creds: &DeviceCredentials, origin: &str, nonce: Nonce, now: UnixMs) -> Auth {
    support::sign_auth(creds.certificate.clone(), &creds.key, origin, nonce, now)
}

fn frames(actions: &[Action]) -> Vec<ServerFrame> {
    actions
        .iter()
        .filter_map(|a| {
            if let Action::Send(f) = a {
                Some(f.clone())
            } else {
                None
            }
        })
        .collect()
}

fn error_code(actions: &[Action]) -> Option<ErrorCode> {
    frames(actions).into_iter().find_map(|f| {
        if let ServerFrame::Error(e) = f {
            Some(e.code)
        } else {
            None
        }
    })
}

fn send_mls(
    w: &mut World,
    c: &mut Client,
    id: u8,
    payload: Vec<u8>,
    welcome: Option<Vec<u8>>,
) -> Vec<Action> {
    send_with(w, c, id, payload, (welcome, None))
}

/// Sends a Commit an engine made, with its Welcome and GroupInfo (SPEC.md 7.10).
fn send_commit(w: &mut World, c: &mut Client, id: u8, out: &CommitOutput) -> Vec<Action> {
    let attached = (out.welcome.clone(), out.group_info.clone());
    send_with(w, c, id, out.commit.clone(), attached)
}

fn send_with(
    w: &mut World,
    c: &mut Client,
    id: u8,
    payload: Vec<u8>,
    (welcome, group_info): (Option<Vec<u8>>, Option<Vec<u8>>),
) -> Vec<Action> {
    let rid = c.next_rid;
    c.next_rid += 1;
    let wrap = |b: Vec<u8>| MlsBytes::new(b).expect("bytes");
    w.send(
        c,
        ClientFrame::Send(Send {
            rid,
            conversation: CONV,
            msg_id: MsgId([id; 16]),
            payload: wrap(payload),
            welcome: welcome.map(wrap),
            group_info: group_info.map(wrap),
        }),
    )
}

fn accepted_seq(actions: &[Action]) -> Option<(u64, bool)> {
    frames(actions).into_iter().find_map(|f| {
        if let ServerFrame::Accepted(a) = f {
            Some((a.seq.get(), a.duplicate))
        } else {
            None
        }
    })
}

#[test]
fn dm_flow_in_every_engine_pairing() {
    for ka in EngineKind::ALL {
        for kb in EngineKind::ALL {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut w = World::new(2);
            let mut a = w.client(1, ka, &dir);
            let mut b = w.client(2, kb, &dir);

            let create = creation(&mut a, 1, ConversationKind::DirectMessage);
            let out = w.send(&mut a, create.clone());
            assert!(
                matches!(frames(&out)[..], [ServerFrame::Created(_)]),
                "{out:?}"
            );
            let again = w.send(&mut a, create);
            assert_eq!(error_code(&again), Some(ErrorCode::ConversationExists));

            // A adds B: the Commit is sequenced and the Welcome lands in B's inbox.
            let kp = b.engine.key_packages(1, false).expect("kp");
            let add = a.engine.add_members(&CONV, &kp).expect("add");
            let out = send_commit(&mut w, &mut a, 1, &add);
            assert_eq!(accepted_seq(&out), Some((1, false)), "{ka}->{kb}: {out:?}");
            a.engine.merge_pending_commit(&CONV).expect("merge on echo");
            let dup = send_commit(&mut w, &mut a, 1, &add);
            assert_eq!(
                accepted_seq(&dup),
                Some((1, true)),
                "a resend is a duplicate"
            );
            let out = w.send(
                &mut b,
                ClientFrame::Subscribe(Subscribe {
                    rid: 1,
                    stream: StreamId::Inbox,
                    from_seq: None,
                }),
            );
            let welcome = frames(&out)
                .into_iter()
                .find_map(|f| match f {
                    ServerFrame::Batch(batch) => batch.entries.into_iter().next(),
                    _ => None,
                })
                .expect("a Welcome in the inbox");
            let EntryBody::Welcome {
                conversation,
                commit_seq,
            } = welcome.body
            else {
                panic!("not a welcome")
            };
            assert_eq!((conversation, commit_seq.get()), (CONV, 1));
            b.engine.join(welcome.payload.as_bytes()).expect("join");

            // B follows live from after the Commit.
            let out = w.send(
                &mut b,
                ClientFrame::Subscribe(Subscribe {
                    rid: 2,
                    stream: StreamId::Conversation(CONV),
                    from_seq: Seq::new(2),
                }),
            );
            assert!(
                matches!(frames(&out)[..], [ServerFrame::Subscribed(_), ServerFrame::Batch(ref bt)] if bt.entries.is_empty() && !bt.more),
                "{out:?}"
            );
            let ct = a.engine.encrypt(&CONV, b"hi b").expect("encrypt");
            let out = send_mls(&mut w, &mut a, 2, ct, None);
            assert_eq!(accepted_seq(&out), Some((2, false)));
            let delivered = w.fan_out(&out, &mut [&mut a, &mut b]);
            let ServerFrame::Deliver(d) = &delivered[1][0] else {
                panic!("B got {:?}", delivered[1])
            };
            assert_eq!(d.entry.seq.get(), 2);
            assert!(matches!(
                b.engine.process(&CONV, d.entry.payload.as_bytes()),
                Ok(confab_client::mls::Processed::Application { .. })
            ));

            // Commit race: both update in epoch 1; A's wins, B learns the winner's seq.
            let wa = a.engine.self_update(&CONV).expect("a commits");
            let wb = b.engine.self_update(&CONV).expect("b commits");
            let out = send_commit(&mut w, &mut a, 3, &wa);
            assert_eq!(accepted_seq(&out), Some((3, false)));
            let out = send_commit(&mut w, &mut b, 4, &wb);
            let stale = frames(&out)
                .into_iter()
                .find_map(|f| {
                    if let ServerFrame::Error(e) = f {
                        Some(e)
                    } else {
                        None
                    }
                })
                .expect("stale");
            assert_eq!(
                (stale.code, stale.epoch, stale.seq.map(Seq::get)),
                (ErrorCode::StaleCommit, Some(Epoch(2)), Some(3))
            );
            a.engine.merge_pending_commit(&CONV).expect("a merges");
            b.engine.discard_pending_commit(&CONV).expect("b discards");
            b.engine
                .process(&CONV, &wa.commit)
                .expect("b applies the winner");
            assert_eq!(
                a.engine.epoch_authenticator(&CONV),
                b.engine.epoch_authenticator(&CONV)
            );

            // A message with a payload for another group is refused.
            let mut bogus = a.engine.encrypt(&CONV, b"x").expect("encrypt");
            bogus[6] ^= 0xFF; // inside the group id
            assert_eq!(
                error_code(&send_mls(&mut w, &mut a, 9, bogus, None)),
                Some(ErrorCode::MlsGroupMismatch)
            );

            // A stranger can neither read nor write.
            let mut c = w.client(3, ka, &dir);
            let out = w.send(
                &mut c,
                ClientFrame::Subscribe(Subscribe {
                    rid: 1,
                    stream: StreamId::Conversation(CONV),
                    from_seq: None,
                }),
            );
            assert_eq!(error_code(&out), Some(ErrorCode::NotMember));
            let ct = a.engine.encrypt(&CONV, b"y").expect("encrypt");
            assert_eq!(
                error_code(&send_mls(&mut w, &mut c, 10, ct, None)),
                Some(ErrorCode::NotMember)
            );

            // A removes B: B's live subscription delivers up to the removing Commit and then
            // ends (REQ-7.6-2, REQ-7.6-3); nothing after it reaches B.
            let removed = b.creds.certificate.device_id();
            let rm = a.engine.remove_members(&CONV, &[removed]).expect("remove");
            let out = send_commit(&mut w, &mut a, 11, &rm);
            assert_eq!(accepted_seq(&out), Some((4, false)));
            a.engine.merge_pending_commit(&CONV).expect("merge");
            let delivered = w.fan_out(&out, &mut [&mut a, &mut b]);
            let seqs = |frames: &[ServerFrame]| -> Vec<u64> {
                frames
                    .iter()
                    .flat_map(|f| match f {
                        ServerFrame::Deliver(d) => vec![d.entry.seq.get()],
                        ServerFrame::Batch(b) => b.entries.iter().map(|e| e.seq.get()).collect(),
                        _ => vec![],
                    })
                    .collect()
            };
            assert_eq!(seqs(&delivered[1]), vec![3, 4]);
            assert!(
                matches!(delivered[1].last(), Some(ServerFrame::Unsubscribed(u)) if u.rid == 2),
                "{:?}",
                delivered[1]
            );
            let ct = a.engine.encrypt(&CONV, b"after").expect("encrypt");
            let out = send_mls(&mut w, &mut a, 12, ct, None);
            assert_eq!(accepted_seq(&out), Some((5, false)));
            assert!(w.fan_out(&out, &mut [&mut a, &mut b])[1].is_empty());
            // A replay from before the removal (a device that was offline) stops at it,
            // across batches; from after it, the device is no member.
            let conv = StreamId::Conversation(CONV);
            let subscribe = |rid, from| {
                ClientFrame::Subscribe(Subscribe {
                    rid,
                    stream: conv,
                    from_seq: Seq::new(from),
                })
            };
            let first = frames(&w.send(&mut b, subscribe(3, 2)));
            assert_eq!(seqs(&first), vec![2, 3]);
            assert!(
                first
                    .iter()
                    .any(|f| matches!(f, ServerFrame::Batch(b) if b.more))
            );
            let rest = frames(&w.send(
                &mut b,
                ClientFrame::Continue(Continue {
                    stream: conv,
                    after_seq: Seq::new(3).expect("seq"),
                }),
            ));
            assert_eq!(seqs(&rest), vec![4]);
            assert!(
                matches!(&rest[..], [ServerFrame::Batch(b), ServerFrame::Unsubscribed(u)]
                    if !b.more && u.rid == 3),
                "{rest:?}"
            );
            assert_eq!(
                error_code(&w.send(&mut b, subscribe(4, 5))),
                Some(ErrorCode::NotMember)
            );
        }
    }
}

#[test]
fn replay_crosses_batch_boundaries_with_continue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = World::new(2);
    let mut a = w.client(1, EngineKind::MlsRs, &dir);
    let create = creation(&mut a, 1, ConversationKind::Room);
    w.send(&mut a, create);
    for i in 0..5u8 {
        let ct = a.engine.encrypt(&CONV, &[i]).expect("encrypt");
        assert_eq!(
            accepted_seq(&send_mls(&mut w, &mut a, i, ct, None)),
            Some((u64::from(i) + 1, false))
        );
    }
    let mut seen = Vec::new();
    let mut out = w.send(
        &mut a,
        ClientFrame::Subscribe(Subscribe {
            rid: 2,
            stream: StreamId::Conversation(CONV),
            from_seq: None,
        }),
    );
    loop {
        let batch = frames(&out)
            .into_iter()
            .find_map(|f| {
                if let ServerFrame::Batch(b) = f {
                    Some(b)
                } else {
                    None
                }
            })
            .expect("batch");
        assert!(batch.entries.len() <= 2, "replay_batch_max");
        seen.extend(batch.entries.iter().map(|e| e.seq.get()));
        if !batch.more {
            break;
        }
        // A second Continue for the same batch is refused.
        let after_seq = batch.entries.last().expect("entries").seq;
        out = w.send(
            &mut a,
            ClientFrame::Continue(Continue {
                stream: StreamId::Conversation(CONV),
                after_seq,
            }),
        );
        let wrong = w.send(
            &mut a,
            ClientFrame::Continue(Continue {
                stream: StreamId::Conversation(CONV),
                after_seq,
            }),
        );
        if !frames(&out)
            .iter()
            .any(|f| matches!(f, ServerFrame::Batch(b) if !b.more))
        {
            assert_eq!(error_code(&wrong), Some(ErrorCode::NotSubscribed));
        }
    }
    assert_eq!(seen, vec![1, 2, 3, 4, 5]);
    // Acks move the cursor; beyond the head is refused.
    assert_eq!(
        error_code(&w.send(
            &mut a,
            ClientFrame::Ack(Ack {
                stream: StreamId::Conversation(CONV),
                seq: Seq::new(3).expect("seq")
            })
        )),
        None
    );
    assert_eq!(
        w.store
            .cursor(
                &StreamKey::Conversation(CONV),
                &a.creds.certificate.device_id()
            )
            .expect("cursor"),
        3
    );
    assert_eq!(
        error_code(&w.send(
            &mut a,
            ClientFrame::Ack(Ack {
                stream: StreamId::Conversation(CONV),
                seq: Seq::new(9).expect("seq")
            })
        )),
        Some(ErrorCode::SeqOutOfRange)
    );
}

#[test]
fn auth_rejections_close_with_their_codes() {
    let mut w = World::new(256);
    let creds = credentials(1);
    for (origin, nonce_ok, time_offset, expected) in [
        (
            "wss://other.test",
            true,
            0i64,
            ErrorCode::AuthOriginMismatch,
        ),
        (ORIGIN, false, 0, ErrorCode::AuthNonceInvalid),
        (ORIGIN, true, 400_000, ErrorCode::AuthClockSkew),
    ] {
        let time = UnixMs((w.now.0 as i64 + time_offset) as u64);
        let out = try_auth(&mut w, |challenge| {
            let nonce = if nonce_ok { challenge } else { Nonce([0; 32]) };
            auth_for(&creds, origin, nonce, time)
        });
        assert_eq!(error_code(&out), Some(expected));
        assert_eq!(out.last(), Some(&Action::Close(CloseCode::AuthFailed)));
    }
    // Garbage before authentication: an error, then a protocol-error close.
    let mut conn = Connection::new();
    let out = w.feed(&mut conn, &[0xff, 0x00]);
    assert_eq!(error_code(&out), Some(ErrorCode::MalformedFrame));
    assert_eq!(out.last(), Some(&Action::Close(CloseCode::ProtocolError)));
    // Heartbeats before Ready are answered, and count: the frame after
    // `pre_auth_frames_max` closes with 4006 (Hello first, then heartbeats, in `challenged`).
    let mut conn = Connection::new();
    let hello = ClientFrame::Hello(Hello {
        versions: Versions::current(),
        resume_token: None,
    })
    .encode();
    let out = w.feed(&mut conn, &hello);
    assert!(matches!(
        out.as_slice(),
        [Action::Send(ServerFrame::Challenge(_))]
    ));
    for n in 2..=w.config.pre_auth_frames_max + 1 {
        let heartbeat = ClientFrame::Heartbeat(Heartbeat { nonce: n }).encode();
        let out = w.feed(&mut conn, &heartbeat);
        if n <= w.config.pre_auth_frames_max {
            assert_eq!(
                out,
                vec![Action::Send(ServerFrame::HeartbeatAck(HeartbeatAck {
                    nonce: n
                }))]
            );
        } else {
            assert_eq!(out, vec![Action::Close(CloseCode::PreAuthFlood)]);
        }
    }
}

mod hostile {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// Arbitrary messages never panic the handler, and a closed connection stays closed.
        #[test]
        fn arbitrary_messages_never_panic(messages in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..12)) {
            let mut w = World::new(256);
            let mut conn = Connection::new();
            let mut closed = false;
            for m in messages {
                let out = w.feed(&mut conn, &m);
                if closed {
                    prop_assert!(out.is_empty(), "a closed connection answered");
                }
                closed |= out.iter().any(|a| matches!(a, Action::Close(_)));
            }
        }
    }
}

#[test]
fn resume_tokens_rotate_and_reuse_revokes_the_chain() {
    let mut w = World::new(256);
    let creds = credentials(1);
    let hello = |token: Option<ResumeToken>| {
        ClientFrame::Hello(Hello {
            versions: Versions::current(),
            resume_token: token,
        })
        .encode()
    };
    // A full authentication yields the first token.
    let (_, first) = authenticate(&mut w, &creds);
    assert!(!first.resumed);

    // Resuming with it: the same session, a new token.
    let mut conn = Connection::new();
    let out = w.feed(&mut conn, &hello(Some(first.resume_token.clone())));
    let Some(Action::Send(ServerFrame::Ready(second))) = out.first().cloned() else {
        panic!("{out:?}")
    };
    assert!(second.resumed);
    assert_eq!(second.session_id, first.session_id);
    assert_eq!(second.device, creds.certificate.device_id());
    assert_ne!(
        second.resume_token, first.resume_token,
        "tokens rotate on every use"
    );
    assert_eq!(conn.device(), Some(creds.certificate.device_id()));

    // Reusing the first token: resume_token_reused, then a fresh challenge.
    let mut conn = Connection::new();
    let out = w.feed(&mut conn, &hello(Some(first.resume_token.clone())));
    assert_eq!(error_code(&out), Some(ErrorCode::ResumeTokenReused));
    assert!(matches!(
        frames(&out).last(),
        Some(ServerFrame::Challenge(_))
    ));
    // ... and the token issued in its place is revoked with it.
    let mut conn = Connection::new();
    let out = w.feed(&mut conn, &hello(Some(second.resume_token.clone())));
    assert_eq!(error_code(&out), Some(ErrorCode::ResumeTokenInvalid));
    assert!(matches!(
        frames(&out).last(),
        Some(ServerFrame::Challenge(_))
    ));
    assert_eq!(conn.device(), None);

    // An unknown token is invalid.
    let mut conn = Connection::new();
    let out = w.feed(
        &mut conn,
        &hello(Some(ResumeToken::new(vec![9; 32]).expect("token"))),
    );
    assert_eq!(error_code(&out), Some(ErrorCode::ResumeTokenInvalid));

    // Tokens expire.
    w.config.resume_token_ttl_ms = 1_000;
    let (_, ready) = authenticate(&mut w, &creds);
    w.now = w.now.plus_ms(1_001);
    let mut conn = Connection::new();
    let out = w.feed(&mut conn, &hello(Some(ready.resume_token)));
    assert_eq!(error_code(&out), Some(ErrorCode::ResumeTokenInvalid));
}

/// Hello on `conn`, then the Auth that `make` builds from the challenge's nonce; the
/// handler's answer to the Auth.
fn handshake(
    w: &mut World,
    conn: &mut Connection,
    make: impl FnOnce(Nonce) -> Auth,
) -> Vec<Action> {
    let hello = ClientFrame::Hello(Hello {
        versions: Versions::current(),
        resume_token: None,
    });
    let out = w.feed(conn, &hello.encode());
    let Some(Action::Send(ServerFrame::Challenge(ch))) = out.first() else {
        panic!("expected Challenge, got {out:?}")
    };
    let auth = make(ch.nonce);
    w.feed(conn, &ClientFrame::Auth(auth).encode())
}

/// [`handshake`] on a fresh connection.
fn try_auth(w: &mut World, make: impl FnOnce(Nonce) -> Auth) -> Vec<Action> {
    handshake(w, &mut Connection::new(), make)
}

/// Authenticates `creds` on a fresh connection; the connection and its Ready.
fn authenticate(w: &mut World, creds: &DeviceCredentials) -> (Connection, Ready) {
    let mut conn = Connection::new();
    let now = w.now;
    let out = handshake(w, &mut conn, |nonce| auth_for(creds, ORIGIN, nonce, now));
    let Some(Action::Send(ServerFrame::Ready(ready))) = out.first().cloned() else {
        panic!("expected Ready, got {out:?}")
    };
    assert_eq!(ready.device, creds.certificate.device_id());
    (conn, ready)
}

#[test]
fn certificate_rejections_have_their_codes() {
    let mut w = World::new(256);
    let system = SystemKeyPair::from_seed(&[21; 32]);
    let key = DeviceKeyPair::from_seed(&[22; 32]);
    let now = w.now;
    let hour = 3_600_000;
    let cert = |from: UnixMs, to: UnixMs| {
        system.issue_certificate(ProcessId([23; 16]), key.public(), from, to)
    };
    let cases: Vec<(confab_spec::identity::DeviceCertificate, ErrorCode)> = vec![
        (
            cert(UnixMs(now.0 - 2 * hour), UnixMs(now.0 - hour)),
            ErrorCode::AuthCertificateExpired,
        ),
        (
            cert(now.plus_ms(2 * hour), now.plus_ms(3 * hour)),
            ErrorCode::AuthCertificateNotYetValid,
        ),
        (
            {
                let mut c = cert(UnixMs(now.0 - hour), now.plus_ms(hour));
                c.not_after_ms = now.plus_ms(2 * hour);
                c
            },
            ErrorCode::AuthCertificateInvalid,
        ),
    ];
    for (certificate, expected) in cases {
        let out = try_auth(&mut w, |nonce| {
            support::sign_auth(certificate.clone(), &key, ORIGIN, nonce, now)
        });
        assert_eq!(error_code(&out), Some(expected));
        assert_eq!(out.last(), Some(&Action::Close(CloseCode::AuthFailed)));
    }
    // A transcript signed by another key than the certificate names.
    let good = cert(UnixMs(now.0 - hour), now.plus_ms(hour));
    let other = DeviceKeyPair::from_seed(&[24; 32]);
    let out = try_auth(&mut w, |nonce| {
        support::sign_auth(good.clone(), &other, ORIGIN, nonce, now)
    });
    assert_eq!(error_code(&out), Some(ErrorCode::AuthSignatureInvalid));
    assert_eq!(out.last(), Some(&Action::Close(CloseCode::AuthFailed)));
    // And the same certificate with the right key is accepted.
    let out = try_auth(&mut w, |nonce| {
        support::sign_auth(good.clone(), &key, ORIGIN, nonce, now)
    });
    assert!(
        matches!(out.first(), Some(Action::Send(ServerFrame::Ready(_)))),
        "{out:?}"
    );
}

#[test]
fn revocation_is_checked_on_auth_and_resume_and_closes_the_device() {
    let mut w = World::new(256);
    let system = SystemKeyPair::from_seed(&[31; 32]);
    let now = w.now;
    let device = |process: u8| {
        let key = DeviceKeyPair::from_seed(&[process; 32]);
        let certificate = system.issue_certificate(
            ProcessId([process; 16]),
            key.public(),
            UnixMs(now.0 - 3_600_000),
            now.plus_ms(3_600_000),
        );
        DeviceCredentials { key, certificate }
    };
    let (laptop, phone) = (device(1), device(2));
    let (mut laptop_conn, _) = authenticate(&mut w, &laptop);
    let (_, phone_ready) = authenticate(&mut w, &phone);
    let phone_id = phone.certificate.device_id();
    let revoke =
        |w: &mut World, conn: &mut Connection, revocation: confab_spec::identity::Revocation| {
            w.feed(
                conn,
                &ClientFrame::RevokeDevice(RevokeDevice { rid: 7, revocation }).encode(),
            )
        };

    // Another system's device: forbidden, nothing stored.
    let stranger = SystemKeyPair::from_seed(&[32; 32]);
    let out = revoke(
        &mut w,
        &mut laptop_conn,
        stranger.revoke(ProcessId([2; 16]), now),
    );
    assert_eq!(error_code(&out), Some(ErrorCode::Forbidden));
    // A forged signature: auth_certificate_invalid, nothing stored.
    let mut forged = system.revoke(ProcessId([2; 16]), now);
    forged.revoked_at_ms = UnixMs(now.0 - 1);
    let out = revoke(&mut w, &mut laptop_conn, forged);
    assert_eq!(error_code(&out), Some(ErrorCode::AuthCertificateInvalid));
    assert_eq!(w.store.revoked_at(&phone_id).expect("lookup"), None);

    // The laptop revokes the phone: Ok, and the shell is told to close the phone's session.
    let out = revoke(
        &mut w,
        &mut laptop_conn,
        system.revoke(ProcessId([2; 16]), now),
    );
    assert!(
        frames(&out).contains(&ServerFrame::Ok(OkFrame { rid: 7 })),
        "{out:?}"
    );
    assert!(out.contains(&Action::Revoked { device: phone_id }));
    assert!(
        !out.iter().any(|a| matches!(a, Action::Close(_))),
        "the laptop stays"
    );

    // The phone can neither authenticate nor resume.
    let out = try_auth(&mut w, |nonce| auth_for(&phone, ORIGIN, nonce, now));
    assert_eq!(error_code(&out), Some(ErrorCode::AuthCertificateRevoked));
    assert_eq!(out.last(), Some(&Action::Close(CloseCode::AuthFailed)));
    let mut conn = Connection::new();
    let out = w.feed(
        &mut conn,
        &ClientFrame::Hello(Hello {
            versions: Versions::current(),
            resume_token: Some(phone_ready.resume_token),
        })
        .encode(),
    );
    assert_eq!(error_code(&out), Some(ErrorCode::AuthCertificateRevoked));
    assert_eq!(out.last(), Some(&Action::Close(CloseCode::AuthFailed)));

    // A device that revokes itself is closed with 4105 after the Ok.
    let out = revoke(
        &mut w,
        &mut laptop_conn,
        system.revoke(ProcessId([1; 16]), now),
    );
    assert!(frames(&out).contains(&ServerFrame::Ok(OkFrame { rid: 7 })));
    assert_eq!(error_code(&out), Some(ErrorCode::AuthCertificateRevoked));
    assert_eq!(out.last(), Some(&Action::Close(CloseCode::DeviceRevoked)));
}

#[test]
fn retention_behind_a_subscription_answers_continuity_lost() {
    for kind in EngineKind::ALL {
        continuity_lost_with(kind);
    }
}

fn continuity_lost_with(kind: EngineKind) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = World::new(2);
    let mut a = w.client(1, kind, &dir);
    let create = creation(&mut a, 1, ConversationKind::Room);
    w.send(&mut a, create);
    for i in 0..5u8 {
        let ct = a.engine.encrypt(&CONV, &[i]).expect("encrypt");
        assert!(accepted_seq(&send_mls(&mut w, &mut a, i, ct, None)).is_some());
    }
    let stream = StreamId::Conversation(CONV);
    let subscribe = |w: &mut World, a: &mut Client, from: Option<u64>| {
        w.send(
            a,
            ClientFrame::Subscribe(Subscribe {
                rid: 40,
                stream,
                from_seq: from.and_then(Seq::new),
            }),
        )
    };
    let out = subscribe(&mut w, &mut a, None);
    assert!(
        frames(&out)
            .iter()
            .any(|f| matches!(f, ServerFrame::Batch(b) if b.more && b.entries.len() == 2))
    );
    // Retention with zero bounds deletes everything while the replay waits for Continue.
    let policy = confab_gateway::store::RetentionPolicy {
        retention_ms: 0,
        retention_unacked_ms: 0,
    };
    let report = w
        .store
        .collect_garbage(&policy, w.now.plus_ms(1), 1_000)
        .expect("gc");
    assert_eq!(report.entries_deleted, 5);
    let lost = |from: u64| {
        ServerFrame::ContinuityLost(ContinuityLost {
            rid: 40,
            stream,
            from_seq: Seq::new(from).expect("seq"),
            oldest_seq: 6,
            head_seq: 5,
        })
    };
    let out = w.send(
        &mut a,
        ClientFrame::Continue(Continue {
            stream,
            after_seq: Seq::new(2).expect("seq"),
        }),
    );
    assert_eq!(frames(&out), vec![lost(3)]);
    // The subscription ended: a second Continue is not_subscribed.
    let out = w.send(
        &mut a,
        ClientFrame::Continue(Continue {
            stream,
            after_seq: Seq::new(2).expect("seq"),
        }),
    );
    assert_eq!(error_code(&out), Some(ErrorCode::NotSubscribed));
    // From the cursor (0) or from 1: continuity lost, never a silent start at 6.
    assert_eq!(frames(&subscribe(&mut w, &mut a, None)), vec![lost(1)]);
    assert_eq!(frames(&subscribe(&mut w, &mut a, Some(4))), vec![lost(4)]);
    // From the oldest retained seq: subscribed, live.
    let out = subscribe(&mut w, &mut a, Some(6));
    assert!(
        matches!(frames(&out).first(), Some(ServerFrame::Subscribed(s)) if s.oldest_seq == 6 && s.head_seq == 5)
    );
    // A live subscription that retention passes hears continuity-lost on the next wake-up.
    for i in 10..12u8 {
        let ct = a.engine.encrypt(&CONV, &[i]).expect("encrypt");
        assert!(accepted_seq(&send_mls(&mut w, &mut a, i, ct, None)).is_some());
    }
    w.store
        .collect_garbage(&policy, w.now.plus_ms(1), 1_000)
        .expect("gc");
    let out = a
        .conn
        .on_appended(&w.config, &w.store, &StreamKey::Conversation(CONV))
        .expect("hub");
    assert_eq!(
        frames(&out),
        vec![ServerFrame::ContinuityLost(ContinuityLost {
            rid: 40,
            stream,
            from_seq: Seq::new(6).expect("seq"),
            oldest_seq: 8,
            head_seq: 7,
        })]
    );
}

#[test]
fn batches_fit_in_frame_bytes_max_and_oversize_payloads_are_refused() {
    for kind in EngineKind::ALL {
        byte_bounds_with(kind);
    }
}

fn byte_bounds_with(kind: EngineKind) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = World::new(256);
    w.config.limits.frame_bytes_max = confab_spec::limits::FRAME_BYTES_MAX_MINIMUM as u64;
    let frame_max = confab_spec::limits::FRAME_BYTES_MAX_MINIMUM;
    let payload_max = confab_spec::limits::payload_bytes_max(frame_max);
    let mut a = w.client(1, kind, &dir);
    let create = creation(&mut a, 1, ConversationKind::Room);
    w.send(&mut a, create);
    // Five entries of about 30 KB: at most two fit in one Batch.
    for i in 0..5u8 {
        let ct = a.engine.encrypt(&CONV, &vec![i; 30_000]).expect("encrypt");
        assert!(accepted_seq(&send_mls(&mut w, &mut a, i, ct, None)).is_some());
    }
    // A payload just over payload_bytes_max, in a frame under frame_bytes_max: refused with
    // payload_too_large, and nothing is stored.
    // (The size is checked before the MLS framing, so trailing bytes do not matter.)
    let mut over = a.engine.encrypt(&CONV, b"x").expect("encrypt");
    over.resize(payload_max + 1, 0);
    let out = send_mls(&mut w, &mut a, 99, over, None);
    assert_eq!(error_code(&out), Some(ErrorCode::PayloadTooLarge));
    assert!(
        !out.iter().any(|x| matches!(x, Action::Close(_))),
        "not fatal"
    );
    // A large one under the bound is accepted, and replayed alone in a frame that fits
    // (mls-rs pads to steps, so "large" is the largest step under the bound).
    let exact = ciphertext_in(&mut *a.engine, payload_max / 2..=payload_max);
    assert_eq!(
        accepted_seq(&send_mls(&mut w, &mut a, 100, exact, None)),
        Some((6, false))
    );

    let stream = StreamId::Conversation(CONV);
    let mut out = w.send(
        &mut a,
        ClientFrame::Subscribe(Subscribe {
            rid: 2,
            stream,
            from_seq: None,
        }),
    );
    let mut seen = Vec::new();
    loop {
        let batch = frames(&out)
            .into_iter()
            .find_map(|f| match f {
                ServerFrame::Batch(b) => Some(b),
                _ => None,
            })
            .expect("batch");
        let encoded = ServerFrame::Batch(batch.clone()).encode().len();
        assert!(encoded <= frame_max, "a Batch of {encoded} bytes");
        assert!(!batch.entries.is_empty());
        assert!(batch.entries.len() <= 2);
        seen.extend(batch.entries.iter().map(|e| e.seq.get()));
        if !batch.more {
            break;
        }
        let after_seq = batch.entries.last().expect("entries").seq;
        out = w.send(
            &mut a,
            ClientFrame::Continue(Continue { stream, after_seq }),
        );
    }
    assert_eq!(seen, vec![1, 2, 3, 4, 5, 6]);
}

/// An application message whose ciphertext length falls in `range` (padding makes the
/// overhead vary, so search downwards from the top of the range).
fn ciphertext_in(engine: &mut dyn MlsEngine, range: std::ops::RangeInclusive<usize>) -> Vec<u8> {
    let mut plaintext = *range.end();
    loop {
        let ct = engine.encrypt(&CONV, &vec![7; plaintext]).expect("encrypt");
        if range.contains(&ct.len()) {
            return ct;
        }
        let step = ct.len().saturating_sub(*range.end()).max(1);
        plaintext = plaintext.checked_sub(step).expect("a plaintext that fits");
    }
}

mod frame_sequences {
    use super::*;
    use proptest::prelude::*;

    /// One step of an authenticated client: an arbitrary frame (optionally pointed at the
    /// test's conversation), or a well-formed request the fuzzer would rarely find.
    #[derive(Debug, Clone)]
    enum Step {
        Arbitrary { bytes: Vec<u8>, redirect: bool },
        ValidSend { message: usize, msg_id: u8 },
        Subscribe { from: Option<u8> },
        Continue { after: u8 },
        Ack { seq: u8 },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (prop::collection::vec(any::<u8>(), 0..96), any::<bool>())
                .prop_map(|(bytes, redirect)| Step::Arbitrary { bytes, redirect }),
            4 => (0usize..12, 0u8..16).prop_map(|(message, msg_id)| Step::ValidSend { message, msg_id }),
            2 => proptest::option::of(0u8..16).prop_map(|from| Step::Subscribe { from }),
            2 => (0u8..16).prop_map(|after| Step::Continue { after }),
            1 => (0u8..20).prop_map(|seq| Step::Ack { seq }),
        ]
    }

    fn redirect(frame: ClientFrame) -> ClientFrame {
        let conv = StreamId::Conversation(CONV);
        match frame {
            ClientFrame::Send(mut s) => {
                s.conversation = CONV;
                ClientFrame::Send(s)
            }
            ClientFrame::Subscribe(mut s) => {
                s.stream = conv;
                ClientFrame::Subscribe(s)
            }
            ClientFrame::Continue(mut c) => {
                c.stream = conv;
                ClientFrame::Continue(c)
            }
            ClientFrame::Ack(mut a) => {
                a.stream = conv;
                ClientFrame::Ack(a)
            }
            ClientFrame::Unsubscribe(mut u) => {
                u.stream = conv;
                ClientFrame::Unsubscribe(u)
            }
            other => other,
        }
    }

    /// What the client has seen of the conversation's log on this connection.
    #[derive(Default)]
    struct Seen {
        /// The seq the current subscription must deliver next.
        next: Option<u64>,
        /// msg_id → the seq the gateway accepted it at.
        accepted: std::collections::HashMap<MsgId, u64>,
    }

    fn check(seen: &mut Seen, out: &[Action]) -> Result<(), TestCaseError> {
        for action in out {
            match action {
                Action::Close(code) => prop_assert!(false, "closed with {:?}", code),
                Action::Send(ServerFrame::Error(e)) => {
                    prop_assert_ne!(e.code, ErrorCode::InternalError);
                }
                Action::Send(ServerFrame::Accepted(a)) => {
                    let first = *seen.accepted.entry(a.msg_id).or_insert(a.seq.get());
                    prop_assert_eq!(first, a.seq.get(), "a msg_id at two seqs");
                }
                Action::Send(ServerFrame::Subscribed(s))
                    if s.stream == StreamId::Conversation(CONV) =>
                {
                    seen.next = Some(s.from_seq.get());
                }
                Action::Send(ServerFrame::ContinuityLost(c))
                    if c.stream == StreamId::Conversation(CONV) =>
                {
                    seen.next = None;
                }
                Action::Send(ServerFrame::Unsubscribed(u))
                    if u.stream == StreamId::Conversation(CONV) =>
                {
                    seen.next = None;
                }
                Action::Send(ServerFrame::Batch(b)) if b.stream == StreamId::Conversation(CONV) => {
                    for e in &b.entries {
                        prop_assert_eq!(Some(e.seq.get()), seen.next, "replay gap or repeat");
                        seen.next = Some(e.seq.get() + 1);
                    }
                }
                Action::Send(ServerFrame::Deliver(d))
                    if d.stream == StreamId::Conversation(CONV) =>
                {
                    prop_assert_eq!(Some(d.entry.seq.get()), seen.next, "live gap or repeat");
                    seen.next = Some(d.entry.seq.get() + 1);
                }
                _ => {}
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Arbitrary frame sequences after `Ready` (SPEC.md 6.3, 6.4): the handler never
        /// closes the session or fails internally, a msg_id keeps its seq, every replay and
        /// live delivery is gap-free and repeat-free, and the stored log stays dense.
        #[test]
        fn arbitrary_frames_after_ready_keep_delivery_exact(steps in prop::collection::vec(step(), 1..40)) {
            for kind in EngineKind::ALL {
                let dir = tempfile::tempdir().expect("tempdir");
                let mut w = World::new(3);
                let mut a = w.client(1, kind, &dir);
                let create = creation(&mut a, 1, ConversationKind::Room);
                w.send(&mut a, create);
                let messages: Vec<Vec<u8>> = (0..12u8)
                    .map(|i| a.engine.encrypt(&CONV, &[i]).expect("encrypt"))
                    .collect();
                let mut seen = Seen::default();
                for step in &steps {
                    let stream = StreamId::Conversation(CONV);
                    let out = match step {
                        Step::Arbitrary { bytes, redirect: r } => {
                            let mut u = arbitrary::Unstructured::new(bytes);
                            let Ok(frame) = u.arbitrary::<ClientFrame>() else { continue };
                            let frame = if *r { redirect(frame) } else { frame };
                            w.send(&mut a, frame)
                        }
                        Step::ValidSend { message, msg_id } => {
                            send_mls(&mut w, &mut a, *msg_id, messages[*message].clone(), None)
                        }
                        Step::Subscribe { from } => w.send(&mut a, ClientFrame::Subscribe(Subscribe {
                            rid: 9,
                            stream,
                            from_seq: from.and_then(|f| Seq::new(u64::from(f))),
                        })),
                        Step::Continue { after } => match Seq::new(u64::from(*after)) {
                            Some(after_seq) => w.send(&mut a, ClientFrame::Continue(Continue { stream, after_seq })),
                            None => continue,
                        },
                        Step::Ack { seq } => match Seq::new(u64::from(*seq)) {
                            Some(seq) => w.send(&mut a, ClientFrame::Ack(Ack { stream, seq })),
                            None => continue,
                        },
                    };
                    check(&mut seen, &out)?;
                    // The hub: appended entries reach the live subscription.
                    if out.iter().any(|x| matches!(x, Action::Appended { stream: StreamKey::Conversation(_), .. })) {
                        let live = a.conn.on_appended(&w.config, &w.store, &StreamKey::Conversation(CONV)).expect("hub");
                        check(&mut seen, &live)?;
                    }
                }
                let log = w.store.read(&StreamKey::Conversation(CONV), Seq::FIRST, 1_000, usize::MAX).expect("read");
                for (i, e) in log.iter().enumerate() {
                    prop_assert_eq!(e.seq.get(), i as u64 + 1, "dense log");
                }
            }
        }
    }
}

mod directory {
    use super::*;
    use confab_gateway::rate::RateLimit;

    fn device_of(system: &SystemKeyPair, process: u8, now: UnixMs) -> DeviceCredentials {
        let key = DeviceKeyPair::from_seed(&[process.wrapping_add(100); 32]);
        let certificate = system.issue_certificate(
            ProcessId([process; 16]),
            key.public(),
            UnixMs(now.0 - 3 * 3_600_000),
            now.plus_ms(86_400_000),
        );
        DeviceCredentials { key, certificate }
    }

    fn upload(
        w: &mut World,
        conn: &mut Connection,
        packages: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
    ) -> Vec<ServerFrame> {
        let frame = ClientFrame::UploadKeyPackages(UploadKeyPackages {
            rid: 5,
            key_packages: packages
                .into_iter()
                .map(|p| MlsBytes::new(p).expect("bytes"))
                .collect(),
            last_resort: last_resort.map(|p| MlsBytes::new(p).expect("bytes")),
        });
        frames(&w.feed(conn, &frame.encode()))
    }

    fn claim(w: &mut World, conn: &mut Connection, user: SystemKey) -> Vec<ServerFrame> {
        claim_of(w, conn, user, None)
    }

    fn claim_of(
        w: &mut World,
        conn: &mut Connection,
        user: SystemKey,
        devices: Option<Vec<DeviceId>>,
    ) -> Vec<ServerFrame> {
        let frame = ClientFrame::ClaimKeyPackages(ClaimKeyPackages {
            rid: 6,
            user,
            devices,
        });
        exchange(w, conn, frame)
    }

    /// `ListDevices` as (device, pool_count, last_resort_present).
    fn list_devices(w: &mut World, conn: &mut Connection) -> Vec<(DeviceId, u64, bool)> {
        exchange(w, conn, ClientFrame::ListDevices(ListDevices { rid: 8 }))
            .iter()
            .find_map(|f| match f {
                ServerFrame::Devices(d) if d.rid == 8 => Some(
                    d.devices
                        .iter()
                        .map(|d| (d.device, d.pool_count, d.last_resort_present))
                        .collect(),
                ),
                _ => None,
            })
            .expect("Devices")
    }

    /// Hands `frame` to the connection; returns the frames it answers with.
    fn exchange(w: &mut World, conn: &mut Connection, frame: ClientFrame) -> Vec<ServerFrame> {
        frames(&w.feed(conn, &frame.encode()))
    }

    fn status(frames: &[ServerFrame]) -> Option<(u64, bool, bool)> {
        frames.iter().find_map(|f| match f {
            ServerFrame::KeyPackagesStored(s) => {
                Some((s.pool_count, s.last_resort_present, s.last_resort_claimed))
            }
            _ => None,
        })
    }

    fn claimed(frames: &[ServerFrame]) -> Vec<(DeviceId, bool)> {
        frames
            .iter()
            .find_map(|f| match f {
                ServerFrame::KeyPackagesClaimed(c) => Some(
                    c.claimed
                        .iter()
                        .map(|p| {
                            // What is handed out is what the device uploaded: it reads, and
                            // its credential names the device it is filed under.
                            let kp =
                                confab_spec::mls_framing::key_package(p.key_package.as_bytes())
                                    .expect("a KeyPackage");
                            let cert: confab_spec::identity::DeviceCertificate =
                                confab_spec::cbor::from_slice(
                                    &kp.identity,
                                    &confab_spec::DecodeLimits::default(),
                                )
                                .expect("certificate");
                            assert_eq!(cert.device_id(), p.device);
                            (p.device, p.last_resort)
                        })
                        .collect(),
                ),
                _ => None,
            })
            .unwrap_or_default()
    }

    fn error_of(frames: &[ServerFrame]) -> Option<(ErrorCode, Option<u64>)> {
        frames.iter().find_map(|f| match f {
            ServerFrame::Error(e) => Some((e.code, e.retry_after_ms)),
            _ => None,
        })
    }

    /// SPEC.md section 8 with real KeyPackages from both engines: validation of every
    /// upload, one-time claims, the last-resort fallback and its signal to the owner, the
    /// claimer never served its own package, revocation, and the per-claimer limit that
    /// stops a drainer while another contact still gets the last-resort package.
    #[test]
    fn uploads_claims_last_resort_and_limits_with_both_engines() {
        for (ka, kb) in [
            (EngineKind::OpenMls, EngineKind::MlsRs),
            (EngineKind::MlsRs, EngineKind::OpenMls),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut w = World::new(256);
            w.config.limits.key_packages_per_upload_max = 3;
            w.config.claims_per_claimer = RateLimit {
                per_minute: 1,
                burst: 5,
            };
            w.config.claims_per_target = RateLimit {
                per_minute: 1,
                burst: 9,
            };
            w.limiters = RateLimiters::new(&w.config);
            let now = w.now;
            let user = SystemKeyPair::from_seed(&[70; 32]);
            let (u1, u2) = (device_of(&user, 1, now), device_of(&user, 2, now));
            let mut e1 = open_engine(ka, &dir.path().join("u1.db"), u1.clone(), system_clock())
                .expect("engine");
            let mut e2 = open_engine(kb, &dir.path().join("u2.db"), u2.clone(), system_clock())
                .expect("engine");
            let (mut c1, _) = authenticate(&mut w, &u1);
            let (mut c2, _) = authenticate(&mut w, &u2);
            let (mut drainer, _) = authenticate(&mut w, &credentials(80));
            let (mut friend, _) = authenticate(&mut w, &credentials(81));

            // The gateway's clock runs 100 s behind the devices': packages that start "in
            // the future" by less than clock_skew_max_ms are accepted.
            w.now = UnixMs(now.0 - 100_000);

            // Invalid uploads are refused whole, with the reason, and store nothing.
            let other = e2.key_packages(1, false).expect("kp");
            let mine = e1.key_packages(4, false).expect("kp");
            let refused = [
                (vec![mine[0].clone(), other[0].clone()], "another device"),
                (
                    vec![mine[0][..mine[0].len() - 3].to_vec()],
                    "does not parse",
                ),
                (
                    {
                        let mut t = mine[0].clone();
                        let n = t.len();
                        t[n - 1] ^= 1;
                        vec![t]
                    },
                    "signature",
                ),
                (mine.clone(), "key_packages_per_upload_max"),
            ];
            for (packages, why) in refused {
                let out = upload(&mut w, &mut c1, packages, None);
                assert_eq!(
                    error_of(&out).map(|e| e.0),
                    Some(ErrorCode::KeyPackageInvalid),
                    "{why}"
                );
                let detail = out.iter().find_map(|f| match f {
                    ServerFrame::Error(e) => e.detail.as_ref().map(|d| d.as_str().to_owned()),
                    _ => None,
                });
                assert!(detail.is_some_and(|d| d.contains(why)), "{why}");
            }
            assert_eq!(
                status(&upload(&mut w, &mut c1, vec![], None)),
                Some((0, false, false))
            );

            // u1: two packages and a last-resort one; u2: one package.
            let last = e1.key_packages(1, true).expect("last resort").remove(0);
            let out = upload(&mut w, &mut c1, mine[..2].to_vec(), Some(last));
            assert_eq!(status(&out), Some((2, true, false)));
            assert!(
                out.iter().any(
                    |f| matches!(f, ServerFrame::KeyPackagesStored(s) if s.low_watermark == 10)
                )
            );
            assert_eq!(
                status(&upload(&mut w, &mut c2, other, None)),
                Some((1, false, false))
            );

            let (d1, d2) = (u1.certificate.device_id(), u2.certificate.device_id());
            // A user's devices see each other, with their pools (REQ-8-8); nobody else
            // sees them: the drainer's own user has no devices in the directory.
            let mut expected = vec![(d1, 2, true), (d2, 1, false)];
            expected.sort();
            assert_eq!(list_devices(&mut w, &mut c1), expected);
            assert_eq!(list_devices(&mut w, &mut c2), expected);
            assert_eq!(list_devices(&mut w, &mut drainer), vec![]);
            // A claim of listed devices takes nothing from the others (REQ-8-9); a listed
            // device of another user is not one of this user's.
            let stranger = credentials(80).certificate.device_id();
            assert_eq!(
                claimed(&claim_of(
                    &mut w,
                    &mut c1,
                    user.public(),
                    Some(vec![d2, stranger])
                )),
                vec![(d2, false)]
            );
            assert_eq!(list_devices(&mut w, &mut c1), vec![(d1, 2, true)]);
            assert_eq!(
                claimed(&claim(&mut w, &mut drainer, user.public())),
                vec![(d1, false)]
            );
            assert_eq!(
                claimed(&claim(&mut w, &mut drainer, user.public())),
                vec![(d1, false)]
            );
            // The pool is empty: the last-resort package, kept for the next claimer.
            assert_eq!(
                claimed(&claim(&mut w, &mut drainer, user.public())),
                vec![(d1, true)]
            );
            assert_eq!(
                claimed(&claim(&mut w, &mut drainer, user.public())),
                vec![(d1, true)]
            );
            assert_eq!(
                status(&upload(&mut w, &mut c1, vec![], None)),
                Some((0, true, true))
            );
            // u2 asks for its own user's other devices: never itself.
            assert_eq!(
                claimed(&claim(&mut w, &mut c2, user.public())),
                vec![(d1, true)]
            );

            // The drainer's fifth claim is its last; the sixth is limited, with a wait.
            assert_eq!(
                claimed(&claim(&mut w, &mut drainer, user.public())),
                vec![(d1, true)]
            );
            let out = claim(&mut w, &mut drainer, user.public());
            let (code, retry) = error_of(&out).expect("limited");
            assert_eq!(code, ErrorCode::RateLimited);
            assert!(retry.is_some_and(|ms| ms > 0 && ms <= 60_000), "{retry:?}");
            // A legitimate contact still gets a package.
            assert_eq!(
                claimed(&claim(&mut w, &mut friend, user.public())),
                vec![(d1, true)]
            );

            // Far beyond the allowed skew (engines backdate `not_before` by up to an hour),
            // a package's lifetime has not started yet.
            w.now = UnixMs(now.0 - 2 * 3_600_000);
            let early = e1.key_packages(1, false).expect("kp");
            let out = upload(&mut w, &mut c1, early, None);
            assert_eq!(
                error_of(&out).map(|e| e.0),
                Some(ErrorCode::KeyPackageInvalid)
            );
            assert!(
                out.iter().any(|f| matches!(f, ServerFrame::Error(e)
                    if e.detail.as_ref().is_some_and(|d| d.as_str().contains("lifetime")))),
                "{out:?}"
            );
            w.now = UnixMs(now.0 - 100_000);

            // A fresh last-resort upload clears the signal.
            let fresh = e1.key_packages(1, true).expect("last resort").remove(0);
            assert_eq!(
                status(&upload(&mut w, &mut c1, vec![], Some(fresh))),
                Some((0, true, false))
            );

            // Revoking u1 takes its packages out of the directory; nobody is left.
            let out = c2.handle(
                &w.config,
                &mut w.store,
                &w.limiters,
                &mut w.rng,
                w.now,
                &ClientFrame::RevokeDevice(RevokeDevice {
                    rid: 7,
                    revocation: user.revoke(ProcessId([1; 16]), now),
                })
                .encode(),
            );
            assert!(frames(&out).contains(&ServerFrame::Ok(OkFrame { rid: 7 })));
            assert_eq!(
                error_of(&claim(&mut w, &mut friend, user.public())).map(|e| e.0),
                Some(ErrorCode::NoKeyPackages)
            );
            assert_eq!(list_devices(&mut w, &mut c2), vec![]);
        }
    }
}

/// A failing store is answered `internal_error` with a fixed text: what failed (tables,
/// paths, SQL) goes to the operator's log, never to the peer.
#[test]
fn store_failures_do_not_leak_their_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = World::new(4);
    let mut a = w.client(1, EngineKind::MlsRs, &dir);
    let create = creation(&mut a, 1, ConversationKind::Room);
    w.send(&mut a, create);
    // Another connection to the database takes a table away under the store.
    let raw = rusqlite::Connection::open(w._dir.path().join("gw.db")).expect("raw");
    raw.execute_batch("DROP TABLE entries;").expect("drop");
    let ct = a.engine.encrypt(&CONV, b"x").expect("encrypt");
    let out = send_mls(&mut w, &mut a, 1, ct, None);
    let Some(e) = frames(&out).into_iter().find_map(|f| match f {
        ServerFrame::Error(e) => Some(e),
        _ => None,
    }) else {
        panic!("an Error for the failed send: {out:?}");
    };
    assert_eq!(e.code, ErrorCode::InternalError);
    let detail = e
        .detail
        .as_ref()
        .map(|d| d.as_str().to_owned())
        .unwrap_or_default();
    assert!(
        !detail.contains("entries") && !detail.contains("table") && !detail.contains("gw.db"),
        "detail {detail:?}"
    );
}
