-- finish.lua: mark committed orders done, after their PostgreSQL commit. The record is
-- kept a while so a redelivered message is recognised without touching PostgreSQL.
--
-- KEYS[1] deadlines  zset order id -> deadline
-- KEYS[1 + i]        resv hash of order i
-- ARGV[1] seconds to keep the done record, ARGV[1 + i] order id i
-- Returns the number of reservations marked. A released reservation stays released.
-- A reservation paid with points ('paid') drops its hold from `ptsheld`: the commit
-- spent those points in PostgreSQL, and `pts` never counted them since the reserve.
local n = 0
local p = string.sub(KEYS[1], 1, #KEYS[1] - 9)
for i = 2, #KEYS do
  local rec = redis.call('HMGET', KEYS[i], 'state', 'paid', 'user')
  local state = rec[1]
  if state == 'claimed' or state == 'queued' or state == 'reserved' then
    if rec[2] and tonumber(rec[2]) > 0 then
      redis.call('HINCRBY', p .. 'ptsheld', rec[3], 0 - tonumber(rec[2]))
    end
    redis.call('HSET', KEYS[i], 'state', 'done')
    redis.call('EXPIRE', KEYS[i], ARGV[1])
    n = n + 1
  end
  redis.call('ZREM', KEYS[1], ARGV[i])
end
return n
