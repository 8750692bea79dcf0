
-- rewait.lua: run inside a load's MULTI, after the load wrote the users' holdings from
-- PostgreSQL: PostgreSQL does not know the orders still on a waitlist (they live only
-- here), so the units they hold are added back for the (user, SKU) pairs the load wrote.
-- A pair the load did not write kept its Redis value, waitlisted units included. Inside
-- the MULTI it sees exactly the waitlists the load's writes land on.
--
-- KEYS[1] waiting  hash sku -> units waited for (its prefix names the other keys)
-- ARGV    'user<TAB>sku' of every pair the load wrote for a SKU with a waitlist
-- Returns how many waitlisted orders' holdings it added.
local written = {}
for i = 1, #ARGV do
  written[ARGV[i]] = true
end
local p = string.sub(KEYS[1], 1, #KEYS[1] - 3)
local n = 0
for _, sku in ipairs(redis.call('HKEYS', KEYS[1])) do
  for _, id in ipairs(redis.call('ZRANGE', p .. 'wl:' .. sku, 0, -1)) do
    local rec = redis.call('HMGET', p .. 'resv:' .. id, 'state', 'user', 'items')
    if rec[1] == 'waitlisted' and written[rec[2] .. '\t' .. sku] then
      redis.call('HINCRBY', p .. 'user:' .. rec[2], sku, cjson.decode(rec[3])[1].qty)
      n = n + 1
    end
  end
end
return n
