//! Every SQL statement ingress runs. None is on the order reserve path.

use anyhow::Context;
use deadpool_postgres::Pool;
use floodgate_common::{
    domain::{OrderId, OrderLine, Quantity, Reference, Sku},
    reads::Reads,
    trace::TraceParent,
};
use serde::Serialize;
use std::time::Instant;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// Formats a timestamp as RFC 3339 UTC, as API.md requires.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .expect("a timestamptz formats as RFC 3339")
}

/// A committed order.
pub struct OrderRow {
    pub user_id: String,
    pub status: String,
    pub reason: Option<String>,
    pub lines: Vec<OrderLine>,
    pub accepted_at: OffsetDateTime,
    pub confirmed_at: Option<OffsetDateTime>,
}

/// The order `id`, as of every commit made before `began` (see [`Reads`]).
pub async fn order(
    reads: &Reads,
    began: Instant,
    id: &OrderId,
) -> anyhow::Result<Option<OrderRow>> {
    let (db, _) = reads.connection(began).await?;
    let Some(o) = db
        .query_opt(
            "SELECT user_id, status, reason, accepted_at, confirmed_at FROM orders WHERE id = $1",
            &[&id.as_uuid()],
        )
        .await
        .context("reading an order")?
    else {
        return Ok(None);
    };
    let items = db
        .query(
            "SELECT sku, qty FROM order_items WHERE order_id = $1 ORDER BY sku",
            &[&id.as_uuid()],
        )
        .await
        .context("reading order items")?;
    let lines = items
        .iter()
        .map(|r| {
            Ok(OrderLine {
                sku: Sku::parse(r.get::<_, String>("sku"))?,
                qty: Quantity::try_from(i64::from(r.get::<_, i32>("qty")))?,
            })
        })
        .collect::<Result<_, floodgate_common::domain::Invalid>>()
        .context("an order item in PostgreSQL breaks the domain rules")?;
    Ok(Some(OrderRow {
        user_id: o.get("user_id"),
        status: o.get("status"),
        reason: o.get("reason"),
        lines,
        accepted_at: o.get("accepted_at"),
        confirmed_at: o.get("confirmed_at"),
    }))
}

/// A SKU as admins see it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SkuRow {
    pub sku: String,
    pub name: String,
    pub price_cents: i64,
    pub per_user_limit: i32,
    pub on_hand: i64,
    pub sold: i64,
    /// Redis shards the SKU's stock is split over (fixed at creation; see
    /// `docs/design/redis-shards.md`). Effective: at most `FLOODGATE_REDIS_SHARDS`.
    pub buckets: i16,
}

pub async fn sku(pool: &Pool, sku: &Sku) -> anyhow::Result<Option<SkuRow>> {
    let db = pool.get().await.context("PostgreSQL connection")?;
    let row = db
        .query_opt(
            "SELECT s.sku, s.name, s.price_cents, s.per_user_limit, s.buckets, i.on_hand, i.sold
               FROM skus s JOIN inventory i USING (sku) WHERE s.sku = $1",
            &[&sku.as_str()],
        )
        .await
        .context("reading a SKU")?;
    Ok(row.map(|r| SkuRow {
        sku: r.get("sku"),
        name: r.get("name"),
        price_cents: r.get("price_cents"),
        per_user_limit: r.get("per_user_limit"),
        on_hand: r.get("on_hand"),
        sold: r.get("sold"),
        buckets: r.get("buckets"),
    }))
}

/// A validated new SKU.
pub struct NewSku {
    pub sku: Sku,
    pub name: String,
    pub price_cents: i64,
    pub initial_stock: i64,
    pub per_user_limit: i32,
    pub buckets: i16,
}

/// The reference of the receipt that records a SKU's initial stock.
pub const INITIAL_REFERENCE: &str = floodgate_common::reconcile::INITIAL_REFERENCE;

/// Inserts the SKU, its inventory row and the initial receipt in one transaction.
/// Returns false if the SKU exists already (nothing written).
pub async fn create_sku(pool: &Pool, new: &NewSku) -> anyhow::Result<bool> {
    let mut db = pool.get().await.context("PostgreSQL connection")?;
    let tx = db.transaction().await?;
    let inserted = tx
        .execute(
            "INSERT INTO skus (sku, name, price_cents, per_user_limit, buckets)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (sku) DO NOTHING",
            &[
                &new.sku.as_str(),
                &new.name,
                &new.price_cents,
                &new.per_user_limit,
                &new.buckets,
            ],
        )
        .await
        .context("inserting a SKU")?;
    if inserted == 0 {
        return Ok(false);
    }
    tx.execute(
        "INSERT INTO inventory (sku, on_hand) VALUES ($1, $2)",
        &[&new.sku.as_str(), &new.initial_stock],
    )
    .await
    .context("inserting inventory")?;
    tx.execute(
        "INSERT INTO stock_movements (sku, kind, qty, reference) VALUES ($1, 'receive', $2, $3)",
        &[&new.sku.as_str(), &new.initial_stock, &INITIAL_REFERENCE],
    )
    .await
    .context("recording the initial receipt")?;
    tx.commit().await.context("committing a new SKU")?;
    Ok(true)
}

/// Records goods received, once per (sku, reference). Returns the on-hand units after,
/// or None for an unknown SKU.
pub async fn receive(
    pool: &Pool,
    sku: &Sku,
    qty: i64,
    reference: &Reference,
) -> anyhow::Result<Option<i64>> {
    let mut db = pool.get().await.context("PostgreSQL connection")?;
    let tx = db.transaction().await?;
    // Locks the row, so concurrent receipts of one SKU serialize here.
    let Some(row) = tx
        .query_opt(
            "SELECT on_hand FROM inventory WHERE sku = $1 FOR UPDATE",
            &[&sku.as_str()],
        )
        .await?
    else {
        return Ok(None);
    };
    let inserted = tx
        .execute(
            "INSERT INTO stock_movements (sku, kind, qty, reference) VALUES ($1, 'receive', $2, $3)
             ON CONFLICT ON CONSTRAINT stock_movements_once DO NOTHING",
            &[&sku.as_str(), &qty, &reference.as_str()],
        )
        .await
        .context("recording a receipt")?;
    let on_hand = if inserted == 1 {
        tx.query_one(
            "UPDATE inventory SET on_hand = on_hand + $2, updated_at = now()
              WHERE sku = $1 RETURNING on_hand",
            &[&sku.as_str(), &qty],
        )
        .await
        .context("adding received units")?
        .get(0)
    } else {
        row.get(0)
    };
    tx.commit().await.context("committing a receipt")?;
    Ok(Some(on_hand))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Movement {
    pub id: String,
    #[schema(
        pattern = "^(receive|sale|release|cancel|adjust)$",
        example = "receive"
    )]
    pub kind: String,
    pub qty: i64,
    pub reference: String,
    #[schema(format = DateTime)]
    pub at: String,
}

/// One page of a SKU's ledger, newest first, strictly older than `before` (an id).
pub async fn movements(
    pool: &Pool,
    sku: &Sku,
    limit: i64,
    before: Option<i64>,
) -> anyhow::Result<Vec<Movement>> {
    let db = pool.get().await.context("PostgreSQL connection")?;
    let rows = db
        .query(
            "SELECT id, kind, qty, reference, at FROM stock_movements
              WHERE sku = $1 AND ($2::bigint IS NULL OR id < $2)
              ORDER BY id DESC LIMIT $3",
            &[&sku.as_str(), &before, &limit],
        )
        .await
        .context("reading the ledger")?;
    Ok(rows
        .iter()
        .map(|r| Movement {
            id: r.get::<_, i64>("id").to_string(),
            kind: r.get("kind"),
            qty: r.get("qty"),
            reference: r.get("reference"),
            at: rfc3339(r.get("at")),
        })
        .collect())
}

/// The units recorded by the receipt (sku, reference), if there is one.
pub async fn receipt_qty(
    pool: &Pool,
    sku: &Sku,
    reference: &Reference,
) -> anyhow::Result<Option<i64>> {
    let db = pool.get().await.context("PostgreSQL connection")?;
    Ok(db
        .query_opt(
            "SELECT qty FROM stock_movements WHERE kind = 'receive' AND sku = $1 AND reference = $2",
            &[&sku.as_str(), &reference.as_str()],
        )
        .await
        .context("reading a receipt")?
        .map(|r| r.get(0)))
}

/// What cancelling a committed order found.
pub enum Cancel {
    /// Not in PostgreSQL (not committed yet, or no such order).
    Absent,
    /// Its owner, for the visibility check, and why it cannot be cancelled.
    Failed { user_id: String },
    /// Cancelled now or before: its owner and lines (to return to Redis, once).
    Cancelled {
        user_id: String,
        lines: Vec<(String, i64)>,
        /// Each line's SKU's bucket count (`skus.buckets`), in the order of `lines`.
        buckets: Vec<usize>,
    },
}

/// Cancels a confirmed order in one transaction: status `cancelled`, its units back in
/// inventory (one aggregated update), a `cancel` ledger row per line. Idempotent: an order
/// already cancelled changes nothing. Its `order.cancelled` event goes to the outbox in
/// the same transaction, with `trace` (the cancel request's) as its `traceparent`. `may`
/// decides visibility before anything is written.
pub async fn cancel(
    pool: &Pool,
    id: &OrderId,
    may: impl Fn(&str) -> bool,
    trace: Option<&TraceParent>,
) -> anyhow::Result<Cancel> {
    let mut db = pool.get().await.context("PostgreSQL connection")?;
    let tx = db.transaction().await?;
    let Some(o) = tx
        .query_opt(
            "SELECT user_id, status FROM orders WHERE id = $1 FOR UPDATE",
            &[&id.as_uuid()],
        )
        .await
        .context("reading an order")?
    else {
        return Ok(Cancel::Absent);
    };
    let user_id: String = o.get("user_id");
    let status: String = o.get("status");
    if !may(&user_id) {
        return Ok(Cancel::Absent);
    }
    if status == "failed" {
        return Ok(Cancel::Failed { user_id });
    }
    let rows = tx
        .query(
            "SELECT it.sku, it.qty, s.buckets
               FROM order_items it JOIN skus s USING (sku)
              WHERE it.order_id = $1 ORDER BY it.sku",
            &[&id.as_uuid()],
        )
        .await?;
    let lines: Vec<(String, i64)> = rows
        .iter()
        .map(|r| (r.get("sku"), i64::from(r.get::<_, i32>("qty"))))
        .collect();
    let buckets: Vec<usize> = rows
        .iter()
        .map(|r| r.get::<_, i16>("buckets").max(1) as usize)
        .collect();
    if status == "confirmed" {
        let skus: Vec<&str> = lines.iter().map(|(s, _)| s.as_str()).collect();
        let qtys: Vec<i64> = lines.iter().map(|(_, q)| *q).collect();
        let reference = id.to_string();
        tx.execute(
            "UPDATE orders SET status = 'cancelled', updated_at = now() WHERE id = $1",
            &[&id.as_uuid()],
        )
        .await?;
        // Rows locked in SKU order (the lines are sorted), like the worker's batches.
        tx.execute(
            "UPDATE inventory i SET sold = i.sold - d.qty, updated_at = now()
               FROM unnest($1::text[], $2::bigint[]) AS d(sku, qty) WHERE i.sku = d.sku",
            &[&skus, &qtys],
        )
        .await
        .context("returning cancelled units")?;
        tx.execute(
            "INSERT INTO stock_movements (sku, kind, qty, reference)
             SELECT d.sku, 'cancel', d.qty, $3 FROM unnest($1::text[], $2::bigint[]) AS d(sku, qty)
             ON CONFLICT ON CONSTRAINT stock_movements_once DO NOTHING",
            &[&skus, &qtys, &reference],
        )
        .await
        .context("recording the cancellation")?;
        let trace = trace.map(|t| t.to_string());
        tx.execute(
            "INSERT INTO outbox (routing_key, payload, traceparent)
             SELECT 'order.cancelled', jsonb_build_object(
                      'type', 'order', 'order_id', id, 'user_id', user_id,
                      'status', 'cancelled', 'reason', NULL, 'at', clock_timestamp()), $2
               FROM orders WHERE id = $1",
            &[&id.as_uuid(), &trace],
        )
        .await
        .context("queueing the cancellation event")?;
    }
    tx.commit().await.context("committing a cancellation")?;
    Ok(Cancel::Cancelled {
        user_id,
        lines,
        buckets,
    })
}
