//! `GET /orders/{id}`: the order's row once the worker wrote it, else
//! `queued` from the accept log, else 404. With tokens, only to its buyer:
//! anyone else hears `404`, as if it did not exist.

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
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
    headers: HeaderMap,
) -> Result<Json<OrderView>, ApiError> {
    let buyer = state.gate.token_buyer(&headers)?;
    let key =
        IdempotencyKey::parse(&order_id).map_err(|_| ApiError::UnknownOrder(order_id.clone()))?;
    let view = match lookup_row(&state, key.as_str()).await? {
        Some(view) => view,
        None => match state.accept_log.get(key.as_str()).await {
            Ok(Some(r)) if r.state == AcceptState::Queued => r.queued_view(key.as_str()),
            Ok(_) => return Err(ApiError::UnknownOrder(order_id)),
            Err(e) => return Err(ApiError::unavailable("Redis", e)),
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
