//! Nodes for a scenario (one single node, or several cluster nodes on the
//! shared Redis and PostgreSQL, or private ones) and what is read from them
//! around a measurement: CPU time from `/proc/<pid>/stat` (nodes and every
//! `redis-server`: [`crate::bench_redis`]) and counters from each node's
//! `/metrics`.

use std::{collections::BTreeMap, net::SocketAddr, path::Path};

use anyhow::Context;

use chatgate_testkit::postgres::PrivatePostgres;

use crate::{
    bench_redis::BenchRedis,
    client::{Api, Backend, Node},
};

/// Where cluster nodes find Redis and PostgreSQL.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// Redis shared by the cluster nodes.
    #[arg(long, default_value = "redis://127.0.0.1:6379", global = true)]
    pub redis_url: String,
    /// PostgreSQL shared by the cluster nodes.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test", global = true)]
    pub database_url: String,
    /// Start a private `redis-server` (no persistence) for the scenario instead
    /// of using `--redis-url`, so that its CPU time is the scenario's alone.
    #[arg(long, global = true)]
    pub private_redis: bool,
    /// Start a private Redis Cluster (3 primaries, `--cluster-replicas` replicas each) and run
    /// the nodes with `--redis-mode cluster` on it; the CPU of every server is counted.
    #[arg(long, global = true, conflicts_with = "private_redis")]
    pub private_redis_cluster: bool,
    /// Replicas per primary of `--private-redis-cluster`.
    #[arg(long, default_value_t = 0, global = true)]
    pub cluster_replicas: u16,
    /// Start a private PostgreSQL (fsync off, as the `postgres` user) instead
    /// of using `--database-url`: its CPU time is then reported too.
    #[arg(long, global = true)]
    pub private_postgres: bool,
    /// An environment variable for every spawned node (repeatable), e.g. `TOKIO_WORKER_THREADS=1`.
    #[arg(long = "node-env", value_parser = crate::client::parse_env, global = true)]
    pub node_env: Vec<(String, String)>,
}

/// The nodes of one scenario.
pub struct Cluster {
    pub nodes: Vec<Node>,
    /// The Redis the nodes use (cluster mode), stopped with the cluster when private.
    pub redis: Option<BenchRedis>,
    private_postgres: Option<PrivatePostgres>,
    pub api: Api,
    /// The workspaces root the cluster's nodes share (as on a shared volume).
    _workspaces: Option<tempfile::TempDir>,
}

impl Cluster {
    /// Whether the PostgreSQL CPU figure covers this scenario's database alone.
    pub fn postgres_is_private(&self) -> bool {
        self.private_postgres.is_some()
    }

    /// `count` cluster-mode nodes with unique ids, started one after another
    /// (each applies the migrations at start).
    pub async fn start(bin: &Path, args: &ClusterArgs, count: usize, extra: &[String]) -> anyhow::Result<Cluster> {
        let run = uuid::Uuid::new_v4().simple().to_string();
        let redis = BenchRedis::start(args).await?;
        let private_postgres = if args.private_postgres { Some(PrivatePostgres::start().await?) } else { None };
        let database_url = private_postgres.as_ref().map_or(args.database_url.clone(), |p| p.url.clone());
        let workspaces = tempfile::tempdir()?;
        let mut nodes = Vec::with_capacity(count);
        for i in 0..count {
            let backend = Backend::Cluster {
                redis_url: redis.url.clone(),
                redis_cluster: redis.is_cluster(),
                database_url: database_url.clone(),
                node_id: format!("bench-{}-{i}", &run[..8]),
                workspaces: workspaces.path().to_path_buf(),
            };
            nodes.push(Node::spawn(bin, &backend, extra, &args.node_env).await?);
        }
        Ok(Cluster { nodes, redis: Some(redis), private_postgres, api: Api::new(), _workspaces: Some(workspaces) })
    }

    /// One single node (SQLite, in-process registry).
    pub async fn single(bin: &Path, args: &ClusterArgs, extra: &[String]) -> anyhow::Result<Cluster> {
        let node = Node::spawn(bin, &Backend::Sqlite, extra, &args.node_env).await?;
        Ok(Cluster { nodes: vec![node], redis: None, private_postgres: None, api: Api::new(), _workspaces: None })
    }

    pub fn addr(&self, i: usize) -> SocketAddr {
        self.nodes[i % self.nodes.len()].addr
    }

    /// CPU times and counters, to subtract from a later sample.
    pub async fn sample(&self) -> anyhow::Result<Sample> {
        let mut node_cpu = 0.0;
        let mut metrics = Counters::default();
        for node in &self.nodes {
            node_cpu += node.pid.and_then(cpu_seconds).context("cannot read a node's CPU time")?;
            let text = self.api.metrics(node.addr).await?;
            metrics.add(&text);
        }
        let redis_cpu_by_port = self.redis.as_ref().map(BenchRedis::cpu_by_port).unwrap_or_default();
        let redis_cpu = (!redis_cpu_by_port.is_empty()).then(|| redis_cpu_by_port.values().sum());
        let client_cpu = cpu_seconds(std::process::id()).unwrap_or(0.0);
        let postgres_cpu = match &self.private_postgres {
            Some(pg) => private_postgres_cpu_seconds(pg).unwrap_or(0.0),
            None => postgres_cpu_seconds(),
        };
        let redis_commands = match &self.redis {
            Some(redis) => redis.command_stats().await,
            None => BTreeMap::new(),
        };
        Ok(Sample { node_cpu, redis_cpu, redis_cpu_by_port, client_cpu, postgres_cpu, metrics, redis_commands })
    }

    pub async fn stop(self) {
        for node in self.nodes {
            node.stop().await;
        }
        if let Some(redis) = self.redis {
            redis.stop();
        }
        if let Some(postgres) = self.private_postgres {
            postgres.stop().await;
        }
    }
}

/// CPU seconds (user + system, all threads) of a process.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // USER_HZ, the unit of /proc times, is 100 on Linux for x86 and arm.
    Some((utime + stime) as f64 / 100.0)
}

/// CPU seconds of every `postgres` process on the machine (shared with others).
fn postgres_cpu_seconds() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0.0 };
    dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres"))
        .filter_map(cpu_seconds)
        .sum()
}

/// CPU seconds of a private PostgreSQL: the postmaster, its live children and its reaped ones.
fn private_postgres_cpu_seconds(pg: &PrivatePostgres) -> Option<f64> {
    let master = pg.pid()?;
    let children: f64 = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| parent_of(*pid) == Some(master))
        .filter_map(cpu_seconds)
        .sum();
    Some(cpu_seconds(master)? + reaped_children_seconds(master).unwrap_or(0.0) + children)
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

fn parent_of(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// `cutime + cstime`: CPU of the process's children that exited and were waited for.
fn reaped_children_seconds(pid: u32) -> Option<f64> {
    let fields = stat_fields(pid)?;
    let cutime: u64 = fields.get(13)?.parse().ok()?;
    let cstime: u64 = fields.get(14)?.parse().ok()?;
    Some((cutime + cstime) as f64 / 100.0)
}

/// The 1-minute load average (other work on the machine).
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// Counters summed over the nodes' `/metrics`.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub redis_round_trips: f64,
    /// Round trips by `op` label.
    pub round_trips_by_op: BTreeMap<String, f64>,
    pub events_appended: f64,
    pub events_delivered: f64,
    pub slow_consumer_closes: f64,
    pub replay_truncated: f64,
}

impl Counters {
    fn add(&mut self, text: &str) {
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((name, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            let metric = name.split('{').next().unwrap_or(name);
            match metric {
                "chatgate_redis_round_trips_total" => {
                    self.redis_round_trips += value;
                    let op = name.split("op=\"").nth(1).and_then(|rest| rest.split('"').next()).unwrap_or("?");
                    *self.round_trips_by_op.entry(op.to_string()).or_default() += value;
                }
                "chatgate_events_appended_total" => self.events_appended += value,
                "chatgate_events_delivered_total" => self.events_delivered += value,
                "chatgate_slow_consumer_closes_total" => self.slow_consumer_closes += value,
                "chatgate_replay_truncated_total" => self.replay_truncated += value,
                _ => {}
            }
        }
    }

    fn minus(&self, before: &Counters) -> Counters {
        Counters {
            redis_round_trips: self.redis_round_trips - before.redis_round_trips,
            round_trips_by_op: self
                .round_trips_by_op
                .iter()
                .map(|(op, n)| (op.clone(), n - before.round_trips_by_op.get(op).copied().unwrap_or(0.0)))
                .filter(|(_, n)| *n > 0.0)
                .collect(),
            events_appended: self.events_appended - before.events_appended,
            events_delivered: self.events_delivered - before.events_delivered,
            slow_consumer_closes: self.slow_consumer_closes - before.slow_consumer_closes,
            replay_truncated: self.replay_truncated - before.replay_truncated,
        }
    }
}

/// CPU seconds and counters at one moment.
#[derive(Debug, Clone)]
pub struct Sample {
    pub node_cpu: f64,
    /// Every `redis-server` of the scenario, summed (`None`: none runs on this machine).
    pub redis_cpu: Option<f64>,
    /// Each server's, by port.
    pub redis_cpu_by_port: BTreeMap<u16, f64>,
    pub client_cpu: f64,
    pub postgres_cpu: f64,
    pub metrics: Counters,
    pub redis_commands: BTreeMap<String, (u64, u64)>,
}

/// What happened between two samples: the same figures, as differences.
pub type Usage = Sample;

impl Sample {
    pub fn since(&self, before: &Sample) -> Usage {
        Usage {
            node_cpu: self.node_cpu - before.node_cpu,
            redis_cpu: self.redis_cpu.zip(before.redis_cpu).map(|(a, b)| a - b),
            redis_cpu_by_port: self
                .redis_cpu_by_port
                .iter()
                .map(|(port, cpu)| (*port, cpu - before.redis_cpu_by_port.get(port).copied().unwrap_or(0.0)))
                .collect(),
            client_cpu: self.client_cpu - before.client_cpu,
            postgres_cpu: self.postgres_cpu - before.postgres_cpu,
            metrics: self.metrics.minus(&before.metrics),
            redis_commands: self
                .redis_commands
                .iter()
                .filter_map(|(name, (calls, usec))| {
                    let (c0, u0) = before.redis_commands.get(name).copied().unwrap_or((0, 0));
                    (*calls > c0).then(|| (name.clone(), (calls - c0, usec.saturating_sub(u0))))
                })
                .collect(),
        }
    }
}
