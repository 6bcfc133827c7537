//! Exit codes (the contract's) and the error that carries one.

use std::process::ExitCode;

/// Everything held.
pub const OK: u8 = 0;
/// An invariant is violated or an accepted order was lost.
pub const VIOLATION: u8 = 1;
/// Bad usage, or a component could not be reached.
pub const UNREACHABLE: u8 = 2;
/// Not drained in time: some orders are still pending.
pub const PENDING: u8 = 3;

/// A failure that ends the command with `code` and one line on stderr.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            code: UNREACHABLE,
            message: message.into(),
        }
    }
    /// A component could not be reached (the error names it and its URL).
    pub fn unreachable(e: impl std::fmt::Display) -> Self {
        Self {
            code: UNREACHABLE,
            message: e.to_string(),
        }
    }
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Self::unreachable(e)
    }
}

pub type Outcome = Result<u8, Failure>;

pub fn finish(outcome: Outcome) -> ExitCode {
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("fsctl: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
