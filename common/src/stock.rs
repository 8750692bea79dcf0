//! Loading Redis from PostgreSQL, the system of record.

use crate::domain::Sku;
use crate::redis::{Shards, adjust_token, cancel_token, receive_token};
use anyhow::Context;
use deadpool_postgres::Pool;
use redis::aio::ConnectionLike;

/// Loads every shard ([`load_shards`]) and records the shard count ([`Shards::count`]) in
/// shard 0, where [`check_layout`] reads it.
pub async fn load<C: ConnectionLike>(
    pool: &Pool,
    con: &mut C,
    shards: &Shards,
) -> anyhow::Result<usize> {
    let all: Vec<usize> = (0..shards.count()).collect();
    // Recorded before any gate opens: a process with another count that starts meanwhile
    // is refused.
    record_layout(con, shards).await?;
    load_shards(pool, con, shards, &all).await
}

async fn record_layout<C: ConnectionLike>(con: &mut C, shards: &Shards) -> anyhow::Result<()> {
    redis::cmd("SET")
        .arg(shards.first().layout())
        .arg(shards.count())
        .query_async(con)
        .await
        .context("recording the shard count")
}

/// Records the shard count when none is (a namespace loaded by a version before shards:
/// one shard), so that a process with another count is refused from now on.
pub async fn adopt_layout<C: ConnectionLike>(con: &mut C, shards: &Shards) -> anyhow::Result<()> {
    let _: Option<String> = redis::cmd("SET")
        .arg(shards.first().layout())
        .arg(shards.count())
        .arg("NX")
        .query_async(con)
        .await
        .context("recording the shard count")?;
    Ok(())
}

/// Fails when Redis holds the namespace in another number of shards than `shards`: the
/// SKUs would be looked up where they are not (and a load of the missing shards would
/// count their units twice). Absent (a fresh or lost Redis): fine.
pub async fn check_layout<C: ConnectionLike>(con: &mut C, shards: &Shards) -> anyhow::Result<()> {
    // One read of both (one slot): a load between two reads could look like a namespace
    // loaded before shards.
    let (recorded, epoch): (Option<usize>, Option<String>) = redis::cmd("MGET")
        .arg(shards.first().layout())
        .arg(shards.first().epoch())
        .query_async(con)
        .await
        .context("reading the shard count Redis was loaded with")?;
    // Nothing recorded but shard 0 loaded: a version before shards loaded it, in one.
    let recorded = recorded.or(epoch.map(|_| 1));
    match recorded {
        Some(n) if n != shards.count() => anyhow::bail!(
            "Redis holds this namespace in {n} shards but FLOODGATE_REDIS_SHARDS is {}: set it \
             back, or change it as docs/OPERATIONS.md says (drain, then `floodgate reconcile`)",
            shards.count()
        ),
        _ => Ok(()),
    }
}

/// Held exclusively by a load ([`load_shards`]) from its snapshot of PostgreSQL until
/// its last Redis write, and shared by every request that changes Redis before its
/// PostgreSQL commit (a write-off, a PATCH): such a change commits either before the
/// snapshot (the load sees it) or after the load (it applies to the loaded levels),
/// never in between, where the load would overwrite it with what it replaced.
pub const LOAD_LOCK: &str =
    "SELECT pg_advisory_xact_lock(hashtext('floodgate.stock-load'), hashtext(current_schema()))";
/// The shared side of [`LOAD_LOCK`], for the transaction of such a change.
pub const LOAD_LOCK_SHARED: &str = "SELECT pg_advisory_xact_lock_shared(hashtext('floodgate.stock-load'), hashtext(current_schema()))";
/// One SKU's adjustments, one at a time ($1: the SKU): held from before a write-off
/// takes its units in Redis until its record commits. The worker's settle pass takes
/// it with `pg_try_advisory_xact_lock` before giving back the units of a write-off that
/// never committed, so it never races one in flight.
pub const ADJUST_LOCK: &str =
    "SELECT pg_advisory_xact_lock(hashtext('floodgate.adjust'), hashtext($1))";
pub const ADJUST_TRY_LOCK: &str =
    "SELECT pg_try_advisory_xact_lock(hashtext('floodgate.adjust'), hashtext($1))";

/// Loads the shards `which` of `shards`: each SKU's available units (on_hand - sold),
/// per-user limits, sale windows, the units each user holds and the applied stock-change tokens, from
/// PostgreSQL into the shard the SKU lives in, replacing what was there, one MULTI per
/// shard (nobody sees half a shard's load), then sets each shard's stock epoch, which
/// opens it to ingress. Returns the number of SKUs loaded.
///
/// Orders still queued between ingress and the worker are not in PostgreSQL yet; loading
/// while they are in flight makes Redis count their units as available again. The caller
/// loads only when the intake queue is drained, or when the shard has no stock at all.
pub async fn load_shards<C: ConnectionLike>(
    pool: &Pool,
    con: &mut C,
    shards: &Shards,
    which: &[usize],
) -> anyhow::Result<usize> {
    let mut lock_db = pool.get().await.context("PostgreSQL connection")?;
    let lock = lock_db
        .transaction()
        .await
        .context("starting the load's lock")?;
    // A write-off in flight may hold the shared side for a few seconds (its own lock
    // waits): longer than the pool's lock_timeout, which would fail the load with the
    // gate already closed.
    lock.batch_execute("SET LOCAL lock_timeout = '60s'")
        .await
        .context("setting the load lock's wait")?;
    lock.execute(LOAD_LOCK, &[])
        .await
        .context("waiting for in-flight write-offs and SKU changes (the load lock)")?;
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
            "SELECT s.sku, s.per_user_limit, s.buckets, i.on_hand - i.sold AS available,
                    floor(extract(epoch FROM s.sale_starts_at) * 1000)::bigint AS starts_ms,
                    floor(extract(epoch FROM s.sale_ends_at) * 1000)::bigint AS ends_ms,
                    s.is_bundle
               FROM skus s JOIN inventory i USING (sku)",
            &[],
        )
        .await
        .context("reading inventory")?;
    let bundles = bundle_defs(&*db).await?;
    // Bundles expanded into their components' units, plus each bundle line itself (its
    // own per-user limit): what reserve.lua added to the users' holdings. A user's SKU of
    // a cancelled or failed order only is written as 0: a reload of a live Redis replaces
    // a holding whose give-back was lost rather than keeping it.
    let held = db
        .query(
            "SELECT o.user_id, h.sku, s.buckets,
                    coalesce(sum(h.qty) FILTER (WHERE o.status = 'confirmed'), 0)::bigint AS held
               FROM orders o JOIN order_holdings h ON h.order_id = o.id
               JOIN skus s ON s.sku = h.sku
              GROUP BY o.user_id, h.sku, s.buckets",
            &[],
        )
        .await
        .context("reading what users hold")?;
    let receipts = db
        .query(
            "SELECT m.sku, m.kind, m.reference, s.buckets, o.user_id
               FROM stock_movements m JOIN skus s ON s.sku = m.sku
               LEFT JOIN orders o ON m.kind = 'cancel' AND o.id::text = m.reference
              WHERE m.kind IN ('receive', 'cancel') OR (m.kind = 'adjust' AND m.qty > 0)",
            &[],
        )
        .await
        .context("reading receipts")?;
    // The bundle lines of cancelled orders: their holdings went back under their own
    // tokens (no ledger row: a bundle has no stock), which a repeated cancel must find.
    let cancelled_bundles = db
        .query(
            "SELECT o.id, it.sku FROM orders o JOIN order_items it ON it.order_id = o.id
               JOIN skus s ON s.sku = it.sku AND s.is_bundle
              WHERE o.status = 'cancelled'",
            &[],
        )
        .await
        .context("reading cancelled bundle lines")?;
    // Points live in shard 0: every balance, and the tokens of the credits it counts
    // (a credit re-sent after the load finds its token and adds nothing).
    let (balances, credits) = if which.contains(&0) {
        let balances: Vec<(String, i64)> = db
            .query("SELECT user_id, balance FROM point_accounts", &[])
            .await
            .context("reading point balances")?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let credits: Vec<i64> = db
            .query(
                "SELECT id FROM point_entries WHERE kind IN ('charge', 'grant', 'refund')",
                &[],
            )
            .await
            .context("reading point credits")?
            .iter()
            .map(|r| r.get(0))
            .collect();
        (balances, credits)
    } else {
        Default::default()
    };
    db.commit().await.context("ending the snapshot")?;
    // Waitlisted orders live only in Redis: a load keeps them, and inside its MULTI
    // (`rewait.lua`, which sees the waitlists as they are when the holdings land)
    // rebuilds `wlw` from the lists and adds the units they hold back to the holdings
    // it writes. The (user, sku) pairs with a waitlisted order now: only those can need
    // it (while the gate is closed waitlists only shrink).
    let waiting_pairs = waitlisted_pairs(con, shards, which).await?;
    // Per shard: the SKUs whose lists rewait.lua reads, and the pairs it adds to.
    let mut shard_skus: std::collections::BTreeMap<usize, Vec<String>> = Default::default();
    let mut rewrite: std::collections::BTreeMap<usize, Vec<(String, String)>> = Default::default();

    let mut pipes: std::collections::BTreeMap<usize, redis::Pipeline> = which
        .iter()
        .map(|&g| {
            let keys = shards.get(g);
            let mut pipe = redis::pipe();
            pipe.atomic();
            // Moves between buckets in flight are dropped with the levels they came from:
            // the load counts their units (see `move_in.lua`).
            pipe.del(keys.stock())
                .del(keys.bundles())
                .del(keys.limits())
                .del(keys.applied())
                .del(keys.buckets())
                .del(keys.windows())
                .del(keys.takes())
                .del(keys.moves());
            (g, pipe)
        })
        .collect();
    let mut loaded = 0;
    for r in &skus {
        let sku: String = r.get("sku");
        let Ok(parsed) = Sku::parse(sku.as_str()) else {
            continue;
        };
        if r.get::<_, bool>("is_bundle") {
            // No stock field: its rules and its definition, in its own shard.
            let g = shards.of_sku(&parsed);
            let (Some(pipe), Some(def)) = (pipes.get_mut(&g), bundles.get(&parsed)) else {
                continue;
            };
            let keys = shards.get(g);
            pipe.hset(keys.limits(), &sku, r.get::<_, i32>("per_user_limit"));
            if let Some(w) = crate::redis::window_field(r.get("starts_ms"), r.get("ends_ms")) {
                pipe.hset(keys.windows(), &sku, w);
            }
            pipe.hset(keys.bundles(), &sku, def.field());
            loaded += 1;
            continue;
        }
        let at = shards.bucket_shards(&parsed, bucket_count(r));
        if at.len() == 1 {
            // A SKU of one bucket may have a waitlist (in its shard).
            shard_skus.entry(at[0]).or_default().push(sku.clone());
        }
        let available: i64 = r.get("available");
        // A SKU with buckets: its units evenly over them (the first ones get the
        // remainder), when every bucket is loaded now. Loading only some of them (their
        // shards lost their data) gives those none: the others still hold what they had,
        // and PostgreSQL cannot say how it was split, so the lost buckets' units stay out
        // of sale until a full `floodgate reconcile` (never sold twice). `--check` shows
        // them as `redis_differs`.
        let whole = at.iter().all(|g| pipes.contains_key(g));
        let k = at.len() as i64;
        if !whole && at.iter().any(|g| pipes.contains_key(g)) {
            tracing::warn!(
                sku,
                "a SKU with buckets loaded in part: the reloaded buckets start empty until a full reconcile"
            );
        }
        for (b, g) in at.iter().enumerate() {
            let Some(pipe) = pipes.get_mut(g) else {
                continue;
            };
            let keys = shards.get(*g);
            let share = if !whole {
                0
            } else {
                available / k + i64::from((b as i64) < available % k)
            };
            if k > 1 {
                pipe.hset(keys.buckets(), &sku, k);
            }
            pipe.hset(keys.stock(), &sku, share);
            pipe.hset(keys.limits(), &sku, r.get::<_, i32>("per_user_limit"));
            if let Some(w) = crate::redis::window_field(r.get("starts_ms"), r.get("ends_ms")) {
                pipe.hset(keys.windows(), &sku, w);
            }
        }
        loaded += 1;
    }
    for r in &held {
        let Ok(user) = crate::domain::UserId::parse(r.get::<_, String>("user_id")) else {
            continue;
        };
        let Ok(sku) = Sku::parse(r.get::<_, String>("sku")) else {
            continue;
        };
        let g = shards.holding_shard(&sku, bucket_count(r), &user);
        if let Some(pipe) = pipes.get_mut(&g) {
            pipe.hset(
                shards.get(g).user(&user),
                sku.as_str(),
                r.get::<_, i64>("held"),
            );
            let pair = (user.to_string(), sku.to_string());
            if waiting_pairs.contains(&(g, pair.0.clone(), pair.1.clone())) {
                rewrite.entry(g).or_default().push(pair);
            }
        }
    }
    for (g, pipe) in pipes.iter_mut() {
        crate::redis::rewait(
            pipe,
            shards.get(*g),
            shard_skus.get(g).map_or(&[][..], Vec::as_slice),
            rewrite.get(g).map_or(&[][..], Vec::as_slice),
        );
    }
    for r in &receipts {
        let Ok(sku) = Sku::parse(r.get::<_, String>("sku")) else {
            continue;
        };
        let reference: &str = r.get("reference");
        let (token, g) = match r.get::<_, &str>("kind") {
            // A cancel went to the buyer's bucket; a receipt to bucket 0.
            "cancel" => match (
                crate::domain::OrderId::parse(reference),
                r.get::<_, Option<String>>("user_id")
                    .map(crate::domain::UserId::parse),
            ) {
                (Some(order), Some(Ok(user))) => (
                    cancel_token(&order, &sku),
                    shards.holding_shard(&sku, bucket_count(r), &user),
                ),
                _ => continue,
            },
            // Units added by an adjustment, like a receipt (a write-off's `takes` entry is
            // only needed until PostgreSQL records it, and this load starts from that).
            "adjust" => (adjust_token(&sku, reference), shards.of_sku(&sku)),
            _ => (receive_token(&sku, reference), shards.of_sku(&sku)),
        };
        if let Some(pipe) = pipes.get_mut(&g) {
            pipe.sadd(shards.get(g).applied(), token);
        }
    }
    for r in &cancelled_bundles {
        let order = crate::domain::OrderId::from(r.get::<_, uuid::Uuid>("id"));
        let Ok(bundle) = Sku::parse(r.get::<_, String>("sku")) else {
            continue;
        };
        let g = shards.of_sku(&bundle);
        if let Some(pipe) = pipes.get_mut(&g) {
            pipe.sadd(shards.get(g).applied(), cancel_token(&order, &bundle));
        }
    }
    if let Some(pipe) = pipes.get_mut(&0) {
        crate::redis::load_points(pipe, shards.first(), &balances, &credits);
    }
    for (g, pipe) in pipes {
        let _: () = pipe
            .query_async(con)
            .await
            .with_context(|| format!("writing stock to Redis (shard {g})"))?;
        // The gate opens only after the load succeeded, in a command of its own: a
        // cluster client may re-send the MULTI after a dropped connection, and a re-sent
        // load must not overwrite what orders reserved after a gate it had already
        // opened. A new value per load: a notifier that sees the epoch change re-reads
        // every level.
        let _: () = redis::cmd("SET")
            .arg(shards.get(g).epoch())
            .arg(uuid::Uuid::now_v7().to_string())
            .query_async(con)
            .await
            .with_context(|| format!("opening the gate (the stock epoch of shard {g})"))?;
    }
    lock.commit().await.context("releasing the load lock")?;
    // The loaded levels may cover a waitlist's head: it gets them before any new order.
    // (Until this runs a new order still takes only what is above the waitlist.)
    for &g in which {
        for (sku, _) in crate::redis::waiting(con, shards.get(g))
            .await
            .context("reading the waitlisted SKUs")?
        {
            crate::redis::promote_now(con, shards.get(g), &sku)
                .await
                .context("promoting waitlisted orders after the load")?;
        }
    }
    Ok(loaded)
}

/// (shard, user, sku) of every order on a waitlist of the shards `which`.
async fn waitlisted_pairs<C: ConnectionLike>(
    con: &mut C,
    shards: &Shards,
    which: &[usize],
) -> anyhow::Result<std::collections::HashSet<(usize, String, String)>> {
    let mut out = std::collections::HashSet::new();
    for &g in which {
        let keys = shards.get(g);
        for (sku, _) in crate::redis::waiting(con, keys)
            .await
            .context("reading the waitlisted SKUs")?
        {
            for (_, r) in crate::redis::waitlisted(con, keys, &sku)
                .await
                .context("reading a waitlist")?
            {
                out.insert((g, r.user.to_string(), sku.clone()));
            }
        }
    }
    Ok(out)
}

/// Every bundle's definition, from `bundle_components` (a bundle whose rows break the
/// rules, which the table's checks prevent, is left out and logged).
pub async fn bundle_defs(
    db: &impl tokio_postgres::GenericClient,
) -> anyhow::Result<crate::bundle::Bundles> {
    let rows = db
        .query(
            "SELECT bundle, sku, qty FROM bundle_components ORDER BY bundle, sku",
            &[],
        )
        .await
        .context("reading the bundles")?;
    let mut parts: std::collections::BTreeMap<String, Vec<(Sku, i64)>> = Default::default();
    for r in &rows {
        if let Ok(sku) = Sku::parse(r.get::<_, String>("sku")) {
            parts
                .entry(r.get("bundle"))
                .or_default()
                .push((sku, i64::from(r.get::<_, i32>("qty"))));
        }
    }
    let mut out = crate::bundle::Bundles::new();
    for (bundle, components) in parts {
        match (
            Sku::parse(bundle.as_str()),
            crate::bundle::BundleDef::new(components),
        ) {
            (Ok(b), Ok(def)) => {
                out.insert(b, def);
            }
            (_, Err(e)) => {
                tracing::error!(bundle, error = %e, "a bundle breaks the rules; left out")
            }
            (Err(e), _) => {
                tracing::error!(bundle, error = %e, "a bundle's id breaks the rules; left out")
            }
        }
    }
    Ok(out)
}

/// A row's `skus.buckets` (1 for any value out of range).
fn bucket_count(r: &tokio_postgres::Row) -> usize {
    r.get::<_, i16>("buckets").max(1) as usize
}

/// Loads the shards that have no epoch (a fresh namespace, a fresh Redis, a master that
/// lost its data), after checking the layout ([`check_layout`]). Returns whether it
/// loaded any.
pub async fn load_if_absent<C: ConnectionLike>(
    pool: &Pool,
    con: &mut C,
    shards: &Shards,
) -> anyhow::Result<bool> {
    check_layout(con, shards).await?;
    let mut absent = Vec::new();
    for (g, keys) in shards.iter() {
        if !crate::redis::stock_loaded(con, keys)
            .await
            .context("reading the stock epoch")?
        {
            absent.push(g);
        }
    }
    if absent.is_empty() {
        adopt_layout(con, shards).await?;
        return Ok(false);
    }
    record_layout(con, shards).await?;
    load_shards(pool, con, shards, &absent).await?;
    Ok(true)
}
