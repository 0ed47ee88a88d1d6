//! Security suite, cluster mode (issue 8 part 4): two nodes on one Redis and
//! PostgreSQL, where aborts and approval answers are routed through Redis and
//! session and user ids end up in Redis key and channel names
//! (src/runs/redis/keys.rs).
//!
//! Already covered elsewhere: `cluster.rs` (a stranger's approval answer from
//! another node is ignored; `session_upserted` reaches the owner's sockets on
//! every node and not a stranger's).
//!
//! Here: every verb and REST route with another user's session and request id
//! from the owner node and from another node; session ids crafted to collide
//! with Redis keys and hash tags (`{ } : * ? [`, spaces, NUL, unicode, very
//! long, fragments such as `S}:run` of the victim's session S), sent by a
//! stranger and by the owner, with every Redis key compared before and after;
//! user ids with the same characters in the token, each of which must see
//! only its own notices, running list and Redis run index.

mod common;
mod security_support;

use std::{collections::BTreeMap, time::Duration};

use common::{PrivateRedis, Ws, cluster_node, mint};
use security_support::{Endpoint, Intruder, SESSIONS, Victim, next, silent};
use serde_json::{Value, json};

/// A node id no earlier run on the shared Redis used.
fn node_id(name: &str) -> String {
    format!("sec-{name}-{}", uuid::Uuid::new_v4().simple())
}

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

/// Every key of the Redis with its serialized value (`DUMP`; TTLs left out).
async fn snapshot(conn: &mut redis::aio::MultiplexedConnection) -> BTreeMap<String, Vec<u8>> {
    let names = common::key_names(conn).await;
    let mut out = BTreeMap::new();
    for name in names {
        let dump: Option<Vec<u8>> = redis::cmd("DUMP").arg(&name).query_async(conn).await.unwrap();
        if let Some(dump) = dump {
            out.insert(name, dump);
        }
    }
    out
}

/// Keys that come and go on their own: the sweeper's lock, and append-batch
/// results (kept one lease long) which may expire but never appear anew.
fn comparable(keys: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, Vec<u8>> {
    keys.iter()
        // Expiring bookkeeping: append-batch results and the per-user chat.send
        // window (every attempt counts, known session or not).
        .filter(|(k, _)| k.as_str() != "cg:sweep" && !k.contains(":batch:") && !k.ends_with("}:sends"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Percent-encodes every byte outside the unreserved set.
fn encode_path(raw: &str) -> String {
    raw.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_session_and_request_ids_across_nodes() {
    let redis = common::redis_url();
    let a = cluster_node(&redis, &node_id("a"), |_| {}).await;
    let b = cluster_node(&redis, &node_id("b"), |_| {}).await;
    let (on_a, on_b) = (Endpoint::of(&a), Endpoint::of(&b));
    let project = a.workspaces.join("proj");
    std::fs::create_dir_all(b.workspaces.join("proj")).unwrap();
    let mut victim = Victim::setup(&on_a, &project).await;
    let mut intruder = Intruder::new(&on_b, &b.workspaces.join("proj")).await;
    intruder.listen(&on_a).await;
    intruder.listen(&on_b).await;
    // From the other node (routed through Redis) and from the owner node.
    intruder.attack_verbs(&on_b, &victim).await;
    intruder.attack_routes(&on_b, &victim).await;
    intruder.attack_verbs(&on_a, &victim).await;
    intruder.attack_routes(&on_a, &victim).await;
    // The victim answers from B: the approval goes through Redis to A.
    victim.assert_untouched_then_finish(&on_b).await;
    intruder.assert_learned_nothing(&victim).await;
}

/// Crafted ids built around the victim's session id `s` and a marker `m`.
fn crafted_ids(s: &str, m: &str) -> Vec<String> {
    let mut ids: Vec<String> =
        ["{", "}", ":", "*", "?", "[", "]", "{}", "*:*", "cg:*", "\\", "a b", "\u{0}", "\u{1F600}", "é"]
            .iter()
            .map(|x| x.to_string())
            .collect();
    for template in [
        "{S}",
        "S}",
        "{S",
        "S}:run",
        "S}:lock",
        "S}:seq",
        "S}:events",
        "S}:pending",
        "S}:owner",
        "S}:live",
        "S}:batch:x",
        "S:run",
        "cg:{S}:run",
        "cg:{S}:pending",
        "S*",
        "S?",
        "[S]",
        "S\u{0}",
        "S x",
        "S\u{1F600}",
        "é-S",
        "S.run",
        "S-run",
        "M}:run",
        "{M}",
        "M*",
        "M}:lock",
        "x}:lock",
        "cg:perm:{M}",
        "cg:user:{M}:runs",
    ] {
        ids.push(template.replace('S', s).replace('M', m));
    }
    ids.push(s.repeat(4));
    ids.push("a".repeat(121));
    ids.push(format!("{m}{}", "z".repeat(20_000)));
    ids
}

/// Whether the gateway trims an id to nothing (then it is "required", not "unknown").
fn blank(id: &str) -> bool {
    id.trim().is_empty()
}

/// One socket sends every verb with `id`; each is answered as an unknown id.
async fn verbs_with_crafted_id(ws: &mut Ws, id: &str, what: &str) {
    let trimmed = id.trim();
    ws.send(json!({ "type": "chat.send", "sessionId": id, "content": "x" })).await;
    let got = next(ws, what).await;
    let want = if blank(id) { "SESSION_ID_REQUIRED" } else { "SESSION_NOT_FOUND" };
    assert_eq!(got["code"], want, "{what} send {id:?}: {got}");
    if !blank(id) {
        assert_eq!(got["sessionId"], trimmed, "{what}");
    }
    ws.send(json!({ "type": "chat.abort", "sessionId": id })).await;
    let got = next(ws, what).await;
    let want = if blank(id) { "SESSION_ID_REQUIRED" } else { "NO_ACTIVE_RUN" };
    assert_eq!(got["code"], want, "{what} abort {id:?}: {got}");
    ws.send(json!({ "type": "chat.subscribe", "sessions": [{ "sessionId": id, "lastSeq": 0 }] })).await;
    if !blank(id) {
        let ack = next(ws, what).await;
        assert_eq!(
            (ack["kind"].as_str(), ack["sessionId"].as_str(), ack["isProcessing"].as_bool(), ack["lastSeq"].as_u64()),
            (Some("chat_subscribed"), Some(trimmed), Some(false), Some(0)),
            "{what} subscribe {id:?}"
        );
        assert_eq!((&ack["runId"], &ack["pendingPermissions"]), (&Value::Null, &json!([])), "{what}");
    }
    ws.send(json!({ "type": "chat.unsubscribe", "sessions": [id] })).await;
    ws.send(json!({ "type": "chat.permission-response", "requestId": id, "allow": true })).await;
    // Frames are answered in order: anything these two provoked would show up
    // as the next answer (checked by the caller's next call, or its final silence).
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_session_ids_touch_no_other_session_keys() {
    let redis = PrivateRedis::start().expect("private redis-server");
    // Hundreds of verbs per socket in a burst: above the per-socket frame limit.
    let flood = |c: &mut chatgate::config::Config| (c.frame_rate, c.frame_burst) = (100_000, 100_000);
    let a = cluster_node(&redis.url(), &node_id("a"), flood).await;
    let b = cluster_node(&redis.url(), &node_id("b"), flood).await;
    let (on_a, on_b) = (Endpoint::of(&a), Endpoint::of(&b));
    std::fs::create_dir_all(b.workspaces.join("proj")).unwrap();
    let mut victim = Victim::setup(&on_a, &a.workspaces.join("proj")).await;
    let mut intruder = Intruder::new(&on_b, &b.workspaces.join("proj")).await;
    let mut conn = redis_conn(&redis.url()).await;
    let before = snapshot(&mut conn).await;
    let session_keys: Vec<&String> = before.keys().filter(|k| k.contains(&victim.session)).collect();
    assert!(session_keys.iter().any(|k| k.ends_with(":pending")), "the victim's run keys: {session_keys:?}");

    let marker = uuid::Uuid::new_v4().simple().to_string();
    let request_ids: Vec<String> = ["{R}", "R}", "{R", "R*", "R?", "[R]", "cg:perm:{R}", "R}:x", "R\u{0}", "R "]
        .iter()
        .map(|t| t.replace('R', &victim.request_id))
        .collect();
    let ids = crafted_ids(&victim.session, &marker);
    // The stranger from both nodes, and the owner herself (who must not reach
    // her own session's keys through a crafted id either).
    let mut sockets = vec![
        ("stranger on B", on_b.connect(&intruder.token).await),
        ("stranger on A", on_a.connect(&intruder.token).await),
        ("owner on B", on_b.connect(&victim.token).await),
        ("owner on A", on_a.connect(&victim.token).await),
    ];
    for (what, ws) in &mut sockets {
        for id in &ids {
            verbs_with_crafted_id(ws, id, what).await;
        }
        for request_id in &request_ids {
            ws.send(json!({ "type": "chat.permission-response", "requestId": request_id, "allow": false })).await;
        }
        silent(ws, Duration::from_millis(100), what).await;
    }
    // REST: refused by the id pattern, or (pattern-valid) unknown.
    for id in &ids {
        let path = format!("{SESSIONS}/{}", encode_path(id));
        for (token, node) in [(&intruder.token, &on_b), (&victim.token, &on_a)] {
            for (method, path, body) in [
                ("GET", path.clone(), None),
                ("PUT", path.clone(), Some(json!({ "summary": "x" }))),
                ("DELETE", format!("{path}?force=true"), None),
                ("POST", format!("{path}/restore"), None),
                ("GET", format!("{path}/messages"), None),
            ] {
                let got = node.request(method, &path, token, body).await;
                let valid = id.len() <= 120 && id.bytes().all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c));
                let want = if valid { (404, "SESSION_NOT_FOUND") } else { (400, "INVALID_SESSION_ID") };
                assert_eq!(
                    (got.0, got.1["error"]["code"].as_str()),
                    (want.0, Some(want.1)),
                    "{method} {id:?}: {}",
                    got.1
                );
            }
        }
    }

    // Redis: not one key created, changed or removed (but expiring batch results).
    let after = snapshot(&mut conn).await;
    let (before_cmp, after_cmp) = (comparable(&before), comparable(&after));
    let added: Vec<&String> = after_cmp.keys().filter(|k| !before_cmp.contains_key(*k)).collect();
    let removed: Vec<&String> = before_cmp.keys().filter(|k| !after_cmp.contains_key(*k)).collect();
    let changed: Vec<&String> =
        before_cmp.iter().filter(|(k, v)| after_cmp.get(*k).is_some_and(|w| w != *v)).map(|(k, _)| k).collect();
    assert!(
        added.is_empty() && removed.is_empty() && changed.is_empty(),
        "added {added:?} removed {removed:?} changed {changed:?}"
    );
    assert!(after.keys().all(|k| !k.contains(&marker)), "a crafted id reached Redis: {:?}", after.keys());
    let new_batches: Vec<&String> =
        after.keys().filter(|k| k.contains(":batch:") && !before.contains_key(*k)).collect();
    assert!(new_batches.is_empty(), "{new_batches:?}");

    victim.assert_untouched_then_finish(&on_b).await;
    for (_, ws) in &mut sockets {
        // The owner's sockets subscribed to nothing real; the stranger's neither.
        silent(ws, Duration::from_millis(50), "after the run").await;
    }
    intruder.assert_learned_nothing(&victim).await;
}

/// A user of the crafted-id test: their token, own session, sockets on both nodes.
struct Tenant {
    user: String,
    token: String,
    session: String,
    sockets: Vec<Ws>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_user_ids_hear_only_their_own_notices_and_runs() {
    let redis = PrivateRedis::start().expect("private redis-server");
    let a = cluster_node(&redis.url(), &node_id("a"), |_| {}).await;
    let b = cluster_node(&redis.url(), &node_id("b"), |_| {}).await;
    let (on_a, on_b) = (Endpoint::of(&a), Endpoint::of(&b));
    let project = a.workspaces.join("proj");
    std::fs::create_dir_all(b.workspaces.join("proj")).unwrap();
    let v = format!("v{}", uuid::Uuid::new_v4().simple());
    let crafted: Vec<String> = [
        "V}:x",
        "{V}",
        "V}",
        "{V",
        "V:runs",
        "V}:runs",
        "{V}:runs",
        "*",
        "V*",
        "?",
        "V?",
        "[V]",
        "V ",
        " V",
        "V:*",
        "cg:user:V",
        "cg:user:{V}:runs",
        "V\u{1F600}",
        "éV",
        "V\nx",
        "V\\",
    ]
    .iter()
    .map(|t| t.replace('V', &v))
    .chain([format!("{v}{}", "x".repeat(2000))])
    .collect();
    let script = json!({ "permission": { "toolName": "Bash", "input": { "command": "true" }, "timeoutMs": 30_000 } })
        .to_string();

    // Every tenant (the victim first) with a session, sockets on both nodes
    // opened after it, and a run waiting on an approval.
    let mut tenants = Vec::new();
    for name in std::iter::once(v.clone()).chain(crafted) {
        let token = mint(&name, Duration::from_secs(3600));
        let session = on_a.create_session(&token, &project).await;
        let mut tenant = Tenant { user: name, token, session, sockets: Vec::new() };
        for node in [&on_a, &on_b] {
            tenant.sockets.push(node.connect(&tenant.token).await);
        }
        tenants.push(tenant);
    }
    for tenant in &mut tenants {
        tenant.sockets[0].send_chat(&tenant.session, &script).await;
        tenant.sockets[0].recv_until(|f| f["kind"] == "permission_request").await;
    }
    // The victim makes more notices: a new session and a rename, from B.
    let victim_token = tenants[0].token.clone();
    let second = on_b.create_session(&victim_token, &b.workspaces.join("proj")).await;
    let (status, _) = on_b
        .request("PUT", &format!("{SESSIONS}/{second}"), &victim_token, Some(json!({ "summary": "secret plans" })))
        .await;
    assert_eq!(status, 200);

    let all_sessions: Vec<String> = tenants.iter().map(|t| t.session.clone()).chain([second.clone()]).collect();
    for tenant in &mut tenants {
        let own = [tenant.session.clone(), second.clone()];
        let is_victim = tenant.user == v;
        // The victim's socket on A hears both notices about `second`; nobody else hears anything of it.
        if is_victim {
            let notices = tenant.sockets[0]
                .recv_until(|f| f["kind"] == "session_upserted" && f["session"]["summary"] == "secret plans")
                .await;
            assert!(notices.iter().all(|f| f["sessionId"] == second.as_str() || f["sessionId"] == own[0].as_str()));
        }
        for ws in &mut tenant.sockets {
            while let Some(frame) = ws.try_recv(Duration::from_millis(50)).await {
                let frame = frame.unwrap_or_else(|code| panic!("{:?}: socket closed {code:?}", tenant.user));
                let session = frame["sessionId"].as_str().unwrap_or_default();
                assert!(
                    session == own[0] || (is_victim && session == own[1]),
                    "{:?} heard about {session}: {frame}",
                    tenant.user
                );
            }
        }
        // Running lists on both nodes: exactly the tenant's own run.
        for node in [&on_a, &on_b] {
            let (status, running) = node.request("GET", &format!("{SESSIONS}/running"), &tenant.token, None).await;
            assert_eq!(status, 200, "{running}");
            let ids: Vec<&str> = running["data"]["sessions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["sessionId"].as_str().unwrap())
                .collect();
            assert_eq!(ids, [tenant.session.as_str()], "{:?}", tenant.user);
            // Sessions: their own among this test's (ids like `*` are shared
            // with earlier runs on the shared database, so only this test's count).
            let (_, listed) = node.request("GET", &format!("{SESSIONS}?limit=1000"), &tenant.token, None).await;
            let mut seen: Vec<&str> = listed["data"]["sessions"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|s| s["sessionId"].as_str())
                .filter(|id| all_sessions.iter().any(|s| s == id))
                .collect();
            seen.sort_unstable();
            let mut want: Vec<&str> = if is_victim { own.iter().map(String::as_str).collect() } else { vec![&own[0]] };
            want.sort_unstable();
            assert_eq!(seen, want, "{:?}", tenant.user);
        }
    }
    // Each user's Redis run index holds that user's run and nothing else.
    let mut conn = redis_conn(&redis.url()).await;
    for tenant in &tenants {
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(format!("cg:user:{{{}}}:runs", tenant.user))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(members.len(), 1, "{:?}: {members:?}", tenant.user);
        assert!(members[0].contains(&tenant.session), "{:?}: {members:?}", tenant.user);
    }
    // The runs end by their owners' answers; nobody hears another's.
    for tenant in &mut tenants {
        let ws = &mut tenant.sockets[1];
        ws.send(json!({ "type": "chat.abort", "sessionId": tenant.session })).await;
        let complete = tenant.sockets[0].recv_until(|f| f["kind"] == "complete").await.pop().unwrap();
        assert_eq!(
            (complete["sessionId"].as_str(), complete["aborted"].as_bool()),
            (Some(tenant.session.as_str()), Some(true))
        );
    }
}
