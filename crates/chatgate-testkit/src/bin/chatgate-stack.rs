//! `chatgate-stack --nodes N --state DIR [--bin PATH] -- <command> [args…]`: N chatgate nodes
//! behind nginx for as long as `<command>` runs, with a control endpoint to restart or kill a
//! node. The browser suite's launcher (`scripts/browser-tests.sh`) runs its tests under it; what
//! it starts, what the command gets and the control API are in [`chatgate_testkit::stack`].

use std::{ffi::OsString, path::PathBuf};

use anyhow::{Context, bail};
use chatgate_testkit::stack::{StackOptions, run};

const USAGE: &str = "usage: chatgate-stack --nodes N --state DIR [--bin PATH] -- <command> [args…]
  --nodes N    gateway nodes local-1 … local-N (1..99)
  --state DIR  logs, nginx's files, workspaces, homes and `env` (created if missing)
  --bin PATH   the chatgate binary (default: $CHATGATE_BIN)";

fn parse(mut args: impl Iterator<Item = OsString>) -> anyhow::Result<(StackOptions, Vec<OsString>)> {
    let (mut nodes, mut state, mut bin) = (None, None, std::env::var_os("CHATGATE_BIN").map(PathBuf::from));
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{} needs a value", arg.to_string_lossy()));
        match arg.to_str() {
            Some("--nodes") => {
                let n = value()?.to_str().and_then(|n| n.parse().ok()).filter(|n| (1..100).contains(n));
                nodes = Some(n.context("--nodes takes a number, 1..99")?);
            }
            Some("--state") => state = Some(PathBuf::from(value()?)),
            Some("--bin") => bin = Some(PathBuf::from(value()?)),
            Some("--") => break,
            _ => bail!("unknown argument {}", arg.to_string_lossy()),
        }
    }
    let command: Vec<OsString> = args.collect();
    if command.is_empty() {
        bail!("no command after --");
    }
    let state = state.context("--state is required")?;
    std::fs::create_dir_all(&state).with_context(|| format!("state directory {}", state.display()))?;
    let bin = bin.context("--bin is required when CHATGATE_BIN is not set")?;
    let bin = bin.canonicalize().with_context(|| format!("the chatgate binary {}", bin.display()))?;
    let options = StackOptions { nodes: nodes.context("--nodes is required")?, state: state.canonicalize()?, bin };
    Ok((options, command))
}

#[tokio::main]
async fn main() {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return;
    }
    let (options, command) = match parse(args.into_iter()) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("chatgate-stack: {e:#}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let code = run(options, command).await.unwrap_or_else(|e| {
        eprintln!("chatgate-stack: {e:#}");
        1
    });
    std::process::exit(code);
}
