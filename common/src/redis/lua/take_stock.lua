
-- take_stock.lua (after promote.lua): take units out of sale for a write-off (a negative stock adjustment)
-- before PostgreSQL records it, atomically with every reserve decision, so no order can
-- be given a unit that is being written off. Run in the shard of the SKU's bucket 0.
--
-- KEYS[1] epoch    (no epoch: the shard's stock is not loaded)
-- KEYS[2] stock    hash sku -> units available
-- KEYS[3] takes    hash token -> units taken by a write-off PostgreSQL has not recorded
--                  yet (a load deletes it with the levels: it starts from PostgreSQL)
-- KEYS[4] changes  zset sku -> change sequence;  KEYS[5] seq  its counter
-- ARGV[1] sku, ARGV[2] units (> 0), ARGV[3] token, ARGV[4] 'take', 'undo' or 'done'
--
-- take: {1, units, level}  taken now
--       {0, units, level}  taken before under this token (not recorded yet): no more
--       {-1, 0, level}     fewer than `units` available: nothing taken
--       {-2, 0, 0}         stock not loaded: nothing taken
-- undo: {1, units, level}  given back (the record failed before its commit)
--       {0, 0, level}      nothing held under the token
-- done: {1, units, level}  PostgreSQL recorded it: the units stay gone, the entry goes
local sku, token, mode = ARGV[1], ARGV[3], ARGV[4]
local function level()
  return tonumber(redis.call('HGET', KEYS[2], sku) or '0')
end
local held = tonumber(redis.call('HGET', KEYS[3], token) or '0')
if mode == 'done' then
  redis.call('HDEL', KEYS[3], token)
  return {1, held, level()}
end
if mode == 'undo' then
  if held <= 0 then
    return {0, 0, level()}
  end
  redis.call('HDEL', KEYS[3], token)
  redis.call('HINCRBY', KEYS[2], sku, held)
  redis.call('ZADD', KEYS[4], redis.call('INCR', KEYS[5]), sku)
  promote(KEYS[2], sku)
  return {1, held, level()}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {-2, 0, 0}
end
if held > 0 then
  return {0, held, level()}
end
local units = tonumber(ARGV[2])
local have = level()
if have < units then
  return {-1, 0, have}
end
redis.call('HINCRBY', KEYS[2], sku, -units)
redis.call('HSET', KEYS[3], token, units)
redis.call('ZADD', KEYS[4], redis.call('INCR', KEYS[5]), sku)
return {1, units, have - units}
