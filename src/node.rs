//! One gateway node: wiring (store, registry, runtimes, gateway, router),
//! serving, and the SIGTERM drain.

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::{
    net::{TcpListener, TcpSocket},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use crate::{
    api::{self, ApiSettings, AppState},
    auth::Auth,
    config::{Config, ConfigError},
    gateway::{Gateway, GatewaySettings, LimitSettings, Workspaces, limits::Limit},
    runs::{
        SharedRegistry,
        memory::MemoryRegistry,
        redis::{RedisRegistry, RedisRegistryOptions},
    },
    runtime::{
        RuntimeSettings, build_runtimes,
        sandbox::{Containment, ContainmentOptions, EnvPolicy, RunLimits, SandboxError, SandboxMode},
    },
    store::{Store, StoreError},
};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("--database-url: {0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("run registry: {0}")]
    Registry(String),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

/// The containment of the node's provider CLIs, from the flags.
fn containment_options(config: &Config, workspaces: &Workspaces) -> ContainmentOptions {
    let mut protected = config.sqlite_files();
    protected.extend(config.secret_files());
    protected.push(workspaces.homes_root.clone());
    ContainmentOptions {
        sandbox: config.sandbox,
        bwrap_bin: config.bwrap_bin.clone(),
        ro_paths: config.sandbox_ro_paths.clone(),
        protected,
        env: EnvPolicy {
            pass: config.provider_env.clone().unwrap_or_default().0,
            from_files: config.provider_env_file.clone().unwrap_or_default().0,
        },
        limits: RunLimits {
            memory: config.run_memory as u64,
            processes: config.run_processes,
            file_size: config.run_file_size as u64,
            cpu_time: config.run_cpu_time,
        },
    }
}

/// A started node.
pub struct Node {
    pub addr: SocketAddr,
    /// The internal port's address (`--internal-listen`), when there is one.
    pub internal_addr: Option<SocketAddr>,
    pub node_id: String,
    pub gateway: Arc<Gateway>,
    pub auth: Arc<Auth>,
    stop_serving: CancellationToken,
    server: JoinHandle<()>,
    internal_server: Option<JoinHandle<()>>,
    drain_grace: Duration,
}

/// The process-wide Prometheus recorder (installed once; nodes in one process share it).
fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0];
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .ok()?
                .install_recorder()
                .ok()
                .inspect(|_| register_families())
        })
        .clone()
}

/// Describes every family and sets it to zero, so `/metrics` shows them from the start.
fn register_families() {
    use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge};
    describe_gauge!("chatgate_connections", "Open WebSocket connections");
    describe_gauge!("chatgate_subscriptions", "Session subscriptions of open sockets");
    describe_gauge!("chatgate_runs", "Runs owned by this node, by state");
    describe_gauge!("chatgate_runs_max", "Runs this node may own at once (--max-runs)");
    describe_gauge!("chatgate_sandbox_active", "1 when provider CLIs run in the bubblewrap sandbox, else 0");
    describe_counter!("chatgate_runs_total", "Finished runs, by outcome");
    describe_counter!("chatgate_events_appended_total", "Events appended by runs this node owns");
    describe_counter!("chatgate_events_delivered_total", "Live events queued to sockets");
    describe_counter!("chatgate_subscribes_total", "chat.subscribe targets served");
    describe_counter!("chatgate_replayed_events_total", "Events replayed to subscribers");
    describe_counter!("chatgate_replay_truncated_total", "Subscriptions told replayTruncated");
    describe_counter!("chatgate_slow_consumer_closes_total", "Sockets closed with 4008");
    describe_counter!("chatgate_backend_errors_total", "Failed database or Redis operations");
    describe_counter!("chatgate_protocol_errors_total", "protocol_error frames sent, by code");
    describe_counter!("chatgate_frames_received_total", "Inbound text frames");
    describe_histogram!("chatgate_append_seconds", "Latency of one registry append (batch)");
    describe_histogram!("chatgate_run_seconds", "Run duration");
    describe_histogram!("chatgate_pubsub_lag_seconds", "Age of a live event when its pub/sub message reaches a node");
    describe_counter!("chatgate_redis_round_trips_total", "Redis commands and scripts sent (cluster mode)");
    describe_histogram!("chatgate_redis_append_batch_events", "Events per append script call (cluster mode)");
    describe_counter!("chatgate_redis_fenced_writes_total", "Appends refused because the run lost its lock");
    describe_counter!("chatgate_redis_probe_failures_total", "Pub/sub probes that went unanswered");
    describe_counter!("chatgate_redis_pubsub_reconnects_total", "Pub/sub connections re-dialled");
    describe_counter!("chatgate_runs_reaped_total", "Orphaned runs ended with \"run owner lost\"");
    describe_counter!(
        "chatgate_limit_refusals_total",
        "Abuse-limit refusals, by limit (refused upgrades, requests and verbs, dropped frames, cut replays)"
    );
    for limit in Limit::ALL {
        counter!("chatgate_limit_refusals_total", "limit" => limit.label()).absolute(0);
    }
    gauge!("chatgate_connections").set(0.0);
    gauge!("chatgate_subscriptions").set(0.0);
    gauge!("chatgate_runs", "state" => "running").set(0.0);
    for outcome in ["success", "failure", "aborted", "lease_lost"] {
        counter!("chatgate_runs_total", "outcome" => outcome).absolute(0);
    }
    for name in [
        "chatgate_events_appended_total",
        "chatgate_events_delivered_total",
        "chatgate_subscribes_total",
        "chatgate_replayed_events_total",
        "chatgate_replay_truncated_total",
        "chatgate_slow_consumer_closes_total",
        "chatgate_frames_received_total",
    ] {
        counter!(name).absolute(0);
    }
    for backend in ["database", "redis"] {
        counter!("chatgate_backend_errors_total", "backend" => backend).absolute(0);
    }
}

impl Node {
    /// Connects everything and starts serving. `secret` is the JWT secret to use.
    pub async fn start(config: &Config, secret: &str) -> Result<Node, NodeError> {
        config.validate()?;
        let node_id = config.node_id();
        let workspaces_root = config.workspaces_root()?;
        let workspaces = Workspaces {
            layout: config.workspace_layout,
            homes_root: config.homes_root(&workspaces_root)?,
            root: workspaces_root,
        };
        let containment = Arc::new(Containment::new(containment_options(config, &workspaces)).await?);
        let metrics = metrics_handle();
        let sandboxed = containment.mode() == SandboxMode::Bwrap;
        metrics::gauge!("chatgate_sandbox_active").set(if sandboxed { 1.0 } else { 0.0 });
        let store = Store::connect(&config.database_url).await?;
        store.migrate().await?;
        let registry: SharedRegistry = match config.redis_target() {
            None => Arc::new(MemoryRegistry::new(
                config.replay_max_events,
                config.replay_retention,
                config.idempotency_window,
            )),
            Some(target) => {
                let target = target.map_err(|e| NodeError::Registry(format!("--redis-url: {e}")))?;
                let options = RedisRegistryOptions {
                    lease: config.run_lease,
                    max_events: config.replay_max_events,
                    retention: config.replay_retention,
                    idempotency_window: config.idempotency_window,
                };
                let registry = RedisRegistry::connect(target, &node_id, options)
                    .await
                    .map_err(|e| NodeError::Registry(format!("--redis-url: {e}")))?;
                Arc::new(registry)
            }
        };
        let runtimes = build_runtimes(&config.providers.0, &runtime_settings(config));
        let settings = GatewaySettings {
            node_id: node_id.clone(),
            workspaces,
            containment,
            max_runs: config.max_runs,
            run_lease: config.run_lease,
            send_queue_bytes: config.send_queue_bytes,
            allow_bypass_permissions: config.allow_bypass_permissions,
            limits: limit_settings(config),
            replay_max_events: config.replay_max_events,
        };
        let gateway = Gateway::new(settings, store, registry, runtimes);
        let auth = Arc::new(Auth::new(secret.as_bytes()));
        let state = AppState {
            gateway: gateway.clone(),
            auth: auth.clone(),
            settings: Arc::new(ApiSettings {
                allowed_origins: config.allowed_origins.clone(),
                max_frame_bytes: config.max_frame_bytes,
                send_queue_bytes: config.send_queue_bytes,
                ping_interval: config.ping_interval,
                max_body_bytes: config.max_body_bytes,
                body_timeout: config.handshake_timeout,
                providers: api::provider_programs(config),
            }),
            metrics,
            connection_limits: Arc::new(api::admission::ConnectionLimits::new(limit_settings(config))),
        };
        let listener = listen(config.listen, config.listen_backlog)
            .map_err(|source| NodeError::Listen { addr: config.listen, source })?;
        let addr = listener.local_addr().map_err(|source| NodeError::Listen { addr: config.listen, source })?;
        let stop_serving = CancellationToken::new();
        let (internal_addr, internal_server) = match config.internal_listen {
            Some(internal) => {
                let listener =
                    TcpListener::bind(internal).await.map_err(|source| NodeError::Listen { addr: internal, source })?;
                let addr = listener.local_addr().map_err(|source| NodeError::Listen { addr: internal, source })?;
                let router = api::internal_router(state.clone());
                let server =
                    tokio::spawn(api::serve::serve(listener, router, config.handshake_timeout, stop_serving.clone()));
                tracing::info!(%addr, "internal port (/metrics, /healthz, /readyz) listening");
                (Some(addr), Some(server))
            }
            None => (None, None),
        };
        let server = tokio::spawn(api::serve::serve(
            listener,
            api::router(state, internal_addr.is_none()),
            config.handshake_timeout,
            stop_serving.clone(),
        ));
        if config.redis_url.is_some() && config.database_url.starts_with("sqlite:") {
            tracing::warn!(
                "cluster mode with a SQLite --database-url: every node must share one database; use postgres://… \
                 unless this is the only node"
            );
        }
        tracing::info!(%addr, node_id = %node_id, cluster = config.redis_url.is_some(), "chatgate node listening");
        Ok(Node {
            addr,
            internal_addr,
            node_id,
            gateway,
            auth,
            stop_serving,
            server,
            internal_server,
            drain_grace: config.drain_grace,
        })
    }

    /// SIGTERM behaviour: readiness off, sockets closed with 1012, no new runs,
    /// runs get the drain grace, the rest end with a terminal `complete`.
    pub async fn drain(self) {
        tracing::info!(runs = self.gateway.local_run_count(), "draining");
        // HTTP keeps serving while runs finish: /readyz answers 503, upgrades are refused.
        self.gateway.drain(self.drain_grace).await;
        self.stop_serving.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.server).await;
        if let Some(internal) = self.internal_server {
            let _ = tokio::time::timeout(Duration::from_secs(5), internal).await;
        }
        self.gateway.store.close().await;
        self.gateway.settings.containment.shut_down();
        tracing::info!("drained");
    }
}

/// The node's abuse limits, from its configuration.
pub fn limit_settings(config: &Config) -> LimitSettings {
    LimitSettings {
        conn_rate_per_ip: config.conn_rate_per_ip,
        conn_burst_per_ip: config.conn_burst_per_ip,
        trusted_proxies: config.trusted_proxies.clone().unwrap_or_default(),
        max_sockets_per_user: config.max_sockets_per_user,
        max_subscriptions_per_socket: config.max_subscriptions_per_socket,
        max_sends_per_minute: config.max_sends_per_minute,
        frame_rate: config.frame_rate,
        frame_burst: config.frame_burst,
        max_replay_bytes: config.max_replay_bytes,
    }
}

/// The runtimes' settings, from the node's configuration.
fn runtime_settings(config: &Config) -> RuntimeSettings {
    RuntimeSettings {
        claude_bin: config.claude_bin.clone(),
        codex_bin: config.codex_bin.clone(),
        cursor_bin: config.cursor_bin.clone(),
        gemini_bin: config.gemini_bin.clone(),
        opencode_bin: config.opencode_bin.clone(),
        claude_approval_timeout: config.claude_approval_timeout,
    }
}

/// A listener on `addr` with a listen backlog of `backlog` (`TcpListener::bind` uses 1 024).
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // As `TcpListener::bind` does: a restarted node rebinds while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}
