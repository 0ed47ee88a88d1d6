//! HTTP surface: axum routes for REST (docs/protocol.md §REST), `/ws` (§WebSocket), health and metrics.
//!
//! Handlers are thin: they authenticate ([`auth::User`]), take typed input and
//! call the gateway held in [`AppState`], whose session rules
//! ([`crate::gateway::sessions`]) REST and the socket share. Errors are
//! [`ApiError`]s with a [`RestCode`], answered in upstream's envelope; the
//! [`error::log_errors`] middleware logs and counts the backend failures behind them.

pub mod admission;
mod auth;
mod body;
mod cors;
mod error;
mod health;
mod providers;
pub mod serve;
mod sessions;
mod web;
mod ws;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    http::StatusCode,
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::{limit::RequestBodyLimitLayer, timeout::RequestBodyDeadlineLayer};

pub use error::{ApiError, RestCode};
pub use providers::{ProviderProgram, provider_programs};

use crate::{
    auth::Auth,
    gateway::{Gateway, limits::Limit},
};

/// Settings of the HTTP layer.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub allowed_origins: Option<Vec<String>>,
    pub max_frame_bytes: usize,
    pub send_queue_bytes: usize,
    pub ping_interval: Duration,
    /// `--max-body-bytes`: largest REST request body.
    pub max_body_bytes: usize,
    /// `--handshake-timeout`: how long a REST request body may take to arrive.
    pub body_timeout: Duration,
    /// `--providers` with their programs, for `GET /api/providers`.
    pub providers: Vec<ProviderProgram>,
}

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub gateway: Arc<Gateway>,
    pub auth: Arc<Auth>,
    pub settings: Arc<ApiSettings>,
    pub metrics: Option<PrometheusHandle>,
    /// Per-address connection rate and per-user socket counts of `/ws`.
    pub connection_limits: Arc<admission::ConnectionLimits>,
}

/// The response header naming the node that served a request or a WebSocket upgrade.
pub const NODE_HEADER: &str = "x-chatgate-node";

/// The operations endpoints: liveness, readiness and the Prometheus metrics.
fn operations() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
}

/// The internal port's router (`--internal-listen`): the operations endpoints only.
pub fn internal_router(state: AppState) -> Router {
    let node_header = axum::http::HeaderValue::from_str(&state.gateway.settings.node_id).ok();
    operations()
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
        .layer(middleware::from_fn(error::log_errors))
        .layer(middleware::map_response(move |response: Response| name_node(response, node_header.clone())))
        .with_state(state)
}

/// Names the node that served a response.
async fn name_node(mut response: Response, node: Option<axum::http::HeaderValue>) -> Response {
    if let Some(node) = node {
        response.headers_mut().insert(NODE_HEADER, node);
    }
    response
}

/// The node's public router; `with_operations: false` when an internal port serves those.
pub fn router(state: AppState, with_operations: bool) -> Router {
    let max_body_bytes = state.settings.max_body_bytes;
    let node_header = axum::http::HeaderValue::from_str(&state.gateway.settings.node_id).ok();
    let public = if with_operations { operations() } else { Router::new() };
    let router = public
        .route("/api/providers", get(providers::list))
        .route("/api/providers/sessions", post(sessions::create).get(sessions::list))
        .route("/api/providers/sessions/running", get(sessions::running))
        .route("/api/providers/sessions/{id}", get(sessions::show).put(sessions::rename).delete(sessions::remove))
        .route("/api/providers/sessions/{id}/messages", get(sessions::messages))
        .route("/api/providers/sessions/{id}/restore", post(sessions::restore))
        .route("/ws", get(ws::upgrade))
        .route("/", get(web::index))
        .route("/app.js", get(web::app_js))
        .route("/app.css", get(web::app_css))
        .route("/markdown.js", get(web::markdown_js))
        .route("/client/chatgate.js", get(web::client_js))
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
        .layer(middleware::from_fn(error::log_errors))
        .layer(RequestBodyLimitLayer::new(max_body_bytes))
        .layer(RequestBodyDeadlineLayer::new(state.settings.body_timeout))
        .layer(middleware::map_response(move |response: Response| async move {
            body_too_large_envelope(response, max_body_bytes)
        }))
        // Every answer (REST, the WebSocket upgrade) names the node that served it.
        .layer(middleware::map_response(move |response: Response| name_node(response, node_header.clone())));
    // Outermost: a preflight is answered before routing.
    let router = match cors::layer(state.settings.allowed_origins.as_deref()) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router.with_state(state)
}

/// A path no route serves, answered in the REST error envelope.
async fn no_route() -> ApiError {
    ApiError::new(RestCode::NotFound, "No such route.")
}

/// A method the path does not take, answered in the REST error envelope.
async fn no_method() -> ApiError {
    ApiError::new(RestCode::MethodNotAllowed, "This route does not take that method.")
}

/// A 413 (from the body limit layer, or a body extractor that hit it while
/// reading a chunked body) answered in the REST error envelope.
fn body_too_large_envelope(response: Response, max_body_bytes: usize) -> Response {
    if response.status() != StatusCode::PAYLOAD_TOO_LARGE {
        return response;
    }
    Limit::BodyBytes.refused();
    let message = format!("The request body is larger than {max_body_bytes} bytes.");
    ApiError::new(RestCode::PayloadTooLarge, message).into_response()
}
