//! The mutation self-test: each deliberately broken gateway behaviour, in the scenario
//! that exercises it, must be caught by an invariant, and the failure must name the seed
//! and the command that replays it.

use confab_gateway::faults::Faults;
use confab_sim::{Options, Scenario};

fn caught(fault: &str, scenario: Scenario, cycles: u64, invariants: &[&str]) {
    let mut options = Options::new(scenario, 7);
    options.cycles = cycles;
    options.gateway_faults = Faults::only(fault).expect("a known fault");
    options.gateway_fault_names = vec![fault.to_owned()];
    let failure = match confab_sim::run(&options, &mut |_| {}) {
        Ok(summary) => panic!(
            "{fault} in {scenario} went unnoticed over {} cycles",
            summary.cycles
        ),
        Err(failure) => failure,
    };
    eprintln!("{fault}: {failure}");
    assert!(
        invariants.contains(&failure.violation.invariant),
        "{fault} was caught by {:?}, expected one of {invariants:?}",
        failure.violation.invariant
    );
    assert!(failure.replay.contains(&format!("--seed {}", options.seed)));
    assert!(failure.replay.contains(&format!("--gateway-fault {fault}")));
}

#[test]
fn dropped_dedup_is_caught() {
    caught(
        "no_msg_id_dedup",
        Scenario::DuplicateSends,
        300,
        &[
            "each message appended once",
            "gap-free, duplicate-free delivery",
        ],
    );
}

#[test]
fn skipped_replay_seq_is_caught() {
    caught(
        "skip_seq_on_replay",
        Scenario::DisconnectCycles,
        1_000,
        &[
            "gap-free, duplicate-free delivery",
            "every device catches up",
        ],
    );
}

#[test]
fn frame_delivered_twice_is_caught() {
    caught(
        "deliver_twice",
        Scenario::DisconnectCycles,
        100,
        &["no entry delivered twice"],
    );
}

#[test]
fn two_commits_in_one_epoch_are_caught() {
    caught(
        "two_commits_per_epoch",
        Scenario::CommitRace,
        40,
        &["one Commit per epoch", "epoch agreement", "no client error"],
    );
}

#[test]
fn ack_before_durable_is_caught() {
    caught(
        "ack_before_durable",
        Scenario::GatewayCrash,
        30,
        &[
            "no acked message lost",
            "every device catches up",
            "gap-free, duplicate-free delivery",
        ],
    );
}

#[test]
fn presence_shown_to_everyone_is_caught() {
    caught(
        "presence_to_everyone",
        Scenario::PresenceScrape,
        3,
        &["bots learn nothing about non-contacts"],
    );
}

#[test]
fn a_missing_per_target_limit_is_caught() {
    caught(
        "no_presence_target_limit",
        Scenario::PresenceScrape,
        10,
        &["probing is throttled per target"],
    );
}

#[test]
fn unverified_handshakes_are_caught() {
    caught(
        "no_handshake_verification",
        Scenario::HostileMember,
        200,
        &["the gateway refuses forged handshakes"],
    );
}
