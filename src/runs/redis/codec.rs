//! Decoding what the scripts return and publish into [`Event`]s.
//!
//! A live message on `cg:{S}:live` is one append batch: records of
//! `"<seq> <t> <#runId> <#body> " ++ runId ++ body` back to back (lengths in
//! bytes). Script replies are RESP arrays; the stream entries come flattened
//! as `seq, runId, t, body` quadruples.

use std::sync::Arc;

use ::redis::Value;
use serde::Deserialize;

use crate::{protocol::sequenced, runs::Event};

/// A script reply that does not have the expected shape.
#[derive(Debug, thiserror::Error)]
#[error("unexpected reply from Redis: {0}")]
pub(super) struct BadReply(pub String);

/// The lock / owner record (`cg:{S}:run`, `cg:{S}:owner`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(super) struct OwnerRecord {
    pub(super) run_id: String,
    pub(super) node_id: String,
    pub(super) provider: String,
    pub(super) user_id: String,
    pub(super) started_at: String,
    pub(super) first_seq: u64,
}

impl OwnerRecord {
    pub(super) fn parse(json: &str) -> Result<Self, BadReply> {
        serde_json::from_str(json).map_err(|e| BadReply(format!("owner record {json:?}: {e}")))
    }

    /// Whether `json` (a lock or owner record, if any) is run `run_id`'s.
    pub(super) fn names_run(json: Option<&str>, run_id: &str) -> bool {
        json.and_then(|j| Self::parse(j).ok()).is_some_and(|o| o.run_id == run_id)
    }
}

/// What `cg:{S}:req:<key>` holds: the run the key's send started, or the run
/// that held the lock when it was refused (`refused: "RUN_IN_PROGRESS"`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(super) struct RequestRecord {
    pub(super) run_id: String,
    #[serde(default)]
    pub(super) first_seq: u64,
    #[serde(default)]
    pub(super) refused: Option<String>,
}

impl RequestRecord {
    pub(super) fn parse(json: &str) -> Result<Self, BadReply> {
        serde_json::from_str(json).map_err(|e| BadReply(format!("request record {json:?}: {e}")))
    }

    /// The answer to a send with this key, given the lock's JSON now (empty: no run).
    pub(super) fn prior_send(&self, lock_json: &str) -> crate::runs::PriorSend {
        if self.refused.is_some() {
            return crate::runs::PriorSend::RefusedBusy;
        }
        let running = OwnerRecord::names_run(Some(lock_json), &self.run_id);
        crate::runs::PriorSend::Started {
            run_id: self.run_id.clone(),
            first_seq: self.first_seq,
            is_processing: running,
        }
    }
}

/// Builds events, sharing one `Arc<str>` per run id.
#[derive(Default)]
pub(super) struct EventBuilder {
    run_id: Option<Arc<str>>,
}

impl EventBuilder {
    pub(super) fn event(&mut self, seq: u64, run_id: &str, terminal: bool, body: &str) -> Event {
        let run_id = match &self.run_id {
            Some(current) if **current == *run_id => current.clone(),
            _ => {
                let fresh: Arc<str> = Arc::from(run_id);
                self.run_id = Some(fresh.clone());
                fresh
            }
        };
        Event { seq, run_id, terminal, frame: sequenced(body, seq) }
    }
}

/// How old an event is, by the `timestamp` its owner labelled it with: for a
/// live message, the time from labelling through append and pub/sub to this node.
pub(super) fn event_age(frame: &str) -> Option<std::time::Duration> {
    const KEY: &str = "\"timestamp\":\"";
    let start = frame.find(KEY)? + KEY.len();
    let raw = frame.get(start..start + 24)?;
    let at = time::OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc3339).ok()?;
    let age = time::OffsetDateTime::now_utc() - at;
    std::time::Duration::try_from(age).ok()
}

/// Decodes one live message (a batch) into events.
pub(super) fn decode_live(payload: &[u8], builder: &mut EventBuilder) -> Result<Vec<Event>, BadReply> {
    let mut events = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() {
        let seq = take_number(&mut rest)?;
        let terminal = take_number(&mut rest)? == 1;
        let run_len = usize::try_from(take_number(&mut rest)?).map_err(|_| bad("run id length"))?;
        let body_len = usize::try_from(take_number(&mut rest)?).map_err(|_| bad("body length"))?;
        let run_id = take_str(&mut rest, run_len)?;
        let body = take_str(&mut rest, body_len)?;
        events.push(builder.event(seq, run_id, terminal, body));
    }
    Ok(events)
}

fn bad(what: &str) -> BadReply {
    BadReply(format!("live message: bad {what}"))
}

fn take_number(rest: &mut &[u8]) -> Result<u64, BadReply> {
    let space = rest.iter().position(|b| *b == b' ').ok_or_else(|| bad("record header"))?;
    let text = std::str::from_utf8(&rest[..space]).map_err(|_| bad("number"))?;
    let number = text.parse().map_err(|_| bad("number"))?;
    *rest = &rest[space + 1..];
    Ok(number)
}

fn take_str<'a>(rest: &mut &'a [u8], len: usize) -> Result<&'a str, BadReply> {
    if rest.len() < len {
        return Err(bad("record length"));
    }
    let (head, tail) = rest.split_at(len);
    *rest = tail;
    std::str::from_utf8(head).map_err(|_| bad("utf-8"))
}

/// Flattened stream entries (`seq, runId, t, body`…) into events.
pub(super) fn decode_entries(value: Value) -> Result<Vec<Event>, BadReply> {
    let items = array(value)?;
    if items.len() % 4 != 0 {
        return Err(BadReply(format!("stream entries: {} items", items.len())));
    }
    let mut builder = EventBuilder::default();
    let mut events = Vec::with_capacity(items.len() / 4);
    let mut it = items.into_iter();
    while let (Some(seq), Some(run_id), Some(terminal), Some(body)) = (it.next(), it.next(), it.next(), it.next()) {
        let seq = int(seq)?;
        let run_id = text(run_id)?;
        let terminal = text(terminal)? == "1";
        let body = text(body)?;
        events.push(builder.event(seq, &run_id, terminal, &body));
    }
    Ok(events)
}

/// A plain `XRANGE` reply (`[[id, [field, value, …]], …]`, fields `r` run id, `t` terminal,
/// `b` body) into events, appended to `events`. The reply's strings are read in place: no
/// allocation per entry but the event's frame (and a run id's, once per run).
pub(super) fn decode_stream(value: Value, builder: &mut EventBuilder, events: &mut Vec<Event>) -> Result<(), BadReply> {
    let entries = array(value)?;
    events.reserve(entries.len());
    for entry in entries {
        let mut parts = array(entry)?.into_iter();
        let (Some(id), Some(fields)) = (parts.next(), parts.next()) else {
            return Err(BadReply("stream entry without an id and fields".into()));
        };
        let id = utf8(&id)?;
        let seq = id
            .split_once('-')
            .and_then(|(seq, _)| seq.parse().ok())
            .ok_or_else(|| BadReply(format!("stream entry id {id:?}")))?;
        let fields = field_values(fields)?;
        let (mut run_id, mut terminal, mut body) = (None, false, None);
        for pair in fields.chunks_exact(2) {
            match bytes(&pair[0])? {
                b"r" => run_id = Some(utf8(&pair[1])?),
                b"t" => terminal = bytes(&pair[1])? == b"1",
                b"b" => body = Some(utf8(&pair[1])?),
                _ => {}
            }
        }
        let (Some(run_id), Some(body)) = (run_id, body) else {
            return Err(BadReply(format!("stream entry {id} without a run id or body")));
        };
        events.push(builder.event(seq, run_id, terminal, body));
    }
    Ok(())
}

/// A string reply's bytes, borrowed.
fn bytes(value: &Value) -> Result<&[u8], BadReply> {
    match value {
        Value::BulkString(bytes) => Ok(bytes),
        Value::SimpleString(s) => Ok(s.as_bytes()),
        other => Err(BadReply(format!("expected a string, got {other:?}"))),
    }
}

/// A string reply, borrowed.
fn utf8(value: &Value) -> Result<&str, BadReply> {
    std::str::from_utf8(bytes(value)?).map_err(|_| BadReply("non-UTF-8 string".into()))
}

/// An entry's fields as `name, value, …` (an array in RESP2, a map in RESP3).
fn field_values(value: Value) -> Result<Vec<Value>, BadReply> {
    match value {
        Value::Map(pairs) => Ok(pairs.into_iter().flat_map(|(k, v)| [k, v]).collect()),
        other => array(other),
    }
}

/// True when `events` are exactly the seqs `from + 1 ..= to` (or the range is empty).
pub(super) fn is_contiguous(events: &[Event], from: u64, to: u64) -> bool {
    if to <= from {
        return true;
    }
    let Ok(expected) = usize::try_from(to - from) else { return false };
    events.len() == expected && events.iter().zip(from + 1..).all(|(e, seq)| e.seq == seq)
}

pub(super) fn array(value: Value) -> Result<Vec<Value>, BadReply> {
    match value {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(BadReply(format!("expected an array, got {other:?}"))),
    }
}

pub(super) fn text(value: Value) -> Result<String, BadReply> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).map_err(|_| BadReply("non-UTF-8 string".into())),
        Value::SimpleString(s) => Ok(s),
        Value::Okay => Ok("OK".into()),
        Value::Int(n) => Ok(n.to_string()),
        Value::Nil => Ok(String::new()),
        other => Err(BadReply(format!("expected a string, got {other:?}"))),
    }
}

pub(super) fn int(value: Value) -> Result<u64, BadReply> {
    match value {
        Value::Int(n) => u64::try_from(n).map_err(|_| BadReply(format!("negative number {n}"))),
        Value::BulkString(bytes) => std::str::from_utf8(&bytes)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| BadReply("expected a number".into())),
        other => Err(BadReply(format!("expected a number, got {other:?}"))),
    }
}

/// A list of strings (e.g. request ids).
pub(super) fn texts(value: Value) -> Result<Vec<String>, BadReply> {
    array(value)?.into_iter().map(text).collect()
}

#[cfg(test)]
mod age_tests {
    #[test]
    fn event_age_reads_the_owner_timestamp() {
        let frame = format!(r#"{{"kind":"text","timestamp":"{}","seq":1}}"#, crate::protocol::now_iso());
        let age = super::event_age(&frame).unwrap();
        assert!(age < std::time::Duration::from_secs(5));
        assert!(super::event_age(r#"{"kind":"text"}"#).is_none());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, terminal: bool, run_id: &str, body: &str) -> String {
        format!("{seq} {} {} {} {run_id}{body}", u8::from(terminal), run_id.len(), body.len())
    }

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    fn decode(value: Value) -> Result<Vec<Event>, BadReply> {
        let mut events = Vec::new();
        decode_stream(value, &mut EventBuilder::default(), &mut events).map(|()| events)
    }

    #[test]
    fn xrange_entries_decode_in_either_protocol_and_bad_ones_are_refused() {
        let fields = |terminal: &str, body: &str| {
            vec![bulk("r"), bulk("run-1"), bulk("t"), bulk(terminal), bulk("b"), bulk(body)]
        };
        let resp2 = Value::Array(vec![
            Value::Array(vec![bulk("7-0"), Value::Array(fields("0", r#"{"kind":"text"}"#))]),
            Value::Array(vec![bulk("8-0"), Value::Array(fields("1", r#"{"kind":"complete"}"#))]),
        ]);
        let events = decode(resp2).unwrap();
        assert_eq!(events.iter().map(|e| (e.seq, e.terminal)).collect::<Vec<_>>(), [(7, false), (8, true)]);
        assert_eq!(&*events[0].run_id, "run-1");
        assert_eq!(events[1].frame, r#"{"kind":"complete","seq":8}"#);

        let pairs = |terminal: &str| {
            let f = fields(terminal, r#"{"kind":"text"}"#);
            f.chunks(2).map(|kv| (kv[0].clone(), kv[1].clone())).collect::<Vec<_>>()
        };
        let resp3 = Value::Array(vec![Value::Array(vec![bulk("9-0"), Value::Map(pairs("0"))])]);
        assert_eq!(decode(resp3).unwrap()[0].seq, 9);
        assert!(decode(Value::Nil).unwrap().is_empty());

        let no_body = Value::Array(vec![Value::Array(vec![bulk("3-0"), Value::Array(vec![bulk("r"), bulk("x")])])]);
        assert!(decode(no_body).is_err());
        let bad_id = Value::Array(vec![Value::Array(vec![bulk("three"), Value::Array(fields("0", "{}"))])]);
        assert!(decode(bad_id).is_err());
        assert!(decode(Value::Array(vec![Value::Array(vec![bulk("3-0")])])).is_err());
        let number_as_name =
            Value::Array(vec![Value::Array(vec![bulk("4-0"), Value::Array(vec![Value::Int(1), bulk("x")])])]);
        assert!(decode(number_as_name).is_err());
    }

    #[test]
    fn live_batches_decode_in_order() {
        let payload = format!(
            "{}{}",
            record(7, false, "r 1", r#"{"kind":"text","content":"a 1 2 {"}"#),
            record(8, true, "r 1", r#"{"kind":"complete","error":"é"}"#)
        );
        let events = decode_live(payload.as_bytes(), &mut EventBuilder::default()).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!((events[0].seq, events[0].terminal, &*events[0].run_id), (7, false, "r 1"));
        assert_eq!((events[1].seq, events[1].terminal), (8, true));
        let v: serde_json::Value = serde_json::from_str(&events[1].frame).unwrap();
        assert_eq!(v["seq"], 8);
        assert_eq!(v["error"], "é");
        assert!(Arc::ptr_eq(&events[0].run_id, &events[1].run_id));
    }

    #[test]
    fn truncated_live_messages_are_rejected() {
        let payload = record(1, false, "r", "{}");
        assert!(decode_live(&payload.as_bytes()[..payload.len() - 1], &mut EventBuilder::default()).is_err());
        assert!(decode_live(b"1 0 x", &mut EventBuilder::default()).is_err());
    }

    #[test]
    fn contiguity() {
        let mut b = EventBuilder::default();
        let evs: Vec<Event> = [3, 4, 5].iter().map(|s| b.event(*s, "r", false, "{}")).collect();
        assert!(is_contiguous(&evs, 2, 5));
        assert!(!is_contiguous(&evs, 1, 5));
        assert!(!is_contiguous(&evs, 2, 6));
        assert!(is_contiguous(&[], 5, 5));
        assert!(is_contiguous(&[], 6, 5));
        assert!(!is_contiguous(&[], 4, 5));
    }
}
