//! A Redis Cluster as the bench reads it, asynchronously and without the test kit's
//! handle (which the chaos soak's fault injector holds while it kills and migrates): the
//! live primaries from `CLUSTER NODES` of the first seed that answers, and `INFO` of each,
//! for the soak's Redis usage checks and samples (summed over the primaries); one query with
//! a bound on its time, also for the publish comparison's `CLUSTER INFO`.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, bail};

/// How long one query to one cluster node may take.
const QUERY_WAIT: Duration = Duration::from_secs(5);

/// `cmd` on the server on `port` over a fresh connection, bounded by [`QUERY_WAIT`].
pub async fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> anyhow::Result<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let reply = tokio::time::timeout(QUERY_WAIT, async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        cmd.query_async::<T>(&mut conn).await
    })
    .await
    .with_context(|| format!("redis-server {port}: no reply within {QUERY_WAIT:?}"))?;
    Ok(reply?)
}

/// The ports of the live primaries serving slots, as the first seed that answers sees them.
pub async fn primaries(seeds: &[u16]) -> anyhow::Result<Vec<u16>> {
    let mut last_error = None;
    for &port in seeds {
        match query::<String>(port, redis::cmd("CLUSTER").arg("NODES")).await {
            Ok(text) => {
                let mut ports: Vec<u16> = text.lines().filter_map(parse_primary).collect();
                ports.sort_unstable();
                return Ok(ports);
            }
            Err(e) => last_error = Some(e),
        }
    }
    match last_error {
        Some(e) => Err(e.context("no seed of the Redis Cluster answered CLUSTER NODES")),
        None => bail!("no seed ports given"),
    }
}

/// The port of one line of `CLUSTER NODES` if it is a primary that is not failing and serves
/// slots: `<id> <ip:port@bus> <flags> <primary> <ping> <pong> <epoch> <link> <slot>...`.
fn parse_primary(line: &str) -> Option<u16> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let port: u16 = fields.get(1)?.split(['@', ',']).next()?.rsplit(':').next()?.parse().ok()?;
    let flags: Vec<&str> = fields.get(2)?.split(',').collect();
    if !flags.contains(&"master") || flags.iter().any(|f| *f == "fail" || *f == "fail?") {
        return None;
    }
    // Slots: `a-b`, `a`; migration marks `[a->-id]` do not count.
    let serves = fields.iter().skip(8).any(|s| !s.starts_with('['));
    serves.then_some(port)
}

/// `INFO <section>` of the server on `port` as `field → value` (numbers only).
pub async fn info_numbers(port: u16, section: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let info: String = query(port, redis::cmd("INFO").arg(section)).await?;
    Ok(info
        .lines()
        .filter_map(|line| {
            let (name, value) = line.trim_end().split_once(':')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lines_give_live_primaries_serving_slots() {
        let live = "a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460 [5461->-b2]";
        assert_eq!(parse_primary(live), Some(7000));
        let single = "a1 127.0.0.1:7001@17001 master - 0 0 1 connected 7";
        assert_eq!(parse_primary(single), Some(7001));
        assert!(parse_primary("f6 127.0.0.1:7005@17005 master - 0 0 1 connected [5->-b2]").is_none());
        assert!(parse_primary("c3 127.0.0.1:7002@17002 slave a1 0 0 1 connected").is_none());
        assert!(parse_primary("d4 127.0.0.1:7003@17003 master,fail - 0 0 1 disconnected 0-10").is_none());
        assert!(parse_primary("e5 127.0.0.1:7004@17004 master - 0 0 1 connected").is_none());
    }
}
