//! Orders over shards: the calls that act on every part of an order, or on many orders
//! at once, grouping their work per shard (one script call per shard, the shards at once).
//! See [`super::shards`] for the rules; with one shard each of these is exactly the one
//! script call it wraps.

use super::{
    Claim, ConfirmedOrder, Part, Queued, Redis, Release, Reservation, Reserve, ReserveRequest,
    ResvState, Shards,
};
use crate::domain::{IdempotencyKey, OrderId, Sku, UserId};
use futures::future::join_all;
use redis::RedisResult;
use std::collections::BTreeMap;

/// Reserves an order in its `parts` ([`Shards::parts`]; `req.held` and `req.first` are
/// ignored): the first part alone (it answers a repeated Idempotency-Key before anything
/// else is touched), then the others at once. All reserved: [`Reserve::Reserved`]. Otherwise every part
/// that was reserved is released (`refused`: never accepted, the key is free again, the
/// released record kept only [`super::REFUSED_TTL_SECS`]) and the answer is the first
/// refusal in the order's parts, or the first error. The first part failing (an error,
/// not a refusal) is released too: its script may have run and only the reply been lost.
/// A release that fails leaves its part to the reaper (its deadline passes unconfirmed).
pub async fn reserve_parts(
    redis: &Redis,
    shards: &Shards,
    parts: &[Part],
    req: &ReserveRequest<'_>,
) -> RedisResult<Reserve> {
    // One part: the order's own reservation, as without shards.
    let deciding = (parts.len() > 1).then_some(parts[0].shard);
    let key = req.idempotency.map(|(k, _)| k);
    let first = match reserve_part(redis, shards, &parts[0], req, deciding, true).await {
        Ok(first) => first,
        Err(e) => {
            // The script may have run with only its reply lost (a response timeout; a
            // stalled node runs it once it goes on): give back what it may hold now, not
            // at its deadline, so the error (a 503 at ingress) holds nothing and leaves
            // no expired order behind. Sent on the connection the reserve went out on,
            // after it, so it runs after it; in a task, so the error is answered now and
            // not after a second timeout. If the connection was lost meanwhile the
            // release may find nothing (the reserve may still run): the reaper returns
            // the part at its deadline, as it does when this release fails.
            let (redis, shards, user, key) = (
                redis.clone(),
                shards.clone(),
                req.user.clone(),
                key.cloned(),
            );
            let (order_id, shard) = (req.order_id, parts[0].shard);
            tokio::spawn(async move {
                if let Err(re) = release_parts(
                    &redis,
                    &shards,
                    &[shard],
                    &order_id,
                    &user,
                    key.as_ref(),
                    "refused",
                )
                .await
                {
                    tracing::warn!(error = %re, %order_id, "releasing an order whose reserve failed also failed; the reaper returns what it holds");
                }
            });
            return Err(e);
        }
    };
    if first != Reserve::Reserved || parts.len() == 1 {
        return Ok(first);
    }
    let rest = join_all(
        parts[1..]
            .iter()
            .map(|p| reserve_part(redis, shards, p, req, deciding, false)),
    )
    .await;
    if rest.iter().all(|r| matches!(r, Ok(Reserve::Reserved))) {
        return Ok(Reserve::Reserved);
    }
    let all: Vec<usize> = parts.iter().map(|p| p.shard).collect();
    if let Err(e) =
        release_parts(redis, shards, &all, &req.order_id, req.user, key, "refused").await
    {
        tracing::warn!(error = %e, order_id = %req.order_id, "releasing the reserved parts of a refused order failed; the reaper returns them");
    }
    let mut first_error = None;
    for r in rest {
        match r {
            Ok(Reserve::Reserved) => {}
            Ok(refusal) => return Ok(refusal),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.expect("a part that was not reserved"))
}

/// Reserves one part: its lines and the deciding part's shard (`deciding`, None for an
/// order of one part, which holds every line), and the Idempotency-Key when `with_key`.
async fn reserve_part(
    redis: &Redis,
    shards: &Shards,
    part: &Part,
    req: &ReserveRequest<'_>,
    deciding: Option<usize>,
    with_key: bool,
) -> RedisResult<Reserve> {
    // The record keeps its held lines when they are not the order's items: a part, or
    // an order with a bundle (whose limit line only a held line list marks).
    let own = deciding.is_none() && !part.lines.iter().any(|l| l.bundle);
    let req = ReserveRequest {
        held: (!own).then_some(part.lines.as_slice()),
        first: deciding,
        idempotency: req.idempotency.filter(|_| with_key),
        // Only an order of one part may wait: its promotion is one script.
        waitlist_until_ms: req.waitlist_until_ms.filter(|_| deciding.is_none()),
        ..*req
    };
    super::reserve(&mut redis.clone(), shards.get(part.shard), &req).await
}

/// Releases the order's part in each of `part_shards`, at once; the outcome of the first
/// (the deciding part). `key` names the Idempotency-Key record, which only a
/// `publish_failed` release of the part holding it removes.
pub async fn release_parts(
    redis: &Redis,
    shards: &Shards,
    part_shards: &[usize],
    order_id: &OrderId,
    user: &UserId,
    key: Option<&IdempotencyKey>,
    reason: &str,
) -> RedisResult<Release> {
    let outcomes = join_all(part_shards.iter().map(|&g| {
        let (mut redis, keys) = (redis.clone(), shards.get(g));
        async move { super::release(&mut redis, keys, order_id, user, key, reason).await }
    }))
    .await;
    let mut first = None;
    for o in outcomes {
        let o = o?;
        first.get_or_insert(o);
    }
    Ok(first.unwrap_or(Release::NotHeld))
}

/// Releases an order whose publish failed: the deciding part first, atomic against a
/// worker's claim. If this call released it, the other parts follow (a worker that
/// claimed one of them meanwhile finds the first part unpublished and releases it).
/// [`Release::Taken`] means a worker has the message after all: nothing else is touched.
pub async fn release_unpublished(
    redis: &Redis,
    shards: &Shards,
    part_shards: &[usize],
    order_id: &OrderId,
    user: &UserId,
    key: Option<&IdempotencyKey>,
) -> RedisResult<Release> {
    let first = release_parts(
        redis,
        shards,
        &part_shards[..1],
        order_id,
        user,
        key,
        "publish_failed",
    )
    .await?;
    // NotHeld may be this very release, re-sent by a cluster client after a dropped
    // reply: the record says whether the deciding part was released as unpublished.
    let ours = first == Release::Released
        || (first == Release::NotHeld
            && part_shards.len() > 1
            && super::reservation(&mut redis.clone(), shards.get(part_shards[0]), order_id)
                .await?
                .is_some_and(|r| {
                    r.state == ResvState::Released && r.reason.as_deref() == Some("publish_failed")
                }));
    if ours && part_shards.len() > 1 {
        release_parts(
            redis,
            shards,
            &part_shards[1..],
            order_id,
            user,
            None,
            "publish_failed",
        )
        .await?;
    }
    Ok(first)
}

/// One order a worker claims or finishes: its id and the shards of its parts.
#[derive(Debug, Clone)]
pub struct OrderParts<'a> {
    pub order_id: OrderId,
    pub user: &'a UserId,
    pub key: Option<&'a IdempotencyKey>,
    pub shards: Vec<usize>,
}

/// Runs `claim.lua` for a batch, one call per shard involved, at once; one [`Claim`] per
/// order, in order, combining its parts': the first part unpublished wins (ingress gave
/// up on it), then any part expired, released or missing, then claimed, and done only
/// when every part is done. A multi-part order whose deciding part was unpublished (never
/// accepted, never committed) has every part released here. One expired or released is
/// left to the caller: it records the order failed in PostgreSQL and settles the parts
/// by what PostgreSQL then holds (a lost Redis write may have left it confirmed there).
pub async fn claim_orders(
    redis: &Redis,
    shards: &Shards,
    orders: &[OrderParts<'_>],
) -> RedisResult<Vec<Claim>> {
    let per_part = per_shard(redis, shards, orders, |mut redis, keys, ids| async move {
        super::claim(&mut redis, &keys, &ids).await
    })
    .await?;
    let mut out = Vec::with_capacity(orders.len());
    for (o, claims) in orders.iter().zip(per_part) {
        let combined = combine(&claims);
        if o.shards.len() > 1 && combined == Claim::Unpublished {
            release_parts(
                redis,
                shards,
                &o.shards,
                &o.order_id,
                o.user,
                None,
                "publish_abandoned",
            )
            .await?;
        }
        out.push(combined);
    }
    Ok(out)
}

fn combine(claims: &[Claim]) -> Claim {
    if claims.first() == Some(&Claim::Unpublished) {
        return Claim::Unpublished;
    }
    for c in [
        Claim::Expired,
        Claim::Unpublished,
        Claim::Released,
        Claim::Missing,
    ] {
        if claims.contains(&c) {
            // A part released as abandoned (its first part was unpublished) reads
            // unpublished: the order was never accepted.
            return c;
        }
    }
    if claims.iter().all(|c| *c == Claim::Done) {
        Claim::Done
    } else {
        Claim::Claimed
    }
}

/// Runs `finish.lua` for committed orders, one call per shard involved, at once.
pub async fn finish_orders(
    redis: &Redis,
    shards: &Shards,
    orders: &[OrderParts<'_>],
) -> RedisResult<()> {
    per_shard(redis, shards, orders, |mut redis, keys, ids| async move {
        super::finish(&mut redis, &keys, &ids).await?;
        Ok(vec![(); ids.len()])
    })
    .await?;
    Ok(())
}

/// Runs `run` once per shard that holds a part of any of `orders`, with the ids of the
/// orders that have a part there, all shards at once; returns, per order, the answers of
/// its parts in the order of its `shards`.
async fn per_shard<'a, T, F, Fut>(
    redis: &Redis,
    shards: &Shards,
    orders: &[OrderParts<'a>],
    run: F,
) -> RedisResult<Vec<Vec<T>>>
where
    T: Clone,
    F: Fn(Redis, super::Keys, Vec<OrderId>) -> Fut,
    Fut: std::future::Future<Output = RedisResult<Vec<T>>>,
{
    // shard -> (order index, position among its parts)
    let mut by_shard: BTreeMap<usize, Vec<(usize, usize)>> = BTreeMap::new();
    for (i, o) in orders.iter().enumerate() {
        for (j, &g) in o.shards.iter().enumerate() {
            by_shard.entry(g).or_default().push((i, j));
        }
    }
    let calls = by_shard.iter().map(|(&g, at)| {
        let ids = at.iter().map(|&(i, _)| orders[i].order_id).collect();
        run(redis.clone(), shards.get(g).clone(), ids)
    });
    let answers = join_all(calls).await;
    let mut out: Vec<Vec<Option<T>>> = orders.iter().map(|o| vec![None; o.shards.len()]).collect();
    for ((_, at), answer) in by_shard.iter().zip(answers) {
        for (&(i, j), t) in at.iter().zip(answer?) {
            out[i][j] = Some(t);
        }
    }
    Ok(out
        .into_iter()
        .map(|v| {
            v.into_iter()
                .map(|t| t.expect("every part answered"))
                .collect()
        })
        .collect())
}

/// Runs `queued.lua` for confirmed parts, one call per shard involved, at once: one
/// [`Queued`] per entry, in order. Each entry is one part (its shard and its order).
pub async fn mark_parts_queued(
    redis: &Redis,
    shards: &Shards,
    parts: &[(usize, &ConfirmedOrder)],
) -> RedisResult<Vec<Queued>> {
    let mut by_shard: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, (g, _)) in parts.iter().enumerate() {
        by_shard.entry(*g).or_default().push(i);
    }
    let calls = by_shard.iter().map(|(&g, at)| {
        let (mut redis, keys) = (redis.clone(), shards.get(g));
        let orders: Vec<&ConfirmedOrder> = at.iter().map(|&i| parts[i].1).collect();
        async move { super::mark_queued(&mut redis, keys, &orders).await }
    });
    let answers = join_all(calls).await;
    let mut out = vec![Queued::Accepted; parts.len()];
    for ((_, at), answer) in by_shard.iter().zip(answers) {
        for (&i, q) in at.iter().zip(answer?) {
            out[i] = q;
        }
    }
    Ok(out)
}

/// An order's reservation, wherever its parts are (every shard is asked, at once, when
/// there are several): a released part if any (the order is settled or never existed),
/// else any part (each names the whole order); None if no shard knows it.
pub async fn find_reservation(
    redis: &Redis,
    shards: &Shards,
    order_id: &OrderId,
) -> RedisResult<Option<Reservation>> {
    let found = join_all(shards.iter().map(|(_, keys)| {
        let mut redis = redis.clone();
        async move { super::reservation(&mut redis, keys, order_id).await }
    }))
    .await;
    let mut any = None;
    for r in found {
        match r? {
            Some(r) if r.state == ResvState::Released => return Ok(Some(r)),
            Some(r) => {
                any.get_or_insert(r);
            }
            None => {}
        }
    }
    Ok(any)
}

/// Units available of each SKU, in order (None for a SKU Redis does not know), read from
/// each SKU's shard, with the SKU's other buckets added for a SKU that has buckets
/// ([`super::buckets`]), and a bundle's from its components'
/// ([`crate::bundle::BundleDef::available`]); None while a shard they live in has no
/// stock loaded. Units
/// moving between two buckets at the moment of the read are in neither (a move takes
/// milliseconds).
pub async fn levels(
    redis: &Redis,
    shards: &Shards,
    skus: &[&Sku],
) -> RedisResult<Option<Vec<Option<i64>>>> {
    Ok(levels_read(redis, shards, skus, false)
        .await?
        .map(|(l, _)| l))
}

/// [`levels`] and each SKU's sale window field (`windows`, None when it has none), read
/// in the same round trip per shard.
pub async fn levels_and_windows(
    redis: &Redis,
    shards: &Shards,
    skus: &[&Sku],
) -> RedisResult<Option<(Vec<Option<i64>>, Vec<Option<String>>)>> {
    levels_read(redis, shards, skus, true).await
}

/// [`levels_read_skus`], then a bundle's level from its components' (one more round
/// trip, only when a SKU asked for has no stock field: a bundle, or an unknown SKU).
async fn levels_read(
    redis: &Redis,
    shards: &Shards,
    skus: &[&Sku],
    with_windows: bool,
) -> RedisResult<Option<(Vec<Option<i64>>, Vec<Option<String>>)>> {
    let Some((mut levels, windows)) = levels_read_skus(redis, shards, skus, with_windows).await?
    else {
        return Ok(None);
    };
    let missing: Vec<usize> = (0..skus.len()).filter(|&i| levels[i].is_none()).collect();
    if missing.is_empty() {
        return Ok(Some((levels, windows)));
    }
    // One HMGET per shard of the SKUs without a level.
    let mut by_shard: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &i in &missing {
        by_shard.entry(shards.of_sku(skus[i])).or_default().push(i);
    }
    let defs = join_all(by_shard.into_iter().map(|(g, at)| {
        let (mut redis, keys) = (redis.clone(), shards.get(g));
        async move {
            let these: Vec<&str> = at.iter().map(|&i| skus[i].as_str()).collect();
            let fields: Vec<Option<String>> = redis::cmd("HMGET")
                .arg(keys.bundles())
                .arg(&these)
                .query_async(&mut redis)
                .await?;
            RedisResult::Ok(at.into_iter().zip(fields).collect::<Vec<_>>())
        }
    }))
    .await;
    let mut bundles = Vec::new();
    for d in defs {
        for (i, f) in d? {
            if let Some(def) = f.and_then(|f| crate::bundle::BundleDef::parse_field(&f).ok()) {
                bundles.push((i, def));
            }
        }
    }
    if bundles.is_empty() {
        return Ok(Some((levels, windows)));
    }
    let components: Vec<&Sku> = bundles
        .iter()
        .flat_map(|(_, d)| d.components().iter().map(|(c, _)| c))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let Some((found, _)) = levels_read_skus(redis, shards, &components, false).await? else {
        return Ok(None);
    };
    let level: BTreeMap<&Sku, i64> = components
        .iter()
        .zip(found)
        .filter_map(|(c, l)| Some((*c, l?)))
        .collect();
    for (i, def) in &bundles {
        levels[*i] = def.available(|c| level.get(c).copied());
    }
    Ok(Some((levels, windows)))
}

async fn levels_read_skus(
    redis: &Redis,
    shards: &Shards,
    skus: &[&Sku],
    with_windows: bool,
) -> RedisResult<Option<(Vec<Option<i64>>, Vec<Option<String>>)>> {
    let mut by_shard: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, s) in skus.iter().enumerate() {
        by_shard.entry(shards.of_sku(s)).or_default().push(i);
    }
    let many = shards.count() > 1;
    let calls = by_shard.iter().map(|(&g, at)| {
        let (mut redis, keys) = (redis.clone(), shards.get(g));
        let these: Vec<&str> = at.iter().map(|&i| skus[i].as_str()).collect();
        async move {
            if !super::stock_loaded(&mut redis, keys).await? {
                return Ok(None);
            }
            let mut pipe = redis::pipe();
            pipe.cmd("HMGET").arg(keys.stock()).arg(&these);
            if many {
                pipe.cmd("HMGET").arg(keys.buckets()).arg(&these);
            }
            if with_windows {
                pipe.cmd("HMGET").arg(keys.windows()).arg(&these);
            }
            let mut replies: std::collections::VecDeque<redis::Value> = pipe
                .query_async::<Vec<redis::Value>>(&mut redis)
                .await?
                .into();
            fn next<T: redis::FromRedisValue>(
                replies: &mut std::collections::VecDeque<redis::Value>,
            ) -> RedisResult<T> {
                Ok(redis::from_redis_value(
                    replies.pop_front().unwrap_or(redis::Value::Nil),
                )?)
            }
            let levels: Vec<Option<i64>> = next(&mut replies)?;
            let counts: Vec<Option<usize>> = if many {
                next(&mut replies)?
            } else {
                vec![None; these.len()]
            };
            let windows: Vec<Option<String>> = if with_windows {
                next(&mut replies)?
            } else {
                vec![None; these.len()]
            };
            Ok(Some((levels, counts, windows)))
        }
    });
    let answers: Vec<RedisResult<_>> = join_all(calls).await;
    let mut out = vec![None; skus.len()];
    let mut out_windows = vec![None; skus.len()];
    let mut bucketed: Vec<(usize, usize)> = Vec::new();
    for ((_, at), answer) in by_shard.iter().zip(answers) {
        let Some((levels, counts, windows)) = answer? else {
            return Ok(None);
        };
        for (((&i, l), k), w) in at.iter().zip(levels).zip(counts).zip(windows) {
            out[i] = l;
            out_windows[i] = w;
            if let Some(k) = k.filter(|k| *k > 1)
                && l.is_some()
            {
                bucketed.push((i, k));
            }
        }
    }
    // The other buckets of SKUs with buckets: one read per bucket, all at once.
    let reads = bucketed.iter().flat_map(|&(i, k)| {
        shards
            .bucket_shards(skus[i], k)
            .into_iter()
            .skip(1)
            .map(move |g| {
                let (mut redis, keys) = (redis.clone(), shards.get(g));
                async move {
                    let l: Option<i64> = redis::cmd("HGET")
                        .arg(keys.stock())
                        .arg(skus[i].as_str())
                        .query_async(&mut redis)
                        .await?;
                    RedisResult::Ok((i, l.unwrap_or(0)))
                }
            })
    });
    for r in join_all(reads).await {
        let (i, l) = r?;
        if let Some(total) = out[i].as_mut() {
            *total += l;
        }
    }
    Ok(Some((out, out_windows)))
}

/// True while every shard has its stock loaded.
pub async fn all_loaded(redis: &Redis, shards: &Shards) -> RedisResult<bool> {
    let loaded = join_all(shards.iter().map(|(_, keys)| {
        let mut redis = redis.clone();
        async move { super::stock_loaded(&mut redis, keys).await }
    }))
    .await;
    for l in loaded {
        if !l? {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_part_unpublished_decides_then_the_worst() {
        use Claim::*;
        assert_eq!(combine(&[Claimed]), Claimed);
        assert_eq!(combine(&[Unpublished, Claimed]), Unpublished);
        assert_eq!(combine(&[Claimed, Expired]), Expired);
        assert_eq!(combine(&[Claimed, Unpublished]), Unpublished);
        assert_eq!(combine(&[Done, Released]), Released);
        assert_eq!(combine(&[Claimed, Missing]), Missing);
        assert_eq!(combine(&[Done, Claimed]), Claimed);
        assert_eq!(combine(&[Done, Done]), Done);
    }
}
