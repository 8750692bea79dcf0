-- The trace of the request that placed the order (a W3C `traceparent` value), written
-- with the order's outbox event and sent beside it (the batch envelope's `traceparent`),
-- so the notifier's delivery continues the order's trace. A column, not a member of the
-- payload: the payload is the event subscribers receive, and a trace id is not theirs.
-- NULL for events with no trace (reaped orders, cancellations, rows from before V3).
ALTER TABLE outbox ADD COLUMN traceparent text;
