-- move_out.lua: take units of a SKU with buckets out of the bucket in this shard, on
-- their way to another bucket (`move_in.lua` adds them there). The first half of a move:
-- units leave before they arrive, so a move never sells a unit twice; until the second
-- half runs they are in the `moves` record, on sale nowhere, and whoever finds the record
-- (the caller, or any worker's rebalancer) finishes the move.
--
-- KEYS[1] epoch    absent: stock not loaded here
-- KEYS[2] stock    hash sku -> units available
-- KEYS[3] moves    hash token -> 'sku|destination shard|units|destination epoch|epoch here'
-- KEYS[4] changes  zset sku -> change sequence;  KEYS[5] seq  its counter
-- KEYS[6] mark     this move's 'out' mark: present once the units were taken (a day)
-- ARGV[1] sku, ARGV[2] units wanted, ARGV[3] move token (new for every move),
-- ARGV[4] destination shard, ARGV[5] the destination's epoch, read before this call,
-- ARGV[6] units to leave here at least (0: take what there is; the rebalancer passes its
-- target level, so two passes that read the same levels cannot both take the surplus)
--
-- Returns {units taken (0..wanted), this shard's epoch}. A re-sent call (a cluster
-- client's retry) finds its token: it answers what the first one took while the record
-- is there, and 0 once the move was finished (never takes the units twice).
local rec = redis.call('HGET', KEYS[3], ARGV[3])
local epoch = redis.call('GET', KEYS[1])
if rec then
  return {tonumber(string.match(rec, '^[^|]*|%d+|(%d+)|')), epoch or ''}
end
if not epoch then
  return {0, ''}
end
if redis.call('EXISTS', KEYS[6]) == 1 then
  return {0, epoch}
end
local available = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local units = math.min(tonumber(ARGV[2]), available - tonumber(ARGV[6]))
if units <= 0 then
  return {0, epoch}
end
redis.call('SET', KEYS[6], units, 'EX', 86400)
redis.call('HINCRBY', KEYS[2], ARGV[1], -units)
redis.call('HSET', KEYS[3], ARGV[3], ARGV[1] .. '|' .. ARGV[4] .. '|' .. units .. '|' ..
  ARGV[5] .. '|' .. epoch)
redis.call('ZADD', KEYS[4], redis.call('INCR', KEYS[5]), ARGV[1])
return {units, epoch}
