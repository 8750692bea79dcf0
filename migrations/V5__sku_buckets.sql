-- A hot SKU's stock may be split over several Redis shards (buckets; see
-- docs/design/redis-shards.md). The count is fixed at creation: a user always buys from
-- and holds in the same bucket, and a count that changed under a user would split what
-- the user holds and break the per-user limit.
ALTER TABLE skus ADD COLUMN buckets smallint NOT NULL DEFAULT 1
    CHECK (buckets BETWEEN 1 AND 64);

CREATE FUNCTION skus_buckets_fixed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.buckets IS DISTINCT FROM OLD.buckets THEN
        RAISE EXCEPTION 'skus.buckets is fixed at creation (sku %)', OLD.sku
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER skus_buckets_fixed BEFORE UPDATE OF buckets ON skus
    FOR EACH ROW EXECUTE FUNCTION skus_buckets_fixed();
