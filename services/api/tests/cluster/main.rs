//! The engine on real clusters: a 3-node RabbitMQ cluster and a Redis
//! Cluster of 3 masters and 3 replicas, started once for this test binary
//! by `scripts/cluster up` (beside the single-node services, which it never
//! touches) and torn down after. Two APIs and three workers run in this
//! process on the clusters, with the order queue in three partitions; a
//! storm goes over both APIs on six products while a node is killed with
//! SIGKILL: first the RabbitMQ node leading a partition, then a Redis
//! master. Every `202` must end as exactly one order row, the books must
//! balance, and the sale must go on.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use flashsale_engine::BackendUrls;
use flashsale_engine::redis_conn;
use flashsale_testkit::{self as common, Answer, TestEnv};
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::json;
use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const PRODUCTS: i64 = 6;
const STOCK: i32 = 150;
const PARTITIONS: u16 = 3;
const FENCED: i64 = 7;

/// The clusters of `scripts/cluster`, stopped and removed when dropped.
struct Clusters {
    dir: PathBuf,
    amqp_url: String,
    redis_url: String,
}

fn script() -> Command {
    Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/cluster"
    ))
}

impl Clusters {
    fn up() -> Self {
        // scripts/cluster's own default, so that a cluster already running
        // (whose nodes' pid files are there) is the one used.
        let dir = PathBuf::from("/tmp/flashsale-cluster");
        let mut clusters = Self {
            dir,
            amqp_url: String::new(),
            redis_url: String::new(),
        };
        clusters.start();
        clusters
    }

    /// `scripts/cluster up`: starts what is not running (a killed node
    /// rejoins) and waits until both clusters are healthy.
    fn start(&mut self) {
        let out = script().arg("up").arg(&self.dir).output().unwrap();
        assert!(
            out.status.success(),
            "scripts/cluster up failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(url) = line.strip_prefix("export AMQP_URL=") {
                self.amqp_url = url.to_owned();
            } else if let Some(url) = line.strip_prefix("export REDIS_URL=") {
                self.redis_url = url.to_owned();
            }
        }
        assert!(!self.amqp_url.is_empty() && !self.redis_url.is_empty());
    }

    fn rabbitmqctl(&self, node: u8, args: &[&str]) -> String {
        let out = Command::new("runuser")
            .args(["-u", "rabbitmq", "--", "env", "HOME=/var/lib/rabbitmq"])
            .arg("rabbitmqctl")
            .args(["-q", "-n", &format!("fsc{node}@localhost")])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The node (1–3) leading `queue`, asked of a node that answers.
    fn leader_of(&self, queue: &str) -> u8 {
        for asked in 1..=3 {
            let listing = self.rabbitmqctl(asked, &["list_queues", "name", "leader"]);
            for line in listing.lines() {
                let mut cols = line.split_whitespace();
                if cols.next() == Some(queue)
                    && let Some(leader) = cols.next()
                    && let Some(n) = leader.strip_prefix("fsc")
                {
                    return n[..1].parse().unwrap();
                }
            }
        }
        panic!("no node names the leader of {queue}");
    }

    /// The RabbitMQ cluster's running nodes, sorted.
    fn running_nodes(&self) -> Vec<String> {
        let status = self.rabbitmqctl(1, &["cluster_status", "--formatter", "json"]);
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        let mut nodes: Vec<String> = status["running_nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().to_owned())
            .collect();
        nodes.sort();
        nodes
    }

    fn kill(&self, pid_file: PathBuf) {
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let status = Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -9 {} failed", pid.trim());
    }

    fn kill_rabbit(&self, node: u8) {
        self.kill(self.dir.join(format!("rabbitmq/fsc{node}/pid")));
    }

    fn kill_redis(&self, port: u16) {
        self.kill(self.dir.join(format!("redis/{port}/redis.pid")));
    }

    fn on(&self, b: &BackendUrls) -> BackendUrls {
        BackendUrls {
            amqp_url: self.amqp_url.clone(),
            redis_url: self.redis_url.clone(),
            partitions: Some(PARTITIONS),
            ..b.clone()
        }
    }
}

impl Drop for Clusters {
    fn drop(&mut self) {
        let _ = script().arg("down").arg(&self.dir).output();
    }
}

/// A sale of [`PRODUCTS`] products on the clusters: two APIs, three workers.
struct Sale {
    env: TestEnv,
    apis: Vec<String>,
    /// Every final answer of the sale.
    answers: std::sync::Mutex<Vec<Answer>>,
    /// The `503`s (each retried) and when the last one came.
    unavailable: AtomicUsize,
    last_unavailable: std::sync::Mutex<Option<Instant>>,
    /// Keys answered `503` at least once: "not known to be accepted", so
    /// their order may still be booked without a `202`.
    unsure: std::sync::Mutex<HashSet<String>>,
}

async fn sale(clusters: &Clusters) -> Sale {
    let mut env = common::env().await;
    for id in 1..=PRODUCTS {
        env.seed(id, STOCK, None).await;
    }
    // Outside the storms, for the fence.
    env.seed(FENCED, 10, None).await;
    let on = clusters.on(&env.backends());
    let mut apis = Vec::new();
    for _ in 0..2 {
        apis.push(env.start_api_with(on.clone(), true).await);
    }
    for _ in 0..3 {
        env.start_worker_with(on.clone()).await;
    }
    Sale {
        env,
        apis,
        answers: std::sync::Mutex::default(),
        unavailable: AtomicUsize::new(0),
        last_unavailable: std::sync::Mutex::default(),
        unsure: std::sync::Mutex::default(),
    }
}

impl Sale {
    /// One buyer: retries a `503` with the same key (on the other API)
    /// until it gets another answer.
    async fn buy(&self, i: usize, key: &str) -> Answer {
        self.buy_product(i, (i as i64) % PRODUCTS + 1, key).await
    }

    async fn buy_product(&self, i: usize, product: i64, key: &str) -> Answer {
        let body = json!({"userId": format!("u{i}"), "productId": product, "quantity": 1});
        for attempt in 0..120 {
            let api = &self.apis[(i + attempt) % self.apis.len()];
            let answer = self.env.buy(api, Some(key), body.clone()).await;
            if answer.status != StatusCode::SERVICE_UNAVAILABLE {
                self.answers.lock().unwrap().push(answer.clone());
                return answer;
            }
            self.unavailable.fetch_add(1, Ordering::Relaxed);
            *self.last_unavailable.lock().unwrap() = Some(Instant::now());
            self.unsure.lock().unwrap().insert(key.to_owned());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("{key}: 503 for 30 s");
    }

    /// `n` buyers at `concurrency`; `midway` runs once a third have answered.
    async fn storm(&self, tag: &str, n: usize, midway: impl FnOnce()) -> Vec<Answer> {
        let answered = AtomicUsize::new(0);
        let midway = std::sync::Mutex::new(Some(midway));
        futures_util::stream::iter(0..n)
            .map(|i| {
                let (answered, midway) = (&answered, &midway);
                async move {
                    let answer = self.buy(i, &format!("{tag}-{i}")).await;
                    if answered.fetch_add(1, Ordering::Relaxed) == n / 3
                        && let Some(run) = midway.lock().unwrap().take()
                    {
                        run();
                    }
                    answer
                }
            })
            .buffer_unordered(64)
            .collect()
            .await
    }

    /// Every `202` of the sale is exactly one row, nothing else got one,
    /// the books balance; returns how many were accepted.
    async fn check(&self) -> usize {
        let answers = self.answers.lock().unwrap().clone();
        for a in &answers {
            // 200: a retry after a 503 whose first attempt was booked after all.
            assert!(
                [StatusCode::ACCEPTED, StatusCode::CONFLICT].contains(&a.status)
                    || (a.status == StatusCode::OK && a.body["status"] == "confirmed"),
                "{}: {} {}",
                a.key,
                a.status,
                a.body
            );
        }
        let accepted: Vec<String> = answers
            .iter()
            .filter(|a| [StatusCode::ACCEPTED, StatusCode::OK].contains(&a.status))
            .map(|a| a.key.clone())
            .collect();
        self.env.wait_for_rows(&accepted).await;
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT idempotency_key, status FROM orders")
                .fetch_all(&self.env.pool)
                .await
                .unwrap();
        let accepted: HashSet<String> = accepted.into_iter().collect();
        let unsure = self.unsure.lock().unwrap().clone();
        // A `503` after a lost confirm: the message got through, and the
        // units taken for it were given back before the answer (the
        // contract's rule). Its order is booked all the same: without a
        // `202` when nobody asked again (a probe), or answered on a retry
        // with the same key (`200` once the row is there).
        for (key, status) in &rows {
            assert!(
                status != "confirmed" || accepted.contains(key) || unsure.contains(key),
                "{key}: booked, never answered 202 or 503"
            );
        }
        // Each such order is at most one unit the counter gave out twice,
        // which ends as a `202` rejected `sold_out` by the worker.
        let booked_after_503 = rows
            .iter()
            .filter(|(key, status)| status == "confirmed" && unsure.contains(key))
            .count();
        let rejected = rows
            .iter()
            .filter(|(key, status)| status != "confirmed" && accepted.contains(key))
            .count();
        assert!(
            rejected <= booked_after_503,
            "{rejected} orders answered 202 were rejected, but only {booked_after_503} orders answered 503 were booked"
        );
        self.env.assert_invariants().await;
        accepted.len()
    }

    /// Remembers a key answered `503` (not retried here).
    fn unsure_if_unavailable(&self, answer: &Answer) {
        if answer.status == StatusCode::SERVICE_UNAVAILABLE {
            self.unsure.lock().unwrap().insert(answer.key.clone());
        }
    }

    /// How many `503`s there were and how long after `killed_at` the last
    /// one came: the sale goes on within seconds.
    fn outage_since(&self, killed_at: Instant) -> String {
        let n = self.unavailable.load(Ordering::Relaxed);
        match *self.last_unavailable.lock().unwrap() {
            Some(last) if last > killed_at => {
                let after = last - killed_at;
                assert!(
                    after < Duration::from_secs(20),
                    "503s for {after:?} after the kill"
                );
                format!("{n} answers 503 (retried), the last {after:.1?} after the kill")
            }
            _ => format!("{n} answers 503"),
        }
    }

    /// Once `killed` is set, buys `product` with a fresh key every 50 ms
    /// (no retry) until one is answered `202` or `409`: how long after the
    /// kill new buys were answered again.
    async fn answered_again_after(
        &self,
        product: i64,
        killed: &std::sync::Mutex<Option<Instant>>,
    ) -> Duration {
        let killed_at = loop {
            if let Some(at) = *killed.lock().unwrap() {
                break at;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        for n in 0.. {
            let api = &self.apis[n % self.apis.len()];
            let body = json!({"userId": format!("probe-{n}"), "productId": product, "quantity": 1});
            let key = format!("probe-{product}-{n}");
            let answer = self.env.buy(api, Some(&key), body).await;
            self.unsure_if_unavailable(&answer);
            if [StatusCode::ACCEPTED, StatusCode::CONFLICT].contains(&answer.status) {
                let after = killed_at.elapsed();
                self.answers.lock().unwrap().push(answer);
                return after;
            }
            assert!(
                killed_at.elapsed() < Duration::from_secs(30),
                "new buys still answered {} 30 s after the kill",
                answer.status
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        unreachable!()
    }

    /// The sale goes on: a buy answers `202` or `409` (not `503`) within
    /// `limit`, on each API; returns how long it took.
    async fn answers_again(&self, tag: &str, limit: Duration) -> Duration {
        let start = Instant::now();
        for (n, api) in self.apis.iter().enumerate() {
            for attempt in 0.. {
                let body = json!({"userId": format!("again-{n}"), "productId": 1 + n as i64, "quantity": 1});
                let key = format!("{tag}-again-{n}-{attempt}");
                let answer = self.env.buy(api, Some(&key), body).await;
                self.unsure_if_unavailable(&answer);
                if [StatusCode::ACCEPTED, StatusCode::CONFLICT].contains(&answer.status) {
                    self.answers.lock().unwrap().push(answer);
                    break;
                }
                assert!(
                    start.elapsed() < limit,
                    "{api}: still {} after {limit:?}",
                    answer.status
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        start.elapsed()
    }

    /// Buys until every unit is sold: units given back by failed requests
    /// and dead claims come back to the sale.
    async fn sell_out(&self, tag: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for round in 0.. {
            let left: i64 = sqlx::query_scalar(
                "SELECT COALESCE(SUM(stock), 0)::bigint FROM products WHERE id <= $1",
            )
            .bind(PRODUCTS)
            .fetch_one(&self.env.pool)
            .await
            .unwrap();
            if left == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "{left} units never sold again");
            self.storm(&format!("{tag}-{round}"), 60, || {}).await;
            self.check().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sale_survives_a_killed_rabbitmq_leader_and_a_killed_redis_master() {
    let mut clusters = Clusters::up();
    a_counter_derives_over_claims_in_several_slots(&clusters).await;
    a_backlog_over_partitions_books_every_order(&clusters).await;
    rabbitmq_leader_killed(&mut clusters).await;
    redis_master_killed(&mut clusters).await;
    redis_master_killed_under_load(&mut clusters).await;
}

/// The claims of a product's admitted orders hash to every slot of the
/// cluster: deriving its counter reads each claim's age over all of them.
/// (One pipeline of them failed with CROSSSLOT, so a product with two
/// unsettled orders in two slots was never reconciled: the units of dead
/// claims never came back.) Three claims of an API that is gone: all three
/// are dead, their units back.
async fn a_counter_derives_over_claims_in_several_slots(clusters: &Clusters) {
    use flashsale_engine::accept_log::{AcceptLog, AcceptRecord, Admit, RedisAcceptLog};
    use flashsale_engine::admission::{self, AdmissionCounters, Derived};
    let env = common::env().await;
    env.seed(1, 10, None).await;
    let ns = clusters.on(&env.backends()).namespace();
    let redis = redis_conn::connect(&clusters.redis_url).await.unwrap();
    let log = RedisAcceptLog::new(redis, ns.clone());
    let product = flashsale_engine::ProductId::new(1).unwrap();
    log.reset(product, 10).await.unwrap();
    let keys = ["claim-a", "claim-b", "claim-c"];
    let slots: HashSet<u16> = keys
        .iter()
        .map(|k| redis_conn::slots::key_slot(ns.accept_key(k).as_bytes()))
        .collect();
    assert!(slots.len() > 1, "the claims share one slot: {slots:?}");
    for k in keys {
        let request = flashsale_engine::OrderRequest::parse(
            format!(r#"{{"userId":"{k}","productId":1,"quantity":1}}"#).as_bytes(),
        )
        .unwrap();
        let record = AcceptRecord::pending(&request, chrono::Utc::now()).claimed_by("gone");
        let key = flashsale_engine::IdempotencyKey::parse(k).unwrap();
        let admitted = log.admit(&key, &record).await.unwrap();
        assert!(matches!(admitted, Admit::Claimed { .. }), "{admitted:?}");
    }
    assert_eq!(log.admission(product).await.unwrap().tokens, Some(7));
    let ledger = flashsale_engine::ledger::StockLedger::new(env.pool.clone());
    let derived = admission::derive(
        &log,
        &ledger,
        flashsale_engine::ProductId::new(1).unwrap(),
        false,
    )
    .await
    .unwrap();
    assert_eq!(
        derived,
        Derived::Set {
            tokens: 10,
            in_flight: 0
        }
    );
    env.finish().await;
}

/// 6,000 orders queued over the three partitions (leaders on three nodes,
/// so their deliveries reach a worker's one channel unevenly), then one
/// worker: every order books. Acking a batch `multiple` through its newest
/// tag once lost the deliveries still waiting in another partition's
/// consumer (301 of 20,000 in the cluster bench).
async fn a_backlog_over_partitions_books_every_order(clusters: &Clusters) {
    let mut env = common::env().await;
    for id in 1..=PRODUCTS {
        env.seed(id, 1_000, None).await;
    }
    let on = clusters.on(&env.backends());
    let api = env.start_api_with(on.clone(), true).await;
    let answers: Vec<Answer> = futures_util::stream::iter(0..6_000)
        .map(|i| {
            let (env, api) = (&env, &api);
            async move {
                let body = json!({"userId": format!("b{i}"), "productId": (i as i64) % PRODUCTS + 1, "quantity": 1});
                // A fresh quorum queue may nack a publish while its leader
                // settles: a buyer retries a 503 with the same key.
                let key = format!("backlog-{i}");
                let mut answer = env.buy(api, Some(&key), body.clone()).await;
                for _ in 0..5 {
                    if answer.status != StatusCode::SERVICE_UNAVAILABLE {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    answer = env.buy(api, Some(&key), body.clone()).await;
                }
                answer
            }
        })
        .buffer_unordered(100)
        .collect()
        .await;
    let accepted = common::accepted(&answers);
    let refused: Vec<_> = answers
        .iter()
        .filter(|a| a.status != StatusCode::ACCEPTED)
        .map(|a| (a.status, a.body.to_string()))
        .take(3)
        .collect();
    assert_eq!(accepted.len(), 6_000, "not accepted, e.g.: {refused:?}");
    env.start_worker_with(on).await;
    env.wait_for_rows(&accepted).await;
    env.assert_invariants().await;
    env.finish().await;
}

async fn rabbitmq_leader_killed(clusters: &mut Clusters) {
    let sale = sale(clusters).await;
    let ns = clusters.on(&sale.env.backends()).namespace();
    let queue = ns.order_queues()[0].clone();
    let leader = clusters.leader_of(&queue);
    let killed = std::sync::Mutex::new(None);
    // Product 3's orders go to partition 0 (3 mod 3).
    let (answers, again) = tokio::join!(
        sale.storm("rabbit", 1500, || {
            clusters.kill_rabbit(leader);
            *killed.lock().unwrap() = Some(Instant::now());
        }),
        sale.answered_again_after(3, &killed)
    );
    let killed_at = killed.lock().unwrap().expect("the node was never killed");
    assert_eq!(answers.len(), 1500);
    let outage = sale.outage_since(killed_at);
    let accepted = sale.check().await;
    assert!(accepted > 0);
    let back = sale.answers_again("rabbit", Duration::from_secs(30)).await;
    eprintln!(
        "RabbitMQ fsc{leader} (leader of {queue}) killed: {accepted} accepted, all booked once; new buys of its partition answered again {again:.1?} after the kill; {outage}; a buy after the storm answered in {back:?}"
    );
    // The killed node comes back and rejoins the cluster.
    clusters.start();
    assert_eq!(
        clusters.running_nodes(),
        ["fsc1@localhost", "fsc2@localhost", "fsc3@localhost"],
        "fsc{leader} did not rejoin"
    );
    sale.sell_out("rabbit-rest").await;
    sale.check().await;
    sale.env.finish().await;
}

async fn redis_master_killed(clusters: &mut Clusters) {
    let sale = sale(clusters).await;
    let redis = redis_conn::connect(&clusters.redis_url).await.unwrap();
    let before = redis_conn::masters(&redis).await.unwrap();
    assert_eq!(before.len(), 3, "{before:?}");
    // The master serving product 1's keys.
    let ns = clusters.on(&sale.env.backends()).namespace();
    let slot = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(ns.lock_key(1))
        .query_async::<u16>(&mut redis.clone())
        .await
        .unwrap();
    let victim = master_of_slot(&redis, slot).await;
    let port: u16 = victim.rsplit(':').next().unwrap().parse().unwrap();
    let killed = std::sync::Mutex::new(None);
    let (_, again) = tokio::join!(
        sale.storm("redis", 1500, || {
            clusters.kill_redis(port);
            *killed.lock().unwrap() = Some(Instant::now());
        }),
        sale.answered_again_after(1, &killed)
    );
    let killed_at = killed.lock().unwrap().expect("the master was never killed");
    let outage = sale.outage_since(killed_at);
    let accepted = sale.check().await;
    let back = sale.answers_again("redis", Duration::from_secs(30)).await;
    let after = redis_conn::masters(&redis).await.unwrap();
    assert_eq!(after.len(), 3, "a replica took over: {after:?}");
    assert!(
        after.iter().all(|m| m.address != victim),
        "{victim} still a master: {after:?}"
    );
    eprintln!(
        "Redis master {victim} killed: {accepted} accepted, all booked once; new buys of product 1 (on that master) answered again {again:.1?} after the kill; {outage}; a buy after the storm answered in {back:?}; masters now {:?}",
        after.iter().map(|m| &m.address).collect::<Vec<_>>()
    );

    // A promoted replica may have missed the last fence increments
    // (replication is asynchronous). Play that on a product of its own:
    // one order, then its counter taken back to 0. The next holder's stale
    // token is refused by PostgreSQL's fence, the worker raises the counter
    // past it, and the order books.
    let fence = |pool: &sqlx::PgPool| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT lock_fence FROM products WHERE id = $1")
                .bind(FENCED)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let first = sale.buy_product(0, FENCED, "fence-1").await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    sale.check().await;
    let fence_before = fence(&sale.env.pool).await;
    assert!(fence_before > 0);
    let mut conn = redis.clone();
    redis::cmd("SET")
        .arg(ns.fence_key(FENCED))
        .arg(0)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let second = sale.buy_product(1, FENCED, "fence-2").await;
    assert_eq!(second.status, StatusCode::ACCEPTED);
    sale.check().await;
    let fence_after = fence(&sale.env.pool).await;
    let counter: i64 = redis::cmd("GET")
        .arg(ns.fence_key(FENCED))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        fence_after > fence_before,
        "no write after the fence went back"
    );
    assert!(
        counter >= fence_after,
        "the counter ({counter}) was not raised past PostgreSQL's fence ({fence_after})"
    );

    // Started again, the old master rejoins as its successor's replica.
    clusters.start();
    let healed = redis_conn::masters(&redis).await.unwrap();
    assert_eq!(
        healed.iter().map(|m| m.replicas).sum::<u32>(),
        3,
        "{victim} did not rejoin as a replica: {healed:?}"
    );
    sale.sell_out("redis-rest").await;
    sale.check().await;
    sale.env.finish().await;
}

/// The address of the master serving `slot`.
async fn master_of_slot(redis: &redis_conn::Redis, slot: u16) -> String {
    let slots: Vec<redis::Value> =
        redis_conn::on_any_node(redis, redis::cmd("CLUSTER").arg("SLOTS").clone())
            .await
            .unwrap();
    for range in slots {
        let redis::Value::Array(parts) = range else {
            continue;
        };
        let (Ok(from), Ok(to)) = (
            redis::from_redis_value::<u16>(parts[0].clone()),
            redis::from_redis_value::<u16>(parts[1].clone()),
        ) else {
            continue;
        };
        if (from..=to).contains(&slot) {
            let redis::Value::Array(node) = &parts[2] else {
                break;
            };
            let host: String = redis::from_redis_value(node[0].clone()).unwrap();
            let port: u16 = redis::from_redis_value(node[1].clone()).unwrap();
            return format!("{host}:{port}");
        }
    }
    panic!("no master serves slot {slot}");
}

/// One answer of the storm under load: its product, when it came (seconds
/// after the storm began) and its status.
type Timed = (i64, f64, StatusCode);

/// Issue 25, item 1: a Redis master killed under load. One API and one
/// worker, six products (spread over the masters by their hash slots), a
/// storm of fresh buys at c=200 for 20 s (no retries: every answer
/// counts), the master holding product 1 killed 3 s in. The products on
/// the other masters are not slowed (the engine routes each slot to its
/// master on a connection of its own); buys of every product are answered
/// (`202` or `409`, not `503`) again within 12 s of the kill (the failover
/// itself takes about 3 s), second after second to the end of the storm;
/// every `202` is one row.
async fn redis_master_killed_under_load(clusters: &mut Clusters) {
    let mut env = common::env().await;
    for id in 1..=PRODUCTS {
        env.seed(id, 1_000_000, None).await;
    }
    let on = clusters.on(&env.backends());
    let api = env.start_api_with(on.clone(), true).await;
    env.start_worker_with(on.clone()).await;
    let redis = redis_conn::connect(&clusters.redis_url).await.unwrap();
    let ns = on.namespace();
    let mut master_of = std::collections::BTreeMap::new();
    for id in 1..=PRODUCTS {
        let slot = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(ns.tokens_key(id))
            .query_async::<u16>(&mut redis.clone())
            .await
            .unwrap();
        master_of.insert(id, master_of_slot(&redis, slot).await);
    }
    let victim = master_of[&1].clone();
    assert!(
        master_of.values().any(|m| *m != victim),
        "every product on one master: {master_of:?}"
    );
    let port: u16 = victim.rsplit(':').next().unwrap().parse().unwrap();
    let started = Instant::now();
    let (kill_at, end) = (Duration::from_secs(3), Duration::from_secs(20));
    let killer = async {
        tokio::time::sleep(kill_at).await;
        clusters.kill_redis(port);
    };
    let storm = futures_util::stream::iter(0..)
        .take_while(|_| std::future::ready(started.elapsed() < end))
        .map(|i: usize| {
            let (env, api) = (&env, &api);
            async move {
                let product = (i as i64) % PRODUCTS + 1;
                let body = json!({"userId": format!("l{i}"), "productId": product, "quantity": 1});
                let answer = env.buy(api, Some(&format!("load-{i}")), body).await;
                let at = started.elapsed().as_secs_f64();
                let status = answer.status;
                (answer, (product, at, status))
            }
        })
        .buffer_unordered(200)
        .collect::<Vec<_>>();
    let ((), answers) = tokio::join!(killer, storm);
    let timed: Vec<Timed> = answers.iter().map(|(_, t)| *t).collect();
    eprintln!(
        "Redis master {victim} (products {:?}) killed under load at {kill_at:?}; answered (202/409) per second, product by product:\n{}",
        master_of
            .iter()
            .filter(|(_, m)| **m == victim)
            .map(|(p, _)| p)
            .collect::<Vec<_>>(),
        rates_table(&timed, end)
    );
    let in_second = |product: i64, second: u64| -> (usize, usize) {
        let answers: Vec<StatusCode> = timed
            .iter()
            .filter(|(p, at, _)| *p == product && *at as u64 == second)
            .map(|(_, _, s)| *s)
            .collect();
        let unavailable = answers
            .iter()
            .filter(|s| **s == StatusCode::SERVICE_UNAVAILABLE)
            .count();
        (answers.len(), unavailable)
    };
    // The products on the surviving masters are not slowed by the
    // failover: in every second, at least half their rate before the kill
    // is answered. Their 503s are the buys whose keys hash to the killed
    // master (a third of the slots), until its replica takes over.
    for product in (1..=PRODUCTS).filter(|p| master_of[p] != victim) {
        let before: usize = (0..kill_at.as_secs())
            .map(|s| {
                let (n, u) = in_second(product, s);
                n - u
            })
            .sum::<usize>()
            / kill_at.as_secs() as usize;
        for second in kill_at.as_secs()..end.as_secs() - 1 {
            let (n, unavailable) = in_second(product, second);
            assert!(
                (n - unavailable) * 2 >= before && unavailable * 2 <= n,
                "product {product} (on {}, not killed) slowed in second {second}: {} answered, {unavailable} 503s, against {before}/s before the kill",
                master_of[&product],
                n - unavailable
            );
        }
    }
    // Every product is answered again within 12 s of the kill, and from
    // then on in every second, with at most one 503 in ten.
    let from = kill_at.as_secs() + 12;
    for product in 1..=PRODUCTS {
        for second in from..end.as_secs() - 1 {
            let (n, unavailable) = in_second(product, second);
            assert!(
                n > 0 && unavailable * 10 <= n,
                "product {product} (on {}) in second {second}: {unavailable} of {} answers 503",
                master_of[&product],
                n
            );
        }
    }
    for (answer, _) in &answers {
        assert!(
            [StatusCode::ACCEPTED, StatusCode::SERVICE_UNAVAILABLE].contains(&answer.status),
            "{}: {} {}",
            answer.key,
            answer.status,
            answer.body
        );
    }
    let all: Vec<Answer> = answers.into_iter().map(|(a, _)| a).collect();
    let accepted = common::accepted(&all);
    env.wait_for_rows(&accepted).await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    // A 503 is "not known to be accepted": its order may still book.
    assert!(
        (accepted.len()..=all.len()).contains(&(rows as usize)),
        "{rows} rows for {} accepted of {} answers",
        accepted.len(),
        all.len()
    );
    env.assert_invariants().await;
    clusters.start();
    env.finish().await;
}

/// Per product and second: answers that were not `503`, and `503`s.
fn rates_table(timed: &[Timed], end: Duration) -> String {
    let mut out = String::from("second ");
    for p in 1..=PRODUCTS {
        out.push_str(&format!("   p{p} ok/503"));
    }
    for second in 0..end.as_secs() {
        out.push_str(&format!("\n{second:>6} "));
        for p in 1..=PRODUCTS {
            let (ok, unavailable) = timed
                .iter()
                .filter(|(q, at, _)| *q == p && *at as u64 == second)
                .fold((0, 0), |(ok, u), (_, _, s)| {
                    if *s == StatusCode::SERVICE_UNAVAILABLE {
                        (ok, u + 1)
                    } else {
                        (ok + 1, u)
                    }
                });
            out.push_str(&format!(" {ok:>6}/{unavailable:<5}"));
        }
    }
    out
}
