//! `GET /orders/{id}`: the order's row once the worker wrote it, else
//! `queued` from the accept log, else 404.

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use flashsale_engine::accept_log::AcceptState;
use flashsale_engine::{IdempotencyKey, OrderView};
use std::time::Duration;

const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

pub fn router() -> Router<AppState> {
    Router::new().route("/orders/{order_id}", get(order))
}

async fn order(
    State(state): State<AppState>,
    Path(order_id): Path<String>,
) -> Result<Json<OrderView>, ApiError> {
    let key =
        IdempotencyKey::parse(&order_id).map_err(|_| ApiError::UnknownOrder(order_id.clone()))?;
    if let Some(view) = lookup_row(&state, key.as_str()).await? {
        return Ok(Json(view));
    }
    match state.accept_log.get(key.as_str()).await {
        Ok(Some(r)) if r.state == AcceptState::Queued => Ok(Json(r.queued_view(key.as_str()))),
        Ok(_) => Err(ApiError::UnknownOrder(order_id)),
        Err(e) => Err(ApiError::unavailable("Redis", e)),
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
