//! `chatgate-bench`: a load generator that speaks chatgate's real protocol over
//! real sockets against nodes it spawns itself, and prints what it measured
//! (a table, or JSON with `--json`). See docs/benchmarks.md.
//!
//! Scenarios:
//! - `echo`: one `script` run of N events streamed to one socket: events per second.
//! - `idle`: N authenticated sockets each subscribed to its own session on one
//!   node: the node's RSS per socket, and the kernel's TCP memory per socket.
//! - `fanout`: R runs × S subscribers over 3 cluster nodes: deliveries/s, CPU
//!   per delivered event (nodes + Redis), latency, Redis round trips per event;
//!   on a private Redis Cluster (`--private-redis-cluster`) every server's CPU
//!   and a per-shard breakdown.
//! - `latency`: the same paced at a delivery rate, then saturated, side by side.
//! - `reconnect`: clients miss M events and resume on another node.
//! - `storm`: `reconnect` at scale: thousands of sockets drop at once and resume.
//! - `replay`: a live run with 10 000 retained events replayed from seq 0 on another node.
//! - `start`: `chat.send` → first event latency under a paced load.
//! - `ceiling`: the machine's Redis limits, for ratios.
//! - `publish`: classic PUBLISH against sharded SPUBLISH on a private Redis
//!   Cluster: Redis CPU and cluster-bus messages per message, and their ratio.
//! - `chaos`: a soak under faults (nodes killed, frozen, drained; Redis
//!   restarted, or with `--redis-cluster` a Redis Cluster's primary killed and
//!   live sessions' slots migrated) with every delivery invariant checked; exit
//!   code 1 on a failure.

mod all;
mod bench_redis;
mod ceiling;
mod chaos;
mod client;
mod cluster;
mod echo;
mod fanout;
mod idle;
mod publish;
mod reconnect;
mod redis_shards;
mod replay;
mod start;
mod stats;

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};
use serde_json::{Map, Value, json};

use cluster::{Cluster, ClusterArgs};

#[derive(Parser)]
#[command(name = "chatgate-bench", about = "Load generator for chatgate")]
struct Cli {
    /// Print results as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// The chatgate binary to spawn nodes from (default: next to this binary).
    #[arg(long, global = true)]
    chatgate_bin: Option<PathBuf>,
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// One run of N events to one socket (single node).
    Echo {
        #[arg(long, default_value_t = 20_000)]
        events: u64,
        #[arg(long, default_value_t = 64)]
        payload_bytes: u64,
        /// Runs to repeat (the best and the median are reported).
        #[arg(long, default_value_t = 5)]
        runs: u32,
    },
    /// N idle subscribed sockets on one node.
    Idle(idle::IdleArgs),
    /// R concurrent runs × S subscribers over cluster nodes.
    Fanout {
        #[command(flatten)]
        shape: fanout::FanoutArgs,
        /// Cluster nodes to spread the sockets over.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Another chatgate binary to measure alternately with this one (A B A B …), with ratios B/A.
        #[arg(long)]
        compare_bin: Option<PathBuf>,
        /// Environment for B's nodes (repeatable; with or without --compare-bin).
        #[arg(long, value_parser = client::parse_env)]
        compare_env: Vec<(String, String)>,
        /// B's nodes run on a private Redis Cluster (`--redis-mode cluster`, 3 primaries,
        /// `--cluster-replicas` each), A's on the Redis the other flags choose.
        #[arg(long)]
        compare_redis_cluster: bool,
        /// Measurements per binary.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
    },
    /// Delivery latency paced at `--rate`, then at saturation, on the same nodes.
    Latency {
        #[command(flatten)]
        shape: fanout::FanoutArgs,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Events per run in the saturated measurement.
        #[arg(long, default_value_t = 500)]
        saturated_events: u64,
    },
    /// Clients miss M events and resume on another node.
    Reconnect {
        #[command(flatten)]
        shape: reconnect::ReconnectArgs,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
    /// The storm: thousands of sockets on live runs drop at once and resume on other nodes.
    Storm {
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
        /// Live runs the clients watch.
        #[arg(long, default_value_t = 100)]
        sessions: usize,
        /// Pause before each event of a run.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Nominal length of a run; it must outlast setting the sockets up and the storm.
        #[arg(long, default_value_t = 40_000)]
        run_ms: u64,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
    /// A live run with N retained events; sockets on another node replay it from seq 0.
    Replay {
        #[command(flatten)]
        shape: replay::ReplayArgs,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
    /// `chat.send` → first event latency under a paced fan-out load.
    Start {
        #[command(flatten)]
        shape: start::StartArgs,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
    /// Soak under faults: 3 nodes behind nginx, a private Redis (or Redis Cluster with
    /// `--redis-cluster`), runs with approvals and aborts, clients hopping nodes; every invariant
    /// checked (exit code 1 if one failed).
    Chaos(chaos::ChaosArgs),
    /// This machine's Redis limits (redis-benchmark XADD and PUBLISH, one at a time and pipelined).
    Ceiling,
    /// Classic PUBLISH against sharded SPUBLISH on one private Redis Cluster, alternately.
    Publish(publish::PublishArgs),
    /// Every scenario at the documented size; prints the Markdown table of docs/benchmarks.md.
    All {
        #[arg(long, default_value_t = 19_000)]
        idle_sockets: usize,
        #[arg(long, default_value_t = 10_000)]
        storm_clients: usize,
    },
    /// Holds sockets for `idle` in a child process (internal).
    #[command(hide = true)]
    Hold {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        tag: String,
        #[arg(long)]
        offset: usize,
        #[arg(long)]
        count: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    client::raise_nofile();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let bin = client::chatgate_bin(cli.chatgate_bin.as_ref())?;
        let (name, result) = match cli.scenario {
            Scenario::Echo { events, payload_bytes, runs } => {
                ("echo", echo::run(&bin, &cli.cluster, events, payload_bytes, runs).await?)
            }
            Scenario::Idle(args) => ("idle", idle::run(&bin, &cli.cluster, &args).await?),
            Scenario::Fanout { shape, nodes, compare_bin, compare_env, compare_redis_cluster, repeat } => {
                let a = fanout::Variant {
                    bin: bin.clone(),
                    env: cli.cluster.node_env.clone(),
                    redis_cluster: cli.cluster.private_redis_cluster,
                };
                let mut variants = vec![a];
                if compare_bin.is_some() || !compare_env.is_empty() || compare_redis_cluster {
                    let mut env = cli.cluster.node_env.clone();
                    env.extend(compare_env);
                    let bin = compare_bin.unwrap_or(bin.clone());
                    let redis_cluster = compare_redis_cluster || cli.cluster.private_redis_cluster;
                    variants.push(fanout::Variant { bin, env, redis_cluster });
                }
                ("fanout", fanout::compare(&variants, &cli.cluster, nodes, &shape, repeat).await?)
            }
            Scenario::Latency { shape, nodes, saturated_events } => {
                let cluster = Cluster::start(&bin, &cli.cluster, nodes, &[]).await?;
                let result = latency(&cluster, &shape, saturated_events).await;
                cluster.stop().await;
                ("latency", result?)
            }
            Scenario::Reconnect { shape, nodes } => {
                let cluster = Cluster::start(&bin, &cli.cluster, nodes, &[]).await?;
                let result = reconnect::measure(&cluster, &shape).await;
                cluster.stop().await;
                ("reconnect", result?)
            }
            Scenario::Storm { clients, sessions, interval_ms, run_ms, nodes } => {
                let shape = reconnect::ReconnectArgs { clients, sessions, missed: 0, interval_ms, run_ms, rounds: 1 };
                let cluster = Cluster::start(&bin, &cli.cluster, nodes, &[]).await?;
                let result = reconnect::measure(&cluster, &shape).await;
                cluster.stop().await;
                ("storm", result?)
            }
            Scenario::Replay { shape, nodes } => {
                let cluster = Cluster::start(&bin, &cli.cluster, nodes, &replay::node_flags(&shape)).await?;
                let result = replay::measure(&cluster, &shape).await;
                cluster.stop().await;
                ("replay", result?)
            }
            Scenario::Start { shape, nodes } => {
                let cluster = Cluster::start(&bin, &cli.cluster, nodes, &[]).await?;
                let result = start::measure(&cluster, &shape).await;
                cluster.stop().await;
                ("start", result?)
            }
            Scenario::Chaos(args) => {
                let result = chaos::run(&bin, &cli.cluster, &args).await?;
                report("chaos", &result, cli.json);
                if result["passed"] != true {
                    std::process::exit(1);
                }
                return Ok(());
            }
            Scenario::Ceiling => {
                let private = if cli.cluster.private_redis {
                    Some(chatgate_testkit::redis::PrivateRedis::start()?)
                } else {
                    None
                };
                let url = private.as_ref().map_or(cli.cluster.redis_url.clone(), |r| r.url());
                let result = ceiling::measure(&url).await;
                drop(private);
                ("ceiling", result?)
            }
            Scenario::Publish(args) => ("publish", publish::run(&args).await?),
            Scenario::All { idle_sockets, storm_clients } => {
                let result = all::run(&bin, &cli.cluster, idle_sockets, storm_clients).await?;
                if !cli.json {
                    println!("{}", result["markdown"].as_str().unwrap_or_default());
                    report("ceiling", &result["ceiling"], false);
                    return Ok(());
                }
                ("all", result)
            }
            Scenario::Hold { addr, tag, offset, count } => {
                idle::hold_child(addr, &tag, offset, count).await?;
                return Ok(());
            }
        };
        report(name, &result, cli.json);
        Ok(())
    })
}

/// Paced at `--rate` (default 10 000 deliveries/s); then as fast as possible,
/// which gives the capacity; then paced at that capacity (saturation). Same nodes.
async fn latency(cluster: &Cluster, shape: &fanout::FanoutArgs, saturated_events: u64) -> anyhow::Result<Value> {
    let mut paced = shape.clone();
    paced.rate = Some(shape.rate.unwrap_or(10_000.0));
    let paced_result = fanout::measure(cluster, &paced).await?;
    let mut flat_out = shape.clone();
    flat_out.rate = None;
    flat_out.events = saturated_events;
    let flat_out_result = fanout::measure(cluster, &flat_out).await?;
    let capacity = flat_out_result["delivered_per_sec"].as_f64().unwrap_or(0.0).min(fanout::max_paced_rate(shape));
    let mut saturated = shape.clone();
    saturated.rate = Some(capacity);
    let saturated_result = fanout::measure(cluster, &saturated).await?;
    let brief = |r: &Value| {
        json!({
            "mode": r["mode"], "delivered_per_sec": r["delivered_per_sec"], "latency": r["latency"],
            "cpu_us_per_delivered_event": r["cpu_us_per_delivered_event"]["nodes_plus_redis"],
            "seq": r["seq"], "load_average_before": r["load_average_before"],
        })
    };
    Ok(json!({
        "runs": shape.runs, "subscribers_per_run": shape.subscribers, "payload_bytes": shape.payload_bytes,
        "paced": brief(&paced_result),
        "flat_out": brief(&flat_out_result),
        "paced_at_capacity": brief(&saturated_result),
    }))
}

fn report(name: &str, result: &Value, json: bool) {
    if json {
        println!("{}", json!({ "scenario": name, "result": result }));
        return;
    }
    let mut rows = Vec::new();
    flatten("", result, &mut rows);
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!("{name}");
    for (key, value) in rows {
        println!("  {key:<width$}  {value}");
    }
}

/// `a.b.c  value` rows of nested objects.
fn flatten(prefix: &str, value: &Value, rows: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => flatten_map(prefix, map, rows),
        Value::String(s) => rows.push((prefix.to_string(), s.clone())),
        other => rows.push((prefix.to_string(), other.to_string())),
    }
}

fn flatten_map(prefix: &str, map: &Map<String, Value>, rows: &mut Vec<(String, String)>) {
    for (key, value) in map {
        let key = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        flatten(&key, value, rows);
    }
}
