//! Cluster mode end to end: several nodes on one Redis and one PostgreSQL, as
//! a load balancer would spread browser tabs over them (docs/protocol.md §WebSocket, §Runs across nodes).

mod common;

use std::time::{Duration, Instant};

use chatgate::{config::Config, runs::redis::keys};
use chatgate_testkit::redis_tls::{PrivateRedisTls, TlsOptions};
use common::{
    NodeProcess, PrivateRedis, Ws, assert_contiguous, assert_history_matches, cluster_node, cluster_workspaces, seqs,
    user,
};
use serde_json::{Value, json};

/// Each case that needs only a shared Redis runs twice: on one Redis
/// (`standalone::…`) and on a Redis Cluster with `--redis-mode cluster`
/// (`redis_cluster::…`, the test process's shared 3-primary cluster).
macro_rules! on_each_redis {
    ($($case:ident),* $(,)?) => {
        mod standalone {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&super::common::redis_url()).await
                }
            )*
        }
        mod redis_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&super::common::shared_redis_cluster().await).await
                }
            )*
        }
    };
}

on_each_redis!(
    tabs_on_other_nodes_watch_live_and_resume_by_last_seq,
    one_run_per_session_in_the_cluster_and_running_lists_every_node,
    abort_and_permission_answers_reach_the_owner_from_any_node,
    session_upserted_reaches_the_owner_on_every_node_and_no_one_else,
    a_dead_owner_s_run_ends_with_run_owner_lost_within_lease_plus_5s,
    a_stream_cut_with_its_owner_is_whole_in_history_past_the_replay_window,
);

fn paced(events: u64, interval_ms: u64) -> String {
    json!({ "events": events, "intervalMs": interval_ms }).to_string()
}

/// Frames of `session` with a seq, until its `complete`.
async fn until_complete(ws: &mut Ws, session: &str) -> Vec<Value> {
    ws.run_events(session).await
}

async fn tabs_on_other_nodes_watch_live_and_resume_by_last_seq(redis: &str) {
    let a = cluster_node(redis, "a", |_| {}).await;
    let b = cluster_node(redis, "b", |_| {}).await;
    let c = cluster_node(redis, "c", |_| {}).await;
    let user = user();
    let token = a.token(&user);
    let session = a.create_session(&token, "script").await;

    let mut tab1 = a.connect(&token).await;
    tab1.send_chat(&session, &paced(40, 10)).await;
    // A second tab on B subscribes from the start while the run is going.
    let mut tab2 = b.connect(&token).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    tab2.subscribe(&session, 0).await;
    let ack = tab2.recv_reply().await;
    assert_eq!(ack["kind"], "chat_subscribed");
    assert_eq!(ack["isProcessing"], true);
    assert_eq!(ack["replayTruncated"], false);
    // A third tab on C resumes from seq 5, once the run is past it (a loaded machine may
    // start the run late: a cursor ahead of the session is the client's own mistake).
    let mut one = Vec::new();
    while one.last().and_then(|e: &Value| e["seq"].as_u64()).unwrap_or(0) < 6 {
        let frame = tab1.recv().await;
        if frame["sessionId"] == session && frame.get("seq").is_some() {
            one.push(frame);
        }
    }
    let mut tab3 = c.connect(&token).await;
    tab3.subscribe(&session, 5).await;
    assert_eq!(tab3.recv_reply().await["kind"], "chat_subscribed");

    one.extend(until_complete(&mut tab1, &session).await);
    let two = until_complete(&mut tab2, &session).await;
    let three = until_complete(&mut tab3, &session).await;
    assert_contiguous(&one, 1);
    assert_eq!(seqs(&one), seqs(&two), "tab on another node saw the same events");
    assert_contiguous(&three, 6);
    assert_eq!(three.last().unwrap()["kind"], "complete");
    assert_eq!(one.len(), 40 + 2);

    // The next run, started from C, continues the seq and reaches every tab.
    tab3.send_chat(&session, "again").await;
    let next = until_complete(&mut tab1, &session).await;
    assert_eq!(next[0]["seq"].as_u64().unwrap(), 43);
    assert_contiguous(&until_complete(&mut tab2, &session).await, 43);
}

async fn one_run_per_session_in_the_cluster_and_running_lists_every_node(redis: &str) {
    let a = cluster_node(redis, "a1", |_| {}).await;
    let b = cluster_node(redis, "b1", |_| {}).await;
    let user = user();
    let token = a.token(&user);
    let s1 = a.create_session(&token, "script").await;
    let s2 = a.create_session(&token, "script").await;
    let mut on_a = a.connect(&token).await;
    let mut on_b = b.connect(&token).await;
    on_a.send_chat(&s1, &paced(30, 20)).await;
    on_b.send_chat(&s2, &paced(30, 20)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    on_b.send_chat(&s1, "second").await;
    let refused = on_b.recv_until(|v| v["kind"] == "protocol_error").await;
    assert_eq!(refused.last().unwrap()["code"], "RUN_IN_PROGRESS");

    let (status, running) = b.request("GET", "/api/providers/sessions/running", &token, None).await;
    assert_eq!(status, 200);
    let mut nodes: Vec<(String, String)> = running["data"]["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["sessionId"].as_str().unwrap().to_string(), r["nodeId"].as_str().unwrap().to_string()))
        .collect();
    nodes.sort();
    let mut want = vec![(s1.clone(), "a1".to_string()), (s2.clone(), "b1".to_string())];
    want.sort();
    assert_eq!(nodes, want);
    // Another user sees none of them.
    let other = a.token(&common::user());
    let (_, theirs) = a.request("GET", "/api/providers/sessions/running", &other, None).await;
    assert_eq!(theirs["data"]["sessions"], json!([]));
    // The session shows as processing from any node.
    let (_, shown) = b.request("GET", &format!("/api/providers/sessions/{s1}"), &token, None).await;
    assert_eq!(shown["data"]["isProcessing"], true);
}

async fn abort_and_permission_answers_reach_the_owner_from_any_node(redis: &str) {
    let a = cluster_node(redis, "a2", |_| {}).await;
    let b = cluster_node(redis, "b2", |_| {}).await;
    let user = user();
    let token = a.token(&user);
    let session = a.create_session(&token, "script").await;
    let mut owner_tab = a.connect(&token).await;
    let script = json!({ "permission": { "toolName": "Bash", "input": { "command": "ls" } }, "events": 3 }).to_string();
    owner_tab.send_chat(&session, &script).await;
    let request = owner_tab.recv_until(|v| v["kind"] == "permission_request").await.pop().unwrap();
    let request_id = request["requestId"].as_str().unwrap().to_string();

    let mut remote_tab = b.connect(&token).await;
    remote_tab.subscribe(&session, request["seq"].as_u64().unwrap()).await;
    let ack = remote_tab.recv_reply().await;
    assert_eq!(ack["pendingPermissions"][0]["requestId"], request_id.as_str());
    // Another user's answer from B is ignored.
    let mut stranger = b.connect(&b.token(&common::user())).await;
    stranger.send(json!({ "type": "chat.permission-response", "requestId": request_id, "allow": false })).await;
    remote_tab.send(json!({ "type": "chat.permission-response", "requestId": request_id, "allow": true })).await;
    let events = until_complete(&mut owner_tab, &session).await;
    let kinds: Vec<&str> = events.iter().map(|v| v["kind"].as_str().unwrap()).collect();
    assert!(kinds.starts_with(&["permission_resolved", "tool_use", "tool_result"]), "{kinds:?}");
    assert_eq!(events[0]["allow"], true);
    let remote = until_complete(&mut remote_tab, &session).await;
    assert_eq!(seqs(&remote), seqs(&events));

    // Abort from B of a run owned by A.
    owner_tab.send_chat(&session, &paced(1000, 20)).await;
    owner_tab.recv_until(|v| v["kind"] == "stream_delta").await;
    remote_tab.send(json!({ "type": "chat.abort", "sessionId": session })).await;
    let ended = until_complete(&mut owner_tab, &session).await;
    let complete = ended.last().unwrap();
    assert_eq!(complete["aborted"], true);
    let remote_end = until_complete(&mut remote_tab, &session).await;
    assert_eq!(remote_end.last().unwrap()["seq"], complete["seq"]);
    // Nothing after the complete.
    owner_tab.expect_silence(Duration::from_millis(300)).await;
}

async fn session_upserted_reaches_the_owner_on_every_node_and_no_one_else(redis: &str) {
    let a = cluster_node(redis, "a3", |_| {}).await;
    let b = cluster_node(redis, "b3", |_| {}).await;
    let user = user();
    let token = a.token(&user);
    let session = a.create_session(&token, "script").await;
    let mut watcher = b.connect(&token).await;
    let mut stranger = b.connect(&b.token(&common::user())).await;
    let mut sender = a.connect(&token).await;
    sender.send_chat(&session, "hi").await;
    let upserted = watcher.recv_until(|v| v["kind"] == "session_upserted").await.pop().unwrap();
    assert_eq!(upserted["sessionId"], session.as_str());
    assert!(upserted["providerSessionId"].as_str().unwrap().starts_with("script-"));
    stranger.expect_silence(Duration::from_millis(500)).await;
}

/// Spawns a cluster node as a child process (so it can be killed for real).
fn spawn_child(redis: &str, node_id: &str, lease: &str) -> NodeProcess {
    common::spawn_node(redis, node_id, &cluster_workspaces(), &["--run-lease", lease])
}

async fn a_dead_owner_s_run_ends_with_run_owner_lost_within_lease_plus_5s(redis: &str) {
    let owner = spawn_child(redis, "doomed", "2s");
    let survivor = spawn_child(redis, "survivor", "2s");
    owner.wait_ready().await.expect("owner ready");
    survivor.wait_ready().await.expect("survivor ready");
    let auth = chatgate::auth::Auth::new(common::SECRET.as_bytes());
    let token = auth.mint(&user(), Duration::from_secs(600)).unwrap();
    let http = reqwest::Client::new();
    let created: Value = http
        .post(format!("{}/api/providers/sessions", survivor.base))
        .bearer_auth(&token)
        .json(&json!({ "provider": "script", "projectPath": "proj" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let session = created["data"]["sessionId"].as_str().unwrap().to_string();
    let mut on_owner = Ws::connect(&format!("{}?token={token}", owner.ws_url)).await;
    on_owner.send_chat(&session, &paced(100_000, 50)).await;
    on_owner.recv_until(|v| v["kind"] == "stream_delta").await;
    let mut watcher = Ws::connect(&format!("{}?token={token}", survivor.ws_url)).await;
    watcher.subscribe(&session, 0).await;
    assert_eq!(watcher.recv_reply().await["isProcessing"], true);

    owner.kill();
    let killed_at = std::time::Instant::now();
    let frames = watcher.recv_until(|v| v["kind"] == "complete").await;
    let complete = frames.last().unwrap().clone();
    assert!(killed_at.elapsed() < Duration::from_secs(2 + 5), "took {:?}", killed_at.elapsed());
    assert_eq!(complete["exitCode"], 1);
    assert_eq!(complete["success"], false);
    assert_eq!(complete["error"], "run owner lost");
    let events: Vec<Value> = frames.into_iter().filter(|v| v.get("seq").is_some()).collect();
    assert_contiguous(&events, events[0]["seq"].as_u64().unwrap());
    // Exactly one complete, and the session takes a new run.
    watcher.expect_silence(Duration::from_millis(500)).await;
    // The reaper copied the tail the dead owner had not written: history ends with the
    // terminal complete, and the streamed deltas are there as one merged text.
    let complete_seq = complete["seq"].as_u64().unwrap();
    let mut history = Value::Null;
    for _ in 0..50 {
        history = http
            .get(format!("{}/api/providers/sessions/{session}/messages?kinds=all", survivor.base))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if history["data"]["messages"].as_array().unwrap().last().is_some_and(|m| m["seq"] == complete_seq) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let messages = history["data"]["messages"].as_array().unwrap();
    let last = messages.last().unwrap();
    assert_eq!(last["kind"], "complete", "{history}");
    assert_eq!(last["error"], "run owner lost");
    let merged: String = messages
        .iter()
        .filter(|m| m["kind"] == "text" && m["role"] == "assistant")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    let streamed: String =
        events.iter().filter(|e| e["kind"] == "stream_delta").map(|e| e["content"].as_str().unwrap()).collect();
    assert!(merged.ends_with(&streamed), "history lacks streamed deltas: {merged:?} vs {streamed:?}");
    watcher.send_chat(&session, "after").await;
    let next = watcher.run_events(&session).await;
    assert_eq!(next[0]["seq"].as_u64().unwrap(), complete["seq"].as_u64().unwrap() + 1);
    survivor.kill();
}

/// Bug C (`cut-stream-history`, docs/reliability.md): deltas were stored only at
/// their `stream_end`, so a stream cut with its owner was in history only as far
/// as the replay stream (trimmed to `--replay-max-events`) still held it. The
/// owner now stores each append batch's deltas as a draft, and the reaper
/// resumes the stream from them: history holds every delta, in order, in one
/// merged text at the last delta's seq.
async fn a_stream_cut_with_its_owner_is_whole_in_history_past_the_replay_window(redis: &str) {
    // The owner drafts every quarter window; a delta is lost only if its draft is still on its
    // way to SQL when the stream has moved three quarters of a window past it. 100 events at
    // 5 ms leave 375 ms for that (20 left 75 ms, which a loaded 2-core machine sometimes missed).
    const WINDOW: u64 = 100;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let survivor = cluster_node(redis, &format!("cut-reaper-{suffix}"), |c| {
        c.run_lease = Duration::from_secs(2);
        c.replay_max_events = WINDOW;
    })
    .await;
    let owner = common::spawn_node(
        redis,
        &format!("cut-owner-{suffix}"),
        &cluster_workspaces(),
        &["--run-lease", "2s", "--replay-max-events", &WINDOW.to_string()],
    );
    owner.wait_ready().await.expect("owner ready");
    let token = survivor.token(&user());
    let session = survivor.create_session(&token, "script").await;
    let mut watcher = survivor.connect(&token).await;
    watcher.subscribe(&session, 0).await;
    assert_eq!(watcher.recv_reply().await["isProcessing"], false);
    let prompt = paced(100_000, 5);
    let mut on_owner = owner.connect(&token).await;
    on_owner.send_chat(&session, &prompt).await;
    // Well past the replay window: the stream no longer holds the run's start.
    let mut events = Vec::new();
    while events.iter().filter(|e: &&Value| e["kind"] == "stream_delta").count() < 10 * WINDOW as usize {
        let frame = watcher.recv().await;
        if frame["sessionId"] == session.as_str() && frame.get("seq").is_some() {
            events.push(frame);
        }
    }
    owner.kill();
    events.extend(watcher.run_events(&session).await);
    assert_contiguous(&events, events[0]["seq"].as_u64().unwrap());
    let complete = events.last().unwrap().clone();
    assert_eq!(complete["error"], "run owner lost", "{complete}");
    let deltas = events.iter().filter(|e| e["kind"] == "stream_delta").count();
    assert!(deltas as u64 > 5 * WINDOW, "{deltas} deltas");
    assert!(events.iter().all(|e| ["stream_delta", "complete"].contains(&e["kind"].as_str().unwrap())));

    let history = survivor.history_complete(&token, &session, complete["seq"].as_u64()).await;
    assert_history_matches(&history, &prompt, &events);
    let last_delta = events.iter().rev().find(|e| e["kind"] == "stream_delta").unwrap();
    assert_eq!(history[1]["seq"], last_delta["seq"], "a cut run's merged text sits at its last delta's seq");
    // The drafts were durable progress only: the merged text deleted them.
    let store = survivor.store().await;
    assert_eq!(store.drafts(&session, 0, u64::MAX >> 1).await.unwrap(), vec![]);
}

#[tokio::test]
async fn redis_down_keeps_sockets_refuses_runs_and_recovers() {
    let mut redis = PrivateRedis::start().expect("private redis-server");
    // A short lease: after Redis comes back empty, sends wait one lease for live owners.
    let lease = |c: &mut Config| c.run_lease = Duration::from_secs(2);
    let a = cluster_node(&redis.url(), "ra", lease).await;
    let b = cluster_node(&redis.url(), "rb", lease).await;
    let user = user();
    let token = a.token(&user);
    let session = a.create_session(&token, "script").await;
    let mut tab_a = a.connect(&token).await;
    let mut tab_b = b.connect(&token).await;
    tab_a.send_chat(&session, "before").await;
    let first = until_complete(&mut tab_a, &session).await;
    tab_b.subscribe(&session, 0).await;
    assert_eq!(tab_b.recv_reply().await["kind"], "chat_subscribed");

    redis.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    tab_a.send_chat(&session, "during").await;
    let refused = tab_a.recv_until(|v| v["kind"] == "protocol_error").await.pop().unwrap();
    assert_eq!(refused["code"], "BACKEND_UNAVAILABLE");
    let (status, _) = a.request("GET", "/readyz", &token, None).await;
    assert_eq!(status, 503);

    redis.restart().expect("private redis-server restarts");
    let mut ready = false;
    for _ in 0..100 {
        if a.request("GET", "/readyz", &token, None).await.0 == 200
            && b.request("GET", "/readyz", &token, None).await.0 == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "nodes became ready again");
    // Redis came back empty: for one lease no run starts (one could still be live on an owner
    // that has not re-taken its lock: BACKEND_UNAVAILABLE), then the session takes runs again.
    let waited = Instant::now();
    let after = loop {
        tab_a.send_chat(&session, "after restart").await;
        let reply = tab_a.recv_reply().await;
        if reply["kind"] == "protocol_error" {
            assert_eq!(reply["code"], "BACKEND_UNAVAILABLE", "{reply}");
            assert!(waited.elapsed() < Duration::from_secs(10), "still refused: {reply}");
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let mut events = vec![reply];
        events.extend(until_complete(&mut tab_a, &session).await);
        break events.into_iter().filter(|v| v.get("seq").is_some()).collect::<Vec<_>>();
    };
    // ... and the seq never goes back, and the watcher on B still gets live events.
    let last_before = first.last().unwrap()["seq"].as_u64().unwrap();
    assert!(after[0]["seq"].as_u64().unwrap() > last_before);
    assert_contiguous(&after, after[0]["seq"].as_u64().unwrap());
    let watched = tab_b.recv_until(|v| v["kind"] == "complete").await;
    assert!(watched.iter().any(|v| v["seq"] == after[0]["seq"] || v["kind"] == "chat_subscribed"));
}

/// Nodes on a TLS-only Redis that requires a client certificate (signed by a CA made at test
/// time) and an ACL user: one node in process (the PEM values), one a `chatgate` process with
/// the file flags; a run sent on one streams on the other. A node without the client
/// certificate does not start, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_reach_a_tls_redis_with_a_client_certificate_and_an_acl_user() {
    let redis = tokio::task::spawn_blocking(|| {
        let user = Some(("chatgate".to_string(), "tls-test-password".to_string()));
        PrivateRedisTls::start_with(TlsOptions { require_client_cert: true, user })
    })
    .await
    .unwrap()
    .expect("a TLS-only redis-server");
    let (url, certs) = (redis.url_with_auth(), redis.certs().clone());
    let path = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
    let in_process = certs.clone();
    let a = cluster_node(&url, "tls-a", move |c| {
        c.redis_tls_ca = Some(in_process.ca_pem.clone());
        c.redis_tls_cert = Some(in_process.client_cert_pem.clone());
        c.redis_tls_key = Some(in_process.client_key_pem.clone());
    })
    .await;
    let (ca, cert, key) = (path(certs.ca_path()), path(certs.client_cert_path()), path(certs.client_key_path()));
    let flags = ["--redis-tls-ca-file", &ca, "--redis-tls-cert-file", &cert, "--redis-tls-key-file", &key];
    let b = common::spawn_node(&url, "tls-b", &cluster_workspaces(), &flags);
    b.wait_ready().await.expect("the node with the file flags is ready");

    let token = a.token(&user());
    let session = a.create_session(&token, "script").await;
    let mut watcher = b.connect(&token).await;
    watcher.subscribe(&session, 0).await;
    assert_eq!(watcher.recv_reply().await["kind"], "chat_subscribed");
    let mut sender = a.connect(&token).await;
    sender.send_chat(&session, &paced(20, 5)).await;
    let sent = until_complete(&mut sender, &session).await;
    let watched = until_complete(&mut watcher, &session).await;
    assert_contiguous(&sent, 1);
    assert_eq!(seqs(&sent), seqs(&watched), "the node on the other side of TLS saw the run");
    assert_eq!(sent.last().unwrap()["exitCode"], 0);

    let logs = tempfile::tempdir().unwrap();
    let refused = common::node_command()
        .database_url(&common::pg_url())
        .jwt_secret(common::SECRET)
        .workspaces(&cluster_workspaces())
        .args(["--node-id", "tls-c", "--redis-url", &url, "--redis-tls-ca-file", &ca])
        .stderr_in(logs.path())
        .spawn()
        .expect("chatgate starts");
    let status = refused.exited(Duration::from_secs(20)).await.expect("a node without the certificate exits");
    assert!(!status.success(), "{status}");
    let stderr = refused.stderr();
    let error = stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_default();
    assert!(error.contains("--redis-url") && error.contains("CertificateRequired"), "{stderr}");
}

/// The node's hash slots (the shard probe channels are picked by them) are the cluster's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_slots_are_the_redis_cluster_s_own() {
    let cluster = tokio::task::spawn_blocking(chatgate_testkit::redis_cluster::PrivateRedisCluster::shared)
        .await
        .unwrap()
        .expect("a Redis Cluster");
    let session = uuid::Uuid::new_v4().to_string();
    let probe = keys::shard_probe_channel("cg:probe:node-1:abc", "42");
    for name in ["foo", "cg:runs", "{}x", "a{}{b}", "{user1000}.following", &keys::run(&session), &probe] {
        assert_eq!(keys::slot(name), cluster.slot_of(name).unwrap(), "{name}");
    }
}
