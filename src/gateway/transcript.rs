//! What a run's events become in SQL history (interface §5).
//!
//! [`Labels`] put a run's envelope on an event (id, timestamp, sessionId,
//! provider, runId). A [`Transcript`] turns the run's sequenced events into
//! history rows: the user's prompt before the first event, consecutive
//! `stream_delta`s folded into one assistant `text` at their `stream_end` (or
//! every [`MAX_MERGED_BYTES`]), every other event as it streamed. The owner's run driver and the node that ends an
//! orphaned run share it, so both write the same rows (and duplicates collapse).

use serde_json::{Map, Value, json};

use crate::{
    protocol::{EventBody, now_iso},
    store::HistoryRow,
};

/// Merged `stream_delta` text held at most (plus one delta). A longer stream is
/// stored as consecutive assistant `text` rows, each at its last delta's seq, so
/// a run whose stream never ends cannot grow its owner's memory without bound;
/// far above any real reply, so a stream is still one message (interface §5).
pub const MAX_MERGED_BYTES: usize = 32 * 1024 * 1024;

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
    /// [`MAX_MERGED_BYTES`] (smaller in tests).
    merge_limit: usize,
}

impl Transcript {
    pub fn new(labels: Labels, prompt: Option<String>) -> Self {
        Transcript { labels, prompt, streamed: None, merge_limit: MAX_MERGED_BYTES }
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
                if merged.0.len() >= self.merge_limit {
                    rows.extend(self.streamed_row(None));
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Labels {
        Labels { session_id: "s".into(), provider: "script".into(), run_id: "r".into() }
    }

    fn content(row: &HistoryRow) -> String {
        let value: Value = serde_json::from_str(&row.body).unwrap();
        value["content"].as_str().unwrap().to_string()
    }

    #[test]
    fn long_streams_are_stored_in_bounded_pieces() {
        // A run streaming without stream_end held every delta in memory until it ended.
        let labels = labels();
        let limit = 1024 * 1024;
        let mut transcript = Transcript::new(labels.clone(), None);
        assert_eq!(transcript.merge_limit, MAX_MERGED_BYTES);
        transcript.merge_limit = limit;
        let chunk = "x".repeat(100 * 1024);
        let mut rows = Vec::new();
        let mut streamed = String::new();
        for seq in 1..=25u64 {
            let delta = format!("{seq}:{chunk}");
            streamed.push_str(&delta);
            let body = labels.label(object(json!({ "kind": "stream_delta", "content": delta })));
            transcript.record(&body, seq, Some(delta), &mut rows);
            let held = transcript.streamed.as_ref().map_or(0, |(text, _)| text.len());
            assert!(held < limit, "{held} bytes held after {seq} deltas");
        }
        let end = labels.label(object(json!({ "kind": "stream_end" })));
        transcript.record(&end, 26, None, &mut rows);
        let seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [11, 22, 26], "a row each time the merged text passes the limit, the rest at stream_end");
        assert!(rows.iter().all(|r| r.kind == "text"));
        assert_eq!(rows.iter().map(content).collect::<String>(), streamed);
    }

    #[test]
    fn short_streams_stay_one_text_at_their_end() {
        let labels = labels();
        let mut transcript = Transcript::new(labels.clone(), Some("hi".into()));
        let mut rows = Vec::new();
        for (seq, word) in [(1, "hello"), (2, " world")] {
            let body = labels.label(object(json!({ "kind": "stream_delta", "content": word })));
            transcript.record(&body, seq, Some(word.to_string()), &mut rows);
        }
        transcript.record(&labels.label(object(json!({ "kind": "stream_end" }))), 3, None, &mut rows);
        let got: Vec<(u64, String)> = rows.iter().map(|r| (r.seq, content(r))).collect();
        assert_eq!(got, [(1, "hi".to_string()), (3, "hello world".to_string())]);
    }
}
