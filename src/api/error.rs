//! REST errors in upstream's envelope: `{"success": false, "error": {code, message}}`.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::json;

/// A failed REST request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message)
    }

    pub fn session_not_found(id: &str) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "SESSION_NOT_FOUND", format!("Session \"{id}\" was not found."))
    }

    pub fn unavailable(what: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %what, "backend unavailable");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "BACKEND_UNAVAILABLE", "A backend cannot be reached; try again.")
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        metrics::counter!("chatgate_backend_errors_total", "backend" => "database").increment(1);
        ApiError::unavailable(e)
    }
}

impl From<crate::runs::RegistryError> for ApiError {
    fn from(e: crate::runs::RegistryError) -> Self {
        metrics::counter!("chatgate_backend_errors_total", "backend" => "redis").increment(1);
        ApiError::unavailable(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "success": false, "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

/// A success envelope: `{"success": true, "data": …}`.
pub fn ok(status: StatusCode, data: serde_json::Value) -> Response {
    (status, Json(json!({ "success": true, "data": data }))).into_response()
}
