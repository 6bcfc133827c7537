//! Bugs this project once had (or reviews feared), kept so that the
//! simulator can prove it finds each: with the `mutants` feature (set only
//! by `services/sim`'s tests) a mutant can be switched on for the current
//! thread, which is the one a simulated seed runs on; without it,
//! [`active`] is `false` and compiles away.

/// One injected bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutant {
    /// The API takes a buy's units in the request's own future (before
    /// issue 25): a client that hangs up mid-buy leaves its claim pending
    /// and its units withheld.
    HangUpLeak,
    /// The worker acks a batch before booking it: a worker that dies in
    /// between loses accepted orders.
    AckBeforeCommit,
    /// The worker acks a duplicate whose key's row has another body (before
    /// the simulator found it): a `202` gone without a trace.
    DuplicateDropped,
    /// The holds sweep without its status check (the embedded ledger's):
    /// an order paid, cancelled or expired already is expired again, its
    /// units back twice.
    SweepIgnoresStatus,
    /// A consumer of several partitions on one channel acks `multiple`
    /// through its newest tag (before c7e9d7c): a lower tag still waiting
    /// unseen in another partition's buffer is settled unprocessed and
    /// lost when the channel goes (found by a benchmark: 301 of 20,000).
    AckPastUnseen,
}

#[cfg(feature = "mutants")]
thread_local! {
    static ACTIVE: std::cell::Cell<Option<Mutant>> = const { std::cell::Cell::new(None) };
}

/// Whether `mutant` is switched on for this thread.
#[cfg(feature = "mutants")]
pub fn active(mutant: Mutant) -> bool {
    ACTIVE.with(|a| a.get() == Some(mutant))
}

/// Whether `mutant` is switched on: never, without the `mutants` feature.
#[cfg(not(feature = "mutants"))]
#[inline(always)]
pub fn active(_mutant: Mutant) -> bool {
    false
}

/// Switches `mutant` on (or every mutant off) for this thread.
#[cfg(feature = "mutants")]
pub fn switch(mutant: Option<Mutant>) {
    ACTIVE.with(|a| a.set(mutant));
}
