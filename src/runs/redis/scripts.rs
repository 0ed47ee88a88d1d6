//! The Lua scripts: every write to a session's keys is one atomic script.
//!
//! All scripts share [`PRELUDE`] (seq restore, append, finish, retake), are
//! hashed once at start ([`Scripts::new`]) and run with EVALSHA (`redis::Script`
//! loads them again by itself after a `NOSCRIPT`, e.g. after a Redis restart).
//!
//! Stream entries: id `<seq>-0`, fields `r` (run id), `t` (`1` for the terminal
//! `complete`), `b` (the event body JSON without `seq`; readers splice it in).
//! One PUBLISH per batch on `cg:{S}:live` carries every event of the batch as
//! `"<seq> <t> <#runId> <#body> " .. runId .. body` records (see `codec`).
//!
//! Seq restore: a counter that is missing (Redis lost it, or it idled out) or
//! below the caller's floor (SQL's high-water mark, or the owner's own last
//! seq) is set to the highest seq known plus `--replay-max-events`, so that no
//! seq is ever reused even when SQL lags; the jump reaches subscribers as a gap.

use ::redis::Script;

/// Functions shared by the scripts.
const PRELUDE: &str = r#"
local function seq_of(id)
  return tonumber(string.match(id, '^(%d+)'))
end

local function stream_top(events)
  local last = redis.call('XREVRANGE', events, '+', '-', 'COUNT', 1)
  if #last == 0 then return 0 end
  return seq_of(last[1][1])
end

local function current_seq(seq_key, events, floor, margin)
  local v = redis.call('GET', seq_key)
  if v and tonumber(v) >= floor then return tonumber(v) end
  local top = math.max(floor, stream_top(events), tonumber(v or '0'))
  if top > 0 then top = top + margin end
  return top
end

local function append_entries(events, channel, run_id, first, bodies, last_terminal, max_events)
  local n = #bodies
  if n == 0 then return end
  local out = {}
  for i = 1, n do
    local seq = first + i - 1
    local t = '0'
    if last_terminal and i == n then t = '1' end
    local body = bodies[i]
    redis.call('XADD', events, 'MAXLEN', max_events, string.format('%d-0', seq), 'r', run_id, 't', t, 'b', body)
    out[i] = string.format('%d %s %d %d ', seq, t, #run_id, #body) .. run_id .. body
  end
  redis.call('PUBLISH', channel, table.concat(out))
end

local function finish(run, owner, seq_key, events, pending, prompt, retention_ms, seq_ttl_ms)
  local ids = redis.call('HKEYS', pending)
  redis.call('DEL', run, owner, pending, prompt)
  redis.call('PEXPIRE', events, retention_ms)
  redis.call('PEXPIRE', seq_key, seq_ttl_ms)
  return ids
end

local function retake(run, owner, seq_key, events, owner_json, lease_ms, floor, margin)
  if owner_json == '' then return false end
  if redis.call('EXISTS', owner) == 1 or redis.call('EXISTS', seq_key) == 1 then return false end
  redis.call('SET', run, owner_json, 'PX', lease_ms)
  redis.call('SET', owner, owner_json)
  redis.call('SET', seq_key, string.format('%d', current_seq(seq_key, events, floor, margin)))
  return true
end

local function orphan_complete(run_id, provider, session_id, event_id, timestamp, error_text)
  return cjson.encode({id = 'complete_' .. event_id, kind = 'complete', sessionId = session_id,
    provider = provider, timestamp = timestamp, runId = run_id, exitCode = 1, success = false,
    aborted = false, error = error_text, actualSessionId = session_id})
end

local function holds(lock, run_id)
  return lock and cjson.decode(lock).runId == run_id
end

-- A session that had events (floor > 0) and was active recently (by SQL) has a
-- seq counter unless Redis lost it; with neither lock, owner record nor counter
-- its run (if any) may still be live on an owner that has not re-taken its lock.
local function state_lost(run, owner, seq_key, floor, recently_active)
  return recently_active == '1' and floor > 0 and redis.call('EXISTS', run) == 0
    and redis.call('EXISTS', owner) == 0 and redis.call('EXISTS', seq_key) == 0
end

-- ms until Redis has been up for one lease (plus a second: INFO counts whole
-- seconds), by when every live owner re-took its lock; 0 from then on.
local function recovery_left(lease_ms)
  local up = tonumber(string.match(redis.call('INFO', 'server'), 'uptime_in_seconds:(%d+)')) or 0
  return math.max(0, lease_ms + 1000 - up * 1000)
end
"#;

/// Takes the run lock (reaping an orphan first).
/// KEYS: run owner seq events pending live prompt.
/// ARGV: runId nodeId provider userId startedAt lease_ms floor margin max_events
///       retention_ms seq_ttl_ms orphan_event_id orphan_timestamp session_id orphan_error
///       recently_active prompt.
/// Returns `{'BUSY'}`, `{'RECOVERING', retry_ms}` or
/// `{'OK', owner_json, reaped_owner_json|'', reaped_pending_ids, reaped_prompt|''}`.
///
/// Recovery: a session whose state Redis lost (`state_lost`; `recently_active`
/// is judged by the caller from SQL against [`SEQ_IDLE_TTL`]) may still have a
/// run live on a node that has not re-taken its lock yet (it does within a
/// third of the lease). While Redis has been up for less than a lease, such a
/// start is refused with the time left: by then a live owner holds its lock
/// again (`BUSY`) or is gone.
///
/// [`SEQ_IDLE_TTL`]: super::node::SEQ_IDLE_TTL
const START: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return {'BUSY'} end
local floor = tonumber(ARGV[7])
local margin = tonumber(ARGV[8])
if state_lost(KEYS[1], KEYS[2], KEYS[3], floor, ARGV[16]) then
  local left = recovery_left(tonumber(ARGV[6]))
  if left > 0 then return {'RECOVERING', left} end
end
local reaped = ''
local reaped_ids = {}
local reaped_prompt = ''
local prev = redis.call('GET', KEYS[2])
if prev then
  local o = cjson.decode(prev)
  local first = current_seq(KEYS[3], KEYS[4], floor, margin) + 1
  redis.call('SET', KEYS[3], string.format('%d', first))
  append_entries(KEYS[4], KEYS[6], o.runId, first,
    {orphan_complete(o.runId, o.provider, ARGV[14], ARGV[12], ARGV[13], ARGV[15])}, true, ARGV[9])
  reaped_prompt = redis.call('GET', KEYS[7]) or ''
  reaped_ids = finish(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[7], ARGV[10], ARGV[11])
  reaped = prev
end
local last = current_seq(KEYS[3], KEYS[4], floor, margin)
redis.call('SET', KEYS[3], string.format('%d', last))
redis.call('PERSIST', KEYS[4])
redis.call('DEL', KEYS[5])
local owner_json = cjson.encode({runId = ARGV[1], nodeId = ARGV[2], provider = ARGV[3], userId = ARGV[4],
  startedAt = ARGV[5], firstSeq = last + 1})
redis.call('SET', KEYS[1], owner_json, 'PX', ARGV[6])
redis.call('SET', KEYS[2], owner_json)
redis.call('SET', KEYS[7], ARGV[17])
return {'OK', owner_json, reaped, reaped_ids, reaped_prompt}
"#;

/// Appends one batch, fenced; with `terminal = 1` the last body is the run's
/// `complete` and the run is finished in the same step.
/// KEYS: run owner seq events pending live batch prompt saving.
/// ARGV: runId lease_ms max_events floor margin terminal retention_ms seq_ttl_ms owner_json bodies…
/// A terminal batch also records the `complete`'s seq in `saving` until the owner stored it.
/// Returns `{'FENCED'}`, `{'DUP', first}` (a retried batch) or `{'OK', first, retaken, pending_ids}`.
const APPEND: &str = r#"
local done = redis.call('GET', KEYS[7])
if done then return {'DUP', tonumber(done)} end
local floor = tonumber(ARGV[4])
local margin = tonumber(ARGV[5])
local retaken = 0
local lock = redis.call('GET', KEYS[1])
if lock then
  if not holds(lock, ARGV[1]) then return {'FENCED'} end
elseif retake(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[9], ARGV[2], floor, margin) then
  retaken = 1
else
  return {'FENCED'}
end
local bodies = {}
for i = 10, #ARGV do bodies[#bodies + 1] = ARGV[i] end
local first = current_seq(KEYS[3], KEYS[4], floor, margin) + 1
redis.call('SET', KEYS[3], string.format('%d', first + #bodies - 1))
append_entries(KEYS[4], KEYS[6], ARGV[1], first, bodies, ARGV[6] == '1', ARGV[3])
redis.call('SET', KEYS[7], string.format('%d', first), 'PX', ARGV[2])
local ids = {}
if ARGV[6] == '1' then
  ids = finish(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[8], ARGV[7], ARGV[8])
  redis.call('SET', KEYS[9], string.format('%d', first + #bodies - 1), 'PX', ARGV[7])
end
return {'OK', first, retaken, ids}
"#;

/// Compare-and-PEXPIRE of the lock (or a retake after Redis lost it).
/// KEYS: run owner seq events. ARGV: runId lease_ms owner_json floor margin.
/// Returns `OK`, `RETAKEN` or `FENCED`.
const RENEW: &str = r#"
local lock = redis.call('GET', KEYS[1])
if lock then
  if not holds(lock, ARGV[1]) then return 'FENCED' end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 'OK'
end
if retake(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[3], ARGV[2], tonumber(ARGV[4]), tonumber(ARGV[5])) then
  return 'RETAKEN'
end
return 'FENCED'
"#;

/// Adds (`ARGV[4] = '1'`) or removes a pending approval of the run, fenced.
/// KEYS: run pending. ARGV: runId requestId request_json add. Returns `OK` or `FENCED`.
const PENDING: &str = r#"
if not holds(redis.call('GET', KEYS[1]), ARGV[1]) then return 'FENCED' end
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
else
  redis.call('HDEL', KEYS[2], ARGV[2])
end
return 'OK'
"#;

/// Ends an orphaned run with the terminal `complete`; succeeds for exactly one caller.
/// An orphan is "owner record present, lock gone". With `lost_provider` set it
/// also ends run `expected` when Redis lost its state altogether (no owner
/// record, no counter, and the stream does not already end that run).
/// KEYS: run owner seq events pending live prompt.
/// ARGV: expected lost_provider session_id event_id timestamp error max_events
///       retention_ms seq_ttl_ms floor margin.
/// Returns `{'ALIVE'}`, `{'NONE'}` or `{'REAPED', owner_json|'', first, pending_ids, prompt|''}`.
const REAP: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return {'ALIVE'} end
local prev = redis.call('GET', KEYS[2])
local run_id
local provider
if prev then
  local o = cjson.decode(prev)
  run_id = o.runId
  provider = o.provider
elseif ARGV[1] ~= '' and ARGV[2] ~= '' then
  local last = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)
  if #last > 0 then
    local f = last[1][2]
    if f[4] == '1' or f[2] ~= ARGV[1] then return {'NONE'} end
  elseif redis.call('EXISTS', KEYS[3]) == 1 then
    return {'NONE'}
  end
  run_id = ARGV[1]
  provider = ARGV[2]
  prev = ''
else
  return {'NONE'}
end
local first = current_seq(KEYS[3], KEYS[4], tonumber(ARGV[10]), tonumber(ARGV[11])) + 1
redis.call('SET', KEYS[3], string.format('%d', first))
append_entries(KEYS[4], KEYS[6], run_id, first, {orphan_complete(run_id, provider, ARGV[3], ARGV[4], ARGV[5], ARGV[6])},
  true, ARGV[7])
local prompt = redis.call('GET', KEYS[7]) or ''
local ids = finish(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[7], ARGV[8], ARGV[9])
return {'REAPED', prev, first, ids, prompt}
"#;

/// Waits out a session whose state Redis lost, for readers (START does the
/// same for writers): while Redis has been up for less than a lease, answers how
/// long to wait; after that the session reads as it is (idle, SQL's mark). Its
/// counter is left missing, so that the next run restores it above the mark
/// plus the margin and the session's `lastSeq` stays the last event's.
/// KEYS: run owner seq. ARGV: floor lease_ms recently_active.
/// Returns 0 (nothing to wait for) or the ms to wait.
const SETTLE: &str = r#"
if not state_lost(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]), ARGV[3]) then return 0 end
return recovery_left(tonumber(ARGV[2]))
"#;

/// One consistent read of a session for `chat.subscribe` and snapshots.
/// KEYS: owner seq events pending. ARGV: after (`-1`: no replay).
/// Returns `{owner_json|'', top, {seq, runId, t, body, …}, pending_values}`; the
/// replay holds the current run's entries after `max(after, firstSeq - 1)`.
const READ: &str = r#"
local top = math.max(tonumber(redis.call('GET', KEYS[2]) or '0'), stream_top(KEYS[3]))
local owner = redis.call('GET', KEYS[1])
if not owner then return {'', top, {}, {}} end
local flat = {}
local after = tonumber(ARGV[1])
if after >= 0 then
  local from = math.max(after, cjson.decode(owner).firstSeq - 1)
  if top > from then
    local entries = redis.call('XRANGE', KEYS[3], string.format('%d-0', from + 1), '+')
    for _, e in ipairs(entries) do
      local f = e[2]
      flat[#flat + 1] = seq_of(e[1])
      flat[#flat + 1] = f[2]
      flat[#flat + 1] = f[4]
      flat[#flat + 1] = f[6]
    end
  end
end
return {owner, top, flat, redis.call('HVALS', KEYS[4])}
"#;

/// The stream's entries with `after < seq <= up_to`, with the seq top.
/// KEYS: seq events. ARGV: after up_to (a number or `+`).
/// Returns `{top, {seq, runId, t, body, …}}`.
const READ_RANGE: &str = r#"
local top = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), stream_top(KEYS[2]))
local stop = '+'
if ARGV[2] ~= '+' then stop = ARGV[2] .. '-0' end
local flat = {}
local entries = redis.call('XRANGE', KEYS[2], string.format('%d-0', tonumber(ARGV[1]) + 1), stop)
for _, e in ipairs(entries) do
  local f = e[2]
  flat[#flat + 1] = seq_of(e[1])
  flat[#flat + 1] = f[2]
  flat[#flat + 1] = f[4]
  flat[#flat + 1] = f[6]
end
return {top, flat}
"#;

/// The registry's scripts, hashed once.
/// `chat.send` rate: KEYS[1] = `cg:user:{U}:sends`, ARGV[1] = window in ms.
/// Counts one send; the first of a window (or a counter left without expiry)
/// sets the window. Returns the count in the window.
const COUNT_SEND: &str = r#"
local n = redis.call('INCR', KEYS[1])
if n == 1 or redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return n
"#;

pub struct Scripts {
    pub count_send: Script,
    pub start: Script,
    pub append: Script,
    pub renew: Script,
    pub pending: Script,
    pub reap: Script,
    pub read: Script,
    pub read_range: Script,
    pub settle: Script,
}

impl Scripts {
    pub fn new() -> Self {
        let with_prelude = |body: &str| Script::new(&format!("{PRELUDE}\n{body}"));
        Scripts {
            count_send: Script::new(COUNT_SEND),
            start: with_prelude(START),
            append: with_prelude(APPEND),
            renew: with_prelude(RENEW),
            pending: with_prelude(PENDING),
            reap: with_prelude(REAP),
            read: with_prelude(READ),
            read_range: with_prelude(READ_RANGE),
            settle: with_prelude(SETTLE),
        }
    }
}
