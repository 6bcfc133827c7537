//! Test support: each test runs in a scratch database and namespace of its
//! own on the real PostgreSQL, Redis and RabbitMQ, with the API and workers
//! in-process. A service that does not answer fails the test, naming it.
#![allow(
    clippy::unwrap_used,
    clippy::missing_panics_doc,
    clippy::disallowed_methods
)]

use flashsale_api::{ApiConfig, Application, RunningApi};
use flashsale_engine::queue::rabbitmq as broker;
use flashsale_engine::scratch::Scratch;
use flashsale_engine::{BackendUrls, postgres, redis_conn};
use flashsale_worker::{RunningWorker, Worker, WorkerConfig};
use futures_util::StreamExt;
use lapin::options::ConfirmSelectOptions;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The servers under test: the contract's defaults, or the environment's.
pub fn servers() -> BackendUrls {
    let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    BackendUrls {
        database_url: var(
            "DATABASE_URL",
            flashsale_engine::config::DEFAULT_DATABASE_URL,
        ),
        redis_url: var("REDIS_URL", flashsale_engine::config::DEFAULT_REDIS_URL),
        amqp_url: var("AMQP_URL", flashsale_engine::config::DEFAULT_AMQP_URL),
        namespace: String::new(),
        partitions: None,
    }
}

const HOW_TO_START: &str = "the real-service tests never skip: run scripts/test, which starts it";

async fn require_services(servers: &BackendUrls) {
    if let Err(e) = postgres::ensure_database(&flashsale_engine::scratch::with_database(
        &servers.database_url,
        "postgres",
    ))
    .await
    {
        panic!("PostgreSQL is not answering: {e} ({HOW_TO_START})");
    }
    if let Err(e) = redis_conn::connect(&servers.redis_url).await {
        panic!("Redis is not answering: {e} ({HOW_TO_START})");
    }
    match broker::connect(&servers.amqp_url, "flashsale-test-probe").await {
        Ok(c) => {
            let _ = c.close(200, "probe".into()).await;
        }
        Err(e) => panic!("RabbitMQ is not answering: {e} ({HOW_TO_START})"),
    }
}

pub struct TestEnv {
    pub scratch: Scratch,
    pub pool: PgPool,
    pub http: reqwest::Client,
    apis: Vec<RunningApi>,
    workers: Vec<RunningWorker>,
}

pub async fn env() -> TestEnv {
    flashsale_engine::telemetry::init();
    let servers = servers();
    require_services(&servers).await;
    let scratch = Scratch::new(&servers);
    let pool = postgres::connect_and_migrate(&scratch.backends.database_url, 4)
        .await
        .unwrap();
    TestEnv {
        scratch,
        pool,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(512)
            .build()
            .unwrap(),
        apis: Vec::new(),
        workers: Vec::new(),
    }
}

/// What one `POST /buy` got back.
#[derive(Debug, Clone)]
pub struct Answer {
    pub key: String,
    pub status: StatusCode,
    pub body: Value,
    pub retry_after: Option<String>,
}

/// The keys of the answers that were `202`.
pub fn accepted(answers: &[Answer]) -> Vec<String> {
    answers
        .iter()
        .filter(|a| a.status == StatusCode::ACCEPTED)
        .map(|a| a.key.clone())
        .collect()
}

impl TestEnv {
    pub fn backends(&self) -> BackendUrls {
        self.scratch.backends.clone()
    }

    pub async fn seed(&self, id: i64, stock: i32, per_user_limit: Option<i32>) {
        sqlx::query(
            "INSERT INTO products (id, name, stock, seeded_stock, max_per_order, per_user_limit)
             VALUES ($1, $2, $3, $3, 10, $4)",
        )
        .bind(id)
        .bind(format!("product {id}"))
        .bind(stock)
        .bind(per_user_limit)
        .execute(&self.pool)
        .await
        .unwrap();
    }

    /// Starts an API on a free port and waits until it is ready.
    pub async fn start_api(&mut self) -> String {
        self.start_api_with(self.backends(), true).await
    }

    pub async fn start_api_with(&mut self, backends: BackendUrls, wait_ready: bool) -> String {
        self.start_api_config(ApiConfig::new(backends, "127.0.0.1:0"), wait_ready)
            .await
    }

    /// Starts an API with this configuration (its limits, say).
    pub async fn start_api_config(&mut self, config: ApiConfig, wait_ready: bool) -> String {
        let app = Application::build(config).await.unwrap();
        let api = RunningApi::spawn(app).unwrap();
        let url = api.url.clone();
        if wait_ready {
            api.wait_ready(Duration::from_secs(20)).await.unwrap();
        }
        self.apis.push(api);
        url
    }

    pub async fn start_worker(&mut self) {
        self.start_worker_with(self.backends()).await;
    }

    pub async fn start_worker_with(&mut self, backends: BackendUrls) {
        let mut config = WorkerConfig::new(backends);
        config.worker_id = Some(format!("test-worker-{}", self.workers.len()));
        let worker = Worker::connect(config).await.unwrap();
        self.workers.push(RunningWorker::spawn(worker, None));
    }

    /// Starts a worker whose PostgreSQL connections go through `forwarder`.
    pub async fn start_worker_through_postgres(&mut self, forwarder: &Forwarder) {
        let mut backends = self.backends();
        backends.database_url = flashsale_engine::scratch::with_database(
            &format!("postgres://postgres@{}", forwarder.addr),
            &self.scratch.database,
        );
        self.start_worker_with(backends).await;
    }

    /// Kills every worker abruptly: no ack, no heartbeat removal.
    pub async fn kill_workers(&mut self) {
        for w in self.workers.drain(..) {
            w.kill().await;
        }
    }

    /// Stops every worker gracefully (they finish and ack what they hold).
    pub async fn stop_workers(&mut self) {
        for w in self.workers.drain(..) {
            w.stop().await.unwrap();
        }
    }

    /// `GET url`, its body as text.
    pub async fn get_text(&self, url: &str) -> String {
        self.http
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `GET url`, its body as JSON.
    pub async fn get_json(&self, url: &str) -> Value {
        self.http
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn buy(&self, base: &str, key: Option<&str>, body: Value) -> Answer {
        let mut request = self.http.post(format!("{base}/buy")).json(&body);
        if let Some(k) = key {
            request = request.header("Idempotency-Key", k);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let key = body["orderId"].as_str().or(key).unwrap_or("").to_owned();
        Answer {
            key,
            status,
            body,
            retry_after,
        }
    }

    /// `n` buys at `concurrency`, each with its own key; `user(i)` names the buyer.
    pub async fn storm(
        &self,
        base: &str,
        product: i64,
        n: usize,
        concurrency: usize,
        user: impl Fn(usize) -> String,
    ) -> Vec<Answer> {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        futures_util::stream::iter(0..n)
            .map(|i| {
                let key = format!("storm-{}-{i}", &tag[..8]);
                let body = json!({"userId": user(i), "productId": product, "quantity": 1});
                async move { self.buy(base, Some(&key), body).await }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await
    }

    /// Waits until every key has its order row; fails naming the missing ones.
    pub async fn wait_for_rows(&self, keys: &[String]) {
        let wanted: HashSet<&String> = keys.iter().collect();
        for _ in 0..600 {
            let found: Vec<String> = sqlx::query_scalar(
                "SELECT idempotency_key FROM orders WHERE idempotency_key = ANY($1)",
            )
            .bind(keys)
            .fetch_all(&self.pool)
            .await
            .unwrap();
            if found.len() == wanted.len() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("accepted orders never got a row");
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    pub async fn stock(&self, product: i64) -> i32 {
        sqlx::query_scalar("SELECT stock FROM products WHERE id = $1")
            .bind(product)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Invariants 1, 2 and 5 of the contract (3 is the primary key): booked
    /// units are those of orders confirmed, held or paid.
    pub async fn assert_invariants(&self) {
        let ledger: Vec<(i64, i32, i32, i64)> = sqlx::query_as(
            "SELECT p.id, p.seeded_stock, p.stock,
                    COALESCE(SUM(o.quantity) FILTER (WHERE o.status IN ('confirmed', 'held', 'paid')), 0)::bigint
             FROM products p LEFT JOIN orders o ON o.product_id = p.id GROUP BY p.id",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap();
        for (id, seeded, stock, confirmed) in ledger {
            assert!(stock >= 0, "product {id}: stock {stock} below zero");
            assert_eq!(
                i64::from(seeded),
                i64::from(stock) + confirmed,
                "product {id}: seeded {seeded} != stock {stock} + confirmed {confirmed}"
            );
        }
        let over: i64 = self
            .count(
                "SELECT count(*) FROM (SELECT o.product_id, o.user_id FROM orders o
                   JOIN products p ON p.id = o.product_id
                  WHERE o.status IN ('confirmed', 'held', 'paid') AND p.per_user_limit IS NOT NULL
                  GROUP BY o.product_id, o.user_id, p.per_user_limit
                 HAVING SUM(o.quantity) > p.per_user_limit) x",
            )
            .await;
        assert_eq!(over, 0, "a user holds more than the per-user limit");
    }

    /// Publishes a raw message to the order queue, confirmed.
    pub async fn publish_raw(&self, message_id: &str, payload: &[u8]) {
        self.publish_raw_all(&[(message_id.to_owned(), payload.to_vec())])
            .await;
    }

    /// Publishes raw messages to the order queue in order, each confirmed,
    /// on one connection.
    pub async fn publish_raw_all(&self, messages: &[(String, Vec<u8>)]) {
        let conn = broker::connect(&self.scratch.backends.amqp_url, "test-publisher")
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let ns = self.scratch.backends.namespace();
        broker::declare_queues(&channel, &ns).await.unwrap();
        for (message_id, payload) in messages {
            // Routed as the API routes it: by the payload's product, if any.
            let product = serde_json::from_slice::<Value>(payload)
                .ok()
                .and_then(|v| v["productId"].as_i64())
                .unwrap_or(0);
            broker::publish_confirmed(&channel, &ns.queue_for(product), message_id, payload, None)
                .await
                .unwrap();
        }
        let _ = conn.close(200, "done".into()).await;
    }

    /// The dead letters, `(message id, reason)`, once there are `n` of them
    /// (fails after 30 s naming what is there).
    pub async fn dead_letters(&self, n: usize) -> Vec<(String, String)> {
        let ns = self.scratch.backends.namespace();
        let mut seen = Vec::new();
        for _ in 0..300 {
            if self.queue_depth(true).await as usize >= n {
                seen = flashsale_engine::queue::peek_dead_letters(
                    &self.scratch.backends.amqp_url,
                    &ns,
                    n + 10,
                )
                .await
                .unwrap()
                .into_iter()
                .map(|d| {
                    (
                        d.message_id.unwrap_or_default(),
                        d.reason.unwrap_or_default(),
                    )
                })
                .collect();
                if seen.len() >= n {
                    return seen;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("expected {n} dead letters, found {seen:?}");
    }

    /// Ready messages in the order queues (every partition), or in the DLQ.
    pub async fn queue_depth(&self, dead_letters: bool) -> u32 {
        let conn = broker::connect(&self.scratch.backends.amqp_url, "test-probe")
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        let ns = self.scratch.backends.namespace();
        broker::declare_queues(&channel, &ns).await.unwrap();
        let queues = if dead_letters {
            vec![ns.dead_letter_queue()]
        } else {
            ns.order_queues()
        };
        let mut ready = 0;
        for queue in queues {
            ready += broker::queue_stats(&channel, &queue).await.unwrap().0;
        }
        let _ = conn.close(200, "done".into()).await;
        ready
    }

    /// Stops everything and removes the scratch database, queues and keys.
    pub async fn finish(mut self) {
        self.stop_workers().await;
        for a in self.apis.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(15), a.stop()).await;
        }
        self.pool.close().await;
        self.scratch.remove().await.unwrap();
    }
}

/// A TCP forwarder between a client and a server that a test can cut and
/// restore, to play a broker that goes away without stopping the shared one,
/// or black-hole, to play a peer that goes silent without closing.
pub struct Forwarder {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    /// New links are born black-holed while this is set.
    silent: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<Link>>>,
    accept: JoinHandle<()>,
}

struct Link {
    task: JoinHandle<()>,
    blackholed: Arc<AtomicBool>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Copies one direction until either side closes; once black-holed, stops
/// forwarding for good but keeps both sockets open.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    blackholed: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if blackholed.load(Ordering::SeqCst) {
            let _keep = (from, to);
            std::future::pending::<()>().await;
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if blackholed.load(Ordering::SeqCst) {
            continue; // swallowed: the peer goes silent
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Forwarder {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let silent = Arc::new(AtomicBool::new(false));
        let links: Arc<Mutex<Vec<Link>>> = Arc::default();
        let (o, q, l) = (open.clone(), silent.clone(), links.clone());
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if !o.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is refused by closing it
                }
                let blackholed = Arc::new(AtomicBool::new(q.load(Ordering::SeqCst)));
                let hole = blackholed.clone();
                let task = tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(target).await {
                        let (in_read, in_write) = inbound.into_split();
                        let (out_read, out_write) = outbound.into_split();
                        tokio::join!(
                            forward(in_read, out_write, hole.clone()),
                            forward(out_read, in_write, hole),
                        );
                    }
                });
                l.lock().unwrap().push(Link { task, blackholed });
            }
        });
        Self {
            addr,
            open,
            silent,
            links,
            accept,
        }
    }

    /// Closes every open connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.task.abort();
        }
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.silent.store(false, Ordering::SeqCst);
    }

    /// The peer goes silent: every open connection stops forwarding for good
    /// (its sockets stay open, nothing is answered), and so do new ones
    /// until [`Forwarder::restore`].
    pub fn go_silent(&self) {
        self.silent.store(true, Ordering::SeqCst);
        for link in self.links.lock().unwrap().iter() {
            link.blackholed.store(true, Ordering::SeqCst);
        }
    }

    /// The AMQP URL that goes through this forwarder.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }
}

/// The RabbitMQ server's address, from the AMQP URL under test.
pub fn amqp_target() -> SocketAddr {
    let url = servers().amqp_url;
    let host = url
        .split('@')
        .nth(1)
        .and_then(|h| h.split('/').next())
        .unwrap_or("127.0.0.1:5672");
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5672")
    };
    std::net::ToSocketAddrs::to_socket_addrs(&host)
        .unwrap()
        .next()
        .unwrap()
}

/// The PostgreSQL server's address, from the database URL under test.
pub fn postgres_target() -> SocketAddr {
    let url = servers().database_url;
    let rest = url.split("://").nth(1).unwrap_or("127.0.0.1:5432");
    let host = rest.rsplit('@').next().unwrap_or(rest);
    let host = host.split(['/', '?']).next().unwrap_or("127.0.0.1:5432");
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5432")
    };
    std::net::ToSocketAddrs::to_socket_addrs(&host)
        .unwrap()
        .next()
        .unwrap()
}

/// A child process stopped when the guard drops (SIGTERM, SIGKILL after
/// 10 s), so that a test that fails midway leaves nothing running.
pub struct Stopped(pub std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        if !matches!(self.0.try_wait(), Ok(None)) {
            return;
        }
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..100 {
            if !matches!(self.0.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends SIGTERM to `child` and waits (blocking, up to 10 s) for it to exit.
pub fn terminate(child: &mut std::process::Child) -> Option<std::process::ExitStatus> {
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -TERM failed");
    for _ in 0..100 {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}
