//! `reconnect` (and `storm`, the same at scale): clients watching live runs
//! drop at once, miss M events, and reconnect to ANOTHER node with their
//! `lastSeq`. Reported: time to the ack and to the last missed event (from
//! the start of the reconnect, TCP and upgrade included), delivery of every
//! event of the run (must be 100 %), gaps and duplicates (must be 0).
//!
//! Replay covers the current run only (docs/protocol.md §Seq, subscribe and replay), so the runs are paced
//! (`intervalMs`) and last well past the reconnect. Each run has an observer
//! socket on its owner node that started it and tracks its top seq.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, bail};
use futures_util::{StreamExt, stream};
use serde_json::{Value, json};
use tokio::{sync::watch, time::Instant};

use crate::{
    client,
    cluster::Cluster,
    stats::{Head, Latencies, SeqCheck, round},
};
use chatgate_testkit::ws::{self, Socket};

#[derive(Debug, Clone, clap::Args)]
pub struct ReconnectArgs {
    /// Reconnecting clients.
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// Sessions (live runs) the clients are spread over.
    #[arg(long, default_value_t = 1)]
    pub sessions: usize,
    /// Events each client misses while away (0: reconnect at once).
    #[arg(long, default_value_t = 200)]
    pub missed: u64,
    /// Pause before each event of a run.
    #[arg(long, default_value_t = 1)]
    pub interval_ms: u64,
    /// Nominal length of a run (events = run_ms / interval_ms); it must outlast the reconnect.
    #[arg(long, default_value_t = 3000)]
    pub run_ms: u64,
    /// Measurements in a row, each on fresh sessions.
    #[arg(long, default_value_t = 10)]
    pub rounds: usize,
}

/// Events a client reads before it drops.
const LEAD: u64 = 5;
const FRAME_WAIT: Duration = Duration::from_secs(120);
const SETUP_CONCURRENCY: usize = 32;

/// One round's client figures.
#[derive(Default)]
struct Outcome {
    to_connect: Latencies,
    to_ack: Latencies,
    to_resume: Latencies,
    ack_to_resume: Latencies,
    missed: Vec<u64>,
    check: SeqCheck,
    expected: u64,
    truncated: u64,
}

pub async fn measure(cluster: &Cluster, args: &ReconnectArgs) -> anyhow::Result<Value> {
    if cluster.nodes.len() < 2 {
        bail!("reconnect needs at least two nodes");
    }
    let mut total = Outcome::default();
    let started = Instant::now();
    let overflows_before = listen_overflows();
    for _ in 0..args.rounds.max(1) {
        let outcome = round_once(cluster, args).await?;
        total.to_connect.extend(outcome.to_connect);
        total.to_ack.extend(outcome.to_ack);
        total.to_resume.extend(outcome.to_resume);
        total.ack_to_resume.extend(outcome.ack_to_resume);
        total.missed.extend(outcome.missed);
        total.check.merge(&outcome.check);
        total.expected += outcome.expected;
        total.truncated += outcome.truncated;
    }
    let unique = total.check.received - total.check.duplicates;
    let missed_min = total.missed.iter().min().copied().unwrap_or(0);
    let missed_mean = total.missed.iter().sum::<u64>() as f64 / total.missed.len().max(1) as f64;
    Ok(json!({
        "nodes": cluster.nodes.len(),
        "clients_per_round": args.clients,
        "sessions_per_round": args.sessions,
        "rounds": args.rounds.max(1),
        "interval_ms": args.interval_ms,
        "missed_events_per_client": { "min": missed_min, "mean": round(missed_mean, 1) },
        "reconnect_to_websocket_open": total.to_connect.summary(),
        "reconnect_to_ack": total.to_ack.summary(),
        "reconnect_to_last_missed_event": total.to_resume.summary(),
        "ack_to_last_missed_event": total.ack_to_resume.summary(),
        "delivered": format!("{unique}/{}", total.expected),
        "delivery_percent": round(unique as f64 * 100.0 / total.expected.max(1) as f64, 3),
        "replay_truncated_acks": total.truncated,
        "seq": total.check.to_json(),
        "listen_queue_overflows": listen_overflows().zip(overflows_before).map(|(a, b)| a.saturating_sub(b)),
        "seconds": round(started.elapsed().as_secs_f64(), 1),
    }))
}

/// A client between its two connections.
struct Away {
    session: usize,
    token: String,
    next_node: usize,
    check: SeqCheck,
}

async fn round_once(cluster: &Cluster, args: &ReconnectArgs) -> anyhow::Result<Outcome> {
    let n = cluster.nodes.len();
    let interval = args.interval_ms.max(1);
    let events = (args.run_ms / interval).max(LEAD + args.missed + 10);
    let script = json!({ "events": events, "intervalMs": interval, "stamp": true }).to_string();
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    // Sessions: the observer on the owner node (k mod n) starts the run and tracks its top seq.
    let mut sessions = Vec::with_capacity(args.sessions);
    for k in 0..args.sessions.max(1) {
        let token = cluster.api.token(&format!("reconnect-{tag}-{k}"))?;
        let session = cluster.api.create_session(cluster.addr(k), &token).await?;
        let mut observer = ws::open(cluster.addr(k), &token, None).await?;
        client::subscribe(&mut observer, &session, 0).await?;
        sessions.push((token, session, observer));
    }
    let ids: Arc<Vec<(String, String)>> = Arc::new(sessions.iter().map(|(t, s, _)| (t.clone(), s.clone())).collect());
    // Clients: client i watches session i mod K from node (k + 1 + i / K) mod n.
    let k_count = ids.len();
    let clients: Vec<anyhow::Result<(usize, String, usize, Socket)>> = stream::iter(0..args.clients)
        .map(|i| {
            let ids = ids.clone();
            async move {
                let k = i % k_count;
                let (token, session) = &ids[k];
                let node = (k + 1 + i / k_count) % n;
                let mut ws = ws::open(cluster.addr(node), token, Some(ws::source_address(i))).await?;
                client::subscribe(&mut ws, session, 0).await?;
                Ok((k, token.clone(), node, ws))
            }
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .collect()
        .await;
    let clients: Vec<_> = clients.into_iter().collect::<anyhow::Result<_>>()?;
    // Start the runs; observers read them to the end.
    let mut observers = Vec::new();
    let mut tops = Vec::new();
    for (_, session, mut ws) in sessions {
        ws::send(&mut ws, json!({ "type": "chat.send", "sessionId": session, "content": script })).await?;
        let (top_tx, top_rx) = watch::channel(0u64);
        tops.push(top_rx);
        observers.push(tokio::spawn(observe(ws, session, top_tx)));
    }
    // Clients read a few events, then all drop at once.
    let readers: Vec<_> = clients
        .into_iter()
        .map(|(k, token, node, mut ws)| {
            let session = ids[k].1.clone();
            tokio::spawn(async move {
                let mut check = SeqCheck::starting_at(1);
                read_until(&mut ws, &session, &mut check, |seq| seq >= LEAD).await?;
                Ok::<_, anyhow::Error>((k, token, (node + 1) % n, check, ws))
            })
        })
        .collect();
    let mut away = Vec::with_capacity(readers.len());
    let mut sockets = Vec::with_capacity(readers.len());
    for reader in readers {
        let (session, token, next_node, check, ws) = reader.await.context("a client task panicked")??;
        sockets.push(ws);
        away.push(Away { session, token, next_node, check });
    }
    drop(sockets);
    // Wait until every session's run went `missed` events past its clients.
    for (k, top) in tops.iter_mut().enumerate() {
        let floor = away.iter().filter(|a| a.session == k).map(|a| a.check.last()).max().unwrap_or(0);
        let want = floor + args.missed;
        tokio::time::timeout(Duration::from_secs(60), top.wait_for(|t| *t >= want))
            .await
            .context("the run did not go on while the clients were away")??;
    }
    // Everyone reconnects at once, to another node.
    let tasks: Vec<_> = away
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            let session = ids[a.session].1.clone();
            let top = *tops[a.session].borrow();
            let addr = cluster.addr(a.next_node);
            tokio::spawn(async move { come_back(i, addr, a, session, top).await })
        })
        .collect();
    let mut outcome = Outcome::default();
    for task in tasks {
        let back = task.await.context("a client task panicked")??;
        outcome.to_connect.record(back.to_connect.as_micros() as u64);
        outcome.to_ack.record(back.to_ack.as_micros() as u64);
        outcome.to_resume.record(back.to_resume.as_micros() as u64);
        outcome.ack_to_resume.record(back.to_resume.saturating_sub(back.to_ack).as_micros() as u64);
        outcome.missed.push(back.missed);
        outcome.check.merge(&back.check);
        outcome.expected += back.last;
        outcome.truncated += u64::from(back.truncated);
    }
    for observer in observers {
        let check = observer.await.context("an observer task panicked")??;
        if !check.is_clean() {
            bail!("an observer on the owner node saw {}", check.to_json());
        }
    }
    Ok(outcome)
}

/// The owner-node socket: reads its run to the end, publishing the top seq.
async fn observe(mut ws: Socket, session: String, top: watch::Sender<u64>) -> anyhow::Result<SeqCheck> {
    let mut check = SeqCheck::starting_at(1);
    read_until(&mut ws, &session, &mut check, |seq| {
        top.send_replace(seq);
        false
    })
    .await?;
    Ok(check)
}

/// Reads `session`'s events into `check` until `stop(seq)` or the run's `complete`.
/// Returns the `complete`'s seq, if it came.
async fn read_until(
    ws: &mut Socket,
    session: &str,
    check: &mut SeqCheck,
    mut stop: impl FnMut(u64) -> bool,
) -> anyhow::Result<Option<u64>> {
    loop {
        let text = ws::recv_text(ws, FRAME_WAIT).await?;
        let head = Head::parse(&text)?;
        let Some(seq) = head.seq else { continue };
        if head.session_id != Some(session) {
            continue;
        }
        check.see(seq);
        if head.kind == Some("complete") {
            check.finish(seq);
            return Ok(Some(seq));
        }
        if stop(seq) {
            return Ok(None);
        }
    }
}

struct Back {
    to_connect: Duration,
    to_ack: Duration,
    to_resume: Duration,
    missed: u64,
    check: SeqCheck,
    /// The run's last seq (its `complete`).
    last: u64,
    truncated: bool,
}

/// Reconnects with `lastSeq`, times the ack and the last missed event (`top`
/// when the reconnect began), then reads the run to its end.
async fn come_back(
    i: usize,
    addr: std::net::SocketAddr,
    mut a: Away,
    session: String,
    top: u64,
) -> anyhow::Result<Back> {
    let last_seq = a.check.last();
    let began = Instant::now();
    let mut ws = ws::open(addr, &a.token, Some(ws::source_address(i))).await?;
    let to_connect = began.elapsed();
    let ack = client::subscribe(&mut ws, &session, last_seq).await?;
    let to_ack = began.elapsed();
    let truncated = ack["replayTruncated"] == true;
    let mut to_resume = to_ack;
    let mut resumed = a.check.last() >= top;
    let last = read_until(&mut ws, &session, &mut a.check, |seq| {
        if !resumed && seq >= top {
            resumed = true;
            to_resume = began.elapsed();
        }
        false
    })
    .await?
    .context("the run ended without complete")?;
    if !resumed {
        to_resume = began.elapsed();
    }

    Ok(Back { to_connect, to_ack, to_resume, missed: top.saturating_sub(last_seq), check: a.check, last, truncated })
}

/// The kernel's count of connections dropped or overflowed at a full listen
/// queue (`ListenOverflows` + `ListenDrops` in `/proc/net/netstat`).
fn listen_overflows() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().collect();
    let get = |name: &str| names.iter().position(|n| *n == name).and_then(|i| values.get(i)?.parse::<u64>().ok());
    Some(get("ListenOverflows")? + get("ListenDrops")?)
}
