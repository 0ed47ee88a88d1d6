-- settle: for readers, waits out a session whose state Redis lost (start does the same for
-- writers): while Redis has been up for less than a lease, answers how long to wait; after
-- that the session reads as it is (idle, SQL's mark). The counter is left missing, so that
-- the next run restores it above the mark plus the margin and `lastSeq` stays the last event's.
-- Returns 0 (nothing to wait for) or the ms to wait.
local run_key = KEYS[1]
local owner_key = KEYS[2]
local seq_key = KEYS[3]

local floor = tonumber(ARGV[1])
local lease_ms = tonumber(ARGV[2])
local recently_active = ARGV[3]

if not state_lost(run_key, owner_key, seq_key, floor, recently_active) then return 0 end
return recovery_left(lease_ms)
