-- move_in.lua: the second half of a move (`move_out.lua`): add the units to the bucket
-- in this shard, once per move token.
--
-- KEYS[1] epoch    KEYS[2] stock    KEYS[3] this half's mark (kept a day from its last run)
-- KEYS[4] changes  zset sku -> change sequence;  KEYS[5] seq  its counter
-- ARGV[1] sku, ARGV[2] units, ARGV[3] move token (unused: the mark names it),
-- ARGV[4] the epoch this shard had when the units left the source
--
-- Returns 'moved' (added now), 'done' (added before: a repeat) or 'stale': this shard
-- was reloaded from PostgreSQL since (or is not loaded). A full load counted the units
-- already, so adding them would count them twice; after a load of only some shards they
-- stay out of sale (never sold twice) until a full `floodgate reconcile`.
if redis.call('GET', KEYS[1]) ~= ARGV[4] then
  return 'stale'
end
if not redis.call('SET', KEYS[3], ARGV[2], 'NX', 'EX', 86400) then
  -- A repeat: its mover is waiting for the replicas before it drops the record, and
  -- re-runs this on every pass until then. The mark lives another day from now, so a
  -- record that waits long does not outlive it (its units would be added again).
  redis.call('EXPIRE', KEYS[3], 86400)
  return 'done'
end
redis.call('HINCRBY', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[4], redis.call('INCR', KEYS[5]), ARGV[1])
return 'moved'
