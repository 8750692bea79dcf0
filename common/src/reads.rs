//! Order-status reads that may use a streaming replica without ever going back in time.
//!
//! A replica replays the primary's WAL a little late, so a status read there could show
//! an order older than what its caller was already told (a `confirmed` event, a cancel's
//! answer, an earlier read). A read may use the replica only when the replica has
//! replayed every commit made before the read began:
//!
//! - the **fence** is the primary's WAL position (`pg_current_wal_lsn()`) sampled after
//!   the read began. Anything a caller was told before its request was committed before
//!   the request, so it lies below the fence. One sample serves every read that began
//!   before the sample was taken (single flight), so under load the primary answers one
//!   tiny query per round trip, not one per read.
//! - the replica's connection is used only if `pg_last_wal_replay_lsn()` has reached the
//!   fence (or the server is not in recovery: a promoted replica). Replay only moves
//!   forward, so every statement after that check on that connection sees at least the
//!   fence.
//! - otherwise (lagging, unreachable, or no replica configured) the read goes to the
//!   primary, exactly as without a replica. `floodgate_replica_reads_total{outcome}`
//!   counts which.
//!
//! Writes never come here: they use the primary pool.

use crate::telemetry::names;
use anyhow::Context;
use deadpool_postgres::{Object, Pool};
use std::{
    sync::{Arc, Mutex},
    time::Instant,
};
use tokio_postgres::types::PgLsn;

/// Read connections: the primary, and a replica when one is configured.
#[derive(Clone)]
pub struct Reads {
    primary: Pool,
    replica: Option<Arc<Replica>>,
}

struct Replica {
    pool: Pool,
    /// The last fence sampled: when its query started, and the primary's WAL position.
    latest: Mutex<Option<(Instant, PgLsn)>>,
    /// One fence query at a time; readers queued behind it reuse its answer when it
    /// started after they began.
    refresh: tokio::sync::Mutex<()>,
}

/// Where a read was served from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Primary,
    Replica,
}

impl Reads {
    /// Reads on `primary` only.
    pub fn primary(primary: Pool) -> Self {
        Self {
            primary,
            replica: None,
        }
    }

    /// Reads on `replica` when it has caught up, else on `primary`.
    pub fn with_replica(primary: Pool, replica: Option<Pool>) -> Self {
        Self {
            primary,
            replica: replica.map(|pool| {
                Arc::new(Replica {
                    pool,
                    latest: Mutex::new(None),
                    refresh: tokio::sync::Mutex::new(()),
                })
            }),
        }
    }

    /// A connection on which every commit made before `began` is visible: the replica's
    /// when it has replayed that far, else the primary's.
    pub async fn connection(&self, began: Instant) -> anyhow::Result<(Object, Source)> {
        if let Some(replica) = &self.replica {
            let fence = replica.fence(&self.primary, began).await?;
            match replica.caught_up(fence).await {
                Ok(Some(db)) => {
                    metrics::counter!(names::REPLICA_READS, "outcome" => "replica").increment(1);
                    return Ok((db, Source::Replica));
                }
                Ok(None) => {
                    metrics::counter!(names::REPLICA_READS, "outcome" => "lagging").increment(1);
                }
                Err(e) => {
                    metrics::counter!(names::REPLICA_READS, "outcome" => "error").increment(1);
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "replica read failed; reading the primary"
                    );
                }
            }
        }
        let db = self.primary.get().await.context("PostgreSQL connection")?;
        Ok((db, Source::Primary))
    }
}

impl Replica {
    /// The primary's WAL position, sampled after `began`.
    async fn fence(&self, primary: &Pool, began: Instant) -> anyhow::Result<PgLsn> {
        let fresh = |latest: &Option<(Instant, PgLsn)>| {
            latest.and_then(|(at, lsn)| (at >= began).then_some(lsn))
        };
        if let Some(lsn) = fresh(&self.latest.lock().expect("fence lock")) {
            return Ok(lsn);
        }
        let _one = self.refresh.lock().await;
        if let Some(lsn) = fresh(&self.latest.lock().expect("fence lock")) {
            return Ok(lsn);
        }
        let started = Instant::now();
        let lsn: PgLsn = primary
            .get()
            .await
            .context("PostgreSQL connection")?
            .query_one("SELECT pg_current_wal_lsn()", &[])
            .await
            .context("reading the primary's WAL position")?
            .get(0);
        let mut latest = self.latest.lock().expect("fence lock");
        if latest.is_none_or(|(at, _)| at < started) {
            *latest = Some((started, lsn));
        }
        Ok(lsn)
    }

    /// A replica connection that has replayed up to `fence`; None while it lags.
    async fn caught_up(&self, fence: PgLsn) -> anyhow::Result<Option<Object>> {
        let db = self.pool.get().await.context("replica connection")?;
        let fresh: bool = db
            .query_one(
                "SELECT CASE WHEN pg_is_in_recovery() \
                 THEN coalesce(pg_last_wal_replay_lsn() >= $1, false) ELSE true END",
                &[&fence],
            )
            .await
            .context("reading the replica's replay position")?
            .get(0);
        Ok(fresh.then_some(db))
    }
}
