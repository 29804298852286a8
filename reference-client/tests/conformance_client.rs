//! The conformance suite in client mode (`confab-conformance --client-command`) against the
//! `confab` CLI, once per MLS engine: the suite's proxy stands between the CLI and a
//! reference gateway (on the conformance profile, its origin set to the proxy's), and every
//! client case must pass with none skipped. The reports are kept in
//! `target/tmp/conformance-client-ENGINE/`.

use std::net::SocketAddr;
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

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// Runs every client case against the CLI on `engine`; returns the cases that did not pass.
async fn run_against_the_cli(engine: &str) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let proxy = free_addr();
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
                "'{}' --home {{home}} --server {{url}} --engine {engine} {{action}}",
                env!("CARGO_BIN_EXE_confab")
            ),
            listen: proxy,
        }),
        ..Access::default()
    };
    let selection = Selection {
        pattern: None,
        strict: true,
    };
    let run = runner::run(&url, &selection, &access, |_, _, _| {})
        .await
        .unwrap_or_else(|e| panic!("{engine}: the run did not start: {e}"));
    let reports =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("conformance-client-{engine}"));
    confab_conformance::report::write(&reports, &run).expect("the reports");
    drop(stop);
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
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
