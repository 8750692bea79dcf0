//! The consistency gauges: every `FLOODGATE_CONSISTENCY_CHECK_SECS` a worker runs the
//! invariant check of `floodgate reconcile --check` ([`reconcile::check`]: read-only, one
//! grouped pass per table, a difference counts only if seen in [`PASSES`] passes in a
//! row) and exports what it found, so an alert fires on a broken invariant without an
//! operator running the command.
//!
//! One worker of a namespace checks at a time: each turn starts by trying a session-level
//! PostgreSQL advisory lock on a connection of its own ([`once`]), and a worker that does
//! not get it skips its turn. A worker whose latest turn did not complete a check
//! (skipped, paused, failed) sets its violations gauge to NaN, so `max` over the workers
//! is the value of the one that checked last, never an old value of another; the
//! checked timestamp stays at the worker's own last completed check.

use deadpool_postgres::Pool;
use floodgate_common::redis::Redis;
use floodgate_common::{
    Namespace, reconcile,
    redis::Shards,
    telemetry::{self, names},
};
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
/// for an outage. A failed check is logged and tried again next turn. After a turn that
/// completed no check the violations gauge is NaN (see
/// [`names::CONSISTENCY_VIOLATIONS`]); the timestamp keeps the last completed check's.
pub async fn run(
    ns: Namespace,
    shards: Shards,
    mut redis: Redis,
    pg: Pool,
    every: Duration,
    paused: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {},
        }
        if paused.load(Ordering::Relaxed) {
            not_checked();
            continue;
        }
        let turn = tokio::select! {
            _ = shutdown.cancelled() => return,
            t = tokio::time::timeout(CHECK_TIMEOUT, once(&ns, &shards, &mut redis, &pg)) => t,
        };
        match turn {
            Ok(Ok(Turn::Checked(violations))) => {
                for v in &violations {
                    tracing::warn!(violation = %v, "consistency check: invariant violated");
                }
                metrics::gauge!(names::CONSISTENCY_VIOLATIONS).set(violations.len() as f64);
                metrics::gauge!(names::CONSISTENCY_CHECKED).set(telemetry::unix_secs());
            }
            Ok(Ok(Turn::Skipped)) => {
                not_checked();
                tracing::debug!("another worker is running the consistency check")
            }
            Ok(Err(e)) => {
                not_checked();
                tracing::warn!(
                    error = format!("{e:#}"),
                    "consistency check failed; trying again next turn"
                )
            }
            Err(_) => {
                not_checked();
                tracing::warn!(
                    "consistency check took longer than {CHECK_TIMEOUT:?}; trying again next turn"
                )
            }
        }
    }
}

/// One turn: the namespace's check lock, then the check, or [`Turn::Skipped`].
///
/// The lock is session-level, on one pooled connection that does nothing else while the
/// check runs on others: no transaction is left open (idle in transaction) for the
/// length of a check. A completed check's result is returned even if giving the lock back
/// fails.
pub async fn once(
    ns: &Namespace,
    shards: &Shards,
    redis: &mut Redis,
    pg: &Pool,
) -> anyhow::Result<Turn> {
    let Some(lock) = CheckLock::try_acquire(pg, ns).await? else {
        return Ok(Turn::Skipped);
    };
    // First close what a lost Redis write left open (see `reconcile::settle`), so the
    // check reports what is still wrong, not what the worker would have done.
    let checked = match reconcile::settle(pg, redis, shards).await {
        Ok(_) => reconcile::check(pg, redis, shards, PASSES).await,
        Err(e) => Err(e),
    };
    lock.release().await;
    Ok(Turn::Checked(checked?))
}

/// The namespace's check lock: a session-level advisory lock held by one pooled
/// connection. That connection goes back to the pool only after an unlock that
/// PostgreSQL confirmed; in every other case (the unlock failed, or the guard was dropped
/// because the check was abandoned: timeout, shutdown, panic) it is taken out of the pool
/// and closed, and the lock ends with its session. A pooled connection never keeps it.
struct CheckLock {
    /// None once released.
    conn: Option<deadpool_postgres::Object>,
    ns: String,
}

/// The lock key: hashtext is stable across sessions; the constant keeps us off other
/// apps' locks (and off the migration lock, `floodgate-migrate:`).
const LOCK_KEY: &str = "hashtext('floodgate-consistency:' || $1)";

impl CheckLock {
    /// The lock, or None when another session holds it.
    async fn try_acquire(pg: &Pool, ns: &Namespace) -> anyhow::Result<Option<Self>> {
        let conn = pg.get().await?;
        // Guarded before the query: if its answer is lost (a cancelled future, a broken
        // connection) the lock may be held, and the connection must not be reused.
        let mut lock = Self {
            conn: Some(conn),
            ns: ns.as_str().to_owned(),
        };
        let conn = lock.conn.as_ref().expect("just set");
        let held: bool = conn
            .query_one(
                &format!("SELECT pg_try_advisory_lock({LOCK_KEY})"),
                &[&lock.ns],
            )
            .await?
            .get(0);
        if held {
            Ok(Some(lock))
        } else {
            // Not ours: the connection holds nothing and may go back to the pool.
            lock.conn.take();
            Ok(None)
        }
    }

    /// Gives the lock back; on any failure (or if this is abandoned halfway) its
    /// connection is closed instead, by [`Drop`], which ends the lock.
    async fn release(mut self) {
        let Some(conn) = self.conn.as_ref() else {
            return;
        };
        let unlocked = conn
            .query_one(
                &format!("SELECT pg_advisory_unlock({LOCK_KEY})"),
                &[&self.ns],
            )
            .await
            .map(|r| r.get::<_, bool>(0));
        match unlocked {
            // Back to the pool, holding nothing.
            Ok(true) => drop(self.conn.take()),
            Ok(false) => {
                tracing::warn!("consistency lock was not held at unlock; closing its connection")
            }
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "could not release the consistency lock; closing its connection, which does"
            ),
        }
    }
}

impl Drop for CheckLock {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            close(conn);
        }
    }
}

/// Takes `conn` out of its pool and closes it: PostgreSQL ends its session, and with it
/// every session-level lock it held.
fn close(conn: deadpool_postgres::Object) {
    drop(deadpool_postgres::Object::take(conn));
}

/// This worker's latest turn completed no check: its last count is no longer current.
/// NaN rather than absent (a gauge cannot be removed) or kept: Prometheus' `max` skips
/// NaN unless every worker's is.
fn not_checked() {
    metrics::gauge!(names::CONSISTENCY_VIOLATIONS).set(f64::NAN);
}
