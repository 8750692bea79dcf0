//! Hot SKUs over several shards: **buckets** (`docs/design/redis-shards.md`).
//!
//! A SKU created with `buckets` = K (at most one per shard: [`Shards::effective_buckets`])
//! has K stock levels, bucket b in shard [`Shards::bucket_shard`]. A user always buys
//! from, and holds in, the same bucket ([`Shards::user_bucket`]), so the per-user limit
//! is one `HGET` beside the level, exact as with one bucket. Every bucket's shard holds
//! the SKU's field in its `buckets` hash: `reserve.lua` answers `moved` to a caller that
//! assumed another count, which then places the order again.
//!
//! Units move between buckets in two halves ([`move_units`]): out of the source
//! (`move_out.lua`, recorded in its `moves` hash), then into the destination
//! (`move_in.lua`, once per token). A unit is never in two buckets; between the halves
//! it is on sale nowhere, and any worker's rebalancer finishes the move
//! ([`Mover::finish_moves`]). Receipts and a SKU's initial stock go to bucket 0; the
//! rebalancer ([`Mover::rebalance`], each reaper tick) evens the buckets out, and an order
//! that finds its bucket short while the others have enough pulls units in first
//! ([`Mover::pull`]). With `FLOODGATE_REDIS_WAIT_REPLICAS`, each half waits for the
//! replicas before the next one runs, so a failover cannot lose a half whose successor
//! already ran (which would count the units twice, or not at all).

use super::{Redis, ReplicaWait, Shards};
use crate::domain::Sku;
use futures::future::join_all;
use redis::{RedisResult, Script};
use std::{collections::BTreeMap, sync::LazyLock};

static MOVE_OUT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/move_out.lua")));
static MOVE_IN: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/move_in.lua")));
static OPEN_BUCKET: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/open_bucket.lua")));

/// Opens the buckets of a new SKU with `k` buckets (`open_bucket.lua`, once per bucket):
/// in every bucket's shard its `buckets` field, per-user limit and sale window (`window`,
/// a [`super::window_field`]), and in buckets 1.. a level of 0 where there is none.
/// Bucket 0 goes last and gets no level here (the creation's receipt, applied after
/// this, makes it): until then the SKU is unknown everywhere an order would look first,
/// and a field never comes without its limit and window. A bucket already open is left
/// as it is (a PATCH may have changed its limit or window since). Nothing to do for one
/// bucket.
pub async fn open_buckets<C: redis::aio::ConnectionLike>(
    con: &mut C,
    shards: &Shards,
    sku: &Sku,
    k: usize,
    per_user_limit: i64,
    window: Option<&str>,
) -> RedisResult<()> {
    let at = shards.bucket_shards(sku, k);
    if at.len() < 2 {
        return Ok(());
    }
    for (b, g) in at.iter().enumerate().rev() {
        let keys = shards.get(*g);
        let _: i64 = OPEN_BUCKET
            .key(keys.buckets())
            .key(keys.limits())
            .key(keys.windows())
            .key(keys.stock())
            .arg(sku.as_str())
            .arg(at.len())
            .arg(per_user_limit)
            .arg(window.unwrap_or_default())
            .arg(if b > 0 { "1" } else { "0" })
            .invoke_async(con)
            .await?;
    }
    Ok(())
}

/// Moves units between the buckets of SKUs: cheap to clone.
#[derive(Clone)]
pub struct Mover {
    redis: Redis,
    shards: Shards,
    wait: Option<ReplicaWait>,
}

impl Mover {
    /// `wait`: the replicas each half of a move waits for (None: none).
    pub fn new(redis: Redis, shards: Shards, wait: Option<ReplicaWait>) -> Self {
        Self {
            redis,
            shards,
            wait,
        }
    }

    /// True unless replicas are asked for and shard `g`'s do not have its writes yet
    /// (`FLOODGATE_REDIS_WAIT_REPLICAS`); a write-off waits for it too.
    pub async fn replicated(&self, g: usize) -> bool {
        match &self.wait {
            None => true,
            Some(w) => w.holds(self.shards.get(g)).await,
        }
    }

    /// Moves up to `units` of `sku` from its bucket in shard `from` to its bucket in
    /// shard `to`, leaving at least `floor` in the source; returns the units taken out
    /// (fewer when the source has fewer above `floor`; 0 when either shard has no stock
    /// loaded). Units whose second half must wait (replicas behind) are finished by the
    /// next [`Mover::finish_moves`].
    pub async fn move_units(
        &self,
        sku: &Sku,
        (from, to): (usize, usize),
        units: i64,
        floor: i64,
    ) -> RedisResult<i64> {
        if from == to || units <= 0 {
            return Ok(0);
        }
        let mut con = self.redis.clone();
        let dest_epoch: Option<String> = redis::cmd("GET")
            .arg(self.shards.get(to).epoch())
            .query_async(&mut con)
            .await?;
        let Some(dest_epoch) = dest_epoch else {
            return Ok(0);
        };
        let token = uuid::Uuid::now_v7().to_string();
        let src = self.shards.get(from);
        let (taken, source_epoch): (i64, String) = MOVE_OUT
            .key(src.epoch())
            .key(src.stock())
            .key(src.moves())
            .key(src.stock_changes())
            .key(src.stock_seq())
            .key(src.move_mark("out", &token))
            .arg(sku.as_str())
            .arg(units)
            .arg(&token)
            .arg(to)
            .arg(&dest_epoch)
            .arg(floor.max(0))
            .invoke_async(&mut con)
            .await?;
        if taken > 0 {
            self.finish_move(
                from,
                &token,
                &Move {
                    sku: sku.as_str(),
                    to,
                    units: taken,
                    epoch: &dest_epoch,
                    source_epoch: Some(&source_epoch),
                },
            )
            .await?;
        }
        Ok(taken)
    }

    /// The second half of a move, then its record goes. Returns false when it must wait
    /// (a replica behind: the record stays for the next pass) or the destination was
    /// reloaded meanwhile (the units went back to the source, or a reload of the source
    /// counted them).
    async fn finish_move(&self, from: usize, token: &str, m: &Move<'_>) -> RedisResult<bool> {
        let mut con = self.redis.clone();
        let shards = &self.shards;
        let drop_record = |mut con: Redis| async move {
            let _: () = redis::cmd("HDEL")
                .arg(shards.get(from).moves())
                .arg(token)
                .query_async(&mut con)
                .await?;
            RedisResult::Ok(())
        };
        if m.to >= shards.count() {
            // A record from a load with more shards: that layout's data is never read
            // again.
            drop_record(con).await?;
            return Ok(false);
        }
        let dest = shards.get(m.to);
        // The source's half must be on its replicas before the destination's runs: a
        // failover that lost it after the destination added the units would count them
        // twice. Once the destination's half has run (its mark is there) that question
        // is settled: the half runs again whatever the source's replicas say, a repeat
        // that adds nothing and keeps its mark another day, so a record that waits long
        // for the replicas never outlives the mark (its units would be added again).
        let landed: bool = redis::cmd("EXISTS")
            .arg(dest.move_mark("in", token))
            .query_async(&mut con)
            .await?;
        if !landed && !self.replicated(from).await {
            return Ok(false);
        }
        let outcome: String = MOVE_IN
            .key(dest.epoch())
            .key(dest.stock())
            .key(dest.move_mark("in", token))
            .key(dest.stock_changes())
            .key(dest.stock_seq())
            .arg(m.sku)
            .arg(m.units)
            .arg(token)
            .arg(m.epoch)
            .invoke_async(&mut con)
            .await?;
        let mut settled_in = m.to;
        if outcome == "stale" {
            // The destination was reloaded (or lost its data) since the units left. If
            // the source was not, the units go back to it, once: a load of the
            // destination alone did not count them. If it was, its load counted them and
            // dropped this record (this is a mover that read it before): nothing to give.
            let src = shards.get(from);
            let back: String = match m.source_epoch {
                Some(e) => {
                    MOVE_IN
                        .key(src.epoch())
                        .key(src.stock())
                        .key(src.move_mark("back", token))
                        .key(src.stock_changes())
                        .key(src.stock_seq())
                        .arg(m.sku)
                        .arg(m.units)
                        .arg(token)
                        .arg(e)
                        .invoke_async(&mut con)
                        .await?
                }
                None => "stale".to_owned(),
            };
            settled_in = from;
            tracing::warn!(
                sku = m.sku,
                units = m.units,
                returned = back != "stale",
                "a move between buckets found its destination reloaded: its units went back to the source, or were counted by a reload of it"
            );
        }
        // The record goes only once the second half is on the replicas too: one lost in
        // a failover is run again from the record (its mark went with it).
        if !self.replicated(settled_in).await {
            return Ok(false);
        }
        drop_record(con).await?;
        Ok(outcome != "stale")
    }

    /// Finishes every move whose second half has not run (its mover died between the
    /// halves, or waited for replicas), in every shard; returns how many it finished.
    /// Safe beside movers still at work: each half runs once per token.
    pub async fn finish_moves(&self) -> RedisResult<usize> {
        if self.shards.count() == 1 {
            return Ok(0);
        }
        let mut con = self.redis.clone();
        let mut n = 0;
        for (g, keys) in self.shards.iter() {
            for (token, record) in &open_moves(&mut con, keys).await? {
                match Move::parse(record) {
                    Some(m) => {
                        self.finish_move(g, token, &m).await?;
                        n += 1;
                    }
                    None => {
                        tracing::warn!(token, record, "an unreadable move record; dropped");
                        let _: () = redis::cmd("HDEL")
                            .arg(keys.moves())
                            .arg(token)
                            .query_async(&mut con)
                            .await?;
                    }
                }
            }
        }
        Ok(n)
    }

    /// An order found its user's bucket of `sku` (in shard `to`) short of `wanted`
    /// units: moves units from the fullest other buckets into it until it has them.
    /// Returns the SKU's units over every bucket as read before the moves: when that is
    /// `wanted` or more the order may be decided again (others may have taken the units
    /// meanwhile).
    pub async fn pull(&self, sku: &Sku, k: usize, to: usize, wanted: i64) -> RedisResult<i64> {
        let mut levels: Vec<(usize, i64)> = bucket_levels(&self.redis, &self.shards, sku, k)
            .await?
            .into_iter()
            .map(|(g, l)| (g, l.unwrap_or(0).max(0)))
            .collect();
        let total: i64 = levels.iter().map(|(_, l)| l).sum();
        let mut need = wanted - levels.iter().find(|(g, _)| *g == to).map_or(0, |l| l.1);
        if total < wanted || need <= 0 {
            return Ok(total);
        }
        levels.sort_by_key(|(_, l)| -l);
        for (g, l) in levels {
            if need <= 0 || l == 0 {
                break;
            }
            if g != to {
                need -= self.move_units(sku, (g, to), l.min(need), 0).await?;
            }
        }
        Ok(total)
    }

    /// One pass of the rebalancer: finishes interrupted moves, then evens out the buckets
    /// of every SKU with buckets (the fullest gives half its surplus to the emptiest,
    /// until no two differ by more than one unit). Returns the units moved. Every worker
    /// runs one; they take turns per SKU (a one-second lease in the SKU's shard), and each
    /// move leaves its source at least the target level.
    pub async fn rebalance(&self) -> RedisResult<i64> {
        if self.shards.count() == 1 {
            return Ok(0);
        }
        self.finish_moves().await?;
        let mut moved = 0;
        let mut con = self.redis.clone();
        for (sku, k) in bucketed(&self.redis, &self.shards).await? {
            let lease: Option<String> = redis::cmd("SET")
                .arg(self.shards.for_sku(&sku).rebalancing(sku.as_str()))
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(1_000)
                .query_async(&mut con)
                .await?;
            if lease.is_none() {
                continue;
            }
            let read = bucket_levels(&self.redis, &self.shards, &sku, k).await?;
            // A bucket missing its level (its shard not loaded, or lost): leave it alone.
            let Some(mut levels) = read
                .into_iter()
                .map(|(g, l)| l.map(|l| (g, l.max(0))))
                .collect::<Option<Vec<_>>>()
            else {
                continue;
            };
            let total: i64 = levels.iter().map(|(_, l)| l).sum();
            let target = total.div_euclid(levels.len() as i64);
            for _ in 0..2 * levels.len() {
                let (hi, lo) = (
                    (0..levels.len()).max_by_key(|&i| levels[i].1).unwrap_or(0),
                    (0..levels.len()).min_by_key(|&i| levels[i].1).unwrap_or(0),
                );
                let gap = levels[hi].1 - levels[lo].1;
                if gap < 2 {
                    break;
                }
                let m = self
                    .move_units(&sku, (levels[hi].0, levels[lo].0), gap / 2, target)
                    .await?;
                if m == 0 {
                    break;
                }
                levels[hi].1 -= m;
                levels[lo].1 += m;
                moved += m;
            }
        }
        Ok(moved)
    }
}

/// A `moves` record: units on their way to the bucket in shard `to`.
struct Move<'a> {
    sku: &'a str,
    to: usize,
    units: i64,
    /// The destination's epoch when the units left.
    epoch: &'a str,
    /// The source's epoch then (absent in a record of an older version).
    source_epoch: Option<&'a str>,
}

impl<'a> Move<'a> {
    fn parse(record: &'a str) -> Option<Self> {
        let mut f = record.split('|');
        Some(Self {
            sku: f.next()?,
            to: f.next()?.parse().ok()?,
            units: f.next()?.parse().ok()?,
            epoch: f.next()?,
            source_epoch: f.next(),
        })
    }
}

/// The level of each bucket of `sku` (K buckets), bucket 0 first; None for a bucket
/// whose shard does not know the SKU.
async fn bucket_levels(
    redis: &Redis,
    shards: &Shards,
    sku: &Sku,
    k: usize,
) -> RedisResult<Vec<(usize, Option<i64>)>> {
    let at = shards.bucket_shards(sku, k);
    let reads = at.iter().map(|&g| {
        let mut redis = redis.clone();
        let keys = shards.get(g);
        async move {
            redis::cmd("HGET")
                .arg(keys.stock())
                .arg(sku.as_str())
                .query_async::<Option<i64>>(&mut redis)
                .await
        }
    });
    let levels = join_all(reads).await;
    at.into_iter()
        .zip(levels)
        .map(|(g, l)| l.map(|l| (g, l)))
        .collect()
}

/// The SKUs with buckets, and their counts: every shard's `buckets` hash, each SKU once
/// (from its own shard).
async fn bucketed(redis: &Redis, shards: &Shards) -> RedisResult<Vec<(Sku, usize)>> {
    let mut con = redis.clone();
    let mut out = Vec::new();
    for (g, keys) in shards.iter() {
        let here: BTreeMap<String, usize> = redis::cmd("HGETALL")
            .arg(keys.buckets())
            .query_async(&mut con)
            .await?;
        for (sku, k) in here {
            if let Ok(sku) = Sku::parse(sku)
                && shards.of_sku(&sku) == g
            {
                out.push((sku, k));
            }
        }
    }
    Ok(out)
}

/// A shard's moves between their halves: token -> record.
async fn open_moves<C: redis::aio::ConnectionLike>(
    con: &mut C,
    keys: &super::Keys,
) -> RedisResult<BTreeMap<String, String>> {
    redis::cmd("HGETALL")
        .arg(keys.moves())
        .query_async(con)
        .await
}

/// Units of `sku` in `moves` records: taken out of one bucket, not yet in another
/// (reconcile counts them as the SKU's). A record whose second half already ran (its
/// `in` mark in the destination, or its `back` mark in the source) is not counted: its
/// units are in a level again, and the record only waits for the replicas before it
/// goes (counting it too would count those units twice).
pub async fn in_transit<C: redis::aio::ConnectionLike>(
    con: &mut C,
    shards: &Shards,
) -> RedisResult<BTreeMap<String, i64>> {
    let mut out = BTreeMap::new();
    if shards.count() == 1 {
        return Ok(out);
    }
    for (_, keys) in shards.iter() {
        for (token, record) in &open_moves(con, keys).await? {
            let Some(m) = Move::parse(record) else {
                continue;
            };
            // One key per command: the two marks live in different shards' slots.
            let back: bool = redis::cmd("EXISTS")
                .arg(keys.move_mark("back", token))
                .query_async(con)
                .await?;
            let arrived: bool = m.to < shards.count()
                && redis::cmd("EXISTS")
                    .arg(shards.get(m.to).move_mark("in", token))
                    .query_async(con)
                    .await?;
            if !(back || arrived) {
                *out.entry(m.sku.to_owned()).or_default() += m.units;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn move_records_read_back() {
        let m = Move::parse("hot-1.x|3|25|0193aa-bb|0193cc-dd").unwrap();
        assert_eq!(
            (m.sku, m.to, m.units, m.epoch, m.source_epoch),
            ("hot-1.x", 3, 25, "0193aa-bb", Some("0193cc-dd"))
        );
        assert_eq!(Move::parse("hot|3|25|e").unwrap().source_epoch, None);
        assert!(Move::parse("hot|x|1|e").is_none());
    }
}
