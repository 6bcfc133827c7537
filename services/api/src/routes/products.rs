//! `GET /products/{id}`: the product as the ledger holds it now.

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use flashsale_engine::ProductId;
use flashsale_engine::domain::InvalidField;
use serde_json::json;
use std::time::Duration;

pub fn router() -> Router<AppState> {
    Router::new().route("/products/{id}", get(product))
}

async fn product(State(state): State<AppState>, Path(raw): Path<String>) -> Response {
    let parsed = raw.parse::<i64>().ok().map(ProductId::new);
    let id = match parsed {
        Some(Ok(id)) => id,
        _ => {
            return ApiError::from(InvalidField {
                field: "id",
                message: format!("product id must be a positive integer, not {raw:?}"),
            })
            .into_response();
        }
    };
    match tokio::time::timeout(Duration::from_secs(2), state.ledger.product(id)).await {
        Ok(Ok(Some(p))) => Json(json!({
            "id": p.id,
            "name": p.name,
            "stock": p.stock,
            "seededStock": p.seeded_stock,
            "soldOut": p.stock == 0,
        }))
        .into_response(),
        Ok(Ok(None)) => ApiError::UnknownProduct(id.get()).into_response(),
        Ok(Err(e)) => ApiError::unavailable("PostgreSQL", e).into_response(),
        Err(_) => ApiError::unavailable("PostgreSQL", "query timed out").into_response(),
    }
}
