//! The engine end to end on the scratch deployment: an in-process API takes
//! a storm, then one worker drains what it accepted.

use super::*;
use flashsale_engine::ledger::Ledger;

/// An in-process API takes a storm; then one worker drains what it accepted.
pub(super) async fn engine(
    b: &BackendUrls,
    ledger: &StockLedger,
    budget: Duration,
) -> Result<EngineFigures, Failure> {
    ledger
        .create_missing(&[NewProduct {
            id: 1,
            name: "doctor ample".into(),
            stock: 1_000_000_000,
            max_per_order: 10,
            per_user_limit: None,
            hold_seconds: None,
        }])
        .await?;
    let app = Application::build(ApiConfig::new(b.clone(), "127.0.0.1:0"))
        .await
        .map_err(Failure::unreachable)?;
    let running_api = RunningApi::spawn(app)?;
    let api = running_api.url.clone();
    let target = BuyTarget::new(
        std::slice::from_ref(&api),
        CONCURRENCY as usize,
        Duration::from_secs(30),
        None,
    )?;
    running_api
        .wait_ready(Duration::from_secs(20))
        .await
        .map_err(Failure::unreachable)?;

    let plan = StormPlan {
        load: LoadPlan {
            open: false,
            start_level: CONCURRENCY as f64,
            stages: Vec::new(),
            requests: None,
            duration: Some(budget),
            max_in_flight: CONCURRENCY as usize,
        },
        mix: BuyMix {
            products: vec![1],
            skew: Skew::Uniform,
            users: None,
            quantity: QuantityRange { min: 1, max: 1 },
            duplicate_ratio: 0.0,
            invalid_ratio: 0.0,
            keys: Default::default(),
        },
        thresholds: Vec::new(),
        verify: false,
        drain_timeout: Duration::from_secs(60),
        timeout: Duration::from_secs(30),
        seed: rand::random(),
        scenario: None,
        tokens: None,
        checkout: None,
    };
    let report = storm::execute(
        &plan,
        &target,
        &CancellationToken::new(),
        Arc::new(LiveCounts::default()),
    )
    .await;
    running_api.stop().await;

    let accepted = report.accepted.len();
    // Every order is one unit of an ample product, so the product's stock
    // tells how many are booked: one row read, where counting the orders
    // table every few milliseconds would take CPU from the drain it times.
    let hot = ProductId::new(1).map_err(|e| Failure::usage(e.message))?;
    let sold = || async {
        let product = ledger.product(hot).await?;
        Ok::<_, flashsale_engine::ledger::LedgerError>(
            product.map_or(0, |p| i64::from(p.seeded_stock - p.stock)),
        )
    };
    let sold_before = sold().await?;
    let mut config = WorkerConfig::new(b.clone());
    config.worker_id = Some("fsctl-doctor".into());
    let worker = Worker::connect(config)
        .await
        .map_err(Failure::unreachable)?;
    let started = Instant::now();
    let running = RunningWorker::spawn(worker, None);
    let drained = async {
        loop {
            if (sold().await? - sold_before) as usize >= accepted {
                return Ok::<_, flashsale_engine::ledger::LedgerError>(());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let finished = tokio::time::timeout(Duration::from_secs(120), drained).await;
    let drain_seconds = started.elapsed().as_secs_f64();
    let _ = running.stop().await;
    match finished {
        Ok(result) => result?,
        Err(_) => {
            return Err(Failure::unreachable(
                "the worker did not drain the storm's orders within 120 s",
            ));
        }
    }
    Ok(EngineFigures {
        accepts_per_second: report.accept_rate,
        accept_p50_seconds: report.latency_seconds.p50,
        accept_p99_seconds: report.latency_seconds.p99,
        accepted,
        drain_per_second: accepted as f64 / drain_seconds,
        drain_seconds,
    })
}
