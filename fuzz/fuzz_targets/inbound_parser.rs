//! Fuzz target: the inbound frame parser (`protocol::parse_inbound`).
//!
//! Any text (the input bytes, lossily as UTF-8, as a WebSocket text frame
//! always is) must parse without panicking into a verb or a `protocol_error`.
//! Invariants checked:
//! - an accepted frame is normalised: session ids trimmed and non-empty, a
//!   request id non-empty when present;
//! - round trip: the verb written back as a canonical frame parses to the same
//!   verb (floats inside pass-through JSON compared to 1e-12 relative, since
//!   serde_json's default float parsing is not exactly round-tripping);
//! - a rejection serialises to a valid `protocol_error` frame carrying its code
//!   and session id.
#![no_main]

use chatgate::protocol::{Inbound, parse_inbound};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match parse_inbound(&text) {
        Ok(parsed) => {
            check_normalised(&parsed);
            let frame = canonical(&parsed).to_string();
            let reparsed = parse_inbound(&frame).unwrap_or_else(|e| panic!("canonical {frame} refused: {e}"));
            assert!(same_inbound(&parsed, &reparsed), "round trip changed {parsed:?} into {reparsed:?}");
        }
        Err(error) => {
            let frame: Value = serde_json::from_str(&error.to_frame()).expect("protocol_error is JSON");
            assert_eq!(frame["kind"], "protocol_error");
            assert_eq!(frame["code"], error.code.as_str());
            assert_eq!(frame["error"], error.message.as_str());
            assert_eq!(frame["sessionId"].as_str(), error.session_id.as_deref());
        }
    }
});

fn check_normalised(parsed: &Inbound) {
    let id_ok = |id: &str| !id.is_empty() && id.trim() == id;
    match parsed {
        Inbound::Send { session_id, .. } | Inbound::Abort { session_id } => assert!(id_ok(session_id)),
        Inbound::Subscribe { targets } => assert!(targets.iter().all(|t| id_ok(&t.session_id))),
        Inbound::Unsubscribe { session_ids } => assert!(session_ids.iter().all(|id| id_ok(id))),
        Inbound::PermissionResponse { request_id, .. } => assert!(request_id.as_ref().is_none_or(|id| !id.is_empty())),
    }
}

/// The frame a well-behaved client would send for this verb.
fn canonical(parsed: &Inbound) -> Value {
    match parsed {
        Inbound::Send { session_id, content, options, client_request_id } => {
            json!({"type": "chat.send", "sessionId": session_id, "content": content, "options": options,
                   "clientRequestId": client_request_id})
        }
        Inbound::Abort { session_id } => json!({"type": "chat.abort", "sessionId": session_id}),
        Inbound::Subscribe { targets } => {
            let sessions: Vec<Value> =
                targets.iter().map(|t| json!({"sessionId": t.session_id, "lastSeq": t.last_seq})).collect();
            json!({"type": "chat.subscribe", "sessions": sessions})
        }
        Inbound::Unsubscribe { session_ids } => json!({"type": "chat.unsubscribe", "sessions": session_ids}),
        Inbound::PermissionResponse { request_id, answer } => {
            let mut frame = Map::new();
            frame.insert("type".into(), json!("chat.permission-response"));
            if let Some(id) = request_id {
                frame.insert("requestId".into(), json!(id));
            }
            frame.insert("allow".into(), json!(answer.allow));
            for (key, value) in [("updatedInput", &answer.updated_input), ("rememberEntry", &answer.remember_entry)] {
                if let Some(value) = value {
                    frame.insert(key.into(), value.clone());
                }
            }
            if let Some(message) = &answer.message {
                frame.insert("message".into(), json!(message));
            }
            Value::Object(frame)
        }
    }
}

fn same_inbound(a: &Inbound, b: &Inbound) -> bool {
    match (a, b) {
        (
            Inbound::Send { session_id: sa, content: ca, options: oa, client_request_id: ka },
            Inbound::Send { session_id: sb, content: cb, options: ob, client_request_id: kb },
        ) => sa == sb && ca == cb && ka == kb && same_map(oa, ob),
        (
            Inbound::PermissionResponse { request_id: ra, answer: aa },
            Inbound::PermissionResponse { request_id: rb, answer: ab },
        ) => {
            let same_opt = |x: &Option<Value>, y: &Option<Value>| match (x, y) {
                (Some(x), Some(y)) => same_json(x, y),
                (None, None) => true,
                _ => false,
            };
            ra == rb
                && aa.allow == ab.allow
                && aa.message == ab.message
                && same_opt(&aa.updated_input, &ab.updated_input)
                && same_opt(&aa.remember_entry, &ab.remember_entry)
        }
        _ => a == b,
    }
}

fn same_map(a: &Map<String, Value>, b: &Map<String, Value>) -> bool {
    a.len() == b.len() && a.iter().all(|(k, v)| b.get(k).is_some_and(|w| same_json(v, w)))
}

/// JSON equality, with floats equal to 1e-12 relative.
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x == y || (x - y).abs() <= 1e-12 * x.abs().max(y.abs()),
            _ => false,
        },
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y)),
        (Value::Object(x), Value::Object(y)) => same_map(x, y),
        _ => a == b,
    }
}
