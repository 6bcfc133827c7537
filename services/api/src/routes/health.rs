//! `/health/live`, `/health/ready` (each backend answers) and `/metrics`.

use crate::state::AppState;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use flashsale_engine::seams::Probe;
use serde_json::json;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({"status": "live"}))
}

async fn ready(State(state): State<AppState>) -> Response {
    let (mut ledger, accept_log, queue) = tokio::join!(
        state.ledger.probe(),
        state.accept_log.probe(),
        state.queue.probe()
    );
    if ledger.outcome.is_ok() && !state.catalog.is_loaded() {
        ledger.outcome = Err("schema not ready: catalog not loaded yet".into());
    }
    let mut down = Vec::new();
    let mut components = serde_json::Map::new();
    for Probe { component, outcome } in [ledger, accept_log, queue] {
        let value = match outcome {
            Ok(()) => "ok".to_owned(),
            Err(e) => {
                down.push(format!("{component} ({e})"));
                e
            }
        };
        components.insert(component.into(), value.into());
    }
    if down.is_empty() {
        Json(json!({"status": "ready", "components": components})).into_response()
    } else {
        let body = json!({
            "error": {"code": "unavailable", "message": format!("not ready: {}", down.join(", "))},
            "components": components,
        });
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, crate::error::RETRY_AFTER_SECONDS)],
            Json(body),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
