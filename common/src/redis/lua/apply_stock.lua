
-- apply_stock.lua (after promote.lua): apply a stock change that PostgreSQL has already committed (a SKU
-- created, goods received, an order cancelled), exactly once per change token, so a
-- retried request heals a crash between the PostgreSQL commit and this call without
-- double counting.
--
-- KEYS[1] stock    hash sku -> units available
-- KEYS[2] limits   hash sku -> per-user limit
-- KEYS[3] applied  set of change tokens already applied
-- KEYS[4] user     hash sku -> units a user holds (any unused key when ARGV[5] is 0)
-- KEYS[5] changes  zset sku -> change sequence;  KEYS[6] seq  its counter
-- KEYS[7] windows  hash sku -> sale window
-- ARGV[1] sku, ARGV[2] units to add, ARGV[3] token, ARGV[4] per-user limit or '' to keep,
-- ARGV[5] change of the user's holding (a cancellation gives the limit back),
-- ARGV[6] the SKU's sale window field, written with its initial stock ('' = none),
-- ARGV[7] a token that must be applied first ('' = none): a receipt waits for the SKU's
--         initial stock, which brings its limit and window (a SKU never has units here
--         without them)
-- ARGV[8] 'hold': change only the user's holding (ARGV[5]), under the token: a cancelled
--         bundle line, whose bundle has no stock field (its units come back through its
--         components' own changes); absent or '': a stock change as above
--
-- Returns {applied (1 = now, 0 = before, -1 = not yet: ARGV[7] is not applied), available}.
local function level()
  return tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
end
if ARGV[7] ~= '' and redis.call('SISMEMBER', KEYS[3], ARGV[7]) == 0 then
  return {-1, level()}
end
local applied = redis.call('SADD', KEYS[3], ARGV[3])
if applied == 1 and ARGV[8] == 'hold' then
  redis.call('HINCRBY', KEYS[4], ARGV[1], ARGV[5])
  return {applied, 0}
end
if applied == 1 then
  if ARGV[6] ~= '' then
    redis.call('HSET', KEYS[7], ARGV[1], ARGV[6])
  end
  if ARGV[4] ~= '' then
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
  end
  redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[5], redis.call('INCR', KEYS[6]), ARGV[1])
  if tonumber(ARGV[5]) ~= 0 then
    redis.call('HINCRBY', KEYS[4], ARGV[1], ARGV[5])
  end
  -- Units came back (a receipt, a cancel, an adjustment up): the SKU's oldest
  -- waitlisted orders get them first (promote.lua), in this same decision.
  if tonumber(ARGV[2]) > 0 then
    promote(KEYS[1], ARGV[1])
  end
end
return {applied, level()}
