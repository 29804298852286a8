//! The servers under load: a running gateway named by URL, or one this tool starts (the
//! `confab-gateway` binary beside this one, on a fresh SQLite file) together with the raw
//! WebSocket baseline (`confab-load raw-server`). For a process it knows, it reads
//! memory and CPU time from `/proc`.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::wire::{Endpoint, LoadError, fail};

/// A server under load.
pub struct Target {
    /// `confab` or `raw`.
    pub name: &'static str,
    /// Its WebSocket endpoint.
    pub endpoint: Endpoint,
    /// Its process, when known (for memory and CPU figures).
    pub pid: Option<u32>,
    child: Option<Child>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A free loopback port (bound and released; the server binds it right after).
fn free_port() -> Result<u16, LoadError> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").or_else(|e| fail("finding a port", e))?;
    let port = listener
        .local_addr()
        .or_else(|e| fail("finding a port", e))?
        .port();
    Ok(port)
}

/// Waits until `addr` accepts TCP connections, for at most 30 s.
fn wait_listening(
    addr: std::net::SocketAddr,
    child: &mut Child,
    log: &Path,
) -> Result<(), LoadError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return fail(
                "starting the server",
                format!("it exited with {status}; see {}", log.display()),
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    fail(
        "starting the server",
        format!("{addr} not listening after 30 s"),
    )
}

impl Target {
    /// A gateway that is already running at `url`, with its process id if given.
    pub fn running(url: &str, pid: Option<u32>) -> Result<Self, LoadError> {
        Ok(Self {
            name: "confab",
            endpoint: Endpoint::parse(url)?,
            pid,
            child: None,
        })
    }

    /// Starts `gateway` (the `confab-gateway` binary) with `config`, a fresh database in
    /// `scratch`, and its log beside it.
    pub fn spawn_gateway(gateway: &Path, config: &Path, scratch: &Path) -> Result<Self, LoadError> {
        let port = free_port()?;
        let db = scratch.join("gateway.db");
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
        }
        let log = scratch.join("gateway.log");
        let log_file = std::fs::File::create(&log).or_else(|e| fail("creating the log", e))?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut child = Command::new(gateway)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--db")
            .arg(&db)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .or_else(|e| {
                fail(
                    &format!("starting {}", gateway.display()),
                    format!(
                        "{e} (build it first: cargo build --release -p confab-gateway -p confab-load)"
                    ),
                )
            })?;
        wait_listening(addr, &mut child, &log)?;
        Ok(Self {
            name: "confab",
            endpoint: Endpoint::parse(&format!("ws://{addr}/v1/ws"))?,
            pid: Some(child.id()),
            child: Some(child),
        })
    }

    /// Starts the raw WebSocket baseline: this binary's `raw-server` command.
    pub fn spawn_raw(scratch: &Path) -> Result<Self, LoadError> {
        let port = free_port()?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let me = std::env::current_exe().or_else(|e| fail("finding this program", e))?;
        let log = scratch.join("raw-server.log");
        let log_file = std::fs::File::create(&log).or_else(|e| fail("creating the log", e))?;
        let mut child = Command::new(me)
            .arg("raw-server")
            .arg("--listen")
            .arg(addr.to_string())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .or_else(|e| fail("starting the raw server", e))?;
        wait_listening(addr, &mut child, &log)?;
        Ok(Self {
            name: "raw",
            endpoint: Endpoint::parse(&format!("ws://{addr}/v1/ws"))?,
            pid: Some(child.id()),
            child: Some(child),
        })
    }

    /// The process's resident memory in KiB (`VmRSS`), when the process is known.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// The process's CPU time (user + system) so far, when the process is known.
    pub fn cpu_time(&self) -> Option<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid?)).ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        // USER_HZ is 100 on every Linux this runs on.
        Some(Duration::from_millis((utime + stime) * 10))
    }

    /// One counter or gauge from the gateway's `/metrics` (summed over its labels).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let body = http_get(&self.endpoint, "/metrics").ok()?;
        let mut total = None;
        for line in body.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                continue;
            }
            let value: f64 = rest.rsplit(' ').next()?.parse().ok()?;
            total = Some(total.unwrap_or(0.0) + value);
        }
        total
    }
}

/// `GET path` over HTTP/1.0 on the endpoint's address; the body.
fn http_get(endpoint: &Endpoint, path: &str) -> Result<String, LoadError> {
    let mut stream = std::net::TcpStream::connect_timeout(&endpoint.addr, Duration::from_secs(5))
        .or_else(|e| fail("connecting for HTTP", e))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .or_else(|e| fail("HTTP", e))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n",
        endpoint.addr
    )
    .or_else(|e| fail("HTTP request", e))?;
    let mut response = String::new();
    stream
        .take(16 * 1024 * 1024)
        .read_to_string(&mut response)
        .or_else(|e| fail("HTTP response", e))?;
    match response.split_once("\r\n\r\n") {
        Some((head, body))
            if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") =>
        {
            Ok(body.to_owned())
        }
        _ => fail("HTTP", format!("GET {path} was not answered 200")),
    }
}

/// The `confab-gateway` binary beside this one (both are built into the same directory).
pub fn default_gateway_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("confab-gateway")))
        .unwrap_or_else(|| PathBuf::from("confab-gateway"))
}
