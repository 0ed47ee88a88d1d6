-- read_range: the stream's entries with after < seq <= up_to, with the seq top.
-- Guarantees: the top and the entries are of one instant.
-- Returns {top, {seq, runId, t, body, ...}}.
local seq_key = KEYS[1]
local events_key = KEYS[2]

local after = tonumber(ARGV[1])
local up_to = ARGV[2] -- a seq, or '+' for the newest

local top = math.max(tonumber(redis.call('GET', seq_key) or '0'), stream_top(events_key))
local stop = '+'
if up_to ~= '+' then stop = up_to .. '-0' end
local flat = {}
local entries = redis.call('XRANGE', events_key, string.format('%d-0', after + 1), stop)
for _, e in ipairs(entries) do
  local f = e[2]
  flat[#flat + 1] = seq_of(e[1])
  flat[#flat + 1] = f[2]
  flat[#flat + 1] = f[4]
  flat[#flat + 1] = f[6]
end
return {top, flat}
