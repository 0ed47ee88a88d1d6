//! Fuzz target: sequences of inbound frames through the real verb dispatcher.
//!
//! Each input runs against a fresh gateway: the in-process run registry (a
//! short replay window, so trimming happens), the `script` runtime, and two
//! sockets (`Gateway::dispatch` on a `Connection` whose `Outbox` this harness
//! reads instead of a socket writer). One tokio runtime and one in-memory
//! SQLite store serve every input; the store's sessions are created afresh.
//!
//! The input is text, one line per step (at most [`MAX_STEPS`], started within
//! [`INPUT_BUDGET`]):
//! - a frame for Alice's socket, sent as is (`$REQ` in it becomes the latest
//!   permission request id either socket saw);
//! - `@b <frame>`: a frame for Bob's socket;
//! - `@settle`: let runs go on until none is running (at most [`SETTLE_FOR`],
//!   four times per input);
//! - `@stall` / `@read`: Alice's reader stops / resumes reading (her outbox fills).
//!
//! Alice owns `s1`, `s2` (script), `s3` (script, archived) and `c1` (a provider
//! that is not enabled); Bob owns `b1`. At the end the gateway drains.
//!
//! Checked, besides "no panic" (libFuzzer aborts on any panic, in any task):
//! - each frame gets only the replies the protocol allows: a refused frame
//!   exactly one `protocol_error` with the parser's code; `chat.send` and
//!   `chat.abort` at most one, about their session (`SESSION_NOT_FOUND` /
//!   `NO_ACTIVE_RUN` for a session that is not the user's, `UNSUPPORTED_PROVIDER`
//!   for `c1`); `chat.subscribe` one ack or error per target, in order;
//!   `chat.unsubscribe` and `chat.permission-response` none. Frames that no
//!   verb caused are events or gap acks (`replayTruncated`) of subscribed sessions;
//! - another user's session gets an idle ack (`lastSeq` 0) and never an event;
//! - events only for subscribed sessions, seq contiguous within a subscription,
//!   one frame per (session, seq) ever, one `complete` per run and nothing after it;
//! - an approval is resolved only by an answer of the run's own user;
//! - the outbox never holds more than `send_queue_bytes`; the drain leaves no run.
#![no_main]

use std::{
    cell::RefCell,
    collections::{HashMap, HashSet},
    path::PathBuf,
    rc::Rc,
    sync::{Arc, LazyLock},
    time::{Duration, Instant},
};

use chatgate::{
    gateway::{CloseReason, Connection, Gateway, GatewaySettings, Outbox, WorkspaceLayout, Workspaces},
    protocol::{ErrorCode, Inbound, ProtocolError, parse_inbound},
    runs::{SharedRegistry, memory::MemoryRegistry},
    runtime::{Runtimes, sandbox::Containment, script::ScriptRuntime},
    store::{NewSession, Store},
};
use futures_util::FutureExt;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// Steps per input, at most.
const MAX_STEPS: usize = 48;
/// `@settle` waits at most this long.
const SETTLE_FOR: Duration = Duration::from_millis(50);
/// Each socket's outbox limit (`--send-queue-bytes`): small, so slow consumers happen.
const SEND_QUEUE_BYTES: usize = 64 * 1024;
/// Replay window per session: short, so feeds and subscribes see trimming.
const REPLAY_MAX_EVENTS: u64 = 24;
/// Scheduler turns given to background tasks after each frame.
const YIELDS_PER_STEP: usize = 16;
/// Steps start only within this time of the input's start: one scheduler turn of
/// a run may take long under the fuzzer's instrumentation (a batch of 256 events
/// of 64 KiB), so inputs are cut here rather than hit libFuzzer's timeout.
const INPUT_BUDGET: Duration = Duration::from_secs(5);

static RUNTIME: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime"));

/// Project directory of every session (with a `sub` directory for `options.cwd`),
/// shared by every fuzzing process.
static PROJECT: LazyLock<PathBuf> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join("chatgate-fuzz-project");
    std::fs::create_dir_all(dir.join("sub")).expect("project dir");
    std::fs::canonicalize(&dir).expect("project dir")
});

const ALICE: &str = "alice";
const BOB: &str = "bob";

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    RUNTIME.block_on(run_input(&text));
});

/// The sessions database, shared by every input (set up again by [`reset_sessions`]).
static STORE: tokio::sync::OnceCell<Store> = tokio::sync::OnceCell::const_new();

/// Sessions of the harness: (id, owner, provider, archived).
const SESSIONS: [(&str, &str, &str, bool); 5] = [
    ("s1", ALICE, "script", false),
    ("s2", ALICE, "script", false),
    ("s3", ALICE, "script", true),
    ("c1", ALICE, "claude", false),
    ("b1", BOB, "script", false),
];

/// Deletes the sessions (and their history) and creates them afresh.
async fn reset_sessions(store: &Store) {
    for (id, user, provider, archived) in SESSIONS {
        store.delete_session(user, id).await.expect("delete session");
        let new = NewSession {
            session_id: id.into(),
            user_id: user.into(),
            provider: provider.into(),
            project_path: PROJECT.to_string_lossy().into_owned(),
            summary: String::new(),
        };
        store.create_session(new).await.expect("session");
        if archived {
            store.set_archived(user, id, true).await.expect("archive");
        }
    }
}

async fn run_input(text: &str) {
    let store = STORE
        .get_or_init(|| async {
            let store = Store::connect("sqlite::memory:").await.expect("sqlite");
            store.migrate().await.expect("migrations");
            store
        })
        .await
        .clone();
    reset_sessions(&store).await;
    let registry: SharedRegistry =
        Arc::new(MemoryRegistry::new(REPLAY_MAX_EVENTS, Duration::from_secs(60), Duration::from_secs(60)));
    let mut runtimes: Runtimes = HashMap::new();
    runtimes.insert("script".into(), Arc::new(ScriptRuntime));
    let settings = GatewaySettings {
        node_id: "fuzz".into(),
        // Every session's project is PROJECT, one directory all users share.
        workspaces: Workspaces {
            layout: WorkspaceLayout::Shared,
            root: PROJECT.clone(),
            homes_root: std::env::temp_dir().join("chatgate-fuzz-homes"),
        },
        containment: Arc::new(Containment::unconfined()),
        max_runs: 32,
        run_lease: Duration::from_secs(30),
        send_queue_bytes: SEND_QUEUE_BYTES,
        allow_bypass_permissions: false,
        // The defaults: a flood of frames reaches the limits' refusals too.
        limits: chatgate::node::limit_settings(&chatgate::config::Config::for_tests()),
        replay_max_events: REPLAY_MAX_EVENTS,
    };
    let gateway = Gateway::new(settings, store.clone(), registry, runtimes);
    let approvals = Rc::new(RefCell::new(Approvals::default()));
    let mut alice = Socket::new(ALICE, &["s1", "s2", "s3", "c1"], &["s1", "s2", "c1"], &approvals);
    let mut bob = Socket::new(BOB, &["b1"], &["b1"], &approvals);
    let mut settles = 0;
    let started = Instant::now();

    for line in text.lines().take(MAX_STEPS) {
        if started.elapsed() > INPUT_BUDGET {
            break;
        }
        match line {
            "@settle" => {
                settles += 1;
                if settles <= 4 {
                    let until = Instant::now() + SETTLE_FOR;
                    while gateway.local_run_count() > 0 && Instant::now() < until {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        alice.read_background();
                        bob.read_background();
                    }
                }
            }
            "@stall" => alice.stalled = true,
            "@read" => alice.resume_reading(),
            _ => {
                let (socket, frame) = match line.strip_prefix("@b ") {
                    Some(frame) => (&mut bob, frame),
                    None => (&mut alice, line),
                };
                socket.step(&gateway, frame).await;
            }
        }
        for _ in 0..YIELDS_PER_STEP {
            if started.elapsed() > INPUT_BUDGET {
                break;
            }
            tokio::task::yield_now().await;
        }
        alice.read_background();
        bob.read_background();
    }

    gateway.drain(Duration::ZERO).await;
    assert_eq!(gateway.local_run_count(), 0, "the drain left runs behind");
    alice.resume_reading();
    bob.read_background();
    drop((alice, bob));
}

/// Who is known to have pushed a frame.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Queued while a verb ran: its replies, or live traffic meanwhile.
    Dispatch,
    /// Queued while no verb ran: live traffic only.
    Background,
    /// Queued while the reader stalled: not attributable.
    Stalled,
}

/// One socket as a client would see it, with what it may receive.
struct Socket {
    user: &'static str,
    /// Sessions of this user (archived included).
    owned: HashSet<&'static str>,
    /// Sessions of this user that accept `chat.send`.
    sendable: HashSet<&'static str>,
    conn: Arc<Connection>,
    outbox: Arc<Outbox>,
    stalled: bool,
    /// Sessions whose live events this socket may get.
    attached: HashSet<String>,
    /// Last event seq per session within the current subscription.
    cursor: HashMap<String, u64>,
    /// Every (session, seq) frame ever seen by this user's sockets.
    frames: HashMap<(String, u64), String>,
    completed_runs: HashSet<String>,
    approvals: Rc<RefCell<Approvals>>,
    replies: Replies,
}

/// Tool approvals as both sockets saw them.
#[derive(Default)]
struct Approvals {
    /// The latest `permission_request` id either socket got (`$REQ`).
    latest: Option<String>,
    /// Users who answered each request id.
    answered_by: HashMap<String, HashSet<&'static str>>,
}

/// Replies seen while one frame was dispatched.
#[derive(Default)]
struct Replies {
    errors: Vec<(String, Option<String>)>,
    /// (session, replayTruncated, session was subscribed before the ack)
    acks: Vec<(String, bool, bool)>,
}

impl Socket {
    fn new(
        user: &'static str,
        owned: &[&'static str],
        sendable: &[&'static str],
        approvals: &Rc<RefCell<Approvals>>,
    ) -> Self {
        let outbox = Arc::new(Outbox::new(SEND_QUEUE_BYTES));
        Socket {
            user,
            owned: owned.iter().copied().collect(),
            sendable: sendable.iter().copied().collect(),
            conn: Arc::new(Connection::new(user.to_string(), outbox.clone(), true)),
            outbox,
            stalled: false,
            attached: HashSet::new(),
            cursor: HashMap::new(),
            frames: HashMap::new(),
            completed_runs: HashSet::new(),
            approvals: approvals.clone(),
            replies: Replies::default(),
        }
    }

    /// The socket was closed (slow consumer): the client reconnects with a fresh one.
    fn reconnect(&mut self) {
        self.outbox = Arc::new(Outbox::new(SEND_QUEUE_BYTES));
        self.conn = Arc::new(Connection::new(self.user.to_string(), self.outbox.clone(), true));
        self.attached.clear();
        self.cursor.clear();
        self.completed_runs.clear();
    }

    async fn step(&mut self, gateway: &Arc<Gateway>, frame: &str) {
        let frame = match &self.approvals.borrow().latest {
            Some(id) => frame.replace("$REQ", id),
            None => frame.to_string(),
        };
        let parsed = parse_inbound(&frame);
        if let Ok(Inbound::PermissionResponse { request_id: Some(id), .. }) = &parsed {
            self.approvals.borrow_mut().answered_by.entry(id.clone()).or_default().insert(self.user);
        }
        let was_attached = self.attached.clone();
        gateway.dispatch(&self.conn, &frame).await;
        if self.stalled {
            self.assume_outcome(&parsed);
            return;
        }
        self.replies = Replies::default();
        let closed = self.read(Phase::Dispatch);
        if closed {
            return;
        }
        let replies = std::mem::take(&mut self.replies);
        self.check_replies(&parsed, &replies, &was_attached);
    }

    fn check_replies(
        &mut self,
        parsed: &Result<Inbound, ProtocolError>,
        replies: &Replies,
        was_attached: &HashSet<String>,
    ) {
        // A gap ack from a forwarder may land among the replies: truncated, for a subscribed session.
        let gap_acks = |acks: &[(String, bool, bool)]| acks.iter().all(|(_, truncated, before)| *truncated && *before);
        let codes: Vec<&str> = replies.errors.iter().map(|(code, _)| code.as_str()).collect();
        match parsed {
            Err(error) => {
                assert_eq!(codes, [error.code.as_str()], "a refused frame gets exactly its error");
                assert_eq!(replies.errors[0].1, error.session_id);
                assert!(gap_acks(&replies.acks), "acks for a refused frame: {:?}", replies.acks);
            }
            Ok(Inbound::Send { session_id, .. }) => {
                assert!(replies.errors.len() <= 1, "chat.send replies: {codes:?}");
                assert!(gap_acks(&replies.acks));
                if let Some((code, about)) = replies.errors.first() {
                    assert_eq!(about.as_deref(), Some(session_id.as_str()));
                    if !self.sendable.contains(session_id.as_str()) {
                        assert_eq!(code, ErrorCode::SessionNotFound.as_str(), "chat.send on {session_id}");
                    } else if session_id == "c1" {
                        assert_eq!(code, ErrorCode::UnsupportedProvider.as_str());
                    }
                } else {
                    assert!(self.sendable.contains(session_id.as_str()) && session_id != "c1", "{session_id} ran");
                    // chat.send subscribes the sender (without an ack).
                    self.attach(session_id);
                }
            }
            Ok(Inbound::Abort { session_id }) => {
                assert!(replies.errors.len() <= 1, "chat.abort replies: {codes:?}");
                assert!(gap_acks(&replies.acks));
                if let Some((_, about)) = replies.errors.first() {
                    assert_eq!(about.as_deref(), Some(session_id.as_str()));
                }
                if !self.owned.contains(session_id.as_str()) {
                    assert_eq!(codes, [ErrorCode::NoActiveRun.as_str()], "chat.abort on {session_id}");
                }
            }
            Ok(Inbound::Subscribe { targets }) => {
                let mut about: Vec<&str> = replies
                    .errors
                    .iter()
                    .filter_map(|(_, s)| s.as_deref())
                    .chain(replies.acks.iter().map(|(s, _, _)| s.as_str()))
                    .collect();
                assert_eq!(about.len(), replies.errors.len() + replies.acks.len(), "errors without a session");
                let extra = about.len().checked_sub(targets.len()).expect("a subscribe target went unanswered");
                let possible_gaps = replies
                    .acks
                    .iter()
                    .filter(|(s, truncated, _)| {
                        *truncated && (was_attached.contains(s) || targets.iter().any(|t| t.session_id == *s))
                    })
                    .count();
                assert!(extra <= possible_gaps, "{extra} replies more than the {} targets", targets.len());
                for target in targets {
                    let at = about.iter().position(|s| *s == target.session_id).expect("target answered");
                    about.remove(at);
                }
            }
            Ok(Inbound::Unsubscribe { session_ids }) => {
                assert!(codes.is_empty(), "chat.unsubscribe replies: {codes:?}");
                assert!(gap_acks(&replies.acks));
                for id in session_ids {
                    self.attached.remove(id);
                    self.cursor.remove(id);
                }
            }
            Ok(Inbound::PermissionResponse { .. }) => {
                assert!(codes.is_empty(), "chat.permission-response replies: {codes:?}");
                assert!(gap_acks(&replies.acks));
            }
        }
    }

    /// While the reader stalls, replies cannot be read: assume the subscriptions
    /// a frame may have made or ended (a superset, so checks stay sound).
    fn assume_outcome(&mut self, parsed: &Result<Inbound, ProtocolError>) {
        match parsed {
            Ok(Inbound::Send { session_id, .. }) if self.sendable.contains(session_id.as_str()) => {
                self.attach(session_id);
            }
            Ok(Inbound::Subscribe { targets }) => {
                for target in targets.iter().filter(|t| self.owned.contains(t.session_id.as_str())) {
                    self.attached.insert(target.session_id.clone());
                }
            }
            Ok(Inbound::Unsubscribe { session_ids }) => {
                for id in session_ids {
                    self.attached.remove(id);
                    self.cursor.remove(id);
                }
            }
            _ => {}
        }
    }

    /// `chat.send` subscribed this socket (a no-op when it already was).
    fn attach(&mut self, session_id: &str) {
        if self.attached.insert(session_id.to_string()) {
            self.cursor.remove(session_id);
        }
    }

    /// The reader goes on: what queued meanwhile cannot be attributed.
    fn resume_reading(&mut self) {
        if self.stalled {
            self.read(Phase::Stalled);
            self.stalled = false;
        }
    }

    /// Reads what no verb caused.
    fn read_background(&mut self) {
        if !self.stalled {
            self.replies = Replies::default();
            self.read(Phase::Background);
        }
    }

    /// Reads everything queued; true when the socket was closed (and replaced).
    fn read(&mut self, phase: Phase) -> bool {
        let phase = if self.stalled { Phase::Stalled } else { phase };
        loop {
            let mut frames = Vec::new();
            match self.outbox.pop(&mut frames, usize::MAX).now_or_never() {
                None => return false,
                Some(Err(reason)) => {
                    assert_eq!(reason, CloseReason::SlowConsumer, "only an overflow closes this socket");
                    self.reconnect();
                    return true;
                }
                Some(Ok(())) => {
                    let bytes: usize = frames.iter().map(|f| f.len()).sum();
                    assert!(bytes <= SEND_QUEUE_BYTES, "outbox held {bytes} bytes");
                    for frame in frames {
                        self.observe(&frame, phase);
                    }
                }
            }
        }
    }

    /// Checks one outbound frame against what this socket may receive.
    fn observe(&mut self, frame: &str, phase: Phase) {
        let value: Value = serde_json::from_str(frame).expect("outbound frames are JSON");
        let kind = value["kind"].as_str().expect("outbound frames have a kind");
        let session = value["sessionId"].as_str();
        match kind {
            "protocol_error" => {
                assert_ne!(phase, Phase::Background, "protocol_error without a frame: {frame}");
                let code = value["code"].as_str().expect("code").to_string();
                self.replies.errors.push((code, session.map(str::to_string)));
            }
            "chat_subscribed" => {
                let session = session.expect("ack names its session");
                let truncated = value["replayTruncated"].as_bool().expect("replayTruncated");
                let before = self.attached.contains(session);
                if !self.owned.contains(session) {
                    assert_eq!(value["lastSeq"], 0, "ack leaks another user's session: {frame}");
                    assert_eq!(value["isProcessing"], false, "{frame}");
                    assert!(value["runId"].is_null() && !truncated, "{frame}");
                    assert_ne!(phase, Phase::Background, "{frame}");
                } else {
                    if phase == Phase::Background {
                        assert!(truncated && before, "ack without a subscribe: {frame}");
                    }
                    self.attached.insert(session.to_string());
                    self.cursor.remove(session);
                }
                self.replies.acks.push((session.to_string(), truncated, before));
            }
            _ => {
                let seq = value["seq"].as_u64().unwrap_or_else(|| panic!("unexpected frame {frame}"));
                let session = session.expect("events name their session");
                assert!(self.owned.contains(session), "{} got another user's event: {frame}", self.user);
                // Frames queued while stalled may predate an unsubscribe or a re-subscribe.
                if phase != Phase::Stalled {
                    assert!(self.attached.contains(session), "event of an unsubscribed session: {frame}");
                    if let Some(previous) = self.cursor.get(session) {
                        assert_eq!(seq, previous + 1, "seq not contiguous on {session}: {frame}");
                    }
                }
                if self.attached.contains(session) {
                    self.cursor.insert(session.to_string(), seq);
                }
                let seen = self.frames.entry((session.to_string(), seq)).or_insert_with(|| frame.to_string());
                assert_eq!(seen, frame, "seq {seq} of {session} reused");
                let run_id = value["runId"].as_str().expect("events carry runId").to_string();
                assert!(!self.completed_runs.contains(&run_id), "event after its run's complete: {frame}");
                match kind {
                    "complete" => {
                        self.completed_runs.insert(run_id);
                    }
                    "permission_request" => {
                        self.approvals.borrow_mut().latest = value["requestId"].as_str().map(str::to_string);
                    }
                    "permission_resolved" => {
                        let id = value["requestId"].as_str().expect("requestId");
                        let approvals = self.approvals.borrow();
                        let by = approvals.answered_by.get(id);
                        assert!(by.is_some_and(|u| u.contains(self.user)), "{id} resolved by {by:?}, not its user");
                    }
                    _ => {}
                }
            }
        }
    }
}
