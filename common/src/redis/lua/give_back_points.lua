-- give_back_points.lua: a function prepended to the scripts that release an open
-- reservation (release.lua, reap.lua), after promote.lua.
--
-- give_back_points(resv, stock): a reservation paid with points ('paid', reserve.lua)
-- gives its held total back from the user's `ptsheld` to their `pts` (both named from
-- the stock key's prefix, same slot). A total of 0 held nothing (and `-0` is no integer
-- to HINCRBY).
local function give_back_points(resv, stock)
  local paid = redis.call('HMGET', resv, 'paid', 'user')
  local total = tonumber(paid[1] or '0')
  if total > 0 then
    local p = string.sub(stock, 1, #stock - 5)
    redis.call('HINCRBY', p .. 'pts', paid[2], total)
    redis.call('HINCRBY', p .. 'ptsheld', paid[2], 0 - total)
  end
end

