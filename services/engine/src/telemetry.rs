//! Logging: `RUST_LOG` (default `info`) to stderr; an error as one line.

use tracing_subscriber::EnvFilter;

/// Installs the log subscriber once; later calls (tests) are harmless.
pub fn init() {
    init_with_default("info,sqlx::postgres::notice=warn");
}

/// Like [`init`], with `default` as the filter when `RUST_LOG` is unset.
pub fn init_with_default(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// `e: cause: cause…`, each cause once: one that the message before it
/// already shows (an error that prints its source, as `BackendFailed` and
/// `LedgerError` do for their logs) is not repeated.
pub fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}
