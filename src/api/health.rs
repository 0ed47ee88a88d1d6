//! `/healthz`, `/readyz` and `/metrics`.

use axum::{
    Json,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::json;

use super::AppState;

/// 200 while the process runs.
pub async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

/// 200 when the database (and Redis) answer and the node is not draining.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let gateway = &state.gateway;
    let reason = if gateway.is_draining() {
        Some("draining".to_string())
    } else if let Err(e) = gateway.store.ping().await {
        Some(format!("database: {e}"))
    } else if let Err(e) = gateway.registry.ready().await {
        Some(format!("registry: {e}"))
    } else {
        None
    };
    let settings = &gateway.settings;
    let sandbox = settings.containment.mode().as_str();
    let runs = json!({ "running": gateway.local_run_count(), "max": settings.max_runs });
    let layout = settings.workspaces.layout.as_str();
    match reason {
        None => Json(json!({ "status": "ready", "sandbox": sandbox, "workspaceLayout": layout, "runs": runs }))
            .into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "reason": reason, "sandbox": sandbox, "workspaceLayout": layout,
                "runs": runs })),
        )
            .into_response(),
    }
}

/// Prometheus text exposition.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let body = state.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
