//! Where the registry's Redis is and how to reach it: the topology
//! (`--redis-mode`), the URLs (`--redis-url`, a comma list of seed nodes or
//! sentinels), the Sentinel primary's name and the TLS material beyond the
//! system's roots (`--redis-tls-*`).

use ::redis::{Client, ClientTlsConfig, IntoConnectionInfo, TlsCertificates};

/// What kind of Redis the registry talks to (`--redis-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Topology {
    /// One Redis (or a proxy that looks like one): a connection pool, classic pub/sub.
    #[default]
    Standalone,
    /// A Redis Cluster: slot-routed commands, sharded pub/sub (SPUBLISH / SSUBSCRIBE).
    Cluster,
    /// A primary managed by Redis Sentinel: the sentinels are asked for the primary, and
    /// asked again when it fails over.
    Sentinel,
}

impl Topology {
    /// Parses `standalone`, `cluster` or `sentinel`.
    pub fn parse(raw: &str) -> Result<Topology, String> {
        match raw {
            "standalone" => Ok(Topology::Standalone),
            "cluster" => Ok(Topology::Cluster),
            "sentinel" => Ok(Topology::Sentinel),
            _ => Err("expected standalone, cluster or sentinel".into()),
        }
    }
}

/// TLS material for `rediss://` beyond the system's roots.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// PEM CA bundle the servers' certificates are checked against (none: the system's roots).
    pub ca: Option<String>,
    /// PEM client certificate and key, for servers that require one (mutual TLS).
    pub client: Option<(String, String)>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.ca.as_ref().map(|_| "<PEM>"))
            .field("client", &self.client.as_ref().map(|_| "<PEM certificate and key>"))
            .finish()
    }
}

impl RedisTls {
    /// The certificates for redis-rs, when there is anything beyond the system's roots.
    pub(super) fn certificates(&self) -> Option<TlsCertificates> {
        if self.ca.is_none() && self.client.is_none() {
            return None;
        }
        Some(TlsCertificates {
            client_tls: self.client.as_ref().map(|(cert, key)| ClientTlsConfig {
                client_cert: cert.clone().into_bytes(),
                client_key: key.clone().into_bytes(),
            }),
            root_cert: self.ca.as_ref().map(|ca| ca.clone().into_bytes()),
        })
    }

    /// A client for `url` with this material.
    pub(super) fn client(&self, url: &str) -> ::redis::RedisResult<Client> {
        match self.certificates() {
            Some(certificates) => Client::build_with_tls(url, certificates),
            None => Client::open(url),
        }
    }
}

/// Where the registry's Redis is: one URL, a Redis Cluster's seed nodes (any
/// of them; the client reads the rest of the cluster from the first that
/// answers), or the sentinels watching a primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTarget {
    pub topology: Topology,
    pub urls: Vec<String>,
    /// The primary's name the sentinels know it by (`--redis-sentinel-master`).
    pub sentinel_master: String,
    pub tls: RedisTls,
}

/// The primary's name when none is given (the name in Redis's own sentinel.conf example).
pub const DEFAULT_SENTINEL_MASTER: &str = "mymaster";

impl RedisTarget {
    /// Reads `--redis-url` (a comma list of URLs in cluster and sentinel mode) for `topology`.
    pub fn parse(topology: Topology, raw: &str) -> Result<RedisTarget, String> {
        let urls: Vec<String> = raw.split(',').map(str::trim).filter(|u| !u.is_empty()).map(String::from).collect();
        if urls.is_empty() {
            return Err("no Redis URL".into());
        }
        for url in &urls {
            url.as_str().into_connection_info().map_err(|e| format!("not a Redis URL ({e})"))?;
        }
        if topology == Topology::Standalone && urls.len() > 1 {
            return Err("a list of Redis URLs needs --redis-mode cluster or sentinel".into());
        }
        Ok(RedisTarget { topology, urls, sentinel_master: DEFAULT_SENTINEL_MASTER.into(), tls: RedisTls::default() })
    }

    /// One Redis at `url`.
    pub fn standalone(url: &str) -> RedisTarget {
        RedisTarget {
            topology: Topology::Standalone,
            urls: vec![url.to_string()],
            sentinel_master: DEFAULT_SENTINEL_MASTER.into(),
            tls: RedisTls::default(),
        }
    }

    /// A Redis Cluster reached through the seed nodes `urls`.
    pub fn cluster<S: AsRef<str>>(urls: &[S]) -> RedisTarget {
        RedisTarget { topology: Topology::Cluster, ..Self::listed(urls) }
    }

    /// The primary the sentinels at `urls` know as `master`.
    pub fn sentinel<S: AsRef<str>>(urls: &[S], master: &str) -> RedisTarget {
        RedisTarget { topology: Topology::Sentinel, sentinel_master: master.to_string(), ..Self::listed(urls) }
    }

    fn listed<S: AsRef<str>>(urls: &[S]) -> RedisTarget {
        RedisTarget { urls: urls.iter().map(|u| u.as_ref().to_string()).collect(), ..Self::standalone("") }
    }

    /// The same target with TLS material beyond the system's roots.
    pub fn with_tls(self, tls: RedisTls) -> RedisTarget {
        RedisTarget { tls, ..self }
    }
}

impl From<&str> for RedisTarget {
    fn from(url: &str) -> Self {
        RedisTarget::standalone(url)
    }
}

impl From<&String> for RedisTarget {
    fn from(url: &String) -> Self {
        RedisTarget::standalone(url)
    }
}
