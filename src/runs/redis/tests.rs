//! Unit tests of the Redis registry internals, against the real Redis at `REDIS_URL`.

use ::redis::AsyncCommands;

use super::*;

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn options() -> RedisRegistryOptions {
    RedisRegistryOptions { lease: Duration::from_secs(15), max_events: 100, retention: Duration::from_secs(60) }
}

fn start(session_id: &str, run_id: &str) -> RunStart {
    RunStart {
        session_id: session_id.into(),
        run_id: run_id.into(),
        provider: "script".into(),
        user_id: "u".into(),
        node_id: "unit".into(),
        seq_floor: 0,
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
