//! Logging: `RUST_LOG` (default `info`) to stderr.

use tracing_subscriber::EnvFilter;

/// Installs the log subscriber once; later calls (tests) are harmless.
pub fn init() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx::postgres::notice=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
