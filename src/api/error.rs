//! REST errors in upstream's envelope: `{"success": false, "error": {code, message}}`.
//!
//! Every refusal has a [`RestCode`] (its wire string and HTTP status in one place, as
//! `protocol::ErrorCode` is for the socket). Building an [`ApiError`] has no side effect: a
//! backend failure keeps its cause in the response's extensions, and [`log_errors`] — a
//! middleware over every route — logs it and counts it in `chatgate_backend_errors_total`.

use axum::{
    Json,
    extract::Request,
    http::StatusCode,
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde_json::json;

use crate::{runs::RegistryError, store::StoreError};

/// What a REST request was refused for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestCode {
    Unauthorized,
    SessionNotFound,
    BackendUnavailable,
    RateLimited,
    RequestTimeout,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    InvalidPagination,
    InvalidSessionId,
    InvalidRequestBody,
    InvalidKinds,
    UnsupportedProvider,
    ProjectPathRequired,
    ProjectPathOutsideWorkspaces,
    InvalidSummary,
}

impl RestCode {
    /// The `error.code` string.
    pub fn as_str(self) -> &'static str {
        match self {
            RestCode::Unauthorized => "UNAUTHORIZED",
            RestCode::SessionNotFound => "SESSION_NOT_FOUND",
            RestCode::BackendUnavailable => "BACKEND_UNAVAILABLE",
            RestCode::RateLimited => "RATE_LIMITED",
            RestCode::RequestTimeout => "REQUEST_TIMEOUT",
            RestCode::NotFound => "NOT_FOUND",
            RestCode::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            RestCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            RestCode::InvalidPagination => "INVALID_PAGINATION",
            RestCode::InvalidSessionId => "INVALID_SESSION_ID",
            RestCode::InvalidRequestBody => "INVALID_REQUEST_BODY",
            RestCode::InvalidKinds => "INVALID_KINDS",
            RestCode::UnsupportedProvider => "UNSUPPORTED_PROVIDER",
            RestCode::ProjectPathRequired => "PROJECT_PATH_REQUIRED",
            RestCode::ProjectPathOutsideWorkspaces => "PROJECT_PATH_OUTSIDE_WORKSPACES",
            RestCode::InvalidSummary => "INVALID_SUMMARY",
        }
    }

    /// The HTTP status it is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            RestCode::Unauthorized => StatusCode::UNAUTHORIZED,
            RestCode::SessionNotFound | RestCode::NotFound => StatusCode::NOT_FOUND,
            RestCode::BackendUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            RestCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            RestCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            RestCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            RestCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            RestCode::InvalidPagination
            | RestCode::InvalidSessionId
            | RestCode::InvalidRequestBody
            | RestCode::InvalidKinds
            | RestCode::UnsupportedProvider
            | RestCode::ProjectPathRequired
            | RestCode::ProjectPathOutsideWorkspaces
            | RestCode::InvalidSummary => StatusCode::BAD_REQUEST,
        }
    }
}

/// The backend whose failure made a request fail (the `backend` label of
/// `chatgate_backend_errors_total`), with the failure.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendFailure {
    pub backend: &'static str,
    pub error: String,
}

/// A failed REST request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ApiError {
    pub code: RestCode,
    pub message: String,
    /// Why a backend failed (logged and counted by [`log_errors`], never sent).
    pub cause: Option<BackendFailure>,
}

impl ApiError {
    pub fn new(code: RestCode, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into(), cause: None }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::new(RestCode::Unauthorized, message)
    }

    pub fn session_not_found(id: &str) -> Self {
        ApiError::new(RestCode::SessionNotFound, format!("Session \"{id}\" was not found."))
    }

    /// A backend that cannot be reached; the client gets no detail.
    pub fn unavailable(backend: &'static str, error: impl std::fmt::Display) -> Self {
        ApiError {
            code: RestCode::BackendUnavailable,
            message: "A backend cannot be reached; try again.".to_string(),
            cause: Some(BackendFailure { backend, error: error.to_string() }),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::unavailable("database", e)
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        ApiError::unavailable("redis", e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "success": false, "error": { "code": self.code.as_str(), "message": self.message } });
        let mut response = (self.code.status(), Json(body)).into_response();
        if let Some(cause) = self.cause {
            response.extensions_mut().insert(cause);
        }
        response
    }
}

/// Logs and counts the backend failures behind REST answers (axum's error-handling pattern:
/// the side effect lives here, not in the conversions).
pub async fn log_errors(request: Request, next: Next) -> Response {
    // Both are cheap clones (the URI shares its bytes): nothing is formatted unless it failed.
    let (method, uri) = (request.method().clone(), request.uri().clone());
    let response = next.run(request).await;
    if let Some(cause) = response.extensions().get::<BackendFailure>() {
        metrics::counter!("chatgate_backend_errors_total", "backend" => cause.backend).increment(1);
        tracing::warn!(%method, path = uri.path(), backend = cause.backend, error = %cause.error, "backend unavailable");
    }
    response
}

/// A success envelope: `{"success": true, "data": …}`.
pub fn ok(status: StatusCode, data: serde_json::Value) -> Response {
    (status, Json(json!({ "success": true, "data": data }))).into_response()
}
