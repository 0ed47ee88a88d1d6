//! The node's command connections, to one Redis or to a Redis Cluster.
//!
//! On one Redis (`--redis-mode standalone`) calls take a multiplexed
//! connection from a `deadpool-redis` pool and keep it per [`Lane`]; a
//! transient failure drops the kept ones and the pool hands out validated or
//! new ones. On a Redis Cluster (`--redis-mode cluster`) each lane is one
//! redis-rs `ClusterConnection`: multiplexed, one socket per shard, following
//! MOVED and ASK and retrying TRYAGAIN and CLUSTERDOWN itself within a bound
//! ([`CLUSTER_RETRIES`] attempts, [`CLUSTER_MIN_RETRY_WAIT`] to
//! [`CLUSTER_MAX_RETRY_WAIT`] apart), and re-reading the slot map when a
//! shard moves. Both are [`Conn`], which every call site uses the same way.

use std::{sync::Mutex, time::Duration};

use ::redis::{
    Cmd, Pipeline, RedisFuture, Value,
    aio::{ConnectionLike, MultiplexedConnection},
    cluster::{ClusterClient, ClusterClientBuilder},
    cluster_async::ClusterConnection,
};
use deadpool_redis::{Connection, Pool};

use super::{CONNECT_TIMEOUT, RESPONSE_TIMEOUT, node::Failure};
use crate::sync::lock_unpoisoned;

/// Attempts of one command on a Redis Cluster before its error reaches the caller.
pub(super) const CLUSTER_RETRIES: u32 = 6;
/// First pause between attempts on a Redis Cluster (milliseconds; redis-rs's default is 1 280).
pub(super) const CLUSTER_MIN_RETRY_WAIT: u64 = 20;
/// Longest pause between attempts on a Redis Cluster (milliseconds).
pub(super) const CLUSTER_MAX_RETRY_WAIT: u64 = 500;

/// A cluster client for the seed `urls` with the registry's timeouts and retry bound.
pub(super) fn cluster_builder(urls: &[String]) -> ClusterClientBuilder {
    ClusterClient::builder(urls.iter().map(String::as_str))
        .retries(CLUSTER_RETRIES)
        .min_retry_wait(CLUSTER_MIN_RETRY_WAIT)
        .max_retry_wait(CLUSTER_MAX_RETRY_WAIT)
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT)
}

/// Which kept command connection a call uses: replay reads (possibly large)
/// do not queue in front of the owners' appends.
#[derive(Debug, Clone, Copy)]
pub(super) enum Lane {
    Write,
    Read,
}

/// One command connection, to one Redis or to a Redis Cluster.
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

/// The node's command connections.
pub(super) enum Commands {
    /// One Redis: a pool, and the connection kept per lane (taken from it).
    Standalone { pool: Pool, write: Mutex<Option<MultiplexedConnection>>, read: Mutex<Option<MultiplexedConnection>> },
    /// A Redis Cluster: one self-healing cluster connection per lane.
    Cluster { write: ClusterConnection, read: ClusterConnection },
}

impl Commands {
    pub(super) fn standalone(pool: Pool) -> Self {
        Commands::Standalone { pool, write: Mutex::new(None), read: Mutex::new(None) }
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
            Commands::Standalone { pool, write, read } => {
                let slot = match lane {
                    Lane::Write => write,
                    Lane::Read => read,
                };
                if let Some(conn) = lock_unpoisoned(slot).clone() {
                    return Ok(Conn::Standalone(conn));
                }
                let fresh = Connection::take(pool.get().await?);
                *lock_unpoisoned(slot) = Some(fresh.clone());
                Ok(Conn::Standalone(fresh))
            }
            Commands::Cluster { write, read } => Ok(Conn::Cluster(match lane {
                Lane::Write => write.clone(),
                Lane::Read => read.clone(),
            })),
        }
    }

    /// Drops the kept connections after a failure (one Redis); a cluster
    /// connection re-dials the failed shard by itself.
    pub(super) fn invalidate(&self) {
        if let Commands::Standalone { write, read, .. } = self {
            *lock_unpoisoned(write) = None;
            *lock_unpoisoned(read) = None;
        }
    }
}
