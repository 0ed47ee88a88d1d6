//! `publish`: classic `PUBLISH` against sharded `SPUBLISH` on one private Redis Cluster, in
//! the same run, alternately (A B A B …). C channels named so that they hash all over the
//! slots; one subscriber connection per primary (as the gateway's hub holds one per shard)
//! subscribes each channel where its slot lives — `SUBSCRIBE` for classic, `SSUBSCRIBE` for
//! sharded; M messages of B bytes, round robin over the channels, each published on the
//! primary that serves its channel's slot, `--pipeline` deep. Measured per message: the CPU
//! of every `redis-server` of the cluster (primaries and replicas, `/proc/<pid>/stat`), and
//! the cluster-bus publish messages (`CLUSTER INFO`): classic `PUBLISH` is broadcast over the
//! bus to every node, `SPUBLISH` only to the shard's replicas. Every message must reach its
//! subscriber.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, bail};
use chatgate::runs::redis::keys;
use chatgate_testkit::redis_cluster::{ClusterNode, PrivateRedisCluster, Role};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};

use crate::{
    cluster::cpu_seconds,
    redis_shards,
    stats::{round, unix_micros},
};

#[derive(Debug, Clone, clap::Args)]
pub struct PublishArgs {
    /// Channels, spread over the slots.
    #[arg(long, default_value_t = 300)]
    pub channels: usize,
    /// Messages per measurement.
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Publishes per pipeline (per primary).
    #[arg(long, default_value_t = 32)]
    pub pipeline: usize,
    /// Primaries of the private cluster.
    #[arg(long, default_value_t = 3)]
    pub primaries: u16,
    /// Replicas per primary.
    #[arg(long, default_value_t = 1)]
    pub replicas: u16,
    /// Measurements per mode (alternately).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
}

/// How long the subscribers may take to get every message after the last publish.
const DRAIN_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Classic,
    Sharded,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Classic => "classic_publish",
            Mode::Sharded => "sharded_spublish",
        }
    }

    fn subscribe(self) -> &'static str {
        match self {
            Mode::Classic => "SUBSCRIBE",
            Mode::Sharded => "SSUBSCRIBE",
        }
    }

    fn publish(self) -> &'static str {
        match self {
            Mode::Classic => "PUBLISH",
            Mode::Sharded => "SPUBLISH",
        }
    }
}

pub async fn run(args: &PublishArgs) -> anyhow::Result<Value> {
    if args.channels == 0 || args.messages == 0 || args.pipeline == 0 {
        bail!("--channels, --messages and --pipeline must be at least 1");
    }
    let (primaries, replicas) = (args.primaries, args.replicas);
    let cluster = tokio::task::spawn_blocking(move || PrivateRedisCluster::start(primaries, replicas)).await??;
    let result = measure_all(&cluster, args).await;
    tokio::task::block_in_place(move || drop(cluster));
    result
}

async fn measure_all(cluster: &PrivateRedisCluster, args: &PublishArgs) -> anyhow::Result<Value> {
    let nodes = tokio::task::block_in_place(|| cluster.nodes())?;
    let channels: Vec<String> = (0..args.channels).map(|i| format!("pubbench:{i}")).collect();
    let mut results: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for _ in 0..args.repeat.max(1) {
        for mode in [Mode::Classic, Mode::Sharded] {
            let result = measure(&nodes, &channels, args, mode).await?;
            results.entry(mode.name()).or_default().push(result);
        }
    }
    let median = |mode: Mode, field: &str| {
        let mut values: Vec<f64> = results[mode.name()].iter().filter_map(|r| r[field].as_f64()).collect();
        values.sort_by(|a, b| a.total_cmp(b));
        values.get(values.len() / 2).copied().unwrap_or(0.0)
    };
    let cpu = (median(Mode::Classic, "redis_cpu_us_per_message"), median(Mode::Sharded, "redis_cpu_us_per_message"));
    let bus = (median(Mode::Classic, "bus_messages_per_message"), median(Mode::Sharded, "bus_messages_per_message"));
    Ok(json!({
        "cluster": format!("{} primaries × {} replicas", args.primaries, args.replicas),
        "channels": args.channels, "messages": args.messages, "payload_bytes": args.payload_bytes,
        "pipeline": args.pipeline, "repeat": args.repeat,
        "redis_cpu_us_per_message_median": { "classic_publish": cpu.0, "sharded_spublish": cpu.1 },
        "classic_over_sharded_cpu_ratio": round(cpu.0 / cpu.1.max(1e-9), 2),
        "bus_messages_per_message_median": { "classic_publish": bus.0, "sharded_spublish": bus.1 },
        "each": results,
    }))
}

/// One measurement: subscribe, publish every message, wait until each arrived.
async fn measure(nodes: &[ClusterNode], channels: &[String], args: &PublishArgs, mode: Mode) -> anyhow::Result<Value> {
    let primaries: Vec<&ClusterNode> =
        nodes.iter().filter(|n| n.role == Role::Primary && !n.slots.is_empty()).collect();
    let owner = |channel: &str| {
        let slot = keys::slot(channel);
        primaries.iter().position(|p| p.slots.iter().any(|r| r.contains(&slot))).unwrap_or(0)
    };
    // One subscriber connection per primary, holding the channels of its slots.
    let mut subscribers: Vec<JoinHandle<anyhow::Result<u64>>> = Vec::new();
    let mut per_primary: Vec<Vec<String>> = vec![Vec::new(); primaries.len()];
    for channel in channels {
        per_primary[owner(channel)].push(channel.clone());
    }
    let mut expected_per_primary = vec![0u64; primaries.len()];
    for i in 0..args.messages {
        expected_per_primary[owner(&channels[i % channels.len()])] += 1;
    }
    for (index, held) in per_primary.iter().enumerate().filter(|(_, held)| !held.is_empty()) {
        let stream = subscribe(primaries[index].port, mode, held).await?;
        subscribers.push(tokio::spawn(count_messages(stream, expected_per_primary[index])));
    }
    let pids: Vec<u32> = nodes.iter().filter_map(|n| n.pid).collect();
    let cpu = || pids.iter().filter_map(|p| cpu_seconds(*p)).sum::<f64>();
    let bus_before = bus_publish_messages(nodes).await?;
    let cpu_before = cpu();
    let began = unix_micros();
    let payload = "x".repeat(args.payload_bytes);
    let publishers: Vec<_> = primaries
        .iter()
        .enumerate()
        .map(|(index, primary)| {
            let mine: Vec<String> = (0..args.messages)
                .map(|i| &channels[i % channels.len()])
                .filter(|c| owner(c) == index)
                .cloned()
                .collect();
            publish_all(primary.port, mode, mine, payload.clone(), args.pipeline)
        })
        .collect();
    for outcome in futures_util::future::join_all(publishers).await {
        outcome?;
    }
    let mut received = 0;
    for subscriber in subscribers {
        received += tokio::time::timeout(DRAIN_WAIT, subscriber)
            .await
            .context("the subscribers did not get every message")?
            .context("a subscriber task panicked")??;
    }
    let seconds = (unix_micros() - began) as f64 / 1e6;
    let cpu_s = cpu() - cpu_before;
    let bus = bus_publish_messages(nodes).await? - bus_before;
    Ok(json!({
        "received": received,
        "seconds": round(seconds, 3),
        "messages_per_sec": round(args.messages as f64 / seconds, 0),
        "redis_cpu_seconds": round(cpu_s, 2),
        "redis_cpu_us_per_message": round(cpu_s * 1e6 / args.messages as f64, 3),
        "bus_messages_per_message": round(bus as f64 / args.messages as f64, 2),
    }))
}

/// A raw connection to `port` that (S)SUBSCRIBEd `channels`, once every confirmation arrived.
/// One command per channel, all written at once (`SSUBSCRIBE` takes channels of one slot only).
async fn subscribe(port: u16, mode: Mode, channels: &[String]) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let verb = mode.subscribe();
    let mut command = String::new();
    for channel in channels {
        command.push_str(&format!("*2\r\n${}\r\n{verb}\r\n${}\r\n{channel}\r\n", verb.len(), channel.len()));
    }
    stream.write_all(command.as_bytes()).await?;
    let confirmed = tokio::time::timeout(
        Duration::from_secs(10),
        count_pattern(&mut stream, b"subscribe\r\n", channels.len() as u64),
    )
    .await
    .context("no subscription confirmations")??;
    if confirmed != channels.len() as u64 {
        bail!("{confirmed} of {} subscriptions confirmed", channels.len());
    }
    Ok(stream)
}

/// Reads until `expected` messages (`message` or `smessage` pushes) arrived.
async fn count_messages(mut stream: TcpStream, expected: u64) -> anyhow::Result<u64> {
    count_pattern(&mut stream, b"message\r\n", expected).await
}

/// Reads until `pattern` was seen `expected` times (counted across reads); returns the count.
async fn count_pattern(stream: &mut TcpStream, pattern: &[u8], expected: u64) -> anyhow::Result<u64> {
    let mut seen = 0u64;
    let mut carry: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while seen < expected {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            bail!("the subscriber connection closed after {seen} of {expected}");
        }
        carry.extend_from_slice(&buf[..n]);
        seen += carry.windows(pattern.len()).filter(|w| *w == pattern).count() as u64;
        let keep = carry.len().min(pattern.len() - 1);
        carry.drain(..carry.len() - keep);
    }
    Ok(seen)
}

/// Publishes one message to each of `channels` on the primary on `port`, `depth` at a time.
async fn publish_all(
    port: u16,
    mode: Mode,
    channels: Vec<String>,
    payload: String,
    depth: usize,
) -> anyhow::Result<()> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    for chunk in channels.chunks(depth) {
        let mut pipe = redis::pipe();
        for channel in chunk {
            pipe.cmd(mode.publish()).arg(channel).arg(&payload).ignore();
        }
        let () = pipe.query_async(&mut conn).await?;
    }
    Ok(())
}

/// Publish messages sent over the cluster bus (classic and sharded), summed over the nodes.
async fn bus_publish_messages(nodes: &[ClusterNode]) -> anyhow::Result<u64> {
    let mut total = 0;
    for node in nodes.iter().filter(|n| n.pid.is_some()) {
        let info: String = redis_shards::query(node.port, redis::cmd("CLUSTER").arg("INFO")).await?;
        total += info
            .lines()
            .filter_map(|l| l.trim_end().split_once(':'))
            .filter(|(name, _)| {
                *name == "cluster_stats_messages_publish_sent" || *name == "cluster_stats_messages_publishshard_sent"
            })
            .filter_map(|(_, v)| v.parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok(total)
}
