//! The session rules REST and the socket share: who owns a session, what a new session may
//! be (a provider this node runs, a project path inside the user's workspace, a summary),
//! renaming, archiving or deleting (the session's run goes with it), restoring, listing with
//! live run state, and the `session_upserted` notice the user's sockets get on every node.

use std::collections::HashMap;

use serde_json::Value;

use super::{Gateway, options::PathRefusal, valid_session_id};
use crate::{
    protocol::session_upserted,
    runs::RegistryError,
    store::{NewSession, SessionRow, StoreError},
};

/// Longest summary, as upstream.
pub const MAX_SUMMARY: usize = 500;

/// Why a session request is refused.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("Session id must match ^[a-zA-Z0-9._-]{{1,120}}$.")]
    InvalidId,
    /// Missing, or another user's: the two answer alike.
    #[error("Session \"{0}\" was not found.")]
    NotFound(String),
    #[error("Provider \"{0}\" is not supported.")]
    UnsupportedProvider(String),
    #[error("projectPath is required.")]
    ProjectPathRequired,
    #[error("projectPath must be inside your workspace root.")]
    ProjectPathOutside,
    #[error("summary must be {0}.")]
    InvalidSummary(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// A field of a client's request as given: absent, of the expected type, or of another one.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Given<T> {
    #[default]
    Absent,
    Valid(T),
    WrongType,
}

/// A new session as a client asks for it.
#[derive(Debug, Clone, Default)]
pub struct NewSessionRequest {
    pub provider: Given<String>,
    pub project_path: Given<String>,
    pub summary: Given<String>,
}

/// What [`Gateway::remove_session`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Archived,
    Deleted,
}

/// A summary a user gives a session: at most [`MAX_SUMMARY`] characters, no NUL (it cannot
/// be stored in PostgreSQL text: a bad request, not a backend failure). Trimmed.
/// A new session's summary is measured as given, a rename's once trimmed.
fn summary(raw: &str, required: bool) -> Result<String, SessionError> {
    let text = raw.trim();
    let measured = if required { text } else { raw };
    if measured.chars().count() > MAX_SUMMARY || text.contains('\0') || (required && text.is_empty()) {
        let rule = if required { "1-500 characters" } else { "a string of at most 500 characters" };
        return Err(SessionError::InvalidSummary(rule));
    }
    Ok(text.to_string())
}

impl Gateway {
    /// The caller's session `id` (archived ones too).
    pub async fn session_of(&self, user_id: &str, id: &str) -> Result<SessionRow, SessionError> {
        if !valid_session_id(id) {
            return Err(SessionError::InvalidId);
        }
        self.store.session(user_id, id).await?.ok_or_else(|| SessionError::NotFound(id.to_string()))
    }

    /// The session's JSON with its live run state.
    pub async fn session_json(&self, row: &SessionRow) -> Result<Value, SessionError> {
        let snapshot = self.registry.snapshot(&row.session_id).await?;
        Ok(row.to_json(snapshot.is_processing, snapshot.last_seq))
    }

    /// A page of the caller's live (or archived) sessions with their run state, and the total.
    pub async fn list_sessions(
        &self,
        user_id: &str,
        archived: bool,
        limit: i64,
        offset: i64,
    ) -> Result<(Vec<Value>, i64), SessionError> {
        let (rows, total) = self.store.list_sessions_archived(user_id, archived, limit, offset).await?;
        let running: HashMap<String, u64> =
            self.registry.running_runs(user_id).await?.into_iter().map(|r| (r.session_id, r.last_seq)).collect();
        let sessions = rows
            .iter()
            .map(|row| {
                let live = running.get(&row.session_id);
                row.to_json(live.is_some(), live.copied().unwrap_or(0))
            })
            .collect();
        Ok((sessions, total))
    }

    /// Creates a session of the caller: a provider this node runs, a project path inside the
    /// user's workspace (made when missing under the per-user layout), an optional summary.
    pub async fn create_session(&self, user_id: &str, request: NewSessionRequest) -> Result<SessionRow, SessionError> {
        let provider = match request.provider {
            Given::Valid(provider) => provider.trim().to_string(),
            Given::Absent | Given::WrongType => String::new(),
        };
        if !self.runtimes.contains_key(&provider) {
            return Err(SessionError::UnsupportedProvider(provider));
        }
        let raw_path = match &request.project_path {
            Given::Valid(path) => path.as_str(),
            Given::Absent | Given::WrongType => "",
        };
        let project_path = match self.settings.workspaces.resolve_new_project(user_id, raw_path) {
            Ok(path) => path.to_string_lossy().into_owned(),
            Err(PathRefusal::Required) => return Err(SessionError::ProjectPathRequired),
            Err(PathRefusal::Outside) => return Err(SessionError::ProjectPathOutside),
        };
        let summary = match &request.summary {
            Given::Absent => String::new(),
            Given::Valid(text) => summary(text, false)?,
            Given::WrongType => return Err(SessionError::InvalidSummary("a string of at most 500 characters")),
        };
        let session_id = uuid::Uuid::new_v4().to_string();
        let new = NewSession { session_id, user_id: user_id.to_string(), provider, project_path, summary };
        let row = self.store.create_session(new).await?;
        self.notify_session(user_id, &row).await;
        Ok(row)
    }

    /// Renames the caller's session; returns the summary as stored.
    pub async fn rename_session(&self, user_id: &str, id: &str, raw: &Given<String>) -> Result<String, SessionError> {
        if !valid_session_id(id) {
            return Err(SessionError::InvalidId);
        }
        let text = match raw {
            Given::Valid(text) => summary(text, true)?,
            Given::Absent | Given::WrongType => return Err(SessionError::InvalidSummary("1-500 characters")),
        };
        if !self.store.set_summary(user_id, id, &text).await? {
            return Err(SessionError::NotFound(id.to_string()));
        }
        if let Some(row) = self.store.session(user_id, id).await? {
            self.notify_session(user_id, &row).await;
        }
        Ok(text)
    }

    /// Archives (or with `force` deletes) the caller's session; its run, if any, is aborted
    /// first, on whichever node it runs.
    pub async fn remove_session(&self, user_id: &str, id: &str, force: bool) -> Result<Removal, SessionError> {
        self.session_of(user_id, id).await?;
        self.registry.route_abort(id, user_id).await?;
        let done = if force {
            self.store.delete_session(user_id, id).await?
        } else {
            self.store.set_archived(user_id, id, true).await?
        };
        match (done, force) {
            (false, _) => Err(SessionError::NotFound(id.to_string())),
            (true, true) => Ok(Removal::Deleted),
            (true, false) => Ok(Removal::Archived),
        }
    }

    /// Brings the caller's archived session back.
    pub async fn restore_session(&self, user_id: &str, id: &str) -> Result<(), SessionError> {
        if !valid_session_id(id) {
            return Err(SessionError::InvalidId);
        }
        if !self.store.set_archived(user_id, id, false).await? {
            return Err(SessionError::NotFound(id.to_string()));
        }
        Ok(())
    }

    /// Tells the user's sockets on every node about a changed session.
    async fn notify_session(&self, user_id: &str, row: &SessionRow) {
        let session = row.to_json(false, 0);
        let count = self.store.conversation_count(&row.session_id).await.unwrap_or(0);
        let frame =
            session_upserted(&row.session_id, &row.provider, row.provider_session_id.as_deref(), &session, count);
        if let Err(e) = self.registry.notify_user(user_id, frame).await {
            tracing::warn!(error = %e, "session_upserted not sent");
        }
    }
}
