//! Private backing services for a scenario: a `redis-server` and a
//! PostgreSQL cluster started on free ports without persistence, so that
//! their CPU time is the scenario's alone and other users of the shared
//! services neither slow the scenario down nor are disturbed by it. Each is
//! stopped (only the process this bench started) when dropped or stopped.

use std::{path::PathBuf, process::Stdio, time::Duration};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use crate::cluster::cpu_seconds;

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A `redis-server` of this scenario.
pub struct PrivateRedis {
    pub url: String,
    pub port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    pub async fn start() -> anyhow::Result<PrivateRedis> {
        PrivateRedis::start_on(free_port()?).await
    }

    /// An empty server on `port` (the chaos soak restarts it on the same port).
    pub async fn start_on(port: u16) -> anyhow::Result<PrivateRedis> {
        let mut redis = PrivateRedis { url: format!("redis://127.0.0.1:{port}"), port, child: None };
        redis.restart().await?;
        Ok(redis)
    }

    /// Kills the server (if it runs) and starts an empty one on the same port.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await;
        let port = self.port;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting redis-server")?;
        self.child = Some(child);
        let client = redis::Client::open(self.url.as_str())?;
        for _ in 0..200 {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("private redis-server on port {port} did not answer")
    }

    /// Kills the server (SIGKILL: whatever it held is gone) and waits for it.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    pub async fn stop(mut self) {
        self.kill().await;
    }
}

/// A PostgreSQL cluster of this scenario (fsync off), run as the `postgres` user.
pub struct PrivatePostgres {
    pub url: String,
    data: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl PrivatePostgres {
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

    /// CPU seconds of the postmaster, its live children and its reaped ones.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let pid_file = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        let master: u32 = pid_file.lines().next()?.trim().parse().ok()?;
        let children: f64 = std::fs::read_dir("/proc")
            .ok()?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| parent_of(*pid) == Some(master))
            .filter_map(cpu_seconds)
            .sum();
        Some(cpu_seconds(master)? + reaped_children_seconds(master).unwrap_or(0.0) + children)
    }

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

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

fn parent_of(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// `cutime + cstime`: CPU of the process's children that exited and were waited for.
fn reaped_children_seconds(pid: u32) -> Option<f64> {
    let fields = stat_fields(pid)?;
    let cutime: u64 = fields.get(13)?.parse().ok()?;
    let cstime: u64 = fields.get(14)?.parse().ok()?;
    Some((cutime + cstime) as f64 / 100.0)
}
