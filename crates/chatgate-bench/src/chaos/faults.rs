//! The faults, injected one after another on a fixed rotation (node faults
//! round robin over the nodes, shifted by one every round so that each node
//! meets each kind): `kill -9` a node and start it again; SIGSTOP a
//! node for longer than the lease, then SIGCONT (its runs must be fenced);
//! restart Redis empty; SIGTERM a node (it drains: 1012 to its sockets) and
//! start it again. On a Redis Cluster (`--redis-cluster`) the Redis restart is
//! replaced by two faults of [`super::cluster_faults`]: a primary SIGKILLed,
//! failed over and restarted as a replica, and live sessions' slots migrated
//! to another primary. Each is recorded with its times for the checks that
//! depend on them (how soon an owner's runs must end, which sessions' Redis
//! state may have been lost).

use std::{
    ops::RangeInclusive,
    sync::Arc,
    time::{Duration, SystemTime},
};

use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{Ctx, cluster_faults, ledger, soak_redis::SoakRedis, stack::Stack};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Kill,
    Freeze,
    RedisRestart,
    Drain,
    PrimaryFailover,
    SlotMigration,
}

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill_9",
            FaultKind::Freeze => "sigstop_past_lease",
            FaultKind::RedisRestart => "redis_restart",
            FaultKind::Drain => "sigterm_drain",
            FaultKind::PrimaryFailover => "redis_primary_killed",
            FaultKind::SlotMigration => "slot_migration",
        }
    }

    /// The rotation on one Redis.
    pub const SINGLE: [FaultKind; 4] = [FaultKind::Kill, FaultKind::Freeze, FaultKind::RedisRestart, FaultKind::Drain];
    /// The rotation on a Redis Cluster.
    pub const CLUSTER: [FaultKind; 5] =
        [FaultKind::Kill, FaultKind::Freeze, FaultKind::PrimaryFailover, FaultKind::Drain, FaultKind::SlotMigration];

    pub fn rotation(cluster: bool) -> &'static [FaultKind] {
        if cluster { &Self::CLUSTER } else { &Self::SINGLE }
    }
}

/// One injected fault.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    pub kind: FaultKind,
    /// The node's id (node faults).
    pub node: Option<String>,
    /// When the node died, froze or began to drain, or Redis was killed.
    pub at: SystemTime,
    /// When it was back (restarted, continued, Redis answering).
    pub back_at: Option<SystemTime>,
    pub note: String,
    /// The hash slots whose Redis state the fault may have lost (every slot for a restart of
    /// the one Redis; the killed primary's slots, whose unreplicated writes died with it).
    pub lost_slots: Vec<RangeInclusive<u16>>,
}

impl FaultRecord {
    /// The latest moment a run its node owned at `at` may still be processing.
    pub fn deadline(&self, lease: Duration, grace: Duration) -> Option<SystemTime> {
        let slack = Duration::from_secs(5);
        match self.kind {
            FaultKind::Kill | FaultKind::Freeze => Some(self.at + lease + slack),
            FaultKind::Drain => Some(self.at + grace + slack),
            FaultKind::RedisRestart | FaultKind::PrimaryFailover | FaultKind::SlotMigration => None,
        }
    }

    /// Whether Redis may have lost state of the keys in `slot` at this fault.
    pub fn loses_state_of(&self, slot: u16) -> bool {
        self.lost_slots.iter().any(|r| r.contains(&slot))
    }

    /// A fault that could not be injected (`note` says why).
    pub fn skipped(kind: FaultKind, note: &str) -> FaultRecord {
        let now = SystemTime::now();
        FaultRecord { kind, node: None, at: now, back_at: Some(now), note: note.to_string(), lost_slots: Vec::new() }
    }

    pub fn to_json(&self, origin: SystemTime) -> Value {
        let secs = |t: SystemTime| t.duration_since(origin).map(|d| (d.as_millis() as f64) / 1000.0).unwrap_or(0.0);
        json!({
            "kind": self.kind.name(), "node": self.node, "at_s": secs(self.at),
            "back_after_s": self.back_at.map(|b| b.duration_since(self.at).map(|d| d.as_secs_f64()).unwrap_or(0.0)),
            "note": self.note,
        })
    }
}

/// A counter of a node's `/metrics` (summed over labels).
async fn node_metric(ctx: &Ctx, port: u16, name: &str) -> Option<f64> {
    let text = ctx.http.get(format!("http://127.0.0.1:{port}/metrics")).send().await.ok()?.text().await.ok()?;
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((metric, value)) = line.rsplit_once(' ') else { continue };
        if metric.split('{').next() == Some(name) {
            *sum.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    Some(sum.unwrap_or(0.0))
}

/// Injects faults until `until`, one every `every` (each starts after the last one is over).
pub async fn inject(ctx: Arc<Ctx>, stack: Arc<Stack>, first_at: Instant, every: Duration, until: Instant) {
    tokio::time::sleep_until(first_at).await;
    let mut turn = 0usize;
    let mut node_turn = 0usize;
    let mut next = first_at;
    let rotation = FaultKind::rotation(stack.redis.is_cluster());
    while Instant::now() < until {
        let kind = rotation[turn % rotation.len()];
        turn += 1;
        let record = match kind {
            FaultKind::RedisRestart => restart_redis(&ctx, &stack).await,
            FaultKind::PrimaryFailover => cluster_faults::kill_primary(&ctx, &stack.redis).await,
            FaultKind::SlotMigration => cluster_faults::migrate_live_slots(&ctx, &stack.redis).await,
            _ => {
                // Round robin, shifted by one node every round: with as many node fault kinds
                // as nodes, plain round robin would give each kind always the same node.
                let count = stack.nodes.len();
                let node = (node_turn + node_turn / count) % count;
                node_turn += 1;
                node_fault(&ctx, &stack, kind, node).await
            }
        };
        ctx.add(&format!("faults_{}", kind.name()), 1);
        ctx.faults.lock().unwrap_or_else(|e| e.into_inner()).push(record);
        next += every;
        let earliest = Instant::now() + Duration::from_secs(2);
        tokio::time::sleep_until(next.max(earliest)).await;
    }
}

async fn restart_redis(ctx: &Ctx, stack: &Stack) -> FaultRecord {
    let SoakRedis::Single { server, .. } = &stack.redis else {
        return FaultRecord::skipped(FaultKind::RedisRestart, "no single Redis to restart");
    };
    let mut redis = server.lock().await;
    let at = SystemTime::now();
    redis.kill();
    tokio::time::sleep(Duration::from_millis(rand::random_range(300..1500))).await;
    // The restart waits (briefly) for PING: off the runtime's worker threads' async work.
    let note = match tokio::task::block_in_place(|| redis.restart()) {
        Ok(()) => String::new(),
        Err(e) => {
            ctx.fail(ledger::AVAILABILITY, format!("redis-server did not come back: {e}"));
            e.to_string()
        }
    };
    FaultRecord {
        kind: FaultKind::RedisRestart,
        node: None,
        at,
        back_at: Some(SystemTime::now()),
        note,
        lost_slots: vec![0..=16383],
    }
}

async fn node_fault(ctx: &Ctx, stack: &Stack, kind: FaultKind, index: usize) -> FaultRecord {
    let mut node = stack.nodes[index].lock().await;
    let settings = &stack.settings;
    let mut note = String::new();
    let at;
    match kind {
        FaultKind::Kill => {
            at = SystemTime::now();
            node.kill().await;
            tokio::time::sleep(Duration::from_millis(rand::random_range(500..2000))).await;
        }
        FaultKind::Freeze => {
            let fenced_before = node_metric(ctx, node.port, "chatgate_redis_fenced_writes_total").await.unwrap_or(0.0);
            at = SystemTime::now();
            if let Err(e) = node.signal(Signal::SIGSTOP) {
                note = format!("SIGSTOP failed: {e}");
            }
            let frozen = settings.lease + Duration::from_millis(rand::random_range(2000..3000));
            tokio::time::sleep(frozen).await;
            if let Err(e) = node.signal(Signal::SIGCONT) {
                note = format!("SIGCONT failed: {e}");
            }
            let back_at = SystemTime::now();
            // Whatever the node tries to append for its lost runs is refused meanwhile.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let fenced_after = node_metric(ctx, node.port, "chatgate_redis_fenced_writes_total").await.unwrap_or(0.0);
            let fenced = (fenced_after - fenced_before).max(0.0) as u64;
            ctx.add("fenced_writes_after_sigcont", fenced);
            if note.is_empty() {
                note = format!("frozen {frozen:?}; {fenced} fenced writes after SIGCONT");
            }
            return FaultRecord {
                kind,
                node: Some(node.id.clone()),
                at,
                back_at: Some(back_at),
                note,
                lost_slots: Vec::new(),
            };
        }
        FaultKind::Drain => {
            at = SystemTime::now();
            let signalled = node.signal(Signal::SIGTERM);
            let limit = settings.drain_grace + Duration::from_secs(15);
            let exited = node.wait_exit(limit, stack.dir.path()).await;
            let took = at.elapsed().unwrap_or_default();
            if !exited {
                ctx.fail(ledger::AVAILABILITY, format!("node {} did not exit within {limit:?} of SIGTERM", node.id));
            }
            note = match signalled {
                Ok(()) => format!("drained and exited in {:.1}s", took.as_secs_f64()),
                Err(e) => format!("SIGTERM failed: {e}"),
            };
        }
        FaultKind::RedisRestart | FaultKind::PrimaryFailover | FaultKind::SlotMigration => {
            drop(node);
            return FaultRecord::skipped(kind, "not a node fault");
        }
    }
    if let Err(e) = node.start().await {
        ctx.fail(ledger::AVAILABILITY, format!("node {} did not come back: {e}", node.id));
        note.push_str(&format!("; restart failed: {e}"));
    }
    FaultRecord {
        kind,
        node: Some(node.id.clone()),
        at,
        back_at: Some(SystemTime::now()),
        note,
        lost_slots: Vec::new(),
    }
}
