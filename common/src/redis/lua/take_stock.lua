-- take_stock.lua: take units out of sale for a write-off (a negative stock adjustment)
-- before PostgreSQL records it, atomically with every reserve decision, so no order can
-- be given a unit that is being written off; or give them back when the record failed
-- before its commit. Run in the shard of the SKU's bucket 0.
--
-- KEYS[1] epoch    (no epoch: the shard's stock is not loaded)
-- KEYS[2] stock    hash sku -> units available
-- KEYS[3] mark     string: the units this adjustment took (expires after a day)
-- KEYS[4] changes  zset sku -> change sequence;  KEYS[5] seq  its counter
-- ARGV[1] sku, ARGV[2] units (> 0), ARGV[3] 'take' or 'undo'
--
-- take: {1, units, level}  taken now
--       {0, units, level}  taken before by this adjustment (the mark): nothing more
--       {-1, 0, level}     fewer than `units` available: nothing taken
--       {-2, 0, 0}         stock not loaded: nothing taken
-- undo: {1, units, level}  given back (the mark is gone)
--       {0, 0, level}      nothing to give back
local sku = ARGV[1]
local function level()
  return tonumber(redis.call('HGET', KEYS[2], sku) or '0')
end
local function changed()
  redis.call('ZADD', KEYS[4], redis.call('INCR', KEYS[5]), sku)
end
if ARGV[3] == 'undo' then
  local taken = tonumber(redis.call('GET', KEYS[3]) or '0')
  if taken <= 0 then
    return {0, 0, level()}
  end
  redis.call('DEL', KEYS[3])
  redis.call('HINCRBY', KEYS[2], sku, taken)
  changed()
  return {1, taken, level()}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {-2, 0, 0}
end
local before = redis.call('GET', KEYS[3])
if before then
  return {0, tonumber(before), level()}
end
local units = tonumber(ARGV[2])
local have = level()
if have < units then
  return {-1, 0, have}
end
redis.call('HINCRBY', KEYS[2], sku, -units)
redis.call('SET', KEYS[3], units, 'EX', 86400)
changed()
return {1, units, have - units}
