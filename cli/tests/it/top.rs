//! `fsctl top`'s data collectors against the real services, and its refusal
//! to draw anywhere but a terminal.

use flashsale_testkit::env;
use fsctl::top::app::{App, Source};
use fsctl::top::collect;
use fsctl::top::event::Event;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn collectors_reflect_orders_made_through_the_api() {
    let mut env = env().await;
    env.seed(1, 10, None).await;
    let api = env.start_api().await;
    env.start_worker().await;
    let answers = env.storm(&api, 1, 4, 4, |i| format!("u{i}")).await;
    assert!(answers.iter().all(|a| a.status == 202));
    env.wait_for_rows(&answers.iter().map(|a| a.key.clone()).collect::<Vec<_>>())
        .await;

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let tasks = collect::start(&env.backends(), &api, Duration::from_millis(200), &tx);
    let mut app = App::new(
        &env.backends().namespace,
        &api,
        Duration::from_millis(200),
        false,
        Instant::now(),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let reflects = |app: &App| {
        let product = app.shown.products.iter().find(|p| p.id == 1);
        product.is_some_and(|p| p.confirmed == 4 && p.stock == 6)
            && app.shown.violations.as_ref().is_some_and(Vec::is_empty)
            && app
                .shown
                .queue
                .as_ref()
                .is_some_and(|q| q.orders_consumers == 1)
            && app.shown.workers.iter().any(|w| !w.gone)
            && app.shown.accept_latency.is_some_and(|l| l.count >= 4.0)
            && Source::ALL.iter().all(|s| app.health[s].is_up())
    };
    while !reflects(&app) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(Event::Sample(at, sample))) => app.on_sample(at, sample),
            Ok(_) => {}
            Err(_) => panic!(
                "the snapshot never showed the 4 orders: products {:?}, queue {:?}, workers {}, health {:?}",
                app.shown.products,
                app.shown.queue,
                app.shown.workers.len(),
                app.health
            ),
        }
    }
    drop(tasks);
    env.finish().await;
}

#[tokio::test]
async fn top_refuses_a_non_terminal_with_exit_2() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fsctl"))
        .arg("top")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs a terminal") && err.contains("--json"),
        "{err}"
    );
}

#[tokio::test]
async fn embedded_collectors_read_the_demo_through_the_seams() {
    use flashsale_engine::embedded::EmbeddedBackends;
    use flashsale_engine::heartbeat::WorkerStats;
    use flashsale_engine::ledger::Ledger;
    use flashsale_engine::ledger::NewProduct;
    use flashsale_engine::locks::FencingToken;
    use flashsale_engine::locks::ProductLocks;
    use flashsale_engine::queue::OrderQueue;
    use flashsale_engine::{IdempotencyKey, ProductId, Quantity, UserId, domain::QueuedOrder};
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    let backends = EmbeddedBackends::default();
    backends
        .ledger
        .create_missing(&[NewProduct {
            id: 1,
            name: "Hot item".into(),
            stock: 10,
            max_per_order: 10,
            per_user_limit: None,
            hold_seconds: None,
        }])
        .await
        .unwrap();
    let order = QueuedOrder {
        order_id: IdempotencyKey::parse("o1").unwrap(),
        user_id: UserId::parse("u1").unwrap(),
        product_id: ProductId::new(1).unwrap(),
        quantity: Quantity::new(3).unwrap(),
        accepted_at: chrono::Utc::now(),
    };
    backends
        .ledger
        .apply_group(ProductId::new(1).unwrap(), FencingToken(1), &[order])
        .await
        .unwrap();
    backends
        .queue
        .publish(ProductId::new(1).unwrap(), "o2", b"{}")
        .await
        .unwrap();
    let held = backends
        .locks
        .try_acquire(ProductId::new(1).unwrap())
        .await
        .unwrap();
    assert!(held.is_some());
    let sources = fsctl::top::collect::EmbeddedSources {
        backends,
        workers: vec![(
            Arc::new(WorkerStats::new("w1".into(), String::new())),
            Arc::new(AtomicBool::new(false)),
        )],
    };

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _tasks = collect::start_embedded(
        sources,
        "http://127.0.0.1:1",
        Duration::from_millis(50),
        &tx,
    );
    let mut app = App::new(
        "embedded",
        "http://127.0.0.1:1",
        Duration::from_millis(50),
        false,
        Instant::now(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let reflects = |app: &App| {
        app.shown
            .products
            .first()
            .is_some_and(|p| p.confirmed == 3 && p.stock == 7)
            && app
                .shown
                .queue
                .as_ref()
                .is_some_and(|q| q.orders_ready == 1)
            && app.shown.locks.len() == 1
            && app.shown.workers.first().is_some_and(|w| w.gone)
            && app.shown.violations.as_ref().is_some_and(Vec::is_empty)
    };
    while !reflects(&app) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(Event::Sample(at, sample))) => app.on_sample(at, sample),
            Ok(_) => {}
            Err(_) => panic!(
                "never reflected: {:?} {:?}",
                app.shown.products, app.shown.queue
            ),
        }
    }
}
