//! The order queue split into partitions by product (`FLASHSALE_PARTITIONS`)
//! on the real services: every product books exactly, a process with
//! another partition count refuses to start, and `WORKER_PARTITIONS` narrows
//! what a worker consumes.

use flashsale_api::{ApiConfig, Application};
use flashsale_engine::queue;
use flashsale_testkit as common;
use flashsale_worker::{Worker, WorkerConfig};
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_partitions_book_every_product_and_another_count_is_refused() {
    let mut env = common::env().await;
    for id in 1..=6 {
        env.seed(id, 50, None).await;
    }
    let mut three = env.backends();
    three.partitions = Some(3);
    let api = env.start_api_with(three.clone(), true).await;
    env.start_worker_with(three.clone()).await;
    env.start_worker_with(three.clone()).await;

    let answers: Vec<_> = futures_util::stream::iter(0..600)
        .map(|i| {
            let (env, api) = (&env, &api);
            async move {
                let body =
                    json!({"userId": format!("b{i}"), "productId": i % 6 + 1, "quantity": 1});
                env.buy(api, None, body).await
            }
        })
        .buffer_unordered(100)
        .collect()
        .await;
    let accepted = common::accepted(&answers);
    assert_eq!(accepted.len(), 300, "six products of 50 units");
    env.wait_for_rows(&accepted).await;
    for id in 1..=6 {
        assert_eq!(env.stock(id).await, 0, "product {id}");
    }
    env.assert_invariants().await;
    let ns = three.namespace();
    let view = queue::queues(&three.amqp_url, &ns).await.unwrap();
    let names: Vec<&str> = view.partitions.iter().map(|p| p.queue.as_str()).collect();
    assert_eq!(
        names,
        ns.order_queues()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
    );
    assert!(
        view.partitions
            .iter()
            .all(|p| p.ready == 0 && p.consumers == 2),
        "{view:?}"
    );

    // A process with another count refuses to start, naming both.
    let one = env.backends();
    let refused = Worker::connect(WorkerConfig::new(one.clone())).await;
    let message = refused
        .err()
        .expect("a worker with K = 1 starts")
        .to_string();
    assert!(
        message.contains("FLASHSALE_PARTITIONS is 1") && message.contains("has 3"),
        "{message}"
    );
    let refused = Application::build(ApiConfig::new(one, "127.0.0.1:0")).await;
    let message = refused.err().expect("an API with K = 1 starts").to_string();
    assert!(message.contains("FLASHSALE_PARTITIONS is 1"), "{message}");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_consumes_only_the_partitions_it_is_given() {
    let mut env = common::env().await;
    env.seed(1, 10, None).await;
    env.seed(2, 10, None).await;
    let mut two = env.backends();
    two.partitions = Some(2);
    let api = env.start_api_with(two.clone(), true).await;
    let mut config = WorkerConfig::new(two.clone());
    config.worker_partitions = vec![0];
    let narrow =
        flashsale_worker::RunningWorker::spawn(Worker::connect(config).await.unwrap(), None);

    let buy = |product: i64| {
        let body = json!({"userId": "u", "productId": product, "quantity": 1});
        let (env, api) = (&env, &api);
        async move { env.buy(api, None, body).await }
    };
    let even = buy(2).await; // partition 0
    let odd = buy(1).await; // partition 1
    assert_eq!(even.status, StatusCode::ACCEPTED);
    assert_eq!(odd.status, StatusCode::ACCEPTED);
    env.wait_for_rows(std::slice::from_ref(&even.key)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let view = queue::queues(&two.amqp_url, &two.namespace())
        .await
        .unwrap();
    assert_eq!(
        view.partitions[1].ready, 1,
        "partition 1 is nobody's: {view:?}"
    );
    assert_eq!(
        view.orders_consumers, 0,
        "the least consumed partition has none"
    );

    let mut bad = WorkerConfig::new(two.clone());
    bad.worker_partitions = vec![2];
    let message = Worker::connect(bad).await.err().unwrap().to_string();
    assert!(
        message.contains("WORKER_PARTITIONS names partition 2"),
        "{message}"
    );

    env.start_worker_with(two).await;
    env.wait_for_rows(&[odd.key]).await;
    narrow.stop().await.unwrap();
    env.assert_invariants().await;
    env.finish().await;
}

/// A backlog over three partitions drained by one worker: its batches mix
/// the partitions' consumers on one channel, whose delivery tags interleave,
/// so a batch can hold a tag above one still waiting in another consumer's
/// buffer. Acking it `multiple` would settle that one unprocessed and lose
/// it (found on the cluster: 301 of 20,000 orders); every order must book.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_over_partitions_books_every_order() {
    let mut env = common::env().await;
    for id in 1..=3 {
        env.seed(id, 2_000, None).await;
    }
    let mut three = env.backends();
    three.partitions = Some(3);
    let api = env.start_api_with(three.clone(), true).await;
    let answers: Vec<_> = futures_util::stream::iter(0..4_500)
        .map(|i| {
            let (env, api) = (&env, &api);
            async move {
                let body =
                    json!({"userId": format!("b{i}"), "productId": i % 3 + 1, "quantity": 1});
                env.buy(api, None, body).await
            }
        })
        .buffer_unordered(100)
        .collect()
        .await;
    let accepted = common::accepted(&answers);
    assert_eq!(accepted.len(), 4_500);
    env.start_worker_with(three).await;
    env.wait_for_rows(&accepted).await;
    for id in 1..=3 {
        assert_eq!(env.stock(id).await, 500, "product {id}");
    }
    env.assert_invariants().await;
    env.finish().await;
}
