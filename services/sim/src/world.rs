//! One seed's world: the deployment it draws, the buyers and the faults it
//! schedules, and the phases: faults, heal, converge.

use crate::broker::{Broker, BrokerOptions};
use crate::check::{self, Answer, Violation};
use crate::faults::{Delays, FlakyAcceptLog, SlowQueue, Trap};
use crate::rng::{SimRng, Trace};
use crate::{CONVERGE_WITHIN, Outcome};
use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use flashsale_api::process::Process;
use flashsale_api::routes;
use flashsale_api::state::AppState;
use flashsale_api::{Access, HttpLimits};
use flashsale_engine::admission::AdmissionCounters;
use flashsale_engine::embedded::{EmbeddedBackends, Reach};
use flashsale_engine::ledger::{Ledger, NewProduct};
use flashsale_engine::queue::OrderQueue;
use flashsale_worker::Worker;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// What a seed draws: the deployment, the buyers and the faults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub apis: usize,
    pub workers: usize,
    /// `(id, stock, per_user_limit)`.
    pub products: Vec<(i64, i32, Option<i32>)>,
    /// Products whose booked orders are held this many seconds for payment.
    pub holds: Vec<(i64, i32)>,
    /// Percent of held buys whose buyer pays (the others cancel or let it
    /// expire, half and half).
    pub pays: u64,
    pub buyers: usize,
    /// Percent of buys that reuse an earlier buy's key (same or other body).
    pub repeats: u64,
    /// Percent of buys whose client hangs up before the answer.
    pub hang_ups: u64,
    /// Percent of `503`s retried with the same key.
    pub retries: u64,
    /// A worker is killed mid-sale (and another started when healing).
    pub kill_worker: bool,
    /// Redis loses everything mid-sale: accept log, counters, locks, fences.
    pub redis_loss: bool,
    /// Deliveries a worker holds (small: batches split across workers).
    pub prefetch: u16,
    /// The longest pause before and after each queue call (µs; 0: none).
    pub delay_micros: u64,
    /// The queue: a model of RabbitMQ (partitions, channels, lost
    /// confirms), or `None` for the embedded memory queue.
    pub broker: Option<BrokerOptions>,
    /// The wall clock jumps by this many ms (either way) once, mid-sale.
    pub clock_jump_ms: i64,
    /// One API (of two or more) is killed mid-sale, with the tasks its
    /// requests left running: units taken and not yet published, a publish
    /// not yet marked. Its clients see their connection reset.
    pub kill_api: bool,
    /// Percent of the calls to Redis's accept log and counters that fail
    /// until the world heals: before their effect, or after it with the
    /// reply lost.
    pub redis_faults: u64,
    /// Every buy comes within the first 50 ms (else within 3 s): the
    /// consumers' buffers fill, batches span partitions.
    pub burst: bool,
    /// With the broker model: this many times a worker's connection drops
    /// right after an ack got through (its channel closes with what its
    /// buffers held; it consumes again on a new one).
    pub dropped_connections: u64,
    /// The workers start once every buy was sent: they begin on a backlog
    /// in every partition (how c7e9d7c's loss was found).
    pub backlog: bool,
    /// The longest pause before and after each call to Redis's accept log
    /// and counters (µs; 0: none).
    pub redis_delay_micros: u64,
}

impl Options {
    pub fn draw(seed: u64) -> Self {
        let mut r = SimRng::new(seed);
        let products: Vec<(i64, i32, Option<i32>)> = (1..=r.between(1, 3) as i64)
            .map(|id| {
                let stock = r.between(3, 40) as i32;
                let limit = r.chance(0.3).then(|| r.between(1, 3) as i32);
                (id, stock, limit)
            })
            .collect();
        let holds = products_held(&products, &mut r);
        Self {
            holds,
            pays: r.between(0, 100),
            apis: r.between(1, 3) as usize,
            workers: r.between(1, 3) as usize,
            products,
            buyers: r.between(10, 60) as usize,
            repeats: r.between(0, 30),
            hang_ups: if r.chance(0.5) { r.between(0, 30) } else { 0 },
            retries: r.between(0, 100),
            kill_worker: r.chance(0.5),
            redis_loss: r.chance(0.4),
            prefetch: r.between(1, 20) as u16,
            delay_micros: if r.chance(0.7) { r.between(1, 3000) } else { 0 },
            broker: r.chance(0.6).then(|| BrokerOptions::draw(&mut r)),
            clock_jump_ms: if r.chance(0.3) {
                r.between(0, 10_000) as i64 - 5_000
            } else {
                0
            },
            kill_api: false,
            redis_faults: 0,
            burst: false,
            dropped_connections: 0,
            backlog: false,
            redis_delay_micros: 0,
        }
        .and_later_faults(&mut r)
    }

    /// The faults added after the first campaigns, drawn after every other
    /// option and in the order they came, so that every earlier seed keeps
    /// the options it drew (and the broker's two only on its seeds).
    fn and_later_faults(mut self, r: &mut SimRng) -> Self {
        self.kill_api = self.apis >= 2 && r.chance(0.3);
        self.redis_faults = if r.chance(0.3) { r.between(1, 10) } else { 0 };
        self.burst = r.chance(0.3);
        let uneven = r.chance(0.5);
        let drops = if r.chance(0.5) { r.between(1, 3) } else { 0 };
        if let Some(b) = &mut self.broker {
            b.uneven = uneven && b.partitions > 1;
            self.dropped_connections = drops;
        }
        self.backlog = r.chance(0.3);
        self.redis_delay_micros = if r.chance(0.5) { r.between(1, 2000) } else { 0 };
        self
    }
}

/// Each product is held (1–5 s) with probability 0.3.
fn products_held(products: &[(i64, i32, Option<i32>)], r: &mut SimRng) -> Vec<(i64, i32)> {
    let mut held = Vec::new();
    for (id, _, _) in products {
        if r.chance(0.3) {
            held.push((*id, r.between(1, 5) as i32));
        }
    }
    held
}

impl fmt::Display for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "apis {}, workers {}, products {:?}, held {:?}, pays {}%, buyers {}, repeats {}%, hang-ups {}%, retries {}%, kill worker {}, redis loss {}, prefetch {}, delays up to {} µs, queue {}, clock jump {} ms, kill an API {}, Redis calls failing {}%, burst {}, connections dropped {}, backlog {}, Redis delays up to {} µs",
            self.apis,
            self.workers,
            self.products,
            self.holds,
            self.pays,
            self.buyers,
            self.repeats,
            self.hang_ups,
            self.retries,
            self.kill_worker,
            self.redis_loss,
            self.prefetch,
            self.delay_micros,
            match self.broker {
                Some(b) => format!(
                    "broker ({} partitions{}, {}% publishes failed, {}% confirms lost, dead channels noticed within {} ms)",
                    b.partitions,
                    if b.uneven { ", delivered unevenly" } else { "" },
                    b.publish_failures,
                    b.lost_confirms,
                    b.notice_ms
                ),
                None => "memory".into(),
            },
            self.clock_jump_ms,
            self.kill_api,
            self.redis_faults,
            self.burst,
            self.dropped_connections,
            self.backlog,
            self.redis_delay_micros
        )
    }
}

/// The events of the run, in the order they happened: what the trace hashes
/// and a failure's report shows the end of.
#[derive(Clone, Default)]
pub(crate) struct Events(Arc<Mutex<(Trace, Vec<String>)>>);

impl Events {
    pub(crate) fn add(&self, event: String) {
        let mut e = self.0.lock().unwrap_or_else(|p| p.into_inner());
        e.0.add(&event);
        e.1.push(event);
    }

    fn finish(&self) -> (u64, Vec<String>) {
        let e = self.0.lock().unwrap_or_else(|p| p.into_inner());
        (e.0.value(), e.1.clone())
    }
}

/// One buy a buyer makes.
#[derive(Debug, Clone)]
struct Buy {
    key: String,
    user: String,
    product: i64,
    quantity: i64,
    /// Sent this long after the sale opens.
    at: Duration,
    /// The client hangs up this long after sending.
    hang_up: Option<Duration>,
    retry: bool,
    /// After a `202`, the buyer pays or cancels this long later.
    ends: Option<(&'static str, Duration)>,
}

impl Buy {
    fn body(&self) -> String {
        format!(
            r#"{{"userId":"{}","productId":{},"quantity":{}}}"#,
            self.user, self.product, self.quantity
        )
    }
}

fn plan_buys(options: &Options, r: &mut SimRng) -> Vec<Buy> {
    let mut buys: Vec<Buy> = Vec::with_capacity(options.buyers);
    for i in 0..options.buyers {
        let (product, _, _) =
            options.products[r.between(0, options.products.len() as u64 - 1) as usize];
        let mut buy = Buy {
            key: format!("k{i}"),
            user: format!("u{}", r.between(0, options.buyers as u64 / 2)),
            product,
            quantity: r.between(1, 2) as i64,
            // The same draw either way, so that the rest of the plan is too.
            at: Duration::from_millis(r.between(0, 3000) / if options.burst { 60 } else { 1 }),
            hang_up: r
                .chance(options.hang_ups as f64 / 100.0)
                .then(|| Duration::from_micros(r.between(0, 3000))),
            retry: r.chance(options.retries as f64 / 100.0),
            ends: None,
        };
        if options.holds.iter().any(|(p, _)| *p == product) {
            let delay = Duration::from_millis(r.between(100, 6000));
            buy.ends = if r.chance(options.pays as f64 / 100.0) {
                Some(("pay", delay))
            } else if r.chance(0.5) {
                Some(("cancel", delay))
            } else {
                None
            };
        }
        if !buys.is_empty() && r.chance(options.repeats as f64 / 100.0) {
            let earlier = &buys[r.between(0, buys.len() as u64 - 1) as usize];
            buy.key = earlier.key.clone();
            // Half the repeats are the same request again, half reuse the key.
            if r.chance(0.5) {
                buy.user = earlier.user.clone();
                buy.product = earlier.product;
                buy.quantity = earlier.quantity;
            }
        }
        buys.push(buy);
    }
    buys
}

/// One API process: its router, and its tasks (killed with it).
#[derive(Clone)]
struct SimApi {
    router: Router,
    process: Process,
}

/// The APIs of the world; a buyer goes to the first live one from its own.
type Apis = Arc<Vec<SimApi>>;

fn live_api(apis: &Apis, from: usize) -> Option<&SimApi> {
    (0..apis.len())
        .map(|i| &apis[(from + i) % apis.len()])
        .find(|a| !a.process.is_killed())
}

/// How a request ended for its client.
enum Reached {
    Answer(StatusCode, serde_json::Value),
    HungUp,
    /// The API was killed: the connection was reset.
    Reset,
}

/// Sends the buy (retrying a `503`, or a reset connection, when it does);
/// its answer, `None` when the client hung up or gave up.
async fn send(apis: Apis, first: usize, buy: Buy, events: Events) -> Answer {
    tokio::time::sleep(buy.at).await;
    // The client did not hear how an attempt ended: a `503`, a reset
    // connection, a hang-up (its order may book all the same).
    let mut unsure = false;
    let gave_up =
        |buy: &Buy| Answer::hung_up(&buy.key, &buy.user, buy.product, buy.quantity).unsure(true);
    for attempt in 0..4 {
        let Some(api) = live_api(&apis, first + attempt) else {
            return gave_up(&buy);
        };
        let request = Request::post("/buy")
            .header("content-type", "application/json")
            .header("idempotency-key", &buy.key)
            .body(Body::from(buy.body()))
            .unwrap_or_default();
        let answering = async {
            tokio::select! {
                biased;
                () = api.process.killed() => Reached::Reset,
                answer = call(&api.router, request) => match answer {
                    Some((status, body)) => Reached::Answer(status, body),
                    None => Reached::HungUp,
                },
            }
        };
        let reached = match buy.hang_up {
            Some(after) => tokio::time::timeout(after, answering)
                .await
                .unwrap_or(Reached::HungUp),
            None => answering.await,
        };
        let (status, body) = match reached {
            Reached::Answer(status, body) => (status, body),
            Reached::HungUp => {
                events.add(format!("hang-up {} {}", buy.key, buy.body()));
                return gave_up(&buy);
            }
            Reached::Reset => {
                events.add(format!("reset {} {}", buy.key, buy.body()));
                unsure = true;
                if buy.retry && attempt < 3 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                return gave_up(&buy);
            }
        };
        events.add(format!(
            "answer {} {} {}",
            buy.key,
            status.as_u16(),
            buy.body()
        ));
        unsure |= status == StatusCode::SERVICE_UNAVAILABLE;
        if status == StatusCode::SERVICE_UNAVAILABLE && buy.retry && attempt < 3 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let mut answer = Answer::new(&buy.key, &buy.user, buy.product, buy.quantity, status, body)
            .unsure(unsure);
        if let (StatusCode::ACCEPTED, Some((action, after))) = (status, buy.ends) {
            tokio::time::sleep(after).await;
            let ended = match live_api(&apis, first) {
                Some(api) => end_hold(&api.router, &buy, action).await,
                None => None,
            };
            events.add(format!(
                "{action} {} {}",
                buy.key,
                ended.as_ref().map_or(0, |(s, _)| s.as_u16())
            ));
            answer.ended = ended.map(|(s, status)| (action, s, status));
        }
        return answer;
    }
    unreachable!("the last attempt returns")
}

/// Pays or cancels the buy's order as its buyer: the answer's status and
/// the order's status in it.
async fn end_hold(api: &Router, buy: &Buy, action: &str) -> Option<(StatusCode, String)> {
    let request = Request::post(format!("/orders/{}/{action}", buy.key))
        .header("content-type", "application/json")
        .body(Body::from(format!(r#"{{"userId":"{}"}}"#, buy.user)))
        .unwrap_or_default();
    let (status, body) = call(api, request).await?;
    Some((
        status,
        body["status"].as_str().unwrap_or_default().to_owned(),
    ))
}

/// One request to an API: its status and JSON body.
async fn call(api: &Router, request: Request<Body>) -> Option<(StatusCode, serde_json::Value)> {
    let response = api.clone().oneshot(request).await.ok()?;
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
        .await
        .ok()?;
    Some((status, serde_json::from_slice(&bytes).unwrap_or_default()))
}

/// A worker running on a task of the world, killed by aborting it.
struct SimWorker {
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    stats: Arc<flashsale_engine::heartbeat::WorkerStats>,
}

fn start_worker(
    id: &str,
    backends: &EmbeddedBackends,
    queue: &Arc<SlowQueue>,
    accept_log: &Arc<FlakyAcceptLog>,
    prefetch: u16,
) -> SimWorker {
    let stop = CancellationToken::new();
    let reach = Reach {
        queue: queue.clone(),
        accept_log: accept_log.clone(),
    };
    let worker = Worker::embedded_on(id, backends, reach, prefetch);
    let stats = worker.stats();
    let task = tokio::spawn(worker.run(stop.clone()));
    SimWorker { stop, task, stats }
}

/// A product id the seed drew (from 1 up, so always valid).
fn product_id(id: i64) -> flashsale_engine::ProductId {
    flashsale_engine::ProductId::new(id).unwrap_or_else(|_| unreachable!("ids start at 1"))
}

/// Where every seed's simulated clock starts.
const EPOCH_SECONDS: i64 = 1_798_761_600; // 2027-01-01T00:00:00Z

pub(crate) async fn run(seed: u64) -> Outcome {
    let options = Options::draw(seed);
    let events = Events::default();
    flashsale_engine::clock::simulate(chrono::DateTime::from_timestamp(EPOCH_SECONDS, 0));
    let result = sale(seed, &options, &events).await;
    flashsale_engine::clock::simulate(None);
    let (trace, events) = events.finish();
    Outcome {
        seed,
        options,
        trace,
        violation: result.err(),
        events,
    }
}

async fn sale(seed: u64, options: &Options, events: &Events) -> Result<(), Violation> {
    let mut r = SimRng::new(seed.rotate_left(29) ^ 0xA5A5);
    let backends = EmbeddedBackends::default();
    let products: Vec<NewProduct> = options
        .products
        .iter()
        .map(|(id, stock, limit)| NewProduct {
            id: *id,
            name: format!("p{id}"),
            stock: *stock,
            max_per_order: 10,
            per_user_limit: *limit,
            hold_seconds: options
                .holds
                .iter()
                .find(|(p, _)| p == id)
                .map(|(_, seconds)| *seconds),
        })
        .collect();
    backends
        .ledger
        .create_missing(&products)
        .await
        .map_err(|e| Violation::new("setup", e.to_string()))?;
    for (id, stock, _) in &options.products {
        backends
            .accept_log
            .reset(product_id(*id), i64::from(*stock))
            .await
            .map_err(|e| Violation::new("setup", e.to_string()))?;
    }
    let delays = Delays::new(seed ^ 0x51_0E, Duration::from_micros(options.delay_micros));
    let accept_log = Arc::new(FlakyAcceptLog::new(
        backends.accept_log.clone(),
        seed ^ 0x00AC_CE97,
        options.redis_faults,
        Delays::new(
            seed ^ 0x000D_E1A7,
            Duration::from_micros(options.redis_delay_micros),
        ),
        events.clone(),
    ));
    let order_queue = SimQueue::new(seed, options, &backends);
    let queue = Arc::new(SlowQueue {
        inner: order_queue.shared(),
        delays: delays.clone(),
        trap: None,
        publish_trap: None,
    });
    // The victim (worker 0, when the seed kills one) crashes at its first
    // ack, before or after its effect.
    let trap = options.kill_worker.then(|| Trap::armed(r.chance(0.5)));
    let victim_queue = Arc::new(SlowQueue {
        inner: order_queue.shared(),
        delays: delays.clone(),
        trap: trap.clone(),
        publish_trap: None,
    });
    // The victim API (the last, when the seed kills one) crashes at its
    // first publish, before or after its effect: its buy has taken units.
    let api_trap = options.kill_api.then(|| Trap::armed(r.chance(0.5)));
    let victim_api_queue = Arc::new(SlowQueue {
        inner: order_queue.shared(),
        delays,
        trap: None,
        publish_trap: api_trap.clone(),
    });
    let mut apis: Vec<SimApi> = Vec::new();
    for i in 0..options.apis {
        let through = if api_trap.is_some() && i + 1 == options.apis {
            &victim_api_queue
        } else {
            &queue
        };
        let reach = Reach {
            queue: through.clone(),
            accept_log: accept_log.clone(),
        };
        let state =
            AppState::embedded_on(&backends, reach, &HttpLimits::default(), &Access::default())
                .map_err(|e| Violation::new("setup", e.to_string()))?;
        let process = state.process.clone();
        apis.push(SimApi {
            router: routes::router(state),
            process,
        });
    }
    let apis: Apis = Arc::new(apis);
    let start_workers = || -> Vec<SimWorker> {
        (0..options.workers)
            .map(|i| {
                let through = if i == 0 { &victim_queue } else { &queue };
                start_worker(
                    &format!("w{i}"),
                    &backends,
                    through,
                    &accept_log,
                    options.prefetch,
                )
            })
            .collect()
    };
    let mut workers = if options.backlog {
        Vec::new()
    } else {
        start_workers()
    };

    // Faults: the buyers, and what the seed drew against them.
    let buys = plan_buys(options, &mut r);
    let sale_started = tokio::time::Instant::now();
    let mut buyers: Vec<JoinHandle<Answer>> = buys
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, buy)| tokio::spawn(send(apis.clone(), i, buy, events.clone())))
        .collect();
    if options.backlog {
        // Every buy is sent (within 3 s) before any worker runs.
        tokio::time::sleep(Duration::from_millis(3100)).await;
        workers = start_workers();
        events.add("workers started on the backlog".into());
    }
    if options.clock_jump_ms != 0 {
        let by = options.clock_jump_ms;
        let at = Duration::from_millis(r.between(0, 3000));
        let events = events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(at).await;
            flashsale_engine::clock::jump(chrono::Duration::milliseconds(by));
            events.add(format!("fault: the wall clock jumped {by} ms"));
        });
    }
    if let Some(trap) = api_trap.clone() {
        let (apis, events) = (apis.clone(), events.clone());
        tokio::spawn(async move {
            // At its first publish, or at the latest 3 s in.
            let sprung = tokio::time::timeout(Duration::from_secs(3), trap.sprung.notified()).await;
            let victim = apis.len() - 1;
            apis[victim].process.kill();
            let at = if sprung.is_ok() {
                "at a publish"
            } else {
                "after 3 s"
            };
            events.add(format!("fault: API {victim} killed {at}"));
        });
    }
    if let Some(trap) = &trap {
        // At its first ack, or at the latest 3 s in.
        let sprung = tokio::time::timeout(Duration::from_secs(3), trap.sprung.notified()).await;
        let victim = workers.remove(0);
        victim.task.abort();
        let at = if sprung.is_ok() {
            "at its ack"
        } else {
            "after 3 s"
        };
        events.add(format!("fault: worker w0 killed {at}"));
    }
    if options.redis_loss {
        tokio::time::sleep(Duration::from_millis(r.between(0, 2000))).await;
        backends.accept_log.forget_everything();
        backends.locks.forget_everything();
        events.add("fault: Redis lost everything".into());
        // Clients come back with keys they used before: a key reused for
        // another body, then its first body sent again.
        // Most often a key sent just before the loss, whose order may be
        // queued still.
        let now = sale_started.elapsed();
        let recent: Vec<&Buy> = buys
            .iter()
            .filter(|b| b.at <= now && now - b.at < Duration::from_millis(300))
            .collect();
        for n in 0..r.between(1, 3) {
            let first = if !recent.is_empty() && r.chance(0.7) {
                recent[r.between(0, recent.len() as u64 - 1) as usize].clone()
            } else {
                buys[r.between(0, buys.len() as u64 - 1) as usize].clone()
            };
            let other = Buy {
                user: format!("{}-again", first.user),
                at: Duration::from_millis(r.between(0, 20)),
                hang_up: None,
                ..first.clone()
            };
            let again = Buy {
                at: other.at + Duration::from_millis(r.between(20, 1500)),
                hang_up: None,
                ..first
            };
            for (i, buy) in [other, again].into_iter().enumerate() {
                let first = n as usize + i;
                buyers.push(tokio::spawn(send(apis.clone(), first, buy, events.clone())));
            }
        }
    }
    let mut answers = Vec::with_capacity(buyers.len());
    for buyer in buyers {
        answers.push(
            buyer
                .await
                .map_err(|e| Violation::new("buyer", format!("a buyer task failed: {e}")))?,
        );
    }

    // A buy's claim ends with the buy (marked queued, or withdrawn), also
    // when its client hung up: a second after the last answer, none pends.
    // A killed API's claims end with their pending TTL, and so do those a
    // failed Redis call left (a claim whose withdrawal or marking failed).
    let grace = if options.kill_api || options.redis_faults > 0 {
        flashsale_engine::accept_log::PENDING_TTL + Duration::from_secs(1)
    } else {
        Duration::from_secs(1)
    };
    tokio::time::sleep(grace).await;
    let pending = backends.accept_log.pending();
    if !pending.is_empty() {
        return Err(Violation::new(
            "liveness",
            format!("claims left pending a second after the last answer: {pending:?}"),
        ));
    }

    // Heal: Redis answers again, every worker the seed drew runs again.
    if options.redis_faults > 0 {
        accept_log.heal();
        events.add("heal: Redis answers every call".into());
    }
    while workers.len() < options.workers {
        let id = format!("w-healed-{}", workers.len());
        workers.push(start_worker(
            &id,
            &backends,
            &queue,
            &accept_log,
            options.prefetch,
        ));
        events.add(format!("heal: {id} started"));
    }

    let faulted_keys = accept_log.faulted_keys();
    let unknowns = check::Unknowns {
        redis_lost: options.redis_loss,
        faulted_keys: &faulted_keys,
    };
    // The final books and answers, judged.
    let books = async || {
        check::books(
            &backends,
            order_queue.shared().as_ref(),
            &answers,
            &unknowns,
            events,
        )
        .await
    };

    // Converge: the queue drains, every admitted order settles, every
    // counter comes back to its product's stock.
    let started = tokio::time::Instant::now();
    loop {
        if converged(&backends, &order_queue, options).await {
            break;
        }
        if started.elapsed() > CONVERGE_WITHIN {
            // A broken invariant is the likelier root cause: report it.
            books().await?;
            let (ready, held) = order_queue.depth();
            let mut counters = Vec::new();
            for (id, _, _) in &options.products {
                if let Ok(a) = backends.accept_log.admission(product_id(*id)).await {
                    counters.push(format!(
                        "{id}: tokens {:?}, admitted {:?}",
                        a.tokens, a.admitted
                    ));
                }
            }
            return Err(Violation::new(
                "liveness",
                format!(
                    "not converged {CONVERGE_WITHIN:?} after healing: {ready} ready, {held} held; counters {counters:?}; workers {:?}; locks {:?}",
                    workers
                        .iter()
                        .map(|w| format!(
                            "{}: inflight {}, processed {}, finished {}",
                            w.stats.id,
                            w.stats.inflight(),
                            w.stats.processed.load(std::sync::atomic::Ordering::Relaxed),
                            w.task.is_finished()
                        ))
                        .collect::<Vec<_>>(),
                    backends
                        .locks
                        .held()
                        .iter()
                        .map(|l| format!("{}:{}", l.product_id, l.holder))
                        .collect::<Vec<_>>()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for w in &workers {
        w.stop.cancel();
    }
    for w in workers {
        let _ = w.task.await;
    }
    books().await
}

/// The order queue a seed runs on.
enum SimQueue {
    Memory(flashsale_engine::queue::MemoryQueue),
    Broker(Broker),
}

impl SimQueue {
    fn new(seed: u64, options: &Options, backends: &EmbeddedBackends) -> Self {
        match options.broker {
            Some(b) => Self::Broker(Broker::new(
                seed ^ 0x00B2_0CE2,
                b,
                options.dropped_connections,
            )),
            None => Self::Memory(backends.queue.clone()),
        }
    }

    fn shared(&self) -> Arc<dyn OrderQueue> {
        match self {
            Self::Memory(q) => Arc::new(q.clone()),
            Self::Broker(b) => Arc::new(b.clone()),
        }
    }

    /// Ready messages, and messages held by consumers.
    fn depth(&self) -> (usize, usize) {
        match self {
            Self::Memory(q) => q.depth(),
            Self::Broker(b) => b.depth(),
        }
    }
}

/// Drained, settled, reconciled, and every hold ended.
async fn converged(backends: &EmbeddedBackends, queue: &SimQueue, options: &Options) -> bool {
    if queue.depth() != (0, 0) {
        return false;
    }
    let (_, orders) = backends.ledger.snapshot();
    if orders
        .iter()
        .any(|o| o.status == flashsale_engine::OrderStatus::Held)
    {
        return false;
    }
    for (id, _, _) in &options.products {
        let Ok(admission) = backends.accept_log.admission(product_id(*id)).await else {
            return false;
        };
        let Ok(Some(product)) = backends.ledger.product(product_id(*id)).await else {
            return false;
        };
        if !admission.admitted.is_empty()
            || admission
                .tokens
                .is_some_and(|t| t != i64::from(product.stock))
        {
            return false;
        }
    }
    true
}
