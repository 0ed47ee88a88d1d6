//! The load generator's client side: nodes (spawned single-node or in cluster
//! mode, by the test kit's node spawner), tokens, sessions over REST, and the
//! protocol steps the scenarios share (WebSockets: `chatgate_testkit::ws`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{anyhow, bail};
use chatgate_testkit::{
    node::{NodeCommand, NodeProcess},
    ws::{self, Socket},
};
use serde_json::{Value, json};

/// The secret every spawned node signs tokens with.
pub const SECRET: &str = "chatgate-bench-secret";

/// Where a spawned node keeps sessions and coordinates runs.
#[derive(Debug, Clone)]
pub enum Backend {
    /// Single node: its own SQLite file, runs coordinated in process.
    Sqlite,
    /// Cluster mode: the shared Redis and PostgreSQL, under a unique node id,
    /// with the workspaces root every node of the cluster shares; `redis_cluster`:
    /// `--redis-mode cluster` (the URL is a seed list).
    Cluster { redis_url: String, redis_cluster: bool, database_url: String, node_id: String, workspaces: PathBuf },
}

/// A gateway node the bench talks to.
pub struct Node {
    pub addr: SocketAddr,
    pub pid: Option<u32>,
    process: NodeProcess,
    _dir: tempfile::TempDir,
}

impl Node {
    /// Starts `chatgate serve` on a free port (only the `script` provider enabled) and waits
    /// until it is ready.
    pub async fn spawn(
        bin: &Path,
        backend: &Backend,
        extra: &[String],
        env: &[(String, String)],
    ) -> anyhow::Result<Node> {
        let dir = tempfile::tempdir()?;
        let own_workspaces = dir.path().join("workspaces");
        std::fs::create_dir_all(&own_workspaces)?;
        let command =
            NodeCommand::new(bin).jwt_secret(SECRET).args(["--providers", "script"]).workspaces(match backend {
                Backend::Cluster { workspaces, .. } => workspaces.as_path(),
                Backend::Sqlite => own_workspaces.as_path(),
            });
        let command = match backend {
            Backend::Sqlite => {
                command.database_url(&format!("sqlite://{}?mode=rwc", dir.path().join("bench.db").display()))
            }
            Backend::Cluster { redis_url, redis_cluster, database_url, node_id, .. } => {
                let command = command.database_url(database_url).redis_url(redis_url).node_id(node_id);
                if *redis_cluster { command.args(["--redis-mode", "cluster"]) } else { command }
            }
        };
        let process = command
            .args(extra)
            .env("RUST_LOG", "warn")
            // The bench stands for many clients with few users and 250 loopback addresses:
            // the per-user and per-address abuse limits would refuse it, not measure it
            // (a scenario's `--node-env` or extra flags still override these).
            .env("CHATGATE_MAX_SOCKETS_PER_USER", "1000000")
            .env("CHATGATE_MAX_SENDS_PER_MINUTE", "1000000")
            .env("CHATGATE_CONN_RATE_PER_IP", "1000000")
            .env("CHATGATE_CONN_BURST_PER_IP", "1000000")
            .env("CHATGATE_MAX_RUNS", "1000000")
            .env("CHATGATE_HOMES_ROOT", dir.path().join("homes"))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stderr_inherit()
            .ready_within(Duration::from_secs(20))
            .start()
            .await?;
        Ok(Node { addr: process.addr(), pid: process.pid(), process, _dir: dir })
    }

    /// The node's resident set size in bytes (Linux).
    pub fn rss_bytes(&self) -> Option<u64> {
        rss_of(self.pid?)
    }

    /// SIGTERM; SIGKILL if it has not exited within 40 s.
    pub async fn stop(self) {
        self.process.stop(Duration::from_secs(40)).await;
    }
}

/// A process's resident set size in bytes.
pub fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Mints tokens and creates sessions.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
}

impl Api {
    pub fn new() -> Self {
        Api { http: reqwest::Client::new() }
    }

    pub fn token(&self, user: &str) -> anyhow::Result<String> {
        chatgate_testkit::token::mint(SECRET, user, Duration::from_secs(24 * 3600))
    }

    /// Creates a `script` session for the token's user.
    pub async fn create_session(&self, addr: SocketAddr, token: &str) -> anyhow::Result<String> {
        let response = self
            .http
            .post(format!("http://{addr}/api/providers/sessions"))
            .bearer_auth(token)
            .json(&json!({ "provider": "script", "projectPath": "." }))
            .send()
            .await?;
        let body: Value = response.json().await?;
        body["data"]["sessionId"].as_str().map(str::to_string).ok_or_else(|| anyhow!("create session: {body}"))
    }

    /// The node's Prometheus text.
    pub async fn metrics(&self, addr: SocketAddr) -> anyhow::Result<String> {
        Ok(self.http.get(format!("http://{addr}/metrics")).send().await?.text().await?)
    }
}

/// Subscribes to `session` after `last_seq`; returns the ack.
pub async fn subscribe(ws: &mut Socket, session: &str, last_seq: u64) -> anyhow::Result<Value> {
    ws::send(ws, json!({ "type": "chat.subscribe", "sessions": [{ "sessionId": session, "lastSeq": last_seq }] }))
        .await?;
    loop {
        let frame = ws::recv(ws, Duration::from_secs(60)).await?;
        match frame["kind"].as_str() {
            Some("chat_subscribed") if frame["sessionId"] == session => return Ok(frame),
            Some("session_upserted") => continue,
            _ => bail!("expected chat_subscribed, got {frame}"),
        }
    }
}

/// Raises the open-file limit to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((_, hard)) => {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
            getrlimit(Resource::RLIMIT_NOFILE).map(|(soft, _)| soft).unwrap_or(0)
        }
        Err(_) => 0,
    }
}

/// Kernel TCP memory in bytes (`/proc/net/sockstat`, pages).
pub fn kernel_tcp_bytes() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    while let Some(word) = words.next() {
        if word == "mem" {
            return words.next()?.parse::<u64>().ok().map(|pages| pages * 4096);
        }
    }
    None
}

/// Parses `KEY=VALUE`.
pub fn parse_env(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{raw}: expected KEY=VALUE"))
}

/// The chatgate binary: `--chatgate-bin`, else next to this one.
pub fn chatgate_bin(given: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    match given {
        Some(bin) => Ok(bin.clone()),
        None => Ok(std::env::current_exe()?.with_file_name("chatgate")),
    }
}
