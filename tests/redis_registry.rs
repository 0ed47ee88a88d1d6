//! Redis-only behaviour of the run registry: fencing, owner loss, several
//! nodes, connection loss and Redis restarts, key expiry.
//!
//! Tests on the shared Redis (`REDIS_URL`, default 127.0.0.1:6379) use unique
//! session ids. Tests that kill connections or Redis itself start their own
//! `redis-server` on a free port and kill only that one.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use chatgate::{
    protocol::{EventBody, Frame, PermissionAnswer},
    runs::{
        Control, Event, FeedItem, LiveFeed, NoticeSink, PriorSend, RegistryError, RunOwnership, RunRegistry,
        RunRouting, RunStart, SessionFeeds, UserNotices,
        redis::{RedisRegistry, RedisRegistryOptions, RedisTarget, keys},
    },
};
use chatgate_testkit::{redis::PrivateRedis, redis_cluster::PrivateRedisCluster};
use redis::AsyncCommands;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

fn shared_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn options(lease: Duration) -> RedisRegistryOptions {
    RedisRegistryOptions {
        lease,
        max_events: 1000,
        retention: Duration::from_secs(60),
        idempotency_window: Duration::from_secs(60),
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

async fn node(url: &str, name: &str, lease: Duration) -> RedisRegistry {
    RedisRegistry::connect(url, &unique(name), options(lease)).await.expect("connect")
}

fn start(registry: &RedisRegistry, session_id: &str, run_id: &str, user_id: &str) -> RunStart {
    RunStart {
        session_id: session_id.into(),
        run_id: run_id.into(),
        provider: "script".into(),
        user_id: user_id.into(),
        node_id: registry.node_id().into(),
        seq_floor: 0,
        last_active_ms: 0,
        prompt: "hello".into(),
        request_key: None,
    }
}

fn bodies(session_id: &str, run_id: &str, n: usize) -> Vec<EventBody> {
    (0..n)
        .map(|i| {
            EventBody::from_object(
                "text",
                &json!({"id": unique("ev"), "kind": "text", "sessionId": session_id, "provider": "script",
                        "timestamp": "2024-01-01T00:00:00.000Z", "runId": run_id, "content": format!("event {i}")}),
            )
        })
        .collect()
}

fn complete_body(session_id: &str, run_id: &str) -> EventBody {
    EventBody::from_object(
        "complete",
        &json!({"id": unique("ev"), "kind": "complete", "sessionId": session_id, "provider": "script",
                "timestamp": "2024-01-01T00:00:00.000Z", "runId": run_id, "exitCode": 0, "success": true,
                "aborted": false}),
    )
}

fn seqs(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

async fn next_item(feed: &mut LiveFeed) -> FeedItem {
    tokio::time::timeout(WAIT, feed.next()).await.expect("a feed item in time").expect("feed open")
}

async fn next_event(feed: &mut LiveFeed) -> Event {
    match next_item(feed).await {
        FeedItem::Event(event) => event,
        gap => panic!("expected an event, got {gap:?}"),
    }
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

/// Polls `check` until it holds or `WAIT` passes.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts the terminal `complete` a reaper appends for a lost owner.
fn assert_owner_lost(event: &Event, session_id: &str, run_id: &str) {
    assert!(event.terminal);
    let v: Value = serde_json::from_str(&event.frame).unwrap();
    for field in ["id", "timestamp"] {
        assert!(v[field].as_str().is_some_and(|s| !s.is_empty()), "{field} in {v}");
    }
    assert_eq!(v["kind"], "complete");
    assert_eq!(v["sessionId"], session_id);
    assert_eq!(v["provider"], "script");
    assert_eq!(v["runId"], run_id);
    assert_eq!(v["exitCode"], 1);
    assert_eq!(v["success"], false);
    assert_eq!(v["aborted"], false);
    assert_eq!(v["error"], "run owner lost");
    assert_eq!(v["seq"], event.seq);
    // Shaped like the owner's own `complete`.
    assert_eq!(v["actualSessionId"], session_id);
    assert!(v["id"].as_str().is_some_and(|id| id.starts_with("complete_")), "{v}");
}

/// Per proxied connection: (it subscribed, it is silenced).
type ProxiedConnections = Arc<std::sync::Mutex<Vec<(Arc<AtomicBool>, Arc<AtomicBool>)>>>;

/// A TCP proxy in front of a Redis server that can silence the pub/sub
/// connections open at a given moment: their replies and messages are read
/// and dropped, the sockets stay open (a "silent" subscriber).
struct SilencingProxy {
    port: u16,
    connections: ProxiedConnections,
    task: tokio::task::JoinHandle<()>,
}

impl SilencingProxy {
    async fn start(upstream: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections: ProxiedConnections = Default::default();
        let registered = connections.clone();
        let task = tokio::spawn(async move {
            let mut pumps = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else { continue };
                let (pubsub, muted) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
                registered.lock().unwrap().push((pubsub.clone(), muted.clone()));
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                pumps.spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = client_read.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if buf[..n].windows(9).any(|w| w == b"SUBSCRIBE") {
                            pubsub.store(true, Ordering::SeqCst);
                        }
                        if server_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                pumps.spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = server_read.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if muted.load(Ordering::SeqCst) {
                            continue;
                        }
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        SilencingProxy { port, connections, task }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Silences the pub/sub connections open now; returns how many.
    fn silence_pubsub(&self) -> usize {
        let connections = self.connections.lock().unwrap();
        let mut silenced = 0;
        for (pubsub, muted) in connections.iter() {
            if pubsub.load(Ordering::SeqCst) && !muted.load(Ordering::SeqCst) {
                muted.store(true, Ordering::SeqCst);
                silenced += 1;
            }
        }
        silenced
    }
}

impl Drop for SilencingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------- fencing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lock_fences_the_owner_and_the_run_is_reaped() {
    let url = shared_url();
    let owner = node(&url, "fence", Duration::from_millis(600)).await;
    let s = unique("s");
    let grant = owner.start_run(start(&owner, &s, "r1", "u")).await.unwrap();
    owner.append(&grant.lease, bodies(&s, "r1", 2)).await.unwrap();
    owner.renew(&grant.lease).await.expect("renewal while held");
    // Nobody renews: the lock runs out.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(owner.append(&grant.lease, bodies(&s, "r1", 1)).await.err(), Some(RegistryError::Fenced));
    assert_eq!(owner.renew(&grant.lease).await.err(), Some(RegistryError::Fenced));
    assert_eq!(owner.complete(&grant.lease, complete_body(&s, "r1")).await.err(), Some(RegistryError::Fenced));
    // The sweeper ends the run with the terminal complete; the fenced writes left no trace.
    eventually("the orphan is reaped", || async { !owner.snapshot(&s).await.unwrap().is_processing }).await;
    let all = owner.read_range(&s, 0, u64::MAX).await.unwrap();
    assert_eq!(seqs(&all.events), vec![1, 2, 3]);
    assert_owner_lost(&all.events[2], &s, "r1");
    owner.start_run(start(&owner, &s, "r2", "u")).await.expect("the session takes a new run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_or_deleted_lock_fences_the_owner() {
    let url = shared_url();
    let owner = node(&url, "steal", Duration::from_secs(30)).await;
    let mut conn = raw(&url).await;

    let s = unique("s");
    let grant = owner.start_run(start(&owner, &s, "r1", "u")).await.unwrap();
    owner.append(&grant.lease, bodies(&s, "r1", 2)).await.unwrap();
    let thief = json!({"runId": "thief", "nodeId": "elsewhere", "provider": "script", "userId": "u",
                       "startedAt": "2024-01-01T00:00:00.000Z", "firstSeq": 3});
    let _: () = conn.pset_ex(keys::run(&s), thief.to_string(), 2000).await.unwrap();
    assert_eq!(owner.append(&grant.lease, bodies(&s, "r1", 1)).await.err(), Some(RegistryError::Fenced));
    assert_eq!(owner.renew(&grant.lease).await.err(), Some(RegistryError::Fenced));
    assert_eq!(owner.complete(&grant.lease, complete_body(&s, "r1")).await.err(), Some(RegistryError::Fenced));
    assert_eq!(
        owner.add_pending(&grant.lease, "rq", json!({"requestId": "rq"})).await.err(),
        Some(RegistryError::Fenced)
    );
    assert_eq!(seqs(&owner.read_range(&s, 0, u64::MAX).await.unwrap().events), vec![1, 2]);

    // Deleted behind the owner's back (the counter is still there: not a Redis restart).
    let s2 = unique("s");
    let grant = owner.start_run(start(&owner, &s2, "r2", "u")).await.unwrap();
    owner.append(&grant.lease, bodies(&s2, "r2", 1)).await.unwrap();
    let _: () = conn.del(keys::run(&s2)).await.unwrap();
    assert_eq!(owner.append(&grant.lease, bodies(&s2, "r2", 1)).await.err(), Some(RegistryError::Fenced));
    assert_eq!(owner.renew(&grant.lease).await.err(), Some(RegistryError::Fenced));
    // The orphan ends once, with the terminal complete, and never with an owner write.
    assert!(owner.reap_orphan(&s2).await.unwrap());
    assert!(!owner.reap_orphan(&s2).await.unwrap());
    assert_eq!(owner.complete(&grant.lease, complete_body(&s2, "r2")).await.err(), Some(RegistryError::Fenced));
    let all = owner.read_range(&s2, 0, u64::MAX).await.unwrap();
    assert_eq!(seqs(&all.events), vec![1, 2]);
    assert_owner_lost(&all.events[1], &s2, "r2");
}

// ---------------------------------------------------------------- owner loss

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_owner_gets_exactly_one_terminal_complete_seen_by_every_node() {
    let url = shared_url();
    let lease = Duration::from_secs(1);
    let owner = node(&url, "dies", lease).await;
    let (b, c) = (node(&url, "watch-b", lease).await, node(&url, "watch-c", lease).await);
    let s = unique("s");
    let grant = owner.start_run(start(&owner, &s, "r1", "u")).await.unwrap();
    owner.append(&grant.lease, bodies(&s, "r1", 3)).await.unwrap();
    let mut on_b = b.subscribe(&s, 0).await.unwrap();
    let mut on_c = c.subscribe(&s, 2).await.unwrap();
    assert_eq!(seqs(&on_b.replay), vec![1, 2, 3]);
    assert_eq!(seqs(&on_c.replay), vec![3]);

    // The owner node dies: its tasks stop, nobody renews.
    let died = Instant::now();
    drop(grant);
    drop(owner);
    let end_b = next_event(&mut on_b.live).await;
    let end_c = next_event(&mut on_c.live).await;
    assert!(died.elapsed() < lease + Duration::from_secs(5), "ended within lease + 5 s: {:?}", died.elapsed());
    assert_eq!(end_b, end_c);
    assert_eq!(end_b.seq, 4);
    assert_owner_lost(&end_b, &s, "r1");
    for feed in [&mut on_b.live, &mut on_c.live] {
        assert!(tokio::time::timeout(Duration::from_millis(lease.as_millis() as u64 * 2), feed.next()).await.is_err());
    }
    let all = b.read_range(&s, 0, u64::MAX).await.unwrap();
    assert_eq!(all.events.iter().filter(|e| e.terminal).count(), 1, "exactly one terminal complete");

    // The session takes a new run; seq continues.
    let grant = c.start_run(start(&c, &s, "r2", "u")).await.unwrap();
    assert_eq!(seqs(&c.append(&grant.lease, bodies(&s, "r2", 1)).await.unwrap()), vec![5]);
    assert_eq!(next_event(&mut on_b.live).await.seq, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_reapers_end_each_orphan_exactly_once() {
    // A private server: no other test's sweeper walks these orphans; long
    // leases keep this test's own sweepers out of the way of the race.
    let redis = PrivateRedis::start().expect("private redis-server");
    let url = redis.url();
    let owner = node(&url, "orphans", Duration::from_secs(60)).await;
    let (b, c) =
        (node(&url, "reap-b", Duration::from_secs(60)).await, node(&url, "reap-c", Duration::from_secs(60)).await);
    let mut conn = raw(&url).await;
    let sessions: Vec<String> = (0..20).map(|_| unique("orphan")).collect();
    for s in &sessions {
        let grant = owner.start_run(start(&owner, s, "r1", "u")).await.unwrap();
        owner.append(&grant.lease, bodies(s, "r1", 1)).await.unwrap();
        // The lock runs out as if the owner died.
        let _: () = conn.del(keys::run(s)).await.unwrap();
    }
    let mut wins = 0;
    let races = sessions.iter().map(|s| {
        let (b, c, s) = (b.clone(), c.clone(), s.clone());
        tokio::spawn(async move {
            let (x, y) = tokio::join!(b.reap_orphan(&s), c.reap_orphan(&s));
            (s, x.unwrap(), y.unwrap())
        })
    });
    for race in races {
        let (s, x, y) = race.await.unwrap();
        assert!(!(x && y), "two reapers ended {s}");
        wins += usize::from(x || y);
        let all = b.read_range(&s, 0, u64::MAX).await.unwrap();
        assert_eq!(seqs(&all.events), vec![1, 2], "{s}: one event and one terminal complete");
        assert_owner_lost(&all.events[1], &s, "r1");
        assert!(!b.snapshot(&s).await.unwrap().is_processing);
    }
    assert_eq!(wins, sessions.len(), "each orphan was ended by one of the racing reapers");
    // A start on a session with an orphan ends the orphan first.
    let s = unique("orphan");
    let grant = owner.start_run(start(&owner, &s, "r1", "u")).await.unwrap();
    owner.append(&grant.lease, bodies(&s, "r1", 1)).await.unwrap();
    let _: () = conn.del(keys::run(&s)).await.unwrap();
    let grant = c.start_run(start(&c, &s, "r2", "u")).await.unwrap();
    let after = c.append(&grant.lease, bodies(&s, "r2", 1)).await.unwrap();
    let all = c.read_range(&s, 0, u64::MAX).await.unwrap();
    assert_eq!(seqs(&all.events), vec![1, 2, 3]);
    assert_owner_lost(&all.events[1], &s, "r1");
    assert_eq!(after[0].seq, 3);
}

// ---------------------------------------------------------------- several nodes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_live_events_aborts_and_approvals() {
    let url = shared_url();
    let lease = Duration::from_secs(15);
    let (a, b, c) = (node(&url, "a", lease).await, node(&url, "b", lease).await, node(&url, "c", lease).await);
    let s = unique("s");
    let user = unique("user");
    let mut on_b = b.subscribe(&s, 0).await.unwrap();
    let mut on_c = c.subscribe(&s, 0).await.unwrap();
    let mut grant = a.start_run(start(&a, &s, "r1", &user)).await.unwrap();
    for chunk in [3, 1, 5, 2] {
        a.append(&grant.lease, bodies(&s, "r1", chunk)).await.unwrap();
    }
    for feed in [&mut on_b.live, &mut on_c.live] {
        let mut got = Vec::new();
        for _ in 0..11 {
            got.push(next_event(feed).await.seq);
        }
        assert_eq!(got, (1..=11).collect::<Vec<_>>());
    }
    let snapshot = c.snapshot(&s).await.unwrap();
    assert_eq!(snapshot.owner_node.as_deref(), Some(a.node_id()));

    assert!(c.route_abort(&s, &user).await.unwrap());
    let control = tokio::time::timeout(WAIT, grant.control.recv()).await.unwrap().unwrap();
    assert_eq!(control, Control::Abort { session_id: s.clone(), run_id: "r1".into() });

    a.add_pending(&grant.lease, "rq-1", json!({"requestId": "rq-1", "toolName": "Bash"})).await.unwrap();
    assert_eq!(
        b.snapshot(&s).await.unwrap().pending_permissions,
        vec![json!({"requestId": "rq-1", "toolName": "Bash"})]
    );
    let answer = PermissionAnswer {
        allow: true,
        updated_input: Some(json!({"command": "ls"})),
        message: None,
        remember_entry: None,
    };
    assert!(b.route_permission(&user, "rq-1", answer.clone()).await.unwrap());
    let control = tokio::time::timeout(WAIT, grant.control.recv()).await.unwrap().unwrap();
    assert_eq!(control, Control::Permission { session_id: s.clone(), request_id: "rq-1".into(), answer });

    let done = a.complete(&grant.lease, complete_body(&s, "r1")).await.unwrap();
    assert_eq!(next_event(&mut on_b.live).await, done);
    assert_eq!(next_event(&mut on_c.live).await, done);
}

/// A notice listener that drops what it is handed.
struct NoSink;

impl NoticeSink for NoSink {
    fn notice(&self, _: &Frame) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_subscriptions_are_refcounted_and_released() {
    let url = shared_url();
    let b = node(&url, "refs", Duration::from_millis(600)).await;
    let base = b.held_channels().await;
    let s = unique("s");
    let first = b.subscribe(&s, 0).await.unwrap();
    let second = b.subscribe(&s, 0).await.unwrap();
    let other = b.subscribe(&unique("s"), 0).await.unwrap();
    assert_eq!(b.held_channels().await, base + 2, "one channel per session, however many feeds");
    drop(first);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(b.held_channels().await, base + 2);
    drop(second);
    drop(other);
    eventually("the last feeds released their channels", || async { b.held_channels().await == base }).await;

    let notices = b.listen_user(&unique("user"), Arc::new(NoSink)).await.unwrap();
    let again = b.listen_user("someone", Arc::new(NoSink)).await.unwrap();
    assert_eq!(b.held_channels().await, base + 2);
    drop(notices);
    drop(again);
    eventually("idle user channels are released", || async { b.held_channels().await == base }).await;
}

// ---------------------------------------------------------------- connection loss

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pubsub_connection_is_redialed_without_a_gap() {
    let redis = PrivateRedis::start().expect("private redis-server");
    let lease = Duration::from_secs(10);
    let (a, b) = (node(&redis.url(), "a", lease).await, node(&redis.url(), "b", lease).await);
    let s = unique("s");
    let mut on_b = b.subscribe(&s, 0).await.unwrap();
    let grant = a.start_run(start(&a, &s, "r1", "u")).await.unwrap();
    a.append(&grant.lease, bodies(&s, "r1", 3)).await.unwrap();
    for seq in 1..=3 {
        assert_eq!(next_event(&mut on_b.live).await.seq, seq);
    }
    let mut admin = raw(&redis.url()).await;
    let killed: u64 = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut admin).await.unwrap();
    assert!(killed >= 2, "both nodes' pub/sub connections were killed");
    // Events appended while the subscriber is away arrive once it is back, in order, once each.
    a.append(&grant.lease, bodies(&s, "r1", 3)).await.unwrap();
    a.complete(&grant.lease, complete_body(&s, "r1")).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(next_event(&mut on_b.live).await);
    }
    assert_eq!(seqs(&got), vec![4, 5, 6, 7]);
    assert!(got[3].terminal);
    eventually("both nodes ready again", || async { a.ready().await.is_ok() && b.ready().await.is_ok() }).await;
    // The restored subscription carries the next run live.
    let grant = a.start_run(start(&a, &s, "r2", "u")).await.unwrap();
    a.append(&grant.lease, bodies(&s, "r2", 1)).await.unwrap();
    assert_eq!(next_event(&mut on_b.live).await.seq, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_pubsub_connection_is_redialed_by_the_probe() {
    let redis = PrivateRedis::start().expect("private redis-server");
    let proxy = SilencingProxy::start(redis.port()).await;
    let lease = Duration::from_secs(3);
    let a = node(&redis.url(), "a", lease).await;
    let b = node(&proxy.url(), "b", lease).await;
    let s = unique("s");
    let mut on_b = b.subscribe(&s, 0).await.unwrap();
    let grant = a.start_run(start(&a, &s, "r1", "u")).await.unwrap();
    a.append(&grant.lease, bodies(&s, "r1", 2)).await.unwrap();
    for seq in 1..=2 {
        assert_eq!(next_event(&mut on_b.live).await.seq, seq);
    }
    assert_eq!(proxy.silence_pubsub(), 1, "node b's one pub/sub connection");
    // Published while b's subscriber hears nothing; its probe notices and re-dials.
    a.append(&grant.lease, bodies(&s, "r1", 3)).await.unwrap();
    a.complete(&grant.lease, complete_body(&s, "r1")).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(next_event(&mut on_b.live).await);
    }
    assert_eq!(seqs(&got), vec![3, 4, 5, 6]);
    assert!(got[3].terminal);
    eventually("node b ready again", || async { b.ready().await.is_ok() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_is_survived_and_announced_as_a_gap() {
    let mut redis = PrivateRedis::start().expect("private redis-server");
    let lease = Duration::from_secs(10);
    let (a, b) = (node(&redis.url(), "a", lease).await, node(&redis.url(), "b", lease).await);
    let s = unique("s");
    let mut on_b = b.subscribe(&s, 0).await.unwrap();
    let grant = a.start_run(start(&a, &s, "r1", "u")).await.unwrap();
    a.append(&grant.lease, bodies(&s, "r1", 5)).await.unwrap();
    for seq in 1..=5 {
        assert_eq!(next_event(&mut on_b.live).await.seq, seq);
    }

    redis.kill();
    eventually("node a reports not ready", || async { a.ready().await.is_err() }).await;
    eventually("node b reports not ready", || async { b.ready().await.is_err() }).await;
    // Refused: "unavailable", or "unknown" when the first try went out on a connection that then
    // died (the client cannot tell whether Redis ran it before it went).
    let refused = a.start_run(start(&a, &unique("s"), "rx", "u")).await;
    assert!(matches!(refused, Err(RegistryError::Unavailable(_) | RegistryError::Unconfirmed(_))), "{refused:?}");
    redis.restart().expect("private redis-server restarts"); // back, and empty

    // The owner's next append re-takes the vanished lock; seq jumps ahead, never back.
    let resumed = a.append(&grant.lease, bodies(&s, "r1", 2)).await.expect("the run continues after the restart");
    assert!(resumed[0].seq > 5 + 1000, "restored above the known top plus the margin: {}", resumed[0].seq);
    assert_eq!(resumed[1].seq, resumed[0].seq + 1);
    // The subscriber is told about the hole, then gets the events.
    assert_eq!(next_item(&mut on_b.live).await, FeedItem::Gap { resumed_at: resumed[0].seq });
    assert_eq!(next_event(&mut on_b.live).await.seq, resumed[0].seq);
    assert_eq!(next_event(&mut on_b.live).await.seq, resumed[1].seq);
    // A client resuming from its cursor learns that replay is incomplete.
    let resumed_sub = b.subscribe(&s, 5).await.unwrap();
    assert!(resumed_sub.replay_truncated);
    assert!(resumed_sub.snapshot.is_processing);
    assert_eq!(seqs(&resumed_sub.replay), seqs(&resumed));
    eventually("both nodes ready again", || async { a.ready().await.is_ok() && b.ready().await.is_ok() }).await;

    a.renew(&grant.lease).await.expect("the re-taken lock renews");
    let done = a.complete(&grant.lease, complete_body(&s, "r1")).await.unwrap();
    assert_eq!(next_event(&mut on_b.live).await, done);
    let mut running = a.running_runs("u").await.unwrap();
    running.retain(|r| r.session_id == s);
    assert!(running.is_empty());
    let grant = b.start_run(start(&b, &s, "r2", "u")).await.unwrap();
    assert_eq!(b.append(&grant.lease, bodies(&s, "r2", 1)).await.unwrap()[0].seq, done.seq + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_lost_with_its_owner_in_a_restart_is_ended_by_a_watcher() {
    let mut redis = PrivateRedis::start().expect("private redis-server");
    let lease = Duration::from_secs(1);
    let owner = node(&redis.url(), "owner", lease).await;
    let watcher = node(&redis.url(), "watcher", lease).await;
    let s = unique("s");
    let mut feed = watcher.subscribe(&s, 0).await.unwrap();
    let grant = owner.start_run(start(&owner, &s, "r1", "u")).await.unwrap();
    owner.append(&grant.lease, bodies(&s, "r1", 2)).await.unwrap();
    for seq in 1..=2 {
        assert_eq!(next_event(&mut feed.live).await.seq, seq);
    }
    drop(grant);
    drop(owner);
    redis.kill();
    redis.restart().expect("private redis-server restarts");
    // No lock, no owner record, no stream: the watcher ends the run it saw going.
    match next_item(&mut feed.live).await {
        FeedItem::Gap { resumed_at } => assert!(resumed_at > 2),
        other => panic!("expected a gap first, got {other:?}"),
    }
    let end = next_event(&mut feed.live).await;
    assert_owner_lost(&end, &s, "r1");
    assert!(end.seq > 2);
    assert!(!watcher.snapshot(&s).await.unwrap().is_processing);
}

// ---------------------------------------------------------------- expiry

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_runs_leave_only_expiring_keys() {
    let url = shared_url();
    let registry = Arc::new(node(&url, "expiry", Duration::from_secs(2)).await);
    let mut conn = raw(&url).await;
    let s = unique("s");
    let user = unique("user");
    let grant = registry.start_run(start(&registry, &s, "r1", &user)).await.unwrap();
    registry.append(&grant.lease, bodies(&s, "r1", 2)).await.unwrap();
    registry.add_pending(&grant.lease, "rq-x", json!({"requestId": "rq-x"})).await.unwrap();
    let member = json!([s, "r1"]).to_string();
    let indexed: Option<f64> = conn.zscore(keys::RUNS_INDEX, &member).await.unwrap();
    assert!(indexed.is_some());
    let complete = registry.complete(&grant.lease, complete_body(&s, "r1")).await.unwrap();

    for gone in [keys::run(&s), keys::owner(&s), keys::pending(&s), keys::permission("rq-x")] {
        assert!(!conn.exists::<_, bool>(&gone).await.unwrap(), "{gone} is deleted at complete");
    }
    // Until the owner stored the complete in SQL, the sweeper's lead to it stays.
    assert!(!conn.sismember::<_, _, bool>(keys::user_runs(&user), &member).await.unwrap(), "not running any more");
    let saving: Option<u64> = conn.get(keys::saving(&s, "r1")).await.unwrap();
    assert_eq!(saving, Some(complete.seq));
    registry.history_saved(&grant.lease).await;
    assert!(!conn.exists::<_, bool>(keys::saving(&s, "r1")).await.unwrap());
    let events_ttl: i64 = conn.pttl(keys::events(&s)).await.unwrap();
    assert!(events_ttl > 0 && events_ttl <= 60_000, "the replay window expires after the retention: {events_ttl}");
    let seq_ttl: i64 = conn.pttl(keys::seq(&s)).await.unwrap();
    assert!(seq_ttl > 0, "the idle counter expires");
    let indexed: Option<f64> = conn.zscore(keys::RUNS_INDEX, &member).await.unwrap();
    assert!(indexed.is_none());
    assert!(!conn.sismember::<_, _, bool>(keys::user_runs(&user), &member).await.unwrap());

    // Many short runs: every key the session leaves behind has an expiry.
    for i in 0..200 {
        let run_id = format!("short-{i}");
        let grant = registry.start_run(start(&registry, &s, &run_id, &user)).await.unwrap();
        registry.append(&grant.lease, bodies(&s, &run_id, 1)).await.unwrap();
        registry.complete(&grant.lease, complete_body(&s, &run_id)).await.unwrap();
        registry.history_saved(&grant.lease).await;
    }
    let pattern = format!("cg:{{{s}}}:*");
    let mut keys_left: Vec<String> = Vec::new();
    let mut iter: redis::AsyncIter<String> = conn.scan_match(&pattern).await.unwrap();
    while let Some(key) = iter.next_item().await {
        keys_left.push(key.unwrap());
    }
    drop(iter);
    assert!(!keys_left.is_empty());
    for key in &keys_left {
        let ttl: i64 = conn.pttl(key).await.unwrap();
        // -2: it expired meanwhile; -1 would be a key without expiry.
        assert!(ttl > 0 || ttl == -2, "{key} has no expiry ({ttl})");
    }
    let stream_len: u64 = conn.xlen(keys::events(&s)).await.unwrap();
    assert!(stream_len <= 1000, "the stream is capped at max_events");
    assert!(registry.running_runs(&user).await.unwrap().is_empty());
    let user_index: u64 = conn.scard(keys::user_runs(&user)).await.unwrap();
    assert_eq!(user_index, 0);
}

/// An owner that appended its run's `complete` and died before storing it in SQL (the
/// history_saved call never came): a sweeper hands that event to the copier, once, and
/// clears the marker and the index entry. A run whose owner did confirm is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_its_owner_did_not_store_is_handed_to_the_copier() {
    let redis = PrivateRedis::start().expect("private redis-server");
    let url = redis.url();
    let lease = Duration::from_millis(600);
    let owner = node(&url, "unsaved-owner", lease).await;
    let sweeper = node(&url, "unsaved-sweeper", lease).await;
    let (mut a, mut b) = (owner.take_orphans().unwrap(), sweeper.take_orphans().unwrap());
    let mut conn = raw(&url).await;
    let (saved, unsaved) = (unique("saved"), unique("unsaved"));
    let mut unsaved_seq = 0;
    for s in [&saved, &unsaved] {
        let grant = owner.start_run(start(&owner, s, "r1", "u")).await.unwrap();
        owner.append(&grant.lease, bodies(s, "r1", 2)).await.unwrap();
        let complete = owner.complete(&grant.lease, complete_body(s, "r1")).await.unwrap();
        if s == &saved {
            owner.history_saved(&grant.lease).await;
        } else {
            unsaved_seq = complete.seq;
        }
    }
    let notice = tokio::time::timeout(WAIT, async {
        tokio::select! { n = a.recv() => n, n = b.recv() => n }
    })
    .await
    .expect("a sweeper hands the complete over")
    .unwrap();
    assert_eq!(notice.session_id, unsaved);
    assert_eq!((notice.run_id.as_str(), notice.complete_seq, notice.unsaved_complete), ("r1", unsaved_seq, true));
    let member = json!([unsaved, "r1"]).to_string();
    eventually("marker and index entry cleared", || {
        let mut conn = conn.clone();
        let member = member.clone();
        let key = keys::saving(&unsaved, "r1");
        async move {
            let indexed: Option<f64> = conn.zscore(keys::RUNS_INDEX, &member).await.unwrap();
            indexed.is_none() && !conn.exists::<_, bool>(&key).await.unwrap()
        }
    })
    .await;
    // Once only, and nothing for the run whose owner stored its complete.
    tokio::time::sleep(lease * 2).await;
    assert!(a.try_recv().is_err() && b.try_recv().is_err(), "a second notice");
    let left: u64 = conn.zcard(keys::RUNS_INDEX).await.unwrap();
    assert_eq!(left, 0);
}

// ---------------------------------------------------------------- cost

/// `calls` of one command in `INFO commandstats`.
async fn command_calls(conn: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(conn).await.unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// `total_connections_received` of `INFO stats`.
async fn connections_received(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO").arg("stats").query_async(conn).await.unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("total_connections_received:"))
        .map_or(0, |n| n.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_batch_costs_one_round_trip() {
    let redis = PrivateRedis::start().expect("private redis-server");
    let a = node(&redis.url(), "cost", Duration::from_secs(30)).await;
    let s = unique("s");
    let grant = a.start_run(start(&a, &s, "r1", "u")).await.unwrap();
    a.append(&grant.lease, bodies(&s, "r1", 1)).await.unwrap(); // warm: script loaded, connection kept
    let mut admin = raw(&redis.url()).await;
    let connections = connections_received(&mut admin).await;
    let (evalsha, ping, publish) = (
        command_calls(&mut admin, "evalsha").await,
        command_calls(&mut admin, "ping").await,
        command_calls(&mut admin, "publish").await,
    );
    for _ in 0..50 {
        a.append(&grant.lease, bodies(&s, "r1", 4)).await.unwrap();
    }
    assert_eq!(command_calls(&mut admin, "evalsha").await - evalsha, 50, "one script call per batch");
    assert_eq!(command_calls(&mut admin, "ping").await - ping, 0, "no connection check per call");
    assert_eq!(connections_received(&mut admin).await - connections, 0, "no new connection per call");
    // One PUBLISH per batch from the script; the probe adds at most a few.
    let published = command_calls(&mut admin, "publish").await - publish;
    assert!((50..=60).contains(&published), "{published} publishes");
}

// ------------------------------------------------ Redis coming back empty under live runs

fn now_ms() -> i64 {
    i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

/// A start on a session that had events (SQL's mark `floor`) and was active just now.
fn recent(registry: &RedisRegistry, session_id: &str, run_id: &str, floor: u64) -> RunStart {
    RunStart { seq_floor: floor, last_active_ms: now_ms(), ..start(registry, session_id, run_id, "u") }
}

/// Starts until granted (refused while Redis is younger than a lease); the grant and the wait.
async fn start_when_recovered(registry: &RedisRegistry, start: RunStart) -> (chatgate::runs::RunGrant, Duration) {
    let began = Instant::now();
    loop {
        match registry.start_run(start.clone()).await {
            Err(RegistryError::Recovering { retry_after }) => tokio::time::sleep(retry_after).await,
            Err(RegistryError::Unavailable(_) | RegistryError::Unconfirmed(_)) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            granted => return (granted.expect("granted"), began.elapsed()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_empty_restart_no_run_starts_until_the_live_owner_re_took_its_lock() {
    let mut redis = PrivateRedis::start().expect("private redis-server");
    let lease = Duration::from_secs(2);
    let (owner, other) = (node(&redis.url(), "owner", lease).await, node(&redis.url(), "other", lease).await);
    let s = unique("s");
    let grant = owner.start_run(recent(&owner, &s, "r1", 0)).await.unwrap();
    owner.append(&grant.lease, bodies(&s, "r1", 2)).await.unwrap();
    redis.kill();
    redis.restart().expect("private redis-server restarts"); // back, and empty: the session looks idle

    // A start elsewhere is refused (not granted beside the live run) until the owner is back.
    let refused = loop {
        match other.start_run(recent(&other, &s, "r2", 1)).await {
            Err(RegistryError::Unavailable(_) | RegistryError::Unconfirmed(_)) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            answer => break answer,
        }
    };
    let Err(RegistryError::Recovering { retry_after }) = refused else { panic!("{refused:?}") };
    assert!(retry_after <= lease + Duration::from_secs(1), "{retry_after:?}");
    // A reader waits too, rather than reading "idle".
    assert!(other.settle(&s, 1, now_ms()).await.unwrap() > Duration::ZERO);
    eventually("the owner re-takes its lock", || async { owner.renew(&grant.lease).await.is_ok() }).await;
    assert_eq!(other.settle(&s, 1, now_ms()).await.unwrap(), Duration::ZERO);
    assert!(other.snapshot(&s).await.unwrap().is_processing);
    assert_eq!(other.start_run(recent(&other, &s, "r2", 1)).await.err(), Some(RegistryError::RunInProgress));
    // The run goes on above everything it had, and ends once.
    let resumed = owner.append(&grant.lease, bodies(&s, "r1", 1)).await.unwrap();
    assert!(resumed[0].seq > 2 + 1000, "{}", resumed[0].seq);
    owner.complete(&grant.lease, complete_body(&s, "r1")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_empty_restart_a_dead_owners_session_takes_runs_once_redis_is_a_lease_old() {
    let mut redis = PrivateRedis::start().expect("private redis-server");
    let lease = Duration::from_secs(1);
    let (owner, other) = (node(&redis.url(), "dead", lease).await, node(&redis.url(), "next", lease).await);
    let s = unique("s");
    let grant = owner.start_run(recent(&owner, &s, "r1", 0)).await.unwrap();
    owner.append(&grant.lease, bodies(&s, "r1", 3)).await.unwrap();
    owner.abandon(&grant.lease).await; // the owner is gone: nobody will re-take
    redis.kill();
    redis.restart().expect("private redis-server restarts");
    let restarted = Instant::now();

    // Readers wait, then read the session idle, at what SQL knows (no seq is announced that no
    // event has).
    let mut waited_reading = Duration::ZERO;
    loop {
        match other.settle(&s, 3, now_ms()).await {
            Ok(wait) if wait.is_zero() => break,
            Ok(wait) => {
                waited_reading += wait;
                tokio::time::sleep(wait).await;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(waited_reading > Duration::ZERO);
    assert!(restarted.elapsed() >= lease, "{:?}", restarted.elapsed());
    let snapshot = other.snapshot(&s).await.unwrap();
    assert!(!snapshot.is_processing);
    assert_eq!(snapshot.last_seq, 0, "Redis knows nothing; the gateway adds SQL's mark");
    // From then on nothing waits, and a new run starts past everything known plus the margin.
    let (next, waited) = start_when_recovered(&other, recent(&other, &s, "r2", 3)).await;
    assert!(waited < Duration::from_millis(500), "{waited:?}");
    assert_eq!(next.first_seq, 3 + 1000 + 1);
    assert_eq!(owner.renew(&grant.lease).await, Err(RegistryError::Fenced));

    // Never waited on after a restart: a session without events, or one idle for a day.
    redis.kill();
    redis.restart().expect("private redis-server restarts");
    let fresh = unique("s");
    let (_, waited) = start_when_recovered(&other, recent(&other, &fresh, "r1", 0)).await;
    assert!(waited < lease, "{waited:?}");
    let idle = unique("s");
    let day_ago = now_ms() - 24 * 3600 * 1000;
    let idle_start = RunStart { seq_floor: 40, last_active_ms: day_ago, ..start(&other, &idle, "r1", "u") };
    let (grant, waited) = start_when_recovered(&other, idle_start).await;
    assert!(waited < lease, "{waited:?}");
    assert_eq!(grant.first_seq, 40 + 1000 + 1);
}

// ------------------------------------------------------------ idempotency keys

fn keyed(registry: &RedisRegistry, session_id: &str, run_id: &str, key: &str) -> RunStart {
    RunStart { request_key: Some(key.into()), ..start(registry, session_id, run_id, "u") }
}

fn already_started(run_id: &str, first_seq: u64, is_processing: bool) -> RegistryError {
    RegistryError::AlreadySent(PriorSend::Started { run_id: run_id.into(), first_seq, is_processing })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_resent_after_a_redis_restart_is_told_its_live_run() {
    let mut redis = PrivateRedis::start().expect("private redis-server");
    let lease = Duration::from_secs(10);
    let (a, b) = (node(&redis.url(), "a", lease).await, node(&redis.url(), "b", lease).await);
    let s = unique("s");
    let grant = a.start_run(keyed(&a, &s, "r1", "k")).await.unwrap();
    a.append(&grant.lease, bodies(&s, "r1", 3)).await.unwrap();
    redis.restart().expect("private redis-server restarts"); // back, and empty: the key's record is gone
    a.append(&grant.lease, bodies(&s, "r1", 1)).await.expect("the owner re-takes its lock");
    // The re-taken lock names the key: the resend is told its run, it does not start a second one.
    assert_eq!(b.start_run(keyed(&b, &s, "r2", "k")).await.err(), Some(already_started("r1", 1, true)));
    assert_eq!(
        a.prior_send(&s, "k").await.unwrap(),
        Some(PriorSend::Started { run_id: "r1".into(), first_seq: 1, is_processing: true })
    );
    // Another key is refused as busy, as ever.
    assert_eq!(b.start_run(keyed(&b, &s, "r3", "other")).await.err(), Some(RegistryError::RunInProgress));
    a.complete(&grant.lease, complete_body(&s, "r1")).await.unwrap();
}

/// A TCP proxy to Redis whose replies can be swallowed: the commands still reach
/// Redis and run, their answers never come back (a reply lost on the way).
struct ReplyEater {
    url: String,
    eat: Arc<AtomicBool>,
}

impl ReplyEater {
    async fn start(redis_port: u16) -> ReplyEater {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        let eat = Arc::new(AtomicBool::new(false));
        let eating = eat.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await else { continue };
                let ((mut client_rx, mut client_tx), (mut server_rx, mut server_tx)) =
                    (client.into_split(), server.into_split());
                tokio::spawn(async move { tokio::io::copy(&mut client_rx, &mut server_tx).await });
                let eating = eating.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = server_rx.read(&mut buf).await {
                        if n == 0 || (!eating.load(Ordering::SeqCst) && client_tx.write_all(&buf[..n]).await.is_err()) {
                            return;
                        }
                    }
                });
            }
        });
        ReplyEater { url, eat }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_reply_is_lost_is_reported_unknown_and_its_run_ends_as_an_orphan() {
    let redis = PrivateRedis::start().expect("private redis-server");
    let proxy = ReplyEater::start(redis.port()).await;
    let lease = Duration::from_secs(3);
    let (a, b) = (node(&proxy.url, "a", lease).await, node(&redis.url(), "b", lease).await);
    let s = unique("s");
    let mut feed = b.subscribe(&s, 0).await.unwrap();
    let warm = unique("s"); // Redis has the start script from then on (EVALSHA runs it at once).
    let grant = a.start_run(start(&a, &warm, "w", "u")).await.unwrap();
    a.complete(&grant.lease, complete_body(&warm, "w")).await.unwrap();
    // The start script runs in Redis; its reply, and the read-back's, are lost.
    proxy.eat.store(true, Ordering::SeqCst);
    let outcome = a.start_run(keyed(&a, &s, "r1", "k")).await;
    proxy.eat.store(false, Ordering::SeqCst);
    assert!(matches!(outcome, Err(RegistryError::Unconfirmed(_))), "no false 'nothing started': {outcome:?}");
    // The key names the run, which no node drives: it is indexed once Redis answers again and
    // ended like any orphan when its lease lapses, so the resend sees it end.
    // (Its lease may have lapsed already: the lost replies took longer than one.)
    let told = b.start_run(keyed(&b, &s, "r2", "k")).await.err();
    let named = matches!(&told, Some(RegistryError::AlreadySent(PriorSend::Started { run_id, first_seq: 1, .. })) if run_id == "r1");
    assert!(named, "{told:?}");
    let ended = tokio::time::timeout(lease * 5, next_event(&mut feed.live)).await.expect("the orphan is ended");
    assert_owner_lost(&ended, &s, "r1");
    assert_eq!(b.start_run(keyed(&b, &s, "r3", "k")).await.err(), Some(already_started("r1", 1, false)));
    let fresh = b.start_run(keyed(&b, &s, "r4", "a-new-key")).await.expect("a new key starts");
    b.complete(&fresh.lease, complete_body(&s, "r4")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_resent_after_a_redis_cluster_failover_is_told_its_run() {
    let mut cluster = tokio::task::spawn_blocking(|| PrivateRedisCluster::start(3, 1))
        .await
        .expect("the cluster's start")
        .expect("a private Redis Cluster");
    let target = RedisTarget::cluster(&cluster.seed_urls());
    let lease = Duration::from_secs(10);
    let a = RedisRegistry::connect(target.clone(), &unique("a"), options(lease)).await.expect("connect a");
    let b = RedisRegistry::connect(target, &unique("b"), options(lease)).await.expect("connect b");
    let s = unique("s");
    let grant = a.start_run(keyed(&a, &s, "r1", "k")).await.unwrap();
    a.append(&grant.lease, bodies(&s, "r1", 3)).await.unwrap();
    let victim = keys::run(&s);
    cluster.kill_primary_of(&victim).expect("a primary to kill");
    let slot = keys::slot(&victim);
    let (cluster, took) = tokio::task::spawn_blocking(move || {
        let took = cluster.wait_for_failover(slot);
        (cluster, took)
    })
    .await
    .unwrap();
    took.expect("the replica takes over");
    a.append(&grant.lease, bodies(&s, "r1", 1)).await.expect("the run goes on after the failover");
    // Whether the key's record reached the replica or not, the resend is told its run.
    assert_eq!(b.start_run(keyed(&b, &s, "r2", "k")).await.err(), Some(already_started("r1", 1, true)));
    a.complete(&grant.lease, complete_body(&s, "r1")).await.unwrap();
    assert_eq!(b.start_run(keyed(&b, &s, "r3", "k")).await.err(), Some(already_started("r1", 1, false)));
    drop(cluster);
}
