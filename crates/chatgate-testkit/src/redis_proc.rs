//! What the private Redis Cluster, Sentinel and TLS servers share: spawning one
//! `redis-server` in a directory of the caller's, waiting for it, killing it, and sending it
//! one command over a short-lived plain connection (the `redis` crate's blocking client).

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// How long a fresh server has to answer `PING`.
pub(crate) const START_WAIT: Duration = Duration::from_secs(10);

/// How often the waits below look again.
pub(crate) const POLL: Duration = Duration::from_millis(50);

/// The flags every private server starts with: on loopback only, no persistence, and a
/// replica's full sync at once (the default waits 5 s for more replicas). `port` 0: no plain
/// port (a TLS-only server adds its `--tls-port`).
pub(crate) fn server_args(port: u16) -> Vec<String> {
    ["--port", &port.to_string(), "--bind", "127.0.0.1", "--appendonly", "no", "--save", ""]
        .into_iter()
        .chain(["--repl-diskless-sync-delay", "0"])
        .map(String::from)
        .collect()
}

/// `redis-server` with `args`, its working directory `dir` (where it writes its files), its
/// output into `dir/redis-<label>.log`.
pub(crate) fn spawn(dir: &Path, label: &str, args: &[String]) -> anyhow::Result<Child> {
    let mut command = Command::new("redis-server");
    if TIED_TO_THREAD.get() {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure only calls prctl(2), which is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
    }
    spawn_command(dir, label, args, command)
}

thread_local! {
    /// Set on [`process_wide`]'s threads: servers spawned there die with the thread.
    static TIED_TO_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `start` on a thread of its own that then lives as long as the process, and returns
/// what it made: for servers a test process shares among its tests until it exits (a `static`
/// is never dropped). Every `redis-server` spawned by `start` gets `PR_SET_PDEATHSIG`, so the
/// kernel SIGKILLs it when that thread, hence the process, ends.
pub(crate) fn process_wide<T: Send + 'static>(
    name: &str,
    start: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
        TIED_TO_THREAD.set(true);
        let _ = tx.send(start().map_err(|e| format!("{e:#}")));
        loop {
            std::thread::park();
        }
    });
    match spawned {
        Ok(_) => rx.recv().unwrap_or_else(|_| Err(format!("the thread of {name} died"))),
        Err(e) => Err(e.to_string()),
    }
}

fn spawn_command(dir: &Path, label: &str, args: &[String], mut command: Command) -> anyhow::Result<Child> {
    let log = std::fs::File::create(dir.join(format!("redis-{label}.log")))?;
    command
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting redis-server (is it installed?)")
}

/// Returns once the server on `port` answers `PING`; fails if `child` exits first.
pub(crate) fn wait_for_ping(port: u16, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_WAIT;
    while Instant::now() < deadline {
        if query::<String>(port, &redis::cmd("PING")).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("redis-server on port {port} exited at start ({status})");
        }
        std::thread::sleep(POLL);
    }
    bail!("redis-server on port {port} did not answer PING within {START_WAIT:?}")
}

/// SIGKILL and reap.
pub(crate) fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// `cmd` sent to the server on `port` over a fresh connection (1 s to connect, 10 s for the
/// reply).
pub(crate) fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(1))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    cmd.query(&mut conn)
}

/// One `field:value` line of `INFO <section>` on `port`.
pub(crate) fn info_field(port: u16, section: &str, field: &str) -> Option<String> {
    let info: String = query(port, redis::cmd("INFO").arg(section)).ok()?;
    field_of(&info, field)
}

/// The value of `field` in `field:value` lines (`INFO`, `CLUSTER INFO`).
pub(crate) fn field_of(text: &str, field: &str) -> Option<String> {
    text.lines().find_map(|line| line.trim_end().strip_prefix(field)?.strip_prefix(':').map(str::to_string))
}

/// Polls `done` every [`POLL`] until it says yes or `within` has passed (then fails with
/// `what`).
pub(crate) fn wait_until(within: Duration, what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if done() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{what}: not within {within:?}");
        }
        std::thread::sleep(POLL);
    }
}
