//! HTTP surface: axum routes for REST (interface §2), `/ws` (§3), health and metrics.
//!
//! Handlers are thin: they authenticate ([`auth::User`]), validate input and
//! call the store, the registry or the gateway held in [`AppState`]. Errors are
//! [`ApiError`]s, answered in upstream's envelope.

mod auth;
mod error;
mod health;
mod sessions;
mod web;
mod ws;

use std::{path::PathBuf, sync::Arc, time::Duration};

use axum::{
    Router,
    routing::{get, post},
};
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::limit::RequestBodyLimitLayer;

pub use error::ApiError;

use crate::{auth::Auth, gateway::Gateway};

/// Largest REST request body.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Settings of the HTTP layer.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub allowed_origins: Option<Vec<String>>,
    pub max_frame_bytes: usize,
    pub send_queue_bytes: usize,
    pub workspaces_root: PathBuf,
    pub ping_interval: Duration,
}

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub gateway: Arc<Gateway>,
    pub auth: Arc<Auth>,
    pub settings: Arc<ApiSettings>,
    pub metrics: Option<PrometheusHandle>,
}

/// The node's router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/providers/sessions", post(sessions::create).get(sessions::list))
        .route("/api/providers/sessions/running", get(sessions::running))
        .route("/api/providers/sessions/{id}", get(sessions::show).put(sessions::rename).delete(sessions::remove))
        .route("/api/providers/sessions/{id}/messages", get(sessions::messages))
        .route("/api/providers/sessions/{id}/restore", post(sessions::restore))
        .route("/ws", get(ws::upgrade))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/", get(web::index))
        .route("/app.js", get(web::app_js))
        .route("/app.css", get(web::app_css))
        .route("/client/chatgate.js", get(web::client_js))
        .layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        .with_state(state)
}
