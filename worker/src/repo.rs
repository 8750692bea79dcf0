//! The batch transaction and the per-order fallback: every SQL statement the worker runs.

use deadpool_postgres::{Pool, Transaction};
use floodgate_common::{
    domain::{FailReason, OrderId, OrderStatus},
    trace::TraceParent,
};
use std::collections::{BTreeMap, HashMap};
use time::OffsetDateTime;
use tokio_postgres::{error::SqlState, types::ToSql};
use uuid::Uuid;

/// An order ready to be written.
#[derive(Debug, Clone)]
pub struct OrderRecord {
    pub id: OrderId,
    pub user_id: String,
    pub idempotency_key: Option<String>,
    pub accepted_at: OffsetDateTime,
    /// The order's lines as placed (a bundle as one line): its `order_items`.
    pub lines: Vec<(String, i64)>,
    /// Its stock units per SKU, bundles expanded into their components: its ledger rows
    /// and what it adds to `inventory.sold`.
    pub units: Vec<(String, i64)>,
    /// The trace of the request that placed it (its message's `traceparent`), written
    /// with its outbox event so the notifier continues it.
    pub trace: Option<TraceParent>,
    /// Paid with points: its total, which its commit spends (None: paid elsewhere).
    pub points: Option<i64>,
}

/// How a database failure is handled.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The `sold <= on_hand` check refused the inventory update.
    #[error("not enough stock in PostgreSQL")]
    InsufficientStock,
    /// The `balance >= 0` check (or a missing account) refused a points spend.
    #[error("not enough points in PostgreSQL")]
    InsufficientPoints,
    /// Will pass on retry: connection lost, timeout, serialization failure, shutdown.
    #[error("transient database failure")]
    Transient(#[source] anyhow::Error),
    /// Will never pass: a constraint or data error, with the order's reason.
    #[error("permanent database failure: {reason}")]
    Permanent {
        reason: FailReason,
        #[source]
        source: anyhow::Error,
    },
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        let Some(code) = e.code().cloned() else {
            // No SQLSTATE: the connection broke or timed out.
            return DbError::Transient(e.into());
        };
        let class = &code.code()[..2];
        if code == SqlState::CHECK_VIOLATION {
            // By constraint: a points balance's, or the inventory's.
            match e.as_db_error().and_then(|d| d.constraint()) {
                Some("point_accounts_balance_not_negative") => DbError::InsufficientPoints,
                _ => DbError::InsufficientStock,
            }
        } else if matches!(class, "08" | "40" | "53" | "57" | "58")
            || code == SqlState::LOCK_NOT_AVAILABLE
            || code == SqlState::QUERY_CANCELED
        {
            DbError::Transient(e.into())
        } else {
            let reason = if code == SqlState::UNIQUE_VIOLATION {
                FailReason::DuplicateIdempotencyKey
            } else {
                FailReason::Invalid
            };
            DbError::Permanent {
                reason,
                source: e.into(),
            }
        }
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        DbError::Transient(e.into())
    }
}

fn permanent(reason: FailReason, msg: String) -> DbError {
    DbError::Permanent {
        reason,
        source: anyhow::anyhow!(msg),
    }
}

/// What a committed batch did.
#[derive(Debug, Default)]
pub struct Committed {
    /// Orders this commit confirmed (others were committed by an earlier delivery).
    pub confirmed: Vec<OrderId>,
    /// Orders recorded failed by this commit.
    pub failed: usize,
    /// The status PostgreSQL holds for every order the batch tried to confirm or to
    /// record failed, whoever wrote it: Redis is settled from this, never from what the
    /// batch intended.
    pub status: HashMap<OrderId, OrderStatus>,
}

async fn insert_orders(
    tx: &Transaction<'_>,
    orders: &[&OrderRecord],
    status: OrderStatus,
    reason: Option<FailReason>,
) -> Result<Vec<Uuid>, DbError> {
    let (status, reason) = (status.as_str(), reason.map(FailReason::as_str));
    if orders.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = orders.iter().map(|o| o.id.as_uuid()).collect();
    let users: Vec<&str> = orders.iter().map(|o| o.user_id.as_str()).collect();
    // A failed order is written without its Idempotency-Key: the key may belong to
    // another order of the user (Redis had forgotten it, PostgreSQL has not), and only
    // the unique index reads it. Redis answers repeats of a key, not PostgreSQL.
    let keys: Vec<Option<&str>> = orders
        .iter()
        .map(|o| {
            if status == OrderStatus::Failed.as_str() {
                None
            } else {
                o.idempotency_key.as_deref()
            }
        })
        .collect();
    let accepted: Vec<OffsetDateTime> = orders.iter().map(|o| o.accepted_at).collect();
    let traces: Vec<Option<String>> = orders
        .iter()
        .map(|o| o.trace.map(|t| t.to_string()))
        .collect();
    let totals: Vec<Option<i64>> = orders.iter().map(|o| o.points).collect();
    let stmt = tx
        .prepare_cached(
            "WITH new AS (
                INSERT INTO orders (id, user_id, status, reason, idempotency_key, accepted_at,
                                    confirmed_at, payment, total_cents)
                SELECT t.id, t.user_id, $5, $6, t.key, t.accepted_at,
                       CASE WHEN $5 = 'confirmed' THEN now() END,
                       CASE WHEN t.total IS NOT NULL THEN 'points' END, t.total
                  FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], $8::bigint[])
                       AS t(id, user_id, key, accepted_at, total)
                ON CONFLICT (id) DO NOTHING
                RETURNING id, user_id, status, reason
             ), traces AS (
                SELECT * FROM unnest($1::uuid[], $7::text[]) AS t(id, traceparent)
             ), events AS (
                INSERT INTO outbox (routing_key, payload, traceparent)
                SELECT 'order.' || new.status, jsonb_build_object(
                         'type', 'order', 'order_id', new.id, 'user_id', new.user_id,
                         'status', new.status, 'reason', new.reason, 'at', clock_timestamp()),
                       traces.traceparent
                  FROM new JOIN traces USING (id)
             )
             SELECT id FROM new",
        )
        .await?;
    let rows = tx
        .query(
            &stmt,
            &[
                &ids, &users, &keys, &accepted, &status, &reason, &traces, &totals,
            ],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

async fn insert_lines(
    tx: &Transaction<'_>,
    orders: &[&OrderRecord],
    kind: Option<&str>,
) -> Result<(), DbError> {
    let mut ids = Vec::new();
    let mut skus = Vec::new();
    let mut qtys: Vec<i32> = Vec::new();
    for o in orders {
        for (sku, qty) in &o.lines {
            ids.push(o.id.as_uuid());
            skus.push(sku.as_str());
            qtys.push(*qty as i32);
        }
    }
    if ids.is_empty() {
        return Ok(());
    }
    let items = tx
        .prepare_cached(
            "INSERT INTO order_items (order_id, sku, qty)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[])
             ON CONFLICT DO NOTHING",
        )
        .await?;
    tx.execute(&items, &[&ids, &skus, &qtys]).await?;
    if let Some(kind) = kind {
        // One ledger row per stock SKU of an order, each naming the order: a bundle's
        // line as its components ([`order_units`], the view `reconcile --check` reads).
        let ids: Vec<Uuid> = orders.iter().map(|o| o.id.as_uuid()).collect();
        let ledger = tx
            .prepare_cached(
                "INSERT INTO stock_movements (sku, kind, qty, reference)
                 SELECT u.sku, $2, sum(u.qty)::bigint, u.order_id::text
                   FROM order_units u WHERE u.order_id = ANY($1)
                  GROUP BY u.order_id, u.sku
                 ON CONFLICT ON CONSTRAINT stock_movements_once DO NOTHING",
            )
            .await?;
        tx.execute(&ledger, &[&ids, &kind]).await?;
    }
    Ok(())
}

/// One aggregated UPDATE for all the orders' SKUs: a hot row is updated once per batch.
/// Rows are locked in SKU order first so concurrent batches cannot deadlock. The lock and
/// the update go out together (pipelined on the connection), and the caller commits
/// right after: a hot row is held for about two round trips, whatever the batch size.
async fn add_sold(tx: &Transaction<'_>, orders: &[&OrderRecord]) -> Result<(), DbError> {
    let mut per_sku: BTreeMap<&str, i64> = BTreeMap::new();
    for o in orders {
        for (sku, qty) in &o.units {
            *per_sku.entry(sku.as_str()).or_default() += qty;
        }
    }
    if per_sku.is_empty() {
        return Ok(());
    }
    let skus: Vec<&str> = per_sku.keys().copied().collect();
    let qtys: Vec<i64> = per_sku.values().copied().collect();
    let (lock, update) = tokio::try_join!(
        tx.prepare_cached("SELECT sku FROM inventory WHERE sku = ANY($1) ORDER BY sku FOR UPDATE"),
        // A SKU this batch sells out (its last unit sold, committed) gets a
        // `stock.sold_out` event in the same statement: what webhooks deliver.
        tx.prepare_cached(
            "WITH up AS (
                UPDATE inventory i SET sold = i.sold + d.qty, updated_at = now()
                  FROM unnest($1::text[], $2::bigint[]) AS d(sku, qty)
                 WHERE i.sku = d.sku
                RETURNING i.sku, i.on_hand, i.sold, d.qty
             )
             INSERT INTO outbox (routing_key, payload)
             SELECT 'stock.sold_out', jsonb_build_object(
                      'type', 'stock', 'sku', sku, 'on_hand', on_hand, 'sold', sold,
                      'at', clock_timestamp())
               FROM up WHERE sold = on_hand AND sold - qty < on_hand",
        ),
    )?;
    // Sent back to back: the UPDATE waits behind the locking SELECT in the same session.
    // The SELECT's result is looked at first: when it fails (a lock timeout), the UPDATE
    // fails only as "transaction aborted", which says nothing of the cause.
    let (lock_params, update_params): ([&(dyn ToSql + Sync); 1], [&(dyn ToSql + Sync); 2]) =
        ([&skus], [&skus, &qtys]);
    let (locked, updated) = tokio::join!(
        tx.query(&lock, &lock_params),
        tx.execute(&update, &update_params)
    );
    let locked = locked?;
    updated?;
    if locked.len() != skus.len() {
        let found: Vec<String> = locked.iter().map(|r| r.get(0)).collect();
        let missing: Vec<&&str> = skus
            .iter()
            .filter(|s| !found.iter().any(|f| f == **s))
            .collect();
        return Err(permanent(
            FailReason::UnknownSku,
            format!("no inventory row for {missing:?}"),
        ));
    }
    Ok(())
}

/// Commits a batch in one transaction: `confirm` become confirmed orders with items,
/// `sale` ledger rows and one inventory update per SKU; `fail` are recorded failed with
/// their reason and a `release` ledger row. Every order written gets its outbox event in
/// the same statement. Orders already in PostgreSQL (redelivery) are
/// skipped by their primary key.
pub async fn commit_batch(
    pool: &Pool,
    confirm: &[&OrderRecord],
    fail: &[(&OrderRecord, FailReason)],
) -> Result<Committed, DbError> {
    let mut db = pool.get().await?;
    let tx = db.transaction().await?;
    let mut committed = Committed::default();
    for (reason, group) in group_by_reason(fail) {
        let new = insert_orders(&tx, &group, OrderStatus::Failed, Some(reason)).await?;
        let fresh: Vec<&OrderRecord> = group
            .into_iter()
            .filter(|o| new.contains(&o.id.as_uuid()))
            .collect();
        insert_lines(&tx, &fresh, Some("release")).await?;
        committed.failed += fresh.len();
    }
    let new = insert_orders(&tx, confirm, OrderStatus::Confirmed, None).await?;
    let fresh: Vec<&OrderRecord> = confirm
        .iter()
        .copied()
        .filter(|o| new.contains(&o.id.as_uuid()))
        .collect();
    insert_lines(&tx, &fresh, Some("sale")).await?;
    committed.status = statuses(
        &tx,
        confirm
            .iter()
            .map(|o| o.id)
            .chain(fail.iter().map(|(o, _)| o.id)),
    )
    .await?;
    spend_points(&tx, &fresh).await?;
    // The hot rows last, just before COMMIT: concurrent batches serialise only here.
    add_sold(&tx, &fresh).await?;
    tx.commit().await?;
    committed.confirmed = fresh.iter().map(|o| o.id).collect();
    Ok(committed)
}

/// Spends the points of the orders paid with them: one `spend` entry per order and one
/// aggregated balance update per user (the way stock is aggregated per SKU), accounts
/// locked in user order first so concurrent batches cannot deadlock. `balance >= 0`
/// refuses a batch that would overdraw anyone ([`DbError::InsufficientPoints`]), as does
/// a user without an account.
async fn spend_points(tx: &Transaction<'_>, orders: &[&OrderRecord]) -> Result<(), DbError> {
    let paid: Vec<(&OrderRecord, i64)> = orders
        .iter()
        .filter_map(|o| o.points.filter(|&p| p > 0).map(|p| (*o, p)))
        .collect();
    if paid.is_empty() {
        return Ok(());
    }
    let mut per_user: BTreeMap<&str, i64> = BTreeMap::new();
    for (o, p) in &paid {
        *per_user.entry(o.user_id.as_str()).or_default() += p;
    }
    let users: Vec<&str> = per_user.keys().copied().collect();
    let amounts: Vec<i64> = per_user.values().copied().collect();
    // Prepared once per connection, like the batch's other statements.
    let (lock, update, entries) = tokio::try_join!(
        tx.prepare_cached(
            "SELECT user_id FROM point_accounts WHERE user_id = ANY($1) ORDER BY user_id FOR UPDATE",
        ),
        tx.prepare_cached(
            "UPDATE point_accounts a SET balance = a.balance - d.amount, updated_at = now()
               FROM unnest($1::text[], $2::bigint[]) AS d(user_id, amount)
              WHERE a.user_id = d.user_id",
        ),
        tx.prepare_cached(
            "INSERT INTO point_entries (user_id, kind, amount, order_id, reference)
             SELECT t.user_id, 'spend', t.amount, t.id, t.id::text
               FROM unnest($1::uuid[], $2::text[], $3::bigint[]) AS t(id, user_id, amount)",
        ),
    )?;
    let locked = tx.query(&lock, &[&users]).await?;
    if locked.len() != users.len() {
        return Err(DbError::InsufficientPoints);
    }
    tx.execute(&update, &[&users, &amounts]).await?;
    let ids: Vec<Uuid> = paid.iter().map(|(o, _)| o.id.as_uuid()).collect();
    let owners: Vec<&str> = paid.iter().map(|(o, _)| o.user_id.as_str()).collect();
    let points: Vec<i64> = paid.iter().map(|(_, p)| *p).collect();
    tx.execute(&entries, &[&ids, &owners, &points]).await?;
    Ok(())
}

async fn statuses(
    tx: &Transaction<'_>,
    ids: impl Iterator<Item = OrderId>,
) -> Result<HashMap<OrderId, OrderStatus>, DbError> {
    let ids: Vec<Uuid> = ids.map(|i| i.as_uuid()).collect();
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let stmt = tx
        .prepare_cached("SELECT id, status FROM orders WHERE id = ANY($1)")
        .await?;
    tx.query(&stmt, &[&ids])
        .await?
        .iter()
        .map(|r| {
            let status: &str = r.get(1);
            let status = OrderStatus::parse(status).ok_or_else(|| {
                permanent(
                    FailReason::Invalid,
                    format!("unknown order status {status:?}"),
                )
            })?;
            Ok((OrderId::from(r.get::<_, Uuid>(0)), status))
        })
        .collect()
}

fn group_by_reason<'a>(
    fail: &[(&'a OrderRecord, FailReason)],
) -> BTreeMap<FailReason, Vec<&'a OrderRecord>> {
    let mut m: BTreeMap<FailReason, Vec<&OrderRecord>> = BTreeMap::new();
    for (o, r) in fail {
        m.entry(*r).or_default().push(o);
    }
    m
}

/// Records one order failed, with its lines and `release` rows but no sale (after the
/// batch refused it). Returns whether this call recorded it, and the status PostgreSQL
/// holds for the order now (an earlier delivery may have confirmed it).
pub async fn record_failed(
    pool: &Pool,
    order: &OrderRecord,
    reason: FailReason,
) -> Result<(bool, OrderStatus), DbError> {
    let mut db = pool.get().await?;
    let tx = db.transaction().await?;
    let new = insert_orders(&tx, &[order], OrderStatus::Failed, Some(reason)).await?;
    if !new.is_empty() {
        insert_lines(&tx, &[order], Some("release")).await?;
    }
    let status = statuses(&tx, std::iter::once(order.id))
        .await?
        .remove(&order.id)
        .unwrap_or(OrderStatus::Failed);
    tx.commit().await?;
    Ok((!new.is_empty(), status))
}

/// Records a waitlisted order that left its waitlist unpromoted: `cancelled` by its
/// buyer, or `failed` with `waitlist_expired`. With its lines and its outbox event, and
/// no ledger row: it never held a unit. Idempotent (the order's id). Returns whether
/// this call recorded it.
pub async fn record_unwaited(
    pool: &Pool,
    order: &OrderRecord,
    status: OrderStatus,
    reason: Option<FailReason>,
    by: Option<&floodgate_common::audit::Actor>,
) -> Result<bool, DbError> {
    let mut db = pool.get().await?;
    let tx = db.transaction().await?;
    let new = insert_orders(&tx, &[order], status, reason).await?;
    if !new.is_empty() {
        insert_lines(&tx, &[order], None).await?;
        // A manager's or admin's cancel: its audit record, with the order's.
        if let Some(actor) = by {
            floodgate_common::audit::append(
                &tx,
                actor,
                floodgate_common::audit::Entry {
                    action: "order.cancel",
                    target: format!("order:{}", order.id),
                    before: Some(serde_json::json!({
                        "status": "waitlisted", "user_id": order.user_id })),
                    after: Some(serde_json::json!({ "status": "cancelled" })),
                },
            )
            .await
            .map_err(|e| permanent(FailReason::Invalid, format!("{e:#}")))?;
        }
    }
    tx.commit().await?;
    Ok(!new.is_empty())
}

/// Writes one event per order to the outbox (`order.<status>`): the waitlist's
/// `waitlisted` and `accepted`, which happen in Redis, not in a PostgreSQL commit. The
/// relay publishes them like every other; a repeat (a crash before the caller forgot
/// them in Redis) is a second event of the same status, which subscribers ignore.
pub async fn announce(
    pool: &Pool,
    orders: &[(OrderId, &str)],
    status: OrderStatus,
) -> Result<(), DbError> {
    if orders.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = orders.iter().map(|(o, _)| o.as_uuid()).collect();
    let users: Vec<&str> = orders.iter().map(|(_, u)| *u).collect();
    let db = pool.get().await?;
    db.execute(
        "INSERT INTO outbox (routing_key, payload)
         SELECT 'order.' || $3, jsonb_build_object(
                  'type', 'order', 'order_id', t.id, 'user_id', t.user_id,
                  'status', $3, 'reason', NULL, 'at', clock_timestamp())
           FROM unnest($1::uuid[], $2::text[]) AS t(id, user_id)",
        &[&ids, &users, &status.as_str()],
    )
    .await?;
    Ok(())
}
