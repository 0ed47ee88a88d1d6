//! `idle`: N sockets, each authenticated and subscribed to its own session,
//! on one node (single-node or cluster mode): the node's RSS growth per
//! socket, and the kernel's TCP memory (buffers, and socket objects from
//! slabinfo) per socket, both ends counted. The client side may be spread
//! over several processes (`hold` children) when one cannot hold every socket.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use futures_util::{StreamExt, stream};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, BufReader},
    process::Command,
    time::Instant,
};

use crate::{
    client::{self, Api},
    cluster::{Cluster, ClusterArgs},
    stats::round,
};
use chatgate_testkit::ws::{self, Socket};

/// Sockets being set up at once.
const SETUP_CONCURRENCY: usize = 16;
/// Files a process keeps for itself beyond its sockets.
const SPARE_FILES: u64 = 200;

#[derive(Debug, Clone, clap::Args)]
pub struct IdleArgs {
    #[arg(long, default_value_t = 1000)]
    pub sockets: usize,
    /// Cluster mode (Redis + PostgreSQL) instead of a single SQLite node.
    #[arg(long)]
    pub cluster: bool,
    /// Client processes holding the sockets (0: as many as the file limit needs).
    #[arg(long, default_value_t = 0)]
    pub processes: usize,
    /// Another chatgate binary to measure alternately with this one (A B A B …).
    #[arg(long)]
    pub compare_bin: Option<PathBuf>,
    /// Measurements per binary.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
}

pub async fn run(bin: &Path, cluster_args: &ClusterArgs, args: &IdleArgs) -> anyhow::Result<Value> {
    let limit = client::raise_nofile();
    if limit < args.sockets as u64 + SPARE_FILES {
        bail!("open-file limit {limit} is too low for the node to hold {} sockets", args.sockets);
    }
    let per_process_max = (limit - SPARE_FILES) as usize;
    let processes = if args.processes == 0 { args.sockets.div_ceil(per_process_max).max(1) } else { args.processes };
    if args.sockets.div_ceil(processes) > per_process_max {
        bail!("{processes} client processes cannot hold {} sockets under a limit of {limit} files", args.sockets);
    }
    let mut bins = vec![bin.to_path_buf()];
    bins.extend(args.compare_bin.clone());
    let mut results: Vec<Vec<Value>> = vec![Vec::new(); bins.len()];
    for _ in 0..args.repeat.max(1) {
        for (i, bin) in bins.iter().enumerate() {
            let cluster = if args.cluster {
                Cluster::start(bin, cluster_args, 1, &[]).await?
            } else {
                Cluster::single(bin, cluster_args, &[]).await?
            };
            let result = measure(&cluster, args, processes).await;
            cluster.stop().await;
            results[i].push(result?);
        }
    }
    if results.len() == 1 && results[0].len() == 1 {
        return Ok(results.remove(0).remove(0));
    }
    let pointer = "/node_rss_kib_per_socket";
    let median = |runs: &[Value]| {
        let mut values: Vec<f64> = runs.iter().filter_map(|r| r.pointer(pointer)?.as_f64()).collect();
        values.sort_by(|a, b| a.total_cmp(b));
        values.get(values.len() / 2).copied()
    };
    let base = median(&results[0]);
    let mut out = serde_json::Map::new();
    for (i, (bin, runs)) in bins.iter().zip(&results).enumerate() {
        let each: Vec<Value> = runs.iter().map(|r| r.pointer(pointer).cloned().unwrap_or(Value::Null)).collect();
        let m = median(runs);
        out.insert(
            ((b'A' + i as u8) as char).to_string(),
            json!({
                "binary": bin.display().to_string(),
                "node_rss_kib_per_socket (each)": each,
                "node_rss_kib_per_socket (median)": m,
                "ratio to A": m.zip(base).filter(|(_, b)| *b != 0.0).map(|(m, b)| round(m / b, 3)),
            }),
        );
    }
    out.insert("sockets".into(), json!(args.sockets));
    out.insert("mode".into(), results[0][0]["mode"].clone());
    Ok(Value::Object(out))
}

async fn measure(cluster: &Cluster, args: &IdleArgs, processes: usize) -> anyhow::Result<Value> {
    let node = &cluster.nodes[0];
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    // Warm up: one socket through the whole path, so lazily built state is counted in the baseline.
    let warm = hold(&cluster.api, node.addr, &format!("{tag}-warm"), 0, 1).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = node.rss_bytes().context("cannot read the node's RSS")?;
    let kernel_before = kernel_memory();
    let started = Instant::now();
    let mut held = Vec::new();
    let mut children = Vec::new();
    if processes == 1 {
        held = hold(&cluster.api, node.addr, &tag, 0, args.sockets).await?;
    } else {
        let exe = std::env::current_exe()?;
        let share = args.sockets.div_ceil(processes);
        for p in 0..processes {
            let count = share.min(args.sockets - (p * share).min(args.sockets));
            let mut child = Command::new(&exe)
                .arg("hold")
                .arg("--addr")
                .arg(node.addr.to_string())
                .arg("--tag")
                .arg(format!("{tag}-{p}"))
                .arg("--offset")
                .arg((p * share).to_string())
                .arg("--count")
                .arg(count.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()?;
            let stdout = child.stdout.take().context("no stdout from a hold process")?;
            children.push((child, BufReader::new(stdout).lines()));
        }
        for (_, lines) in children.iter_mut() {
            let line = lines.next_line().await?.context("a hold process ended before it was ready")?;
            if !line.starts_with("ready") {
                bail!("hold process: {line}");
            }
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_after = node.rss_bytes().context("cannot read the node's RSS")?;
    let kernel_after = kernel_memory();
    let n = args.sockets as f64;
    let per_socket = rss_after.saturating_sub(rss_before) as f64 / n;
    let kernel = |f: fn(&KernelMemory) -> u64| {
        kernel_before
            .as_ref()
            .zip(kernel_after.as_ref())
            .map(|(b, a)| round(f(a).saturating_sub(f(b)) as f64 / n / 1024.0, 2))
    };
    drop(held);
    drop(warm);
    for (mut child, _) in children {
        drop(child.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    }
    Ok(json!({
        "mode": if args.cluster { "cluster (Redis + PostgreSQL)" } else { "single node (SQLite)" },
        "sockets": args.sockets,
        "client_processes": processes,
        "node_rss_mib_before": round(rss_before as f64 / 1048576.0, 1),
        "node_rss_mib_after": round(rss_after as f64 / 1048576.0, 1),
        "node_rss_kib_per_socket": round(per_socket / 1024.0, 2),
        "kernel_tcp_buffers_kib_per_socket_both_ends": kernel(|k| k.tcp_buffers),
        "kernel_socket_objects_kib_per_socket_both_ends": kernel(|k| k.socket_objects),
        "connect_and_subscribe_secs": round(connect_secs, 2),
    }))
}

/// Opens `count` sockets to `addr`, each for its own user and session, subscribed.
pub async fn hold(api: &Api, addr: SocketAddr, tag: &str, offset: usize, count: usize) -> anyhow::Result<Vec<Socket>> {
    let results: Vec<anyhow::Result<Socket>> = stream::iter(0..count)
        .map(|i| async move {
            let token = api.token(&format!("idle-{tag}-{i}"))?;
            let session = api.create_session(addr, &token).await?;
            let mut ws = ws::open(addr, &token, Some(ws::source_address(offset + i))).await?;
            client::subscribe(&mut ws, &session, 0).await?;
            Ok(ws)
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect()
}

/// The `hold` child: opens its sockets, says `ready`, holds them until stdin closes.
pub async fn hold_child(addr: SocketAddr, tag: &str, offset: usize, count: usize) -> anyhow::Result<()> {
    client::raise_nofile();
    let sockets = hold(&Api::new(), addr, tag, offset, count).await?;
    println!("ready {}", sockets.len());
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    drop(sockets);
    Ok(())
}

/// Kernel memory of TCP sockets, all of them on the machine.
struct KernelMemory {
    /// Socket buffers (`/proc/net/sockstat` `mem`, pages).
    tcp_buffers: u64,
    /// `TCP` and `sock_inode_cache` slab objects (`/proc/slabinfo`, root only).
    socket_objects: u64,
}

fn kernel_memory() -> Option<KernelMemory> {
    let tcp_buffers = client::kernel_tcp_bytes()?;
    let slab = std::fs::read_to_string("/proc/slabinfo").unwrap_or_default();
    let socket_objects = slab
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.next()?;
            if name != "TCP" && name != "sock_inode_cache" {
                return None;
            }
            let active: u64 = fields.next()?.parse().ok()?;
            let _total = fields.next()?;
            let size: u64 = fields.next()?.parse().ok()?;
            Some(active * size)
        })
        .sum();
    Some(KernelMemory { tcp_buffers, socket_objects })
}
