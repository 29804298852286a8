//! The `confab` command line with one deliberately broken behaviour switched on, for the
//! self-test of the conformance suite's client mode (`tests/conformance_client.rs`): it
//! shows that each broken behaviour fails a client case. Never use it to chat.
//!
//! ```text
//! confab_with_faults FAULT [confab arguments...]
//! ```
//!
//! FAULT is one of [`confab_client::faults::Faults::NAMES`].

use std::process::ExitCode;

use confab_client::faults::Faults;

fn main() -> ExitCode {
    let mut args = std::env::args_os();
    let program = args.next().unwrap_or_default();
    let name = args.next().unwrap_or_default();
    let Some(faults) = name.to_str().and_then(Faults::only) else {
        eprintln!(
            "usage: confab_with_faults FAULT [confab arguments...]\nFAULT: one of {}",
            Faults::NAMES.join(", ")
        );
        return ExitCode::from(2);
    };
    confab_client::cli::run_with_faults(std::iter::once(program).chain(args), faults)
}
