//! `confab-conformance --url ws://HOST:PORT/v1/ws [--cases PATTERN] [--strict]
//! [--report-dir DIR] [--list] [--server-log FILE] [--stop-command CMD] [--kill-command CMD]
//! [--start-command CMD] [--client-command TEMPLATE [--proxy-listen ADDR]]`

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use confab_conformance::case::{Level, Outcome, Target};
use confab_conformance::control::{Action, ServerControl};
use confab_conformance::runner::{self, ClientMode, Selection};

/// Checks a Confab gateway against SPEC.md, one case per requirement.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The gateway's WebSocket URL, e.g. ws://127.0.0.1:8080/v1/ws.
    #[arg(long, required_unless_present = "list")]
    url: Option<String>,
    /// Only the cases whose id matches this glob, e.g. '5.*' or '6.4-?.*'.
    #[arg(long)]
    cases: Option<String>,
    /// Also run the SHOULD cases.
    #[arg(long)]
    strict: bool,
    /// Write report.json, junit.xml and index.html here.
    #[arg(long)]
    report_dir: Option<PathBuf>,
    /// Print every case (id, requirement, level, description) and exit.
    #[arg(long)]
    list: bool,
    /// The file the server writes its log to (at its most detailed level): the cases of
    /// REQ-5.5-7 and REQ-14-1 look there for the tokens, signatures and payloads they
    /// used. Without it they are skipped.
    #[arg(long)]
    server_log: Option<PathBuf>,
    /// A shell command that shuts the server down gracefully (say, `kill -TERM "$(cat
    /// server.pid)"`) and returns once it has exited. With --start-command it lets the case
    /// of REQ-5.7-3 run; that case is skipped without them.
    #[arg(long)]
    stop_command: Option<String>,
    /// A shell command that ends the server without warning (say, `kill -KILL "$(cat
    /// server.pid)"`) and returns once it has exited. With --start-command it lets the case
    /// of REQ-6.3-1 (acknowledged entries survive a crash) run.
    #[arg(long)]
    kill_command: Option<String>,
    /// A shell command that starts the server in the background, on the same URL and
    /// storage, and returns (send the server's output to a file, not to the suite's); the
    /// suite then waits up to 20 s for /v1/info.
    #[arg(long)]
    start_command: Option<String>,
    /// Client mode: check a client instead of the server. TEMPLATE is a shell command that
    /// runs one action of the client, e.g. `confab --home {home} --server {url} {action}`:
    /// `{home}` is the device's state directory, `{url}` the suite's proxy (which forwards
    /// to --url), `{action}` one of `init`, `init --import BACKUP`, `room create NAME`,
    /// `room invite NAME USERKEY`, `send NAME TEXT`, `read [NAME]` (prints each message with its text and, before any other user, its sender: a name, or the start of the sender's key in hex; and a line naming the sender that says `never arrived` where its messages are missing), `accept CONVERSATION` and `watch`
    /// (stays connected until killed).
    #[arg(long, value_name = "TEMPLATE")]
    client_command: Option<String>,
    /// Client mode: where the proxy listens. The server at --url must be configured with
    /// origin `ws://` this address, which is what the client signs.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9090")]
    proxy_listen: std::net::SocketAddr,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let pattern = match cli.cases.as_deref().map(glob::Pattern::new).transpose() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: --cases: {e}");
            return ExitCode::from(2);
        }
    };
    let selection = Selection {
        pattern,
        strict: cli.strict || cli.list,
    };
    if cli.list {
        for case in runner::selected(&selection) {
            let level = match case.level {
                Level::Must => "MUST",
                Level::Should => "SHOULD",
            };
            let target = match case.target {
                Target::Server => "server",
                Target::Client => "client",
            };
            println!(
                "{:<40} {:<12} {:<6} {:<6} {}",
                case.id, case.requirement, level, target, case.description
            );
        }
        return ExitCode::SUCCESS;
    }
    let Some(url) = cli.url else {
        eprintln!("error: --url is required");
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let client_mode = cli.client_command.is_some();
    let access = runner::Access {
        server_log: cli.server_log,
        control: ServerControl {
            stop: cli.stop_command.map(Action::Shell),
            kill: cli.kill_command.map(Action::Shell),
            start: cli.start_command.map(Action::Shell),
        },
        client: cli.client_command.map(|template| ClientMode {
            template,
            listen: cli.proxy_listen,
            bound: None,
        }),
    };
    let run = runtime.block_on(runner::run(&url, &selection, &access, |i, n, case| {
        let outcome = match &case.outcome {
            Outcome::Passed => "passed",
            Outcome::Failed(_) => "FAILED",
            Outcome::Skipped { .. } => "skipped",
        };
        eprintln!(
            "[{i:>3}/{n}] {:<44} {outcome} ({} ms)",
            case.id, case.duration_ms
        );
    }));
    let run = match run {
        Ok(run) => run,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if run.cases.is_empty() {
        let mode = if client_mode { "client" } else { "server" };
        eprintln!(
            "error: no {mode} case matches --cases {} (see --list; the pattern is a glob \
             without braces)",
            cli.cases.as_deref().unwrap_or("*")
        );
        return ExitCode::from(2);
    }
    let failures: Vec<_> = run
        .cases
        .iter()
        .filter_map(|c| match &c.outcome {
            Outcome::Failed(f) => Some((c, f)),
            _ => None,
        })
        .collect();
    if !failures.is_empty() {
        println!("\nFailures:");
        println!("{:<40} {:<12} expected / observed", "case", "requirement");
        for (c, f) in &failures {
            println!(
                "{:<40} {:<12} expected: {}",
                c.id, c.requirement, f.expected
            );
            println!("{:<40} {:<12} observed: {}", "", "", f.observed);
        }
    }
    for c in &run.cases {
        if let Outcome::Skipped { reason } = &c.outcome {
            println!("skipped {}: {reason}", c.id);
        }
    }
    if let Some(dir) = &cli.report_dir {
        match confab_conformance::report::write(dir, &run) {
            Ok(()) => println!("reports in {}", dir.display()),
            Err(e) => eprintln!("error: cannot write the reports in {}: {e}", dir.display()),
        }
    }
    println!(
        "{} passed, {} failed, {} skipped",
        run.passed, run.failed, run.skipped
    );
    if runner::must_failed(&run) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
