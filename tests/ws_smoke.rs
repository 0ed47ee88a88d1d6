//! A first end-to-end check: an echo run over a real socket.

mod common;

use common::{Db, TestNode, assert_contiguous, user};

#[tokio::test]
async fn echo_run_streams_in_order() {
    for db in [Db::Sqlite, Db::Postgres] {
        let node = TestNode::start(db).await;
        let token = node.token(&user());
        let session = node.create_session(&token, "script").await;
        let mut ws = node.connect(&token).await;
        ws.send_chat(&session, "hello big world").await;
        let events = ws.run_events(&session).await;
        let kinds: Vec<&str> = events.iter().map(|v| v["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["stream_delta", "stream_delta", "stream_delta", "stream_end", "text", "complete"], "{db:?}");
        assert_contiguous(&events, 1);
        assert_eq!(events[5]["exitCode"], 0);
        assert_eq!(events[5]["success"], true);
    }
}
