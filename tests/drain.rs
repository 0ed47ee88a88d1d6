//! Draining (SIGTERM behaviour, docs/protocol.md §Runs across nodes): sockets closed with 1012, runs
//! given the grace period, the rest ended with a terminal `complete` that
//! history keeps; `/readyz` 503 while draining; the real binary on SIGTERM.
//! Every test runs against SQLite and PostgreSQL.

mod common;

use std::time::{Duration, Instant};

use chatgate::config::Config;
use common::{Db, NodeProcess, TestNode, assert_contiguous, mint, user};
use serde_json::json;

fn paced(n: u64, ms: u64) -> String {
    format!(r#"{{"events":{n},"intervalMs":{ms}}}"#)
}

/// Starts draining the node in the background; the handle resolves when it is done.
fn start_drain(node: &mut TestNode) -> tokio::task::JoinHandle<Duration> {
    let running = node.node.take().expect("node running");
    tokio::spawn(async move {
        let started = Instant::now();
        running.drain().await;
        started.elapsed()
    })
}

async fn drain_lets_runs_finish_within_the_grace(db: Db) {
    let mut node = TestNode::start_with(db, |c| c.drain_grace = Duration::from_secs(8)).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;
    let mut idle = node.connect(&token).await;
    ws.send_chat(&id, &paced(30, 10)).await;
    ws.recv_until(|v| v["kind"] == "stream_delta").await;

    let drain = start_drain(&mut node);
    for socket in [&mut ws, &mut idle] {
        assert_eq!(socket.closed(Duration::from_secs(2)).await, Some(1012));
    }
    let took = drain.await.unwrap();
    assert!(took < Duration::from_secs(4), "drain waited {took:?} although the run was done");

    // A new node on the same database: the run finished normally and is history.
    node.restart().await;
    let history = node.history_complete(&token, &id, Some(32)).await;
    let complete = history.last().unwrap();
    assert_eq!((complete["exitCode"].as_i64(), complete["aborted"].as_bool()), (Some(0), Some(false)), "{complete}");
    let merged: String = (1..=30).map(|i| format!("chunk {i}")).collect();
    assert!(history.iter().any(|m| m["content"] == merged.as_str()), "{history:#?}");
    let mut ws = node.connect(&token).await;
    ws.send_chat(&id, "after the drain").await;
    assert_contiguous(&ws.run_events(&id).await, 33);
}

async fn short_grace_ends_runs_with_a_terminal_complete(db: Db) {
    let mut node = TestNode::start_with(db, |c| c.drain_grace = Duration::from_millis(500)).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;
    ws.send_chat(&id, &paced(400, 10)).await;
    let streamed = ws.recv_until(|v| v["seq"] == 3).await;

    let drain = start_drain(&mut node);
    assert_eq!(ws.closed(Duration::from_secs(2)).await, Some(1012));
    let took = drain.await.unwrap();
    assert!(took < Duration::from_secs(3), "drain took {took:?} with a 500ms grace");

    node.restart().await;
    let history = node.history_complete(&token, &id, None).await;
    let complete = history.last().unwrap();
    assert_eq!(complete["aborted"], true, "{complete}");
    assert_eq!(complete["success"], false, "{complete}");
    assert_eq!(complete["exitCode"], 1, "{complete}");
    assert_eq!(complete["error"], "node draining", "{complete}");
    let run_id = &streamed.iter().find(|v| v["seq"].is_u64()).unwrap()["runId"];
    assert_eq!(&complete["runId"], run_id);
    assert_eq!(history.iter().filter(|m| m["kind"] == "complete").count(), 1, "{history:#?}");
    let top = complete["seq"].as_u64().unwrap();
    assert!((4..400).contains(&top), "run was not cut short: complete at {top}");

    // The session is idle on the new node and continues its seq.
    let mut ws = node.connect(&token).await;
    ws.subscribe(&id, 0).await;
    let ack = ws.recv_reply().await;
    assert_eq!((ack["isProcessing"].as_bool(), ack["lastSeq"].as_u64()), (Some(false), Some(top)), "{ack}");
    ws.send_chat(&id, "next").await;
    assert_contiguous(&ws.run_events(&id).await, top + 1);
}

async fn readyz_is_503_while_draining(db: Db) {
    let mut node = TestNode::start_with(db, |c| c.drain_grace = Duration::from_secs(3)).await;
    let token = node.token(&user());
    let id = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;
    ws.send_chat(&id, &paced(100, 20)).await;
    ws.recv_until(|v| v["kind"] == "stream_delta").await;
    assert_eq!(node.get_text("/readyz").await.0, 200);

    let base = node.base.clone();
    let drain = start_drain(&mut node);
    let deadline = Instant::now() + Duration::from_millis(800);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let answer = match reqwest::get(format!("{base}/readyz")).await {
            Ok(response) => {
                let status = response.status().as_u16();
                format!("{status} {}", response.text().await.unwrap_or_default())
            }
            Err(e) => format!("error: {e}"),
        };
        if answer.starts_with("503") {
            seen.push(answer);
            break;
        }
        seen.push(answer);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last = seen.last().cloned().unwrap_or_default();
    assert!(last.starts_with("503") && last.contains("drain"), "/readyz during the drain answered: {seen:?}");
    drain.await.unwrap();
}

/// The real `chatgate` binary on `db` with a short drain grace and `extra` flags,
/// ready; the temp dir holds its workspaces (and SQLite file).
async fn binary(db: Db, extra: &[&str]) -> (NodeProcess, Config, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = common::config(db, &dir);
    let args = [&["--drain-grace", "500ms", "--providers", "script"][..], extra].concat();
    let node = common::spawn_node_on(&config.database_url, config.workspaces_root.as_ref().unwrap(), &args);
    node.wait_ready().await.expect("node ready");
    (node, config, dir)
}

/// The real `chatgate` binary gets SIGTERM during a run: its socket is closed
/// with 1012, the run ends with a terminal `complete` in history, exit code 0.
async fn sigterm_ends_the_run_and_exits_0(db: Db) {
    let (node, config, _dir) = binary(db, &[]).await;
    let token = mint(&user(), Duration::from_secs(600));
    let http = reqwest::Client::new();
    let body = json!({ "provider": "script", "projectPath": "proj" });
    let (_, created) = common::rest(&http, &node.base, "POST", "/api/providers/sessions", &token, Some(body)).await;
    let id = created["data"]["sessionId"].as_str().expect("session created").to_string();
    let mut ws = node.connect(&token).await;
    ws.send_chat(&id, &paced(400, 10)).await;
    ws.recv_until(|v| v["kind"] == "stream_delta").await;

    node.sigterm().unwrap();
    assert_eq!(ws.closed(Duration::from_secs(3)).await, Some(1012));
    assert_eq!(node.exited(Duration::from_secs(10)).await.unwrap().code(), Some(0));

    let store = chatgate::store::Store::connect(&config.database_url).await.unwrap();
    let page = store.messages(&id, None, 0, chatgate::store::HistoryView::All).await.unwrap();
    let complete = page.messages.last().expect("history written");
    assert_eq!(complete["kind"], "complete", "{:#?}", page.messages);
    assert_eq!((complete["aborted"].as_bool(), complete["error"].as_str()), (Some(true), Some("node draining")));
    store.close().await;
}

/// A node with nothing to wait for exits at once on SIGTERM, yet only after every
/// socket's 1012 went out: a WebSocket is not one of the HTTP server's connections,
/// so the drain waits for the socket tasks themselves. Whether a socket task loses the
/// race against the process exit is timing, so the test drains a few crowded nodes.
async fn sigterm_with_no_runs_closes_every_socket_with_1012_before_exiting(db: Db) {
    const SOCKETS: usize = 400;
    const ROUNDS: usize = 3;
    let limit = SOCKETS.to_string();
    for round in 0..ROUNDS {
        let (node, _, _dir) = binary(db, &["--conn-burst-per-ip", &limit, "--max-sockets-per-user", &limit]).await;
        let token = mint(&user(), Duration::from_secs(600));
        let mut sockets = Vec::new();
        for _ in 0..SOCKETS {
            sockets.push(node.connect(&token).await);
        }
        node.sigterm().unwrap();
        let mut codes = Vec::new();
        for ws in &mut sockets {
            codes.push(ws.closed(Duration::from_secs(5)).await);
        }
        let not_1012 = codes.iter().filter(|c| **c != Some(1012)).count();
        assert_eq!(not_1012, 0, "round {round}: {not_1012} of {SOCKETS} sockets not closed with 1012");
        assert_eq!(node.exited(Duration::from_secs(10)).await.unwrap().code(), Some(0));
    }
}

db_tests!(
    drain_lets_runs_finish_within_the_grace,
    short_grace_ends_runs_with_a_terminal_complete,
    readyz_is_503_while_draining,
    sigterm_ends_the_run_and_exits_0,
    sigterm_with_no_runs_closes_every_socket_with_1012_before_exiting,
);
