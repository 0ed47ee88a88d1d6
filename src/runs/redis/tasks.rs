//! The node's background tasks: the pub/sub dispatcher (with reconnects), the
//! pub/sub probe, and the sweeper (orphaned runs, idle user channels).
//!
//! Every task holds the node and stops when the registry's last handle drops
//! (its cancellation token).

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use ::redis::{AsyncCommands, aio::PubSubStream};
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    keys,
    live::SeenRun,
    node::{Failure, Reaped, RedisNode, RunKey, parse_index_member, run_key},
};
use crate::sync::lock_unpoisoned;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Most index entries looked at per global sweep.
const SWEEP_BATCH: isize = 2000;

/// Reads the node's pub/sub connection and re-dials it when it drops or the probe says it went silent.
pub(super) async fn dispatch(
    node: Arc<RedisNode>,
    first: PubSubStream,
    redial: Arc<Notify>,
    cancel: CancellationToken,
) {
    let mut stream = Some(first);
    let mut backoff = Duration::from_millis(50);
    loop {
        let mut current = match stream.take() {
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
                    tracing::warn!(node = node.id, "Redis pub/sub probe unanswered; re-dialing");
                    break;
                }
                message = current.next() => match message {
                    Some(message) => node.on_message(message.get_channel_name(), message.get_payload_bytes()),
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

/// Publishes a nonce to the node's probe channel and expects it back within one period.
pub(super) async fn probe(node: Arc<RedisNode>, redial: Arc<Notify>, cancel: CancellationToken) {
    let period = probe_period(&node);
    let mut echo = node.probe.echo.subscribe();
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
        nonce += 1;
        let published = node.once("probe", || async {
            let mut conn = node.conn().await?;
            let receivers: u64 = conn.publish(&node.probe_channel, nonce).await?;
            Ok(receivers)
        });
        let outcome = match tokio::time::timeout(period, published).await {
            Ok(Ok(_)) => {
                let heard = tokio::time::timeout(period, echo.wait_for(|seen| *seen >= nonce)).await;
                match heard {
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
    let idle: Vec<(String, usize)> = {
        let mut users = lock_unpoisoned(&node.users);
        let idle: Vec<(String, usize)> =
            users.iter().filter(|(_, u)| u.tx.receiver_count() == 0).map(|(id, u)| (id.clone(), u.holds)).collect();
        for (id, _) in &idle {
            users.remove(id);
        }
        idle
    };
    for (user_id, holds) in idle {
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
            Some((id.clone(), run.clone(), s.last_dispatched))
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
            if let Some(session) = lock_unpoisoned(&node.sessions).get_mut(&session_id) {
                session.lock_missing_since = None;
            }
            continue;
        }
        let missing_since = {
            let mut sessions = lock_unpoisoned(&node.sessions);
            let Some(session) = sessions.get_mut(&session_id) else { continue };
            *session.lock_missing_since.get_or_insert_with(Instant::now)
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
                if let Some(session) = lock_unpoisoned(&node.sessions).get_mut(&session_id)
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
