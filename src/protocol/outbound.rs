//! Outbound (server → client) frames.

use serde::Serialize;
use serde_json::{Value, json};

/// A serialised outbound text frame; cloning shares the bytes.
pub type Frame = axum::extract::ws::Utf8Bytes;

/// `protocol_error` codes (docs/protocol.md §Errors and close codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    SessionIdRequired,
    SessionNotFound,
    UnsupportedProvider,
    RunInProgress,
    NoActiveRun,
    UnknownMessageType,
    InternalError,
    InvalidPayload,
    InvalidOptions,
    BackendUnavailable,
    RateLimited,
    NodeBusy,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::SessionIdRequired => "SESSION_ID_REQUIRED",
            ErrorCode::SessionNotFound => "SESSION_NOT_FOUND",
            ErrorCode::UnsupportedProvider => "UNSUPPORTED_PROVIDER",
            ErrorCode::RunInProgress => "RUN_IN_PROGRESS",
            ErrorCode::NoActiveRun => "NO_ACTIVE_RUN",
            ErrorCode::UnknownMessageType => "UNKNOWN_MESSAGE_TYPE",
            ErrorCode::InternalError => "INTERNAL_ERROR",
            ErrorCode::InvalidPayload => "INVALID_PAYLOAD",
            ErrorCode::InvalidOptions => "INVALID_OPTIONS",
            ErrorCode::BackendUnavailable => "BACKEND_UNAVAILABLE",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::NodeBusy => "NODE_BUSY",
        }
    }
}

/// A rejected request, sent to the requesting socket as `protocol_error`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
    pub session_id: Option<String>,
    /// The `clientRequestId` of the `chat.send` this answers (only when it carried one).
    pub client_request_id: Option<String>,
    /// The key's send was answered before: this is what became of it.
    pub duplicate: bool,
    /// Whether a run may have started despite the refusal (`outcome: "unknown"`).
    pub outcome_unknown: bool,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
            session_id: None,
            client_request_id: None,
            duplicate: false,
            outcome_unknown: false,
        }
    }

    pub fn with_session(mut self, session_id: &str) -> Self {
        self.session_id = Some(session_id.to_string());
        self
    }

    /// Names the `clientRequestId` of the `chat.send` this refuses.
    pub fn with_request(mut self, client_request_id: Option<&str>) -> Self {
        self.client_request_id = client_request_id.map(str::to_string);
        self
    }

    /// Marks the answer as the recorded outcome of an earlier send with the same key.
    pub fn as_duplicate(mut self) -> Self {
        self.duplicate = true;
        self
    }

    /// Marks a refusal after which a run may still have started.
    pub fn with_unknown_outcome(mut self) -> Self {
        self.outcome_unknown = true;
        self
    }

    pub fn to_frame(&self) -> Frame {
        let Some(key) = &self.client_request_id else {
            return protocol_error(self.code, &self.message, self.session_id.as_deref());
        };
        // Fields a client only gets when it sent a key (docs/protocol.md §Idempotent sends).
        let mut frame = json!({
            "id": gateway_id("protocol_error"),
            "kind": "protocol_error",
            "code": self.code.as_str(),
            "error": self.message,
            "sessionId": self.session_id,
            "clientRequestId": key,
            "duplicate": self.duplicate,
            "timestamp": now_iso(),
        });
        if self.outcome_unknown {
            frame["outcome"] = Value::from("unknown");
        }
        Frame::from(frame.to_string())
    }
}

/// An un-sequenced provider event: a JSON object without `seq`, plus its kind.
///
/// The registry assigns the seq; [`sequenced`] splices it into the object so
/// the body is serialised once, by the owner, whichever node delivers it.
#[derive(Debug, Clone, PartialEq)]
pub struct EventBody {
    pub kind: String,
    pub json: String,
}

impl EventBody {
    /// Serialises a JSON object (must be an object) as an event body.
    pub fn from_object(kind: &str, value: &Value) -> Self {
        debug_assert!(value.is_object());
        EventBody { kind: kind.to_string(), json: value.to_string() }
    }

    pub fn is_complete(&self) -> bool {
        self.kind == "complete"
    }
}

/// The wire frame of an event body with its seq: `{…,"seq":N}`.
pub fn sequenced(body_json: &str, seq: u64) -> Frame {
    let trimmed = body_json.trim_end();
    let open = trimmed.strip_suffix('}').unwrap_or(trimmed);
    let mut out = String::with_capacity(open.len() + 24);
    out.push_str(open);
    if open.trim_end().ends_with('{') {
        out.push_str("\"seq\":");
    } else {
        out.push_str(",\"seq\":");
    }
    out.push_str(&seq.to_string());
    out.push('}');
    Frame::from(out)
}

/// Current time as ISO-8601 with milliseconds, like JavaScript's `toISOString`.
pub fn now_iso() -> String {
    let now = time::OffsetDateTime::now_utc();
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    now.format(format).unwrap_or_default()
}

/// `protocol_error` frame.
pub fn protocol_error(code: ErrorCode, error: &str, session_id: Option<&str>) -> Frame {
    Frame::from(
        json!({
            "id": gateway_id("protocol_error"),
            "kind": "protocol_error",
            "code": code.as_str(),
            "error": error,
            "sessionId": session_id,
            "timestamp": now_iso(),
        })
        .to_string(),
    )
}

/// `chat_subscribed` frame (one per subscribe target, before its replay).
pub fn chat_subscribed(
    session_id: &str,
    is_processing: bool,
    last_seq: u64,
    run_id: Option<&str>,
    pending_permissions: &[Value],
    replay_truncated: bool,
) -> Frame {
    Frame::from(
        json!({
            "id": gateway_id("chat_subscribed"),
            "kind": "chat_subscribed",
            "sessionId": session_id,
            "isProcessing": is_processing,
            "lastSeq": last_seq,
            "runId": run_id,
            "pendingPermissions": pending_permissions,
            "replayTruncated": replay_truncated,
            "timestamp": now_iso(),
        })
        .to_string(),
    )
}

/// `chat_accepted` frame (addition, only to a sender that gave a
/// `clientRequestId`): the run its send started, or, for a key already seen
/// (`duplicate`), the run the first send with that key started.
pub fn chat_accepted(
    session_id: &str,
    client_request_id: &str,
    run_id: &str,
    first_seq: u64,
    duplicate: bool,
    is_processing: bool,
) -> Frame {
    Frame::from(
        json!({
            "id": gateway_id("chat_accepted"),
            "kind": "chat_accepted",
            "sessionId": session_id,
            "clientRequestId": client_request_id,
            "runId": run_id,
            "firstSeq": first_seq,
            "duplicate": duplicate,
            "isProcessing": is_processing,
            "timestamp": now_iso(),
        })
        .to_string(),
    )
}

/// `connected` frame (addition): the first frame of a socket that opted in
/// (`/ws?…&hello=1`), naming the node serving it.
pub fn connected(node_id: &str) -> Frame {
    Frame::from(
        json!({ "id": gateway_id("connected"), "kind": "connected", "nodeId": node_id, "timestamp": now_iso() })
            .to_string(),
    )
}

/// A fresh string id for a gateway frame: upstream's client keeps frames it
/// does not act on as chat rows, and its store merges rows by a string `id`.
pub fn gateway_id(kind: &str) -> String {
    format!("{kind}_{}", uuid::Uuid::new_v4())
}

/// What a socket that did not opt into chatgate's additions gets for a
/// sequenced event frame: `permission_resolved` (a kind upstream's client does
/// not know) becomes the `permission_cancelled` upstream's client does handle
/// (it drops the pending approval), with the same id, seq and requestId and
/// `reason: "resolved"`; every other frame is passed through.
pub fn for_upstream_client(frame: Frame) -> Frame {
    if !frame.as_str().contains("\"kind\":\"permission_resolved\"") {
        return frame;
    }
    match serde_json::from_str::<Value>(frame.as_str()) {
        Ok(Value::Object(mut object)) if object.get("kind") == Some(&Value::from("permission_resolved")) => {
            object.insert("kind".into(), Value::from("permission_cancelled"));
            object.insert("reason".into(), Value::from("resolved"));
            Frame::from(Value::Object(object).to_string())
        }
        _ => frame,
    }
}

/// `session_upserted` frame, sent to the owning user's sockets only.
///
/// `session` is chatgate's `Session` object; upstream's sidebar fields are
/// added beside its own: `session.id`, `session.messageCount` (the
/// conversation rows `GET …/messages` counts), `session.lastActivity` (its
/// `updatedAt`), and `project` shaped as upstream shapes it
/// (`{projectId, path, fullPath, displayName, isStarred}`, or null without a
/// project path).
pub fn session_upserted(
    session_id: &str,
    provider: &str,
    provider_session_id: Option<&str>,
    session: &Value,
    message_count: i64,
) -> Frame {
    let mut session = session.clone();
    let project_path = session["projectPath"].as_str().map(str::to_string);
    if let Value::Object(object) = &mut session {
        object.insert("id".into(), Value::from(session_id));
        object.insert("messageCount".into(), Value::from(message_count));
        let last_activity = object.get("updatedAt").cloned().unwrap_or(Value::Null);
        object.insert("lastActivity".into(), last_activity);
        object.entry("summary").or_insert(Value::Null);
    }
    let project = match project_path.filter(|p| !p.is_empty()) {
        Some(path) => {
            let display = std::path::Path::new(&path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.clone());
            json!({ "projectId": path, "path": path, "fullPath": path, "displayName": display, "isStarred": false })
        }
        None => Value::Null,
    };
    Frame::from(
        json!({
            "id": gateway_id("session_upserted"),
            "kind": "session_upserted",
            "sessionId": session_id,
            "provider": provider,
            "providerSessionId": provider_session_id,
            "session": session,
            "project": project,
            "timestamp": now_iso(),
        })
        .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_is_spliced_into_the_object() {
        let frame = sequenced(r#"{"kind":"text","content":"}"}"#, 42);
        let v: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["seq"], 42);
        assert_eq!(v["content"], "}");
        let empty: Value = serde_json::from_str(&sequenced("{}", 1)).unwrap();
        assert_eq!(empty["seq"], 1);
    }

    #[test]
    fn only_keyed_refusals_carry_the_key_fields() {
        let plain: Value =
            serde_json::from_str(&ProtocolError::new(ErrorCode::RateLimited, "slow").with_session("s").to_frame())
                .unwrap();
        for field in ["clientRequestId", "duplicate", "outcome"] {
            assert!(plain.get(field).is_none(), "{field} in {plain}");
        }
        let keyed =
            ProtocolError::new(ErrorCode::BackendUnavailable, "down").with_session("s").with_request(Some("k1"));
        let frame: Value = serde_json::from_str(&keyed.clone().with_unknown_outcome().to_frame()).unwrap();
        assert_eq!((frame["clientRequestId"].as_str(), frame["outcome"].as_str()), (Some("k1"), Some("unknown")));
        assert_eq!(frame["duplicate"], false);
        let frame: Value = serde_json::from_str(&keyed.as_duplicate().to_frame()).unwrap();
        assert_eq!(frame["duplicate"], true);
        assert!(frame.get("outcome").is_none());
    }

    #[test]
    fn iso_timestamps_look_like_javascript() {
        let ts = now_iso();
        assert_eq!(ts.len(), 24, "{ts}");
        assert!(ts.ends_with('Z'));
    }
}
