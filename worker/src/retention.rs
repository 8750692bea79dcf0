//! Webhook retention (`FLOODGATE_WEBHOOK_RETENTION_HOURS`): every worker, every
//! `prune_every`, deletes what the export no longer needs, in batches of [`BATCH`] rows,
//! each its own short transaction (the batch's rows found through an index, then
//! deleted by their row addresses, the batch's conditions checked again on the rows
//! themselves):
//!
//! 1. attempts (the delivery log) older than the retention;
//! 2. delivered deliveries last touched before it, and every delivery of a webhook
//!    deleted longer ago than it (nothing is sent to it any more); each event goes with
//!    the last delivery that named it.
//!
//! A live webhook's pending and dead deliveries are never pruned, nor the events they
//! name: what an endpoint is owed, or may be replayed after a fix, stays. Replays reach
//! the events still stored (docs/OPERATIONS.md, "Storage"). Several workers pruning at
//! once delete disjoint or already-deleted rows. A pass that fails ends the task: its
//! supervisor counts the failure (`floodgate_task_failures_total{task=
//! "webhook_retention"}`) and starts it again after a backoff.

use deadpool_postgres::Pool;
use floodgate_common::{Config, telemetry::names, webhook};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Rows one batch deletes at most: a transaction of a few milliseconds.
pub const BATCH: i64 = 1_000;
/// Batches of one query per pass at most, so one pass over a large backlog ends and the
/// next one goes on (100,000 rows per query per pass).
const MAX_BATCHES: usize = 100;

/// What one pass deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub attempts: u64,
    pub deliveries: u64,
    pub events: u64,
}

/// Prunes every `prune_every` (the first pass right away) until `shutdown`; nothing
/// when the retention is off. Returns (to its supervisor) when a pass fails.
pub async fn run(cfg: Config, pg: Pool, shutdown: CancellationToken) {
    let Some(retention) = cfg.webhooks.retention else {
        shutdown.cancelled().await;
        return;
    };
    for table in ["attempts", "deliveries", "events"] {
        metrics::counter!(names::WEBHOOK_PRUNED, "table" => table).increment(0);
    }
    loop {
        match prune(&pg, retention, &shutdown).await {
            Ok(p) if p != Pruned::default() => tracing::info!(
                attempts = p.attempts,
                deliveries = p.deliveries,
                events = p.events,
                retention_hours = retention.as_secs() / 3600,
                "webhooks: pruned past the retention"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "webhooks: pruning failed; tried again after a backoff"
                );
                return;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(cfg.webhooks.prune_every) => {}
        }
    }
}

/// One pass: deletes what is older than `retention` (see the module), at most
/// [`MAX_BATCHES`] batches per query. Returns what it deleted.
pub async fn prune(
    pg: &Pool,
    retention: Duration,
    stop: &CancellationToken,
) -> anyhow::Result<Pruned> {
    let ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    // Attempts: nothing refers to them.
    let (attempts, _) = batches(
        pg,
        stop,
        Table::Attempts,
        "DELETE FROM webhook_attempts WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM webhook_attempts
             WHERE at < now() - $1::bigint * interval '1 millisecond' LIMIT $2::bigint))
           AND at < now() - $1::bigint * interval '1 millisecond'",
        ms,
    )
    .await?;
    let (delivered, e1) = batches(
        pg,
        stop,
        Table::Deliveries,
        "DELETE FROM webhook_deliveries WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM webhook_deliveries
             WHERE state = 'delivered' AND updated_at < now() - $1::bigint * interval '1 millisecond'
             LIMIT $2::bigint))
           AND state = 'delivered' AND updated_at < now() - $1::bigint * interval '1 millisecond'
         RETURNING event_id",
        ms,
    )
    .await?;
    // A webhook deleted longer ago than the retention: all of its deliveries, found
    // through the primary key's webhook_id (nothing has been sent to it since).
    let (abandoned, e2) = batches(
        pg,
        stop,
        Table::Deliveries,
        "DELETE FROM webhook_deliveries WHERE ctid = ANY(ARRAY(
            SELECT d.ctid FROM webhooks w
              JOIN webhook_deliveries d ON d.webhook_id = w.id
             WHERE w.deleted_at < now() - $1::bigint * interval '1 millisecond'
             LIMIT $2::bigint))
           AND webhook_id IN (SELECT id FROM webhooks
                               WHERE deleted_at < now() - $1::bigint * interval '1 millisecond')
         RETURNING event_id",
        ms,
    )
    .await?;
    Ok(Pruned {
        attempts,
        deliveries: delivered + abandoned,
        events: e1 + e2,
    })
}

/// What a batch deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    Attempts,
    /// Deliveries, and then the events whose last delivery they were.
    Deliveries,
}

impl Table {
    /// Its `table` label on `floodgate_webhook_pruned_total`.
    fn label(self) -> &'static str {
        match self {
            Table::Attempts => "attempts",
            Table::Deliveries => "deliveries",
        }
    }
}

/// Runs `sql` (`$1` the retention in milliseconds, `$2` [`BATCH`]), each time in a
/// transaction of its own, until it deletes nothing (a short batch may be another
/// worker's rows gone first), [`MAX_BATCHES`] have run, or `stop`. For deliveries
/// (`sql` returns their `event_id`s) the same transaction takes
/// [`webhook::PRUNE_LOCK`] first and deletes the events no delivery names any more: an
/// event goes with its last delivery, in the delivery's transaction (through the index
/// on `webhook_deliveries (event_id)`, never a scan of either table). Returns the rows
/// and the events deleted, and counts them into `floodgate_webhook_pruned_total`.
async fn batches(
    pg: &Pool,
    stop: &CancellationToken,
    table: Table,
    sql: &str,
    ms: i64,
) -> anyhow::Result<(u64, u64)> {
    let (mut rows, mut events) = (0, 0);
    for _ in 0..MAX_BATCHES {
        if stop.is_cancelled() {
            break;
        }
        let mut db = pg.get().await?;
        let tx = db.transaction().await?;
        let (n, e) = match table {
            Table::Attempts => (tx.execute(sql, &[&ms, &BATCH]).await?, 0),
            Table::Deliveries => {
                tx.execute(webhook::PRUNE_LOCK, &[]).await?;
                let named: Vec<uuid::Uuid> = tx
                    .query(sql, &[&ms, &BATCH])
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let e = tx
                    .execute(
                        "DELETE FROM webhook_events e WHERE e.event_id = ANY($1)
                            AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d
                                             WHERE d.event_id = e.event_id)",
                        &[&named],
                    )
                    .await?;
                (named.len() as u64, e)
            }
        };
        tx.commit().await?;
        rows += n;
        events += e;
        metrics::counter!(names::WEBHOOK_PRUNED, "table" => table.label()).increment(n);
        metrics::counter!(names::WEBHOOK_PRUNED, "table" => "events").increment(e);
        if n == 0 {
            break;
        }
    }
    Ok((rows, events))
}
