//! `confab-sim`: lists and runs the simulation scenarios.
//!
//! ```text
//! confab-sim list
//! confab-sim run --scenario NAME --seed S [--cycles N] [--clients N] [--threads N]
//! ```
//!
//! A run shows progress on stderr and ends with a summary table; a broken invariant prints
//! the seed, step, invariant and the command that replays it, and exits with status 1.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use confab_gateway::faults::Faults;
use confab_sim::{Options, Scenario, Summary};

#[derive(Parser)]
#[command(
    name = "confab-sim",
    about = "Deterministic simulations of Confab gateways and clients"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Lists the scenarios.
    List,
    /// Runs one scenario.
    Run {
        /// The scenario (see `list`).
        #[arg(long)]
        scenario: String,
        /// The seed; the same seed replays the same run.
        #[arg(long)]
        seed: u64,
        /// Cycles to complete (default: the scenario's).
        #[arg(long)]
        cycles: Option<u64>,
        /// Devices (default: the scenario's).
        #[arg(long)]
        clients: Option<usize>,
        /// Worker threads for devices' work in scenarios that hand it over (room-soak);
        /// any number gives the same run, 0 runs it inline (default: the machine's cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Turns on a deliberately broken gateway behaviour (self-test; repeatable).
        #[arg(long = "gateway-fault", hide = true)]
        gateway_faults: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::List => {
            println!(
                "{:<20} {:>8} {:>8}  description",
                "scenario", "cycles", "clients"
            );
            for s in Scenario::ALL {
                println!(
                    "{:<20} {:>8} {:>8}  {}",
                    s.name(),
                    s.default_cycles(),
                    s.default_clients(),
                    s.description()
                );
            }
            ExitCode::SUCCESS
        }
        Command::Run {
            scenario,
            seed,
            cycles,
            clients,
            threads,
            gateway_faults,
        } => {
            let Some(scenario) = Scenario::parse(&scenario) else {
                eprintln!("unknown scenario {scenario:?}; `confab-sim list` shows them");
                return ExitCode::from(2);
            };
            let mut options = Options::new(scenario, seed);
            if let Some(c) = cycles {
                options.cycles = c;
            }
            if let Some(c) = clients {
                options.clients = c;
            }
            if let Some(t) = threads {
                options.threads = t;
            }
            for name in gateway_faults {
                let Some(one) = Faults::only(&name) else {
                    eprintln!(
                        "unknown gateway fault {name:?}; known: {}",
                        Faults::NAMES.join(", ")
                    );
                    return ExitCode::from(2);
                };
                options.gateway_faults = options.gateway_faults.union(one);
                options.gateway_fault_names.push(name);
            }
            eprintln!(
                "running {} with seed {} for {} cycles on {} devices",
                options.scenario, options.seed, options.cycles, options.clients
            );
            let started = std::time::Instant::now();
            // The first cycle report (wall seconds, cycles): the rate after the set-up.
            let mut first_cycles: Option<(f64, u64)> = None;
            let result = confab_sim::run(&options, &mut |p| {
                let simulated = p.sim_ms as f64 / 1_000.0;
                let wall = started.elapsed().as_secs_f64();
                match p.setting_up {
                    Some((step, done, of)) => eprintln!(
                        "  set-up: {step}, {done} / {of}, {simulated:.1} s simulated, {wall:.0} s wall"
                    ),
                    None => {
                        let (wall_0, cycles_0) = *first_cycles.get_or_insert((wall, p.cycles));
                        let eta = match p.cycles.checked_sub(cycles_0) {
                            Some(done) if done > 0 => {
                                let per_cycle = (wall - wall_0) / done as f64;
                                let left = p.target.saturating_sub(p.cycles) as f64 * per_cycle;
                                format!(
                                    ", {per_cycle:.2} s wall per cycle, {:.0} min left",
                                    left / 60.0
                                )
                            }
                            _ => String::new(),
                        };
                        eprintln!(
                            "  {:>6} / {} cycles, {simulated:.1} s simulated, {wall:.0} s wall{eta}",
                            p.cycles, p.target
                        )
                    }
                }
            });
            match result {
                Ok(summary) => {
                    print_summary(&summary);
                    ExitCode::SUCCESS
                }
                Err(failure) => {
                    eprintln!("{failure}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn print_summary(s: &Summary) {
    let faults: u64 = s.faults.values().sum();
    let mut rows: Vec<(&str, String)> = vec![
        ("scenario", s.options.scenario.to_string()),
        ("seed", s.options.seed.to_string()),
        ("devices", s.options.clients.to_string()),
        ("cycles", s.cycles.to_string()),
        ("messages sent", s.composed.to_string()),
        ("sends acked", s.accepted.to_string()),
        ("messages delivered", s.shown.to_string()),
        ("entries processed", s.processed.to_string()),
        (
            "commits / races lost",
            format!("{} / {}", s.commits, s.lost_races),
        ),
        ("refused, retried", s.refused.to_string()),
        ("unreadable: pre-join", s.unreadable_before_join.to_string()),
        (
            "hostile acts",
            format!(
                "{} ({} refused; {} of its entries unreadable to others)",
                s.hostile.0, s.hostile.1, s.hostile.2
            ),
        ),
        ("faults injected", faults.to_string()),
        ("invariant checks", s.checks.to_string()),
        (
            "signature checks",
            s.signatures.map_or_else(
                || "every device checks its own".to_owned(),
                |m| format!("{} computed, {} shared", m.misses, m.hits),
            ),
        ),
        (
            "simulated time",
            format!("{:.1} s", s.sim_ms as f64 / 1_000.0),
        ),
        ("wall time", format!("{:.1} s", s.wall.as_secs_f64())),
        ("trace digest", s.digest.clone()),
    ];
    if s.options.scenario != confab_sim::Scenario::HostileMember {
        rows.retain(|(k, _)| *k != "hostile acts");
    }
    if s.presence.is_some() {
        // No messages, commits or faults in that scenario.
        let messaging = [
            "messages sent",
            "sends acked",
            "messages delivered",
            "entries processed",
            "commits / races lost",
            "unreadable: pre-join",
            "faults injected",
        ];
        rows.retain(|(k, _)| !messaging.contains(k));
    }
    for (k, v) in rows {
        println!("{k:<22} {v}");
    }
    if let Some(p) = &s.presence {
        let rows: Vec<(&str, String)> = vec![
            ("bot identities (rotated)", p.bot_identities.to_string()),
            ("bot requests (watches)", p.bot_watches.to_string()),
            ("  throttled (rate_limited)", p.bot_rate_limited.to_string()),
            (
                "  blocked (watchlist_too_large)",
                p.bot_too_large.to_string(),
            ),
            (
                "  states answered (all unavailable)",
                p.bot_states_seen.to_string(),
            ),
            ("  information leaked", p.bot_leaks.to_string()),
            (
                "  churn: most watches before refusal",
                p.churn_most_before_refusal.to_string(),
            ),
            (
                "  new watchers admitted, most probed user",
                format!(
                    "{} ({} probes refused)",
                    p.probes_admitted_user, p.probes_refused_user
                ),
            ),
            (
                "  new watchers admitted, most probed nobody",
                format!(
                    "{} ({} probes refused)",
                    p.probes_admitted_nobody, p.probes_refused_nobody
                ),
            ),
            ("user transitions", p.transitions.to_string()),
            ("deliveries to watching contacts", p.deliveries.to_string()),
            (
                "  event latency p50 / p99 / max",
                format!(
                    "{} / {} / {} ms (bound {} ms)",
                    p.latency_ms.0, p.latency_ms.1, p.latency_ms.2, p.latency_bound_ms
                ),
            ),
        ];
        for (k, v) in rows {
            println!("{k:<46} {v}");
        }
    }
    for (kind, n) in &s.faults {
        println!("  {kind:<20} {n}");
    }
}
