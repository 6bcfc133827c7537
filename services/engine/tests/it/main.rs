//! The engine's seams, one test binary: every implementation against the
//! same conformance checks (`conformance`), and the embedded ledger driven
//! through random interleavings (`embedded_ledger`).
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod conformance;
mod embedded_ledger;
