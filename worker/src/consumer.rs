//! The intake consumer: collect a batch, claim its reservations, commit it, settle each
//! message (ack, scheduled retry or dead letter), and pause while a dependency is down.
//!
//! Failures are classified before anything is decided:
//! - an **outage** (PostgreSQL or Redis unreachable) is not the messages' fault: the batch
//!   goes back to the queue untouched, the worker stops pulling and probes with backoff
//!   until both answer; no attempt is spent, nothing is dead-lettered;
//! - a **transient** failure of particular messages while the database is healthy (lock
//!   timeout, serialization failure) schedules those messages for a retry through a delay
//!   queue; after the last step of the schedule they are dead-lettered;
//! - a **permanent** failure (undecodable message, unknown SKU, a constraint that will
//!   never pass) dead-letters the message with its reason, records the order `failed` and
//!   releases its reservation;
//! - `insufficient_stock` is an answer, not a failure: the order is recorded `failed` and
//!   its reservation released.

use crate::{
    acks::AckWindow,
    repo::{self, DbError, OrderRecord},
    session::{Intake, Session, attempt_of},
};
use backon::{ExponentialBuilder, Retryable};
use deadpool_postgres::Pool;
use floodgate_common::redis::Redis;
use floodgate_common::{
    Config,
    amqp::{self, IntakeMessage, trace_of},
    domain::{FailReason, IdempotencyKey, OrderId, OrderStatus, UserId},
    health,
    redis::{self as fredis, Claim, OrderParts, Shards},
    retry::{Backoff, Waits},
    telemetry::names,
    trace,
};
use futures::{StreamExt, stream::FuturesUnordered};
use lapin::{BasicProperties, message::Delivery, options::BasicAckOptions};
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Everything a batch needs besides the AMQP session.
pub struct Pipeline {
    pub cfg: Config,
    pub shards: Shards,
    pub redis: Redis,
    pub pg: Pool,
    /// Set while consumption is paused for an outage; the reaper waits too, so orders
    /// queued durably during an outage are not expired for it.
    pub paused: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Wakes the outbox relay after a commit, so order events go out without waiting
    /// for its poll.
    pub outbox_wake: std::sync::Arc<tokio::sync::Notify>,
}

/// Why [`Pipeline::run`] returned.
pub enum Stop {
    Shutdown,
    /// The broker connection or channel failed: the supervisor rebuilds the session.
    Broker(anyhow::Error),
}

/// Why a batch was not settled.
enum Halt {
    /// A dependency is down: requeue everything, pause, probe.
    Outage(&'static str, anyhow::Error),
    Broker(anyhow::Error),
    Shutdown,
}

impl From<lapin::Error> for Halt {
    fn from(e: lapin::Error) -> Self {
        Halt::Broker(e.into())
    }
}

/// What happens to one message once its batch is decided.
#[derive(Debug, Clone)]
enum Settle {
    Ack,
    Retry(usize),
    /// To the dead-letter queue, with why (a closed set, the metric label) and the detail.
    DeadLetter(FailReason, String),
}

/// Whether a failed order could be written to PostgreSQL.
enum Recorded {
    Yes,
    /// Refused for good, with why.
    No(String),
}

/// One delivery.
struct Item {
    /// The intake partition it was taken from.
    partition: usize,
    tag: u64,
    payload: Vec<u8>,
    props: BasicProperties,
    attempt: usize,
    order: Result<Decoded, String>,
}

struct Decoded {
    record: OrderRecord,
    user: UserId,
    key: Option<IdempotencyKey>,
    /// The shards of its parts ([`Shards::parts`]), the deciding one first.
    shards: Vec<usize>,
}

impl Pipeline {
    /// Consumes until shutdown or a broker failure, pausing through outages.
    pub async fn run(&self, session: &mut Session, shutdown: &CancellationToken) -> Stop {
        // One backoff across back-to-back outages (a failure the probe cannot see must
        // not be retried every 200 ms forever), started afresh after a healthy spell.
        let mut waits = Waits::new(Backoff::BACKGROUND);
        let mut resumed = Instant::now();
        loop {
            let mut consumer = match session.consume().await {
                Ok(c) => c,
                Err(e) => return Stop::Broker(e.into()),
            };
            match self.drain(session, &mut consumer, shutdown).await {
                Halt::Shutdown => return Stop::Shutdown,
                Halt::Broker(e) => return Stop::Broker(e),
                Halt::Outage(what, e) => {
                    metrics::counter!(names::WORKER_ERRORS, "kind" => "outage", "dependency" => what)
                        .increment(1);
                    tracing::warn!(
                        dependency = what,
                        error = format!("{e:#}"),
                        "outage: batch requeued, consumption paused"
                    );
                    if let Err(e) = session.stop_pulling(&self.cfg).await {
                        return Stop::Broker(e.into());
                    }
                    metrics::gauge!(names::WORKER_PAUSED).set(1.0);
                    self.paused
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    if resumed.elapsed() > HEALTHY_SPELL {
                        waits.reset();
                    }
                    let healthy = self.wait_until_healthy(&mut waits, shutdown).await;
                    resumed = Instant::now();
                    self.paused
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                    metrics::gauge!(names::WORKER_PAUSED).set(0.0);
                    if !healthy {
                        return Stop::Shutdown;
                    }
                    tracing::info!("dependencies answer again; consumption resumed");
                }
            }
        }
    }

    /// Probes PostgreSQL and Redis with backoff until both answer, after a first wait (a
    /// failure the probe cannot see must still pause the worker). False on shutdown.
    async fn wait_until_healthy(&self, waits: &mut Waits, shutdown: &CancellationToken) -> bool {
        loop {
            if !waits.sleep(shutdown).await {
                return false;
            }
            let (pg, redis) = tokio::join!(
                health::postgres_ok(&self.pg),
                health::redis_ok(&self.redis, &self.shards)
            );
            if pg && redis {
                return true;
            }
            tracing::info!(postgres = pg, redis, "still waiting for dependencies");
        }
    }

    /// Collects batches and keeps up to `FLOODGATE_WORKER_PIPELINE` of them in flight:
    /// while one waits for its commit, the next is claimed and written. Each batch is
    /// acknowledged once it and every earlier delivery are settled ([`AckWindow`]).
    async fn drain(
        &self,
        session: &Session,
        consumer: &mut Intake,
        shutdown: &CancellationToken,
    ) -> Halt {
        let (depth, size) = (self.cfg.worker_pipeline, self.cfg.batch_size);
        let mut acks = AckWindow::default();
        let mut in_flight = FuturesUnordered::new();
        let mut pending: Vec<(usize, Delivery)> = Vec::with_capacity(size);
        // When the batch being collected must go, full or not.
        let mut fill_until: Option<tokio::time::Instant> = None;
        loop {
            let room = in_flight.len() < depth;
            let due = fill_until.is_some_and(|t| t <= tokio::time::Instant::now());
            if room && (pending.len() >= size || (due && !pending.is_empty())) {
                fill_until = None;
                let batch = std::mem::replace(&mut pending, Vec::with_capacity(size));
                in_flight.push(self.process(session, batch, shutdown));
                continue;
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    // Take nothing new; let the batches in flight finish and ack what
                    // they settled. What was collected but not started, and whatever a
                    // failed batch held, returns to the queue when the channel closes.
                    let finish = async {
                        let mut halt = None;
                        while let Some(done) = in_flight.next().await {
                            match done {
                                Ok(tags) => ack_settled(session, &mut acks, tags).await?,
                                Err(h) => halt = Some(h),
                            }
                        }
                        Ok::<_, Halt>(halt)
                    };
                    let halt = match tokio::time::timeout(SHUTDOWN_GRACE, finish).await {
                        Ok(Ok(None)) | Err(_) => Halt::Shutdown,
                        Ok(Ok(Some(h))) | Ok(Err(h)) => h,
                    };
                    ack_each(session, &mut acks).await;
                    return match halt {
                        Halt::Outage(..) => Halt::Shutdown,
                        h => h,
                    };
                }
                Some(done) = in_flight.next() => match done {
                    Ok(tags) => {
                        if let Err(h) = ack_settled(session, &mut acks, tags).await {
                            return h;
                        }
                    }
                    // The batches still in flight are dropped (their transactions roll
                    // back) and every unsettled delivery returns to the queue when the
                    // channel closes; those already settled behind this one are acked
                    // one by one first, so they are not done twice.
                    Err(h) => {
                        ack_each(session, &mut acks).await;
                        return h;
                    }
                },
                d = consumer.next(), if room && pending.len() < size => match d {
                    Some((p, Some(Ok(d)))) => {
                        observe_queue_wait(&d);
                        if pending.is_empty() {
                            fill_until = Some(tokio::time::Instant::now() + self.cfg.batch_max_wait);
                        }
                        pending.push((p, d));
                    }
                    Some((_, Some(Err(e)))) => return Halt::Broker(e.into()),
                    Some((p, None)) => {
                        return Halt::Broker(anyhow::anyhow!(
                            "the broker ended the consumer of intake partition {p}"
                        ));
                    }
                    None => return Halt::Broker(anyhow::anyhow!("the broker ended the consumers")),
                },
                _ = sleep_until_opt(fill_until), if room && fill_until.is_some() => {}
            }
        }
    }

    /// Decides and settles one batch (retries and dead letters published); returns its
    /// delivery tags for the ack window. Nothing is acked here.
    ///
    /// One `batch` span holds many orders, each of its own trace: when spans are
    /// exported the span links to every order's trace, and each order's line (debug)
    /// names its `trace_id`.
    async fn process(
        &self,
        session: &Session,
        batch: Vec<(usize, Delivery)>,
        shutdown: &CancellationToken,
    ) -> Result<Vec<u64>, Halt> {
        let started = Instant::now();
        metrics::histogram!(names::BATCH_SIZE).record(batch.len() as f64);
        let tags: Vec<u64> = batch.iter().map(|(_, d)| d.delivery_tag).collect();
        let items: Vec<Item> = batch.into_iter().map(|b| decode(b, &self.shards)).collect();
        let span = tracing::info_span!("batch", orders = items.len());
        trace::link(
            &span,
            items
                .iter()
                .filter_map(|i| i.order.as_ref().ok().and_then(|d| d.record.trace.as_ref())),
        );
        self.settle_batch(session, items, tags, started, shutdown)
            .instrument(span)
            .await
    }

    async fn settle_batch(
        &self,
        session: &Session,
        items: Vec<Item>,
        tags: Vec<u64>,
        started: Instant,
        shutdown: &CancellationToken,
    ) -> Result<Vec<u64>, Halt> {
        let settle = self.decide(&items, shutdown).await?;
        for (item, s) in items.iter().zip(&settle) {
            match s {
                Settle::Ack => {}
                Settle::Retry(attempt) => {
                    let delay = self.cfg.retry_delays[attempt - 1];
                    metrics::counter!(names::RETRIES).increment(1);
                    session
                        .schedule_retry(item.partition, &item.payload, &item.props, *attempt, delay)
                        .await
                        .map_err(Halt::Broker)?;
                }
                Settle::DeadLetter(why, detail) => {
                    metrics::counter!(names::DEAD_LETTERED, "reason" => why.as_str()).increment(1);
                    let reason = format!("{why}: {detail}");
                    tracing::warn!(delivery_tag = item.tag, reason, "dead-lettered");
                    session
                        .dead_letter(item.partition, &item.payload, &item.props, &reason)
                        .await
                        .map_err(Halt::Broker)?;
                }
            }
        }
        metrics::histogram!(names::COMMIT_DURATION).record(started.elapsed().as_secs_f64());
        Ok(tags)
    }

    /// Decides every item. Errors leave the whole batch unsettled.
    async fn decide(
        &self,
        items: &[Item],
        shutdown: &CancellationToken,
    ) -> Result<Vec<Settle>, Halt> {
        let mut settle: Vec<Settle> = vec![Settle::Ack; items.len()];
        // Poison first: dead-letter, and give back the stock it held if it names an order.
        for (i, item) in items.iter().enumerate() {
            if let Err(why) = &item.order {
                self.release_poison(&item.payload).await?;
                settle[i] = Settle::DeadLetter(FailReason::Undecodable, why.clone());
            }
        }
        // Each order once, even if it was delivered twice into this batch.
        let mut index: HashMap<OrderId, usize> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            if let Ok(d) = &item.order {
                index.entry(d.record.id).or_insert(i);
            }
        }
        let mut firsts: Vec<usize> = index.values().copied().collect();
        firsts.sort_unstable();
        if firsts.is_empty() {
            return Ok(settle);
        }
        let decoded = |i: usize| items[i].order.as_ref().expect("decoded");
        let claims_in: Vec<OrderParts> =
            firsts.iter().map(|&i| self.parts_of(decoded(i))).collect();
        let claims = fredis::claim_orders(&self.redis, &self.shards, &claims_in)
            .await
            .map_err(|e| Halt::Outage("redis", e.into()))?;

        let mut confirm: Vec<usize> = Vec::new();
        let mut fail: Vec<(usize, FailReason)> = Vec::new();
        for (&i, c) in firsts.iter().zip(&claims) {
            match c {
                Claim::Claimed | Claim::Missing => confirm.push(i),
                // Ingress answered 503 for it: nothing to record, only the message to drop.
                Claim::Done | Claim::Unpublished => {}
                Claim::Expired => fail.push((i, FailReason::ReservationExpired)),
                Claim::Released => fail.push((i, FailReason::ReservationReleased)),
            }
        }
        let confirm_recs: Vec<&OrderRecord> = confirm.iter().map(|&i| &decoded(i).record).collect();
        let fail_recs: Vec<(&OrderRecord, FailReason)> =
            fail.iter().map(|&(i, r)| (&decoded(i).record, r)).collect();

        match repo::commit_batch(&self.pg, &confirm_recs, &fail_recs).await {
            Ok(c) => {
                self.outbox_wake.notify_one();
                count_committed(c.confirmed.len(), c.failed);
                if tracing::enabled!(tracing::Level::DEBUG) {
                    for &i in &confirm {
                        committed_line(decoded(i), c.status.get(&decoded(i).record.id));
                    }
                    for &(i, reason) in &fail {
                        failed_line(decoded(i), reason);
                    }
                }
                // The orders to confirm, and the failed ones of several parts: a part
                // expired or released elsewhere left the others held (see claim_orders).
                let batch: Vec<&Decoded> = confirm
                    .iter()
                    .map(|&i| decoded(i))
                    .chain(
                        fail.iter()
                            .map(|&(i, _)| decoded(i))
                            .filter(|d| self.multi_part(d)),
                    )
                    .collect();
                self.settle_redis(&batch, &c.status).await?;
            }
            Err(DbError::Transient(e)) => {
                if shutdown.is_cancelled() {
                    return Err(Halt::Shutdown);
                }
                if !health::postgres_ok(&self.pg).await {
                    return Err(Halt::Outage("postgres", e));
                }
                tracing::warn!(
                    error = format!("{e:#}"),
                    "batch failed transiently; scheduling retries"
                );
                for &i in confirm.iter().chain(fail.iter().map(|(i, _)| i)) {
                    settle[i] = self.retry_or_give_up(&items[i], &e).await?;
                }
            }
            Err(e) => {
                tracing::info!(error = %e, orders = confirm.len(), "batch refused; committing order by order");
                if !fail_recs.is_empty() {
                    match retry_quick(|| repo::commit_batch(&self.pg, &[], &fail_recs)).await {
                        Ok(c) => {
                            count_committed(0, c.failed);
                            let multi: Vec<&Decoded> = fail
                                .iter()
                                .map(|&(i, _)| decoded(i))
                                .filter(|d| self.multi_part(d))
                                .collect();
                            self.settle_redis(&multi, &c.status).await?;
                        }
                        Err(DbError::Transient(e)) => return Err(Halt::Outage("postgres", e)),
                        // Never an outage: a record that can never be written is a dead letter.
                        // One order at a time then, so one bad record does not take
                        // the others with it (and each recorded one is settled).
                        Err(e) => {
                            for &(i, reason) in &fail {
                                settle[i] = match self.fail_order(decoded(i), reason).await? {
                                    Recorded::Yes => Settle::Ack,
                                    Recorded::No(why) => Settle::DeadLetter(
                                        FailReason::Unrecordable,
                                        format!("{e:#}; alone: {why}"),
                                    ),
                                };
                            }
                        }
                    }
                }
                for &i in &confirm {
                    settle[i] = self.commit_one(&items[i], shutdown).await?;
                }
            }
        }
        Ok(settle)
    }

    /// Commits one order alone (after its batch was refused).
    async fn commit_one(&self, item: &Item, shutdown: &CancellationToken) -> Result<Settle, Halt> {
        let d = item.order.as_ref().expect("decoded");
        let one = [&d.record];
        match retry_quick(|| repo::commit_batch(&self.pg, &one, &[])).await {
            Ok(c) => {
                count_committed(c.confirmed.len(), 0);
                committed_line(d, c.status.get(&d.record.id));
                self.settle_redis(&[d], &c.status).await?;
                Ok(Settle::Ack)
            }
            Err(DbError::Transient(e)) => {
                if shutdown.is_cancelled() {
                    return Err(Halt::Shutdown);
                }
                if !health::postgres_ok(&self.pg).await {
                    return Err(Halt::Outage("postgres", e));
                }
                self.retry_or_give_up(item, &e).await
            }
            Err(DbError::InsufficientStock) => Ok(
                match self.fail_order(d, FailReason::InsufficientStock).await? {
                    Recorded::Yes => Settle::Ack,
                    Recorded::No(why) => Settle::DeadLetter(FailReason::Unrecordable, why),
                },
            ),
            Err(DbError::InsufficientPoints) => Ok(
                match self.fail_order(d, FailReason::InsufficientPoints).await? {
                    Recorded::Yes => Settle::Ack,
                    Recorded::No(why) => Settle::DeadLetter(FailReason::Unrecordable, why),
                },
            ),
            Err(DbError::Permanent { reason, source }) => {
                Ok(match self.fail_order(d, reason).await? {
                    Recorded::Yes => Settle::DeadLetter(reason, format!("{source:#}")),
                    Recorded::No(why) => Settle::DeadLetter(
                        FailReason::Unrecordable,
                        format!("{reason}: {source:#}; recording it failed: {why}"),
                    ),
                })
            }
        }
    }

    /// A transient failure while the database answers: the next scheduled retry, or,
    /// past the schedule, the order fails and the message is dead-lettered.
    async fn retry_or_give_up(&self, item: &Item, e: &anyhow::Error) -> Result<Settle, Halt> {
        let next = item.attempt + 1;
        if next <= self.cfg.retry_delays.len() {
            return Ok(Settle::Retry(next));
        }
        let d = item.order.as_ref().expect("decoded");
        Ok(
            match self.fail_order(d, FailReason::RetriesExhausted).await? {
                Recorded::Yes => Settle::DeadLetter(FailReason::RetriesExhausted, format!("{e:#}")),
                Recorded::No(why) => Settle::DeadLetter(
                    FailReason::Unrecordable,
                    format!("retries_exhausted: {e:#}; recording it failed: {why}"),
                ),
            },
        )
    }

    /// Records the order failed and settles Redis by what PostgreSQL now holds: an order
    /// an earlier delivery confirmed keeps its stock.
    ///
    /// A record PostgreSQL refuses for good is [`Recorded::No`]: never an outage (that would
    /// pause and redeliver it forever); its message is dead-lettered and its stock stays
    /// held until an operator replays or settles it.
    async fn fail_order(&self, d: &Decoded, reason: FailReason) -> Result<Recorded, Halt> {
        tracing::info!(
            order_id = %d.record.id,
            trace_id = d.record.trace.map(|t| tracing::field::display(t.trace_id())),
            reason = reason.as_str(),
            "order failed"
        );
        let (recorded, status) = match retry_quick(|| {
            repo::record_failed(&self.pg, &d.record, reason)
        })
        .await
        {
            Ok(r) => r,
            Err(DbError::Transient(e)) => return Err(Halt::Outage("postgres", e)),
            Err(e) => {
                tracing::error!(order_id = %d.record.id, error = format!("{e:#}"), "a failed order cannot be recorded");
                return Ok(Recorded::No(format!("{e:#}")));
            }
        };
        if recorded {
            count_committed(0, 1);
        }
        self.settle_redis(&[d], &HashMap::from([(d.record.id, status)]))
            .await?;
        Ok(Recorded::Yes)
    }

    /// Brings reservations in line with PostgreSQL: the `confirmed` ones (and `cancelled`
    /// ones: a cancel returns its units through its own token, so giving the
    /// reservation's back too would count them twice) are marked done in one call for the
    /// whole batch; `failed` ones give their stock back (once, and rare); orders
    /// PostgreSQL does not hold are left alone.
    async fn settle_redis(
        &self,
        orders: &[&Decoded],
        status: &HashMap<OrderId, OrderStatus>,
    ) -> Result<(), Halt> {
        let outage = |e: redis::RedisError| Halt::Outage("redis", e.into());
        let confirmed: Vec<OrderParts> = orders
            .iter()
            .filter(|d| {
                matches!(
                    status.get(&d.record.id),
                    Some(OrderStatus::Confirmed | OrderStatus::Cancelled)
                )
            })
            .map(|d| self.parts_of(d))
            .collect();
        fredis::finish_orders(&self.redis, &self.shards, &confirmed)
            .await
            .map_err(outage)?;
        for d in orders {
            if status.get(&d.record.id) == Some(&OrderStatus::Failed) {
                let parts = self.parts_of(d);
                fredis::release_parts(
                    &self.redis,
                    &self.shards,
                    &parts.shards,
                    &d.record.id,
                    &d.user,
                    d.key.as_ref(),
                    "failed",
                )
                .await
                .map_err(outage)?;
            }
        }
        Ok(())
    }

    /// Whether the order was reserved in more than one part.
    fn multi_part(&self, d: &Decoded) -> bool {
        d.shards.len() > 1
    }

    /// The order's parts: the same shards ingress reserved it in ([`Shards::parts`]).
    fn parts_of<'a>(&self, d: &'a Decoded) -> OrderParts<'a> {
        OrderParts {
            order_id: d.record.id,
            user: &d.user,
            key: d.key.as_ref(),
            shards: d.shards.clone(),
        }
    }

    /// An undecodable message may still name its order and user: release what it held
    /// (in every shard: its lines, and so its parts, are unknown).
    async fn release_poison(&self, payload: &[u8]) -> Result<(), Halt> {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return Ok(());
        };
        let order = v["order_id"].as_str().and_then(OrderId::parse);
        let user = v["user_id"].as_str().and_then(|u| UserId::parse(u).ok());
        if let (Some(order), Some(user)) = (order, user) {
            let every: Vec<usize> = (0..self.shards.count()).collect();
            fredis::release_parts(
                &self.redis,
                &self.shards,
                &every,
                &order,
                &user,
                None,
                "undecodable",
            )
            .await
            .map_err(|e| Halt::Outage("redis", e.into()))?;
        }
        Ok(())
    }
}

/// Consuming this long without an outage starts the outage backoff afresh.
const HEALTHY_SPELL: Duration = Duration::from_secs(10);

/// How long shutdown waits for the batches in flight to commit and be acked.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Records a batch's tags settled and acks, in one multiple ack, every delivery below
/// which all are now settled.
async fn ack_settled(session: &Session, acks: &mut AckWindow, tags: Vec<u64>) -> Result<(), Halt> {
    let Some(upto) = acks.settle(tags) else {
        return Ok(());
    };
    session
        .consume
        .basic_ack(upto, BasicAckOptions { multiple: true })
        .await
        .map_err(Halt::from)
}

/// Acks, each on its own, the settled deliveries waiting behind an unsettled one.
/// Best effort and bounded: on a broken channel they are redelivered, which is safe.
async fn ack_each(session: &Session, acks: &mut AckWindow) {
    let tags = acks.take_waiting();
    if tags.is_empty() {
        return;
    }
    let each = async {
        for tag in tags {
            session
                .consume
                .basic_ack(tag, BasicAckOptions { multiple: false })
                .await?;
        }
        Ok::<(), lapin::Error>(())
    };
    match tokio::time::timeout(Duration::from_secs(2), each).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::info!(error = %e, "settled deliveries left to redelivery"),
        Err(_) => tracing::info!("settled deliveries left to redelivery (ack timed out)"),
    }
}

async fn sleep_until_opt(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Records how long an order waited from its publish to the first time a worker took it
/// ([`names::QUEUE_WAIT`]), once per order: a redelivery (after a pause, a crash, a
/// failed batch) or a scheduled retry (`x-floodgate-attempt`) was measured when it was
/// first taken, and its later waits are not the queue's. A message without the header
/// (an older ingress's) is not measured. Clocks of two hosts may disagree a little: a
/// negative wait counts as none.
fn observe_queue_wait(d: &Delivery) {
    if d.redelivered || attempt_of(&d.properties) > 0 {
        return;
    }
    if let Some(due) = amqp::published_ms(d.properties.headers().as_ref()) {
        let waited_ms = (amqp::unix_ms() - due).max(0);
        metrics::histogram!(names::QUEUE_WAIT).record(waited_ms as f64 / 1000.0);
    }
}

/// An order's line once its batch committed (debug: nothing per order at `info`).
fn committed_line(d: &Decoded, status: Option<&OrderStatus>) {
    tracing::debug!(
        order_id = %d.record.id,
        trace_id = d.record.trace.map(|t| tracing::field::display(t.trace_id())),
        status = status.map(|s| s.as_str()),
        "order committed"
    );
}

/// An order recorded failed with its batch (debug).
fn failed_line(d: &Decoded, reason: FailReason) {
    tracing::debug!(
        order_id = %d.record.id,
        trace_id = d.record.trace.map(|t| tracing::field::display(t.trace_id())),
        reason = reason.as_str(),
        "order recorded failed"
    );
}

fn count_committed(confirmed: usize, failed: usize) {
    metrics::counter!(names::ORDERS_COMMITTED, "status" => "confirmed").increment(confirmed as u64);
    metrics::counter!(names::ORDERS_COMMITTED, "status" => "failed").increment(failed as u64);
}

/// Quick in-process retries for connection blips (backon), before anything is decided.
async fn retry_quick<T, F, Fut>(f: F) -> Result<T, DbError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DbError>>,
{
    f.retry(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(20))
            .with_max_times(3)
            .with_jitter(),
    )
    .when(|e| matches!(e, DbError::Transient(_)))
    .await
}

fn decode((partition, d): (usize, Delivery), shards: &Shards) -> Item {
    let trace = trace_of(&d.properties);
    let order = IntakeMessage::from_bytes(&d.data)
        .map_err(|e| e.to_string())
        .map(IntakeMessage::into_order)
        .and_then(|o| {
            let accepted_at = OffsetDateTime::parse(&o.accepted_at, &Rfc3339)
                .map_err(|e| format!("accepted_at: {e}"))?;
            // Once per delivery: claim, finish and release all need them.
            let held = o.held();
            let part_shards =
                shards.shards_of(&held, &o.user_id, o.idempotency_key.as_ref(), |s| {
                    o.buckets_of(s)
                });
            Ok(Decoded {
                shards: part_shards,
                record: OrderRecord {
                    id: o.order_id,
                    user_id: o.user_id.to_string(),
                    idempotency_key: o.idempotency_key.as_ref().map(|k| k.to_string()),
                    accepted_at,
                    lines: o
                        .items
                        .as_slice()
                        .iter()
                        .map(|l| (l.sku.to_string(), l.qty.get()))
                        .collect(),
                    units: floodgate_common::bundle::units(&held)
                        .map(|l| (l.sku.to_string(), l.qty))
                        .collect(),
                    trace,
                    points: o.points,
                },
                user: o.user_id,
                key: o.idempotency_key,
            })
        });
    Item {
        partition,
        tag: d.delivery_tag,
        attempt: attempt_of(&d.properties),
        props: d.properties,
        payload: d.data,
        order,
    }
}
