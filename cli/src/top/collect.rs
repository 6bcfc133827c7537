//! Background collectors: one task per source, each polling with a timeout
//! and sending what it found (or why it could not) as an event. They read
//! through the same code as `fsctl inspect` and `fsctl verify` (`observe`,
//! `audit`), and never make the UI wait.

use super::app::{ApiSample, Buckets, LedgerSample, RedisSample, Sample};
use super::event::Event;
use flashsale_engine::accept_log::RedisAcceptLog;
use flashsale_engine::admission::AdmissionCounters;
use flashsale_engine::audit::QueueFacts;
use flashsale_engine::ledger::{Ledger, StockLedger};
use flashsale_engine::metrics::{ORDER_LATENCY, ORDER_REQUESTS, REQUEST_DURATION};
use flashsale_engine::{BackendUrls, ProductId, heartbeat, locks, postgres, queue, redis_conn};
use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinSet;

/// Longest one collection may take before it counts as a failure.
const COLLECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The slower sources are polled at most this often.
const SLOW_SOURCE: Duration = Duration::from_secs(1);

/// Starts the collectors; they stop when the set is dropped.
pub fn start(
    backends: &BackendUrls,
    api_url: &str,
    refresh: Duration,
    events: &UnboundedSender<Event>,
) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    let http = http_client();
    let slow = refresh.max(SLOW_SOURCE);
    poll_api(&mut tasks, &http, api_url, refresh, events);
    {
        let ledger = postgres::connect_lazy(&backends.database_url, 2)
            .map(StockLedger::new)
            .map_err(|e| e.to_string());
        let accept_log = redis_conn::connect_lazy(&backends.redis_url)
            .ok()
            .map(|r| RedisAcceptLog::new(r, backends.namespace()));
        tasks.spawn(poll(slow, events.clone(), move || {
            let (ledger, accept_log) = (ledger.clone(), accept_log.clone());
            async move {
                Sample::Postgres(match ledger {
                    Ok(l) => timed(books(&l, accept_log.as_ref())).await,
                    Err(e) => Err(e),
                })
            }
        }));
    }
    {
        let (b, http) = (backends.clone(), http);
        let redis = redis_conn::connect_lazy(&backends.redis_url).map_err(|e| e.to_string());
        tasks.spawn(poll(refresh, events.clone(), move || {
            let (b, http, redis) = (b.clone(), http.clone(), redis.clone());
            async move {
                Sample::Redis(match redis {
                    Ok(r) => timed(heartbeats(&r, &b, &http)).await,
                    Err(e) => Err(e),
                })
            }
        }));
    }
    {
        let b = backends.clone();
        tasks.spawn(poll(slow, events.clone(), move || {
            let b = b.clone();
            async move {
                Sample::Broker(
                    timed(async {
                        queue::queues(&b.amqp_url, &b.namespace())
                            .await
                            .map_err(|e| e.to_string())
                    })
                    .await,
                )
            }
        }));
    }
    tasks
}

/// What `fsctl demo --top` shows: the embedded backends and the workers of
/// this process, read through the same seams the engine uses.
#[derive(Clone)]
pub struct EmbeddedSources {
    pub backends: flashsale_engine::embedded::EmbeddedBackends,
    /// Each worker's stats, and whether it is still running.
    pub workers: Vec<(
        std::sync::Arc<flashsale_engine::heartbeat::WorkerStats>,
        std::sync::Arc<std::sync::atomic::AtomicBool>,
    )>,
}

/// The collectors on the embedded backends; the API is read over HTTP as
/// usual (it listens on loopback).
pub fn start_embedded(
    sources: EmbeddedSources,
    api_url: &str,
    refresh: Duration,
    events: &UnboundedSender<Event>,
) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    poll_api(&mut tasks, &http_client(), api_url, refresh, events);
    let s = sources.clone();
    tasks.spawn(poll(refresh, events.clone(), move || {
        let ledger = s.backends.ledger.clone();
        let accept_log = s.backends.accept_log.clone();
        async move {
            let audit = ledger.audit_now(None, &QueueFacts::drained_with(Default::default()));
            let names = ledger
                .snapshot()
                .0
                .into_iter()
                .map(|p| (p.id.get(), p.name))
                .collect();
            let (confirmed_orders, rejected_orders) = ledger.totals();
            let expired_orders = ledger
                .snapshot()
                .1
                .iter()
                .filter(|o| o.status == flashsale_engine::OrderStatus::Expired)
                .count() as u64;
            let tokens = counters(accept_log.as_ref(), &names)
                .await
                .unwrap_or_default();
            Sample::Postgres(Ok(LedgerSample {
                books: audit.products,
                names,
                violations: audit.violations,
                confirmed_orders,
                rejected_orders,
                expired_orders,
                tokens,
            }))
        }
    }));
    let s = sources.clone();
    tasks.spawn(poll(refresh, events.clone(), move || {
        let s = s.clone();
        async move {
            let workers = s
                .workers
                .iter()
                .map(|(stats, alive)| stats.view(alive.load(std::sync::atomic::Ordering::Relaxed)))
                .collect();
            let text = flashsale_engine::metrics::install().render();
            Sample::Redis(Ok(RedisSample {
                workers,
                locks: s.backends.locks.held(),
                masters: Vec::new(),
                commit_latency: buckets(&text, ORDER_LATENCY, ""),
            }))
        }
    }));
    tasks.spawn(poll(refresh, events.clone(), move || {
        let queue = sources.backends.queue.clone();
        async move { Sample::Broker(Ok(queue.view())) }
    }));
    tasks
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(COLLECT_TIMEOUT)
        .build()
        .unwrap_or_default()
}

/// The API's readiness and `/metrics`, every `refresh`.
fn poll_api(
    tasks: &mut JoinSet<()>,
    http: &reqwest::Client,
    api_url: &str,
    refresh: Duration,
    events: &UnboundedSender<Event>,
) {
    let (http, url) = (http.clone(), api_url.trim_end_matches('/').to_owned());
    tasks.spawn(poll(refresh, events.clone(), move || {
        let (http, url) = (http.clone(), url.clone());
        async move { Sample::Api(timed(api(&http, &url)).await) }
    }));
}

async fn poll<F, Fut>(every: Duration, events: UnboundedSender<Event>, mut collect: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Sample>,
{
    loop {
        let sample = collect().await;
        if events.send(Event::Sample(Instant::now(), sample)).is_err() {
            return;
        }
        tokio::time::sleep(every).await;
    }
}

async fn timed<T>(f: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(COLLECT_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}s", COLLECT_TIMEOUT.as_secs())))
}

async fn api(http: &reqwest::Client, url: &str) -> Result<ApiSample, String> {
    let short = |e: reqwest::Error| match e.is_connect() {
        true => format!("cannot connect to {url}"),
        false => e.to_string(),
    };
    let ready = http
        .get(format!("{url}/health/ready"))
        .send()
        .await
        .map_err(short)?;
    let not_ready = match ready.status().is_success() {
        true => None,
        false => Some(
            ready
                .text()
                .await
                .unwrap_or_default()
                .chars()
                .take(120)
                .collect(),
        ),
    };
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .map_err(short)?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    Ok(ApiSample {
        not_ready,
        accepted_total: counter(&text, ORDER_REQUESTS, r#"status="queued""#),
        buy_latency: buckets(&text, REQUEST_DURATION, r#"route="/buy""#),
    })
}

/// The admission counters of the `products` named (none when Redis fails:
/// the stock is still shown).
async fn counters(
    counters: &dyn AdmissionCounters,
    products: &BTreeMap<i64, String>,
) -> Result<BTreeMap<i64, i64>, String> {
    let ids: Vec<ProductId> = products
        .keys()
        .filter_map(|id| ProductId::new(*id).ok())
        .collect();
    let tokens = counters.tokens(&ids).await.map_err(|e| e.to_string())?;
    Ok(ids
        .into_iter()
        .zip(tokens)
        .filter_map(|(id, t)| Some((id.get(), t?)))
        .collect())
}

async fn books(
    ledger: &StockLedger,
    accept_log: Option<&RedisAcceptLog>,
) -> Result<LedgerSample, String> {
    let e = |e: sqlx::Error| e.to_string();
    let report = ledger
        .audit(None, &QueueFacts::default())
        .await
        .map_err(|e| e.to_string())?;
    let names = ledger
        .products()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|p| (p.id.get(), p.name))
        .collect();
    let (confirmed_orders, rejected_orders) = ledger.totals().await.map_err(e)?;
    let expired_orders = ledger.expired().await.map_err(e)?;
    let tokens = match accept_log {
        Some(log) => timed(counters(log, &names)).await.unwrap_or_default(),
        None => BTreeMap::new(),
    };
    Ok(LedgerSample {
        books: report.products,
        names,
        violations: report.violations,
        confirmed_orders,
        rejected_orders,
        expired_orders,
        tokens,
    })
}

async fn heartbeats(
    redis: &flashsale_engine::redis_conn::Redis,
    b: &BackendUrls,
    http: &reqwest::Client,
) -> Result<RedisSample, String> {
    let ns = b.namespace();
    let workers = heartbeat::workers(redis, &ns)
        .await
        .map_err(|e| e.to_string())?;
    let locks = locks::held(redis, &ns).await.map_err(|e| e.to_string())?;
    let mut commit_latency: Buckets = Vec::new();
    for w in workers
        .iter()
        .filter(|w| w.alive && !w.metrics_addr.is_empty())
    {
        let url = format!(
            "http://{}/metrics",
            w.metrics_addr.replace("0.0.0.0", "127.0.0.1")
        );
        let Ok(Ok(text)) = tokio::time::timeout(Duration::from_secs(1), async {
            http.get(&url).send().await?.text().await
        })
        .await
        else {
            continue;
        };
        add(&mut commit_latency, &buckets(&text, ORDER_LATENCY, ""));
    }
    let masters = redis_conn::masters(redis).await.unwrap_or_default();
    Ok(RedisSample {
        workers,
        locks,
        masters,
        commit_latency,
    })
}

/// Splits a Prometheus text line into name, labels and value.
fn series(line: &str) -> Option<(&str, &str, f64)> {
    if line.starts_with('#') {
        return None;
    }
    let (head, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    match head.split_once('{') {
        Some((name, labels)) => Some((name, labels.trim_end_matches('}'), value)),
        None => Some((head, "", value)),
    }
}

/// The sum of a counter's series whose labels contain `matching`.
pub fn counter(text: &str, name: &str, matching: &str) -> f64 {
    text.lines()
        .filter_map(series)
        .filter(|(n, labels, _)| *n == name && labels.contains(matching))
        .map(|(_, _, v)| v)
        .sum()
}

/// A histogram's cumulative buckets (summed over series whose labels
/// contain `matching`), by upper bound.
pub fn buckets(text: &str, name: &str, matching: &str) -> Buckets {
    let bucket = format!("{name}_bucket");
    let mut out: Buckets = Vec::new();
    for (n, labels, v) in text.lines().filter_map(series) {
        if n != bucket || !labels.contains(matching) {
            continue;
        }
        let Some(le) = labels
            .split(',')
            .find_map(|l| l.trim().strip_prefix("le=\""))
            .map(|l| l.trim_end_matches('"'))
        else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        add(&mut out, &[(le, v)]);
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

fn add(into: &mut Buckets, from: &[(f64, f64)]) {
    for (le, v) in from {
        match into.iter_mut().find(|(l, _)| l == le) {
            Some((_, n)) => *n += v,
            None => into.push((*le, *v)),
        }
    }
    into.sort_by(|a, b| a.0.total_cmp(&b.0));
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE flashsale_order_requests_total counter
flashsale_order_requests_total{status="queued"} 120
flashsale_order_requests_total{status="rejected_sold_out"} 900
flashsale_request_duration_seconds_bucket{route="/buy",le="0.01"} 5
flashsale_request_duration_seconds_bucket{route="/buy",le="0.1"} 9
flashsale_request_duration_seconds_bucket{route="/buy",le="+Inf"} 10
flashsale_request_duration_seconds_bucket{route="/orders/{id}",le="0.01"} 70
"#;

    #[test]
    fn reads_counters_and_histograms_from_prometheus_text() {
        assert_eq!(counter(TEXT, ORDER_REQUESTS, r#"status="queued""#), 120.0);
        assert_eq!(counter(TEXT, ORDER_REQUESTS, ""), 1020.0);
        assert_eq!(
            buckets(TEXT, REQUEST_DURATION, r#"route="/buy""#),
            vec![(0.01, 5.0), (0.1, 9.0), (f64::INFINITY, 10.0)]
        );
        let mut summed = buckets(TEXT, REQUEST_DURATION, r#"route="/buy""#);
        add(
            &mut summed,
            &[(0.01, 1.0), (0.1, 1.0), (f64::INFINITY, 1.0)],
        );
        assert_eq!(summed[0], (0.01, 6.0));
    }
}
