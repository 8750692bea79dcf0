//! The waitlist's promoter: hands promoted orders to the intake queue, and sends the
//! waitlist's events.
//!
//! Promotion itself happens in Redis, inside the script that returned the units
//! (`promote.lua`): the order is reserved there, `reserved` with no deadline, and put in
//! the shard's `promoted` zset. No HTTP request waits for it, so this task publishes it
//! as ingress publishes a new order (persistent, mandatory, with publisher confirms) and
//! then marks it queued (`queued.lua`); from then on it is an ordinary queued order. A
//! crash between the publish and the mark publishes it again on the next pass: the
//! worker's claim takes the order once and ignores the second copy.
//!
//! Events: `waitlisted` for each order that went on a waitlist (the `wlnew` zset) and
//! `accepted` for each promoted order just before its publish (promoted is accepted:
//! its units are its own and it never expires), both written to the outbox, so the relay publishes them in order with every other order event. A pass
//! also promotes what fits of every waitlisted SKU (`promote_now.lua`): units that came
//! back by a path that does not promote (a load) reach the waitlist within a pass.

use crate::{outbox::Session, repo};
use anyhow::Context;
use deadpool_postgres::Pool;
use floodgate_common::{
    Config,
    amqp::{self, IntakeMessage, OrderPlaced, Reconnect},
    domain::{IdempotencyKey, OrderId, OrderLines, OrderStatus},
    redis::{self as fredis, ConfirmedOrder, Redis, ResvState, Shards},
    retry::Backoff,
    telemetry::names,
};
use lapin::{Confirmation, options::BasicPublishOptions};
use std::{sync::Arc, time::Duration};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How often a pass runs: the delay between units coming back and the promoted order
/// reaching the queue.
const POLL: Duration = Duration::from_millis(200);
/// Orders read per round trip; a pass takes rounds until one is not full, at most
/// [`ROUNDS`] of them per shard.
const PER_PASS: usize = 500;
const ROUNDS: usize = 20;
/// Every this many passes (about a second) a pass also runs `promote_now.lua` for every
/// waitlisted SKU.
const SWEEP_EVERY: u64 = 5;
/// How long a promoter's turn on a shard lasts at most (it ends it when done; this
/// bounds a turn whose worker died).
const TURN: Duration = Duration::from_secs(3);

/// Ends a promoter's turn if it is still its own (another may hold it after an expiry).
static END_TURN: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
    )
});
/// Renews a promoter's turn if it is still its own; 0 when it was lost.
static RENEW_TURN: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0",
    )
});

/// Keeps the turn `me` on the shard of `keys` for another [`TURN`]; false when it was
/// lost (it expired and another promoter took it): the pass stops.
async fn renew(keys: &fredis::Keys, redis: &mut Redis, me: &str) -> Result<bool, PassError> {
    let kept: i64 = RENEW_TURN
        .key(keys.promoting())
        .arg(me)
        .arg(TURN.as_millis() as u64)
        .invoke_async(redis)
        .await
        .context("renewing the shard's promoter turn")
        .map_err(PassError::Other)?;
    Ok(kept == 1)
}

/// How long the broker has to confirm one publish.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a pass stopped: the broker link needs rebuilding, or Redis or PostgreSQL failed.
enum PassError {
    Broker(anyhow::Error),
    Other(anyhow::Error),
}

/// Promotes and publishes until `shutdown`; skips passes while the worker is paused.
pub async fn run(
    cfg: Config,
    shards: Shards,
    redis: Redis,
    pg: Pool,
    wake: Arc<Notify>,
    paused: Arc<std::sync::atomic::AtomicBool>,
    shutdown: CancellationToken,
) {
    let mut links = Reconnect::new("promoter", Backoff::BACKGROUND);
    // The intake exchange and queues are the consumer's to declare (a publish that finds
    // no queue bound comes back, and the pass is tried again).
    while let Some(session) = links
        .next(&shutdown, || Session::open(&cfg, "promoter"))
        .await
    {
        let mut redis = redis.clone();
        let mut passes: u64 = 0;
        let lost = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break None,
                _ = tokio::time::sleep(POLL) => {},
            }
            if paused.load(std::sync::atomic::Ordering::Relaxed) {
                continue;
            }
            passes += 1;
            let sweep = passes % SWEEP_EVERY == 1;
            match pass(&session, &shards, &mut redis, &pg, &wake, sweep).await {
                Ok(()) => {}
                Err(PassError::Broker(e)) => break Some(e),
                Err(PassError::Other(e)) => tracing::warn!(
                    error = format!("{e:#}"),
                    "waitlist promoter pass failed; trying again"
                ),
            }
        };
        session.link.close().await;
        match lost {
            Some(e) => links.lost(&e),
            None => break,
        }
    }
}

async fn pass(
    session: &Session,
    shards: &Shards,
    redis: &mut Redis,
    pg: &Pool,
    wake: &Notify,
    sweep: bool,
) -> Result<(), PassError> {
    let other = PassError::Other;
    for (_, keys) in shards.iter() {
        // Most shards, most of the time, have no waitlist: one round trip says so.
        let (promoted, new, waitlisted): (u64, u64, u64) = redis::pipe()
            .zcard(keys.promoted())
            .zcard(keys.waitlisted_new())
            .hlen(keys.waiting())
            .query_async(redis)
            .await
            .context("looking for waitlist work")
            .map_err(other)?;
        if promoted + new + waitlisted == 0 {
            continue;
        }
        // One promoter per shard at a time; the others find it taken and pass on. The
        // turn is renewed between rounds and ended only by its holder.
        let me = uuid::Uuid::now_v7().to_string();
        let turn: Option<String> = redis::cmd("SET")
            .arg(keys.promoting())
            .arg(&me)
            .arg("NX")
            .arg("PX")
            .arg(TURN.as_millis() as u64)
            .query_async(redis)
            .await
            .context("taking the shard's promoter turn")
            .map_err(other)?;
        if turn.is_none() {
            continue;
        }
        let done = shard_pass(session, keys, redis, pg, wake, sweep, &me).await;
        let _: Result<i64, _> = END_TURN
            .key(keys.promoting())
            .arg(&me)
            .invoke_async(redis)
            .await;
        done?;
    }
    Ok(())
}

/// One shard's part of a pass: its events, the sweep, its promoted orders.
async fn shard_pass(
    session: &Session,
    keys: &fredis::Keys,
    redis: &mut Redis,
    pg: &Pool,
    wake: &Notify,
    sweep: bool,
    me: &str,
) -> Result<(), PassError> {
    let other = PassError::Other;
    {
        // Events first: an order promoted in the same pass says `waitlisted` before
        // `accepted`.
        for _ in 0..ROUNDS {
            let n = announce_waitlisted(keys, redis, pg, wake)
                .await
                .map_err(other)?;
            if n < PER_PASS || !renew(keys, redis, me).await? {
                break;
            }
        }
        if sweep {
            for (sku, _) in fredis::waiting(redis, keys)
                .await
                .context("reading the waitlisted SKUs")
                .map_err(other)?
            {
                fredis::promote_now(redis, keys, &sku)
                    .await
                    .context("promoting")
                    .map_err(other)?;
            }
        }
        for _ in 0..ROUNDS {
            if !renew(keys, redis, me).await?
                || publish_promoted(session, keys, redis, pg, wake).await? < PER_PASS
            {
                break;
            }
        }
    }
    Ok(())
}

/// Publishes up to [`PER_PASS`] promoted orders of one shard (their publishes in flight
/// together, each confirmed), marks them queued, forgets them; how many it read.
async fn publish_promoted(
    session: &Session,
    keys: &fredis::Keys,
    redis: &mut Redis,
    pg: &Pool,
    wake: &Notify,
) -> Result<usize, PassError> {
    let other = PassError::Other;
    let ids = fredis::zset_upto(redis, &keys.promoted(), "+inf", PER_PASS)
        .await
        .context("reading the promoted orders")
        .map_err(other)?;
    if ids.is_empty() {
        return Ok(0);
    }
    let found = fredis::reservations(redis, keys, &ids)
        .await
        .context("reading the promoted orders")
        .map_err(other)?;
    // Queued already, or gone: its publish is done (or moot).
    let open: Vec<(OrderId, fredis::Reservation)> = ids
        .iter()
        .zip(found)
        .filter_map(|(id, r)| {
            r.filter(|r| r.state == ResvState::Reserved)
                .map(|r| (*id, r))
        })
        .collect();
    if !open.is_empty() {
        // Promoted is accepted (its units are its own, it never expires): the events go
        // before the publishes, so none is behind the `confirmed` its commit writes.
        let users: Vec<(OrderId, &str)> =
            open.iter().map(|(id, r)| (*id, r.user.as_str())).collect();
        repo::announce(pg, &users, OrderStatus::Accepted)
            .await
            .context("writing the accepted events")
            .map_err(other)?;
        wake.notify_one();
        futures::future::try_join_all(open.iter().map(|(id, r)| publish(session, id, r)))
            .await
            .map_err(PassError::Broker)?;
        let orders: Vec<ConfirmedOrder> = open
            .iter()
            .map(|(id, r)| ConfirmedOrder {
                order_id: *id,
                user: r.user.clone(),
                idempotency_key: r
                    .idempotency_key
                    .as_deref()
                    .and_then(|k| IdempotencyKey::parse(k).ok()),
            })
            .collect();
        let refs: Vec<&ConfirmedOrder> = orders.iter().collect();
        fredis::mark_queued(redis, keys, &refs)
            .await
            .context("marking promoted orders queued")
            .map_err(other)?;
        metrics::counter!(names::WAITLIST_PROMOTED).increment(open.len() as u64);
        tracing::info!(orders = open.len(), "waitlisted orders promoted and queued");
    }
    let _: () = redis::cmd("ZREM")
        .arg(keys.promoted())
        .arg(ids.iter().map(|i| i.to_string()).collect::<Vec<_>>())
        .query_async(redis)
        .await
        .context("forgetting promoted orders")
        .map_err(other)?;
    Ok(ids.len())
}

/// Writes the `waitlisted` events of up to [`PER_PASS`] orders that went on a waitlist
/// since the last pass, then forgets them; how many it read.
async fn announce_waitlisted(
    keys: &fredis::Keys,
    redis: &mut Redis,
    pg: &Pool,
    wake: &Notify,
) -> anyhow::Result<usize> {
    let ids = fredis::zset_upto(redis, &keys.waitlisted_new(), "+inf", PER_PASS).await?;
    if ids.is_empty() {
        return Ok(0);
    }
    let found = fredis::reservations(redis, keys, &ids).await?;
    let users: Vec<(OrderId, String)> = ids
        .iter()
        .zip(found)
        .filter_map(|(id, r)| r.map(|r| (*id, r.user.to_string())))
        .collect();
    let orders: Vec<(OrderId, &str)> = users.iter().map(|(i, u)| (*i, u.as_str())).collect();
    repo::announce(pg, &orders, OrderStatus::Waitlisted)
        .await
        .context("writing waitlisted events")?;
    wake.notify_one();
    let _: () = redis::cmd("ZREM")
        .arg(keys.waitlisted_new())
        .arg(ids.iter().map(|i| i.to_string()).collect::<Vec<_>>())
        .query_async(redis)
        .await?;
    Ok(ids.len())
}

/// Publishes a promoted order to its intake partition and waits for the confirm.
async fn publish(session: &Session, id: &OrderId, r: &fredis::Reservation) -> anyhow::Result<()> {
    let items = OrderLines::try_from(r.lines.clone())
        .map_err(|e| anyhow::anyhow!("a promoted order's lines break the rules: {}", e.0))?;
    let msg = IntakeMessage::of(OrderPlaced {
        order_id: *id,
        user_id: r.user.clone(),
        items,
        accepted_at: r.accepted_at.clone(),
        // Promoted orders never expire (their reservation's deadline is +inf).
        deadline_ms: amqp::unix_ms(),
        idempotency_key: r
            .idempotency_key
            .as_deref()
            .and_then(|k| IdempotencyKey::parse(k).ok()),
        buckets: Default::default(),
        bundles: Default::default(),
        // An order paid with points never waits (ingress refuses it).
        points: None,
    });
    let order = msg.order();
    let key = &session.topology.partition_for(&order.items).key;
    let props = amqp::intake_properties(&id.to_string(), None);
    let confirm = async {
        let pending = session
            .channel
            .basic_publish(
                session.topology.orders_exchange.as_str().into(),
                key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &msg.to_bytes(),
                props,
            )
            .await?;
        anyhow::Ok(pending.await?)
    };
    match tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
        .await
        .context("no confirm for a promoted order")??
    {
        Confirmation::Ack(None) => Ok(()),
        other => anyhow::bail!("the broker did not take a promoted order: {other:?}"),
    }
}
