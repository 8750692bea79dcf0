-- reserve.lua: decide an order atomically: idempotency, per-user limits, stock, then
-- decrement every line or none and record the reservation.
--
-- KEYS[1] epoch      string; absent means stock is not loaded (Redis lost it)
-- KEYS[2] stock      hash sku -> units available
-- KEYS[3] limits     hash sku -> per-user limit (0 = none)
-- KEYS[4] user       hash sku -> units this user holds (reserved or bought)
-- KEYS[5] idem       hash of this (user, Idempotency-Key); unused when ARGV[3] == ''
-- KEYS[6] resv       hash of this order's reservation
-- KEYS[7] deadlines  zset order id -> deadline (ms), read by the reaper
-- KEYS[8] changes    zset sku -> change sequence (the notifier samples changed SKUs)
-- KEYS[9] seq        the change sequence counter
-- KEYS[10] buckets   hash sku -> bucket count, for SKUs with more than one
-- KEYS[11] windows   hash sku -> '<starts ms>,<ends ms>' (a side empty: open), for SKUs
--                    with a sale window, compared with this server's clock (TIME)
-- KEYS[12] bundles   hash bundle -> 'sku:qty,...', the bundles whose SKU lives here
-- KEYS[13] waiting   hash sku -> units its waitlisted orders wait for (keys.rs; the
--                    other waitlist keys are named from KEYS[2]'s prefix, same slot)
-- ARGV[1] order id, ARGV[2] user id, ARGV[3] body hash ('' = no Idempotency-Key),
-- ARGV[4] accepted_at (RFC 3339), ARGV[5] deadline (ms since epoch),
-- ARGV[6] idempotency TTL (s), ARGV[7] the order's items as JSON, ARGV[8] the held lines
-- this record holds as JSON, when they are not the items ('' = the items): the order's
-- bundles expanded (bundle.rs), or its part when it is reserved in parts (shards.rs),
-- ARGV[9] the shard of the order's deciding part then ('' = none),
-- ARGV[10] the waitlist deadline (ms) of an order that may wait ("waitlist": true; ''
-- = it may not), ARGV[11] its Idempotency-Key ('' = none), kept for its promotion,
-- ARGV[12] the order's total in points when it is paid with points ('' = it is not):
-- held from the user's field of `pts` into `ptsheld` (both named from KEYS[2]'s prefix,
-- same slot) in the same decision as the stock, and kept in the record as 'paid'
-- ARGV[13..] sku, qty, buckets, kind quadruples of the lines held here (none for the
-- Idempotency-Key's part of an order whose SKUs all live elsewhere); buckets is the
-- SKU's bucket count the caller assumed when it chose this shard for the line; kind is
-- 's' for a SKU's units, 'b' for a bundle's limit line, which counts the user's
-- holding of the bundle (its per-user limit) and holds no stock
--
-- Returns one of
--   {'ok'}
--   {'dup', order_id, accepted_at, state}   same key, same body; state pending|accepted
--   {'reused', order_id}                    same key, another body
--   {'unknown_sku', sku}
--   {'limit', sku, limit, already}
--   {'sold_out', sku, available}           available: what a new order may take
--   {'waitlisted', position}                short of stock and ARGV[10] set: nothing
--                                           reserved, the order waits (its holding is
--                                           counted: the per-user limit covers it)
--   {'not_started', sku, starts_ms}         before the SKU's sale window
--   {'ended', sku, ends_ms}                 after it
--   {'insufficient_points', spendable, needed}  ARGV[12] set and the user's spendable
--                                           points short of it: nothing reserved
--   {'unavailable'}                         stock not loaded
--   {'moved', sku, buckets}                 the caller assumed another bucket count for
--                                           sku: nothing was written; ask again with it
--   {'bundle', sku, components}             sku was sent as a SKU's line and is a bundle:
--                                           nothing was written; ask again with its
--                                           components
--
-- The same order id again is this very call, re-sent (a cluster client re-sends a
-- command whose connection dropped before the reply; ingress makes a new order id for
-- every attempt of its own). The first run decided and holds the units; taking them
-- again would leave the first ones held by nothing. It is checked before the gate and
-- the Idempotency-Key: the first run wrote the key's record naming this order, and
-- answering 'dup' to the re-sent call would make ingress wait for itself.
local already = redis.call('HMGET', KEYS[6], 'state', 'items', 'wseq')
if already[1] then
  if already[3] then
    -- The first run waitlisted it: the same answer (never 'ok', which would publish it:
    -- the promoter publishes it once promoted, and a cancelled or expired one never).
    -- Its position, or 0 once it left the list (promoted, cancelled or expired since).
    local p = string.sub(KEYS[2], 1, #KEYS[2] - 5)
    local sku = cjson.decode(already[2])[1].sku
    local rank = redis.call('ZRANK', p .. 'wl:' .. sku, ARGV[1])
    return {'waitlisted', tostring(rank and rank + 1 or 0)}
  end
  return {'ok'}
end

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'unavailable'}
end

local has_idem = ARGV[3] ~= ''
if has_idem then
  local rec = redis.call('HMGET', KEYS[5], 'order_id', 'body_hash', 'accepted_at', 'state')
  if rec[1] then
    if rec[2] ~= ARGV[3] then
      return {'reused', rec[1]}
    end
    return {'dup', rec[1], rec[3], rec[4]}
  end
end

local skus, qtys, kinds = {}, {}, {}
local n = (#ARGV - 12) / 4
-- A hold is made only with the order's lines here, and never for an order that may
-- wait (ingress refuses both): refuse rather than accept an order unpaid.
if ARGV[12] ~= '' and (n == 0 or ARGV[10] ~= '') then
  return redis.error_reply('ERR reserve.lua: a points hold needs the lines here and no waitlist')
end
for i = 1, n do
  skus[i] = ARGV[9 + 4 * i]
  qtys[i] = tonumber(ARGV[10 + 4 * i])
  kinds[i] = ARGV[12 + 4 * i]
end

if n > 0 then
  -- A line must be in the shard of the user's bucket: a caller that did not know the
  -- SKU's bucket count learns it here, before anything is written.
  local counts = redis.call('HMGET', KEYS[10], unpack(skus))
  for i = 1, n do
    local k = counts[i] or '1'
    if k ~= ARGV[11 + 4 * i] then
      return {'moved', skus[i], k}
    end
  end

  -- A SKU's line needs its stock field; a bundle's limit line its definition (a bundle
  -- has no stock field: a caller that sent one as a SKU learns its components).
  -- (Definitions are read only for such a line: most orders never need them.)
  local avail = redis.call('HMGET', KEYS[2], unpack(skus))
  for i = 1, n do
    if kinds[i] == 'b' or not avail[i] then
      local def = redis.call('HGET', KEYS[12], skus[i])
      if not def then
        return {'unknown_sku', skus[i]}
      end
      if kinds[i] ~= 'b' then
        return {'bundle', skus[i], def}
      end
    end
  end

  -- One clock for every ingress: this server's, read only when a line has a window.
  local windows = redis.call('HMGET', KEYS[11], unpack(skus))
  local now
  for i = 1, n do
    local w = windows[i]
    if w then
      if not now then
        local t = redis.call('TIME')
        now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      end
      local starts, ends = string.match(w, '^(%d*),(%d*)$')
      if not starts then
        -- Not a window this code wrote: refuse rather than sell outside it.
        return {'unavailable'}
      end
      if starts ~= '' and now < tonumber(starts) then
        return {'not_started', skus[i], starts}
      end
      if ends ~= '' and now >= tonumber(ends) then
        return {'ended', skus[i], ends}
      end
    end
  end

  local limits = redis.call('HMGET', KEYS[3], unpack(skus))
  local held = redis.call('HMGET', KEYS[4], unpack(skus))
  for i = 1, n do
    local limit = tonumber(limits[i] or '0')
    local already = tonumber(held[i] or '0')
    if limit > 0 and already + qtys[i] > limit then
      return {'limit', skus[i], tostring(limit), tostring(already)}
    end
  end

  -- The units an older waitlisted order waits for are not a new order's: it takes only
  -- what is above the SKU's waitlist (one field lookup for a SKU without one).
  local waiting = redis.call('HMGET', KEYS[13], unpack(skus))
  for i = 1, n do
    if kinds[i] ~= 'b' then
      local a = tonumber(avail[i]) - tonumber(waiting[i] or '0')
      if a < qtys[i] then
        -- One line of a SKU without buckets may wait (ingress refuses any other
        -- waitlist order before it gets here; this keeps promotion one script).
        if ARGV[10] ~= '' and n == 1 and (counts[1] or '1') == '1' then
          local p = string.sub(KEYS[2], 1, #KEYS[2] - 5)
          local wseq = redis.call('INCR', p .. 'wlseq')
          redis.call('ZADD', p .. 'wl:' .. skus[1], wseq, ARGV[1])
          redis.call('HINCRBY', KEYS[13], skus[1], qtys[1])
          redis.call('ZADD', p .. 'wlexp', ARGV[10], ARGV[1])
          redis.call('ZADD', p .. 'wlnew', wseq, ARGV[1])
          redis.call('HINCRBY', KEYS[4], skus[1], qtys[1])
          redis.call('HSET', KEYS[6], 'state', 'waitlisted', 'user', ARGV[2], 'items', ARGV[7],
            'accepted_at', ARGV[4], 'deadline', ARGV[10], 'wseq', wseq)
          if ARGV[11] ~= '' then
            redis.call('HSET', KEYS[6], 'idem', ARGV[11])
          end
          if has_idem then
            -- Accepted onto the waitlist: a repeat of the key answers with this order.
            redis.call('HSET', KEYS[5], 'order_id', ARGV[1], 'body_hash', ARGV[3],
              'accepted_at', ARGV[4], 'state', 'accepted')
            redis.call('EXPIRE', KEYS[5], ARGV[6])
          end
          return {'waitlisted', tostring(redis.call('ZCARD', p .. 'wl:' .. skus[1]))}
        end
        return {'sold_out', skus[i], tostring(math.max(a, 0))}
      end
    end
  end

  -- Paid with points: the total must be spendable now (checked after the stock, so a
  -- sold-out SKU answers sold out whatever the balance).
  -- (A total of 0 holds nothing: `-0` is no integer to HINCRBY.)
  if ARGV[12] ~= '' then
    local total = tonumber(ARGV[12])
    local p = string.sub(KEYS[2], 1, #KEYS[2] - 5)
    local spendable = tonumber(redis.call('HGET', p .. 'pts', ARGV[2]) or '0')
    if spendable < total then
      return {'insufficient_points', tostring(spendable), ARGV[12]}
    end
    if total > 0 then
      redis.call('HINCRBY', p .. 'pts', ARGV[2], 0 - total)
      redis.call('HINCRBY', p .. 'ptsheld', ARGV[2], total)
    end
    redis.call('HSET', KEYS[6], 'paid', ARGV[12])
  end

  local seq = redis.call('INCR', KEYS[9])
  for i = 1, n do
    if kinds[i] ~= 'b' then
      redis.call('HINCRBY', KEYS[2], skus[i], -qtys[i])
      redis.call('ZADD', KEYS[8], seq, skus[i])
    end
    redis.call('HINCRBY', KEYS[4], skus[i], qtys[i])
  end
end
redis.call('HSET', KEYS[6], 'state', 'reserved', 'user', ARGV[2], 'items', ARGV[7],
  'accepted_at', ARGV[4], 'deadline', ARGV[5])
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[6], 'part', ARGV[8])
end
if ARGV[9] ~= '' then
  redis.call('HSET', KEYS[6], 'first', ARGV[9])
end
redis.call('ZADD', KEYS[7], ARGV[5], ARGV[1])
if has_idem then
  redis.call('HSET', KEYS[5], 'order_id', ARGV[1], 'body_hash', ARGV[3],
    'accepted_at', ARGV[4], 'state', 'pending')
  redis.call('EXPIRE', KEYS[5], ARGV[6])
end
return {'ok'}
