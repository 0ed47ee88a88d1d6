//! What a run's events become in SQL history (docs/protocol.md §History).
//!
//! [`Labels`] put a run's envelope on an event (id, timestamp, sessionId,
//! provider, runId). A [`Transcript`] turns the run's sequenced events into
//! history rows (the user's prompt is stored apart, when the run starts, by
//! [`Labels::prompt_row`]): consecutive `stream_delta`s folded into one assistant `text` at their `stream_end` (or
//! every [`MAX_MERGED_BYTES`]), every other event as it streamed. While a
//! stream is open, its deltas are also stored as drafts at append ends, as a
//! [`DraftPolicy`] says ([`DRAFT_PART`], hidden from history; cluster mode
//! only), which the merged text deletes: the node that ends an orphaned run
//! resumes the stream from its drafts, since the replay stream may no longer
//! hold its start. The owner's run driver and that node share this, so both
//! write the same rows (and duplicates collapse).

use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use crate::{
    protocol::{EventBody, now_iso},
    store::{DRAFT_PART, EVENT_PART, HistoryRow, PROMPT_PART},
};

/// Merged `stream_delta` text held at most (plus one delta). A longer stream is
/// stored as consecutive assistant `text` rows, each at its last delta's seq, so
/// a run whose stream never ends cannot grow its owner's memory without bound;
/// far above any real reply, so a stream is still one message (docs/protocol.md §History).
pub const MAX_MERGED_BYTES: usize = 32 * 1024 * 1024;

/// How often an open stream's deltas are stored as a draft. Each draft is one
/// more SQL row (and tokens often come one per append), so undrafted deltas
/// are held until the oldest is [`DraftPolicy::interval`] old or there are
/// [`DraftPolicy::max_deltas`] of them; the replay stream holds them meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DraftPolicy {
    pub interval: Duration,
    /// Keep well inside the replay window (`--replay-max-events`).
    pub max_deltas: usize,
}

impl DraftPolicy {
    /// Drafts at most every 250 ms, and every quarter of the replay window (at most 256 deltas).
    pub fn for_replay_window(replay_max_events: u64) -> Self {
        let quarter = usize::try_from(replay_max_events / 4).unwrap_or(usize::MAX);
        DraftPolicy { interval: Duration::from_millis(250), max_deltas: quarter.clamp(1, 256) }
    }
}

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

    /// The user's prompt as a history row, placed before the event with `seq`.
    pub fn prompt_row(&self, seq: u64, prompt: &str) -> HistoryRow {
        let body = self.label(object(json!({ "kind": "text", "role": "user", "content": prompt })));
        HistoryRow {
            session_id: self.session_id.clone(),
            seq,
            part: PROMPT_PART,
            kind: body.kind,
            body: body.json,
            supersedes_drafts_from: None,
        }
    }
}

/// Turns a run's sequenced events into history rows.
pub struct Transcript {
    labels: Labels,
    /// The `stream_delta`s since the last `stream_end` (the open stream).
    streamed: Option<OpenStream>,
    /// The open stream's deltas not in a draft yet.
    undrafted: Option<Undrafted>,
    /// When [`Transcript::end_batch`] writes drafts (never: `None`).
    drafts: Option<DraftPolicy>,
    /// [`MAX_MERGED_BYTES`] (smaller in tests).
    merge_limit: usize,
}

/// Deltas of the open stream not in a draft yet.
struct Undrafted {
    text: String,
    /// The last one's seq.
    last: u64,
    deltas: usize,
    /// When the first one was recorded.
    since: Instant,
}

/// A stream not closed yet: its merged text and its first and last delta's seqs.
struct OpenStream {
    text: String,
    first: u64,
    last: u64,
    /// The first delta's `id` and `timestamp`: the merged text (and its drafts)
    /// carry them, so its id is stable (the same on every node that writes it)
    /// and history stays in time order (docs/protocol.md §History).
    origin: Origin,
}

/// The `id` and `timestamp` a stream's merged text takes from its first delta.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Origin {
    pub id: Option<String>,
    pub timestamp: Option<String>,
}

impl Origin {
    /// The `id` and `timestamp` of an event's JSON.
    pub fn of(json: &str) -> Origin {
        match serde_json::from_str::<Value>(json) {
            Ok(value) => Origin {
                id: value["id"].as_str().map(str::to_string),
                timestamp: value["timestamp"].as_str().map(str::to_string),
            },
            Err(_) => Origin::default(),
        }
    }
}

impl Transcript {
    pub fn new(labels: Labels) -> Self {
        Transcript { labels, streamed: None, undrafted: None, drafts: None, merge_limit: MAX_MERGED_BYTES }
    }

    /// Stores the open stream's deltas as drafts by `policy` (see
    /// [`Transcript::end_batch`]); without one (the default) none are written:
    /// a single node's runs end with it, and nothing would resume from them.
    pub fn drafting(mut self, policy: Option<DraftPolicy>) -> Self {
        self.drafts = policy;
        self
    }

    /// A transcript that goes on with a stream its drafts hold: their text
    /// (concatenated in seq order) from the first draft's seq to the last's.
    /// `origin` is the first draft's `id` and `timestamp` (the stream's).
    pub fn resuming(labels: Labels, text: String, first: u64, last: u64, origin: Origin) -> Self {
        let mut transcript = Transcript::new(labels);
        transcript.streamed = Some(OpenStream { text, first, last, origin });
        transcript
    }

    /// Rows for one appended event; `delta` is the text of a `stream_delta`.
    pub fn record(&mut self, body: &EventBody, seq: u64, delta: Option<String>, rows: &mut Vec<HistoryRow>) {
        match (body.kind.as_str(), delta) {
            ("stream_delta", Some(text)) => {
                if self.drafts.is_some() {
                    let undrafted = self.undrafted.get_or_insert_with(|| Undrafted {
                        text: String::new(),
                        last: seq,
                        deltas: 0,
                        since: Instant::now(),
                    });
                    undrafted.text.push_str(&text);
                    undrafted.last = seq;
                    undrafted.deltas += 1;
                }
                let merged = self.streamed.get_or_insert_with(|| OpenStream {
                    text: String::new(),
                    first: seq,
                    last: seq,
                    origin: Origin::of(&body.json),
                });
                merged.text.push_str(&text);
                merged.last = seq;
                if merged.text.len() >= self.merge_limit {
                    rows.extend(self.streamed_row(None));
                }
            }
            ("stream_end", _) => rows.extend(self.streamed_row(Some(seq))),
            _ => {
                rows.extend(self.streamed_row(None));
                rows.push(self.row(seq, EVENT_PART, body.clone()));
            }
        }
    }

    /// Ends one append batch at `now`: the deltas the open stream holds
    /// undrafted become a draft at the last one's seq when the policy says
    /// so, so a stream cut with its owner is in SQL up to there even when the
    /// replay stream no longer holds it.
    pub fn end_batch(&mut self, now: Instant, rows: &mut Vec<HistoryRow>) {
        let (Some(policy), Some(undrafted)) = (self.drafts, self.undrafted.as_ref()) else { return };
        if undrafted.deltas < policy.max_deltas && now.saturating_duration_since(undrafted.since) < policy.interval {
            return;
        }
        if let Some(Undrafted { text, last, .. }) = self.undrafted.take() {
            let origin = self.streamed.as_ref().map(|s| s.origin.clone()).unwrap_or_default();
            rows.push(self.row(last, DRAFT_PART, self.assistant_text(text, &origin)));
        }
    }

    /// Rows for deltas not yet closed by a `stream_end` (the run was cut).
    pub fn flush(&mut self, rows: &mut Vec<HistoryRow>) {
        rows.extend(self.streamed_row(None));
    }

    /// The merged text of pending deltas, stored at `seq` (default: the last
    /// delta's); it supersedes the stream's drafts.
    fn streamed_row(&mut self, seq: Option<u64>) -> Option<HistoryRow> {
        let OpenStream { text, first, last, origin } = self.streamed.take()?;
        self.undrafted = None;
        let mut row = self.row(seq.unwrap_or(last), EVENT_PART, self.assistant_text(text, &origin));
        row.supersedes_drafts_from = Some(first);
        Some(row)
    }

    /// The stream's merged text, with its first delta's id and timestamp (fresh ones when unknown).
    fn assistant_text(&self, text: String, origin: &Origin) -> EventBody {
        let mut fields = object(json!({ "kind": "text", "role": "assistant", "content": text }));
        if let Some(id) = &origin.id {
            fields.insert("id".into(), Value::String(id.clone()));
        }
        if let Some(timestamp) = &origin.timestamp {
            fields.insert("timestamp".into(), Value::String(timestamp.clone()));
        }
        self.labels.label(fields)
    }

    fn row(&self, seq: u64, part: u8, body: EventBody) -> HistoryRow {
        HistoryRow {
            session_id: self.labels.session_id.clone(),
            seq,
            part,
            kind: body.kind,
            body: body.json,
            supersedes_drafts_from: None,
        }
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
        let mut transcript = Transcript::new(labels.clone());
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
            let held = transcript.streamed.as_ref().map_or(0, |s| s.text.len());
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
        let mut transcript = Transcript::new(labels.clone());
        let mut rows = Vec::new();
        for (seq, word) in [(1, "hello"), (2, " world")] {
            let body = labels.label(object(json!({ "kind": "stream_delta", "content": word })));
            transcript.record(&body, seq, Some(word.to_string()), &mut rows);
        }
        transcript.record(&labels.label(object(json!({ "kind": "stream_end" }))), 3, None, &mut rows);
        let got: Vec<(u64, String)> = rows.iter().map(|r| (r.seq, content(r))).collect();
        assert_eq!(got, [(3, "hello world".to_string())]);
    }

    const EVERY_BATCH: DraftPolicy = DraftPolicy { interval: Duration::ZERO, max_deltas: 1 };

    #[test]
    fn drafts_wait_for_the_policy_s_interval_or_delta_count() {
        let labels = labels();
        let policy = DraftPolicy { interval: Duration::from_millis(250), max_deltas: 3 };
        let mut transcript = Transcript::new(labels.clone()).drafting(Some(policy));
        let mut rows = Vec::new();
        for (seq, word) in [(1, "a"), (2, "b"), (3, "c"), (4, "d")] {
            transcript.record(&delta(&labels, word), seq, Some(word.to_string()), &mut rows);
            transcript.end_batch(Instant::now(), &mut rows);
        }
        assert_eq!(
            rows.iter().map(|r| (r.seq, r.part, content(r))).collect::<Vec<_>>(),
            [(3, DRAFT_PART, "abc".into())]
        );
        rows.clear();
        transcript.end_batch(Instant::now() + Duration::from_millis(300), &mut rows);
        assert_eq!(rows.iter().map(|r| (r.seq, r.part, content(r))).collect::<Vec<_>>(), [(4, DRAFT_PART, "d".into())]);
        assert_eq!(DraftPolicy::for_replay_window(20).max_deltas, 5);
        assert_eq!(DraftPolicy::for_replay_window(2).max_deltas, 1);
        assert_eq!(DraftPolicy::for_replay_window(10_000).max_deltas, 256);
    }

    fn delta(labels: &Labels, word: &str) -> EventBody {
        labels.label(object(json!({ "kind": "stream_delta", "content": word })))
    }

    #[test]
    fn a_merged_text_and_its_drafts_carry_the_first_chunk_s_id_and_time() {
        let labels = labels();
        let mut transcript = Transcript::new(labels.clone()).drafting(Some(EVERY_BATCH));
        let mut rows = Vec::new();
        let first = delta(&labels, "a");
        let origin = Origin::of(&first.json);
        assert!(origin.id.is_some() && origin.timestamp.is_some());
        transcript.record(&first, 1, Some("a".into()), &mut rows);
        std::thread::sleep(Duration::from_millis(5));
        transcript.record(&delta(&labels, "b"), 2, Some("b".into()), &mut rows);
        transcript.end_batch(Instant::now(), &mut rows);
        transcript.record(&labels.label(object(json!({ "kind": "stream_end" }))), 3, None, &mut rows);
        assert_eq!(rows.len(), 2, "a draft, then the merged text");
        for row in &rows {
            let body: Value = serde_json::from_str(&row.body).unwrap();
            assert_eq!(
                (body["id"].as_str(), body["timestamp"].as_str()),
                (origin.id.as_deref(), origin.timestamp.as_deref())
            );
        }
    }

    #[test]
    fn open_streams_leave_a_draft_per_batch_that_their_merged_text_supersedes() {
        // Deltas were stored only at their stream_end: a stream cut with its owner was in SQL
        // only as far as the replay stream still held it.
        let labels = labels();
        let mut transcript = Transcript::new(labels.clone()).drafting(Some(EVERY_BATCH));
        let mut rows = Vec::new();
        for (seq, word) in [(1, "a"), (2, "b")] {
            transcript.record(&delta(&labels, word), seq, Some(word.to_string()), &mut rows);
        }
        transcript.end_batch(Instant::now(), &mut rows);
        let got: Vec<(u64, u8, String)> = rows.iter().map(|r| (r.seq, r.part, content(r))).collect();
        assert_eq!(got, [(2, DRAFT_PART, "ab".into())]);
        assert!(rows.iter().all(|r| r.supersedes_drafts_from.is_none()));
        assert_eq!(serde_json::from_str::<Value>(&rows[0].body).unwrap()["runId"], "r");

        // A batch that closes its stream and opens the next: the merged text supersedes the
        // first stream's drafts; the second stream's deltas of this batch are a draft.
        rows.clear();
        transcript.record(&delta(&labels, "c"), 3, Some("c".into()), &mut rows);
        transcript.record(&labels.label(object(json!({ "kind": "stream_end" }))), 4, None, &mut rows);
        for (seq, word) in [(5, "d"), (6, "e")] {
            transcript.record(&delta(&labels, word), seq, Some(word.to_string()), &mut rows);
        }
        transcript.end_batch(Instant::now(), &mut rows);
        let got: Vec<(u64, u8, String, Option<u64>)> =
            rows.iter().map(|r| (r.seq, r.part, content(r), r.supersedes_drafts_from)).collect();
        assert_eq!(got, [(4, EVENT_PART, "abc".into(), Some(1)), (6, DRAFT_PART, "de".into(), None)]);

        // A batch without deltas drafts nothing; a cut run's flush supersedes the drafts.
        rows.clear();
        transcript.end_batch(Instant::now(), &mut rows);
        assert!(rows.is_empty());
        transcript.record(&delta(&labels, "f"), 7, Some("f".into()), &mut rows);
        transcript.end_batch(Instant::now(), &mut rows);
        transcript.flush(&mut rows);
        let got: Vec<(u64, u8, String, Option<u64>)> =
            rows.iter().map(|r| (r.seq, r.part, content(r), r.supersedes_drafts_from)).collect();
        assert_eq!(got, [(7, DRAFT_PART, "f".into(), None), (7, EVENT_PART, "def".into(), Some(5))]);
    }

    #[test]
    fn a_transcript_without_a_draft_policy_writes_no_drafts() {
        let labels = labels();
        let mut transcript = Transcript::new(labels.clone());
        let mut rows = Vec::new();
        transcript.record(&delta(&labels, "a"), 1, Some("a".into()), &mut rows);
        transcript.end_batch(Instant::now() + Duration::from_secs(60), &mut rows);
        assert!(rows.is_empty());
        transcript.flush(&mut rows);
        assert_eq!(rows.iter().map(|r| (r.seq, r.part, content(r))).collect::<Vec<_>>(), [(1, EVENT_PART, "a".into())]);
    }

    #[test]
    fn a_split_stream_drafts_only_what_it_holds_open() {
        let labels = labels();
        let mut transcript = Transcript::new(labels.clone()).drafting(Some(EVERY_BATCH));
        transcript.merge_limit = 4;
        let mut rows = Vec::new();
        for (seq, word) in [(1, "ab"), (2, "cd"), (3, "e")] {
            transcript.record(&delta(&labels, word), seq, Some(word.to_string()), &mut rows);
        }
        transcript.end_batch(Instant::now(), &mut rows);
        let got: Vec<(u64, u8, String, Option<u64>)> =
            rows.iter().map(|r| (r.seq, r.part, content(r), r.supersedes_drafts_from)).collect();
        assert_eq!(got, [(2, EVENT_PART, "abcd".into(), Some(1)), (3, DRAFT_PART, "e".into(), None)]);
    }

    #[test]
    fn a_resumed_stream_merges_its_drafts_with_the_deltas_after_them() {
        let labels = labels();
        let mut transcript = Transcript::resuming(labels.clone(), "abc".into(), 2, 4, Origin::default());
        let mut rows = Vec::new();
        transcript.record(&delta(&labels, "d"), 5, Some("d".into()), &mut rows);
        transcript.record(&labels.label(object(json!({ "kind": "stream_end" }))), 6, None, &mut rows);
        let got: Vec<(u64, u8, String, Option<u64>)> =
            rows.iter().map(|r| (r.seq, r.part, content(r), r.supersedes_drafts_from)).collect();
        assert_eq!(got, [(6, EVENT_PART, "abcd".into(), Some(2))]);
    }
}
