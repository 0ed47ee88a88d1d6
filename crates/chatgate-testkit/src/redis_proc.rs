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

/// Returns once the server on `port` answers `PING` (plain); fails if `child` exits first.
pub(crate) fn wait_for_ping(port: u16, child: &mut Child) -> anyhow::Result<()> {
    Dial::Plain.wait_for_ping(port, child)
}

/// SIGKILL and reap.
pub(crate) fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The flags of a TLS-only server (no plain port) on `port` with the test certificates;
/// clients must show a certificate signed by the test CA when `require_client_cert`.
pub(crate) fn tls_server_args(
    port: u16,
    certs: &crate::redis_tls::TestCerts,
    require_client_cert: bool,
) -> Vec<String> {
    let path = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
    let mut args = server_args(0);
    args.extend([
        "--tls-port".into(),
        port.to_string(),
        "--tls-cert-file".into(),
        path(certs.server_cert_path()),
        "--tls-key-file".into(),
        path(certs.server_key_path()),
        "--tls-ca-cert-file".into(),
        path(certs.ca_path()),
        "--tls-auth-clients".into(),
        if require_client_cert { "yes" } else { "no" }.into(),
    ]);
    args
}

/// How the kit reaches a private server for its own commands: plain, or over TLS trusting the
/// test CA (servers that do not ask for a client certificate).
#[derive(Clone, Default)]
pub(crate) enum Dial {
    #[default]
    Plain,
    Tls(std::sync::Arc<crate::redis_tls::TestCerts>),
}

impl Dial {
    /// `redis://` or `rediss://`.
    pub(crate) fn scheme(&self) -> &'static str {
        match self {
            Dial::Plain => "redis",
            Dial::Tls(_) => "rediss",
        }
    }

    /// `cmd` sent to the server on `port` over a fresh connection (1 s to connect, 10 s for the
    /// reply).
    pub(crate) fn query<T: redis::FromRedisValue>(&self, port: u16, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let url = format!("{}://127.0.0.1:{port}", self.scheme());
        let client = match self {
            Dial::Plain => redis::Client::open(url)?,
            Dial::Tls(certs) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates { client_tls: None, root_cert: Some(certs.ca_pem.clone().into_bytes()) },
            )?,
        };
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(1))?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        cmd.query(&mut conn)
    }

    /// One `field:value` line of `INFO <section>` on `port`.
    pub(crate) fn info_field(&self, port: u16, section: &str, field: &str) -> Option<String> {
        let info: String = self.query(port, redis::cmd("INFO").arg(section)).ok()?;
        field_of(&info, field)
    }

    /// The flags a server listening on `port` takes: a plain port, or a TLS-only one whose
    /// cluster bus and replication are TLS too (clients need no certificate).
    pub(crate) fn server_args(&self, port: u16) -> Vec<String> {
        match self {
            Dial::Plain => server_args(port),
            Dial::Tls(certs) => {
                let path = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
                let mut args = tls_server_args(port, certs, false);
                args.extend([
                    // The cluster bus and replication links authenticate with the client certificate.
                    "--tls-client-cert-file".into(),
                    path(certs.client_cert_path()),
                    "--tls-client-key-file".into(),
                    path(certs.client_key_path()),
                    "--tls-cluster".into(),
                    "yes".into(),
                    "--tls-replication".into(),
                    "yes".into(),
                ]);
                args
            }
        }
    }

    /// `redis-cli` flags that reach such a server.
    pub(crate) fn cli_args(&self) -> Vec<String> {
        match self {
            Dial::Plain => Vec::new(),
            Dial::Tls(certs) => vec!["--tls".into(), "--cacert".into(), certs.ca_path().to_string_lossy().into_owned()],
        }
    }

    /// Returns once the server on `port` answers `PING`; fails if `child` exits first.
    pub(crate) fn wait_for_ping(&self, port: u16, child: &mut Child) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_WAIT;
        while Instant::now() < deadline {
            if self.query::<String>(port, &redis::cmd("PING")).is_ok() {
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!("redis-server on port {port} exited at start ({status})");
            }
            std::thread::sleep(POLL);
        }
        bail!("redis-server on port {port} did not answer PING within {START_WAIT:?}")
    }
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
