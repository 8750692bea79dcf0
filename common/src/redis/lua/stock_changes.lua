-- stock_changes.lua: the stock levels that changed since a reader's cursor (the notifier
-- samples this every 100 ms, so the scripts on the order path only mark SKUs changed).
--
-- KEYS[1] epoch    names the current load of the stock levels; absent: not loaded
-- KEYS[2] stock    hash sku -> units available
-- KEYS[3] changes  zset sku -> change sequence of its last change
-- KEYS[4] seq      the change sequence counter
-- ARGV[1] the sequence the reader has seen, ARGV[2] the epoch the reader has seen
--
-- Returns {epoch, seq, sku1, available1, sku2, available2, ...}: each SKU changed after
-- the cursor, or every SKU when the epoch differs (stock was reloaded) or the counter
-- is behind the cursor (Redis lost it). {'', '0'} while stock is not loaded.
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  return {'', '0'}
end
local seq = tonumber(redis.call('GET', KEYS[4]) or '0')
local cursor = tonumber(ARGV[1])
local out = {epoch, tostring(seq)}
if epoch ~= ARGV[2] or seq < cursor then
  for _, v in ipairs(redis.call('HGETALL', KEYS[2])) do
    out[#out + 1] = v
  end
  return out
end
if seq == cursor then
  return out
end
local skus = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. cursor, '+inf')
-- HMGET in slices: unpack() has a limit on the number of arguments.
for first = 1, #skus, 1000 do
  local slice = {unpack(skus, first, math.min(first + 999, #skus))}
  local vals = redis.call('HMGET', KEYS[2], unpack(slice))
  for i = 1, #slice do
    if vals[i] then
      out[#out + 1] = slice[i]
      out[#out + 1] = vals[i]
    end
  end
end
return out
