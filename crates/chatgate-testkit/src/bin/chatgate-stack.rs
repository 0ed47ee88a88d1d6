//! `chatgate-stack --nodes N --state DIR [--bin PATH] -- <command> [args…]`: N chatgate nodes
//! behind nginx for as long as `<command>` runs, with a control endpoint to restart or kill a
//! node. The browser suite's launcher (`scripts/browser-tests.sh`) runs its tests under it; what
//! it starts, what the command gets and the control API are in [`chatgate_testkit::stack`].

use std::{ffi::OsString, path::PathBuf};

use anyhow::Context;
use chatgate_testkit::stack::{StackOptions, run};
use clap::Parser;

/// N chatgate nodes behind nginx for as long as a command runs.
#[derive(Parser)]
#[command(name = "chatgate-stack")]
struct Args {
    /// Gateway nodes local-1 … local-N.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..100))]
    nodes: u8,
    /// Logs, nginx's files, workspaces, homes and `env` (created if missing).
    #[arg(long)]
    state: PathBuf,
    /// The chatgate binary.
    #[arg(long, env = "CHATGATE_BIN")]
    bin: PathBuf,
    /// The command to run in the stack, and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<OsString>,
}

fn options(args: &Args) -> anyhow::Result<StackOptions> {
    std::fs::create_dir_all(&args.state).with_context(|| format!("state directory {}", args.state.display()))?;
    Ok(StackOptions {
        nodes: usize::from(args.nodes),
        state: args.state.canonicalize()?,
        bin: args.bin.canonicalize().with_context(|| format!("the chatgate binary {}", args.bin.display()))?,
    })
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let code = match options(&args) {
        Ok(options) => run(options, args.command).await,
        Err(e) => Err(e),
    };
    std::process::exit(code.unwrap_or_else(|e| {
        eprintln!("chatgate-stack: {e:#}");
        1
    }));
}
