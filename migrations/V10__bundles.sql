-- Bundles (API.md "v1 additions", Catalog; docs/design/bundles-waitlist.md): a SKU
-- sold as a fixed set of other SKUs. A bundle has no stock of its own: ordering it
-- reserves its components' units, in the same Redis decision as the rest of the order.
-- Its `inventory` row exists (every SKU view joins it) and stays 0/0; its ledger is its
-- components'.
ALTER TABLE skus ADD COLUMN is_bundle boolean NOT NULL DEFAULT false;

CREATE TABLE bundle_components (
    bundle text NOT NULL REFERENCES skus (sku),
    sku    text NOT NULL REFERENCES skus (sku),
    qty    integer NOT NULL CHECK (qty BETWEEN 1 AND 1000),
    PRIMARY KEY (bundle, sku),
    CONSTRAINT bundle_components_not_itself CHECK (bundle <> sku)
);
CREATE INDEX bundle_components_sku ON bundle_components (sku);

-- Fixed at creation, like skus.buckets: Redis and every reservation, message and order
-- line of a bundle read its components as they were when it was created, and an order
-- committed later must expand to the units it reserved. Nothing updates or deletes a
-- component, and no SKU becomes (or stops being) a bundle after its creation.
CREATE FUNCTION bundles_fixed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'a bundle''s components are fixed at creation (bundle %)', OLD.bundle
        USING ERRCODE = 'check_violation';
END $$;
CREATE TRIGGER bundle_components_fixed BEFORE UPDATE OR DELETE ON bundle_components
    FOR EACH ROW EXECUTE FUNCTION bundles_fixed();

CREATE FUNCTION skus_is_bundle_fixed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.is_bundle IS DISTINCT FROM OLD.is_bundle THEN
        RAISE EXCEPTION 'skus.is_bundle is fixed at creation (sku %)', OLD.sku
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER skus_is_bundle_fixed BEFORE UPDATE OF is_bundle ON skus
    FOR EACH ROW EXECUTE FUNCTION skus_is_bundle_fixed();

-- A component is a SKU of its own, never a bundle (one level of expansion everywhere).
CREATE FUNCTION bundle_component_is_sku() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM skus WHERE sku = NEW.bundle AND is_bundle) THEN
        RAISE EXCEPTION '% is not a bundle', NEW.bundle USING ERRCODE = 'check_violation';
    END IF;
    IF EXISTS (SELECT 1 FROM skus WHERE sku = NEW.sku AND is_bundle) THEN
        RAISE EXCEPTION 'a bundle (%) cannot be a component', NEW.sku
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER bundle_component_is_sku BEFORE INSERT ON bundle_components
    FOR EACH ROW EXECUTE FUNCTION bundle_component_is_sku();

-- The settle pass's recent cancels (a bundle line's holding given back under its token).
CREATE INDEX orders_cancelled ON orders (updated_at) WHERE status = 'cancelled';

-- The stock units of every order line: a SKU's line as it is, a bundle's line as its
-- components (line qty x component qty). One row per (line, component), not summed.
CREATE VIEW order_units AS
    SELECT it.order_id, coalesce(bc.sku, it.sku) AS sku,
           it.qty::bigint * coalesce(bc.qty, 1) AS qty
      FROM order_items it LEFT JOIN bundle_components bc ON bc.bundle = it.sku;

-- What an order counts against per-user limits: its stock units, and each bundle line
-- itself (a bundle's own per-user limit counts bundles).
CREATE VIEW order_holdings AS
    SELECT order_id, sku, qty FROM order_units
    UNION ALL
    SELECT it.order_id, it.sku, it.qty::bigint
      FROM order_items it JOIN skus s ON s.sku = it.sku AND s.is_bundle;
