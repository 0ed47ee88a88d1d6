//! The soak's Redis: one private `redis-server` (the default; its fault is a restart that
//! leaves it empty), or with `--redis-cluster` a private Redis Cluster of 3 primaries with
//! 1 replica each (its faults kill a primary and migrate live sessions' slots:
//! [`super::cluster_faults`]). Either way: the URL and mode the nodes start with, and the
//! servers whose keys and memory the usage checks add up (every live primary).

use std::sync::{Arc, Mutex};

use chatgate_testkit::{redis::PrivateRedis, redis_cluster::PrivateRedisCluster};

use crate::redis_shards;

/// Primaries and replicas per primary of the soak's cluster.
pub const CLUSTER_PRIMARIES: u16 = 3;
pub const CLUSTER_REPLICAS: u16 = 1;

pub enum SoakRedis {
    Single {
        server: tokio::sync::Mutex<PrivateRedis>,
        url: String,
    },
    /// Behind a blocking mutex: the kit's cluster calls block (they poll with sleeps), so the
    /// fault injector runs them on a blocking thread.
    Cluster {
        cluster: Arc<Mutex<PrivateRedisCluster>>,
        seeds: Vec<u16>,
    },
}

impl SoakRedis {
    /// A private server on `port`.
    pub fn single(port: u16) -> anyhow::Result<SoakRedis> {
        let server = PrivateRedis::start_on(port)?;
        let url = server.url();
        Ok(SoakRedis::Single { server: tokio::sync::Mutex::new(server), url })
    }

    /// A private cluster of [`CLUSTER_PRIMARIES`] × (1 + [`CLUSTER_REPLICAS`]) servers.
    pub async fn cluster() -> anyhow::Result<SoakRedis> {
        let cluster =
            tokio::task::spawn_blocking(|| PrivateRedisCluster::start(CLUSTER_PRIMARIES, CLUSTER_REPLICAS)).await??;
        let seeds = cluster.ports().to_vec();
        Ok(SoakRedis::Cluster { cluster: Arc::new(Mutex::new(cluster)), seeds })
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, SoakRedis::Cluster { .. })
    }

    /// The nodes' `--redis-url` and `--redis-mode`.
    pub fn node_args(&self) -> Vec<String> {
        match self {
            SoakRedis::Single { url, .. } => vec!["--redis-url".into(), url.clone()],
            SoakRedis::Cluster { seeds, .. } => {
                let list: Vec<String> = seeds.iter().map(|p| format!("redis://127.0.0.1:{p}")).collect();
                vec!["--redis-url".into(), list.join(","), "--redis-mode".into(), "cluster".into()]
            }
        }
    }

    /// The ports of the servers that hold the keys now: the one server, or every live
    /// primary of the cluster.
    pub async fn key_holders(&self) -> anyhow::Result<Vec<u16>> {
        match self {
            SoakRedis::Single { url, .. } => {
                let port = url.rsplit(':').next().and_then(|p| p.parse().ok());
                Ok(port.into_iter().collect())
            }
            SoakRedis::Cluster { seeds, .. } => redis_shards::primaries(seeds).await,
        }
    }

    /// Kills every server.
    pub async fn stop(self) {
        match self {
            SoakRedis::Single { server, .. } => server.into_inner().kill(),
            SoakRedis::Cluster { cluster, .. } => {
                // Dropping the last handle kills every node of the cluster.
                let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
            }
        }
    }
}
