//! `fanout` and `latency`: R concurrent `script` runs, each watched by S
//! sockets spread over the nodes, events of B bytes as fast as possible or
//! paced to a target delivery rate. Every socket checks its seq sequence and
//! measures each stamped event's delivery latency (runtime emit → client
//! receive); the nodes' and Redis's CPU time (every server of a Redis Cluster,
//! with a per-shard breakdown against the sessions each serves) and the nodes'
//! counters are read before and after.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use futures_util::{StreamExt, stream};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::{
    client,
    cluster::{Cluster, ClusterArgs},
    stats::{Head, Latencies, SeqCheck, round, unix_micros},
};
use chatgate_testkit::ws::{self, Socket};

/// Shape of one fan-out measurement.
#[derive(Debug, Clone, clap::Args)]
pub struct FanoutArgs {
    /// Concurrent runs (one session each).
    #[arg(long, default_value_t = 100)]
    pub runs: usize,
    /// Sockets watching each run, spread over the nodes.
    #[arg(long, default_value_t = 10)]
    pub subscribers: usize,
    /// `stream_delta` events per run.
    #[arg(long, default_value_t = 500)]
    pub events: u64,
    /// `stream_delta` content bytes.
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: u64,
    /// Target deliveries per second over all sockets (paced); unset: as fast as possible.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Paced: how long the runs last (sets the events per run).
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
}

/// How long a socket may wait for its next frame before the scenario fails.
const FRAME_WAIT: Duration = Duration::from_secs(120);
/// Sockets being set up at once.
const SETUP_CONCURRENCY: usize = 32;

/// A chatgate build, the environment its nodes run with, and whether they run on a private
/// Redis Cluster.
pub struct Variant {
    pub bin: PathBuf,
    pub env: Vec<(String, String)>,
    pub redis_cluster: bool,
}

/// Figures compared between variants.
const COMPARED: [&str; 7] = [
    "/latency/p50_ms",
    "/latency/p99_ms",
    "/delivered_per_sec",
    "/cpu_us_per_delivered_event/nodes_plus_redis",
    "/cpu_us_per_delivered_event/nodes",
    "/cpu_us_per_delivered_event/redis",
    "/redis_round_trips_per_appended_event",
];

/// Measures each binary in turn (A B A B …) on fresh nodes. One binary, one
/// measurement: its full result. Otherwise the compared figures of each
/// measurement, their medians and the ratios of the medians to the first binary's.
pub async fn compare(
    variants: &[Variant],
    cluster_args: &ClusterArgs,
    nodes: usize,
    args: &FanoutArgs,
    repeat: usize,
) -> anyhow::Result<Value> {
    let mut results: Vec<Vec<Value>> = vec![Vec::new(); variants.len()];
    for _ in 0..repeat.max(1) {
        for (i, variant) in variants.iter().enumerate() {
            let mut args_here = cluster_args.clone();
            args_here.node_env = variant.env.clone();
            if variant.redis_cluster {
                args_here.private_redis_cluster = true;
                args_here.private_redis = false;
            }
            let cluster = Cluster::start(&variant.bin, &args_here, nodes, &[]).await?;
            let result = measure(&cluster, args).await;
            cluster.stop().await;
            results[i].push(result?);
        }
    }
    if results.len() == 1 && results[0].len() == 1 {
        return Ok(results.remove(0).remove(0));
    }
    let median = |runs: &[Value], pointer: &str| {
        let mut values: Vec<f64> = runs.iter().filter_map(|r| r.pointer(pointer)?.as_f64()).collect();
        values.sort_by(|a, b| a.total_cmp(b));
        values.get(values.len() / 2).copied()
    };
    let mut out = serde_json::Map::new();
    for (i, (variant, runs)) in variants.iter().zip(&results).enumerate() {
        let mut figures = serde_json::Map::new();
        figures.insert("binary".into(), json!(variant.bin.display().to_string()));
        let env: Vec<String> = variant.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        figures.insert("node_env".into(), json!(env.join(" ")));
        figures
            .insert("redis".into(), json!(if variant.redis_cluster { "private Redis Cluster" } else { "one Redis" }));
        for pointer in COMPARED {
            let name = pointer.trim_start_matches('/').replace('/', ".");
            let each: Vec<Value> = runs.iter().map(|r| r.pointer(pointer).cloned().unwrap_or(Value::Null)).collect();
            figures.insert(format!("{name} (each)"), json!(each));
            let m = median(runs, pointer);
            figures.insert(format!("{name} (median)"), json!(m));
            if i > 0
                && let (Some(m), Some(base)) = (m, median(&results[0], pointer))
                && base != 0.0
            {
                figures.insert(format!("{name} (ratio to A)"), json!(round(m / base, 3)));
            }
        }
        let seq_clean =
            runs.iter().all(|r| r["seq"]["gaps"] == 0 && r["seq"]["duplicates"] == 0 && r["seq"]["reorders"] == 0);
        figures.insert("seq_clean".into(), json!(seq_clean));
        if let Some(last) = runs.last().filter(|r| !r["redis_shards"].is_null()) {
            figures.insert("redis_shards (last measurement)".into(), last["redis_shards"].clone());
        }
        out.insert(((b'A' + i as u8) as char).to_string(), Value::Object(figures));
    }
    out.insert(
        "shape".into(),
        json!({
            "runs": args.runs, "subscribers": args.subscribers, "events": args.events,
            "payload_bytes": args.payload_bytes, "rate": args.rate, "nodes": nodes, "repeat": repeat,
        }),
    );
    Ok(Value::Object(out))
}

/// One watching socket, ready to read.
struct Watcher {
    ws: Socket,
    session: String,
    /// The first watcher of a run starts it at `offset` after the common start.
    sends: Option<(String, Duration)>,
}

/// What one socket saw.
struct Seen {
    check: SeqCheck,
    latencies: Latencies,
    bytes: u64,
    done_at: Instant,
}

/// The highest rate `--rate` can pace: one event per millisecond per run.
pub fn max_paced_rate(args: &FanoutArgs) -> f64 {
    (args.runs * args.subscribers) as f64 * 1000.0
}

/// Runs one fan-out measurement on `cluster`.
pub async fn measure(cluster: &Cluster, args: &FanoutArgs) -> anyhow::Result<Value> {
    let nodes = cluster.nodes.len();
    let interval_ms = match args.rate {
        Some(rate) => {
            let per_run = rate / (args.runs * args.subscribers) as f64;
            let interval = (1000.0 / per_run).round();
            if interval < 1.0 {
                bail!("{rate} deliveries/s needs more than 1000 events/s per run; use more runs or subscribers");
            }
            interval as u64
        }
        None => 0,
    };
    let events = ((args.seconds * 1000.0) as u64).checked_div(interval_ms).map_or(args.events, |n| n.max(1));
    let script = json!({
        "events": events, "payloadBytes": args.payload_bytes,
        "intervalMs": interval_ms, "stamp": true,
    })
    .to_string();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    // Sessions, each created on the node its run will live on.
    let mut plans = Vec::with_capacity(args.runs);
    for r in 0..args.runs {
        let token = cluster.api.token(&format!("fanout-{}-{r}", &tag[..8]))?;
        let session = cluster.api.create_session(cluster.addr(r), &token).await?;
        plans.push((r, token, session));
    }
    // Sockets: watcher j of run r on node (r + j) mod nodes; watcher 0 sends on the run's node.
    let stagger = Duration::from_millis(interval_ms) / args.runs.max(1) as u32;
    let specs: Vec<(usize, usize)> = (0..args.runs).flat_map(|r| (0..args.subscribers).map(move |j| (r, j))).collect();
    let sessions: Vec<String> = plans.iter().map(|(_, _, session)| session.clone()).collect();
    let plans = Arc::new(plans);
    let watchers: Vec<anyhow::Result<Watcher>> = stream::iter(specs)
        .map(|(r, j)| {
            let plans = plans.clone();
            let script = script.clone();
            async move {
                let (_, token, session) = &plans[r];
                let index = r * args.subscribers + j;
                let mut ws = ws::open(cluster.addr(r + j), token, Some(ws::source_address(index))).await?;
                let ack = client::subscribe(&mut ws, session, 0).await?;
                if ack["isProcessing"] != false {
                    bail!("session {session} is already running: {ack}");
                }
                let sends = (j == 0).then(|| (script, stagger * r as u32));
                Ok(Watcher { ws, session: session.clone(), sends })
            }
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .collect()
        .await;
    let watchers: Vec<Watcher> = watchers.into_iter().collect::<anyhow::Result<_>>()?;
    let expected = events + 2;

    let load_average = crate::cluster::load_average();
    let before = cluster.sample().await?;
    let start = Instant::now() + Duration::from_millis(100);
    let tasks: Vec<_> = watchers.into_iter().map(|w| tokio::spawn(watch(w, start, expected as usize))).collect();
    let mut check = SeqCheck::default();
    let mut latencies = Latencies::with_capacity((events as usize) * args.runs * args.subscribers);
    let mut bytes = 0u64;
    let mut last_done = start;
    for task in tasks {
        let seen = task.await.context("a socket task panicked")??;
        check.merge(&seen.check);
        latencies.extend(seen.latencies);
        bytes += seen.bytes;
        last_done = last_done.max(seen.done_at);
    }
    let after = cluster.sample().await?;
    let usage = after.since(&before);
    let elapsed = last_done.duration_since(start).as_secs_f64();
    let delivered = check.received as f64;
    let unique = check.received.saturating_sub(check.duplicates);
    let expected_deliveries = expected * (args.runs * args.subscribers) as u64;
    let per_event_us = |cpu: f64| round(cpu / delivered * 1e6, 2);
    let server_cpu = usage.node_cpu + usage.redis_cpu.unwrap_or(0.0);
    let shards = match &cluster.redis {
        Some(redis) => redis.shard_breakdown(&sessions, &usage.redis_cpu_by_port)?,
        None => None,
    };
    Ok(json!({
        "nodes": nodes,
        "runs": args.runs,
        "subscribers_per_run": args.subscribers,
        "events_per_run": expected,
        "payload_bytes": args.payload_bytes,
        "mean_frame_bytes": round(bytes as f64 / delivered.max(1.0), 0),
        "mode": match args.rate { Some(rate) => format!("paced at {rate} deliveries/s (intervalMs {interval_ms})"), None => "as fast as possible".into() },
        "delivered_events": check.received,
        "expected_deliveries": expected_deliveries,
        "delivery_percent": round(unique as f64 * 100.0 / expected_deliveries.max(1) as f64, 3),
        "seconds": round(elapsed, 3),
        "delivered_per_sec": round(delivered / elapsed, 0),
        "latency": latencies.summary(),
        "seq": check.to_json(),
        "cpu_seconds": {
            "nodes": round(usage.node_cpu, 2),
            "redis": usage.redis_cpu.map(|c| round(c, 2)),
            "load_generator": round(usage.client_cpu, 2),
            "postgres": round(usage.postgres_cpu, 2),
            "postgres_scope": if cluster.postgres_is_private() { "private to this scenario" } else { "every postgres process on the machine" },
        },
        "cpu_us_per_delivered_event": {
            "nodes_plus_redis": per_event_us(server_cpu),
            "nodes": per_event_us(usage.node_cpu),
            "redis": usage.redis_cpu.map(per_event_us),
            "load_generator": per_event_us(usage.client_cpu),
            "postgres": per_event_us(usage.postgres_cpu),
        },
        "appended_events": usage.metrics.events_appended,
        "redis_round_trips_per_appended_event": if usage.metrics.events_appended > 0.0 {
            json!(round(usage.metrics.redis_round_trips / usage.metrics.events_appended, 4))
        } else {
            json!(null)
        },
        "redis_round_trips_by_op": usage.metrics.round_trips_by_op,
        "slow_consumer_closes": usage.metrics.slow_consumer_closes,
        "redis_commands": redis_commands(&usage.redis_commands, usage.metrics.events_appended),
        "redis_servers": usage.redis_cpu_by_port.len(),
        "redis_shards": shards,
        "load_average_before": load_average,
    }))
}

/// The Redis commands that cost most, per appended event: `name: calls, µs`.
fn redis_commands(stats: &std::collections::BTreeMap<String, (u64, u64)>, appended: f64) -> Value {
    let mut top: Vec<_> = stats.iter().collect();
    top.sort_by_key(|(_, (_, usec))| std::cmp::Reverse(*usec));
    let per = appended.max(1.0);
    let rows: serde_json::Map<String, Value> = top
        .into_iter()
        .take(6)
        .map(|(name, (calls, usec))| {
            (name.clone(), json!(format!("{calls} calls, {:.2} µs per appended event", *usec as f64 / per)))
        })
        .collect();
    Value::Object(rows)
}

/// Reads one socket until its run's `complete`, checking every seq.
async fn watch(mut w: Watcher, start: Instant, expected: usize) -> anyhow::Result<Seen> {
    if let Some((script, offset)) = w.sends.take() {
        tokio::time::sleep_until(start + offset).await;
        ws::send(&mut w.ws, json!({ "type": "chat.send", "sessionId": w.session, "content": script })).await?;
    }
    let mut check = SeqCheck::starting_at(1);
    let mut latencies = Latencies::with_capacity(expected);
    let mut bytes = 0u64;
    loop {
        let text = ws::recv_text(&mut w.ws, FRAME_WAIT).await?;
        let head = Head::parse(&text)?;
        let Some(seq) = head.seq else { continue };
        if head.session_id != Some(w.session.as_str()) {
            continue;
        }
        if let Some(emitted) = head.emitted_at_us {
            latencies.record(unix_micros().saturating_sub(emitted));
        }
        bytes += text.len() as u64;
        check.see(seq);
        if head.kind == Some("complete") {
            check.finish(seq);
            return Ok(Seen { check, latencies, bytes, done_at: Instant::now() });
        }
    }
}
