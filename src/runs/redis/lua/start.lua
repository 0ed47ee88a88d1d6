-- start: takes a session's run lock for a new run, reaping an orphaned run first.
-- Guarantees: at most one run holds the lock; an orphan (owner record without a lock) ends
-- with its terminal `complete` before the new run's first seq; seqs only grow; while Redis
-- has been up for less than a lease, a session whose state it lost is not started (a live
-- owner may still re-take it; the caller judges `recently_active` from SQL against the counter's
-- idle TTL).
-- With an idempotency key (has_request): a key the session saw within the window starts nothing
-- and answers what became of its send; otherwise the key is recorded with the outcome, in the same
-- step as the lock (started: the run; refused: BUSY), so two sends with one key start one run.
-- Returns {'BUSY'}, {'RECOVERING', retry_ms}, {'SEEN', request_record_json, lock_json|''} or
-- {'OK', owner_json, reaped_owner_json|'', reaped_pending_ids, reaped_prompt|''}.
local run_key = KEYS[1]
local owner_key = KEYS[2]
local seq_key = KEYS[3]
local events_key = KEYS[4]
local pending_key = KEYS[5]
local live_channel = KEYS[6]
local prompt_key = KEYS[7]
local request_key = KEYS[8]

local run_id = ARGV[1]
local node_id = ARGV[2]
local provider = ARGV[3]
local user_id = ARGV[4]
local started_at = ARGV[5]
local lease_ms = tonumber(ARGV[6])
local floor = tonumber(ARGV[7])
local margin = tonumber(ARGV[8])
local max_events = ARGV[9]
local retention_ms = ARGV[10]
local seq_ttl_ms = ARGV[11]
local orphan_event_id = ARGV[12]
local orphan_timestamp = ARGV[13]
local session_id = ARGV[14]
local orphan_error = ARGV[15]
local recently_active = ARGV[16]
local prompt = ARGV[17]
local has_request = ARGV[18] == '1'
local request_window_ms = ARGV[19]
local request_id = ARGV[20]

if has_request then
  local seen = redis.call('GET', request_key)
  if seen then return {'SEEN', seen, redis.call('GET', run_key) or ''} end
end
local held = redis.call('GET', run_key)
if held then
  if has_request then
    local holder = cjson.decode(held)
    -- The run holding the lock is this key's (its record was lost with Redis's data and the owner
    -- re-took the lock): the key's send started it.
    if holder.requestKey == request_id then
      local record = cjson.encode({runId = holder.runId, firstSeq = holder.firstSeq})
      redis.call('SET', request_key, record, 'PX', request_window_ms)
      return {'SEEN', record, held}
    end
    redis.call('SET', request_key, cjson.encode({refused = 'RUN_IN_PROGRESS', runId = holder.runId}),
      'PX', request_window_ms)
  end
  return {'BUSY'}
end
if state_lost(run_key, owner_key, seq_key, floor, recently_active) then
  local left = recovery_left(lease_ms)
  if left > 0 then return {'RECOVERING', left} end
end
local reaped = ''
local reaped_ids = {}
local reaped_prompt = ''
local prev = redis.call('GET', owner_key)
if prev then
  local o = cjson.decode(prev)
  local first = current_seq(seq_key, events_key, floor, margin) + 1
  redis.call('SET', seq_key, string.format('%d', first))
  append_entries(events_key, live_channel, o.runId, first,
    {orphan_complete(o.runId, o.provider, session_id, orphan_event_id, orphan_timestamp, orphan_error)}, true, max_events)
  reaped_prompt = redis.call('GET', prompt_key) or ''
  reaped_ids = finish(run_key, owner_key, seq_key, events_key, pending_key, prompt_key, retention_ms, seq_ttl_ms)
  reaped = prev
end
local last = current_seq(seq_key, events_key, floor, margin)
redis.call('SET', seq_key, string.format('%d', last))
redis.call('PERSIST', events_key)
redis.call('DEL', pending_key)
local owner = {runId = run_id, nodeId = node_id, provider = provider, userId = user_id,
  startedAt = started_at, firstSeq = last + 1}
if has_request then owner.requestKey = request_id end
local owner_json = cjson.encode(owner)
redis.call('SET', run_key, owner_json, 'PX', lease_ms)
redis.call('SET', owner_key, owner_json)
redis.call('SET', prompt_key, prompt)
if has_request then
  redis.call('SET', request_key, cjson.encode({runId = run_id, firstSeq = last + 1}), 'PX', request_window_ms)
end
return {'OK', owner_json, reaped, reaped_ids, reaped_prompt}
