//! Points in Redis: what each user may spend now (`pts`) and what their open point-paid
//! reservations hold (`ptsheld`), in shard 0. PostgreSQL's `point_accounts` is the
//! record; these are its copy for the order's atomic decision (`reserve.lua` holds an
//! order's total from `pts` into `ptsheld`; `finish.lua` drops a committed order's hold,
//! `release.lua` and `reap.lua` give a failed or expired one's back). Credits that
//! PostgreSQL committed (charges, grants, refunds) come in once per token
//! ([`credit_points`]); a load rebuilds both from PostgreSQL ([`load_points`]).

use super::Keys;
use redis::{RedisResult, Script, aio::ConnectionLike};
use std::sync::LazyLock;

static CREDIT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/credit_points.lua")));

/// The token under which a committed credit (the `point_entries` row `entry`: a charge,
/// a grant or a refund) reaches Redis once.
pub fn points_token(entry: i64) -> String {
    format!("points:{entry}")
}

/// What [`credit_points`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credited {
    /// Added now.
    Now,
    /// Added before under the same token.
    Before,
    /// Not added: the stock is not loaded, and the load counts it from PostgreSQL.
    NotLoaded,
}

/// Adds `points` to `user`'s spendable points under `token`, once.
pub async fn credit_points<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    token: &str,
    user: &str,
    points: i64,
) -> RedisResult<Credited> {
    let n: i64 = CREDIT
        .key(keys.applied())
        .key(keys.points())
        .arg(token)
        .arg(user)
        .arg(points)
        .invoke_async(con)
        .await?;
    Ok(match n {
        1 => Credited::Now,
        0 => Credited::Before,
        _ => Credited::NotLoaded,
    })
}

/// `user`'s (spendable, held) points in Redis (0 for a user Redis has none of).
pub async fn points_of<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
    user: &str,
) -> RedisResult<(i64, i64)> {
    let (spendable, held): (Option<i64>, Option<i64>) = redis::pipe()
        .hget(keys.points(), user)
        .hget(keys.points_held(), user)
        .query_async(con)
        .await?;
    Ok((spendable.unwrap_or(0), held.unwrap_or(0)))
}

/// Every user's (spendable, held) points in Redis, for `reconcile --check`.
pub async fn all_points<C: ConnectionLike>(
    con: &mut C,
    keys: &Keys,
) -> RedisResult<std::collections::BTreeMap<String, (i64, i64)>> {
    let (spendable, held): (
        std::collections::HashMap<String, i64>,
        std::collections::HashMap<String, i64>,
    ) = redis::pipe()
        .hgetall(keys.points())
        .hgetall(keys.points_held())
        .query_async(con)
        .await?;
    let mut all = std::collections::BTreeMap::new();
    for (u, s) in spendable {
        all.entry(u).or_insert((0, 0)).0 = s;
    }
    for (u, h) in held {
        all.entry(u).or_insert((0, 0)).1 = h;
    }
    Ok(all)
}

/// Users per script call of [`load_points`]: bounds one EVAL's arguments.
const LOAD_CHUNK: usize = 5_000;

/// Adds to a load's MULTI (`pipe`, shard 0's) the points of every user from PostgreSQL's
/// `balances`. First `ptsheld` is rebuilt from the open reservations as they are then
/// (the `deadlines` zset: each open one's `paid`), so a hold that drifted (a script of an
/// older version that gave units back without it) is repaired; then `pts` is each
/// balance less that hold (an open reservation's finish or release still comes). The
/// tokens of the committed `credits` (entry ids) go back into `applied` (the load
/// deleted it): a credit the balances count is never added again.
pub fn load_points(
    pipe: &mut redis::Pipeline,
    keys: &Keys,
    balances: &[(String, i64)],
    credits: &[i64],
) {
    let mut rehold = redis::cmd("EVAL");
    rehold
        .arg(
            "redis.call('DEL', KEYS[2])
             local p = string.sub(KEYS[1], 1, #KEYS[1] - 9)
             for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
               local r = redis.call('HMGET', p .. 'resv:' .. id, 'state', 'paid', 'user')
               if (r[1] == 'reserved' or r[1] == 'queued' or r[1] == 'claimed')
                  and r[2] and tonumber(r[2]) > 0 then
                 redis.call('HINCRBY', KEYS[2], r[3], tonumber(r[2]))
               end
             end
             return 0",
        )
        .arg(2)
        .arg(keys.deadlines())
        .arg(keys.points_held());
    pipe.add_command(rehold).ignore();
    pipe.del(keys.points());
    for chunk in balances.chunks(LOAD_CHUNK) {
        // EVAL, not EVALSHA: inside a MULTI a script Redis has not cached would fail.
        let mut eval = redis::cmd("EVAL");
        eval.arg(
            "for i = 1, #ARGV, 2 do
               local held = tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or '0')
               redis.call('HSET', KEYS[1], ARGV[i], tonumber(ARGV[i + 1]) - held)
             end
             return 0",
        )
        .arg(2)
        .arg(keys.points())
        .arg(keys.points_held());
        for (user, balance) in chunk {
            eval.arg(user).arg(*balance);
        }
        pipe.add_command(eval).ignore();
    }
    for chunk in credits.chunks(LOAD_CHUNK) {
        pipe.sadd(
            keys.applied(),
            chunk.iter().map(|&e| points_token(e)).collect::<Vec<_>>(),
        );
    }
}
