//! The suite against the reference gateway in this process: with one deliberately broken
//! behaviour at a time, a case of the broken requirement fails; the command line lists the
//! cases, runs a selection, writes the three reports and exits 0; and the index check:
//! every case names a requirement of SPEC.md's index, and every MUST of the index has a
//! case or is on the list of requirements still waiting for one.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use confab_conformance::case::{Level, Outcome};
use confab_conformance::cases;
use confab_conformance::control::{Action, Hook, ServerControl};
use confab_conformance::runner::{self, Access, Selection};
use confab_gateway::config::FileConfig;
use confab_gateway::faults::Faults;
use confab_gateway::handler::GatewayConfig;
use confab_gateway::server;
use confab_gateway::store::sqlite::SqliteStore;
use confab_spec::requirements::{SPEC_MD, requirements};
use tokio::sync::oneshot;

/// A gateway with the conformance profile and deliberately broken behaviours (`faults`)
/// switched on, on a loopback port, in a thread of its own that the suite can stop, kill and
/// start again ([`InProcessGateway::control`]). (The suite against the unbroken gateway, as
/// a process of its own, is the gateway's test `conformance_suite`.)
struct InProcessGateway {
    url: String,
    shared: Arc<Mutex<Instance>>,
}

/// What a start needs, and the running gateway's thread.
struct Instance {
    addr: std::net::SocketAddr,
    db: std::path::PathBuf,
    faults: Faults,
    running: Option<Running>,
}

/// A gateway thread: a graceful stop, a kill, and the thread to join.
struct Running {
    stop: oneshot::Sender<()>,
    kill: oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Instance {
    /// Starts the gateway thread; it has bound its port when this returns.
    fn start(&mut self) -> Result<(), String> {
        if self.running.is_some() {
            return Err("already running".into());
        }
        let listener = std::net::TcpListener::bind(self.addr).map_err(|e| e.to_string())?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let (stop, stopped) = oneshot::channel::<()>();
        let (kill, killed) = oneshot::channel::<()>();
        let (addr, db, faults) = (self.addr, self.db.clone(), self.faults);
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                // The documented conformance profile, as operators would run it.
                let mut config = GatewayConfig::new(format!("ws://{addr}"));
                FileConfig::parse(include_str!("../../reference-gateway/conformance.toml"))
                    .and_then(|profile| profile.apply(&mut config))
                    .expect("the conformance profile");
                config.faults = faults;
                let serve = server::serve(
                    listener,
                    config,
                    SqliteStore::open(&db).expect("store"),
                    server::Environment::default(),
                    async {
                        let _ = stopped.await;
                    },
                );
                tokio::select! {
                    _ = serve => {}
                    // A kill: `serve` is dropped here and every task of the runtime with it,
                    // mid-flight, as in a crash (nothing is flushed that was not already).
                    _ = killed => {}
                }
            });
        });
        self.running = Some(Running { stop, kill, thread });
        Ok(())
    }

    /// Ends the gateway thread, gracefully or by a kill, and waits for it.
    fn end(&mut self, graceful: bool) -> Result<(), String> {
        let running = self.running.take().ok_or("not running")?;
        let _ = if graceful {
            running.stop.send(())
        } else {
            running.kill.send(())
        };
        running
            .thread
            .join()
            .map_err(|_| "the gateway thread panicked".to_owned())
    }
}

impl InProcessGateway {
    fn start(dir: &std::path::Path, faults: Faults) -> Self {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let mut instance = Instance {
            addr,
            db: dir.join("gw.db"),
            faults,
            running: None,
        };
        instance.start().expect("the gateway starts");
        Self {
            url: format!("ws://{addr}/v1/ws"),
            shared: Arc::new(Mutex::new(instance)),
        }
    }

    /// Stop, kill and start for the suite's shutdown and crash cases.
    fn control(&self) -> ServerControl {
        let hook = |what: fn(&mut Instance) -> Result<(), String>| {
            let shared = self.shared.clone();
            let hook: Hook = Arc::new(move || {
                let shared = shared.clone();
                Box::pin(async move {
                    tokio::task::spawn_blocking(move || match shared.lock() {
                        Ok(mut instance) => what(&mut instance),
                        Err(_) => Err("poisoned".into()),
                    })
                    .await
                    .map_err(|e| e.to_string())?
                })
            });
            Some(Action::Hook(hook))
        };
        ServerControl {
            stop: hook(|i| i.end(true)),
            kill: hook(|i| i.end(false)),
            start: hook(Instance::start),
        }
    }
}

impl Drop for InProcessGateway {
    fn drop(&mut self) {
        if let Ok(mut instance) = self.shared.lock() {
            let _ = instance.end(true);
        }
    }
}

/// The suite has teeth: against a gateway with one deliberately broken behaviour at a
/// time, at least one MUST case fails, and the broken requirement is among the failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_broken_behaviour_fails_a_case() {
    let broken = [
        ("no_msg_id_dedup", "REQ-6.3-2"),
        ("skip_seq_on_replay", "REQ-6.4-1"),
        ("two_commits_per_epoch", "REQ-7.3-1"),
        ("no_token_rotation", "REQ-5.5-2"),
        ("accept_expired_certificate", "REQ-5.4-1"),
        ("accept_any_nonce", "REQ-5.4-3"),
        ("double_claim", "REQ-8-2"),
        ("no_frame_size_limit", "REQ-4.4-2"),
        ("deliver_twice", "REQ-6.4-4"),
        ("presence_to_everyone", "REQ-9.2-1"),
        ("no_presence_target_limit", "REQ-9.5-1"),
        ("no_room_rules", "REQ-10-4"),
        ("no_handshake_verification", "REQ-7.7-2"),
        ("no_group_info_check", "REQ-6.1-3"),
        ("no_welcome_check", "REQ-7.5-3"),
        ("stale_group_state", "REQ-7.7-1"),
        ("no_claim_pair_limit", "REQ-8-10"),
        ("no_connection_hygiene", "REQ-11-3"),
        ("no_storage_quotas", "REQ-11-4"),
        ("reuse_keeps_sessions", "REQ-5.5-10"),
        ("session_outlives_certificate", "REQ-5.5-11"),
        ("joiner_reads_history", "REQ-7.6-4"),
        ("no_invite_consent", "REQ-10-9"),
        ("refused_claim_consumes", "REQ-8-13"),
        ("disallow_ignored", "REQ-8-11"),
        ("invite_list_unbounded", "REQ-8-12"),
        ("invites_count_toward_rooms", "REQ-10-8"),
        ("no_commit_group_info_check", "REQ-7.10-2"),
        ("group_info_not_kept", "REQ-7.10-3"),
        ("group_info_to_anyone", "REQ-7.10-4"),
        ("refuse_resyncs", "REQ-7.10-5"),
        // Seen only by killing the server: the suite is given control of it.
        ("ack_before_durable", "REQ-6.3-1"),
    ];
    assert_eq!(broken.len(), Faults::NAMES.len(), "every switch is tried");
    // One gateway per switch, all runs at once: most of a failing case's time is waiting.
    let runs = broken.map(|(name, requirement)| async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let faults = Faults::only(name).expect("a switch");
        let gateway = InProcessGateway::start(dir.path(), faults);
        let access = Access {
            server_log: None,
            control: gateway.control(),
            client: None,
        };
        let run = runner::run(&gateway.url, &Selection::musts(), &access, |_, _, _| {})
            .await
            .expect("the suite reads /v1/info");
        // Its graceful stop joins a thread: not on the runtime's workers.
        let _ = tokio::task::spawn_blocking(move || drop(gateway)).await;
        (name, requirement, run)
    });
    for (name, requirement, run) in futures_util::future::join_all(runs).await {
        let failed: Vec<&str> = run
            .cases
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Failed(_)))
            .map(|c| c.requirement.as_str())
            .collect();
        assert!(runner::must_failed(&run), "{name}: no MUST case failed");
        assert!(
            failed.contains(&requirement),
            "{name}: {requirement} not among the failed {failed:?}"
        );
    }
}

#[test]
fn the_command_line_lists_runs_and_reports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = InProcessGateway::start(dir.path(), Faults::default());
    let url = gateway.url.clone();
    let bin = env!("CARGO_BIN_EXE_confab-conformance");

    let list = std::process::Command::new(bin)
        .arg("--list")
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(list.status.success());
    assert_eq!(text.lines().count(), cases::all().len());
    assert!(text.lines().any(|l| l.starts_with("6.3-2.duplicate-send")
        && l.contains("REQ-6.3-2")
        && l.contains("MUST")));

    let reports = dir.path().join("reports");
    let out = std::process::Command::new(bin)
        .args(["--url", &url, "--cases", "6.[23]-*", "--report-dir"])
        .arg(&reports)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    // 6.3-1's crash case needs control of the server, which this run does not give.
    assert_eq!(last, "4 passed, 0 failed, 1 skipped", "{stdout}");
    assert!(
        stdout.contains("skipped 6.3-1.acknowledged-survives-crash: needs control of the server: run with --kill-command and --start-command"),
        "{stdout}"
    );
    assert!(stderr.contains("[  1/5]"), "progress: {stderr}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reports.join("report.json")).expect("json"))
            .expect("valid json");
    let first = &json["cases"][0];
    assert_eq!(first["outcome"], "passed");
    assert!(
        first["transcript"]
            .as_array()
            .is_some_and(|t| !t.is_empty())
    );
    let junit = std::fs::read_to_string(reports.join("junit.xml")).expect("junit");
    assert_eq!(junit.matches("<testcase").count(), 5, "{junit}");
    let html = std::fs::read_to_string(reports.join("index.html")).expect("html");
    assert!(html.contains("6.2-1.dense-seqs") && html.contains("#62-streams-and-sequence-numbers"));

    // A server that is not there: a clear error, non-zero exit.
    let out = std::process::Command::new(bin)
        .args(["--url", "ws://127.0.0.1:1/v1/ws"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/v1/info"));
}

/// MUSTs of SPEC.md's index that have no case yet. Each entry is removed when its case
/// lands; the test fails if a listed requirement gets a case (so the list only shrinks)
/// or if a new MUST has neither a case nor an entry here.
const WAITING_FOR_A_CASE: &[&str] = &[];

#[test]
fn cases_cover_the_requirement_index() {
    let index: BTreeSet<String> = requirements(SPEC_MD).into_iter().map(|r| r.id).collect();
    let all = cases::all();
    for case in &all {
        assert!(
            index.contains(case.requirement),
            "{} names {}, which SPEC.md does not have",
            case.id,
            case.requirement
        );
        assert!(
            case.id.starts_with(&case.requirement["REQ-".len()..]),
            "{} is not numbered after {}",
            case.id,
            case.requirement
        );
    }
    let ids: BTreeSet<&str> = all.iter().map(|c| c.id).collect();
    assert_eq!(ids.len(), all.len(), "case ids are unique");
    let covered: BTreeSet<String> = all
        .iter()
        .filter(|c| c.level == Level::Must)
        .map(|c| c.requirement.to_owned())
        .collect();
    let waiting: BTreeSet<String> = WAITING_FOR_A_CASE.iter().map(|s| (*s).to_owned()).collect();
    let both: Vec<&String> = covered.intersection(&waiting).collect();
    assert!(
        both.is_empty(),
        "these have cases now; take them off WAITING_FOR_A_CASE: {both:?}"
    );
    let missing: Vec<&String> = index
        .difference(&covered)
        .filter(|r| !waiting.contains(*r))
        .collect();
    assert!(missing.is_empty(), "MUSTs with no case: {missing:?}");
}
