//! The embedded web console and client module: every node serves `web/` at its routes, without
//! a token, with the right content types, `no-cache` plus an ETag that answers 304.

mod common;

use common::{Db, TestNode};

/// Route, file under `web/`, content type.
const ASSETS: [(&str, &str, &str); 5] = [
    ("/", "index.html", "text/html; charset=utf-8"),
    ("/app.js", "app.js", "text/javascript; charset=utf-8"),
    ("/app.css", "app.css", "text/css; charset=utf-8"),
    ("/markdown.js", "markdown.js", "text/javascript; charset=utf-8"),
    ("/client/chatgate.js", "chatgate.js", "text/javascript; charset=utf-8"),
];

fn web_file(name: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("web").join(name))
        .expect("web file exists")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_serve_the_embedded_files() {
    let node = TestNode::start(Db::Sqlite).await;
    let mut etags = Vec::new();
    for (route, file, content_type) in ASSETS {
        let response = node.http.get(format!("{}{}", node.base, route)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{route}");
        let headers = response.headers().clone();
        assert_eq!(headers["content-type"], content_type, "{route}");
        assert_eq!(headers["cache-control"], "no-cache", "{route}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{route}");
        let etag = headers["etag"].to_str().unwrap().to_string();
        assert!(etag.starts_with('"') && etag.ends_with('"') && etag.len() == 18, "{route}: {etag}");
        let body = response.text().await.unwrap();
        assert_eq!(body, web_file(file), "{route} serves web/{file}");
        etags.push(etag.clone());

        // A browser revalidating with the same ETag gets 304 and no body.
        let again =
            node.http.get(format!("{}{}", node.base, route)).header("if-none-match", &etag).send().await.unwrap();
        assert_eq!(again.status(), 304, "{route}");
        assert_eq!(again.headers()["etag"].to_str().unwrap(), etag);
        assert!(again.text().await.unwrap().is_empty());

        // Another ETag is not a match.
        let stale = node
            .http
            .get(format!("{}{}", node.base, route))
            .header("if-none-match", "\"0000000000000000\"")
            .send()
            .await
            .unwrap();
        assert_eq!(stale.status(), 200, "{route}");
    }
    etags.sort();
    etags.dedup();
    assert_eq!(etags.len(), ASSETS.len(), "each file has its own ETag");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_page_links_the_served_paths_and_has_a_csp() {
    let node = TestNode::start(Db::Sqlite).await;
    let response = node.http.get(format!("{}/", node.base)).send().await.unwrap();
    let csp = response.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("script-src 'self'") && csp.contains("connect-src 'self'"), "{csp}");
    let html = response.text().await.unwrap();
    assert!(html.contains(r#"src="/app.js""#) && html.contains(r#"href="/app.css""#));
    let (status, app) = node.get_text("/app.js").await;
    assert_eq!(status, 200);
    assert!(app.contains("from '/client/chatgate.js'"), "the console imports the served client module");
    // Nothing else under those prefixes is served.
    for missing in ["/index.html", "/client/", "/client/app.js", "/web/app.js"] {
        assert_eq!(node.get_text(missing).await.0, 404, "{missing}");
    }
}
