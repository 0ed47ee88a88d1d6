-- reap: ends an orphaned run (owner record present, lock gone) with its terminal `complete`.
-- With `lost_provider` set it also ends run `expected_run_id` when Redis lost the session's
-- state altogether (no owner record, no counter, and the stream does not already end it).
-- Guarantees: exactly one caller reaps a run; a run whose lock is held is never reaped.
-- Returns {'ALIVE'}, {'NONE'} or {'REAPED', owner_json|'', first, pending_ids, prompt|''}.
local run_key = KEYS[1]
local owner_key = KEYS[2]
local seq_key = KEYS[3]
local events_key = KEYS[4]
local pending_key = KEYS[5]
local live_channel = KEYS[6]
local prompt_key = KEYS[7]

local expected_run_id = ARGV[1]
local lost_provider = ARGV[2]
local session_id = ARGV[3]
local event_id = ARGV[4]
local timestamp = ARGV[5]
local error_text = ARGV[6]
local max_events = ARGV[7]
local retention_ms = ARGV[8]
local seq_ttl_ms = ARGV[9]
local floor = tonumber(ARGV[10])
local margin = tonumber(ARGV[11])

if redis.call('EXISTS', run_key) == 1 then return {'ALIVE'} end
local prev = redis.call('GET', owner_key)
local run_id
local provider
if prev then
  local o = cjson.decode(prev)
  run_id = o.runId
  provider = o.provider
elseif expected_run_id ~= '' and lost_provider ~= '' then
  local last = redis.call('XREVRANGE', events_key, '+', '-', 'COUNT', 1)
  if #last > 0 then
    local f = last[1][2]
    if f[4] == '1' or f[2] ~= expected_run_id then return {'NONE'} end
  elseif redis.call('EXISTS', seq_key) == 1 then
    return {'NONE'}
  end
  run_id = expected_run_id
  provider = lost_provider
  prev = ''
else
  return {'NONE'}
end
local first = current_seq(seq_key, events_key, floor, margin) + 1
redis.call('SET', seq_key, string.format('%d', first))
append_entries(events_key, live_channel, run_id, first,
  {orphan_complete(run_id, provider, session_id, event_id, timestamp, error_text)}, true, max_events)
local prompt = redis.call('GET', prompt_key) or ''
local ids = finish(run_key, owner_key, seq_key, events_key, pending_key, prompt_key, retention_ms, seq_ttl_ms)
return {'REAPED', prev, first, ids, prompt}
