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

    /// A backend failed: `e` and each of its causes, once.
    pub fn from_error(e: &(dyn std::error::Error + 'static)) -> Self {
        Self::unreachable(flashsale_engine::telemetry::with_causes(e))
    }
}

/// Each error a command can meet maps to its exit code here, explicitly: a
/// backend that fails or cannot be reached is `2` with its message (which
/// names the component and, where it has one, the URL tried) and its causes.
macro_rules! unreachable_on {
    ($($error:ty),* $(,)?) => {$(
        impl From<$error> for Failure {
            fn from(e: $error) -> Self {
                Self::from_error(&e)
            }
        }
    )*};
}

unreachable_on!(
    flashsale_engine::seams::BackendFailed,
    flashsale_engine::admission::AdmissionError,
    flashsale_engine::ledger::LedgerError,
    flashsale_engine::postgres::DatabaseError,
    flashsale_engine::redis_conn::RedisUnreachable,
    flashsale_engine::queue::rabbitmq::BrokerError,
    flashsale_engine::queue::rabbitmq::PublishError,
    sqlx::Error,
    redis::RedisError,
    lapin::Error,
    reqwest::Error,
);

/// Writing the output failed (a closed pipe): nothing more can be said.
impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Self {
            code: UNREACHABLE,
            message: format!("cannot write the output: {e}"),
        }
    }
}

/// A report that cannot be encoded is a bug in fsctl, not the user's or a
/// backend's fault; it still ends the command with one line.
impl From<serde_json::Error> for Failure {
    fn from(e: serde_json::Error) -> Self {
        Self {
            code: UNREACHABLE,
            message: format!("internal error: cannot encode the report: {e}"),
        }
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

#[cfg(test)]
mod tests {
    use flashsale_engine::telemetry::with_causes;

    /// An error over a refused connection, whose message shows its cause or not.
    #[derive(Debug)]
    struct Outer {
        shows_cause: bool,
        cause: std::io::Error,
    }

    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            if self.shows_cause {
                write!(f, "the ledger failed: {}", self.cause)
            } else {
                write!(f, "cannot reach the ledger")
            }
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.cause)
        }
    }

    fn refused(shows_cause: bool) -> Outer {
        let cause =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        Outer { shows_cause, cause }
    }

    #[test]
    fn every_cause_is_printed_once() {
        assert_eq!(
            with_causes(&refused(false)),
            "cannot reach the ledger: connection refused"
        );
        assert_eq!(
            with_causes(&refused(true)),
            "the ledger failed: connection refused"
        );
    }
}
