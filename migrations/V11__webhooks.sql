-- Webhooks: the export of committed events to a data platform (API.md "v1 additions",
-- Webhooks; docs/ARCHITECTURE.md "Webhooks"). The outbox relay fans each committed
-- event of a subscribed type out into `webhook_deliveries` in the transaction that
-- deletes its outbox row, so an event is owed to an endpoint exactly once; workers then
-- deliver it at least once, with retries, a dead state, and a circuit per endpoint.

CREATE TABLE webhooks (
    id          uuid PRIMARY KEY,
    url         text NOT NULL,
    events      text[] NOT NULL CHECK (cardinality(events) > 0),
    description text,
    -- `whsec_<base64 key>`: the worker signs with it, so it is kept as it is.
    secret      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- Deleted webhooks stay (their delivery log stays readable to the audit trail);
    -- nothing is delivered to them any more.
    deleted_at  timestamptz,
    -- The circuit breaker, shared by every worker: `closed` delivers; `open` waits
    -- until `opened_at` + the cool-down; `half_open` lets one probe through (held by
    -- one worker until `probe_until`, so a probe whose worker died is retried).
    circuit     text NOT NULL DEFAULT 'closed' CHECK (circuit IN ('closed', 'open', 'half_open')),
    failures    integer NOT NULL DEFAULT 0 CHECK (failures >= 0),
    opened_at   timestamptz,
    probe_until timestamptz
);

-- The events some webhook was subscribed to when they were committed, as delivered
-- (`data` of the body). Replays read them again.
CREATE TABLE webhook_events (
    event_id uuid PRIMARY KEY,
    type     text NOT NULL,
    at       timestamptz NOT NULL,
    data     jsonb NOT NULL
);
CREATE INDEX webhook_events_at ON webhook_events (at);

-- What each webhook is owed: one row per (webhook, event).
CREATE TABLE webhook_deliveries (
    webhook_id      uuid NOT NULL REFERENCES webhooks (id),
    event_id        uuid NOT NULL REFERENCES webhook_events (event_id),
    state           text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'dead')),
    -- Attempts made since it was (re)armed; the retry schedule counts these.
    attempts        integer NOT NULL DEFAULT 0,
    -- When it is due; a worker that claims it moves this past its request's timeout,
    -- so a claim whose worker died lapses and another worker delivers it.
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    -- The claim that holds it (a round's token); only that round records its outcome,
    -- so a replay or a lapsed lease taken over is never overwritten by a late answer.
    lease           uuid,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (webhook_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (webhook_id, next_attempt_at)
    WHERE state = 'pending';

-- The delivery log: one row per attempt, newest read first.
CREATE TABLE webhook_attempts (
    id              bigserial PRIMARY KEY,
    webhook_id      uuid NOT NULL REFERENCES webhooks (id),
    event_id        uuid NOT NULL,
    attempt         integer NOT NULL,
    status_code     integer,
    error           text,
    at              timestamptz NOT NULL DEFAULT now(),
    -- When the next attempt is due (absent: delivered or dead).
    next_attempt_at timestamptz
);
CREATE INDEX webhook_attempts_by_webhook ON webhook_attempts (webhook_id, id DESC);
