
-- promote_now.lua (after promote.lua): promote what fits of one SKU's waitlist now. The
-- worker runs it for every waitlisted SKU each tick, and after a load: a safety net for
-- units that came back by a path that does not promote (a load, a move between buckets).
--
-- KEYS[1] stock  hash sku -> units available (its prefix names the waitlist's keys)
-- ARGV[1] sku
-- Returns how many orders it promoted.
return promote(KEYS[1], ARGV[1])
