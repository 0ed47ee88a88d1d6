//! The soak's load. Each driver owns one session at a time and sends its
//! `script` runs one after the other (a new session every few runs); each
//! session has watchers, other tabs of the same user. Everyone hops between
//! nginx and the nodes at random, resuming by `lastSeq`.
//!
//! Run plans: plain runs (some failing as scripted), a tool approval answered
//! allow or deny by a watcher (another socket, usually another node), one left
//! to time out, one left waiting and aborted, runs aborted from another socket
//! on another node, runs whose every client goes away for a while (nobody
//! watches the session while the faults go on), and long fast runs that
//! outgrow the replay window of a client that was away (`replayTruncated`).
//!
//! Every prompt carries a `clientRequestId` (issue 18), and a driver that cannot
//! tell whether a send arrived sends it again with the same key ([`Prompt`]); a
//! prompt that starts twice fails the soak.

use std::{
    collections::HashSet,
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime},
};

use serde_json::{Value, json};
use tokio::{
    sync::{oneshot, watch},
    time::Instant,
};

use super::{
    Ctx,
    ledger::{self, Kind, SentRun},
    peer::{Accepted, Peer, SessionRef, Step, Target},
};

/// How long a driver waits for its run's `complete` before the run counts as never ended.
const RUN_DEADLINE: Duration = Duration::from_secs(120);
/// A driver hops when its socket was silent this long.
const DRIVER_PATIENCE: Duration = Duration::from_secs(5);
/// Share of sends after which the driver's socket is closed or dropped at once.
const DROP_AFTER_SEND_SHARE: f64 = 0.15;
/// Share of prompts sent a second time at once, same key, from another socket to another node.
const RACE_SHARE: f64 = 0.1;

/// A tool approval in a run's script, and who answers it.
#[derive(Debug, Clone)]
pub struct Approval {
    /// `allow`, `deny` or `none` (nobody answers).
    pub answer: &'static str,
    /// The watcher (by index within the session's watchers) that answers.
    pub by: usize,
    pub timeout_ms: u64,
    /// An allow with `updatedInput`.
    pub updated: bool,
}

/// What one run does.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: &'static str,
    pub events: u64,
    pub interval_ms: u64,
    pub payload_bytes: usize,
    pub approval: Option<Approval>,
    pub fail: bool,
    pub exit_code: i32,
    /// Abort from another socket this long after the send.
    pub abort_after: Option<Duration>,
    /// Every client of the session goes away after the first, for the second.
    pub abandon: Option<(Duration, Duration)>,
}

fn millis(from: u64, to: u64) -> Duration {
    Duration::from_millis(rand::random_range(from..to))
}

impl Plan {
    pub fn pick(watchers: usize) -> Plan {
        let base = Plan {
            name: "plain",
            events: rand::random_range(10..40),
            interval_ms: 40,
            payload_bytes: rand::random_range(0..48),
            approval: None,
            fail: false,
            exit_code: 0,
            abort_after: None,
            abandon: None,
        };
        let by = rand::random_range(0..watchers.max(1));
        let approval = |answer, timeout_ms| Approval { answer, by, timeout_ms, updated: rand::random_bool(0.5) };
        match rand::random_range(0..100) {
            0..25 => base,
            25..32 => {
                let fail = rand::random_bool(0.5);
                Plan {
                    name: "failing",
                    events: rand::random_range(5..15),
                    fail,
                    exit_code: if fail { 0 } else { 3 },
                    ..base
                }
            }
            32..44 => Plan {
                name: "allow",
                events: rand::random_range(5..20),
                approval: Some(approval("allow", 20_000)),
                ..base
            },
            44..52 => Plan {
                name: "deny",
                events: rand::random_range(5..20),
                approval: Some(approval("deny", 20_000)),
                ..base
            },
            52..58 => Plan {
                name: "approval_timeout",
                events: rand::random_range(5..10),
                approval: Some(approval("none", 1500)),
                ..base
            },
            58..70 => Plan {
                name: "aborted",
                events: rand::random_range(150..250),
                abort_after: Some(millis(1000, 3000)),
                ..base
            },
            70..76 => Plan {
                name: "aborted_waiting",
                events: 5,
                approval: Some(approval("none", 30_000)),
                abort_after: Some(millis(1000, 2500)),
                ..base
            },
            76..88 => Plan {
                name: "abandoned",
                events: rand::random_range(120..250),
                abandon: Some((millis(500, 1500), millis(3000, 12_000))),
                ..base
            },
            _ => {
                Plan { name: "long", events: rand::random_range(300..500), interval_ms: 10, payload_bytes: 32, ..base }
            }
        }
    }

    /// The `script` content (the nonce ties the run in history to this plan).
    pub fn content(&self, nonce: &str) -> String {
        let mut script = json!({
            "nonce": nonce, "events": self.events, "intervalMs": self.interval_ms,
            "payloadBytes": self.payload_bytes, "exitCode": self.exit_code,
        });
        if self.fail {
            script["fail"] = json!("planned failure");
        }
        if let Some(approval) = &self.approval {
            script["permission"] = json!({
                "toolName": "Bash",
                "input": { "command": "ls", "answer": approval.answer, "by": approval.by,
                           "updated": approval.updated, "nonce": nonce },
                "timeoutMs": approval.timeout_ms,
            });
        }
        script.to_string()
    }
}

/// An exponentially distributed pause with the given mean.
fn exp_pause(mean: Duration) -> Duration {
    let u: f64 = rand::random_range(0.0001..1.0);
    mean.mul_f64(-u.ln()).min(mean * 5)
}

/// Creates a `script` session over REST (nginx, then the nodes), retrying.
async fn create_session(ctx: &Ctx, user: usize) -> Option<String> {
    let body = json!({ "provider": "script", "projectPath": "." });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut attempt = 0usize;
    while Instant::now() < deadline {
        let port = ctx.rest_port(attempt);
        attempt += 1;
        let answer = ctx
            .http
            .post(format!("http://127.0.0.1:{port}/api/providers/sessions"))
            .bearer_auth(&ctx.tokens[user])
            .json(&body)
            .send()
            .await;
        if let Ok(response) = answer
            && response.status().is_success()
            && let Ok(created) = response.json::<Value>().await
            && let Some(id) = created["data"]["sessionId"].as_str()
        {
            return Some(id.to_string());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ctx.fail(ledger::AVAILABILITY, format!("user {user}: no session could be created for 60 s"));
    None
}

/// One driver: sessions one after the other, each with `runs_per_session` runs.
pub async fn driver(ctx: Arc<Ctx>, slot: usize, sessions: watch::Sender<Option<Arc<SessionRef>>>) {
    let user = slot % ctx.tokens.len();
    while !ctx.stop_sending.load(Ordering::SeqCst) {
        let Some(id) = create_session(&ctx, user).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        ctx.book().open_session(&id, user);
        ctx.add("sessions", 1);
        let session = Arc::new(SessionRef { id: id.clone(), user, quiet_until_ms: Default::default() });
        let _ = sessions.send(Some(session.clone()));
        let mut peer = Peer::new(ctx.clone(), format!("driver-{slot}"), session);
        for _ in 0..ctx.args.runs_per_session {
            if ctx.stop_sending.load(Ordering::SeqCst) {
                break;
            }
            let plan = Plan::pick(ctx.args.watchers);
            drive_run(&ctx, &mut peer, &plan).await;
            tokio::time::sleep(millis(0, 300)).await;
        }
        peer.close().await;
        ctx.retire(&id);
    }
    let _ = sessions.send(None);
}

/// One prompt of a driver: its nonce, its idempotency keys and what their answers said.
///
/// Every `chat.send` of it carries a `clientRequestId`. Whenever the driver cannot tell whether
/// a send arrived (its socket died or went silent, the node drained, `BACKEND_UNAVAILABLE` with
/// `outcome: "unknown"`) it sends again with the same key: the gateway starts at most one run per
/// key and answers a resend with that run (`chat_accepted`, `duplicate: true`). A refusal that
/// started nothing (`RATE_LIMITED`, `NODE_BUSY`, `BACKEND_UNAVAILABLE` …) is sent again with the
/// same key too. Only `RUN_IN_PROGRESS` burns a key (a resend of it is refused again, as
/// `duplicate`): the prompt is then sent under a new key, once the run in the way ended. The
/// nonce stays, so a prompt that starts twice under any of its keys shows in history.
struct Prompt {
    nonce: String,
    content: String,
    /// Its keys, the current one last.
    keys: Vec<String>,
    /// Sends under the current key.
    sends_of_key: u32,
    /// The run an answer named, and its `firstSeq`.
    run: Option<(String, u64)>,
    /// Whether a `chat_accepted` with `duplicate: false` came (the send that started the run).
    fresh_accepted: bool,
}

impl Prompt {
    fn new(nonce: String, content: String) -> Prompt {
        Prompt { nonce, content, keys: vec![new_key()], sends_of_key: 0, run: None, fresh_accepted: false }
    }

    fn key(&self) -> &str {
        self.keys.last().map(String::as_str).unwrap_or_default()
    }

    fn frame(&self, session: &str) -> Value {
        json!({ "type": "chat.send", "sessionId": session, "content": self.content, "clientRequestId": self.key() })
    }

    fn renew_key(&mut self) {
        self.keys.push(new_key());
        self.sends_of_key = 0;
    }

    fn run_id(&self) -> Option<&str> {
        self.run.as_ref().map(|(id, _)| id.as_str())
    }

    /// How a `chat_accepted` for one of its keys disagrees with the earlier answers: a second
    /// `duplicate: false` (a second run started), or another run or `firstSeq` than the one named
    /// before.
    fn disagreements(&self, answer: &Accepted) -> Vec<String> {
        let mut found = Vec::new();
        if !answer.duplicate && self.fresh_accepted {
            found.push(format!(
                "a second chat_accepted with duplicate false (key {}, run {})",
                answer.key, answer.run_id
            ));
        }
        if let Some((run, first_seq)) = &self.run
            && (*run != answer.run_id || *first_seq != answer.first_seq)
        {
            found.push(format!(
                "key {} answered run {} firstSeq {} (duplicate {}), an earlier answer named run {run} firstSeq {first_seq}",
                answer.key, answer.run_id, answer.first_seq, answer.duplicate
            ));
        }
        found
    }

    /// Records a `chat_accepted` for one of its keys; returns its disagreements with the earlier ones.
    fn record(&mut self, answer: &Accepted) -> Vec<String> {
        let found = self.disagreements(answer);
        self.fresh_accepted |= !answer.duplicate;
        if self.run.is_none() {
            self.run = Some((answer.run_id.clone(), answer.first_seq));
        }
        found
    }

    /// Takes a `chat_accepted` for one of its keys; disagreements fail `idempotency_answers`.
    fn accept(&mut self, ctx: &Ctx, peer: &Peer, answer: &Accepted) {
        for what in self.record(answer) {
            ctx.fail(
                ledger::IDEMPOTENCY_ANSWERS,
                format!(
                    "{} session {} prompt {}: {what}; trace: {}",
                    peer.name,
                    peer.session.id,
                    self.nonce,
                    peer.traced()
                ),
            );
        }
    }
}

fn new_key() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// How long a driver waits before it sends again after a refusal that started nothing.
fn retry_after(code: &str) -> Duration {
    match code {
        "RATE_LIMITED" => millis(1000, 2000),
        "NODE_BUSY" => millis(300, 800),
        _ => Duration::from_millis(300),
    }
}

/// A run that ended while its driver was away: history must hold it with its complete.
fn ended_away(ctx: &Ctx, peer: &Peer, nonce: &str, base: u64, why: String) {
    ctx.add("runs_ended_while_away", 1);
    let detail = format!("{why}; trace: {}", peer.traced());
    if let Some(log) = ctx.book().sessions.get_mut(&peer.session.id) {
        log.ended_away.push((nonce.to_string(), base, detail));
    }
}

/// Sends one prompt and follows its run to its `complete`, across hops, closes and faults.
async fn drive_run(ctx: &Arc<Ctx>, peer: &mut Peer, plan: &Plan) {
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let session = peer.session.clone();
    let mut prompt = Prompt::new(nonce.clone(), plan.content(&nonce));
    if !peer.connected() {
        if peer.connect_any().await.is_err() {
            return;
        }
        if rand::random_bool(0.7) {
            if peer.subscribe().await.is_none() && peer.resume().await.is_none() {
                return;
            }
        } else {
            // The run's own `chat.send` subscribes the fresh socket.
            peer.implicit = true;
        }
    }
    let base = peer.top_seen();
    let sent = SentRun {
        nonce: nonce.clone(),
        plan: plan.name,
        events: plan.events,
        sent_at: SystemTime::now(),
        node: peer.node.clone(),
    };
    if let Some(log) = ctx.book().sessions.get_mut(&session.id) {
        log.sent.push(sent);
    }
    ctx.add("runs_sent", 1);
    ctx.add(&format!("plan_{}", plan.name), 1);
    let started = Instant::now();
    let mut send_at = Some(started);
    // Runs whose `complete` this driver saw since the prompt was sent (its own may come before
    // the answer that names it).
    let mut completed: HashSet<String> = HashSet::new();
    // The answer of a racing send of the same key from another socket, if one was sent.
    let mut racer: Option<oneshot::Receiver<(Accepted, Option<String>)>> = None;
    // A send was refused with RUN_IN_PROGRESS: the run we took for ended is still going (an ack
    // said idle while it was not); wait for its end, then send again.
    let mut waiting_for_earlier = false;
    let mut next_hop = started + exp_pause(Duration::from_secs(4));
    let mut abort_at = plan.abort_after.map(|d| started + d);
    let mut abandon_at = plan.abandon.map(|(after, _)| started + after);
    let mut last_frame = Instant::now();
    loop {
        let now = Instant::now();
        if now > started + RUN_DEADLINE {
            ctx.fail(
                ledger::COMPLETE_NOT_ONCE,
                format!(
                    "{}: session {} run {nonce} ({}, run {:?}) saw no complete in {RUN_DEADLINE:?}; trace: {}",
                    peer.name,
                    session.id,
                    plan.name,
                    prompt.run_id(),
                    peer.traced()
                ),
            );
            peer.drop_socket();
            return;
        }
        let mut ack = None;
        // An ack on the socket the last send went out on (a gap the live path told of), not
        // the first of a new socket or subscription.
        let mut mid_stream = false;
        if let Some(at) = abandon_at
            && now >= at
        {
            abandon_at = None;
            let away = plan.abandon.map_or(Duration::ZERO, |(_, away)| away);
            peer.close().await;
            session.quiet_until_ms.store(ctx.elapsed_ms() + away.as_millis() as u64, Ordering::SeqCst);
            ctx.add("runs_abandoned_for_a_while", 1);
            tokio::time::sleep(away).await;
            ack = Some(peer.resume().await);
        } else if let Some(at) = abort_at
            && now >= at
        {
            abort_at = None;
            tokio::spawn(abort_elsewhere(ctx.clone(), session.clone(), peer.node.clone()));
        } else if now >= next_hop {
            next_hop = now + exp_pause(Duration::from_secs(4));
            ack = Some(peer.hop().await);
        } else if send_at.is_some_and(|at| now >= at) {
            send_at = None;
            if peer.send(prompt.frame(&session.id)).await {
                last_frame = now;
                ctx.add("prompt_sends", 1);
                if prompt.sends_of_key > 0 {
                    ctx.add("prompt_resends", 1);
                }
                prompt.sends_of_key += 1;
                if let Some(log) = ctx.book().sessions.get_mut(&session.id)
                    && let Some(sent) = log.sent.last_mut()
                    && !prompt.fresh_accepted
                {
                    sent.node = peer.node.clone();
                    sent.sent_at = SystemTime::now();
                }
                if prompt.sends_of_key == 1 && prompt.keys.len() == 1 && rand::random_bool(RACE_SHARE) {
                    // Another tab sends the same prompt, same key, through another node at once.
                    let (tx, rx) = oneshot::channel();
                    racer = Some(rx);
                    tokio::spawn(race_same_key(
                        ctx.clone(),
                        session.clone(),
                        prompt.frame(&session.id),
                        peer.node.clone(),
                        tx,
                    ));
                }
                if rand::random_bool(DROP_AFTER_SEND_SHARE) {
                    // The socket dies right after the send: did it arrive? Resend, same key.
                    ctx.add("sockets_lost_right_after_a_send", 1);
                    peer.close().await;
                    ack = Some(peer.resume().await);
                }
            } else {
                ack = Some(peer.resume().await);
            }
        } else if let Some(Ok((answer, node))) = racer.as_mut().map(|rx| rx.try_recv()) {
            racer = None;
            ctx.add(&format!("racing_sends_answered_duplicate_{}", answer.duplicate), 1);
            prompt.accept(ctx, peer, &answer);
            if !answer.duplicate
                && let Some(log) = ctx.book().sessions.get_mut(&session.id)
                && let Some(sent) = log.sent.last_mut()
            {
                sent.node = node;
            }
            if completed.contains(&answer.run_id) {
                ctx.add("runs_completed_live", 1);
                return;
            }
        } else {
            match peer.next(Duration::from_millis(250)).await {
                Step::Event(ev) => {
                    last_frame = now;
                    if ev.kind == Kind::Complete {
                        if prompt.run_id() == Some(ev.run_id.as_str()) {
                            ctx.add("runs_completed_live", 1);
                            return;
                        }
                        completed.insert(ev.run_id);
                        if waiting_for_earlier {
                            waiting_for_earlier = false;
                            send_at = Some(now);
                        }
                    }
                }
                Step::Accepted(answer) if prompt.keys.contains(&answer.key) => {
                    last_frame = now;
                    prompt.accept(ctx, peer, &answer);
                    if answer.key != prompt.key() {
                        ctx.add("answers_to_a_renewed_key", 1);
                    }
                    if answer.duplicate {
                        ctx.add("resends_answered_duplicate_accepted", 1);
                    } else {
                        ctx.add("sends_accepted", 1);
                        // The run lives on the node that accepted it.
                        if let Some(log) = ctx.book().sessions.get_mut(&session.id)
                            && let Some(sent) = log.sent.last_mut()
                        {
                            sent.node = peer.node.clone();
                        }
                    }
                    send_at = None;
                    waiting_for_earlier = false;
                    if completed.contains(&answer.run_id) {
                        ctx.add("runs_completed_live", 1);
                        return;
                    }
                    if !answer.processing {
                        let why = format!("answered {answer:?}, its complete not seen");
                        ended_away(ctx, peer, &nonce, base, why);
                        return;
                    }
                    if !peer.subscribed {
                        // A duplicate answer does not subscribe the socket: follow the run.
                        ack = Some(match peer.subscribe().await {
                            Some(ack) => Some(ack),
                            None => peer.resume().await,
                        });
                    }
                }
                Step::Accepted(answer) => {
                    ctx.add(&format!("answers_to_another_prompt_duplicate_{}", answer.duplicate), 1)
                }
                Step::Ack(unprompted) => {
                    mid_stream = true;
                    ack = Some(Some(unprompted));
                }
                Step::Error(refusal) if refusal.key.as_deref() == Some(prompt.key()) => {
                    last_frame = now;
                    ctx.add(&format!("sends_refused_{}", refusal.code), 1);
                    match refusal.code.as_str() {
                        "RUN_IN_PROGRESS" if refusal.duplicate => {
                            // This key's first send met a run in progress; it never starts one.
                            ctx.add("resends_answered_duplicate_run_in_progress", 1);
                            ctx.add("keys_renewed", 1);
                            prompt.renew_key();
                            send_at = Some(now + Duration::from_millis(300));
                        }
                        "RUN_IN_PROGRESS" => {
                            ctx.add("sends_refused_an_earlier_run_was_still_going", 1);
                            waiting_for_earlier = true;
                            if !peer.subscribed {
                                ack = Some(match peer.subscribe().await {
                                    Some(ack) => Some(ack),
                                    None => peer.resume().await,
                                });
                            }
                        }
                        code => {
                            if refusal.outcome_unknown {
                                ctx.add("outcome_unknown_answers", 1);
                            }
                            send_at = Some(now + retry_after(code));
                        }
                    }
                }
                Step::Error(refusal) => {
                    let whose = if refusal.key.is_some() { "an_older_key" } else { "no_key" };
                    ctx.add(&format!("protocol_error_{}_{whose}", refusal.code), 1);
                }
                Step::Closed => ack = Some(peer.resume().await),
                Step::Silent if now.duration_since(last_frame) > DRIVER_PATIENCE => {
                    last_frame = now;
                    ctx.add("hops_after_silence", 1);
                    ack = Some(peer.hop().await);
                }
                Step::Silent | Step::Other => {}
            }
        }
        let Some(ack) = ack else { continue };
        let Some(ack) = ack else { return };
        last_frame = Instant::now();
        match prompt.run_id() {
            Some(run) if ack.processing && ack.run_id.as_deref() == Some(run) => {}
            Some(run) => {
                let why = format!("run {run} not processing after the ack {ack:?} (base {base})");
                ended_away(ctx, peer, &nonce, base, why);
                return;
            }
            None if waiting_for_earlier => {
                if !ack.processing {
                    waiting_for_earlier = false;
                    send_at = Some(Instant::now());
                }
            }
            None if mid_stream => {}
            // A new socket, and nothing says what became of the last send: send it again,
            // same key.
            None => {
                send_at.get_or_insert_with(Instant::now);
            }
        }
    }
}

/// The same `chat.send` (same key) from a new socket straight to another node than the
/// driver's, at about the same time as the driver's: the gateway must start one run and name it
/// in both answers. A `chat_accepted` is handed to the driver (with the racer's node) for the
/// check; the socket closes as soon as an answer came, before any event.
async fn race_same_key(
    ctx: Arc<Ctx>,
    session: Arc<SessionRef>,
    frame: Value,
    avoid: Option<String>,
    answer: oneshot::Sender<(Accepted, Option<String>)>,
) {
    let key = frame["clientRequestId"].as_str().unwrap_or_default().to_string();
    let mut peer = Peer::new(ctx.clone(), "racer".to_string(), session);
    let candidates: Vec<usize> =
        (0..ctx.node_ids.len()).filter(|i| avoid.as_deref() != Some(ctx.node_ids[*i].as_str())).collect();
    let node = candidates[rand::random_range(0..candidates.len())];
    if peer.connect_to(Target::Node(node)).await.is_err() || !peer.send(frame).await {
        ctx.add("racing_sends_not_sent", 1);
        return;
    }
    ctx.add("racing_sends", 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match peer.next(Duration::from_millis(250)).await {
            Step::Accepted(accepted) if accepted.key == key => {
                let _ = answer.send((accepted, peer.node.clone()));
                break;
            }
            Step::Error(refusal) if refusal.key.as_deref() == Some(key.as_str()) => {
                ctx.add(&format!("racing_sends_refused_{}", refusal.code), 1);
                break;
            }
            Step::Closed => break,
            _ => {}
        }
    }
    peer.drop_socket();
}

/// `chat.abort` from a socket on another node than the driver's.
async fn abort_elsewhere(ctx: Arc<Ctx>, session: Arc<SessionRef>, avoid: Option<String>) {
    let mut peer = Peer::new(ctx.clone(), "aborter".to_string(), session.clone());
    let candidates: Vec<usize> =
        (0..ctx.node_ids.len()).filter(|i| avoid.as_deref() != Some(ctx.node_ids[*i].as_str())).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut answered = false;
    while Instant::now() < deadline && !answered {
        let node = candidates[rand::random_range(0..candidates.len())];
        if peer.connect_to(Target::Node(node)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        if !peer.send(json!({ "type": "chat.abort", "sessionId": session.id })).await {
            continue;
        }
        ctx.add("aborts_sent", 1);
        let wait_until = Instant::now() + Duration::from_secs(1);
        answered = true;
        while Instant::now() < wait_until {
            match peer.next(Duration::from_millis(200)).await {
                Step::Error(refusal) if refusal.code == "BACKEND_UNAVAILABLE" => {
                    answered = false;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    break;
                }
                Step::Error(refusal) => {
                    ctx.add(&format!("aborts_answered_{}", refusal.code), 1);
                    break;
                }
                Step::Closed => {
                    answered = false;
                    break;
                }
                _ => {}
            }
        }
    }
    peer.close().await;
}

/// One watcher of a driver's sessions: another tab of the same user.
pub async fn watcher(ctx: Arc<Ctx>, slot: usize, index: usize, mut sessions: watch::Receiver<Option<Arc<SessionRef>>>) {
    let mut answered: HashSet<String> = HashSet::new();
    let mut tab = 0;
    'sessions: loop {
        let current = sessions.borrow_and_update().clone();
        let Some(session) = current else {
            if sessions.changed().await.is_err() {
                return;
            }
            continue;
        };
        tab += 1;
        let mut peer = Peer::new(ctx.clone(), format!("watcher-{slot}.{index}#{tab}"), session.clone());
        let mut ack = peer.resume().await;
        let patience = Duration::from_secs(rand::random_range(3..20));
        let mut next_hop = Instant::now() + exp_pause(Duration::from_secs(5));
        let mut last_frame = Instant::now();
        loop {
            if ctx.stop_all.load(Ordering::SeqCst) {
                peer.close().await;
                return;
            }
            if sessions.has_changed().unwrap_or(true) {
                peer.close().await;
                continue 'sessions;
            }
            for request in ack.take().map(|a| a.pending).unwrap_or_default() {
                answer(&ctx, &mut peer, index, &request, &mut answered).await;
            }
            let now = Instant::now();
            let quiet_until = session.quiet_until_ms.load(Ordering::SeqCst);
            if quiet_until > ctx.elapsed_ms() {
                peer.close().await;
                while session.quiet_until_ms.load(Ordering::SeqCst) > ctx.elapsed_ms()
                    && !sessions.has_changed().unwrap_or(true)
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                ack = peer.resume().await;
                last_frame = Instant::now();
                continue;
            }
            if now >= next_hop || (!peer.connected() && ack.is_none()) {
                next_hop = now + exp_pause(Duration::from_secs(5));
                last_frame = now;
                if rand::random_bool(0.1) {
                    // A fresh tab: no cursor, so the current run is replayed from its start.
                    peer.close().await;
                    tab += 1;
                    peer = Peer::new(ctx.clone(), format!("watcher-{slot}.{index}#{tab}"), session.clone());
                    ctx.add("fresh_tabs", 1);
                    ack = peer.resume().await;
                } else {
                    ack = peer.hop().await;
                }
                if ack.is_none() {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                continue;
            }
            match peer.next(Duration::from_millis(500)).await {
                Step::Event(ev) => {
                    last_frame = now;
                    if ev.kind == Kind::PermissionRequest {
                        answer(&ctx, &mut peer, index, &ev.frame, &mut answered).await;
                    }
                }
                Step::Ack(mid_stream) => ack = Some(mid_stream),
                Step::Closed => {
                    ack = peer.resume().await;
                    last_frame = Instant::now();
                }
                Step::Silent if now.duration_since(last_frame) > patience => {
                    last_frame = now;
                    ctx.add("hops_after_silence", 1);
                    ack = peer.hop().await;
                }
                _ => {}
            }
        }
    }
}

/// Answers a tool approval when this watcher is the one its script names.
async fn answer(ctx: &Ctx, peer: &mut Peer, index: usize, request: &Value, answered: &mut HashSet<String>) {
    let input = &request["input"];
    let Some(request_id) = request["requestId"].as_str() else { return };
    if input["by"].as_u64() != Some(index as u64) || answered.contains(request_id) {
        return;
    }
    let response = match input["answer"].as_str() {
        Some("allow") if input["updated"] == true => {
            json!({ "type": "chat.permission-response", "requestId": request_id,
            "allow": true, "updatedInput": { "command": "ls -la" } })
        }
        Some("allow") => json!({ "type": "chat.permission-response", "requestId": request_id, "allow": true }),
        Some("deny") => json!({ "type": "chat.permission-response", "requestId": request_id, "allow": false,
            "message": "denied by a watcher" }),
        _ => return,
    };
    if peer.send(response).await {
        answered.insert(request_id.to_string());
        ctx.add("approval_answers_sent", 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(key: &str, run: &str, first_seq: u64, duplicate: bool) -> Accepted {
        Accepted { key: key.into(), run_id: run.into(), first_seq, duplicate, processing: true }
    }

    fn take(prompt: &mut Prompt, answer: &Accepted) -> Vec<String> {
        prompt.record(answer)
    }

    #[test]
    fn keys_fit_the_contract() {
        let mut prompt = Prompt::new("n".into(), "{}".into());
        let first = prompt.key().to_string();
        prompt.renew_key();
        assert_ne!(prompt.key(), first);
        assert_eq!(prompt.keys.len(), 2);
        for key in &prompt.keys {
            assert!((1..=128).contains(&key.len()));
            assert!(key.chars().all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c)), "{key}");
        }
        assert_eq!(prompt.frame("s")["clientRequestId"], prompt.key());
    }

    #[test]
    fn agreeing_answers_pass() {
        let mut prompt = Prompt::new("n".into(), "{}".into());
        let key = prompt.key().to_string();
        assert!(take(&mut prompt, &answer(&key, "r1", 7, false)).is_empty());
        assert!(take(&mut prompt, &answer(&key, "r1", 7, true)).is_empty());
        assert!(take(&mut prompt, &answer(&key, "r1", 7, true)).is_empty());
        assert_eq!(prompt.run_id(), Some("r1"));
    }

    #[test]
    fn a_duplicate_first_then_the_fresh_answer_pass() {
        // The fresh answer went to a socket that died after the resend: order does not matter.
        let mut prompt = Prompt::new("n".into(), "{}".into());
        let key = prompt.key().to_string();
        assert!(take(&mut prompt, &answer(&key, "r1", 3, true)).is_empty());
        assert!(take(&mut prompt, &answer(&key, "r1", 3, false)).is_empty());
    }

    #[test]
    fn a_second_fresh_answer_fails() {
        let mut prompt = Prompt::new("n".into(), "{}".into());
        let key = prompt.key().to_string();
        assert!(take(&mut prompt, &answer(&key, "r1", 7, false)).is_empty());
        let found = take(&mut prompt, &answer(&key, "r1", 7, false));
        assert_eq!(found.len(), 1, "{found:?}");
        prompt.renew_key();
        let other = prompt.key().to_string();
        let found = take(&mut prompt, &answer(&other, "r2", 12, false));
        assert_eq!(found.len(), 2, "{found:?}");
    }

    #[test]
    fn a_duplicate_naming_another_run_or_seq_fails() {
        let mut prompt = Prompt::new("n".into(), "{}".into());
        let key = prompt.key().to_string();
        assert!(take(&mut prompt, &answer(&key, "r1", 7, false)).is_empty());
        assert_eq!(take(&mut prompt, &answer(&key, "r2", 7, true)).len(), 1);
        assert_eq!(take(&mut prompt, &answer(&key, "r1", 8, true)).len(), 1);
    }

    #[test]
    fn refusals_that_started_nothing_are_retried() {
        assert!(retry_after("RATE_LIMITED") >= Duration::from_secs(1));
        assert!(retry_after("NODE_BUSY") < Duration::from_secs(1));
        assert_eq!(retry_after("BACKEND_UNAVAILABLE"), Duration::from_millis(300));
    }
}
