//! The real `chatgate` binary as a child process: [`NodeCommand`] says how to start it (port,
//! database, Redis, node id, workspaces, flags, environment, where stderr goes) and
//! [`NodeProcess`] is the running node: readiness, signals (SIGTERM, SIGKILL, SIGSTOP,
//! SIGCONT), exit, restart on the same port. A node still running is killed when dropped.
//!
//! The binary's path comes from the caller: `env!("CARGO_BIN_EXE_chatgate")` exists only in
//! the gateway crate's own tests, so others pass it or set `CHATGATE_BIN`
//! ([`NodeCommand::from_env`]).

use std::{
    ffi::{OsStr, OsString},
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail};
use nix::{sys::signal::Signal, unistd::Pid};

use crate::{ports::free_port, ws::Ws};

/// Where a node's stderr goes.
#[derive(Debug, Clone)]
enum Stderr {
    Null,
    Inherit,
    /// Appended to this file.
    File(PathBuf),
    /// Appended to `<dir>/chatgate-<port>.stderr`.
    LogIn(PathBuf),
}

/// How to start a node: `chatgate serve --listen 127.0.0.1:<port>` and the flags given, in
/// the order given.
#[derive(Debug, Clone)]
pub struct NodeCommand {
    bin: PathBuf,
    port: Option<u16>,
    serve: bool,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    clean_env: bool,
    stdout_piped: bool,
    stderr: Stderr,
    ready_within: Duration,
}

impl NodeCommand {
    /// A node of the binary at `bin`, on a free port (see [`crate::ports`]).
    pub fn new(bin: impl Into<PathBuf>) -> NodeCommand {
        NodeCommand {
            bin: bin.into(),
            port: None,
            serve: true,
            args: Vec::new(),
            env: Vec::new(),
            clean_env: false,
            stdout_piped: false,
            stderr: Stderr::Null,
            ready_within: Duration::from_secs(30),
        }
    }

    /// A node of the binary named by `CHATGATE_BIN`.
    pub fn from_env() -> anyhow::Result<NodeCommand> {
        let bin = std::env::var_os("CHATGATE_BIN").context("CHATGATE_BIN is not set (the chatgate binary)")?;
        Ok(NodeCommand::new(bin))
    }

    /// Listens on `port` instead of a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Runs `chatgate --listen …` (the quick start) instead of `chatgate serve --listen …`.
    pub fn without_serve(mut self) -> Self {
        self.serve = false;
        self
    }

    pub fn database_url(self, url: &str) -> Self {
        self.args(["--database-url", url])
    }

    pub fn redis_url(self, url: &str) -> Self {
        self.args(["--redis-url", url])
    }

    pub fn node_id(self, id: &str) -> Self {
        self.args(["--node-id", id])
    }

    pub fn jwt_secret(self, secret: &str) -> Self {
        self.args(["--jwt-secret", secret])
    }

    /// `--workspaces-root`.
    pub fn workspaces(self, root: &Path) -> Self {
        self.arg("--workspaces-root").arg(root)
    }

    /// `--homes-root`.
    pub fn homes(self, root: &Path) -> Self {
        self.arg("--homes-root").arg(root)
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// An environment variable (set after the inherited ones are cleaned, see [`Self::clean_env`]).
    pub fn env(mut self, name: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env.push((name.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    pub fn envs<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        self.env.extend(vars.into_iter().map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned())));
        self
    }

    /// The node inherits none of this process's `CHATGATE_*`, `DATABASE_URL*` and
    /// `REDIS_URL*` variables (only those given with [`Self::env`]).
    pub fn clean_env(mut self) -> Self {
        self.clean_env = true;
        self
    }

    /// Stdout piped (see [`NodeProcess::take_stdout`]) instead of discarded.
    pub fn stdout_piped(mut self) -> Self {
        self.stdout_piped = true;
        self
    }

    /// Stderr appended to `path` (kept over restarts).
    pub fn stderr_to(mut self, path: impl Into<PathBuf>) -> Self {
        self.stderr = Stderr::File(path.into());
        self
    }

    /// Stderr appended to `<dir>/chatgate-<port>.stderr`.
    pub fn stderr_in(mut self, dir: impl Into<PathBuf>) -> Self {
        self.stderr = Stderr::LogIn(dir.into());
        self
    }

    /// Stderr shared with this process.
    pub fn stderr_inherit(mut self) -> Self {
        self.stderr = Stderr::Inherit;
        self
    }

    /// How long [`NodeProcess::wait_ready`] waits (30 s unless set).
    pub fn ready_within(mut self, limit: Duration) -> Self {
        self.ready_within = limit;
        self
    }

    /// Starts the process without waiting for it to be ready.
    pub fn spawn(mut self) -> anyhow::Result<NodeProcess> {
        let port = match self.port {
            Some(port) => port,
            None => free_port()?,
        };
        self.port = Some(port);
        let stderr_log = match &self.stderr {
            Stderr::File(path) => Some(path.clone()),
            Stderr::LogIn(dir) => Some(dir.join(format!("chatgate-{port}.stderr"))),
            Stderr::Null | Stderr::Inherit => None,
        };
        let node = NodeProcess {
            base: format!("http://127.0.0.1:{port}"),
            ws_url: format!("ws://127.0.0.1:{port}/ws"),
            port,
            command: self,
            stderr_log,
            child: Mutex::new(None),
            pid: Arc::new(AtomicU32::new(0)),
            starts: AtomicU32::new(0),
        };
        node.launch()?;
        Ok(node)
    }

    /// Starts the process and waits until it is ready (see [`NodeProcess::wait_ready`]).
    pub async fn start(self) -> anyhow::Result<NodeProcess> {
        let node = self.spawn()?;
        node.wait_ready().await?;
        Ok(node)
    }
}

/// A running (or stopped) node; killed when dropped.
pub struct NodeProcess {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// `ws://127.0.0.1:<port>/ws`.
    pub ws_url: String,
    port: u16,
    command: NodeCommand,
    stderr_log: Option<PathBuf>,
    child: Mutex<Option<Child>>,
    pid: Arc<AtomicU32>,
    starts: AtomicU32,
}

impl NodeProcess {
    fn child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn launch(&self) -> anyhow::Result<()> {
        let c = &self.command;
        let mut command = Command::new(&c.bin);
        if c.serve {
            command.arg("serve");
        }
        command.args(["--listen", &format!("127.0.0.1:{}", self.port)]).args(&c.args);
        if c.clean_env {
            for (name, _) in std::env::vars_os() {
                let text = name.to_string_lossy();
                if text.starts_with("CHATGATE_") || text.starts_with("DATABASE_URL") || text.starts_with("REDIS_URL") {
                    command.env_remove(&name);
                }
            }
        }
        command.envs(c.env.iter().map(|(k, v)| (k, v)));
        command.stdin(Stdio::null());
        command.stdout(if c.stdout_piped { Stdio::piped() } else { Stdio::null() });
        command.stderr(match (&c.stderr, &self.stderr_log) {
            (Stderr::Inherit, _) => Stdio::inherit(),
            (_, Some(path)) => {
                let file = File::options().create(true).append(true).open(path);
                Stdio::from(file.with_context(|| format!("stderr log {}", path.display()))?)
            }
            _ => Stdio::null(),
        });
        let child = command.spawn().with_context(|| format!("starting {}", c.bin.display()))?;
        self.pid.store(child.id(), Ordering::SeqCst);
        self.starts.fetch_add(1, Ordering::SeqCst);
        *self.child() = Some(child);
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The running process's pid (`None` once it was killed or reaped).
    pub fn pid(&self) -> Option<u32> {
        Some(self.pid.load(Ordering::SeqCst)).filter(|pid| *pid != 0)
    }

    /// The pid as a shared cell (0 while down), readable without access to the node.
    pub fn pid_cell(&self) -> Arc<AtomicU32> {
        self.pid.clone()
    }

    /// How many times the process was started.
    pub fn starts(&self) -> u32 {
        self.starts.load(Ordering::SeqCst)
    }

    /// The stdout of the running process, when piped ([`NodeCommand::stdout_piped`]).
    pub fn take_stdout(&self) -> Option<ChildStdout> {
        self.child().as_mut()?.stdout.take()
    }

    /// The file stderr goes to, if any.
    pub fn stderr_log(&self) -> Option<&Path> {
        self.stderr_log.as_deref()
    }

    /// What the process wrote on stderr so far (empty when not captured in a file).
    pub fn stderr(&self) -> String {
        self.stderr_log.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default()
    }

    /// The exit status, once the process ended (reaping it).
    pub fn try_status(&self) -> Option<ExitStatus> {
        let mut child = self.child();
        let status = child.as_mut()?.try_wait().ok()??;
        self.pid.store(0, Ordering::SeqCst);
        Some(status)
    }

    /// Whether the process runs (a stopped one counts as running).
    pub fn is_running(&self) -> bool {
        self.child().is_some() && self.try_status().is_none()
    }

    /// Waits until `/readyz` answers 200. Fails with the captured stderr when the process
    /// exits first ("chatgate exited before it was ready") or is not ready in time.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        let deadline = tokio::time::Instant::now() + self.command.ready_within;
        while tokio::time::Instant::now() < deadline {
            if let Some(status) = self.try_status() {
                bail!("chatgate exited before it was ready ({status}); stderr:\n{}", self.stderr());
            }
            if self.child().is_none() {
                bail!("chatgate on {} is not running", self.base);
            }
            if let Ok(r) = http.get(format!("{}/readyz", self.base)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("{} not ready after {:?}; stderr:\n{}", self.base, self.command.ready_within, self.stderr())
    }

    /// Sends `signal` to the running process.
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let Some(pid) = self.pid() else { bail!("chatgate on {} is not running", self.base) };
        nix::sys::signal::kill(Pid::from_raw(pid as i32), signal).with_context(|| format!("{signal} to {pid}"))?;
        Ok(())
    }

    /// SIGTERM: the drain signal.
    pub fn sigterm(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGTERM)
    }

    /// SIGSTOP: the process freezes (sockets stay open, nothing answers).
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGCONT)
    }

    /// SIGKILL and reap; a no-op when not running.
    pub fn kill(&self) {
        if let Some(mut child) = self.child().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.pid.store(0, Ordering::SeqCst);
    }

    /// The exit status once the process ended; an error if it still runs after `wait`.
    pub async fn exited(&self, wait: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(status) = self.try_status() {
                return Ok(status);
            }
            if self.child().is_none() {
                bail!("chatgate on {} was not started or was killed", self.base);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("process still running after {wait:?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGCONT (in case it is paused) and SIGTERM, then waits up to `grace` for the exit and
    /// kills it after that. The exit status when it exited by itself.
    pub async fn stop(&self, grace: Duration) -> Option<ExitStatus> {
        self.pid()?;
        let _ = self.resume();
        let _ = self.sigterm();
        let status = self.exited(grace).await.ok();
        self.kill();
        status
    }

    /// Kills the process if it runs and starts it again, same port and flags; waits until ready.
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.kill();
        self.launch()?;
        self.wait_ready().await
    }

    /// A WebSocket to this node (see [`Ws::connect`]).
    pub async fn connect(&self, token: &str) -> Ws {
        Ws::connect(&format!("{}?token={token}", self.ws_url)).await
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
