-- Who changed what (API.md "Audit log"): every write by a manager or an admin, through
-- the API or the `floodgate` command, appends one row in the transaction of the change
-- itself, so a change and its record commit together or not at all.
CREATE TABLE audit_log (
    id         bigserial PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The token's `sub`, or the operator's name for the command (`cli:<name>`).
    actor      text NOT NULL CHECK (length(actor) BETWEEN 1 AND 200),
    role       text NOT NULL CHECK (role IN ('manager', 'admin')),
    -- What was done: `sku.create`, `sku.update`, `stock.receive`, `stock.adjust`,
    -- `order.cancel`, `dlq.replay`, `reconcile`.
    action     text NOT NULL,
    -- What it was done to: `sku:<id>`, `order:<id>`, `stock` (a reconcile).
    target     text NOT NULL,
    request_id text,
    before     jsonb,
    after      jsonb
);
CREATE INDEX audit_log_actor ON audit_log (actor, id DESC);
CREATE INDEX audit_log_target ON audit_log (target, id DESC);

-- Append-only, enforced here rather than trusted to the code: an UPDATE, DELETE or
-- TRUNCATE of the log fails whoever sends it. (Dropping the table or the schema, or
-- disabling triggers, needs the table's owner; that is the database administrator's
-- power, outside floodgate.)
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();

-- Ledger rows of receive, adjust and cancel name who made them (NULL on the rows the
-- pipeline writes itself, and on rows from before this migration). An adjustment keeps
-- its reason, and its qty is signed: negative for a write-off, never zero.
ALTER TABLE stock_movements
    ADD COLUMN actor text,
    ADD COLUMN reason text,
    DROP CONSTRAINT stock_movements_qty_check,
    ADD CONSTRAINT stock_movements_qty_sign
        CHECK (CASE WHEN kind = 'adjust' THEN qty <> 0 ELSE qty >= 0 END);
