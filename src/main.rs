//! The `chatgate` binary: `serve` (default), `token`, `migrate`.

use std::{io::Write, process::ExitCode};

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, error::ErrorKind};
use tracing_subscriber::{EnvFilter, fmt};

use chatgate::{
    auth::{Auth, stored_secret},
    config::{Cli, Command, Config, ConfigError, quickstart_secret_path},
    node::{Node, NodeError},
    store::Store,
};

/// Exit code for a bad configuration (docs/protocol.md §Process and configuration).
const EXIT_CONFIG: u8 = 2;

/// Flags that carry a secret: (clap id, flag). Database and Redis URLs count
/// when they hold a password.
const SECRET_FLAGS: [(&str, &str); 4] = [
    ("jwt_secret", "--jwt-secret"),
    ("redis_tls_key", "--redis-tls-key"),
    ("database_url", "--database-url"),
    ("redis_url", "--redis-url"),
];

/// Whether the secret flag `id` was typed on the command line (not the
/// environment or a default); a URL only when it carries a password.
fn given_on_command_line(matches: &clap::ArgMatches, id: &str) -> bool {
    if matches.value_source(id) != Some(clap::parser::ValueSource::CommandLine) {
        return false;
    }
    if id == "jwt_secret" || id == "redis_tls_key" {
        return true;
    }
    matches.get_one::<String>(id).is_some_and(|url| url_has_password(url))
}

/// `scheme://user:password@host…` or `scheme://:password@host…`.
fn url_has_password(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else { return false };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    authority.rsplit_once('@').is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

fn main() -> ExitCode {
    // Before any secret is read: processes of the same uid (an agent CLI run
    // without a sandbox among them) cannot read this process's memory or
    // /proc/<pid>/environ, and it leaves no core dump.
    let dumpable_off = nix::sys::prctl::set_dumpable(false);
    let parsed = Cli::command().try_get_matches().and_then(|matches| {
        // The node's flags are those of `serve`, or the top level's without a subcommand.
        let node_flags = matches.subcommand_matches("serve").unwrap_or(&matches);
        let flagged =
            SECRET_FLAGS.iter().filter(|(id, _)| given_on_command_line(node_flags, id)).map(|(_, flag)| *flag);
        let flagged: Vec<&str> = flagged.collect();
        Cli::from_arg_matches(&matches).map(|cli| (cli, flagged))
    });
    let (mut cli, flagged) = match parsed {
        Ok(parsed) => parsed,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => e.exit(),
        Err(e) => {
            let rendered = e.to_string();
            eprintln!("{}", rendered.lines().next().unwrap_or("error: bad arguments"));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command.take() {
        Some(Command::Serve(args)) => cli.config = args.config,
        other => cli.command = other,
    }
    init_logging(&cli.config.log_format);
    if let Err(e) = dumpable_off {
        tracing::warn!(error = %e, "cannot make the process non-dumpable; same-uid processes may read its memory");
    }
    for flag in flagged {
        tracing::warn!(
            "{flag} was given on the command line, where every local process can read it (/proc/<pid>/cmdline); \
             pass it in the environment or with {flag}-file"
        );
    }
    if let Err(e) = cli.config.load_secret_files() {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let config_error = e.downcast_ref::<ConfigError>().is_some()
                || matches!(e.downcast_ref::<NodeError>(), Some(NodeError::Config(_)));
            eprintln!("error: {}", one_line(&e));
            if config_error { ExitCode::from(EXIT_CONFIG) } else { ExitCode::FAILURE }
        }
    }
}

/// The error and its causes on one line, each said once: a cause whose text its
/// wrapper already quotes is left out.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn init_logging(format: &str) {
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal: never in files, pipes or collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if format == "json" {
        builder.json().with_current_span(true).with_span_list(false).init();
    } else {
        builder.init();
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.config;
    match cli.command {
        None | Some(Command::Serve(_)) => serve(config).await,
        Some(Command::Token(args)) => {
            println!("{}", Auth::new(args.secret()?.as_bytes()).mint(&args.user, args.ttl)?);
            Ok(())
        }
        Some(Command::Migrate(args)) => {
            let store = Store::connect(&args.database_url()?).await.context("--database-url")?;
            store.migrate().await?;
            store.close().await;
            eprintln!("migrations applied");
            Ok(())
        }
    }
}

/// The JWT secret of a node: the configured one; else (quick start) the one
/// kept beside the SQLite database, made at the first start; else (an
/// in-memory or PostgreSQL database) a random one for this process only.
fn node_secret(config: &mut Config) -> anyhow::Result<(String, Option<String>)> {
    if let Some(secret) = &config.jwt_secret {
        return Ok((secret.clone(), None));
    }
    let Some(path) = quickstart_secret_path(&config.database_url) else {
        let note = "no --jwt-secret: a random one was generated; its tokens last until this process ends".to_string();
        return Ok((Auth::random_secret(), Some(note)));
    };
    let (secret, made) = stored_secret(&path)
        .with_context(|| format!("--database-url: cannot keep the secret beside it at {}", path.display()))?;
    let how = if made { "made now" } else { "kept since its first start" };
    // A file like any other secret file: the agent sandbox masks it.
    config.jwt_secret_file = Some(path.clone());
    Ok((secret, Some(format!("no --jwt-secret: signing with the secret in {} ({how})", path.display()))))
}

async fn serve(mut config: Config) -> anyhow::Result<()> {
    config.validate()?;
    let (secret, quick_start) = node_secret(&mut config)?;
    let node = Node::start(&config, &secret).await?;
    if let Some(note) = quick_start {
        let token = node.auth.mint("1", std::time::Duration::from_secs(7 * 24 * 3600))?;
        let program = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "chatgate".into());
        // Written without println!: a reader that went away (a closed pipe) must
        // not take the serving node down with a panic.
        let banner = format!(
            "chatgate is listening on http://{addr} ({note})\ntoken for user 1, valid 7 days: {token}\n\
             WebSocket: ws://{addr}/ws?token={token}\nmore tokens: {program} token --user <id> (beside this \
             gateway: same directory, same --database-url)\n",
            addr = node.addr
        );
        let mut stdout = std::io::stdout().lock();
        if let Err(e) = stdout.write_all(banner.as_bytes()).and_then(|()| stdout.flush()) {
            tracing::warn!(error = %e, "could not print the start-up banner");
        }
    }
    shutdown_signal().await;
    node.drain().await;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_found() {
        assert!(url_has_password("postgres://u:p@db/x"));
        assert!(url_has_password("redis://:secret@127.0.0.1:6379/0"));
        assert!(!url_has_password("postgres://postgres@127.0.0.1/test"));
        assert!(!url_has_password("redis://127.0.0.1:6379"));
        assert!(!url_has_password("sqlite://chatgate.db?mode=rwc"));
    }
}
