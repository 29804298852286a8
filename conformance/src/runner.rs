//! Runs the selected cases one after the other against a server and collects the report.

use std::time::Duration;

use crate::case::{Case, Level, Outcome, Stop, Target};
use crate::cases;
use crate::context::{Ctx, Transcript};
use crate::control::ServerControl;
use crate::info::{self, InfoError};
use crate::report::{CaseReport, RunReport};

/// The longest a case may run.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(60);

/// What to run.
#[derive(Debug, Clone)]
pub struct Selection {
    /// A glob over case ids (`5.*`, `6.4-?.*`); every case when `None`.
    pub pattern: Option<glob::Pattern>,
    /// Whether SHOULD cases run too.
    pub strict: bool,
}

impl Selection {
    /// Every MUST case.
    pub fn musts() -> Self {
        Self {
            pattern: None,
            strict: false,
        }
    }

    /// Whether `case` is selected.
    pub fn selects(&self, case: &Case) -> bool {
        (self.strict || case.level == Level::Must)
            && self.pattern.as_ref().is_none_or(|p| p.matches(case.id))
    }
}

/// The selected cases, in order.
pub fn selected(selection: &Selection) -> Vec<Case> {
    cases::all()
        .into_iter()
        .filter(|c| selection.selects(c))
        .collect()
}

/// What the run may use of the server besides its URL; the cases that need a part that is
/// missing are skipped and say so.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// The file the server writes its log to (the log cases read it).
    pub server_log: Option<std::path::PathBuf>,
    /// Commands that stop, kill and start the server (the shutdown and crash cases).
    pub control: ServerControl,
    /// Client mode: the client to check instead of the server.
    pub client: Option<ClientMode>,
}

/// Client mode: the run checks a client, not the server (which it still needs: the proxy
/// forwards the client's connections to it).
#[derive(Debug, Clone)]
pub struct ClientMode {
    /// The command template (`{home}`, `{url}`, `{action}`; see [`crate::client`]).
    pub template: String,
    /// Where the proxy listens; the server's origin must be `ws://` this address.
    pub listen: std::net::SocketAddr,
    /// A listener already bound to `listen`, for the proxy to take (a test binds port 0
    /// itself, so that nothing else takes the port between choosing it and the run);
    /// `None`: the run binds `listen`.
    pub bound: Option<std::sync::Arc<std::net::TcpListener>>,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// `/v1/info` could not be read.
    #[error(transparent)]
    Info(#[from] InfoError),
    /// The proxy of client mode could not listen.
    #[error("the client-mode proxy cannot listen on {listen}: {error}")]
    Proxy {
        /// The address.
        listen: std::net::SocketAddr,
        /// Why.
        error: std::io::Error,
    },
    /// The server signs another origin than the proxy's, so the client could not
    /// authenticate through it.
    #[error(
        "the server's origin is {announced}, but in client mode the client reaches it through \
         the proxy: configure the server with origin {needed} (or pick the proxy's address \
         with --proxy-listen)"
    )]
    Origin {
        /// What `/v1/info` announces.
        announced: String,
        /// The proxy's origin.
        needed: String,
    },
}

/// Runs `selection` against the gateway at `url`, with what `access` gives of the server
/// (or, in client mode, against the client `access` names, through a proxy in front of
/// that gateway); `progress` is told about each case as it ends (its index, the total and
/// its report).
pub async fn run(
    url: &str,
    selection: &Selection,
    access: &Access,
    mut progress: impl FnMut(usize, usize, &CaseReport),
) -> Result<RunReport, RunError> {
    let started = tokio::time::Instant::now();
    let info = info::fetch(url).await?;
    let announced = info.origin.clone();
    let mut cx = Ctx::new(url.to_owned(), info);
    cx.server_log = access.server_log.clone();
    cx.control = access.control.clone();
    let target = match &access.client {
        None => Target::Server,
        Some(mode) => {
            let started = match &mode.bound {
                None => crate::client::Proxy::start(mode.listen, url.to_owned()).await,
                Some(bound) => bound
                    .try_clone()
                    .and_then(|l| {
                        l.set_nonblocking(true)?;
                        tokio::net::TcpListener::from_std(l)
                    })
                    .and_then(|l| crate::client::Proxy::start_on(l, url.to_owned())),
            };
            let proxy = started.map_err(|error| RunError::Proxy {
                listen: mode.listen,
                error,
            })?;
            let client = crate::client::ClientUnderTest {
                template: mode.template.clone(),
                proxy,
            };
            if let Some(announced) = announced.filter(|a| *a != client.origin()) {
                return Err(RunError::Origin {
                    announced,
                    needed: client.origin(),
                });
            }
            // The suite's own connections (a case's other users) sign the origin the
            // server is configured with: the proxy's.
            cx.origin = client.origin();
            cx.client = Some(client);
            Target::Client
        }
    };
    let cases: Vec<Case> = selected(selection)
        .into_iter()
        .filter(|c| c.target == target)
        .collect();
    let mut reports = Vec::with_capacity(cases.len());
    for (i, case) in cases.iter().enumerate() {
        cx.transcript = Transcript::default();
        let case_started = tokio::time::Instant::now();
        let outcome = match tokio::time::timeout(CASE_TIMEOUT, (case.body)(&mut cx)).await {
            Ok(Ok(())) => Outcome::Passed,
            Ok(Err(Stop::Failed(f))) => Outcome::Failed(f),
            Ok(Err(Stop::Skipped(reason))) => Outcome::Skipped { reason },
            Err(_) => {
                // A case cut off while the server was down (a stop or a kill, and the
                // start not yet run) would fail every case after it: start it again.
                if cx.control.start.is_some() && info::fetch(url).await.is_err() {
                    let _ = cx.control.start_and_wait(url).await;
                }
                Outcome::Failed(crate::case::Failure::new(
                    format!("the case to finish within {} s", CASE_TIMEOUT.as_secs()),
                    "it did not",
                ))
            }
        };
        let report = CaseReport {
            id: case.id.to_owned(),
            requirement: case.requirement.to_owned(),
            level: case.level,
            description: case.description.to_owned(),
            outcome,
            duration_ms: case_started.elapsed().as_millis() as u64,
            transcript: cx.transcript.records(),
        };
        progress(i + 1, cases.len(), &report);
        reports.push(report);
    }
    let count = |f: fn(&Outcome) -> bool| reports.iter().filter(|r| f(&r.outcome)).count();
    Ok(RunReport {
        url: url.to_owned(),
        passed: count(|o| matches!(o, Outcome::Passed)),
        failed: count(|o| matches!(o, Outcome::Failed(_))),
        skipped: count(|o| matches!(o, Outcome::Skipped { .. })),
        cases: reports,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// Whether a MUST case failed (the run's exit status).
pub fn must_failed(run: &RunReport) -> bool {
    run.cases
        .iter()
        .any(|c| c.level == Level::Must && matches!(c.outcome, Outcome::Failed(_)))
}
