//! The faults of a soak on a Redis Cluster (`--redis-cluster`), in place of the restart of
//! the one Redis:
//!
//! - `redis_primary_killed`: SIGKILL the primary that serves a live session's slot, wait
//!   until its replica is promoted and the cluster agrees, then start the killed server
//!   again (0.5–2 s later) so that it rejoins as the new primary's replica. Writes it had
//!   acknowledged but not replicated are lost with it: the record names its slots, whose
//!   sessions' seqs may jump (as after a Redis restart).
//! - `slot_migration`: move the slots of up to three live sessions, keys and ownership, each
//!   to another primary (the kit's `migrate_slot`, as `redis-cli --cluster reshard` does).
//!
//! The kit's cluster calls block (they poll), so they run on a blocking thread.

use std::{
    ops::RangeInclusive,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use chatgate::runs::redis::keys;
use chatgate_testkit::redis_cluster::{PrivateRedisCluster, Role};

use super::{
    Ctx,
    faults::{FaultKind, FaultRecord},
    ledger,
    soak_redis::SoakRedis,
};

/// Sessions whose slots one migration fault moves.
const SESSIONS_PER_MIGRATION: usize = 3;

/// The hash slot of a session's keys (all tagged `{S}`).
pub fn session_slot(session: &str) -> u16 {
    keys::slot(&keys::run(session))
}

/// Up to `count` distinct sessions under watch now (drivers' current sessions), at random.
fn live_sessions(ctx: &Ctx, count: usize) -> Vec<String> {
    let mut ids: Vec<String> = ctx.book().sessions.keys().cloned().collect();
    let mut picked = Vec::new();
    while picked.len() < count && !ids.is_empty() {
        picked.push(ids.swap_remove(rand::random_range(0..ids.len())));
    }
    picked
}

fn lock(cluster: &std::sync::Mutex<PrivateRedisCluster>) -> std::sync::MutexGuard<'_, PrivateRedisCluster> {
    cluster.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the primary kill did.
struct Failover {
    port: u16,
    slots: Vec<RangeInclusive<u16>>,
    at: SystemTime,
    promoted_in: Duration,
    back_at: SystemTime,
    rejoined_in: Duration,
    rejoined_as: Option<Role>,
}

/// SIGKILLs the primary of a live session's slot (else the first primary), waits for the
/// failover, restarts the killed server as a replica.
pub async fn kill_primary(ctx: &Ctx, redis: &SoakRedis) -> FaultRecord {
    let SoakRedis::Cluster { cluster, .. } = redis else {
        return FaultRecord::skipped(FaultKind::PrimaryFailover, "not a Redis Cluster");
    };
    let session = live_sessions(ctx, 1).pop();
    let slot = session.as_deref().map(session_slot);
    let cluster = cluster.clone();
    let pause = Duration::from_millis(rand::random_range(500..2000));
    let outcome = tokio::task::spawn_blocking(move || -> anyhow::Result<Failover> {
        let mut cluster = lock(&cluster);
        let nodes = cluster.nodes()?;
        let mut primaries = nodes.iter().filter(|n| n.role == Role::Primary && n.pid.is_some() && !n.slots.is_empty());
        let victim = match slot {
            Some(slot) => primaries.find(|n| n.slots.iter().any(|r| r.contains(&slot))),
            None => primaries.next(),
        }
        .context("no live primary serves the chosen slot")?;
        let (port, slots) = (victim.port, victim.slots.clone());
        let probe = slots.first().map_or(0, |r| *r.start());
        let at = SystemTime::now();
        cluster.kill_node(port);
        let promoted_in = cluster.wait_for_failover(probe)?;
        let back_at = SystemTime::now();
        std::thread::sleep(pause);
        let restarting = Instant::now();
        cluster.restart_node(port)?;
        let rejoined_in = restarting.elapsed();
        let rejoined_as = cluster.nodes()?.iter().find(|n| n.port == port).map(|n| n.role);
        Ok(Failover { port, slots, at, promoted_in, back_at, rejoined_in, rejoined_as })
    })
    .await
    .context("the failover task panicked")
    .and_then(|r| r);
    match outcome {
        Ok(f) => {
            ctx.add("redis_failovers", 1);
            if f.rejoined_as != Some(Role::Replica) {
                ctx.add("redis_killed_primary_rejoined_not_as_replica", 1);
            }
            let ranges: Vec<String> = f.slots.iter().map(|r| format!("{}-{}", r.start(), r.end())).collect();
            let note = format!(
                "primary {} (slots {}; session {}) SIGKILLed; replica promoted after {:.2}s; restarted {:?}, \
                 rejoined as {:?} in {:.2}s",
                f.port,
                ranges.join(","),
                session.as_deref().unwrap_or("none"),
                f.promoted_in.as_secs_f64(),
                pause,
                f.rejoined_as,
                f.rejoined_in.as_secs_f64()
            );
            FaultRecord {
                kind: FaultKind::PrimaryFailover,
                node: None,
                at: f.at,
                back_at: Some(f.back_at),
                note,
                lost_slots: f.slots,
            }
        }
        Err(e) => {
            ctx.fail(ledger::AVAILABILITY, format!("Redis Cluster failover: {e:#}"));
            let mut record = FaultRecord::skipped(FaultKind::PrimaryFailover, &format!("{e:#}"));
            // Whatever happened, a primary may have died with unreplicated writes.
            record.lost_slots = vec![0..=16383];
            record
        }
    }
}

/// Moves the slots of up to [`SESSIONS_PER_MIGRATION`] live sessions, each to a primary
/// other than its owner (chosen at random).
pub async fn migrate_live_slots(ctx: &Ctx, redis: &SoakRedis) -> FaultRecord {
    let SoakRedis::Cluster { cluster, .. } = redis else {
        return FaultRecord::skipped(FaultKind::SlotMigration, "not a Redis Cluster");
    };
    let sessions = live_sessions(ctx, SESSIONS_PER_MIGRATION);
    let cluster = cluster.clone();
    let at = SystemTime::now();
    let outcome = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
        let cluster = lock(&cluster);
        let mut done = Vec::new();
        let mut moved = Vec::new();
        for session in sessions {
            let slot = session_slot(&session);
            if moved.contains(&slot) {
                continue;
            }
            let from = cluster.primary_for_slot(slot)?;
            let targets: Vec<u16> = cluster
                .nodes()?
                .iter()
                .filter(|n| n.role == Role::Primary && n.pid.is_some() && n.port != from && !n.slots.is_empty())
                .map(|n| n.port)
                .collect();
            let Some(&to) = targets.get(rand::random_range(0..targets.len().max(1))) else { continue };
            let took = cluster.migrate_slot(slot, to).with_context(|| format!("slot {slot} {from} → {to}"))?;
            moved.push(slot);
            done.push(format!("slot {slot} (session {session}) {from} → {to} in {} ms", took.as_millis()));
        }
        Ok(done)
    })
    .await
    .context("the migration task panicked")
    .and_then(|r| r);
    let note = match outcome {
        Ok(done) => {
            ctx.add("slots_migrated", done.len() as u64);
            if done.is_empty() { "no live session to move".to_string() } else { done.join("; ") }
        }
        Err(e) => {
            ctx.fail(ledger::AVAILABILITY, format!("Redis Cluster slot migration: {e:#}"));
            format!("{e:#}")
        }
    };
    FaultRecord {
        kind: FaultKind::SlotMigration,
        node: None,
        at,
        back_at: Some(SystemTime::now()),
        note,
        lost_slots: Vec::new(),
    }
}
