//! Inbound (client → server) frames, parsed as the seed parses them.

use serde_json::{Map, Value};

use super::outbound::{ErrorCode, ProtocolError};

/// One `chat.subscribe` target.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscribeTarget {
    pub session_id: String,
    /// The client's cursor: non-numbers and negatives become 0, fractions are floored.
    pub last_seq: u64,
}

/// The answer to a tool approval (`chat.permission-response`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PermissionAnswer {
    pub allow: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_input: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remember_entry: Option<Value>,
}

/// A parsed inbound frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    Send {
        session_id: String,
        content: String,
        options: Map<String, Value>,
        /// The client's idempotency key (docs/protocol.md §Idempotent sends).
        client_request_id: Option<String>,
    },
    Abort {
        session_id: String,
    },
    Subscribe {
        targets: Vec<SubscribeTarget>,
    },
    Unsubscribe {
        session_ids: Vec<String>,
    },
    /// `None` request id: ignored silently, as upstream.
    PermissionResponse {
        request_id: Option<String>,
        answer: PermissionAnswer,
    },
}

/// Parses one text frame. Errors carry the code and text the client receives.
pub fn parse_inbound(text: &str) -> Result<Inbound, ProtocolError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|_| ProtocolError::new(ErrorCode::InvalidPayload, "Invalid websocket payload: not JSON."))?;
    let Value::Object(data) = value else {
        return Err(ProtocolError::new(ErrorCode::InvalidPayload, "Invalid websocket payload: not a JSON object."));
    };
    let kind = data.get("type").and_then(Value::as_str).unwrap_or("");
    match kind {
        "chat.send" => {
            let session_id = required_session_id(&data, "chat.send")?;
            let content = match data.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(_) => {
                    return Err(ProtocolError::new(ErrorCode::InvalidPayload, "chat.send content must be a string.")
                        .with_session(&session_id));
                }
            };
            let options = match data.get("options") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(o)) => o.clone(),
                Some(_) => {
                    return Err(ProtocolError::new(ErrorCode::InvalidOptions, "chat.send options must be an object.")
                        .with_session(&session_id));
                }
            };
            let client_request_id = match data.get("clientRequestId") {
                None | Some(Value::Null) => None,
                Some(Value::String(key)) if valid_client_request_id(key) => Some(key.clone()),
                Some(_) => {
                    return Err(ProtocolError::new(
                        ErrorCode::InvalidPayload,
                        "chat.send clientRequestId must be 1–128 characters of letters, digits, '.', '_', ':' or '-'.",
                    )
                    .with_session(&session_id));
                }
            };
            Ok(Inbound::Send { session_id, content, options, client_request_id })
        }
        "chat.abort" => Ok(Inbound::Abort { session_id: required_session_id(&data, "chat.abort")? }),
        "chat.subscribe" => {
            let targets = data
                .get("sessions")
                .and_then(Value::as_array)
                .map(|items| items.iter().filter_map(subscribe_target).collect())
                .unwrap_or_default();
            Ok(Inbound::Subscribe { targets })
        }
        "chat.unsubscribe" => {
            let session_ids = data
                .get("sessions")
                .and_then(Value::as_array)
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|item| match item {
                            Value::String(s) => Some(s.trim().to_string()),
                            Value::Object(o) => {
                                o.get("sessionId").and_then(Value::as_str).map(|s| s.trim().to_string())
                            }
                            _ => None,
                        })
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default();
            Ok(Inbound::Unsubscribe { session_ids })
        }
        "chat.permission-response" => {
            let request_id =
                data.get("requestId").and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
            let answer = PermissionAnswer {
                allow: truthy(data.get("allow")),
                updated_input: data.get("updatedInput").filter(|v| !v.is_null()).cloned(),
                message: data.get("message").and_then(Value::as_str).map(str::to_string),
                remember_entry: data.get("rememberEntry").filter(|v| !v.is_null()).cloned(),
            };
            Ok(Inbound::PermissionResponse { request_id, answer })
        }
        other => Err(ProtocolError::new(ErrorCode::UnknownMessageType, format!("Unknown message type \"{other}\"."))),
    }
}

/// The most characters a `clientRequestId` may have.
pub const MAX_CLIENT_REQUEST_ID: usize = 128;

/// 1–128 characters of `[A-Za-z0-9._:-]` (a UUID fits; nothing that needs escaping in a Redis key).
fn valid_client_request_id(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_CLIENT_REQUEST_ID
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

fn required_session_id(data: &Map<String, Value>, verb: &str) -> Result<String, ProtocolError> {
    let id = data.get("sessionId").and_then(Value::as_str).map(str::trim).unwrap_or("");
    if id.is_empty() {
        return Err(ProtocolError::new(ErrorCode::SessionIdRequired, format!("{verb} requires a sessionId.")));
    }
    Ok(id.to_string())
}

fn subscribe_target(item: &Value) -> Option<SubscribeTarget> {
    let obj = item.as_object()?;
    let session_id = obj.get("sessionId")?.as_str()?.trim();
    if session_id.is_empty() {
        return None;
    }
    let last_seq = match obj.get("lastSeq") {
        Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
            (Some(u), _) => u,
            (None, Some(f)) if f.is_finite() && f > 0.0 => f.floor().min(u64::MAX as f64) as u64,
            _ => 0,
        },
        _ => 0,
    };
    Some(SubscribeTarget { session_id: session_id.to_string(), last_seq })
}

/// JavaScript's `Boolean(x)` for a JSON value.
fn truthy(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0 && !f.is_nan()),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> ErrorCode {
        parse_inbound(text).unwrap_err().code
    }

    #[test]
    fn bad_frames_get_codes() {
        assert_eq!(code("not json"), ErrorCode::InvalidPayload);
        assert_eq!(code("[1,2]"), ErrorCode::InvalidPayload);
        assert_eq!(code("\"str\""), ErrorCode::InvalidPayload);
        assert_eq!(code(r#"{"type":"chat.nope"}"#), ErrorCode::UnknownMessageType);
        assert_eq!(code(r#"{}"#), ErrorCode::UnknownMessageType);
        assert_eq!(code(r#"{"type":"chat.send","sessionId":"  "}"#), ErrorCode::SessionIdRequired);
        assert_eq!(code(r#"{"type":"chat.abort"}"#), ErrorCode::SessionIdRequired);
        assert_eq!(code(r#"{"type":"chat.send","sessionId":"a","content":5}"#), ErrorCode::InvalidPayload);
        assert_eq!(code(r#"{"type":"chat.send","sessionId":"a","options":[]}"#), ErrorCode::InvalidOptions);
    }

    #[test]
    fn client_request_id_is_optional_and_checked() {
        let key = |text: &str| match parse_inbound(text) {
            Ok(Inbound::Send { client_request_id, .. }) => Ok(client_request_id),
            Ok(_) => panic!("not a send"),
            Err(e) => Err(e.code),
        };
        assert_eq!(key(r#"{"type":"chat.send","sessionId":"a"}"#), Ok(None));
        assert_eq!(key(r#"{"type":"chat.send","sessionId":"a","clientRequestId":null}"#), Ok(None));
        let uuid = "0b6f1c2e-3a4d-4e5f-8a9b-0c1d2e3f4a5b";
        assert_eq!(
            key(&format!(r#"{{"type":"chat.send","sessionId":"a","clientRequestId":"{uuid}"}}"#)),
            Ok(Some(uuid.into()))
        );
        let longest = "k".repeat(MAX_CLIENT_REQUEST_ID);
        assert_eq!(
            key(&format!(r#"{{"type":"chat.send","sessionId":"a","clientRequestId":"{longest}"}}"#)),
            Ok(Some(longest))
        );
        for bad in ["\"\"", "5", "{}", "\"a b\"", "\"a}b\"", "\"é\"", &format!("\"{}\"", "k".repeat(129))] {
            let text = format!(r#"{{"type":"chat.send","sessionId":"a","clientRequestId":{bad}}}"#);
            assert_eq!(key(&text), Err(ErrorCode::InvalidPayload), "{bad}");
        }
    }

    #[test]
    fn subscribe_is_lenient_like_upstream() {
        let parsed = parse_inbound(
            r#"{"type":"chat.subscribe","sessions":[null,5,{"sessionId":" a "},{"sessionId":"b","lastSeq":-3},
            {"sessionId":"c","lastSeq":2.9},{"sessionId":"d","lastSeq":"7"},{"sessionId":"e","lastSeq":1e300},{"lastSeq":1}]}"#,
        )
        .unwrap();
        let Inbound::Subscribe { targets } = parsed else { panic!() };
        let got: Vec<(&str, u64)> = targets.iter().map(|t| (t.session_id.as_str(), t.last_seq)).collect();
        assert_eq!(got, vec![("a", 0), ("b", 0), ("c", 2), ("d", 0), ("e", u64::MAX)]);
        let Inbound::Subscribe { targets } = parse_inbound(r#"{"type":"chat.subscribe","sessions":"x"}"#).unwrap()
        else {
            panic!()
        };
        assert!(targets.is_empty());
    }

    #[test]
    fn permission_response_coerces_allow() {
        let Inbound::PermissionResponse { request_id, answer } =
            parse_inbound(r#"{"type":"chat.permission-response","requestId":"r","allow":1,"message":"m"}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(request_id.as_deref(), Some("r"));
        assert!(answer.allow);
        assert_eq!(answer.message.as_deref(), Some("m"));
    }
}
