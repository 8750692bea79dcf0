//! The dead-letter queue, for operators: read it without removing anything, and replay
//! chosen dead letters to the intake queue.
//!
//! One dead-letter queue serves every intake partition; a replay returns each message to
//! the partition it came from ([`home_partition`]).

use crate::{
    Config,
    amqp::{
        ATTEMPT_HEADER, IntakeMessage, Link, PARTITION_HEADER, PUBLISHED_HEADER, REASON_HEADER,
        Topology,
    },
};
use anyhow::Context;
use lapin::{
    BasicProperties, Channel, Confirmation,
    message::BasicGetMessage,
    options::{BasicGetOptions, BasicPublishOptions},
    types::AMQPValue,
};

/// One dead letter as an operator sees it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The order id (the message id ingress set), if the message had one.
    pub order_id: Option<String>,
    /// Why it was dead-lettered (`x-floodgate-reason`).
    pub reason: String,
    /// Scheduled retries it had (`x-floodgate-attempt`).
    pub attempts: String,
    /// The intake partition a replay sends it to.
    pub partition: usize,
    /// The payload, as text (lossy), for a human to read.
    pub body: String,
}

fn header(props: &BasicProperties, name: &str) -> String {
    match props.headers().as_ref().and_then(|h| h.inner().get(name)) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        Some(AMQPValue::LongLongInt(n)) => n.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

async fn open(cfg: &Config) -> anyhow::Result<(Link, Channel, Topology)> {
    let conn = Link::open(&cfg.amqp_url, "floodgate dlq")
        .await
        .context("connecting to RabbitMQ")?;
    let ch = conn.channel().await?;
    let topology = Topology::of(cfg);
    topology.declare(&ch).await?;
    Ok((conn, ch, topology))
}

impl DeadLetter {
    fn of(props: &BasicProperties, data: &[u8], topology: &Topology) -> Self {
        Self {
            order_id: props.message_id().as_ref().map(|s| s.to_string()),
            reason: header(props, REASON_HEADER),
            attempts: header(props, ATTEMPT_HEADER),
            partition: home_partition(props, data, topology),
            body: String::from_utf8_lossy(data).into_owned(),
        }
    }
}

/// Where a dead letter is replayed to: the partition its [`PARTITION_HEADER`] names
/// (where it was dead-lettered from) if `topology` still has it; else the partition its
/// first SKU picks now (a message dead-lettered before partitions existed, or from a
/// partition since removed); else (an undecodable message) partition 0.
pub fn home_partition(props: &BasicProperties, data: &[u8], topology: &Topology) -> usize {
    let stamped = match props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(PARTITION_HEADER))
    {
        Some(AMQPValue::LongLongInt(n)) => usize::try_from(*n).ok(),
        Some(AMQPValue::LongInt(n)) => usize::try_from(*n).ok(),
        Some(AMQPValue::ShortInt(n)) => usize::try_from(*n).ok(),
        _ => None,
    };
    if let Some(p) = stamped.filter(|p| *p < topology.partitions.len()) {
        return p;
    }
    match IntakeMessage::from_bytes(data) {
        Ok(m) => topology.partition_for(&m.order().items).index,
        Err(_) => 0,
    }
}

/// The next dead letter, left unacknowledged on `ch`.
async fn next(ch: &Channel, topology: &Topology) -> lapin::Result<Option<BasicGetMessage>> {
    ch.basic_get(
        topology.dead_queue.as_str().into(),
        BasicGetOptions { no_ack: false },
    )
    .await
}

async fn close(conn: Link, ch: Channel) {
    let _ = ch.close(200, "done".into()).await;
    conn.close().await;
}

/// Up to `limit` dead letters, oldest first. Nothing is removed: every message read is
/// left unacknowledged and returns to the queue when the channel closes.
pub async fn list(cfg: &Config, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
    let (conn, ch, topology) = open(cfg).await?;
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(m) = next(&ch, &topology).await? else {
            break;
        };
        out.push(DeadLetter::of(
            &m.delivery.properties,
            &m.delivery.data,
            &topology,
        ));
    }
    close(conn, ch).await;
    Ok(out)
}

/// Which dead letters to replay.
pub enum Select<'a> {
    All,
    Orders(&'a [String]),
}

/// Sends the selected dead letters (among the first `limit`) back to intake, each to its
/// own partition ([`home_partition`]), with their retry count reset, each confirmed by the broker before it leaves the dead-letter queue.
/// Returns (replayed, left in the queue).
pub async fn replay(
    cfg: &Config,
    select: Select<'_>,
    limit: usize,
) -> anyhow::Result<(Vec<DeadLetter>, usize)> {
    let (conn, ch, topology) = open(cfg).await?;
    let publish = conn.confirm_channel().await?;
    let (mut replayed, mut kept) = (Vec::new(), 0);
    for _ in 0..limit {
        let Some(m) = next(&ch, &topology).await? else {
            break;
        };
        let props = m.delivery.properties.clone();
        let letter = DeadLetter::of(&props, &m.delivery.data, &topology);
        let wanted = match select {
            Select::All => true,
            Select::Orders(ids) => letter.order_id.as_ref().is_some_and(|id| ids.contains(id)),
        };
        if !wanted {
            kept += 1;
            continue; // unacked: back in the queue when the channel closes
        }
        let mut headers = props.headers().clone().unwrap_or_default().inner().clone();
        headers.remove(REASON_HEADER);
        headers.remove(ATTEMPT_HEADER);
        headers.remove(PARTITION_HEADER);
        // Due for a worker from now: its queue wait does not count its time as a dead letter.
        headers.insert(
            PUBLISHED_HEADER.into(),
            AMQPValue::LongLongInt(crate::amqp::unix_ms()),
        );
        let confirm = publish
            .basic_publish(
                topology.orders_exchange.as_str().into(),
                topology.partitions[letter.partition].key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &m.delivery.data,
                props.with_headers(headers.into()).with_delivery_mode(2),
            )
            .await?
            .await?;
        anyhow::ensure!(
            matches!(confirm, Confirmation::Ack(None)),
            "the broker did not take a replayed message: {confirm:?}"
        );
        m.delivery.acker.ack(Default::default()).await?;
        replayed.push(letter);
    }
    let _ = publish.close(200, "done".into()).await;
    close(conn, ch).await;
    Ok((replayed, kept))
}
