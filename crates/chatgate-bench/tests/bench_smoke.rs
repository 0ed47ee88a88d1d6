//! Correctness under load, not speed: small, fast runs of the load generator's
//! `fanout` and `storm` (`reconnect` with many clients dropping at once)
//! scenarios against three cluster nodes on the shared Redis and PostgreSQL,
//! `fanout` again on a private Redis Cluster, and `publish` (classic against
//! sharded pub/sub). Every socket's seq sequence must have no gap and no
//! duplicate, and every expected event must arrive. Figures are printed, never
//! asserted (but for what must hold: a per-shard breakdown covering every
//! session, every published message received).

use std::{path::PathBuf, process::Command};

use serde_json::Value;

/// The shared test Redis (`CHATGATE_TEST_REDIS_URL`, default the local one).
fn redis_url() -> String {
    std::env::var("CHATGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The shared test PostgreSQL (`CHATGATE_TEST_PG_URL`, default the local `test` database).
fn pg_url() -> String {
    std::env::var("CHATGATE_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The gateway binary beside this package's: `cargo test --workspace` builds both.
fn chatgate_bin() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_chatgate-bench")).with_file_name("chatgate");
    assert!(bin.is_file(), "no {} (build the gateway first: cargo build -p chatgate)", bin.display());
    bin
}

/// Runs `chatgate-bench --json <args>` and returns its `result` object.
fn bench(args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_chatgate-bench"))
        .arg("--json")
        .arg("--chatgate-bin")
        .arg(chatgate_bin())
        .args(["--redis-url", &redis_url(), "--database-url", &pg_url()])
        .args(args)
        .output()
        .expect("run chatgate-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "chatgate-bench {args:?} failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).expect("a JSON result line");
    let report: Value = serde_json::from_str(line).expect("JSON result");
    println!("{report:#}");
    report["result"].clone()
}

fn assert_clean(seq: &Value) {
    assert_eq!(seq["gaps"], 0, "gaps: {seq}");
    assert_eq!(seq["duplicates"], 0, "duplicates: {seq}");
    assert_eq!(seq["reorders"], 0, "reorders: {seq}");
}

#[test]
fn fanout_smoke_delivers_everything_once_in_order() {
    let result = bench(&["fanout", "--runs", "8", "--subscribers", "4", "--events", "300"]);
    assert_clean(&result["seq"]);
    assert_eq!(result["delivered_events"], result["expected_deliveries"], "{result}");
    assert_eq!(result["delivery_percent"], 100.0);
}

#[test]
fn storm_smoke_resumes_every_client_without_loss() {
    let result = bench(&["storm", "--clients", "300", "--sessions", "10", "--interval-ms", "20", "--run-ms", "6000"]);
    assert_clean(&result["seq"]);
    assert_eq!(result["delivery_percent"], 100.0, "{result}");
    assert_eq!(result["replay_truncated_acks"], 0, "{result}");
}

#[test]
fn fanout_smoke_on_a_redis_cluster_counts_every_shard() {
    let result = bench(&["--private-redis-cluster", "fanout", "--runs", "8", "--subscribers", "4", "--events", "300"]);
    assert_clean(&result["seq"]);
    assert_eq!(result["delivered_events"], result["expected_deliveries"], "{result}");
    assert_eq!(result["redis_servers"], 3, "{result}");
    let shards = result["redis_shards"].as_object().expect("a per-shard breakdown");
    assert_eq!(shards.len(), 3, "{result}");
    let sessions: u64 = shards.values().filter_map(|s| s["sessions"].as_u64()).sum();
    assert_eq!(sessions, 8, "every session on one shard: {result}");
}

#[test]
fn publish_smoke_delivers_every_message_classic_and_sharded() {
    let result = bench(&["publish", "--messages", "2000", "--channels", "30", "--repeat", "1", "--replicas", "0"]);
    for mode in ["classic_publish", "sharded_spublish"] {
        let runs = result["each"][mode].as_array().expect("one measurement per mode");
        assert!(runs.iter().all(|r| r["received"] == 2000), "{result}");
    }
}
