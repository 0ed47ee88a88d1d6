//! PostgreSQL for tests and scenarios: the URL of the shared test database, and a private
//! cluster (fsync off, run as the `postgres` user) on a free port, so that its CPU time is
//! one scenario's alone. Only the cluster started here is ever stopped.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use crate::ports::free_port;

/// The shared test database: `CHATGATE_TEST_PG_URL`, default the local `test` database.
pub fn pg_url() -> String {
    std::env::var("CHATGATE_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A private PostgreSQL cluster, stopped by [`PrivatePostgres::stop`] (killed when dropped).
pub struct PrivatePostgres {
    pub url: String,
    data: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl PrivatePostgres {
    /// `initdb` into a temporary directory and a postmaster on a free port; returns once
    /// `pg_isready` says yes.
    pub async fn start() -> anyhow::Result<PrivatePostgres> {
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
        let child = as_postgres("postgres")
            .args(["-D", &data.to_string_lossy(), "-p", &port.to_string(), "-k", &data.to_string_lossy()])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=300"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting postgres")?;
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        let pg = PrivatePostgres { url, data, child, _dir: dir };
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

fn as_postgres(program: &str) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--", program]);
    cmd
}

fn postgres_user() -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let line = passwd.lines().find(|l| l.starts_with("postgres:")).context("no postgres user")?;
    let fields: Vec<&str> = line.split(':').collect();
    Ok((fields.get(2).context("uid")?.parse()?, fields.get(3).context("gid")?.parse()?))
}
