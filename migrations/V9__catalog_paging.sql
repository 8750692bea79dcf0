-- The lists page newest first on indexed (created_at, id): the public GET /v1/products
-- (by category or not) and GET /v1/skus, so a page costs an index range, not a sort of
-- every row.
DROP INDEX products_category;
CREATE INDEX products_newest ON products (created_at DESC, id DESC);
CREATE INDEX products_category ON products (category_id, created_at DESC, id DESC);
CREATE INDEX skus_newest ON skus (created_at DESC, sku DESC);
