//! `GET /api/providers`: the enabled providers in `--providers` order, each with its program
//! and whether that program resolves on this node (`script` always does); authenticated like
//! every REST route.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{Db, TestNode, user};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_enabled_providers_in_order_with_availability() {
    let bin = tempfile::tempdir().unwrap();
    // An executable file named by its path: available.
    let fake_claude = bin.path().join("claude");
    std::fs::write(&fake_claude, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&fake_claude, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A file that is not executable: not available.
    let plain = bin.path().join("gemini");
    std::fs::write(&plain, "not a program").unwrap();
    let claude = fake_claude.to_str().unwrap().to_string();
    let gemini = plain.to_str().unwrap().to_string();
    let (claude_bin, gemini_bin) = (claude.clone(), gemini.clone());
    let node = TestNode::start_with(Db::Sqlite, move |config| {
        config.providers.0 = ["codex", "script", "claude", "gemini", "opencode"].map(String::from).to_vec();
        config.codex_bin = "/nonexistent/dir/codex".into();
        config.claude_bin = claude_bin;
        config.gemini_bin = gemini_bin;
        // Found on PATH.
        config.opencode_bin = "sh".into();
    })
    .await;
    let token = node.token(&user());

    let (status, body) = node.request("GET", "/api/providers", &token, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success"], true, "{body}");
    assert_eq!(
        body["data"],
        json!({ "providers": [
            { "id": "codex", "available": false, "program": "/nonexistent/dir/codex" },
            { "id": "script", "available": true, "program": null },
            { "id": "claude", "available": true, "program": claude },
            { "id": "gemini", "available": false, "program": gemini },
            { "id": "opencode", "available": true, "program": "sh" },
        ] })
    );

    // Availability is read per request: a program that appears later shows up.
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (_, body) = node.request("GET", "/api/providers", &token, None).await;
    assert_eq!(body["data"]["providers"][3]["available"], true, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_providers_and_program_names() {
    let node = TestNode::start(Db::Sqlite).await;
    let token = node.token(&user());
    let (status, body) = node.request("GET", "/api/providers", &token, None).await;
    assert_eq!(status, 200, "{body}");
    let providers = body["data"]["providers"].as_array().unwrap();
    let ids: Vec<&str> = providers.iter().map(|p| p["id"].as_str().unwrap()).collect();
    let want: Vec<String> = node.config.providers.0.clone();
    assert_eq!(ids, want.iter().map(String::as_str).collect::<Vec<_>>());
    for p in providers {
        assert!(p["available"].is_boolean(), "{p}");
        let program = match p["id"].as_str().unwrap() {
            "claude" => Value::from(node.config.claude_bin.as_str()),
            "codex" => Value::from(node.config.codex_bin.as_str()),
            "cursor" => Value::from(node.config.cursor_bin.as_str()),
            "gemini" => Value::from(node.config.gemini_bin.as_str()),
            "opencode" => Value::from(node.config.opencode_bin.as_str()),
            "script" => Value::Null,
            other => panic!("unexpected provider {other}"),
        };
        assert_eq!(p["program"], program, "{p}");
    }
    if let Some(script) = providers.iter().find(|p| p["id"] == "script") {
        assert_eq!(script["available"], true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn needs_a_valid_token() {
    let node = TestNode::start(Db::Sqlite).await;
    let (status, body) = node.request_raw("GET", "/api/providers", None, None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["success"], false);
    assert_eq!(body["error"]["code"], "UNAUTHORIZED");
    let (status, body) = node.request_raw("GET", "/api/providers", Some("not-a-token"), None).await;
    assert_eq!(status, 401, "{body}");
    // The route takes GET only, answered in the envelope.
    let token = node.token(&user());
    let (status, body) = node.request("POST", "/api/providers", &token, Some(json!({}))).await;
    assert_eq!(status, 405, "{body}");
    assert_eq!(body["error"]["code"], "METHOD_NOT_ALLOWED");
}
