//! 1000 frames in one burst: every one is answered, the socket survives, and the
//! node's memory does not keep growing. Alone in its test binary so that the
//! process's RSS is this test's node and client only.

mod common;

use std::time::Duration;

use common::{Db, TestNode, Ws, assert_contiguous, user};
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// An echo run of one word; returns its last seq after checking it continues from `from`.
async fn echo_works(ws: &mut Ws, session: &str, from: u64) -> u64 {
    ws.send_chat(session, "alive").await;
    let events = ws.run_events(session).await;
    assert_contiguous(&events, from);
    events.last().unwrap()["seq"].as_u64().unwrap()
}

/// Nothing but notices for `wait`.
async fn silence(ws: &mut Ws, wait: Duration) {
    while let Some(frame) = ws.try_recv(wait).await {
        let frame = frame.expect("socket open");
        assert_eq!(frame["kind"], "session_upserted", "unexpected {frame}");
    }
}

async fn burst_of_1000_frames_is_answered_and_bounded(db: Db) {
    // Bursts far above the default --frame-burst: this test is about answering
    // every frame in bounded memory, not about the frame rate (tests/abuse_limits.rs).
    let node = TestNode::start_with(db, |c| {
        c.frame_rate = 100_000;
        c.frame_burst = 100_000;
    })
    .await;
    let token = node.token(&user());
    let session = node.create_session(&token, "script").await;
    let mut ws = node.connect(&token).await;
    echo_works(&mut ws, &session, 1).await;
    let mut rss = Vec::new();
    for round in 0..4 {
        for i in 0..1000 {
            let frame = match i % 4 {
                0 => json!({ "type": "chat.nope" }).to_string(),
                1 => json!({ "type": "chat.subscribe", "sessions": [{ "sessionId": session }] }).to_string(),
                2 => json!({ "type": "chat.abort", "sessionId": session }).to_string(),
                _ => "{{{".to_string(),
            };
            ws.stream.feed(Message::Text(frame.into())).await.unwrap();
        }
        ws.stream.flush().await.unwrap();
        let mut counts = std::collections::HashMap::new();
        let mut answered = 0;
        while answered < 1000 {
            let frame = ws.recv().await;
            if frame["kind"] == "session_upserted" {
                continue;
            }
            let key = format!("{}:{}", frame["kind"].as_str().unwrap(), frame["code"].as_str().unwrap_or(""));
            *counts.entry(key).or_insert(0) += 1;
            answered += 1;
        }
        let want: std::collections::HashMap<String, i32> = [
            ("protocol_error:UNKNOWN_MESSAGE_TYPE", 250),
            ("chat_subscribed:", 250),
            ("protocol_error:NO_ACTIVE_RUN", 250),
            ("protocol_error:INVALID_PAYLOAD", 250),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(counts, want, "round {round}");
        silence(&mut ws, Duration::from_millis(50)).await;
        rss.push(common::rss_kib());
    }
    // Rounds after the first must not keep growing the process.
    eprintln!("rss per round: {rss:?}");
    assert!(rss[3] < rss[0] + 32 * 1024, "RSS grew from {} KiB to {} KiB", rss[0], rss[3]);
    let top = echo_works(&mut ws, &session, 5).await;
    assert_eq!(top, 8, "seq continued after the bursts");
}

#[tokio::test]
async fn burst_of_1000_frames_is_answered_and_bounded_sqlite() {
    burst_of_1000_frames_is_answered_and_bounded(Db::Sqlite).await;
}

#[tokio::test]
async fn burst_of_1000_frames_is_answered_and_bounded_postgres() {
    burst_of_1000_frames_is_answered_and_bounded(Db::Postgres).await;
}
