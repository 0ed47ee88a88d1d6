//! One node's shared state and its Redis plumbing.
//!
//! The [`RedisNode`] holds the command connections ([`Commands`]), the scripts, the pub/sub [`Hub`], and three local maps:
//! sessions this node has feeds on (a broadcast channel per session, filled
//! by the dispatcher), users this node has notice listeners for, and runs this
//! node owns (their control senders, keyed by session and run id).

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ::redis::{AsyncCommands, ErrorKind, FromRedisValue, RedisError, ServerErrorKind};
use deadpool_redis::PoolError;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::{
    RedisRegistryOptions, Topology,
    codec::{self, BadReply, OwnerRecord},
    connection::{Commands, Conn, Lane},
    hub::Hub,
    keys,
    live::{LiveSession, SeenRun},
    scripts::{OrphanComplete, RangeReply, ReapInput, ReapReply, Scripts, SeqRules},
};
use crate::sync::lock_unpoisoned;
use crate::{
    protocol::now_iso,
    runs::{Control, Event, RegistryError, notices::Listeners},
};

/// Seqs per `XRANGE` of a long stream read ([`RedisNode::read_stream`]).
const READ_CHUNK: u64 = 1024;
/// Chunks of one long stream read on the connection at once.
const CHUNKS_IN_FLIGHT: usize = 4;
/// How long a finished session's seq counter stays in Redis; after that the
/// next run restores it from SQL's high-water mark (plus the margin).
pub(super) const SEQ_IDLE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Safety expiry of `cg:perm:{R}`; normally deleted when answered or at the run's end.
pub(super) const PERMISSION_TTL: Duration = Duration::from_secs(24 * 3600);
/// The `error` of the terminal `complete` that ends an orphaned run.
pub(super) const OWNER_LOST: &str = "run owner lost";
/// How long the run-index and approval-key housekeeping around a run is retried: it covers a
/// Redis Cluster failover (about twice `cluster-node-timeout`) or a Sentinel promotion, during
/// which the shard of `cg:runs` or of a `cg:perm:{R}` answers `CLUSTERDOWN` or not at all, while
/// the session's own shard may be fine. An index entry lost there hides the run from the sweeper;
/// an approval key stays for its 24 h expiry.
pub(super) const HOUSEKEEPING_WINDOW: Duration = Duration::from_secs(10);
/// Seqs at or above this are beyond what Lua numbers hold exactly.
pub(super) const MAX_SCRIPT_SEQ: u64 = 1 << 53;

/// A Redis call that failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum Failure {
    #[error("Redis: {0}")]
    Redis(#[from] RedisError),
    #[error("Redis pool: {0}")]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Reply(#[from] BadReply),
    #[error("Redis: timed out {0}")]
    Timeout(&'static str),
    #[error("Redis pub/sub: {0}")]
    Subscribe(String),
}

impl Failure {
    /// Worth retrying: the connection failed, not the request.
    pub(super) fn is_transient(&self) -> bool {
        match self {
            Failure::Redis(e) => {
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_refusal()
                    || e.is_connection_dropped()
                    || matches!(
                        e.kind(),
                        ErrorKind::Server(
                            ServerErrorKind::BusyLoading
                                | ServerErrorKind::TryAgain
                                | ServerErrorKind::ClusterDown
                                | ServerErrorKind::MasterDown
                                | ServerErrorKind::ReadOnly
                        )
                    )
            }
            Failure::Pool(_) | Failure::Timeout(_) | Failure::Subscribe(_) => true,
            Failure::Reply(_) => false,
        }
    }

    /// Whether the call may have reached Redis and taken effect although it
    /// failed: its reply was lost (a timeout, a dropped connection) or could not
    /// be read. A refused connection, an empty pool or an error answered by
    /// Redis itself (`CLUSTERDOWN`, `TRYAGAIN`, `LOADING`…) did nothing.
    pub(super) fn may_have_applied(&self) -> bool {
        match self {
            Failure::Redis(e) => !(e.is_connection_refusal() || matches!(e.kind(), ErrorKind::Server(_))),
            Failure::Pool(_) | Failure::Subscribe(_) => false,
            Failure::Timeout(_) | Failure::Reply(_) => true,
        }
    }
}

impl From<Failure> for RegistryError {
    fn from(failure: Failure) -> Self {
        RegistryError::Unavailable(failure.to_string())
    }
}

/// A run this node owns.
pub(super) struct OwnedRun {
    pub(super) user_id: String,
    pub(super) control: mpsc::Sender<Control>,
    /// The lock JSON, to re-take the lock if Redis lost it.
    pub(super) owner_json: String,
    /// The last seq this run was given (or the floor before its first event).
    pub(super) last_seq: u64,
    /// Its pending approvals (request id, request JSON), to record them again
    /// when Redis lost them with the lock (they are few: the runtime waits on each).
    pub(super) pending: Vec<(String, String)>,
}

impl Probe {
    pub(super) fn new() -> Self {
        Probe { heard: Default::default(), echo: watch::channel(0).0, status: Mutex::new(Ok(())) }
    }
}

/// Local runs are keyed by (session id, run id).
pub(super) type RunKey = (String, String);

pub(super) fn run_key(session_id: &str, run_id: &str) -> RunKey {
    (session_id.to_string(), run_id.to_string())
}

/// A control message on `cg:node:<id>`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct NodeMessage {
    pub(super) session_id: String,
    pub(super) run_id: String,
    pub(super) control: Control,
}

/// The node's view of its own pub/sub probe.
pub(super) struct Probe {
    /// Highest probe nonce heard back on each probe channel (one on one
    /// Redis, one per shard on a Redis Cluster).
    pub(super) heard: Mutex<HashMap<String, u64>>,
    /// Bumped on every echo, to wake the prober.
    pub(super) echo: watch::Sender<u64>,
    /// `Err(reason)` after an unanswered probe.
    pub(super) status: Mutex<Result<(), String>>,
}

/// Shared state of one registry node.
pub(super) struct RedisNode {
    pub(super) id: String,
    pub(super) opts: RedisRegistryOptions,
    /// One Redis or a Redis Cluster: it decides the connections and the publish command.
    pub(super) topology: Topology,
    pub(super) commands: Commands,
    pub(super) scripts: Scripts,
    pub(super) hub: Hub,
    pub(super) node_channel: String,
    pub(super) probe_channel: String,
    pub(super) sessions: Mutex<HashMap<Box<str>, LiveSession>>,
    /// Sockets listening for their users' notices; a user's holds are on its channel.
    pub(super) notices: Arc<Listeners>,
    pub(super) runs: Mutex<HashMap<RunKey, OwnedRun>>,
    pub(super) probe: Probe,
    /// Bounds the replay reads in flight (subscribes, gap repairs, catch-ups):
    /// in a reconnect storm they queue here instead of piling onto the read
    /// connection and timing out behind each other.
    pub(super) reads: tokio::sync::Semaphore,
    /// Runs this node reaped, for the gateway's history copy.
    pub(super) orphans: tokio::sync::mpsc::Sender<crate::runs::OrphanedRun>,
}

/// The `(after, up_to]` seq ranges [`RedisNode::read_stream`] reads: what lies more than
/// `window` seqs below `up_to` as one, then the rest in chunks of [`READ_CHUNK`].
fn stream_chunks(after: u64, up_to: u64, window: u64) -> impl Iterator<Item = (u64, u64)> {
    let recent = up_to.saturating_sub(window).max(after);
    let older = (recent > after).then_some((after, recent));
    let chunks = (recent..up_to)
        .step_by(READ_CHUNK as usize)
        .map(move |start| (start, start.saturating_add(READ_CHUNK).min(up_to)));
    older.into_iter().chain(chunks)
}

/// A `["S","R"]` member of the run indexes.
pub(super) fn index_member(session_id: &str, run_id: &str) -> String {
    serde_json::json!([session_id, run_id]).to_string()
}

/// Reads a `["S","R"]` index member.
pub(super) fn parse_index_member(member: &str) -> Option<(String, String)> {
    serde_json::from_str(member).ok()
}

pub(super) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// What an orphan reap did.
#[derive(Debug, PartialEq)]
pub(super) enum Reaped {
    /// The lock is held: the owner is alive.
    Alive,
    /// Nothing to end.
    None,
    /// The run was ended with the terminal `complete`.
    Ended,
}

/// Replay reads one node has in flight at most ([`RedisNode::reads`]).
pub(super) const READS_IN_FLIGHT: usize = 64;

impl RedisNode {
    /// A place among the replay reads in flight; waits for one (never fails).
    pub(super) async fn read_permit(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        // The semaphore is never closed, so `ok()` is always `Some`.
        self.reads.acquire().await.ok()
    }

    /// A command connection on the write lane (the owner's hot path and small commands).
    pub(super) async fn conn(&self) -> Result<Conn, Failure> {
        self.commands.lane(Lane::Write).await
    }

    /// A command connection of the given lane.
    pub(super) async fn lane(&self, lane: Lane) -> Result<Conn, Failure> {
        self.commands.lane(lane).await
    }

    /// Drops the kept connections after a failure; the next calls get fresh ones.
    pub(super) fn invalidate_connections(&self) {
        self.commands.invalidate();
    }

    /// Publishes `payload` on `channel`: PUBLISH on one Redis (or Sentinel's primary), SPUBLISH (to the
    /// shard owning the channel's slot) on a Redis Cluster. Returns the receivers.
    pub(super) async fn publish(&self, channel: &str, payload: impl ::redis::ToRedisArgs) -> Result<u64, Failure> {
        let command = match self.topology {
            Topology::Standalone | Topology::Sentinel => "PUBLISH",
            Topology::Cluster => "SPUBLISH",
        };
        let mut conn = self.conn().await?;
        Ok(::redis::cmd(command).arg(channel).arg(payload).query_async(&mut conn).await?)
    }

    /// Retries `op` on transient failures until `window` has passed.
    /// Every attempt is counted as a round trip of `what`, every failure as an error.
    pub(super) async fn retrying<T, F, Fut>(
        &self,
        what: &'static str,
        window: Duration,
        mut op: F,
    ) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let deadline = Instant::now() + window;
        let mut pause = Duration::from_millis(20);
        loop {
            metrics::counter!("chatgate_redis_round_trips_total", "op" => what).increment(1);
            let outcome = op().await;
            if outcome.is_err() {
                metrics::counter!("chatgate_redis_errors_total", "op" => what).increment(1);
            }
            if outcome.as_ref().is_err_and(Failure::is_transient) {
                self.invalidate_connections();
            }
            match outcome {
                Err(e) if e.is_transient() && Instant::now() + pause < deadline => {
                    tracing::debug!(op = what, error = %e, "Redis call failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                other => return other,
            }
        }
    }

    /// One attempt, counted and with failed connections dropped like [`RedisNode::retrying`].
    pub(super) async fn once<T, F, Fut>(&self, what: &'static str, op: F) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        self.retrying(what, Duration::ZERO, op).await
    }

    /// How long a call may be retried before the caller is told the backend is away.
    pub(super) fn retry_window(&self) -> Duration {
        (self.opts.lease / 3).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// String keys of one slot, read together (one `MGET`), retried for `window`.
    pub(super) async fn read_strings<const N: usize>(
        &self,
        what: &'static str,
        window: Duration,
        keys: [String; N],
    ) -> Result<[Option<String>; N], Failure> {
        let read = || async { Ok::<_, Failure>(self.conn().await?.mget::<_, Vec<Option<String>>>(&keys).await?) };
        let values = self.retrying(what, window, read).await?;
        let count = values.len();
        values.try_into().map_err(|_| Failure::Reply(BadReply(format!("MGET of {N} keys gave {count} values"))))
    }

    pub(super) fn idempotency_window_ms(&self) -> u64 {
        millis(self.opts.idempotency_window).max(1)
    }

    pub(super) fn margin(&self) -> u64 {
        self.opts.max_events.max(1)
    }

    /// Queues an orphaned-run notice for the gateway (dropped, and logged, when full).
    pub(super) fn notify_orphan(
        &self,
        session_id: &str,
        run_id: &str,
        first_seq: u64,
        complete_seq: u64,
        prompt: Option<String>,
    ) {
        self.send_orphan(crate::runs::OrphanedRun {
            session_id: session_id.to_string(),
            run_id: run_id.to_string(),
            first_seq,
            complete_seq,
            prompt,
            unsaved_complete: false,
        });
    }

    /// Hands a run whose history needs copying to the gateway's copier.
    pub(super) fn send_orphan(&self, notice: crate::runs::OrphanedRun) {
        if let Err(e) = self.orphans.try_send(notice) {
            let notice = e.into_inner();
            tracing::warn!(
                session_id = notice.session_id,
                run_id = notice.run_id,
                "orphaned-run notice dropped; its history may lack the run's tail"
            );
        }
    }

    /// Ends the session's orphaned run (lock gone, owner record left), or with
    /// `lost` = (run id, provider) a run Redis lost altogether. Exactly one
    /// caller across the cluster ends a given run.
    pub(super) async fn reap(&self, session_id: &str, lost: Option<&SeenRun>, floor: u64) -> Result<Reaped, Failure> {
        let lost_run = lost.map(|r| (r.run_id.as_str(), r.provider.as_str()));
        let (event_id, timestamp) = (uuid::Uuid::new_v4().to_string(), now_iso());
        let input = ReapInput {
            session_id,
            lost: lost_run,
            orphan: OrphanComplete { event_id: &event_id, timestamp: &timestamp, error: OWNER_LOST },
            seqs: self.seq_rules(floor),
        };
        let inv = self.scripts.reap(&input);
        let reply: ReapReply = self.retrying("reap", self.retry_window(), || self.invoke(&inv)).await?;
        match reply {
            ReapReply::Alive => Ok(Reaped::Alive),
            ReapReply::Nothing => Ok(Reaped::None),
            ReapReply::Reaped { owner_json, complete_seq, pending_ids, prompt } => {
                let owner = if owner_json.is_empty() { None } else { Some(OwnerRecord::parse(&owner_json)?) };
                let expected = lost_run.map(|(run_id, _)| run_id).unwrap_or("");
                let run_id = owner.as_ref().map(|o| o.run_id.as_str()).unwrap_or(expected);
                tracing::warn!(session_id, run_id, "ended a run whose owner was lost");
                metrics::counter!("chatgate_runs_reaped_total").increment(1);
                let first_seq = owner.as_ref().map(|o| o.first_seq).unwrap_or(complete_seq);
                self.notify_orphan(session_id, run_id, first_seq, complete_seq, Some(prompt).filter(|p| !p.is_empty()));
                self.forget_run(session_id, run_id, owner.as_ref().map(|o| o.user_id.as_str()), &pending_ids).await;
                Ok(Reaped::Ended)
            }
        }
    }

    /// The seq and expiry rules of a script call whose counter may restart from `floor`.
    pub(super) fn seq_rules(&self, floor: u64) -> SeqRules {
        SeqRules {
            lease_ms: millis(self.opts.lease),
            floor: floor.min(MAX_SCRIPT_SEQ - 1),
            margin: self.margin(),
            max_events: self.opts.max_events.max(1),
            retention_ms: millis(self.opts.retention),
            seq_ttl_ms: millis(SEQ_IDLE_TTL),
        }
    }

    /// Invokes a prepared script on a pooled connection; its reply decodes as `T`.
    pub(super) async fn invoke<T: FromRedisValue>(&self, inv: &::redis::ScriptInvocation<'_>) -> Result<T, Failure> {
        self.invoke_on(Lane::Write, inv).await
    }

    /// Invokes a prepared script on the given lane; its reply decodes as `T`.
    pub(super) async fn invoke_on<T: FromRedisValue>(
        &self,
        lane: Lane,
        inv: &::redis::ScriptInvocation<'_>,
    ) -> Result<T, Failure> {
        let mut conn = self.lane(lane).await?;
        Ok(inv.invoke_async(&mut conn).await?)
    }

    /// Drops the index entries and permission keys of a reaped run (best effort:
    /// stale index entries are skipped by readers and swept later).
    pub(super) async fn forget_run(&self, session_id: &str, run_id: &str, user_id: Option<&str>, pending: &[String]) {
        self.forget(session_id, run_id, user_id, pending, true).await;
    }

    /// As [`RedisNode::forget_run`] for a run its owner ended, but the global index entry
    /// stays until the owner's `history_saved` (in [`super::ownership`]): the sweeper's lead to a `complete` not in SQL yet.
    pub(super) async fn forget_ended_run(
        &self,
        session_id: &str,
        run_id: &str,
        user_id: Option<&str>,
        pending: &[String],
    ) {
        self.forget(session_id, run_id, user_id, pending, false).await;
    }

    async fn forget(&self, session_id: &str, run_id: &str, user_id: Option<&str>, pending: &[String], index: bool) {
        let member = index_member(session_id, run_id);
        let mut commands = Vec::with_capacity(pending.len() + 2);
        if index {
            commands.push(::redis::Cmd::zrem(keys::RUNS_INDEX, &member));
        }
        if let Some(user_id) = user_id {
            commands.push(::redis::Cmd::srem(keys::user_runs(user_id), &member));
        }
        commands.extend(pending.iter().map(|request_id| ::redis::Cmd::del(keys::permission(request_id))));
        let window = HOUSEKEEPING_WINDOW.max(self.retry_window());
        if let Err(e) = self.retrying("forget_run", window, || self.query_each::<()>(&commands)).await {
            tracing::warn!(session_id, run_id, error = %e, "could not clean a finished run's index entries");
        }
    }

    /// Adds a run to the indexes read by `running_runs` and the sweeper.
    pub(super) async fn index_run(&self, session_id: &str, run_id: &str, user_id: &str) {
        let member = index_member(session_id, run_id);
        let now = u64::try_from(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis(),
        )
        .unwrap_or(0);
        let commands =
            [::redis::Cmd::zadd(keys::RUNS_INDEX, &member, now), ::redis::Cmd::sadd(keys::user_runs(user_id), &member)];
        let window = HOUSEKEEPING_WINDOW.max(self.retry_window());
        let result = self.retrying("index_run", window, || self.query_each::<()>(&commands)).await;
        if let Err(e) = result {
            tracing::warn!(session_id, run_id, error = %e, "could not index a run; only its subscribers will notice if its owner dies");
        }
    }

    /// Sends `commands` at once on one multiplexed connection (pipelined on the wire, as a
    /// pipeline is) and returns their replies in order. Unlike a pipeline they may name keys
    /// of different hash slots (the global indexes beside a session's keys), which a Redis
    /// Cluster client refuses to pipeline.
    pub(super) async fn query_each<T: FromRedisValue>(&self, commands: &[::redis::Cmd]) -> Result<Vec<T>, Failure> {
        let conn = self.conn().await?;
        let replies = commands.iter().map(|command| {
            let mut conn = conn.clone();
            async move { command.query_async::<T>(&mut conn).await }
        });
        Ok(futures_util::future::try_join_all(replies).await?)
    }

    /// Reads the stream's events with `after < seq <= up_to` and the seq top.
    pub(super) async fn read_events(
        &self,
        session_id: &str,
        after: u64,
        up_to: u64,
    ) -> Result<(u64, Vec<Event>), Failure> {
        if after >= MAX_SCRIPT_SEQ || up_to <= after {
            return Ok((0, Vec::new()));
        }
        let stop = (up_to < MAX_SCRIPT_SEQ).then_some(up_to);
        let inv = self.scripts.read_range(session_id, after, stop);
        let _permit = self.read_permit().await;
        let RangeReply { top, mut events, deferred_to } =
            self.retrying("read_range", self.retry_window(), || self.invoke_on(Lane::Read, &inv)).await?;
        if let Some(last) = deferred_to {
            // A long range: the same entries, now, without Lua (see `lua/read_range.lua`); a trim
            // since shows as a gap (the caller checks the range against `top`).
            events = self.read_stream(session_id, after, last).await?;
        }
        Ok((top, events))
    }

    /// The stream's entries with `after < seq <= up_to`, by plain `XRANGE`s (no Lua, no top):
    /// the long reads `lua/read.lua` and `lua/read_range.lua` leave to their caller. The caller
    /// holds a read permit.
    ///
    /// The newest `--replay-max-events` seqs of the range are read in chunks of [`READ_CHUNK`]
    /// seqs, [`CHUNKS_IN_FLIGHT`] sent at once on the connection: Redis writes one reply while
    /// the connection parses the one before and this task decodes the one before that, where one
    /// `XRANGE` does the three in turn. Older seqs (mostly trimmed already) are one `XRANGE`, so
    /// a read sends at most a window's worth of commands however long its range. The commands
    /// are not one atomic read: a trim between two shows as a hole, as in any range.
    pub(super) async fn read_stream(&self, session_id: &str, after: u64, up_to: u64) -> Result<Vec<Event>, Failure> {
        let key = keys::events(session_id);
        let read = || async {
            let conn = self.lane(Lane::Read).await?;
            let chunks = stream_chunks(after, up_to, self.opts.max_events).map(|(start, end)| {
                let (mut conn, key) = (conn.clone(), &key);
                async move {
                    let mut xrange = ::redis::cmd("XRANGE");
                    xrange.arg(key).arg(format!("{}-0", start + 1)).arg(format!("{end}-0"));
                    xrange.query_async::<::redis::Value>(&mut conn).await
                }
            });
            let mut replies = futures_util::stream::iter(chunks).buffered(CHUNKS_IN_FLIGHT);
            // Sized once: the range holds at most a window of events.
            let expected = usize::try_from(up_to.saturating_sub(after).min(self.opts.max_events)).unwrap_or(0);
            let (mut builder, mut events) = (codec::EventBuilder::default(), Vec::with_capacity(expected));
            while let Some(reply) = replies.next().await {
                codec::decode_stream(reply?, &mut builder, &mut events)?;
            }
            Ok::<_, Failure>(events)
        };
        self.retrying("read_stream", self.retry_window(), read).await
    }

    /// Delivers a control message to the run's owner node (directly when it is this one).
    pub(super) async fn deliver(
        &self,
        owner_node: &str,
        session_id: &str,
        run_id: &str,
        control: Control,
    ) -> Result<(), RegistryError> {
        let local = lock_unpoisoned(&self.runs).get(&run_key(session_id, run_id)).map(|r| r.control.clone());
        if let Some(tx) = local {
            return match tokio::time::timeout(self.retry_window(), tx.send(control)).await {
                Ok(Ok(())) => Ok(()),
                _ => Err(RegistryError::Unavailable("the run is not taking control messages".into())),
            };
        }
        let message = NodeMessage { session_id: session_id.to_string(), run_id: run_id.to_string(), control };
        let payload = serde_json::to_string(&message).map_err(|e| RegistryError::Unavailable(e.to_string()))?;
        let channel = keys::node_channel(owner_node);
        let receivers: u64 =
            self.retrying("publish_control", self.retry_window(), || self.publish(&channel, &payload)).await?;
        if receivers == 0 {
            tracing::warn!(
                owner_node,
                run_id,
                "no node listens on the owner's control channel; the lease will end the run"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_chunks_cover_the_range_once_in_order_and_at_most_a_window_of_commands() {
        for (after, up_to, window) in [
            (0, 0, 10_000),
            (5, 3, 10_000),
            (0, 1, 10_000),
            (0, 10_000, 10_000),
            (0, 10_001, 10_000),
            (100, 2_148, 10_000),
            (0, 1_000_000, 10_000),
            (999_990, 1_000_000, 0),
        ] {
            let chunks: Vec<(u64, u64)> = stream_chunks(after, up_to, window).collect();
            let mut next = after;
            for (i, &(start, end)) in chunks.iter().enumerate() {
                assert_eq!(start, next, "{chunks:?}");
                // Only the first piece, the part older than the window, may be longer than a chunk.
                let older = i == 0 && end == up_to.saturating_sub(window);
                assert!(end > start && (end - start <= READ_CHUNK || older), "{chunks:?}");
                next = end;
            }
            assert_eq!(next, up_to.max(after), "{after}..{up_to}: {chunks:?}");
            assert!(chunks.len() as u64 <= 1 + window.div_ceil(READ_CHUNK), "{chunks:?}");
        }
        assert_eq!(stream_chunks(0, 2_500, 10_000).collect::<Vec<_>>(), [(0, 1_024), (1_024, 2_048), (2_048, 2_500)]);
        assert_eq!(stream_chunks(0, 1_000_000, 1_024).collect::<Vec<_>>(), [(0, 998_976), (998_976, 1_000_000)]);
    }
}
