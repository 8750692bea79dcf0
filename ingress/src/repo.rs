//! Every SQL statement ingress runs. None is on the order reserve path.

use anyhow::Context;
use deadpool_postgres::Pool;
use floodgate_common::{
    audit::{self, Actor, Entry},
    domain::{OrderId, OrderLine, Quantity, Reference, Sku},
    reads::Reads,
    trace::TraceParent,
};
use serde::Serialize;
use serde_json::json;
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
    pub payment: Option<String>,
    pub total_cents: Option<i64>,
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
            "SELECT user_id, status, reason, accepted_at, confirmed_at, payment, total_cents
               FROM orders WHERE id = $1",
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
        payment: o.get("payment"),
        total_cents: o.get("total_cents"),
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
    /// Orders are refused before this instant (null: on sale since its creation).
    #[schema(format = DateTime)]
    pub sale_starts_at: Option<String>,
    /// Orders are refused from this instant on (null: no end).
    #[schema(format = DateTime)]
    pub sale_ends_at: Option<String>,
    #[serde(skip)]
    pub window: Window,
    /// The product this SKU is a variant of, and its value of each of the product's
    /// options (absent for a SKU of no product).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub options: Option<serde_json::Value>,
    /// A bundle's components, `[{"sku","qty"}]` in SKU order (absent for a SKU that is
    /// not a bundle). A bundle has no stock of its own: `on_hand` and `sold` stay 0 and
    /// `available` is its components' `min(floor(available / qty))`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub components: Option<serde_json::Value>,
}

/// A sale window (either side open).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    pub starts: Option<OffsetDateTime>,
    pub ends: Option<OffsetDateTime>,
}

impl Window {
    /// Whether it is a window at all: an end after the start.
    pub fn is_valid(&self) -> bool {
        match (self.starts, self.ends) {
            (Some(s), Some(e)) => e > s,
            _ => true,
        }
    }

    /// The field `reserve.lua` reads (`windows`), None when open on both sides.
    pub fn field(&self) -> Option<String> {
        let ms =
            |t: Option<OffsetDateTime>| t.map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64);
        floodgate_common::redis::window_field(ms(self.starts), ms(self.ends))
    }
}

const SKU_COLUMNS: &str = "s.sku, s.name, s.price_cents, s.per_user_limit, s.buckets, \
                           i.on_hand, i.sold, s.created_at, s.sale_starts_at, s.sale_ends_at, \
                           s.product_id, s.options, \
                           (SELECT jsonb_agg(jsonb_build_object('sku', bc.sku, 'qty', bc.qty) \
                                             ORDER BY bc.sku) \
                              FROM bundle_components bc WHERE bc.bundle = s.sku) AS components";

impl SkuRow {
    fn from_row(r: &tokio_postgres::Row) -> Self {
        let window = Window {
            starts: r.get("sale_starts_at"),
            ends: r.get("sale_ends_at"),
        };
        SkuRow {
            product_id: r.get("product_id"),
            options: r.get("options"),
            sale_starts_at: window.starts.map(rfc3339),
            sale_ends_at: window.ends.map(rfc3339),
            window,
            sku: r.get("sku"),
            name: r.get("name"),
            price_cents: r.get("price_cents"),
            per_user_limit: r.get("per_user_limit"),
            on_hand: r.get("on_hand"),
            sold: r.get("sold"),
            buckets: r.get("buckets"),
            components: r.get("components"),
        }
    }

    pub fn is_bundle(&self) -> bool {
        self.components.is_some()
    }

    /// What the audit log records of a SKU's settings.
    pub fn settings(&self) -> serde_json::Value {
        json!({
            "name": self.name,
            "price_cents": self.price_cents,
            "per_user_limit": self.per_user_limit,
            "sale_starts_at": self.sale_starts_at,
            "sale_ends_at": self.sale_ends_at,
        })
    }
}

pub async fn sku(pool: &Pool, sku: &Sku) -> anyhow::Result<Option<SkuRow>> {
    let db = pool.get().await.context("PostgreSQL connection")?;
    let row = db
        .query_opt(
            &format!(
                "SELECT {SKU_COLUMNS} FROM skus s JOIN inventory i USING (sku) WHERE s.sku = $1"
            ),
            &[&sku.as_str()],
        )
        .await
        .context("reading a SKU")?;
    Ok(row.as_ref().map(SkuRow::from_row))
}

/// The SKU row, share-locked in `tx` (a PATCH waits until `tx` ends).
pub async fn sku_shared(
    tx: &deadpool_postgres::Transaction<'_>,
    sku: &Sku,
) -> anyhow::Result<Option<SkuRow>> {
    let row = tx
        .query_opt(
            &format!(
                "SELECT {SKU_COLUMNS} FROM skus s JOIN inventory i USING (sku)
                  WHERE s.sku = $1 FOR SHARE OF s"
            ),
            &[&sku.as_str()],
        )
        .await
        .context("reading a SKU")?;
    Ok(row.as_ref().map(SkuRow::from_row))
}

/// The last microsecond of the year 9999: a cursor past it is none this API returned
/// (and would overflow PostgreSQL's interval arithmetic).
pub const MAX_CURSOR_MICROS: i64 = 253_402_300_799_999_999;

/// Where a page of the SKU list (or the product list: the same form, a product's id in
/// `sku`) starts: after the row created at `micros` (since the Unix epoch) with that id,
/// newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkuCursor {
    pub micros: i64,
    pub sku: String,
}

impl SkuCursor {
    /// `<micros>.<sku>`: opaque to clients, checked strictly when it comes back.
    pub fn encode(&self) -> String {
        format!("{}.{}", self.micros, self.sku)
    }

    pub fn parse(s: &str) -> Option<Self> {
        let (micros, sku) = s.split_once('.')?;
        let micros = micros
            .parse::<i64>()
            .ok()
            .filter(|m| (0..=MAX_CURSOR_MICROS).contains(m))?;
        let sku = Sku::parse(sku).ok()?;
        Some(Self {
            micros,
            sku: sku.to_string(),
        })
    }
}

/// One page of the SKUs, newest first, after `after`; with each the cursor that
/// follows it.
pub async fn skus(
    pool: &Pool,
    limit: i64,
    after: Option<&SkuCursor>,
    product_id: Option<&str>,
) -> anyhow::Result<Vec<(SkuRow, SkuCursor)>> {
    let db = pool.get().await.context("PostgreSQL connection")?;
    let (micros, sku) = match after {
        Some(c) => (Some(c.micros), Some(c.sku.as_str())),
        None => (None, None),
    };
    let rows = db
        .query(
            &format!(
                "SELECT {SKU_COLUMNS},
                        (extract(epoch FROM s.created_at) * 1000000)::bigint AS micros
                   FROM skus s JOIN inventory i USING (sku)
                  WHERE ($4::text IS NULL OR s.product_id = $4)
                    AND ($1::bigint IS NULL
                         OR (s.created_at, s.sku) < (timestamptz 'epoch' + $1 * interval '1 microsecond', $2::text))
                  ORDER BY s.created_at DESC, s.sku DESC LIMIT $3"
            ),
            &[&micros, &sku, &limit, &product_id],
        )
        .await
        .context("listing SKUs")?;
    Ok(rows
        .iter()
        .map(|r| {
            let cursor = SkuCursor {
                micros: r.get("micros"),
                sku: r.get("sku"),
            };
            (SkuRow::from_row(r), cursor)
        })
        .collect())
}

/// A validated new SKU.
pub struct NewSku {
    pub sku: Sku,
    pub name: String,
    pub price_cents: i64,
    pub initial_stock: i64,
    pub per_user_limit: i32,
    pub buckets: i16,
    pub window: Window,
    /// (product id, options) for a SKU of a product.
    pub variant: Option<(String, serde_json::Value)>,
}

/// What inserting a SKU found.
pub enum Created {
    New,
    /// A SKU with this id exists (nothing written).
    Exists,
    /// Another SKU of the product has these options (nothing written).
    VariantOf(String),
    /// The product has the most SKUs one may have (nothing written).
    ProductFull,
}

/// The reference of the receipt that records a SKU's initial stock.
pub const INITIAL_REFERENCE: &str = floodgate_common::reconcile::INITIAL_REFERENCE;

/// Inserts the SKU, its inventory row and the initial receipt in one transaction.
/// Returns false if the SKU exists already (nothing written).
pub async fn create_sku(pool: &Pool, new: &NewSku, actor: &Actor) -> anyhow::Result<Created> {
    let mut db = pool.get().await.context("PostgreSQL connection")?;
    let tx = db.transaction().await?;
    // A load's snapshot is taken either after this commit (it loads the SKU whole) or
    // before this transaction waits here (the SKU goes to Redis after that load).
    tx.execute(floodgate_common::stock::LOAD_LOCK_SHARED, &[])
        .await
        .context("waiting for a load of stock to finish")?;
    let (product_id, options) = match &new.variant {
        Some((p, o)) => (Some(p.as_str()), Some(o)),
        None => (None, None),
    };
    if let Some(p) = product_id {
        // The product's row locked: its SKUs are counted one creation at a time.
        tx.execute("SELECT 1 FROM products WHERE id = $1 FOR UPDATE", &[&p])
            .await
            .context("locking a product")?;
        let row = tx
            .query_one(
                "SELECT count(*) AS skus, bool_or(sku = $2) AS this_one FROM skus WHERE product_id = $1",
                &[&p, &new.sku.as_str()],
            )
            .await
            .context("counting a product's SKUs")?;
        let exists: Option<bool> = row.get("this_one");
        if row.get::<_, i64>("skus") >= crate::products::MAX_SKUS_PER_PRODUCT
            && exists != Some(true)
        {
            return Ok(Created::ProductFull);
        }
    }
    let inserted = tx
        .execute(
            "INSERT INTO skus (sku, name, price_cents, per_user_limit, buckets,
                               sale_starts_at, sale_ends_at, product_id, options)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (sku) DO NOTHING",
            &[
                &new.sku.as_str(),
                &new.name,
                &new.price_cents,
                &new.per_user_limit,
                &new.buckets,
                &new.window.starts,
                &new.window.ends,
                &product_id,
                &options,
            ],
        )
        .await;
    let inserted = match inserted {
        Ok(n) => n,
        Err(e)
            if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
                && e.as_db_error().and_then(|d| d.constraint()) == Some("skus_product_variant") =>
        {
            drop(tx);
            let other: String = db
                .query_one(
                    "SELECT sku FROM skus WHERE product_id = $1 AND options = $2",
                    &[&product_id, &options],
                )
                .await
                .context("reading the SKU with these options")?
                .get(0);
            return Ok(Created::VariantOf(other));
        }
        Err(e) => return Err(anyhow::Error::new(e).context("inserting a SKU")),
    };
    if inserted == 0 {
        return Ok(Created::Exists);
    }
    tx.execute(
        "INSERT INTO inventory (sku, on_hand) VALUES ($1, $2)",
        &[&new.sku.as_str(), &new.initial_stock],
    )
    .await
    .context("inserting inventory")?;
    tx.execute(
        "INSERT INTO stock_movements (sku, kind, qty, reference, actor)
         VALUES ($1, 'receive', $2, $3, $4)",
        &[
            &new.sku.as_str(),
            &new.initial_stock,
            &INITIAL_REFERENCE,
            &actor.name,
        ],
    )
    .await
    .context("recording the initial receipt")?;
    audit::append(
        &tx,
        actor,
        Entry {
            action: "sku.create",
            target: format!("sku:{}", new.sku),
            before: None,
            after: Some(json!({
                "name": new.name,
                "price_cents": new.price_cents,
                "per_user_limit": new.per_user_limit,
                "initial_stock": new.initial_stock,
                "buckets": new.buckets,
                "sale_starts_at": new.window.starts.map(rfc3339),
                "sale_ends_at": new.window.ends.map(rfc3339),
                "product_id": product_id,
                "options": options,
            })),
        },
    )
    .await?;
    tx.commit().await.context("committing a new SKU")?;
    Ok(Created::New)
}

/// A validated new bundle.
pub struct NewBundle {
    pub sku: Sku,
    pub name: String,
    pub price_cents: i64,
    pub per_user_limit: i32,
    pub window: Window,
    pub def: floodgate_common::bundle::BundleDef,
}

/// What inserting a bundle found.
pub enum BundleCreated {
    New,
    /// A SKU (a bundle or not) with this id exists (nothing written).
    Exists,
    /// A component that is not a SKU (nothing written).
    UnknownComponent(String),
    /// A component that is a bundle itself (nothing written).
    NestedBundle(String),
}

/// Inserts a bundle: its `skus` row (`is_bundle`, one bucket), its `inventory` row
/// (0/0, for good), its components, and its audit record, in one transaction, with the
/// components' rows share-locked so none is created or changed into something else
/// meanwhile.
pub async fn create_bundle(
    pool: &Pool,
    new: &NewBundle,
    actor: &Actor,
) -> anyhow::Result<BundleCreated> {
    let mut db = pool.get().await.context("PostgreSQL connection")?;
    let tx = db.transaction().await?;
    tx.execute(floodgate_common::stock::LOAD_LOCK_SHARED, &[])
        .await
        .context("waiting for a load of stock to finish")?;
    let components: Vec<&str> = new
        .def
        .components()
        .iter()
        .map(|(s, _)| s.as_str())
        .collect();
    let qtys: Vec<i32> = new
        .def
        .components()
        .iter()
        .map(|(_, q)| *q as i32)
        .collect();
    let found = tx
        .query(
            "SELECT sku, is_bundle FROM skus WHERE sku = ANY($1) ORDER BY sku FOR SHARE",
            &[&components],
        )
        .await
        .context("reading the components")?;
    for c in &components {
        match found.iter().find(|r| r.get::<_, &str>("sku") == *c) {
            None => return Ok(BundleCreated::UnknownComponent((*c).to_owned())),
            Some(r) if r.get::<_, bool>("is_bundle") => {
                return Ok(BundleCreated::NestedBundle((*c).to_owned()));
            }
            Some(_) => {}
        }
    }
    let inserted = tx
        .execute(
            "INSERT INTO skus (sku, name, price_cents, per_user_limit, buckets,
                               sale_starts_at, sale_ends_at, is_bundle)
             VALUES ($1, $2, $3, $4, 1, $5, $6, true)
             ON CONFLICT (sku) DO NOTHING",
            &[
                &new.sku.as_str(),
                &new.name,
                &new.price_cents,
                &new.per_user_limit,
                &new.window.starts,
                &new.window.ends,
            ],
        )
        .await
        .context("inserting a bundle")?;
    if inserted == 0 {
        return Ok(BundleCreated::Exists);
    }
    tx.execute(
        "INSERT INTO inventory (sku, on_hand) VALUES ($1, 0)",
        &[&new.sku.as_str()],
    )
    .await
    .context("inserting a bundle's inventory row")?;
    tx.execute(
        "INSERT INTO bundle_components (bundle, sku, qty)
         SELECT $1, c.sku, c.qty FROM unnest($2::text[], $3::int[]) AS c(sku, qty)",
        &[&new.sku.as_str(), &components, &qtys],
    )
    .await
    .context("inserting a bundle's components")?;
    audit::append(
        &tx,
        actor,
        Entry {
            action: "bundle.create",
            target: format!("sku:{}", new.sku),
            before: None,
            after: Some(json!({
                "name": new.name,
                "price_cents": new.price_cents,
                "per_user_limit": new.per_user_limit,
                "sale_starts_at": new.window.starts.map(rfc3339),
                "sale_ends_at": new.window.ends.map(rfc3339),
                "components": new.def.components().iter()
                    .map(|(s, q)| json!({"sku": s, "qty": q}))
                    .collect::<Vec<_>>(),
            })),
        },
    )
    .await?;
    tx.commit().await.context("committing a new bundle")?;
    Ok(BundleCreated::New)
}

/// Records goods received, once per (sku, reference). Returns the on-hand units after,
/// or None for an unknown SKU.
pub async fn receive(
    pool: &Pool,
    sku: &Sku,
    qty: i64,
    reference: &Reference,
    actor: &Actor,
) -> anyhow::Result<Option<i64>> {
    let mut db = pool.get().await.context("PostgreSQL connection")?;
    let tx = db.transaction().await?;
    // Locks the row, so concurrent receipts of one SKU serialize here. A bundle is
    // refused here, in the transaction: a bundle created since the caller looked is seen.
    let Some(row) = tx
        .query_opt(
            "SELECT i.on_hand, s.is_bundle FROM inventory i JOIN skus s USING (sku)
              WHERE sku = $1 FOR UPDATE OF i",
            &[&sku.as_str()],
        )
        .await?
    else {
        return Ok(None);
    };
    if row.get::<_, bool>("is_bundle") {
        return Err(IsBundle.into());
    }
    let inserted = tx
        .execute(
            "INSERT INTO stock_movements (sku, kind, qty, reference, actor)
             VALUES ($1, 'receive', $2, $3, $4)
             ON CONFLICT ON CONSTRAINT stock_movements_once DO NOTHING",
            &[&sku.as_str(), &qty, &reference.as_str(), &actor.name],
        )
        .await
        .context("recording a receipt")?;
    let before: i64 = row.get(0);
    let on_hand = if inserted == 1 {
        let after: i64 = tx
            .query_one(
                "UPDATE inventory SET on_hand = on_hand + $2, updated_at = now()
                  WHERE sku = $1 RETURNING on_hand",
                &[&sku.as_str(), &qty],
            )
            .await
            .context("adding received units")?
            .get(0);
        audit::append(
            &tx,
            actor,
            Entry {
                action: "stock.receive",
                target: format!("sku:{sku}"),
                before: Some(json!({ "on_hand": before })),
                after: Some(json!({
                    "on_hand": after,
                    "qty": qty,
                    "reference": reference.as_str(),
                })),
            },
        )
        .await?;
        after
    } else {
        before
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
    /// Units; signed for an `adjust` (negative: written off).
    pub qty: i64,
    pub reference: String,
    #[schema(format = DateTime)]
    pub at: String,
    /// Who made a `receive`, `adjust` or `cancel` (absent on rows the pipeline writes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Why, for an `adjust`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
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
            "SELECT id, kind, qty, reference, at, actor, reason FROM stock_movements
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
            actor: r.get("actor"),
            reason: r.get("reason"),
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
    /// Cancelled now or before: its owner and its units per SKU (bundles expanded into
    /// their components), to return to Redis once.
    Cancelled {
        user_id: String,
        lines: Vec<(String, i64)>,
        /// Each line's SKU's bucket count (`skus.buckets`), in the order of `lines`.
        buckets: Vec<usize>,
        /// The order's bundle lines, whose holdings (the bundles' per-user limits) go
        /// back too.
        bundle_lines: Vec<(String, i64)>,
        /// Paid with points: its `refund` entry (id, points), which go back to what the
        /// user may spend in Redis once.
        refund: Option<(i64, i64)>,
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
    actor: &Actor,
) -> anyhow::Result<Cancel> {
    let mut db = pool.get().await.context("PostgreSQL connection")?;
    let tx = db.transaction().await?;
    let Some(o) = tx
        .query_opt(
            "SELECT user_id, status, total_cents FROM orders WHERE id = $1 FOR UPDATE",
            &[&id.as_uuid()],
        )
        .await
        .context("reading an order")?
    else {
        return Ok(Cancel::Absent);
    };
    let user_id: String = o.get("user_id");
    let status: String = o.get("status");
    let paid: Option<i64> = o.get("total_cents");
    if !may(&user_id) {
        return Ok(Cancel::Absent);
    }
    if status == "failed" {
        return Ok(Cancel::Failed { user_id });
    }
    // Its stock units: a bundle's line as its components, summed with the order's own
    // lines of the same SKUs. An order cancelled before (a repeat heals a crash between
    // the commit and Redis) returns only what its cancel returned, per its ledger: a
    // waitlisted order cancelled before its promotion never held a unit.
    let rows = tx
        .query(
            "SELECT u.sku, sum(u.qty)::bigint AS qty, s.buckets
               FROM order_units u JOIN skus s USING (sku)
              WHERE u.order_id = $1
                AND ($2 = 'confirmed' OR EXISTS (
                     SELECT 1 FROM stock_movements m
                      WHERE m.kind = 'cancel' AND m.reference = $1::text AND m.sku = u.sku))
              GROUP BY u.sku, s.buckets ORDER BY u.sku",
            &[&id.as_uuid(), &status],
        )
        .await?;
    let bundle_lines: Vec<(String, i64)> = tx
        .query(
            "SELECT it.sku, it.qty FROM order_items it JOIN skus s USING (sku)
              WHERE it.order_id = $1 AND s.is_bundle ORDER BY it.sku",
            &[&id.as_uuid()],
        )
        .await?
        .iter()
        .map(|r| (r.get("sku"), i64::from(r.get::<_, i32>("qty"))))
        .collect();
    let lines: Vec<(String, i64)> = rows
        .iter()
        .map(|r| (r.get("sku"), r.get::<_, i64>("qty")))
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
        // Paid with points: they come back, in the same transaction (a `refund` entry,
        // once per order; nothing for a total of 0, which spent nothing). Before the
        // inventory rows: the worker's batches lock the accounts first too (no deadlock
        // with a batch spending this user's points on these SKUs).
        if let Some(points) = paid.filter(|&p| p > 0) {
            refund(&tx, &user_id, points, id).await?;
        }
        // Rows locked in SKU order first, like the worker's batches (an UPDATE ... FROM
        // locks in its join's order, which a bundle's many rows make matter).
        tx.query(
            "SELECT sku FROM inventory WHERE sku = ANY($1) ORDER BY sku FOR UPDATE",
            &[&skus],
        )
        .await
        .context("locking the cancelled units' rows")?;
        tx.execute(
            "UPDATE inventory i SET sold = i.sold - d.qty, updated_at = now()
               FROM unnest($1::text[], $2::bigint[]) AS d(sku, qty) WHERE i.sku = d.sku",
            &[&skus, &qtys],
        )
        .await
        .context("returning cancelled units")?;
        tx.execute(
            "INSERT INTO stock_movements (sku, kind, qty, reference, actor)
             SELECT d.sku, 'cancel', d.qty, $3, $4
               FROM unnest($1::text[], $2::bigint[]) AS d(sku, qty)
             ON CONFLICT ON CONSTRAINT stock_movements_once DO NOTHING",
            &[&skus, &qtys, &reference, &actor.name],
        )
        .await
        .context("recording the cancellation")?;
        // A customer's own cancel is not an audited write; anyone else's is.
        if actor.role != "customer" {
            audit::append(
                &tx,
                actor,
                Entry {
                    action: "order.cancel",
                    target: format!("order:{id}"),
                    before: Some(json!({ "status": "confirmed", "user_id": user_id })),
                    after: Some(json!({ "status": "cancelled" })),
                },
            )
            .await?;
        }
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
    let refund = match paid.filter(|&p| p > 0) {
        Some(_) => tx
            .query_opt(
                "SELECT id, amount FROM point_entries
                  WHERE user_id = $1 AND kind = 'refund' AND order_id = $2",
                &[&user_id, &id.as_uuid()],
            )
            .await
            .context("reading the order's refund")?
            .map(|r| (r.get(0), r.get(1))),
        None => None,
    };
    tx.commit().await.context("committing a cancellation")?;
    Ok(Cancel::Cancelled {
        user_id,
        lines,
        buckets,
        bundle_lines,
        refund,
    })
}

/// A cancelled order's points back: its `refund` entry (once per order) and the balance,
/// in the caller's transaction. (The workers' settle pass refunds a cancelled order that
/// has none the same way: `reconcile::refund_cancelled`.)
pub async fn refund(
    tx: &deadpool_postgres::Transaction<'_>,
    user_id: &str,
    points: i64,
    id: &OrderId,
) -> anyhow::Result<()> {
    tx.execute(
        "WITH e AS (
            INSERT INTO point_entries (user_id, kind, amount, order_id, reference)
            VALUES ($1, 'refund', $2, $3::uuid, $3::uuid::text)
            ON CONFLICT DO NOTHING
            RETURNING amount
         )
         UPDATE point_accounts a SET balance = a.balance + e.amount, updated_at = now()
           FROM e WHERE a.user_id = $1",
        &[&user_id, &points, &id.as_uuid()],
    )
    .await
    .context("refunding the order's points")?;
    Ok(())
}

/// Serializes the adjustments of one SKU (a transaction-scoped advisory lock), so that
/// two requests with one reference cannot both find it unrecorded. Returns the SKU's
/// on-hand units and bucket count, or None for an unknown SKU. (Everything the caller
/// reads while it holds the lock goes through `tx`: a second pool connection could wait
/// for one that a request queued behind this lock holds.) Receipts and the worker's commits are not
/// blocked: they lock the inventory row, which this leaves alone until the update.
pub async fn lock_adjustments(
    tx: &deadpool_postgres::Transaction<'_>,
    sku: &Sku,
) -> anyhow::Result<Option<(i64, i16)>> {
    tx.execute(floodgate_common::stock::LOAD_LOCK_SHARED, &[])
        .await
        .context("waiting for a load of stock to finish")?;
    tx.execute(floodgate_common::stock::ADJUST_LOCK, &[&sku.as_str()])
        .await
        .context("locking a SKU's adjustments")?;
    tx.query_opt(
        "SELECT i.on_hand, s.buckets, s.is_bundle FROM inventory i JOIN skus s USING (sku)
          WHERE sku = $1",
        &[&sku.as_str()],
    )
    .await
    .context("reading inventory")?
    .map(|r| {
        if r.get::<_, bool>(2) {
            Err(anyhow::Error::new(IsBundle))
        } else {
            Ok((r.get(0), r.get(1)))
        }
    })
    .transpose()
}

/// A receipt or an adjustment of a bundle, refused inside its transaction (a bundle has
/// no stock of its own).
#[derive(Debug, thiserror::Error)]
#[error("the SKU is a bundle")]
pub struct IsBundle;

/// The units recorded by the adjustment (sku, reference), if there is one (signed).
pub async fn adjustment(
    tx: &deadpool_postgres::Transaction<'_>,
    sku: &Sku,
    reference: &Reference,
) -> anyhow::Result<Option<i64>> {
    Ok(tx
        .query_opt(
            "SELECT qty FROM stock_movements WHERE kind = 'adjust' AND sku = $1 AND reference = $2",
            &[&sku.as_str(), &reference.as_str()],
        )
        .await
        .context("reading an adjustment")?
        .map(|r| r.get(0)))
}

/// Why recording an adjustment failed.
pub enum AdjustError {
    /// The update would leave fewer units on hand than are sold (the CHECK refused it).
    BelowSold,
    Other(anyhow::Error),
}

impl From<anyhow::Error> for AdjustError {
    fn from(e: anyhow::Error) -> Self {
        Self::Other(e)
    }
}

/// Records an adjustment of `delta` units (its ledger row, the inventory, the audit
/// record) in `tx`, not committed. Returns the on-hand units after.
pub async fn record_adjustment(
    tx: &deadpool_postgres::Transaction<'_>,
    sku: &Sku,
    delta: i64,
    reason: &str,
    reference: &Reference,
    actor: &Actor,
) -> Result<i64, AdjustError> {
    tx.execute(
        "INSERT INTO stock_movements (sku, kind, qty, reference, actor, reason)
         VALUES ($1, 'adjust', $2, $3, $4, $5)",
        &[
            &sku.as_str(),
            &delta,
            &reference.as_str(),
            &actor.name,
            &reason,
        ],
    )
    .await
    .context("recording an adjustment")?;
    let after: i64 = match tx
        .query_one(
            "UPDATE inventory SET on_hand = on_hand + $2, updated_at = now()
              WHERE sku = $1 RETURNING on_hand",
            &[&sku.as_str(), &delta],
        )
        .await
    {
        Ok(r) => r.get(0),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION) => {
            return Err(AdjustError::BelowSold);
        }
        Err(e) => return Err(anyhow::Error::new(e).context("adjusting inventory").into()),
    };
    audit::append(
        tx,
        actor,
        Entry {
            action: "stock.adjust",
            target: format!("sku:{sku}"),
            // From the row the update locked, not an earlier read a receipt may have passed.
            before: Some(json!({ "on_hand": after - delta })),
            after: Some(json!({
                "on_hand": after,
                "delta": delta,
                "reason": reason,
                "reference": reference.as_str(),
            })),
        },
    )
    .await?;
    Ok(after)
}

/// A validated change of a SKU's settings (None: leave as is).
#[derive(Debug, Default)]
pub struct SkuPatch {
    pub name: Option<String>,
    pub price_cents: Option<i64>,
    /// 0: no limit.
    pub per_user_limit: Option<i32>,
    /// Some(None) clears a side.
    pub sale_starts_at: Option<Option<OffsetDateTime>>,
    pub sale_ends_at: Option<Option<OffsetDateTime>>,
}

/// What [`update_sku`] did.
pub enum Patched {
    UnknownSku,
    /// The window the change would leave ends before it starts: nothing written.
    BadWindow,
    /// The rows before and after (equal when nothing changed).
    Done(Box<(SkuRow, SkuRow)>),
}

/// Locks the SKU's row and changes it in `tx` (not committed), with its audit record
/// when anything changed.
pub async fn update_sku(
    tx: &deadpool_postgres::Transaction<'_>,
    sku: &Sku,
    patch: &SkuPatch,
    actor: &Actor,
) -> anyhow::Result<Patched> {
    let Some(before) = tx
        .query_opt(
            &format!(
                "SELECT {SKU_COLUMNS} FROM skus s JOIN inventory i USING (sku)
                  WHERE s.sku = $1 FOR UPDATE OF s"
            ),
            &[&sku.as_str()],
        )
        .await
        .context("reading a SKU")?
    else {
        return Ok(Patched::UnknownSku);
    };
    let before = SkuRow::from_row(&before);
    let window = Window {
        starts: patch.sale_starts_at.unwrap_or(before.window.starts),
        ends: patch.sale_ends_at.unwrap_or(before.window.ends),
    };
    if !window.is_valid() {
        return Ok(Patched::BadWindow);
    }
    let after = tx
        .query_one(
            &format!(
                "WITH s AS (
                   UPDATE skus SET name = coalesce($2, name),
                                   price_cents = coalesce($3, price_cents),
                                   per_user_limit = coalesce($4, per_user_limit),
                                   sale_starts_at = $5, sale_ends_at = $6
                    WHERE sku = $1 RETURNING *)
                 SELECT {SKU_COLUMNS} FROM s JOIN inventory i USING (sku)"
            ),
            &[
                &sku.as_str(),
                &patch.name,
                &patch.price_cents,
                &patch.per_user_limit,
                &window.starts,
                &window.ends,
            ],
        )
        .await
        .context("updating a SKU")?;
    let after = SkuRow::from_row(&after);
    if before.settings() != after.settings() {
        audit::append(
            tx,
            actor,
            Entry {
                action: "sku.update",
                target: format!("sku:{sku}"),
                before: Some(before.settings()),
                after: Some(after.settings()),
            },
        )
        .await?;
    }
    Ok(Patched::Done(Box::new((before, after))))
}
