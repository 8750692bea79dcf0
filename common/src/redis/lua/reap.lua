
-- reap.lua (after promote.lua and give_back_points.lua): release a reservation still 'reserved' past its deadline: ingress never
-- marked it queued, so its publish was never confirmed (ingress died between the reserve
-- and the confirm) and no 202 was answered for it. A queued or claimed reservation is
-- never reaped: its message is in the queue and it waits for a worker however long.
-- Atomic against claim.lua: whichever runs first wins, the other sees the new state.
-- The order id goes into the `reaped` zset until PostgreSQL has recorded it failed, so a
-- reaper that dies between the two steps is finished by the next one.
--
-- KEYS[1] resv       hash of the reservation
-- KEYS[2] stock      hash sku -> units available
-- KEYS[3] user       hash sku -> units the order's user holds
-- KEYS[4] deadlines  zset order id -> deadline
-- KEYS[5] reaped     zset order id -> reap time, awaiting its PostgreSQL record
-- KEYS[6] changes    zset sku -> change sequence;  KEYS[7] seq  its counter
-- ARGV[1] order id, ARGV[2] now (ms), ARGV[3] seconds to keep the released record
--
-- Returns 1 if reaped now, 0 if not (queued, claimed, done, released, or not yet due).
local rec = redis.call('HMGET', KEYS[1], 'state', 'deadline')
if rec[1] == 'claimed' or rec[1] == 'queued' then
  -- Its message exists (a worker holds it, or held it and it is redelivered): it stays
  -- open with no deadline, like every queued reservation.
  redis.call('ZADD', KEYS[4], 'inf', ARGV[1])
  return 0
end
if rec[1] ~= 'reserved' then
  -- Nothing to release; a stale deadline entry (record gone or settled) is dropped.
  redis.call('ZREM', KEYS[4], ARGV[1])
  return 0
end
if tonumber(rec[2]) >= tonumber(ARGV[2]) then
  return 0
end
local seq = redis.call('INCR', KEYS[7])
local items = cjson.decode(redis.call('HGET', KEYS[1], 'part') or redis.call('HGET', KEYS[1], 'items'))
for _, line in ipairs(items) do
  -- A bundle's limit line ('b') holds no stock: only the holding goes back.
  if not line.b then
    redis.call('HINCRBY', KEYS[2], line.sku, line.qty)
    redis.call('ZADD', KEYS[6], seq, line.sku)
  end
  redis.call('HINCRBY', KEYS[3], line.sku, -line.qty)
end
-- Paid with points: the held total goes back to the user's spendable points.
give_back_points(KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'state', 'released', 'reason', 'reservation_expired')
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
-- The units went back: the SKUs' oldest waitlisted orders get them first (promote.lua).
for _, line in ipairs(items) do
  if not line.b then
    promote(KEYS[2], line.sku)
  end
end
return 1
