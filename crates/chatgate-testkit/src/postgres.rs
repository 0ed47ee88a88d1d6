//! PostgreSQL for tests and scenarios: the URL of the shared test database, and a private
//! cluster (fsync off, run as the `postgres` user) on a free port, so that its CPU time is
//! one scenario's alone. Only the cluster started here is ever stopped.
//!
//! A private cluster can also speak TLS only ([`PrivatePostgres::start_tls`]): a CA and a
//! server certificate for `localhost` and `127.0.0.1` are made at test time by `rcgen`
//! ([`TestCerts`]), and its `pg_hba.conf` accepts `hostssl` connections only, so that a
//! plaintext client is refused and a connection that works proves TLS was used.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use crate::{ports::free_port, redis_tls::TestCerts};

/// The shared test database: `CHATGATE_TEST_PG_URL`, default the local `test` database.
pub fn pg_url() -> String {
    std::env::var("CHATGATE_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The second loopback address a TLS cluster listens on as well: a host its certificate does
/// not name (for refusals by `sslmode=verify-full`).
pub const UNNAMED_LOOPBACK: &str = "127.0.0.2";

/// A private PostgreSQL cluster, stopped by [`PrivatePostgres::stop`] (killed when dropped).
pub struct PrivatePostgres {
    /// `postgres://postgres@127.0.0.1:<port>/postgres` (trust authentication).
    pub url: String,
    port: u16,
    data: PathBuf,
    certs: Option<TestCerts>,
    child: Child,
    _dir: tempfile::TempDir,
}

impl PrivatePostgres {
    /// `initdb` into a temporary directory and a postmaster on a free port; returns once
    /// `pg_isready` says yes.
    pub async fn start() -> anyhow::Result<PrivatePostgres> {
        PrivatePostgres::start_with(false).await
    }

    /// Like [`PrivatePostgres::start`], speaking TLS only: `ssl=on` with a server certificate
    /// (SANs `localhost` and `127.0.0.1`) signed by a CA made now ([`PrivatePostgres::certs`];
    /// `ca.crt` is readable by everyone), and a `pg_hba.conf` of `hostssl` lines only, so that
    /// a plaintext connection is refused ("no pg_hba.conf entry … no encryption"). It listens
    /// on [`UNNAMED_LOOPBACK`] too, an address the certificate does not name.
    pub async fn start_tls() -> anyhow::Result<PrivatePostgres> {
        PrivatePostgres::start_with(true).await
    }

    async fn start_with(tls: bool) -> anyhow::Result<PrivatePostgres> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data)?;
        let (uid, gid) = postgres_user()?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        std::os::unix::fs::chown(&data, Some(uid), Some(gid))?;
        let init = as_postgres("initdb")
            .args(["-D", &data.to_string_lossy(), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .context("running initdb")?;
        if !init.success() {
            bail!("initdb failed: {init}");
        }
        let port = free_port()?;
        let mut postgres = as_postgres("postgres");
        postgres
            .args(["-D", &data.to_string_lossy(), "-p", &port.to_string(), "-k", &data.to_string_lossy()])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=300"]);
        let certs = if tls {
            let certs = TestCerts::generate(dir.path())?;
            let (cert, key) = (data.join("server.crt"), data.join("server.key"));
            std::fs::write(&cert, &certs.server_cert_pem)?;
            std::fs::write(&key, &certs.server_key_pem)?;
            std::fs::write(data.join("pg_hba.conf"), HOSTSSL_ONLY)?;
            for file in [&cert, &key, &data.join("pg_hba.conf")] {
                std::os::unix::fs::chown(file, Some(uid), Some(gid))?;
                std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))?;
            }
            let listen = format!("listen_addresses=127.0.0.1,{UNNAMED_LOOPBACK}");
            postgres.args(["-c", &listen, "-c", "ssl=on"]);
            postgres.args(["-c", &format!("ssl_cert_file={}", cert.display())]);
            postgres.args(["-c", &format!("ssl_key_file={}", key.display())]);
            Some(certs)
        } else {
            postgres.args(["-c", "listen_addresses=127.0.0.1"]);
            None
        };
        let child = postgres
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting postgres")?;
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        let pg = PrivatePostgres { url, port, data, certs, child, _dir: dir };
        for _ in 0..200 {
            let ready = Command::new("pg_isready")
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q"])
                .status()
                .await
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(pg);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        pg.stop().await;
        bail!("private postgres on port {port} did not become ready")
    }

    /// The port it listens on (on `127.0.0.1`, and on [`UNNAMED_LOOPBACK`] with TLS).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@<host>:<port>/postgres?<query>` (no query when `query` is empty).
    pub fn url_on(&self, host: &str, query: &str) -> String {
        let url = format!("postgres://postgres@{host}:{}/postgres", self.port);
        if query.is_empty() { url } else { format!("{url}?{query}") }
    }

    /// The CA and the server certificate of a TLS cluster ([`PrivatePostgres::start_tls`]);
    /// `None` for a plain one.
    pub fn certs(&self) -> Option<&TestCerts> {
        self.certs.as_ref()
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The postmaster's pid (from `postmaster.pid`), for its CPU time and its children's.
    pub fn pid(&self) -> Option<u32> {
        let pid_file = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        pid_file.lines().next()?.trim().parse().ok()
    }

    /// `pg_ctl stop -m immediate`, then waits for the postmaster (killing it after 10 s).
    pub async fn stop(mut self) {
        let _ = as_postgres("pg_ctl")
            .args(["-D", &self.data.to_string_lossy(), "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// A TLS cluster's `pg_hba.conf`: local (socket) connections, and TCP connections over TLS
/// only; any plaintext TCP connection matches no line and is refused.
const HOSTSSL_ONLY: &str = "\
local all all trust
hostssl all all 127.0.0.0/8 trust
";

/// `program` run as the `postgres` user; the server programs (`initdb`, `postgres`, `pg_ctl`)
/// are found on `PATH`, else in the newest `/usr/lib/postgresql/<version>/bin` (Debian keeps
/// them there, off `PATH`).
fn as_postgres(program: &str) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--"]).arg(server_program(program));
    cmd
}

fn server_program(program: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file()))
        .unwrap_or_default();
    if let Some(found) = on_path {
        return found;
    }
    let versions = std::fs::read_dir("/usr/lib/postgresql").into_iter().flatten().flatten();
    let newest = versions
        .filter_map(|entry| Some((entry.file_name().to_str()?.parse::<u32>().ok()?, entry.path())))
        .filter(|(_, dir)| dir.join("bin").join(program).is_file())
        .max_by_key(|(version, _)| *version);
    newest.map(|(_, dir)| dir.join("bin").join(program)).unwrap_or_else(|| PathBuf::from(program))
}

fn postgres_user() -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let line = passwd.lines().find(|l| l.starts_with("postgres:")).context("no postgres user")?;
    let fields: Vec<&str> = line.split(':').collect();
    Ok((fields.get(2).context("uid")?.parse()?, fields.get(3).context("gid")?.parse()?))
}
