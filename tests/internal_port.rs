//! `--internal-listen`: `/metrics`, `/healthz` and `/readyz` move to an internal port
//! (what probes and Prometheus reach), and the public port (what the Ingress routes)
//! answers them 404; without the flag the public port serves them, as before.

mod common;

use common::{Db, TestNode, user};

async fn status(base: &str, path: &str) -> u16 {
    reqwest::get(format!("{base}{path}")).await.expect("a response").status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operations_endpoints_live_on_the_internal_port_only() {
    let node = TestNode::start_with(Db::Sqlite, |c| c.internal_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let internal = format!("http://{}", node.node().internal_addr.expect("an internal address"));
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(status(&internal, path).await, 200, "internal {path}");
        assert_eq!(status(&node.base, path).await, 404, "public {path}");
    }
    // Nothing else is on the internal port; the public port serves the product as ever.
    assert_eq!(status(&internal, "/api/providers").await, 404);
    assert_eq!(status(&internal, "/").await, 404);
    let token = node.token(&user());
    let (code, _) = node.request("GET", "/api/providers/sessions", &token, None).await;
    assert_eq!(code, 200);
    let metrics = reqwest::get(format!("{internal}/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("chatgate_connections"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_internal_port_the_public_port_serves_them() {
    let node = TestNode::start(Db::Sqlite).await;
    assert!(node.node().internal_addr.is_none());
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(status(&node.base, path).await, 200, "public {path}");
    }
}
