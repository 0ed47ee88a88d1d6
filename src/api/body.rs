//! [`RequestBody`]: a REST request body, read whole within `--handshake-timeout`.
//!
//! The router puts a deadline on every request body (tower-http's
//! `RequestBodyDeadlineLayer`), so a client that trickles its body cannot hold a
//! connection and a handler forever; one that misses it is answered 408 in the
//! REST error envelope. A body past `--max-body-bytes` is answered 413 by the
//! router's body limit.

use axum::{
    body::Bytes,
    extract::{FromRequest, Request, rejection::BytesRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
};

use super::ApiError;
use crate::gateway::limits::Limit;

/// The bytes of a request body that arrived in time.
pub struct RequestBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RequestBody {
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Bytes::from_request(request, state).await {
            Ok(bytes) => Ok(RequestBody(bytes)),
            Err(rejection) if timed_out(&rejection) => {
                Limit::HandshakeTimeout.refused();
                let message = "The request body did not arrive in time.";
                Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "REQUEST_TIMEOUT", message).into_response())
            }
            Err(rejection) => Err(rejection.into_response()),
        }
    }
}

/// Whether reading the body failed on the router's body deadline.
fn timed_out(rejection: &BytesRejection) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(error) = cause {
        if error.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cause = error.source();
    }
    false
}
