//! What a run's events become in SQL history (interface §5).
//!
//! [`Labels`] put a run's envelope on an event (id, timestamp, sessionId,
//! provider, runId). A [`Transcript`] turns the run's sequenced events into
//! history rows: the user's prompt before the first event, consecutive
//! `stream_delta`s folded into one assistant `text` at their `stream_end`, every
//! other event as it streamed. The owner's run driver and the node that ends an
//! orphaned run share it, so both write the same rows (and duplicates collapse).

use serde_json::{Map, Value, json};

use crate::{
    protocol::{EventBody, now_iso},
    store::HistoryRow,
};

/// The envelope of one run's events.
#[derive(Debug, Clone)]
pub struct Labels {
    pub session_id: String,
    pub provider: String,
    pub run_id: String,
}

impl Labels {
    /// Adds the run's labels to event fields (`kind` plus the kind's fields).
    /// A provider-given `id` or `timestamp` is kept; the rest is forced.
    pub fn label(&self, fields: Map<String, Value>) -> EventBody {
        let kind = fields.get("kind").and_then(Value::as_str).unwrap_or("text").to_string();
        let mut event = Map::new();
        event.insert("id".into(), Value::String(format!("{kind}_{}", uuid::Uuid::new_v4())));
        event.insert("timestamp".into(), Value::String(now_iso()));
        for (key, value) in fields {
            if !matches!(key.as_str(), "sessionId" | "provider" | "runId" | "seq") {
                event.insert(key, value);
            }
        }
        event.insert("kind".into(), Value::String(kind.clone()));
        event.insert("sessionId".into(), Value::String(self.session_id.clone()));
        event.insert("provider".into(), Value::String(self.provider.clone()));
        event.insert("runId".into(), Value::String(self.run_id.clone()));
        EventBody { kind, json: Value::Object(event).to_string() }
    }
}

/// Turns a run's sequenced events into history rows.
pub struct Transcript {
    labels: Labels,
    prompt: Option<String>,
    /// Text of the `stream_delta`s since the last `stream_end`, and the last one's seq.
    streamed: Option<(String, u64)>,
}

impl Transcript {
    pub fn new(labels: Labels, prompt: Option<String>) -> Self {
        Transcript { labels, prompt, streamed: None }
    }

    /// Rows for one appended event; `delta` is the text of a `stream_delta`.
    pub fn record(&mut self, body: &EventBody, seq: u64, delta: Option<String>, rows: &mut Vec<HistoryRow>) {
        if let Some(prompt) = self.prompt.take() {
            let labelled = self.labels.label(object(json!({ "kind": "text", "role": "user", "content": prompt })));
            rows.push(self.row(seq, 0, labelled));
        }
        match (body.kind.as_str(), delta) {
            ("stream_delta", Some(text)) => {
                let merged = self.streamed.get_or_insert_with(|| (String::new(), seq));
                merged.0.push_str(&text);
                merged.1 = seq;
            }
            ("stream_end", _) => rows.extend(self.streamed_row(Some(seq))),
            _ => {
                rows.extend(self.streamed_row(None));
                rows.push(self.row(seq, 1, body.clone()));
            }
        }
    }

    /// Rows for deltas not yet closed by a `stream_end` (the run was cut).
    pub fn flush(&mut self, rows: &mut Vec<HistoryRow>) {
        rows.extend(self.streamed_row(None));
    }

    /// The merged text of pending deltas, stored at `seq` (default: the last delta's).
    fn streamed_row(&mut self, seq: Option<u64>) -> Option<HistoryRow> {
        let (text, last) = self.streamed.take()?;
        let body = self.labels.label(object(json!({ "kind": "text", "role": "assistant", "content": text })));
        Some(self.row(seq.unwrap_or(last), 1, body))
    }

    fn row(&self, seq: u64, part: u8, body: EventBody) -> HistoryRow {
        HistoryRow { session_id: self.labels.session_id.clone(), seq, part, kind: body.kind, body: body.json }
    }
}

/// A JSON object's map (empty for anything else).
pub fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}
