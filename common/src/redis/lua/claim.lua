-- claim.lua: a worker takes a batch's reservations before committing them.
-- queued or reserved -> claimed. Claiming again is a no-op (redelivery).
--
-- A worker holds the order's message, which proves it was published, so a reservation
-- is claimed whatever its deadline: an accepted order never fails for slowness. Only the
-- reaper expires reservations (those still 'reserved', whose publish was never
-- confirmed); the claim and the reaper are atomic against each other, so exactly one of
-- them wins, and a message whose reservation the reaper took is 'expired' here.
--
-- KEYS[1 + i]  resv hash of order i
-- Returns one word per order: 'claimed', 'done' (already committed), 'expired'
-- (the reaper released it), 'unpublished' (ingress gave up on its publish and answered
-- 503: the order was never accepted; 'publish_abandoned' is how the other parts of such a
-- multi-part order are released), 'released' (released for another reason, already
-- decided), 'missing' (Redis does not know it).
local out = {}
for i = 1, #KEYS do
  local resv = KEYS[i]
  local rec = redis.call('HMGET', resv, 'state', 'reason')
  local state = rec[1]
  if not state then
    out[i] = 'missing'
  elseif state == 'claimed' or state == 'done' then
    out[i] = state
  elseif state == 'waitlisted' then
    -- Still waiting: a message for it cannot be its own (it is published only once
    -- promoted); it must not be committed, nor recorded.
    out[i] = 'unpublished'
  elseif state == 'released' then
    if rec[2] == 'reservation_expired' then
      out[i] = 'expired'
    elseif rec[2] == 'publish_failed' or rec[2] == 'publish_abandoned' or rec[2] == 'refused'
        or rec[2] == 'cancelled' or rec[2] == 'waitlist_expired' then
      -- Never published ('cancelled' and 'waitlist_expired': a waitlisted order that left
      -- its list unpromoted; the reaper records it).
      out[i] = 'unpublished'
    else
      out[i] = 'released'
    end
  else
    redis.call('HSET', resv, 'state', 'claimed')
    out[i] = 'claimed'
  end
end
return out
