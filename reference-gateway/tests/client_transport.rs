//! The reference client's transport (`confab_client::transport`) driving the sans-IO client
//! session against the real `confab-gateway` binary: authenticate, create, subscribe and
//! send; then the gateway is killed while the client keeps composing, and restarted. The
//! client must reconnect by itself with backoff, resume its session with its token, resend
//! what was not acknowledged, and see every entry delivered once, in order, gap-free.

mod support;

use std::time::Duration;

use confab_client::transport::{Transport, system_now};
use confab_spec::frame::{ClientFrame, ConversationKind};
use confab_spec::identity::{DeviceKeyPair, SystemKeyPair};
use confab_spec::ids::{ConversationId, MsgId, ProcessId, StreamId, UnixMs};
use confab_spec::session::{ClientSession, DeviceCredentials, Event, Input, SessionConfig};
use support::{free_port, private_message, start_gateway};

const CONV: ConversationId = ConversationId([0x7C; 32]);

/// Runs the transport until `done` says so, collecting events; fails after 30 s.
async fn until(t: &mut Transport, log: &mut Vec<Event>, mut done: impl FnMut(&[Event]) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done(log) {
        match tokio::time::timeout_at(deadline, t.next_event()).await {
            Ok(event) => log.push(event),
            Err(_) => panic!("timed out; events so far: {log:#?}"),
        }
    }
}

fn send(t: &mut Transport, n: u8) {
    t.session()
        .handle(
            system_now(),
            Input::Send {
                conversation: CONV,
                msg_id: MsgId([n; 16]),
                payload: private_message(CONV, &[n; 8]),
                welcome: None,
                group_info: None,
            },
        )
        .expect("queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reconnects_resumes_and_resends_across_a_gateway_kill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("gateway.db");
    let port = free_port();
    let origin = format!("ws://127.0.0.1:{port}");
    let mut gateway = start_gateway(&db, port);

    let system = SystemKeyPair::from_seed(&[41; 32]);
    let key = DeviceKeyPair::from_seed(&[42; 32]);
    let now = system_now();
    let ClientFrame::CreateConversation(create) =
        support::create_room(&system, &key, ProcessId([43; 16]), CONV, 0, now)
    else {
        unreachable!("create_room makes a CreateConversation")
    };
    let certificate = system.issue_certificate(
        ProcessId([43; 16]),
        key.public(),
        UnixMs(now.0 - 60_000),
        now.plus_ms(3_600_000),
    );
    let session = ClientSession::new(
        SessionConfig::new(origin.clone()),
        DeviceCredentials { key, certificate },
        7,
    );
    let mut t = Transport::new(session, format!("{origin}/v1/ws"));
    t.session()
        .handle(system_now(), Input::Start)
        .expect("start");
    let mut log = Vec::new();
    until(&mut t, &mut log, |l| {
        l.iter().any(|e| matches!(e, Event::Ready { .. }))
    })
    .await;

    t.session()
        .handle(
            system_now(),
            Input::CreateConversation {
                conversation: CONV,
                kind: ConversationKind::Room,
                group_info: create.group_info,
            },
        )
        .expect("create");
    until(&mut t, &mut log, |l| {
        l.iter().any(|e| matches!(e, Event::Created { .. }))
    })
    .await;
    t.session()
        .handle(
            system_now(),
            Input::Subscribe {
                stream: StreamId::Conversation(CONV),
                from_seq: None,
            },
        )
        .expect("subscribe");
    until(&mut t, &mut log, |l| {
        l.iter().any(|e| matches!(e, Event::Live { .. }))
    })
    .await;
    for n in 1..=5 {
        send(&mut t, n);
    }
    let delivered = |l: &[Event]| {
        l.iter()
            .filter_map(|e| match e {
                Event::Delivered { entry, .. } => Some((entry.seq.get(), entry.msg_id)),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    until(&mut t, &mut log, |l| delivered(l).len() == 5).await;

    // The gateway dies; the client keeps composing while it is down.
    gateway.kill().expect("kill");
    let _ = gateway.wait();
    until(&mut t, &mut log, |l| {
        l.iter().any(|e| matches!(e, Event::Disconnected { .. }))
    })
    .await;
    for n in 6..=10 {
        send(&mut t, n);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut gateway = start_gateway(&db, port);
    until(&mut t, &mut log, |l| delivered(l).len() == 10).await;

    let ready: Vec<bool> = log
        .iter()
        .filter_map(|e| match e {
            Event::Ready { resumed, .. } => Some(*resumed),
            _ => None,
        })
        .collect();
    assert_eq!(ready.first(), Some(&false));
    assert!(
        ready[1..].contains(&true),
        "the session resumed with its token: {ready:?}"
    );
    let seqs: Vec<u64> = delivered(&log).iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs,
        (1..=10).collect::<Vec<u64>>(),
        "gap-free, once, in order"
    );
    let ids: Vec<u8> = delivered(&log).iter().map(|(_, id)| id.0[0]).collect();
    assert_eq!(ids, (1..=10).collect::<Vec<u8>>(), "each message once");
    let accepted = log
        .iter()
        .filter(|e| matches!(e, Event::SendAccepted { .. }))
        .count();
    assert!(accepted >= 10, "every send was acknowledged");
    let _ = gateway.kill();
    let _ = gateway.wait();
}
