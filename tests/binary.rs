//! The `chatgate` binary from the outside: flags, exit codes, subcommands,
//! the embedded-default start banner, and SIGTERM during a run.

mod common;

use std::{
    io::{BufRead, BufReader},
    process::Command,
    time::Duration,
};

use common::{NodeProcess, Ws};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_chatgate");

fn run(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("REDIS_URL")
        .env_remove("CHATGATE_JWT_SECRET")
        .env_remove("DATABASE_URL")
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn bad_config_is_one_line_naming_the_flag_and_exit_2() {
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 14] = [
        (&["--run-lease", "soon"], &[], "--run-lease"),
        (&["--listen-backlog", "0"], &[], "--listen-backlog"),
        (&["--trusted-proxies", "10.0.0.0/8,lb"], &[], "--trusted-proxies"),
        (&[], &[("CHATGATE_MAX_SENDS_PER_MINUTE", "0")], "--max-sends-per-minute"),
        (&[], &[("CHATGATE_HANDSHAKE_TIMEOUT", "never")], "--handshake-timeout"),
        (&["--max-replay-bytes", "0"], &[], "--max-replay-bytes"),
        (&["--providers", "claude,nope"], &[], "--providers"),
        (&["--database-url", "mysql://x"], &[], "--database-url"),
        (&["--redis-url", "http://nope"], &[], "--redis-url"),
        (&["--redis-url", "redis://127.0.0.1:6379"], &[], "--jwt-secret"),
        (&[], &[("CHATGATE_MAX_FRAME_BYTES", "lots")], "--max-frame-bytes"),
        (&["token", "--user", "u"], &[("DATABASE_URL", "sqlite::memory:")], "--jwt-secret"),
        (&["token", "--user", ""], &[("CHATGATE_JWT_SECRET", "s3")], "--user"),
        (&["token", "--user", "  "], &[("CHATGATE_JWT_SECRET", "s3")], "--user"),
    ];
    for (args, envs, flag) in cases {
        let (code, _, stderr) = run(args, envs);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}

#[test]
fn token_and_migrate() {
    let (code, stdout, _) = run(&["token", "--user", "42", "--ttl", "1h"], &[("CHATGATE_JWT_SECRET", "s3")]);
    assert_eq!(code, 0);
    let token = stdout.trim();
    assert_eq!(stdout.lines().count(), 1);
    let identity = chatgate::auth::Auth::new(b"s3").verify(token).unwrap();
    assert_eq!(identity.user_id, "42");
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("m.db").display());
    let (code, _, stderr) = run(&["migrate", "--database-url", &url], &[]);
    assert_eq!(code, 0, "{stderr}");
    let (code, _, _) = run(&["migrate", "--database-url", &common::pg_url()], &[]);
    assert_eq!(code, 0);
}

/// A start that fails past parsing (a database that cannot be opened, a taken
/// port) is one line too, naming the flag, each cause said once; exit 1.
#[test]
fn start_failures_are_one_line_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let unopenable = format!("sqlite://{}?mode=rw", dir.path().join("missing/x.db").display());
    let (code, _, stderr) = run(&["serve", "--listen", "127.0.0.1:0", "--database-url", &unopenable], &[]);
    assert_eq!(code, 1, "{stderr}");
    let line = stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(line.contains("--database-url"), "{line}");
    let cause = line.rsplit(": ").next().unwrap();
    assert_eq!(line.matches(cause).count(), 1, "a cause repeated: {line}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let db = format!("sqlite://{}?mode=rwc", dir.path().join("ok.db").display());
    let (code, _, stderr) = run(&["serve", "--listen", &addr, "--database-url", &db], &[]);
    assert_eq!(code, 1, "{stderr}");
    let line = stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(line.contains(&addr), "{line}");
    let cause = line.rsplit(": ").next().unwrap();
    assert_eq!(line.matches(cause).count(), 1, "a cause repeated: {line}");
}

/// Starts the binary; returns it and the lines it printed on stdout at start.
fn serve(dir: &tempfile::TempDir, extra: &[&str]) -> (NodeProcess, Vec<String>) {
    let workspaces = dir.path().join("workspaces");
    std::fs::create_dir_all(&workspaces).unwrap();
    let node = common::node_command()
        .database_url(&format!("sqlite://{}?mode=rwc", dir.path().join("g.db").display()))
        .workspaces(&workspaces)
        .homes(&dir.path().join("homes"))
        .args(extra)
        .clean_env()
        .stdout_piped()
        .spawn()
        .expect("chatgate starts");
    let mut lines = Vec::new();
    let mut reader = BufReader::new(node.take_stdout().unwrap());
    for _ in 0..3 {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        lines.push(line.trim().to_string());
    }
    (node, lines)
}

#[tokio::test]
async fn embedded_default_prints_a_token_and_sigterm_ends_runs_then_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let (child, lines) = serve(&dir, &["--drain-grace", "300ms"]);
    let url_line = lines.iter().find(|l| l.starts_with("WebSocket: ")).expect("ws url printed");
    let ws_url = url_line.trim_start_matches("WebSocket: ");
    let token = ws_url.split("token=").nth(1).unwrap().to_string();
    let base = ws_url.replace("ws://", "http://").split("/ws").next().unwrap().to_string();
    let http = reqwest::Client::new();
    let created: serde_json::Value = http
        .post(format!("{base}/api/providers/sessions"))
        .bearer_auth(&token)
        .json(&json!({ "provider": "script", "projectPath": "p" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let session = created["data"]["sessionId"].as_str().unwrap().to_string();
    let mut ws = Ws::connect(ws_url).await;
    ws.send(json!({ "type": "chat.send", "sessionId": session, "content": r#"{"events":1000,"intervalMs":20}"# }))
        .await;
    let frames = ws.recv_until(|v| v["kind"] == "stream_delta").await;
    assert_eq!(frames[0]["kind"], "session_upserted", "the first run announces the provider session id");
    child.sigterm().unwrap();
    // The socket is closed with 1012 (after any frames already queued).
    let close = loop {
        match ws.try_recv(Duration::from_secs(10)).await {
            Some(Ok(_)) => continue,
            Some(Err(code)) => break code,
            None => panic!("socket not closed"),
        }
    };
    assert_eq!(close, Some(1012));
    let status = child.exited(Duration::from_secs(30)).await.unwrap();
    assert_eq!(status.code(), Some(0));
    // The run was ended with a terminal complete, kept in history.
    let (_node, lines) = serve(&dir, &[]);
    let token = lines[1].rsplit(' ').next().unwrap().to_string();
    let base = lines[0].split(' ').find(|w| w.starts_with("http://")).unwrap().to_string();
    // The restarted node signs with the secret kept beside its database; user 1 again.
    let history: serde_json::Value = http
        .get(format!("{base}/api/providers/sessions/{session}/messages?kinds=all"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let messages = history["data"]["messages"].as_array().unwrap();
    let last = messages.last().unwrap();
    assert_eq!(last["kind"], "complete", "{history}");
    assert_eq!(last["aborted"], true);
    assert_eq!(last["error"], "node draining");
}

/// `--listen-backlog` sets the public listener's backlog (what `ss` shows as a
/// listening socket's Send-Q); the default is 4 096, not tokio's 1 024.
#[tokio::test]
async fn listen_backlog_is_the_flags() {
    let port_of = |lines: &[String]| {
        let url = lines.iter().find(|l| l.starts_with("WebSocket: ")).expect("ws url printed");
        url.split("127.0.0.1:").nth(1).unwrap().split('/').next().unwrap().to_string()
    };
    let backlog_of = |port: &str| {
        let out = std::process::Command::new("ss").args(["-Hltn", &format!("sport = :{port}")]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let columns: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(columns.first(), Some(&"LISTEN"), "ss: {text}");
        columns[2].parse::<u32>().unwrap()
    };
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap().trim().parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_node, lines) = serve(&dir, &["--listen-backlog", "37"]);
    assert_eq!(backlog_of(&port_of(&lines)), 37.min(somaxconn));
    let other = tempfile::tempdir().unwrap();
    let (_node, lines) = serve(&other, &[]);
    assert_eq!(backlog_of(&port_of(&lines)), 4096.min(somaxconn));
}
