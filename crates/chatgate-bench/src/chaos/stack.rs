//! The soak's stack: three cluster nodes that can be killed, frozen, drained
//! and started again under the same node id and port, nginx in front of them
//! (round robin, no stickiness, configured like `deploy/local/up.sh`), a
//! private `redis-server` that can be restarted empty on its port, and
//! PostgreSQL (the shared one, or a private one with `--private-postgres`).
//!
//! Ports are taken below the kernel's ephemeral range, so that while a node
//! or Redis is down no outgoing connection can take its port.

use std::{
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail};
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::process::{Child, Command};

use crate::{
    client::SECRET,
    cluster::ClusterArgs,
    services::{PrivatePostgres, PrivateRedis},
};

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
    bin: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    /// The running process's pid (0 while down), readable without the node's lock.
    pub pid: Arc<AtomicU32>,
    pub starts: u32,
}

impl ChaosNode {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Starts the node and waits for `/readyz`.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let log = File::options().create(true).append(true).open(&self.log)?;
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args)
            .env("RUST_LOG", "warn,chatgate::gateway::verbs=info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("starting {}", self.bin.display()))?;
        self.pid.store(child.id().unwrap_or(0), Ordering::SeqCst);
        self.child = Some(child);
        self.starts += 1;
        wait_ready(self.addr(), Duration::from_secs(60)).await.with_context(|| format!("node {}", self.id))
    }

    /// Sends a signal to the running process.
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self.pid.load(Ordering::SeqCst);
        if pid == 0 {
            bail!("node {} is not running", self.id);
        }
        nix::sys::signal::kill(Pid::from_raw(pid as i32), signal)?;
        Ok(())
    }

    /// Waits up to `limit` for the process to exit; SIGKILL after that. True if it exited by itself.
    pub async fn wait_exit(&mut self, limit: Duration) -> bool {
        let Some(mut child) = self.child.take() else { return true };
        let exited = tokio::time::timeout(limit, child.wait()).await.is_ok();
        if !exited {
            let _ = child.kill().await;
        }
        self.pid.store(0, Ordering::SeqCst);
        exited
    }

    /// `kill -9` and reap.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
        self.pid.store(0, Ordering::SeqCst);
    }

    /// SIGTERM (a node stopped by SIGSTOP is continued first), then waits for the exit.
    pub async fn stop(&mut self) {
        let _ = self.signal(Signal::SIGCONT);
        let _ = self.signal(Signal::SIGTERM);
        self.wait_exit(Duration::from_secs(40)).await;
    }
}

/// Polls `/readyz` until it answers 200.
pub async fn wait_ready(addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(1)).build()?;
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if let Ok(r) = http.get(format!("http://{addr}/readyz")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{addr} did not become ready within {limit:?}")
}

/// nginx in front of the nodes.
pub struct Balancer {
    pub port: u16,
    child: Child,
}

impl Balancer {
    async fn start(dir: &Path, port: u16, node_ports: &[u16]) -> anyhow::Result<Balancer> {
        let nginx = nginx_bin().context(
            "the chaos soak needs nginx as its load balancer and it is not installed (as root: apt-get install nginx)",
        )?;
        let conf = dir.join("nginx.conf");
        std::fs::create_dir_all(dir.join("nginx-tmp"))?;
        std::fs::write(&conf, nginx_conf(dir, port, node_ports))?;
        let child = Command::new(&nginx)
            .arg("-e")
            .arg(dir.join("nginx-error.log"))
            .arg("-p")
            .arg(format!("{}/", dir.display()))
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", nginx.display()))?;
        let balancer = Balancer { port, child };
        let http = reqwest::Client::builder().timeout(Duration::from_secs(1)).build()?;
        for _ in 0..100 {
            if let Ok(r) = http.get(format!("http://127.0.0.1:{port}/healthz")).send().await
                && r.status().is_success()
            {
                return Ok(balancer);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        balancer.stop().await;
        bail!("nginx on :{port} does not answer (see {})", dir.join("nginx-error.log").display())
    }

    /// Fast shutdown (SIGTERM to the master, which stops its workers).
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// nginx as `deploy/local/up.sh` configures it, in the foreground, without an access log.
fn nginx_conf(dir: &Path, port: u16, node_ports: &[u16]) -> String {
    let d = dir.display();
    let servers: String =
        node_ports.iter().map(|p| format!("        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;\n")).collect();
    format!(
        "# Load balancer of the chaos soak (written by chatgate-bench chaos).
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/nginx-tmp/body;
    proxy_temp_path {d}/nginx-tmp/proxy;
    fastcgi_temp_path {d}/nginx-tmp/fastcgi;
    uwsgi_temp_path {d}/nginx-tmp/uwsgi;
    scgi_temp_path {d}/nginx-tmp/scgi;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      '';
    }}
    upstream chatgate {{
        zone chatgate 64k;
{servers}        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://chatgate;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_connect_timeout 2s;
            proxy_buffering off;
            proxy_next_upstream error timeout http_502 http_503;
            proxy_next_upstream_tries 3;
        }}
    }}
}}
"
    )
}

/// nginx on the PATH, or Debian's /usr/sbin/nginx.
fn nginx_bin() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|dir| dir.join("nginx")).find(|p| p.is_file()));
    on_path.or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| p.is_file()))
}

/// `count` distinct free ports below the ephemeral range.
fn free_ports(count: usize) -> anyhow::Result<Vec<u16>> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let low: u16 = range.split_whitespace().next().and_then(|p| p.parse().ok()).unwrap_or(32768);
    let (from, to) = (low.saturating_sub(12_000).max(10_000), low.saturating_sub(1));
    let mut ports = Vec::with_capacity(count);
    for _ in 0..2000 {
        if ports.len() == count {
            break;
        }
        let port = rand::random_range(from..to);
        if !ports.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    if ports.len() < count {
        bail!("no {count} free ports between {from} and {to}");
    }
    Ok(ports)
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
    pub redis: tokio::sync::Mutex<PrivateRedis>,
    pub redis_url: String,
    private_postgres: Option<PrivatePostgres>,
    pub settings: NodeSettings,
}

impl Stack {
    pub async fn start(bin: &Path, args: &ClusterArgs, count: usize, settings: NodeSettings) -> anyhow::Result<Stack> {
        let dir = tempfile::Builder::new().prefix("chatgate-chaos-").tempdir()?;
        // nginx's workers may run as another user: let them traverse the directory.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let workspaces = dir.path().join("workspaces");
        std::fs::create_dir_all(&workspaces)?;
        let ports = free_ports(count + 2)?;
        let redis = PrivateRedis::start_on(ports[count + 1]).await?;
        let redis_url = redis.url.clone();
        let private_postgres = if args.private_postgres { Some(PrivatePostgres::start().await?) } else { None };
        let database_url = private_postgres.as_ref().map_or(args.database_url.clone(), |p| p.url.clone());
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..6];
        let mut nodes = Vec::with_capacity(count);
        let mut stack_ids = Vec::with_capacity(count);
        let mut pids = Vec::with_capacity(count);
        for (index, port) in ports[..count].iter().copied().enumerate() {
            let id = format!("chaos-{tag}-{index}");
            let ms = |d: Duration| format!("{}ms", d.as_millis());
            let node_args: Vec<String> = [
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--node-id",
                &id,
                "--jwt-secret",
                SECRET,
                "--providers",
                "script",
                "--workspaces-root",
                &workspaces.display().to_string(),
                "--redis-url",
                &redis_url,
                "--database-url",
                &database_url,
                "--run-lease",
                &ms(settings.lease),
                "--replay-retention",
                &ms(settings.retention),
                "--drain-grace",
                &ms(settings.drain_grace),
                "--replay-max-events",
                &settings.replay_max_events.to_string(),
                "--max-runs",
                "1000000",
                "--homes-root",
                &workspaces.with_file_name("homes").display().to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let mut node = ChaosNode {
                id: id.clone(),
                port,
                bin: bin.to_path_buf(),
                args: node_args,
                env: args.node_env.clone(),
                log: dir.path().join(format!("node-{index}.log")),
                child: None,
                pid: Arc::new(AtomicU32::new(0)),
                starts: 0,
            };
            node.start().await?;
            pids.push(node.pid.clone());
            stack_ids.push(id);
            nodes.push(tokio::sync::Mutex::new(node));
        }
        let balancer = Balancer::start(dir.path(), ports[count], &ports[..count]).await?;
        Ok(Stack {
            node_ports: ports[..count].to_vec(),
            node_ids: stack_ids,
            pids,
            nodes,
            balancer: Some(balancer),
            redis: tokio::sync::Mutex::new(redis),
            redis_url,
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
        self.redis.into_inner().stop().await;
        if let Some(postgres) = self.private_postgres.take() {
            postgres.stop().await;
        }
        keep_logs.then(|| self.dir.keep())
    }
}
