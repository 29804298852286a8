//! Client mode: the suite checks a *client* against the requirements SPEC.md puts on
//! clients. The client under test talks to a real gateway through the suite's [`Proxy`],
//! which records every frame and, as each case plans, drops, rewrites or answers frames and
//! closes connections. The suite drives the client with a command template
//! (`--client-command`), one process per action:
//!
//! | action | the client … |
//! | --- | --- |
//! | `init` | creates an identity and this device in `{home}` and publishes KeyPackages |
//! | `init --import BACKUP` | the same from a Polycentric backup string (SPEC.md 3.5) |
//! | `room create NAME` | creates a room it owns, named NAME locally |
//! | `room invite NAME USERKEY` | adds the user (system key in hex) to the room: a Commit |
//! | `send NAME TEXT` | sends TEXT to the room NAME and exits once the gateway accepted it |
//! | `read [NAME]` | catches up (joining rooms it was added to) and prints every message of NAME, or of every conversation, with its text; a message's line names its sender before any other user, by a name the user gave it or by the start of the user's system key in hex (at least 8 digits); where a sender's messages are missing (SPEC.md 7.9) it prints, before the next message of that sender, a line naming the sender that says `never arrived` |
//! | `watch` | stays connected (and reconnects as SPEC.md 5.8 says) until it is killed |
//!
//! The template's `{home}` is a fresh directory for each device of a case, `{url}` the
//! proxy's WebSocket URL, and `{action}` the action's words, each quoted for `sh`.

pub mod proxy;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::case::{Failure, Stop};
pub use proxy::{Event, PassThrough, Proxy, Script, Verdict, What};

/// The longest one action may take (an action that needs a reconnect or two included).
pub const ACTION_TIMEOUT: Duration = Duration::from_secs(30);

/// The client under test and the proxy it connects to.
pub struct ClientUnderTest {
    /// The command template (`confab --home {home} --server {url} {action}`).
    pub template: String,
    /// The proxy in front of the gateway.
    pub proxy: Proxy,
}

/// What an action printed and how it ended.
#[derive(Debug, Clone)]
pub struct ActionOutput {
    /// Whether it exited with status 0.
    pub success: bool,
    /// What it printed on standard output.
    pub stdout: String,
    /// What it printed on standard error.
    pub stderr: String,
}

/// Quotes `word` for `sh`.
pub fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

impl ClientUnderTest {
    /// Looks at what the proxy saw every `every` until `found` finds what it wants, for at
    /// most `within` (then `None`).
    pub async fn wait_for<T>(
        &self,
        within: Duration,
        every: Duration,
        mut found: impl FnMut(&[Event]) -> Option<T>,
    ) -> Option<T> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(t) = found(&self.proxy.events()) {
                return Some(t);
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(every).await;
        }
    }

    /// The proxy's WebSocket URL, which the client is given.
    pub fn url(&self) -> String {
        format!("ws://{}/v1/ws", self.proxy.addr())
    }

    /// The origin the client must sign (SPEC.md 5.3): the proxy's.
    pub fn origin(&self) -> String {
        format!("ws://{}", self.proxy.addr())
    }

    /// The shell command for `action` on the device whose state is in `home`.
    pub fn command_line(&self, home: &Path, action: &[&str]) -> String {
        let words: Vec<String> = action.iter().map(|w| shell_quote(w)).collect();
        self.template
            .replace("{home}", &shell_quote(&home.display().to_string()))
            .replace("{url}", &shell_quote(&self.url()))
            .replace("{action}", &words.join(" "))
    }

    fn command(&self, home: &Path, action: &[&str]) -> Command {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(self.command_line(home, action))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so that a kill reaches whatever `sh` started.
            .process_group(0)
            .kill_on_drop(true);
        command
    }

    /// Runs `action` to its end (at most [`ACTION_TIMEOUT`]); a client that cannot be
    /// started or does not finish is a failure, an exit status other than 0 is not (the
    /// case decides).
    pub async fn run(&self, home: &Path, action: &[&str]) -> Result<ActionOutput, Stop> {
        let child = self
            .command(home, action)
            .spawn()
            .map_err(|e| Stop::Skipped(format!("cannot start the client: {e}")))?;
        let pid = child.id();
        match tokio::time::timeout(ACTION_TIMEOUT, child.wait_with_output()).await {
            Ok(Ok(out)) => Ok(ActionOutput {
                success: out.status.success(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }),
            Ok(Err(e)) => Err(Stop::Skipped(format!("cannot run the client: {e}"))),
            Err(_) => {
                kill_group(pid).await;
                Err(Failure::new(
                    format!(
                        "`{}` to finish within {} s",
                        action.join(" "),
                        ACTION_TIMEOUT.as_secs()
                    ),
                    "it did not",
                )
                .into())
            }
        }
    }

    /// Runs `action` and requires it to succeed.
    pub async fn run_ok(&self, home: &Path, action: &[&str]) -> Result<ActionOutput, Stop> {
        let out = self.run(home, action).await?;
        if !out.success {
            return Err(Failure::new(
                format!("`{}` to succeed", action.join(" ")),
                format!("it failed: {}", out.stderr.trim()),
            )
            .into());
        }
        Ok(out)
    }

    /// Starts `action` (say `watch`) in the background; the returned process is killed,
    /// with its process group, when [`Background::stop`] is called or it is dropped.
    pub fn spawn(&self, home: &Path, action: &[&str]) -> Result<Background, Stop> {
        let child = self
            .command(home, action)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Stop::Skipped(format!("cannot start the client: {e}")))?;
        Ok(Background { child })
    }
}

/// A client action running in the background.
pub struct Background {
    child: Child,
}

impl Background {
    /// Kills it (and its process group) and waits for it.
    pub async fn stop(mut self) {
        kill_group(self.child.id()).await;
        let _ = self.child.wait().await;
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Kills the process group `pid` leads (a process started with its own group).
async fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stderr(Stdio::null())
            .status()
            .await;
    }
}

/// A fresh home directory for a device of the client under test.
pub fn home() -> Result<tempfile::TempDir, Stop> {
    tempfile::tempdir().map_err(|e| Stop::Skipped(format!("cannot make a directory: {e}")))
}
