//! SPEC.md REQ-6.3-1 against the real binary: a `confab-gateway` process takes sends while
//! it is killed with SIGKILL at random points, over many cycles. After every restart the
//! client resends what was not acknowledged (same msg_id), and at the end every
//! acknowledged entry is present exactly once, at the seq it was acknowledged with, with
//! dense seqs.

use std::collections::HashMap;
use std::time::Duration;

mod support;

use confab_spec::ServerFrame;
use confab_spec::frame::*;
use confab_spec::identity::{DeviceKeyPair, SystemKeyPair};
use confab_spec::ids::*;
use futures_util::SinkExt;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use support::{Ws, authenticate, free_port, private_message, recv, start_gateway as start};
use tokio_tungstenite::tungstenite::Message;

const CONV: ConversationId = ConversationId([0x5A; 32]);
const CYCLES: usize = 60;
const SENDS_PER_CYCLE_MAX: u32 = 40;

async fn connect(port: u16) -> Ws {
    for _ in 0..200 {
        if let Ok((ws, _)) =
            tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/v1/ws")).await
        {
            return ws;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("gateway did not come up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_sends_survive_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("gateway.db");
    let port = free_port();
    let system = SystemKeyPair::from_seed(&[7; 32]);
    let key = DeviceKeyPair::from_seed(&[8; 32]);
    let mut rng = ChaCha8Rng::seed_from_u64(0xC4A5);
    let mut acked: HashMap<MsgId, u64> = HashMap::new();
    let mut pending: Vec<MsgId> = Vec::new();
    let mut next_id = 0u32;
    let mut created = false;
    let mut kills = 0;
    for cycle in 0..CYCLES {
        let mut gateway = start(&db, port);
        let mut ws = connect(port).await;
        let origin = format!("ws://127.0.0.1:{port}");
        if authenticate(&mut ws, &origin, &system, &key)
            .await
            .is_none()
        {
            let _ = gateway.kill();
            let _ = gateway.wait();
            continue;
        }
        if !created {
            let create = support::create_room(
                &system,
                &key,
                confab_spec::ids::ProcessId([3; 16]),
                CONV,
                0,
                confab_client::mls::system_clock()(),
            );
            ws.send(Message::Binary(create.encode().into()))
                .await
                .expect("create");
            match recv(&mut ws).await {
                Some(ServerFrame::Created(_)) => created = true,
                Some(ServerFrame::Error(e))
                    if e.code == confab_spec::ErrorCode::ConversationExists =>
                {
                    created = true
                }
                other => panic!("create: {other:?}"),
            }
        }
        // Resend everything unacknowledged first, then new messages; kill at a random point.
        let kill_after = rng.next_u32() % SENDS_PER_CYCLE_MAX;
        let mut queue: Vec<MsgId> = pending.clone();
        for _ in 0..SENDS_PER_CYCLE_MAX {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&next_id.to_be_bytes());
            next_id += 1;
            queue.push(MsgId(id));
        }
        pending = queue.clone();
        for (rid, msg_id) in queue.iter().enumerate() {
            if rid as u32 == kill_after && cycle + 1 < CYCLES {
                break;
            }
            let frame = ClientFrame::Send(Send {
                rid: rid as u64,
                conversation: CONV,
                msg_id: *msg_id,
                payload: private_message(CONV, &msg_id.0),
                welcome: None,
                group_info: None,
            });
            // `sends_per_device` (SPEC.md 11) limits the final burst of resends: wait as
            // told and send again.
            let answer = loop {
                if ws
                    .send(Message::Binary(frame.encode().into()))
                    .await
                    .is_err()
                {
                    break None;
                }
                match recv(&mut ws).await {
                    Some(ServerFrame::Error(e))
                        if e.code == confab_spec::ErrorCode::RateLimited =>
                    {
                        let wait = e.retry_after_ms.unwrap_or(1_000);
                        tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
                    }
                    other => break Some(other),
                }
            };
            let Some(answer) = answer else { break };
            match answer {
                Some(ServerFrame::Accepted(a)) => {
                    if let Some(prev) = acked.insert(a.msg_id, a.seq.get()) {
                        assert_eq!(prev, a.seq.get(), "a msg_id got two seqs");
                    }
                    pending.retain(|m| *m != a.msg_id);
                }
                other => panic!("cycle {cycle}: send answered {other:?}"),
            }
        }
        // Some sends are in flight, unacknowledged, when the process dies.
        if cycle + 1 < CYCLES {
            for msg_id in pending.iter().take(3) {
                let frame = ClientFrame::Send(Send {
                    rid: 999,
                    conversation: CONV,
                    msg_id: *msg_id,
                    payload: private_message(CONV, &msg_id.0),
                    welcome: None,
                    group_info: None,
                });
                let _ = ws.send(Message::Binary(frame.encode().into())).await;
            }
            let _ = gateway.kill(); // SIGKILL
            kills += 1;
        } else {
            // Final check: everything acknowledged is there exactly once, seqs dense.
            ws.send(Message::Binary(
                ClientFrame::Subscribe(Subscribe {
                    rid: 1,
                    stream: StreamId::Conversation(CONV),
                    from_seq: Seq::new(1),
                })
                .encode()
                .into(),
            ))
            .await
            .expect("subscribe");
            let mut log: Vec<(u64, MsgId)> = Vec::new();
            loop {
                match recv(&mut ws).await {
                    Some(ServerFrame::Subscribed(_)) => {}
                    Some(ServerFrame::Batch(b)) => {
                        log.extend(b.entries.iter().map(|e| (e.seq.get(), e.msg_id)));
                        if !b.more {
                            break;
                        }
                        let after_seq = b.entries.last().expect("entries").seq;
                        ws.send(Message::Binary(
                            ClientFrame::Continue(Continue {
                                stream: StreamId::Conversation(CONV),
                                after_seq,
                            })
                            .encode()
                            .into(),
                        ))
                        .await
                        .expect("continue");
                    }
                    other => panic!("replay: {other:?}"),
                }
            }
            for (i, (seq, _)) in log.iter().enumerate() {
                assert_eq!(*seq, i as u64 + 1, "dense seqs");
            }
            let mut seen = HashMap::new();
            for (seq, id) in &log {
                assert!(
                    seen.insert(*id, *seq).is_none(),
                    "msg_id {id:?} stored twice"
                );
            }
            for (id, seq) in &acked {
                assert_eq!(
                    seen.get(id),
                    Some(seq),
                    "acknowledged {id:?} at seq {seq} lost or moved"
                );
            }
            eprintln!(
                "{kills} SIGKILLs, {} acknowledged entries checked, {} entries in the log",
                acked.len(),
                log.len()
            );
            let _ = gateway.kill();
        }
        let _ = gateway.wait();
    }
    assert!(kills >= CYCLES - 2, "the gateway was killed {kills} times");
    assert!(
        acked.len() > 100,
        "only {} sends were acknowledged",
        acked.len()
    );
}
