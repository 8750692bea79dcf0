-- The transactional outbox: an order's status change and its event commit together, so
-- a crash between the commit and the publish loses no event. The worker's relay
-- publishes rows to the `events` exchange (routing key `order.<status>`) with publisher
-- confirms and deletes them only after the confirm; a row published twice (a crash
-- between the confirm and the delete) carries the same event_id, which the notifier
-- de-duplicates.
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    event_id    uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    routing_key text NOT NULL,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
