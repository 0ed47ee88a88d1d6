-- append: appends one batch of a run's events, fenced by the run's lock; with `terminal`
-- the last body is the run's `complete` and the run is finished in the same step.
-- Guarantees: only the lock holder appends (a lock Redis lost is re-taken by its owner when
-- nothing else of the run is left); a retried batch (same batch key) is applied once; the
-- events get consecutive seqs above every seq used before; a terminal batch records the
-- `complete`'s seq in the saving marker until the owner stored it in SQL.
-- Returns {'FENCED'}, {'DUP', first} (a retried batch) or {'OK', first, retaken, pending_ids}.
local run_key = KEYS[1]
local owner_key = KEYS[2]
local seq_key = KEYS[3]
local events_key = KEYS[4]
local pending_key = KEYS[5]
local live_channel = KEYS[6]
local batch_key = KEYS[7]
local prompt_key = KEYS[8]
local saving_key = KEYS[9]

local run_id = ARGV[1]
local lease_ms = ARGV[2]
local max_events = ARGV[3]
local floor = tonumber(ARGV[4])
local margin = tonumber(ARGV[5])
local terminal = ARGV[6] == '1'
local retention_ms = ARGV[7]
local seq_ttl_ms = ARGV[8]
local owner_json = ARGV[9]
local bodies = {unpack(ARGV, 10)}

local done = redis.call('GET', batch_key)
if done then return {'DUP', tonumber(done)} end
local retaken = 0
local lock = redis.call('GET', run_key)
if lock then
  if not holds(lock, run_id) then return {'FENCED'} end
elseif retake(run_key, owner_key, seq_key, events_key, owner_json, lease_ms, floor, margin) then
  retaken = 1
else
  return {'FENCED'}
end
local first = current_seq(seq_key, events_key, floor, margin) + 1
redis.call('SET', seq_key, string.format('%d', first + #bodies - 1))
append_entries(events_key, live_channel, run_id, first, bodies, terminal, max_events)
redis.call('SET', batch_key, string.format('%d', first), 'PX', lease_ms)
local ids = {}
if terminal then
  ids = finish(run_key, owner_key, seq_key, events_key, pending_key, prompt_key, retention_ms, seq_ttl_ms)
  redis.call('SET', saving_key, string.format('%d', first + #bodies - 1), 'PX', retention_ms)
end
return {'OK', first, retaken, ids}
