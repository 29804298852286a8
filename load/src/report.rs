//! The report: every figure beside its baseline from the same run, as a table on standard
//! output and as JSON.

use serde::Serialize;

use crate::append::AppendResult;
use crate::fanout::FanoutResult;
use crate::idle::IdleResult;
use crate::resume::ResumeResult;
use crate::sqlite_baseline::SqliteResult;
use crate::stats::ms;

/// The machine the figures were measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPU model.
    pub cpu: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Kernel release.
    pub kernel: String,
}

impl Machine {
    /// This machine, from `/proc`.
    pub fn here() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            cpu: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
                .unwrap_or_default(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_mib: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |k| k / 1024),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
        }
    }
}

/// `idle` on both servers.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    /// The gateway.
    pub confab: IdleResult,
    /// The raw baseline, when run.
    pub raw: Option<IdleResult>,
    /// Gateway KiB per connection ÷ raw KiB per connection (last samples).
    pub ratio: Option<f64>,
}

/// `fanout` on both servers.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    /// The gateway.
    pub confab: FanoutResult,
    /// The raw baseline, when run.
    pub raw: Option<FanoutResult>,
    /// Gateway deliveries/s at its knee ÷ raw deliveries/s at its knee.
    pub ratio: Option<f64>,
}

/// `append` and its SQLite baselines.
#[derive(Debug, Clone, Serialize)]
pub struct AppendReport {
    /// The gateway.
    pub confab: AppendResult,
    /// SQLite, one row per transaction.
    pub sqlite_each: Option<SqliteResult>,
    /// SQLite, as many rows per transaction as the gateway's group commit reached.
    pub sqlite_grouped: Option<SqliteResult>,
    /// Gateway appends/s ÷ `sqlite_grouped` rows/s (else `sqlite_each`).
    pub ratio: Option<f64>,
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Where.
    pub machine: Machine,
    /// `idle`.
    pub idle: Option<IdleReport>,
    /// `fanout`.
    pub fanout: Option<FanoutReport>,
    /// `append`.
    pub append: Option<AppendReport>,
    /// `resume`.
    pub resume: Option<ResumeResult>,
}

fn last_per_connection(r: &IdleResult) -> Option<f64> {
    r.samples.last().map(|s| s.per_connection_kib)
}

/// `a ÷ b` when both are known and b is not 0.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

impl IdleReport {
    /// Pairs the results and computes the ratio.
    pub fn new(confab: IdleResult, raw: Option<IdleResult>) -> Self {
        let ratio = ratio(
            last_per_connection(&confab),
            raw.as_ref().and_then(last_per_connection),
        );
        Self { confab, raw, ratio }
    }
}

fn knee_rate(r: &FanoutResult) -> Option<f64> {
    r.knee.map(|i| r.steps[i].deliveries_per_s)
}

impl FanoutReport {
    /// Pairs the results and computes the ratio.
    pub fn new(confab: FanoutResult, raw: Option<FanoutResult>) -> Self {
        let ratio = ratio(knee_rate(&confab), raw.as_ref().and_then(knee_rate));
        Self { confab, raw, ratio }
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}

impl Report {
    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        out.push_str(&format!(
            "machine: {} ({} CPUs, {} MiB), Linux {}\n",
            m.cpu, m.cpus, m.memory_mib, m.kernel
        ));
        if let Some(idle) = &self.idle {
            out.push_str("\nidle                      connections  up   lost  KiB/conn (min..max over hold)  server CPU µs/conn/min\n");
            for r in std::iter::once(&idle.confab).chain(idle.raw.as_ref()) {
                out.push_str(&format!(
                    "  {:<23} {:>11}  {:>5} {:>4}  {:>8} ({} .. {})  {}\n",
                    r.target,
                    r.connections,
                    r.connected,
                    r.lost,
                    opt(last_per_connection(r), 2),
                    opt(r.per_connection_kib_min, 2),
                    opt(r.per_connection_kib_max, 2),
                    opt(r.hold_cpu_us_per_connection_minute, 1),
                ));
            }
            out.push_str(&format!("  ratio confab/raw: {}\n", opt(idle.ratio, 2)));
        }
        if let Some(f) = &self.fanout {
            out.push_str(&format!(
                "\nfanout ({} rooms x {} subscribers, {} B, p99 bound {} ms)\n  server  offered msg/s  deliveries/s   delivered/expected  p50 ms  p99 ms  p999 ms\n",
                f.confab.rooms, f.confab.members, f.confab.payload_bytes, f.confab.p99_bound_ms
            ));
            for r in std::iter::once(&f.confab).chain(f.raw.as_ref()) {
                for (i, s) in r.steps.iter().enumerate() {
                    out.push_str(&format!(
                        "  {:<7} {:>12.0}  {:>12.0}  {:>9}/{:<9} {:>7} {:>7} {:>8} {}\n",
                        r.target,
                        s.offered_msgs_per_s,
                        s.deliveries_per_s,
                        s.delivered,
                        s.expected,
                        ms(s.latency.p50_us),
                        ms(s.latency.p99_us),
                        ms(s.latency.p999_us),
                        if r.knee == Some(i) { "<- knee" } else { "" }
                    ));
                }
                out.push_str(&format!(
                    "  {}: gaps {}, duplicates {}, subscribers closed {}, sends refused {}\n",
                    r.target, r.gaps, r.duplicates, r.closed, r.refused
                ));
            }
            out.push_str(&format!(
                "  ratio confab/raw at the knee: {}\n",
                opt(f.ratio, 3)
            ));
        }
        if let Some(a) = &self.append {
            let c = &a.confab;
            out.push_str(&format!(
                "\nappend ({} connections x window {}, {} B)\n  confab   {:>9.0} appends/s  ack p50 {} ms  p99 {} ms  p999 {} ms  appends/sync {}  refused {}\n",
                c.connections,
                c.window,
                c.payload_bytes,
                c.appends_per_s,
                ms(c.ack_latency.p50_us),
                ms(c.ack_latency.p99_us),
                ms(c.ack_latency.p999_us),
                opt(c.appends_per_sync, 1),
                c.refused
            ));
            for s in a.sqlite_each.iter().chain(a.sqlite_grouped.iter()) {
                out.push_str(&format!(
                    "  sqlite   {:>9.0} rows/s     ({} per transaction, commit p50 {} ms, p99 {} ms)\n",
                    s.rows_per_s,
                    s.rows_per_transaction,
                    ms(s.commit_latency.p50_us),
                    ms(s.commit_latency.p99_us)
                ));
            }
            out.push_str(&format!("  ratio confab/sqlite: {}\n", opt(a.ratio, 2)));
        }
        if let Some(r) = &self.resume {
            out.push_str(&format!(
                "\nresume ({} entries of {} B)\n",
                r.backlog, r.payload_bytes
            ));
            for (i, p) in r.replays.iter().enumerate() {
                out.push_str(&format!(
                    "  replay {}: {:.1} ms, {:.0} entries/s, {} batches, gateway CPU {} ms\n",
                    i + 1,
                    p.catch_up_ms,
                    p.entries_per_s,
                    p.batches,
                    opt(p.gateway_cpu_ms, 0)
                ));
            }
        }
        out
    }
}
