//! The authenticated caller of a request: `Authorization: Bearer` or `?token=`.

use axum::{
    extract::{FromRequestParts, Query},
    http::request::Parts,
};

use super::{ApiError, AppState};
use crate::auth::Identity;

/// Extracts and verifies the caller's token; 401 otherwise.
pub struct User(pub Identity);

/// The raw token of a request, header first, then the query string.
pub fn request_token(parts: &Parts) -> Option<String> {
    let header = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty());
    header.or_else(|| {
        Query::<TokenQuery>::try_from_uri(&parts.uri).ok().and_then(|Query(q)| q.token).filter(|t| !t.is_empty())
    })
}

#[derive(serde::Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

impl FromRequestParts<AppState> for User {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = request_token(parts).ok_or_else(|| ApiError::unauthorized("Access denied. No token provided."))?;
        state.auth.verify(&token).map(User).map_err(|e| ApiError::unauthorized(format!("Access denied. {e}.")))
    }
}
