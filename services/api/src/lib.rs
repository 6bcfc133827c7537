//! `flashsale-api`: the HTTP front door. Validates, de-duplicates by
//! `Idempotency-Key`, rejects sold-out products without touching the queue,
//! publishes durably to RabbitMQ and answers `202` only after the confirm.

pub mod catalog;
pub mod error;
pub mod routes;
pub mod state;

use axum::Router;
use flashsale_engine::BackendUrls;
use state::AppState;
use std::net::SocketAddr;
use tokio::net::TcpListener;

/// The API's configuration: the backends plus where to listen.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "flashsale-api", version, about = "Flash Sale Engine HTTP API")]
pub struct ApiConfig {
    #[command(flatten)]
    pub backends: BackendUrls,
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    #[arg(long, env = "API_ADDR", default_value = "0.0.0.0:3000")]
    pub api_addr: String,
}

/// Pending connections the kernel queues for us. A flash sale opens
/// hundreds of connections at once; std's default of 128 drops SYNs past it,
/// and those buyers wait a one-second retransmit.
const LISTEN_BACKLOG: u32 = 4096;

async fn listen(addr: &str) -> std::io::Result<TcpListener> {
    let addr = tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other("address resolves to nothing"))?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// A built API, bound to its port, ready to serve.
pub struct Application {
    listener: TcpListener,
    router: Router,
}

impl Application {
    /// Binds the port and starts the background connections; the backends
    /// may be unreachable (requests are answered `503` until they answer).
    pub async fn build(config: ApiConfig) -> anyhow::Result<Self> {
        let listener = listen(&config.api_addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.api_addr))?;
        let state = AppState::start(&config.backends)?;
        Ok(Self {
            listener,
            router: routes::router(state),
        })
    }

    /// The same API on embedded backends (`fsctl demo`), on `addr`.
    pub async fn embedded(
        backends: &flashsale_engine::embedded::EmbeddedBackends,
        addr: &str,
    ) -> anyhow::Result<Self> {
        let listener = listen(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        Ok(Self {
            listener,
            router: routes::router(AppState::embedded(backends)),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then finishes in-flight requests.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        tracing::info!(addr = %self.listener.local_addr()?, "flashsale-api listening");
        use axum::serve::ListenerExt;
        let listener = self.listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        axum::serve(listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await
    }
}
