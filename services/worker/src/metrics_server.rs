//! The worker's `/metrics` and `/health/live` server (its heartbeat is
//! [`flashsale_engine::heartbeat`]).

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serves `/metrics` and `/health/live` until cancelled.
pub async fn serve_metrics(listener: TcpListener, stop: CancellationToken) {
    let handle = flashsale_engine::metrics::install();
    let app = Router::new()
        .route("/health/live", get(|| async { "live" }))
        .route(
            "/metrics",
            get(move || {
                let body = handle.render();
                async move {
                    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
                }
            }),
        );
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "metrics server failed");
    }
}
