-- Webhook retention (FLOODGATE_WEBHOOK_RETENTION_HOURS): each worker prunes, in small
-- batches, the attempts older than the retention, the delivered deliveries last touched
-- before it and a deleted webhook's deliveries last touched before it, each event with
-- the last delivery that named it. Pending and dead deliveries of a live webhook and
-- their events stay: nothing owed is ever pruned.
--
-- Three indexes so each batch reads only what it deletes. They lock only the webhook
-- tables (writes wait while each is built: the outbox relay's fan-out and the senders'
-- records, never an order's intake or commit).
CREATE INDEX webhook_attempts_at ON webhook_attempts (at);
CREATE INDEX webhook_deliveries_delivered ON webhook_deliveries (updated_at)
    WHERE state = 'delivered';
-- The event a delivery names: the prune's "no delivery names it any more", and the
-- foreign key's own check when an event is deleted.
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_id);
