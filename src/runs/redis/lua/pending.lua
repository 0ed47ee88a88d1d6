-- pending: adds or removes one pending approval of the run, fenced by the run's lock.
-- Guarantees: a run that lost its lock leaves no approval behind it.
-- Returns 'OK' or 'FENCED'.
local run_key = KEYS[1]
local pending_key = KEYS[2]

local run_id = ARGV[1]
local request_id = ARGV[2]
local request_json = ARGV[3]
local add = ARGV[4] == '1'

if not holds(redis.call('GET', run_key), run_id) then return 'FENCED' end
if add then
  redis.call('HSET', pending_key, request_id, request_json)
else
  redis.call('HDEL', pending_key, request_id)
end
return 'OK'
