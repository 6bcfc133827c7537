//! The load engine: when each request goes out, and how long it took.
//!
//! Closed model: N tasks, each sending its next request when the last one is
//! answered. Open model: requests scheduled at a total rate; a request's
//! latency counts from its intended send time, so a server that stalls is
//! charged for the requests it held up (coordinated omission corrected, as
//! wrk2 does). Ramps (`--stage`) move the level linearly. Everything reads
//! tokio's clock, so tests can run it on a paused one. The engine never
//! waits on the display: it only calls `fire`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// After a stop (Ctrl-C), requests in flight get this long to be answered.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// `--stage 10s:500`: move the level to `target` over `duration`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stage {
    pub duration: Duration,
    pub target: f64,
}

impl std::str::FromStr for Stage {
    type Err = String;
    fn from_str(raw: &str) -> Result<Self, String> {
        let bad = || format!("stage {raw:?}: expected DURATION:TARGET, e.g. 10s:500");
        let (d, t) = raw.split_once(':').ok_or_else(bad)?;
        let duration = crate::verify::parse_duration(d)?;
        let target: f64 = t.trim().parse().map_err(|_| bad())?;
        if duration.is_zero() || !(target >= 0.0 && target.is_finite()) {
            return Err(bad());
        }
        Ok(Self { duration, target })
    }
}

/// When requests go out and when the storm ends.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    /// Open model (`--rate`): the level is requests per second, in total.
    /// Closed model: the level is the number of concurrent senders.
    pub open: bool,
    /// The level before the first stage (or throughout, without stages).
    pub start_level: f64,
    pub stages: Vec<Stage>,
    /// Stop after this many requests...
    pub requests: Option<u64>,
    /// ...or after this long (wins over `requests`).
    pub duration: Option<Duration>,
    /// Open model: most requests in flight at once (a request that finds
    /// them all busy waits, and its wait counts in its latency).
    pub max_in_flight: usize,
}

/// One request's timing, as offsets from the storm's start.
#[derive(Debug, Clone)]
pub struct Shot<T> {
    pub index: u64,
    /// When it should have gone out (open model), or went out (closed).
    pub intended: Duration,
    pub sent: Duration,
    pub done: Duration,
    /// `None`: still in flight when the storm was stopped.
    pub value: Option<T>,
}

impl<T> Shot<T> {
    /// From the intended send time: what a user waiting in line saw.
    pub fn latency(&self) -> Duration {
        self.done.saturating_sub(self.intended)
    }
    /// From the actual send time, ignoring time spent waiting to be sent.
    pub fn service_time(&self) -> Duration {
        self.done.saturating_sub(self.sent)
    }
}

impl LoadPlan {
    /// How long the storm runs, when bounded by time.
    pub fn time_limit(&self) -> Option<Duration> {
        self.duration.or_else(|| {
            (!self.stages.is_empty()).then(|| self.stages.iter().map(|s| s.duration).sum())
        })
    }

    /// The request budget, unless time bounds the storm.
    pub fn request_limit(&self) -> Option<u64> {
        match self.time_limit() {
            Some(_) => None,
            None => self.requests,
        }
    }

    /// The level (senders or requests/s) `at` into the storm.
    pub fn level_at(&self, at: Duration) -> f64 {
        let mut from = self.start_level;
        let mut start = Duration::ZERO;
        for stage in &self.stages {
            let end = start + stage.duration;
            if at < end {
                let part = (at - start).as_secs_f64() / stage.duration.as_secs_f64();
                return from + (stage.target - from) * part;
            }
            from = stage.target;
            start = end;
        }
        from
    }

    /// Senders needed at the peak of a closed storm.
    pub fn peak_level(&self) -> f64 {
        self.stages
            .iter()
            .map(|s| s.target)
            .fold(self.start_level, f64::max)
    }

    /// Open model: when request `k` (from 0) should go out, integrating the
    /// rate over the stages; `None` when the rate never gets there.
    pub fn send_time(&self, k: u64) -> Option<Duration> {
        let mut left = k as f64;
        let mut from = self.start_level;
        let mut start = 0.0;
        for stage in &self.stages {
            let d = stage.duration.as_secs_f64();
            let sent_in_stage = (from + stage.target) / 2.0 * d;
            if left < sent_in_stage {
                let slope = (stage.target - from) / d;
                let t = if slope.abs() < 1e-12 {
                    left / from
                } else {
                    (-from + (from * from + 2.0 * slope * left).max(0.0).sqrt()) / slope
                };
                return Some(Duration::from_secs_f64(start + t));
            }
            left -= sent_in_stage;
            from = stage.target;
            start += d;
        }
        (from > 0.0).then(|| Duration::from_secs_f64(start + left / from))
    }
}

/// Runs the storm: calls `fire(i)` for request `i` as the plan says, until
/// the plan ends or `stop` is cancelled. Returns every shot, in no order.
pub async fn drive<T, F, Fut>(plan: &LoadPlan, stop: &CancellationToken, fire: F) -> Vec<Shot<T>>
where
    T: Send + 'static,
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = T> + Send + 'static,
{
    let fire = Arc::new(fire);
    let start = Instant::now();
    let cut = CancellationToken::new();
    let mut tasks = JoinSet::new();
    {
        let (stop, cut) = (stop.clone(), cut.clone());
        tasks.spawn(async move {
            stop.cancelled().await;
            tokio::time::sleep(STOP_GRACE).await;
            cut.cancel();
        });
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    if plan.open {
        open_model(plan, stop, &cut, start, &fire, &tx, &mut tasks).await;
    } else {
        closed_model(plan, stop, &cut, start, &fire, &tx, &mut tasks);
    }
    drop(tx);
    let mut shots = Vec::new();
    while let Some(shot) = rx.recv().await {
        shots.push(shot);
    }
    tasks.abort_all();
    shots
}

/// Sends request `index` and reports its shot, unless `cut` comes first.
async fn shoot<T, F, Fut>(
    index: u64,
    intended: Duration,
    start: Instant,
    fire: &F,
    cut: &CancellationToken,
) -> Shot<T>
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = T>,
{
    let sent = start.elapsed();
    let value = tokio::select! {
        v = fire(index) => Some(v),
        () = cut.cancelled() => None,
    };
    Shot {
        index,
        intended,
        sent,
        done: start.elapsed(),
        value,
    }
}

fn closed_model<T, F, Fut>(
    plan: &LoadPlan,
    stop: &CancellationToken,
    cut: &CancellationToken,
    start: Instant,
    fire: &Arc<F>,
    tx: &mpsc::UnboundedSender<Shot<T>>,
    tasks: &mut JoinSet<()>,
) where
    T: Send + 'static,
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = T> + Send + 'static,
{
    let next = Arc::new(AtomicU64::new(0));
    let senders = plan.peak_level().round().max(1.0) as usize;
    for sender in 0..senders {
        let (plan, stop, cut) = (plan.clone(), stop.clone(), cut.clone());
        let (fire, tx, next) = (fire.clone(), tx.clone(), next.clone());
        tasks.spawn(async move {
            let (limit, budget) = (plan.time_limit(), plan.request_limit());
            loop {
                let now = start.elapsed();
                if stop.is_cancelled() || limit.is_some_and(|l| now >= l) {
                    return;
                }
                if sender as f64 >= plan.level_at(now).round() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                let index = next.fetch_add(1, Ordering::Relaxed);
                if budget.is_some_and(|n| index >= n) {
                    return;
                }
                let shot = shoot(index, now, start, fire.as_ref(), &cut).await;
                if tx.send(shot).is_err() {
                    return;
                }
            }
        });
    }
}

async fn open_model<T, F, Fut>(
    plan: &LoadPlan,
    stop: &CancellationToken,
    cut: &CancellationToken,
    start: Instant,
    fire: &Arc<F>,
    tx: &mpsc::UnboundedSender<Shot<T>>,
    tasks: &mut JoinSet<()>,
) where
    T: Send + 'static,
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = T> + Send + 'static,
{
    let in_flight = Arc::new(Semaphore::new(plan.max_in_flight.max(1)));
    let (limit, budget) = (plan.time_limit(), plan.request_limit());
    for index in 0.. {
        while tasks.try_join_next().is_some() {}
        if budget.is_some_and(|n| index >= n) {
            break;
        }
        let Some(intended) = plan.send_time(index) else {
            break;
        };
        if limit.is_some_and(|l| intended >= l) {
            break;
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(start + intended) => {}
        }
        let permit = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            permit = in_flight.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (fire, tx, cut) = (fire.clone(), tx.clone(), cut.clone());
        tasks.spawn(async move {
            let shot = shoot(index, intended, start, fire.as_ref(), &cut).await;
            drop(permit);
            let _ = tx.send(shot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn plan(open: bool, start_level: f64, stages: &[(u64, f64)]) -> LoadPlan {
        LoadPlan {
            open,
            start_level,
            stages: stages
                .iter()
                .map(|(s, t)| Stage {
                    duration: Duration::from_secs(*s),
                    target: *t,
                })
                .collect(),
            requests: None,
            duration: None,
            max_in_flight: 1000,
        }
    }

    #[test]
    fn parses_stages() {
        assert_eq!(
            "10s:500".parse(),
            Ok(Stage {
                duration: Duration::from_secs(10),
                target: 500.0
            })
        );
        for bad in ["10s", "0s:5", "10s:-1", "x:5", "10s:many"] {
            assert!(bad.parse::<Stage>().is_err(), "{bad}");
        }
    }

    #[test]
    fn levels_ramp_linearly_between_stages() {
        let p = plan(false, 10.0, &[(10, 110.0), (10, 110.0), (5, 0.0)]);
        assert_eq!(p.level_at(Duration::ZERO), 10.0);
        assert_eq!(p.level_at(Duration::from_secs(5)), 60.0);
        assert_eq!(p.level_at(Duration::from_secs(15)), 110.0);
        assert_eq!(p.level_at(Duration::from_millis(22_500)), 55.0);
        assert_eq!(p.level_at(Duration::from_secs(99)), 0.0);
        assert_eq!(p.peak_level(), 110.0);
        assert_eq!(p.time_limit(), Some(Duration::from_secs(25)));
    }

    #[test]
    fn send_times_integrate_the_rate() {
        let constant = plan(true, 200.0, &[]);
        assert_eq!(constant.send_time(0), Some(Duration::ZERO));
        assert_eq!(constant.send_time(200), Some(Duration::from_secs(1)));
        // 0 -> 100/s over 10 s sends 500; the 125th goes out at 5 s.
        let ramp = plan(true, 0.0, &[(10, 100.0)]);
        let t = ramp.send_time(125).expect("reached").as_secs_f64();
        assert!((t - 5.0).abs() < 1e-9, "{t}");
        let after = ramp.send_time(600).expect("reached").as_secs_f64();
        assert!((after - 11.0).abs() < 1e-9, "{after}");
        assert_eq!(plan(true, 0.0, &[]).send_time(1), None);
    }

    /// A server that answers after `delay(i)`, on tokio's (paused) clock.
    fn scripted(
        delay: impl Fn(u64) -> Duration + Send + Sync + 'static,
    ) -> impl Fn(u64) -> std::pin::Pin<Box<dyn Future<Output = u64> + Send>> + Send + Sync + 'static
    {
        let delay = Arc::new(delay);
        move |i| {
            let delay = delay.clone();
            Box::pin(async move {
                tokio::time::sleep(delay(i)).await;
                i
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn closed_model_sends_exactly_n_requests_once_each() {
        let mut p = plan(false, 10.0, &[]);
        p.requests = Some(1000);
        let shots = drive(
            &p,
            &CancellationToken::new(),
            scripted(|_| Duration::from_millis(3)),
        )
        .await;
        let mut seen: Vec<u64> = shots.iter().map(|s| s.value.expect("answered")).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
        // 10 senders, 3 ms each: 100 rounds of 3 ms.
        let end = shots.iter().map(|s| s.done).max().expect("shots");
        assert_eq!(end, Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn open_model_sends_the_requested_rate() {
        let mut p = plan(true, 250.0, &[]);
        p.duration = Some(Duration::from_secs(4));
        let shots = drive(
            &p,
            &CancellationToken::new(),
            scripted(|_| Duration::from_millis(20)),
        )
        .await;
        assert_eq!(shots.len(), 1000);
        let mut per_second = [0u32; 4];
        for s in &shots {
            per_second[s.sent.as_secs() as usize] += 1;
            assert_eq!(s.sent, s.intended, "nothing waited: the server keeps up");
            assert_eq!(s.latency(), Duration::from_millis(20));
        }
        assert_eq!(per_second, [250; 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn open_model_charges_a_stall_to_the_requests_it_held_up() {
        // 100/s with one request in flight at a time; request 10 takes 1 s.
        let mut p = plan(true, 100.0, &[]);
        p.duration = Some(Duration::from_secs(3));
        p.max_in_flight = 1;
        let shots = drive(
            &p,
            &CancellationToken::new(),
            scripted(|i| Duration::from_millis(if i == 10 { 1000 } else { 1 })),
        )
        .await;
        assert_eq!(shots.len(), 300);
        let held: Vec<&Shot<u64>> = shots
            .iter()
            .filter(|s| (11..100).contains(&s.index))
            .collect();
        // Request 11 was due at 110 ms and could go only at 1,100 ms.
        let eleven = held.iter().find(|s| s.index == 11).expect("request 11");
        assert_eq!(eleven.latency(), Duration::from_millis(991));
        assert_eq!(eleven.service_time(), Duration::from_millis(1));
        // Every request due during the stall is charged for its wait.
        let charged = held
            .iter()
            .filter(|s| s.latency() >= Duration::from_millis(100))
            .count();
        assert!(charged >= 80, "{charged} of {} charged", held.len());
    }

    #[tokio::test(start_paused = true)]
    async fn closed_ramp_adds_senders_as_staged() {
        // 0 -> 20 senders over 2 s; record how many are busy over time.
        let busy = Arc::new(AtomicU64::new(0));
        let peaks = Arc::new(Mutex::new(Vec::new()));
        let fire = {
            let (busy, peaks) = (busy.clone(), peaks.clone());
            move |_i: u64| {
                let (busy, peaks) = (busy.clone(), peaks.clone());
                async move {
                    let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
                    peaks.lock().expect("lock").push((Instant::now(), now));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    busy.fetch_sub(1, Ordering::SeqCst);
                }
            }
        };
        let start = Instant::now();
        let shots = drive(
            &plan(false, 0.0, &[(2, 20.0)]),
            &CancellationToken::new(),
            fire,
        )
        .await;
        assert!(!shots.is_empty());
        let peaks = peaks.lock().expect("lock").clone();
        let most_by = |ms: u64| {
            peaks
                .iter()
                .filter(|(at, _)| *at - start <= Duration::from_millis(ms))
                .map(|(_, n)| *n)
                .max()
                .unwrap_or(0)
        };
        assert!(most_by(500) <= 6, "{}", most_by(500));
        assert!((9..=11).contains(&most_by(1000)), "{}", most_by(1000));
        assert_eq!(most_by(2000), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_ends_the_storm_and_cuts_what_hangs() {
        let stop = CancellationToken::new();
        let mut p = plan(false, 4.0, &[]);
        p.duration = Some(Duration::from_secs(3600));
        let canceller = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            canceller.cancel();
        });
        // Requests from 20 on never get an answer.
        let shots = drive(
            &p,
            &stop,
            scripted(|i| Duration::from_millis(if i >= 20 { 10_000_000 } else { 100 })),
        )
        .await;
        let answered = shots.iter().filter(|s| s.value.is_some()).count();
        let cut: Vec<_> = shots.iter().filter(|s| s.value.is_none()).collect();
        assert_eq!(answered, 20);
        assert_eq!(cut.len(), 4, "the four senders' hung requests");
        for s in cut {
            assert_eq!(s.done, Duration::from_secs(1) + STOP_GRACE);
        }
    }
}
