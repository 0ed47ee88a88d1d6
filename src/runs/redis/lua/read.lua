-- read: one consistent read of a session for `chat.subscribe` and snapshots.
-- Guarantees: the owner record, the seq top, the replay and the pending approvals are of one
-- instant; the replay holds the current run's entries after `from` = max(after, firstSeq - 1).
-- A replay longer than `inline_max` entries is not copied through Lua (its entries cost about
-- four times a plain XRANGE's): the reply names `from` instead, and the caller reads the
-- entries up to `top` with XRANGE (entries at or below `top` are only ever removed, by the
-- window's trim or the key's expiry, never replaced: a later read is this one's suffix).
-- Returns {owner_json|'', top, {seq, runId, t, body, ...}, pending_values, from|-1}.
local owner_key = KEYS[1]
local seq_key = KEYS[2]
local events_key = KEYS[3]
local pending_key = KEYS[4]

local after = tonumber(ARGV[1]) -- -1: no replay
local inline_max = tonumber(ARGV[2])

local top = math.max(tonumber(redis.call('GET', seq_key) or '0'), stream_top(events_key))
local owner = redis.call('GET', owner_key)
if not owner then return {'', top, {}, {}, -1} end
local flat = {}
if after >= 0 then
  local from = math.max(after, cjson.decode(owner).firstSeq - 1)
  if top - from > inline_max then
    return {owner, top, {}, redis.call('HVALS', pending_key), from}
  end
  if top > from then flat = read_entries(events_key, from + 1, top) end
end
return {owner, top, flat, redis.call('HVALS', pending_key), -1}
