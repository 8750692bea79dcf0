//! The consistency gauges: every `FLOODGATE_CONSISTENCY_CHECK_SECS` a worker runs the
//! invariant check of `floodgate reconcile --check` ([`reconcile::check`]: read-only, one
//! grouped pass per table, a difference counts only if seen in [`PASSES`] passes in a
//! row) and exports what it found, so an alert fires on a broken invariant without an
//! operator running the command.
//!
//! One worker of a namespace checks at a time: each turn starts by trying a PostgreSQL
//! advisory lock (transaction-scoped, so a check abandoned halfway releases it), and a
//! worker that does not get it skips its turn. Only the workers that completed a check
//! export the gauges.

use deadpool_postgres::Pool;
use floodgate_common::{Namespace, reconcile, redis::Keys, telemetry::names};
use redis::aio::ConnectionManager;
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};
use tokio_util::sync::CancellationToken;

/// Passes a violation must be seen in, 500 ms apart: what `floodgate reconcile --check`
/// asks for, so a batch caught between its commit and its Redis update is not counted.
pub const PASSES: usize = 3;
/// A whole check at most (its statements are bounded too); then it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(300);

/// What one turn did.
#[derive(Debug, PartialEq, Eq)]
pub enum Turn {
    /// This worker checked; the violations it found.
    Checked(Vec<reconcile::Violation>),
    /// Another worker of the namespace is checking.
    Skipped,
}

/// Checks every `every` until `shutdown` (the first turn after one interval, so a
/// restarting fleet does not check all at once); skips turns while the worker is paused
/// for an outage. A failed check is logged and tried again next turn; the gauges keep
/// the last completed check's values, and its timestamp shows their age.
pub async fn run(
    ns: Namespace,
    mut redis: ConnectionManager,
    pg: Pool,
    every: Duration,
    paused: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let keys = Keys::new(&ns);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {},
        }
        if paused.load(Ordering::Relaxed) {
            continue;
        }
        let turn = tokio::select! {
            _ = shutdown.cancelled() => return,
            t = tokio::time::timeout(CHECK_TIMEOUT, once(&ns, &keys, &mut redis, &pg)) => t,
        };
        match turn {
            Ok(Ok(Turn::Checked(violations))) => {
                for v in &violations {
                    tracing::warn!(violation = %v, "consistency check: invariant violated");
                }
                metrics::gauge!(names::CONSISTENCY_VIOLATIONS).set(violations.len() as f64);
                metrics::gauge!(names::CONSISTENCY_CHECKED).set(unix_secs());
            }
            Ok(Ok(Turn::Skipped)) => {
                tracing::debug!("another worker is running the consistency check")
            }
            Ok(Err(e)) => tracing::warn!(
                error = format!("{e:#}"),
                "consistency check failed; trying again next turn"
            ),
            Err(_) => tracing::warn!(
                "consistency check took longer than {CHECK_TIMEOUT:?}; trying again next turn"
            ),
        }
    }
}

/// One turn: the namespace's check lock, then the check, or [`Turn::Skipped`].
pub async fn once(
    ns: &Namespace,
    keys: &Keys,
    redis: &mut ConnectionManager,
    pg: &Pool,
) -> anyhow::Result<Turn> {
    let mut db = pg.get().await?;
    let lock = db.transaction().await?;
    // hashtext is stable across sessions; the constant keeps us off other apps' locks
    // (and off the migration lock, `floodgate-migrate:`).
    let held: bool = lock
        .query_one(
            "SELECT pg_try_advisory_xact_lock(hashtext('floodgate-consistency:' || $1))",
            &[&ns.as_str()],
        )
        .await?
        .get(0);
    if !held {
        return Ok(Turn::Skipped);
    }
    let violations = reconcile::check(pg, redis, keys, PASSES).await?;
    // Ends the transaction, and with it the lock.
    lock.commit().await?;
    Ok(Turn::Checked(violations))
}

fn unix_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
