//! The reservation reaper: releases reservations past their deadline that no worker
//! claimed (ingress died between reserve and publish, or the message waited too long),
//! and records those orders `failed: reservation_expired` in PostgreSQL.
//!
//! Redis decides first (`reap.lua`, atomic against the worker's claim), PostgreSQL records
//! second; the `reaped` set bridges the two, so a reaper that dies in between is finished
//! by the next tick of any worker's reaper.
//!
//! Each tick walks every shard. A part of a multi-part order is reaped on its own, like a
//! whole order: every part has the order's deadline, so a crash between the parts (or
//! before the publish) returns all of them; the order is recorded failed once (the
//! record is idempotent), with all its lines (each part names the whole order).

use crate::repo::{self, OrderRecord};
use deadpool_postgres::Pool;
use floodgate_common::redis::Redis;
use floodgate_common::{
    domain::{FailReason, OrderId},
    redis::{self as fredis, Shards},
    telemetry::names,
};
use std::time::Duration;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio_util::sync::CancellationToken;

/// Orders handled per tick at most.
const PER_TICK: usize = 500;

/// Reaps every `interval` until shutdown; skips ticks while the worker is paused for an
/// outage (orders durably queued meanwhile are waiting, not lost).
pub async fn run(
    shards: Shards,
    mut redis: Redis,
    pg: Pool,
    interval: Duration,
    paused: std::sync::Arc<std::sync::atomic::AtomicBool>,
    mover: fredis::buckets::Mover,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate (a restarted worker reaps at once); the rebalance waits
    // one interval, so a worker's start never moves units by itself.
    let mut started = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {},
        }
        let first = !std::mem::replace(&mut started, true);
        if paused.load(std::sync::atomic::Ordering::Relaxed) {
            continue;
        }
        if let Err(e) = once(&shards, &mut redis, &pg).await {
            tracing::warn!(
                error = format!("{e:#}"),
                "reaper tick failed; trying again next tick"
            );
        }
        // Hot SKUs' buckets: the units the reaper just returned, receipts (they go to
        // bucket 0) and uneven buying are spread again, and a move whose mover died
        // between its halves is finished.
        if first {
            continue;
        }
        match mover.rebalance().await {
            Ok(0) => {}
            Ok(units) => {
                metrics::counter!(names::BUCKET_UNITS_MOVED).increment(units as u64);
                tracing::debug!(units, "rebalanced the buckets of hot SKUs");
            }
            Err(e) => {
                tracing::warn!(error = %e, "rebalancing buckets failed; trying again next tick")
            }
        }
    }
}

/// One pass over every shard ([`once_in`]); the number of parts reaped. A shard that
/// fails does not stop the others: the first error is returned after all were tried.
pub async fn once(shards: &Shards, redis: &mut Redis, pg: &Pool) -> anyhow::Result<usize> {
    let mut n = 0;
    let mut failed = None;
    for (g, _) in shards.iter() {
        match once_in(shards, g, redis, pg).await {
            Ok(k) => n += k,
            Err(e) => {
                failed.get_or_insert(e.context(format!("shard {g}")));
            }
        }
    }
    failed.map_or(Ok(n), Err)
}

/// One pass over shard `g`: finish recording earlier reaps, then reap what is due.
pub async fn once_in(
    shards: &Shards,
    g: usize,
    redis: &mut Redis,
    pg: &Pool,
) -> anyhow::Result<usize> {
    let keys = shards.get(g);
    let now = (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    let mut n = 0;
    for id in fredis::due(redis, keys, now, PER_TICK).await? {
        let Some(user) = fredis::reservation_user(redis, keys, &id).await? else {
            // Its record is gone; reap.lua drops the stale deadline.
            let placeholder = floodgate_common::domain::UserId::parse("-").expect("valid");
            fredis::reap(redis, keys, &id, &placeholder, now).await?;
            continue;
        };
        if fredis::reap(redis, keys, &id, &user, now).await? {
            n += 1;
            metrics::counter!(names::REAPED).increment(1);
            tracing::info!(order_id = %id, "reservation expired unclaimed; released");
            record_or_log(shards, g, redis, pg, &id).await;
        }
    }
    // Waitlisted orders past their waitlist deadline: off the list (`unwait.lua`, which
    // also promotes whoever is next and fits), then recorded like a reap.
    for id in fredis::zset_upto(
        redis,
        &keys.waitlist_deadlines(),
        &now.to_string(),
        PER_TICK,
    )
    .await?
    {
        let user = fredis::reservation_user(redis, keys, &id)
            .await?
            .unwrap_or_else(|| floodgate_common::domain::UserId::parse("-").expect("valid"));
        match fredis::unwait(redis, keys, &id, &user, "waitlist_expired", now, None).await? {
            fredis::Unwait::Released => {
                metrics::counter!(names::WAITLIST_LEFT, "reason" => "waitlist_expired")
                    .increment(1);
                tracing::info!(order_id = %id, "waitlisted order expired unpromoted");
                record_or_log(shards, g, redis, pg, &id).await;
            }
            fredis::Unwait::NotDue => {}
            // Promoted, cancelled or lost meanwhile: a stale entry.
            fredis::Unwait::Not(_) => {
                let _: () = redis::cmd("ZREM")
                    .arg(keys.waitlist_deadlines())
                    .arg(id.to_string())
                    .query_async(redis)
                    .await?;
            }
        }
    }
    // Earlier reaps still waiting for their record, after what is due: a record that
    // cannot be written now (another shard or PostgreSQL down) goes to the back of the
    // line for a later tick and ends this tick's backlog, so it costs one timeout a tick
    // and never holds up the reaping above or the ids behind it for good.
    for id in fredis::reaped(redis, keys, PER_TICK).await? {
        if !record_or_log(shards, g, redis, pg, &id).await {
            let _: () = redis::cmd("ZADD")
                .arg(keys.reaped())
                .arg("XX")
                .arg(now)
                .arg(id.to_string())
                .query_async(redis)
                .await?;
            break;
        }
    }
    Ok(n)
}

/// [`record`]; false (logged) when it failed or must wait.
async fn record_or_log(
    shards: &Shards,
    g: usize,
    redis: &mut Redis,
    pg: &Pool,
    id: &OrderId,
) -> bool {
    match record(shards, g, redis, pg, id).await {
        Ok(done) => done,
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                order_id = %id,
                "recording a reaped order failed; trying again next tick"
            );
            false
        }
    }
}

/// Records a reaped order failed (with a `release` ledger row) and forgets it; false when
/// it must wait (below).
///
/// A part of a multi-part order is recorded only if the order's deciding part still
/// exists and was not released as never accepted (its publish failed, or another part
/// refused the order): a leftover part of such an order (its release was lost, or a
/// re-sent reserve ran late) expires here, but that order was answered 503 or 409 and its
/// Idempotency-Key freed, so it must not appear in PostgreSQL. An accepted order whose
/// part expired is recorded by the worker that gets its message. While the deciding
/// part is still `reserved` (its publish may yet fail) nothing is decided: the id stays
/// in `reaped` until it is (it has the same deadline, so that is a tick or two).
async fn record(
    shards: &Shards,
    g: usize,
    redis: &mut Redis,
    pg: &Pool,
    id: &OrderId,
) -> anyhow::Result<bool> {
    let keys = shards.get(g);
    let mut found = fredis::reservation(redis, keys, id).await?;
    if let Some(first) = found.as_ref().and_then(|r| r.first).filter(|f| *f != g) {
        // A shard beyond the count (it was lowered, or the field is corrupt) is unknown.
        let deciding = match first < shards.count() {
            true => fredis::reservation(redis, shards.get(first), id).await?,
            false => None,
        };
        if deciding
            .as_ref()
            .is_some_and(|d| d.state == fredis::ResvState::Reserved)
        {
            return Ok(false);
        }
        let never_accepted = deciding.is_none_or(|d| {
            d.state == fredis::ResvState::Released
                && matches!(d.reason.as_deref(), Some("publish_failed" | "refused"))
        });
        if never_accepted {
            found = None;
        }
    }
    if let Some(r) = found {
        let waited = r.unwaited();
        let rec = OrderRecord {
            id: *id,
            user_id: r.user.to_string(),
            idempotency_key: None,
            accepted_at: OffsetDateTime::parse(&r.accepted_at, &Rfc3339)
                .unwrap_or_else(|_| OffsetDateTime::now_utc()),
            lines: r
                .lines
                .iter()
                .map(|l| (l.sku.to_string(), l.qty.get()))
                .collect(),
            // A failed order adds nothing to `inventory.sold`; its `release` ledger rows
            // come from its lines (a bundle's through `order_units`).
            units: Vec::new(),
            trace: None,
            points: r.paid,
        };
        match waited {
            // A waitlisted order that left its waitlist: it never held a unit.
            Some((status, reason)) => {
                let by = r.cancelled_by.as_deref().and_then(|b| {
                    let actor = actor_of(b);
                    if actor.is_none() {
                        tracing::warn!(order_id = %id, by = b,
                            "a waitlisted order's cancel names an actor that cannot be read; recorded without its audit row");
                    }
                    actor
                });
                repo::record_unwaited(pg, &rec, status, reason, by.as_ref())
                    .await
                    .map_err(anyhow::Error::new)?;
            }
            None => {
                repo::commit_batch(pg, &[], &[(&rec, FailReason::ReservationExpired)])
                    .await
                    .map_err(anyhow::Error::new)?;
            }
        }
    }
    fredis::forget_reaped(redis, keys, id).await?;
    Ok(true)
}

/// The actor `unwait.lua` recorded for an audited cancel (`{"name","role","request_id"}`).
fn actor_of(by: &str) -> Option<floodgate_common::audit::Actor> {
    let v: serde_json::Value = serde_json::from_str(by).ok()?;
    let role = match v["role"].as_str()? {
        "admin" => "admin",
        "manager" => "manager",
        _ => return None,
    };
    Some(floodgate_common::audit::Actor {
        name: v["name"].as_str()?.to_owned(),
        role,
        request_id: v["request_id"].as_str().map(str::to_owned),
    })
}
