//! What a new user meets in the first five minutes, from the outside: the
//! quick-start secret that outlives a restart and that `chatgate token` finds,
//! `token --help`, logs without terminal escapes, a dropped client logged as
//! a disconnect, idle keep-alives that are not refused handshakes, and CORS
//! that follows `--allowed-origins`.

mod common;

use std::{
    ffi::OsString,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::Path,
    process::Command,
    time::Duration,
};

use common::{Db, NodeProcess, TestNode};

const BIN: &str = env!("CARGO_BIN_EXE_chatgate");

/// Starts a quick-start node (no secret, no Redis) on `dir`'s SQLite database,
/// stdout piped.
fn spawn_quick_start(dir: &Path) -> NodeProcess {
    let workspaces = dir.join("workspaces");
    std::fs::create_dir_all(&workspaces).unwrap();
    common::node_command()
        .without_serve()
        .database_url(&format!("sqlite://{}?mode=rwc", dir.join("chatgate.db").display()))
        .workspaces(&workspaces)
        .homes(&dir.join("homes"))
        .clean_env()
        .stdout_piped()
        .spawn()
        .expect("the quick start starts")
}

/// A quick-start node (no secret, no Redis) on `dir`'s SQLite database; its
/// stdout lines until the token line.
fn quick_start(dir: &Path) -> (NodeProcess, String, String, Vec<String>) {
    let node = spawn_quick_start(dir);
    let mut reader = BufReader::new(node.take_stdout().unwrap());
    let mut lines = Vec::new();
    let token = loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the node ended before printing a token: {lines:?}");
        lines.push(line.trim().to_string());
        if let Some(token) = line.trim().strip_prefix("token for user 1, valid 7 days: ") {
            break token.to_string();
        }
    };
    let base = node.base.clone();
    (node, base, token, lines)
}

async fn sessions_status(base: &str, token: &str) -> u16 {
    let response =
        reqwest::Client::new().get(format!("{base}/api/providers/sessions")).bearer_auth(token).send().await.unwrap();
    response.status().as_u16()
}

/// SIGTERM, then the exit (killed if it takes longer than a drain could).
async fn stop(node: NodeProcess) {
    node.stop(Duration::from_secs(30)).await.expect("the node exits on SIGTERM");
}

#[tokio::test]
async fn the_quick_start_secret_outlives_a_restart_and_token_finds_it() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("chatgate.secret");
    let (child, base, first_token, lines) = quick_start(dir.path());
    assert!(lines[0].contains(&secret_file.display().to_string()), "the start-up line names the file: {lines:?}");
    assert!(lines[0].contains("made now"), "{lines:?}");
    assert_eq!(sessions_status(&base, &first_token).await, 200);
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&secret_file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "only the owner reads the secret");
    stop(child).await;

    let (child, base, _, lines) = quick_start(dir.path());
    assert!(lines[0].contains("kept since its first start"), "{lines:?}");
    assert_eq!(sessions_status(&base, &first_token).await, 200, "yesterday's printed token still works");

    // `chatgate token` beside it finds the same file from the same --database-url.
    let out = Command::new(BIN)
        .args(["token", "--user", "bob", "--database-url"])
        .arg(format!("sqlite://{}?mode=rwc", dir.path().join("chatgate.db").display()))
        .env_remove("CHATGATE_JWT_SECRET")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bob = String::from_utf8(out.stdout).unwrap();
    assert_eq!(sessions_status(&base, bob.trim()).await, 200, "the gateway accepts bob's token");
    stop(child).await;

    // With no file beside the database, `token` says how to get one.
    let out = Command::new(BIN)
        .args(["token", "--user", "bob", "--database-url"])
        .arg(format!("sqlite://{}?mode=rwc", dir.path().join("other.db").display()))
        .env_remove("CHATGATE_JWT_SECRET")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("other.secret") && stderr.contains("start the gateway once"), "{stderr}");
}

/// A quick-start node whose stdout reader went away (a closed pipe) keeps serving:
/// printing its banner must not panic it.
#[tokio::test]
async fn a_closed_stdout_does_not_take_the_node_down() {
    let dir = tempfile::tempdir().unwrap();
    let child = spawn_quick_start(dir.path());
    drop(child.take_stdout());
    let base = child.base.clone();
    let mut ready = false;
    for _ in 0..200 {
        if reqwest::get(format!("{base}/healthz")).await.is_ok_and(|r| r.status().is_success()) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready || child.is_running(), "the node never served");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(child.is_running(), "the node died after printing to a closed stdout");
    assert!(reqwest::get(format!("{base}/healthz")).await.unwrap().status().is_success());
    stop(child).await;
}

#[test]
fn token_help_shows_only_what_token_uses() {
    let out = Command::new(BIN).args(["token", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--user", "--ttl", "--jwt-secret", "--jwt-secret-file", "--database-url"] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    for flag in ["--listen", "--sandbox", "--max-runs", "--redis-url", "--providers", "--drain-grace"] {
        assert!(!help.contains(flag), "{flag} is not an option of token:\n{help}");
    }
    let out = Command::new(BIN).args(["serve", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("--listen"));
}

/// A node whose stderr goes to a file, with `args` and `RUST_LOG`.
async fn logged_node(dir: &Path, args: &[&str], rust_log: &str) -> NodeProcess {
    let workspaces = dir.join("workspaces");
    std::fs::create_dir_all(&workspaces).unwrap();
    let mut all: Vec<OsString> = vec![
        "--database-url".into(),
        format!("sqlite://{}?mode=rwc", dir.join("g.db").display()).into(),
        "--workspaces-root".into(),
        workspaces.into(),
        "--homes-root".into(),
        dir.join("homes").into(),
    ];
    all.extend(args.iter().map(OsString::from));
    let env = [("CHATGATE_JWT_SECRET".to_string(), common::SECRET.to_string()), ("RUST_LOG".into(), rust_log.into())];
    let node = common::spawn_node_env(&all, &env, dir);
    node.wait_ready().await.expect("node ready");
    node
}

#[tokio::test]
async fn logs_in_a_file_have_no_escapes_and_a_dropped_client_is_a_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let node = logged_node(dir.path(), &[], "chatgate=debug").await;
    let token = common::mint("drop", Duration::from_secs(600));
    // A client that vanishes: the TCP connection ends without a close frame.
    let ws = node.connect(&token).await;
    drop(ws);
    let mut logged = String::new();
    for _ in 0..100 {
        logged = node.stderr();
        if logged.contains("client disconnected without a close frame") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(logged.contains("client disconnected without a close frame"), "{logged}");
    assert!(!logged.contains("protocol violation"), "a dropped client is not a protocol violation:\n{logged}");
    assert!(logged.contains("chatgate node listening"), "{logged}");
    assert!(!logged.contains('\x1b'), "terminal escapes in a log file:\n{logged:?}");
    drop(node);
}

/// `chatgate_limit_refusals_total{limit="handshake_timeout"}` of a node.
async fn handshake_refusals(base: &str) -> u64 {
    let text = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .find(|l| l.starts_with("chatgate_limit_refusals_total{limit=\"handshake_timeout\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no handshake_timeout counter in:\n{text}"))
}

#[tokio::test]
async fn an_idle_keep_alive_is_not_a_refused_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let node = logged_node(dir.path(), &["--handshake-timeout", "300ms"], "info").await;
    let addr = node.base.trim_start_matches("http://").to_string();
    let before = handshake_refusals(&node.base).await;

    // One request on a keep-alive connection, then silence until the server closes it.
    let idle = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || {
            let mut tcp = TcpStream::connect(&addr).unwrap();
            tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match tcp.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            String::from_utf8_lossy(&seen).into_owned()
        }
    });
    let answered = idle.await.unwrap();
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    assert_eq!(handshake_refusals(&node.base).await, before, "an idle keep-alive counted as a refusal");

    // A request head that never completes is a refused handshake.
    tokio::task::spawn_blocking(move || {
        let mut tcp = TcpStream::connect(&addr).unwrap();
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHo").unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = tcp.read(&mut [0u8; 64]);
    })
    .await
    .unwrap();
    assert_eq!(handshake_refusals(&node.base).await, before + 1);
    drop(node);
}

/// The CORS headers `origin` gets on a preflight and on a plain GET.
async fn cors_answers(node: &TestNode, origin: &str) -> (u16, Option<String>, Option<String>, Option<String>) {
    let http = reqwest::Client::new();
    let preflight = http
        .request(reqwest::Method::OPTIONS, format!("{}/api/providers/sessions", node.base))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "authorization,content-type")
        .send()
        .await
        .unwrap();
    let header = |r: &reqwest::Response, name: &str| r.headers().get(name).map(|v| v.to_str().unwrap().to_string());
    let granted = header(&preflight, "access-control-allow-origin");
    let headers = header(&preflight, "access-control-allow-headers");
    let module = http.get(format!("{}/client/chatgate.js", node.base)).header("Origin", origin).send().await.unwrap();
    (preflight.status().as_u16(), granted, headers, header(&module, "access-control-allow-origin"))
}

#[tokio::test]
async fn cors_grants_exactly_the_allowed_origins() {
    let listed = "http://app.example:8080";
    let node = TestNode::start_with(Db::Sqlite, |c| {
        c.allowed_origins = Some(vec![listed.to_string(), "https://other.example".to_string()]);
    })
    .await;
    let (status, granted, headers, module) = cors_answers(&node, listed).await;
    assert_eq!(status, 200);
    assert_eq!(granted.as_deref(), Some(listed));
    let headers = headers.unwrap_or_default().to_ascii_lowercase();
    assert!(headers.contains("authorization") && headers.contains("content-type"), "{headers}");
    assert_eq!(module.as_deref(), Some(listed), "the client module is granted too");

    let (_, granted, _, module) = cors_answers(&node, "http://evil.example").await;
    assert_eq!((granted, module), (None, None), "another origin gets no grant");

    // Without --allowed-origins: same-origin only, as before (no grant, preflight 405).
    let plain = TestNode::start(Db::Sqlite).await;
    let (status, granted, _, module) = cors_answers(&plain, listed).await;
    assert_eq!((status, granted, module), (405, None, None));
}
