//! One conformance suite for the seams with two implementations: every
//! check runs against the embedded (in-memory) backend and against the real
//! PostgreSQL / Redis / RabbitMQ, so the two cannot drift.

use chrono::Utc;
use flashsale_engine::accept_log::{
    AcceptLog, AcceptRecord, AcceptState, AcceptStore, Admit, MemoryAcceptLog, RedisAcceptLog,
};
use flashsale_engine::admission::{self, AdmissionCounters, Derived};
use flashsale_engine::audit::QueueFacts;
use flashsale_engine::config::{DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL};
use flashsale_engine::ledger::Ledger;
use flashsale_engine::ledger::MemoryLedger;
use flashsale_engine::ledger::{
    BOOKED_KEYS, FencedGroup, GroupReceipt, JointOutcome, LedgerError, NewProduct, OrderOutcome,
    StockLedger,
};
use flashsale_engine::locks::MemoryLocks;
use flashsale_engine::locks::ProductLocks;
use flashsale_engine::locks::{FencingToken, ProductLock};
use flashsale_engine::queue::MemoryQueue;
use flashsale_engine::queue::{Delivered, MAX_BATCH, OrderQueue, QueueConsumer, RabbitQueue};
use flashsale_engine::rate_limit::{
    Bucket, MemoryRateLimiter, Rate, RateLimiter, RedisRateLimiter, Verdict,
};
use flashsale_engine::scratch::Scratch;
use flashsale_engine::{
    BackendUrls, IdempotencyKey, ProductId, Quantity, RejectReason, UserId, domain::QueuedOrder,
    postgres, redis_conn,
};
use std::time::Duration;

fn servers() -> BackendUrls {
    let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    BackendUrls {
        database_url: var("DATABASE_URL", DEFAULT_DATABASE_URL),
        redis_url: var("REDIS_URL", DEFAULT_REDIS_URL),
        amqp_url: var("AMQP_URL", DEFAULT_AMQP_URL),
        namespace: String::new(),
        partitions: None,
    }
}

fn pid(id: i64) -> ProductId {
    ProductId::new(id).unwrap()
}

fn order(key: &str, user: &str, product: i64, units: i64) -> QueuedOrder {
    QueuedOrder {
        order_id: IdempotencyKey::parse(key).unwrap(),
        user_id: UserId::parse(user).unwrap(),
        product_id: pid(product),
        quantity: Quantity::new(units).unwrap(),
        accepted_at: Utc::now(),
    }
}

fn product(id: i64, stock: i32, per_user_limit: Option<i32>) -> NewProduct {
    NewProduct {
        id,
        name: format!("p{id}"),
        stock,
        max_per_order: 10,
        per_user_limit,
        hold_seconds: None,
    }
}

use OrderOutcome::{Confirmed, Duplicate, Rejected};

/// The ledger's rules, on any implementation.
async fn ledger_conforms(l: &dyn Ledger) {
    assert_eq!(
        l.create_missing(&[
            product(1, 3, None),
            product(2, 10, Some(2)),
            product(3, 5, None)
        ])
        .await
        .unwrap(),
        vec![1, 2, 3]
    );
    assert!(
        l.create_missing(&[product(1, 99, None)])
            .await
            .unwrap()
            .is_empty()
    );

    // Conditional stock update, in arrival order.
    let r = l
        .apply_group(
            pid(1),
            FencingToken(1),
            &[
                order("a1", "u1", 1, 2),
                order("a2", "u2", 1, 2),
                order("a3", "u3", 1, 1),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        r.outcomes,
        vec![Confirmed, Rejected(RejectReason::SoldOut), Confirmed]
    );
    assert_eq!(r.stock_after, Some(0));
    assert_eq!(l.product(pid(1)).await.unwrap().unwrap().stock, 0);

    // Idempotent insert: a redelivered group, and a key twice in one group.
    let again = l
        .apply_group(
            pid(1),
            FencingToken(2),
            &[
                order("a1", "u1", 1, 2),
                order("a4", "u4", 1, 1),
                order("a4", "u4", 1, 1),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        again.outcomes,
        vec![Duplicate, Rejected(RejectReason::SoldOut), Duplicate]
    );
    let a1 = l.order("a1").await.unwrap().unwrap();
    assert_eq!(
        (a1.quantity, a1.status),
        (2, flashsale_engine::OrderStatus::Confirmed)
    );
    assert_eq!(
        l.order("a4").await.unwrap().unwrap().reason.as_deref(),
        Some("sold_out")
    );
    assert!(l.order("never").await.unwrap().is_none());

    // Per-user limit, across groups.
    let r = l
        .apply_group(
            pid(2),
            FencingToken(1),
            &[
                order("b1", "u1", 2, 1),
                order("b2", "u1", 2, 2),
                order("b3", "u2", 2, 2),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        r.outcomes,
        vec![Confirmed, Rejected(RejectReason::PerUserLimit), Confirmed]
    );
    let r = l
        .apply_group(
            pid(2),
            FencingToken(2),
            &[order("b4", "u1", 2, 1), order("b5", "u1", 2, 1)],
        )
        .await
        .unwrap();
    assert_eq!(
        r.outcomes,
        vec![Confirmed, Rejected(RejectReason::PerUserLimit)]
    );
    assert_eq!(l.held_by(pid(2), "u1").await.unwrap(), 2);
    assert_eq!(l.product(pid(2)).await.unwrap().unwrap().stock, 6);

    // Fencing: a token not above the last writer's changes nothing.
    l.apply_group(pid(3), FencingToken(7), &[order("c1", "u1", 3, 1)])
        .await
        .unwrap();
    match l
        .apply_group(pid(3), FencingToken(7), &[order("c2", "u1", 3, 1)])
        .await
    {
        Err(LedgerError::FencedOut { fence, .. }) => assert_eq!(fence, 7),
        other => panic!("expected fenced out, got {other:?}"),
    }
    assert!(
        l.apply_group(pid(3), FencingToken(5), &[order("c3", "u1", 3, 1)])
            .await
            .is_err()
    );
    assert!(l.order("c2").await.unwrap().is_none() && l.order("c3").await.unwrap().is_none());
    assert_eq!(l.product(pid(3)).await.unwrap().unwrap().stock, 4);
    assert_eq!(l.product(pid(3)).await.unwrap().unwrap().lock_fence, 7);

    // An unknown product rejects, and takes nothing.
    let r = l
        .apply_group(pid(404), FencingToken(1), &[order("d1", "u1", 404, 1)])
        .await
        .unwrap();
    assert_eq!(r.outcomes, vec![Rejected(RejectReason::UnknownProduct)]);
    assert_eq!(r.stock_after, None);

    // The admission counter's read: stock and which keys have rows, at once.
    let (stock, booked) = l
        .stock_and_booked(pid(1), &["a1".into(), "a2".into(), "nope".into()])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stock, 0);
    assert_eq!(booked, ["a1".to_owned(), "a2".to_owned()].into());
    assert!(l.stock_and_booked(pid(404), &[]).await.unwrap().is_none());

    drain_reads_conform(l).await;
    joint_apply_conforms(l).await;
}

/// What a drain reads (`fsctl storm`'s and `fsctl demo`'s one path): the
/// outcomes of its keys, the orders of its products, and the audit with
/// its accepted keys, over the books [`ledger_conforms`] wrote.
async fn drain_reads_conform(l: &dyn Ledger) {
    let keys: Vec<String> = ["a1", "a2", "a3", "a4", "b2", "nope"]
        .map(String::from)
        .into();
    // a1, a3 booked; a2, a4 sold out and b2 over the per-user limit.
    assert_eq!(l.outcomes(&keys).await.unwrap(), (2, 3));
    let mut of_1: Vec<String> = l
        .orders_of(&[pid(1)])
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.order_id)
        .collect();
    of_1.sort();
    assert_eq!(of_1, ["a1", "a2", "a3", "a4"]);

    let accepted: Vec<String> = vec!["a1".into(), "ghost".into()];
    let drained = QueueFacts::drained_with(Default::default());
    let report = l.audit(Some(&accepted), &drained).await.unwrap();
    assert_eq!((report.lost, report.pending), (1, 0), "{report:?}");
    assert!(!report.ok);
    assert_eq!(
        report
            .violations
            .iter()
            .map(|v| v.invariant)
            .collect::<Vec<_>>(),
        [4]
    );
    let one = report.products.iter().find(|p| p.id == 1).unwrap();
    assert_eq!(
        (one.confirmed_units, one.stock, one.seeded_stock),
        (3, 0, 3)
    );

    let dead_lettered = QueueFacts::drained_with(["ghost".to_owned()].into());
    let report = l.audit(Some(&accepted), &dead_lettered).await.unwrap();
    assert!(report.ok && report.lost == 0, "{report:?}");
    let in_flight = QueueFacts::default();
    let report = l.audit(Some(&accepted), &in_flight).await.unwrap();
    assert_eq!((report.lost, report.pending), (0, 1), "{report:?}");
}

/// Several groups in one commit: the same rules as one by one; a group
/// fenced out writes nothing and is reported; the others commit.
async fn joint_apply_conforms(l: &dyn Ledger) {
    l.create_missing(&[
        product(11, 4, Some(2)),
        product(12, 3, None),
        product(13, 5, None),
    ])
    .await
    .unwrap();
    l.apply_group(pid(13), FencingToken(9), &[order("x0", "u1", 13, 1)])
        .await
        .unwrap();
    let g11 = [
        order("x1", "u1", 11, 2),
        order("x2", "u1", 11, 1),
        order("x3", "u2", 11, 2),
        order("x4", "u3", 11, 1),
    ];
    let g12 = [
        order("x5", "u1", 12, 2),
        order("x5", "u1", 12, 2),
        order("a1", "u9", 12, 1),
    ];
    let g13 = [order("x6", "u1", 13, 1)];
    let g404 = [order("x7", "u1", 404, 1)];
    let groups = [
        FencedGroup {
            product: pid(11),
            token: FencingToken(1),
            orders: &g11,
        },
        FencedGroup {
            product: pid(12),
            token: FencingToken(1),
            orders: &g12,
        },
        FencedGroup {
            product: pid(13),
            token: FencingToken(3),
            orders: &g13,
        },
        FencedGroup {
            product: pid(404),
            token: FencingToken(1),
            orders: &g404,
        },
    ];
    let outcomes = l.apply_groups(&groups).await.unwrap();
    assert_eq!(
        outcomes,
        vec![
            JointOutcome::Committed(GroupReceipt {
                outcomes: vec![
                    Confirmed,
                    Rejected(RejectReason::PerUserLimit),
                    Confirmed,
                    Rejected(RejectReason::SoldOut)
                ],
                stock_after: Some(0),
            }),
            JointOutcome::Committed(GroupReceipt {
                outcomes: vec![Confirmed, Duplicate, Duplicate],
                stock_after: Some(1),
            }),
            JointOutcome::FencedOut { fence: 9 },
            JointOutcome::Committed(GroupReceipt {
                outcomes: vec![Rejected(RejectReason::UnknownProduct)],
                stock_after: None,
            }),
        ]
    );
    assert!(
        l.order("x6").await.unwrap().is_none(),
        "a fenced-out group wrote"
    );
    assert_eq!(l.product(pid(13)).await.unwrap().unwrap().stock, 4);
    assert_eq!(l.product(pid(11)).await.unwrap().unwrap().lock_fence, 1);
    assert_eq!(l.held_by(pid(11), "u1").await.unwrap(), 2);
    // Redelivered together: every order a duplicate, nothing changes.
    let again = l
        .apply_groups(
            &groups[..2]
                .iter()
                .map(|g| FencedGroup {
                    token: FencingToken(2),
                    ..*g
                })
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    for outcome in again {
        let JointOutcome::Committed(r) = outcome else {
            panic!("fenced out with a newer token")
        };
        assert!(
            r.outcomes.iter().all(|o| *o == Duplicate),
            "{:?}",
            r.outcomes
        );
    }
    assert_eq!(l.product(pid(12)).await.unwrap().unwrap().stock, 1);
}

/// The lock's exclusivity, lease and fencing, on any implementation;
/// `a` and `b` are two holders of the same lock table.
async fn locks_conform(a: &dyn ProductLocks, b: &dyn ProductLocks, short_a: &dyn ProductLocks) {
    let lost = a.try_acquire(pid(1)).await.unwrap().expect("free lock");
    // An acquire whose reply was lost, run again by the same holder: it
    // takes its own lock back with a fresh token, and the lock is not
    // stuck for the lease.
    let held = a.try_acquire(pid(1)).await.unwrap().expect("its own lock");
    assert!(
        held.token > lost.token,
        "a fresh token for a new transaction"
    );
    assert!(
        !a.release(&lost).await.unwrap(),
        "the old token no longer holds"
    );
    assert!(b.try_acquire(pid(1)).await.unwrap().is_none(), "held by a");
    assert!(a.release(&held).await.unwrap());
    assert!(!a.release(&held).await.unwrap(), "released once");
    let next = b.try_acquire(pid(1)).await.unwrap().expect("free again");
    assert!(next.token > held.token, "tokens only grow");
    assert!(b.release(&next).await.unwrap());

    // A lease ends on its own; the next holder gets a higher token, and the
    // old holder can no longer release.
    let short = short_a.try_acquire(pid(2)).await.unwrap().expect("free");
    assert!(b.try_acquire(pid(2)).await.unwrap().is_none());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let taken_over = b.try_acquire(pid(2)).await.unwrap().expect("lease ended");
    assert!(taken_over.token > short.token);
    assert!(!short_a.release(&short).await.unwrap());
    assert!(b.release(&taken_over).await.unwrap());

    // raise_fence lifts the counter (after PostgreSQL fenced a holder out),
    // never lowers it.
    assert_eq!(a.raise_fence(pid(3), 40).await.unwrap(), 40);
    assert_eq!(a.raise_fence(pid(3), 10).await.unwrap(), 40);
    let after = a.try_acquire(pid(3)).await.unwrap().unwrap();
    assert_eq!(after.token, FencingToken(41));
}

#[tokio::test]
async fn embedded_ledger_conforms() {
    ledger_conforms(&MemoryLedger::new()).await;
    holds_conform(&MemoryLedger::new()).await;
}

/// Holds (contract v3): a product with `hold_seconds` books `held`; pay
/// and cancel settle once, repeats answer the same, a cancel gives the
/// units back at once, a pay after `heldUntil` finds the hold expired, and
/// the sweep expires what is due, once.
async fn holds_conform(l: &dyn Ledger) {
    use flashsale_engine::OrderStatus;
    use flashsale_engine::ledger::{HoldAction, HoldSettlement};
    let mut held = product(1, 10, None);
    held.hold_seconds = Some(1);
    l.create_missing(&[held]).await.unwrap();
    let orders = [
        order("h-pay", "u1", 1, 1),
        order("h-cancel", "u2", 1, 2),
        order("h-late", "u3", 1, 3),
        order("h-swept", "u4", 1, 4),
    ];
    let receipt = l
        .apply_group(pid(1), FencingToken(1), &orders)
        .await
        .unwrap();
    assert_eq!(receipt.stock_after, Some(0));
    for o in &orders {
        let view = l.order(o.order_id.as_str()).await.unwrap().unwrap();
        assert_eq!(view.status, OrderStatus::Held);
        assert!(view.held_until.is_some());
    }
    let held = l.held_units().await.unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(
        (held[0].product_id, held[0].units, held[0].overdue),
        (1, 10, 0)
    );
    assert_eq!(
        l.held_by(pid(1), "u1").await.unwrap(),
        1,
        "held counts as the buyer's"
    );

    let settled = |s: HoldSettlement| match s {
        HoldSettlement::Settled {
            order,
            changed,
            stock_after,
        } => (order.status, changed, stock_after),
        other => panic!("not settled: {other:?}"),
    };
    let pay = l.settle_hold("h-pay", HoldAction::Pay).await.unwrap();
    assert_eq!(settled(pay), (OrderStatus::Paid, true, None));
    let again = l.settle_hold("h-pay", HoldAction::Pay).await.unwrap();
    assert_eq!(settled(again), (OrderStatus::Paid, false, None));
    match l.settle_hold("h-pay", HoldAction::Cancel).await.unwrap() {
        HoldSettlement::NotHeld(o) => assert_eq!(o.status, OrderStatus::Paid),
        other => panic!("{other:?}"),
    }
    let cancel = l.settle_hold("h-cancel", HoldAction::Cancel).await.unwrap();
    assert_eq!(settled(cancel), (OrderStatus::Cancelled, true, Some(2)));
    assert_eq!(
        l.settle_hold("nobody", HoldAction::Pay).await.unwrap(),
        HoldSettlement::Unknown
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;
    match l.settle_hold("h-late", HoldAction::Pay).await.unwrap() {
        HoldSettlement::Expired { order, stock_after } => {
            assert_eq!(order.status, OrderStatus::Expired);
            assert_eq!(stock_after, Some(5));
        }
        other => panic!("a late pay: {other:?}"),
    }
    let swept = l.expire_holds(100).await.unwrap();
    assert_eq!(swept.len(), 1);
    assert_eq!(swept[0].orders, vec!["h-swept".to_owned()]);
    assert_eq!((swept[0].units, swept[0].stock_after), (4, 9));
    assert!(
        l.expire_holds(100).await.unwrap().is_empty(),
        "expired twice"
    );
    assert!(l.held_units().await.unwrap().is_empty());
    let p = l.product(pid(1)).await.unwrap().unwrap();
    assert_eq!((p.stock, p.hold_seconds), (9, Some(1)));
}

#[tokio::test]
async fn postgres_ledger_conforms() {
    let scratch = Scratch::new(&servers());
    // The worker's pool, with its session settings.
    let pool = postgres::connect_for_lookups(&scratch.backends.database_url, 2)
        .await
        .expect("PostgreSQL is not answering (scripts/test starts it)");
    ledger_conforms(&StockLedger::new(pool.clone())).await;
    sqlx::query("TRUNCATE orders, products")
        .execute(&pool)
        .await
        .unwrap();
    holds_conform(&StockLedger::new(pool.clone())).await;
    pool.close().await;
    scratch.remove().await.unwrap();
}

/// A batch's key look-up goes through the primary key even on a fresh
/// orders table without statistics, generic plan or not; with default
/// settings PostgreSQL 15 plans a scan of the whole table here.
#[tokio::test]
async fn the_workers_key_lookup_uses_the_index_on_a_fresh_table() {
    let scratch = Scratch::new(&servers());
    let pool = postgres::connect_for_lookups(&scratch.backends.database_url, 1)
        .await
        .expect("PostgreSQL is not answering (scripts/test starts it)");
    sqlx::query(
        "INSERT INTO orders SELECT 'k' || i, 'u', 1, 1, 'confirmed', NULL, now(), now()
         FROM generate_series(1, 20000) AS i",
    )
    .execute(&pool)
    .await
    .unwrap();
    let keys: Vec<String> = (0..500).map(|i| format!("k{}", i * 7)).collect();
    for mode in ["force_custom_plan", "force_generic_plan"] {
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("SET plan_cache_mode = {mode}")))
            .execute(&mut *conn)
            .await
            .unwrap();
        let plan: Vec<String> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {BOOKED_KEYS}")))
                .bind(&keys)
                .fetch_all(&mut *conn)
                .await
                .unwrap();
        let plan = plan.join("\n");
        assert!(
            plan.contains("orders_pkey") && !plan.contains("Seq Scan"),
            "{mode}: {plan}"
        );
        sqlx::query("RESET plan_cache_mode")
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    pool.close().await;
    scratch.remove().await.unwrap();
}

#[tokio::test]
async fn embedded_locks_conform() {
    let a = MemoryLocks::new("a");
    let b = a.holder("b");
    let short = a.holder("a-short").with_lease(Duration::from_millis(200));
    locks_conform(&a, &b, &short).await;
}

#[tokio::test]
async fn redis_locks_conform() {
    let scratch = Scratch::new(&servers());
    let redis = redis_conn::connect(&scratch.backends.redis_url)
        .await
        .expect("Redis is not answering (scripts/test starts it)");
    let ns = scratch.backends.namespace();
    let a = ProductLock::new(redis.clone(), ns.clone(), "a");
    let b = ProductLock::new(redis.clone(), ns.clone(), "b");
    let short = ProductLock::new(redis, ns, "a-short").with_lease(Duration::from_millis(200));
    locks_conform(&a, &b, &short).await;
    scratch.remove().await.unwrap();
}

/// The next batch, or an empty one when nothing comes within `wait`.
async fn batch(c: &mut Box<dyn QueueConsumer>, wait: Duration) -> Vec<Delivered> {
    match tokio::time::timeout(wait, c.next_batch()).await {
        Ok(b) => b.unwrap().unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// Takes deliveries until `n` are held (or a few seconds pass).
async fn take(c: &mut Box<dyn QueueConsumer>, n: usize) -> Vec<Delivered> {
    let mut got = Vec::new();
    for _ in 0..50 {
        if got.len() >= n {
            break;
        }
        got.extend(batch(c, Duration::from_millis(200)).await);
    }
    got
}

fn ids(ds: &[Delivered]) -> Vec<&str> {
    ds.iter().map(|d| d.message_id.as_str()).collect()
}

/// The order queue's guarantees, on any implementation.
async fn queue_conforms(q: &dyn OrderQueue) {
    for i in 1..=5 {
        // Returns only once the message is held durably (the confirm).
        q.publish(pid(1), &format!("m{i}"), format!("body {i}").as_bytes())
            .await
            .unwrap();
    }
    let mut c = q.consume(2).await.unwrap();
    let first = take(&mut c, 2).await;
    assert_eq!(
        ids(&first),
        vec!["m1", "m2"],
        "in order, at most the prefetch"
    );
    assert_eq!(first[0].payload, b"body 1");
    assert!(!first[0].redelivered);
    assert!(
        batch(&mut c, Duration::from_millis(300)).await.is_empty(),
        "prefetch full"
    );
    c.ack_through(first[1].tag).await.unwrap();
    let second = take(&mut c, 2).await;
    assert_eq!(ids(&second), vec!["m3", "m4"]);

    // The consumer goes away holding m3 and m4: they come back, redelivered.
    c.close().await;
    let mut c = q.consume(10).await.unwrap();
    let again = take(&mut c, 3).await;
    assert_eq!(ids(&again), vec!["m3", "m4", "m5"]);
    assert!(again[0].redelivered && again[1].redelivered && !again[2].redelivered);

    // A dead-lettered delivery leaves the queue for the DLQ with its reason.
    c.dead_letter(&again[0], "poison").await.unwrap();
    c.ack_through(again[2].tag).await.unwrap();
    c.close().await;
    let mut c = q.consume(10).await.unwrap();
    assert!(
        batch(&mut c, Duration::from_millis(500)).await.is_empty(),
        "all settled"
    );
    c.close().await;
    let dead = q.dead_letters().await.unwrap();
    assert_eq!(dead, vec![("m3".to_owned(), Some("poison".to_owned()))]);

    // A prefetch above one batch: no batch exceeds MAX_BATCH, and the rest
    // arrives while the first batch is still unacknowledged (the pipeline).
    let total = MAX_BATCH + 50;
    for i in 0..total {
        q.publish(pid(1), &format!("p{i}"), b"x").await.unwrap();
    }
    let mut c = q
        .consume(u16::try_from(2 * MAX_BATCH).unwrap())
        .await
        .unwrap();
    let mut held = Vec::new();
    while held.len() < total {
        let b = batch(&mut c, Duration::from_secs(5)).await;
        assert!(
            !b.is_empty(),
            "only {} of {total} arrived unacked",
            held.len()
        );
        assert!(b.len() <= MAX_BATCH, "a batch of {}", b.len());
        held.extend(b);
    }
    assert_eq!(ids(&held)[MAX_BATCH + 49], format!("p{}", MAX_BATCH + 49));
    c.ack_through(held.last().unwrap().tag).await.unwrap();
    c.close().await;
}

#[tokio::test]
async fn embedded_queue_conforms() {
    queue_conforms(&MemoryQueue::new()).await;
}

#[tokio::test]
async fn rabbitmq_queue_conforms() {
    let scratch = Scratch::new(&servers());
    let q = RabbitQueue::start(&scratch.backends.amqp_url, &scratch.backends.namespace());
    for _ in 0..100 {
        if q.is_connected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        q.is_connected(),
        "RabbitMQ is not answering (scripts/test starts it)"
    );
    queue_conforms(&q).await;
    drop(q);
    scratch.remove().await.unwrap();
}

fn request(user: &str, units: i64) -> flashsale_engine::OrderRequest {
    flashsale_engine::OrderRequest::parse(
        format!(r#"{{"userId":"{user}","productId":1,"quantity":{units}}}"#).as_bytes(),
    )
    .unwrap()
}

fn key(k: &str) -> IdempotencyKey {
    IdempotencyKey::parse(k).unwrap()
}

/// The accept log's claims, on any implementation (product 1's counter
/// holds 10 units).
async fn accept_store_conforms(log: &dyn AcceptStore) {
    log.reset(pid(1), 10).await.unwrap();
    let k1 = key("k1");
    let first = AcceptRecord::pending(&request("u1", 1), Utc::now());
    let second = AcceptRecord::pending(&request("u1", 1), Utc::now());
    assert_eq!(
        log.admit(&k1, &first).await.unwrap(),
        Admit::Claimed { left: 9 }
    );
    assert_eq!(
        log.admit(&k1, &second).await.unwrap(),
        Admit::Taken(first.clone())
    );
    // Only the claim's owner withdraws it.
    log.withdraw(&k1, &second).await.unwrap();
    assert_eq!(log.get("k1").await.unwrap(), Some(first.clone()));
    log.withdraw(&k1, &first).await.unwrap();
    assert_eq!(log.get("k1").await.unwrap(), None, "a retry starts afresh");
    // Claimed, then queued: a repeat sees the accepted record.
    assert_eq!(
        log.admit(&k1, &second).await.unwrap(),
        Admit::Claimed { left: 9 },
        "the withdrawn claim gave its unit back"
    );
    log.mark_queued(&k1, &second).await.unwrap();
    match log.admit(&k1, &first).await.unwrap() {
        Admit::Taken(r) => {
            assert_eq!(r.state, AcceptState::Queued);
            assert_eq!(r.claim, second.claim);
            assert!(r.same_body(&request("u1", 1)) && !r.same_body(&request("u1", 2)));
        }
        other => panic!("an accepted key was admitted again: {other:?}"),
    }
    let queued = AcceptRecord {
        state: AcceptState::Queued,
        ..second.clone()
    };
    assert_eq!(
        log.get_many(&["k1".into(), "none".into()]).await.unwrap(),
        vec![Some(queued), None]
    );
}

/// The admission counter, on any store and ledger: takes by quantity, gives
/// back once, derives from the ledger, and never overwrites a change it did
/// not see. Product 1 of `ledger` has 5 units and no orders.
/// `age_claim` makes a key's pending claim older than
/// [`admission::PENDING_ALIVE`] on the store's own clock.
async fn admission_conforms(
    store: &dyn AcceptStore,
    ledger: &dyn Ledger,
    age_claim: impl AsyncFn(&str),
) {
    let admit = |k: &'static str, units: i64| {
        let record = AcceptRecord::pending(&request(k, units), Utc::now());
        async move { (store.admit(&key(k), &record).await.unwrap(), record) }
    };
    let tokens = || async { store.tokens(&[pid(1)]).await.unwrap()[0] };
    assert_eq!(admit("x0", 1).await.0, Admit::NoCounter);
    assert_eq!(
        store.get("x0").await.unwrap(),
        None,
        "nothing claimed without a counter"
    );
    store.reset(pid(1), 3).await.unwrap();
    assert_eq!(
        store.tokens(&[pid(1), pid(2)]).await.unwrap(),
        vec![Some(3), None]
    );
    let (a, a_rec) = admit("a", 2).await;
    assert_eq!(a, Admit::Claimed { left: 1 });
    // The same admission run again (a client re-sending after a lost
    // reply): claimed, and nothing more taken.
    assert_eq!(
        store.admit(&key("a"), &a_rec).await.unwrap(),
        Admit::Claimed { left: 1 }
    );
    assert_eq!(tokens().await, Some(1), "a re-run took nothing");
    // Marked queued only while the record is this claim's, and safe twice.
    let other = AcceptRecord::pending(&request("a", 2), Utc::now());
    assert!(!store.mark_queued(&key("a"), &other).await.unwrap());
    assert_eq!(
        store.get("a").await.unwrap().map(|r| r.state),
        Some(AcceptState::Pending)
    );
    assert_eq!(admit("b", 2).await.0, Admit::Short { available: 1 });
    assert_eq!(
        store.get("b").await.unwrap(),
        None,
        "a short buy claims nothing"
    );
    assert_eq!(admit("c", 1).await.0, Admit::Claimed { left: 0 });
    assert_eq!(admit("d", 1).await.0, Admit::Short { available: 0 });

    // Withdrawn (a 503): the units come back, once.
    store.withdraw(&key("a"), &a_rec).await.unwrap();
    store.withdraw(&key("a"), &a_rec).await.unwrap();
    assert_eq!(tokens().await, Some(2));

    // Settled by a worker: a confirmed order keeps its units, a rejected
    // one gives them back, once.
    assert_eq!(admit("e", 2).await.0, Admit::Claimed { left: 0 });
    assert_eq!(
        store
            .release_admitted(pid(1), &["c".into()], &[])
            .await
            .unwrap(),
        Some(0)
    );
    assert_eq!(
        store
            .release_admitted(pid(1), &[], &["e".into()])
            .await
            .unwrap(),
        Some(2)
    );
    assert_eq!(
        store
            .release_admitted(pid(1), &[], &["e".into()])
            .await
            .unwrap(),
        Some(2)
    );
    let snapshot = store.admission(pid(1)).await.unwrap();
    assert_eq!(snapshot.tokens, Some(2));
    assert!(snapshot.admitted.is_empty(), "{:?}", snapshot.admitted);

    // Derived from the ledger: stock 5 minus the units still in flight (a
    // queued order, a fresh claim), not a dead claim's.
    store.reset(pid(1), 3).await.unwrap();
    let (_, q_rec) = admit("q", 1).await;
    store.mark_queued(&key("q"), &q_rec).await.unwrap();
    admit("p", 1).await;
    // Dead by the store's clock, whatever its record's own time says.
    let dead = AcceptRecord::pending(&request("z", 1), Utc::now());
    assert!(matches!(
        store.admit(&key("z"), &dead).await.unwrap(),
        Admit::Claimed { left: 0 }
    ));
    age_claim("z").await;
    assert_eq!(
        admission::derive(store, ledger, pid(1), false)
            .await
            .unwrap(),
        Derived::Set {
            tokens: 3,
            in_flight: 2
        }
    );
    let admitted = store.admission(pid(1)).await.unwrap().admitted;
    assert_eq!(
        admitted.len(),
        2,
        "the dead claim is forgotten: {admitted:?}"
    );

    // A take between the read and the write: the write is refused.
    let before = store.admission(pid(1)).await.unwrap();
    admit("r", 1).await;
    assert!(
        !store
            .reconcile(pid(1), before.version, &[], 99, false)
            .await
            .unwrap()
    );
    assert_eq!(tokens().await, Some(2));

    // Dropped (a restock): no counter until derived again; a reconciliation
    // does not create one, a buy's derivation does.
    store.drop_counter(pid(1)).await.unwrap();
    let derive = |create| admission::derive(store, ledger, pid(1), create);
    assert_eq!(derive(false).await.unwrap(), Derived::Skipped);
    assert_eq!(
        derive(true).await.unwrap(),
        Derived::Set {
            tokens: 2,
            in_flight: 3
        }
    );
    let unknown = admission::derive(store, ledger, pid(404), true).await;
    assert_eq!(unknown.unwrap(), Derived::Skipped);
}

#[tokio::test]
async fn embedded_accept_log_conforms() {
    accept_store_conforms(&MemoryAcceptLog::new()).await;
}

#[tokio::test]
async fn embedded_admission_conforms() {
    let ledger = MemoryLedger::new();
    ledger.create_missing(&[product(1, 5, None)]).await.unwrap();
    let store = MemoryAcceptLog::new();
    admission_conforms(&store, &ledger, async |k: &str| {
        store.age_claim(k, admission::PENDING_ALIVE);
    })
    .await;
}

/// The scratch deployment's Redis, and its PostgreSQL ledger holding
/// product 1 with 5 units.
async fn redis_and_a_ledger(
    scratch: &Scratch,
) -> (
    flashsale_engine::redis_conn::Redis,
    sqlx::PgPool,
    StockLedger,
) {
    let redis = redis_conn::connect(&scratch.backends.redis_url)
        .await
        .expect("Redis is not answering (scripts/test starts it)");
    let pool = postgres::connect_for_lookups(&scratch.backends.database_url, 2)
        .await
        .expect("PostgreSQL is not answering (scripts/test starts it)");
    let ledger = StockLedger::new(pool.clone());
    ledger.create_missing(&[product(1, 5, None)]).await.unwrap();
    (redis, pool, ledger)
}

#[tokio::test]
async fn redis_and_postgres_admission_conforms() {
    let scratch = Scratch::new(&servers());
    let (redis, pool, ledger) = redis_and_a_ledger(&scratch).await;
    let ns = scratch.backends.namespace();
    let age_claim = async |k: &str| {
        let mut conn = redis.clone();
        let left = flashsale_engine::accept_log::PENDING_TTL - admission::PENDING_ALIVE;
        redis::cmd("PEXPIRE")
            .arg(ns.accept_key(k))
            .arg(left.as_millis() as u64 - 100)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    };
    admission_conforms(
        &RedisAcceptLog::new(redis.clone(), ns.clone()),
        &ledger,
        age_claim,
    )
    .await;
    pool.close().await;
    scratch.remove().await.unwrap();
}

#[tokio::test]
async fn redis_accept_log_conforms() {
    let scratch = Scratch::new(&servers());
    let redis = redis_conn::connect(&scratch.backends.redis_url)
        .await
        .expect("Redis is not answering (scripts/test starts it)");
    accept_store_conforms(&RedisAcceptLog::new(redis, scratch.backends.namespace())).await;
    scratch.remove().await.unwrap();
}

#[tokio::test]
async fn a_list_of_rabbitmq_nodes_connects_to_one_that_answers() {
    use flashsale_engine::queue::rabbitmq::connect;
    let real = std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned());
    let dead = "amqp://guest:secret@127.0.0.1:1/%2f";
    // Whichever node it starts at, it ends on the one that answers.
    for list in [format!("{dead},{real}"), format!("{real},{dead}")] {
        for _ in 0..3 {
            let conn = connect(&list, "test-list")
                .await
                .expect("the node that answers");
            let _ = conn.close(200, "done".into()).await;
        }
    }
    let err = connect(
        &format!("{dead},amqp://guest:secret@127.0.0.1:2/%2f"),
        "test-list",
    )
    .await
    .expect_err("no node answers")
    .to_string();
    assert!(
        err.contains("127.0.0.1:1") && err.contains("127.0.0.1:2"),
        "{err}"
    );
    assert!(!err.contains("secret"), "a password in {err}");
}

#[tokio::test]
async fn a_database_migrated_before_the_schema_comment_was_reworded_still_starts() {
    let scratch = Scratch::new(&servers());
    let url = scratch.backends.database_url.clone();
    let pool = postgres::connect_and_migrate(&url, 2)
        .await
        .expect("PostgreSQL is not answering (scripts/test starts it)");
    // What such a database records: the checksum of the first migration's old text.
    let old: Vec<u8> = (0..96)
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(
                &"a5a71d18362edd68f2cc132e7960ee431c2d8c9c5d66c7d6f4be495e8bfa1dd40b65b7feaceea77bf67de4dc178e8a42"[i..i + 2],
                16,
            )
            .unwrap()
        })
        .collect();
    sqlx::query("UPDATE _sqlx_migrations SET checksum = $1 WHERE version = 20261125000001")
        .bind(&old)
        .execute(&pool)
        .await
        .unwrap();
    postgres::migrate(&pool, &url)
        .await
        .expect("the reworded comment is accepted");
    // Any other change to an applied migration is still refused.
    sqlx::query("UPDATE _sqlx_migrations SET checksum = '\\x00' WHERE version = 20261125000001")
        .execute(&pool)
        .await
        .unwrap();
    assert!(
        postgres::migrate(&pool, &url).await.is_err(),
        "a modified migration was accepted"
    );
    pool.close().await;
    scratch.remove().await.unwrap();
}

/// A fresh claim counts as in flight only while its API process beats.
#[tokio::test]
async fn a_claim_of_an_api_whose_heartbeat_expired_is_not_in_flight() {
    let scratch = Scratch::new(&servers());
    let (redis, pool, ledger) = redis_and_a_ledger(&scratch).await;
    let ns = scratch.backends.namespace();
    let store = RedisAcceptLog::new(redis.clone(), ns.clone());
    store.reset(pid(1), 5).await.unwrap();
    let beating = flashsale_engine::admission::ApiHeartbeat::start(redis, ns, "alive".into());
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (k, instance) in [("by-alive", "alive"), ("by-gone", "gone")] {
        let record = AcceptRecord::pending(&request(k, 1), Utc::now()).claimed_by(instance);
        assert_eq!(record.claimant(), Some(instance));
        let admitted = store.admit(&key(k), &record).await.unwrap();
        assert!(matches!(admitted, Admit::Claimed { .. }));
    }
    assert_eq!(
        store
            .claimants_alive(&["alive".into(), "gone".into()])
            .await
            .unwrap(),
        vec![true, false]
    );
    assert_eq!(
        admission::derive(&store, &ledger, pid(1), false)
            .await
            .unwrap(),
        Derived::Set {
            tokens: 4,
            in_flight: 1
        }
    );
    drop(beating);
    pool.close().await;
    scratch.remove().await.unwrap();
}

/// Rate limits: a burst of `2N`, then `N/s`; a request over any of its
/// buckets charges none of them; buckets are separate.
async fn rate_limiter_conforms(limiter: &dyn RateLimiter, ns: &str) {
    let rate: Rate = "5/s".parse().unwrap();
    let bucket = |who: &str| Bucket {
        key: format!("{ns}:rate:user:{who}"),
        rate,
    };
    for i in 0..10 {
        assert_eq!(
            limiter.check(&[bucket("alice")]).await.unwrap(),
            Verdict::Allowed,
            "request {i} of the burst of 10"
        );
    }
    let Verdict::Limited { retry_after } = limiter.check(&[bucket("alice")]).await.unwrap() else {
        panic!("the 11th request at once passed a 5/s limit");
    };
    assert!(
        retry_after > Duration::ZERO && retry_after <= Duration::from_millis(200),
        "retry after {retry_after:?}, not within one interval (200 ms)"
    );
    // Bob's bucket is his own; a request charged to both waits for alice's
    // and takes nothing from bob's.
    assert!(matches!(
        limiter
            .check(&[bucket("bob"), bucket("alice")])
            .await
            .unwrap(),
        Verdict::Limited { .. }
    ));
    for i in 0..10 {
        assert_eq!(
            limiter.check(&[bucket("bob")]).await.unwrap(),
            Verdict::Allowed,
            "bob's request {i}: a refused request charged his bucket"
        );
    }
    tokio::time::sleep(retry_after + Duration::from_millis(20)).await;
    assert_eq!(
        limiter.check(&[bucket("alice")]).await.unwrap(),
        Verdict::Allowed,
        "alice may send again after Retry-After"
    );
    assert_eq!(limiter.check(&[]).await.unwrap(), Verdict::Allowed);
}

#[tokio::test]
async fn embedded_rate_limiter_conforms() {
    rate_limiter_conforms(&MemoryRateLimiter::default(), "embedded").await;
}

#[tokio::test]
async fn redis_rate_limiter_conforms() {
    let scratch = Scratch::new(&servers());
    let redis = redis_conn::connect(&scratch.backends.redis_url)
        .await
        .expect("Redis is not answering (scripts/test starts it)");
    rate_limiter_conforms(&RedisRateLimiter::new(redis), &scratch.backends.namespace).await;
    scratch.remove().await.unwrap();
}
