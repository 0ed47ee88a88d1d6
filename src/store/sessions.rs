//! The `sessions` table: one row per chat session, owned by one user.

use serde_json::{Value, json};
use sqlx::Row;

use super::{Store, StoreError, iso_ms, now_ms};

/// A session as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRow {
    pub session_id: String,
    pub user_id: String,
    pub provider: String,
    pub provider_session_id: Option<String>,
    pub project_path: String,
    pub summary: String,
    pub is_archived: bool,
    pub created_at: i64,
    pub updated_at: i64,
    pub last_seq: u64,
    /// The last `clientRequestId` that started a run of the session, with its run.
    pub last_request: Option<LastRequest>,
}

/// A send's idempotency key and the run it started, kept in SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastRequest {
    pub key: String,
    pub run_id: String,
    pub first_seq: u64,
}

impl SessionRow {
    /// The `Session` JSON of docs/protocol.md §REST.
    /// The session's `lastSeq` as clients are told it, given the registry's
    /// view. SQL's mark may hold a running run's first seq before its first
    /// event exists (its prompt row): while a run is known, the registry's top
    /// is the truth; otherwise the higher of the two (the registry may have lost it).
    pub fn visible_last_seq(&self, is_processing: bool, live_last_seq: u64) -> u64 {
        if is_processing { live_last_seq } else { self.last_seq.max(live_last_seq) }
    }

    pub fn to_json(&self, is_processing: bool, live_last_seq: u64) -> Value {
        json!({
            "sessionId": self.session_id,
            "provider": self.provider,
            "providerSessionId": self.provider_session_id,
            "projectPath": self.project_path,
            "summary": self.summary,
            "isArchived": self.is_archived,
            "createdAt": iso_ms(self.created_at),
            "updatedAt": iso_ms(self.updated_at),
            "lastSeq": self.visible_last_seq(is_processing, live_last_seq),
            "isProcessing": is_processing,
        })
    }
}

/// What `POST /api/providers/sessions` creates.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub session_id: String,
    pub user_id: String,
    pub provider: String,
    pub project_path: String,
    pub summary: String,
}

/// The columns [`from_row`] reads, as a literal for `concat!`.
macro_rules! columns {
    () => {
        "session_id, user_id, provider, provider_session_id, project_path, summary, is_archived, created_at, \
         updated_at, last_seq, last_request_key, last_request_run_id, last_request_seq"
    };
}

fn from_row(row: &sqlx::any::AnyRow) -> Result<SessionRow, sqlx::Error> {
    Ok(SessionRow {
        session_id: row.try_get("session_id")?,
        user_id: row.try_get("user_id")?,
        provider: row.try_get("provider")?,
        provider_session_id: row.try_get("provider_session_id")?,
        project_path: row.try_get("project_path")?,
        summary: row.try_get("summary")?,
        is_archived: row.try_get::<i64, _>("is_archived")? != 0,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        last_seq: u64::try_from(row.try_get::<i64, _>("last_seq")?).unwrap_or(0),
        last_request: match (row.try_get("last_request_key")?, row.try_get("last_request_run_id")?) {
            (Some(key), Some(run_id)) => Some(LastRequest {
                key,
                run_id,
                first_seq: u64::try_from(row.try_get::<i64, _>("last_request_seq")?).unwrap_or(0),
            }),
            _ => None,
        },
    })
}

impl Store {
    /// Inserts a new session.
    pub async fn create_session(&self, new: NewSession) -> Result<SessionRow, StoreError> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO sessions (session_id, user_id, provider, project_path, summary, is_archived, created_at, \
             updated_at, last_seq) VALUES ($1, $2, $3, $4, $5, 0, $6, $6, 0)",
        )
        .bind(&new.session_id)
        .bind(&new.user_id)
        .bind(&new.provider)
        .bind(&new.project_path)
        .bind(&new.summary)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(SessionRow {
            session_id: new.session_id,
            user_id: new.user_id,
            provider: new.provider,
            provider_session_id: None,
            project_path: new.project_path,
            summary: new.summary,
            is_archived: false,
            created_at: now,
            updated_at: now,
            last_seq: 0,
            last_request: None,
        })
    }

    /// Remembers the `clientRequestId` that started run `run_id` (at `first_seq`) as the session's last.
    pub async fn record_request(&self, session_id: &str, request: &LastRequest) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE sessions SET last_request_key = $1, last_request_run_id = $2, last_request_seq = $3 \
             WHERE session_id = $4",
        )
        .bind(&request.key)
        .bind(&request.run_id)
        .bind(i64::try_from(request.first_seq).unwrap_or(i64::MAX))
        .bind(session_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The user's session, archived or not; `None` for a missing or foreign one.
    pub async fn session(&self, user_id: &str, session_id: &str) -> Result<Option<SessionRow>, StoreError> {
        let sql = concat!("SELECT ", columns!(), " FROM sessions WHERE session_id = $1 AND user_id = $2");
        let row = sqlx::query(sql).bind(session_id).bind(user_id).fetch_optional(&self.pool).await?;
        Ok(row.as_ref().map(from_row).transpose()?)
    }

    /// The user's live (not archived) sessions, newest first, and their count.
    pub async fn list_sessions(
        &self,
        user_id: &str,
        limit: i64,
        offset: i64,
    ) -> Result<(Vec<SessionRow>, i64), StoreError> {
        self.list_sessions_archived(user_id, false, limit, offset).await
    }

    /// The user's archived (`archived`) or live sessions, newest first, and their count.
    pub async fn list_sessions_archived(
        &self,
        user_id: &str,
        archived: bool,
        limit: i64,
        offset: i64,
    ) -> Result<(Vec<SessionRow>, i64), StoreError> {
        let sql = concat!(
            "SELECT ",
            columns!(),
            " FROM sessions WHERE user_id = $1 AND is_archived = $2 ORDER BY created_at DESC, session_id DESC \
             LIMIT $3 OFFSET $4"
        );
        let flag = i64::from(archived);
        let rows = sqlx::query(sql).bind(user_id).bind(flag).bind(limit).bind(offset).fetch_all(&self.pool).await?;
        let sessions = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
        let total: i64 = sqlx::query("SELECT COUNT(*) AS n FROM sessions WHERE user_id = $1 AND is_archived = $2")
            .bind(user_id)
            .bind(flag)
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?;
        Ok((sessions, total))
    }

    /// Renames; false when the session is not the user's.
    pub async fn set_summary(&self, user_id: &str, session_id: &str, summary: &str) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE sessions SET summary = $1, updated_at = $2 WHERE session_id = $3 AND user_id = $4")
                .bind(summary)
                .bind(now_ms())
                .bind(session_id)
                .bind(user_id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Archives or restores; false when the session is not the user's.
    pub async fn set_archived(&self, user_id: &str, session_id: &str, archived: bool) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE sessions SET is_archived = $1, updated_at = $2 WHERE session_id = $3 AND user_id = $4")
                .bind(i64::from(archived))
                .bind(now_ms())
                .bind(session_id)
                .bind(user_id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Deletes the session and its history; false when it is not the user's.
    pub async fn delete_session(&self, user_id: &str, session_id: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM sessions WHERE session_id = $1 AND user_id = $2")
            .bind(session_id)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        sqlx::query("DELETE FROM messages WHERE session_id = $1").bind(session_id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Records the provider's own session id (first run of a session).
    pub async fn set_provider_session_id(&self, session_id: &str, provider_session_id: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE sessions SET provider_session_id = $1, updated_at = $2 WHERE session_id = $3")
            .bind(provider_session_id)
            .bind(now_ms())
            .bind(session_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
