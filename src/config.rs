//! Command line and environment configuration (README §Configuration, docs/protocol.md §Process and configuration).
//!
//! Every flag has an environment variable and the flag wins. Values are parsed
//! and checked here so that a bad one stops the process at start with one line
//! naming the flag (exit code 2); the rest of the crate only sees [`Config`].

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    gateway::workspaces::WorkspaceLayout,
    runs::redis::{DEFAULT_SENTINEL_MASTER, RedisTarget, RedisTls, Topology},
    runtime::sandbox::SandboxSetting,
};

/// Provider runtimes chatgate knows how to run.
pub const KNOWN_PROVIDERS: [&str; 6] = ["claude", "codex", "cursor", "gemini", "opencode", "script"];

/// `chatgate` command line. The node's flags may come before no subcommand
/// (`chatgate --listen …`, which serves) or after `serve`.
#[derive(Debug, Parser)]
#[command(
    name = "chatgate",
    version,
    about = "Horizontally scalable WebSocket gateway for AI coding-agent chat runs",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

/// Subcommands; `serve` is the default.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a gateway node (the default).
    Serve(Box<ServeArgs>),
    /// Print a JWT for a user, signed with the gateway's secret.
    Token(TokenArgs),
    /// Apply database migrations and exit.
    Migrate(MigrateArgs),
}

/// `chatgate serve`: the node's flags.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: Config,
}

/// `chatgate token`: what minting a token needs, and nothing else.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The user id to put in the `userId` claim.
    #[arg(long, value_parser = parse_user_id)]
    pub user: String,
    /// Lifetime of the token (`ms`, `s`, `m`, `h`).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// HS256 secret (default: the one a quick-start gateway keeps beside its SQLite database).
    #[arg(long, env = "CHATGATE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// A file holding the secret.
    #[arg(long, env = "CHATGATE_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// The gateway's database, to find the secret kept beside it (`<name>.secret`).
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, value_parser = parse_database_url, hide_env_values = true)]
    pub database_url: String,
}

/// `chatgate migrate`: the database only.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// Sessions and history database (`sqlite://…` or `postgres://…`).
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, value_parser = parse_database_url, hide_env_values = true)]
    pub database_url: String,
    /// A file holding the database URL (wins over --database-url).
    #[arg(long, env = "DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,
}

/// The embedded default database.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://chatgate.db?mode=rwc";

impl TokenArgs {
    /// The secret to sign with: the flag or its file, else the quick-start
    /// secret file beside the SQLite database (which must exist).
    pub fn secret(&self) -> Result<String, ConfigError> {
        if let Some(path) = &self.jwt_secret_file {
            return read_secret("--jwt-secret-file", path);
        }
        if let Some(secret) = &self.jwt_secret {
            return Ok(secret.clone());
        }
        let Some(path) = quickstart_secret_path(&self.database_url) else {
            return Err(ConfigError::TokenWithoutSecret);
        };
        if !path.exists() {
            return Err(ConfigError::NoQuickstartSecret { path: path.display().to_string() });
        }
        read_secret("the quick-start secret", &path)
    }
}

impl MigrateArgs {
    /// The database URL, from its file when one is given.
    pub fn database_url(&self) -> Result<String, ConfigError> {
        match &self.database_url_file {
            None => Ok(self.database_url.clone()),
            Some(path) => parse_database_url(&read_secret("--database-url-file", path)?)
                .map_err(|reason| ConfigError::SecretValue { flag: "--database-url-file", reason }),
        }
    }
}

/// Where a gateway without `--jwt-secret` keeps its generated secret: beside
/// its SQLite database file, named after it (`chatgate.db` → `chatgate.secret`).
/// `None` for an in-memory or PostgreSQL database.
pub fn quickstart_secret_path(database_url: &str) -> Option<PathBuf> {
    let database = sqlite_path(database_url)?;
    Some(database.with_extension("secret"))
}

/// The file of a `sqlite:` URL, made absolute; `None` for memory or another database.
fn sqlite_path(database_url: &str) -> Option<PathBuf> {
    let rest = database_url.strip_prefix("sqlite:")?;
    let path = rest.trim_start_matches("//");
    let path = path.split('?').next().unwrap_or("");
    if path.is_empty() || path.starts_with(":memory:") {
        return None;
    }
    Some(std::path::absolute(path).unwrap_or_else(|_| PathBuf::from(path)))
}

/// Node configuration: every flag of README §Configuration.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// HTTP + WebSocket address.
    #[arg(long, env = "CHATGATE_LISTEN", default_value = "127.0.0.1:3001")]
    pub listen: SocketAddr,
    /// Internal address serving `/metrics`, `/healthz` and `/readyz` only (for probes and
    /// Prometheus); when set, the public address no longer serves them.
    #[arg(long, env = "CHATGATE_INTERNAL_LISTEN")]
    pub internal_listen: Option<SocketAddr>,
    /// Connections the kernel queues for the public address before they are accepted
    /// (the listen backlog; Linux caps it at `net.core.somaxconn`). A reconnect storm
    /// beyond it costs clients a SYN retransmit (1 s, then 3 s).
    #[arg(long, env = "CHATGATE_LISTEN_BACKLOG", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub listen_backlog: u32,
    /// Sessions and history database (`sqlite://…` or `postgres://…`).
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, value_parser = parse_database_url, hide_env_values = true)]
    pub database_url: String,
    /// Redis URL; set = cluster mode. With --redis-mode cluster, a comma list of seed nodes.
    #[arg(long, env = "REDIS_URL", value_parser = parse_redis_url, hide_env_values = true)]
    pub redis_url: Option<String>,
    /// `standalone` (one Redis), `cluster` (a Redis Cluster: slot-routed commands, sharded
    /// pub/sub) or `sentinel` (--redis-url lists the sentinels of a managed primary).
    #[arg(long, env = "CHATGATE_REDIS_MODE", default_value = "standalone", value_parser = Topology::parse)]
    pub redis_mode: Topology,
    /// The primary's name the sentinels know it by (--redis-mode sentinel).
    #[arg(long, env = "CHATGATE_REDIS_SENTINEL_MASTER", default_value = DEFAULT_SENTINEL_MASTER)]
    pub redis_sentinel_master: String,
    /// PEM CA bundle for rediss:// (default: the system's roots).
    #[arg(long, env = "CHATGATE_REDIS_TLS_CA", hide_env_values = true)]
    pub redis_tls_ca: Option<String>,
    /// PEM client certificate for rediss:// servers that require one (with --redis-tls-key).
    #[arg(long, env = "CHATGATE_REDIS_TLS_CERT", hide_env_values = true)]
    pub redis_tls_cert: Option<String>,
    /// PEM key of --redis-tls-cert (prefer the environment or the file: a flag is visible in /proc).
    #[arg(long, env = "CHATGATE_REDIS_TLS_KEY", hide_env_values = true)]
    pub redis_tls_key: Option<String>,
    /// A file holding --redis-tls-ca (wins over it).
    #[arg(long, env = "CHATGATE_REDIS_TLS_CA_FILE")]
    pub redis_tls_ca_file: Option<PathBuf>,
    /// A file holding --redis-tls-cert (wins over it).
    #[arg(long, env = "CHATGATE_REDIS_TLS_CERT_FILE")]
    pub redis_tls_cert_file: Option<PathBuf>,
    /// A file holding --redis-tls-key (wins over it).
    #[arg(long, env = "CHATGATE_REDIS_TLS_KEY_FILE")]
    pub redis_tls_key_file: Option<PathBuf>,
    /// HS256 secret for JWTs (prefer --jwt-secret-file or the environment: a flag is visible in /proc).
    #[arg(long, env = "CHATGATE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// A file holding the JWT secret (wins over --jwt-secret).
    #[arg(long, env = "CHATGATE_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// A file holding the database URL (wins over --database-url).
    #[arg(long, env = "DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,
    /// A file holding the Redis URL (wins over --redis-url).
    #[arg(long, env = "REDIS_URL_FILE")]
    pub redis_url_file: Option<PathBuf>,
    /// This node's name in locks, logs and metrics.
    #[arg(long, env = "CHATGATE_NODE_ID", value_parser = parse_node_id)]
    pub node_id: Option<String>,
    /// Enabled provider runtimes (comma list).
    #[arg(long, env = "CHATGATE_PROVIDERS", default_value = "claude,codex,cursor,gemini,opencode,script", value_parser = parse_providers)]
    pub providers: ProviderList,
    /// Every projectPath resolves inside this directory (default: ./workspaces per-user, $HOME shared).
    #[arg(long, env = "CHATGATE_WORKSPACES_ROOT")]
    pub workspaces_root: Option<PathBuf>,
    /// `per-user` (each user's projects in <workspaces-root>/<user>) or `shared`.
    #[arg(long, env = "CHATGATE_WORKSPACE_LAYOUT", default_value = "per-user", value_parser = WorkspaceLayout::parse)]
    pub workspace_layout: WorkspaceLayout,
    /// Each user's provider home (the CLIs' HOME) is <homes-root>/<user> (default: ./chatgate-homes).
    #[arg(long, env = "CHATGATE_HOMES_ROOT")]
    pub homes_root: Option<PathBuf>,
    /// `auto` (bubblewrap when it works here), `bwrap` (required) or `none`.
    #[arg(long, env = "CHATGATE_SANDBOX", default_value = "auto", value_parser = SandboxSetting::parse)]
    pub sandbox: SandboxSetting,
    /// Extra host paths the sandbox sees read-only (comma list).
    #[arg(long, env = "CHATGATE_SANDBOX_RO_PATHS", value_delimiter = ',')]
    pub sandbox_ro_paths: Vec<PathBuf>,
    /// The bubblewrap program.
    #[arg(long, env = "CHATGATE_BWRAP_BIN", default_value = "bwrap")]
    pub bwrap_bin: String,
    /// Variables passed from this environment to every provider CLI (comma list of names).
    #[arg(long, env = "CHATGATE_PROVIDER_ENV", value_parser = parse_env_names)]
    pub provider_env: Option<EnvNames>,
    /// `NAME=/path/file` pairs: each CLI gets NAME set to the file's contents (comma list).
    #[arg(long, env = "CHATGATE_PROVIDER_ENV_FILE", value_parser = parse_env_files)]
    pub provider_env_file: Option<EnvFiles>,
    /// Concurrent runs this node owns (NODE_BUSY above it).
    #[arg(long, env = "CHATGATE_MAX_RUNS", default_value = "32", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_runs: u32,
    /// Memory of one run (RLIMIT_DATA per process; the run's memory cgroup where one can be made).
    #[arg(long, env = "CHATGATE_RUN_MEMORY", default_value = "4GiB", value_parser = parse_size)]
    pub run_memory: usize,
    /// Processes of one run (its pids cgroup where one can be made, else RLIMIT_NPROC).
    #[arg(long, env = "CHATGATE_RUN_PROCESSES", default_value = "256", value_parser = clap::value_parser!(u64).range(8..))]
    pub run_processes: u64,
    /// Largest file a run may write.
    #[arg(long, env = "CHATGATE_RUN_FILE_SIZE", default_value = "1GiB", value_parser = parse_size)]
    pub run_file_size: usize,
    /// CPU time of each process of a run.
    #[arg(long, env = "CHATGATE_RUN_CPU_TIME", default_value = "1h", value_parser = parse_positive_duration)]
    pub run_cpu_time: Duration,
    /// Run lock lease; renewed every third of it.
    #[arg(long, env = "CHATGATE_RUN_LEASE", default_value = "15s", value_parser = parse_lease)]
    pub run_lease: Duration,
    /// How long a finished run's events stay replayable.
    #[arg(long, env = "CHATGATE_REPLAY_RETENTION", default_value = "5m", value_parser = parse_duration)]
    pub replay_retention: Duration,
    /// How long a session remembers a `chat.send`'s `clientRequestId`: a resend with the
    /// same key within it starts nothing and is told what became of the first.
    #[arg(long, env = "CHATGATE_IDEMPOTENCY_WINDOW", default_value = "1h", value_parser = parse_positive_duration)]
    pub idempotency_window: Duration,
    /// Newest events kept per session for replay.
    #[arg(long, env = "CHATGATE_REPLAY_MAX_EVENTS", default_value = "10000", value_parser = clap::value_parser!(u64).range(1..))]
    pub replay_max_events: u64,
    /// Comma list of allowed browser Origins (unset: any).
    #[arg(long, env = "CHATGATE_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
    /// Largest inbound frame.
    #[arg(long, env = "CHATGATE_MAX_FRAME_BYTES", default_value = "8MiB", value_parser = parse_size)]
    pub max_frame_bytes: usize,
    /// Unsent bytes after which a socket is a slow consumer (closed with 4008).
    #[arg(long, env = "CHATGATE_SEND_QUEUE_BYTES", default_value = "8MiB", value_parser = parse_size)]
    pub send_queue_bytes: usize,
    /// On SIGTERM, how long runs may finish before they are ended.
    #[arg(long, env = "CHATGATE_DRAIN_GRACE", default_value = "25s", value_parser = parse_duration)]
    pub drain_grace: Duration,
    /// `text` or `json`.
    #[arg(long, env = "CHATGATE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Claude Code CLI program.
    #[arg(long, env = "CHATGATE_CLAUDE_BIN", default_value = "claude")]
    pub claude_bin: String,
    /// Codex CLI program.
    #[arg(long, env = "CHATGATE_CODEX_BIN", default_value = "codex")]
    pub codex_bin: String,
    /// Cursor agent CLI program.
    #[arg(long, env = "CHATGATE_CURSOR_BIN", default_value = "cursor-agent")]
    pub cursor_bin: String,
    /// Gemini CLI program.
    #[arg(long, env = "CHATGATE_GEMINI_BIN", default_value = "gemini")]
    pub gemini_bin: String,
    /// OpenCode CLI program.
    #[arg(long, env = "CHATGATE_OPENCODE_BIN", default_value = "opencode")]
    pub opencode_bin: String,
    /// How long a Claude tool approval waits for an answer (none for AskUserQuestion and ExitPlanMode).
    #[arg(long, env = "CHATGATE_CLAUDE_APPROVAL_TIMEOUT", default_value = "55s", value_parser = parse_duration)]
    pub claude_approval_timeout: Duration,
    /// Let clients ask for `permissionMode: bypassPermissions` / `skipPermissions`.
    #[arg(long, env = "CHATGATE_ALLOW_BYPASS_PERMISSIONS")]
    pub allow_bypass_permissions: bool,
    /// New WebSocket connections per second per client IP (token bucket, sustained rate).
    #[arg(long, env = "CHATGATE_CONN_RATE_PER_IP", default_value = "20", value_parser = clap::value_parser!(u32).range(1..))]
    pub conn_rate_per_ip: u32,
    /// New WebSocket connections one client IP may open at once (token bucket size).
    #[arg(long, env = "CHATGATE_CONN_BURST_PER_IP", default_value = "100", value_parser = clap::value_parser!(u32).range(1..))]
    pub conn_burst_per_ip: u32,
    /// Comma list of proxy addresses or CIDRs whose `X-Forwarded-For` names the client (unset: the peer address is the client).
    #[arg(long, env = "CHATGATE_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_ip_net)]
    pub trusted_proxies: Option<Vec<ipnet::IpNet>>,
    /// Open WebSockets per user on one node.
    #[arg(long, env = "CHATGATE_MAX_SOCKETS_PER_USER", default_value = "100", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_sockets_per_user: u32,
    /// Session subscriptions per socket.
    #[arg(long, env = "CHATGATE_MAX_SUBSCRIPTIONS_PER_SOCKET", default_value = "1000", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_subscriptions_per_socket: u32,
    /// `chat.send` per user per minute, across the cluster.
    #[arg(long, env = "CHATGATE_MAX_SENDS_PER_MINUTE", default_value = "120", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_sends_per_minute: u32,
    /// Inbound frames per second per socket (token bucket, sustained rate).
    #[arg(long, env = "CHATGATE_FRAME_RATE", default_value = "100", value_parser = clap::value_parser!(u32).range(1..))]
    pub frame_rate: u32,
    /// Inbound frames one socket may send at once (token bucket size).
    #[arg(long, env = "CHATGATE_FRAME_BURST", default_value = "200", value_parser = clap::value_parser!(u32).range(1..))]
    pub frame_burst: u32,
    /// How long a client may take to send its HTTP request headers, and a REST request its body (slowloris guard; also the keep-alive idle limit).
    #[arg(long, env = "CHATGATE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub handshake_timeout: Duration,
    /// Largest REST request body.
    #[arg(long, env = "CHATGATE_MAX_BODY_BYTES", default_value = "64KiB", value_parser = parse_size)]
    pub max_body_bytes: usize,
    /// Replayed bytes one `chat.subscribe` target may send; beyond, only the newest events, with `replayTruncated`.
    #[arg(long, env = "CHATGATE_MAX_REPLAY_BYTES", default_value = "4MiB", value_parser = parse_size)]
    pub max_replay_bytes: usize,
    /// Interval of server pings (a socket missing two pongs is dropped). For tests.
    #[arg(long, env = "CHATGATE_PING_INTERVAL", default_value = "30s", value_parser = parse_duration, hide = true)]
    pub ping_interval: Duration,
}

/// The parsed `--providers` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderList(pub Vec<String>);

impl ProviderList {
    pub fn contains(&self, provider: &str) -> bool {
        self.0.iter().any(|p| p == provider)
    }
}

/// A configuration that cannot work, found after parsing.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--jwt-secret (CHATGATE_JWT_SECRET) is required when --redis-url is set")]
    ClusterWithoutSecret,
    #[error("--redis-url: {0}")]
    RedisUrl(String),
    #[error(
        "--jwt-secret (CHATGATE_JWT_SECRET) or --jwt-secret-file is required to mint tokens for a gateway on PostgreSQL or in memory"
    )]
    TokenWithoutSecret,
    #[error(
        "no --jwt-secret given and no quick-start secret at {path}: start the gateway once (it makes that file), or pass --jwt-secret-file"
    )]
    NoQuickstartSecret { path: String },
    #[error("--workspaces-root: cannot resolve {path}: {reason}")]
    WorkspacesRoot { path: String, reason: String },
    #[error("--homes-root: cannot make {path}: {reason}")]
    HomesRoot { path: String, reason: String },
    #[error(
        "--homes-root ({homes}) and --workspaces-root ({workspaces}) must not contain each other: a projectPath \
         could reach other users' provider homes"
    )]
    HomesInsideWorkspaces { homes: String, workspaces: String },
    #[error("{flag}: cannot read {path}: {reason}")]
    SecretFile { flag: &'static str, path: String, reason: String },
    #[error("{flag}: {reason}")]
    SecretValue { flag: &'static str, reason: String },
}

impl Config {
    /// Checks the cross-flag rules that clap cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.redis_url.is_some() && self.jwt_secret.is_none() {
            return Err(ConfigError::ClusterWithoutSecret);
        }
        self.redis_target().transpose().map_err(ConfigError::RedisUrl)?;
        Ok(())
    }

    /// Where the Redis registry connects (`--redis-url` read for `--redis-mode`, the Sentinel
    /// primary's name, the TLS material); `None` on one node.
    pub fn redis_target(&self) -> Option<Result<RedisTarget, String>> {
        let raw = self.redis_url.as_deref()?;
        let target = RedisTarget::parse(self.redis_mode, raw).and_then(|target| {
            let client = match (&self.redis_tls_cert, &self.redis_tls_key) {
                (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
                (None, None) => None,
                _ => return Err("--redis-tls-cert and --redis-tls-key go together".to_string()),
            };
            let tls = RedisTls { ca: self.redis_tls_ca.clone(), client };
            let uses_tls = target.urls.iter().any(|url| url.starts_with("rediss://"));
            if tls != RedisTls::default() && !uses_tls {
                return Err("--redis-tls-* are for rediss:// URLs".to_string());
            }
            Ok(RedisTarget { sentinel_master: self.redis_sentinel_master.clone(), ..target.with_tls(tls) })
        });
        Some(target)
    }

    /// `--node-id`, or the host name with a random suffix.
    pub fn node_id(&self) -> String {
        match &self.node_id {
            Some(id) => id.clone(),
            None => {
                let host = gethostname::gethostname().to_string_lossy().into_owned();
                let host: String = host
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
                    .take(60)
                    .collect();
                let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
                format!("{}-{suffix}", if host.is_empty() { "node" } else { &host })
            }
        }
    }

    /// Replaces the secrets given as files (`--jwt-secret-file`,
    /// `--database-url-file`, `--redis-url-file`, `--redis-tls-*-file`) by their
    /// contents, trailing newline trimmed; a file wins over the value.
    pub fn load_secret_files(&mut self) -> Result<(), ConfigError> {
        if let Some(path) = &self.jwt_secret_file {
            self.jwt_secret = Some(read_secret("--jwt-secret-file", path)?);
        }
        if let Some(path) = &self.database_url_file {
            let url = read_secret("--database-url-file", path)?;
            self.database_url = parse_database_url(&url)
                .map_err(|reason| ConfigError::SecretValue { flag: "--database-url-file", reason })?;
        }
        for (flag, path, value) in [
            ("--redis-tls-ca-file", &self.redis_tls_ca_file, &mut self.redis_tls_ca),
            ("--redis-tls-cert-file", &self.redis_tls_cert_file, &mut self.redis_tls_cert),
            ("--redis-tls-key-file", &self.redis_tls_key_file, &mut self.redis_tls_key),
        ] {
            if let Some(path) = path {
                *value = Some(read_secret(flag, path)?);
            }
        }
        if let Some(path) = &self.redis_url_file {
            let url = read_secret("--redis-url-file", path)?;
            self.redis_url = Some(
                parse_redis_url(&url)
                    .map_err(|reason| ConfigError::SecretValue { flag: "--redis-url-file", reason })?,
            );
        }
        Ok(())
    }

    /// The files holding secrets a provider CLI must never see.
    pub fn secret_files(&self) -> Vec<PathBuf> {
        [&self.jwt_secret_file, &self.database_url_file, &self.redis_url_file, &self.redis_tls_key_file]
            .into_iter()
            .flatten()
            .map(|path| std::path::absolute(path).unwrap_or_else(|_| path.clone()))
            .collect()
    }

    /// The SQLite database's files (database, WAL, shared memory, journal), if any.
    pub fn sqlite_files(&self) -> Vec<PathBuf> {
        let Some(base) = sqlite_path(&self.database_url) else { return Vec::new() };
        ["", "-wal", "-shm", "-journal"]
            .iter()
            .map(|suffix| {
                let mut name = base.clone().into_os_string();
                name.push(suffix);
                PathBuf::from(name)
            })
            .collect()
    }

    /// The canonical workspaces root: the flag, else `./workspaces` (made)
    /// for the per-user layout and `$HOME` (else `/`) for the shared one.
    pub fn workspaces_root(&self) -> Result<PathBuf, ConfigError> {
        let raw = match (&self.workspaces_root, self.workspace_layout) {
            (Some(root), _) => root.clone(),
            (None, WorkspaceLayout::PerUser) => {
                let root = PathBuf::from("workspaces");
                std::fs::create_dir_all(&root).map_err(|e| ConfigError::WorkspacesRoot {
                    path: root.display().to_string(),
                    reason: e.to_string(),
                })?;
                root
            }
            (None, WorkspaceLayout::Shared) => {
                std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"))
            }
        };
        std::fs::canonicalize(&raw)
            .map_err(|e| ConfigError::WorkspacesRoot { path: raw.display().to_string(), reason: e.to_string() })
    }

    /// The canonical homes root (made when missing), checked to lie apart from `workspaces_root`.
    pub fn homes_root(&self, workspaces_root: &std::path::Path) -> Result<PathBuf, ConfigError> {
        let raw = self.homes_root.clone().unwrap_or_else(|| PathBuf::from("chatgate-homes"));
        let made = std::fs::DirBuilder::new().recursive(true).create(&raw).and_then(|()| std::fs::canonicalize(&raw));
        let homes =
            made.map_err(|e| ConfigError::HomesRoot { path: raw.display().to_string(), reason: e.to_string() })?;
        if homes.starts_with(workspaces_root) || workspaces_root.starts_with(&homes) {
            return Err(ConfigError::HomesInsideWorkspaces {
                homes: homes.display().to_string(),
                workspaces: workspaces_root.display().to_string(),
            });
        }
        Ok(homes)
    }

    /// A configuration for tests and embedding: defaults, in-memory SQLite.
    pub fn for_tests() -> Config {
        let cli = Cli::parse_from(["chatgate", "--listen", "127.0.0.1:0", "--database-url", "sqlite::memory:"]);
        cli.config
    }
}

/// `--provider-env`: variable names.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EnvNames(pub Vec<String>);

/// `--provider-env-file`: `NAME=/path` pairs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EnvFiles(pub Vec<(String, PathBuf)>);

fn parse_env_names(raw: &str) -> Result<EnvNames, String> {
    crate::runtime::sandbox::env::parse_names(raw).map(EnvNames)
}

fn parse_env_files(raw: &str) -> Result<EnvFiles, String> {
    crate::runtime::sandbox::env::parse_files(raw).map(EnvFiles)
}

/// A secret from a file: its contents without the trailing newline; an empty file is refused.
fn read_secret(flag: &'static str, path: &std::path::Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::SecretFile {
        flag,
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let value = text.trim_end_matches(['\n', '\r']).to_string();
    if value.is_empty() {
        return Err(ConfigError::SecretValue { flag, reason: format!("{} is empty", path.display()) });
    }
    Ok(value)
}

/// `token --user`: an id the server will accept as a user.
fn parse_user_id(raw: &str) -> Result<String, String> {
    if crate::auth::names_a_user(raw) {
        Ok(raw.to_string())
    } else {
        Err("a user id must not be blank or contain NUL".to_string())
    }
}

/// Parses `15s`, `5m`, `100ms`, `1h`.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    humantime::parse_duration(raw.trim()).map_err(|e| format!("expected a duration like 15s or 5m ({e})"))
}

fn parse_positive_duration(raw: &str) -> Result<Duration, String> {
    let duration = parse_duration(raw)?;
    if duration.is_zero() {
        return Err("duration must be positive".into());
    }
    Ok(duration)
}

/// Parses an address (`10.0.0.7`, `::1`) or a network (`10.0.0.0/8`).
pub fn parse_ip_net(raw: &str) -> Result<ipnet::IpNet, String> {
    let raw = raw.trim();
    if let Ok(net) = raw.parse::<ipnet::IpNet>() {
        return Ok(net.trunc());
    }
    raw.parse::<std::net::IpAddr>()
        .map(ipnet::IpNet::from)
        .map_err(|_| format!("expected an IP address or a CIDR like 10.0.0.0/8, got \"{raw}\""))
}

fn parse_lease(raw: &str) -> Result<Duration, String> {
    let lease = parse_duration(raw)?;
    if lease < Duration::from_millis(300) {
        return Err("a lease shorter than 300ms cannot be renewed reliably".into());
    }
    Ok(lease)
}

/// Parses `8MiB`, `64KiB`, `512B` or a plain byte count.
pub fn parse_size(raw: &str) -> Result<usize, String> {
    let size: bytesize::ByteSize = raw.trim().parse().map_err(|e| format!("expected a size like 8MiB ({e})"))?;
    let bytes = usize::try_from(size.as_u64()).map_err(|_| "size too large".to_string())?;
    if bytes == 0 {
        return Err("size must be positive".into());
    }
    Ok(bytes)
}

fn parse_database_url(raw: &str) -> Result<String, String> {
    let ok = raw.starts_with("sqlite:") || raw.starts_with("postgres://") || raw.starts_with("postgresql://");
    if ok { Ok(raw.to_string()) } else { Err("expected sqlite://… or postgres://…".into()) }
}

/// One Redis URL, or a comma list of them (the seed nodes of a Redis Cluster).
fn parse_redis_url(raw: &str) -> Result<String, String> {
    RedisTarget::parse(Topology::Cluster, raw)?;
    Ok(raw.to_string())
}

fn parse_node_id(raw: &str) -> Result<String, String> {
    let valid = !raw.is_empty()
        && raw.len() <= 120
        && raw.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if valid { Ok(raw.to_string()) } else { Err("expected 1-120 characters of [A-Za-z0-9._-]".into()) }
}

fn parse_providers(raw: &str) -> Result<ProviderList, String> {
    let mut list = Vec::new();
    for name in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if !KNOWN_PROVIDERS.contains(&name) {
            return Err(format!("unknown provider \"{name}\" (known: {})", KNOWN_PROVIDERS.join(",")));
        }
        if !list.iter().any(|p| p == name) {
            list.push(name.to_string());
        }
    }
    if list.is_empty() {
        return Err("at least one provider must be enabled".into());
    }
    Ok(ProviderList(list))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_interface() {
        let c = Cli::try_parse_from(["chatgate"]).unwrap().config;
        assert_eq!(c.listen.to_string(), "127.0.0.1:3001");
        assert_eq!(c.database_url, "sqlite://chatgate.db?mode=rwc");
        assert_eq!(c.run_lease, Duration::from_secs(15));
        assert_eq!(c.replay_retention, Duration::from_secs(300));
        assert_eq!(c.idempotency_window, Duration::from_secs(3600));
        assert_eq!(c.replay_max_events, 10_000);
        assert_eq!(c.max_frame_bytes, 8 * 1024 * 1024);
        assert_eq!(c.send_queue_bytes, 8 * 1024 * 1024);
        assert_eq!(c.drain_grace, Duration::from_secs(25));
        assert_eq!(c.providers.0.len(), 6);
        assert!(c.redis_url.is_none() && c.jwt_secret.is_none() && c.allowed_origins.is_none());
        assert_eq!((c.conn_rate_per_ip, c.conn_burst_per_ip), (20, 100));
        assert!(c.trusted_proxies.is_none());
        assert_eq!((c.max_sockets_per_user, c.max_subscriptions_per_socket, c.max_sends_per_minute), (100, 1000, 120));
        assert_eq!((c.frame_rate, c.frame_burst), (100, 200));
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.max_body_bytes, 64 * 1024);
        assert_eq!(c.max_replay_bytes, 4 * 1024 * 1024);
        assert_eq!((c.sandbox, c.workspace_layout), (SandboxSetting::Auto, WorkspaceLayout::PerUser));
        assert_eq!((c.max_runs, c.run_processes), (32, 256));
        assert_eq!((c.run_memory, c.run_file_size), (4 << 30, 1 << 30));
        assert_eq!(c.run_cpu_time, Duration::from_secs(3600));
        assert!(c.provider_env.is_none() && c.provider_env_file.is_none() && c.homes_root.is_none());
    }

    #[test]
    fn secrets_come_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("jwt");
        let db = dir.path().join("db");
        std::fs::write(&secret, "from-a-file\n").unwrap();
        std::fs::write(&db, "postgres://u:p@db/x\n").unwrap();
        let mut c = Cli::try_parse_from(["chatgate", "--jwt-secret", "flag"]).unwrap().config;
        c.jwt_secret_file = Some(secret.clone());
        c.database_url_file = Some(db.clone());
        c.load_secret_files().unwrap();
        assert_eq!(c.jwt_secret.as_deref(), Some("from-a-file"));
        assert_eq!(c.database_url, "postgres://u:p@db/x");
        assert_eq!(c.secret_files(), vec![secret, db.clone()]);
        std::fs::write(&db, "mysql://x").unwrap();
        assert!(matches!(c.load_secret_files(), Err(ConfigError::SecretValue { flag: "--database-url-file", .. })));
        c.database_url_file = None;
        c.jwt_secret_file = Some(dir.path().join("missing"));
        assert!(matches!(c.load_secret_files(), Err(ConfigError::SecretFile { flag: "--jwt-secret-file", .. })));
    }

    #[test]
    fn sqlite_files_are_found_for_masking() {
        let mut c =
            Cli::try_parse_from(["chatgate", "--database-url", "sqlite:///srv/db/chat.db?mode=rwc"]).unwrap().config;
        let files = c.sqlite_files();
        assert_eq!(files[0], PathBuf::from("/srv/db/chat.db"));
        assert_eq!(files[1], PathBuf::from("/srv/db/chat.db-wal"));
        c.database_url = "sqlite::memory:".into();
        assert!(c.sqlite_files().is_empty());
        c.database_url = "postgres://x/y".into();
        assert!(c.sqlite_files().is_empty());
    }

    #[test]
    fn bad_values_name_the_flag() {
        for args in [
            vec!["chatgate", "--providers", "claude,nope"],
            vec!["chatgate", "--run-lease", "soon"],
            vec!["chatgate", "--max-frame-bytes", "lots"],
            vec!["chatgate", "--database-url", "mysql://x"],
            vec!["chatgate", "--redis-url", "http://x"],
            vec!["chatgate", "--conn-rate-per-ip", "0"],
            vec!["chatgate", "--conn-burst-per-ip", "many"],
            vec!["chatgate", "--trusted-proxies", "10.0.0.0/8,proxy"],
            vec!["chatgate", "--max-sockets-per-user", "none"],
            vec!["chatgate", "--max-subscriptions-per-socket", "0"],
            vec!["chatgate", "--max-sends-per-minute", "x"],
            vec!["chatgate", "--frame-rate", "0"],
            vec!["chatgate", "--frame-burst", "1.5"],
            vec!["chatgate", "--handshake-timeout", "0s"],
            vec!["chatgate", "--max-body-bytes", "0"],
            vec!["chatgate", "--max-replay-bytes", "big"],
            vec!["chatgate", "--sandbox", "chroot"],
            vec!["chatgate", "--workspace-layout", "flat"],
            vec!["chatgate", "--provider-env", "ANTHROPIC_API_KEY,CHATGATE_JWT_SECRET"],
            vec!["chatgate", "--provider-env-file", "KEY=relative"],
            vec!["chatgate", "--max-runs", "0"],
            vec!["chatgate", "--run-memory", "lots"],
            vec!["chatgate", "--run-processes", "2"],
            vec!["chatgate", "--run-cpu-time", "0s"],
        ] {
            let err = Cli::try_parse_from(&args).unwrap_err().to_string();
            assert!(err.contains(args[1]), "{err}");
        }
        let c = Cli::try_parse_from(["chatgate", "--redis-url", "redis://127.0.0.1/"]).unwrap().config;
        assert!(matches!(c.validate(), Err(ConfigError::ClusterWithoutSecret)));
    }

    #[test]
    fn redis_modes_and_seed_lists() {
        let parse = |args: &[&str]| {
            let mut all = vec!["chatgate", "--jwt-secret", "s"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).map(|cli| cli.config)
        };
        let c = parse(&["--redis-url", "redis://a:7000"]).unwrap();
        assert_eq!(c.redis_mode, Topology::Standalone);
        assert_eq!(c.redis_target().unwrap().unwrap(), RedisTarget::standalone("redis://a:7000"));
        let c = parse(&["--redis-mode", "cluster", "--redis-url", "redis://a:7000, redis://b:7001"]).unwrap();
        c.validate().unwrap();
        assert_eq!(c.redis_target().unwrap().unwrap(), RedisTarget::cluster(&["redis://a:7000", "redis://b:7001"]));
        // A seed list without cluster mode is refused with the fix in the message.
        let c = parse(&["--redis-url", "redis://a:7000,redis://b:7001"]).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("--redis-mode cluster"), "{err}");
        let c = parse(&["--redis-mode", "sentinel", "--redis-url", "redis://s1:26379,redis://s2:26379"]).unwrap();
        assert_eq!(
            c.redis_target().unwrap().unwrap(),
            RedisTarget::sentinel(&["redis://s1:26379", "redis://s2:26379"], "mymaster")
        );
        let c =
            parse(&["--redis-mode", "sentinel", "--redis-sentinel-master", "cache", "--redis-url", "redis://s1:26379"]);
        assert_eq!(c.unwrap().redis_target().unwrap().unwrap().sentinel_master, "cache");
        // TLS material: a certificate goes with its key, and only with rediss:// URLs.
        let c = parse(&[
            "--redis-url",
            "rediss://a:6380",
            "--redis-tls-ca",
            "CA",
            "--redis-tls-cert",
            "C",
            "--redis-tls-key",
            "K",
        ]);
        let tls = c.unwrap().redis_target().unwrap().unwrap().tls;
        assert_eq!(tls, RedisTls { ca: Some("CA".into()), client: Some(("C".into(), "K".into())) });
        assert!(!format!("{tls:?}").contains('K'), "the key stays out of Debug output");
        for (args, want) in [
            (vec!["--redis-url", "rediss://a:6380", "--redis-tls-cert", "C"], "go together"),
            (vec!["--redis-url", "redis://a:6379", "--redis-tls-ca", "CA"], "rediss://"),
        ] {
            let err = parse(&args).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        for bad in [vec!["--redis-mode", "sharded"], vec!["--redis-url", "redis://a:7000,http://b"]] {
            let err = parse(&bad).unwrap_err().to_string();
            assert!(err.contains(bad[0]), "{err}");
        }
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("512B").unwrap(), 512);
        assert_eq!(parse_duration("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_ip_net("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_ip_net(" 10.1.2.3 ").unwrap().to_string(), "10.1.2.3/32");
        assert_eq!(parse_ip_net("fd00::1").unwrap().to_string(), "fd00::1/128");
        assert!(parse_ip_net("10.0.0.0/33").is_err());
    }
}
