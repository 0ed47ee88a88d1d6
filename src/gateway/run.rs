//! The owner-side run driver: runtime events in, sequenced events out.
//!
//! One task per run owns everything about it: it labels the runtime's events
//! (id, sessionId, provider, timestamp, runId), appends them through the
//! registry in batches (coalescing what queued up while the last append was in
//! flight), records tool approvals, renews the lease, routes aborts and
//! answers, writes history, and appends the one terminal `complete` — after
//! which nothing of this run can be appended.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::{Map, Value, json};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{
    Gateway,
    transcript::{Labels, Transcript, object},
};
use crate::sync::lock_unpoisoned;
use crate::{
    protocol::{EventBody, PermissionAnswer, now_iso, session_upserted},
    runs::{Control, Event, RegistryError, RunGrant, RunLease},
    runtime::{RUNTIME_EVENT_CAPACITY, RunContext, RunOutcome, RunRequest, Runtime, RuntimeMsg, sandbox::Launch},
    store::{HistoryRow, LastRequest, SessionRow},
};

/// Most runtime messages folded into one append.
const MAX_BATCH: usize = 256;
/// Direct writes of the prompt row before it is queued to the history writer.
const PROMPT_ATTEMPTS: u32 = 3;
/// How long a stopped runtime may take to exit before its task is dropped.
const RUNTIME_EXIT_GRACE: Duration = Duration::from_secs(5);

/// Why the node stops one of its runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// SIGTERM drain: the grace period ran out.
    Draining,
}

/// What `chat.send` hands to the driver.
pub(super) struct RunPlan {
    pub session: SessionRow,
    pub user_id: String,
    pub run_id: String,
    pub request: RunRequest,
    pub runtime: Arc<dyn Runtime>,
    pub grant: RunGrant,
    /// How the run's CLI is contained (its user's home, its project).
    pub launch: Launch,
    /// The run's slot of `--max-runs`, released when the driver ends.
    pub slot: OwnedSemaphorePermit,
    /// The send's `clientRequestId`, kept in SQL beside the prompt.
    pub request_key: Option<String>,
}

/// How the run ended, before it is written as `complete`.
enum Ending {
    Finished(RunOutcome),
    Aborted,
    Stopped(StopReason),
    /// The lock is gone: nothing more may be appended.
    LeaseLost,
}

impl Gateway {
    /// Starts driving a granted run on this node.
    pub(super) fn spawn_run(self: &Arc<Self>, plan: RunPlan) {
        let stop = CancellationToken::new();
        let reason = Arc::new(Mutex::new(None));
        self.track_run(&plan.run_id, stop.clone(), reason.clone());
        let span = tracing::info_span!("run", session_id = %plan.session.session_id, run_id = %plan.run_id,
            provider = %plan.session.provider);
        let gateway = self.clone();
        let run_id = plan.run_id.clone();
        self.tracker.spawn(
            async move {
                let started = Instant::now();
                Driver::new(gateway.clone(), plan).run(stop, reason).await;
                metrics::histogram!("chatgate_run_seconds").record(started.elapsed().as_secs_f64());
                gateway.untrack_run(&run_id);
            }
            .instrument(span),
        );
    }
}

/// What the driver needs once, to start the runtime.
struct Start {
    request: RunRequest,
    runtime: Arc<dyn Runtime>,
    control: mpsc::Receiver<Control>,
    launch: Launch,
}

struct Driver {
    gateway: Arc<Gateway>,
    lease: RunLease,
    session: SessionRow,
    user_id: String,
    labels: Labels,
    /// Where the prompt's history row goes: the seq the first event is due to get.
    first_seq: u64,
    transcript: Transcript,
    pending: HashMap<String, oneshot::Sender<PermissionAnswer>>,
    last_renewal: Instant,
    plan: Option<Start>,
    /// This run's slot of `--max-runs`, given back once its runtime has ended.
    slot: Option<OwnedSemaphorePermit>,
    request_key: Option<String>,
}

impl Driver {
    fn new(gateway: Arc<Gateway>, plan: RunPlan) -> Self {
        let RunGrant { lease, first_seq, control } = plan.grant;
        let labels = Labels {
            session_id: plan.session.session_id.clone(),
            provider: plan.session.provider.clone(),
            run_id: lease.run_id.clone(),
        };
        let drafting = gateway.stream_drafts;
        Driver {
            gateway,
            lease,
            transcript: Transcript::new(labels.clone()).drafting(drafting),
            labels,
            first_seq,
            session: plan.session,
            user_id: plan.user_id,
            pending: HashMap::new(),
            last_renewal: Instant::now(),
            plan: Some(Start { request: plan.request, runtime: plan.runtime, control, launch: plan.launch }),
            slot: Some(plan.slot),
            request_key: plan.request_key,
        }
    }

    async fn run(mut self, stop: CancellationToken, reason: Arc<Mutex<Option<StopReason>>>) {
        let Some(Start { request, runtime, mut control, launch }) = self.plan.take() else { return };
        let prompt = self.labels.prompt_row(self.first_seq, &request.content);
        let (tx, mut rx) = mpsc::channel(RUNTIME_EVENT_CAPACITY);
        let cancel = CancellationToken::new();
        let mut runtime_task = tokio::spawn({
            let ctx = RunContext::contained(tx, cancel.clone(), launch);
            async move { runtime.run(request, ctx).await }
        });
        // While the runtime starts: the prompt is durable before any event of the run is appended.
        self.store_prompt(prompt).await;
        self.record_request();
        let lease_len = self.gateway.settings.run_lease;
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + lease_len / 3, lease_len / 3);
        let mut control_open = true;
        let ending = loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(first) => {
                        let mut msgs = vec![first];
                        while msgs.len() < MAX_BATCH {
                            match rx.try_recv() {
                                Ok(msg) => msgs.push(msg),
                                Err(_) => break,
                            }
                        }
                        if self.handle(msgs).await.is_err() {
                            break Ending::LeaseLost;
                        }
                    }
                    None => break match (&mut runtime_task).await {
                        Ok(outcome) => Ending::Finished(outcome),
                        Err(e) => Ending::Finished(RunOutcome { exit_code: 1, error: Some(format!("runtime crashed: {e}")) }),
                    },
                },
                ctl = control.recv(), if control_open => match ctl {
                    Some(Control::Abort { .. }) => break Ending::Aborted,
                    Some(Control::Permission { request_id, answer, .. }) => {
                        if self.answer(&request_id, answer).await.is_err() {
                            break Ending::LeaseLost;
                        }
                    }
                    None => control_open = false,
                },
                _ = renew.tick() => {
                    if self.renew().await.is_err() {
                        break Ending::LeaseLost;
                    }
                }
                _ = stop.cancelled() => {
                    let why = lock_unpoisoned(&reason).unwrap_or(StopReason::Draining);
                    break Ending::Stopped(why);
                }
            }
        };
        cancel.cancel();
        // Unanswered approvals end with the run, visibly for every tab.
        if matches!(ending, Ending::LeaseLost) {
            self.pending.clear();
        } else if self.cancel_pending().await.is_err() {
            self.finish(Ending::LeaseLost).await;
            return;
        }
        if !matches!(ending, Ending::Finished(_))
            && tokio::time::timeout(RUNTIME_EXIT_GRACE, &mut runtime_task).await.is_err()
        {
            tracing::warn!("runtime did not stop in time; dropping its task");
            runtime_task.abort();
        }
        self.finish(ending).await;
    }

    /// Writes the prompt's history row at once (a few tries), else hands it to
    /// the history writer, which keeps trying. A run whose owner dies right
    /// after its start still has its prompt: the reaper stores it from Redis.
    async fn store_prompt(&self, row: HistoryRow) {
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=PROMPT_ATTEMPTS {
            match self.gateway.store.append_history(std::slice::from_ref(&row)).await {
                Ok(()) => return,
                Err(e) => {
                    metrics::counter!("chatgate_backend_errors_total", "backend" => "database").increment(1);
                    tracing::warn!(attempt, error = %e, "could not store the prompt; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
        self.gateway.history.write(vec![row]).await;
    }

    /// Keeps the send's `clientRequestId` in SQL as the session's last, off the
    /// run's path: a resend the registry no longer knows is still told its run.
    fn record_request(&mut self) {
        let Some(key) = self.request_key.take() else { return };
        let request = LastRequest { key, run_id: self.lease.run_id.clone(), first_seq: self.first_seq };
        let (store, session_id) = (self.gateway.store.clone(), self.lease.session_id.clone());
        tokio::spawn(async move {
            if let Err(e) = store.record_request(&session_id, &request).await {
                metrics::counter!("chatgate_backend_errors_total", "backend" => "database").increment(1);
                tracing::warn!(error = %e, "could not keep the send's clientRequestId in SQL");
            }
        });
    }

    /// Labels, appends and records one batch of runtime messages.
    async fn handle(&mut self, msgs: Vec<RuntimeMsg>) -> Result<(), RegistryError> {
        let mut batch = Vec::with_capacity(msgs.len());
        let mut deltas = Vec::with_capacity(msgs.len());
        for msg in msgs {
            match msg {
                RuntimeMsg::Event(fields) => {
                    let delta = (fields.get("kind").and_then(Value::as_str) == Some("stream_delta"))
                        .then(|| fields.get("content").and_then(Value::as_str).unwrap_or("").to_string());
                    batch.push(self.label(fields));
                    deltas.push(delta);
                }
                RuntimeMsg::ProviderSessionId(id) => self.announce(id).await,
                RuntimeMsg::Permission { request_id, tool_name, input, details, reply } => {
                    let mut request = details.clone();
                    request.extend(object(json!({
                        "requestId": request_id, "toolName": tool_name, "input": input,
                        "sessionId": self.session.session_id, "receivedAt": now_iso(),
                    })));
                    let request = Value::Object(request);
                    self.while_leased("add_pending", || {
                        self.gateway.registry.add_pending(&self.lease, &request_id, request.clone())
                    })
                    .await?;
                    self.pending.insert(request_id.clone(), reply);
                    let mut fields = details;
                    fields.extend(object(json!({ "kind": "permission_request", "requestId": request_id,
                        "toolName": tool_name, "input": input })));
                    batch.push(self.label(fields));
                    deltas.push(None);
                }
                RuntimeMsg::PermissionCancelled { request_id, reason } => {
                    if self.pending.remove(&request_id).is_some() {
                        self.while_leased("remove_pending", || {
                            self.gateway.registry.remove_pending(&self.lease, &request_id)
                        })
                        .await?;
                        let fields =
                            json!({ "kind": "permission_cancelled", "requestId": request_id, "reason": reason });
                        batch.push(self.label(object(fields)));
                        deltas.push(None);
                    }
                }
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        let events = self.append(batch.clone()).await?;
        let rows = self.history_rows(&batch, &events, deltas);
        self.gateway.history.write(rows).await;
        Ok(())
    }

    /// Appends with retries while the backend is away, until the lease would be gone.
    async fn append(&self, batch: Vec<EventBody>) -> Result<Vec<Event>, RegistryError> {
        let started = Instant::now();
        let events = self.while_leased("append", || self.gateway.registry.append(&self.lease, batch.clone())).await?;
        metrics::counter!("chatgate_events_appended_total").increment(events.len() as u64);
        metrics::histogram!("chatgate_append_seconds").record(started.elapsed().as_secs_f64());
        Ok(events)
    }

    /// Runs a registry write, retrying with backoff while the backend is
    /// unavailable and the lease may still be ours. A fenced write is tried once
    /// more after a renewal that re-took the lock (Redis came back empty and no
    /// append re-took it yet); any other error is final.
    async fn while_leased<T, F, Fut>(&self, what: &str, mut write: F) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let mut delay = Duration::from_millis(50);
        let mut retook = false;
        loop {
            match write().await {
                Err(RegistryError::Unavailable(e)) if self.last_renewal.elapsed() < self.gateway.settings.run_lease => {
                    metrics::counter!("chatgate_backend_errors_total", "backend" => "redis").increment(1);
                    tracing::warn!(error = %e, what, "registry write failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(RegistryError::Fenced) if !retook && self.gateway.registry.renew(&self.lease).await.is_ok() => {
                    retook = true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, what, "registry write refused");
                    return Err(e);
                }
                Ok(value) => return Ok(value),
            }
        }
    }

    async fn renew(&mut self) -> Result<(), RegistryError> {
        match self.gateway.registry.renew(&self.lease).await {
            Ok(()) => {
                self.last_renewal = Instant::now();
                Ok(())
            }
            Err(RegistryError::Unavailable(e)) if self.last_renewal.elapsed() < self.gateway.settings.run_lease => {
                tracing::warn!(error = %e, "lease renewal failed; will retry");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "lease lost; stopping the run");
                Err(e)
            }
        }
    }

    /// Resolves a pending approval: `permission_resolved` for every tab, then the runtime goes on.
    async fn answer(&mut self, request_id: &str, answer: PermissionAnswer) -> Result<(), RegistryError> {
        let Some(reply) = self.pending.remove(request_id) else { return Ok(()) };
        self.while_leased("remove_pending", || self.gateway.registry.remove_pending(&self.lease, request_id)).await?;
        let fields = json!({ "kind": "permission_resolved", "requestId": request_id, "allow": answer.allow });
        let body = self.label(object(fields));
        let events = self.append(vec![body.clone()]).await?;
        let rows = self.history_rows(&[body], &events, vec![None]);
        self.gateway.history.write(rows).await;
        let _ = reply.send(answer);
        Ok(())
    }

    /// Ends every pending approval with `permission_cancelled {reason: "cancelled"}`.
    async fn cancel_pending(&mut self) -> Result<(), RegistryError> {
        let request_ids: Vec<String> = self.pending.drain().map(|(id, _)| id).collect();
        if request_ids.is_empty() {
            return Ok(());
        }
        let mut bodies = Vec::with_capacity(request_ids.len());
        for request_id in &request_ids {
            self.while_leased("remove_pending", || self.gateway.registry.remove_pending(&self.lease, request_id))
                .await?;
            let fields = json!({ "kind": "permission_cancelled", "requestId": request_id, "reason": "cancelled" });
            bodies.push(self.label(object(fields)));
        }
        let events = self.append(bodies.clone()).await?;
        let rows = self.history_rows(&bodies, &events, vec![None; bodies.len()]);
        self.gateway.history.write(rows).await;
        Ok(())
    }

    /// Stores the provider's own session id and tells the user's sockets.
    async fn announce(&mut self, provider_session_id: String) {
        if self.session.provider_session_id.as_deref() == Some(provider_session_id.as_str()) {
            return;
        }
        let store = &self.gateway.store;
        if let Err(e) = store.set_provider_session_id(&self.session.session_id, &provider_session_id).await {
            tracing::warn!(error = %e, "could not store the provider session id");
            return;
        }
        self.session.provider_session_id = Some(provider_session_id.clone());
        let session = self.session.to_json(true, 0);
        let count = store.conversation_count(&self.session.session_id).await.unwrap_or(0);
        let frame = session_upserted(
            &self.session.session_id,
            &self.session.provider,
            Some(&provider_session_id),
            &session,
            count,
        );
        if let Err(e) = self.gateway.registry.notify_user(&self.user_id, frame).await {
            tracing::warn!(error = %e, "could not send session_upserted");
        }
    }

    /// Appends the terminal `complete` (unless the lease is lost) and flushes history.
    async fn finish(mut self, ending: Ending) {
        // The CLI is gone: its slot is free before the `complete` goes out, so a
        // client that sends again as soon as it sees the `complete` is never
        // refused for a run that is over.
        drop(self.slot.take());
        let (exit_code, aborted, error) = match ending {
            Ending::Finished(outcome) => (outcome.exit_code, false, outcome.error),
            Ending::Aborted => (0, true, None),
            Ending::Stopped(StopReason::Draining) => (1, true, Some("node draining".to_string())),
            Ending::LeaseLost => {
                metrics::counter!("chatgate_runs_total", "outcome" => "lease_lost").increment(1);
                self.gateway.registry.abandon(&self.lease).await;
                self.flush_streamed().await;
                return;
            }
        };
        let mut fields = json!({
            "kind": "complete", "exitCode": exit_code, "success": exit_code == 0 && !aborted,
            "aborted": aborted, "actualSessionId": self.session.session_id,
        });
        if let Some(error) = error {
            fields["error"] = Value::String(error);
        }
        let body = self.label(object(fields));
        // History is durable before the run is announced over: a client that
        // reloads history on `complete` finds every row, and an owner killed
        // right after the `complete` loses none of the run's rows.
        self.gateway.history.flush().await;
        let event =
            self.while_leased("complete", || self.gateway.registry.complete(&self.lease, body.clone())).await.ok();
        let outcome = if aborted {
            "aborted"
        } else if exit_code == 0 {
            "success"
        } else {
            "failure"
        };
        metrics::counter!("chatgate_runs_total", "outcome" => outcome).increment(1);
        match event {
            Some(event) => {
                let rows = self.history_rows(&[body], &[event], vec![None]);
                self.gateway.history.write(rows).await;
                self.gateway.history.flush().await;
                self.gateway.registry.history_saved(&self.lease).await;
            }
            None => self.flush_streamed().await,
        }
    }

    /// Writes the merged text of deltas no `stream_end` closed (a run cut short).
    async fn flush_streamed(&mut self) {
        let mut rows = Vec::new();
        self.transcript.flush(&mut rows);
        self.gateway.history.write(rows).await;
    }

    /// Adds the run's labels to a runtime event.
    fn label(&self, fields: Map<String, Value>) -> EventBody {
        self.labels.label(fields)
    }

    /// History rows of one appended batch (with a draft of its deltas while their stream is open).
    fn history_rows(&mut self, bodies: &[EventBody], events: &[Event], deltas: Vec<Option<String>>) -> Vec<HistoryRow> {
        let mut rows = Vec::new();
        for ((body, event), delta) in bodies.iter().zip(events).zip(deltas) {
            self.transcript.record(body, event.seq, delta, &mut rows);
        }
        self.transcript.end_batch(Instant::now(), &mut rows);
        rows
    }
}
