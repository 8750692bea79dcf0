
-- release.lua (after promote.lua and give_back_points.lua): give a reservation's stock back (publish failed, or the order failed in
-- the worker). Idempotent: only an open reservation ('reserved', 'queued' or 'claimed') is
-- released, and once.
--
-- KEYS[1] resv       hash of the reservation
-- KEYS[2] stock      hash sku -> units available
-- KEYS[3] user       hash sku -> units the order's user holds
-- KEYS[4] deadlines  zset order id -> deadline
-- KEYS[5] idem       the order's Idempotency-Key record (any key when it had none)
-- KEYS[6] changes    zset sku -> change sequence;  KEYS[7] seq  its counter
-- ARGV[1] order id, ARGV[2] reason, ARGV[3] seconds to keep the released record
--
-- A reservation paid with points ('paid', reserve.lua) gives its held points back too.
--
-- The units given back are the reservation's 'part' (its held lines: the lines this
-- shard holds of an order reserved in parts, see shards.rs, or its bundles expanded,
-- see bundle.rs), or all its 'items'.
--
-- Only a 'publish_failed' release forgets the Idempotency-Key: that order was never
-- accepted, so the key is free again. Any other release is of an accepted order, which
-- a repeat of the key must keep answering. 'refused' (the parts of an order another
-- part refused, see shards.rs) is the same, and is never published at all.
--
-- Returns 'released_now' if this call gave the stock back, else the state that kept it
-- ('queued', 'claimed', 'done', 'released' or 'missing').
--
-- A 'publish_failed' or 'refused' release takes back only a 'reserved' reservation that
-- never waited on a waitlist (one that did was accepted when it went on it). For a
-- 'publish_failed' one: if a worker has claimed it, the message did reach the queue (its
-- confirm was lost), and the order is being committed; ingress then answers 202 after
-- all. ('queued' cannot meet a 'publish_failed' release: ingress marks it only after the
-- confirm.)
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return 'missing'
end
local unaccepted = ARGV[2] == 'publish_failed' or ARGV[2] == 'refused'
if state ~= 'reserved' and (unaccepted or (state ~= 'queued' and state ~= 'claimed')) then
  return state
end
-- A waitlisted order that was promoted is 'reserved' too, but it was accepted (its
-- place on the waitlist was answered, and a repeat of its key answers it): an
-- unaccepted release leaves it to the promoter, which publishes it.
if unaccepted and redis.call('HEXISTS', KEYS[1], 'wseq') == 1 then
  return state
end
local items = cjson.decode(redis.call('HGET', KEYS[1], 'part') or redis.call('HGET', KEYS[1], 'items'))
local seq = redis.call('INCR', KEYS[7])
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
redis.call('HSET', KEYS[1], 'state', 'released', 'reason', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZREM', KEYS[4], ARGV[1])
if unaccepted and redis.call('HGET', KEYS[5], 'order_id') == ARGV[1] then
  redis.call('DEL', KEYS[5])
end
-- The units went back: the SKUs' oldest waitlisted orders get them first (promote.lua).
for _, line in ipairs(items) do
  if not line.b then
    promote(KEYS[2], line.sku)
  end
end
return 'released_now'
