//! Control of the server under test, for the cases that must stop it: a graceful shutdown
//! (REQ-5.7-3) and a crash (REQ-6.3-1), each followed by a restart. The run is given shell
//! commands (`--stop-command`, `--kill-command`, `--start-command`); without them those
//! cases are skipped and say which command they need.
//!
//! Each command runs with `sh -c` (or is a [`Hook`] of a program that embeds the suite)
//! and must end within [`COMMAND_WAIT`]:
//! - the stop command asks the server to shut down gracefully (say, `kill -TERM`) and
//!   returns once the server process has exited;
//! - the kill command ends the server without warning (say, `kill -KILL`) and returns
//!   once the process has exited;
//! - the start command starts the server in the background and returns; the run then
//!   waits up to [`START_WAIT`] for `GET /v1/info` to answer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::case::{Failure, Stop};

/// The longest a command may run.
pub const COMMAND_WAIT: Duration = Duration::from_secs(20);

/// The longest the run waits for a started server to answer `GET /v1/info`.
pub const START_WAIT: Duration = Duration::from_secs(20);

/// A function that stops, kills or starts the server, for a program that runs the server
/// itself (a test); `Err` says what went wrong.
pub type Hook =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// One way to stop, kill or start the server.
#[derive(Clone)]
pub enum Action {
    /// A shell command, run with `sh -c`.
    Shell(String),
    /// A function of the program that embeds the suite.
    Hook(Hook),
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Shell(command) => f.debug_tuple("Shell").field(command).finish(),
            Action::Hook(_) => f.write_str("Hook"),
        }
    }
}

/// The actions that stop, kill and start the server; each may be missing.
#[derive(Debug, Clone, Default)]
pub struct ServerControl {
    /// Shuts the server down gracefully and returns when it has exited.
    pub stop: Option<Action>,
    /// Ends the server without warning and returns when it has exited.
    pub kill: Option<Action>,
    /// Starts the server in the background and returns.
    pub start: Option<Action>,
}

/// Which of the commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `--stop-command`.
    Stop,
    /// `--kill-command`.
    Kill,
    /// `--start-command`.
    Start,
}

impl Command {
    /// The option that gives it.
    pub fn option(self) -> &'static str {
        match self {
            Command::Stop => "--stop-command",
            Command::Kill => "--kill-command",
            Command::Start => "--start-command",
        }
    }
}

impl ServerControl {
    fn action(&self, which: Command) -> Option<&Action> {
        match which {
            Command::Stop => self.stop.as_ref(),
            Command::Kill => self.kill.as_ref(),
            Command::Start => self.start.as_ref(),
        }
    }

    /// `Ok` when every command of `needed` was given; the skip that names the missing
    /// ones otherwise.
    pub fn require(&self, needed: &[Command]) -> Result<(), Stop> {
        let missing: Vec<&str> = needed
            .iter()
            .filter(|c| self.action(**c).is_none())
            .map(|c| c.option())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(Stop::Skipped(format!(
            "needs control of the server: run with {}",
            missing.join(" and ")
        )))
    }

    /// Runs `which`; a failure (the case cannot go on) if it is missing, exits non-zero,
    /// or runs longer than [`COMMAND_WAIT`] (it is then killed).
    pub async fn run(&self, which: Command) -> Result<(), Stop> {
        self.require(&[which])?;
        let option = which.option();
        let outcome = match self.action(which) {
            Some(Action::Shell(script)) => {
                let script = script.clone();
                tokio::task::spawn_blocking(move || run_shell(&script))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r)
            }
            Some(Action::Hook(hook)) => tokio::time::timeout(COMMAND_WAIT, hook())
                .await
                .unwrap_or_else(|_| Err("it was still running".into())),
            None => Err("it is missing".into()),
        };
        outcome.map_err(|observed| {
            Failure::new(
                format!("the {option} to exit 0 within {} s", COMMAND_WAIT.as_secs()),
                observed,
            )
            .into()
        })
    }

    /// Runs the start command, then waits until `GET /v1/info` of `ws_url` answers.
    pub async fn start_and_wait(&self, ws_url: &str) -> Result<(), Stop> {
        self.run(Command::Start).await?;
        let started = Instant::now();
        loop {
            match crate::info::fetch(ws_url).await {
                Ok(_) => return Ok(()),
                Err(e) if started.elapsed() > START_WAIT => {
                    return Err(Failure::new(
                        format!(
                            "the server to answer /v1/info within {} s of the --start-command",
                            START_WAIT.as_secs()
                        ),
                        e.to_string(),
                    )
                    .into());
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// Runs `script` with `sh -c`; `Err` says how it went wrong.
fn run_shell(script: &str) -> Result<(), String> {
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run sh: {e}"))?;
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("it ended with {status}")),
            Ok(None) if started.elapsed() > COMMAND_WAIT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("it was still running; killed".into());
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("cannot wait for it: {e}")),
        }
    }
}
