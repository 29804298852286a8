//! The conformance suite (`confab-conformance`, with `--strict`) against the real
//! `confab-gateway` binary on the documented conformance profile, as an operator runs it:
//! every case passes and none is skipped. The suite reads the gateway's log (the log
//! cases) and stops, kills and restarts it through the same kind of shell commands an
//! implementer passes to `--stop-command`, `--kill-command` and `--start-command` (the
//! shutdown and crash cases). The reports are kept in `target/tmp/conformance/`.

use std::path::{Path, PathBuf};

use confab_conformance::case::{Outcome, Target};
use confab_conformance::cases;
use confab_conformance::control::{Action, ServerControl};
use confab_conformance::runner::{self, Access, Selection};

mod support;

use support::free_port;

/// Starts, stops and kills one gateway process through `control.sh` in `dir`, which keeps
/// the process id in `gateway.pid`; kills it when dropped.
struct GatewayProcess {
    script: PathBuf,
}

impl GatewayProcess {
    /// Writes the control script for a gateway on `port` with its database, log and pid
    /// file in `dir`.
    fn new(dir: &Path, port: u16) -> Self {
        let profile = Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance.toml");
        let script = dir.join("control.sh");
        // `gone` also counts a zombie as gone: once `sh` has exited, the gateway is reaped
        // by whichever process adopts it, which may not be at once.
        let text = format!(
            r#"set -eu
dir='{dir}'
gone() {{
  state=$(awk '{{print $3}}' "/proc/$1/stat" 2>/dev/null || true)
  [ -z "$state" ] || [ "$state" = Z ]
}}
wait_gone() {{
  while ! gone "$1"; do sleep 0.02; done
}}
case "$1" in
  start)
    RUST_LOG=confab_gateway=trace,warn '{bin}' serve --config '{profile}' \
      --listen 127.0.0.1:{port} --db "$dir/gateway.db" >> "$dir/gateway.log" 2>&1 &
    echo $! > "$dir/gateway.pid" ;;
  stop)
    pid=$(cat "$dir/gateway.pid"); kill -TERM "$pid"; wait_gone "$pid" ;;
  kill)
    pid=$(cat "$dir/gateway.pid"); kill -KILL "$pid"; wait_gone "$pid" ;;
esac
"#,
            dir = dir.display(),
            bin = env!("CARGO_BIN_EXE_confab-gateway"),
            profile = profile.display(),
        );
        std::fs::write(&script, text).expect("control script");
        Self { script }
    }

    /// The shell command for `action` (`start`, `stop` or `kill`).
    fn command(&self, action: &str) -> String {
        format!("sh '{}' {action}", self.script.display())
    }

    fn control(&self) -> ServerControl {
        ServerControl {
            stop: Some(Action::Shell(self.command("stop"))),
            kill: Some(Action::Shell(self.command("kill"))),
            start: Some(Action::Shell(self.command("start"))),
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg(self.command("kill"))
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_passes_against_the_gateway_binary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let gateway = GatewayProcess::new(dir.path(), port);
    let control = gateway.control();
    let url = format!("ws://127.0.0.1:{port}/v1/ws");
    control
        .start_and_wait(&url)
        .await
        .unwrap_or_else(|e| panic!("the gateway did not start: {e:?}"));
    let access = Access {
        server_log: Some(dir.path().join("gateway.log")),
        control,
        client: None,
    };
    let selection = Selection {
        pattern: None,
        strict: true,
    };
    let run = runner::run(&url, &selection, &access, |_, _, _| {})
        .await
        .expect("the suite reads /v1/info");
    let reports = Path::new(env!("CARGO_TARGET_TMPDIR")).join("conformance");
    confab_conformance::report::write(&reports, &run).expect("the reports");
    let not_passed: Vec<String> = run
        .cases
        .iter()
        .filter(|c| !matches!(c.outcome, Outcome::Passed))
        .map(|c| {
            let transcript: Vec<String> = c
                .transcript
                .iter()
                .map(|r| format!("  {:>5} ms {} {} {}", r.at_ms, r.peer, r.direction, r.frame))
                .collect();
            format!("{} {:?}\n{}", c.id, c.outcome, transcript.join("\n"))
        })
        .collect();
    assert!(
        not_passed.is_empty(),
        "{}\n(reports in {})",
        not_passed.join("\n"),
        reports.display()
    );
    let server_cases = cases::all()
        .iter()
        .filter(|c| c.target == Target::Server)
        .count();
    assert_eq!(
        run.cases.len(),
        server_cases,
        "every server case runs, and only those"
    );
    assert!(!runner::must_failed(&run));
    let log = std::fs::read_to_string(dir.path().join("gateway.log")).unwrap_or_default();
    assert!(
        log.contains("shutting down: closing sessions with 4000"),
        "the stop command reached the gateway"
    );
}
