//! `chatgate-bench`: a load generator that speaks chatgate's real protocol over
//! real sockets and prints what it measured (a table, or JSON with `--json`).
//!
//! Scenarios:
//! - `echo`: one `script` run of N events streamed to one socket: events per second.
//! - `idle`: N authenticated sockets each subscribed to its own session on one
//!   node: the node's RSS per socket, and the kernel's TCP memory per socket.

mod client;

use std::{net::IpAddr, path::PathBuf, time::Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

use client::{Api, Node};

#[derive(Parser)]
#[command(name = "chatgate-bench", about = "Load generator for chatgate")]
struct Cli {
    /// Print results as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// The chatgate binary to spawn nodes from (default: next to this binary).
    #[arg(long, global = true)]
    chatgate_bin: Option<PathBuf>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// One run of N events to one socket.
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
    Idle {
        #[arg(long, default_value_t = 1000)]
        sockets: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let bin = match &cli.chatgate_bin {
            Some(bin) => bin.clone(),
            None => std::env::current_exe()?.with_file_name("chatgate"),
        };
        let result = match cli.scenario {
            Scenario::Echo { events, payload_bytes, runs } => echo(&bin, events, payload_bytes, runs).await?,
            Scenario::Idle { sockets } => idle(&bin, sockets).await?,
        };
        report(&result, cli.json);
        Ok(())
    })
}

fn report(result: &Value, json: bool) {
    if json {
        println!("{result}");
        return;
    }
    if let Some(map) = result.as_object() {
        let width = map.keys().map(String::len).max().unwrap_or(0);
        for (key, value) in map {
            println!("{key:<width$}  {value}");
        }
    }
}

const SECRET: &str = "chatgate-bench-secret";

async fn echo(bin: &PathBuf, events: u64, payload_bytes: u64, runs: u32) -> anyhow::Result<Value> {
    let node = Node::spawn(bin, SECRET, &[]).await?;
    let api = Api::new(SECRET);
    let token = api.token("bench")?;
    let session = api.create_session(&node, &token).await?;
    let mut ws = client::connect(&node, &token, None).await?;
    let mut rates = Vec::new();
    let mut expected_seq = 1;
    for _ in 0..runs {
        let script = json!({ "events": events, "payloadBytes": payload_bytes }).to_string();
        let started = Instant::now();
        client::send(&mut ws, json!({ "type": "chat.send", "sessionId": session, "content": script })).await?;
        let mut received = 0u64;
        loop {
            let frame = client::recv(&mut ws, std::time::Duration::from_secs(60)).await?;
            let Some(seq) = frame["seq"].as_u64() else { continue };
            if seq != expected_seq {
                bail!("seq {seq} arrived, expected {expected_seq}");
            }
            expected_seq += 1;
            received += 1;
            if frame["kind"] == "complete" {
                break;
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        rates.push(received as f64 / elapsed);
    }
    let rss = node.rss_bytes();
    node.stop().await;
    rates.sort_by(|a, b| a.total_cmp(b));
    Ok(json!({
        "scenario": "echo",
        "events_per_run": events + 2,
        "payload_bytes": payload_bytes,
        "runs": runs,
        "events_per_sec_median": rates[rates.len() / 2].round(),
        "events_per_sec_best": rates[rates.len() - 1].round(),
        "seq_check": "contiguous, no duplicate",
        "node_rss_mib_after": rss.map(|b| (b as f64 / 1048576.0 * 10.0).round() / 10.0),
    }))
}

async fn idle(bin: &PathBuf, sockets: usize) -> anyhow::Result<Value> {
    let limit = client::raise_nofile();
    if (limit as usize) < sockets + 64 {
        bail!("open-file limit {limit} is too low for {sockets} sockets");
    }
    let node = Node::spawn(bin, SECRET, &[]).await?;
    let api = Api::new(SECRET);
    // Warm up: one socket through the whole path, so lazily built state is counted in the baseline.
    let warm = api.token("warm")?;
    let warm_session = api.create_session(&node, &warm).await?;
    let mut warm_ws = client::connect(&node, &warm, None).await?;
    subscribe(&mut warm_ws, &warm_session).await?;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let rss_before = node.rss_bytes().context("cannot read the node's RSS")?;
    let kernel_before = client::kernel_tcp_bytes();
    let mut open = Vec::with_capacity(sockets);
    let started = Instant::now();
    for i in 0..sockets {
        let token = api.token(&format!("idle-{i}"))?;
        let session = api.create_session(&node, &token).await?;
        // Spread the client side over 127.0.0.2-254 so one source address never runs out of ports.
        let source: IpAddr = format!("127.0.0.{}", 2 + (i % 250)).parse()?;
        let mut ws = client::connect(&node, &token, Some(source)).await?;
        subscribe(&mut ws, &session).await?;
        open.push(ws);
    }
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let rss_after = node.rss_bytes().context("cannot read the node's RSS")?;
    let kernel_after = client::kernel_tcp_bytes();
    let per_socket = (rss_after.saturating_sub(rss_before)) as f64 / sockets as f64;
    let kernel_per_socket = match (kernel_before, kernel_after) {
        (Some(b), Some(a)) => Some((a.saturating_sub(b)) as f64 / sockets as f64 / 1024.0),
        _ => None,
    };
    drop(open);
    node.stop().await;
    Ok(json!({
        "scenario": "idle",
        "sockets": sockets,
        "node_rss_mib_before": (rss_before as f64 / 1048576.0 * 10.0).round() / 10.0,
        "node_rss_mib_after": (rss_after as f64 / 1048576.0 * 10.0).round() / 10.0,
        "node_rss_kib_per_socket": (per_socket / 1024.0 * 10.0).round() / 10.0,
        "kernel_tcp_kib_per_socket_both_ends": kernel_per_socket.map(|k| (k * 10.0).round() / 10.0),
        "connect_and_subscribe_secs": (connect_secs * 100.0).round() / 100.0,
    }))
}

async fn subscribe(ws: &mut client::Socket, session: &str) -> anyhow::Result<()> {
    client::send(ws, json!({ "type": "chat.subscribe", "sessions": [{ "sessionId": session, "lastSeq": 0 }] })).await?;
    let ack = client::recv(ws, std::time::Duration::from_secs(30)).await?;
    if ack["kind"] != "chat_subscribed" {
        bail!("expected chat_subscribed, got {ack}");
    }
    Ok(())
}
