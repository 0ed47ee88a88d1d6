//! `replay`: a live run with N retained events (paced, since only the current
//! run is replayed); sockets on another node subscribe with `lastSeq = 0`, one
//! after another: time to the ack and to the last event that was already
//! there when the subscribe was sent, every seq checked.

use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::{sync::watch, time::Instant};

use crate::{
    client,
    cluster::Cluster,
    stats::{Head, Latencies, SeqCheck, round},
};
use chatgate_testkit::ws::{self, Socket};

#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// Events in the stream when the readers subscribe (at most --replay-max-events).
    #[arg(long, default_value_t = 10_000)]
    pub events: u64,
    /// Readers, one after another.
    #[arg(long, default_value_t = 5)]
    pub readers: usize,
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: u64,
}

const FRAME_WAIT: Duration = Duration::from_secs(120);

/// Node flags for the scenario: a replay window with room for the events
/// the run adds while the readers subscribe, so that `lastSeq = 0` is never truncated.
pub fn node_flags(args: &ReplayArgs) -> Vec<String> {
    vec!["--replay-max-events".into(), (args.events * 2).to_string()]
}

pub async fn measure(cluster: &Cluster, args: &ReplayArgs) -> anyhow::Result<Value> {
    if cluster.nodes.len() < 2 {
        bail!("replay needs two nodes");
    }
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let token = cluster.api.token(&format!("replay-{}", &tag[..8]))?;
    let session = cluster.api.create_session(cluster.addr(0), &token).await?;
    let mut owner = ws::open(cluster.addr(0), &token, None).await?;
    client::subscribe(&mut owner, &session, 0).await?;
    // Long enough to outlast the readers; aborted once they are done.
    let script = json!({ "events": args.events * 10, "intervalMs": 1, "payloadBytes": args.payload_bytes });
    ws::send(&mut owner, json!({ "type": "chat.send", "sessionId": session, "content": script.to_string() })).await?;
    let (top_tx, mut top) = watch::channel(0u64);
    let observer = tokio::spawn(follow(owner, session.clone(), top_tx));
    let fill_started = Instant::now();
    tokio::time::timeout(Duration::from_secs(600), top.wait_for(|t| *t >= args.events))
        .await
        .context("the run did not reach the replay size")??;
    let fill_secs = fill_started.elapsed().as_secs_f64();
    let mut to_ack = Latencies::default();
    let mut to_last = Latencies::default();
    let mut replayed = Vec::new();
    let mut check = SeqCheck::default();
    let mut bytes = 0u64;
    for _ in 0..args.readers.max(1) {
        let mut ws = ws::open(cluster.addr(1), &token, None).await?;
        let target = *top.borrow();
        let began = Instant::now();
        let ack = client::subscribe(&mut ws, &session, 0).await?;
        to_ack.record(began.elapsed().as_micros() as u64);
        if ack["replayTruncated"] == true {
            bail!("the replay was truncated: raise --replay-max-events or lower --events");
        }
        let mut reader = SeqCheck::starting_at(1);
        loop {
            let text = ws::recv_text(&mut ws, FRAME_WAIT).await?;
            let head = Head::parse(&text)?;
            let Some(seq) = head.seq else { continue };
            bytes += text.len() as u64;
            reader.see(seq);
            if seq >= target {
                break;
            }
        }
        to_last.record(began.elapsed().as_micros() as u64);
        replayed.push(target);
        check.merge(&reader);
    }
    let mut abort = ws::open(cluster.addr(2), &token, None).await?;
    ws::send(&mut abort, json!({ "type": "chat.abort", "sessionId": session })).await?;
    let observed = observer.await.context("observer panicked")??;
    Ok(json!({
        "nodes": cluster.nodes.len(),
        "readers": args.readers,
        "replayed_events_per_reader": replayed,
        "mean_frame_bytes": round(bytes as f64 / check.received.max(1) as f64, 0),
        "fill_seconds": round(fill_secs, 1),
        "subscribe_to_ack": to_ack.summary(),
        "subscribe_to_last_replayed_event": to_last.summary(),
        "seq": check.to_json(),
        "owner_socket_seq": observed.to_json(),
    }))
}

/// Reads the run on its owner node to the end, publishing the top seq.
async fn follow(mut ws: Socket, session: String, top: watch::Sender<u64>) -> anyhow::Result<SeqCheck> {
    let mut check = SeqCheck::starting_at(1);
    loop {
        let text = ws::recv_text(&mut ws, FRAME_WAIT).await?;
        let head = Head::parse(&text)?;
        let Some(seq) = head.seq else { continue };
        if head.session_id != Some(session.as_str()) {
            continue;
        }
        check.see(seq);
        top.send_replace(seq);
        if head.kind == Some("complete") {
            check.finish(seq);
            return Ok(check);
        }
    }
}
