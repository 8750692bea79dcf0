-- A SKU's sale window (API.md "v1 additions", Catalog): orders are refused before
-- sale_starts_at (409 sale_not_started) and from sale_ends_at on (409 sale_ended),
-- decided in reserve.lua by Redis's clock. NULL: open on that side.
ALTER TABLE skus
    ADD COLUMN sale_starts_at timestamptz,
    ADD COLUMN sale_ends_at timestamptz,
    ADD CONSTRAINT skus_sale_window
        CHECK (sale_starts_at IS NULL OR sale_ends_at IS NULL OR sale_ends_at > sale_starts_at);
