-- The functions every script but count_send shares; concatenated before the script's own
-- text (scripts.rs). A function takes key names and values as arguments: it never reads
-- KEYS or ARGV itself. `publish_command` is set by scripts.rs before this text: PUBLISH on one
-- Redis, SPUBLISH on a Redis Cluster (the live channel shares the session's hash tag).

-- The seq of a stream entry id `<seq>-0`.
local function seq_of(id)
  return tonumber(string.match(id, '^(%d+)'))
end

-- The stream's entries with from <= seq <= to, flat: {seq, runId, t, body, ...} (the codec's
-- order, decode_entries in codec.rs).
local function read_entries(events_key, from, to)
  local flat = {}
  local entries = redis.call('XRANGE', events_key, string.format('%d-0', from), string.format('%d-0', to))
  for _, e in ipairs(entries) do
    local f = e[2]
    flat[#flat + 1] = seq_of(e[1])
    flat[#flat + 1] = f[2]
    flat[#flat + 1] = f[4]
    flat[#flat + 1] = f[6]
  end
  return flat
end

-- The seq of the stream's newest entry (0 when empty).
local function stream_top(events_key)
  local last = redis.call('XREVRANGE', events_key, '+', '-', 'COUNT', 1)
  if #last == 0 then return 0 end
  return seq_of(last[1][1])
end

-- The session's current seq. A counter that is missing or below `floor` is restored to the
-- highest seq known plus `margin`, so that no seq is ever reused even when SQL lags.
local function current_seq(seq_key, events_key, floor, margin)
  local v = redis.call('GET', seq_key)
  if v and tonumber(v) >= floor then return tonumber(v) end
  local top = math.max(floor, stream_top(events_key), tonumber(v or '0'))
  if top > 0 then top = top + margin end
  return top
end

-- XADDs `bodies` at seqs first.. (the last one terminal when `last_terminal`), trims the
-- stream to `max_events`, and publishes them as one message of codec records
-- `"<seq> <t> <#runId> <#body> " .. runId .. body`.
local function append_entries(events_key, live_channel, run_id, first, bodies, last_terminal, max_events)
  local n = #bodies
  if n == 0 then return end
  local out = {}
  for i = 1, n do
    local seq = first + i - 1
    local t = '0'
    if last_terminal and i == n then t = '1' end
    local body = bodies[i]
    redis.call('XADD', events_key, 'MAXLEN', max_events, string.format('%d-0', seq), 'r', run_id, 't', t, 'b', body)
    out[i] = string.format('%d %s %d %d ', seq, t, #run_id, #body) .. run_id .. body
  end
  redis.call(publish_command, live_channel, table.concat(out))
end

-- Ends a run's state: lock, owner record, approvals and prompt go; the stream and the
-- counter expire. Returns the ids of the approvals still pending.
local function finish(run_key, owner_key, seq_key, events_key, pending_key, prompt_key, retention_ms, seq_ttl_ms)
  local ids = redis.call('HKEYS', pending_key)
  redis.call('DEL', run_key, owner_key, pending_key, prompt_key)
  redis.call('PEXPIRE', events_key, retention_ms)
  redis.call('PEXPIRE', seq_key, seq_ttl_ms)
  return ids
end

-- Re-takes a lock Redis lost (no owner record, no counter: it came back empty) for the owner
-- whose record is `owner_json`, restoring the counter. False when anything of the run is left.
local function retake(run_key, owner_key, seq_key, events_key, owner_json, lease_ms, floor, margin)
  if owner_json == '' then return false end
  if redis.call('EXISTS', owner_key) == 1 or redis.call('EXISTS', seq_key) == 1 then return false end
  redis.call('SET', run_key, owner_json, 'PX', lease_ms)
  redis.call('SET', owner_key, owner_json)
  redis.call('SET', seq_key, string.format('%d', current_seq(seq_key, events_key, floor, margin)))
  return true
end

-- The terminal `complete` of a run whose owner was lost.
local function orphan_complete(run_id, provider, session_id, event_id, timestamp, error_text)
  return cjson.encode({id = 'complete_' .. event_id, kind = 'complete', sessionId = session_id,
    provider = provider, timestamp = timestamp, runId = run_id, exitCode = 1, success = false,
    aborted = false, error = error_text, actualSessionId = session_id})
end

-- Whether the lock's value names run `run_id`.
local function holds(lock, run_id)
  return lock and cjson.decode(lock).runId == run_id
end

-- A session that had events (floor > 0) and was active recently (by SQL) has a
-- seq counter unless Redis lost it; with neither lock, owner record nor counter
-- its run (if any) may still be live on an owner that has not re-taken its lock.
local function state_lost(run_key, owner_key, seq_key, floor, recently_active)
  return recently_active == '1' and floor > 0 and redis.call('EXISTS', run_key) == 0
    and redis.call('EXISTS', owner_key) == 0 and redis.call('EXISTS', seq_key) == 0
end

-- ms until Redis has been up for one lease (plus a second: INFO counts whole
-- seconds), by when every live owner re-took its lock; 0 from then on.
local function recovery_left(lease_ms)
  local up = tonumber(string.match(redis.call('INFO', 'server'), 'uptime_in_seconds:(%d+)')) or 0
  return math.max(0, lease_ms + 1000 - up * 1000)
end
