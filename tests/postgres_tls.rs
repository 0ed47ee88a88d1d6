//! PostgreSQL over TLS (rustls) against a private cluster that accepts `hostssl` connections
//! only, with a CA and a server certificate (`localhost`, `127.0.0.1`) made at test time:
//! the store works with `sslmode=require` and `verify-full` (and the server says the
//! connection is TLS); `verify-full` refuses a foreign CA and a host the certificate does not
//! name, plaintext is refused, `require` fails against a server without TLS; and the binary
//! serves with a `verify-full` URL or the `PGSSLMODE`/`PGSSLROOTCERT` variables, and exits
//! non-zero with one clear line (no password) given a wrong CA.

mod common;

use std::{path::Path, time::Duration};

use chatgate::store::{HistoryRow, HistoryView, NewSession, Store, StoreError};
use chatgate_testkit::{
    postgres::{PrivatePostgres, UNNAMED_LOOPBACK},
    redis_tls::TestCerts,
};
use common::user;
use serde_json::json;
use sqlx::{AnyConnection, Connection, Row};

/// A password the TLS cluster never asks for (trust): it must show in no error.
const PASSWORD: &str = "pw-never-printed";

/// `verify-full` with the cluster's CA, on `host`.
fn verify_full(pg: &PrivatePostgres, host: &str, ca: &Path) -> String {
    pg.url_on(host, &format!("sslmode=verify-full&sslrootcert={}", ca.display()))
}

fn ca_of(pg: &PrivatePostgres) -> std::path::PathBuf {
    pg.certs().expect("a TLS cluster").ca_path()
}

/// Whether the server sees the connection made with `url` as TLS (`pg_stat_ssl`), through
/// the same `Any` driver the store uses.
async fn server_sees_tls(url: &str) -> bool {
    sqlx::any::install_default_drivers();
    let mut conn = AnyConnection::connect(url).await.expect("connects");
    let row =
        sqlx::query("SELECT CASE WHEN ssl THEN 1 ELSE 0 END AS ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    let ssl: i32 = row.get("ssl");
    conn.close().await.unwrap();
    ssl == 1
}

/// A session with a prompt and two events, read back through the store's public API.
async fn store_round_trip(store: &Store) {
    store.migrate().await.unwrap();
    let owner = user();
    let id = uuid::Uuid::new_v4().to_string();
    store
        .create_session(NewSession {
            session_id: id.clone(),
            user_id: owner.clone(),
            provider: "script".into(),
            project_path: "/work/proj".into(),
            summary: "over tls".into(),
        })
        .await
        .unwrap();
    let row = |seq: u64, part: u8, role: &str, content: &str| HistoryRow {
        session_id: id.clone(),
        seq,
        part,
        kind: "text".into(),
        body: json!({ "id": format!("m{seq}-{part}"), "kind": "text", "role": role, "content": content }).to_string(),
        supersedes_drafts_from: None,
    };
    store
        .append_history(&[row(1, 0, "user", "question"), row(1, 1, "assistant", "one"), row(2, 1, "assistant", "two")])
        .await
        .unwrap();
    let page = store.messages(&id, None, 0, HistoryView::All).await.unwrap();
    let contents: Vec<&str> = page.messages.iter().map(|m| m["content"].as_str().unwrap()).collect();
    assert_eq!((contents, page.total), (vec!["question", "one", "two"], 3));
    let session = store.session(&owner, &id).await.unwrap().unwrap();
    assert_eq!((session.summary.as_str(), session.last_seq), ("over tls", 2));
}

/// The first connection's error, as the binary prints it (the store error's own line).
async fn connect_error(url: &str) -> String {
    match Store::connect(url).await {
        Ok(_) => panic!("{url} connected"),
        Err(e) => {
            let text = e.to_string();
            assert!(!text.contains(PASSWORD), "the password leaked: {text}");
            text
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_works_over_tls_with_require_and_verify_full() {
    let pg = PrivatePostgres::start_tls().await.expect("TLS postgres starts");
    let ca = ca_of(&pg);
    // (a) require: TLS without checking the certificate.
    let require = pg.url_on("127.0.0.1", "sslmode=require");
    // (b) verify-full: the CA made with the cluster, and a host its certificate names.
    let by_name = verify_full(&pg, "localhost", &ca);
    let by_address = verify_full(&pg, "127.0.0.1", &ca);
    for url in [&require, &by_name, &by_address] {
        let store = Store::connect(url).await.unwrap_or_else(|e| panic!("{url}: {e}"));
        store_round_trip(&store).await;
        store.ping().await.unwrap();
        assert!(server_sees_tls(url).await, "{url}: pg_stat_ssl says plaintext");
        store.close().await;
    }
    // `prefer` (the default) uses TLS when the server offers it.
    assert!(server_sees_tls(&pg.url_on("127.0.0.1", "")).await);
    pg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_refuses_a_foreign_ca_a_host_not_in_the_certificate_and_a_missing_ca() {
    let pg = PrivatePostgres::start_tls().await.expect("TLS postgres starts");
    let with_password = |url: String| url.replacen("postgres@", &format!("postgres:{PASSWORD}@"), 1);

    // (c) a CA that did not sign the server's certificate.
    let other = tempfile::tempdir().unwrap();
    let foreign = TestCerts::generate(other.path()).unwrap().ca_path();
    let error = connect_error(&with_password(verify_full(&pg, "localhost", &foreign))).await;
    assert!(error.contains(&format!("PostgreSQL postgres@localhost:{}/postgres", pg.port())), "{error}");
    assert!(error.contains("sslmode=verify-full") && error.contains(&foreign.display().to_string()), "{error}");
    assert!(error.contains("TLS") && error.contains("not signed by a trusted CA"), "{error}");
    // No sslrootcert: the system's roots, which do not hold the test CA.
    let error = connect_error(&pg.url_on("localhost", "sslmode=verify-full")).await;
    assert!(error.contains("not signed by a trusted CA") && error.contains("UnknownIssuer"), "{error}");
    // verify-ca checks the CA too (not the name).
    let url = pg.url_on("localhost", &format!("sslmode=verify-ca&sslrootcert={}", foreign.display()));
    assert!(connect_error(&url).await.contains("not signed by a trusted CA"));

    // (d) the right CA, but an address the certificate does not name (the cluster listens on it).
    let error = connect_error(&with_password(verify_full(&pg, UNNAMED_LOOPBACK, &ca_of(&pg)))).await;
    assert!(error.contains("does not name the host 127.0.0.2"), "{error}");
    // verify-ca does not check the name: the same host works.
    let url = pg.url_on(UNNAMED_LOOPBACK, &format!("sslmode=verify-ca&sslrootcert={}", ca_of(&pg).display()));
    Store::connect(&url).await.unwrap().close().await;

    // A CA file that is missing or holds no certificate: said before any connection.
    let missing = other.path().join("missing.crt");
    let error = connect_error(&verify_full(&pg, "localhost", &missing)).await;
    assert!(matches!(Store::connect(&verify_full(&pg, "localhost", &missing)).await, Err(StoreError::RootCert { .. })));
    assert!(error.contains(&format!("sslrootcert {}: cannot read it", missing.display())), "{error}");
    pg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_is_refused_and_require_needs_a_server_with_tls() {
    let pg = PrivatePostgres::start_tls().await.expect("TLS postgres starts");
    // (e) sslmode=disable against the hostssl-only server.
    let error = connect_error(&pg.url_on("127.0.0.1", "sslmode=disable")).await;
    assert!(error.contains("no encryption") && error.contains("accepts TLS connections only"), "{error}");
    pg.stop().await;

    let plain = PrivatePostgres::start().await.expect("postgres starts");
    let url = format!("{}?sslmode=require", plain.url);
    let error = connect_error(&url).await;
    assert!(error.contains("sslmode=require") && error.contains("does not offer TLS"), "{error}");
    assert!(!server_sees_tls(&format!("{}?sslmode=prefer", plain.url)).await, "prefer falls back to plaintext");
    plain.stop().await;
}

/// (f) The binary: `DATABASE_URL` and the `PG*` variables in its environment, stderr kept.
fn gateway(dir: &Path, database_url: &str, env: &[(&str, &str)]) -> chatgate_testkit::node::NodeProcess {
    let workspaces = dir.join("workspaces");
    std::fs::create_dir_all(&workspaces).unwrap();
    common::node_command()
        .workspaces(&workspaces)
        .homes(&dir.join("homes"))
        .clean_env()
        .env("DATABASE_URL", database_url)
        .env("CHATGATE_JWT_SECRET", common::SECRET)
        .envs(env.iter().copied())
        .stderr_in(dir)
        .spawn()
        .expect("chatgate starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_over_verify_full_and_exits_non_zero_with_a_wrong_ca() {
    let pg = PrivatePostgres::start_tls().await.expect("TLS postgres starts");
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_of(&pg);
    let plain_url = pg.url_on("localhost", "").replacen("postgres@", &format!("postgres:{PASSWORD}@"), 1);
    let http = reqwest::Client::new();
    // In the URL, and in the environment (as the Helm chart sets them) with a bare URL.
    let url_form = verify_full(&pg, "localhost", &ca);
    let ca_text = ca.display().to_string();
    let cases: [(&str, &[(&str, &str)]); 2] =
        [(&url_form, &[]), (&plain_url, &[("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", &ca_text)])];
    for (url, env) in cases {
        let node = gateway(dir.path(), url, env);
        node.wait_ready().await.unwrap_or_else(|e| panic!("{env:?}: {e}"));
        let token = common::mint("tls-user", Duration::from_secs(600));
        let body = json!({ "provider": "script", "projectPath": "p" });
        let (status, created) =
            common::rest(&http, &node.base, "POST", "/api/providers/sessions", &token, Some(body)).await;
        assert_eq!(status, 201, "{created}");
        let session = created["data"]["sessionId"].as_str().unwrap_or_else(|| panic!("{created}"));
        let (_, listed) = common::rest(&http, &node.base, "GET", "/api/providers/sessions", &token, None).await;
        assert!(listed.to_string().contains(session), "{listed}");
        assert_eq!(node.stop(Duration::from_secs(10)).await.and_then(|s| s.code()), Some(0));
    }

    // A wrong CA, in the URL or in PGSSLROOTCERT: exit 1, one line naming the database and the problem.
    let other = tempfile::tempdir().unwrap();
    let foreign = TestCerts::generate(other.path()).unwrap().ca_path();
    let foreign_text = foreign.display().to_string();
    let bad_url = verify_full(&pg, "localhost", &foreign).replacen("postgres@", &format!("postgres:{PASSWORD}@"), 1);
    let cases: [(&str, &[(&str, &str)]); 2] =
        [(&bad_url, &[]), (&plain_url, &[("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", &foreign_text)])];
    for (url, env) in cases {
        let log = tempfile::tempdir().unwrap();
        let node = gateway(log.path(), url, env);
        let status = node.exited(Duration::from_secs(30)).await.expect("exits");
        let stderr = node.stderr();
        assert_eq!(status.code(), Some(1), "{stderr}");
        let line = stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("{stderr}"));
        assert!(line.starts_with("error: --database-url: cannot connect to PostgreSQL postgres@localhost:"), "{line}");
        assert!(line.contains(&format!("sslrootcert={foreign_text}")), "{line}");
        assert!(line.contains("not signed by a trusted CA"), "{line}");
        assert!(!stderr.contains(PASSWORD), "the password leaked: {stderr}");
    }
    pg.stop().await;
}
