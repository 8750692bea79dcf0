//! What every handler shares: cheap to clone.

use crate::{publisher::Publisher, queued::QueuedMarker};
use deadpool_postgres::Pool;
use floodgate_common::redis::Redis;
use floodgate_common::{Config, auth::Verifier, redis::Shards};
use governor::{DefaultKeyedRateLimiter, Quota};
use std::{num::NonZeroU32, sync::Arc};

/// Per-user order rate limiter (in-memory, per ingress instance).
pub type Limiter = DefaultKeyedRateLimiter<String>;

#[derive(Clone)]
pub struct AppState {
    pub cfg: Arc<Config>,
    /// The namespace's Redis shards (`FLOODGATE_REDIS_SHARDS`).
    pub shards: Arc<Shards>,
    /// Multiplexed: one connection serves every request, commands are pipelined.
    pub redis: Redis,
    /// PostgreSQL, for admin writes and order status reads; never on the reserve path.
    pub pg: Pool,
    /// Order-status reads: the replica when it has caught up, else `pg`.
    pub reads: floodgate_common::reads::Reads,
    pub publisher: Publisher,
    /// Marks confirmed orders queued before the 202, batching the marks.
    pub queued: QueuedMarker,
    /// Order requests and their hand-overs run as tasks of their own (a hang-up must not
    /// cut them short); shutdown waits for them before closing the publisher.
    pub tasks: tokio_util::task::TaskTracker,
    pub verifier: Arc<Verifier>,
    /// The background tasks `/readyz` reports.
    pub supervisor: floodgate_common::supervise::Supervisor,
    /// SKUs this ingress saw sold out, refused without Redis for a bounded time.
    pub sold_out: Arc<crate::sold_out::SoldOut>,
    /// Bucket counts of hot SKUs, learned from the reserve script's `moved` replies.
    pub buckets: Arc<crate::buckets::KnownBuckets>,
    /// The bundles met so far, learned from the reserve script (see `crate::bundles`).
    pub bundles: Arc<crate::bundles::KnownBundles>,
    /// Pulls units into a buyer's bucket of a hot SKU when it runs short.
    pub mover: floodgate_common::redis::buckets::Mover,
    /// None when `FLOODGATE_RATE_LIMIT_PER_SEC=0`.
    pub limiter: Option<Arc<Limiter>>,
}

impl AppState {
    pub fn limiter_for(cfg: &Config) -> Option<Arc<Limiter>> {
        let rate = NonZeroU32::new(cfg.rate_limit_per_sec)?;
        let burst = NonZeroU32::new(cfg.rate_limit_burst).unwrap_or(rate);
        Some(Arc::new(DefaultKeyedRateLimiter::keyed(
            Quota::per_second(rate).allow_burst(burst),
        )))
    }
}
