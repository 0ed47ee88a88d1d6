//! `start`: `chat.send` → first event latency, while a paced fan-out load runs
//! on the same nodes. Each starter socket sends short runs one after another
//! on its own session (spread over the nodes) and times the first event.

use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::{
    client,
    cluster::Cluster,
    fanout::{self, FanoutArgs},
    stats::{Head, Latencies},
};
use chatgate_testkit::ws;

#[derive(Debug, Clone, clap::Args)]
pub struct StartArgs {
    /// Sockets starting runs at the same time.
    #[arg(long, default_value_t = 10)]
    pub starters: usize,
    /// Runs each starter sends, one after another.
    #[arg(long, default_value_t = 20)]
    pub sends: usize,
    /// Background load in deliveries per second (0: none).
    #[arg(long, default_value_t = 10_000.0)]
    pub load_rate: f64,
    /// A starter's pause between a run's `complete` and its next send (0: at once, so the
    /// starters together keep the machine as busy as it gets: a throughput test more than a
    /// latency one on 2 cores).
    #[arg(long, default_value_t = 0)]
    pub pause_ms: u64,
}

const FRAME_WAIT: Duration = Duration::from_secs(60);

pub async fn measure(cluster: &Cluster, args: &StartArgs) -> anyhow::Result<Value> {
    let load = async {
        if args.load_rate <= 0.0 {
            return Ok(Value::Null);
        }
        let shape = FanoutArgs {
            runs: 100,
            subscribers: 10,
            events: 0,
            payload_bytes: 64,
            rate: Some(args.load_rate),
            seconds: 12.0,
        };
        fanout::measure(cluster, &shape).await
    };
    let starters = async {
        // Let the load get going first.
        if args.load_rate > 0.0 {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        let pause = Duration::from_millis(args.pause_ms);
        let tasks: Vec<_> = (0..args.starters).map(|i| starter(cluster, i, args.sends, pause)).collect();
        let mut first = Latencies::default();
        let mut whole = Latencies::default();
        for outcome in futures_util::future::join_all(tasks).await {
            let (f, w) = outcome?;
            first.extend(f);
            whole.extend(w);
        }
        Ok::<_, anyhow::Error>((first, whole))
    };
    let (load, starts) = tokio::join!(load, starters);
    let (first, whole) = starts?;
    let load = load?;
    Ok(json!({
        "starters": args.starters,
        "sends_per_starter": args.sends,
        "pause_ms": args.pause_ms,
        "send_to_first_event": first.summary(),
        "send_to_complete": whole.summary(),
        "background_load": if load.is_null() { json!("none") } else { json!({
            "mode": load["mode"], "delivered_per_sec": load["delivered_per_sec"], "latency": load["latency"],
            "seq": load["seq"],
        }) },
    }))
}

/// One socket sending `sends` short runs in a row, `pause` apart: (send → first event, send → complete).
async fn starter(cluster: &Cluster, i: usize, sends: usize, pause: Duration) -> anyhow::Result<(Latencies, Latencies)> {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let token = cluster.api.token(&format!("start-{}-{i}", &tag[..8]))?;
    let addr = cluster.addr(i);
    let session = cluster.api.create_session(addr, &token).await?;
    let mut ws = ws::open(addr, &token, Some(ws::source_address(5000 + i))).await?;
    client::subscribe(&mut ws, &session, 0).await?;
    let mut first = Latencies::default();
    let mut whole = Latencies::default();
    let script = json!({ "events": 3 }).to_string();
    for _ in 0..sends {
        tokio::time::sleep(pause).await;
        let began = Instant::now();
        ws::send(&mut ws, json!({ "type": "chat.send", "sessionId": session, "content": script })).await?;
        let mut seen_first = false;
        loop {
            let text = ws::recv_text(&mut ws, FRAME_WAIT).await.context("waiting for the run")?;
            let head = Head::parse(&text)?;
            if head.kind == Some("protocol_error") {
                anyhow::bail!("chat.send refused: {text}");
            }
            if head.seq.is_none() || head.session_id != Some(session.as_str()) {
                continue;
            }
            if !seen_first {
                seen_first = true;
                first.record(began.elapsed().as_micros() as u64);
            }
            if head.kind == Some("complete") {
                whole.record(began.elapsed().as_micros() as u64);
                break;
            }
        }
    }
    Ok((first, whole))
}
