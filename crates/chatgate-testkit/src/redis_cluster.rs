//! A private Redis Cluster (N primaries with R replicas each, no persistence) in a temporary
//! directory, for tests that kill, fail over and reshard it: the nodes are `redis-server
//! --cluster-enabled yes` on ports whose bus ports (+10000) are free too (see
//! [`crate::ports::free_cluster_ports`]), joined by `redis-cli --cluster create`. Slots are
//! migrated by hand, as `redis-cli --cluster reshard` does, so a test can stop half-way and
//! watch the clients meet `ASK` and `TRYAGAIN`. Only the processes started here are ever
//! signalled; all of them are killed, and the directory removed, when it is dropped.

use std::{
    collections::BTreeMap,
    ops::RangeInclusive,
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{
    ports::free_cluster_ports,
    redis_proc::{Dial, POLL, field_of, kill, process_wide, spawn, wait_until},
    redis_tls::TestCerts,
};

/// A node's `--cluster-node-timeout`: a killed primary is failed over after about twice this.
pub const NODE_TIMEOUT_MS: u64 = 1000;

/// How long the cluster has to agree (on start, after a failover, a restart, a migration).
const AGREE_WAIT: Duration = Duration::from_secs(30);

/// Keys moved per `MIGRATE`.
const MIGRATE_BATCH: usize = 100;

/// A primary or a replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
}

/// One node as `CLUSTER NODES` (asked of a live node) describes it.
#[derive(Clone, Debug)]
pub struct ClusterNode {
    pub port: u16,
    /// The process while it runs (`None` once killed).
    pub pid: Option<u32>,
    pub role: Role,
    pub id: String,
    /// A replica's primary.
    pub primary_id: Option<String>,
    /// The slots a primary serves.
    pub slots: Vec<RangeInclusive<u16>>,
    /// Flagged `fail` or `fail?` by the node asked.
    pub failing: bool,
}

/// A slot migration stopped half-way: the slot is `MIGRATING` on `from` and `IMPORTING` on
/// `to`, some of its keys moved (see [`PrivateRedisCluster::begin_slot_migration`]).
#[derive(Clone, Debug)]
pub struct SlotMigration {
    pub slot: u16,
    pub from: u16,
    pub to: u16,
    to_id: String,
    started: Instant,
}

/// A Redis Cluster owned by its creator.
pub struct PrivateRedisCluster {
    ports: Vec<u16>,
    children: BTreeMap<u16, Child>,
    killed_at: Option<Instant>,
    dir: tempfile::TempDir,
    /// Plain, or TLS everywhere (clients, cluster bus, replication).
    dial: Dial,
    /// Where a TLS cluster's certificates are.
    cert_dir: Option<tempfile::TempDir>,
}

/// The process-wide clusters of [`PrivateRedisCluster::shared`] and [`PrivateRedisCluster::shared_tls`].
static SHARED: std::sync::OnceLock<Result<PrivateRedisCluster, String>> = std::sync::OnceLock::new();
static SHARED_TLS: std::sync::OnceLock<Result<PrivateRedisCluster, String>> = std::sync::OnceLock::new();

impl PrivateRedisCluster {
    /// `primaries` primaries with `replicas_per_primary` replicas each; returns once every
    /// node says `cluster_state:ok` with all 16384 slots served and every replica is in sync.
    pub fn start(primaries: u16, replicas_per_primary: u16) -> anyhow::Result<PrivateRedisCluster> {
        Self::start_dialed(primaries, replicas_per_primary, Dial::Plain)
    }

    /// As [`PrivateRedisCluster::start`], every node TLS-only (`--tls-cluster yes`, `--tls-replication
    /// yes`; no client certificate asked) with certificates made at test time: clients use
    /// [`PrivateRedisCluster::seed_urls`] (`rediss://`) and trust [`PrivateRedisCluster::certs`]' CA.
    pub fn start_tls(primaries: u16, replicas_per_primary: u16) -> anyhow::Result<PrivateRedisCluster> {
        let dir = tempfile::tempdir()?;
        let certs = TestCerts::generate(dir.path())?;
        let mut cluster = Self::start_dialed(primaries, replicas_per_primary, Dial::Tls(std::sync::Arc::new(certs)))?;
        cluster.cert_dir = Some(dir);
        Ok(cluster)
    }

    fn start_dialed(primaries: u16, replicas_per_primary: u16, dial: Dial) -> anyhow::Result<PrivateRedisCluster> {
        let count = primaries * (1 + replicas_per_primary);
        let mut cluster = PrivateRedisCluster {
            ports: free_cluster_ports(count)?,
            children: BTreeMap::new(),
            killed_at: None,
            dir: tempfile::tempdir()?,
            dial,
            cert_dir: None,
        };
        for port in cluster.ports.clone() {
            cluster.spawn_node(port)?;
        }
        let mut create = Command::new("redis-cli");
        create.args(cluster.dial.cli_args()).arg("--cluster").arg("create");
        create.args(cluster.ports.iter().map(|port| format!("127.0.0.1:{port}")));
        create.args(["--cluster-replicas", &replicas_per_primary.to_string(), "--cluster-yes"]);
        // redis-cli waits for the nodes to meet without a limit: give it one.
        let mut child = create
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("running redis-cli --cluster create")?;
        let deadline = Instant::now() + AGREE_WAIT;
        while child.try_wait()?.is_none() && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        // Still waiting for the nodes to meet: stop it (its output says how far it got).
        let _ = child.kill();
        let out = child.wait_with_output().context("waiting for redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        cluster.wait_agreed("the new cluster", |_| true)?;
        Ok(cluster)
    }

    /// One cluster (3 primaries, 1 replica each) for every test of this process that only
    /// uses it (no kills, no migrations): started on first use on a thread of its own that
    /// lives as long as the process, its servers SIGKILLed by the kernel when the process
    /// exits (a `static` is never dropped).
    pub fn shared() -> anyhow::Result<&'static PrivateRedisCluster> {
        let shared = SHARED.get_or_init(|| process_wide("shared-redis-cluster", || Self::start(3, 1)));
        shared.as_ref().map_err(|e| anyhow::anyhow!("the shared Redis Cluster did not start: {e}"))
    }

    /// One TLS cluster (3 primaries, no replicas) for every test of this process that only uses
    /// it, as [`PrivateRedisCluster::shared`].
    pub fn shared_tls() -> anyhow::Result<&'static PrivateRedisCluster> {
        let shared = SHARED_TLS.get_or_init(|| process_wide("shared-redis-cluster-tls", || Self::start_tls(3, 0)));
        shared.as_ref().map_err(|e| anyhow::anyhow!("the shared TLS Redis Cluster did not start: {e}"))
    }

    /// `redis://127.0.0.1:P` (`rediss://` for a TLS cluster) of every node (killed ones too).
    pub fn seed_urls(&self) -> Vec<String> {
        self.ports.iter().map(|port| format!("{}://127.0.0.1:{port}", self.dial.scheme())).collect()
    }

    /// A TLS cluster's certificates (its CA signs every node's certificate).
    pub fn certs(&self) -> Option<&TestCerts> {
        match &self.dial {
            Dial::Tls(certs) => Some(certs),
            Dial::Plain => None,
        }
    }

    /// Every node's port, in start order.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// The running nodes' pids (for their CPU time).
    pub fn pids(&self) -> Vec<u32> {
        self.children.values().map(Child::id).collect()
    }

    /// The temporary directory: one subdirectory per node, with its `nodes.conf` and log.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The nodes as the first live node's `CLUSTER NODES` lists them, in start order.
    pub fn nodes(&self) -> anyhow::Result<Vec<ClusterNode>> {
        let port = *self.children.keys().next().context("every node of the cluster is down")?;
        self.nodes_seen_by(port)
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`).
    pub fn slot_of(&self, key: &str) -> anyhow::Result<u16> {
        let port = *self.children.keys().next().context("every node of the cluster is down")?;
        Ok(self.dial.query(port, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))?)
    }

    /// The port of the primary serving `slot`.
    pub fn primary_for_slot(&self, slot: u16) -> anyhow::Result<u16> {
        let nodes = self.nodes()?;
        let owner = nodes.iter().find(|n| n.role == Role::Primary && n.slots.iter().any(|r| r.contains(&slot)));
        Ok(owner.with_context(|| format!("no primary serves slot {slot}"))?.port)
    }

    /// The port of the primary serving `key`'s slot.
    pub fn primary_for_key(&self, key: &str) -> anyhow::Result<u16> {
        self.primary_for_slot(self.slot_of(key)?)
    }

    /// SIGKILLs the primary serving `key`'s slot; returns its port.
    pub fn kill_primary_of(&mut self, key: &str) -> anyhow::Result<u16> {
        let port = self.primary_for_key(key)?;
        self.kill_node(port);
        Ok(port)
    }

    /// SIGKILLs the node on `port` (a no-op when it is down).
    pub fn kill_node(&mut self, port: u16) {
        if let Some(child) = self.children.remove(&port) {
            kill(child);
            self.killed_at = Some(Instant::now());
        }
    }

    /// Waits until a live primary serves `slot` again and every live node says
    /// `cluster_state:ok`; returns the time since the last kill (or since this call).
    pub fn wait_for_failover(&self, slot: u16) -> anyhow::Result<Duration> {
        let since = self.killed_at.unwrap_or_else(Instant::now);
        self.wait_agreed("the failover", |nodes| {
            nodes
                .iter()
                .any(|n| n.role == Role::Primary && n.pid.is_some() && n.slots.iter().any(|r| r.contains(&slot)))
        })?;
        Ok(since.elapsed())
    }

    /// Starts the killed node on `port` again from its `nodes.conf`; returns once it has
    /// rejoined (as a replica, when its slots were failed over) and is in sync.
    pub fn restart_node(&mut self, port: u16) -> anyhow::Result<()> {
        if self.children.contains_key(&port) {
            bail!("node {port} is running");
        }
        self.spawn_node(port)?;
        self.wait_agreed("the restarted node's rejoining", |nodes| nodes.iter().any(|n| n.port == port && !n.failing))
    }

    /// Moves `slot` with its keys to the primary on `to_primary` (see
    /// [`PrivateRedisCluster::begin_slot_migration`] and [`PrivateRedisCluster::finish_slot_migration`]);
    /// returns the time it took.
    pub fn migrate_slot(&self, slot: u16, to_primary: u16) -> anyhow::Result<Duration> {
        let migration = self.begin_slot_migration(slot, to_primary, usize::MAX)?;
        self.finish_slot_migration(&migration)
    }

    /// Marks `slot` `IMPORTING` on `to_primary` and `MIGRATING` on its owner, then moves at
    /// most `keys` of its keys and stops there: clients now get `ASK` for moved keys and
    /// `TRYAGAIN` for multi-key commands over moved and unmoved ones.
    pub fn begin_slot_migration(&self, slot: u16, to_primary: u16, keys: usize) -> anyhow::Result<SlotMigration> {
        let started = Instant::now();
        let nodes = self.nodes()?;
        let id_of = |port: u16| nodes.iter().find(|n| n.port == port && n.role == Role::Primary).map(|n| n.id.clone());
        let from = self.primary_for_slot(slot)?;
        if from == to_primary {
            bail!("slot {slot} is on {to_primary} already");
        }
        let to_id = id_of(to_primary).with_context(|| format!("{to_primary} is not a primary"))?;
        let from_id = id_of(from).context("the slot's owner")?;
        let setslot = |port: u16, state: &str, id: &str| -> anyhow::Result<()> {
            let _: () = self
                .dial
                .query(port, redis::cmd("CLUSTER").arg("SETSLOT").arg(slot).arg(state).arg(id))
                .with_context(|| format!("CLUSTER SETSLOT {slot} {state} on {port}"))?;
            Ok(())
        };
        setslot(to_primary, "IMPORTING", &from_id)?;
        setslot(from, "MIGRATING", &to_id)?;
        let migration = SlotMigration { slot, from, to: to_primary, to_id, started };
        self.move_keys(&migration, keys)?;
        Ok(migration)
    }

    /// Moves the rest of the slot's keys, then `CLUSTER SETSLOT <slot> NODE <to>` on the
    /// target, the source and every other primary; returns once every live node sees the
    /// new owner, with the time since the migration began.
    pub fn finish_slot_migration(&self, migration: &SlotMigration) -> anyhow::Result<Duration> {
        self.move_keys(migration, usize::MAX)?;
        let primaries: Vec<u16> =
            self.nodes()?.iter().filter(|n| n.role == Role::Primary && n.pid.is_some()).map(|n| n.port).collect();
        let others = primaries.into_iter().filter(|p| *p != migration.to && *p != migration.from);
        for port in [migration.to, migration.from].into_iter().chain(others) {
            let _: () = self
                .dial
                .query(port, redis::cmd("CLUSTER").arg("SETSLOT").arg(migration.slot).arg("NODE").arg(&migration.to_id))
                .with_context(|| format!("CLUSTER SETSLOT {} NODE on {port}", migration.slot))?;
        }
        let (slot, to) = (migration.slot, migration.to);
        self.wait_agreed("the migrated slot's new owner", |nodes| {
            nodes.iter().any(|n| n.port == to && n.slots.iter().any(|r| r.contains(&slot)))
        })?;
        Ok(migration.started.elapsed())
    }

    /// `GETKEYSINSLOT` + `MIGRATE … KEYS …` in batches, until `limit` keys moved or none left.
    fn move_keys(&self, migration: &SlotMigration, limit: usize) -> anyhow::Result<()> {
        let mut moved = 0;
        while moved < limit {
            let batch = MIGRATE_BATCH.min(limit - moved);
            let keys: Vec<Vec<u8>> = self
                .dial
                .query(migration.from, redis::cmd("CLUSTER").arg("GETKEYSINSLOT").arg(migration.slot).arg(batch))?;
            if keys.is_empty() {
                break;
            }
            let mut migrate = redis::cmd("MIGRATE");
            migrate.arg("127.0.0.1").arg(migration.to).arg("").arg(0).arg(5000).arg("KEYS").arg(&keys);
            let _: String = self.dial.query(migration.from, &migrate).context("MIGRATE")?;
            moved += keys.len();
        }
        Ok(())
    }

    /// `redis-server --cluster-enabled yes` on `port`, in `dir/<port>`; returns once it
    /// answers `PING`.
    fn spawn_node(&mut self, port: u16) -> anyhow::Result<()> {
        let dir = self.dir.path().join(port.to_string());
        std::fs::create_dir_all(&dir)?;
        let mut args = self.dial.server_args(port);
        args.extend(
            [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                &NODE_TIMEOUT_MS.to_string(),
                // A replica fails over however long its link was down (the default refuses after
                // 10 node timeouts, which a test that kills twice can reach).
                "--cluster-replica-validity-factor",
                "0",
            ]
            .map(String::from),
        );
        let mut child = spawn(&dir, &port.to_string(), &args)?;
        if let Err(e) = self.dial.wait_for_ping(port, &mut child) {
            kill(child);
            return Err(e);
        }
        self.children.insert(port, child);
        Ok(())
    }

    /// `CLUSTER NODES` as the node on `port` sees it.
    fn nodes_seen_by(&self, port: u16) -> anyhow::Result<Vec<ClusterNode>> {
        let text: String = self.dial.query(port, redis::cmd("CLUSTER").arg("NODES"))?;
        let mut nodes: Vec<ClusterNode> = text.lines().filter_map(|line| self.parse_node(line)).collect();
        nodes.sort_by_key(|n| self.ports.iter().position(|p| *p == n.port));
        Ok(nodes)
    }

    /// One line of `CLUSTER NODES`: `<id> <ip:port@bus> <flags> <primary> <ping> <pong>
    /// <epoch> <link> <slot>...` (`[slot->-id]`/`[slot-<-id]` migration marks skipped).
    fn parse_node(&self, line: &str) -> Option<ClusterNode> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let port: u16 = fields.get(1)?.split(['@', ',']).next()?.rsplit(':').next()?.parse().ok()?;
        let flags: Vec<&str> = fields.get(2)?.split(',').collect();
        let role = if flags.contains(&"master") { Role::Primary } else { Role::Replica };
        let primary_id = Some(fields.get(3)?.to_string()).filter(|id| id != "-");
        let slots = fields
            .iter()
            .skip(8)
            .filter(|s| !s.starts_with('['))
            .filter_map(|s| match s.split_once('-') {
                Some((a, b)) => Some(a.parse().ok()?..=b.parse().ok()?),
                None => s.parse().ok().map(|a| a..=a),
            })
            .collect();
        Some(ClusterNode {
            port,
            pid: self.children.get(&port).map(Child::id),
            role,
            id: fields[0].to_string(),
            primary_id,
            slots,
            failing: flags.iter().any(|f| *f == "fail" || *f == "fail?"),
        })
    }

    /// Waits until every live node says `cluster_state:ok` with all slots served, sees every
    /// live node as not failing and every replica's link is up, and `also` holds for each
    /// live node's view.
    fn wait_agreed(&self, what: &str, also: impl Fn(&[ClusterNode]) -> bool) -> anyhow::Result<()> {
        let live: Vec<u16> = self.children.keys().copied().collect();
        let result = wait_until(AGREE_WAIT, what, || {
            live.iter().all(|&port| {
                let info: String = self.dial.query(port, redis::cmd("CLUSTER").arg("INFO")).unwrap_or_default();
                let Ok(nodes) = self.nodes_seen_by(port) else { return false };
                field_of(&info, "cluster_state").as_deref() == Some("ok")
                    && field_of(&info, "cluster_slots_ok").as_deref() == Some("16384")
                    && nodes.iter().filter(|n| n.pid.is_some()).all(|n| !n.failing)
                    && nodes.iter().filter(|n| n.pid.is_some()).count() == live.len()
                    && nodes.iter().find(|n| n.port == port).is_some_and(|me| {
                        me.role == Role::Primary
                            || self.dial.info_field(port, "replication", "master_link_status").as_deref() == Some("up")
                    })
                    && also(&nodes)
            })
        });
        result.with_context(|| format!("cluster in {}", self.dir.path().display()))
    }
}

impl Drop for PrivateRedisCluster {
    fn drop(&mut self) {
        for (_, child) in std::mem::take(&mut self.children) {
            kill(child);
        }
    }
}
