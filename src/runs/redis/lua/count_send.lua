-- count_send: counts one `chat.send` of a user in the current rate window.
-- Guarantees: the first send of a window (or a counter left without expiry) sets the
-- window, so a counter never outlives it.
-- Returns the count in the window.
local sends_key = KEYS[1]

local window_ms = ARGV[1]

local n = redis.call('INCR', sends_key)
if n == 1 or redis.call('PTTL', sends_key) < 0 then
  redis.call('PEXPIRE', sends_key, window_ms)
end
return n
