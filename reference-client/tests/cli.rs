//! The `confab` CLI end to end: two identities in two `--home` directories on one machine
//! (one openmls, one mls-rs device) and a real gateway. They exchange a DM; one side is
//! closed while the other writes, the gateway restarts, and the closed side catches up in
//! order with no duplicates. Alice adds a second device from her backup string, it reads
//! what is sent after it joined, and once revoked it is refused. User errors print a
//! sentence, not a backtrace. Presence: one user shares with the other, who watches from a
//! long-running `watch-presence` and sees her come online, lapse, and block him. Consent:
//! a stranger's DM waits as a request until accepted or declined, and a user who lets only
//! its allow list in looks to anyone else like a key nobody holds.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use confab_gateway::handler::GatewayConfig;
use confab_gateway::server;
use confab_gateway::store::sqlite::SqliteStore;

/// A gateway on `addr` in a thread of its own; stops when the sender is dropped or fired.
fn gateway(
    db: &Path,
    addr: SocketAddr,
) -> (
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    gateway_with(db, addr, |_| {})
}

/// [`gateway`] with `configure` applied to its settings.
fn gateway_with(
    db: &Path,
    addr: SocketAddr,
    configure: impl FnOnce(&mut GatewayConfig) + Send + 'static,
) -> (
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let db = db.to_path_buf();
    let (up, is_up) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
            let _ = up.send(());
            let store = SqliteStore::open(&db).expect("store");
            let mut config = GatewayConfig::new(format!("ws://{addr}"));
            configure(&mut config);
            let _ = server::serve(
                listener,
                config,
                store,
                server::Environment::default(),
                async {
                    let _ = stopped.await;
                },
            )
            .await;
        });
    });
    is_up.recv().expect("gateway up");
    (stop, thread)
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn confab(home: &Path, server: &str, args: &[&str]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_confab"))
        .arg("--home")
        .arg(home)
        .args(["--server", server])
        .args(args)
        .output()
        .expect("run confab");
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(home: &Path, server: &str, args: &[&str]) -> String {
    let out = confab(home, server, args);
    assert!(
        out.ok,
        "confab {args:?} failed: {}{}",
        out.stdout, out.stderr
    );
    out.stdout
}

fn user_key(home: &Path, server: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&ok(home, server, &["--json", "whoami"])).expect("json");
    v["user"].as_str().expect("user").to_owned()
}

/// `read --json` as (seq, from, text).
fn read(home: &Path, server: &str) -> Vec<(u64, String, String)> {
    ok(home, server, &["--json", "read"])
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json line");
            (
                v["seq"].as_u64().expect("seq"),
                v["from"].as_str().expect("from").to_owned(),
                v["text"].as_str().expect("text").to_owned(),
            )
        })
        .collect()
}

#[test]
fn two_homes_chat_through_a_gateway_that_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port");
    let server = format!("ws://{addr}/v1/ws");
    let db = dir.path().join("gateway.db");
    let (stop, thread) = gateway(&db, addr);
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));

    assert!(ok(&alice, &server, &["init"]).contains("KeyPackages published"));
    ok(&bob, &server, &["--engine", "mls-rs", "init"]);
    let (ka, kb) = (user_key(&alice, &server), user_key(&bob, &server));
    ok(&alice, &server, &["contacts", "add", "bob", &kb]);
    ok(&bob, &server, &["contacts", "add", "alice", &ka]);
    let dm = ok(&alice, &server, &["dm", "bob"]);
    assert_eq!(dm.trim().len(), 64, "a conversation id: {dm}");
    ok(&alice, &server, &["send", "bob", "hello bob"]);
    assert_eq!(
        read(&bob, &server),
        vec![(2, "alice".into(), "hello bob".into())]
    );
    ok(&bob, &server, &["send", "alice", "hi alice"]);

    // Bob is closed (no process runs for him) while Alice writes; the gateway restarts.
    for text in ["one", "two", "three"] {
        ok(&alice, &server, &["send", "bob", text]);
    }
    let _ = stop.send(());
    thread.join().expect("gateway thread");
    let (stop, thread) = gateway(&db, addr);

    let expected: Vec<(u64, String, String)> = vec![
        (2, "alice".into(), "hello bob".into()),
        (3, "me".into(), "hi alice".into()),
        (4, "alice".into(), "one".into()),
        (5, "alice".into(), "two".into()),
        (6, "alice".into(), "three".into()),
    ];
    assert_eq!(read(&bob, &server), expected, "in order, once each");
    // Reading again changes nothing: no duplicates.
    assert_eq!(read(&bob, &server), expected);
    let alice_view = read(&alice, &server);
    assert_eq!(alice_view.len(), 5);
    assert_eq!(alice_view[1], (3, "bob".into(), "hi alice".into()));
    let status: serde_json::Value =
        serde_json::from_str(&ok(&alice, &server, &["--json", "status"])).expect("json");
    assert_eq!(status["outbox"], 0, "nothing left unsent: {status}");
    assert_eq!(status["connected"], true);

    // README, "Checking who you talk to": both see the same safety number; Bob confirms it.
    let number = |home: &Path, contact: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(&ok(
            home,
            &server,
            &["--json", "contacts", "verify", contact],
        ))
        .expect("json");
        v["safety_number"].as_str().expect("a number").to_owned()
    };
    let shared = number(&alice, "bob");
    assert_eq!(shared, number(&bob, "alice"));
    assert_eq!(shared.split(' ').count(), 12, "{shared}");
    let shown = ok(&bob, &server, &["contacts", "verify", "alice"]);
    assert!(shown.contains("not verified"), "{shown}");
    assert!(shown.contains(&shared[..11]), "{shown}");
    ok(&bob, &server, &["contacts", "verify", "alice", "--confirm"]);
    assert!(ok(&bob, &server, &["contacts", "list"]).contains("\tverified\n"));

    // A second device for Alice: set up from her backup string, added from her first
    // device, it reads what is sent from then on; revoked, it is refused.
    let alice2 = dir.path().join("alice2");
    let backup = ok(&alice, &server, &["export"]);
    assert!(backup.starts_with("polycentric://"), "{backup}");
    let init: serde_json::Value = serde_json::from_str(&ok(
        &alice2,
        &server,
        &[
            "--json",
            "--engine",
            "mls-rs",
            "init",
            "--import",
            backup.trim(),
        ],
    ))
    .expect("json");
    assert_eq!(init["user"].as_str(), Some(ka.as_str()));
    let device = init["device"].as_str().expect("device").to_owned();
    assert!(ok(&alice, &server, &["device", "add", &device]).contains("1 conversations changed"));
    let devices: Vec<serde_json::Value> = ok(&alice, &server, &["--json", "device", "list"])
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(devices.len(), 2, "{devices:?}");
    assert!(devices.iter().any(|d| d["device"] == device.as_str()
        && d["this_device"] == false
        && d["conversations"] == 1));
    assert_eq!(
        read(&alice2, &server),
        vec![],
        "nothing from before it joined"
    );
    // Bob verified Alice with one device: the new one is pointed out until he verifies again.
    let warned = confab(&bob, &server, &["read"]);
    assert!(
        warned
            .stderr
            .contains("alice has 1 device(s) you did not verify"),
        "{}",
        warned.stderr
    );
    let listed = ok(&bob, &server, &["contacts", "list"]);
    assert!(listed.contains("verified, but 1 device since"), "{listed}");
    let verify = ok(&bob, &server, &["contacts", "verify", "alice"]);
    assert!(
        verify.contains(&format!("new since you verified: {}…", &device[..4])),
        "{verify}"
    );
    ok(&bob, &server, &["contacts", "verify", "alice", "--confirm"]);
    assert!(
        !confab(&bob, &server, &["read"])
            .stderr
            .contains("did not verify")
    );
    ok(&bob, &server, &["send", "alice", "to both"]);
    // Contacts are per device; the DM it joined is found by the peer's name.
    ok(&alice2, &server, &["contacts", "add", "bob", &kb]);
    assert_eq!(
        read(&alice2, &server),
        vec![(8, "bob".into(), "to both".into())]
    );
    assert!(read(&alice, &server).contains(&(8, "bob".into(), "to both".into())));
    ok(&alice2, &server, &["send", "bob", "from my laptop"]);
    assert!(read(&bob, &server).contains(&(9, "alice".into(), "from my laptop".into())));
    assert!(read(&alice, &server).contains(&(9, "me".into(), "from my laptop".into())));
    ok(&alice, &server, &["device", "revoke", &device]);
    let out = confab(&alice2, &server, &["read"]);
    assert!(
        !out.ok && out.stderr.contains("auth_certificate_revoked"),
        "{}",
        out.stderr
    );
    let out = confab(&alice, &server, &["device", "add", "abc"]);
    assert!(
        !out.ok && out.stderr.contains("not a device id"),
        "{}",
        out.stderr
    );

    // User errors: one sentence on stderr, exit code 1, no backtrace.
    let nobody = dir.path().join("nobody");
    let out = confab(&nobody, &server, &["read"]);
    assert!(
        !out.ok && out.stderr.contains("confab init"),
        "{}",
        out.stderr
    );
    let out = confab(&alice, &server, &["dm", "carol"]);
    assert!(
        !out.ok && out.stderr.contains("no contact named carol"),
        "{}",
        out.stderr
    );
    let out = confab(&alice, "ws://127.0.0.1:1/v1/ws", &["read"]);
    assert!(
        !out.ok && out.stderr.contains("cannot reach the gateway"),
        "{}",
        out.stderr
    );
    let out = confab(&alice, &server, &["contacts", "add", "x", "nothex"]);
    assert!(
        !out.ok && out.stderr.contains("not a user key"),
        "{}",
        out.stderr
    );
    for out in [
        confab(&nobody, &server, &["read"]),
        confab(&alice, &server, &["dm", "carol"]),
    ] {
        assert!(!out.stderr.contains("panicked") && !out.stderr.contains("backtrace"));
    }
    let _ = stop.send(());
    thread.join().expect("gateway thread");
}

#[test]
fn presence_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let (stop, thread) = gateway_with(&dir.path().join("gw.db"), addr, |c| {
        c.presence.ttl_max_ms = 1_000;
        c.presence.grace_ms = 300;
        c.presence.jitter_ms = 300;
    });
    let server = format!("ws://{addr}/v1/ws");
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    ok(&alice, &server, &["init"]);
    ok(&bob, &server, &["init"]);
    let (ka, kb) = (user_key(&alice, &server), user_key(&bob, &server));
    ok(&alice, &server, &["contacts", "add", "bob", &kb]);
    ok(&bob, &server, &["contacts", "add", "alice", &ka]);
    assert!(ok(&alice, &server, &["presence", "share", "bob"]).contains("shared with  bob"));
    let out = confab(&alice, &server, &["presence", "share", "carol"]);
    assert!(
        !out.ok && out.stderr.contains("neither a contact nor a user key"),
        "{}",
        out.stderr
    );

    // Bob watches from a long-running process; each line is one state.
    let mut watcher = Command::new(env!("CARGO_BIN_EXE_confab"))
        .arg("--home")
        .arg(&bob)
        .args(["--server", &server, "--json", "watch-presence"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("watch-presence");
    let stdout = watcher.stdout.take().expect("stdout");
    let (lines, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let v: serde_json::Value = serde_json::from_str(&line).expect("json line");
            let _ = lines.send((
                v["name"].as_str().unwrap_or_default().to_owned(),
                v["presence"].as_str().unwrap_or_default().to_owned(),
            ));
        }
    });
    let next = || {
        seen.recv_timeout(std::time::Duration::from_secs(20))
            .expect("a presence line within 20 s")
    };
    assert_eq!(next(), ("alice".into(), "longer".into()));
    // A one-shot `presence online` holds a lease the gateway clamps to 1 s: Alice shows
    // online, then the lease lapses and she was seen within the hour.
    let lease: serde_json::Value =
        serde_json::from_str(&ok(&alice, &server, &["--json", "presence", "online"]))
            .expect("json");
    assert_eq!(lease["lease_ms"], 1_000);
    assert_eq!(next(), ("alice".into(), "online".into()));
    assert_eq!(next(), ("alice".into(), "within_hour".into()));
    // Blocked, Bob is told at once that Alice shares nothing with him.
    assert!(ok(&alice, &server, &["presence", "block", "bob"]).contains("blocked      bob"));
    assert_eq!(next(), ("alice".into(), "unavailable".into()));
    let lists: serde_json::Value =
        serde_json::from_str(&ok(&alice, &server, &["--json", "presence", "lists"])).expect("json");
    assert_eq!(lists["blocked"], serde_json::json!(["bob"]));
    let _ = watcher.kill();
    let _ = watcher.wait();
    let _ = stop.send(());
    thread.join().expect("gateway thread");
}

/// A gateway on a free port with three identities initialised against it in `dir`.
struct ThreePeople {
    server: String,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
    /// Alice (openmls), Bob (mls-rs) and Carol (openmls).
    homes: (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf),
    /// Their user keys.
    keys: (String, String, String),
}

fn three_people(dir: &Path) -> ThreePeople {
    let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port");
    let server = format!("ws://{addr}/v1/ws");
    let (stop, thread) = gateway(&dir.join("gateway.db"), addr);
    let (alice, bob, carol) = (dir.join("alice"), dir.join("bob"), dir.join("carol"));
    ok(&alice, &server, &["init"]);
    ok(&bob, &server, &["--engine", "mls-rs", "init"]);
    ok(&carol, &server, &["init"]);
    let keys = (
        user_key(&alice, &server),
        user_key(&bob, &server),
        user_key(&carol, &server),
    );
    ThreePeople {
        server,
        stop,
        thread,
        homes: (alice, bob, carol),
        keys,
    }
}

/// README, "A room with three people": Alice (openmls) creates a room, invites Bob
/// (mls-rs), makes him an admin, he invites Carol (openmls); all three read each other;
/// Carol leaves (Alice's next command commits it) and reads nothing after; a plain member
/// is refused what only admins may do, with a sentence.
#[test]
fn a_room_with_three_people_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ThreePeople {
        server,
        stop,
        thread,
        homes: (alice, bob, carol),
        keys: (ka, kb, kc),
    } = three_people(dir.path());
    for (home, contacts) in [
        (&alice, [("bob", &kb), ("carol", &kc)]),
        (&bob, [("alice", &ka), ("carol", &kc)]),
        (&carol, [("alice", &ka), ("bob", &kb)]),
    ] {
        for (name, key) in contacts {
            ok(home, &server, &["contacts", "add", name, key]);
        }
    }
    let created: serde_json::Value = serde_json::from_str(&ok(
        &alice,
        &server,
        &["--json", "room", "create", "book-club"],
    ))
    .expect("json");
    let id = created["room"].as_str().expect("room id").to_owned();
    ok(&alice, &server, &["room", "invite", "book-club", "bob"]);
    // Bob joined from his Welcome; he names the room by the start of its id.
    let short = &id[..12];
    let refusal = confab(&bob, &server, &["room", "invite", short, "carol"]);
    assert!(!refusal.ok, "a member invited");
    assert!(
        refusal.stderr.contains("rules do not allow") && !refusal.stderr.contains("panicked"),
        "{}",
        refusal.stderr
    );
    ok(&alice, &server, &["room", "promote", "book-club", "bob"]);
    ok(&bob, &server, &["room", "invite", short, "carol"]);
    let members = ok(&carol, &server, &["--json", "room", "members", short]);
    let roles: Vec<(String, String)> = members
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            (
                v["name"].as_str().expect("name").to_owned(),
                v["role"].as_str().expect("role").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        roles,
        vec![
            ("alice".into(), "owner".into()),
            ("bob".into(), "admin".into()),
            ("me".into(), "member".into())
        ]
    );
    ok(&alice, &server, &["send", "book-club", "chapter one?"]);
    ok(&carol, &server, &["send", short, "loved it"]);
    let texts = |home: &Path| -> Vec<String> {
        read(home, &server).into_iter().map(|(_, _, t)| t).collect()
    };
    assert_eq!(texts(&bob), vec!["chapter one?", "loved it"]);
    ok(&carol, &server, &["room", "leave", short]);
    // Alice's next command commits Carol's leave request; then Bob writes.
    let listed = ok(&alice, &server, &["--json", "room", "list"]);
    let list: serde_json::Value = serde_json::from_str(listed.trim()).expect("json");
    assert_eq!(list["members"], 2, "carol is out: {listed}");
    assert_eq!(list["role"], "owner");
    ok(&bob, &server, &["send", short, "bye carol"]);
    assert_eq!(texts(&carol), vec!["chapter one?", "loved it"]);
    assert_eq!(texts(&alice), vec!["chapter one?", "loved it", "bye carol"]);
    let _ = stop.send(());
    thread.join().expect("gateway thread");
}

/// README, "Who may invite you": Bob never added Alice, so her DM waits as a request:
/// `read` shows nothing of it and says a request waits; `accept` joins and shows what she
/// sent meanwhile. With `invites allowed`, Carol (not on his list) cannot start a DM at
/// all; once allowed she can, and Bob declines her request, which leaves nothing.
#[test]
fn strangers_invitations_wait_as_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ThreePeople {
        server,
        stop,
        thread,
        homes: (alice, bob, carol),
        keys: (ka, kb, kc),
    } = three_people(dir.path());
    ok(&alice, &server, &["contacts", "add", "bob", &kb]);
    ok(&carol, &server, &["contacts", "add", "bob", &kb]);
    let dm = ok(&alice, &server, &["dm", "bob"]).trim().to_owned();
    ok(&alice, &server, &["send", "bob", "hello stranger"]);

    // Nothing joined: the read shows nothing and says a request waits.
    let before = confab(&bob, &server, &["read"]);
    assert!(before.ok, "{}{}", before.stdout, before.stderr);
    assert!(
        !before.stdout.contains("hello stranger"),
        "{}",
        before.stdout
    );
    assert!(
        before.stderr.contains("1 invitation request"),
        "{}",
        before.stderr
    );
    let listed: Vec<serde_json::Value> = ok(&bob, &server, &["--json", "requests"])
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["conversation"], dm.as_str());
    assert_eq!(listed[0]["from"], ka.as_str());
    let accepted = ok(&bob, &server, &["accept", &dm[..10]]);
    assert!(accepted.contains("joined the DM"), "{accepted}");
    let texts: Vec<String> = read(&bob, &server).into_iter().map(|m| m.2).collect();
    assert_eq!(texts, vec!["hello stranger".to_owned()]);
    assert!(ok(&bob, &server, &["requests"]).contains("no invitation requests"));

    // A message cannot forge a line of another, nor reach the terminal raw.
    ok(
        &alice,
        &server,
        &["send", "bob", "line one\n[99] carol: forged\x1b[31m"],
    );
    let shown = ok(&bob, &server, &["read"]);
    assert!(
        shown
            .lines()
            .any(|l| l == "    [99] carol: forged\\x1b[31m"),
        "{shown}"
    );
    assert!(!shown.lines().any(|l| l.starts_with("[99]")), "{shown}");
    assert!(!shown.contains('\x1b'), "{shown}");

    // Only the allow list may invite Bob; Carol is off it and sees no KeyPackages.
    let settings = ok(&bob, &server, &["--json", "invites", "allowed"]);
    assert!(settings.contains("\"policy\":\"allowed\""), "{settings}");
    let refused = confab(&carol, &server, &["dm", "bob"]);
    assert!(!refused.ok);
    assert!(
        refused.stderr.contains("no KeyPackages"),
        "{}",
        refused.stderr
    );
    ok(&bob, &server, &["invites", "allow", &kc]);
    let shown = ok(&bob, &server, &["--json", "invites", "show"]);
    assert!(shown.contains(&kc[..12]), "{shown}");
    let carols = ok(&carol, &server, &["dm", "bob"]).trim().to_owned();
    ok(&carol, &server, &["send", "bob", "hi from carol"]);
    ok(&bob, &server, &["read"]);
    let declined = ok(&bob, &server, &["decline", &carols[..10]]);
    assert!(declined.contains("nobody is told"), "{declined}");
    assert!(ok(&bob, &server, &["requests"]).contains("no invitation requests"));
    let after = confab(&bob, &server, &["read"]);
    assert!(!after.stdout.contains("hi from carol"), "{}", after.stdout);
    assert!(
        !after.stderr.contains("invitation request"),
        "{}",
        after.stderr
    );
    let usage = confab(&bob, &server, &["accept", &carols[..10]]);
    assert!(!usage.ok);
    assert!(
        usage.stderr.contains("no invitation request"),
        "{}",
        usage.stderr
    );
    let _ = stop.send(());
    thread.join().expect("gateway thread");
}

/// README, "A second device": a linked device gets its certificate from Alice's first
/// device and never holds her secret user key: it reads and sends in her DM once added,
/// and cannot export the identity, certify devices or revoke them. A certificate made for
/// another device's request is refused.
#[test]
fn a_linked_device_never_holds_the_system_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ThreePeople {
        server,
        stop,
        thread,
        homes: (alice, bob, _),
        keys: (ka, kb, _),
    } = three_people(dir.path());
    ok(&alice, &server, &["contacts", "add", "bob", &kb]);
    ok(&bob, &server, &["contacts", "add", "alice", &ka]);
    ok(&alice, &server, &["dm", "bob"]);
    ok(&alice, &server, &["send", "bob", "before the phone"]);

    let phone = dir.path().join("alice-phone");
    let json = |text: String| -> serde_json::Value { serde_json::from_str(&text).expect("json") };
    let request = json(ok(
        &phone,
        &server,
        &["--json", "--engine", "mls-rs", "init", "--link"],
    ));
    let waiting = confab(&phone, &server, &["whoami"]);
    assert!(
        !waiting.ok && waiting.stderr.contains("waits for its certificate"),
        "{}",
        waiting.stderr
    );
    // Shown again, the same request.
    assert_eq!(
        json(ok(&phone, &server, &["--json", "link"]))["request"],
        request["request"]
    );
    let issued = json(ok(
        &alice,
        &server,
        &[
            "--json",
            "device",
            "link",
            request["request"].as_str().expect("request"),
        ],
    ));
    assert_eq!(
        issued["check_code"], request["check_code"],
        "both show one code"
    );
    let linked = json(ok(
        &phone,
        &server,
        &[
            "--json",
            "link",
            issued["certificate"].as_str().expect("certificate"),
        ],
    ));
    assert_eq!(linked["user"].as_str(), Some(ka.as_str()));
    let device = linked["device"].as_str().expect("device").to_owned();
    assert_eq!(request["device"].as_str(), Some(device.as_str()));
    ok(&alice, &server, &["device", "add", &device]);
    ok(
        &bob,
        &server,
        &["send", "alice", "to both of alice's devices"],
    );
    ok(&phone, &server, &["contacts", "add", "bob", &kb]);
    let texts: Vec<String> = read(&phone, &server).into_iter().map(|m| m.2).collect();
    assert_eq!(texts, vec!["to both of alice's devices".to_owned()]);
    ok(&phone, &server, &["send", "bob", "from the phone"]);
    assert!(read(&bob, &server).contains(&(5, "alice".into(), "from the phone".into())));

    // The phone holds no system key: no export, no certificates, no revocations.
    let conn = rusqlite::Connection::open(phone.join("confab.db")).expect("open");
    let seedless: bool = conn
        .query_row("SELECT system_seed IS NULL FROM identity", [], |r| r.get(0))
        .expect("identity");
    assert!(seedless, "the linked device stores no system key");
    let other = dir.path().join("other");
    let other_request = json(ok(&other, &server, &["--json", "init", "--link"]));
    let alice_device = json(ok(&alice, &server, &["--json", "whoami"]))["device"]
        .as_str()
        .expect("device")
        .to_owned();
    for args in [
        vec!["export"],
        vec![
            "device",
            "link",
            other_request["request"].as_str().expect("request"),
        ],
        vec!["device", "revoke", alice_device.as_str()],
    ] {
        let out = confab(&phone, &server, &args);
        assert!(
            !out.ok && out.stderr.contains("does not hold the user's secret key"),
            "{args:?}: {}",
            out.stderr
        );
    }
    // A certificate for the phone's request is not one for another device.
    let out = confab(
        &other,
        &server,
        &["link", issued["certificate"].as_str().expect("certificate")],
    );
    assert!(
        !out.ok && out.stderr.contains("for another device"),
        "{}",
        out.stderr
    );
    let _ = stop.send(());
    thread.join().expect("gateway thread");
}

/// A copy of a home directory used beside the original (issue "hostile gateway"): the copy
/// sends from the original's MLS state. Nothing is lost silently and the original
/// recovers: before its own send, the original sees a message in its name that it did not
/// send, says a copy of its files is in use, and resyncs (SPEC.md 7.10), so its message is
/// sent with new keys and Bob reads it (flagged out of order: the copy used its number).
/// The copy's leaf is gone with the resync: it can no longer send there.
#[test]
fn a_copied_home_is_reported_and_the_original_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ThreePeople {
        server,
        stop,
        thread,
        homes: (alice, bob, _),
        keys: (ka, kb, _),
    } = three_people(dir.path());
    ok(&alice, &server, &["contacts", "add", "bob", &kb]);
    ok(&bob, &server, &["contacts", "add", "alice", &ka]);
    ok(&alice, &server, &["dm", "bob"]);
    ok(&alice, &server, &["send", "bob", "before the copy"]);
    let copy = dir.path().join("alice-copy");
    std::fs::create_dir(&copy).expect("mkdir");
    for entry in std::fs::read_dir(&alice).expect("read_dir") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, copy.join(path.file_name().expect("name"))).expect("copy");
    }
    ok(&copy, &server, &["send", "bob", "from the copy"]);
    ok(&alice, &server, &["send", "bob", "from the original"]);
    let lines = |home: &Path| -> Vec<serde_json::Value> {
        ok(home, &server, &["--json", "read"])
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect()
    };
    let at_bob = lines(&bob);
    let texts: Vec<&str> = at_bob.iter().filter_map(|v| v["text"].as_str()).collect();
    assert_eq!(
        texts,
        vec!["before the copy", "from the copy", "from the original"],
        "{at_bob:?}"
    );
    assert!(
        at_bob
            .iter()
            .any(|v| v["text"] == "from the original" && v["out_of_order"] == true),
        "the copy used the original's number: {at_bob:?}"
    );
    let at_alice = lines(&alice);
    assert!(
        at_alice.iter().any(|v| v["unreadable"]
            .as_str()
            .is_some_and(|r| r.contains("a copy of this device's files is in use"))),
        "{at_alice:?}"
    );
    let status = ok(&alice, &server, &["--json", "status"]);
    let status: serde_json::Value = serde_json::from_str(&status).expect("json");
    assert_eq!(status["resynced"], 1, "{status}");
    let again = confab(&copy, &server, &["send", "bob", "again from the copy"]);
    assert!(!again.ok, "the copy's leaf was replaced: {}", again.stdout);
    let _ = stop.send(());
    thread.join().expect("gateway thread");
}
