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

/// After a node restart the in-process registry has forgotten the session, but SQL
/// has not: a tab subscribed at the session's last seq gets the next run without a
/// spurious `replayTruncated` resync.
#[tokio::test]
async fn a_restarted_node_resumes_idle_subscribers_without_a_false_gap() {
    for db in [Db::Sqlite, Db::Postgres] {
        let mut node = TestNode::start(db).await;
        let token = node.token(&user());
        let session = node.create_session(&token, "script").await;
        let mut ws = node.connect(&token).await;
        ws.send_chat(&session, "one two").await;
        let first = ws.run_events(&session).await;
        let top = first.last().unwrap()["seq"].as_u64().unwrap();
        drop(ws);
        node.restart().await;
        let mut watcher = node.connect(&token).await;
        watcher.subscribe(&session, top).await;
        let ack = watcher.recv_reply().await;
        assert_eq!((ack["kind"].as_str(), ack["lastSeq"].as_u64()), (Some("chat_subscribed"), Some(top)), "{db:?}");
        let mut sender = node.connect(&token).await;
        sender.send_chat(&session, "three").await;
        let frames = watcher.recv_until(|v| v["kind"] == "complete").await;
        assert!(frames.iter().all(|f| f["kind"] != "chat_subscribed"), "{db:?}: false resync: {frames:#?}");
        let events: Vec<_> = frames.into_iter().filter(|f| f.get("seq").is_some()).collect();
        assert_contiguous(&events, top + 1);
    }
}
