-- finish.lua: mark committed orders done, after their PostgreSQL commit. The record is
-- kept a while so a redelivered message is recognised without touching PostgreSQL.
--
-- KEYS[1] deadlines  zset order id -> deadline
-- KEYS[1 + i]        resv hash of order i
-- ARGV[1] seconds to keep the done record, ARGV[1 + i] order id i
-- Returns the number of reservations marked. A released reservation stays released.
local n = 0
for i = 2, #KEYS do
  local state = redis.call('HGET', KEYS[i], 'state')
  if state == 'claimed' or state == 'queued' or state == 'reserved' then
    redis.call('HSET', KEYS[i], 'state', 'done')
    redis.call('EXPIRE', KEYS[i], ARGV[1])
    n = n + 1
  end
  redis.call('ZREM', KEYS[1], ARGV[i])
end
return n
