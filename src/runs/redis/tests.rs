//! Unit tests of the Redis registry internals, against the real Redis at `REDIS_URL`.

use ::redis::AsyncCommands;

use super::*;
use crate::{
    protocol::EventBody,
    runs::{RunOwnership, RunRouting, RunStart, SessionFeeds},
};

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn options() -> RedisRegistryOptions {
    RedisRegistryOptions {
        lease: Duration::from_secs(15),
        max_events: 100,
        retention: Duration::from_secs(60),
        idempotency_window: Duration::from_secs(60),
    }
}

fn start(session_id: &str, run_id: &str) -> RunStart {
    RunStart {
        session_id: session_id.into(),
        run_id: run_id.into(),
        provider: "script".into(),
        user_id: "u".into(),
        node_id: "unit".into(),
        seq_floor: 0,
        last_active_ms: 0,
        prompt: "hello".into(),
        request_key: None,
    }
}

#[tokio::test]
async fn a_retried_batch_is_appended_once() {
    let registry = RedisRegistry::connect(&redis_url(), "unit-retry", options()).await.unwrap();
    let session_id = format!("unit-{}", uuid::Uuid::new_v4().simple());
    let grant = registry.start_run(start(&session_id, "r1")).await.unwrap();
    let bodies = [r#"{"kind":"text","content":"a"}"#, r#"{"kind":"text","content":"b"}"#];
    let first = registry.append_batch_as("batch-1", &grant.lease, &bodies, false).await.unwrap();
    let retried = registry.append_batch_as("batch-1", &grant.lease, &bodies, false).await.unwrap();
    assert_eq!(first, retried);
    assert_eq!(first.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
    let next = registry.append_batch_as("batch-2", &grant.lease, &bodies[..1], false).await.unwrap();
    assert_eq!(next[0].seq, 3);
    // A retried complete is answered too, although the lock is gone by then.
    let done = registry.append_batch_as("batch-3", &grant.lease, &[r#"{"kind":"complete"}"#], true).await.unwrap();
    let again = registry.append_batch_as("batch-3", &grant.lease, &[r#"{"kind":"complete"}"#], true).await.unwrap();
    assert_eq!(done, again);
    assert_eq!(done[0].seq, 4);
    let all = registry.read_range(&session_id, 0, u64::MAX).await.unwrap();
    assert_eq!(all.events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert!(all.complete);
}

#[tokio::test]
async fn a_missing_counter_is_restored_above_everything_known() {
    let registry = RedisRegistry::connect(&redis_url(), "unit-restore", options()).await.unwrap();
    let session_id = format!("unit-{}", uuid::Uuid::new_v4().simple());
    let grant = registry.start_run(start(&session_id, "r1")).await.unwrap();
    registry.append(&grant.lease, vec![EventBody { kind: "text".into(), json: "{}".into() }; 3]).await.unwrap();
    registry.complete(&grant.lease, EventBody { kind: "complete".into(), json: "{}".into() }).await.unwrap();
    let mut conn = registry.node.conn().await.unwrap();
    let _: () = conn.del(keys::seq(&session_id)).await.unwrap();
    // The stream still holds seq 4: the counter comes back at 4 + margin.
    let grant = registry.start_run(start(&session_id, "r2")).await.unwrap();
    let events =
        registry.append(&grant.lease, vec![EventBody { kind: "text".into(), json: "{}".into() }]).await.unwrap();
    assert_eq!(events[0].seq, 4 + 100 + 1);
    registry.complete(&grant.lease, EventBody { kind: "complete".into(), json: "{}".into() }).await.unwrap();
    // Nothing left in Redis but the database's floor: floor + margin.
    let _: () = conn.del(&[keys::seq(&session_id), keys::events(&session_id)]).await.unwrap();
    let mut third = start(&session_id, "r3");
    third.seq_floor = 500;
    let grant = registry.start_run(third).await.unwrap();
    let events =
        registry.append(&grant.lease, vec![EventBody { kind: "text".into(), json: "{}".into() }]).await.unwrap();
    assert_eq!(events[0].seq, 500 + 100 + 1);
}

#[tokio::test]
async fn a_renewal_re_takes_a_lock_that_redis_lost_with_everything_else() {
    let registry = RedisRegistry::connect(&redis_url(), "unit-retake", options()).await.unwrap();
    let session_id = format!("unit-{}", uuid::Uuid::new_v4().simple());
    let grant = registry.start_run(start(&session_id, "r1")).await.unwrap();
    let text = || vec![EventBody { kind: "text".into(), json: "{}".into() }];
    assert_eq!(registry.append(&grant.lease, text()).await.unwrap()[0].seq, 1);
    let mut conn = registry.node.conn().await.unwrap();
    // What a Redis restart without persistence leaves of the session: nothing.
    let all = [keys::run(&session_id), keys::owner(&session_id), keys::seq(&session_id), keys::events(&session_id)];
    let _: () = conn.del(&all).await.unwrap();
    registry.renew(&grant.lease).await.expect("the owner re-takes its vanished lock");
    let snapshot = registry.snapshot(&session_id).await.unwrap();
    assert!(snapshot.is_processing);
    assert_eq!(snapshot.run_id.as_deref(), Some("r1"));
    // The counter came back above the owner's last seq plus the margin.
    assert_eq!(registry.append(&grant.lease, text()).await.unwrap()[0].seq, 1 + 100 + 1);
    // Only a lock that vanished with the counter is re-taken: a deleted lock alone fences.
    let _: () = conn.del(keys::run(&session_id)).await.unwrap();
    assert_eq!(registry.renew(&grant.lease).await, Err(RegistryError::Fenced));
    assert_eq!(registry.append(&grant.lease, text()).await.err(), Some(RegistryError::Fenced));
}

/// What a Redis restart without persistence leaves of a session: nothing.
async fn lose_session_state(registry: &RedisRegistry, session_id: &str) {
    let mut conn = registry.node.conn().await.unwrap();
    let all = [
        keys::run(session_id),
        keys::owner(session_id),
        keys::seq(session_id),
        keys::events(session_id),
        keys::pending(session_id),
        keys::prompt(session_id),
    ];
    let _: () = conn.del(&all).await.unwrap();
}

fn now_ms() -> i64 {
    i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

/// A start on a session that had events and was active just now.
fn recent_start(session_id: &str, run_id: &str, floor: u64) -> RunStart {
    RunStart { seq_floor: floor, last_active_ms: now_ms(), ..start(session_id, run_id) }
}

#[tokio::test]
async fn the_prompt_of_a_run_whose_owner_died_reaches_the_reaper() {
    let lease = Duration::from_millis(300);
    let opts = RedisRegistryOptions { lease, ..options() };
    let owner = RedisRegistry::connect(&redis_url(), "unit-prompt-owner", opts.clone()).await.unwrap();
    let reaper = RedisRegistry::connect(&redis_url(), "unit-prompt-reaper", opts).await.unwrap();
    // Either node's sweeper may end the run first: listen to both.
    let (mut mine, mut theirs) = (reaper.take_orphans().unwrap(), owner.take_orphans().unwrap());
    let session_id = format!("unit-{}", uuid::Uuid::new_v4().simple());
    let grant = owner.start_run(RunStart { prompt: "fix the build".into(), ..start(&session_id, "r1") }).await.unwrap();
    owner.abandon(&grant.lease).await;
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    reaper.reap_orphan(&session_id).await.unwrap();
    let orphan = loop {
        let notice = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::select! { n = mine.recv() => n, n = theirs.recv() => n }
        });
        let orphan = notice.await.unwrap().unwrap();
        if orphan.session_id == session_id {
            break orphan;
        }
    };
    assert_eq!((orphan.run_id.as_str(), orphan.first_seq, orphan.complete_seq), ("r1", 1, 1));
    assert_eq!(orphan.prompt.as_deref(), Some("fix the build"));
    // Nothing of the run is left behind.
    let mut conn = reaper.node.conn().await.unwrap();
    let left: bool = conn.exists(keys::prompt(&session_id)).await.unwrap();
    assert!(!left);
}

#[tokio::test]
async fn pending_approvals_are_recorded_again_when_the_owner_re_takes_its_lock() {
    let owner = RedisRegistry::connect(&redis_url(), "unit-approval-owner", options()).await.unwrap();
    let other = RedisRegistry::connect(&redis_url(), "unit-approval-other", options()).await.unwrap();
    let session_id = format!("unit-{}", uuid::Uuid::new_v4().simple());
    let request_id = format!("rq-{}", uuid::Uuid::new_v4().simple());
    let mut grant = owner.start_run(start(&session_id, "r1")).await.unwrap();
    let request = serde_json::json!({ "requestId": request_id, "toolName": "Bash" });
    owner.add_pending(&grant.lease, &request_id, request).await.unwrap();
    lose_session_state(&owner, &session_id).await;
    let mut conn = owner.node.conn().await.unwrap();
    let _: () = conn.del(keys::permission(&request_id)).await.unwrap();
    owner.renew(&grant.lease).await.unwrap();
    // Tabs see the approval again, and an answer from another node reaches the run.
    let snapshot = other.snapshot(&session_id).await.unwrap();
    assert_eq!(snapshot.pending_permissions.len(), 1, "{:?}", snapshot.pending_permissions);
    let answer =
        crate::protocol::PermissionAnswer { allow: true, updated_input: None, message: None, remember_entry: None };
    assert!(other.route_permission("u", &request_id, answer).await.unwrap());
    let control = tokio::time::timeout(Duration::from_secs(5), grant.control.recv()).await.unwrap().unwrap();
    assert!(
        matches!(control, crate::runs::Control::Permission { request_id: ref id, .. } if *id == request_id),
        "{control:?}"
    );
}

#[tokio::test]
async fn state_lost_long_after_redis_started_is_not_waited_on() {
    // The shared Redis has been up for longer than a lease: a loss now is no restart
    // (no owner can be waiting to re-take), so neither starts nor readers wait.
    let registry = RedisRegistry::connect(&redis_url(), "unit-late-loss", options()).await.unwrap();
    let session_id = format!("unit-{}", uuid::Uuid::new_v4().simple());
    let grant = registry.start_run(recent_start(&session_id, "r1", 0)).await.unwrap();
    registry.append(&grant.lease, vec![EventBody { kind: "text".into(), json: "{}".into() }]).await.unwrap();
    registry.abandon(&grant.lease).await;
    lose_session_state(&registry, &session_id).await;
    assert_eq!(registry.settle(&session_id, 1, now_ms()).await.unwrap(), Duration::ZERO);
    let next = registry.start_run(recent_start(&session_id, "r2", 1)).await.expect("starts at once");
    assert_eq!(next.first_seq, 1 + 100 + 1);
}
