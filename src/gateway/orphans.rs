//! Copies into SQL the events of runs this node ended for a lost owner.
//!
//! The owner writes history while its run streams; when it dies, what it had
//! not written yet (and the terminal `complete` the reaper appended) exists
//! only in the session's replay stream. The node that reaped the run reads the
//! run's events back and writes them through the same [`Transcript`] rules, so
//! rows the owner did write collapse with these (same seq and part).

use serde_json::Value;
use tokio::sync::mpsc;

use super::{
    HistoryWriter,
    transcript::{Labels, Transcript},
};
use crate::{
    protocol::EventBody,
    runs::{Event, OrphanedRun, SharedRegistry},
    store::HistoryRow,
};

/// Runs the copier until the registry drops its notices.
pub(super) fn spawn(registry: SharedRegistry, history: HistoryWriter, mut notices: mpsc::Receiver<OrphanedRun>) {
    tokio::spawn(async move {
        while let Some(run) = notices.recv().await {
            let after = run.first_seq.saturating_sub(1);
            match registry.read_range(&run.session_id, after, run.complete_seq).await {
                Ok(range) => {
                    let rows = history_rows(&run, &range.events);
                    tracing::info!(
                        session_id = run.session_id,
                        run_id = run.run_id,
                        rows = rows.len(),
                        complete = range.complete,
                        "copying an orphaned run's events to history"
                    );
                    history.write(rows).await;
                }
                Err(e) => {
                    tracing::warn!(session_id = run.session_id, error = %e, "cannot read an orphaned run's events")
                }
            }
        }
    });
}

/// History rows of the orphaned run's events (other runs' events are skipped).
fn history_rows(run: &OrphanedRun, events: &[Event]) -> Vec<HistoryRow> {
    let mut rows = Vec::new();
    let mut transcript: Option<Transcript> = None;
    for event in events.iter().filter(|e| *e.run_id == *run.run_id) {
        let Ok(Value::Object(mut fields)) = serde_json::from_str::<Value>(&event.frame) else { continue };
        fields.remove("seq");
        let kind = fields.get("kind").and_then(Value::as_str).unwrap_or("text").to_string();
        let delta =
            (kind == "stream_delta").then(|| fields.get("content").and_then(Value::as_str).unwrap_or("").to_string());
        let transcript = transcript.get_or_insert_with(|| {
            let provider = fields.get("provider").and_then(Value::as_str).unwrap_or("").to_string();
            let labels = Labels { session_id: run.session_id.clone(), provider, run_id: run.run_id.clone() };
            Transcript::new(labels, None)
        });
        let body = EventBody { kind, json: Value::Object(fields).to_string() };
        transcript.record(&body, event.seq, delta, &mut rows);
    }
    if let Some(transcript) = transcript.as_mut() {
        transcript.flush(&mut rows);
    }
    rows
}
