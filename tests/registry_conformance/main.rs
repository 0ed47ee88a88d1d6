//! Conformance suite of the run registry (docs/cluster.md §The seam).
//!
//! Every case is written once against `RunRegistry` and instantiated for each
//! implementation by `conformance!`: `memory` (in process), `redis` (real
//! Redis at `REDIS_URL`, default 127.0.0.1:6379, unique keys per test) and
//! `redis_cluster` (a real 3-primary Redis Cluster the test process starts
//! once, `PrivateRedisCluster::shared`, with `--redis-mode cluster`),
//! `redis_sentinel` (a primary, a replica and 3 sentinels, `--redis-mode
//! sentinel`), `redis_tls` (a TLS-only Redis requiring a client
//! certificate signed by a CA made at test time, and an ACL user) and
//! `redis_cluster_tls` and `redis_sentinel_tls` (the same, every process
//! TLS-only, `rediss://` URLs and the test CA). A case
//! gets two registries, "node a" and "node b", sharing one backend; for the
//! in-process registry both are the same instance.
//!
//! Cases are grouped by the concern trait they hold to, one file each:
//! [`ownership`] (`RunOwnership`), [`feeds`] (`SessionFeeds`), [`routing`]
//! (`RunRouting`), [`notices`] (`UserNotices`), [`limiter`] (`SendLimiter`)
//! and [`registry`] (`RunRegistry::ready`); a test is named
//! `<backend>::<group>::<case>`, e.g. `redis::feeds::read_range_reports_completeness`.

mod feeds;
mod limiter;
mod notices;
mod ownership;
mod registry;
mod routing;

use std::{collections::BTreeSet, future::Future, pin::Pin, sync::Arc, time::Duration};

use chatgate::{
    protocol::{EventBody, Frame, PermissionAnswer},
    runs::{
        Control, Event, FeedItem, LiveFeed, PriorSend, RegistryError, RunGrant, RunStart, SharedRegistry,
        memory::MemoryRegistry,
        redis::{RedisRegistry, RedisRegistryOptions, RedisTarget, RedisTls},
    },
};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};

/// Two registries over one backend.
struct Nodes {
    a: SharedRegistry,
    b: SharedRegistry,
    node_a: String,
    node_b: String,
}

#[derive(Clone, Copy)]
struct Opts {
    max_events: u64,
    idempotency_window: Duration,
}

impl Default for Opts {
    fn default() -> Self {
        Opts { max_events: 10_000, idempotency_window: Duration::from_secs(300) }
    }
}

type Factory = fn(Opts) -> Pin<Box<dyn Future<Output = Nodes> + Send>>;

fn memory_nodes(opts: Opts) -> Pin<Box<dyn Future<Output = Nodes> + Send>> {
    Box::pin(async move {
        let registry: SharedRegistry =
            Arc::new(MemoryRegistry::new(opts.max_events, Duration::from_secs(300), opts.idempotency_window));
        Nodes { a: registry.clone(), b: registry, node_a: "mem-node".into(), node_b: "mem-node".into() }
    })
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn redis_nodes(opts: Opts) -> Pin<Box<dyn Future<Output = Nodes> + Send>> {
    Box::pin(redis_target_nodes(RedisTarget::standalone(&redis_url()), opts))
}

fn redis_cluster_nodes(opts: Opts) -> Pin<Box<dyn Future<Output = Nodes> + Send>> {
    Box::pin(async move {
        let cluster = shared_server(chatgate_testkit::redis_cluster::PrivateRedisCluster::shared).await;
        redis_target_nodes(RedisTarget::cluster(&cluster.seed_urls()), opts).await
    })
}

fn redis_cluster_tls_nodes(opts: Opts) -> Pin<Box<dyn Future<Output = Nodes> + Send>> {
    Box::pin(async move {
        let cluster = shared_server(chatgate_testkit::redis_cluster::PrivateRedisCluster::shared_tls).await;
        let ca = cluster.certs().map(|certs| certs.ca_pem.clone());
        let target = RedisTarget::cluster(&cluster.seed_urls()).with_tls(RedisTls { ca, client: None });
        redis_target_nodes(target, opts).await
    })
}

fn redis_sentinel_nodes(opts: Opts) -> Pin<Box<dyn Future<Output = Nodes> + Send>> {
    Box::pin(async move {
        let setup = shared_server(chatgate_testkit::redis_sentinel::PrivateRedisSentinel::shared).await;
        redis_target_nodes(RedisTarget::sentinel(&setup.sentinel_urls(), setup.master_name()), opts).await
    })
}

fn redis_sentinel_tls_nodes(opts: Opts) -> Pin<Box<dyn Future<Output = Nodes> + Send>> {
    Box::pin(async move {
        let setup = shared_server(chatgate_testkit::redis_sentinel::PrivateRedisSentinel::shared_tls).await;
        let ca = setup.certs().map(|certs| certs.ca_pem.clone());
        let target =
            RedisTarget::sentinel(&setup.sentinel_urls(), setup.master_name()).with_tls(RedisTls { ca, client: None });
        redis_target_nodes(target, opts).await
    })
}

fn redis_tls_nodes(opts: Opts) -> Pin<Box<dyn Future<Output = Nodes> + Send>> {
    Box::pin(async move {
        let redis = shared_server(chatgate_testkit::redis_tls::PrivateRedisTls::shared).await;
        let certs = redis.certs();
        let tls = RedisTls {
            ca: Some(certs.ca_pem.clone()),
            client: Some((certs.client_cert_pem.clone(), certs.client_key_pem.clone())),
        };
        redis_target_nodes(RedisTarget::standalone(&redis.url_with_auth()).with_tls(tls), opts).await
    })
}

/// A process-wide private server of the kit, started (once) off the async runtime.
async fn shared_server<T: Sync>(start: fn() -> anyhow::Result<&'static T>) -> &'static T {
    tokio::task::spawn_blocking(start).await.expect("the server's start").expect("a private Redis")
}

async fn redis_target_nodes(target: RedisTarget, opts: Opts) -> Nodes {
    let options = RedisRegistryOptions {
        lease: Duration::from_secs(15),
        max_events: opts.max_events,
        retention: Duration::from_secs(300),
        idempotency_window: opts.idempotency_window,
    };
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let node_a = format!("conf-a-{tag}");
    let node_b = format!("conf-b-{tag}");
    let a = RedisRegistry::connect(target.clone(), &node_a, options.clone()).await.expect("connect node a");
    let b = RedisRegistry::connect(target, &node_b, options).await.expect("connect node b");
    Nodes { a: Arc::new(a), b: Arc::new(b), node_a, node_b }
}

macro_rules! conformance {
    ($backend:ident, $factory:ident) => {
        mod $backend {
            conformance!(@group $factory; ownership:
                start_run_is_exclusive,
                seq_is_per_session_and_strictly_increasing,
                seq_continues_from_the_floor_and_never_goes_back,
                writes_are_fenced_and_complete_happens_once,
                pending_permissions_follow_the_run,
                a_request_key_starts_at_most_one_run,
                request_keys_race_to_one_run_across_nodes,
                request_keys_are_forgotten_after_the_window,
            );
            conformance!(@group $factory; feeds:
                subscribe_replays_the_current_run_after_the_cursor_then_goes_live,
                subscribing_during_appends_is_gapless_and_duplicate_free,
                idle_subscribe_gets_no_replay_then_later_runs,
                replay_is_truncated_when_the_window_lost_events,
                long_replays_are_whole_in_order_and_told_when_trimmed,
                long_ranges_are_whole_in_order_and_told_when_trimmed,
                ranges_of_thousands_are_whole_in_order_and_told_when_trimmed,
                read_range_reports_completeness,
            );
            conformance!(@group $factory; routing:
                permission_answers_reach_the_owner_only_for_its_user,
                aborts_reach_the_owner_only_for_its_user,
                running_runs_lists_the_users_runs_on_every_node,
            );
            conformance!(@group $factory; notices:
                user_notices_reach_only_that_user,
            );
            conformance!(@group $factory; limiter:
                sends_are_counted_per_user_across_nodes,
            );
            conformance!(@group $factory; registry:
                registries_are_ready,
            );
        }
    };
    (@group $factory:ident; $group:ident: $($case:ident),* $(,)?) => {
        mod $group {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    crate::$group::$case(crate::$factory).await
                }
            )*
        }
    };
}

conformance!(memory, memory_nodes);
conformance!(redis, redis_nodes);
conformance!(redis_cluster, redis_cluster_nodes);
conformance!(redis_sentinel, redis_sentinel_nodes);
conformance!(redis_tls, redis_tls_nodes);
conformance!(redis_cluster_tls, redis_cluster_tls_nodes);
conformance!(redis_sentinel_tls, redis_sentinel_tls_nodes);

// ---------------------------------------------------------------- helpers

const WAIT: Duration = Duration::from_secs(5);

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn start(session_id: &str, run_id: &str, user_id: &str, node_id: &str, seq_floor: u64) -> RunStart {
    RunStart {
        session_id: session_id.into(),
        run_id: run_id.into(),
        provider: "script".into(),
        user_id: user_id.into(),
        node_id: node_id.into(),
        seq_floor,
        last_active_ms: 0,
        prompt: "hello".into(),
        request_key: None,
    }
}

fn keyed(session_id: &str, run_id: &str, node_id: &str, key: &str) -> RunStart {
    RunStart { request_key: Some(key.into()), ..start(session_id, run_id, "u", node_id, 0) }
}

fn body(session_id: &str, run_id: &str, content: &str) -> EventBody {
    EventBody::from_object(
        "text",
        &json!({
            "id": uuid::Uuid::new_v4().to_string(),
            "kind": "text",
            "sessionId": session_id,
            "provider": "script",
            "timestamp": "2024-01-01T00:00:00.000Z",
            "runId": run_id,
            "content": content,
        }),
    )
}

fn complete_body(session_id: &str, run_id: &str) -> EventBody {
    EventBody::from_object(
        "complete",
        &json!({
            "id": uuid::Uuid::new_v4().to_string(),
            "kind": "complete",
            "sessionId": session_id,
            "provider": "script",
            "timestamp": "2024-01-01T00:00:00.000Z",
            "runId": run_id,
            "exitCode": 0,
            "success": true,
            "aborted": false,
        }),
    )
}

fn bodies(session_id: &str, run_id: &str, n: usize) -> Vec<EventBody> {
    (0..n).map(|i| body(session_id, run_id, &format!("event {i}"))).collect()
}

fn frame_json(event: &Event) -> Value {
    serde_json::from_str(&event.frame).expect("event frame is JSON")
}

fn seqs(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

fn answer(allow: bool) -> PermissionAnswer {
    PermissionAnswer { allow, updated_input: None, message: Some("ok".into()), remember_entry: None }
}

async fn next_event(feed: &mut LiveFeed) -> Event {
    match tokio::time::timeout(WAIT, feed.next()).await.expect("a live event within 5 s") {
        Some(FeedItem::Event(event)) => event,
        other => panic!("expected an event, got {other:?}"),
    }
}

async fn assert_quiet(feed: &mut LiveFeed) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(200), feed.next()).await {
        panic!("expected no live event, got {item:?}");
    }
}

async fn assert_no_control(grant: &mut RunGrant) {
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(grant.control.try_recv().is_err(), "no control message expected");
}

async fn recv_control(grant: &mut RunGrant) -> Control {
    tokio::time::timeout(WAIT, grant.control.recv()).await.expect("control within 5 s").expect("control channel open")
}

/// Runs a whole run with `n` events on `registry`; returns its events.
async fn whole_run(registry: &SharedRegistry, session_id: &str, user: &str, node: &str, n: usize) -> Vec<Event> {
    let run_id = unique("run");
    let grant = registry.start_run(start(session_id, &run_id, user, node, 0)).await.expect("start");
    let mut events = registry.append(&grant.lease, bodies(session_id, &run_id, n)).await.expect("append");
    events.push(registry.complete(&grant.lease, complete_body(session_id, &run_id)).await.expect("complete"));
    events
}
