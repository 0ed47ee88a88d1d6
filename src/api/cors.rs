//! CORS for pages served from other origins (`--allowed-origins`).
//!
//! A page on another origin that imports `/client/chatgate.js` and calls the
//! REST API needs the gateway's grant: module scripts and `fetch` with an
//! `Authorization` header are CORS requests, with a preflight for the latter.
//! The grant follows `--allowed-origins` exactly (the list that also guards
//! the WebSocket's `Origin`); with the flag unset there is no grant at all, so
//! only same-origin pages (the built-in console) can use the API from a
//! browser, and a preflight is answered like any unknown method (405).

use std::time::Duration;

use axum::http::{HeaderValue, Method, header};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// How long a browser may cache a preflight's answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// The CORS layer for `allowed_origins`, or `None` (no grant) when unset.
pub fn layer(allowed_origins: Option<&[String]>) -> Option<CorsLayer> {
    let origins: Vec<HeaderValue> =
        allowed_origins?.iter().filter_map(|origin| HeaderValue::from_str(origin.trim()).ok()).collect();
    if origins.is_empty() {
        return None;
    }
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .expose_headers([header::RETRY_AFTER, header::HeaderName::from_static(super::NODE_HEADER)])
            .max_age(PREFLIGHT_MAX_AGE),
    )
}
