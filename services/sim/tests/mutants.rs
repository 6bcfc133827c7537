//! Proof that the simulator finds bugs: each mutant (a bug from this
//! project's history, `flashsale_engine::mutants`) is switched on for the
//! seeds of one run, and some seed within the first 50 must break an
//! invariant. Prints how many seeds it took.

use flashsale_engine::mutants::{Mutant, switch};
use flashsale_sim::run_seed;

/// A mutant must be caught within this many seeds.
const WITHIN: u64 = 50;

/// The first seed that catches `mutant`, and what it broke.
fn seeds_to_find(mutant: Mutant) -> Option<(u64, String)> {
    switch(Some(mutant));
    let found = (1..=WITHIN).find_map(|seed| {
        let outcome = run_seed(seed);
        outcome.violation.map(|v| (seed, v.to_string()))
    });
    switch(None);
    found
}

fn assert_found(mutant: Mutant) {
    match seeds_to_find(mutant) {
        Some((seed, broke)) => eprintln!("{mutant:?}: found by seed {seed}: {broke}"),
        None => panic!("{mutant:?} survived {WITHIN} seeds"),
    }
}

#[test]
fn a_buy_whose_client_hangs_up_leaking_its_claim_is_found() {
    assert_found(Mutant::HangUpLeak);
}

#[test]
fn an_ack_before_the_commit_is_found() {
    assert_found(Mutant::AckBeforeCommit);
}

#[test]
fn a_second_body_dropped_as_a_duplicate_is_found() {
    assert_found(Mutant::DuplicateDropped);
}

#[test]
fn a_holds_sweep_without_its_status_check_is_found() {
    assert_found(Mutant::SweepIgnoresStatus);
}

#[test]
fn a_multiple_ack_past_an_unseen_delivery_is_found() {
    assert_found(Mutant::AckPastUnseen);
}
