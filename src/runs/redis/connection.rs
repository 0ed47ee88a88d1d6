//! The node's command connections, to one Redis, a Sentinel-managed primary
//! or a Redis Cluster.
//!
//! On one Redis (`--redis-mode standalone`) calls take a multiplexed
//! connection from a `deadpool-redis` pool and keep it per [`Lane`]; a
//! transient failure drops the kept ones and the pool hands out validated or
//! new ones. Under Sentinel (`--redis-mode sentinel`) a kept connection is
//! opened to the primary the sentinels name at that moment ([`Sentinels`]);
//! a failure (or the probe seeing the sentinels name another primary) drops
//! it, and the next call asks them again. On a Redis Cluster (`--redis-mode cluster`) each lane is one
//! redis-rs `ClusterConnection`: multiplexed, one socket per shard, following
//! MOVED and ASK and retrying TRYAGAIN and CLUSTERDOWN itself within a bound
//! ([`CLUSTER_RETRIES`] attempts, [`CLUSTER_MIN_RETRY_WAIT`] to
//! [`CLUSTER_MAX_RETRY_WAIT`] apart), and re-reading the slot map when a
//! shard moves. Both are [`Conn`], which every call site uses the same way.

use std::{sync::Mutex, time::Duration};

use ::redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, IntoConnectionInfo, Pipeline, RedisFuture, RedisResult,
    TlsMode, Value,
    aio::{ConnectionLike, MultiplexedConnection},
    cluster::{ClusterClient, ClusterClientBuilder},
    cluster_async::ClusterConnection,
    sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType},
};
use deadpool_redis::{Connection, Pool};

use super::{CONNECT_TIMEOUT, RESPONSE_TIMEOUT, RedisTarget, node::Failure};
use crate::sync::lock_unpoisoned;

/// Attempts of one command on a Redis Cluster before its error reaches the caller.
pub(super) const CLUSTER_RETRIES: u32 = 6;
/// First pause between attempts on a Redis Cluster (milliseconds; redis-rs's default is 1 280).
pub(super) const CLUSTER_MIN_RETRY_WAIT: u64 = 20;
/// Longest pause between attempts on a Redis Cluster (milliseconds).
pub(super) const CLUSTER_MAX_RETRY_WAIT: u64 = 500;

/// A cluster client for the target's seed nodes with the registry's timeouts, retry bound and
/// TLS material.
pub(super) fn cluster_builder(target: &RedisTarget) -> ClusterClientBuilder {
    let builder = ClusterClient::builder(target.urls.iter().map(String::as_str))
        .retries(CLUSTER_RETRIES)
        .min_retry_wait(CLUSTER_MIN_RETRY_WAIT)
        .max_retry_wait(CLUSTER_MAX_RETRY_WAIT)
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT);
    match target.tls.certificates() {
        Some(certificates) => builder.certs(certificates),
        None => builder,
    }
}

/// The command connections' timeouts on one Redis or a Sentinel-managed primary.
pub(super) fn connection_config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
}

/// The sentinels of a Sentinel-managed primary. Credentials and TLS of the URLs apply to the
/// sentinels and the primary alike.
pub(super) struct Sentinels {
    client: tokio::sync::Mutex<SentinelClient>,
}

impl Sentinels {
    pub(super) fn new(target: &RedisTarget) -> RedisResult<Sentinels> {
        let infos =
            target.urls.iter().map(|url| url.as_str().into_connection_info()).collect::<RedisResult<Vec<_>>>()?;
        let addrs = infos.iter().map(|info| info.addr().clone());
        let mut builder = SentinelClientBuilder::new(addrs, &target.sentinel_master, SentinelServerType::Master)?;
        if let Some(first) = infos.first() {
            let settings = first.redis_settings();
            builder = builder.set_client_to_redis_db(settings.db());
            if let Some(username) = settings.username() {
                builder = builder.set_client_to_redis_username(username).set_client_to_sentinel_username(username);
            }
            if let Some(password) = settings.password() {
                builder = builder.set_client_to_redis_password(password).set_client_to_sentinel_password(password);
            }
            if let ConnectionAddr::TcpTls { insecure, .. } = first.addr() {
                let mode = if *insecure { TlsMode::Insecure } else { TlsMode::Secure };
                builder = builder.set_client_to_redis_tls_mode(mode).set_client_to_sentinel_tls_mode(mode);
                if let Some(certificates) = target.tls.certificates() {
                    builder = builder
                        .set_client_to_redis_certificates(certificates.clone())
                        .set_client_to_sentinel_certificates(certificates);
                }
            }
        }
        Ok(Sentinels { client: tokio::sync::Mutex::new(builder.build()?) })
    }

    /// A client for the primary the sentinels name now (its `ROLE` checked by redis-rs).
    pub(super) async fn primary(&self) -> Result<Client, Failure> {
        let mut client = self.client.lock().await;
        match tokio::time::timeout(CONNECT_TIMEOUT, client.async_get_client()).await {
            Ok(found) => Ok(found?),
            Err(_) => Err(Failure::Timeout("asking the sentinels for the primary")),
        }
    }

    /// The `host:port` of the primary the sentinels name now.
    pub(super) async fn primary_address(&self) -> Result<String, Failure> {
        Ok(self.primary().await?.get_connection_info().addr().to_string())
    }
}

/// Which kept command connection a call uses: replay reads (possibly large)
/// do not queue in front of the owners' appends.
#[derive(Debug, Clone, Copy)]
pub(super) enum Lane {
    Write,
    Read,
}

/// One command connection: to one Redis (or the Sentinel-managed primary), or to a Redis Cluster.
#[derive(Clone)]
pub(super) enum Conn {
    Standalone(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Standalone(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Standalone(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Standalone(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// The connection kept per lane (one Redis, Sentinel).
#[derive(Default)]
pub(super) struct Kept {
    write: Mutex<Option<MultiplexedConnection>>,
    read: Mutex<Option<MultiplexedConnection>>,
}

impl Kept {
    fn slot(&self, lane: Lane) -> &Mutex<Option<MultiplexedConnection>> {
        match lane {
            Lane::Write => &self.write,
            Lane::Read => &self.read,
        }
    }

    fn get(&self, lane: Lane) -> Option<MultiplexedConnection> {
        lock_unpoisoned(self.slot(lane)).clone()
    }

    fn keep(&self, lane: Lane, conn: MultiplexedConnection) -> Conn {
        *lock_unpoisoned(self.slot(lane)) = Some(conn.clone());
        Conn::Standalone(conn)
    }

    fn clear(&self) {
        *lock_unpoisoned(&self.write) = None;
        *lock_unpoisoned(&self.read) = None;
    }
}

/// The node's command connections.
pub(super) enum Commands {
    /// One Redis: a pool, and the connection kept per lane (taken from it).
    Standalone { pool: Pool, kept: Kept },
    /// A Sentinel-managed primary: the connection kept per lane, opened to the primary named.
    Sentinel { sentinels: std::sync::Arc<Sentinels>, kept: Kept },
    /// A Redis Cluster: one self-healing cluster connection per lane.
    Cluster { write: ClusterConnection, read: ClusterConnection },
}

impl Commands {
    pub(super) fn standalone(pool: Pool) -> Self {
        Commands::Standalone { pool, kept: Kept::default() }
    }

    pub(super) fn sentinel(sentinels: std::sync::Arc<Sentinels>) -> Self {
        Commands::Sentinel { sentinels, kept: Kept::default() }
    }

    /// Opens the two lanes' cluster connections (each reads the slot map from a seed node).
    pub(super) async fn cluster(client: &ClusterClient, timeout: Duration) -> Result<Self, Failure> {
        let open = || async {
            match tokio::time::timeout(timeout, client.get_async_connection()).await {
                Ok(conn) => Ok(conn?),
                Err(_) => Err(Failure::Timeout("opening a Redis Cluster connection")),
            }
        };
        Ok(Commands::Cluster { write: open().await?, read: open().await? })
    }

    /// The lane's connection: on one Redis the kept one, or a fresh one from
    /// the pool (which validates or creates it).
    pub(super) async fn lane(&self, lane: Lane) -> Result<Conn, Failure> {
        match self {
            Commands::Standalone { pool, kept } => {
                if let Some(conn) = kept.get(lane) {
                    return Ok(Conn::Standalone(conn));
                }
                Ok(kept.keep(lane, Connection::take(pool.get().await?)))
            }
            Commands::Sentinel { sentinels, kept } => {
                if let Some(conn) = kept.get(lane) {
                    return Ok(Conn::Standalone(conn));
                }
                let primary = sentinels.primary().await?;
                Ok(kept.keep(lane, primary.get_multiplexed_async_connection_with_config(&connection_config()).await?))
            }
            Commands::Cluster { write, read } => Ok(Conn::Cluster(match lane {
                Lane::Write => write.clone(),
                Lane::Read => read.clone(),
            })),
        }
    }

    /// The sentinels, under Sentinel.
    pub(super) fn sentinels(&self) -> Option<&Sentinels> {
        match self {
            Commands::Sentinel { sentinels, .. } => Some(sentinels),
            _ => None,
        }
    }

    /// Drops the kept connections after a failure (one Redis, Sentinel); a
    /// cluster connection re-dials the failed shard by itself.
    pub(super) fn invalidate(&self) {
        match self {
            Commands::Standalone { kept, .. } | Commands::Sentinel { kept, .. } => kept.clear(),
            Commands::Cluster { .. } => {}
        }
    }
}
