-- credit_points.lua: add points PostgreSQL committed (a charge, a grant, a cancel's
-- refund) to a user's spendable points, once per token: a re-sent call, a repeated
-- request and the workers' settle pass (which re-applies a credit whose Redis half was
-- lost) all find the token and add nothing.
--
-- KEYS[1] applied  set of applied change tokens (a load rebuilds it with the balances)
-- KEYS[2] pts      hash user -> spendable points
-- ARGV[1] token, ARGV[2] user, ARGV[3] points (> 0)
--
-- Returns 1 if this call added them, 0 if the token was applied before, -1 while the
-- stock is not loaded (a load will count the credit from PostgreSQL).
local p = string.sub(KEYS[2], 1, #KEYS[2] - 3)
if redis.call('EXISTS', p .. 'epoch') == 0 then
  return -1
end
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('HINCRBY', KEYS[2], ARGV[2], tonumber(ARGV[3]))
return 1
