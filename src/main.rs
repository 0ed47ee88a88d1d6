//! The `chatgate` binary: `serve` (default), `token`, `migrate`.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, error::ErrorKind};
use tracing_subscriber::{EnvFilter, fmt};

use chatgate::{
    auth::Auth,
    config::{Cli, Command, Config, ConfigError},
    node::{Node, NodeError},
    store::Store,
};

/// Exit code for a bad configuration (interface §1).
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => e.exit(),
        Err(e) => {
            let rendered = e.to_string();
            eprintln!("{}", rendered.lines().next().unwrap_or("error: bad arguments"));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_logging(&cli.config.log_format);
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
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().with_current_span(true).with_span_list(false).init();
    } else {
        builder.init();
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.config;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config).await,
        Command::Token { user, ttl } => {
            let secret = config.jwt_secret.as_deref().ok_or(ConfigError::TokenWithoutSecret)?;
            println!("{}", Auth::new(secret.as_bytes()).mint(&user, ttl)?);
            Ok(())
        }
        Command::Migrate => {
            let store = Store::connect(&config.database_url).await.context("--database-url")?;
            store.migrate().await?;
            store.close().await;
            eprintln!("migrations applied");
            Ok(())
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    config.validate()?;
    let (secret, generated) = match &config.jwt_secret {
        Some(secret) => (secret.clone(), false),
        None => (Auth::random_secret(), true),
    };
    let node = Node::start(&config, &secret).await?;
    if generated {
        let token = node.auth.mint("1", std::time::Duration::from_secs(7 * 24 * 3600))?;
        println!("chatgate is listening on http://{} (no --jwt-secret: a random one was generated)", node.addr);
        println!("token for user 1, valid 7 days: {token}");
        println!("WebSocket: ws://{}/ws?token={token}", node.addr);
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
