//! The soak's stack: three cluster nodes that can be killed, frozen, drained
//! and started again under the same node id and port, nginx in front of them
//! (round robin, no stickiness, configured like `deploy/local/up.sh`), a
//! private `redis-server` that can be restarted empty on its port or a private
//! Redis Cluster ([`super::soak_redis`]), and PostgreSQL (the shared one, or a
//! private one with `--private-postgres`).
//!
//! Ports are taken below the kernel's ephemeral range, so that while a node
//! or Redis is down no outgoing connection can take its port.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicU32},
    time::Duration,
};

use anyhow::Context;
use chatgate_testkit::{
    balancer::Balancer,
    node::{NodeCommand, NodeProcess},
    ports::free_ports,
    postgres::PrivatePostgres,
};
use nix::sys::signal::Signal;

use super::soak_redis::SoakRedis;
use crate::{client::SECRET, cluster::ClusterArgs};

/// Settings every node starts with.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub lease: Duration,
    pub retention: Duration,
    pub drain_grace: Duration,
    pub replay_max_events: u64,
}

/// One gateway node; restartable with the same id and port.
pub struct ChaosNode {
    pub id: String,
    pub port: u16,
    process: NodeProcess,
}

impl ChaosNode {
    /// Starts the node again (same id, port and flags) and waits for `/readyz`.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        self.process.restart().await.with_context(|| format!("node {}", self.id))
    }

    /// Sends a signal to the running process.
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        self.process.signal(signal)
    }

    /// Waits up to `limit` for the process to exit; SIGKILL after that. True if it exited by itself.
    /// A process still there at the limit is looked at first ([`super::diagnose`]: its threads'
    /// stacks, whether it answers HTTP), into `dir/node-<id>-stuck-<n>.txt`.
    pub async fn wait_exit(&mut self, limit: Duration, dir: &Path) -> bool {
        let exited = self.process.exited(limit).await.is_ok();
        if !exited && let Some(pid) = self.process.pid() {
            super::diagnose::stuck_process(pid, self.port, &self.id, dir).await;
        }
        self.process.kill();
        exited
    }

    /// `kill -9` and reap.
    pub async fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGTERM (a node stopped by SIGSTOP is continued first), then waits for the exit.
    pub async fn stop(&mut self) {
        self.process.stop(Duration::from_secs(40)).await;
    }
}

/// Everything the soak runs against.
pub struct Stack {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<tokio::sync::Mutex<ChaosNode>>,
    /// Node ids and ports, fixed for the whole soak.
    pub node_ids: Vec<String>,
    pub node_ports: Vec<u16>,
    /// Each node's current pid (0 while down).
    pub pids: Vec<Arc<AtomicU32>>,
    pub balancer: Option<Balancer>,
    pub redis: SoakRedis,
    private_postgres: Option<PrivatePostgres>,
    pub settings: NodeSettings,
}

impl Stack {
    /// `count` nodes on a private Redis Cluster with `redis_cluster`, else on one private Redis.
    pub async fn start(
        bin: &Path,
        args: &ClusterArgs,
        count: usize,
        settings: NodeSettings,
        redis_cluster: bool,
    ) -> anyhow::Result<Stack> {
        let dir = tempfile::Builder::new().prefix("chatgate-chaos-").tempdir()?;
        // nginx's workers may run as another user: let them traverse the directory.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let workspaces = dir.path().join("workspaces");
        std::fs::create_dir_all(&workspaces)?;
        let ports = free_ports(count as u16 + 2)?;
        let redis = if redis_cluster { SoakRedis::cluster().await? } else { SoakRedis::single(ports[count + 1])? };
        let private_postgres = if args.private_postgres { Some(PrivatePostgres::start().await?) } else { None };
        let database_url = private_postgres.as_ref().map_or(args.database_url.clone(), |p| p.url.clone());
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..6];
        let mut nodes = Vec::with_capacity(count);
        let mut stack_ids = Vec::with_capacity(count);
        let mut pids = Vec::with_capacity(count);
        for (index, port) in ports[..count].iter().copied().enumerate() {
            let id = format!("chaos-{tag}-{index}");
            let ms = |d: Duration| format!("{}ms", d.as_millis());
            let process = NodeCommand::new(bin)
                .port(port)
                .node_id(&id)
                .jwt_secret(SECRET)
                .args(["--providers", "script"])
                .workspaces(&workspaces)
                .args(redis.node_args())
                .database_url(&database_url)
                .args(["--run-lease", &ms(settings.lease), "--replay-retention", &ms(settings.retention)])
                .args(["--drain-grace", &ms(settings.drain_grace)])
                .args(["--replay-max-events", &settings.replay_max_events.to_string(), "--max-runs", "1000000"])
                .homes(&workspaces.with_file_name("homes"))
                .env("RUST_LOG", "warn,chatgate::gateway::verbs=info")
                .envs(args.node_env.iter().map(|(k, v)| (k, v)))
                .stderr_to(dir.path().join(format!("node-{index}.log")))
                .ready_within(Duration::from_secs(60))
                .start()
                .await
                .with_context(|| format!("node {id}"))?;
            let node = ChaosNode { id: id.clone(), port, process };
            pids.push(node.process.pid_cell());
            stack_ids.push(id);
            nodes.push(tokio::sync::Mutex::new(node));
        }
        let balancer = Balancer::start(dir.path(), ports[count], &ports[..count])
            .await
            .context("the chaos soak's load balancer")?;
        Ok(Stack {
            node_ports: ports[..count].to_vec(),
            node_ids: stack_ids,
            pids,
            nodes,
            balancer: Some(balancer),
            redis,
            private_postgres,
            settings,
            dir,
        })
    }

    pub fn lb_port(&self) -> u16 {
        self.balancer.as_ref().map_or(0, |b| b.port)
    }

    /// The last lines of each node's log.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for index in 0..self.node_ids.len() {
            let path = self.dir.path().join(format!("node-{index}.log"));
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {} (last {lines} lines)\n", path.display()));
            for line in &all[all.len().saturating_sub(lines)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Stops everything; with `keep_logs` the directory with the logs stays (its path is returned).
    pub async fn stop(mut self, keep_logs: bool) -> Option<PathBuf> {
        if let Some(balancer) = self.balancer.take() {
            balancer.stop().await;
        }
        for node in &self.nodes {
            node.lock().await.stop().await;
        }
        self.redis.stop().await;
        if let Some(postgres) = self.private_postgres.take() {
            postgres.stop().await;
        }
        keep_logs.then(|| self.dir.keep())
    }
}
