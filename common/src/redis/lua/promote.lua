-- promote.lua: the waitlist's promotion, a function prepended to every script that puts
-- units of a SKU back on sale (release, reap, apply_stock, take_stock's undo, unwait,
-- and promote_now), so the units that come back go to the oldest waitlisted orders in
-- the same atomic decision: no new order can take them in between.
--
-- promote(stock, sku): stock is the shard's stock key; every other key is named from its
-- prefix (keys.rs: wl:<sku>, wlw, wlexp, deadlines, promoted, resv:<order>). They share
-- the shard's hash tag, so they are in the calling script's slot (no shebang flags, so
-- a Redis Cluster runs undeclared same-slot keys).
--
-- While the head of wl:<sku> fits in what is on sale, it is reserved as reserve.lua
-- would (its holding is already counted): out of the waitlist, state 'reserved' with
-- the deadline +inf (it is accepted: the promoter publishes it whatever the delay, as
-- queued orders never expire), and into `promoted` for the worker's promoter. A head
-- that does not fit blocks those behind it (strictly first come, first served).
-- Returns how many orders it promoted.
local function promote(stock, sku)
  local p = string.sub(stock, 1, #stock - 5)
  local wl = p .. 'wl:' .. sku
  -- Nothing while the shard's gate is closed (no epoch: a load is rebuilding it from
  -- PostgreSQL, whose snapshot would not know an order promoted meanwhile); the load
  -- promotes what fits once it is done.
  if redis.call('EXISTS', wl) == 0 or redis.call('EXISTS', p .. 'epoch') == 0 then
    return 0
  end
  local n, now = 0, nil
  while true do
    local head = redis.call('ZRANGE', wl, 0, 0)[1]
    if not head then
      break
    end
    local resv = p .. 'resv:' .. head
    local rec = redis.call('HMGET', resv, 'state', 'items')
    if rec[1] ~= 'waitlisted' then
      -- Whatever took it off the list (its record lost) left a stale entry.
      redis.call('ZREM', wl, head)
      redis.call('ZREM', p .. 'wlexp', head)
    else
      local qty = cjson.decode(rec[2])[1].qty
      local level = tonumber(redis.call('HGET', stock, sku) or '0')
      if level < qty then
        break
      end
      if not now then
        local t = redis.call('TIME')
        now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      end
      redis.call('HINCRBY', stock, sku, -qty)
      if redis.call('HINCRBY', p .. 'wlw', sku, -qty) <= 0 then
        redis.call('HDEL', p .. 'wlw', sku)
      end
      redis.call('ZREM', wl, head)
      redis.call('ZREM', p .. 'wlexp', head)
      redis.call('HSET', resv, 'state', 'reserved', 'deadline', '9007199254740991',
        'promoted_at', now)
      redis.call('ZADD', p .. 'deadlines', 'inf', head)
      redis.call('ZADD', p .. 'promoted', now, head)
      n = n + 1
    end
  end
  if n > 0 then
    redis.call('ZADD', p .. 'stock:changes', redis.call('INCR', p .. 'stock:seq'), sku)
  end
  return n
end
