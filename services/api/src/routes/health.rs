//! `/health/live`, `/health/ready` (each backend answers) and `/metrics`.

use crate::state::{AppState, Probes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use std::time::Duration;

const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

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
    let (pool, redis, queue) = match &state.probes {
        Probes::Networked { pool, redis, queue } => (pool, redis, queue),
        Probes::Embedded if state.catalog.is_loaded() => {
            return Json(json!({"status": "ready", "components": {"embedded": "ok"}}))
                .into_response();
        }
        Probes::Embedded => {
            let body = json!({"error": {"code": "unavailable", "message": "not ready: catalog not loaded yet"}});
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, crate::error::RETRY_AFTER_SECONDS)],
                Json(body),
            )
                .into_response();
        }
    };
    let postgres = async {
        tokio::time::timeout(
            PROBE_TIMEOUT,
            sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(pool),
        )
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
        if state.catalog.is_loaded() {
            Ok(())
        } else {
            Err("schema not ready".to_owned())
        }
    };
    let redis = async {
        let mut conn = redis.clone();
        flashsale_engine::redis_conn::timed(redis::cmd("PING").query_async::<()>(&mut conn))
            .await
            .map_err(|e| e.to_string())
    };
    let (postgres, redis) = tokio::join!(postgres, redis);
    let rabbitmq = if queue.is_connected() {
        Ok(())
    } else {
        Err("not connected".to_owned())
    };
    let mut down = Vec::new();
    let mut components = serde_json::Map::new();
    for (name, result) in [
        ("postgres", postgres),
        ("redis", redis),
        ("rabbitmq", rabbitmq),
    ] {
        let value = match result {
            Ok(()) => "ok".to_owned(),
            Err(e) => {
                down.push(format!("{name} ({e})"));
                e
            }
        };
        components.insert(name.into(), value.into());
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
