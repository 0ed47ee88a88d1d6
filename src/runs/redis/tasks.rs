//! The node's background tasks: the pub/sub dispatcher (with reconnects), the
//! pub/sub probe, and the sweeper (orphaned runs, idle user channels).
//!
//! Every task holds the node and stops when the registry's last handle drops
//! (its cancellation token).

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use ::redis::AsyncCommands;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    Topology,
    hub::{Delivery, Incoming},
    keys,
    live::SeenRun,
    node::{Failure, Reaped, RedisNode, RunKey, parse_index_member, run_key},
};
use crate::sync::lock_unpoisoned;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Most index entries looked at per global sweep.
const SWEEP_BATCH: isize = 2000;

/// Reads the node's pub/sub connection and re-dials it when it drops, when the
/// probe says it went silent, or (Redis Cluster) when a shard dropped a held
/// channel, lost its connection or the slot map changed; every re-dial is
/// followed by a catch-up from the streams.
pub(super) async fn dispatch(node: Arc<RedisNode>, first: Incoming, redial: Arc<Notify>, cancel: CancellationToken) {
    let mut incoming = Some(first);
    let mut backoff = Duration::from_millis(50);
    loop {
        let mut current = match incoming.take() {
            Some(current) => current,
            None => match node.hub.connect(CONNECT_TIMEOUT).await {
                Ok(fresh) => {
                    tracing::info!(node = node.id, "Redis pub/sub reconnected; channels restored");
                    metrics::counter!("chatgate_redis_pubsub_reconnects_total").increment(1);
                    backoff = Duration::from_millis(50);
                    node.catch_up().await;
                    fresh
                }
                Err(e) => {
                    tracing::warn!(node = node.id, error = %e, "Redis pub/sub reconnect failed");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            },
        };
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = redial.notified() => {
                    tracing::warn!(node = node.id, "Redis pub/sub probe unanswered or slots moved; re-dialing");
                    break;
                }
                delivery = current.next() => match delivery {
                    Some(Delivery::Message(message)) => {
                        node.on_message(message.get_channel_name(), message.get_payload_bytes())
                    }
                    Some(Delivery::Overflowed) => {
                        tracing::warn!(node = node.id, "Redis pub/sub queue overflowed; catching up from the streams");
                        node.catch_up().await;
                    }
                    Some(Delivery::Unsubscribed(channel)) => {
                        if node.hub.holds(&channel).await {
                            tracing::warn!(node = node.id, channel, "a Redis Cluster shard dropped a held channel; re-dialing");
                            break;
                        }
                    }
                    Some(Delivery::ShardLost) => {
                        tracing::warn!(node = node.id, "a Redis Cluster shard connection was lost; re-dialing");
                        break;
                    }
                    None => {
                        tracing::warn!(node = node.id, "Redis pub/sub connection lost");
                        break;
                    }
                },
            }
        }
        node.hub.disconnected().await;
    }
}

/// How often the probe runs.
pub(super) fn probe_period(node: &RedisNode) -> Duration {
    (node.opts.lease / 3).clamp(Duration::from_millis(100), Duration::from_secs(2))
}

/// Publishes a nonce to each of the node's probe channels and expects every
/// one back within one period. On one Redis that is one channel; under
/// Sentinel too, after asking the sentinels whether the primary is still the
/// one the node uses ([`PrimaryWatch`]); on a Redis Cluster one per shard (the
/// probe reads the slot map each period, holds a channel on every primary, and
/// re-dials the hub when the map changed).
pub(super) async fn probe(node: Arc<RedisNode>, redial: Arc<Notify>, cancel: CancellationToken) {
    let period = probe_period(&node);
    let mut echo = node.probe.echo.subscribe();
    let mut shards = ShardProbes::default();
    let mut primary = PrimaryWatch::default();
    let mut nonce = 0u64;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        if !node.hub.is_connected() {
            *lock_unpoisoned(&node.probe.status) = Err("Redis pub/sub is reconnecting".into());
            continue;
        }
        let channels = match node.topology {
            Topology::Standalone => vec![node.probe_channel.clone()],
            Topology::Sentinel => match primary.check(&node, &redial).await {
                Ok(()) => vec![node.probe_channel.clone()],
                Err(e) => {
                    metrics::counter!("chatgate_redis_probe_failures_total").increment(1);
                    tracing::warn!(node = node.id, error = %e, "the sentinels name no primary");
                    *lock_unpoisoned(&node.probe.status) = Err(format!("the sentinels name no primary: {e}"));
                    continue;
                }
            },
            Topology::Cluster => match shards.refresh(&node, &redial).await {
                Ok(channels) => channels,
                Err(e) => {
                    metrics::counter!("chatgate_redis_probe_failures_total").increment(1);
                    tracing::warn!(node = node.id, error = %e, "Redis Cluster slot map unreadable");
                    *lock_unpoisoned(&node.probe.status) = Err(format!("Redis Cluster slot map unreadable: {e}"));
                    continue;
                }
            },
        };
        nonce += 1;
        let published = async {
            for channel in &channels {
                node.once("probe", || node.publish(channel, nonce)).await?;
            }
            Ok::<(), Failure>(())
        };
        let outcome = match tokio::time::timeout(period, published).await {
            Ok(Ok(_)) => {
                // Runs inside the watch's lock: `on_message` releases `heard` before it notifies.
                let all_heard = || {
                    let heard = lock_unpoisoned(&node.probe.heard);
                    channels.iter().all(|c| heard.get(c).is_some_and(|seen| *seen >= nonce))
                };
                match tokio::time::timeout(period, echo.wait_for(|_| all_heard())).await {
                    Ok(Ok(_)) => Ok(()),
                    _ => {
                        redial.notify_one();
                        Err("Redis pub/sub probe unanswered".to_string())
                    }
                }
            }
            Ok(Err(e)) => Err(format!("Redis probe publish failed: {e}")),
            Err(_) => Err("Redis probe publish timed out".to_string()),
        };
        if let Err(reason) = &outcome {
            metrics::counter!("chatgate_redis_probe_failures_total").increment(1);
            tracing::warn!(node = node.id, reason, "Redis probe failed");
        }
        *lock_unpoisoned(&node.probe.status) = outcome;
    }
}

/// The probe's view of a Sentinel-managed Redis: the primary the sentinels named last.
#[derive(Default)]
struct PrimaryWatch {
    last: Option<String>,
}

impl PrimaryWatch {
    /// Asks the sentinels for the primary; when they name another one than last time (a
    /// failover), drops the command connections and re-dials the hub, so that nothing more is
    /// written to the old primary and the feeds catch up from the new one.
    async fn check(&mut self, node: &RedisNode, redial: &Notify) -> Result<(), Failure> {
        let Some(sentinels) = node.commands.sentinels() else { return Ok(()) };
        let address = sentinels.primary_address().await?;
        if self.last.as_ref().is_some_and(|last| *last != address) {
            tracing::warn!(node = node.id, primary = address, "the sentinels promoted another primary; following it");
            metrics::counter!("chatgate_redis_primary_changes_total").increment(1);
            node.invalidate_connections();
            redial.notify_one();
        }
        self.last = Some(address);
        Ok(())
    }
}

/// The probe's view of a Redis Cluster: the slot map last read and the probe
/// channel held on each primary.
#[derive(Default)]
struct ShardProbes {
    slots: Option<Vec<SlotRange>>,
    /// Probe channel per primary address.
    held: HashMap<String, String>,
}

/// One range of slots and the address of the primary serving it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SlotRange {
    start: u16,
    end: u16,
    primary: String,
}

impl ShardProbes {
    /// Reads the slot map, re-dials the hub when it changed, holds one probe
    /// channel per primary, and returns them.
    async fn refresh(&mut self, node: &RedisNode, redial: &Notify) -> Result<Vec<String>, Failure> {
        let slots = read_slot_map(node).await?;
        if self.slots.as_ref().is_some_and(|last| *last != slots) {
            tracing::info!(node = node.id, "Redis Cluster slot map changed; re-subscribing where the slots live now");
            metrics::counter!("chatgate_redis_slot_map_changes_total").increment(1);
            redial.notify_one();
        }
        let mut wanted: HashMap<String, String> = HashMap::new();
        for range in &slots {
            if wanted.contains_key(&range.primary) {
                continue;
            }
            let channel = self.held.get(&range.primary).filter(|c| {
                let slot = keys::slot(c);
                slots.iter().any(|r| r.primary == range.primary && (r.start..=r.end).contains(&slot))
            });
            let channel = match channel {
                Some(channel) => channel.clone(),
                None => probe_channel_in(&node.probe_channel, range.start, range.end),
            };
            wanted.insert(range.primary.clone(), channel);
        }
        for (primary, channel) in &wanted {
            if self.held.get(primary) != Some(channel) {
                node.hub.acquire(channel).await.map_err(|e| Failure::Subscribe(e.to_string()))?;
                if let Some(old) = self.held.insert(primary.clone(), channel.clone()) {
                    node.hub.release(&old).await;
                }
            }
        }
        let gone: Vec<String> = self.held.keys().filter(|p| !wanted.contains_key(*p)).cloned().collect();
        for primary in gone {
            if let Some(old) = self.held.remove(&primary) {
                node.hub.release(&old).await;
            }
        }
        self.slots = Some(slots);
        Ok(self.held.values().cloned().collect())
    }
}

/// A shard probe channel whose slot is in `start..=end`.
fn probe_channel_in(probe_channel: &str, start: u16, end: u16) -> String {
    (0u32..)
        .map(|n| keys::shard_probe_channel(probe_channel, &n.to_string()))
        .find(|channel| (start..=end).contains(&keys::slot(channel)))
        .unwrap_or_else(|| keys::shard_probe_channel(probe_channel, "0"))
}

/// `CLUSTER SLOTS`: each range with its primary's `host:port`, sorted.
async fn read_slot_map(node: &RedisNode) -> Result<Vec<SlotRange>, Failure> {
    let reply: Vec<::redis::Value> = node
        .once("cluster_slots", || async {
            let mut conn = node.conn().await?;
            Ok(::redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut conn).await?)
        })
        .await?;
    let mut ranges = Vec::with_capacity(reply.len());
    for range in reply {
        let ::redis::Value::Array(fields) = range else { continue };
        let (Some(start), Some(end), Some(::redis::Value::Array(primary))) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            continue;
        };
        let number = |v: &::redis::Value| ::redis::from_redis_value_ref::<u16>(v).ok();
        let host = primary.first().and_then(|v| ::redis::from_redis_value_ref::<String>(v).ok());
        let port = primary.get(1).and_then(|v| ::redis::from_redis_value_ref::<u16>(v).ok());
        if let (Some(start), Some(end), Some(host), Some(port)) = (number(start), number(end), host, port) {
            ranges.push(SlotRange { start, end, primary: format!("{host}:{port}") });
        }
    }
    ranges.sort();
    Ok(ranges)
}

/// How often the sweeper runs.
pub(super) fn sweep_period(node: &RedisNode) -> Duration {
    (node.opts.lease / 3).clamp(Duration::from_millis(50), Duration::from_secs(5))
}

/// Ends orphaned runs (watched sessions first, then the global index) and
/// drops user channels nobody listens to any more.
pub(super) async fn sweep(node: Arc<RedisNode>, cancel: CancellationToken) {
    let period = sweep_period(&node);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        release_idle_users(&node).await;
        sweep_watched(&node).await;
        if let Err(e) = sweep_index(&node, period).await {
            tracing::debug!(node = node.id, error = %e, "run index sweep failed");
        }
    }
}

async fn release_idle_users(node: &RedisNode) {
    for (user_id, holds) in node.notices.take_idle() {
        let channel = keys::user_channel(&user_id);
        for _ in 0..holds {
            node.hub.release(&channel).await;
        }
    }
}

/// Sessions with local feeds whose run (as last seen) is not ours: if the lock
/// is gone, end the run. A run Redis lost entirely (no owner record) is only
/// ended after its lock stayed missing for a whole lease, so that a live owner
/// re-takes it first.
async fn sweep_watched(node: &RedisNode) {
    let owned: HashSet<RunKey> = lock_unpoisoned(&node.runs).keys().cloned().collect();
    let watched: Vec<(String, SeenRun, u64)> = lock_unpoisoned(&node.sessions)
        .iter()
        .filter_map(|(id, s)| {
            let run = s.run.as_ref().filter(|r| !owned.contains(&run_key(id, &r.run_id)))?;
            Some((id.to_string(), SeenRun::clone(run), s.last_dispatched))
        })
        .collect();
    if watched.is_empty() {
        return;
    }
    let commands: Vec<::redis::Cmd> =
        watched.iter().map(|(session_id, _, _)| ::redis::Cmd::exists(keys::run(session_id))).collect();
    let held: Vec<bool> = match node.once("sweep_locks", || node.query_each(&commands)).await {
        Ok(held) => held,
        Err(e) => {
            tracing::debug!(error = %e, "watched-session sweep failed");
            return;
        }
    };
    for ((session_id, run, floor), held) in watched.into_iter().zip(held) {
        if held {
            if let Some(seen) =
                lock_unpoisoned(&node.sessions).get_mut(session_id.as_str()).and_then(|s| s.run.as_mut())
            {
                seen.lock_missing_since = None;
            }
            continue;
        }
        let missing_since = {
            let mut sessions = lock_unpoisoned(&node.sessions);
            let Some(seen) = sessions.get_mut(session_id.as_str()).and_then(|s| s.run.as_mut()) else { continue };
            *seen.lock_missing_since.get_or_insert_with(Instant::now)
        };
        let lost = (missing_since.elapsed() >= node.opts.lease).then_some(&run);
        match node.reap(&session_id, lost, floor).await {
            Ok(Reaped::None) if lost.is_some() => {
                // Nothing left to end: the run ended and this node missed its
                // complete. Hand the stream's tail to the feeds, stop watching.
                if let Err(e) = node.catch_up_session(&session_id).await {
                    tracing::debug!(session_id, error = %e, "catch-up failed");
                    continue;
                }
                if let Some(session) = lock_unpoisoned(&node.sessions).get_mut(session_id.as_str())
                    && session.run.as_ref().is_some_and(|r| r.run_id == run.run_id)
                {
                    session.run = None;
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(session_id, error = %e, "reap failed"),
        }
    }
}

/// One node per period (a short `SET NX` lock) walks the global run index,
/// ends orphaned runs and drops entries of finished ones.
async fn sweep_index(node: &RedisNode, period: Duration) -> Result<(), Failure> {
    let won: Option<String> = node
        .once("sweep_lock", || async {
            let mut conn = node.conn().await?;
            Ok(::redis::cmd("SET")
                .arg(keys::SWEEP_LOCK)
                .arg(&node.id)
                .arg("NX")
                .arg("PX")
                .arg(super::node::millis(period))
                .query_async(&mut conn)
                .await?)
        })
        .await?;
    if won.is_none() {
        return Ok(());
    }
    let members: Vec<String> = node
        .once("sweep_index", || async {
            let mut conn = node.conn().await?;
            Ok(::redis::cmd("ZRANGE").arg(keys::RUNS_INDEX).arg(0).arg(SWEEP_BATCH - 1).query_async(&mut conn).await?)
        })
        .await?;
    let entries: Vec<(String, (String, String))> =
        members.into_iter().filter_map(|m| parse_index_member(&m).map(|parsed| (m, parsed))).collect();
    if entries.is_empty() {
        return Ok(());
    }
    let commands: Vec<::redis::Cmd> =
        entries.iter().map(|(_, (session_id, _))| ::redis::Cmd::get(keys::run(session_id))).collect();
    let locks: Vec<Option<String>> = node.once("sweep_locks", || node.query_each(&commands)).await?;
    for ((member, (session_id, run_id)), lock_json) in entries.into_iter().zip(locks) {
        let live = lock_json.as_deref().and_then(|j| super::codec::OwnerRecord::parse(j).ok());
        if live.is_some_and(|o| o.run_id == run_id) {
            continue;
        }
        // Ended now, already ended, or another run holds the lock: this entry is stale.
        if node.reap(&session_id, None, 0).await? != Reaped::Ended {
            hand_over_unsaved_complete(node, &session_id, &run_id).await?;
        }
        node.once("sweep_forget", || async {
            let mut conn = node.conn().await?;
            let _: () = conn.zrem(keys::RUNS_INDEX, &member).await?;
            Ok(())
        })
        .await?;
    }
    Ok(())
}

/// A run its owner completed stays indexed until the owner stored the `complete`
/// in SQL; if its `saving` marker is still there, the owner may have died in
/// between: the gateway's copier stores that event (a duplicate of the owner's
/// own row, should it have been just slow, collapses with it).
async fn hand_over_unsaved_complete(node: &RedisNode, session_id: &str, run_id: &str) -> Result<(), Failure> {
    let key = keys::saving(session_id, run_id);
    let seq: Option<u64> = node
        .once("sweep_saving", || async {
            let mut conn = node.conn().await?;
            Ok(conn.get(&key).await?)
        })
        .await?;
    let Some(seq) = seq else { return Ok(()) };
    tracing::info!(
        session_id,
        run_id,
        seq,
        "a completed run's owner did not confirm its history; copying the complete"
    );
    node.send_orphan(crate::runs::OrphanedRun {
        session_id: session_id.to_string(),
        run_id: run_id.to_string(),
        first_seq: seq,
        complete_seq: seq,
        prompt: None,
        unsaved_complete: true,
    });
    node.once("sweep_saved", || async {
        let mut conn = node.conn().await?;
        let _: () = conn.del(&key).await?;
        Ok(())
    })
    .await
}
