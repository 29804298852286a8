//! `confab-gateway`: the Confab reference gateway.
//!
//! The server itself lands with the gateway issue (sessions, durable log, resume and
//! replay, commit sequencing). Until then this binary states what is coming and which
//! parts of the protocol already exist, so the README's first command works today.

use std::process::ExitCode;

const USAGE: &str = "\
usage: confab-gateway serve [--config FILE] [--listen ADDR] [--db PATH_OR_URL]

The reference gateway is not implemented yet. What exists today:
  spec/SPEC.md        the normative protocol, version 1
  confab-spec         typed frames, strict CBOR codec, identity, client session
  vectors/            test vectors for other implementations

Coming with the gateway: GET /v1/ws, /healthz, /metrics, /v1/info on an embedded
SQLite store (WAL), with PostgreSQL for several nodes.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => {
            println!(
                "confab-gateway {}: protocol version {}",
                env!("CARGO_PKG_VERSION"),
                confab_spec::limits::PROTOCOL_VERSION
            );
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some("--help" | "-h" | "help") | None => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("confab-gateway: unknown command `{other}`\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
