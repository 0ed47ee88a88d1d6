//! The Redis a scenario's cluster nodes use: the shared one (`--redis-url`), a private
//! `redis-server` (`--private-redis`), or a private Redis Cluster (`--private-redis-cluster`:
//! 3 primaries with `--cluster-replicas` replicas each, the nodes in `--redis-mode cluster`
//! with every server as a seed). What is read from it around a measurement: each server's
//! CPU time (every process of a cluster, primaries and replicas), `INFO commandstats` summed
//! over the servers, and for a cluster the per-shard breakdown: each primary's CPU (with its
//! replicas') beside the share of the scenario's sessions whose slot it serves.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, bail};
use chatgate::runs::redis::keys;
use chatgate_testkit::{
    redis::PrivateRedis,
    redis_cluster::{PrivateRedisCluster, Role},
};
use serde_json::{Value, json};

use crate::{cluster::ClusterArgs, stats::round};

/// Primaries of the private cluster.
pub const CLUSTER_PRIMARIES: u16 = 3;

/// One Redis server on this machine.
#[derive(Debug, Clone, Copy)]
pub struct Server {
    pub port: u16,
    pub pid: u32,
}

/// The Redis of one scenario.
pub struct BenchRedis {
    /// The nodes' `--redis-url` (a comma list of seeds for a cluster).
    pub url: String,
    /// The servers whose CPU is counted (none when the shared Redis runs elsewhere).
    pub servers: Vec<Server>,
    private: Option<PrivateRedis>,
    cluster: Option<PrivateRedisCluster>,
}

impl BenchRedis {
    pub async fn start(args: &ClusterArgs) -> anyhow::Result<BenchRedis> {
        if args.private_redis_cluster {
            let replicas = args.cluster_replicas;
            let cluster =
                tokio::task::spawn_blocking(move || PrivateRedisCluster::start(CLUSTER_PRIMARIES, replicas)).await??;
            let servers = tokio::task::block_in_place(|| cluster.nodes())?
                .iter()
                .filter_map(|n| Some(Server { port: n.port, pid: n.pid? }))
                .collect();
            let url = cluster.seed_urls().join(",");
            return Ok(BenchRedis { url, servers, private: None, cluster: Some(cluster) });
        }
        if args.private_redis {
            let private = PrivateRedis::start()?;
            let servers = private.pid().map(|pid| Server { port: private.port(), pid }).into_iter().collect();
            return Ok(BenchRedis { url: private.url(), servers, private: Some(private), cluster: None });
        }
        let url = args.redis_url.clone();
        let servers = shared_server(&url).await.ok().into_iter().collect();
        Ok(BenchRedis { url, servers, private: None, cluster: None })
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// CPU seconds of each server so far, by port.
    pub fn cpu_by_port(&self) -> BTreeMap<u16, f64> {
        self.servers.iter().filter_map(|s| Some((s.port, crate::cluster::cpu_seconds(s.pid)?))).collect()
    }

    /// `INFO commandstats` summed over the servers: command → (calls, microseconds).
    pub async fn command_stats(&self) -> BTreeMap<String, (u64, u64)> {
        let urls: Vec<String> = if self.cluster.is_some() || self.private.is_some() {
            self.servers.iter().map(|s| format!("redis://127.0.0.1:{}", s.port)).collect()
        } else {
            vec![self.url.clone()]
        };
        let mut total: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for url in urls {
            for (name, (calls, usec)) in command_stats(&url).await.unwrap_or_default() {
                let entry = total.entry(name).or_default();
                entry.0 += calls;
                entry.1 += usec;
            }
        }
        total
    }

    /// Per primary of a cluster: the slots it serves, how many of `sessions` hash to it, and
    /// its CPU in `cpu` (with its replicas'), each also as a share of the whole.
    pub fn shard_breakdown(&self, sessions: &[String], cpu: &BTreeMap<u16, f64>) -> anyhow::Result<Option<Value>> {
        let Some(cluster) = &self.cluster else { return Ok(None) };
        let nodes = tokio::task::block_in_place(|| cluster.nodes())?;
        let slots: Vec<u16> = sessions.iter().map(|s| keys::slot(&keys::run(s))).collect();
        let total_cpu: f64 = cpu.values().sum();
        let mut shards = serde_json::Map::new();
        for primary in nodes.iter().filter(|n| n.role == Role::Primary && !n.slots.is_empty()) {
            let replicas: Vec<u16> = nodes
                .iter()
                .filter(|n| n.role == Role::Replica && n.primary_id.as_deref() == Some(primary.id.as_str()))
                .map(|n| n.port)
                .collect();
            let cpu_s: f64 =
                std::iter::once(primary.port).chain(replicas.iter().copied()).filter_map(|p| cpu.get(&p)).sum();
            let own = slots.iter().filter(|s| primary.slots.iter().any(|r| r.contains(s))).count();
            let served: usize = primary.slots.iter().map(|r| r.len()).sum();
            shards.insert(
                format!("primary_{}", primary.port),
                json!({
                    "replica_ports": replicas,
                    "slots": served,
                    "sessions": own,
                    "sessions_percent": round(own as f64 * 100.0 / sessions.len().max(1) as f64, 1),
                    "cpu_seconds": round(cpu_s, 2),
                    "cpu_percent": round(cpu_s * 100.0 / total_cpu.max(1e-9), 1),
                }),
            );
        }
        if shards.is_empty() {
            bail!("the cluster lists no primary serving slots");
        }
        Ok(Some(Value::Object(shards)))
    }

    pub fn stop(self) {
        drop(self.private);
        if let Some(cluster) = self.cluster {
            tokio::task::block_in_place(move || drop(cluster));
        }
    }
}

/// `INFO commandstats`: command → (calls, microseconds).
async fn command_stats(url: &str) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await?;
    let mut stats = BTreeMap::new();
    for line in info.lines() {
        let Some((name, fields)) = line.strip_prefix("cmdstat_").and_then(|l| l.split_once(':')) else { continue };
        let field = |key: &str| {
            fields.split(',').find_map(|f| f.strip_prefix(key)?.strip_prefix('=')?.parse::<u64>().ok()).unwrap_or(0)
        };
        stats.insert(name.to_string(), (field("calls"), field("usec")));
    }
    Ok(stats)
}

/// The shared `redis-server` from `INFO server`, when it runs on this machine.
async fn shared_server(url: &str) -> anyhow::Result<Server> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO").arg("server").query_async(&mut conn).await?;
    let field = |name: &str| info.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    let pid = field("process_id:").context("no process_id in INFO")?.parse::<u32>()?;
    let port = field("tcp_port:").context("no tcp_port in INFO")?.parse::<u16>()?;
    if !Path::new(&format!("/proc/{pid}")).exists() {
        bail!("redis-server {pid} is not a process on this machine");
    }
    Ok(Server { port, pid })
}
