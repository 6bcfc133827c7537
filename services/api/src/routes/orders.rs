//! `GET /orders/{id}`: the order's row once the worker wrote it, else
//! `queued` from the accept log, else 404. With tokens, only to its buyer:
//! anyone else hears `404`, as if it did not exist.
//!
//! `POST /orders/{id}/pay` and `/cancel` settle a held order, exactly once
//! (the ledger's row lock decides a race with the workers' expiry sweep);
//! a repeat answers the same `200`; an order not held is `409 not_held`
//! with its status.

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use flashsale_engine::accept_log::AcceptState;
use flashsale_engine::ledger::{HoldAction, HoldSettlement};
use flashsale_engine::metrics::HOLD_OUTCOMES;
use flashsale_engine::{IdempotencyKey, OrderStatus, OrderView};
use std::time::Duration;

const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/orders/{order_id}", get(order))
        .route("/orders/{order_id}/pay", post(pay))
        .route("/orders/{order_id}/cancel", post(cancel))
}

async fn pay(
    State(state): State<AppState>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<OrderView>, ApiError> {
    settle(&state, order_id, &headers, HoldAction::Pay).await
}

async fn cancel(
    State(state): State<AppState>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<OrderView>, ApiError> {
    settle(&state, order_id, &headers, HoldAction::Cancel).await
}

/// Pays or cancels the held order. With tokens, only its buyer may: anyone
/// else hears `404`, and nothing changes.
async fn settle(
    state: &AppState,
    order_id: String,
    headers: &HeaderMap,
    action: HoldAction,
) -> Result<Json<OrderView>, ApiError> {
    let buyer = state.gate.token_buyer(headers)?;
    let key =
        IdempotencyKey::parse(&order_id).map_err(|_| ApiError::UnknownOrder(order_id.clone()))?;
    if let Some(buyer) = &buyer {
        let owner = match lookup_row(state, key.as_str()).await? {
            Some(row) => Some(row.user_id),
            None => queued(state, key.as_str()).await?.map(|v| v.user_id),
        };
        if owner.as_deref() != Some(buyer.as_str()) {
            return Err(ApiError::UnknownOrder(order_id));
        }
    }
    let settled = tokio::time::timeout(
        QUERY_TIMEOUT,
        state.ledger.settle_hold(key.as_str(), action),
    )
    .await
    .map_err(|_| ApiError::unavailable("PostgreSQL", "query timed out"))?
    .map_err(|e| ApiError::unavailable("PostgreSQL", e))?;
    match settled {
        HoldSettlement::Settled { order, changed, .. } => {
            if changed {
                metrics::counter!(HOLD_OUTCOMES, "outcome" => action.status().as_str())
                    .increment(1);
            }
            Ok(Json(order))
        }
        HoldSettlement::NotHeld(order) => Err(ApiError::NotHeld(order.status)),
        HoldSettlement::Expired { order, .. } => {
            metrics::counter!(HOLD_OUTCOMES, "outcome" => "expired").increment(1);
            Err(ApiError::NotHeld(order.status))
        }
        // Accepted, not booked yet: not held (yet).
        HoldSettlement::Unknown => match queued(state, key.as_str()).await? {
            Some(_) => Err(ApiError::NotHeld(OrderStatus::Queued)),
            None => Err(ApiError::UnknownOrder(order_id)),
        },
    }
}

/// The order as `queued`, when the accept log has it so.
async fn queued(state: &AppState, key: &str) -> Result<Option<OrderView>, ApiError> {
    match state.accept_log.get(key).await {
        Ok(Some(r)) if r.state == AcceptState::Queued => Ok(Some(r.queued_view(key))),
        Ok(_) => Ok(None),
        Err(e) => Err(ApiError::unavailable("Redis", e)),
    }
}

async fn order(
    State(state): State<AppState>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<OrderView>, ApiError> {
    let buyer = state.gate.token_buyer(&headers)?;
    let key =
        IdempotencyKey::parse(&order_id).map_err(|_| ApiError::UnknownOrder(order_id.clone()))?;
    let view = match lookup_row(&state, key.as_str()).await? {
        Some(view) => view,
        None => match queued(&state, key.as_str()).await? {
            Some(view) => view,
            None => return Err(ApiError::UnknownOrder(order_id)),
        },
    };
    match buyer {
        Some(buyer) if buyer.as_str() != view.user_id => Err(ApiError::UnknownOrder(order_id)),
        _ => Ok(Json(view)),
    }
}

/// The order's row in PostgreSQL, if written.
pub(super) async fn lookup_row(
    state: &AppState,
    order_id: &str,
) -> Result<Option<OrderView>, ApiError> {
    match tokio::time::timeout(QUERY_TIMEOUT, state.ledger.order(order_id)).await {
        Ok(Ok(view)) => Ok(view),
        Ok(Err(e)) => Err(ApiError::unavailable("PostgreSQL", e)),
        Err(_) => Err(ApiError::unavailable("PostgreSQL", "query timed out")),
    }
}
