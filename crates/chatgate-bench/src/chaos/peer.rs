//! One logical client of the soak (a browser tab): it follows one session
//! across sockets, through nginx or straight to a node, and checks every frame
//! of that session against its cursor as it arrives: seqs strictly increasing
//! and contiguous, a jump only where `replayTruncated` said so (other jumps
//! are recorded and judged against history later: skipping runs that ended
//! while the client was away is allowed), no seq twice, nothing of a run after
//! its `complete`, no run that gives way to another without its `complete`.

use std::{
    collections::{HashSet, VecDeque},
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{net::TcpStream, time::Instant};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{Message, protocol::CloseFrame},
};

use super::{
    Ctx,
    ledger::{self, Gap, Kind, Observed, Suspect},
};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long one connection attempt (TCP, upgrade, `connected` frame) may take.
const CONNECT_WAIT: Duration = Duration::from_secs(3);
/// How long a client keeps trying to reach some node before it counts as unavailable.
const RECONNECT_FOR: Duration = Duration::from_secs(60);
/// Runs remembered as completed per client.
const COMPLETED_MEMORY: usize = 64;
/// Recent steps kept per client, shown with its failures.
const TRACE_LEN: usize = 16;

/// Where a socket goes.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    Balancer,
    Node(usize),
}

/// A `chat_subscribed` of the client's session.
#[derive(Debug, Clone)]
pub struct Ack {
    pub processing: bool,
    pub last_seq: u64,
    pub truncated: bool,
    pub pending: Vec<Value>,
    /// The run going on, when `processing`.
    pub run_id: Option<String>,
}

/// A `chat_accepted`: the answer to a `chat.send` with a `clientRequestId` that started a run
/// (`duplicate: false`) or whose key had already started one (`duplicate: true`).
#[derive(Debug, Clone)]
pub struct Accepted {
    pub key: String,
    pub run_id: String,
    pub first_seq: u64,
    pub duplicate: bool,
    /// Whether the run still runs.
    pub processing: bool,
}

/// A `protocol_error` of the client's session.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: String,
    /// The `clientRequestId` of the `chat.send` it answers (none for other verbs and keyless sends).
    pub key: Option<String>,
    /// A `RUN_IN_PROGRESS` answering a key whose first send was refused the same way.
    pub duplicate: bool,
    /// `BACKEND_UNAVAILABLE` with `outcome: "unknown"`: the run may have started.
    pub outcome_unknown: bool,
}

/// An event of the client's session, after the cursor checks.
#[derive(Debug, Clone)]
pub struct Ev {
    pub run_id: String,
    pub kind: Kind,
    pub frame: Value,
}

/// What one read gave.
#[derive(Debug)]
pub enum Step {
    Event(Ev),
    Ack(Ack),
    Accepted(Accepted),
    Error(Refusal),
    Other,
    Closed,
    Silent,
}

/// The client's position in its session.
#[derive(Debug, Default)]
struct Cursor {
    last: u64,
    /// The highest seq the client knows was taken: its events and every ack's `lastSeq`.
    top_seen: u64,
    last_run: Option<u32>,
    last_was_complete: bool,
    told: bool,
    completed: VecDeque<u32>,
    received: HashSet<u64>,
}

/// A session as the clients know it.
#[derive(Debug)]
pub struct SessionRef {
    pub id: String,
    pub user: usize,
    /// While the driver is away on purpose (an abandoned run), watchers stay away too, until this many ms since the soak began.
    pub quiet_until_ms: std::sync::atomic::AtomicU64,
}

pub struct Peer {
    ctx: Arc<Ctx>,
    pub name: String,
    pub session: Arc<SessionRef>,
    ws: Option<Ws>,
    /// The node of the current socket (from its `connected` frame).
    pub node: Option<String>,
    cursor: Cursor,
    /// Set when the session was subscribed implicitly by `chat.send` on a fresh socket.
    pub implicit: bool,
    /// Whether the current socket is subscribed to the session (an ack, or a `chat_accepted`
    /// that started a run, came on it).
    pub subscribed: bool,
    /// The client's last steps (sockets, acks, events), for failure reports.
    trace: VecDeque<String>,
}

impl Peer {
    pub fn new(ctx: Arc<Ctx>, name: String, session: Arc<SessionRef>) -> Peer {
        Peer {
            ctx,
            name,
            session,
            ws: None,
            node: None,
            cursor: Cursor::default(),
            implicit: false,
            subscribed: false,
            trace: VecDeque::new(),
        }
    }

    fn note(&mut self, step: String) {
        if self.trace.len() >= TRACE_LEN {
            self.trace.pop_front();
        }
        self.trace.push_back(step);
    }

    /// The client's last steps.
    pub fn traced(&self) -> String {
        self.trace.iter().cloned().collect::<Vec<_>>().join(" | ")
    }

    /// The highest seq known to be taken in the session (events and acks).
    pub fn top_seen(&self) -> u64 {
        self.cursor.top_seen.max(self.cursor.last)
    }

    pub fn connected(&self) -> bool {
        self.ws.is_some()
    }

    /// A random target: nginx half of the time, else one node.
    pub fn random_target(&self) -> Target {
        if rand::random_bool(0.5) {
            Target::Balancer
        } else {
            Target::Node(rand::random_range(0..self.ctx.node_ports.len()))
        }
    }

    pub async fn connect_to(&mut self, target: Target) -> anyhow::Result<()> {
        let port = match target {
            Target::Balancer => self.ctx.lb_port,
            Target::Node(i) => self.ctx.node_ports[i],
        };
        let url = format!("ws://127.0.0.1:{port}/ws?token={}&hello=1", self.ctx.tokens[self.session.user]);
        let attempt = async {
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(text))) => {
                        let hello: Value = serde_json::from_str(&text)?;
                        anyhow::ensure!(hello["kind"] == "connected", "expected the connected frame, got {hello}");
                        return Ok::<_, anyhow::Error>((ws, hello["nodeId"].as_str().map(str::to_string)));
                    }
                    Some(Ok(Message::Close(frame))) => anyhow::bail!("closed at once: {frame:?}"),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(e.into()),
                    None => anyhow::bail!("socket ended before the connected frame"),
                }
            }
        };
        let (ws, node) = tokio::time::timeout(CONNECT_WAIT, attempt).await??;
        self.note(format!("socket to {} via {target:?}", node.as_deref().unwrap_or("?")));
        self.ws = Some(ws);
        self.node = node;
        self.subscribed = false;
        Ok(())
    }

    /// Connects somewhere, retrying over random targets for up to a minute.
    pub async fn connect_any(&mut self) -> anyhow::Result<()> {
        self.drop_socket();
        let deadline = Instant::now() + RECONNECT_FOR;
        let mut delay = Duration::from_millis(25);
        let mut last_error = String::new();
        let mut target = self.random_target();
        while Instant::now() < deadline {
            match self.connect_to(target).await {
                Ok(()) => {
                    self.ctx.add("connects", 1);
                    return Ok(());
                }
                Err(e) => {
                    self.ctx.add("connect_attempts_failed", 1);
                    last_error = e.to_string();
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
            target = self.random_target();
        }
        self.ctx.fail(
            ledger::AVAILABILITY,
            format!("{}: no node reachable for {RECONNECT_FOR:?} (last error: {last_error})", self.name),
        );
        anyhow::bail!("{}: no node reachable", self.name)
    }

    /// Closes the socket: a clean close half of the time, else the TCP connection is just dropped.
    pub async fn close(&mut self) {
        self.note("close".to_string());
        if let Some(mut ws) = self.ws.take()
            && rand::random_bool(0.5)
        {
            let _ = tokio::time::timeout(
                Duration::from_millis(200),
                ws.close(Some(CloseFrame { code: 1000u16.into(), reason: "".into() })),
            )
            .await;
        }
        self.node = None;
        self.subscribed = false;
    }

    pub fn drop_socket(&mut self) {
        self.ws = None;
        self.node = None;
        self.subscribed = false;
    }

    pub async fn send(&mut self, value: Value) -> bool {
        match self.ws.as_mut() {
            Some(ws) => ws.send(Message::Text(value.to_string().into())).await.is_ok(),
            None => false,
        }
    }

    /// Subscribes with the cursor; events that come first go through the checks.
    /// `None` when the socket failed (the caller reconnects).
    pub async fn subscribe(&mut self) -> Option<Ack> {
        self.implicit = false;
        let frame = json!({ "type": "chat.subscribe",
            "sessions": [{ "sessionId": self.session.id, "lastSeq": self.cursor.last }] });
        let mut unavailable = 0;
        self.note(format!("subscribe lastSeq {}", self.cursor.last));
        if !self.send(frame.clone()).await {
            return None;
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            match self.next(Duration::from_millis(500)).await {
                Step::Ack(ack) => return Some(ack),
                Step::Error(refusal) if refusal.code == "BACKEND_UNAVAILABLE" && unavailable < 40 => {
                    unavailable += 1;
                    self.ctx.add("backend_unavailable_retries", 1);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    if !self.send(frame.clone()).await {
                        return None;
                    }
                }
                Step::Closed => return None,
                _ => {}
            }
        }
        self.drop_socket();
        None
    }

    /// Reconnects and subscribes until an ack comes (None: no node reachable).
    pub async fn resume(&mut self) -> Option<Ack> {
        for _ in 0..20 {
            if self.connect_any().await.is_err() {
                return None;
            }
            if let Some(ack) = self.subscribe().await {
                return Some(ack);
            }
        }
        self.ctx
            .fail(ledger::AVAILABILITY, format!("{}: 20 sockets in a row failed before the subscribe ack", self.name));
        None
    }

    /// Leaves the current socket and resumes elsewhere (a hop).
    pub async fn hop(&mut self) -> Option<Ack> {
        self.ctx.add("hops", 1);
        self.close().await;
        self.resume().await
    }

    /// Reads one frame (up to `wait`) and runs the checks on it.
    pub async fn next(&mut self, wait: Duration) -> Step {
        let Some(ws) = self.ws.as_mut() else { return Step::Closed };
        let message = match tokio::time::timeout(wait, ws.next()).await {
            Err(_) => return Step::Silent,
            Ok(message) => message,
        };
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map(|f| u16::from(f.code));
                self.note(format!("closed by server {code:?}"));
                self.ctx.add(&format!("closes_by_server_{}", code.map_or("none".to_string(), |c| c.to_string())), 1);
                self.drop_socket();
                return Step::Closed;
            }
            Some(Ok(_)) => return Step::Other,
            Some(Err(_)) | None => {
                self.ctx.add("socket_errors", 1);
                self.drop_socket();
                return Step::Closed;
            }
        };
        let Ok(frame) = serde_json::from_str::<Value>(&text) else {
            self.ctx.fail(ledger::SCRIPT_ORDER, format!("{}: a frame that is not JSON: {text}", self.name));
            return Step::Other;
        };
        if frame["sessionId"] != self.session.id.as_str() {
            return Step::Other;
        }
        match frame["kind"].as_str().unwrap_or_default() {
            "chat_subscribed" => Step::Ack(self.on_ack(&frame)),
            "chat_accepted" => self.on_accepted(&frame),
            "protocol_error" => {
                let refusal = Refusal {
                    code: frame["code"].as_str().unwrap_or_default().to_string(),
                    key: frame["clientRequestId"].as_str().map(str::to_string),
                    duplicate: frame["duplicate"] == true,
                    outcome_unknown: frame["outcome"] == "unknown",
                };
                if let Some(key) = &refusal.key {
                    self.note(format!(
                        "refused {} key {key}{}{}",
                        refusal.code,
                        if refusal.duplicate { " duplicate" } else { "" },
                        if refusal.outcome_unknown { " outcome unknown" } else { "" }
                    ));
                }
                Step::Error(refusal)
            }
            _ if frame.get("seq").is_some_and(Value::is_u64) => match self.on_event(frame) {
                Some(ev) => Step::Event(ev),
                None => Step::Other,
            },
            _ => Step::Other,
        }
    }

    /// A `chat_accepted`; one that lacks a field the contract gives it fails `idempotency_answers`.
    fn on_accepted(&mut self, frame: &Value) -> Step {
        let (Some(key), Some(run_id), Some(first_seq), Some(duplicate), Some(processing)) = (
            frame["clientRequestId"].as_str(),
            frame["runId"].as_str(),
            frame["firstSeq"].as_u64(),
            frame["duplicate"].as_bool(),
            frame["isProcessing"].as_bool(),
        ) else {
            self.ctx.fail(
                ledger::IDEMPOTENCY_ANSWERS,
                format!("{} session {}: a chat_accepted without its fields: {frame}", self.name, self.session.id),
            );
            return Step::Other;
        };
        let accepted = Accepted { key: key.to_string(), run_id: run_id.to_string(), first_seq, duplicate, processing };
        if !duplicate {
            // The send that started the run subscribed this socket.
            self.subscribed = true;
        }
        self.note(format!(
            "accepted key {key} run {run_id} firstSeq {first_seq} duplicate={duplicate} processing={processing}"
        ));
        Step::Accepted(accepted)
    }

    fn on_ack(&mut self, frame: &Value) -> Ack {
        self.subscribed = true;
        let ack = Ack {
            processing: frame["isProcessing"] == true,
            last_seq: frame["lastSeq"].as_u64().unwrap_or(0),
            truncated: frame["replayTruncated"] == true,
            pending: frame["pendingPermissions"].as_array().cloned().unwrap_or_default(),
            run_id: frame["runId"].as_str().map(str::to_string),
        };
        self.note(format!(
            "ack processing={} lastSeq={} truncated={} run={}",
            ack.processing, ack.last_seq, ack.truncated, frame["runId"]
        ));
        let cursor = &mut self.cursor;
        cursor.top_seen = cursor.top_seen.max(ack.last_seq);
        if ack.truncated {
            cursor.told = true;
            self.ctx.add("replay_truncated_told", 1);
        }
        if ack.processing {
            if let Some(run_id) = frame["runId"].as_str() {
                let mut book = self.ctx.book();
                if let Some(log) = book.sessions.get_mut(&self.session.id) {
                    let run = log.run(run_id);
                    log.processing_acks.push((SystemTime::now(), run));
                }
            }
        } else if ack.last_seq > cursor.last && !ack.truncated {
            // Runs that ended while the client was away are history, never replayed.
            self.ctx.add("idle_acks_ahead_of_cursor", 1);
            cursor.last = ack.last_seq;
            cursor.last_run = None;
            cursor.last_was_complete = true;
        } else if ack.last_seq < cursor.last {
            self.ctx.add("idle_acks_behind_cursor", 1);
        }
        ack
    }

    fn on_event(&mut self, frame: Value) -> Option<Ev> {
        let seq = frame["seq"].as_u64()?;
        let run_id = frame["runId"].as_str().unwrap_or_default().to_string();
        let kind = Kind::parse(frame["kind"].as_str().unwrap_or_default());
        let chunk =
            if kind == Kind::Delta { frame["content"].as_str().and_then(ledger::chunk_number).unwrap_or(0) } else { 0 };
        let seen = Observed { run: 0, kind, digest: ledger::digest(&frame), chunk };
        self.ctx.add("events_delivered", 1);
        let session = self.session.id.clone();
        let run = {
            let mut book = self.ctx.book();
            let run = book.observe(&session, seq, &run_id, seen, &self.name)?;
            if kind == Kind::Complete
                && let Some(at) = frame["timestamp"].as_str().and_then(|t| humantime::parse_rfc3339(t).ok())
                && let Some(log) = book.sessions.get_mut(&session)
            {
                log.completed_at.entry(run).or_insert(at);
            }
            run
        };
        self.note(format!("{seq} {kind:?} r{run}"));
        let implicit = if self.implicit { " (subscribed by chat.send on a fresh socket)" } else { "" };
        let cursor = &self.cursor;
        let failure = if cursor.received.contains(&seq) {
            Some((ledger::DUPLICATE_DELIVERED, format!("seq {seq} ({kind:?}) delivered again{implicit}")))
        } else if seq <= cursor.last {
            Some((ledger::SEQ_ORDER, format!("seq {seq} ({kind:?}) after seq {}{implicit}", cursor.last)))
        } else if seq == cursor.last + 1
            && cursor.last_run.is_some_and(|previous| previous != run)
            && !cursor.last_was_complete
        {
            Some((
                ledger::COMPLETE_NOT_ONCE,
                format!("seq {seq} of another run follows seq {} without a complete", cursor.last),
            ))
        } else if cursor.completed.contains(&run) && kind == Kind::Complete {
            Some((ledger::COMPLETE_NOT_ONCE, format!("a second complete of run {run_id} at seq {seq}")))
        } else if cursor.completed.contains(&run) {
            Some((ledger::EVENT_AFTER_COMPLETE, format!("seq {seq} ({kind:?}) of run {run_id} after its complete")))
        } else {
            None
        };
        if let Some((invariant, what)) = failure {
            let text = format!("{} session {session}: {what}; trace: {}", self.name, self.traced());
            let runs = [Some(run), self.cursor.last_run].into_iter().flatten().collect();
            if let Some(log) = self.ctx.book().sessions.get_mut(&session) {
                log.suspects.push(Suspect { invariant, runs, text });
            }
            if invariant == ledger::DUPLICATE_DELIVERED || invariant == ledger::SEQ_ORDER {
                return Some(Ev { run_id, kind, frame });
            }
        }
        if seq > self.cursor.last + 1 {
            if self.cursor.told {
                self.ctx.add("gaps_told", 1);
            } else {
                let gap = Gap {
                    client: self.name.clone(),
                    after: self.cursor.last,
                    seq,
                    run,
                    previous_run: self.cursor.last_run,
                    trace: self.traced(),
                };
                if let Some(log) = self.ctx.book().sessions.get_mut(&session) {
                    log.gaps.push(gap);
                }
            }
        }
        let cursor = &mut self.cursor;
        cursor.told = false;
        cursor.last = seq;
        cursor.last_run = Some(run);
        cursor.last_was_complete = kind == Kind::Complete;
        cursor.received.insert(seq);
        if kind == Kind::Complete {
            if cursor.completed.len() >= COMPLETED_MEMORY {
                cursor.completed.pop_front();
            }
            cursor.completed.push_back(run);
        }
        Some(Ev { run_id, kind, frame })
    }
}
