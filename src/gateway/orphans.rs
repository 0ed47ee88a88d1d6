//! Copies into SQL the events of runs this node ended for a lost owner, and the
//! `complete` of a run whose owner died right after appending it.
//!
//! The owner writes history while its run streams; when it dies, what it had
//! not written yet (and the terminal `complete` the reaper appended) exists
//! only in the session's replay stream. The node that reaped the run reads the
//! run's events back and writes them through the same [`Transcript`] rules, so
//! rows the owner did write collapse with these (same seq and part).
//!
//! A stream the owner left open is resumed from its drafts in SQL (one per
//! append batch, see [`Transcript::end_batch`]): the replay stream is trimmed
//! and lost when Redis restarts, so it may no longer hold the stream's start.
//! The owner's history writer is FIFO, so every row of events up to its last
//! draft's seq was written before that draft: only later events are copied.
//!
//! An owner stores all of its run's rows before appending the `complete`, and
//! the `complete` row right after; the registry keeps a marker between the two
//! (`RunOwnership::history_saved`), so a sweeper that finds it left by a dead
//! owner hands over just that event (`OrphanedRun::unsaved_complete`).

use serde_json::Value;
use tokio::sync::mpsc;

use super::{
    HistoryWriter,
    transcript::{Labels, Origin, Transcript},
};
use crate::{
    protocol::EventBody,
    runs::{Event, OrphanedRun, SharedRegistry},
    store::{HistoryRow, Store},
};

/// Runs the copier until the registry drops its notices.
pub(super) fn spawn(
    registry: SharedRegistry,
    store: Store,
    history: HistoryWriter,
    mut notices: mpsc::Receiver<OrphanedRun>,
) {
    tokio::spawn(async move {
        while let Some(run) = notices.recv().await {
            if run.unsaved_complete {
                copy_complete(&registry, &history, &run).await;
                continue;
            }
            // Without its owner record (Redis lost it) the run's first seq is unknown: the
            // reaper reports its complete's. Drafts are few (open streams only), so look lower.
            let from = if run.first_seq < run.complete_seq { run.first_seq } else { 0 };
            let drafts = match store.drafts(&run.session_id, from, run.complete_seq).await {
                Ok(drafts) => open_stream(&run, &drafts),
                Err(e) => {
                    tracing::warn!(session_id = run.session_id, error = %e, "cannot read an orphaned run's drafts");
                    None
                }
            };
            let copied_up_to = drafts.as_ref().map_or(run.first_seq.saturating_sub(1), |d| d.last);
            let events = match registry.read_range(&run.session_id, copied_up_to, run.complete_seq).await {
                Ok(range) => {
                    if !range.complete {
                        tracing::warn!(
                            session_id = run.session_id,
                            run_id = run.run_id,
                            after = copied_up_to,
                            "the replay stream no longer holds all of an orphaned run's events"
                        );
                    }
                    range.events
                }
                Err(e) => {
                    tracing::warn!(session_id = run.session_id, error = %e, "cannot read an orphaned run's events");
                    if drafts.is_none() {
                        continue;
                    }
                    Vec::new()
                }
            };
            let mut rows = history_rows(&run, drafts, &events);
            if let Some(prompt) = &run.prompt {
                rows.insert(0, prompt_row(&run, prompt, &events));
            }
            tracing::info!(
                session_id = run.session_id,
                run_id = run.run_id,
                rows = rows.len(),
                from_seq = copied_up_to + 1,
                "copying an orphaned run's events to history"
            );
            history.write(rows).await;
        }
    });
}

/// Stores the `complete` a run's owner appended but may not have stored.
async fn copy_complete(registry: &SharedRegistry, history: &HistoryWriter, run: &OrphanedRun) {
    let events = match registry.read_range(&run.session_id, run.complete_seq.saturating_sub(1), run.complete_seq).await
    {
        Ok(range) => range.events,
        Err(e) => {
            tracing::warn!(session_id = run.session_id, error = %e, "cannot read a completed run's complete");
            return;
        }
    };
    let complete: Vec<Event> =
        events.into_iter().filter(|e| e.seq == run.complete_seq && *e.run_id == *run.run_id && e.terminal).collect();
    if complete.is_empty() {
        tracing::warn!(
            session_id = run.session_id,
            run_id = run.run_id,
            "the replay stream no longer holds the run's complete"
        );
        return;
    }
    history.write(history_rows(run, None, &complete)).await;
}

/// The run's prompt row, at its first seq (where its owner stored it too, if it could).
fn prompt_row(run: &OrphanedRun, prompt: &str, events: &[Event]) -> HistoryRow {
    let provider = events
        .iter()
        .filter(|e| *e.run_id == *run.run_id)
        .find_map(|e| serde_json::from_str::<Value>(&e.frame).ok()?.get("provider")?.as_str().map(str::to_string))
        .unwrap_or_default();
    let labels = Labels { session_id: run.session_id.clone(), provider, run_id: run.run_id.clone() };
    labels.prompt_row(run.first_seq, prompt)
}

/// The stream an orphaned run's drafts hold open.
#[derive(Debug, PartialEq)]
struct Drafts {
    provider: String,
    text: String,
    first: u64,
    last: u64,
    /// The first draft's `id` and `timestamp`: the stream's (its first delta's).
    origin: Origin,
}

/// The run's drafts (of other runs' are skipped), joined in seq order.
fn open_stream(run: &OrphanedRun, drafts: &[(u64, String)]) -> Option<Drafts> {
    let mut open: Option<Drafts> = None;
    for (seq, body) in drafts {
        let Ok(value) = serde_json::from_str::<Value>(body) else { continue };
        if value["runId"].as_str() != Some(run.run_id.as_str()) {
            continue;
        }
        let content = value["content"].as_str().unwrap_or("");
        let open = open.get_or_insert_with(|| Drafts {
            provider: value["provider"].as_str().unwrap_or("").to_string(),
            text: String::new(),
            first: *seq,
            last: *seq,
            origin: Origin::of(body),
        });
        open.text.push_str(content);
        open.last = *seq;
    }
    open
}

/// History rows of the orphaned run's events after its drafts (other runs'
/// events are skipped), the drafts' stream going on with them.
fn history_rows(run: &OrphanedRun, drafts: Option<Drafts>, events: &[Event]) -> Vec<HistoryRow> {
    let mut rows = Vec::new();
    let labels = |provider: String| Labels { session_id: run.session_id.clone(), provider, run_id: run.run_id.clone() };
    let copied_up_to = drafts.as_ref().map_or(0, |d| d.last);
    let mut transcript = drafts.map(|d| Transcript::resuming(labels(d.provider), d.text, d.first, d.last, d.origin));
    for event in events.iter().filter(|e| *e.run_id == *run.run_id && e.seq > copied_up_to) {
        let Ok(Value::Object(mut fields)) = serde_json::from_str::<Value>(&event.frame) else { continue };
        fields.remove("seq");
        let kind = fields.get("kind").and_then(Value::as_str).unwrap_or("text").to_string();
        let delta =
            (kind == "stream_delta").then(|| fields.get("content").and_then(Value::as_str).unwrap_or("").to_string());
        let transcript = transcript.get_or_insert_with(|| {
            let provider = fields.get("provider").and_then(Value::as_str).unwrap_or("").to_string();
            Transcript::new(labels(provider))
        });
        let body = EventBody { kind, json: Value::Object(fields).to_string() };
        transcript.record(&body, event.seq, delta, &mut rows);
    }
    if let Some(transcript) = transcript.as_mut() {
        transcript.flush(&mut rows);
    }
    rows
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::store::{DRAFT_PART, EVENT_PART};

    fn run() -> OrphanedRun {
        OrphanedRun {
            session_id: "s".into(),
            run_id: "r".into(),
            first_seq: 1,
            complete_seq: 9,
            prompt: None,
            unsaved_complete: false,
        }
    }

    fn draft(run_id: &str, seq: u64, content: &str) -> (u64, String) {
        let body = json!({ "kind": "text", "role": "assistant", "content": content, "provider": "script",
            "runId": run_id, "sessionId": "s", "id": format!("stream_delta_{seq}"),
            "timestamp": format!("2026-01-01T00:00:0{seq}.000Z") });
        (seq, body.to_string())
    }

    fn event(seq: u64, fields: Value) -> Event {
        let mut fields = fields;
        fields["seq"] = seq.into();
        fields["runId"] = "r".into();
        fields["provider"] = "script".into();
        Event { seq, run_id: "r".into(), terminal: fields["kind"] == "complete", frame: fields.to_string().into() }
    }

    fn rows_seen(rows: &[HistoryRow]) -> Vec<(u64, u8, String, Option<u64>)> {
        rows.iter()
            .map(|r| {
                let body: Value = serde_json::from_str(&r.body).unwrap();
                let shown = body["content"].as_str().map_or(r.kind.clone(), str::to_string);
                (r.seq, r.part, shown, r.supersedes_drafts_from)
            })
            .collect()
    }

    #[test]
    fn a_cut_stream_resumes_from_its_drafts() {
        // The replay stream lost deltas 2..=5 (trimmed or a Redis restart); the drafts hold them.
        let drafts = [draft("r", 3, "ab"), draft("other", 4, "zz"), draft("r", 5, "cd")];
        let open = open_stream(&run(), &drafts).unwrap();
        let origin = Origin::of(&drafts[0].1);
        assert_eq!(open, Drafts { provider: "script".into(), text: "abcd".into(), first: 3, last: 5, origin });
        let events = [
            event(5, json!({ "kind": "stream_delta", "content": "d" })),
            event(6, json!({ "kind": "stream_delta", "content": "e" })),
            event(7, json!({ "kind": "complete", "exitCode": 1 })),
        ];
        let rows = history_rows(&run(), Some(open), &events);
        assert_eq!(
            rows_seen(&rows),
            [(6, EVENT_PART, "abcde".into(), Some(3)), (7, EVENT_PART, "complete".into(), None)],
            "the drafts' text goes on with the deltas after the last draft only"
        );
        assert!(rows.iter().all(|r| r.part != DRAFT_PART));
        // The merged text keeps the stream's id and time (its first chunk's, which the drafts carry).
        let merged: Value = serde_json::from_str(&rows[0].body).unwrap();
        assert_eq!(
            (merged["id"].as_str(), merged["timestamp"].as_str()),
            (Some("stream_delta_3"), Some("2026-01-01T00:00:03.000Z"))
        );
    }

    #[test]
    fn without_drafts_the_replay_stream_is_copied() {
        assert_eq!(open_stream(&run(), &[draft("other", 4, "zz")]), None);
        let events = [
            event(2, json!({ "kind": "stream_delta", "content": "a" })),
            event(3, json!({ "kind": "stream_end" })),
            event(4, json!({ "kind": "complete", "exitCode": 1 })),
        ];
        let rows = history_rows(&run(), None, &events);
        assert_eq!(rows_seen(&rows), [(3, EVENT_PART, "a".into(), Some(2)), (4, EVENT_PART, "complete".into(), None)]);
    }

    #[test]
    fn the_prompt_kept_with_the_run_goes_before_its_first_event() {
        // A run whose owner died before storing its prompt had none in history.
        let events = [event(1, json!({ "kind": "complete", "exitCode": 1 }))];
        let row = prompt_row(&run(), "fix the build", &events);
        assert_eq!(
            rows_seen(std::slice::from_ref(&row)),
            [(1, crate::store::PROMPT_PART, "fix the build".into(), None)]
        );
        let body: Value = serde_json::from_str(&row.body).unwrap();
        assert_eq!(
            (body["role"].as_str(), body["runId"].as_str(), body["provider"].as_str()),
            (Some("user"), Some("r"), Some("script"))
        );
    }
}
