//! What a converged world must show: the contract's invariants on the
//! books (the same judge `fsctl verify` uses), and every answer true to
//! what was finally recorded.

use crate::world::Events;
use axum::http::StatusCode;
use flashsale_engine::OrderView;
use flashsale_engine::embedded::EmbeddedBackends;
use flashsale_engine::queue::OrderQueue;
use std::collections::{BTreeMap, HashSet};
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
        }
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

/// Checks the converged books against the invariants and every answer.
pub async fn books(
    backends: &EmbeddedBackends,
    queue: &dyn OrderQueue,
    answers: &[Answer],
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
    let report = backends.ledger.audit(&accepted, &dead, true);
    if let Some(v) = report.violations.first() {
        return Err(Violation::new(
            format!("invariant {}", v.invariant),
            v.detail.clone(),
        ));
    }
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
