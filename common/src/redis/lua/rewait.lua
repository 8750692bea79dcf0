
-- rewait.lua: run inside a load's MULTI, after the load wrote the users' holdings from
-- PostgreSQL. PostgreSQL does not know the orders still on a waitlist (they live only
-- here): for every SKU the load names that has a list, `wlw` (units waited for) is set
-- to what the list holds, and the units of its waitlisted orders are added back to the
-- holdings of the (user, SKU) pairs the load wrote. A pair the load did not write kept
-- its Redis value, waitlisted units included. Inside the MULTI it sees exactly the
-- waitlists the load's writes land on.
--
-- KEYS[1] waiting  hash sku -> units waited for (its prefix names the other keys)
-- ARGV[1] n, ARGV[2..n+1] the shard's SKUs (a list may lack its `wlw` field), then
--         'user<TAB>sku' of the pairs the load wrote that had a waitlisted order
-- Returns how many waitlisted orders it found.
local n = tonumber(ARGV[1])
local written = {}
for i = n + 2, #ARGV do
  written[ARGV[i]] = true
end
local p = string.sub(KEYS[1], 1, #KEYS[1] - 3)
local skus = {}
for i = 2, n + 1 do
  skus[ARGV[i]] = true
end
for _, sku in ipairs(redis.call('HKEYS', KEYS[1])) do
  skus[sku] = true
end
local found = 0
for sku in pairs(skus) do
  local units = 0
  for _, id in ipairs(redis.call('ZRANGE', p .. 'wl:' .. sku, 0, -1)) do
    local rec = redis.call('HMGET', p .. 'resv:' .. id, 'state', 'user', 'items')
    if rec[1] == 'waitlisted' then
      local qty = cjson.decode(rec[3])[1].qty
      units = units + qty
      found = found + 1
      if written[rec[2] .. '\t' .. sku] then
        redis.call('HINCRBY', p .. 'user:' .. rec[2], sku, qty)
      end
    end
  end
  if units > 0 then
    redis.call('HSET', KEYS[1], sku, units)
  else
    redis.call('HDEL', KEYS[1], sku)
  end
end
return found
