-- renew: extends the run's lock (compare-and-PEXPIRE), or re-takes it when Redis lost it.
-- Guarantees: only the holder extends the lock; a lock another run holds is never touched.
-- Returns 'OK', 'RETAKEN' or 'FENCED'.
local run_key = KEYS[1]
local owner_key = KEYS[2]
local seq_key = KEYS[3]
local events_key = KEYS[4]

local run_id = ARGV[1]
local lease_ms = ARGV[2]
local owner_json = ARGV[3]
local floor = tonumber(ARGV[4])
local margin = tonumber(ARGV[5])

local lock = redis.call('GET', run_key)
if lock then
  if not holds(lock, run_id) then return 'FENCED' end
  redis.call('PEXPIRE', run_key, lease_ms)
  return 'OK'
end
if retake(run_key, owner_key, seq_key, events_key, owner_json, lease_ms, floor, margin) then
  return 'RETAKEN'
end
return 'FENCED'
