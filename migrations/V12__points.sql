-- Points (API.md "v1 additions", Points; seed 004): each user's balance and its history.
-- PostgreSQL is the system of record and the final arbiter: whatever any cache believes,
-- a balance never goes below zero.

CREATE TABLE point_accounts (
    user_id    text PRIMARY KEY,
    balance    bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT point_accounts_balance_not_negative CHECK (balance >= 0)
);

-- Every change of a balance, newest read first. `reference` is the caller's for a charge
-- or grant (its idempotency key: one top-up per (user, reference), whichever kind), the
-- order id for a spend or refund (one of each per order).
CREATE TABLE point_entries (
    id        bigserial PRIMARY KEY,
    user_id   text NOT NULL,
    kind      text NOT NULL CHECK (kind IN ('charge', 'grant', 'spend', 'refund')),
    amount    bigint NOT NULL CHECK (amount > 0),
    order_id  uuid,
    reference text NOT NULL,
    -- Who granted (an admin's `sub`); null for the user's own charges and for orders.
    actor     text,
    at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT point_entries_once UNIQUE (user_id, kind, reference),
    CONSTRAINT point_entries_order CHECK ((kind IN ('spend', 'refund')) = (order_id IS NOT NULL))
);
CREATE UNIQUE INDEX point_entries_top_up_once ON point_entries (user_id, reference)
    WHERE kind IN ('charge', 'grant');
CREATE INDEX point_entries_by_user ON point_entries (user_id, id DESC);
