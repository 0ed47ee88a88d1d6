//! The inbound verbs of `/ws`, with the seed's semantics, error texts and the
//! fixes of docs/protocol.md §Upstream bugs fixed (ownership on every verb,
//! confined `cwd`, per-session seq, fan-out to every subscriber).

use std::{sync::Arc, time::Duration};

use serde_json::{Map, Value};
use tracing::Instrument;

use super::{
    Connection, Gateway,
    limits::{Limit, SEND_WINDOW, cap_replay},
    options::validate_options,
    run::RunPlan,
    valid_session_id,
};
use crate::{
    protocol::{
        ErrorCode, Inbound, PermissionAnswer, ProtocolError, SubscribeTarget, chat_accepted, chat_subscribed,
        parse_inbound,
    },
    runs::{PriorSend, RegistryError, RunStart, Subscription},
    runtime::{RunRequest, sandbox::Launch},
    store::{LastRequest, SessionRow},
};

/// How often a subscribe waiting out a registry's recovery reads again.
const SETTLE_POLL: Duration = Duration::from_millis(200);

impl Gateway {
    /// Handles one inbound text frame; a rejection is answered as `protocol_error`.
    pub async fn dispatch(self: &Arc<Self>, conn: &Arc<Connection>, text: &str) {
        let parsed = parse_inbound(text);
        let span = match &parsed {
            Ok(Inbound::Send { session_id, .. }) => tracing::debug_span!("chat.send", session_id = %session_id),
            Ok(Inbound::Abort { session_id }) => tracing::debug_span!("chat.abort", session_id = %session_id),
            Ok(Inbound::Subscribe { targets }) => tracing::debug_span!("chat.subscribe", targets = targets.len()),
            Ok(Inbound::Unsubscribe { .. }) => tracing::debug_span!("chat.unsubscribe"),
            Ok(Inbound::PermissionResponse { request_id, .. }) => {
                tracing::debug_span!("chat.permission-response", request_id = request_id.as_deref().unwrap_or(""))
            }
            Err(_) => tracing::debug_span!("invalid frame"),
        };
        self.dispatch_parsed(conn, parsed).instrument(span).await;
    }

    async fn dispatch_parsed(self: &Arc<Self>, conn: &Arc<Connection>, parsed: Result<Inbound, ProtocolError>) {
        let result = match parsed {
            Ok(Inbound::Send { session_id, content, options, client_request_id }) => {
                let key = client_request_id.as_deref();
                self.chat_send(conn, &session_id, content, &options, key).await.map_err(|e| e.with_request(key))
            }
            Ok(Inbound::Abort { session_id }) => self.chat_abort(conn, &session_id).await,
            Ok(Inbound::Subscribe { targets }) => {
                self.chat_subscribe(conn, targets).await;
                Ok(())
            }
            Ok(Inbound::Unsubscribe { session_ids }) => {
                for id in session_ids {
                    conn.detach(&id);
                }
                Ok(())
            }
            Ok(Inbound::PermissionResponse { request_id, answer }) => {
                self.permission_response(conn, request_id, answer).await;
                Ok(())
            }
            Err(e) => Err(e),
        };
        if let Err(error) = result {
            metrics::counter!("chatgate_protocol_errors_total", "code" => error.code.as_str()).increment(1);
            conn.send(error.to_frame());
        }
    }

    /// The user's session, or the seed's `SESSION_NOT_FOUND` for a missing,
    /// malformed, archived or foreign one.
    async fn owned_session(&self, conn: &Connection, session_id: &str) -> Result<SessionRow, ProtocolError> {
        let not_found = || {
            ProtocolError::new(
                ErrorCode::SessionNotFound,
                format!("Session \"{session_id}\" was not found. Create it via POST /api/providers/sessions first."),
            )
            .with_session(session_id)
        };
        if !valid_session_id(session_id) {
            return Err(not_found());
        }
        match self.store.session(&conn.user_id, session_id).await {
            Ok(Some(row)) if !row.is_archived => Ok(row),
            // The caller's own session: say why, and how to bring it back.
            Ok(Some(_)) => Err(ProtocolError::new(
                ErrorCode::SessionNotFound,
                format!(
                    "Session \"{session_id}\" is archived. Restore it via POST /api/providers/sessions/{session_id}/restore first."
                ),
            )
            .with_session(session_id)),
            Ok(None) => Err(not_found()),
            Err(e) => {
                metrics::counter!("chatgate_backend_errors_total", "backend" => "database").increment(1);
                tracing::warn!(error = %e, "session lookup failed");
                Err(unavailable(session_id, "The session database cannot be reached."))
            }
        }
    }

    async fn chat_send(
        self: &Arc<Self>,
        conn: &Arc<Connection>,
        session_id: &str,
        content: String,
        options: &Map<String, Value>,
        key: Option<&str>,
    ) -> Result<(), ProtocolError> {
        let _admission = self.admission.read().await;
        if self.is_draining() {
            let refusal = unavailable(session_id, "This node is draining; reconnect and send again.");
            return self.refuse_before_lock(conn, session_id, key, refusal).await;
        }
        // The budget (Redis) and the session row (SQL) are read side by side.
        let (admitted, session) = tokio::join!(self.admit_send(conn, session_id), self.owned_session(conn, session_id));
        match admitted {
            Err(refusal) if refusal.code == ErrorCode::RateLimited => {
                return self.refuse_before_lock(conn, session_id, key, refusal).await;
            }
            other => other?,
        }
        let session = session?;
        if let (Some(key), Some(last)) = (key, &session.last_request)
            && last.key == key
        {
            return self.answer_from_sql(conn, session_id, key, last).await;
        }
        let Some(runtime) = self.runtimes.get(&session.provider).cloned() else {
            return Err(ProtocolError::new(
                ErrorCode::UnsupportedProvider,
                format!("Provider \"{}\" is not available.", session.provider),
            )
            .with_session(session_id));
        };
        // Checked again at every run: the directory may have been swapped for a symlink out.
        let workspaces = &self.settings.workspaces;
        let project_path = workspaces.resolve_existing_project(&conn.user_id, &session.project_path).map_err(|_| {
            ProtocolError::new(
                ErrorCode::InvalidOptions,
                "The session's project path no longer resolves inside your workspace root.".to_string(),
            )
            .with_session(session_id)
        })?;
        let (run_options, cwd) =
            validate_options(session_id, &project_path, options, self.settings.allow_bypass_permissions)?;
        // The sender follows its own run, which takes a subscription slot.
        if !conn.is_subscribed(session_id)
            && let Err(refusal) = self.check_subscription_slot(conn, session_id)
        {
            return self.refuse_before_lock(conn, session_id, key, refusal).await;
        }
        let Ok(slot) = self.run_slots.clone().try_acquire_owned() else {
            Limit::MaxRuns.refused();
            let refusal = ProtocolError::new(
                ErrorCode::NodeBusy,
                format!(
                    "This node is running its maximum of {} runs; nothing was started. Send again shortly.",
                    self.settings.max_runs
                ),
            )
            .with_session(session_id);
            return self.refuse_before_lock(conn, session_id, key, refusal).await;
        };
        let home = workspaces.ensure_home(&conn.user_id).map_err(|e| {
            tracing::warn!(error = %e, "cannot make the user's provider home");
            unavailable(session_id, "This node cannot prepare your provider home; nothing was started.")
        })?;
        let run_id = uuid::Uuid::new_v4().to_string();
        let start = RunStart {
            session_id: session_id.to_string(),
            run_id: run_id.clone(),
            provider: session.provider.clone(),
            user_id: conn.user_id.clone(),
            node_id: self.settings.node_id.clone(),
            seq_floor: session.last_seq,
            last_active_ms: session.updated_at,
            prompt: content.clone(),
            request_key: key.map(str::to_string),
        };
        // The sender follows its own run (unless it already does): its subscription is made
        // beside the start, from the top, so it holds every event the run will append; it is
        // dropped if nothing starts.
        let follow = async {
            if conn.is_subscribed(session_id) {
                return None;
            }
            self.registry.subscribe(session_id, u64::MAX).await.ok()
        };
        let (started, following) = tokio::join!(self.registry.start_run(start), follow);
        let grant = match started {
            Ok(grant) => grant,
            Err(RegistryError::RunInProgress) => return Err(run_in_progress(session_id)),
            Err(RegistryError::AlreadySent(prior)) => return answer_prior(conn, session_id, key, prior),
            Err(RegistryError::Unconfirmed(e)) => {
                tracing::warn!(error = %e, "start_run unconfirmed");
                let resend =
                    if key.is_some() { "send again with the same clientRequestId" } else { "look at the session" };
                return Err(unavailable(
                    session_id,
                    &format!("The run coordinator failed mid-start: the run may have started; {resend} to learn what became of it."),
                )
                .with_unknown_outcome());
            }
            Err(RegistryError::Recovering { retry_after }) => {
                return Err(unavailable(
                    session_id,
                    &format!(
                        "Redis lost this session's run state (it restarted); a run that may still be live \
                         gets {} s to return. Nothing was started; send again then.",
                        retry_after.as_millis().div_ceil(1000)
                    ),
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, "start_run failed");
                return Err(unavailable(session_id, "The run coordinator cannot be reached; nothing was started."));
            }
        };
        if let Some(key) = key {
            conn.send(chat_accepted(session_id, key, &run_id, grant.first_seq, false, true));
        }
        if let Some(subscription) = following {
            let mut live = subscription.live;
            live.raise_floor(session.last_seq);
            conn.attach(session_id, live, self.registry.clone());
        }
        let request = RunRequest {
            session_id: session_id.to_string(),
            content,
            provider_session_id: session.provider_session_id.clone(),
            cwd,
            project_path,
            options: run_options,
        };
        tracing::info!(session_id, run_id = %run_id, provider = %session.provider, "run started");
        let launch = Launch::new(self.settings.containment.clone(), home, request.project_path.clone(), &run_id);
        self.spawn_run(RunPlan {
            session,
            user_id: conn.user_id.clone(),
            run_id,
            request,
            runtime,
            grant,
            launch,
            slot,
            request_key: key.map(str::to_string),
        });
        Ok(())
    }

    /// A keyed send refused before it reached the run lock (draining node, rate
    /// limit, busy node) may be the resend of one that did start: when the
    /// session saw its key, the answer is what became of the first send.
    async fn refuse_before_lock(
        &self,
        conn: &Connection,
        session_id: &str,
        key: Option<&str>,
        refusal: ProtocolError,
    ) -> Result<(), ProtocolError> {
        let Some(request_key) = key else { return Err(refusal) };
        if self.owned_session(conn, session_id).await.is_err() {
            return Err(refusal);
        }
        match self.registry.prior_send(session_id, request_key).await {
            Ok(Some(prior)) => answer_prior(conn, session_id, key, prior),
            Ok(None) => Err(refusal),
            Err(e) => {
                tracing::warn!(error = %e, "idempotency key lookup failed");
                Err(refusal)
            }
        }
    }

    /// A resend of the key SQL keeps as the session's last: the registry's
    /// answer when it still has one, else the run SQL names (the registry lost
    /// its record: a restarted node, a Redis that came back empty).
    async fn answer_from_sql(
        &self,
        conn: &Connection,
        session_id: &str,
        key: &str,
        last: &LastRequest,
    ) -> Result<(), ProtocolError> {
        if let Ok(Some(prior)) = self.registry.prior_send(session_id, key).await {
            return answer_prior(conn, session_id, Some(key), prior);
        }
        let running = self.registry.snapshot(session_id).await.ok().and_then(|s| s.run_id);
        let is_processing = running.as_deref() == Some(last.run_id.as_str());
        let prior = PriorSend::Started { run_id: last.run_id.clone(), first_seq: last.first_seq, is_processing };
        answer_prior(conn, session_id, Some(key), prior)
    }

    /// `--max-sends-per-minute`, counted by the registry (cluster-wide).
    async fn admit_send(&self, conn: &Connection, session_id: &str) -> Result<(), ProtocolError> {
        let limit = self.settings.limits.max_sends_per_minute;
        match self.registry.admit_send(&conn.user_id, limit, SEND_WINDOW).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                Limit::SendsPerMinute.refused();
                Err(ProtocolError::new(
                    ErrorCode::RateLimited,
                    format!("Too many chat.send: at most {limit} per minute; nothing was started."),
                )
                .with_session(session_id))
            }
            Err(e) => {
                metrics::counter!("chatgate_backend_errors_total", "backend" => "redis").increment(1);
                tracing::warn!(error = %e, "send rate check failed");
                Err(unavailable(session_id, "The run coordinator cannot be reached; nothing was started."))
            }
        }
    }

    /// `--max-subscriptions-per-socket`: a new subscription needs a free slot.
    fn check_subscription_slot(&self, conn: &Connection, session_id: &str) -> Result<(), ProtocolError> {
        let max = self.settings.limits.max_subscriptions_per_socket;
        if conn.subscription_count() < usize::try_from(max).unwrap_or(usize::MAX) {
            return Ok(());
        }
        Limit::SubscriptionsPerSocket.refused();
        Err(ProtocolError::new(
            ErrorCode::RateLimited,
            format!("This socket already has {max} subscriptions; unsubscribe from one first."),
        )
        .with_session(session_id))
    }

    async fn chat_abort(&self, conn: &Connection, session_id: &str) -> Result<(), ProtocolError> {
        let routed = if valid_session_id(session_id) {
            self.registry.route_abort(session_id, &conn.user_id).await.map_err(|e| {
                tracing::warn!(error = %e, "abort routing failed");
                unavailable(session_id, "The run coordinator cannot be reached.")
            })?
        } else {
            false
        };
        if routed {
            Ok(())
        } else {
            Err(ProtocolError::new(ErrorCode::NoActiveRun, format!("Session \"{session_id}\" has no active run."))
                .with_session(session_id))
        }
    }

    async fn chat_subscribe(&self, conn: &Arc<Connection>, targets: Vec<SubscribeTarget>) {
        for target in targets {
            let id = target.session_id.as_str();
            if !conn.is_subscribed(id)
                && let Err(error) = self.check_subscription_slot(conn, id)
            {
                metrics::counter!("chatgate_protocol_errors_total", "code" => error.code.as_str()).increment(1);
                conn.send(error.to_frame());
                continue;
            }
            let owned = match self.owned_or_archived(conn, id).await {
                Ok(owned) => owned,
                Err(error) => {
                    conn.send(error.to_frame());
                    continue;
                }
            };
            let Some(session) = owned else {
                // Another user's or a missing session: an idle ack, never an event.
                conn.send(chat_subscribed(id, false, 0, None, &[], false));
                continue;
            };
            conn.detach(id);
            let subscription = match self.subscribe_settled(&session, target.last_seq).await {
                Ok(subscription) => subscription,
                Err(e) => {
                    tracing::warn!(error = %e, "subscribe failed");
                    conn.send(unavailable(id, "The run coordinator cannot be reached.").to_frame());
                    continue;
                }
            };
            let mut replay = subscription.replay;
            let cut = cap_replay(&mut replay, self.settings.limits.max_replay_bytes);
            let replay_truncated = subscription.replay_truncated || cut;
            let snapshot = &subscription.snapshot;
            let last_seq = session.visible_last_seq(snapshot.is_processing, snapshot.last_seq);
            metrics::counter!("chatgate_subscribes_total").increment(1);
            if replay_truncated {
                metrics::counter!("chatgate_replay_truncated_total").increment(1);
            }
            metrics::counter!("chatgate_replayed_events_total").increment(replay.len() as u64);
            conn.send(chat_subscribed(
                id,
                snapshot.is_processing,
                last_seq,
                snapshot.run_id.as_deref(),
                &snapshot.pending_permissions,
                replay_truncated,
            ));
            for event in replay {
                conn.send_event(event.frame);
            }
            let mut live = subscription.live;
            live.raise_floor(last_seq);
            conn.attach(id, live, self.registry.clone());
        }
    }

    /// `registry.subscribe`, answered only once the registry's view of the session
    /// can be trusted: when it knows less than SQL (`lastSeq` below the session's
    /// and no run) it may have lost the session's state, and a run still live on
    /// its owner comes back within a lease ([`crate::runs::SessionFeeds::settle`]).
    async fn subscribe_settled(&self, session: &SessionRow, after: u64) -> Result<Subscription, RegistryError> {
        let id = session.session_id.as_str();
        let subscription = self.registry.subscribe(id, after).await?;
        let snapshot = &subscription.snapshot;
        if snapshot.is_processing || snapshot.last_seq >= session.last_seq {
            return Ok(subscription);
        }
        drop(subscription);
        let give_up = tokio::time::Instant::now() + self.settings.run_lease * 2;
        loop {
            let wait = self.registry.settle(id, session.last_seq, session.updated_at).await?;
            if wait.is_zero() || tokio::time::Instant::now() >= give_up {
                break;
            }
            tokio::time::sleep(wait.min(SETTLE_POLL)).await;
        }
        // Nothing was lost, the owner is back, or the wait is over: read again.
        self.registry.subscribe(id, after).await
    }

    /// Like `owned_session`, but archived sessions may be watched and a missing one is `None`.
    async fn owned_or_archived(
        &self,
        conn: &Connection,
        session_id: &str,
    ) -> Result<Option<SessionRow>, ProtocolError> {
        if !valid_session_id(session_id) {
            return Ok(None);
        }
        self.store.session(&conn.user_id, session_id).await.map_err(|e| {
            tracing::warn!(error = %e, "session lookup failed");
            unavailable(session_id, "The session database cannot be reached.")
        })
    }

    async fn permission_response(&self, conn: &Connection, request_id: Option<String>, answer: PermissionAnswer) {
        let Some(request_id) = request_id else { return };
        if let Err(e) = self.registry.route_permission(&conn.user_id, &request_id, answer).await {
            tracing::warn!(error = %e, "permission routing failed");
        }
    }
}

/// The answer to a send whose key the session saw: what became of the first
/// send with it (docs/protocol.md §Idempotent sends). Nothing is started.
fn answer_prior(conn: &Connection, session_id: &str, key: Option<&str>, prior: PriorSend) -> Result<(), ProtocolError> {
    metrics::counter!("chatgate_sends_duplicate_total").increment(1);
    match prior {
        PriorSend::Started { run_id, first_seq, is_processing } => {
            if let Some(key) = key {
                conn.send(chat_accepted(session_id, key, &run_id, first_seq, true, is_processing));
            }
            Ok(())
        }
        PriorSend::RefusedBusy => Err(run_in_progress(session_id).as_duplicate()),
    }
}

fn run_in_progress(session_id: &str) -> ProtocolError {
    ProtocolError::new(ErrorCode::RunInProgress, format!("Session \"{session_id}\" already has a run in progress."))
        .with_session(session_id)
}

fn unavailable(session_id: &str, message: &str) -> ProtocolError {
    ProtocolError::new(ErrorCode::BackendUnavailable, message).with_session(session_id)
}
