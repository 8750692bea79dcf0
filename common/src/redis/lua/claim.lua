-- claim.lua: a worker takes a batch's reservations before committing them.
-- reserved -> claimed. A reservation past its deadline is released here instead, so the
-- claim and the reaper's release never both win. Claiming again is a no-op (redelivery).
--
-- KEYS[1] stock      hash sku -> units available
-- KEYS[2] deadlines  zset order id -> deadline
-- KEYS[3] changes    zset sku -> change sequence;  KEYS[4] seq  its counter
-- KEYS[3 + 2i]       resv hash of order i;  KEYS[4 + 2i] its user's hash
-- ARGV[1] now (ms since epoch), ARGV[2] seconds to keep a released record,
-- ARGV[2 + i] order id i
--
-- Returns one word per order: 'claimed', 'done' (already committed), 'expired'
-- (deadline passed: released now or earlier), 'unpublished' (ingress gave up on its
-- publish and answered 503: the order was never accepted), 'released' (released for
-- another reason, already decided), 'missing' (Redis does not know it).
local now = tonumber(ARGV[1])
local out = {}
local n = (#KEYS - 4) / 2
for i = 1, n do
  local resv, user = KEYS[3 + 2 * i], KEYS[4 + 2 * i]
  local rec = redis.call('HMGET', resv, 'state', 'deadline', 'reason')
  local state = rec[1]
  if not state then
    out[i] = 'missing'
  elseif state == 'claimed' or state == 'done' then
    out[i] = state
  elseif state == 'released' then
    if rec[3] == 'reservation_expired' then
      out[i] = 'expired'
    elseif rec[3] == 'publish_failed' then
      out[i] = 'unpublished'
    else
      out[i] = 'released'
    end
  elseif tonumber(rec[2]) < now then
    local seq = redis.call('INCR', KEYS[4])
    for _, line in ipairs(cjson.decode(redis.call('HGET', resv, 'items'))) do
      redis.call('HINCRBY', KEYS[1], line.sku, line.qty)
      redis.call('HINCRBY', user, line.sku, -line.qty)
      redis.call('ZADD', KEYS[3], seq, line.sku)
    end
    redis.call('HSET', resv, 'state', 'released', 'reason', 'reservation_expired')
    redis.call('EXPIRE', resv, ARGV[2])
    redis.call('ZREM', KEYS[2], ARGV[2 + i])
    out[i] = 'expired'
  else
    redis.call('HSET', resv, 'state', 'claimed')
    out[i] = 'claimed'
  end
end
return out
