//! The intake consumer: collect a batch, claim its reservations, commit it, ack it.

use crate::repo::{self, DbError, OrderRecord};
use backon::{ExponentialBuilder, Retryable};
use deadpool_postgres::Pool;
use floodgate_common::{
    Config,
    amqp::IntakeMessage,
    domain::{IdempotencyKey, OrderId, UserId},
    redis::{self as fredis, Claim, Keys},
    telemetry::names,
};
use futures::StreamExt;
use lapin::{
    Channel, Consumer,
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions},
};
use redis::aio::ConnectionManager;
use std::time::{Duration, Instant};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio_util::sync::CancellationToken;

/// Everything a batch needs.
pub struct Pipeline {
    pub cfg: Config,
    pub keys: Keys,
    pub redis: ConnectionManager,
    pub pg: Pool,
    pub channel: Channel,
}

/// One decoded delivery.
struct Item {
    tag: u64,
    order: OrderRecord,
    user: UserId,
    key: Option<IdempotencyKey>,
}

impl Pipeline {
    /// Consumes until `shutdown`; returns when the consumer stream ends (connection
    /// lost) or shutdown is requested. Unacked deliveries go back to the queue.
    pub async fn run(&mut self, mut consumer: Consumer, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                d = consumer.next() => d,
            };
            let Some(first) = first else { return };
            let Ok(first) = first.inspect_err(|e| tracing::warn!(error = %e, "consumer error"))
            else {
                return;
            };
            let mut batch = vec![first];
            let fill_until = tokio::time::Instant::now() + self.cfg.batch_max_wait;
            while batch.len() < self.cfg.batch_size {
                match tokio::time::timeout_at(fill_until, consumer.next()).await {
                    Ok(Some(Ok(d))) => batch.push(d),
                    Ok(Some(Err(e))) => {
                        tracing::warn!(error = %e, "consumer error");
                        break;
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            match self.process(batch).await {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    metrics::counter!(names::WORKER_ERRORS, "kind" => "transient").increment(1);
                    let wait = backoff.next();
                    tracing::warn!(
                        error = format!("{e:#}"),
                        ?wait,
                        "batch failed; requeued, backing off"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {},
                    }
                }
            }
        }
    }

    /// Decodes, claims, commits and acks one batch. An error means nothing was decided:
    /// every delivery was requeued.
    async fn process(&mut self, batch: Vec<Delivery>) -> anyhow::Result<()> {
        metrics::histogram!(names::BATCH_SIZE).record(batch.len() as f64);
        let mut items = Vec::with_capacity(batch.len());
        for d in &batch {
            match decode(d) {
                Ok(item) => items.push(item),
                Err(reason) => {
                    tracing::error!(
                        delivery_tag = d.delivery_tag,
                        reason,
                        "undecodable message; dead-lettering"
                    );
                    metrics::counter!(names::DEAD_LETTERED, "reason" => "undecodable").increment(1);
                    self.channel
                        .basic_nack(
                            d.delivery_tag,
                            BasicNackOptions {
                                multiple: false,
                                requeue: false,
                            },
                        )
                        .await?;
                }
            }
        }
        if items.is_empty() {
            return Ok(());
        }
        let result = self.decide(&items).await;
        if let Err(e) = result {
            for i in &items {
                // Requeue, one by one: a multiple nack would touch the dead-lettered ones.
                let _ = self
                    .channel
                    .basic_nack(
                        i.tag,
                        BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        },
                    )
                    .await;
            }
            return Err(e);
        }
        if items.len() == batch.len() {
            // Nothing in this batch was settled yet: one ack settles it all.
            let last = items.iter().map(|i| i.tag).max().unwrap_or_default();
            self.channel
                .basic_ack(last, BasicAckOptions { multiple: true })
                .await?;
        } else {
            for i in &items {
                self.channel
                    .basic_ack(i.tag, BasicAckOptions::default())
                    .await?;
            }
        }
        Ok(())
    }

    /// Claims, commits and settles Redis for decoded orders. Error = transient.
    async fn decide(&mut self, items: &[Item]) -> anyhow::Result<()> {
        let started = Instant::now();
        let claims_in: Vec<(OrderId, &UserId)> =
            items.iter().map(|i| (i.order.id, &i.user)).collect();
        let now_ms = (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        let claims = fredis::claim(&mut self.redis, &self.keys, &claims_in, now_ms).await?;

        let mut confirm = Vec::new();
        let mut fail = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, c) in items.iter().zip(&claims) {
            // The same order twice in one batch (a redelivery next to the original) is
            // decided once; both deliveries are acked with the batch.
            if !seen.insert(i.order.id) {
                continue;
            }
            match c {
                Claim::Claimed | Claim::Missing => confirm.push(&i.order),
                Claim::Done => {}
                Claim::Expired => fail.push((&i.order, "reservation_expired")),
                Claim::Released => fail.push((&i.order, "reservation_released")),
            }
        }

        let committed = match repo::commit_batch(&self.pg, &confirm, &fail).await {
            Ok(c) => {
                metrics::counter!(names::ORDERS_COMMITTED, "status" => "confirmed")
                    .increment(c.confirmed.len() as u64);
                metrics::counter!(names::ORDERS_COMMITTED, "status" => "failed")
                    .increment(c.failed as u64);
                confirm.iter().map(|o| o.id).collect::<Vec<_>>()
            }
            Err(DbError::Transient(e)) => return Err(e),
            Err(e) => {
                tracing::info!(error = %e, orders = confirm.len(), "batch refused; committing order by order");
                self.one_by_one(items, &confirm, &fail).await?
            }
        };
        fredis::finish(&mut self.redis, &self.keys, &committed).await?;
        metrics::histogram!(names::COMMIT_DURATION).record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// After a batch was refused: commit each order alone, so only the orders that really
    /// lack stock (or break a constraint) fail. Returns the orders now committed.
    async fn one_by_one(
        &mut self,
        items: &[Item],
        confirm: &[&OrderRecord],
        fail: &[(&OrderRecord, &'static str)],
    ) -> anyhow::Result<Vec<OrderId>> {
        if !fail.is_empty() {
            retry_transient(|| repo::commit_batch(&self.pg, &[], fail)).await?;
        }
        let mut committed = Vec::new();
        for order in confirm {
            let one = [*order];
            match retry_transient(|| repo::commit_batch(&self.pg, &one, &[])).await {
                Ok(c) => {
                    metrics::counter!(names::ORDERS_COMMITTED, "status" => "confirmed")
                        .increment(c.confirmed.len() as u64);
                    committed.push(order.id);
                }
                Err(DbError::Transient(e)) => return Err(e),
                Err(e) => {
                    let reason = match &e {
                        DbError::InsufficientStock => "insufficient_stock",
                        DbError::Permanent { reason, .. } => reason,
                        DbError::Transient(_) => unreachable!("handled above"),
                    };
                    tracing::info!(order_id = %order.id, reason, error = %e, "order failed");
                    let recorded = retry_transient(|| repo::record_failed(&self.pg, order, reason))
                        .await
                        .map_err(anyhow::Error::new)?;
                    if recorded {
                        metrics::counter!(names::ORDERS_COMMITTED, "status" => "failed")
                            .increment(1);
                    }
                    let item = items
                        .iter()
                        .find(|i| i.order.id == order.id)
                        .expect("every order comes from an item");
                    fredis::release(
                        &mut self.redis,
                        &self.keys,
                        &order.id,
                        &item.user,
                        item.key.as_ref(),
                        reason,
                    )
                    .await?;
                }
            }
        }
        Ok(committed)
    }
}

/// Quick in-process retries for connection blips inside the fallback path.
async fn retry_transient<T, F, Fut>(f: F) -> Result<T, DbError>
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

fn decode(d: &Delivery) -> Result<Item, String> {
    let IntakeMessage::OrderV1(o) =
        IntakeMessage::from_bytes(&d.data).map_err(|e| e.to_string())?;
    let accepted_at =
        OffsetDateTime::parse(&o.accepted_at, &Rfc3339).map_err(|e| format!("accepted_at: {e}"))?;
    Ok(Item {
        tag: d.delivery_tag,
        order: OrderRecord {
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
        },
        user: o.user_id,
        key: o.idempotency_key,
    })
}

/// Exponential backoff between failed batches: 100 ms doubling to 5 s.
#[derive(Default)]
struct Backoff(u32);

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = Duration::from_millis(100u64.saturating_mul(1 << self.0.min(6)))
            .min(Duration::from_secs(5));
        self.0 += 1;
        d
    }
    fn reset(&mut self) {
        self.0 = 0;
    }
}
