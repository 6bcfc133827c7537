//! Property test of the embedded ledger: random interleavings of groups,
//! redeliveries (the same group again, under a newer token), crashes (a
//! group that never commits) and stale holders (an old token) never break
//! the contract's invariants 1-5, and never book a key twice. With holds,
//! pays, cancels, time passing and sweeps interleaved with redeliveries:
//! every hold ends once, as the call that ended it said.

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

#[derive(Debug, Clone)]
enum HoldStep {
    Apply {
        product: i64,
        orders: Vec<(u8, u8, i64)>,
    },
    Redeliver,
    Pay(u8),
    Cancel(u8),
    /// 1.5 s pass: holds of 1 s come due.
    Age,
    Sweep,
}

fn hold_step() -> impl Strategy<Value = HoldStep> {
    prop_oneof![
        4 => (1i64..=2, orders()).prop_map(|(product, orders)| HoldStep::Apply { product, orders }),
        2 => Just(HoldStep::Redeliver),
        3 => (0u8..40).prop_map(HoldStep::Pay),
        2 => (0u8..40).prop_map(HoldStep::Cancel),
        2 => Just(HoldStep::Age),
        2 => Just(HoldStep::Sweep),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn every_hold_ends_once_as_its_answer_said(
        stocks in prop::collection::vec(0i32..15, 2),
        steps in prop::collection::vec(hold_step(), 1..50),
    ) {
        use flashsale_engine::OrderStatus;
        use flashsale_engine::ledger::{HoldAction, HoldSettlement};
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let ledger = MemoryLedger::new();
            let catalog: Vec<NewProduct> = stocks.iter().enumerate().map(|(i, stock)| NewProduct {
                id: i as i64 + 1, name: format!("p{i}"), stock: *stock, max_per_order: 10,
                per_user_limit: None, hold_seconds: Some(1),
            }).collect();
            ledger.create_missing(&catalog).await.unwrap();
            let mut tokens: BTreeMap<i64, i64> = BTreeMap::new();
            let mut last: Option<Vec<QueuedOrder>> = None;
            // How each hold ended, by the call that ended it.
            let mut ended: BTreeMap<String, OrderStatus> = BTreeMap::new();
            for step in steps {
                match step {
                    HoldStep::Apply { product, orders } => {
                        let t = tokens.entry(product).or_insert(0);
                        *t += 1;
                        let g = group(product, &orders);
                        ledger.apply_group(ProductId::new(product).unwrap(), FencingToken(*t), &g).await.unwrap();
                        last = Some(g);
                    }
                    HoldStep::Redeliver => {
                        let Some(g) = &last else { continue };
                        let product = g[0].product_id.get();
                        let t = tokens.entry(product).or_insert(0);
                        *t += 1;
                        let receipt = ledger.apply_group(ProductId::new(product).unwrap(), FencingToken(*t), g).await.unwrap();
                        for (o, outcome) in g.iter().zip(&receipt.outcomes) {
                            if ended.contains_key(o.order_id.as_str()) {
                                prop_assert_eq!(*outcome, OrderOutcome::Duplicate, "a settled order booked again");
                            }
                        }
                    }
                    HoldStep::Pay(k) | HoldStep::Cancel(k) => {
                        let key = format!("k{k}");
                        let action = if matches!(step, HoldStep::Pay(_)) { HoldAction::Pay } else { HoldAction::Cancel };
                        match ledger.settle_hold(&key, action).await.unwrap() {
                            HoldSettlement::Settled { order, changed: true, .. } => {
                                prop_assert!(ended.insert(key, order.status).is_none(), "a hold ended twice");
                            }
                            HoldSettlement::Settled { order, changed: false, .. } => {
                                prop_assert_eq!(ended.get(&key), Some(&order.status));
                            }
                            HoldSettlement::Expired { order, .. } => {
                                prop_assert!(ended.insert(key, order.status).is_none(), "a hold ended twice");
                            }
                            HoldSettlement::NotHeld(order) => {
                                prop_assert!(order.status != OrderStatus::Held);
                            }
                            HoldSettlement::Unknown => {}
                        }
                    }
                    HoldStep::Age => ledger.age_holds(std::time::Duration::from_millis(1500)),
                    HoldStep::Sweep => {
                        for e in ledger.expire_holds(1000).await.unwrap() {
                            for key in e.orders {
                                prop_assert!(ended.insert(key, OrderStatus::Expired).is_none(), "a hold ended twice");
                            }
                        }
                    }
                }
                // Invariants 1 to 5 (7 is the sweeper's timing, not the ledger's).
                let violations: Vec<_> = ledger.violations().into_iter().filter(|(i, _)| *i != 7).collect();
                prop_assert!(violations.is_empty(), "{violations:?}");
            }
            // Every order is as the call that ended it said, or still held.
            let (products, orders) = ledger.snapshot();
            for o in &orders {
                match ended.get(&o.order_id) {
                    Some(status) => prop_assert_eq!(o.status, *status),
                    None => prop_assert!(matches!(o.status, OrderStatus::Held | OrderStatus::Rejected), "{o:?}"),
                }
            }
            for p in products {
                prop_assert!(p.stock >= 0);
            }
            Ok(())
        })?;
    }
}
