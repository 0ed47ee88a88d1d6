//! The Lua scripts: every write to a session's keys is one atomic script.
//!
//! Each script is its own file in `lua/`, opening with a comment on what it
//! guarantees and named locals for its `KEYS` and `ARGV`; all but
//! `count_send.lua` are run after `lua/prelude.lua` (seq restore, append,
//! finish, retake). They are hashed once at start ([`Scripts::new`]) and run
//! with EVALSHA (`redis::Script` loads them again by itself after a
//! `NOSCRIPT`, e.g. after a Redis restart).
//!
//! Stream entries: id `<seq>-0`, fields `r` (run id), `t` (`1` for the terminal
//! `complete`), `b` (the event body JSON without `seq`; readers splice it in).
//! One PUBLISH per batch on `cg:{S}:live` carries every event of the batch as
//! `"<seq> <t> <#runId> <#body> " .. runId .. body` records (see `codec`);
//! on a Redis Cluster it is an SPUBLISH, so the message stays on the shard
//! that owns the session's slot (the prelude's `publish_command`, set here).
//!
//! Seq restore: a counter that is missing (Redis lost it, or it idled out) or
//! below the caller's floor (SQL's high-water mark, or the owner's own last
//! seq) is set to the highest seq known plus `--replay-max-events`, so that no
//! seq is ever reused even when SQL lags; the jump reaches subscribers as a gap.

use ::redis::{FromRedisValue, ParsingError, Script, ScriptInvocation, Value};

use super::{
    Topology,
    codec::{self, BadReply},
    keys,
};
use crate::runs::Event;

/// Functions shared by the scripts.
const PRELUDE: &str = include_str!("lua/prelude.lua");

/// Most entries `lua/read.lua` and `lua/read_range.lua` copy through Lua; a longer read is a plain
/// `XRANGE` after it (10 000 entries: 36 ms of Redis time through Lua, 8 ms as `XRANGE`).
pub(super) const INLINE_REPLAY: u64 = 128;

/// The registry's scripts, hashed once; each method builds one call of its script from its
/// inputs by name. Replies decode into the typed answers below (`FromRedisValue`).
pub(super) struct Scripts {
    count_send: Script,
    start: Script,
    append: Script,
    renew: Script,
    pending: Script,
    reap: Script,
    read: Script,
    read_range: Script,
    settle: Script,
}

impl Scripts {
    /// The scripts for a Redis of the given topology (it decides the publish command).
    pub(super) fn new(topology: Topology) -> Self {
        let publish = match topology {
            Topology::Standalone | Topology::Sentinel => "PUBLISH",
            Topology::Cluster => "SPUBLISH",
        };
        let with_prelude = |body: &str| Script::new(&format!("local publish_command = '{publish}'\n{PRELUDE}\n{body}"));
        Scripts {
            count_send: Script::new(include_str!("lua/count_send.lua")),
            start: with_prelude(include_str!("lua/start.lua")),
            append: with_prelude(include_str!("lua/append.lua")),
            renew: with_prelude(include_str!("lua/renew.lua")),
            pending: with_prelude(include_str!("lua/pending.lua")),
            reap: with_prelude(include_str!("lua/reap.lua")),
            read: with_prelude(include_str!("lua/read.lua")),
            read_range: with_prelude(include_str!("lua/read_range.lua")),
            settle: with_prelude(include_str!("lua/settle.lua")),
        }
    }

    /// `lua/count_send.lua`: counts one `chat.send` of `user_id` in a window of `window_ms`.
    pub(super) fn count_send(&self, user_id: &str, window_ms: u64) -> ScriptInvocation<'_> {
        let mut inv = self.count_send.prepare_invoke();
        inv.key(keys::user_sends(user_id)).arg(window_ms);
        inv
    }

    /// `lua/start.lua`: takes the session's run lock, reaping an orphan first.
    pub(super) fn start(&self, input: &StartInput<'_>) -> ScriptInvocation<'_> {
        let session_id = input.session_id;
        let mut inv = self.start.prepare_invoke();
        inv.key(keys::run(session_id))
            .key(keys::owner(session_id))
            .key(keys::seq(session_id))
            .key(keys::events(session_id))
            .key(keys::pending(session_id))
            .key(keys::live_channel(session_id))
            .key(keys::prompt(session_id))
            .key(keys::request(session_id, input.request.map_or("", |r| r.key)));
        inv.arg(input.run_id)
            .arg(input.node_id)
            .arg(input.provider)
            .arg(input.user_id)
            .arg(input.started_at)
            .arg(input.seqs.lease_ms)
            .arg(input.seqs.floor)
            .arg(input.seqs.margin)
            .arg(input.seqs.max_events)
            .arg(input.seqs.retention_ms)
            .arg(input.seqs.seq_ttl_ms)
            .arg(input.orphan.event_id)
            .arg(input.orphan.timestamp)
            .arg(session_id)
            .arg(input.orphan.error)
            .arg(flag(input.recently_active))
            .arg(input.prompt)
            .arg(flag(input.request.is_some()))
            .arg(input.request.map_or(0, |r| r.window_ms))
            .arg(input.request.map_or("", |r| r.key));
        inv
    }

    /// `lua/append.lua`: appends `bodies` under `batch_id`, fenced.
    pub(super) fn append(&self, input: &AppendInput<'_>) -> ScriptInvocation<'_> {
        let session_id = input.session_id;
        let mut inv = self.append.prepare_invoke();
        inv.key(keys::run(session_id))
            .key(keys::owner(session_id))
            .key(keys::seq(session_id))
            .key(keys::events(session_id))
            .key(keys::pending(session_id))
            .key(keys::live_channel(session_id))
            .key(keys::batch(session_id, input.batch_id))
            .key(keys::prompt(session_id))
            .key(keys::saving(session_id, input.run_id));
        inv.arg(input.run_id)
            .arg(input.seqs.lease_ms)
            .arg(input.seqs.max_events)
            .arg(input.seqs.floor)
            .arg(input.seqs.margin)
            .arg(flag(input.terminal))
            .arg(input.seqs.retention_ms)
            .arg(input.seqs.seq_ttl_ms)
            .arg(input.owner_json);
        for body in input.bodies {
            inv.arg(*body);
        }
        inv
    }

    /// `lua/renew.lua`: extends the run's lock, or re-takes it as `owner_json`.
    pub(super) fn renew(&self, input: &RenewInput<'_>) -> ScriptInvocation<'_> {
        let session_id = input.session_id;
        let mut inv = self.renew.prepare_invoke();
        inv.key(keys::run(session_id))
            .key(keys::owner(session_id))
            .key(keys::seq(session_id))
            .key(keys::events(session_id));
        inv.arg(input.run_id).arg(input.lease_ms).arg(input.owner_json).arg(input.floor).arg(input.margin);
        inv
    }

    /// `lua/pending.lua`: records (`Some(request_json)`) or forgets a pending approval, fenced.
    pub(super) fn pending(
        &self,
        session_id: &str,
        run_id: &str,
        request_id: &str,
        request_json: Option<&str>,
    ) -> ScriptInvocation<'_> {
        let mut inv = self.pending.prepare_invoke();
        inv.key(keys::run(session_id)).key(keys::pending(session_id));
        inv.arg(run_id).arg(request_id).arg(request_json.unwrap_or("")).arg(flag(request_json.is_some()));
        inv
    }

    /// `lua/reap.lua`: ends the session's orphaned run (or `lost`, a run Redis lost).
    pub(super) fn reap(&self, input: &ReapInput<'_>) -> ScriptInvocation<'_> {
        let session_id = input.session_id;
        let (expected_run_id, lost_provider) = input.lost.unwrap_or(("", ""));
        let mut inv = self.reap.prepare_invoke();
        inv.key(keys::run(session_id))
            .key(keys::owner(session_id))
            .key(keys::seq(session_id))
            .key(keys::events(session_id))
            .key(keys::pending(session_id))
            .key(keys::live_channel(session_id))
            .key(keys::prompt(session_id));
        inv.arg(expected_run_id)
            .arg(lost_provider)
            .arg(session_id)
            .arg(input.orphan.event_id)
            .arg(input.orphan.timestamp)
            .arg(input.orphan.error)
            .arg(input.seqs.max_events)
            .arg(input.seqs.retention_ms)
            .arg(input.seqs.seq_ttl_ms)
            .arg(input.seqs.floor)
            .arg(input.seqs.margin);
        inv
    }

    /// `lua/read.lua`: the session's owner, seq top, replay after `after` (`None`: no replay)
    /// and pending approvals, in one read.
    pub(super) fn read(&self, session_id: &str, after: Option<u64>) -> ScriptInvocation<'_> {
        let mut inv = self.read.prepare_invoke();
        inv.key(keys::owner(session_id)).key(keys::seq(session_id)).key(keys::events(session_id));
        inv.key(keys::pending(session_id));
        match after {
            Some(after) => inv.arg(after),
            None => inv.arg(-1),
        };
        inv.arg(INLINE_REPLAY);
        inv
    }

    /// `lua/read_range.lua`: the entries with `after < seq <= up_to` (`None`: to the newest).
    pub(super) fn read_range(&self, session_id: &str, after: u64, up_to: Option<u64>) -> ScriptInvocation<'_> {
        let mut inv = self.read_range.prepare_invoke();
        inv.key(keys::seq(session_id)).key(keys::events(session_id)).arg(after);
        match up_to {
            Some(up_to) => inv.arg(up_to),
            None => inv.arg("+"),
        };
        inv.arg(INLINE_REPLAY);
        inv
    }

    /// `lua/settle.lua`: how long a reader waits for a session whose state Redis lost.
    pub(super) fn settle(
        &self,
        session_id: &str,
        floor: u64,
        lease_ms: u64,
        recently_active: bool,
    ) -> ScriptInvocation<'_> {
        let mut inv = self.settle.prepare_invoke();
        inv.key(keys::run(session_id)).key(keys::owner(session_id)).key(keys::seq(session_id));
        inv.arg(floor).arg(lease_ms).arg(flag(recently_active));
        inv
    }
}

fn flag(on: bool) -> &'static str {
    if on { "1" } else { "0" }
}

/// How a script keeps seqs and expires a finished run's keys.
#[derive(Debug, Clone, Copy)]
pub(super) struct SeqRules {
    /// The run lock's lease.
    pub(super) lease_ms: u64,
    /// The lowest seq the counter may restart from (SQL's mark, or the owner's last seq).
    pub(super) floor: u64,
    /// Added to the highest seq known when the counter is restored.
    pub(super) margin: u64,
    /// The stream's `MAXLEN`.
    pub(super) max_events: u64,
    /// How long a finished run's stream is kept.
    pub(super) retention_ms: u64,
    /// How long an idle session's counter is kept.
    pub(super) seq_ttl_ms: u64,
}

/// The terminal `complete` a script writes for a run whose owner was lost.
#[derive(Debug, Clone, Copy)]
pub(super) struct OrphanComplete<'a> {
    pub(super) event_id: &'a str,
    pub(super) timestamp: &'a str,
    pub(super) error: &'a str,
}

/// `lua/start.lua`'s inputs.
pub(super) struct StartInput<'a> {
    pub(super) session_id: &'a str,
    pub(super) run_id: &'a str,
    pub(super) node_id: &'a str,
    pub(super) provider: &'a str,
    pub(super) user_id: &'a str,
    pub(super) started_at: &'a str,
    pub(super) seqs: SeqRules,
    pub(super) orphan: OrphanComplete<'a>,
    /// Whether SQL saw the session active within the counter's idle TTL.
    pub(super) recently_active: bool,
    pub(super) prompt: &'a str,
    /// The send's idempotency key, if it has one.
    pub(super) request: Option<RequestKey<'a>>,
}

/// An idempotency key and how long it is remembered.
#[derive(Clone, Copy)]
pub(super) struct RequestKey<'a> {
    pub(super) key: &'a str,
    pub(super) window_ms: u64,
}

/// `lua/append.lua`'s inputs.
pub(super) struct AppendInput<'a> {
    pub(super) session_id: &'a str,
    pub(super) run_id: &'a str,
    /// The same on every retry of one batch: a retry of an applied batch answers `Duplicate`.
    pub(super) batch_id: &'a str,
    /// The run's lock value, for a re-take.
    pub(super) owner_json: &'a str,
    pub(super) seqs: SeqRules,
    /// The last body is the run's `complete`.
    pub(super) terminal: bool,
    pub(super) bodies: &'a [&'a str],
}

/// `lua/renew.lua`'s inputs.
pub(super) struct RenewInput<'a> {
    pub(super) session_id: &'a str,
    pub(super) run_id: &'a str,
    pub(super) lease_ms: u64,
    pub(super) owner_json: &'a str,
    pub(super) floor: u64,
    pub(super) margin: u64,
}

/// `lua/reap.lua`'s inputs.
pub(super) struct ReapInput<'a> {
    pub(super) session_id: &'a str,
    /// `(run id, provider)` of a run Redis may have lost altogether.
    pub(super) lost: Option<(&'a str, &'a str)>,
    pub(super) orphan: OrphanComplete<'a>,
    pub(super) seqs: SeqRules,
}

/// `lua/start.lua`'s answer.
#[derive(Debug)]
pub(super) enum StartReply {
    /// Another run holds the lock.
    Busy,
    /// Redis lost the session's state less than a lease ago: retry after this long.
    Recovering { retry_ms: u64 },
    /// The idempotency key was seen: its record, and the lock's JSON (empty: no run).
    Seen { record_json: String, lock_json: String },
    /// The lock is ours; `reaped_owner_json` is the orphan ended first (empty: none).
    Started { owner_json: String, reaped_owner_json: String, reaped_pending_ids: Vec<String>, reaped_prompt: String },
}

/// `lua/append.lua`'s answer.
#[derive(Debug)]
pub(super) enum AppendReply {
    /// The lock is another run's (or gone with the run's state).
    Fenced,
    /// A retry of a batch already applied at `first`.
    Duplicate { first: u64 },
    /// Appended at `first..`; `retaken` when the lock had to be re-taken; a terminal batch
    /// lists the approvals still pending.
    Appended { first: u64, retaken: bool, pending_ids: Vec<String> },
}

/// `lua/renew.lua`'s answer.
#[derive(Debug, PartialEq)]
pub(super) enum RenewReply {
    Renewed,
    Retaken,
    Fenced,
}

/// `lua/reap.lua`'s answer.
#[derive(Debug)]
pub(super) enum ReapReply {
    /// The run's lock is held.
    Alive,
    /// Nothing to end.
    Nothing,
    /// Ended with its `complete` at `complete_seq`; `owner_json` is empty for a run Redis lost.
    Reaped { owner_json: String, complete_seq: u64, pending_ids: Vec<String>, prompt: String },
}

/// `lua/read.lua`'s answer.
#[derive(Debug)]
pub(super) struct ReadReply {
    /// The run's owner record (empty: no run).
    pub(super) owner_json: String,
    pub(super) top: u64,
    pub(super) replay: Vec<Event>,
    /// The pending approvals' JSON.
    pub(super) pending: Vec<String>,
    /// Set when the replay was longer than [`INLINE_REPLAY`]: it is the entries after
    /// this seq up to `top`, left for the caller to read with a plain `XRANGE`.
    pub(super) deferred_from: Option<u64>,
}

/// `lua/read_range.lua`'s answer.
#[derive(Debug)]
pub(super) struct RangeReply {
    pub(super) top: u64,
    pub(super) events: Vec<Event>,
    /// Set when the range was longer than [`INLINE_REPLAY`]: it is the entries up to this seq,
    /// left for the caller to read with a plain `XRANGE`.
    pub(super) deferred_to: Option<u64>,
}

/// The items of an array reply, one at a time (a missing one reads as nil).
struct Items(std::vec::IntoIter<Value>);

impl Items {
    fn of(value: Value) -> Result<Items, BadReply> {
        Ok(Items(codec::array(value)?.into_iter()))
    }
    fn next(&mut self) -> Value {
        self.0.next().unwrap_or(Value::Nil)
    }
    fn text(&mut self) -> Result<String, BadReply> {
        codec::text(self.next())
    }
    fn int(&mut self) -> Result<u64, BadReply> {
        codec::int(self.next())
    }
    fn texts(&mut self) -> Result<Vec<String>, BadReply> {
        codec::texts(self.next())
    }
    fn events(&mut self) -> Result<Vec<Event>, BadReply> {
        codec::decode_entries(self.next())
    }
    /// A deferred read's bound: a seq, or -1 (or nothing, from a script of before) for none.
    fn deferred(&mut self) -> Result<Option<u64>, BadReply> {
        match self.next() {
            Value::Int(seq) => Ok(u64::try_from(seq).ok()),
            Value::Nil => Ok(None),
            other => Err(BadReply(format!("expected a seq or -1, got {other:?}"))),
        }
    }
}

impl From<BadReply> for ParsingError {
    fn from(e: BadReply) -> Self {
        ParsingError::from(e.0)
    }
}

fn unexpected(script: &str, status: &str) -> ParsingError {
    ParsingError::from(format!("{script}: unexpected status {status:?}"))
}

impl FromRedisValue for StartReply {
    fn from_redis_value(value: Value) -> Result<Self, ParsingError> {
        let mut items = Items::of(value)?;
        let decoded = match items.text()?.as_str() {
            "BUSY" => StartReply::Busy,
            "RECOVERING" => StartReply::Recovering { retry_ms: items.int()? },
            "SEEN" => StartReply::Seen { record_json: items.text()?, lock_json: items.text()? },
            "OK" => StartReply::Started {
                owner_json: items.text()?,
                reaped_owner_json: items.text()?,
                reaped_pending_ids: items.texts()?,
                reaped_prompt: items.text()?,
            },
            other => return Err(unexpected("start", other)),
        };
        Ok(decoded)
    }
}

impl FromRedisValue for AppendReply {
    fn from_redis_value(value: Value) -> Result<Self, ParsingError> {
        let mut items = Items::of(value)?;
        let decoded = match items.text()?.as_str() {
            "FENCED" => AppendReply::Fenced,
            "DUP" => AppendReply::Duplicate { first: items.int()? },
            "OK" => {
                AppendReply::Appended { first: items.int()?, retaken: items.int()? == 1, pending_ids: items.texts()? }
            }
            other => return Err(unexpected("append", other)),
        };
        Ok(decoded)
    }
}

impl FromRedisValue for RenewReply {
    fn from_redis_value(value: Value) -> Result<Self, ParsingError> {
        match codec::text(value)?.as_str() {
            "OK" => Ok(RenewReply::Renewed),
            "RETAKEN" => Ok(RenewReply::Retaken),
            "FENCED" => Ok(RenewReply::Fenced),
            other => Err(unexpected("renew", other)),
        }
    }
}

impl FromRedisValue for ReapReply {
    fn from_redis_value(value: Value) -> Result<Self, ParsingError> {
        let mut items = Items::of(value)?;
        let decoded = match items.text()?.as_str() {
            "ALIVE" => ReapReply::Alive,
            "NONE" => ReapReply::Nothing,
            "REAPED" => ReapReply::Reaped {
                owner_json: items.text()?,
                complete_seq: items.int()?,
                pending_ids: items.texts()?,
                prompt: items.text()?,
            },
            other => return Err(unexpected("reap", other)),
        };
        Ok(decoded)
    }
}

impl FromRedisValue for ReadReply {
    fn from_redis_value(value: Value) -> Result<Self, ParsingError> {
        let mut items = Items::of(value)?;
        Ok(ReadReply {
            owner_json: items.text()?,
            top: items.int()?,
            replay: items.events()?,
            pending: items.texts()?,
            deferred_from: items.deferred()?,
        })
    }
}

impl FromRedisValue for RangeReply {
    fn from_redis_value(value: Value) -> Result<Self, ParsingError> {
        let mut items = Items::of(value)?;
        Ok(RangeReply { top: items.int()?, events: items.events()?, deferred_to: items.deferred()? })
    }
}

#[cfg(test)]
mod tests {
    /// Every script file, by name.
    const FILES: [(&str, &str); 10] = [
        ("prelude.lua", include_str!("lua/prelude.lua")),
        ("count_send.lua", include_str!("lua/count_send.lua")),
        ("start.lua", include_str!("lua/start.lua")),
        ("append.lua", include_str!("lua/append.lua")),
        ("renew.lua", include_str!("lua/renew.lua")),
        ("pending.lua", include_str!("lua/pending.lua")),
        ("reap.lua", include_str!("lua/reap.lua")),
        ("read.lua", include_str!("lua/read.lua")),
        ("read_range.lua", include_str!("lua/read_range.lua")),
        ("settle.lua", include_str!("lua/settle.lua")),
    ];

    /// A script's inputs are named in its opening lines (comments, then `local name = KEYS[n]`
    /// or `ARGV[n]`); below them only names are used.
    #[test]
    fn scripts_address_their_inputs_by_name_below_the_opening_lines() {
        for (file, text) in FILES {
            assert!(text.starts_with("-- "), "{file} does not open with a comment on what it does");
            let body: Vec<&str> = text
                .lines()
                .skip_while(|line| {
                    let line = line.trim();
                    line.is_empty()
                        || line.starts_with("--")
                        || (line.starts_with("local ") && (line.contains("KEYS[") || line.contains("ARGV")))
                })
                .collect();
            for line in body {
                assert!(!line.contains("KEYS[") && !line.contains("ARGV"), "{file}: input by position in {line:?}");
            }
        }
    }
}
