//! `confab-load`: drives a Confab gateway on this machine over real WebSocket connections
//! and measures it beside baselines run by the same tool in the same run (a raw axum
//! WebSocket server, SQLite itself). README, "Performance".
//!
//! ```text
//! confab-load all                  # start a gateway and the raw server, run every mode
//! confab-load idle|fanout|append|resume [--url ws://127.0.0.1:8080/v1/ws --pid PID]
//! confab-load raw-server --listen 127.0.0.1:9000
//! ```

mod append;
mod fanout;
mod idle;
mod progress;
mod raw;
mod report;
mod resume;
mod setup;
mod sqlite_baseline;
mod stats;
mod target;
mod wire;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::report::{AppendReport, FanoutReport, IdleReport, Machine, Report};
use crate::target::Target;
use crate::wire::{LoadError, fail};

/// Load generator for Confab gateways, with baselines measured in the same run.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every mode in turn: resume, append, fanout, idle.
    All(Args),
    /// N authenticated connections that only heartbeat: server memory per connection.
    Idle(Args),
    /// Senders into rooms of subscribers: deliveries per second and latency.
    Fanout(Args),
    /// Sustained sends with acks: durable appends per second and ack latency.
    Append(Args),
    /// A device replays a backlog: entries per second and catch-up time.
    Resume(Args),
    /// Serve the raw WebSocket baseline (the load modes start it themselves).
    RawServer {
        /// Address to listen on (loopback).
        #[arg(long)]
        listen: SocketAddr,
    },
}

#[derive(clap::Args, Clone)]
struct Args {
    /// A gateway that is already running (loopback only); without it, the tool starts
    /// `confab-gateway` itself on a fresh database.
    #[arg(long)]
    url: Option<String>,
    /// The running gateway's process id, for its memory and CPU figures.
    #[arg(long, requires = "url")]
    pid: Option<u32>,
    /// The gateway binary to start [default: confab-gateway beside this program].
    #[arg(long)]
    gateway_bin: Option<PathBuf>,
    /// The gateway's settings file [default: the load profile built into this program].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Scratch directory for databases, logs and the report (on the disk under test).
    #[arg(long, default_value = "target/confab-load")]
    scratch: PathBuf,
    /// Where to write the JSON report [default: SCRATCH/report.json].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Skip the baselines.
    #[arg(long)]
    no_baseline: bool,
    /// idle: connections to hold.
    #[arg(long, default_value_t = 19_000)]
    connections: usize,
    /// idle: seconds to hold them (the flatness figure wants 600).
    #[arg(long, default_value_t = 60)]
    hold_s: u64,
    /// fanout: rooms, one sender each.
    #[arg(long, default_value_t = 4)]
    rooms: usize,
    /// fanout: subscribed devices per room.
    #[arg(long, default_value_t = 50)]
    members: usize,
    /// fanout: messages per second of the first step (each step doubles it).
    #[arg(long, default_value_t = 500.0)]
    start_rate: f64,
    /// fanout: most steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// fanout: seconds per step.
    #[arg(long, default_value_t = 3)]
    step_s: u64,
    /// fanout: the p99 latency bound of the knee, ms.
    #[arg(long, default_value_t = 50)]
    p99_bound_ms: u64,
    /// Bytes per message (fanout, append, resume).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// append: connections.
    #[arg(long, default_value_t = 64)]
    append_connections: usize,
    /// append: unanswered sends per connection.
    #[arg(long, default_value_t = 8)]
    window: usize,
    /// append: measured seconds.
    #[arg(long, default_value_t = 10)]
    duration_s: u64,
    /// resume: backlog entries.
    #[arg(long, default_value_t = 10_000)]
    backlog: usize,
    /// resume: replays of the backlog.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

/// Which modes a command runs.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Idle,
    Fanout,
    Append,
    Resume,
}

/// The load profile's settings, built in so that the binary runs from anywhere.
const LOAD_PROFILE: &str = include_str!("../gateway.toml");

struct Run {
    args: Args,
    scratch: PathBuf,
    config: PathBuf,
}

impl Run {
    fn new(args: Args) -> Result<Self, LoadError> {
        std::fs::create_dir_all(&args.scratch)
            .or_else(|e| fail(&format!("creating {}", args.scratch.display()), e))?;
        let scratch = args
            .scratch
            .canonicalize()
            .or_else(|e| fail("the scratch directory", e))?;
        let config = match &args.config {
            Some(c) => c.clone(),
            None => {
                let path = scratch.join("gateway.toml");
                std::fs::write(&path, LOAD_PROFILE).or_else(|e| fail("writing the profile", e))?;
                path
            }
        };
        Ok(Self {
            args,
            scratch,
            config,
        })
    }

    /// The gateway under test: the running one, or a fresh one.
    fn gateway(&self) -> Result<Target, LoadError> {
        match &self.args.url {
            Some(url) => Target::running(url, self.args.pid),
            None => {
                let bin = self
                    .args
                    .gateway_bin
                    .clone()
                    .unwrap_or_else(target::default_gateway_binary);
                Target::spawn_gateway(&bin, &self.config, &self.scratch)
            }
        }
    }

    fn raw(&self) -> Result<Option<Target>, LoadError> {
        if self.args.no_baseline {
            return Ok(None);
        }
        Target::spawn_raw(&self.scratch).map(Some)
    }
}

async fn run(modes: &[Mode], args: Args) -> Result<Report, LoadError> {
    let run = Run::new(args)?;
    let a = &run.args;
    let mut report = Report {
        machine: Machine::here(),
        idle: None,
        fanout: None,
        append: None,
        resume: None,
    };
    if modes.contains(&Mode::Resume) {
        let gateway = run.gateway()?;
        let params = resume::ResumeParams {
            backlog: a.backlog,
            payload: a.payload,
            repeats: a.repeats,
        };
        report.resume = Some(resume::run(&gateway, &params).await?);
    }
    if modes.contains(&Mode::Append) {
        let gateway = run.gateway()?;
        let params = append::AppendParams {
            connections: a.append_connections,
            window: a.window,
            payload: a.payload,
            duration: Duration::from_secs(a.duration_s),
            warmup: Duration::from_secs(2),
        };
        let confab = append::run(&gateway, &params).await?;
        drop(gateway);
        let (mut each, mut grouped) = (None, None);
        if !a.no_baseline {
            let duration = Duration::from_secs(a.duration_s.min(5));
            each = Some(sqlite_baseline::run(
                &run.scratch,
                1,
                a.append_connections,
                a.payload,
                duration,
            )?);
            if let Some(batch) = confab.appends_per_sync.filter(|b| *b >= 1.5) {
                grouped = Some(sqlite_baseline::run(
                    &run.scratch,
                    batch.round() as usize,
                    a.append_connections,
                    a.payload,
                    duration,
                )?);
            }
        }
        let base = grouped.as_ref().or(each.as_ref()).map(|s| s.rows_per_s);
        report.append = Some(AppendReport {
            ratio: report::ratio(Some(confab.appends_per_s), base),
            confab,
            sqlite_each: each,
            sqlite_grouped: grouped,
        });
    }
    if modes.contains(&Mode::Fanout) {
        let params = fanout::FanoutParams {
            rooms: a.rooms,
            members: a.members,
            payload: a.payload,
            start_rate: a.start_rate,
            max_steps: a.steps,
            step: Duration::from_secs(a.step_s.max(1)),
            warmup: Duration::from_millis(500),
            p99_bound: Duration::from_millis(a.p99_bound_ms),
        };
        let confab = {
            let gateway = run.gateway()?;
            fanout::run(&gateway, &params).await?
        };
        let raw = match run.raw()? {
            Some(raw) => Some(fanout::run(&raw, &params).await?),
            None => None,
        };
        report.fanout = Some(FanoutReport::new(confab, raw));
    }
    if modes.contains(&Mode::Idle) {
        let params = idle::IdleParams {
            connections: a.connections,
            hold: Duration::from_secs(a.hold_s),
            sample_every: Duration::from_secs(5),
        };
        let confab = {
            let gateway = run.gateway()?;
            idle::run(&gateway, &params).await?
        };
        let raw = match run.raw()? {
            Some(raw) => Some(idle::run(&raw, &params).await?),
            None => None,
        };
        report.idle = Some(IdleReport::new(confab, raw));
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| run.scratch.join("report.json"));
    write_report(&out, &report)?;
    eprintln!("report written to {}", out.display());
    Ok(report)
}

fn write_report(path: &Path, report: &Report) -> Result<(), LoadError> {
    let json = serde_json::to_string_pretty(report).or_else(|e| fail("the report", e))?;
    std::fs::write(path, json).or_else(|e| fail(&format!("writing {}", path.display()), e))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (modes, args): (Vec<Mode>, Args) = match cli.command {
        Command::RawServer { listen } => {
            if !listen.ip().is_loopback() {
                eprintln!("confab-load: the raw server listens on loopback addresses only");
                return ExitCode::FAILURE;
            }
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("confab-load: {e}");
                    return ExitCode::FAILURE;
                }
            };
            return match runtime.block_on(raw::serve(listen)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("confab-load: raw server: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::All(a) => (
            vec![Mode::Resume, Mode::Append, Mode::Fanout, Mode::Idle],
            a,
        ),
        Command::Idle(a) => (vec![Mode::Idle], a),
        Command::Fanout(a) => (vec![Mode::Fanout], a),
        Command::Append(a) => (vec![Mode::Append], a),
        Command::Resume(a) => (vec![Mode::Resume], a),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("confab-load: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&modes, args)) {
        Ok(report) => {
            println!("{}", report.table());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("confab-load: {e}");
            ExitCode::FAILURE
        }
    }
}
