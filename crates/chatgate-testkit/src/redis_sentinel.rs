//! A private Redis Sentinel setup (no persistence) in a temporary directory, for tests that
//! fail a primary over: a primary, one replica and 3 sentinels (`redis-server <conf>
//! --sentinel`; Debian ships no `redis-sentinel`) with a quorum of 2 and short timeouts.
//! Only the processes started here are ever signalled; all of them are killed, and the
//! directory removed, when it is dropped.

use std::{
    collections::BTreeMap,
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{
    ports::free_ports,
    redis_proc::{Dial, kill, spawn, wait_until},
    redis_tls::TestCerts,
};

/// The name the sentinels monitor the primary under.
pub const MASTER_NAME: &str = "chatgate";

/// `sentinel down-after-milliseconds`: a primary silent this long is subjectively down.
pub const DOWN_AFTER_MS: u64 = 1000;

/// `sentinel failover-timeout` (also how long before a failed failover is tried again, ×2).
pub const FAILOVER_TIMEOUT_MS: u64 = 4000;

/// How long the sentinels have to see the setup, or to fail it over.
const AGREE_WAIT: Duration = Duration::from_secs(30);

/// Sentinels started.
const SENTINELS: usize = 3;

/// A primary, a replica and 3 sentinels owned by their creator.
pub struct PrivateRedisSentinel {
    /// The primary's and the replica's ports, in start order.
    data_ports: Vec<u16>,
    sentinel_ports: Vec<u16>,
    children: BTreeMap<u16, Child>,
    dir: tempfile::TempDir,
    /// Plain, or TLS everywhere (clients, replication, sentinels).
    dial: Dial,
}

/// The process-wide setup of [`PrivateRedisSentinel::shared`].
static SHARED: std::sync::OnceLock<Result<PrivateRedisSentinel, String>> = std::sync::OnceLock::new();
/// The process-wide TLS setup of [`PrivateRedisSentinel::shared_tls`].
static SHARED_TLS: std::sync::OnceLock<Result<PrivateRedisSentinel, String>> = std::sync::OnceLock::new();

impl PrivateRedisSentinel {
    /// One setup for every test of this process that only uses it (no failover); it lives as
    /// long as the process (see [`crate::redis_cluster::PrivateRedisCluster::shared`]).
    pub fn shared() -> anyhow::Result<&'static PrivateRedisSentinel> {
        let shared = SHARED.get_or_init(|| crate::redis_proc::process_wide("shared-redis-sentinel", Self::start));
        shared.as_ref().map_err(|e| anyhow::anyhow!("the shared Sentinel setup did not start: {e}"))
    }

    /// As [`PrivateRedisSentinel::shared`], every process TLS-only (see
    /// [`PrivateRedisSentinel::start_tls`]).
    pub fn shared_tls() -> anyhow::Result<&'static PrivateRedisSentinel> {
        let shared =
            SHARED_TLS.get_or_init(|| crate::redis_proc::process_wide("shared-redis-sentinel-tls", Self::start_tls));
        shared.as_ref().map_err(|e| anyhow::anyhow!("the shared TLS Sentinel setup did not start: {e}"))
    }

    /// Starts the primary, its replica (returns once it is in sync) and the sentinels;
    /// returns once every sentinel knows the replica and the other sentinels, so that a
    /// failover can happen.
    pub fn start() -> anyhow::Result<PrivateRedisSentinel> {
        Self::start_dialed(tempfile::tempdir()?, Dial::Plain)
    }

    /// As [`PrivateRedisSentinel::start`], every process TLS-only (replication and the
    /// sentinels' links too; no client certificate asked) with certificates made at test time:
    /// clients use [`PrivateRedisSentinel::sentinel_urls`] (`rediss://`) and trust
    /// [`PrivateRedisSentinel::certs`]' CA.
    pub fn start_tls() -> anyhow::Result<PrivateRedisSentinel> {
        let dir = tempfile::tempdir()?;
        let certs = TestCerts::generate(dir.path())?;
        Self::start_dialed(dir, Dial::Tls(std::sync::Arc::new(certs)))
    }

    fn start_dialed(dir: tempfile::TempDir, dial: Dial) -> anyhow::Result<PrivateRedisSentinel> {
        let ports = free_ports(2 + SENTINELS as u16)?;
        let mut setup = PrivateRedisSentinel {
            data_ports: ports[..2].to_vec(),
            sentinel_ports: ports[2..].to_vec(),
            children: BTreeMap::new(),
            dir,
            dial,
        };
        let (primary, replica) = (ports[0], ports[1]);
        setup.spawn_data(primary, None)?;
        setup.spawn_data(replica, Some(primary))?;
        wait_until(AGREE_WAIT, "the replica's sync", || {
            setup.dial.info_field(replica, "replication", "master_link_status").as_deref() == Some("up")
        })?;
        for port in setup.sentinel_ports.clone() {
            setup.spawn_sentinel(port, primary)?;
        }
        let sentinels = setup.sentinel_ports.clone();
        wait_until(AGREE_WAIT, "the sentinels' discovery", || {
            sentinels.iter().all(|&port| {
                let Ok(fields) = master_state(&setup.dial, port) else { return false };
                fields.get("num-slaves").map(String::as_str) == Some("1")
                    && fields.get("num-other-sentinels").map(String::as_str) == Some(&(SENTINELS - 1).to_string())
                    && fields.get("flags").map(String::as_str) == Some("master")
            })
        })?;
        Ok(setup)
    }

    /// `redis://127.0.0.1:P` (`rediss://` for a TLS setup) of each sentinel.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinel_ports.iter().map(|port| format!("{}://127.0.0.1:{port}", self.dial.scheme())).collect()
    }

    /// A TLS setup's certificates (its CA signs every process's certificate).
    pub fn certs(&self) -> Option<&TestCerts> {
        match &self.dial {
            Dial::Tls(certs) => Some(certs),
            Dial::Plain => None,
        }
    }

    /// The name the primary is monitored under ([`MASTER_NAME`]).
    pub fn master_name(&self) -> &str {
        MASTER_NAME
    }

    /// The primary's and the replica's ports (whichever is primary now).
    pub fn data_ports(&self) -> &[u16] {
        &self.data_ports
    }

    /// The running processes' pids (data nodes and sentinels, for their CPU time).
    pub fn pids(&self) -> Vec<u32> {
        self.children.values().map(Child::id).collect()
    }

    /// The primary's port, as the first live sentinel reports it
    /// (`SENTINEL get-master-addr-by-name`).
    pub fn primary(&self) -> anyhow::Result<u16> {
        let live = self.sentinel_ports.iter().filter(|p| self.children.contains_key(p));
        for &port in live {
            if let Ok(found) = reported_primary(&self.dial, port) {
                return Ok(found);
            }
        }
        bail!("no sentinel answers")
    }

    /// `SENTINEL FAILOVER` (the primary stays up and is demoted); returns the time until
    /// every sentinel reports the replica as primary and it says `role:master`.
    pub fn failover(&self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let old = self.primary()?;
        let asked = self.sentinel_ports[0];
        let _: () = self
            .dial
            .query(asked, redis::cmd("SENTINEL").arg("FAILOVER").arg(MASTER_NAME))
            .context("SENTINEL FAILOVER")?;
        self.wait_for_new_primary(old)?;
        Ok(started.elapsed())
    }

    /// SIGKILLs the primary; returns the time until every sentinel reports the replica as
    /// primary and it says `role:master` (about [`DOWN_AFTER_MS`] plus an election).
    pub fn kill_primary(&mut self) -> anyhow::Result<Duration> {
        let old = self.primary()?;
        let started = Instant::now();
        if let Some(child) = self.children.remove(&old) {
            kill(child);
        }
        self.wait_for_new_primary(old)?;
        Ok(started.elapsed())
    }

    /// Starts the killed data node on `port` again, empty and replicating the current
    /// primary (as an operator restarts a failed primary; one restarted as a primary is
    /// demoted by the sentinels only after reporting `role:master` for 8 s and their next
    /// `INFO`, ~10 s); returns once it is in sync and every sentinel lists it as a healthy
    /// replica (so it can be failed over to).
    pub fn restart(&mut self, port: u16) -> anyhow::Result<()> {
        if !self.data_ports.contains(&port) || self.children.contains_key(&port) {
            bail!("{port} is not a killed data node");
        }
        let primary = self.primary()?;
        self.spawn_data(port, Some(primary))?;
        let sentinels: Vec<u16> =
            self.sentinel_ports.iter().copied().filter(|p| self.children.contains_key(p)).collect();
        let result = wait_until(AGREE_WAIT, "the restarted node's sync", || {
            self.dial.info_field(port, "replication", "master_link_status").as_deref() == Some("up")
                && sentinels.iter().all(|&sentinel| {
                    replicas_state(&self.dial, sentinel).is_ok_and(|replicas| {
                        replicas.iter().any(|r| {
                            r.get("port") == Some(&port.to_string())
                                && r.get("flags").map(String::as_str) == Some("slave")
                        })
                    })
                })
        });
        result.with_context(|| format!("sentinel setup in {}", self.dir.path().display()))
    }

    /// Waits until every live sentinel reports a live primary other than `old` that says
    /// `role:master`.
    fn wait_for_new_primary(&self, old: u16) -> anyhow::Result<()> {
        let sentinels: Vec<u16> =
            self.sentinel_ports.iter().copied().filter(|p| self.children.contains_key(p)).collect();
        let result = wait_until(AGREE_WAIT, "the new primary", || {
            let reported: Vec<u16> =
                sentinels.iter().filter_map(|&port| reported_primary(&self.dial, port).ok()).collect();
            let new = reported[..].first().copied();
            reported.len() == sentinels.len()
                && reported.iter().all(|p| Some(*p) == new)
                && new.is_some_and(|p| {
                    p != old
                        && self.children.contains_key(&p)
                        && self.dial.info_field(p, "replication", "role").as_deref() == Some("master")
                })
        });
        result.with_context(|| format!("sentinel setup in {}", self.dir.path().display()))
    }

    /// A data node on `port`, replicating `primary` if given.
    fn spawn_data(&mut self, port: u16, primary: Option<u16>) -> anyhow::Result<()> {
        let mut args = self.dial.server_args(port);
        if let Some(primary) = primary {
            args.extend(["--replicaof".into(), "127.0.0.1".into(), primary.to_string()]);
        }
        self.spawn_checked(port, &port.to_string(), &args)
    }

    /// A sentinel on `port` monitoring `primary`, from a config file of its own (Sentinel
    /// rewrites it).
    fn spawn_sentinel(&mut self, port: u16, primary: u16) -> anyhow::Result<()> {
        let conf = self.dir.path().join(format!("sentinel-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "{listen}bind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n\
                 sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n",
                dir = self.dir.path().display(),
                listen = self.sentinel_listen(port),
            ),
        )?;
        let args = [conf.to_string_lossy().into_owned(), "--sentinel".into()];
        self.spawn_checked(port, &format!("sentinel-{port}"), &args)
    }

    /// A sentinel's config lines for its port: plain, or TLS-only like the data nodes.
    fn sentinel_listen(&self, port: u16) -> String {
        match &self.dial {
            Dial::Plain => format!("port {port}\n"),
            Dial::Tls(certs) => {
                let path = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
                format!(
                    "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
                     tls-client-cert-file {}\ntls-client-key-file {}\ntls-auth-clients no\ntls-replication yes\n",
                    path(certs.server_cert_path()),
                    path(certs.server_key_path()),
                    path(certs.ca_path()),
                    path(certs.client_cert_path()),
                    path(certs.client_key_path()),
                )
            }
        }
    }

    fn spawn_checked(&mut self, port: u16, label: &str, args: &[String]) -> anyhow::Result<()> {
        let mut child = spawn(self.dir.path(), label, args)?;
        if let Err(e) = self.dial.wait_for_ping(port, &mut child) {
            kill(child);
            return Err(e);
        }
        self.children.insert(port, child);
        Ok(())
    }
}

impl Drop for PrivateRedisSentinel {
    fn drop(&mut self) {
        for (_, child) in std::mem::take(&mut self.children) {
            kill(child);
        }
    }
}

/// The primary's port as the sentinel on `port` reports it.
fn reported_primary(dial: &Dial, port: u16) -> anyhow::Result<u16> {
    let addr: Vec<String> = dial.query(port, redis::cmd("SENTINEL").arg("get-master-addr-by-name").arg(MASTER_NAME))?;
    Ok(addr.get(1).context("no primary reported")?.parse()?)
}

/// `SENTINEL MASTER <name>` on the sentinel on `port`, as field → value.
fn master_state(dial: &Dial, port: u16) -> anyhow::Result<BTreeMap<String, String>> {
    let flat: Vec<String> = dial.query(port, redis::cmd("SENTINEL").arg("MASTER").arg(MASTER_NAME))?;
    Ok(pairs(&flat))
}

/// `SENTINEL REPLICAS <name>` on the sentinel on `port`, each as field → value.
fn replicas_state(dial: &Dial, port: u16) -> anyhow::Result<Vec<BTreeMap<String, String>>> {
    let replicas: Vec<Vec<String>> = dial.query(port, redis::cmd("SENTINEL").arg("REPLICAS").arg(MASTER_NAME))?;
    Ok(replicas.iter().map(|flat| pairs(flat)).collect())
}

fn pairs(flat: &[String]) -> BTreeMap<String, String> {
    flat.chunks(2).filter_map(|kv| Some((kv.first()?.clone(), kv.get(1)?.clone()))).collect()
}
