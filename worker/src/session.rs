//! The worker's AMQP session: a consuming channel and a confirm-mode channel for retries
//! and dead letters. Rebuilt whole by the supervisor after a broker failure.

use floodgate_common::{
    Config,
    amqp::{ATTEMPT_HEADER, CLOSE_TIMEOUT, Link, REASON_HEADER, Topology},
};
use lapin::{
    BasicProperties, Channel, Confirmation, Consumer,
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
}

impl Session {
    /// Connects, declares the topology and sets the prefetch window.
    pub async fn open(cfg: &Config) -> anyhow::Result<Self> {
        let link = Link::open(
            &cfg.amqp_url,
            &format!("floodgate-worker {}", cfg.namespace),
        )
        .await?;
        let topology = Topology::with_retry_steps(&cfg.namespace, cfg.retry_delays.len());
        let publish = link.confirm_channel().await?;
        topology.declare(&publish).await?;
        let consume = Self::consuming_channel(&link, cfg).await?;
        Ok(Self {
            link,
            consume,
            publish,
            topology,
        })
    }

    async fn consuming_channel(link: &Link, cfg: &Config) -> lapin::Result<Channel> {
        let ch = link.channel().await?;
        // The prefetch window: how many unacked deliveries the broker hands us at once.
        ch.basic_qos(cfg.worker_prefetch, BasicQosOptions { global: false })
            .await?;
        Ok(ch)
    }

    /// Starts consuming the intake queue.
    pub async fn consume(&self) -> lapin::Result<Consumer> {
        self.consume
            .basic_consume(
                self.topology.intake_queue.as_str().into(),
                format!("worker-{}", uuid::Uuid::now_v7()).as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
    }

    /// Stops pulling: closes the consuming channel, so the broker requeues every unacked
    /// delivery, and opens a fresh one for when consumption resumes.
    pub async fn stop_pulling(&mut self, cfg: &Config) -> lapin::Result<()> {
        let _ =
            tokio::time::timeout(CLOSE_TIMEOUT, self.consume.close(200, "pausing".into())).await;
        self.consume = Self::consuming_channel(&self.link, cfg).await?;
        Ok(())
    }

    /// Sends a message to the delay queue of retry `attempt` (1-based), with a jittered
    /// TTL around `delay`; the broker returns it to intake when the TTL passes.
    pub async fn schedule_retry(
        &self,
        payload: &[u8],
        props: &BasicProperties,
        attempt: usize,
        delay: Duration,
    ) -> anyhow::Result<()> {
        let queue = &self.topology.retry_queues[attempt - 1];
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

    /// Sends a message to the dead-letter exchange with why.
    pub async fn dead_letter(
        &self,
        payload: &[u8],
        props: &BasicProperties,
        reason: &str,
    ) -> anyhow::Result<()> {
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
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
