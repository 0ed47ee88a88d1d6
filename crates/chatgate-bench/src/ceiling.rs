//! `ceiling`: this machine's Redis limits, measured with `redis-benchmark`
//! against the Redis the scenario uses (XADD and PUBLISH, one at a time and
//! pipelined), so that the gateway's figures can be read as ratios to them.
//! Writes one key of its own (`cg-bench:<random>`, deleted afterwards).

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::process::Command;

use crate::stats::round;

/// Requests per redis-benchmark measurement.
const REQUESTS: u32 = 200_000;
/// Commands per pipeline in the pipelined measurements.
const PIPELINE: u32 = 16;

pub async fn measure(redis_url: &str) -> anyhow::Result<Value> {
    let (host, port) = host_port(redis_url)?;
    let key = format!("cg-bench:{}", uuid::Uuid::new_v4().simple());
    let payload = ".".repeat(300);
    let xadd = ["XADD", &key, "MAXLEN", "~", "10000", "*", "b", &payload];
    let publish = ["PUBLISH", &key, &payload];
    let mut out = serde_json::Map::new();
    for (name, args, pipeline) in [
        ("xadd_per_sec_one_at_a_time", &xadd[..], 1),
        ("xadd_per_sec_pipelined", &xadd[..], PIPELINE),
        ("publish_per_sec_one_at_a_time", &publish[..], 1),
        ("publish_per_sec_pipelined", &publish[..], PIPELINE),
    ] {
        out.insert(name.into(), json!(round(benchmark(&host, port, args, pipeline).await?, 0)));
    }
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let _: i64 = redis::cmd("DEL").arg(&key).query_async(&mut conn).await?;
    out.insert("payload_bytes".into(), json!(payload.len()));
    out.insert("clients".into(), json!(50));
    out.insert("pipeline".into(), json!(PIPELINE));
    Ok(Value::Object(out))
}

async fn benchmark(host: &str, port: u16, command: &[&str], pipeline: u32) -> anyhow::Result<f64> {
    let output = Command::new("redis-benchmark")
        .args(["-h", host, "-p", &port.to_string(), "-c", "50", "-q"])
        .args(["-n", &REQUESTS.to_string(), "-P", &pipeline.to_string()])
        .args(command)
        .output()
        .await
        .context("running redis-benchmark")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let line =
        text.rsplit('\r').find(|l| l.contains("requests per second")).context("no result from redis-benchmark")?;
    let number = line.split(" requests per second").next().and_then(|l| l.rsplit(' ').next());
    match number.and_then(|n| n.parse::<f64>().ok()) {
        Some(rate) => Ok(rate),
        None => bail!("cannot read redis-benchmark's output: {line}"),
    }
}

fn host_port(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url.strip_prefix("redis://").context("a redis:// URL")?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    match authority.rsplit_once(':') {
        Some((host, port)) => Ok((host.to_string(), port.parse()?)),
        None => Ok((authority.to_string(), 6379)),
    }
}
