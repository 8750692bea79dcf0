-- queued.lua: the broker confirmed these orders' messages, so each reservation now waits
-- for a worker however long that takes (workers down, a backlog of millions): reserved
-- -> queued, and its deadline becomes +inf, so the reaper never takes it. The entry
-- stays in the deadlines zset, which is also the list of open reservations (reconcile
-- counts the units they hold). An order's Idempotency-Key record is marked accepted, so
-- a repeat of the key answers with this order.
--
-- KEYS[1]      deadlines  zset order id -> deadline (ms)
-- KEYS[2i]     resv hash of order i;  KEYS[2i + 1] its Idempotency-Key record (any
--              never-written key when it has none)
-- ARGV[i]      order id i
--
-- Returns one word per order: its state after this call. 'queued', or 'claimed'/'done'
-- when a worker got to the message before this mark (both mean accepted);
-- 'released:<reason>' when it was released before the mark: by the reaper
-- ('reservation_expired': never accepted) or by a worker that already recorded the
-- order failed (accepted, then failed); 'missing' when Redis does not know it (it lost
-- its data: PostgreSQL decides, the order is accepted).
local out = {}
for i = 1, #ARGV do
  local resv, idem, id = KEYS[2 * i], KEYS[2 * i + 1], ARGV[i]
  local state = redis.call('HGET', resv, 'state')
  if state == 'reserved' then
    redis.call('HSET', resv, 'state', 'queued')
    state = 'queued'
  end
  if state == 'queued' or state == 'claimed' then
    -- XX: only an open reservation has an entry; a settled one must not get it back.
    redis.call('ZADD', KEYS[1], 'XX', 'inf', id)
  end
  if state == 'queued' or state == 'claimed' or state == 'done' then
    if redis.call('HGET', idem, 'order_id') == id then
      redis.call('HSET', idem, 'state', 'accepted')
    end
  end
  if state == 'released' then
    state = 'released:' .. (redis.call('HGET', resv, 'reason') or '')
  end
  out[i] = state or 'missing'
end
return out
