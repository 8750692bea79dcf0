-- Paying for an order with points (API.md "v1 additions", Points): how an order was paid
-- and, for one paid with points, the total held at the moment of ordering and spent in
-- its commit. Orders paid elsewhere keep both null (floodgate never saw their charge).
--
-- Nullable columns without a default and NOT VALID checks: no row of a large `orders` is
-- read or rewritten (every existing row has both null, which the checks accept; new rows
-- are checked), so its exclusive lock lasts no longer than the catalogue change. No index
-- on `orders` here: building one would scan the table under that lock.
ALTER TABLE orders ADD COLUMN payment text, ADD COLUMN total_cents bigint;
ALTER TABLE orders
    ADD CONSTRAINT orders_payment CHECK (payment IN ('points')) NOT VALID,
    ADD CONSTRAINT orders_total_cents CHECK (total_cents >= 0) NOT VALID,
    ADD CONSTRAINT orders_points_total CHECK ((payment IS NULL) = (total_cents IS NULL)) NOT VALID;
-- The settle pass re-applies the recent credits whose Redis half was lost (a new table
-- from V12: small, quick to index).
CREATE INDEX point_entries_credits_at ON point_entries (at)
    WHERE kind IN ('charge', 'grant', 'refund');
