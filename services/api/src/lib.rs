//! `flashsale-api`: the HTTP front door. Validates, de-duplicates by
//! `Idempotency-Key`, rejects sold-out products without touching the queue,
//! publishes durably to RabbitMQ and answers `202` only after the confirm.

pub mod booked_keys;
pub mod catalog;
pub mod error;
pub mod first_requests;
pub mod gate;
pub mod process;
pub mod routes;
pub mod serve;
pub mod state;
pub mod watchers;

use axum::Router;
use flashsale_engine::BackendUrls;
use flashsale_engine::config::parse_duration;
use flashsale_engine::identity::AuthConfig;
use flashsale_engine::rate_limit::RateConfig;
use state::AppState;
use std::net::SocketAddr;
use std::time::Duration;
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
    #[command(flatten)]
    pub limits: HttpLimits,
    #[command(flatten)]
    pub access: Access,
}

/// Who may buy and how often (contract v3, "Identity and abuse"): both off
/// by default.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Access {
    #[command(flatten)]
    pub auth: AuthConfig,
    #[command(flatten)]
    pub rates: RateConfig,
}

/// What one client may hold of the API: the contract's HTTP limits.
#[derive(Debug, Clone, Copy, clap::Args)]
#[command(next_help_heading = "HTTP limits")]
pub struct HttpLimits {
    /// A connection that has not sent a whole request head by then is closed.
    #[arg(long, env = "API_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// A body not fully read by then is answered 408 request_timeout.
    #[arg(long, env = "API_BODY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub body_timeout: Duration,
    /// Open client connections beyond this wait until some close.
    #[arg(long, env = "API_MAX_CONNECTIONS", default_value_t = 20_000)]
    pub max_connections: usize,
    /// Buys in progress beyond this are answered 503 at once (load shedding).
    #[arg(long, env = "API_MAX_INFLIGHT", default_value_t = 4096)]
    pub max_inflight: usize,
    /// Order event streams (`GET /orders/{id}/events`) open at once; beyond
    /// it they are answered 503.
    #[arg(long, env = "API_MAX_STREAMS", default_value_t = 10_000)]
    pub max_streams: usize,
    /// Order event streams one buyer (the token's sub, else the client
    /// address) may hold open; beyond it 429 rate_limited.
    #[arg(long, env = "API_STREAMS_PER_BUYER", default_value_t = 4)]
    pub streams_per_buyer: usize,
    /// A stream ends after this long even if its order is not final yet
    /// (the client reconnects and gets the status afresh).
    #[arg(long, env = "API_STREAM_MAX", default_value = "1h", value_parser = parse_duration)]
    pub stream_max: Duration,
    /// Order reads (`GET /orders/{id}` and the streams' reads) running at
    /// once against PostgreSQL; beyond it they are answered 503 at once, so
    /// reads never take the connections pays and cancels need.
    #[arg(long, env = "API_MAX_READS", default_value_t = 8)]
    pub max_reads: usize,
    /// An idle keep-alive connection is closed after this long (the
    /// contract's 60 s; not a setting, shortened only by tests).
    #[arg(skip = serve::IDLE_TIMEOUT)]
    pub idle_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            max_connections: 20_000,
            max_inflight: 4096,
            max_streams: 10_000,
            streams_per_buyer: 4,
            stream_max: Duration::from_secs(3600),
            max_reads: 8,
            idle_timeout: serve::IDLE_TIMEOUT,
        }
    }
}

impl HttpLimits {
    fn connections(&self) -> serve::ConnectionLimits {
        serve::ConnectionLimits {
            header_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
            max_connections: self.max_connections,
        }
    }
}

impl ApiConfig {
    /// The contract's defaults for everything but the backends and address.
    pub fn new(backends: BackendUrls, api_addr: &str) -> Self {
        Self {
            backends,
            api_addr: api_addr.to_owned(),
            limits: HttpLimits::default(),
            access: Access::default(),
        }
    }
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
    limits: HttpLimits,
    /// The tasks of buys that outlive their client, waited for at the end.
    process: process::Process,
}

/// Refuses to start with another `FLASHSALE_PARTITIONS` than the one
/// recorded in PostgreSQL, when PostgreSQL answers now (if it does not, the
/// catalog checks once it does, and loads nothing on a mismatch).
async fn refuse_other_partitions(backends: &BackendUrls) -> anyhow::Result<()> {
    let connect = flashsale_engine::postgres::connect_and_migrate(&backends.database_url, 1);
    if let Ok(Ok(pool)) = tokio::time::timeout(Duration::from_secs(3), connect).await {
        let checked =
            flashsale_engine::postgres::check_partitions(&pool, &backends.namespace()).await;
        pool.close().await;
        if let Err(flashsale_engine::postgres::PartitionsError::Mismatch(m)) = checked {
            return Err(m.into());
        }
    }
    Ok(())
}

impl Application {
    /// Binds the port and starts the background connections; the backends
    /// may be unreachable (requests are answered `503` until they answer).
    pub async fn build(config: ApiConfig) -> anyhow::Result<Self> {
        let listener = listen(&config.api_addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.api_addr))?;
        refuse_other_partitions(&config.backends).await?;
        let state = AppState::start(&config.backends, &config.limits, &config.access)?;
        Ok(Self {
            listener,
            process: state.process.clone(),
            router: routes::router(state),
            limits: config.limits,
        })
    }

    /// The same API on embedded backends (`fsctl demo`), on `addr`.
    pub async fn embedded(
        backends: &flashsale_engine::embedded::EmbeddedBackends,
        addr: &str,
        access: &Access,
    ) -> anyhow::Result<Self> {
        let listener = listen(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        let limits = HttpLimits::default();
        let state = AppState::embedded(backends, &limits, access)?;
        Ok(Self {
            listener,
            process: state.process.clone(),
            router: routes::router(state),
            limits,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then finishes in-flight requests,
    /// and the buys whose client hung up (each at most
    /// [`serve::DRAIN_TIMEOUT`]): a graceful stop leaves no units taken and
    /// unpublished, and no publish unmarked.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        tracing::info!(addr = %self.listener.local_addr()?, "flashsale-api listening");
        serve::serve(
            self.listener,
            self.router,
            self.limits.connections(),
            shutdown,
        )
        .await?;
        if !self.process.wind_down(serve::DRAIN_TIMEOUT).await {
            tracing::warn!(
                "buys whose client hung up still running after {:?}; ending them",
                serve::DRAIN_TIMEOUT
            );
        }
        Ok(())
    }
}

/// An API served on a task of this process (`fsctl demo`, `fsctl doctor`,
/// the tests): where it listens, and how to stop it.
pub struct RunningApi {
    pub url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningApi {
    /// Serves `app` on a task until [`RunningApi::stop`] (or drop).
    pub fn spawn(app: Application) -> std::io::Result<Self> {
        let url = format!("http://{}", app.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async move {
            let _ = stopped.await;
        }));
        Ok(Self {
            url,
            stop: Some(stop),
            task,
        })
    }

    /// Waits until `/health/ready` answers `200`, at most `within`.
    pub async fn wait_ready(&self, within: Duration) -> Result<(), String> {
        let addr = self.url.trim_start_matches("http://").to_owned();
        let ready = async {
            loop {
                if answers_ready(&addr).await {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(within, ready)
            .await
            .map_err(|_| format!("the API at {} did not become ready in {within:?}", self.url))
    }

    /// Stops accepting, lets the requests in progress finish, and returns.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for RunningApi {
    fn drop(&mut self) {
        if self.stop.is_some() {
            self.task.abort();
        }
    }
}

/// One `GET /health/ready` over a fresh connection: `200` or not.
async fn answers_ready(addr: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        tcp.write_all(b"GET /health/ready HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut head = [0u8; 12];
        tcp.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_secs(2), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}
