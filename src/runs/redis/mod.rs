//! Run registry over Redis: cluster mode (design.md).
//!
//! Keys and channels are in [`keys`], the atomic writes in [`scripts`]. The
//! owner appends through one Lua script per batch (fence, seq, XADD, PUBLISH);
//! a subscriber first holds the session's channel on its node ([`hub`]), then
//! reads lock, seq top and the current run's replay in one script, and its
//! [`LiveFeed`] merges the live events by seq (dropping duplicates, filling
//! gaps from the stream). Live messages reach feeds through the node's one
//! pub/sub connection ([`tasks::dispatch`]), which re-dials with backoff,
//! re-subscribes and catches up from the streams.
//!
//! Running runs are found through a per-user set `cg:user:{U}:runs`, so that
//! `GET /sessions/running` costs the caller's runs only; the sweeper walks a
//! global sorted set `cg:runs`, because it must see every run. Both are written
//! next to (not inside) the session scripts — a session's script may only touch
//! its own hash slot — so their entries can be stale: readers check each entry
//! against the session's owner record and drop the stale ones.
//!
//! Owner death: the lock expires; the owner record (`cg:{S}:owner`) stays.
//! The reap script ends such a run with the terminal `complete`
//! `{exitCode: 1, success: false, aborted: false, error: "run owner lost"}`
//! and succeeds for exactly one caller: nodes watching the session, the
//! one-per-period index sweep, or the next `start_run` on the session.
//!
//! Redis losing its data (restart without persistence): the owner re-takes its
//! vanished lock on its next append or renewal and its run continues; seq
//! counters are restored above anything known plus `max_events`, and the jump
//! reaches subscribers as a gap (`replayTruncated`).

mod codec;
mod hub;
pub mod keys;
mod node;
mod scripts;
mod tasks;

use std::{sync::Arc, time::Duration};

use ::redis::{AsyncCommands, AsyncConnectionConfig, Client, Value};
use async_trait::async_trait;
use deadpool_redis::{Manager, Pool, Runtime};
use serde_json::Value as Json;
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use self::{
    codec::OwnerRecord,
    hub::Hub,
    node::{
        Failure, LocalRun, MAX_SCRIPT_SEQ, Node, PERMISSION_TTL, Probe, Reaped, SEQ_IDLE_TTL, SeenRun, attach_feed,
        lock, millis, parse_index_member, run_key,
    },
    scripts::Scripts,
};
use super::{
    CONTROL_CAPACITY, Control, Event, LiveFeed, RegistryError, ReplayRange, RunGrant, RunLease, RunRegistry, RunStart,
    RunningRun, Snapshot, Subscription, feed::RangeSource,
};
use crate::protocol::{EventBody, Frame, PermissionAnswer, now_iso, sequenced};

/// Tuning of the Redis registry (interface §1 flags).
#[derive(Debug, Clone)]
pub struct RedisRegistryOptions {
    /// Run lock lease (`--run-lease`); owners renew every third of it.
    pub lease: Duration,
    /// Newest events kept per session for replay (`--replay-max-events`).
    pub max_events: u64,
    /// How long a finished run's events stay replayable (`--replay-retention`).
    pub retention: Duration,
}

/// Timeout of one Redis command on a pooled connection.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of opening a Redis connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pooled command connections (each is multiplexed).
const POOL_SIZE: usize = 8;

/// The run registry over Redis. Cheap to clone; background tasks stop when
/// the last clone drops.
#[derive(Clone)]
pub struct RedisRegistry {
    node: Arc<Node>,
    _tasks: Arc<DropGuard>,
}

impl RedisRegistry {
    /// Connects to Redis at `url` as node `node_id`: a command pool and a
    /// dedicated pub/sub connection, confirmed before this returns.
    pub async fn connect(url: &str, node_id: &str, opts: RedisRegistryOptions) -> Result<RedisRegistry, RegistryError> {
        let unavailable = |what: &str, e: &dyn std::fmt::Display| RegistryError::Unavailable(format!("{what}: {e}"));
        let client = Client::open(url).map_err(|e| unavailable("Redis URL", &e))?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let manager = Manager::new_with_config(url, config).map_err(|e| unavailable("Redis URL", &e))?;
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(RESPONSE_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| unavailable("Redis pool", &e))?;
        let instance = uuid::Uuid::new_v4().simple().to_string();
        let node_channel = keys::node_channel(node_id);
        let probe_channel = keys::probe_channel(node_id, &instance);
        let hub = Hub::new(client, &[node_channel.clone(), probe_channel.clone()]);
        let node = Arc::new(Node {
            id: node_id.to_string(),
            opts,
            pool,
            scripts: Scripts::new(),
            hub,
            node_channel,
            probe_channel,
            sessions: Default::default(),
            users: Default::default(),
            runs: Default::default(),
            probe: Probe { echo: watch::channel(0).0, status: std::sync::Mutex::new(Ok(())) },
        });
        let mut conn = node.conn().await.map_err(RegistryError::from)?;
        let _: String = ::redis::cmd("PING").query_async(&mut conn).await.map_err(|e| unavailable("Redis PING", &e))?;
        drop(conn);
        let stream = node.hub.connect(CONNECT_TIMEOUT).await.map_err(|e| unavailable("Redis pub/sub", &e))?;
        let cancel = CancellationToken::new();
        let redial = Arc::new(Notify::new());
        tokio::spawn(tasks::dispatch(node.clone(), stream, redial.clone(), cancel.clone()));
        tokio::spawn(tasks::probe(node.clone(), redial, cancel.clone()));
        tokio::spawn(tasks::sweep(node.clone(), cancel.clone()));
        Ok(RedisRegistry { node, _tasks: Arc::new(cancel.drop_guard()) })
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node.id
    }

    /// Ends the session's run if its owner is gone (lock expired, run not
    /// ended). `Ok(true)` for the one caller that ended it. The sweeper calls
    /// this on its own; it is public for operators and tests.
    pub async fn reap_orphan(&self, session_id: &str) -> Result<bool, RegistryError> {
        Ok(self.node.reap(session_id, None, 0).await? == Reaped::Ended)
    }

    /// Channels this node's pub/sub connection holds (node control and probe included).
    pub async fn held_channels(&self) -> usize {
        self.node.hub.channel_count().await
    }

    async fn append_batch(
        &self,
        lease: &RunLease,
        bodies: &[&str],
        terminal: bool,
    ) -> Result<Vec<Event>, RegistryError> {
        let batch_id = uuid::Uuid::new_v4().simple().to_string();
        self.append_batch_as(&batch_id, lease, bodies, terminal).await
    }

    /// Appends one batch under `batch_id`; a second call with the same id (a
    /// retry after a lost reply) returns the first call's seqs and appends nothing.
    async fn append_batch_as(
        &self,
        batch_id: &str,
        lease: &RunLease,
        bodies: &[&str],
        terminal: bool,
    ) -> Result<Vec<Event>, RegistryError> {
        let node = &self.node;
        let session_id = lease.session_id.as_str();
        let (owner_json, floor) = lock(&node.runs)
            .get(&run_key(session_id, &lease.run_id))
            .map(|r| (r.owner_json.clone(), r.last_seq))
            .unwrap_or_default();
        let mut inv = node.scripts.append.prepare_invoke();
        inv.key(keys::run(session_id))
            .key(keys::owner(session_id))
            .key(keys::seq(session_id))
            .key(keys::events(session_id))
            .key(keys::pending(session_id))
            .key(keys::live_channel(session_id))
            .key(keys::batch(session_id, batch_id))
            .arg(&lease.run_id)
            .arg(millis(node.opts.lease))
            .arg(node.opts.max_events.max(1))
            .arg(floor.min(MAX_SCRIPT_SEQ - 1))
            .arg(node.margin())
            .arg(if terminal { "1" } else { "0" })
            .arg(millis(node.opts.retention))
            .arg(millis(SEQ_IDLE_TTL))
            .arg(&owner_json);
        for body in bodies {
            inv.arg(*body);
        }
        // The same batch id on every attempt: a retry of an applied batch answers DUP.
        let reply = node.retrying(node.opts.lease, || node.invoke(&inv)).await?;
        let mut items = codec::array(reply).map_err(Failure::from)?.into_iter();
        let mut next = || items.next().unwrap_or(Value::Nil);
        let status = codec::text(next()).map_err(Failure::from)?;
        let (first, retaken, pending) = match status.as_str() {
            "FENCED" => {
                self.drop_local_run(lease);
                return Err(RegistryError::Fenced);
            }
            "DUP" => (codec::int(next()).map_err(Failure::from)?, false, Vec::new()),
            "OK" => {
                let first = codec::int(next()).map_err(Failure::from)?;
                let retaken = codec::int(next()).map_err(Failure::from)? == 1;
                let pending = codec::texts(next()).map_err(Failure::from)?;
                (first, retaken, pending)
            }
            other => return Err(Failure::from(codec::BadReply(format!("append: {other}"))).into()),
        };
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
            self.reindex_local_run(lease).await;
        }
        if terminal {
            let user_id = self.drop_local_run(lease).map(|r| r.user_id);
            node.forget_run(session_id, &lease.run_id, user_id.as_deref(), &pending).await;
        } else if let Some(last) = events.last()
            && let Some(run) = lock(&node.runs).get_mut(&run_key(session_id, &lease.run_id))
        {
            run.last_seq = run.last_seq.max(last.seq);
        }
        Ok(events)
    }

    fn drop_local_run(&self, lease: &RunLease) -> Option<LocalRun> {
        lock(&self.node.runs).remove(&run_key(&lease.session_id, &lease.run_id))
    }

    async fn reindex_local_run(&self, lease: &RunLease) {
        let user_id = lock(&self.node.runs).get(&run_key(&lease.session_id, &lease.run_id)).map(|r| r.user_id.clone());
        if let Some(user_id) = user_id {
            self.node.index_run(&lease.session_id, &lease.run_id, &user_id).await;
        }
    }

    /// One consistent read of the session; with `after = Some(L)` the current run's events after L.
    async fn read_session(&self, session_id: &str, after: Option<u64>) -> Result<SessionRead, RegistryError> {
        let node = &self.node;
        let after_arg = after.map_or(-1i64, |a| i64::try_from(a.min(MAX_SCRIPT_SEQ - 1)).unwrap_or(0));
        let mut inv = node.scripts.read.prepare_invoke();
        inv.key(keys::owner(session_id))
            .key(keys::seq(session_id))
            .key(keys::events(session_id))
            .key(keys::pending(session_id))
            .arg(after_arg);
        let reply = node.retrying(node.retry_window(), || node.invoke(&inv)).await?;
        let mut items = codec::array(reply).map_err(Failure::from)?.into_iter();
        let mut next = || items.next().unwrap_or(Value::Nil);
        let owner_json = codec::text(next()).map_err(Failure::from)?;
        let top = codec::int(next()).map_err(Failure::from)?;
        let replay = codec::decode_entries(next()).map_err(Failure::from)?;
        let pending = codec::texts(next())
            .map_err(Failure::from)?
            .iter()
            .map(|json| serde_json::from_str(json).unwrap_or_else(|_| Json::String(json.clone())))
            .collect();
        let owner =
            if owner_json.is_empty() { None } else { Some(OwnerRecord::parse(&owner_json).map_err(Failure::from)?) };
        Ok(SessionRead { owner, top, replay, pending })
    }
}

struct SessionRead {
    owner: Option<OwnerRecord>,
    top: u64,
    replay: Vec<Event>,
    pending: Vec<Json>,
}

impl SessionRead {
    fn snapshot(&self) -> Snapshot {
        match &self.owner {
            Some(owner) => Snapshot {
                is_processing: true,
                run_id: Some(owner.run_id.clone()),
                owner_node: Some(owner.node_id.clone()),
                last_seq: self.top,
                pending_permissions: self.pending.clone(),
            },
            None => Snapshot { last_seq: self.top, ..Snapshot::default() },
        }
    }
}

#[async_trait]
impl RunRegistry for RedisRegistry {
    async fn start_run(&self, start: RunStart) -> Result<RunGrant, RegistryError> {
        let node = &self.node;
        let (control, control_rx) = mpsc::channel(CONTROL_CAPACITY);
        {
            let mut runs = lock(&node.runs);
            let key = run_key(&start.session_id, &start.run_id);
            if runs.contains_key(&key) {
                return Err(RegistryError::RunInProgress);
            }
            // Registered before the lock is visible, so no control message can miss it.
            runs.insert(
                key,
                LocalRun {
                    user_id: start.user_id.clone(),
                    control,
                    owner_json: String::new(),
                    last_seq: start.seq_floor,
                },
            );
        }
        let session_id = start.session_id.as_str();
        let mut inv = node.scripts.start.prepare_invoke();
        inv.key(keys::run(session_id))
            .key(keys::owner(session_id))
            .key(keys::seq(session_id))
            .key(keys::events(session_id))
            .key(keys::pending(session_id))
            .key(keys::live_channel(session_id))
            .arg(&start.run_id)
            .arg(&node.id)
            .arg(&start.provider)
            .arg(&start.user_id)
            .arg(now_iso())
            .arg(millis(node.opts.lease))
            .arg(start.seq_floor.min(MAX_SCRIPT_SEQ - 1))
            .arg(node.margin())
            .arg(node.opts.max_events.max(1))
            .arg(millis(node.opts.retention))
            .arg(millis(SEQ_IDLE_TTL))
            .arg(uuid::Uuid::new_v4().to_string())
            .arg(now_iso())
            .arg(session_id)
            .arg(node::OWNER_LOST);
        let lease = RunLease { session_id: start.session_id.clone(), run_id: start.run_id.clone() };
        let outcome = async {
            let reply = node.retrying(node.retry_window(), || node.invoke(&inv)).await?;
            let mut items = codec::array(reply)?.into_iter();
            let mut next = || items.next().unwrap_or(Value::Nil);
            let status = codec::text(next())?;
            if status != "OK" {
                // A retried start whose first attempt went through finds its own lock.
                let held: Option<String> = node.conn().await?.get(keys::run(session_id)).await?;
                let ours =
                    held.as_deref().and_then(|j| OwnerRecord::parse(j).ok()).is_some_and(|o| o.run_id == start.run_id);
                return Ok::<_, Failure>(ours.then(|| (held.unwrap_or_default(), String::new(), Vec::new())));
            }
            let owner_json = codec::text(next())?;
            let reaped = codec::text(next())?;
            let reaped_pending = codec::texts(next())?;
            Ok(Some((owner_json, reaped, reaped_pending)))
        }
        .await;
        let (owner_json, reaped, reaped_pending) = match outcome {
            Ok(Some(granted)) => granted,
            Ok(None) => {
                self.drop_local_run(&lease);
                return Err(RegistryError::RunInProgress);
            }
            Err(e) => {
                self.drop_local_run(&lease);
                return Err(e.into());
            }
        };
        let owner = OwnerRecord::parse(&owner_json).map_err(Failure::from)?;
        if let Some(run) = lock(&node.runs).get_mut(&run_key(session_id, &start.run_id)) {
            run.owner_json = owner_json;
            run.last_seq = owner.first_seq.saturating_sub(1);
        }
        if !reaped.is_empty()
            && let Ok(orphan) = OwnerRecord::parse(&reaped)
        {
            tracing::warn!(session_id, run_id = orphan.run_id, "ended a run whose owner was lost");
            node.forget_run(session_id, &orphan.run_id, Some(&orphan.user_id), &reaped_pending).await;
        }
        node.index_run(session_id, &start.run_id, &start.user_id).await;
        Ok(RunGrant { lease, control: control_rx })
    }

    async fn append(&self, lease: &RunLease, batch: Vec<EventBody>) -> Result<Vec<Event>, RegistryError> {
        let bodies: Vec<&str> = batch.iter().map(|b| b.json.as_str()).collect();
        self.append_batch(lease, &bodies, false).await
    }

    async fn complete(&self, lease: &RunLease, body: EventBody) -> Result<Event, RegistryError> {
        let mut events = self.append_batch(lease, &[body.json.as_str()], true).await?;
        events.pop().ok_or_else(|| RegistryError::Unavailable("append returned no event".into()))
    }

    async fn renew(&self, lease: &RunLease) -> Result<(), RegistryError> {
        let node = &self.node;
        let session_id = lease.session_id.as_str();
        let (owner_json, floor) = lock(&node.runs)
            .get(&run_key(session_id, &lease.run_id))
            .map(|r| (r.owner_json.clone(), r.last_seq))
            .unwrap_or_default();
        let mut inv = node.scripts.renew.prepare_invoke();
        inv.key(keys::run(session_id))
            .key(keys::owner(session_id))
            .key(keys::seq(session_id))
            .key(keys::events(session_id))
            .arg(&lease.run_id)
            .arg(millis(node.opts.lease))
            .arg(&owner_json)
            .arg(floor.min(MAX_SCRIPT_SEQ - 1))
            .arg(node.margin());
        let reply = node.retrying(node.retry_window(), || node.invoke(&inv)).await?;
        match codec::text(reply).map_err(Failure::from)?.as_str() {
            "OK" => Ok(()),
            "RETAKEN" => {
                tracing::warn!(session_id, run_id = lease.run_id, "Redis lost the run's lock; re-took it");
                self.reindex_local_run(lease).await;
                Ok(())
            }
            _ => {
                self.drop_local_run(lease);
                Err(RegistryError::Fenced)
            }
        }
    }

    async fn add_pending(&self, lease: &RunLease, request_id: &str, request: Json) -> Result<(), RegistryError> {
        let node = &self.node;
        let json = request.to_string();
        let mut inv = node.scripts.pending.prepare_invoke();
        inv.key(keys::run(&lease.session_id))
            .key(keys::pending(&lease.session_id))
            .arg(&lease.run_id)
            .arg(request_id)
            .arg(&json)
            .arg("1");
        let reply = node.retrying(node.retry_window(), || node.invoke(&inv)).await?;
        if codec::text(reply).map_err(Failure::from)? != "OK" {
            return Err(RegistryError::Fenced);
        }
        let key = keys::permission(request_id);
        node.retrying(node.retry_window(), || async {
            let mut conn = node.conn().await?;
            let _: () = conn.pset_ex(&key, &lease.session_id, millis(PERMISSION_TTL)).await?;
            Ok(())
        })
        .await?;
        Ok(())
    }

    async fn remove_pending(&self, lease: &RunLease, request_id: &str) -> Result<(), RegistryError> {
        let node = &self.node;
        let mut inv = node.scripts.pending.prepare_invoke();
        inv.key(keys::run(&lease.session_id))
            .key(keys::pending(&lease.session_id))
            .arg(&lease.run_id)
            .arg(request_id)
            .arg("")
            .arg("0");
        // Fenced is fine here: the run's end cleared its approvals already.
        node.retrying(node.retry_window(), || node.invoke(&inv)).await?;
        let key = keys::permission(request_id);
        node.retrying(node.retry_window(), || async {
            let mut conn = node.conn().await?;
            let _: () = conn.del(&key).await?;
            Ok(())
        })
        .await?;
        Ok(())
    }

    async fn snapshot(&self, session_id: &str) -> Result<Snapshot, RegistryError> {
        Ok(self.read_session(session_id, None).await?.snapshot())
    }

    async fn subscribe(&self, session_id: &str, after_seq: u64) -> Result<Subscription, RegistryError> {
        let node = &self.node;
        // 1. The node's subscription is confirmed, and this feed's receiver exists,
        //    before anything is read: every later event arrives live.
        node.hub.acquire(&keys::live_channel(session_id)).await?;
        let (rx, guard) = attach_feed(node, session_id);
        // 2. One atomic read: owner record, seq top, the current run after the cursor.
        let read = self.read_session(session_id, Some(after_seq)).await?;
        let (replay_truncated, replay) = match &read.owner {
            Some(owner) => {
                let from = after_seq.max(owner.first_seq.saturating_sub(1));
                (!codec::is_contiguous(&read.replay, from, read.top), read.replay.clone())
            }
            None => (false, Vec::new()),
        };
        {
            let mut sessions = lock(&node.sessions);
            if let Some(session) = sessions.get_mut(session_id)
                && session.last_dispatched <= read.top
            {
                session.last_dispatched = read.top;
                session.run =
                    read.owner.as_ref().map(|o| SeenRun { run_id: o.run_id.clone(), provider: o.provider.clone() });
            }
        }
        let source: Arc<dyn RangeSource> = node.clone();
        let live = LiveFeed::new(session_id.to_string(), rx, read.top, source, Some(Box::new(guard)));
        Ok(Subscription { snapshot: read.snapshot(), replay_truncated, replay, live })
    }

    async fn read_range(&self, session_id: &str, after_seq: u64, up_to: u64) -> Result<ReplayRange, RegistryError> {
        self.node.read_range(session_id, after_seq, up_to).await
    }

    async fn route_abort(&self, session_id: &str, user_id: &str) -> Result<bool, RegistryError> {
        let node = &self.node;
        let (held, owner): (Option<String>, Option<String>) = node
            .retrying(node.retry_window(), || async {
                let mut conn = node.conn().await?;
                Ok(::redis::pipe()
                    .get(keys::run(session_id))
                    .get(keys::owner(session_id))
                    .query_async(&mut conn)
                    .await?)
            })
            .await?;
        if let Some(lock_json) = held {
            let owner = OwnerRecord::parse(&lock_json).map_err(Failure::from)?;
            if owner.user_id != user_id {
                return Ok(false);
            }
            let control = Control::Abort { session_id: session_id.to_string(), run_id: owner.run_id.clone() };
            node.deliver(&owner.node_id, session_id, &owner.run_id, control).await?;
            return Ok(true);
        }
        // An orphan (owner gone, not yet ended): end it now.
        let Some(owner) = owner.as_deref().and_then(|j| OwnerRecord::parse(j).ok()) else { return Ok(false) };
        if owner.user_id != user_id {
            return Ok(false);
        }
        Ok(node.reap(session_id, None, 0).await? != Reaped::Alive)
    }

    async fn route_permission(
        &self,
        user_id: &str,
        request_id: &str,
        answer: PermissionAnswer,
    ) -> Result<bool, RegistryError> {
        let node = &self.node;
        let key = keys::permission(request_id);
        let session_id: Option<String> = node
            .retrying(node.retry_window(), || async {
                let mut conn = node.conn().await?;
                Ok(conn.get(&key).await?)
            })
            .await?;
        let Some(session_id) = session_id else { return Ok(false) };
        let (held, known): (Option<String>, bool) = node
            .retrying(node.retry_window(), || async {
                let mut conn = node.conn().await?;
                Ok(::redis::pipe()
                    .atomic()
                    .get(keys::run(&session_id))
                    .hexists(keys::pending(&session_id), request_id)
                    .query_async(&mut conn)
                    .await?)
            })
            .await?;
        let Some(owner) = held.as_deref().and_then(|j| OwnerRecord::parse(j).ok()) else { return Ok(false) };
        if owner.user_id != user_id || !known {
            return Ok(false);
        }
        let control =
            Control::Permission { session_id: session_id.clone(), request_id: request_id.to_string(), answer };
        node.deliver(&owner.node_id, &session_id, &owner.run_id, control).await?;
        Ok(true)
    }

    async fn running_runs(&self, user_id: &str) -> Result<Vec<RunningRun>, RegistryError> {
        let node = &self.node;
        let index = keys::user_runs(user_id);
        let members: Vec<String> = node
            .retrying(node.retry_window(), || async {
                let mut conn = node.conn().await?;
                Ok(conn.smembers(&index).await?)
            })
            .await?;
        let entries: Vec<(String, (String, String))> =
            members.into_iter().filter_map(|m| parse_index_member(&m).map(|parsed| (m, parsed))).collect();
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = ::redis::pipe();
        for (_, (session_id, _)) in &entries {
            pipe.get(keys::owner(session_id)).get(keys::seq(session_id));
        }
        let values: Vec<Option<String>> = node
            .retrying(node.retry_window(), || async {
                let mut conn = node.conn().await?;
                Ok(pipe.query_async(&mut conn).await?)
            })
            .await?;
        let mut runs = Vec::new();
        let mut stale = Vec::new();
        for ((member, (session_id, run_id)), pair) in entries.into_iter().zip(values.chunks(2)) {
            let owner = pair.first().cloned().flatten().and_then(|j| OwnerRecord::parse(&j).ok());
            match owner {
                Some(owner) if owner.run_id == run_id && owner.user_id == user_id => {
                    let last_seq = pair.get(1).cloned().flatten().and_then(|s| s.parse().ok()).unwrap_or(0);
                    runs.push(RunningRun {
                        session_id,
                        provider: owner.provider,
                        run_id,
                        started_at: owner.started_at,
                        last_seq,
                        node_id: owner.node_id,
                        user_id: owner.user_id,
                    });
                }
                // The run is over (its owner record is gone or belongs to a later run).
                _ => stale.push(member),
            }
        }
        if !stale.is_empty() {
            let mut conn = node.conn().await?;
            let _: () = conn.srem(&index, stale).await.map_err(Failure::from)?;
        }
        runs.sort_by(|a, b| a.started_at.cmp(&b.started_at));
        Ok(runs)
    }

    async fn notify_user(&self, user_id: &str, frame: Frame) -> Result<(), RegistryError> {
        let node = &self.node;
        let channel = keys::user_channel(user_id);
        node.retrying(node.retry_window(), || async {
            let mut conn = node.conn().await?;
            let _: u64 = conn.publish(&channel, frame.as_str()).await?;
            Ok(())
        })
        .await?;
        Ok(())
    }

    async fn user_notices(&self, user_id: &str) -> Result<broadcast::Receiver<Frame>, RegistryError> {
        let node = &self.node;
        let rx = lock(&node.users)
            .entry(user_id.to_string())
            .or_insert_with(|| node::UserNotices { tx: broadcast::channel(node::USER_CAPACITY).0, holds: 0 })
            .tx
            .subscribe();
        let channel = keys::user_channel(user_id);
        node.hub.acquire(&channel).await?;
        let recorded = lock(&node.users).get_mut(user_id).map(|u| u.holds += 1).is_some();
        if !recorded {
            node.hub.release(&channel).await;
        }
        Ok(rx)
    }

    async fn ready(&self) -> Result<(), String> {
        let node = &self.node;
        if !node.hub.is_connected() {
            return Err("Redis pub/sub connection is down".into());
        }
        lock(&node.probe.status).clone()?;
        let ping = async {
            let mut conn = node.conn().await?;
            let _: String = ::redis::cmd("PING").query_async(&mut conn).await?;
            Ok::<(), Failure>(())
        };
        match tokio::time::timeout(RESPONSE_TIMEOUT, ping).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("Redis does not answer: {e}")),
            Err(_) => Err("Redis does not answer: timed out".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis_url() -> String {
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
    }

    fn options() -> RedisRegistryOptions {
        RedisRegistryOptions { lease: Duration::from_secs(15), max_events: 100, retention: Duration::from_secs(60) }
    }

    fn start(session_id: &str, run_id: &str) -> RunStart {
        RunStart {
            session_id: session_id.into(),
            run_id: run_id.into(),
            provider: "script".into(),
            user_id: "u".into(),
            node_id: "unit".into(),
            seq_floor: 0,
        }
    }

    #[tokio::test]
    async fn a_retried_batch_is_appended_once() {
        let registry = RedisRegistry::connect(&redis_url(), "unit-retry", options()).await.unwrap();
        let session_id = format!("unit-{}", uuid::Uuid::new_v4().simple());
        let grant = registry.start_run(start(&session_id, "r1")).await.unwrap();
        let bodies = [r#"{"kind":"text","content":"a"}"#, r#"{"kind":"text","content":"b"}"#];
        let first = registry.append_batch_as("batch-1", &grant.lease, &bodies, false).await.unwrap();
        let retried = registry.append_batch_as("batch-1", &grant.lease, &bodies, false).await.unwrap();
        assert_eq!(first, retried);
        assert_eq!(first.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
        let next = registry.append_batch_as("batch-2", &grant.lease, &bodies[..1], false).await.unwrap();
        assert_eq!(next[0].seq, 3);
        // A retried complete is answered too, although the lock is gone by then.
        let done = registry.append_batch_as("batch-3", &grant.lease, &[r#"{"kind":"complete"}"#], true).await.unwrap();
        let again = registry.append_batch_as("batch-3", &grant.lease, &[r#"{"kind":"complete"}"#], true).await.unwrap();
        assert_eq!(done, again);
        assert_eq!(done[0].seq, 4);
        let all = registry.read_range(&session_id, 0, u64::MAX).await.unwrap();
        assert_eq!(all.events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert!(all.complete);
    }

    #[tokio::test]
    async fn a_missing_counter_is_restored_above_everything_known() {
        let registry = RedisRegistry::connect(&redis_url(), "unit-restore", options()).await.unwrap();
        let session_id = format!("unit-{}", uuid::Uuid::new_v4().simple());
        let grant = registry.start_run(start(&session_id, "r1")).await.unwrap();
        registry.append(&grant.lease, vec![EventBody { kind: "text".into(), json: "{}".into() }; 3]).await.unwrap();
        registry.complete(&grant.lease, EventBody { kind: "complete".into(), json: "{}".into() }).await.unwrap();
        let mut conn = registry.node.conn().await.unwrap();
        let _: () = conn.del(keys::seq(&session_id)).await.unwrap();
        // The stream still holds seq 4: the counter comes back at 4 + margin.
        let grant = registry.start_run(start(&session_id, "r2")).await.unwrap();
        let events =
            registry.append(&grant.lease, vec![EventBody { kind: "text".into(), json: "{}".into() }]).await.unwrap();
        assert_eq!(events[0].seq, 4 + 100 + 1);
        registry.complete(&grant.lease, EventBody { kind: "complete".into(), json: "{}".into() }).await.unwrap();
        // Nothing left in Redis but the database's floor: floor + margin.
        let _: () = conn.del(&[keys::seq(&session_id), keys::events(&session_id)]).await.unwrap();
        let mut third = start(&session_id, "r3");
        third.seq_floor = 500;
        let grant = registry.start_run(third).await.unwrap();
        let events =
            registry.append(&grant.lease, vec![EventBody { kind: "text".into(), json: "{}".into() }]).await.unwrap();
        assert_eq!(events[0].seq, 500 + 100 + 1);
    }
}
