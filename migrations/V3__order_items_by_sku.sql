-- Per-SKU reads of order lines (reconcile's invariant check, per-SKU reports) without a
-- scan of every order line ever written.
CREATE INDEX order_items_by_sku ON order_items (sku) INCLUDE (qty);
