//! A local cluster for as long as one command runs: what `chatgate-stack` does for the browser
//! suite (`scripts/browser-tests.sh`). N cluster-mode nodes behind nginx, the command run with
//! the stack's variables in its environment, and a control endpoint through which the command
//! restarts or kills a node. Everything is stopped when the command ends, or on SIGINT or
//! SIGTERM; the supervisor exits with the command's status.
//!
//! ```text
//! chatgate-stack --nodes 3 --state DIR [--bin PATH] -- <command> [args…]
//! ```
//!
//! The nodes start as `deploy/local/up.sh` starts them: ids `local-1` … `local-N`, `REDIS_URL`
//! (default `redis://127.0.0.1:6379`), `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), a fresh JWT secret, workspaces and provider
//! homes shared by every node (`CHATGATE_WORKSPACES_ROOT`, `CHATGATE_HOMES_ROOT`, default
//! `DIR/workspaces` and `DIR/homes`), `CHATGATE_LOG_FORMAT` (default `text`) and every other
//! `CHATGATE_*` variable of this process (run lease, drain grace, replay window, …). Ports come
//! from [`crate::ports`]; node I's stderr is appended to `DIR/node-I.log`; nginx's config and
//! error log are in `DIR`.
//!
//! The command gets `CHATGATE_LB_URL`, `CHATGATE_WS_URL`, `CHATGATE_NODE_URLS` (space
//! separated, node 1 first), `CHATGATE_JWT_SECRET`, `CHATGATE_BIN`, `CHATGATE_STACK_STATE` (DIR)
//! and `CHATGATE_STACK_CONTROL`, the control endpoint (HTTP on 127.0.0.1, one request per
//! connection, plain-text answers); `DIR/env` holds the same for a shell to source:
//!
//! - `GET /nodes`: one line per node, `local-I URL PID` (PID 0 while it is down);
//! - `POST /nodes/{i}/restart`: what `deploy/local/restart-node.sh` does: SIGTERM (the node
//!   drains), wait for the exit (drain grace + 15 s, then SIGKILL), start it again on the same
//!   port with the same command, wait for `/readyz`. 200 once ready, 500 with the reason. A node
//!   that is down (killed) is just started;
//! - `POST /nodes/{i}/kill`: SIGKILL (a crash), answered once the process is gone.

use std::{
    ffi::OsString,
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::ExitStatus,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use axum::{
    Router,
    extract::{Path as UrlPath, State},
    http::StatusCode,
    routing::{get, post},
};
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    net::{TcpListener, TcpStream},
    signal::unix::{SignalKind, signal},
};

use crate::{
    balancer::Balancer,
    node::{NodeCommand, NodeProcess},
    ports::free_ports,
};

/// What to start.
pub struct StackOptions {
    pub nodes: usize,
    /// Logs, nginx's files, `env`, and the workspaces and homes unless set otherwise.
    pub state: PathBuf,
    /// The `chatgate` binary.
    pub bin: PathBuf,
}

/// How long a node may take to answer `/readyz` (up.sh's default).
const READY_WITHIN: Duration = Duration::from_secs(60);

struct StackNode {
    index: usize,
    process: NodeProcess,
    log: PathBuf,
    /// One restart or kill at a time.
    busy: tokio::sync::Mutex<()>,
}

/// The running nodes and nginx.
pub struct Stack {
    nodes: Vec<StackNode>,
    balancer: Mutex<Option<Balancer>>,
    lb_port: u16,
    jwt_secret: String,
    state: PathBuf,
    bin: PathBuf,
    /// How long a node may take to exit after SIGTERM.
    stop_within: Duration,
}

/// `$name`, or `default` when unset or empty.
fn var_or(name: &str, default: &str) -> String {
    std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_owned())
}

/// Whether this process's variable `name` goes to every node (the ones up.sh passes on).
fn passed_on(name: &str) -> bool {
    const SET_HERE: [&str; 7] = [
        "CHATGATE_LISTEN",
        "CHATGATE_NODE_ID",
        "CHATGATE_JWT_SECRET",
        "CHATGATE_LOG_FORMAT",
        "CHATGATE_BIN",
        "CHATGATE_WORKSPACES_ROOT",
        "CHATGATE_HOMES_ROOT",
    ];
    name.starts_with("CHATGATE_")
        && !SET_HERE.contains(&name)
        && !["CHATGATE_LB_", "CHATGATE_LOCAL_", "CHATGATE_STACK_"].iter().any(|p| name.starts_with(p))
}

/// A drain grace as the nodes read it (`500ms`, `25s`, `2m`); 25 s when unreadable, as in
/// `deploy/local/lib.sh`.
fn parse_grace(text: &str) -> Duration {
    humantime::parse_duration(text.trim()).unwrap_or(Duration::from_secs(25))
}

/// Appends the line up.sh writes before each start of a node.
fn log_start(log: &Path, index: usize, port: u16) {
    use std::io::Write;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    if let Ok(mut file) = std::fs::File::options().create(true).append(true).open(log) {
        let _ = writeln!(file, "=== unix time {now}: starting node local-{index} on 127.0.0.1:{port}");
    }
}

impl Stack {
    /// Starts the nodes, waits until each is ready, then starts nginx in front of them.
    pub async fn start(options: &StackOptions) -> anyhow::Result<Stack> {
        let state = &options.state;
        let workspaces = PathBuf::from(var_or("CHATGATE_WORKSPACES_ROOT", &state.join("workspaces").to_string_lossy()));
        let homes = PathBuf::from(var_or("CHATGATE_HOMES_ROOT", &state.join("homes").to_string_lossy()));
        std::fs::create_dir_all(&workspaces).with_context(|| format!("workspaces {}", workspaces.display()))?;
        let redis_url = var_or("REDIS_URL", "redis://127.0.0.1:6379");
        let database_url = var_or("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test");
        let log_format = var_or("CHATGATE_LOG_FORMAT", "text");
        let jwt_secret: String = rand::random::<[u8; 32]>().iter().map(|b| format!("{b:02x}")).collect();
        let node_env: Vec<(OsString, OsString)> =
            std::env::vars_os().filter(|(name, _)| name.to_str().is_some_and(passed_on)).collect();
        let count = options.nodes;
        let ports = free_ports(count as u16 + 1)?;
        let mut nodes = Vec::with_capacity(count);
        for (i, port) in ports[..count].iter().copied().enumerate() {
            let index = i + 1;
            let log = state.join(format!("node-{index}.log"));
            log_start(&log, index, port);
            let process = NodeCommand::new(&options.bin)
                .clean_env()
                .port(port)
                .node_id(&format!("local-{index}"))
                .redis_url(&redis_url)
                .database_url(&database_url)
                .workspaces(&workspaces)
                .homes(&homes)
                // In the environment, as up.sh does: not on a command line everyone can read.
                .env("CHATGATE_JWT_SECRET", &jwt_secret)
                .env("CHATGATE_LOG_FORMAT", &log_format)
                .envs(node_env.iter().cloned())
                .stderr_to(&log)
                .ready_within(READY_WITHIN)
                .spawn()
                .with_context(|| format!("node local-{index}"))?;
            nodes.push(StackNode { index, process, log, busy: tokio::sync::Mutex::new(()) });
        }
        for node in &nodes {
            node.process.wait_ready().await.with_context(|| format!("node local-{}", node.index))?;
        }
        let balancer = Balancer::start(state, ports[count], &ports[..count]).await?;
        Ok(Stack {
            nodes,
            balancer: Mutex::new(Some(balancer)),
            lb_port: ports[count],
            jwt_secret,
            state: state.clone(),
            bin: options.bin.clone(),
            stop_within: parse_grace(&var_or("CHATGATE_DRAIN_GRACE", "25s")) + Duration::from_secs(15),
        })
    }

    /// Node `local-{index}`.
    fn node(&self, index: usize) -> Option<&StackNode> {
        self.nodes.get(index.checked_sub(1)?)
    }

    /// The variables the command gets (see the module's doc).
    pub fn command_env(&self, control: &str) -> Vec<(&'static str, String)> {
        let lb = self.lb_port;
        let node_urls: Vec<&str> = self.nodes.iter().map(|n| n.process.base.as_str()).collect();
        vec![
            ("CHATGATE_LB_URL", format!("http://127.0.0.1:{lb}")),
            ("CHATGATE_WS_URL", format!("ws://127.0.0.1:{lb}/ws")),
            ("CHATGATE_NODE_URLS", node_urls.join(" ")),
            ("CHATGATE_JWT_SECRET", self.jwt_secret.clone()),
            ("CHATGATE_BIN", self.bin.to_string_lossy().into_owned()),
            ("CHATGATE_STACK_STATE", self.state.to_string_lossy().into_owned()),
            ("CHATGATE_STACK_CONTROL", control.to_owned()),
        ]
    }

    /// `GET /nodes`.
    fn listing(&self) -> String {
        let line = |n: &StackNode| format!("local-{} {} {}\n", n.index, n.process.base, n.process.pid().unwrap_or(0));
        self.nodes.iter().map(line).collect()
    }

    /// `POST /nodes/{i}/restart`.
    async fn restart(&self, node: &StackNode) -> anyhow::Result<String> {
        let _busy = node.busy.lock().await;
        let (index, process, port) = (node.index, &node.process, node.process.port());
        let began = Instant::now();
        let was_running = process.pid().is_some();
        let exited = process.stop(self.stop_within).await;
        let killed = if was_running && exited.is_none() {
            format!(" (SIGKILL: still running {:?} after SIGTERM)", self.stop_within)
        } else {
            String::new()
        };
        let stopped = began.elapsed();
        if TcpStream::connect(process.addr()).await.is_ok() {
            bail!("port {port} is still taken after node local-{index} stopped");
        }
        log_start(&node.log, index, port);
        process.restart().await.with_context(|| format!("node local-{index} did not become ready again"))?;
        Ok(format!(
            "node local-{index} restarted on :{port} (pid {}): stopped in {:.1}s{killed}, ready {:.1}s later\n",
            process.pid().unwrap_or(0),
            stopped.as_secs_f64(),
            (began.elapsed() - stopped).as_secs_f64(),
        ))
    }

    /// `POST /nodes/{i}/kill`.
    async fn kill(&self, node: &StackNode) -> String {
        let _busy = node.busy.lock().await;
        match node.process.pid() {
            Some(pid) => {
                node.process.kill();
                format!("node local-{} killed (pid {pid})\n", node.index)
            }
            None => format!("node local-{} was not running\n", node.index),
        }
    }

    /// nginx first (no new connection reaches a stopping node), then the nodes together, each
    /// draining for up to its grace.
    pub async fn stop(&self) {
        let balancer = self.balancer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(balancer) = balancer {
            balancer.stop().await;
        }
        futures_util::future::join_all(self.nodes.iter().map(|node| async move {
            let _busy = node.busy.lock().await;
            node.process.stop(self.stop_within).await
        }))
        .await;
    }
}

/// The control endpoint's routes (see the module's doc).
fn control_routes(stack: Arc<Stack>) -> Router {
    Router::new()
        .route("/nodes", get(list_nodes))
        .route("/nodes/{index}/restart", post(restart_node))
        .route("/nodes/{index}/kill", post(kill_node))
        .with_state(stack)
}

type Answer = (StatusCode, String);

fn no_such_node(stack: &Stack, index: usize) -> Answer {
    (StatusCode::NOT_FOUND, format!("no node {index} (1..{})\n", stack.nodes.len()))
}

async fn list_nodes(State(stack): State<Arc<Stack>>) -> String {
    stack.listing()
}

async fn restart_node(State(stack): State<Arc<Stack>>, UrlPath(index): UrlPath<usize>) -> Answer {
    let Some(node) = stack.node(index) else { return no_such_node(&stack, index) };
    match stack.restart(node).await {
        Ok(text) => (StatusCode::OK, text),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")),
    }
}

async fn kill_node(State(stack): State<Arc<Stack>>, UrlPath(index): UrlPath<usize>) -> Answer {
    let Some(node) = stack.node(index) else { return no_such_node(&stack, index) };
    (StatusCode::OK, stack.kill(node).await)
}

/// `export NAME='value'` lines.
fn env_file(vars: &[(&str, String)]) -> String {
    let quoted = |v: &str| format!("'{}'", v.replace('\'', r"'\''"));
    let lines: String = vars.iter().map(|(k, v)| format!("export {k}={}\n", quoted(v))).collect();
    format!("# The stack's variables (written by chatgate-stack); valid while it runs.\n{lines}")
}

/// The exit code a shell would report for `status`.
fn exit_code(status: ExitStatus) -> i32 {
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// SIGTERM to the command (a terminal's Ctrl-C may have reached it already), SIGKILL after 10 s.
async fn end_command(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// Starts the stack, runs `command` (program and arguments) in it, stops the stack; the exit
/// code to leave with: the command's, or 128 + the signal that ended the supervisor.
pub async fn run(options: StackOptions, command: Vec<OsString>) -> anyhow::Result<i32> {
    let Some((program, args)) = command.split_first() else { bail!("no command to run") };
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    std::fs::create_dir_all(&options.state).with_context(|| format!("state directory {}", options.state.display()))?;
    // Dropping a half-started stack kills what it started.
    let stack = tokio::select! {
        stack = Stack::start(&options) => Arc::new(stack?),
        _ = interrupt.recv() => return Ok(130),
        _ = terminate.recv() => return Ok(143),
    };
    // Bound now and held until the end: any free port will do.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let control = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(axum::serve(listener, control_routes(stack.clone())).into_future());
    let env = stack.command_env(&control);
    std::fs::write(options.state.join("env"), env_file(&env))?;
    eprintln!(
        "chatgate-stack: {} nodes ({}) behind nginx on :{}; control {control}; logs in {}",
        stack.nodes.len(),
        env[2].1,
        stack.lb_port,
        options.state.display()
    );
    let code = match tokio::process::Command::new(program).args(args).envs(env).spawn() {
        Err(e) => {
            eprintln!("chatgate-stack: cannot run {}: {e}", program.to_string_lossy());
            127
        }
        Ok(mut child) => tokio::select! {
            status = child.wait() => status.map_or(1, exit_code),
            _ = interrupt.recv() => { end_command(&mut child).await; 130 }
            _ = terminate.recv() => { end_command(&mut child).await; 143 }
        },
    };
    server.abort();
    let _ = server.await;
    stack.stop().await;
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graces_read_like_lib_sh() {
        assert_eq!(parse_grace("2s"), Duration::from_secs(2));
        assert_eq!(parse_grace("500ms"), Duration::from_millis(500));
        assert_eq!(parse_grace("1m"), Duration::from_secs(60));
        assert_eq!(parse_grace("soon"), Duration::from_secs(25));
        assert_eq!(parse_grace(""), Duration::from_secs(25));
    }

    #[test]
    fn the_stack_own_variables_stay_with_it() {
        assert!(passed_on("CHATGATE_RUN_LEASE"));
        assert!(passed_on("CHATGATE_DRAIN_GRACE"));
        for name in ["CHATGATE_LISTEN", "CHATGATE_JWT_SECRET", "CHATGATE_LB_PORT", "CHATGATE_STACK_CONTROL", "PATH"] {
            assert!(!passed_on(name), "{name}");
        }
    }
}
