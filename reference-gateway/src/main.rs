//! `confab-gateway`: the Confab reference gateway.
//!
//! ```text
//! confab-gateway serve [--config FILE] [--listen ADDR] [--db PATH] [--origin ORIGIN]
//! ```
//!
//! Settings come from a TOML file, then environment variables, then flags, each
//! overriding the one before.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use confab_gateway::config::{FileConfig, LogFormat};
use confab_gateway::handler::GatewayConfig;
use confab_gateway::server;
use confab_gateway::store::sqlite::SqliteStore;

/// The Confab reference gateway.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the protocol at /v1/ws, plus /healthz, /metrics and /v1/info.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML file with any of: listen, db, origin, log_format, heartbeat_interval_ms,
    /// heartbeat_timeout_ms, auth_timeout_ms, replay_batch_max, retention_ms, retention_unacked_ms,
    /// gc_interval_ms, outbound_queue_max, outbound_queue_bytes_max, connects_per_ip_per_minute,
    /// connects_per_ip_burst, claims_per_claimer_per_minute, claims_per_claimer_burst,
    /// claims_per_target_per_minute, claims_per_target_burst, claims_per_pair_per_minute,
    /// claims_per_pair_burst, key_package_low_watermark,
    /// key_package_pool_max (README, "Configuration").
    #[arg(long, env = "CONFAB_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "CONFAB_LISTEN")]
    listen: Option<SocketAddr>,
    /// Serve /metrics on this address only (a private one), not on --listen [default:
    /// /metrics is served on --listen].
    #[arg(long, env = "CONFAB_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// SQLite database file, created and migrated on first start [default: confab-gateway.db].
    #[arg(long, env = "CONFAB_DB")]
    db: Option<PathBuf>,
    /// The origin clients sign, as they reach this gateway (for example
    /// wss://chat.example.org) [default: ws://LISTEN].
    #[arg(long, env = "CONFAB_ORIGIN")]
    origin: Option<String>,
    /// Log format: `pretty` (for people) or `json` (one object per line) [default: pretty].
    /// Logs never hold payloads, keys or tokens. Verbosity comes from RUST_LOG.
    #[arg(long, env = "CONFAB_LOG_FORMAT")]
    log_format: Option<LogFormat>,
}

fn main() -> ExitCode {
    let Cli {
        command: Command::Serve(args),
    } = Cli::parse();
    let file = match &args.config {
        Some(path) => match FileConfig::read(path) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("error: config {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        None => FileConfig::default(),
    };
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    match args
        .log_format
        .or(file.log_format)
        .unwrap_or(LogFormat::Pretty)
    {
        LogFormat::Pretty => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
    }
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
    let db = args
        .db
        .or(file.db.clone())
        .unwrap_or_else(|| PathBuf::from("confab-gateway.db"));
    let origin = args
        .origin
        .or(file.origin.clone())
        .unwrap_or_else(|| format!("ws://{listen}"));
    let mut config = GatewayConfig::new(origin);
    if let Err(e) = file.apply(&mut config) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let metrics = match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
        Ok(handle) => {
            confab_gateway::telemetry::describe();
            Some(handle)
        }
        Err(e) => {
            eprintln!("error: metrics: {e}");
            return ExitCode::FAILURE;
        }
    };
    let store = match SqliteStore::open(&db) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: database {}: {e}", db.display());
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let metrics_listen = args.metrics_listen.or(file.metrics_listen);
    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        tracing::info!(%listen, db = %db.display(), origin = %config.origin, "confab-gateway listening");
        // With a metrics address, /metrics moves there (SPEC.md 13.1: a private address)
        // and the public listener answers it 404.
        let metrics = match (metrics_listen, metrics) {
            (Some(address), Some(handle)) => {
                let private = tokio::net::TcpListener::bind(address).await?;
                tracing::info!(%address, "metrics listening");
                tokio::spawn(server::serve_metrics(private, handle));
                None
            }
            (_, metrics) => metrics,
        };
        server::serve(
            listener,
            config,
            store,
            server::Environment {
                metrics,
                ..server::Environment::default()
            },
            shutdown_signal(),
        ).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down: closing sessions with 4000");
}
