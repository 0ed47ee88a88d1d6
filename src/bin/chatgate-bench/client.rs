//! The load generator's client side: nodes (spawned or given), tokens,
//! sessions over REST, and WebSocket connections bound to chosen source addresses.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, anyhow, bail};
use chatgate::auth::Auth;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{
    net::{TcpSocket, TcpStream},
    process::{Child, Command},
};
use tokio_tungstenite::{WebSocketStream, tungstenite::Message};

pub type Socket = WebSocketStream<TcpStream>;

/// A gateway node the bench talks to.
pub struct Node {
    pub addr: SocketAddr,
    pub pid: Option<u32>,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Node {
    /// Starts `chatgate serve` on a free port with its own SQLite file.
    pub async fn spawn(bin: &PathBuf, secret: &str, extra: &[String]) -> anyhow::Result<Node> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--database-url")
            .arg(format!("sqlite://{}?mode=rwc", dir.path().join("bench.db").display()))
            .arg("--jwt-secret")
            .arg(secret)
            .arg("--workspaces-root")
            .arg(dir.path())
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        let node = Node { addr, pid, child: Some(child), _dir: Some(dir) };
        node.wait_ready().await?;
        Ok(node)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        for _ in 0..200 {
            if let Ok(r) = client.get(format!("http://{}/readyz", self.addr)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("node {} did not become ready", self.addr)
    }

    /// The node's resident set size in bytes (Linux).
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    pub async fn stop(mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Some(pid) = child.id() {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
            }
            let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Mints tokens and creates sessions.
pub struct Api {
    pub auth: Auth,
    http: reqwest::Client,
}

impl Api {
    pub fn new(secret: &str) -> Self {
        Api { auth: Auth::new(secret.as_bytes()), http: reqwest::Client::new() }
    }

    pub fn token(&self, user: &str) -> anyhow::Result<String> {
        Ok(self.auth.mint(user, Duration::from_secs(24 * 3600))?)
    }

    /// Creates a `script` session for the token's user.
    pub async fn create_session(&self, node: &Node, token: &str) -> anyhow::Result<String> {
        let response = self
            .http
            .post(format!("http://{}/api/providers/sessions", node.addr))
            .bearer_auth(token)
            .json(&json!({ "provider": "script", "projectPath": "." }))
            .send()
            .await?;
        let body: Value = response.json().await?;
        body["data"]["sessionId"].as_str().map(str::to_string).ok_or_else(|| anyhow!("create session: {body}"))
    }
}

/// Opens a WebSocket to `node`, from `source` when given (to spread over 127.0.0.x).
pub async fn connect(node: &Node, token: &str, source: Option<IpAddr>) -> anyhow::Result<Socket> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(node.addr).await?;
    stream.set_nodelay(true)?;
    let url = format!("ws://{}/ws?token={token}", node.addr);
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await?;
    // Every socket opens with `connected {nodeId}`.
    let hello = recv(&mut ws, Duration::from_secs(10)).await?;
    if hello["kind"] != "connected" {
        bail!("expected the connected frame, got {hello}");
    }
    Ok(ws)
}

pub async fn send(ws: &mut Socket, value: Value) -> anyhow::Result<()> {
    ws.send(Message::Text(value.to_string().into())).await?;
    Ok(())
}

/// The next JSON frame (pings skipped).
pub async fn recv(ws: &mut Socket, wait: Duration) -> anyhow::Result<Value> {
    loop {
        let frame = tokio::time::timeout(wait, ws.next()).await.context("timed out waiting for a frame")?;
        match frame {
            Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text)?),
            Some(Ok(Message::Close(frame))) => bail!("socket closed: {frame:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("socket ended"),
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
