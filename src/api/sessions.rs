//! `/api/providers/sessions…`: the session REST routes of docs/protocol.md §REST.
//!
//! Every route is scoped to the caller: another user's session answers 404
//! exactly like a missing one.

use std::collections::HashMap;

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    response::Response,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, AppState, auth::User, body::RequestBody, error::ok};
use crate::{
    gateway::{options::PathRefusal, valid_session_id},
    protocol::session_upserted,
    store::{HistoryView, NewSession, SessionRow},
};

/// Sessions per page when `limit` is not given, and at most.
const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 1000;
/// Longest summary, as upstream.
const MAX_SUMMARY: usize = 500;

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
                    ApiError::bad_request("INVALID_PAGINATION", format!("{name} must be a non-negative integer."))
                }),
            }
        };
        Ok((number(&self.limit, "limit")?, number(&self.offset, "offset")?.unwrap_or(0)))
    }
}

/// `?archived=true` on the list: the archived sessions instead of the live ones.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    archived: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct DeleteQuery {
    force: Option<String>,
}

fn check_id(id: &str) -> Result<(), ApiError> {
    if valid_session_id(id) {
        Ok(())
    } else {
        Err(ApiError::bad_request("INVALID_SESSION_ID", "Session id must match ^[a-zA-Z0-9._-]{1,120}$."))
    }
}

fn json_body(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(ApiError::bad_request("INVALID_REQUEST_BODY", "The request body must be a JSON object.")),
    }
}

async fn owned(state: &AppState, user: &str, id: &str) -> Result<SessionRow, ApiError> {
    check_id(id)?;
    state.gateway.store.session(user, id).await?.ok_or_else(|| ApiError::session_not_found(id))
}

/// The `Session` JSON with live run state.
async fn session_json(state: &AppState, row: &SessionRow) -> Result<Value, ApiError> {
    let snapshot = state.gateway.registry.snapshot(&row.session_id).await?;
    Ok(row.to_json(snapshot.is_processing, snapshot.last_seq))
}

/// `POST /api/providers/sessions`
pub async fn create(
    State(state): State<AppState>,
    User(user): User,
    RequestBody(body): RequestBody,
) -> Result<Response, ApiError> {
    let body = json_body(&body)?;
    let provider = body.get("provider").and_then(Value::as_str).unwrap_or("").trim().to_string();
    if !state.gateway.runtimes.contains_key(&provider) {
        return Err(ApiError::bad_request(
            "UNSUPPORTED_PROVIDER",
            format!("Provider \"{provider}\" is not supported."),
        ));
    }
    let raw_path = body.get("projectPath").and_then(Value::as_str).unwrap_or("");
    let project_path = match state.gateway.settings.workspaces.resolve_new_project(&user.user_id, raw_path) {
        Ok(path) => path.to_string_lossy().into_owned(),
        Err(PathRefusal::Required) => {
            return Err(ApiError::bad_request("PROJECT_PATH_REQUIRED", "projectPath is required."));
        }
        Err(PathRefusal::Outside) => {
            return Err(ApiError::bad_request(
                "PROJECT_PATH_OUTSIDE_WORKSPACES",
                "projectPath must be inside your workspace root.",
            ));
        }
    };
    let summary = match body.get("summary") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) if s.chars().count() <= MAX_SUMMARY && !s.contains('\0') => s.trim().to_string(),
        Some(_) => {
            return Err(ApiError::bad_request(
                "INVALID_SUMMARY",
                "summary must be a string of at most 500 characters.",
            ));
        }
    };
    let row = state
        .gateway
        .store
        .create_session(NewSession {
            session_id: uuid::Uuid::new_v4().to_string(),
            user_id: user.user_id.clone(),
            provider,
            project_path,
            summary,
        })
        .await?;
    notify(&state, &user.user_id, &row).await;
    Ok(ok(
        StatusCode::CREATED,
        json!({ "sessionId": row.session_id, "provider": row.provider, "projectPath": row.project_path }),
    ))
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
    let archived = matches!(filter.archived.as_deref().map(str::trim), Some("true" | "1"));
    let store = &state.gateway.store;
    let (rows, total) = store.list_sessions_archived(&user.user_id, archived, limit, offset).await?;
    let running: HashMap<String, u64> = state
        .gateway
        .registry
        .running_runs(&user.user_id)
        .await?
        .into_iter()
        .map(|r| (r.session_id, r.last_seq))
        .collect();
    let sessions: Vec<Value> = rows
        .iter()
        .map(|row| {
            let live = running.get(&row.session_id);
            row.to_json(live.is_some(), live.copied().unwrap_or(0))
        })
        .collect();
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
    let row = owned(&state, &user.user_id, &id).await?;
    Ok(ok(StatusCode::OK, session_json(&state, &row).await?))
}

/// `GET /api/providers/sessions/:id/messages`
pub async fn messages(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    Query(page): Query<Page>,
) -> Result<Response, ApiError> {
    let (limit, offset) = page.parse()?;
    owned(&state, &user.user_id, &id).await?;
    let view = match page.kinds.as_deref().map(str::trim) {
        None | Some("") | Some("conversation") => HistoryView::Conversation,
        Some("all") => HistoryView::All,
        Some(_) => return Err(ApiError::bad_request("INVALID_KINDS", "kinds must be \"conversation\" or \"all\".")),
    };
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
    RequestBody(body): RequestBody,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    let body = json_body(&body)?;
    let summary = body.get("summary").and_then(Value::as_str).map(str::trim).unwrap_or("");
    // A NUL cannot be stored in PostgreSQL text: a bad request, not a backend failure.
    if summary.is_empty() || summary.chars().count() > MAX_SUMMARY || summary.contains('\0') {
        return Err(ApiError::bad_request("INVALID_SUMMARY", "summary must be 1-500 characters."));
    }
    if !state.gateway.store.set_summary(&user.user_id, &id, summary).await? {
        return Err(ApiError::session_not_found(&id));
    }
    if let Some(row) = state.gateway.store.session(&user.user_id, &id).await? {
        notify(&state, &user.user_id, &row).await;
    }
    Ok(ok(StatusCode::OK, json!({ "sessionId": id, "summary": summary })))
}

/// `DELETE /api/providers/sessions/:id?force=true`
pub async fn remove(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    Query(query): Query<DeleteQuery>,
) -> Result<Response, ApiError> {
    owned(&state, &user.user_id, &id).await?;
    let force = matches!(query.force.as_deref(), Some("true" | "1"));
    // A session going away takes its run with it.
    state.gateway.registry.route_abort(&id, &user.user_id).await?;
    let done = if force {
        state.gateway.store.delete_session(&user.user_id, &id).await?
    } else {
        state.gateway.store.set_archived(&user.user_id, &id, true).await?
    };
    if !done {
        return Err(ApiError::session_not_found(&id));
    }
    Ok(ok(StatusCode::OK, json!({ "sessionId": id, "action": if force { "deleted" } else { "archived" } })))
}

/// `POST /api/providers/sessions/:id/restore`
pub async fn restore(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    if !state.gateway.store.set_archived(&user.user_id, &id, false).await? {
        return Err(ApiError::session_not_found(&id));
    }
    Ok(ok(StatusCode::OK, json!({ "sessionId": id, "isArchived": false })))
}

/// Tells the user's sockets on every node about a changed session.
async fn notify(state: &AppState, user_id: &str, row: &SessionRow) {
    let session = row.to_json(false, 0);
    let count = state.gateway.store.conversation_count(&row.session_id).await.unwrap_or(0);
    let frame = session_upserted(&row.session_id, &row.provider, row.provider_session_id.as_deref(), &session, count);
    if let Err(e) = state.gateway.registry.notify_user(user_id, frame).await {
        tracing::warn!(error = %e, "session_upserted not sent");
    }
}
