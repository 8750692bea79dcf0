-- floodgate's system of record. Every table lives in the namespace's schema
-- (search_path is set per connection), so several deployments share one database.

CREATE TABLE skus (
    sku            text PRIMARY KEY,
    name           text NOT NULL,
    price_cents    bigint NOT NULL CHECK (price_cents >= 0),
    -- 0 means no per-user limit
    per_user_limit integer NOT NULL DEFAULT 0 CHECK (per_user_limit >= 0),
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- One row per SKU, the hot row of a sale: workers update it once per batch.
CREATE TABLE inventory (
    sku        text PRIMARY KEY REFERENCES skus (sku) ON DELETE CASCADE,
    on_hand    bigint NOT NULL CHECK (on_hand >= 0),
    sold       bigint NOT NULL DEFAULT 0 CHECK (sold >= 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- The final arbiter: whatever Redis believes, PostgreSQL never oversells.
    CONSTRAINT inventory_no_oversell CHECK (sold <= on_hand)
);

-- Committed orders only; an order queued but not yet committed is 'accepted' in Redis.
CREATE TABLE orders (
    id              uuid PRIMARY KEY,
    user_id         text NOT NULL,
    status          text NOT NULL CHECK (status IN ('confirmed', 'failed', 'cancelled')),
    reason          text,
    idempotency_key text,
    accepted_at     timestamptz NOT NULL,
    confirmed_at    timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT orders_failed_has_reason CHECK (status <> 'failed' OR reason IS NOT NULL)
);
CREATE UNIQUE INDEX orders_user_idempotency_key
    ON orders (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX orders_user ON orders (user_id, id DESC);

CREATE TABLE order_items (
    order_id uuid NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    sku      text NOT NULL,
    qty      integer NOT NULL CHECK (qty BETWEEN 1 AND 1000),
    PRIMARY KEY (order_id, sku)
);

-- The ledger. One row per (kind, reference, sku): replays are no-ops.
CREATE TABLE stock_movements (
    id        bigserial PRIMARY KEY,
    sku       text NOT NULL,
    kind      text NOT NULL CHECK (kind IN ('receive', 'sale', 'release', 'cancel', 'adjust')),
    qty       bigint NOT NULL CHECK (qty >= 0),
    reference text NOT NULL,
    at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT stock_movements_once UNIQUE (kind, reference, sku)
);
CREATE INDEX stock_movements_by_sku ON stock_movements (sku, id DESC);
