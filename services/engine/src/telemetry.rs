//! Logging: `RUST_LOG` (default `info`) to stderr.

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
