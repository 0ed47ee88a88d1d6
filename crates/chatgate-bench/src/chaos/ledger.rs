//! The soak's book: what every client saw of every session (one entry per seq,
//! shared by all clients, so that two clients that got different events under
//! one seq are caught), the gaps clients were not told about (resolved against
//! history once the session is done), the runs the drivers sent, and the
//! tallies: a failure count per invariant with a few examples, and totals.

use std::{
    collections::{BTreeMap, HashMap},
    hash::{DefaultHasher, Hash, Hasher},
    time::SystemTime,
};

use serde_json::{Value, json};

/// The invariants, each reported with its failure count (0 included).
pub const INVARIANTS: &[&str] = &[
    SEQ_ORDER,
    SEQ_GAP_UNTOLD,
    SEQ_REUSED,
    DUPLICATE_DELIVERED,
    COMPLETE_NOT_ONCE,
    EVENT_AFTER_COMPLETE,
    STUCK_PROCESSING,
    HISTORY_MISMATCH,
    SCRIPT_ORDER,
    REDIS_MEMORY,
    AVAILABILITY,
    RUNS_SENT_AGAIN_AND_STARTED_TWICE,
    IDEMPOTENCY_ANSWERS,
];

/// A client got a seq lower than one it already had (and not a repeat of it).
pub const SEQ_ORDER: &str = "seq_order";
/// A client missed events of the run it was following without `replayTruncated`.
pub const SEQ_GAP_UNTOLD: &str = "seq_gap_untold";
/// One seq carried two different events, or two runs' seqs interleave.
pub const SEQ_REUSED: &str = "seq_reused";
/// A client got the same seq twice.
pub const DUPLICATE_DELIVERED: &str = "duplicate_delivered";
/// A run without exactly one `complete` (as seen by a client, or in history).
pub const COMPLETE_NOT_ONCE: &str = "complete_not_once";
/// An event of a run after that run's `complete`.
pub const EVENT_AFTER_COMPLETE: &str = "event_after_complete";
/// A run still processing more than lease + 5 s after its owner died (grace + 5 s after a drain began).
pub const STUCK_PROCESSING: &str = "stuck_processing";
/// History in SQL differs from what streamed.
pub const HISTORY_MISMATCH: &str = "history_mismatch";
/// A run's events out of its script's order, or a successful run that lost events.
pub const SCRIPT_ORDER: &str = "script_order";
/// Redis not back near its baseline after retention.
pub const REDIS_MEMORY: &str = "redis_memory";
/// A client could not reach any node for a minute, or a node did not come back.
pub const AVAILABILITY: &str = "availability";
/// One prompt (its nonce, sent again with the same `clientRequestId` whenever its driver could
/// not tell whether a send arrived) shows up in history as more than one run.
pub const RUNS_SENT_AGAIN_AND_STARTED_TWICE: &str = "runs_sent_again_and_started_twice";
/// The answers to one prompt's keys disagree: two `chat_accepted` with `duplicate: false`, a
/// `duplicate: true` naming another run than the one the key started, or a `chat_accepted`
/// without the contract's fields.
pub const IDEMPOTENCY_ANSWERS: &str = "idempotency_answers";

/// Gateway bugs the soak found that stay open for now (docs/reliability.md): each
/// occurrence is counted and shown; with `--tolerate-known-bug ID` it is not a failure.
pub const KNOWN_BUGS: &[(&str, &str)] = &[
    (
        CUT_STREAM_HISTORY,
        "a run cut by its owner's death keeps in history only the deltas its replay stream still held",
    ),
    (PROMPT_LOST, "a run whose owner died before its first event has no prompt row in history"),
    (ROWS_LOST_ON_KILL, "events of a run that ended just before its owner was killed never reach history"),
    (
        RUN_SUPERSEDED_AFTER_REDIS_LOSS,
        "after Redis restarts empty, a chat.send starts a second run before the live owner re-takes its lock; \
         the first run is fenced and never gets a complete",
    ),
];
pub const CUT_STREAM_HISTORY: &str = "cut-stream-history";
pub const PROMPT_LOST: &str = "prompt-lost";
pub const ROWS_LOST_ON_KILL: &str = "rows-lost-on-kill";
pub const RUN_SUPERSEDED_AFTER_REDIS_LOSS: &str = "run-superseded-after-redis-loss";

/// Examples kept per invariant.
const EXAMPLES_PER_INVARIANT: usize = 8;

/// An event kind the checks tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Delta,
    StreamEnd,
    Complete,
    PermissionRequest,
    PermissionResolved,
    PermissionCancelled,
    ToolUse,
    ToolResult,
    Error,
    Text,
    Other,
}

impl Kind {
    pub fn parse(kind: &str) -> Kind {
        match kind {
            "stream_delta" => Kind::Delta,
            "stream_end" => Kind::StreamEnd,
            "complete" => Kind::Complete,
            "permission_request" => Kind::PermissionRequest,
            "permission_resolved" => Kind::PermissionResolved,
            "permission_cancelled" => Kind::PermissionCancelled,
            "tool_use" => Kind::ToolUse,
            "tool_result" => Kind::ToolResult,
            "error" => Kind::Error,
            "text" => Kind::Text,
            _ => Kind::Other,
        }
    }

    /// Position in a `script` run: events of a run never go down this order.
    pub fn rank(self) -> u8 {
        match self {
            Kind::PermissionRequest => 0,
            Kind::PermissionResolved | Kind::PermissionCancelled => 1,
            Kind::ToolUse => 2,
            Kind::ToolResult => 3,
            Kind::Delta => 4,
            Kind::StreamEnd | Kind::Text => 5,
            Kind::Error | Kind::Other => 6,
            Kind::Complete => 7,
        }
    }
}

/// A digest of an event without its seq (key order does not matter).
pub fn digest(event: &Value) -> u64 {
    let mut without_seq = event.clone();
    if let Some(map) = without_seq.as_object_mut() {
        map.remove("seq");
    }
    let mut hasher = DefaultHasher::new();
    without_seq.to_string().hash(&mut hasher);
    hasher.finish()
}

/// The chunk number of a `script` delta's content (`chunk 7....`).
pub fn chunk_number(content: &str) -> Option<u32> {
    content.strip_prefix("chunk ")?.trim_end_matches('.').parse().ok()
}

/// The chunk numbers of a merged assistant text (`chunk 1...chunk 2...`), if it is one.
pub fn merged_chunks(content: &str) -> Option<Vec<u32>> {
    let mut chunks = Vec::new();
    let mut rest = content;
    while !rest.is_empty() {
        rest = rest.strip_prefix("chunk ")?;
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        chunks.push(rest[..digits].parse().ok()?);
        rest = rest[digits..].trim_start_matches('.');
    }
    (!chunks.is_empty()).then_some(chunks)
}

/// One seq as some client saw it.
#[derive(Debug, Clone, Copy)]
pub struct Observed {
    pub run: u32,
    pub kind: Kind,
    pub digest: u64,
    /// The chunk number of a delta (0 otherwise).
    pub chunk: u32,
}

/// A jump a client was not told about, resolved when the session is verified.
#[derive(Debug, Clone)]
pub struct Gap {
    pub client: String,
    pub after: u64,
    pub seq: u64,
    pub run: u32,
    /// The run of the client's event before the jump (None after an idle ack moved its cursor).
    pub previous_run: Option<u32>,
    /// The client's last steps.
    pub trace: String,
}

/// A client-side failure judged when the session is verified (a seq seen twice may
/// come from a known bug that is only recognisable once the session's runs are known).
#[derive(Debug, Clone)]
pub struct Suspect {
    pub invariant: &'static str,
    /// The runs involved.
    pub runs: Vec<u32>,
    pub text: String,
}

/// A run a driver sent.
#[derive(Debug, Clone)]
pub struct SentRun {
    pub nonce: String,
    pub plan: &'static str,
    pub events: u64,
    pub sent_at: SystemTime,
    /// The node of the socket that sent it (the run lives there).
    pub node: Option<String>,
}

/// Everything recorded about one session.
#[derive(Debug)]
pub struct SessionLog {
    pub id: String,
    pub user: usize,
    pub known: BTreeMap<u64, Observed>,
    pub run_ids: Vec<String>,
    run_index: HashMap<String, u32>,
    pub gaps: Vec<Gap>,
    pub sent: Vec<SentRun>,
    /// Acks that showed the session processing: when, and which run.
    pub processing_acks: Vec<(SystemTime, u32)>,
    /// When each run's `complete` was made, as a client saw it.
    pub completed_at: HashMap<u32, SystemTime>,
    /// Client-side failures to judge with the session.
    pub suspects: Vec<Suspect>,
    /// Runs that ended while their driver was away: nonce, and the driver's seq before the send.
    pub ended_away: Vec<(String, u64, String)>,
}

impl SessionLog {
    pub fn run(&mut self, run_id: &str) -> u32 {
        if let Some(index) = self.run_index.get(run_id) {
            return *index;
        }
        let index = self.run_ids.len() as u32;
        self.run_ids.push(run_id.to_string());
        self.run_index.insert(run_id.to_string(), index);
        index
    }
}

/// The failure counts, examples and totals.
#[derive(Debug, Default)]
pub struct Tally {
    pub failures: BTreeMap<&'static str, u64>,
    pub examples: BTreeMap<&'static str, Vec<String>>,
    /// Examples of tolerated known bugs.
    pub known_examples: BTreeMap<&'static str, Vec<String>>,
    /// Runs each known bug was found in.
    known_runs: std::collections::HashSet<(&'static str, String)>,
    pub totals: BTreeMap<String, u64>,
}

impl Tally {
    pub fn fail(&mut self, invariant: &'static str, example: String) {
        *self.failures.entry(invariant).or_default() += 1;
        let examples = self.examples.entry(invariant).or_default();
        if examples.len() < EXAMPLES_PER_INVARIANT {
            examples.push(example);
        }
    }

    /// A finding of a known bug in run `run` (counted once per run, every finding shown in the
    /// findings total), a failure of `invariant` unless tolerated.
    pub fn known(&mut self, bug: &'static str, run: &str, invariant: &'static str, example: String, tolerated: bool) {
        let key = KNOWN_BUGS.iter().find(|(id, _)| *id == bug).map_or(bug, |(id, _)| *id);
        self.add(&format!("known_bug_{key}_findings"), 1);
        if self.known_runs.insert((key, run.to_string())) {
            self.add(&format!("known_bug_{key}_runs"), 1);
        }
        if tolerated {
            let examples = self.known_examples.entry(key).or_default();
            if examples.len() < EXAMPLES_PER_INVARIANT {
                examples.push(example);
            }
        } else {
            self.fail(invariant, format!("[known bug {key}] {example}"));
        }
    }

    pub fn add(&mut self, total: &str, n: u64) {
        *self.totals.entry(total.to_string()).or_default() += n;
    }

    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    pub fn to_json(&self) -> Value {
        let failures: serde_json::Map<String, Value> = INVARIANTS
            .iter()
            .map(|name| (name.to_string(), json!(self.failures.get(name).copied().unwrap_or(0))))
            .collect();
        json!({ "failures": failures, "examples": self.examples, "known_bug_examples": self.known_examples,
                "totals": self.totals })
    }
}

/// The shared book: sessions under watch, and the tally.
#[derive(Debug, Default)]
pub struct Book {
    pub sessions: HashMap<String, SessionLog>,
    pub tally: Tally,
}

impl Book {
    pub fn open_session(&mut self, id: &str, user: usize) {
        self.sessions.insert(
            id.to_string(),
            SessionLog {
                id: id.to_string(),
                user,
                known: BTreeMap::new(),
                run_ids: Vec::new(),
                run_index: HashMap::new(),
                gaps: Vec::new(),
                sent: Vec::new(),
                processing_acks: Vec::new(),
                completed_at: HashMap::new(),
                suspects: Vec::new(),
                ended_away: Vec::new(),
            },
        );
    }

    /// Records one delivered event; returns its run's index (None once the session is verified).
    pub fn observe(&mut self, session: &str, seq: u64, run_id: &str, seen: Observed, client: &str) -> Option<u32> {
        let log = self.sessions.get_mut(session)?;
        let run = log.run(run_id);
        let seen = Observed { run, ..seen };
        match log.known.get(&seq) {
            Some(known) if known.digest != seen.digest || known.run != run => {
                let first = log.run_ids[known.run as usize].clone();
                let text = format!(
                    "session {session} seq {seq}: {client} got {:?} of run {run_id}, another client {:?} of run {first}",
                    seen.kind, known.kind
                );
                log.suspects.push(Suspect { invariant: SEQ_REUSED, runs: vec![known.run, run], text });
            }
            Some(_) => {}
            None => {
                log.known.insert(seq, seen);
            }
        }
        Some(run)
    }
}
