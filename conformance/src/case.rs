//! What a conformance case is, and what running one gives.

use std::future::Future;
use std::pin::Pin;

use crate::context::Ctx;

/// How strong the requirement a case checks is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Level {
    /// A MUST: a failure fails the run.
    Must,
    /// A SHOULD: run with `--strict`; a failure is reported.
    Should,
}

/// What a case checks: a gateway, or a client through the suite's proxy (client mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// A requirement on gateways: the suite talks to the server directly.
    Server,
    /// A requirement on clients: the suite drives a client (`--client-command`) and
    /// watches and steers its connections from the proxy in front of a gateway.
    Client,
}

/// Why a case failed: what SPEC.md calls for and what the server did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Failure {
    /// What the requirement calls for.
    pub expected: String,
    /// What the server did instead.
    pub observed: String,
}

impl Failure {
    /// A failure with the two descriptions.
    pub fn new(expected: impl Into<String>, observed: impl Into<String>) -> Self {
        Self {
            expected: expected.into(),
            observed: observed.into(),
        }
    }
}

/// The result of a case body: `Err(Skip)` is not a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The server broke the requirement.
    Failed(Failure),
    /// The case cannot run against this server (a setting it needs is not there).
    Skipped(String),
}

impl From<Failure> for Stop {
    fn from(f: Failure) -> Self {
        Stop::Failed(f)
    }
}

/// A case body's result.
pub type CaseResult = Result<(), Stop>;

/// A case body: an async function of the run's context.
pub type Body = for<'a> fn(&'a mut Ctx) -> Pin<Box<dyn Future<Output = CaseResult> + Send + 'a>>;

/// One conformance case.
#[derive(Clone, Copy)]
pub struct Case {
    /// Its id: the SPEC.md section and requirement number, then a name
    /// (`5.4-1.expired-certificate`).
    pub id: &'static str,
    /// The requirement it checks (`REQ-5.4-1`).
    pub requirement: &'static str,
    /// MUST or SHOULD.
    pub level: Level,
    /// Whether it checks a server or a client.
    pub target: Target,
    /// One line: what the server must do.
    pub description: &'static str,
    /// The case.
    pub body: Body,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Case")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Declares a [`Case`] from an `async fn(&mut Ctx) -> CaseResult`.
#[macro_export]
macro_rules! case {
    ($id:literal, $req:literal, $level:ident, $description:literal, $body:path) => {
        $crate::case::Case {
            id: $id,
            requirement: $req,
            level: $crate::case::Level::$level,
            target: $crate::case::Target::Server,
            description: $description,
            body: |cx| Box::pin($body(cx)),
        }
    };
}

/// Declares a client-mode [`Case`] (its body gets the client under test from
/// [`Ctx::client`](crate::context::Ctx::client)).
#[macro_export]
macro_rules! client_case {
    ($id:literal, $req:literal, $level:ident, $description:literal, $body:path) => {
        $crate::case::Case {
            id: $id,
            requirement: $req,
            level: $crate::case::Level::$level,
            target: $crate::case::Target::Client,
            description: $description,
            body: |cx| Box::pin($body(cx)),
        }
    };
}

/// What happened to a case in a run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum Outcome {
    /// The server did what the requirement calls for.
    Passed,
    /// It did not.
    Failed(Failure),
    /// The case did not run, and why.
    Skipped {
        /// Why.
        reason: String,
    },
}
