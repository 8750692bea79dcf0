
-- unwait.lua (after promote.lua): take a waitlisted order off its waitlist: cancelled by
-- its buyer, or expired (FLOODGATE_WAITLIST_TTL_SECS without units for it). Its holding
-- (the per-user limit counted its units) goes back; it held no stock. The order goes
-- into `reaped` until PostgreSQL records it (cancelled, or failed: waitlist_expired),
-- as the reaper's are. The next in line may fit now: promote runs.
--
-- KEYS[1] resv     the order's record (state 'waitlisted')
-- KEYS[2] user     hash sku -> units its user holds
-- KEYS[3] reaped   zset order id -> time, awaiting the PostgreSQL record
-- KEYS[4] stock    hash sku -> units available (its prefix names the waitlist's keys)
-- ARGV[1] order id, ARGV[2] 'cancelled' or 'waitlist_expired', ARGV[3] now (ms),
-- ARGV[4] seconds to keep the released record, ARGV[5] who cancelled it, as JSON, when
-- the cancel is an audited write (a manager's or admin's; '' otherwise): the reaper
-- writes the audit record with the order's PostgreSQL record
--
-- Returns 'released_now', 'not_due' (waitlist_expired before its deadline), or the
-- state that kept it ('reserved', 'queued', ... when it was promoted first; 'missing').
local rec = redis.call('HMGET', KEYS[1], 'state', 'items', 'deadline')
if rec[1] ~= 'waitlisted' then
  return rec[1] or 'missing'
end
if ARGV[2] == 'waitlist_expired' and tonumber(rec[3]) > tonumber(ARGV[3]) then
  return 'not_due'
end
local stock = KEYS[4]
local p = string.sub(stock, 1, #stock - 5)
local line = cjson.decode(rec[2])[1]
redis.call('HINCRBY', KEYS[2], line.sku, -line.qty)
if redis.call('HINCRBY', p .. 'wlw', line.sku, -line.qty) <= 0 then
  redis.call('HDEL', p .. 'wlw', line.sku)
end
redis.call('ZREM', p .. 'wl:' .. line.sku, ARGV[1])
redis.call('ZREM', p .. 'wlexp', ARGV[1])
redis.call('ZREM', p .. 'wlnew', ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'released', 'reason', ARGV[2])
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'by', ARGV[5])
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
promote(stock, line.sku)
return 'released_now'
