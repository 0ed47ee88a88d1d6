//! `echo`: one `script` run of N `stream_delta`s streamed to one socket on a
//! single node, repeated: events per second from `chat.send` to `complete`,
//! every seq checked contiguous.

use std::{path::Path, time::Duration};

use anyhow::bail;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::{
    cluster::{Cluster, ClusterArgs},
    stats::{Head, round},
};
use chatgate_testkit::ws;

pub async fn run(
    bin: &Path,
    cluster_args: &ClusterArgs,
    events: u64,
    payload_bytes: u64,
    runs: u32,
) -> anyhow::Result<Value> {
    let cluster = Cluster::single(bin, cluster_args, &[]).await?;
    let result = measure(&cluster, events, payload_bytes, runs).await;
    cluster.stop().await;
    result
}

async fn measure(cluster: &Cluster, events: u64, payload_bytes: u64, runs: u32) -> anyhow::Result<Value> {
    let node = &cluster.nodes[0];
    let token = cluster.api.token("bench")?;
    let session = cluster.api.create_session(node.addr, &token).await?;
    let mut ws = ws::open(node.addr, &token, None).await?;
    let mut rates = Vec::new();
    let mut expected_seq = 1;
    for _ in 0..runs.max(1) {
        let script = json!({ "events": events, "payloadBytes": payload_bytes }).to_string();
        let started = Instant::now();
        ws::send(&mut ws, json!({ "type": "chat.send", "sessionId": session, "content": script })).await?;
        let mut received = 0u64;
        loop {
            let text = ws::recv_text(&mut ws, Duration::from_secs(60)).await?;
            let head = Head::parse(&text)?;
            let Some(seq) = head.seq else { continue };
            if seq != expected_seq {
                bail!("seq {seq} arrived, expected {expected_seq}");
            }
            expected_seq += 1;
            received += 1;
            if head.kind == Some("complete") {
                break;
            }
        }
        rates.push(received as f64 / started.elapsed().as_secs_f64());
    }
    rates.sort_by(|a, b| a.total_cmp(b));
    Ok(json!({
        "events_per_run": events + 2,
        "payload_bytes": payload_bytes,
        "runs": runs,
        "events_per_sec_median": round(rates[rates.len() / 2], 0),
        "events_per_sec_best": round(rates[rates.len() - 1], 0),
        "seq_check": "contiguous, no duplicate",
        "node_rss_mib_after": node.rss_bytes().map(|b| round(b as f64 / 1048576.0, 1)),
    }))
}
