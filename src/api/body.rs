//! [`RequestBody`]: a REST request body, read whole within `--handshake-timeout`;
//! [`JsonBody`]: one that is a JSON object, typed.
//!
//! The router puts a deadline on every request body (tower-http's
//! `RequestBodyDeadlineLayer`), so a client that trickles its body cannot hold a
//! connection and a handler forever; one that misses it is answered 408 in the
//! REST error envelope. A body past `--max-body-bytes` is answered 413 by the
//! router's body limit.

use axum::{
    body::Bytes,
    extract::{FromRequest, Request, rejection::BytesRejection},
    response::{IntoResponse, Response},
};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{ApiError, RestCode};
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
                Err(ApiError::new(RestCode::RequestTimeout, message).into_response())
            }
            Err(rejection) => Err(rejection.into_response()),
        }
    }
}

/// A body that is a JSON object, read as `T` (any other body: `INVALID_REQUEST_BODY`).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let RequestBody(bytes) = RequestBody::from_request(request, state).await?;
        let invalid = || ApiError::new(RestCode::InvalidRequestBody, "The request body must be a JSON object.");
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(object @ Value::Object(_)) => {
                T::deserialize(object).map(JsonBody).map_err(|_| invalid().into_response())
            }
            _ => Err(invalid().into_response()),
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
