//! `/api/providers/sessions…`: the session REST routes of docs/protocol.md §REST.
//!
//! Thin handlers over the gateway's session rules ([`crate::gateway::sessions`]): typed query
//! strings and bodies in, the rules' answer out. Every route is scoped to the caller: another
//! user's session answers 404 exactly like a missing one.

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    response::Response,
};
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};

use super::{ApiError, AppState, RestCode, auth::User, body::JsonBody, error::ok};
use crate::{
    gateway::sessions::{Given, NewSessionRequest, Removal, SessionError},
    store::HistoryView,
};

/// Sessions per page when `limit` is not given, and at most.
const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 1000;

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        let code = match &e {
            SessionError::InvalidId => RestCode::InvalidSessionId,
            SessionError::NotFound(_) => RestCode::SessionNotFound,
            SessionError::UnsupportedProvider(_) => RestCode::UnsupportedProvider,
            SessionError::ProjectPathRequired => RestCode::ProjectPathRequired,
            SessionError::ProjectPathOutside => RestCode::ProjectPathOutsideWorkspaces,
            SessionError::InvalidSummary(_) => RestCode::InvalidSummary,
            SessionError::Store(e) => return ApiError::unavailable("database", e),
            SessionError::Registry(e) => return ApiError::unavailable("redis", e),
        };
        ApiError::new(code, e.to_string())
    }
}

/// A string field as given ([`Given`]): any other JSON type is kept as a wrong one for the
/// rules to refuse with their own code, never as a malformed body.
fn given_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Given<String>, D::Error> {
    Ok(match Value::deserialize(deserializer)? {
        Value::Null => Given::Absent,
        Value::String(text) => Given::Valid(text),
        _ => Given::WrongType,
    })
}

/// `POST /api/providers/sessions` body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateBody {
    #[serde(default, deserialize_with = "given_string")]
    provider: Given<String>,
    #[serde(default, deserialize_with = "given_string")]
    project_path: Given<String>,
    #[serde(default, deserialize_with = "given_string")]
    summary: Given<String>,
}

/// `PUT /api/providers/sessions/:id` body.
#[derive(Debug, Deserialize)]
pub struct RenameBody {
    #[serde(default, deserialize_with = "given_string")]
    summary: Given<String>,
}

/// `limit` and `offset` (non-negative integers), and `kinds` on the messages route.
#[derive(Debug, Deserialize)]
pub struct Page {
    limit: Option<String>,
    offset: Option<String>,
    /// `kinds=all` (chatgate addition): every stored event, not only the conversation.
    kinds: Option<String>,
}

impl Page {
    fn parse(&self) -> Result<(Option<i64>, i64), ApiError> {
        let number = |raw: &Option<String>, name: &str| -> Result<Option<i64>, ApiError> {
            match raw.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
                None => Ok(None),
                Some(s) => s.parse::<i64>().ok().filter(|n| *n >= 0).map(Some).ok_or_else(|| {
                    ApiError::new(RestCode::InvalidPagination, format!("{name} must be a non-negative integer."))
                }),
            }
        };
        Ok((number(&self.limit, "limit")?, number(&self.offset, "offset")?.unwrap_or(0)))
    }

    fn view(&self) -> Result<HistoryView, ApiError> {
        match self.kinds.as_deref().map(str::trim) {
            None | Some("") | Some("conversation") => Ok(HistoryView::Conversation),
            Some("all") => Ok(HistoryView::All),
            Some(_) => Err(ApiError::new(RestCode::InvalidKinds, "kinds must be \"conversation\" or \"all\".")),
        }
    }
}

/// `?archived=true` on the list: the archived sessions instead of the live ones.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    archived: Option<String>,
}

/// `?force=true` on a delete: delete instead of archive.
#[derive(Debug, Deserialize)]
pub struct DeleteQuery {
    force: Option<String>,
}

fn flag(raw: Option<&str>) -> bool {
    matches!(raw.map(str::trim), Some("true" | "1"))
}

/// `POST /api/providers/sessions`
pub async fn create(
    State(state): State<AppState>,
    User(user): User,
    JsonBody(body): JsonBody<CreateBody>,
) -> Result<Response, ApiError> {
    let request = NewSessionRequest { provider: body.provider, project_path: body.project_path, summary: body.summary };
    let row = state.gateway.create_session(&user.user_id, request).await?;
    let data = json!({ "sessionId": row.session_id, "provider": row.provider, "projectPath": row.project_path });
    Ok(ok(StatusCode::CREATED, data))
}

/// `GET /api/providers/sessions`
pub async fn list(
    State(state): State<AppState>,
    User(user): User,
    Query(page): Query<Page>,
    Query(filter): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let (limit, offset) = page.parse()?;
    let limit = limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT);
    let archived = flag(filter.archived.as_deref());
    let (sessions, total) = state.gateway.list_sessions(&user.user_id, archived, limit, offset).await?;
    Ok(ok(StatusCode::OK, json!({ "sessions": sessions, "total": total })))
}

/// `GET /api/providers/sessions/running`
pub async fn running(State(state): State<AppState>, User(user): User) -> Result<Response, ApiError> {
    let runs = state.gateway.registry.running_runs(&user.user_id).await?;
    Ok(ok(StatusCode::OK, json!({ "sessions": runs })))
}

/// `GET /api/providers/sessions/:id`
pub async fn show(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let row = state.gateway.session_of(&user.user_id, &id).await?;
    Ok(ok(StatusCode::OK, state.gateway.session_json(&row).await?))
}

/// `GET /api/providers/sessions/:id/messages`
pub async fn messages(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    Query(page): Query<Page>,
) -> Result<Response, ApiError> {
    let (limit, offset) = page.parse()?;
    state.gateway.session_of(&user.user_id, &id).await?;
    let view = page.view()?;
    let page = state.gateway.store.messages(&id, limit, offset, view).await?;
    let has_more = offset + (page.messages.len() as i64) < page.total;
    Ok(ok(
        StatusCode::OK,
        json!({ "messages": page.messages, "total": page.total, "hasMore": has_more, "offset": offset, "limit": limit,
            "lastSeq": page.last_seq }),
    ))
}

/// `PUT /api/providers/sessions/:id`
pub async fn rename(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<RenameBody>,
) -> Result<Response, ApiError> {
    let summary = state.gateway.rename_session(&user.user_id, &id, &body.summary).await?;
    Ok(ok(StatusCode::OK, json!({ "sessionId": id, "summary": summary })))
}

/// `DELETE /api/providers/sessions/:id?force=true`
pub async fn remove(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    Query(query): Query<DeleteQuery>,
) -> Result<Response, ApiError> {
    let action = match state.gateway.remove_session(&user.user_id, &id, flag(query.force.as_deref())).await? {
        Removal::Deleted => "deleted",
        Removal::Archived => "archived",
    };
    Ok(ok(StatusCode::OK, json!({ "sessionId": id, "action": action })))
}

/// `POST /api/providers/sessions/:id/restore`
pub async fn restore(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    state.gateway.restore_session(&user.user_id, &id).await?;
    Ok(ok(StatusCode::OK, json!({ "sessionId": id, "isArchived": false })))
}
