-- open_bucket.lua: open one bucket of a SKU with buckets in this shard, once: its
-- `buckets` field, per-user limit and sale window, and (buckets 1..) a level of 0. A
-- bucket already open is left as it is, so a late or repeated call never overwrites a
-- limit or window a PATCH has changed since.
--
-- KEYS[1] buckets, KEYS[2] limits, KEYS[3] windows, KEYS[4] stock
-- ARGV[1] sku, ARGV[2] bucket count, ARGV[3] per-user limit, ARGV[4] sale window field
-- ('' = none), ARGV[5] '1' to give it a level of 0 (not bucket 0: its receipt does)
--
-- Returns 1 when it opened the bucket now, 0 when it was open.
local sku = ARGV[1]
if redis.call('HSETNX', KEYS[1], sku, ARGV[2]) == 0 then
  return 0
end
redis.call('HSET', KEYS[2], sku, ARGV[3])
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[3], sku, ARGV[4])
end
if ARGV[5] == '1' then
  redis.call('HSETNX', KEYS[4], sku, 0)
end
return 1
