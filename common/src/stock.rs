//! Loading Redis from PostgreSQL, the system of record.

use crate::domain::Sku;
use crate::redis::{Keys, cancel_token, receive_token};
use anyhow::Context;
use deadpool_postgres::Pool;
use redis::aio::ConnectionLike;

/// Loads every SKU's available units (on_hand - sold), per-user limits, the units each
/// user holds and the applied stock-change tokens from PostgreSQL into Redis, replacing
/// what was there, in one MULTI (nobody sees half a load), then sets the stock epoch that
/// opens ingress.
///
/// Orders still queued between ingress and the worker are not in PostgreSQL yet; loading
/// while they are in flight makes Redis count their units as available again. The caller
/// loads only when the intake queue is drained, or when Redis has no stock at all.
pub async fn load<C: ConnectionLike>(
    pool: &Pool,
    con: &mut C,
    keys: &Keys,
) -> anyhow::Result<usize> {
    let mut db = pool.get().await.context("PostgreSQL connection")?;
    // One snapshot for the three reads, so a receipt committing meanwhile is either in
    // all of them or in none.
    let db = db
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .context("starting a snapshot")?;
    let skus = db
        .query(
            "SELECT s.sku, s.per_user_limit, i.on_hand - i.sold AS available
               FROM skus s JOIN inventory i USING (sku)",
            &[],
        )
        .await
        .context("reading inventory")?;
    let held = db
        .query(
            "SELECT o.user_id, it.sku, sum(it.qty)::bigint AS held
               FROM orders o JOIN order_items it ON it.order_id = o.id
              WHERE o.status = 'confirmed'
              GROUP BY o.user_id, it.sku",
            &[],
        )
        .await
        .context("reading what users hold")?;
    let receipts = db
        .query(
            "SELECT sku, kind, reference FROM stock_movements WHERE kind IN ('receive', 'cancel')",
            &[],
        )
        .await
        .context("reading receipts")?;
    db.commit().await.context("ending the snapshot")?;

    let mut pipe = redis::pipe();
    pipe.atomic();
    pipe.del(keys.stock())
        .del(keys.limits())
        .del(keys.applied());
    for r in &skus {
        let sku: String = r.get("sku");
        pipe.hset(keys.stock(), &sku, r.get::<_, i64>("available"));
        pipe.hset(keys.limits(), &sku, r.get::<_, i32>("per_user_limit"));
    }
    for r in &held {
        let Ok(user) = crate::domain::UserId::parse(r.get::<_, String>("user_id")) else {
            continue;
        };
        pipe.hset(
            keys.user(&user),
            r.get::<_, String>("sku"),
            r.get::<_, i64>("held"),
        );
    }
    for r in &receipts {
        let Ok(sku) = Sku::parse(r.get::<_, String>("sku")) else {
            continue;
        };
        let reference: &str = r.get("reference");
        let token = match r.get::<_, &str>("kind") {
            "cancel" => match crate::domain::OrderId::parse(reference) {
                Some(order) => cancel_token(&order, &sku),
                None => continue,
            },
            _ => receive_token(&sku, reference),
        };
        pipe.sadd(keys.applied(), token);
    }
    let _: () = pipe
        .query_async(con)
        .await
        .context("writing stock to Redis")?;
    // The gate opens only after the load succeeded, in a command of its own: a cluster
    // client may re-send the MULTI after a dropped connection, and a re-sent load must
    // not overwrite what orders reserved after a gate it had already opened. A new
    // value per load: a notifier that sees the epoch change re-reads every level.
    let _: () = redis::cmd("SET")
        .arg(keys.epoch())
        .arg(uuid::Uuid::now_v7().to_string())
        .query_async(con)
        .await
        .context("opening the gate (the stock epoch)")?;
    Ok(skus.len())
}

/// Loads stock if Redis has no epoch (a fresh namespace or a fresh Redis). Returns
/// whether it loaded.
pub async fn load_if_absent<C: ConnectionLike>(
    pool: &Pool,
    con: &mut C,
    keys: &Keys,
) -> anyhow::Result<bool> {
    if crate::redis::stock_loaded(con, keys)
        .await
        .context("reading the stock epoch")?
    {
        return Ok(false);
    }
    load(pool, con, keys).await?;
    Ok(true)
}
