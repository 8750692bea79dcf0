//! The worker's AMQP session: a consuming channel and a confirm-mode channel for retries
//! and dead letters. Rebuilt whole by the supervisor after a broker failure.
//!
//! The consuming channel consumes every intake partition (one consumer each, so the
//! prefetch window is per partition) and every partition left over from a larger
//! `FLOODGATE_INTAKE_PARTITIONS` (found when the session opens), so lowering it strands
//! nothing. All deliveries share the channel's delivery tags, so one ack window covers
//! them all. A scheduled retry goes to the delay queue of the delivery's own partition,
//! and a dead letter carries its partition for the replay ([`PARTITION_HEADER`]); a
//! leftover partition's message is sent home to the partition its SKU picks now.

use floodgate_common::{
    Config,
    amqp::{
        ATTEMPT_HEADER, CLOSE_TIMEOUT, IntakeMessage, Link, PARTITION_HEADER, Partition,
        REASON_HEADER, Topology, is_not_found,
    },
};
use futures::{Stream, StreamExt, stream::BoxStream};
use lapin::{
    BasicProperties, Channel, Confirmation,
    message::Delivery,
    options::{BasicConsumeOptions, BasicPublishOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable, ShortString},
};
use rand::Rng;
use std::time::Duration;

pub struct Session {
    link: Link,
    pub consume: Channel,
    publish: Channel,
    pub topology: Topology,
    /// Partitions beyond `topology`'s that still exist on the broker, drained too.
    leftover: Vec<Partition>,
}

/// What the merged consumers of every partition yield: a delivery from partition
/// `.0`, or (`None`) the end of that partition's consumer (the broker cancelled it:
/// its queue was deleted, say), which rebuilds the session.
pub type Intake = BoxStream<'static, (usize, Option<lapin::Result<Delivery>>)>;

impl Session {
    /// Connects, declares the topology and sets the prefetch window.
    pub async fn open(cfg: &Config) -> anyhow::Result<Self> {
        let link = Link::open(
            &cfg.amqp_url,
            &format!("floodgate-worker {}", cfg.namespace),
        )
        .await?;
        let topology = Topology::of(cfg);
        let publish = link.confirm_channel().await?;
        topology.declare(&publish).await?;
        let leftovers = topology.leftovers(&link).await?;
        for q in &leftovers.legacy_retry_queues {
            delete_if_empty(&link, q).await?;
        }
        let leftover = leftovers.partitions;
        if !leftover.is_empty() {
            let names: Vec<&str> = leftover.iter().map(|p| p.queue.as_str()).collect();
            tracing::warn!(
                partitions = topology.partitions.len(),
                leftover = ?names,
                "intake partitions beyond FLOODGATE_INTAKE_PARTITIONS exist: draining them too; \
                 delete them once empty (docs/OPERATIONS.md)"
            );
        }
        let consume = Self::consuming_channel(&link, cfg).await?;
        Ok(Self {
            link,
            consume,
            publish,
            topology,
            leftover,
        })
    }

    async fn consuming_channel(link: &Link, cfg: &Config) -> lapin::Result<Channel> {
        let ch = link.channel().await?;
        // The prefetch window: how many unacked deliveries the broker hands us at once.
        ch.basic_qos(cfg.worker_prefetch, BasicQosOptions { global: false })
            .await?;
        Ok(ch)
    }

    /// Starts consuming every intake partition (and the leftover ones), merged.
    pub async fn consume(&self) -> lapin::Result<Intake> {
        let tag = uuid::Uuid::now_v7();
        let mut streams = Vec::new();
        for p in self.topology.partitions.iter().chain(&self.leftover) {
            let c = self
                .consume
                .basic_consume(
                    p.queue.as_str().into(),
                    format!("worker-{tag}-{}", p.index).as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let i = p.index;
            streams.push(ended_by_none(i, c));
        }
        Ok(futures::stream::select_all(streams).boxed())
    }

    /// The partition a message taken from partition `from` is retried in and
    /// dead-lettered from: its own, or for a leftover partition the one its first SKU
    /// picks now (partition 0 if it cannot be read).
    pub fn home(&self, from: usize, payload: &[u8]) -> &Partition {
        if let Some(p) = self.topology.partitions.get(from) {
            return p;
        }
        match IntakeMessage::from_bytes(payload) {
            Ok(m) => self.topology.partition_for(&m.order().items),
            Err(_) => &self.topology.partitions[0],
        }
    }

    /// Stops pulling: closes the consuming channel, so the broker requeues every unacked
    /// delivery, and opens a fresh one for when consumption resumes.
    pub async fn stop_pulling(&mut self, cfg: &Config) -> lapin::Result<()> {
        let _ =
            tokio::time::timeout(CLOSE_TIMEOUT, self.consume.close(200, "pausing".into())).await;
        self.consume = Self::consuming_channel(&self.link, cfg).await?;
        Ok(())
    }

    /// Sends a message taken from partition `from` to its partition's delay queue of
    /// retry `attempt` (1-based), with a jittered TTL around `delay`; the broker returns
    /// it to that partition when the TTL passes.
    pub async fn schedule_retry(
        &self,
        from: usize,
        payload: &[u8],
        props: &BasicProperties,
        attempt: usize,
        delay: Duration,
    ) -> anyhow::Result<()> {
        let queue = &self.home(from, payload).retry_queues[attempt - 1];
        // Full jitter on the upper half: delay/2 ..= delay, so retries spread out.
        let ms = delay.as_millis().max(2) as u64;
        let ttl = rand::rng().random_range(ms / 2..=ms);
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(
            ATTEMPT_HEADER.into(),
            AMQPValue::LongLongInt(attempt as i64),
        );
        let props = props
            .clone()
            .with_headers(headers)
            .with_expiration(ShortString::from(ttl.to_string()))
            .with_delivery_mode(2);
        self.publish_confirmed("", queue, payload, props).await
    }

    /// Sends a message taken from partition `from` to the dead-letter exchange with why
    /// and the partition a replay returns it to.
    pub async fn dead_letter(
        &self,
        from: usize,
        payload: &[u8],
        props: &BasicProperties,
        reason: &str,
    ) -> anyhow::Result<()> {
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
        headers.insert(
            PARTITION_HEADER.into(),
            AMQPValue::LongLongInt(self.home(from, payload).index as i64),
        );
        let props = props.clone().with_headers(headers).with_delivery_mode(2);
        let exchange = self.topology.dead_exchange.clone();
        self.publish_confirmed(&exchange, "", payload, props).await
    }

    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        props: BasicProperties,
    ) -> anyhow::Result<()> {
        let confirm = self
            .publish
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                payload,
                props,
            )
            .await?;
        match tokio::time::timeout(Duration::from_secs(10), confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(other)) => anyhow::bail!("broker did not take the message: {other:?}"),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => anyhow::bail!("no publisher confirm within 10 s"),
        }
    }

    /// Closes the link and its channels (bounded, see [`Link::close`]); the broker
    /// requeues every unacknowledged delivery.
    pub async fn close(&self) {
        self.link.close().await;
    }
}

/// Deletes an older version's classic delay queue once it is empty (until then it
/// returns what it holds to partition 0 by itself). Safe against an older worker still
/// running: its retry to the deleted queue comes back unroutable, its session is
/// rebuilt, which declares the queue again, and the delivery is retried.
async fn delete_if_empty(link: &Link, queue: &str) -> lapin::Result<()> {
    let ch = link.channel().await?;
    let deleted = ch
        .queue_delete(
            queue.into(),
            lapin::options::QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            },
        )
        .await;
    match deleted {
        Ok(_) => {
            tracing::info!(queue, "deleted an empty delay queue of an earlier version");
            let _ = ch.close(200, "done".into()).await;
            Ok(())
        }
        // Not empty (PRECONDITION_FAILED) or gone already: the next session tries again.
        Err(e) if e.is_amqp_soft_error() || is_not_found(&e) => {
            tracing::info!(queue, error = %e, "an earlier version's delay queue still holds retries");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The deliveries of partition `i`'s consumer, each tagged with `i`, then one `(i, None)`
/// when the consumer ends.
fn ended_by_none(
    i: usize,
    c: impl Stream<Item = lapin::Result<Delivery>> + Send + 'static,
) -> BoxStream<'static, (usize, Option<lapin::Result<Delivery>>)> {
    c.map(move |d| (i, Some(d)))
        .chain(futures::stream::once(async move { (i, None) }))
        .boxed()
}

/// The scheduled-retry count a delivery carries (0 for a first delivery).
pub fn attempt_of(props: &BasicProperties) -> usize {
    props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(ATTEMPT_HEADER))
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => Some(*n as usize),
            AMQPValue::LongInt(n) => Some(*n as usize),
            AMQPValue::ShortInt(n) => Some(*n as usize),
            _ => None,
        })
        .unwrap_or(0)
}
