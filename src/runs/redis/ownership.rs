//! [`RunOwnership`] over Redis: taking the run lock, appending batches,
//! renewing, pending approvals, and the history hand-over. Every write is one
//! fenced script (see [`super::scripts`]); a lock Redis lost is re-taken by the
//! owner's next append or renewal ([`super::recovery`]).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ::redis::AsyncCommands;
use async_trait::async_trait;
use serde_json::Value as Json;
use tokio::sync::mpsc;

use super::{
    RedisRegistry,
    codec::{OwnerRecord, RequestRecord},
    keys,
    node::{self, Failure, MAX_SCRIPT_SEQ, OwnedRun, PERMISSION_TTL, millis, run_key},
    recovery::recently_active,
    scripts::{AppendInput, AppendReply, OrphanComplete, RenewInput, RenewReply, RequestKey, StartInput, StartReply},
};
use crate::{
    protocol::{EventBody, now_iso, sequenced},
    runs::{
        CONTROL_CAPACITY, Event, OrphanedRun, PriorSend, RegistryError, RunGrant, RunLease, RunOwnership, RunStart,
    },
    sync::lock_unpoisoned,
};

/// What the start script answered.
enum Started {
    Granted(Granted),
    Busy,
    Recovering(Duration),
    AlreadySent(PriorSend),
}

/// A granted start: the lock JSON, and the orphan it ended first (if any).
#[derive(Default)]
struct Granted {
    owner_json: String,
    reaped: String,
    reaped_pending: Vec<String>,
    reaped_prompt: String,
}

/// How long a start whose reply was lost is read back before it is reported as unknown.
const READ_BACK_WINDOW: Duration = Duration::from_secs(1);

#[async_trait]
impl RunOwnership for RedisRegistry {
    /// The local run is registered first, then the start script takes the lock
    /// (ending an orphan first, checking and recording the idempotency key) and
    /// the run is indexed.
    async fn start_run(&self, start: RunStart) -> Result<RunGrant, RegistryError> {
        let node = &self.node;
        let (control, control_rx) = mpsc::channel(CONTROL_CAPACITY);
        {
            let mut runs = lock_unpoisoned(&node.runs);
            let key = run_key(&start.session_id, &start.run_id);
            if runs.contains_key(&key) {
                return Err(RegistryError::RunInProgress);
            }
            // Registered before the lock is visible, so no control message can miss it.
            runs.insert(
                key,
                OwnedRun {
                    user_id: start.user_id.clone(),
                    control,
                    owner_json: String::new(),
                    last_seq: start.seq_floor,
                    pending: Vec::new(),
                },
            );
        }
        let session_id = start.session_id.as_str();
        let (started_at, orphan_event_id) = (now_iso(), uuid::Uuid::new_v4().to_string());
        let request =
            start.request_key.as_deref().map(|key| RequestKey { key, window_ms: node.idempotency_window_ms() });
        let input = StartInput {
            session_id,
            run_id: &start.run_id,
            node_id: &node.id,
            provider: &start.provider,
            user_id: &start.user_id,
            started_at: &started_at,
            seqs: node.seq_rules(start.seq_floor),
            orphan: OrphanComplete { event_id: &orphan_event_id, timestamp: &started_at, error: node::OWNER_LOST },
            recently_active: recently_active(start.last_active_ms),
            prompt: &start.prompt,
            request,
        };
        let inv = node.scripts.start(&input);
        let lease = RunLease { session_id: start.session_id.clone(), run_id: start.run_id.clone() };
        // Whether an attempt may have taken effect though its reply was lost.
        let maybe_applied = AtomicBool::new(false);
        let attempt = || async {
            let reply = node.invoke::<StartReply>(&inv).await;
            if reply.as_ref().is_err_and(Failure::may_have_applied) {
                maybe_applied.store(true, Ordering::Relaxed);
            }
            reply
        };
        let outcome = match node.retrying("start", node.retry_window(), attempt).await {
            Ok(reply) => self.start_outcome(&start, reply).await,
            Err(e) if maybe_applied.load(Ordering::Relaxed) => self.read_back(&start, &e).await,
            Err(e) => Err(e.into()),
        };
        let Granted { owner_json, reaped, reaped_pending, reaped_prompt } = match outcome {
            Ok(Started::Granted(granted)) => granted,
            Ok(Started::Busy) => {
                self.drop_local_run(&lease);
                return Err(RegistryError::RunInProgress);
            }
            Ok(Started::AlreadySent(prior)) => {
                self.drop_local_run(&lease);
                return Err(RegistryError::AlreadySent(prior));
            }
            Ok(Started::Recovering(retry_after)) => {
                self.drop_local_run(&lease);
                metrics::counter!("chatgate_runs_refused_recovering_total").increment(1);
                tracing::warn!(
                    session_id,
                    "Redis lost this session's state; refusing new runs until a live owner could re-take its lock"
                );
                return Err(RegistryError::Recovering { retry_after });
            }
            Err(e) => {
                self.drop_local_run(&lease);
                if matches!(e, RegistryError::Unconfirmed(_)) {
                    self.index_if_started(&start);
                }
                return Err(e);
            }
        };
        let owner = OwnerRecord::parse(&owner_json).map_err(Failure::from)?;
        if let Some(run) = lock_unpoisoned(&node.runs).get_mut(&run_key(session_id, &start.run_id)) {
            run.owner_json = owner_json;
            run.last_seq = owner.first_seq.saturating_sub(1);
        }
        if !reaped.is_empty()
            && let Ok(orphan) = OwnerRecord::parse(&reaped)
        {
            tracing::warn!(session_id, run_id = orphan.run_id, "ended a run whose owner was lost");
            metrics::counter!("chatgate_runs_reaped_total").increment(1);
            // The orphan's complete took the seq just before this run's first.
            let complete_seq = owner.first_seq.saturating_sub(1);
            let prompt = Some(reaped_prompt).filter(|p| !p.is_empty());
            node.notify_orphan(session_id, &orphan.run_id, orphan.first_seq, complete_seq, prompt);
            node.forget_run(session_id, &orphan.run_id, Some(&orphan.user_id), &reaped_pending).await;
        }
        node.index_run(session_id, &start.run_id, &start.user_id).await;
        Ok(RunGrant { lease, first_seq: owner.first_seq, control: control_rx })
    }

    /// The key's record and the lock, read together (one slot, one MGET).
    async fn prior_send(&self, session_id: &str, request_key: &str) -> Result<Option<PriorSend>, RegistryError> {
        let keys = [keys::request(session_id, request_key), keys::run(session_id)];
        let [record, lock] = self.node.read_strings("prior_send", self.node.retry_window(), keys).await?;
        let Some(record) = record else { return Ok(None) };
        let record = RequestRecord::parse(&record).map_err(Failure::from)?;
        Ok(Some(record.prior_send(lock.as_deref().unwrap_or(""))))
    }

    /// One append script call under a fresh batch id.
    async fn append(&self, lease: &RunLease, batch: Vec<EventBody>) -> Result<Vec<Event>, RegistryError> {
        let bodies: Vec<&str> = batch.iter().map(|b| b.json.as_str()).collect();
        self.append_batch_as(&new_batch_id(), lease, &bodies, false).await
    }

    /// The append script with the terminal flag, which also ends the run (`finish`).
    async fn complete(&self, lease: &RunLease, body: EventBody) -> Result<Event, RegistryError> {
        let mut events = self.append_batch_as(&new_batch_id(), lease, &[body.json.as_str()], true).await?;
        events.pop().ok_or_else(|| RegistryError::Unavailable("append returned no event".into()))
    }

    /// Compare-and-PEXPIRE, or a re-take when Redis lost the lock with everything else.
    async fn renew(&self, lease: &RunLease) -> Result<(), RegistryError> {
        let node = &self.node;
        let session_id = lease.session_id.as_str();
        let (owner_json, floor) = self.re_take_state(lease);
        let input = RenewInput {
            session_id,
            run_id: &lease.run_id,
            lease_ms: millis(node.opts.lease),
            owner_json: &owner_json,
            floor: floor.min(MAX_SCRIPT_SEQ - 1),
            margin: node.margin(),
        };
        let inv = node.scripts.renew(&input);
        let reply: RenewReply = node.retrying("renew", node.retry_window(), || node.invoke(&inv)).await?;
        match reply {
            RenewReply::Renewed => Ok(()),
            RenewReply::Retaken => {
                tracing::warn!(session_id, run_id = lease.run_id, "Redis lost the run's lock; re-took it");
                self.restore_local_run(lease).await;
                Ok(())
            }
            RenewReply::Fenced => {
                self.drop_local_run(lease);
                Err(RegistryError::Fenced)
            }
        }
    }

    /// Records a pending approval (fenced), then its `cg:perm:{R}` lookup key.
    async fn add_pending(&self, lease: &RunLease, request_id: &str, request: Json) -> Result<(), RegistryError> {
        let json = request.to_string();
        self.record_pending(lease, request_id, &json).await?;
        if let Some(run) = lock_unpoisoned(&self.node.runs).get_mut(&run_key(&lease.session_id, &lease.run_id)) {
            run.pending.push((request_id.to_string(), json));
        }
        Ok(())
    }

    /// Forgets a pending approval; a fenced run has none left anyway.
    async fn remove_pending(&self, lease: &RunLease, request_id: &str) -> Result<(), RegistryError> {
        let node = &self.node;
        if let Some(run) = lock_unpoisoned(&node.runs).get_mut(&run_key(&lease.session_id, &lease.run_id)) {
            run.pending.retain(|(id, _)| id != request_id);
        }
        let inv = node.scripts.pending(&lease.session_id, &lease.run_id, request_id, None);
        // Fenced is fine here: the run's end cleared its approvals already.
        let _: String = node.retrying("pending", node.retry_window(), || node.invoke(&inv)).await?;
        let key = keys::permission(request_id);
        node.retrying("permission_key", node.retry_window(), || async {
            let mut conn = node.conn().await?;
            let _: () = conn.del(&key).await?;
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// The owner stored its run's `complete` in SQL: nothing is left for the
    /// sweeper (its `cg:runs` entry and the saving marker go).
    async fn history_saved(&self, lease: &RunLease) {
        let (session_id, run_id) = (lease.session_id.as_str(), lease.run_id.as_str());
        let commands = [
            ::redis::Cmd::zrem(keys::RUNS_INDEX, node::index_member(session_id, run_id)),
            ::redis::Cmd::del(keys::saving(session_id, run_id)),
        ];
        if let Err(e) = self.node.query_each::<()>(&commands).await {
            tracing::debug!(session_id, run_id, error = %e, "could not clear a saved run's marker; the sweeper will");
        }
    }

    /// Forgets the local run (its control sender goes); Redis is left to the reapers.
    async fn abandon(&self, lease: &RunLease) {
        lock_unpoisoned(&self.node.runs).remove(&run_key(&lease.session_id, &lease.run_id));
    }

    /// The receiver of the node's reaped-run notices, handed out once.
    fn take_orphans(&self) -> Option<mpsc::Receiver<OrphanedRun>> {
        lock_unpoisoned(&self.orphans).take()
    }
}

/// A fresh append batch id (a retry of the same call reuses it).
fn new_batch_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl RedisRegistry {
    /// What a fenced write of this node's run needs to re-take a lock Redis lost: the
    /// lock JSON and the last seq the run was given (empty and 0 for a run not held here).
    fn re_take_state(&self, lease: &RunLease) -> (String, u64) {
        lock_unpoisoned(&self.node.runs)
            .get(&run_key(&lease.session_id, &lease.run_id))
            .map(|r| (r.owner_json.clone(), r.last_seq))
            .unwrap_or_default()
    }

    /// Appends one batch under `batch_id`; a second call with the same id (a
    /// retry after a lost reply) returns the first call's seqs and appends nothing.
    pub(super) async fn append_batch_as(
        &self,
        batch_id: &str,
        lease: &RunLease,
        bodies: &[&str],
        terminal: bool,
    ) -> Result<Vec<Event>, RegistryError> {
        let node = &self.node;
        let session_id = lease.session_id.as_str();
        let (owner_json, floor) = self.re_take_state(lease);
        let input = AppendInput {
            session_id,
            run_id: &lease.run_id,
            batch_id,
            owner_json: &owner_json,
            seqs: node.seq_rules(floor),
            terminal,
            bodies,
        };
        let inv = node.scripts.append(&input);
        // The same batch id on every attempt: a retry of an applied batch answers Duplicate.
        let reply: AppendReply = node.retrying("append", node.opts.lease, || node.invoke(&inv)).await?;
        let (first, retaken, pending) = match reply {
            AppendReply::Fenced => {
                metrics::counter!("chatgate_redis_fenced_writes_total").increment(1);
                self.drop_local_run(lease);
                return Err(RegistryError::Fenced);
            }
            AppendReply::Duplicate { first } => (first, false, Vec::new()),
            AppendReply::Appended { first, retaken, pending_ids } => (first, retaken, pending_ids),
        };
        metrics::histogram!("chatgate_redis_append_batch_events").record(bodies.len() as f64);
        let run_id: Arc<str> = Arc::from(lease.run_id.as_str());
        let last_index = bodies.len().saturating_sub(1);
        let events: Vec<Event> = bodies
            .iter()
            .enumerate()
            .map(|(i, body)| {
                let seq = first + i as u64;
                Event {
                    seq,
                    run_id: run_id.clone(),
                    terminal: terminal && i == last_index,
                    frame: sequenced(body, seq),
                }
            })
            .collect();
        if retaken {
            tracing::warn!(session_id, run_id = lease.run_id, "Redis lost the run's lock; re-took it");
            self.restore_local_run(lease).await;
        }
        if terminal {
            // The global index entry stays until the owner stored the `complete` (`history_saved`).
            let user_id = self.drop_local_run(lease).map(|r| r.user_id);
            node.forget_ended_run(session_id, &lease.run_id, user_id.as_deref(), &pending).await;
        } else if let Some(last) = events.last()
            && let Some(run) = lock_unpoisoned(&node.runs).get_mut(&run_key(session_id, &lease.run_id))
        {
            run.last_seq = run.last_seq.max(last.seq);
        }
        Ok(events)
    }

    /// What the start script's reply means for this start.
    async fn start_outcome(&self, start: &RunStart, reply: StartReply) -> Result<Started, RegistryError> {
        let ours = |lock_json: &str| OwnerRecord::names_run(Some(lock_json), &start.run_id);
        Ok(match reply {
            StartReply::Recovering { retry_ms } => Started::Recovering(Duration::from_millis(retry_ms)),
            StartReply::Seen { record_json, lock_json } => {
                let record = RequestRecord::parse(&record_json).map_err(Failure::from)?;
                if record.run_id == start.run_id && record.refused.is_none() {
                    // A retried start whose first attempt went through finds its own key.
                    if !ours(&lock_json) {
                        return Err(RegistryError::Unconfirmed("the run's lock was gone before it began".into()));
                    }
                    Started::Granted(Granted { owner_json: lock_json, ..Granted::default() })
                } else {
                    Started::AlreadySent(record.prior_send(&lock_json))
                }
            }
            StartReply::Busy => {
                // A retried start whose first attempt went through finds its own lock.
                let [held] =
                    self.node.read_strings("read_lock", Duration::ZERO, [keys::run(&start.session_id)]).await?;
                match held.filter(|j| ours(j)) {
                    Some(owner_json) => Started::Granted(Granted { owner_json, ..Granted::default() }),
                    None => Started::Busy,
                }
            }
            StartReply::Started { owner_json, reaped_owner_json, reaped_pending_ids, reaped_prompt } => {
                Started::Granted(Granted {
                    owner_json,
                    reaped: reaped_owner_json,
                    reaped_pending: reaped_pending_ids,
                    reaped_prompt,
                })
            }
        })
    }

    /// After a start whose reply was lost: whether the lock is this run's.
    /// The lock is ours: go on. Neither the lock nor the owner record is ours:
    /// nothing was started. The owner record only (the lease lapsed meanwhile),
    /// or nothing readable: unknown.
    async fn read_back(&self, start: &RunStart, failure: &Failure) -> Result<Started, RegistryError> {
        let keys = [keys::run(&start.session_id), keys::owner(&start.session_id)];
        let ours = |json: &Option<String>| OwnerRecord::names_run(json.as_deref(), &start.run_id);
        let unknown = |why: String| {
            metrics::counter!("chatgate_runs_unconfirmed_total").increment(1);
            tracing::warn!(
                session_id = start.session_id,
                run_id = start.run_id,
                why,
                "a run's start could not be confirmed; if it took the lock it ends as an orphan"
            );
            Err(RegistryError::Unconfirmed(failure.to_string()))
        };
        match self.node.read_strings("read_back", READ_BACK_WINDOW, keys).await {
            Ok([lock, owner]) => match (lock, owner) {
                (lock, _) if ours(&lock) => {
                    Ok(Started::Granted(Granted { owner_json: lock.unwrap_or_default(), ..Granted::default() }))
                }
                (_, owner) if ours(&owner) => unknown("its lease lapsed before it could be confirmed".into()),
                _ => Err(RegistryError::Unavailable(failure.to_string())),
            },
            Err(e) => unknown(e.to_string()),
        }
    }

    /// An unconfirmed start that did take the lock has no owner to drive it:
    /// index it (once Redis answers again) so the sweeper ends it as an orphan
    /// when its lease lapses, `complete` and history included. The owner
    /// record says whether it did (it outlives the lease until the run is ended).
    fn index_if_started(&self, start: &RunStart) {
        let registry = self.clone();
        let (session_id, run_id, user_id) = (start.session_id.clone(), start.run_id.clone(), start.user_id.clone());
        tokio::spawn(async move {
            let node = &registry.node;
            let owner = node.read_strings("read_owner", node::HOUSEKEEPING_WINDOW, [keys::owner(&session_id)]).await;
            if let Ok([owner]) = owner
                && OwnerRecord::names_run(owner.as_deref(), &run_id)
            {
                node.index_run(&session_id, &run_id, &user_id).await;
            }
        });
    }

    /// Forgets a local run (ended or fenced); drops its control sender.
    pub(super) fn drop_local_run(&self, lease: &RunLease) -> Option<OwnedRun> {
        lock_unpoisoned(&self.node.runs).remove(&run_key(&lease.session_id, &lease.run_id))
    }

    /// After a re-take (Redis lost its data) the run indexes and the pending
    /// approvals (with their lookup keys, which answers from any node need) are
    /// gone too: record them again.
    async fn restore_local_run(&self, lease: &RunLease) {
        let local = lock_unpoisoned(&self.node.runs)
            .get(&run_key(&lease.session_id, &lease.run_id))
            .map(|r| (r.user_id.clone(), r.pending.clone()));
        let Some((user_id, pending)) = local else { return };
        self.node.index_run(&lease.session_id, &lease.run_id, &user_id).await;
        for (request_id, json) in pending {
            if let Err(e) = self.record_pending(lease, &request_id, &json).await {
                tracing::warn!(session_id = lease.session_id, request_id, error = %e, "could not restore a pending approval");
            }
        }
    }

    /// Writes a pending approval (fenced) and its `cg:perm:{R}` lookup key.
    async fn record_pending(&self, lease: &RunLease, request_id: &str, json: &str) -> Result<(), RegistryError> {
        let node = &self.node;
        let inv = node.scripts.pending(&lease.session_id, &lease.run_id, request_id, Some(json));
        let reply: String = node.retrying("pending", node.retry_window(), || node.invoke(&inv)).await?;
        if reply != "OK" {
            return Err(RegistryError::Fenced);
        }
        let key = keys::permission(request_id);
        node.retrying("permission_key", node.retry_window(), || async {
            let mut conn = node.conn().await?;
            let _: () = conn.pset_ex(&key, &lease.session_id, millis(PERMISSION_TTL)).await?;
            Ok(())
        })
        .await?;
        Ok(())
    }
}
