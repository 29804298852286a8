//! The conformance suite in client mode (`confab-conformance --client-command`) against the
//! `confab` CLI, once per MLS engine: the suite's proxy stands between the CLI and a
//! reference gateway (on the conformance profile, its origin set to the proxy's), and every
//! client case must pass with none skipped. The reports are kept in
//! `target/tmp/conformance-client-ENGINE/`.
//!
//! And the suite's teeth in client mode: the CLI with one deliberately broken behaviour
//! switched on (the example `confab_with_faults`) fails the case of the requirement it
//! breaks, on both engines.

use std::path::Path;

use confab_conformance::case::{Outcome, Target};
use confab_conformance::cases;
use confab_conformance::runner::{self, Access, ClientMode, Selection};
use confab_gateway::config::FileConfig;
use confab_gateway::handler::GatewayConfig;
use confab_gateway::server;
use confab_gateway::store::sqlite::SqliteStore;

/// A gateway on `listener` whose origin is `origin`, in a thread of its own; stops when the
/// sender is dropped.
fn gateway(
    db: &Path,
    listener: std::net::TcpListener,
    origin: String,
) -> (
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let db = db.to_path_buf();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async move {
            listener.set_nonblocking(true).expect("nonblocking");
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let mut config = GatewayConfig::new(origin);
            FileConfig::parse(include_str!("../../reference-gateway/conformance.toml"))
                .and_then(|profile| profile.apply(&mut config))
                .expect("the conformance profile");
            let _ = server::serve(
                listener,
                config,
                SqliteStore::open(&db).expect("store"),
                server::Environment::default(),
                async {
                    let _ = stopped.await;
                },
            )
            .await;
        });
    });
    (stop, thread)
}

/// Runs the client cases `pattern` selects (every one when `None`) against the command
/// `program` (the CLI, or the CLI with a fault) on `engine`, with a gateway of its own.
async fn run_client_cases(
    program: &str,
    engine: &str,
    pattern: Option<&str>,
) -> confab_conformance::report::RunReport {
    let dir = tempfile::tempdir().expect("tempdir");
    // The proxy's port, held from now on: the gateway's origin names it.
    let proxy_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
    let proxy = proxy_listener.local_addr().expect("addr");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("ws://{}/v1/ws", listener.local_addr().expect("addr"));
    let (stop, thread) = gateway(
        &dir.path().join("gateway.db"),
        listener,
        format!("ws://{proxy}"),
    );
    let access = Access {
        client: Some(ClientMode {
            template: format!(
                "{program} --home {{home}} --server {{url}} --engine {engine} {{action}}"
            ),
            listen: proxy,
            bound: Some(std::sync::Arc::new(proxy_listener)),
        }),
        ..Access::default()
    };
    let selection = Selection {
        pattern: pattern.map(|p| glob::Pattern::new(p).expect("a glob")),
        strict: true,
    };
    let run = runner::run(&url, &selection, &access, |_, _, _| {})
        .await
        .unwrap_or_else(|e| panic!("{engine} {program}: the run did not start: {e}"));
    drop(stop);
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    run
}

/// Runs every client case against the CLI on `engine`; returns the cases that did not pass.
async fn run_against_the_cli(engine: &str) -> Vec<String> {
    let program = format!("'{}'", env!("CARGO_BIN_EXE_confab"));
    let run = run_client_cases(&program, engine, None).await;
    let reports =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("conformance-client-{engine}"));
    confab_conformance::report::write(&reports, &run).expect("the reports");
    let expected = cases::all()
        .iter()
        .filter(|c| c.target == Target::Client)
        .count();
    assert_eq!(
        run.cases.len(),
        expected,
        "{engine}: every client case runs, and only those"
    );
    run.cases
        .iter()
        .filter(|c| !matches!(c.outcome, Outcome::Passed))
        .map(|c| {
            let transcript: Vec<String> = c
                .transcript
                .iter()
                .map(|r| format!("  {:>5} ms {} {} {}", r.at_ms, r.peer, r.direction, r.frame))
                .collect();
            format!(
                "{engine}: {} {:?}\n{}",
                c.id,
                c.outcome,
                transcript.join("\n")
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_case_passes_against_the_cli_on_both_engines() {
    let (openmls, mls_rs) = tokio::join!(
        run_against_the_cli("openmls"),
        run_against_the_cli("mls-rs")
    );
    let not_passed: Vec<String> = openmls.into_iter().chain(mls_rs).collect();
    assert!(
        not_passed.is_empty(),
        "client cases that did not pass:\n{}",
        not_passed.join("\n")
    );
}

/// The example `confab_with_faults`, built beside the `confab` binary (cargo builds a
/// package's examples with its tests).
fn faulty_cli() -> std::path::PathBuf {
    let confab = Path::new(env!("CARGO_BIN_EXE_confab"));
    let example = confab
        .parent()
        .expect("the binaries' directory")
        .join("examples")
        .join(format!(
            "confab_with_faults{}",
            std::env::consts::EXE_SUFFIX
        ));
    assert!(
        example.is_file(),
        "{} is missing: build it with `cargo build -p confab-client --example confab_with_faults` \
         (a test run of the whole package builds it)",
        example.display()
    );
    example
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_broken_client_behaviour_fails_its_case() {
    use confab_client::faults::Faults;

    let broken = [
        ("no_heartbeat", "REQ-5.6-1"),
        ("no_backoff", "REQ-5.8-1"),
        ("ignore_retry_after", "REQ-5.8-2"),
        ("reconnect_after_fatal_close", "REQ-5.7-1"),
        ("keep_first_resume_token", "REQ-5.5-8"),
        ("new_msg_id_on_resend", "REQ-6.3-4"),
        ("device_key_is_system_key", "REQ-3.4-1"),
        ("counter_msg_ids", "REQ-4.6-1"),
        ("merge_before_accepted", "REQ-7.4-1"),
        ("stop_at_unreadable", "REQ-6.8-5"),
        ("send_after_fork", "REQ-7.7-5"),
        ("trust_gateway_sender", "REQ-7.8-1"),
        ("trust_gateway_proposals", "REQ-7.8-2"),
        ("accept_rule_breaking_commits", "REQ-7.8-3"),
        ("unnumbered_messages", "REQ-7.9-1"),
        ("ignore_missing_messages", "REQ-7.9-2"),
        ("reuse_decrypted_payloads", "REQ-6.8-5"),
        ("no_group_info", "REQ-7.10-1"),
        ("no_resync", "REQ-7.10-6"),
    ];
    assert_eq!(broken.len(), Faults::NAMES.len(), "every switch is tried");
    let example = faulty_cli();
    // Every switch on both engines, one engine after the other; within an engine, all
    // switches at once (most of a failing case's time is waiting).
    for engine in ["openmls", "mls-rs"] {
        let runs = broken.map(|(name, requirement)| {
            let program = format!("'{}' {name}", example.display());
            async move {
                let pattern = format!("{}.*", &requirement["REQ-".len()..]);
                let run = run_client_cases(&program, engine, Some(&pattern)).await;
                (name, requirement, run)
            }
        });
        for (name, requirement, run) in futures_util::future::join_all(runs).await {
            assert!(
                !run.cases.is_empty(),
                "{engine} {name}: no client case of {requirement}"
            );
            let failed: Vec<&str> = run
                .cases
                .iter()
                .filter(|c| matches!(c.outcome, Outcome::Failed(_)))
                .map(|c| c.id.as_str())
                .collect();
            assert!(
                !failed.is_empty(),
                "{engine} {name}: no case of {requirement} failed: {:?}",
                run.cases
                    .iter()
                    .map(|c| (&c.id, &c.outcome))
                    .collect::<Vec<_>>()
            );
        }
    }
}
