//! Property test of the embedded ledger: random interleavings of groups,
//! redeliveries (the same group again, under a newer token), crashes (a
//! group that never commits) and stale holders (an old token) never break
//! the contract's invariants 1-5, and never book a key twice.

use chrono::Utc;
use flashsale_engine::domain::QueuedOrder;
use flashsale_engine::ledger::Ledger;
use flashsale_engine::ledger::MemoryLedger;
use flashsale_engine::ledger::{LedgerError, NewProduct, OrderOutcome};
use flashsale_engine::locks::FencingToken;
use flashsale_engine::{IdempotencyKey, ProductId, Quantity, UserId};
use proptest::prelude::*;
use std::collections::{BTreeMap, HashSet};

#[derive(Debug, Clone)]
enum Step {
    /// A worker applies a group of (key, user, units) for a product.
    Apply {
        product: i64,
        orders: Vec<(u8, u8, i64)>,
    },
    /// The last group is delivered again (its worker died before the ack).
    Redeliver,
    /// A group is lost before its commit (its worker died mid-transaction).
    Crash { product: i64 },
    /// A holder whose lease ended tries to write with an old token.
    Stale {
        product: i64,
        orders: Vec<(u8, u8, i64)>,
    },
}

fn orders() -> impl Strategy<Value = Vec<(u8, u8, i64)>> {
    prop::collection::vec((0u8..40, 0u8..6, 1i64..4), 1..8)
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (1i64..=3, orders()).prop_map(|(product, orders)| Step::Apply { product, orders }),
        2 => Just(Step::Redeliver),
        1 => (1i64..=3).prop_map(|product| Step::Crash { product }),
        1 => (1i64..=3, orders()).prop_map(|(product, orders)| Step::Stale { product, orders }),
    ]
}

fn group(product: i64, orders: &[(u8, u8, i64)]) -> Vec<QueuedOrder> {
    orders
        .iter()
        .map(|(key, user, units)| QueuedOrder {
            order_id: IdempotencyKey::parse(&format!("k{key}")).unwrap(),
            user_id: UserId::parse(&format!("u{user}")).unwrap(),
            product_id: ProductId::new(product).unwrap(),
            quantity: Quantity::new(*units).unwrap(),
            accepted_at: Utc::now(),
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn invariants_hold_whatever_the_interleaving(
        stocks in prop::collection::vec((0i32..15, prop::option::of(1i32..5)), 3),
        steps in prop::collection::vec(step(), 1..40),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let ledger = MemoryLedger::new();
            let catalog: Vec<NewProduct> = stocks.iter().enumerate().map(|(i, (stock, limit))| NewProduct {
                id: i as i64 + 1, name: format!("p{i}"), stock: *stock, max_per_order: 10, per_user_limit: *limit, hold_seconds: None,
            }).collect();
            ledger.create_missing(&catalog).await.unwrap();
            let mut tokens: BTreeMap<i64, i64> = BTreeMap::new();
            let mut written: BTreeMap<i64, i64> = BTreeMap::new();
            let mut last: Option<Vec<QueuedOrder>> = None;
            let mut confirmed_keys: HashSet<String> = HashSet::new();
            for step in steps {
                let (product, orders, token) = match step {
                    Step::Apply { product, orders } => {
                        let t = tokens.entry(product).or_insert(0);
                        *t += 1;
                        (product, group(product, &orders), *t)
                    }
                    Step::Redeliver => match &last {
                        Some(g) => {
                            let product = g[0].product_id.get();
                            let t = tokens.entry(product).or_insert(0);
                            *t += 1;
                            (product, g.clone(), *t)
                        }
                        None => continue,
                    },
                    Step::Crash { product } => {
                        // The token was handed out, the transaction never committed.
                        *tokens.entry(product).or_insert(0) += 1;
                        continue;
                    }
                    Step::Stale { product, orders } => {
                        // The token of the last write to this product (0 if none).
                        let old = written.get(&product).copied().unwrap_or(0);
                        let before = format!("{:?}", ledger.snapshot());
                        let result = ledger.apply_group(ProductId::new(product).unwrap(), FencingToken(old), &group(product, &orders)).await;
                        prop_assert!(matches!(result, Err(LedgerError::FencedOut { .. })), "{result:?}");
                        prop_assert_eq!(before, format!("{:?}", ledger.snapshot()), "a fenced-out write changed nothing");
                        continue;
                    }
                };
                let receipt = ledger.apply_group(ProductId::new(product).unwrap(), FencingToken(token), &orders).await.unwrap();
                written.insert(product, token);
                for (o, outcome) in orders.iter().zip(&receipt.outcomes) {
                    if *outcome == OrderOutcome::Confirmed {
                        prop_assert!(confirmed_keys.insert(o.order_id.as_str().to_owned()), "{} confirmed twice", o.order_id.as_str());
                    }
                }
                last = Some(orders);
                let violations = ledger.violations();
                prop_assert!(violations.is_empty(), "{violations:?}");
            }
            let (products, orders) = ledger.snapshot();
            for p in products {
                prop_assert!(p.stock >= 0);
            }
            let confirmed = orders.iter().filter(|o| o.status == flashsale_engine::OrderStatus::Confirmed).count();
            prop_assert_eq!(confirmed, confirmed_keys.len());
            Ok(())
        })?;
    }
}
