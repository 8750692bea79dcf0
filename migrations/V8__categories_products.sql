-- The catalog above SKUs (API.md "v1 additions", Catalog): a tree of categories,
-- products with options (size, colour, ...), and SKUs tied to one value of each of
-- their product's options.
CREATE TABLE categories (
    id         text PRIMARY KEY,
    name       text NOT NULL,
    -- Set once at creation and only to a category that exists then: no cycle can form
    -- (no route moves a category).
    parent_id  text REFERENCES categories (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT categories_not_own_parent CHECK (parent_id IS DISTINCT FROM id)
);
CREATE INDEX categories_parent ON categories (parent_id);

CREATE TABLE products (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    description text,
    category_id text REFERENCES categories (id),
    -- [{"name": "size", "values": ["S", "M", "L"]}, ...]
    options     jsonb NOT NULL DEFAULT '[]',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX products_category ON products (category_id, created_at DESC);

-- A SKU of a product: {"size": "M", "colour": "red"}, one value of each option. One SKU
-- per combination.
ALTER TABLE skus
    ADD COLUMN product_id text REFERENCES products (id),
    ADD COLUMN options jsonb,
    ADD CONSTRAINT skus_options_need_product CHECK (options IS NULL OR product_id IS NOT NULL);
CREATE UNIQUE INDEX skus_product_variant ON skus (product_id, options) WHERE product_id IS NOT NULL;
