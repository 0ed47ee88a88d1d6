//! The `messages` table: the durable history of every session (docs/protocol.md §History).

use serde_json::{Map, Value};
use sqlx::Row;

use super::{Store, StoreError, now_ms};

/// [`HistoryRow::part`] of a user's prompt, placed before the event with its seq.
pub const PROMPT_PART: u8 = 0;
/// [`HistoryRow::part`] of an event (or a stream's merged text).
pub const EVENT_PART: u8 = 1;
/// [`HistoryRow::part`] of a draft: the text of one append batch's
/// `stream_delta`s of a stream not closed yet, at the batch's last delta's seq.
/// Drafts are the owner's durable progress, not history: `GET …/messages`
/// never shows them, and the stream's merged text deletes them.
pub const DRAFT_PART: u8 = 2;

/// One history row to write.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRow {
    pub session_id: String,
    pub seq: u64,
    /// [`PROMPT_PART`], [`EVENT_PART`] or [`DRAFT_PART`].
    pub part: u8,
    pub kind: String,
    /// The event JSON without `seq`.
    pub body: String,
    /// Set on a stream's merged text: the seq of the stream's first delta. The
    /// session's drafts from there up to this row's seq are deleted in the same
    /// transaction that writes it (seqs of one stream are its run's alone).
    pub supersedes_drafts_from: Option<u64>,
}

/// A page of history, as `GET …/messages` returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct MessagePage {
    pub messages: Vec<Value>,
    pub total: i64,
    /// The highest seq of any stored event of the session (every kind, listed
    /// or not): a client resumes its live stream after it.
    pub last_seq: u64,
}

/// The kinds `GET …/messages` lists: the conversation (docs/protocol.md §History).
pub const CONVERSATION_KINDS: &[&str] =
    &["text", "thinking", "tool_use", "tool_result", "error", "interactive_prompt", "task_notification"];

/// Which stored rows [`Store::messages`] lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryView {
    /// The conversation only, as upstream's transcript-based history: what `GET …/messages` serves.
    Conversation,
    /// Every stored event (`complete`, `status`, `permission_*` too): `GET …/messages?kinds=all`.
    All,
}

impl Store {
    /// Writes history rows (idempotent: a row already there is kept; rows of a
    /// deleted session are dropped), deletes the drafts a merged text supersedes,
    /// and raises each touched session's `last_seq` high-water mark.
    ///
    /// Each session's row is updated *before* its messages are inserted: the
    /// update locks the row, so a concurrent delete of the session either waits
    /// for this transaction (and then removes these messages with the rest) or
    /// wins, and then the update touches nothing and the messages are skipped.
    pub async fn append_history(&self, rows: &[HistoryRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut tops: Vec<(&str, u64)> = Vec::new();
        for row in rows {
            // A prompt row carries its run's first seq (it is stored when the run starts) and a
            // draft its batch's last delta's, both taken: counting them keeps the mark above a
            // run whose deltas are not merged yet (at their `stream_end`), so a counter Redis
            // lost is restored past them, and marks the session as having had a run. The mark
            // may be above the last event sent, so `chat.subscribe` does not announce it while
            // the registry knows a run.
            let seq = row.seq;
            match tops.iter_mut().find(|(id, _)| *id == row.session_id) {
                Some((_, top)) => *top = (*top).max(seq),
                None => tops.push((&row.session_id, seq)),
            }
        }
        // One lock order for every writer in the cluster: no deadlocks between nodes.
        tops.sort_unstable();
        let mut tx = self.pool.begin().await?;
        for (session_id, top) in tops {
            if !self.raise_last_seq(&mut tx, session_id, top).await? {
                continue;
            }
            for row in rows.iter().filter(|r| r.session_id == session_id) {
                sqlx::query(
                    "INSERT INTO messages (session_id, seq, part, kind, body) VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (session_id, seq, part) DO NOTHING",
                )
                .bind(&row.session_id)
                .bind(i64::try_from(row.seq).unwrap_or(i64::MAX))
                .bind(i64::from(row.part))
                .bind(&row.kind)
                .bind(&row.body)
                .execute(&mut *tx)
                .await?;
                if let Some(from) = row.supersedes_drafts_from {
                    sqlx::query("DELETE FROM messages WHERE session_id = $1 AND part = $2 AND seq >= $3 AND seq <= $4")
                        .bind(&row.session_id)
                        .bind(i64::from(DRAFT_PART))
                        .bind(i64::try_from(from).unwrap_or(i64::MAX))
                        .bind(i64::try_from(row.seq).unwrap_or(i64::MAX))
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn raise_last_seq(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        session_id: &str,
        top: u64,
    ) -> Result<bool, StoreError> {
        let top = i64::try_from(top).unwrap_or(i64::MAX);
        let done = sqlx::query(
            "UPDATE sessions SET last_seq = CASE WHEN last_seq < $1 THEN $1 ELSE last_seq END, updated_at = $2 \
             WHERE session_id = $3",
        )
        .bind(top)
        .bind(now_ms())
        .bind(session_id)
        .execute(&mut **tx)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Raises a session's seq high-water mark without writing history.
    pub async fn raise_session_seq(&self, session_id: &str, top: u64) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        self.raise_last_seq(&mut tx, session_id, top).await?;
        tx.commit().await?;
        Ok(())
    }

    /// How many rows `GET …/messages` lists for the session (its conversation).
    pub async fn conversation_count(&self, session_id: &str) -> Result<i64, StoreError> {
        Ok(self.messages(session_id, Some(0), 0, HistoryView::Conversation).await?.total)
    }

    /// Drafts of a session with seqs in `from..=to`, by seq: (seq, body).
    pub async fn drafts(&self, session_id: &str, from: u64, to: u64) -> Result<Vec<(u64, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, body FROM messages WHERE session_id = $1 AND part = $2 AND seq >= $3 AND seq <= $4 \
             ORDER BY seq",
        )
        .bind(session_id)
        .bind(i64::from(DRAFT_PART))
        .bind(i64::try_from(from).unwrap_or(i64::MAX))
        .bind(i64::try_from(to).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        let mut drafts = Vec::with_capacity(rows.len());
        for row in rows {
            let seq: i64 = row.try_get("seq")?;
            drafts.push((u64::try_from(seq).unwrap_or(0), row.try_get("body")?));
        }
        Ok(drafts)
    }

    /// A page counted from the newest (offset 0 = newest page), oldest first
    /// inside it, as upstream. `limit: None` returns everything after `offset`.
    /// Drafts are not history: neither listed nor counted. With
    /// [`HistoryView::Conversation`] only the conversation's kinds
    /// ([`CONVERSATION_KINDS`]) are listed and counted; [`HistoryView::All`]
    /// is the gateway's full record (every stored event, `complete` included).
    pub async fn messages(
        &self,
        session_id: &str,
        limit: Option<i64>,
        offset: i64,
        view: HistoryView,
    ) -> Result<MessagePage, StoreError> {
        let filter = match view {
            HistoryView::All => String::new(),
            HistoryView::Conversation => {
                let kinds: Vec<String> = CONVERSATION_KINDS.iter().map(|k| format!("'{k}'")).collect();
                format!(" AND kind IN ({})", kinds.join(", "))
            }
        };
        // `filter` is built from constants only (no input reaches the SQL text).
        // The count and the last seq come from the same statement (one snapshot) as the page.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT seq, part, body, \
             (SELECT COUNT(*) FROM messages WHERE session_id = $1 AND part < $4{filter}) AS total, \
             (SELECT MAX(seq) FROM messages WHERE session_id = $1 AND part = $5) AS top \
             FROM messages WHERE session_id = $1 AND part < $4{filter} ORDER BY seq DESC, part DESC LIMIT $2 OFFSET $3",
        )))
        .bind(session_id)
        .bind(limit.unwrap_or(i64::MAX))
        .bind(offset)
        .bind(i64::from(DRAFT_PART))
        .bind(i64::from(EVENT_PART))
        .fetch_all(&self.pool)
        .await?;
        let (total, top): (i64, Option<i64>) = match rows.first() {
            Some(row) => (row.try_get("total")?, row.try_get("top")?),
            None => {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT (SELECT COUNT(*) FROM messages WHERE session_id = $1 AND part < $2{filter}) AS n, \
                     (SELECT MAX(seq) FROM messages WHERE session_id = $1 AND part = $3) AS top",
                )))
                .bind(session_id)
                .bind(i64::from(DRAFT_PART))
                .bind(i64::from(EVENT_PART))
                .fetch_one(&self.pool)
                .await?;
                (row.try_get("n")?, row.try_get("top")?)
            }
        };
        let last_seq = top.and_then(|t| u64::try_from(t).ok()).unwrap_or(0);
        let mut messages = Vec::with_capacity(rows.len());
        for row in rows.iter().rev() {
            let seq: i64 = row.try_get("seq")?;
            let part: i64 = row.try_get("part")?;
            let body: String = row.try_get("body")?;
            let mut object = match serde_json::from_str::<Value>(&body) {
                Ok(Value::Object(object)) => object,
                _ => Map::new(),
            };
            object.insert("seq".into(), if part == i64::from(EVENT_PART) { Value::from(seq) } else { Value::Null });
            messages.push(Value::Object(object));
        }
        Ok(MessagePage { messages, total, last_seq })
    }
}
