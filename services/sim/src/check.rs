//! What a converged world must show: the contract's invariants on the
//! books (the same judge `fsctl verify` uses), and every answer true to
//! what was finally recorded.

use crate::world::Events;
use axum::http::StatusCode;
use flashsale_engine::audit::QueueFacts;
use flashsale_engine::embedded::EmbeddedBackends;
use flashsale_engine::queue::OrderQueue;
use flashsale_engine::{OrderStatus, OrderView};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

/// An invariant broken, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// A short name: `invariant 1` … `invariant 7`, `answer`, `liveness`.
    pub invariant: String,
    pub detail: String,
}

impl Violation {
    pub fn new(invariant: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            invariant: invariant.into(),
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.invariant, self.detail)
    }
}

/// What one buy was finally answered (`status` `None`: the client hung up).
#[derive(Debug, Clone)]
pub struct Answer {
    key: String,
    user: String,
    product: i64,
    quantity: i64,
    status: Option<StatusCode>,
    body: serde_json::Value,
    /// The pay or cancel that followed: action, answer, the order's status in it.
    pub ended: Option<(&'static str, StatusCode, String)>,
    /// Some attempt ended unheard (a `503`, a reset connection, a hang-up).
    unsure: bool,
}

impl Answer {
    pub fn new(
        key: &str,
        user: &str,
        product: i64,
        quantity: i64,
        status: StatusCode,
        body: serde_json::Value,
    ) -> Self {
        Self {
            key: key.to_owned(),
            user: user.to_owned(),
            product,
            quantity,
            status: Some(status),
            body,
            ended: None,
            unsure: false,
        }
    }

    /// Some attempt ended unheard (or not).
    pub fn unsure(mut self, unsure: bool) -> Self {
        self.unsure = unsure;
        self
    }

    pub fn hung_up(key: &str, user: &str, product: i64, quantity: i64) -> Self {
        Self {
            key: key.to_owned(),
            user: user.to_owned(),
            product,
            quantity,
            status: None,
            body: serde_json::Value::Null,
            ended: None,
            unsure: false,
        }
    }

    fn matches(&self, row: &OrderView) -> bool {
        row.user_id == self.user && row.product_id == self.product && row.quantity == self.quantity
    }

    fn describe(&self) -> String {
        let status = self
            .status
            .map_or("hung up".to_owned(), |s| s.as_u16().to_string());
        format!(
            "{} ({} buys {} of product {}): {status} {}",
            self.key, self.user, self.quantity, self.product, self.body
        )
    }
}

/// What admission could not know, for its bound ([`over_admission`]).
pub struct Unknowns<'a> {
    /// Redis lost everything: no bound holds (every order then queued was
    /// forgotten by the counters).
    pub redis_lost: bool,
    /// Keys whose claim, marking or withdrawal failed in Redis.
    pub faulted_keys: &'a BTreeSet<String>,
}

/// Checks the converged books against the invariants and every answer.
pub async fn books(
    backends: &EmbeddedBackends,
    queue: &dyn OrderQueue,
    answers: &[Answer],
    unknowns: &Unknowns<'_>,
    events: &Events,
) -> Result<(), Violation> {
    let (products, orders) = backends.ledger.snapshot();
    let rows: BTreeMap<&str, &OrderView> =
        orders.iter().map(|o| (o.order_id.as_str(), o)).collect();
    for (key, row) in &rows {
        events.add(format!(
            "row {key} {} {} {} {}",
            row.user_id,
            row.product_id,
            row.quantity,
            row.status.as_str()
        ));
    }
    let mut sorted = products.clone();
    sorted.sort_by_key(|p| p.id);
    for p in &sorted {
        events.add(format!("product {} stock {}", p.id, p.stock));
    }
    let dead: HashSet<String> = queue
        .dead_letters()
        .await
        .map_err(|e| Violation::new("setup", e.to_string()))?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let accepted: Vec<String> = answers
        .iter()
        .filter(|a| a.status == Some(StatusCode::ACCEPTED))
        .map(|a| a.key.clone())
        .collect();
    let report = backends
        .ledger
        .audit_now(Some(&accepted), &QueueFacts::drained_with(dead.clone()));
    if let Some(v) = report.violations.first() {
        return Err(Violation::new(
            format!("invariant {}", v.invariant),
            v.detail.clone(),
        ));
    }
    over_admission(&orders, answers, unknowns)?;
    for answer in answers {
        let row = rows.get(answer.key.as_str()).copied();
        let truthful = match answer.status.map(|s| s.as_u16()) {
            // Accepted, or a repeat of an accepted order: its order has the
            // key's row, or is a dead letter (a second body accepted under
            // one key after Redis forgot the first goes to the DLQ).
            Some(200 | 202) => row.is_some_and(|r| answer.matches(r)) || dead.contains(&answer.key),
            // The key was accepted for another body: its row says so, or
            // (after Redis lost the first record while its order was
            // queued, so that two bodies were accepted under one key)
            // another answer did, or the second body's order is in the DLQ
            // (its client may have hung up before hearing 202).
            Some(422) => {
                row.is_some_and(|r| !answer.matches(r))
                    || dead.contains(&answer.key)
                    || answers.iter().any(|other| {
                        other.key == answer.key
                            && matches!(other.status.map(|s| s.as_u16()), Some(200 | 202))
                            && (other.user != answer.user
                                || other.product != answer.product
                                || other.quantity != answer.quantity)
                    })
            }
            // Refused, not known to be accepted, or no answer: nothing to hold.
            Some(400 | 404 | 409 | 429 | 503) | None => true,
            Some(_) => false,
        };
        // A pay or cancel answered 200 is the order's final status; a
        // `409 not_held` named a status other than held.
        let ended_truthfully = match &answer.ended {
            Some((action, StatusCode::OK, said)) => {
                let final_status = if *action == "pay" {
                    "paid"
                } else {
                    "cancelled"
                };
                said == final_status && row.is_some_and(|r| r.status.as_str() == final_status)
            }
            Some((_, StatusCode::CONFLICT, said)) => said != "held",
            Some((_, status, _)) => {
                [StatusCode::NOT_FOUND, StatusCode::SERVICE_UNAVAILABLE].contains(status)
            }
            None => true,
        };
        if !ended_truthfully {
            return Err(Violation::new(
                "hold",
                format!(
                    "{}, then {:?}, but the books say {}",
                    answer.describe(),
                    answer.ended,
                    row.map_or("no row".to_owned(), |r| r.status.as_str().to_owned())
                ),
            ));
        }
        if !truthful {
            return Err(Violation::new(
                "answer",
                format!(
                    "{} but the books say {}",
                    answer.describe(),
                    row.map_or("no row".to_owned(), |r| format!(
                        "{} buys {} of product {}: {}",
                        r.user_id,
                        r.quantity,
                        r.product_id,
                        r.status.as_str()
                    ))
                ),
            ));
        }
    }
    Ok(())
}

/// Admission hands a unit out twice only when it could not know an order's
/// fate: a request answered `503` after its publish got through (the units
/// given back before the answer, as the contract asks), an API killed or a
/// client gone mid-buy, a claim whose marking or withdrawal failed in
/// Redis. Each such order, once booked, is at most its quantity of units
/// too many, and each unit too many is at most one `202` the worker then
/// rejects `sold_out`. More such rejections than that are admission's own
/// (a counter set over a change it did not see, units given back twice).
fn over_admission(
    orders: &[OrderView],
    answers: &[Answer],
    unknowns: &Unknowns<'_>,
) -> Result<(), Violation> {
    if unknowns.redis_lost {
        return Ok(());
    }
    let unsure: HashSet<&str> = answers
        .iter()
        .filter(|a| a.unsure)
        .map(|a| a.key.as_str())
        .chain(unknowns.faulted_keys.iter().map(String::as_str))
        .collect();
    // An unsure order rejected is one whose units were given back: it
    // took none twice.
    let rejected = orders
        .iter()
        .filter(|o| {
            o.status == OrderStatus::Rejected
                && o.reason.as_deref() == Some("sold_out")
                && !unsure.contains(o.order_id.as_str())
        })
        .count() as i64;
    let allowed: i64 = orders
        .iter()
        .filter(|o| o.status != OrderStatus::Rejected && unsure.contains(o.order_id.as_str()))
        .map(|o| o.quantity)
        .sum();
    if rejected > allowed {
        return Err(Violation::new(
            "admission",
            format!(
                "{rejected} orders answered 202 and then rejected sold_out, but only {allowed} units of orders booked after an unheard answer or a failed Redis call"
            ),
        ));
    }
    Ok(())
}
