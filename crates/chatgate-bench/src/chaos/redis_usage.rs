//! Redis's usage by the soak, against its baseline before the load: the gateway's keys by
//! kind (`SCAN`, classed by the names of `chatgate::runs::redis::keys`) and memory, summed
//! over every server that holds keys — the one Redis, or each live primary of a Redis
//! Cluster. After the load and the retention only the lasting keys may be left and memory
//! must be back near the baseline.

use std::{collections::BTreeMap, time::Duration};

use serde_json::{Value, json};
use tokio::time::Instant;

use chatgate::runs::redis::keys;

use super::{Ctx, ledger, soak_redis::SoakRedis};
use crate::redis_shards;

/// Redis's keys by kind, and memory.
#[derive(Debug, Default, Clone)]
pub struct RedisUsage {
    pub keys: BTreeMap<&'static str, u64>,
    /// The first few keys of kinds that do not last (by name, with the port that holds them).
    pub examples: Vec<String>,
    /// `used_memory`: everything Redis allocated, less replication buffers.
    pub used: u64,
    /// `used_memory_dataset`: the keys' share of it.
    pub dataset: u64,
    /// The servers summed.
    pub servers: u64,
}

/// Redis's keys by kind, and memory, summed over the servers on `ports`.
pub async fn redis_usage(ports: &[u16]) -> anyhow::Result<RedisUsage> {
    let mut usage = RedisUsage { servers: ports.len() as u64, ..RedisUsage::default() };
    for &port in ports {
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) =
                redis_shards::query(port, redis::cmd("SCAN").arg(cursor).arg("COUNT").arg(1000)).await?;
            for key in batch {
                let class = key_class(&key);
                *usage.keys.entry(class).or_default() += 1;
                if !LASTING.contains(&class) && usage.examples.len() < EXAMPLES {
                    usage.examples.push(format!("{key} on {port}"));
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let memory = redis_shards::info_numbers(port, "memory").await?;
        let field = |name: &str| memory.get(name).copied().unwrap_or(0);
        // A primary's replication backlog and its replicas' output buffers fill up with the
        // write traffic and stay (the backlog up to its 1 MiB); they are not the gateway's keys.
        let replication = field("mem_replication_backlog") + field("mem_clients_slaves");
        usage.used += field("used_memory").saturating_sub(replication);
        usage.dataset += field("used_memory_dataset");
    }
    Ok(usage)
}

/// The kind of a gateway key, by the names of `chatgate::runs::redis::keys`
/// (built for a probe session and user, so a renamed key is classed here too).
fn key_class(key: &str) -> &'static str {
    const S: &str = "\u{1}";
    if key == keys::RUNS_INDEX {
        return "runs_index";
    }
    if key == keys::SWEEP_LOCK {
        return "sweep_lock";
    }
    let by_shape: [(String, &'static str); 12] = [
        // First: a client's key is free text after `:req:` and could end like another kind.
        (keys::request(S, S), "request"),
        (keys::permission(S), "permission"),
        (keys::user_runs(S), "user_runs"),
        (keys::user_sends(S), "user_sends"),
        (keys::seq(S), "session_seq"),
        (keys::events(S), "events"),
        (keys::run(S), "run_lock"),
        (keys::owner(S), "owner"),
        (keys::pending(S), "pending"),
        (keys::prompt(S), "prompt"),
        (keys::batch(S, S), "batch"),
        (keys::saving(S, S), "saving"),
    ];
    let matches = |pattern: &str| {
        let parts: Vec<&str> = pattern.split(S).collect();
        key.starts_with(parts[0]) && key.ends_with(parts[parts.len() - 1]) && parts.iter().all(|p| key.contains(p))
    };
    by_shape.iter().find(|(pattern, _)| matches(pattern)).map_or("other", |(_, class)| class)
}

/// Key kinds that stay by design: a finished session's seq counter (a day), what became
/// of each idempotency key (`--idempotency-window`, an hour by default; each must expire),
/// and the sweeper's short lock.
const LASTING: &[&str] = &["session_seq", "request", "sweep_lock"];
/// The nodes' `--idempotency-window` (the default): no request record may outlive it.
const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(3600);
/// Bytes per lasting idempotency record allowed above the baseline (its name holds two UUIDs).
const BYTES_PER_REQUEST_KEY: u64 = 384;
/// Names of leftover keys kept for the report.
const EXAMPLES: usize = 5;
/// Bytes per lasting seq counter allowed above the baseline.
const BYTES_PER_SEQ_KEY: u64 = 256;
/// Allowance per server above the baseline for what Redis keeps after a burst of keys is gone (its
/// allocator's and tables' high-water, a few hundred KiB that do not grow with more bursts),
/// scripts and client buffers.
const MEMORY_SLACK: u64 = 1 << 20;

/// After the load and the retention: only lasting keys left, memory near the baseline.
pub async fn redis_after_retention(ctx: &Ctx, redis: &SoakRedis, baseline: &RedisUsage) -> Value {
    let deadline = Instant::now() + ctx.settings.retention + Duration::from_secs(60);
    let started = Instant::now();
    let mut last = RedisUsage::default();
    while Instant::now() < deadline {
        let usage = match redis.key_holders().await {
            Ok(ports) => redis_usage(&ports).await,
            Err(e) => Err(e),
        };
        match usage {
            Ok(usage) => {
                let leftover: u64 = usage.keys.iter().filter(|(k, _)| !LASTING.contains(k)).map(|(_, n)| n).sum();
                last = usage;
                if leftover == 0 {
                    break;
                }
            }
            Err(e) => ctx.add(&format!("redis_usage_errors: {e}"), 1),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let waited = started.elapsed();
    let leftover: BTreeMap<&str, u64> =
        last.keys.iter().filter(|(k, _)| !LASTING.contains(k)).map(|(k, n)| (*k, *n)).collect();
    let seq_keys = last.keys.get("session_seq").copied().unwrap_or(0);
    let request_keys = last.keys.get("request").copied().unwrap_or(0);
    let allowed_used = baseline.used
        + seq_keys * BYTES_PER_SEQ_KEY
        + request_keys * BYTES_PER_REQUEST_KEY
        + MEMORY_SLACK * last.servers.max(1);
    // Every idempotency record expires within the window, and there are no more of them than
    // keys the drivers made (a prompt's first key, and one per renewal).
    let keys_made = {
        let totals = &ctx.book().tally.totals;
        totals.get("runs_sent").copied().unwrap_or(0) + totals.get("keys_renewed").copied().unwrap_or(0)
    };
    if request_keys > keys_made {
        ctx.fail(
            ledger::REDIS_MEMORY,
            format!("{request_keys} idempotency records after the load, the drivers made {keys_made} keys"),
        );
    }
    let unexpiring = match redis.key_holders().await {
        Ok(ports) => requests_outliving_the_window(&ports).await,
        Err(e) => Err(e),
    };
    match &unexpiring {
        Ok((count, examples)) if *count > 0 => ctx.fail(
            ledger::REDIS_MEMORY,
            format!("{count} idempotency records without an expiry within {IDEMPOTENCY_WINDOW:?}: {examples:?}"),
        ),
        Ok(_) => {}
        Err(e) => ctx.add(&format!("redis_usage_errors: {e}"), 1),
    }
    if !leftover.is_empty() {
        ctx.fail(
            ledger::REDIS_MEMORY,
            format!("keys left after retention: {leftover:?} ({})", last.examples.join(", ")),
        );
    }
    if last.used > allowed_used {
        ctx.fail(
            ledger::REDIS_MEMORY,
            format!(
                "used_memory {} B after retention, baseline {} B, allowed {allowed_used} B ({seq_keys} seq counters)",
                last.used, baseline.used
            ),
        );
    }
    json!({
        "baseline_used_memory_bytes": baseline.used, "after_used_memory_bytes": last.used,
        "allowed_used_memory_bytes": allowed_used,
        "baseline_dataset_bytes": baseline.dataset, "after_dataset_bytes": last.dataset,
        "keys_after": last.keys, "seconds_until_only_lasting_keys": waited.as_secs(),
        "servers_summed": last.servers, "leftover_key_examples": last.examples,
        "idempotency_records_after": request_keys,
    })
}

/// Idempotency records (`cg:{S}:req:<key>`) with no expiry or one beyond the window, on the
/// servers on `ports`: how many, and a few examples with their `PTTL`.
async fn requests_outliving_the_window(ports: &[u16]) -> anyhow::Result<(u64, Vec<String>)> {
    let pattern = keys::request("*", "*");
    let window_ms = IDEMPOTENCY_WINDOW.as_millis() as i64;
    let mut count = 0;
    let mut examples = Vec::new();
    for &port in ports {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            if !batch.is_empty() {
                let mut pipe = redis::pipe();
                for key in &batch {
                    pipe.cmd("PTTL").arg(key);
                }
                let ttls: Vec<i64> = pipe.query_async(&mut conn).await?;
                for (key, ttl) in batch.iter().zip(ttls) {
                    // -2: gone since the SCAN; -1: no expiry.
                    if ttl == -1 || ttl > window_ms {
                        count += 1;
                        if examples.len() < EXAMPLES {
                            examples.push(format!("{key} on {port}: PTTL {ttl}"));
                        }
                    }
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok((count, examples))
}

#[cfg(test)]
mod key_class_tests {
    use super::*;

    #[test]
    fn gateway_keys_are_classed_by_the_keys_module() {
        let classes = [
            (keys::RUNS_INDEX.to_string(), "runs_index"),
            (keys::SWEEP_LOCK.to_string(), "sweep_lock"),
            (keys::seq("a.b-1"), "session_seq"),
            (keys::events("s"), "events"),
            (keys::run("s"), "run_lock"),
            (keys::owner("s"), "owner"),
            (keys::pending("s"), "pending"),
            (keys::prompt("s"), "prompt"),
            (keys::batch("s", "0f3a"), "batch"),
            (keys::saving("s", "r-1"), "saving"),
            (keys::permission("rq-1"), "permission"),
            (keys::user_runs("42"), "user_runs"),
            (keys::user_sends("42"), "user_sends"),
            (keys::request("s", "8767c364-2047-4467-85a2-043cf03ca025"), "request"),
            (keys::request("s", "ends:prompt"), "request"),
            ("cg:something-else".to_string(), "other"),
        ];
        for (key, class) in classes {
            assert_eq!(key_class(&key), class, "{key}");
        }
    }
}
