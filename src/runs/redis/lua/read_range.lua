-- read_range: the stream's entries with after < seq <= up_to, with the seq top.
-- Guarantees: the top and the entries are of one instant.
-- A range of more than `inline_max` seqs is not copied through Lua (as in read.lua): the reply
-- names where it ends instead, and the caller reads the entries with XRANGE (entries at or below
-- the top are only ever removed, never replaced: a later read is this one's suffix).
-- Returns {top, {seq, runId, t, body, ...}, last|-1}: last is the deferred range's end.
local seq_key = KEYS[1]
local events_key = KEYS[2]

local after = tonumber(ARGV[1])
local up_to = ARGV[2] -- a seq, or '+' for the newest
local inline_max = tonumber(ARGV[3])

local top = math.max(tonumber(redis.call('GET', seq_key) or '0'), stream_top(events_key))
local last = top
if up_to ~= '+' then last = math.min(top, tonumber(up_to)) end
if last - after > inline_max then return {top, {}, last} end
local flat = {}
if last > after then flat = read_entries(events_key, after + 1, last) end
return {top, flat, -1}
