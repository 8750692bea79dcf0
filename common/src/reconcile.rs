//! Checking and repairing the invariants of DESIGN.md between Redis and PostgreSQL.

use crate::{
    Config,
    amqp::{Leftovers, Topology},
    domain::OrderId,
    redis::{Keys, Shards},
    stock,
};
use anyhow::Context;
use deadpool_postgres::Pool;
use lapin::{Channel, options::QueueDeclareOptions, types::FieldTable};
use redis::aio::ConnectionLike;
use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    time::{Duration, Instant},
};

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Stable name of the invariant, e.g. `redis_differs`.
    pub kind: &'static str,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

fn v(kind: &'static str, detail: String) -> Violation {
    Violation { kind, detail }
}

/// Reservation ids read per `ZSCAN` step, and reservations read per pipelined round trip.
const SCAN_CHUNK: usize = 1_000;

/// Calls `each` with every open reservation (reserved, queued or claimed: not yet
/// committed) and its order id.
///
/// Walks the deadlines zset with `ZSCAN` and reads each step's reservations in one
/// pipelined round trip: about N/[`SCAN_CHUNK`] round trips, and no command that holds
/// Redis for the whole set (this runs on the worker's shared connection, beside its
/// orders). A reservation present for the whole walk is seen exactly once (`ZSCAN` may
/// return an id twice; the second is skipped); one added or removed meanwhile may or may
/// not be, as with any read that is not one snapshot, which is why a violation must be
/// seen in several passes.
async fn walk_open_reservations<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    mut each: impl FnMut(OrderId, crate::redis::Reservation),
) -> anyhow::Result<()> {
    let mut seen = HashSet::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, members_and_scores): (u64, Vec<String>) = redis::cmd("ZSCAN")
            .arg(keys.deadlines())
            .arg(cursor)
            .arg("COUNT")
            .arg(SCAN_CHUNK)
            .query_async(con)
            .await
            .context("scanning the reservation deadlines")?;
        let ids: Vec<OrderId> = members_and_scores
            .iter()
            .step_by(2)
            .filter_map(|id| OrderId::parse(id))
            .filter(|id| seen.insert(*id))
            .collect();
        // A step of a small (listpack) zset returns all of it at once: read it in chunks.
        for chunk in ids.chunks(SCAN_CHUNK) {
            let found = crate::redis::reservations(con, keys, chunk)
                .await
                .context("reading reservations")?;
            for (id, r) in chunk.iter().zip(found) {
                if let Some(r) = r.filter(|r| r.state.is_open()) {
                    each(*id, r);
                }
            }
        }
        cursor = next;
        if cursor == 0 {
            return Ok(());
        }
    }
}

/// Units held by open reservations, per SKU, over every shard (each part counts the
/// lines it holds; a bundle's limit line holds none).
async fn held_by_reservations<C: ConnectionLike>(
    con: &mut C,
    shards: &Shards,
) -> anyhow::Result<BTreeMap<String, i64>> {
    let mut held = BTreeMap::new();
    for (_, keys) in shards.iter() {
        walk_open_reservations(con, keys, |_, r| {
            for l in r.held.iter().filter(|l| !l.bundle) {
                *held.entry(l.sku.to_string()).or_default() += l.qty;
            }
        })
        .await?;
    }
    Ok(held)
}

/// What [`settle`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Open reservations of orders PostgreSQL holds confirmed or cancelled: marked done.
    pub finished: usize,
    /// Open reservations of orders PostgreSQL holds failed: their units given back.
    pub released: usize,
    /// Committed stock changes (receipts, a SKU's initial stock, cancels, units added
    /// by an adjustment) whose Redis half was lost: applied now, under their own token.
    pub reapplied: usize,
    /// Write-offs whose units were taken in Redis but whose record never committed (a
    /// crash, a lost commit): their units given back.
    pub given_back: usize,
    /// SKUs whose per-user limit or sale window in Redis differed from PostgreSQL's (a
    /// PATCH lost in a failover, or one that failed between its Redis write and its
    /// commit): rewritten from PostgreSQL.
    pub resynced: usize,
    /// Cancelled orders paid with points that had no refund (a cancel by a version
    /// before points, or by hand): refunded now (their Redis half follows under the
    /// refund entry's token, counted in `reapplied`).
    pub refunded: usize,
}

/// Settles open reservations whose order PostgreSQL already decided, in every shard (each
/// part of an order on its own: a part is finished or released like a whole one).
///
/// The worker commits a batch and then marks its reservations done (or releases a failed
/// order's). When that Redis step is lost (a Redis failover that dropped the last
/// acknowledged writes, a worker killed between the two), the reservation stays open for
/// good: its units count as held, `--check` reports `redis_differs`, and nothing would
/// ever close it, since its message is acked. This walks the open reservations and, for
/// each order PostgreSQL holds, does what the worker would have done: confirmed or
/// cancelled -> done (a cancel returns its units through its own token, never through
/// the reservation), failed -> released. Orders PostgreSQL does not hold are left alone
/// (queued, or being committed). Idempotent and safe beside running workers: both
/// scripts act only on a reservation still open.
pub async fn settle<C: ConnectionLike>(
    pool: &Pool,
    con: &mut C,
    shards: &Shards,
) -> anyhow::Result<Settled> {
    let mut settled = Settled::default();
    let mut db = pool.get().await.context("PostgreSQL connection")?;
    for (_, keys) in shards.iter() {
        settle_shard(&db, con, keys, &mut settled).await?;
    }
    settled.reapplied = reapply_stock_changes(&mut db, con, shards).await?;
    settled.reapplied += reapply_bundle_cancels(&db, con, shards).await?;
    settled.refunded = refund_cancelled(&mut db).await?;
    settled.reapplied += reapply_point_credits(&db, con, shards).await?;
    settled.resynced = sync_rules(&mut db, con, shards).await?;
    settled.resynced += sync_bundles(&mut db, con, shards).await?;
    settled.given_back = settle_takes(&mut db, con, shards).await?;
    if settled != Settled::default() {
        tracing::warn!(
            finished = settled.finished,
            released = settled.released,
            reapplied = settled.reapplied,
            given_back = settled.given_back,
            resynced = settled.resynced,
            refunded = settled.refunded,
            "settled reservations whose order PostgreSQL had already decided (a lost Redis write)"
        );
    }
    Ok(settled)
}

/// Ends the write-offs left in Redis's `takes`: one PostgreSQL recorded loses its entry
/// (its units stay gone); one it did not, and that no request is still working on (its
/// SKU's adjustment lock is free), gets its units back. Returns the units given back.
async fn settle_takes<C: ConnectionLike>(
    db: &mut deadpool_postgres::Object,
    con: &mut C,
    shards: &Shards,
) -> anyhow::Result<usize> {
    use crate::redis::{open_takes, parse_adjust_token, take_done, untake_stock};
    let mut given_back = 0;
    for (_, keys) in shards.iter() {
        for (token, _) in open_takes(con, keys)
            .await
            .context("reading the open write-offs")?
        {
            let Some((sku, reference)) = parse_adjust_token(&token) else {
                continue;
            };
            let tx = db.transaction().await.context("starting a transaction")?;
            let free: bool = tx
                .query_one(crate::stock::ADJUST_TRY_LOCK, &[&sku.as_str()])
                .await
                .context("trying a SKU's adjustment lock")?
                .get(0);
            if !free {
                // A request holds it: that write-off is in flight; its own end clears it.
                continue;
            }
            let recorded = tx
                .query_opt(
                    "SELECT 1 FROM stock_movements WHERE kind = 'adjust' AND sku = $1 AND reference = $2",
                    &[&sku.as_str(), &reference],
                )
                .await
                .context("reading a write-off")?
                .is_some();
            if recorded {
                take_done(con, keys, &sku, &token).await?;
            } else if untake_stock(con, keys, &sku, &token).await? > 0 {
                tracing::warn!(%sku, reference, "gave back the units of a write-off that never committed");
                given_back += 1;
            }
            tx.commit()
                .await
                .context("releasing a SKU's adjustment lock")?;
        }
    }
    Ok(given_back)
}

async fn settle_shard<C: ConnectionLike>(
    db: &deadpool_postgres::Object,
    con: &mut C,
    keys: &Keys,
    settled: &mut Settled,
) -> anyhow::Result<()> {
    let mut open: Vec<(OrderId, crate::domain::UserId)> = Vec::new();
    walk_open_reservations(con, keys, |id, r| open.push((id, r.user))).await?;
    for chunk in open.chunks(SCAN_CHUNK) {
        let uuids: Vec<uuid::Uuid> = chunk.iter().map(|(id, _)| id.as_uuid()).collect();
        let rows = db
            .query(
                "SELECT id, status FROM orders WHERE id = ANY($1)",
                &[&uuids],
            )
            .await
            .context("reading the orders of open reservations")?;
        let mut done = Vec::new();
        for r in rows {
            let id = OrderId::from(r.get::<_, uuid::Uuid>("id"));
            match r.get::<_, &str>("status") {
                "confirmed" | "cancelled" => done.push(id),
                "failed" => {
                    let Some((_, user)) = chunk.iter().find(|(o, _)| *o == id) else {
                        continue;
                    };
                    let outcome = crate::redis::release(con, keys, &id, user, None, "failed")
                        .await
                        .context("releasing a failed order's reservation")?;
                    if outcome == crate::redis::Release::Released {
                        settled.released += 1;
                    }
                }
                _ => {}
            }
        }
        crate::redis::finish(con, keys, &done)
            .await
            .context("marking committed orders done")?;
        settled.finished += done.len();
    }
    Ok(())
}

/// Applies every committed receipt and cancel whose token Redis's `applied` set lacks:
/// ingress writes PostgreSQL first and Redis after (`apply_stock.lua`), and a lost Redis
/// write (a failover) would leave those units out of sale until a reload. The token makes
/// it safe beside a request still on its way to apply it: whichever comes first applies
/// the change, the other finds the token and changes nothing.
/// A committed stock change to apply once (see [`reapply_stock_changes`]).
struct Change {
    token: String,
    sku: crate::domain::Sku,
    qty: i64,
    limit: Option<i64>,
    user: Option<crate::domain::UserId>,
    shard: usize,
}

/// A SKU's per-user limit, sale window field and bucket count as PostgreSQL holds them,
/// read in `tx` under the row's share lock and the load lock (shared), both tried, not
/// waited for: None while a PATCH (or a load) holds them. Whatever the caller writes to
/// Redis before `tx` ends is therefore never older than the row: a PATCH waits for it.
async fn locked_rules(
    tx: &deadpool_postgres::Transaction<'_>,
    sku: &str,
) -> anyhow::Result<Option<(i64, Option<String>, usize)>> {
    let free: bool = tx
        .query_one(
            "SELECT pg_try_advisory_xact_lock_shared(hashtext('floodgate.stock-load'), hashtext(current_schema()))",
            &[],
        )
        .await
        .context("trying the load lock")?
        .get(0);
    if !free {
        return Ok(None);
    }
    Ok(tx
        .query_opt(
            "SELECT per_user_limit, buckets,
                    floor(extract(epoch FROM sale_starts_at) * 1000)::bigint AS starts_ms,
                    floor(extract(epoch FROM sale_ends_at) * 1000)::bigint AS ends_ms
               FROM skus WHERE sku = $1 FOR SHARE SKIP LOCKED",
            &[&sku],
        )
        .await
        .context("reading a SKU's rules")?
        .map(|r| {
            (
                i64::from(r.get::<_, i32>("per_user_limit")),
                crate::redis::window_field(r.get("starts_ms"), r.get("ends_ms")),
                r.get::<_, i16>("buckets").max(1) as usize,
            )
        }))
}

/// Rewrites, from PostgreSQL, the per-user limit and sale window of every SKU whose Redis
/// copy differs in one of its buckets' shards (under [`locked_rules`]; a SKU a PATCH is
/// changing right now is left to the next pass). Returns the SKUs rewritten.
async fn sync_rules<C: ConnectionLike>(
    db: &mut deadpool_postgres::Object,
    con: &mut C,
    shards: &Shards,
) -> anyhow::Result<usize> {
    use crate::domain::Sku;
    let mut redis_rules: BTreeMap<(usize, String), (Option<i64>, Option<String>)> = BTreeMap::new();
    let mut known: std::collections::BTreeSet<String> = Default::default();
    for (g, keys) in shards.iter() {
        type Numbers = BTreeMap<String, i64>;
        type Strings = BTreeMap<String, String>;
        let (limits, windows, levels, bundles): (Numbers, Strings, Numbers, Strings) =
            redis::pipe()
                .hgetall(keys.limits())
                .hgetall(keys.windows())
                .hgetall(keys.stock())
                .hgetall(keys.bundles())
                .query_async(con)
                .await
                .context("reading limits and windows")?;
        known.extend(bundles.into_keys());
        for (sku, l) in limits {
            redis_rules.entry((g, sku)).or_default().0 = Some(l);
        }
        for (sku, w) in windows {
            redis_rules.entry((g, sku)).or_default().1 = Some(w);
        }
        known.extend(levels.into_keys());
    }
    let rows = db
        .query(
            "SELECT sku, per_user_limit, buckets,
                    floor(extract(epoch FROM sale_starts_at) * 1000)::bigint AS starts_ms,
                    floor(extract(epoch FROM sale_ends_at) * 1000)::bigint AS ends_ms
               FROM skus",
            &[],
        )
        .await
        .context("reading every SKU's rules")?;
    let mut differ = Vec::new();
    for r in &rows {
        let sku: String = r.get("sku");
        // A SKU not in Redis yet gets its rules with its first units.
        let Ok(parsed) = Sku::parse(sku.as_str()) else {
            continue;
        };
        if !known.contains(&sku) {
            continue;
        }
        let limit = i64::from(r.get::<_, i32>("per_user_limit"));
        let window = crate::redis::window_field(r.get("starts_ms"), r.get("ends_ms"));
        let k = r.get::<_, i16>("buckets").max(1) as usize;
        let off = shards.bucket_shards(&parsed, k).into_iter().any(|g| {
            let (l, w) = redis_rules
                .get(&(g, sku.clone()))
                .cloned()
                .unwrap_or_default();
            l.unwrap_or(0) != limit || w != window
        });
        if off {
            differ.push(parsed);
        }
    }
    let mut resynced = 0;
    for sku in differ {
        let tx = db.transaction().await.context("starting a transaction")?;
        let Some((limit, window, k)) = locked_rules(&tx, sku.as_str()).await? else {
            continue;
        };
        crate::redis::set_rules(con, shards, &sku, k, Some(limit), Some(window.as_deref()))
            .await
            .context("rewriting a SKU's limit and window")?;
        tx.commit().await.context("ending a SKU's resync")?;
        tracing::warn!(%sku, "a SKU's limit or sale window in Redis differed from PostgreSQL's: rewritten");
        resynced += 1;
    }
    Ok(resynced)
}

/// Puts every bundle PostgreSQL has and a loaded shard lacks into Redis (a creation that
/// crashed between its commit and its Redis write, or a failover that lost that write),
/// with its rules under [`locked_rules`]. Returns the bundles put.
async fn sync_bundles<C: ConnectionLike>(
    db: &mut deadpool_postgres::Object,
    con: &mut C,
    shards: &Shards,
) -> anyhow::Result<usize> {
    let defs = crate::stock::bundle_defs(&***db).await?;
    let mut put = 0;
    for (bundle, def) in defs {
        let keys = shards.for_sku(&bundle);
        let there: bool = redis::cmd("HEXISTS")
            .arg(keys.bundles())
            .arg(bundle.as_str())
            .query_async(con)
            .await
            .context("reading a bundle's definition")?;
        if there || !crate::redis::stock_loaded(con, keys).await? {
            continue;
        }
        let tx = db.transaction().await.context("starting a transaction")?;
        let Some((limit, window, _)) = locked_rules(&tx, bundle.as_str()).await? else {
            continue;
        };
        crate::redis::put_bundle(con, shards, &bundle, &def, limit, window.as_deref())
            .await
            .context("putting a bundle into Redis")?;
        tx.commit().await.context("ending a bundle's put")?;
        tracing::warn!(%bundle, "a bundle PostgreSQL has was missing from Redis: put");
        put += 1;
    }
    Ok(put)
}

/// Gives back the bundle holdings of cancelled orders whose token Redis's `applied` set
/// lacks (a cancel whose Redis half was lost after its commit: the components' units
/// come back through their ledger rows, a bundle line has none). Returns how many.
async fn reapply_bundle_cancels<C: ConnectionLike>(
    db: &deadpool_postgres::Object,
    con: &mut C,
    shards: &Shards,
) -> anyhow::Result<usize> {
    use crate::domain::{Sku, UserId};
    let rows = db
        .query(
            // Cancels of the last day (an index range): a lost give-back is healed by
            // the next pass, minutes later; an older one by a reload, which recomputes
            // every holding.
            "SELECT o.id, o.user_id, it.sku, it.qty
               FROM orders o JOIN order_items it ON it.order_id = o.id
               JOIN skus s ON s.sku = it.sku AND s.is_bundle
              WHERE o.status = 'cancelled' AND o.updated_at > now() - interval '1 day'",
            &[],
        )
        .await
        .context("reading cancelled bundle lines")?;
    // Per shard, the tokens asked in chunks (one SMISMEMBER each).
    let mut per_shard: BTreeMap<usize, Vec<(UserId, Sku, i64, String)>> = BTreeMap::new();
    for r in &rows {
        let order = OrderId::from(r.get::<_, uuid::Uuid>("id"));
        let (Ok(user), Ok(bundle)) = (
            UserId::parse(r.get::<_, String>("user_id")),
            Sku::parse(r.get::<_, String>("sku")),
        ) else {
            continue;
        };
        let token = crate::redis::cancel_token(&order, &bundle);
        let qty = i64::from(r.get::<_, i32>("qty"));
        per_shard
            .entry(shards.of_sku(&bundle))
            .or_default()
            .push((user, bundle, qty, token));
    }
    let mut given = 0;
    for (g, lines) in per_shard {
        let keys = shards.get(g);
        if !crate::redis::stock_loaded(con, keys).await? {
            continue;
        }
        for chunk in lines.chunks(SCAN_CHUNK) {
            let tokens: Vec<&str> = chunk.iter().map(|(_, _, _, t)| t.as_str()).collect();
            let applied: Vec<bool> = redis::cmd("SMISMEMBER")
                .arg(keys.applied())
                .arg(&tokens)
                .query_async(con)
                .await
                .context("reading the applied tokens")?;
            for ((user, bundle, qty, token), done) in chunk.iter().zip(applied) {
                if done {
                    continue;
                }
                // Counted only when this call did it (a cancel may have meanwhile).
                if crate::redis::give_back_holding(con, keys, user, bundle, *qty, token)
                    .await
                    .context("giving back a cancelled bundle line's holding")?
                {
                    given += 1;
                }
            }
        }
    }
    Ok(given)
}

/// Refunds the cancelled orders paid with points that have no `refund` entry: a cancel
/// served by a version before points (a rolling deploy) changed the status only. The
/// same entry and balance update as a cancel's, once per order (its unique entry), and
/// only for an order whose points were spent (its `spend` entry). Found from the last
/// day's `cancel` ledger rows (every cancel writes them; `stock_movements_once` leads
/// with the kind), so no scan of `orders`. Returns how many.
async fn refund_cancelled(db: &mut deadpool_postgres::Object) -> anyhow::Result<usize> {
    let tx = db.transaction().await.context("starting the refunds")?;
    let owed = "SELECT o.id, o.user_id, o.total_cents FROM orders o
                 WHERE o.id IN (SELECT m.reference::uuid FROM stock_movements m
                                 WHERE m.kind = 'cancel' AND m.at > now() - interval '1 day')
                   AND o.status = 'cancelled' AND o.payment = 'points' AND o.total_cents > 0
                   AND EXISTS (SELECT 1 FROM point_entries e
                                WHERE e.user_id = o.user_id AND e.kind = 'spend'
                                  AND e.reference = o.id::text)
                   AND NOT EXISTS (SELECT 1 FROM point_entries e
                                    WHERE e.user_id = o.user_id AND e.kind = 'refund'
                                      AND e.reference = o.id::text)";
    // The accounts first, in user order, as the worker's batches lock them; then only
    // those users' refunds (a cancel committed meanwhile waits for the next pass).
    let users: Vec<String> = tx
        .query(
            &format!(
                "SELECT user_id FROM point_accounts
                  WHERE user_id IN (SELECT user_id FROM ({owed}) m)
                  ORDER BY user_id FOR UPDATE"
            ),
            &[],
        )
        .await
        .context("locking the accounts owed a refund")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if users.is_empty() {
        return Ok(0);
    }
    let n: i64 = tx
        .query_one(
            &format!(
                "WITH missing AS (SELECT * FROM ({owed}) m WHERE m.user_id = ANY($1)), e AS (
                INSERT INTO point_entries (user_id, kind, amount, order_id, reference)
                SELECT user_id, 'refund', total_cents, id, id::text FROM missing
                ON CONFLICT DO NOTHING
                RETURNING user_id, amount
             ), per_user AS (
                SELECT user_id, sum(amount)::bigint AS amount FROM e GROUP BY user_id
             ), up AS (
                UPDATE point_accounts a SET balance = a.balance + p.amount, updated_at = now()
                  FROM per_user p WHERE a.user_id = p.user_id
             )
             SELECT count(*) FROM e"
            ),
            &[&users],
        )
        .await
        .context("refunding cancelled orders paid with points")?
        .get(0);
    tx.commit().await.context("committing the refunds")?;
    Ok(n as usize)
}

/// Committed point credits (charges, grants, refunds) of the last day whose Redis half
/// was lost (a crash or a Redis failure between the commit and the credit): applied now,
/// under their own token. Returns how many.
async fn reapply_point_credits<C: ConnectionLike>(
    db: &deadpool_postgres::Object,
    con: &mut C,
    shards: &Shards,
) -> anyhow::Result<usize> {
    let keys = shards.first();
    let rows = db
        .query(
            "SELECT id, user_id, amount FROM point_entries
              WHERE kind IN ('charge', 'grant', 'refund') AND at > now() - interval '1 day'
              ORDER BY id",
            &[],
        )
        .await
        .context("reading recent point credits")?;
    let mut applied = 0;
    for chunk in rows.chunks(SCAN_CHUNK) {
        let tokens: Vec<String> = chunk
            .iter()
            .map(|r| crate::redis::points_token(r.get(0)))
            .collect();
        let present: Vec<bool> = redis::cmd("SMISMEMBER")
            .arg(keys.applied())
            .arg(&tokens)
            .query_async(con)
            .await
            .context("reading the applied point-credit tokens")?;
        for ((r, token), present) in chunk.iter().zip(&tokens).zip(present) {
            if present {
                continue;
            }
            let done = crate::redis::credit_points(
                con,
                keys,
                token,
                r.get::<_, &str>(1),
                r.get::<_, i64>(2),
            )
            .await
            .context("applying a committed point credit")?;
            if done == crate::redis::Credited::Now {
                applied += 1;
            }
        }
    }
    Ok(applied)
}

async fn reapply_stock_changes<C: ConnectionLike>(
    db: &mut deadpool_postgres::Object,
    con: &mut C,
    shards: &Shards,
) -> anyhow::Result<usize> {
    use crate::domain::{Sku, UserId};
    use crate::redis::{adjust_token, cancel_token, receive_token};
    let rows = db
        .query(
            "SELECT m.sku, m.kind, m.reference, m.qty, s.per_user_limit, s.buckets, o.user_id
               FROM stock_movements m
               JOIN skus s ON s.sku = m.sku
               LEFT JOIN orders o ON m.kind = 'cancel' AND o.id::text = m.reference
              WHERE m.kind IN ('receive', 'cancel') OR (m.kind = 'adjust' AND m.qty > 0)
              ORDER BY m.id",
            &[],
        )
        .await
        .context("reading receipts and cancels")?;
    // Every SKU with buckets has them open in Redis: a crash between a SKU's creation and
    // that call, or a failover that lost it, would leave a bucket that does not know it
    // is one. Opened with the rules PostgreSQL holds under `locked_rules`.
    // SKUs this pass could not bring whole (a PATCH or a load held their row): none of
    // their changes run this pass, so no unit reaches Redis ahead of its limit, window
    // or buckets (a cancel's units do not wait for the initial stock by themselves).
    let mut skipped: std::collections::HashSet<Sku> = Default::default();
    if shards.count() > 1 {
        let hot: Vec<(String, usize)> = db
            .query("SELECT sku, buckets FROM skus WHERE buckets > 1", &[])
            .await
            .context("reading the SKUs with buckets")?
            .iter()
            .map(|r| (r.get(0), r.get::<_, i16>(1).max(1) as usize))
            .collect();
        for (sku, k) in hot {
            let Ok(sku) = Sku::parse(sku) else {
                continue;
            };
            let mut open = true;
            for g in shards.bucket_shards(&sku, k) {
                let here: bool = redis::cmd("HEXISTS")
                    .arg(shards.get(g).buckets())
                    .arg(sku.as_str())
                    .query_async(con)
                    .await
                    .context("reading a SKU's buckets")?;
                open &= here;
            }
            if open {
                continue;
            }
            let tx = db.transaction().await.context("starting a transaction")?;
            let Some((limit, window, k)) = locked_rules(&tx, sku.as_str()).await? else {
                skipped.insert(sku);
                continue;
            };
            crate::redis::buckets::open_buckets(con, shards, &sku, k, limit, window.as_deref())
                .await
                .context("opening the buckets of a SKU")?;
            tx.commit().await.context("ending a SKU's opening")?;
        }
    }
    let mut reapplied = 0;
    for chunk in rows.chunks(SCAN_CHUNK) {
        let mut changes = Vec::new();
        for r in chunk {
            let Ok(sku) = Sku::parse(r.get::<_, String>("sku")) else {
                continue;
            };
            let reference: String = r.get("reference");
            let qty: i64 = r.get("qty");
            match r.get::<_, &str>("kind") {
                "cancel" => {
                    let (Some(order), Some(Ok(user))) = (
                        OrderId::parse(&reference),
                        r.get::<_, Option<String>>("user_id").map(UserId::parse),
                    ) else {
                        continue;
                    };
                    // The buyer's bucket, for a SKU with buckets.
                    let k = r.get::<_, i16>("buckets").max(1) as usize;
                    let g = shards.holding_shard(&sku, k, &user);
                    changes.push(Change {
                        token: cancel_token(&order, &sku),
                        sku,
                        qty,
                        limit: None,
                        user: Some(user),
                        shard: g,
                    });
                }
                kind => {
                    // A SKU's first receipt also set its per-user limit, and its sale
                    // window went to Redis before it (never stock without its window).
                    let initial = kind == "receive" && reference == INITIAL_REFERENCE;
                    let limit = initial.then(|| i64::from(r.get::<_, i32>("per_user_limit")));
                    let token = if kind == "adjust" {
                        adjust_token(&sku, &reference)
                    } else {
                        receive_token(&sku, &reference)
                    };
                    let g = shards.of_sku(&sku);
                    changes.push(Change {
                        token,
                        sku,
                        qty,
                        limit,
                        user: None,
                        shard: g,
                    });
                }
            }
        }
        if changes.is_empty() {
            continue;
        }
        // Each token lives in its SKU's shard: one SMISMEMBER per shard involved.
        let mut by_shard: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, c) in changes.iter().enumerate() {
            by_shard.entry(c.shard).or_default().push(i);
        }
        let mut present = vec![false; changes.len()];
        for (g, at) in &by_shard {
            let found: Vec<bool> = redis::cmd("SMISMEMBER")
                .arg(shards.get(*g).applied())
                .arg(
                    at.iter()
                        .map(|&i| changes[i].token.as_str())
                        .collect::<Vec<_>>(),
                )
                .query_async(con)
                .await
                .context("reading the applied stock-change tokens")?;
            for (&i, f) in at.iter().zip(found) {
                present[i] = f;
            }
        }
        for (c, present) in changes.iter().zip(present) {
            if present || skipped.contains(&c.sku) {
                continue;
            }
            // A SKU's initial stock brings its limit and window: the ones PostgreSQL holds
            // now, under `locked_rules` until written (never an older window over a
            // PATCH); skipped this pass while a PATCH holds the row.
            let initial = c.limit.is_some();
            let (applied, _) = if initial {
                let tx = db.transaction().await.context("starting a transaction")?;
                let Some((limit, window, _)) = locked_rules(&tx, c.sku.as_str()).await? else {
                    skipped.insert(c.sku.clone());
                    continue;
                };
                let done = reapply_one(con, shards, c, Some(limit), window.as_deref()).await?;
                tx.commit().await.context("ending a re-apply")?;
                done
            } else {
                reapply_one(con, shards, c, None, None).await?
            };
            if applied == crate::redis::Applied::Now {
                reapplied += 1;
            }
        }
    }
    Ok(reapplied)
}

/// Applies one committed change; a receipt or an addition waits for its SKU's initial
/// stock (applied first when it was lost too: the changes come in ledger order).
async fn reapply_one<C: ConnectionLike>(
    con: &mut C,
    shards: &Shards,
    c: &Change,
    limit: Option<i64>,
    window: Option<&str>,
) -> anyhow::Result<(crate::redis::Applied, i64)> {
    let after =
        (c.user.is_none() && c.limit.is_none()).then(|| crate::redis::initial_token(&c.sku));
    crate::redis::apply_stock_status(
        con,
        shards.get(c.shard),
        &crate::redis::StockChange {
            sku: &c.sku,
            units: c.qty,
            token: &c.token,
            per_user_limit: limit,
            user: c.user.as_ref().map(|u| (u, -c.qty)),
            window,
            after: after.as_deref(),
        },
    )
    .await
    .context("applying a committed stock change")
}

/// The reference of a SKU's initial stock in the ledger (what `POST /v1/skus` writes).
pub const INITIAL_REFERENCE: &str = "initial";

/// One pass over every invariant.
async fn check_once<C: ConnectionLike>(
    pool: &Pool,
    con: &mut C,
    shards: &Shards,
) -> anyhow::Result<Vec<Violation>> {
    let mut out = Vec::new();
    let mut db = pool.get().await.context("PostgreSQL connection")?;
    // Read-only and bounded: a check abandoned by its caller (Ctrl-C) must not leave a
    // long query running in PostgreSQL.
    let db = db.transaction().await?;
    db.batch_execute("SET TRANSACTION READ ONLY; SET LOCAL statement_timeout = '120s'")
        .await?;
    let mut epoch = true;
    for (g, keys) in shards.iter() {
        if !crate::redis::stock_loaded(con, keys).await? {
            epoch = false;
            out.push(v(
                "stock_not_loaded",
                format!(
                    "Redis shard {g} has no stock epoch: its SKUs are answered 503 until `floodgate reconcile`"
                ),
            ));
        }
    }
    // Every shard's levels; summed per SKU below over the SKU's buckets (one for most),
    // and one found in a shard that holds none of its buckets is reported (a load with
    // another shard count left it there).
    let mut found: Vec<(usize, String, i64)> = Vec::new();
    for (g, keys) in shards.iter() {
        let here: BTreeMap<String, i64> = redis::cmd("HGETALL")
            .arg(keys.stock())
            .query_async(con)
            .await?;
        found.extend(here.into_iter().map(|(sku, units)| (g, sku, units)));
    }
    let held = held_by_reservations(con, shards).await?;
    // What reserve.lua decides by besides the levels: each shard's limits and windows.
    let mut rules: BTreeMap<(usize, String), (Option<i64>, Option<String>)> = BTreeMap::new();
    for (g, keys) in shards.iter() {
        let (limits, windows): (BTreeMap<String, i64>, BTreeMap<String, String>) = redis::pipe()
            .hgetall(keys.limits())
            .hgetall(keys.windows())
            .query_async(con)
            .await?;
        for (sku, l) in limits {
            rules.entry((g, sku)).or_default().0 = Some(l);
        }
        for (sku, w) in windows {
            rules.entry((g, sku)).or_default().1 = Some(w);
        }
    }
    let rows = db
        .query(
            // One grouped pass over each table (hash aggregates), not a correlated sum
            // per SKU: linear in history, seconds at millions of orders.
            "WITH confirmed AS (
                 SELECT u.sku, sum(u.qty) AS units
                   FROM order_units u JOIN orders o ON o.id = u.order_id
                  WHERE o.status = 'confirmed'
                  GROUP BY u.sku),
             ledger AS (
                 SELECT m.sku,
                        sum(CASE m.kind WHEN 'sale' THEN m.qty WHEN 'cancel' THEN -m.qty ELSE 0 END) AS sold,
                        sum(CASE m.kind WHEN 'receive' THEN m.qty WHEN 'adjust' THEN m.qty ELSE 0 END) AS received
                   FROM stock_movements m
                  GROUP BY m.sku)
             SELECT i.sku, i.on_hand, i.sold, s.buckets, s.per_user_limit, s.is_bundle,
                    floor(extract(epoch FROM s.sale_starts_at) * 1000)::bigint AS starts_ms,
                    floor(extract(epoch FROM s.sale_ends_at) * 1000)::bigint AS ends_ms,
                    coalesce(c.units, 0)::bigint AS confirmed,
                    coalesce(l.sold, 0)::bigint AS ledger_sold,
                    coalesce(l.received, 0)::bigint AS ledger_received
               FROM inventory i
               JOIN skus s ON s.sku = i.sku
               LEFT JOIN confirmed c ON c.sku = i.sku
               LEFT JOIN ledger l ON l.sku = i.sku
              ORDER BY i.sku",
            &[],
        )
        .await
        .context("reading inventory")?;
    let counts: BTreeMap<&str, usize> = rows
        .iter()
        .map(|r| (r.get("sku"), r.get::<_, i16>("buckets").max(1) as usize))
        .collect();
    // Units on their way between two buckets count as the SKU's.
    let mut redis_stock: BTreeMap<String, i64> = crate::redis::buckets::in_transit(con, shards)
        .await
        .context("reading moves between buckets")?;
    let mut levels_seen: std::collections::BTreeSet<String> = Default::default();
    for (g, sku, units) in found {
        let k = counts.get(sku.as_str()).copied().unwrap_or(1);
        let home = crate::domain::Sku::parse(sku.as_str())
            .map(|s| shards.bucket_shards(&s, k).contains(&g));
        if home.unwrap_or(false) {
            *redis_stock.entry(sku.clone()).or_default() += units;
            levels_seen.insert(sku);
        } else {
            out.push(v(
                "redis_misplaced",
                format!("{sku}: in Redis shard {g}, which holds none of its buckets"),
            ));
        }
    }
    redis_stock.retain(|sku, _| levels_seen.contains(sku));
    let bundles = crate::stock::bundle_defs(&*db).await?;
    let mut redis_bundles: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for (g, keys) in shards.iter() {
        let here: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(keys.bundles())
            .query_async(con)
            .await?;
        redis_bundles.extend(here.into_iter().map(|(b, f)| (b, (g, f))));
    }
    for r in &rows {
        let sku: String = r.get("sku");
        let (on_hand, sold): (i64, i64) = (r.get("on_hand"), r.get("sold"));
        let confirmed: i64 = r.get("confirmed");
        let ledger_sold: i64 = r.get("ledger_sold");
        let ledger_received: i64 = r.get("ledger_received");
        if r.get::<_, bool>("is_bundle") {
            // No stock of its own: its order lines count as its components' units.
            if (on_hand, sold, confirmed, ledger_sold, ledger_received) != (0, 0, 0, 0, 0) {
                out.push(v(
                    "bundle_has_stock",
                    format!(
                        "{sku}: a bundle with on_hand {on_hand}, sold {sold}, ledger sales {ledger_sold}, ledger receipts {ledger_received}"
                    ),
                ));
            }
            if let Some(level) = redis_stock.get(&sku) {
                out.push(v(
                    "bundle_has_stock",
                    format!("{sku}: a bundle with a stock level in Redis ({level})"),
                ));
            }
            let Ok(parsed) = crate::domain::Sku::parse(sku.as_str()) else {
                continue;
            };
            let want = bundles.get(&parsed).map(|d| d.field());
            let found = redis_bundles.remove(&sku);
            if want.is_none() {
                out.push(v(
                    "bundle_undefined",
                    format!("{sku}: a bundle without components in PostgreSQL"),
                ));
            }
            if epoch {
                let g = shards.of_sku(&parsed);
                if found.as_ref().map(|(fg, f)| (*fg, f)) != want.as_ref().map(|w| (g, w)) {
                    out.push(v(
                        "redis_bundle_differs",
                        format!("{sku}: Redis has {found:?}, PostgreSQL {want:?} in shard {g}"),
                    ));
                }
                let limit = i64::from(r.get::<_, i32>("per_user_limit"));
                let window = crate::redis::window_field(r.get("starts_ms"), r.get("ends_ms"));
                let (l, w) = rules.get(&(g, sku.clone())).cloned().unwrap_or_default();
                if l.unwrap_or(0) != limit || w != window {
                    out.push(v(
                        "redis_rules_differ",
                        format!(
                            "{sku}: Redis shard {g} has limit {l:?} and window {w:?}, PostgreSQL limit {limit} and window {window:?}"
                        ),
                    ));
                }
            }
            continue;
        }
        if sold > on_hand {
            out.push(v(
                "oversold",
                format!("{sku}: sold {sold} > on_hand {on_hand}"),
            ));
        }
        if confirmed != sold {
            out.push(v(
                "orders_differ",
                format!(
                    "{sku}: confirmed order lines hold {confirmed} units, inventory sold {sold}"
                ),
            ));
        }
        if ledger_sold != sold {
            out.push(v(
                "ledger_differs",
                format!("{sku}: ledger sales {ledger_sold}, inventory sold {sold}"),
            ));
        }
        if ledger_received != on_hand {
            out.push(v(
                "ledger_differs",
                format!("{sku}: ledger receipts {ledger_received}, inventory on_hand {on_hand}"),
            ));
        }
        if epoch && let Ok(parsed) = crate::domain::Sku::parse(sku.as_str()) {
            // Every bucket's shard decides by the SKU's limit and window as PostgreSQL
            // has them (a PATCH lost in a failover would show here).
            let limit = i64::from(r.get::<_, i32>("per_user_limit"));
            let window = crate::redis::window_field(r.get("starts_ms"), r.get("ends_ms"));
            let k = r.get::<_, i16>("buckets").max(1) as usize;
            for g in shards.bucket_shards(&parsed, k) {
                let (l, w) = rules.get(&(g, sku.clone())).cloned().unwrap_or_default();
                if redis_stock.contains_key(&sku) && (l.unwrap_or(0) != limit || w != window) {
                    out.push(v(
                        "redis_rules_differ",
                        format!(
                            "{sku}: Redis shard {g} has limit {l:?} and window {w:?}, PostgreSQL limit {limit} and window {window:?}"
                        ),
                    ));
                }
            }
        }
        if epoch {
            let expected = on_hand - sold - held.get(&sku).copied().unwrap_or(0);
            match redis_stock.get(&sku) {
                None => out.push(v("redis_missing", format!("{sku}: not in Redis"))),
                Some(a) if *a != expected => out.push(v(
                    "redis_differs",
                    format!("{sku}: Redis available {a}, PostgreSQL on_hand - sold - reserved = {expected}"),
                )),
                Some(_) => {}
            }
        }
    }
    for (bundle, (g, _)) in &redis_bundles {
        out.push(v(
            "redis_unknown_sku",
            format!("{bundle}: a bundle in Redis shard {g}, which PostgreSQL does not hold as one"),
        ));
    }
    for sku in redis_stock.keys() {
        if !rows.iter().any(|r| r.get::<_, &str>("sku") == sku) {
            out.push(v(
                "redis_unknown_sku",
                format!("{sku}: in Redis, not in PostgreSQL"),
            ));
        }
    }
    let unrecorded = db
        .query(
            "SELECT o.id::text FROM orders o WHERE o.status = 'confirmed' AND EXISTS (
                 SELECT 1 FROM order_units u WHERE u.order_id = o.id AND NOT EXISTS (
                     SELECT 1 FROM stock_movements m
                      WHERE m.kind = 'sale' AND m.reference = o.id::text AND m.sku = u.sku))
             LIMIT 20",
            &[],
        )
        .await?;
    let balances: BTreeMap<String, i64> = db
        .query("SELECT user_id, balance FROM point_accounts", &[])
        .await
        .context("reading point balances")?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    db.commit().await?;
    if epoch {
        out.extend(check_points(con, shards.first(), &balances).await?);
    }
    for r in unrecorded {
        out.push(v(
            "sale_unrecorded",
            format!(
                "confirmed order {} has a line without a sale row",
                r.get::<_, String>(0)
            ),
        ));
    }
    for (g, keys) in shards.iter() {
        out.extend(check_waitlists(con, g, keys).await?);
    }
    Ok(out)
}

/// Points (shard 0): what Redis holds for each user is what the user's open
/// reservations paid with points hold, and what may be spent plus what is held is
/// PostgreSQL's balance (`points_differ`); nothing spendable is negative.
async fn check_points<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    balances: &BTreeMap<String, i64>,
) -> anyhow::Result<Vec<Violation>> {
    let mut out = Vec::new();
    let redis = crate::redis::all_points(con, keys)
        .await
        .context("reading the points in Redis")?;
    let mut holds: BTreeMap<String, i64> = BTreeMap::new();
    walk_open_reservations(con, keys, |_, r| {
        if let Some(p) = r.paid {
            *holds.entry(r.user.to_string()).or_default() += p;
        }
    })
    .await?;
    let users: std::collections::BTreeSet<&String> = redis
        .keys()
        .chain(balances.keys())
        .chain(holds.keys())
        .collect();
    for u in users {
        let (spendable, held) = redis.get(u).copied().unwrap_or((0, 0));
        let holding = holds.get(u).copied().unwrap_or(0);
        let balance = balances.get(u).copied().unwrap_or(0);
        if held != holding {
            out.push(v(
                "points_differ",
                format!("user {u}: Redis holds {held} points for orders, their open reservations {holding}"),
            ));
        }
        if spendable + held != balance {
            out.push(v(
                "points_differ",
                format!(
                    "user {u}: Redis has {spendable} points spendable and {held} held, PostgreSQL's balance is {balance}"
                ),
            ));
        }
        if spendable < 0 {
            out.push(v(
                "points_negative",
                format!("user {u}: Redis has {spendable} points spendable"),
            ));
        }
    }
    Ok(out)
}

/// The waitlists of one shard: the units `wlw` says each SKU's waitlisted orders wait
/// for are what its list holds (`waitlist_differs`), and a head that fits in the level
/// was promoted (`waitlist_stalled`: units that came back by a path that did not
/// promote; the workers' promoter promotes it within a second).
async fn check_waitlists<C: ConnectionLike>(
    con: &mut C,
    g: usize,
    keys: &Keys,
) -> anyhow::Result<Vec<Violation>> {
    let mut out = Vec::new();
    for (sku, waiting) in crate::redis::waiting(con, keys)
        .await
        .context("reading the waitlisted SKUs")?
    {
        let (mut held, mut head) = (0, None);
        for (_, r) in crate::redis::waitlisted(con, keys, &sku)
            .await
            .context("reading a waitlist")?
        {
            let qty: i64 = r.lines.iter().map(|l| l.qty.get()).sum();
            head.get_or_insert(qty);
            held += qty;
        }
        if held != waiting {
            out.push(v(
                "waitlist_differs",
                format!(
                    "{sku}: Redis shard {g} counts {waiting} units waited for, its waitlist holds {held}"
                ),
            ));
        }
        let level: Option<i64> = redis::cmd("HGET")
            .arg(keys.stock())
            .arg(&sku)
            .query_async(con)
            .await?;
        if let (Some(level), Some(head)) = (level, head)
            && level >= head
        {
            out.push(v(
                "waitlist_stalled",
                format!(
                    "{sku}: {level} units on sale in shard {g} while the head of its waitlist waits for {head}"
                ),
            ));
        }
    }
    Ok(out)
}

/// Checks every invariant. Under traffic a pass can catch a batch between its commit and
/// its Redis update, so a violation counts only if it is seen in `passes` passes in a row,
/// 500 ms apart.
pub async fn check<C: ConnectionLike>(
    pool: &Pool,
    con: &mut C,
    shards: &Shards,
    passes: usize,
) -> anyhow::Result<Vec<Violation>> {
    let mut seen = check_once(pool, con, shards).await?;
    for _ in 1..passes.max(1) {
        if seen.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let next = check_once(pool, con, shards).await?;
        seen.retain(|s| next.contains(s));
    }
    Ok(seen)
}

/// Messages waiting in the intake and retry queues of every partition of `topology` and
/// in the `leftover` queues ([`Topology::leftovers`]).
pub async fn queued(
    ch: &Channel,
    topology: &Topology,
    leftover: &Leftovers,
) -> anyhow::Result<u64> {
    let mut n = 0u64;
    for q in topology.intake_and_retry_queues().chain(leftover.queues()) {
        let info = ch
            .queue_declare(
                q.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("inspecting queue {q}"))?;
        n += u64::from(info.message_count());
    }
    Ok(n)
}

/// Closes the gate (ingress answers 503), waits until the intake and retry queues (of
/// every partition, leftovers included) have been empty for `quiet` (every accepted order is in PostgreSQL), reloads Redis from
/// PostgreSQL and opens the gate. `progress` hears what it is waiting for.
pub async fn repair<C: ConnectionLike>(
    cfg: &Config,
    pool: &Pool,
    con: &mut C,
    quiet: Duration,
    timeout: Duration,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<usize> {
    let shards = cfg.shards();
    let topology = Topology::of(cfg);
    // Every shard's gate, and those of shards an earlier shard count had (their data is
    // never read again once the new count is recorded).
    let recorded: Option<usize> = redis::cmd("GET")
        .arg(shards.first().layout())
        .query_async(con)
        .await
        .context("reading the recorded shard count")?;
    // Nothing recorded: a pre-shards load (shard 0, kept as one shard until the reload so
    // that processes with another count stay refused through the drain), or shard 0 lost
    // its data while other shards kept theirs: every possible gate is closed.
    if recorded.is_none() && crate::redis::stock_loaded(con, shards.first()).await? {
        crate::stock::adopt_layout(con, &Shards::new(&cfg.namespace, 1)).await?;
    }
    let closing = recorded
        .unwrap_or(crate::redis::MAX_SHARDS)
        .clamp(shards.count(), crate::redis::MAX_SHARDS);
    for g in 0..closing {
        let _: () = redis::cmd("DEL")
            .arg(Keys::shard(&cfg.namespace, g).epoch())
            .query_async(con)
            .await
            .context("closing the gate")?;
    }
    progress("gate closed: ingress answers 503 until the reload");
    let conn = crate::amqp::Link::open(&cfg.amqp_url, "floodgate reconcile")
        .await
        .context("connecting to RabbitMQ")?;
    let ch = conn.channel().await?;
    topology.declare(&ch).await?;
    let leftover = topology.leftovers(&conn).await?;
    let started = Instant::now();
    let mut empty_since: Option<Instant> = None;
    loop {
        // Promoted orders not yet published are accepted orders PostgreSQL does not have
        // yet, like queued ones (the gate stops new promotions: `promote.lua`).
        let mut n = queued(&ch, &topology, &leftover).await?;
        for (_, keys) in shards.iter() {
            let promoted: u64 = redis::cmd("ZCARD")
                .arg(keys.promoted())
                .query_async(con)
                .await
                .context("counting promoted orders")?;
            n += promoted;
        }
        if n == 0 {
            let since = *empty_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= quiet {
                break;
            }
        } else {
            empty_since = None;
            progress(&format!("waiting for {n} queued orders to be committed"));
        }
        anyhow::ensure!(
            started.elapsed() < timeout,
            "the queues did not drain within {timeout:?}; is a worker running?"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    conn.close().await;
    let settled = settle(pool, con, &shards).await?;
    if settled != Settled::default() {
        progress(&format!(
            "settled {} reservations PostgreSQL had confirmed or cancelled, released {} it had failed, \
             re-applied {} lost changes or credits, refunded {} cancelled orders paid with points",
            settled.finished, settled.released, settled.reapplied, settled.refunded
        ));
    }
    let skus = stock::load(pool, con, &shards).await?;
    progress(&format!("reloaded {skus} SKUs from PostgreSQL; gate open"));
    Ok(skus)
}
