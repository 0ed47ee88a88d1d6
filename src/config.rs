//! Command line and environment configuration (interface §1).
//!
//! Every flag has an environment variable and the flag wins. Values are parsed
//! and checked here so that a bad one stops the process at start with one line
//! naming the flag (exit code 2); the rest of the crate only sees [`Config`].

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

/// Provider runtimes chatgate knows how to run.
pub const KNOWN_PROVIDERS: [&str; 6] = ["claude", "codex", "cursor", "gemini", "opencode", "script"];

/// `chatgate` command line.
#[derive(Debug, Parser)]
#[command(name = "chatgate", version, about = "Horizontally scalable WebSocket gateway for AI coding-agent chat runs")]
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
    Serve,
    /// Print a JWT for a user, signed with the configured secret.
    Token {
        /// The user id to put in the `userId` claim.
        #[arg(long, value_parser = parse_user_id)]
        user: String,
        /// Lifetime of the token (`ms`, `s`, `m`, `h`).
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
    },
    /// Apply database migrations and exit.
    Migrate,
}

/// Node configuration: every flag of interface §1.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// HTTP + WebSocket address.
    #[arg(long, env = "CHATGATE_LISTEN", default_value = "127.0.0.1:3001", global = true)]
    pub listen: SocketAddr,
    /// Sessions and history database (`sqlite://…` or `postgres://…`).
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://chatgate.db?mode=rwc", value_parser = parse_database_url, global = true)]
    pub database_url: String,
    /// Redis URL; set = cluster mode.
    #[arg(long, env = "REDIS_URL", value_parser = parse_redis_url, global = true)]
    pub redis_url: Option<String>,
    /// HS256 secret for JWTs.
    #[arg(long, env = "CHATGATE_JWT_SECRET", hide_env_values = true, global = true)]
    pub jwt_secret: Option<String>,
    /// This node's name in locks, logs and metrics.
    #[arg(long, env = "CHATGATE_NODE_ID", value_parser = parse_node_id, global = true)]
    pub node_id: Option<String>,
    /// Enabled provider runtimes (comma list).
    #[arg(long, env = "CHATGATE_PROVIDERS", default_value = "claude,codex,cursor,gemini,opencode,script", value_parser = parse_providers, global = true)]
    pub providers: ProviderList,
    /// Every projectPath must resolve inside this directory (default: home).
    #[arg(long, env = "CHATGATE_WORKSPACES_ROOT", global = true)]
    pub workspaces_root: Option<PathBuf>,
    /// Run lock lease; renewed every third of it.
    #[arg(long, env = "CHATGATE_RUN_LEASE", default_value = "15s", value_parser = parse_lease, global = true)]
    pub run_lease: Duration,
    /// How long a finished run's events stay replayable.
    #[arg(long, env = "CHATGATE_REPLAY_RETENTION", default_value = "5m", value_parser = parse_duration, global = true)]
    pub replay_retention: Duration,
    /// Newest events kept per session for replay.
    #[arg(long, env = "CHATGATE_REPLAY_MAX_EVENTS", default_value = "10000", value_parser = clap::value_parser!(u64).range(1..), global = true)]
    pub replay_max_events: u64,
    /// Comma list of allowed browser Origins (unset: any).
    #[arg(long, env = "CHATGATE_ALLOWED_ORIGINS", value_delimiter = ',', global = true)]
    pub allowed_origins: Option<Vec<String>>,
    /// Largest inbound frame.
    #[arg(long, env = "CHATGATE_MAX_FRAME_BYTES", default_value = "8MiB", value_parser = parse_size, global = true)]
    pub max_frame_bytes: usize,
    /// Unsent bytes after which a socket is a slow consumer (closed with 4008).
    #[arg(long, env = "CHATGATE_SEND_QUEUE_BYTES", default_value = "8MiB", value_parser = parse_size, global = true)]
    pub send_queue_bytes: usize,
    /// On SIGTERM, how long runs may finish before they are ended.
    #[arg(long, env = "CHATGATE_DRAIN_GRACE", default_value = "25s", value_parser = parse_duration, global = true)]
    pub drain_grace: Duration,
    /// `text` or `json`.
    #[arg(long, env = "CHATGATE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"], global = true)]
    pub log_format: String,
    /// Claude Code CLI program.
    #[arg(long, env = "CHATGATE_CLAUDE_BIN", default_value = "claude", global = true)]
    pub claude_bin: String,
    /// Codex CLI program.
    #[arg(long, env = "CHATGATE_CODEX_BIN", default_value = "codex", global = true)]
    pub codex_bin: String,
    /// Cursor agent CLI program.
    #[arg(long, env = "CHATGATE_CURSOR_BIN", default_value = "cursor-agent", global = true)]
    pub cursor_bin: String,
    /// Gemini CLI program.
    #[arg(long, env = "CHATGATE_GEMINI_BIN", default_value = "gemini", global = true)]
    pub gemini_bin: String,
    /// OpenCode CLI program.
    #[arg(long, env = "CHATGATE_OPENCODE_BIN", default_value = "opencode", global = true)]
    pub opencode_bin: String,
    /// How long a Claude tool approval waits for an answer (none for AskUserQuestion and ExitPlanMode).
    #[arg(long, env = "CHATGATE_CLAUDE_APPROVAL_TIMEOUT", default_value = "55s", value_parser = parse_duration, global = true)]
    pub claude_approval_timeout: Duration,
    /// Let clients ask for `permissionMode: bypassPermissions` / `skipPermissions`.
    #[arg(long, env = "CHATGATE_ALLOW_BYPASS_PERMISSIONS", global = true)]
    pub allow_bypass_permissions: bool,
    /// New WebSocket connections per second per client IP (token bucket, sustained rate).
    #[arg(long, env = "CHATGATE_CONN_RATE_PER_IP", default_value = "20", value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub conn_rate_per_ip: u32,
    /// New WebSocket connections one client IP may open at once (token bucket size).
    #[arg(long, env = "CHATGATE_CONN_BURST_PER_IP", default_value = "100", value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub conn_burst_per_ip: u32,
    /// Comma list of proxy addresses or CIDRs whose `X-Forwarded-For` names the client (unset: the peer address is the client).
    #[arg(long, env = "CHATGATE_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_ip_net, global = true)]
    pub trusted_proxies: Option<Vec<ipnet::IpNet>>,
    /// Open WebSockets per user on one node.
    #[arg(long, env = "CHATGATE_MAX_SOCKETS_PER_USER", default_value = "100", value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub max_sockets_per_user: u32,
    /// Session subscriptions per socket.
    #[arg(long, env = "CHATGATE_MAX_SUBSCRIPTIONS_PER_SOCKET", default_value = "1000", value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub max_subscriptions_per_socket: u32,
    /// `chat.send` per user per minute, across the cluster.
    #[arg(long, env = "CHATGATE_MAX_SENDS_PER_MINUTE", default_value = "120", value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub max_sends_per_minute: u32,
    /// Inbound frames per second per socket (token bucket, sustained rate).
    #[arg(long, env = "CHATGATE_FRAME_RATE", default_value = "100", value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub frame_rate: u32,
    /// Inbound frames one socket may send at once (token bucket size).
    #[arg(long, env = "CHATGATE_FRAME_BURST", default_value = "200", value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub frame_burst: u32,
    /// How long a client may take to send its HTTP request headers, and a REST request its body (slowloris guard; also the keep-alive idle limit).
    #[arg(long, env = "CHATGATE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration, global = true)]
    pub handshake_timeout: Duration,
    /// Largest REST request body.
    #[arg(long, env = "CHATGATE_MAX_BODY_BYTES", default_value = "64KiB", value_parser = parse_size, global = true)]
    pub max_body_bytes: usize,
    /// Replayed bytes one `chat.subscribe` target may send; beyond, only the newest events, with `replayTruncated`.
    #[arg(long, env = "CHATGATE_MAX_REPLAY_BYTES", default_value = "4MiB", value_parser = parse_size, global = true)]
    pub max_replay_bytes: usize,
    /// Interval of server pings (a socket missing two pongs is dropped). For tests.
    #[arg(long, env = "CHATGATE_PING_INTERVAL", default_value = "30s", value_parser = parse_duration, global = true, hide = true)]
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
    #[error("--jwt-secret (CHATGATE_JWT_SECRET) is required to mint tokens")]
    TokenWithoutSecret,
    #[error("--workspaces-root: cannot resolve {path}: {reason}")]
    WorkspacesRoot { path: String, reason: String },
}

impl Config {
    /// Checks the cross-flag rules that clap cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.redis_url.is_some() && self.jwt_secret.is_none() {
            return Err(ConfigError::ClusterWithoutSecret);
        }
        Ok(())
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

    /// The canonical workspaces root: the flag, else `$HOME`, else `/`.
    pub fn workspaces_root(&self) -> Result<PathBuf, ConfigError> {
        let raw = self
            .workspaces_root
            .clone()
            .or_else(|| std::env::var_os("HOME").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/"));
        std::fs::canonicalize(&raw)
            .map_err(|e| ConfigError::WorkspacesRoot { path: raw.display().to_string(), reason: e.to_string() })
    }

    /// A configuration for tests and embedding: defaults, in-memory SQLite.
    pub fn for_tests() -> Config {
        let cli = Cli::parse_from(["chatgate", "--listen", "127.0.0.1:0", "--database-url", "sqlite::memory:"]);
        cli.config
    }
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

fn parse_redis_url(raw: &str) -> Result<String, String> {
    redis::Client::open(raw).map_err(|e| format!("not a Redis URL ({e})"))?;
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
        ] {
            let err = Cli::try_parse_from(&args).unwrap_err().to_string();
            assert!(err.contains(args[1]), "{err}");
        }
        let c = Cli::try_parse_from(["chatgate", "--redis-url", "redis://127.0.0.1/"]).unwrap().config;
        assert!(matches!(c.validate(), Err(ConfigError::ClusterWithoutSecret)));
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
