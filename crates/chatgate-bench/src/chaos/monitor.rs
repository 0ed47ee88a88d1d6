//! Watches the cluster while the soak runs: `GET /api/providers/sessions/running`
//! of every user (which node owns which run since when; a run still listed
//! longer than lease + 5 s after its owner died is stuck), and resource
//! samples every few seconds (each node's RSS and open descriptors, Redis's
//! memory and clients, summed over a cluster's primaries, the bench's own RSS
//! and descriptors, the machine's TCP sockets) to show that they stay bounded
//! over a long soak.

use std::{
    collections::HashSet,
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime},
};

use serde_json::{Value, json};

use super::{Ctx, ledger, soak_redis::SoakRedis, stack::Stack};
use crate::{client::rss_of, redis_shards};

/// Polls the running runs of every user until the soak stops.
pub async fn running(ctx: Arc<Ctx>) {
    let mut flagged: HashSet<String> = HashSet::new();
    let mut polls = 0u64;
    while !ctx.stop_all.load(Ordering::SeqCst) {
        for user in 0..ctx.tokens.len() {
            let Some(body) = ctx.get_once(user, "/api/providers/sessions/running", ctx.lb_port).await else {
                ctx.add("running_polls_failed", 1);
                continue;
            };
            polls += 1;
            let now = SystemTime::now();
            let faults = ctx.fault_log();
            for run in body["data"]["sessions"].as_array().into_iter().flatten() {
                let (Some(run_id), Some(node), Some(started)) = (
                    run["runId"].as_str(),
                    run["nodeId"].as_str(),
                    run["startedAt"].as_str().and_then(|s| humantime::parse_rfc3339(s).ok()),
                ) else {
                    continue;
                };
                ctx.owners
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(run_id.to_string())
                    .or_insert_with(|| (node.to_string(), started));
                for fault in faults.iter().filter(|f| f.node.as_deref() == Some(node)) {
                    let Some(deadline) = fault.deadline(ctx.settings.lease, ctx.settings.drain_grace) else { continue };
                    if started < fault.at && now > deadline && flagged.insert(run_id.to_string()) {
                        ctx.fail(
                            ledger::STUCK_PROCESSING,
                            format!(
                                "run {run_id} of session {} still listed as running on {node} {:.1}s after its owner {}",
                                run["sessionId"],
                                now.duration_since(fault.at).unwrap_or_default().as_secs_f64(),
                                fault.kind.name()
                            ),
                        );
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ctx.add("running_polls", polls);
}

fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

fn tcp_inuse() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    while let Some(word) = words.next() {
        if word == "inuse" {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// Used memory and clients, summed over the servers that hold keys (each live primary of a
/// Redis Cluster).
async fn redis_info(redis: &SoakRedis) -> Option<(u64, u64)> {
    let mut sum = (0, 0);
    for port in redis.key_holders().await.ok()? {
        let memory = redis_shards::info_numbers(port, "memory").await.ok()?;
        let clients = redis_shards::info_numbers(port, "clients").await.ok()?;
        sum.0 += memory.get("used_memory")?;
        sum.1 += clients.get("connected_clients")?;
    }
    Some(sum)
}

/// One moment's resources; `None` where a process was down.
#[derive(Debug, Clone)]
pub struct Sample {
    pub values: Vec<(String, Option<u64>)>,
}

/// Samples every `every` until the soak stops.
pub async fn sample(ctx: Arc<Ctx>, stack: Arc<Stack>, every: Duration) -> Vec<Sample> {
    let mut samples = Vec::new();
    let me = std::process::id();
    while !ctx.stop_all.load(Ordering::SeqCst) {
        let mut values = Vec::new();
        for (index, pid) in stack.pids.iter().enumerate() {
            let pid = pid.load(Ordering::SeqCst);
            let alive = (pid != 0).then_some(pid);
            values.push((format!("node{index}_rss_mib"), alive.and_then(rss_of).map(|b| b >> 20)));
            values.push((format!("node{index}_open_fds"), alive.and_then(open_fds)));
        }
        let redis = redis_info(&stack.redis).await;
        values.push(("redis_used_memory_kib".to_string(), redis.map(|r| r.0 >> 10)));
        values.push(("redis_clients".to_string(), redis.map(|r| r.1)));
        values.push(("bench_rss_mib".to_string(), rss_of(me).map(|b| b >> 20)));
        values.push(("bench_open_fds".to_string(), open_fds(me)));
        values.push(("machine_tcp_sockets".to_string(), tcp_inuse()));
        samples.push(Sample { values });
        let wake = tokio::time::Instant::now() + every;
        while tokio::time::Instant::now() < wake && !ctx.stop_all.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    samples
}

/// Per resource: the first, highest and last value, and the mean of the first and the last quarter.
pub fn summary(samples: &[Sample]) -> Value {
    let mut out = serde_json::Map::new();
    let Some(first) = samples.first() else { return Value::Object(out) };
    for (column, (name, _)) in first.values.iter().enumerate() {
        let series: Vec<u64> = samples.iter().filter_map(|s| s.values.get(column).and_then(|v| v.1)).collect();
        if series.is_empty() {
            continue;
        }
        let quarter = series.len().div_ceil(4);
        let mean = |part: &[u64]| (part.iter().sum::<u64>() as f64 / part.len().max(1) as f64).round();
        out.insert(
            name.clone(),
            json!({
                "first": series[0], "max": series.iter().max(), "last": series[series.len() - 1],
                "mean_first_quarter": mean(&series[..quarter]), "mean_last_quarter": mean(&series[series.len() - quarter..]),
            }),
        );
    }
    out.insert("samples".to_string(), json!(samples.len()));
    Value::Object(out)
}
