//! Public stock levels, read from Redis (never PostgreSQL: this is hit by every shopper).

use crate::{error::ApiError, state::AppState};
use floodgate_common::{domain::Sku, redis as fredis};

/// Most SKUs one `GET /v1/stock` may ask for.
pub const MAX_STOCK_QUERY: usize = 100;

fn unavailable(e: redis::RedisError) -> ApiError {
    tracing::warn!(error = %e, "Redis unavailable");
    ApiError::Unavailable("Redis is unavailable".into())
}

/// The available units of each known SKU among `skus`; unknown ones are left out.
/// 503 while stock is not loaded.
pub async fn levels(st: &AppState, skus: &[Sku]) -> Result<Vec<(Sku, i64)>, ApiError> {
    let refs: Vec<&Sku> = skus.iter().collect();
    let Some(levels) = fredis::levels(&st.redis, &st.shards, &refs)
        .await
        .map_err(unavailable)?
    else {
        return Err(ApiError::Unavailable("stock levels are not loaded".into()));
    };
    Ok(skus
        .iter()
        .zip(levels)
        .filter_map(|(s, l)| l.map(|a| (s.clone(), a)))
        .collect())
}

/// One SKU's available units over all its buckets (0 if Redis does not know it, or has
/// no stock loaded), for admin views.
pub async fn available(st: &AppState, sku: &Sku) -> Result<i64, ApiError> {
    let levels = fredis::levels(&st.redis, &st.shards, &[sku])
        .await
        .map_err(unavailable)?;
    Ok(levels
        .and_then(|l| l.into_iter().next().flatten())
        .unwrap_or(0))
}

/// The available units and sale window of each known SKU among `skus`, as the public
/// stock reads show them: `{"sku","available"}`, plus `sale_starts_at` / `sale_ends_at`
/// for a SKU with a window (a storefront's countdown). 503 while stock is not loaded.
pub async fn public_levels(
    st: &AppState,
    skus: &[Sku],
) -> Result<Vec<serde_json::Value>, ApiError> {
    let refs: Vec<&Sku> = skus.iter().collect();
    let Some((levels, windows)) = fredis::levels_and_windows(&st.redis, &st.shards, &refs)
        .await
        .map_err(unavailable)?
    else {
        return Err(ApiError::Unavailable("stock levels are not loaded".into()));
    };
    Ok(skus
        .iter()
        .zip(levels)
        .zip(windows)
        .filter_map(|((s, l), w)| {
            let mut v = serde_json::json!({"sku": s, "available": l?});
            if let Some((starts, ends)) = w.as_deref().and_then(|w| w.split_once(',')) {
                for (name, ms) in [("sale_starts_at", starts), ("sale_ends_at", ends)] {
                    if let Some(t) = ms.parse::<i64>().ok().and_then(ms_rfc3339) {
                        v[name] = t.into();
                    }
                }
            }
            Some(v)
        })
        .collect())
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC (None out of range).
pub fn ms_rfc3339(ms: i64) -> Option<String> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .map(crate::repo::rfc3339)
}

/// The units waitlisted orders wait for, per SKU among `skus` that has a waitlist (one
/// `HMGET` per shard).
pub async fn waiting(
    st: &AppState,
    skus: &[Sku],
) -> Result<std::collections::HashMap<Sku, i64>, ApiError> {
    let mut by_shard: std::collections::BTreeMap<usize, Vec<&Sku>> = Default::default();
    for s in skus {
        by_shard.entry(st.shards.of_sku(s)).or_default().push(s);
    }
    let mut out = std::collections::HashMap::new();
    let mut con = st.redis.clone();
    for (g, skus) in by_shard {
        let units: Vec<Option<i64>> = redis::cmd("HMGET")
            .arg(st.shards.get(g).waiting())
            .arg(skus.iter().map(|s| s.as_str()).collect::<Vec<_>>())
            .query_async(&mut con)
            .await
            .map_err(unavailable)?;
        out.extend(
            skus.into_iter()
                .zip(units)
                .filter_map(|(s, u)| u.map(|u| (s.clone(), u))),
        );
    }
    Ok(out)
}
