//! `confab`: chat from the command line ([`confab_client::cli`] says how).

fn main() -> std::process::ExitCode {
    confab_client::cli::main()
}
