use super::Link;
use crate::{Config, Namespace, domain::OrderLines};
use lapin::{
    Channel, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};

/// Every AMQP name of one namespace.
#[derive(Debug, Clone)]
pub struct Topology {
    ns: Namespace,
    /// Direct exchange orders are published to.
    pub orders_exchange: String,
    /// The intake partitions (`FLOODGATE_INTAKE_PARTITIONS`), partition i at index i.
    /// Partition 0 holds the names a one-partition deployment always had.
    pub partitions: Vec<Partition>,
    /// Exchange that rejected intake messages are dead-lettered to.
    pub dead_exchange: String,
    /// Quorum queue holding dead letters for an operator, of every partition (each
    /// carries its partition in [`PARTITION_HEADER`]).
    pub dead_queue: String,
    /// Topic exchange of committed events (`order.<status>`, `stock.<sku>`).
    pub events_exchange: String,
    /// Steps of the retry schedule: delay queues per partition.
    retry_steps: usize,
}

/// One intake partition: its quorum queue, the routing key that reaches it on the
/// orders exchange, and its own delay queues, so a scheduled retry returns to the
/// partition it came from.
///
/// Partition 0 is `<ns>.orders.intake` (key `intake`, delay queues
/// `<ns>.orders.delay.<step>`): the intake of a deployment that never set
/// `FLOODGATE_INTAKE_PARTITIONS`. Partition i >= 1 appends `.<i>` to each of them.
///
/// The delay queues are quorum queues, replicated like the intake: a classic queue
/// lives on one node, and while that node is down every declare of it fails (no
/// session of any service could open) and its messages are out of reach. They replace
/// the classic `<ns>.orders.retry.<step>` of earlier versions ([`Leftovers`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub index: usize,
    /// Quorum queue the workers consume.
    pub queue: String,
    /// Routing key of this partition's orders on `orders_exchange`.
    pub key: String,
    /// Delay queues of the scheduled retries, one per step of the schedule; a message
    /// waits out its TTL there and is dead-lettered back to this partition.
    pub retry_queues: Vec<String>,
}

/// Queues a namespace's topology no longer declares but that may still hold orders:
/// workers drain them, the depth gauges and `reconcile` count them.
#[derive(Debug, Clone, Default)]
pub struct Leftovers {
    /// Partitions beyond `FLOODGATE_INTAKE_PARTITIONS` (it was lowered), with those of
    /// their delay queues that exist. Workers consume them until an operator deletes
    /// them.
    pub partitions: Vec<Partition>,
    /// The classic delay queues of versions before the quorum ones
    /// (`<ns>.orders.retry.<step>`): they still return what they hold to partition 0
    /// when its TTL passes; a worker deletes each once it is empty.
    pub legacy_retry_queues: Vec<String>,
}

impl Leftovers {
    /// Every leftover queue that can hold messages.
    pub fn queues(&self) -> impl Iterator<Item = &str> {
        self.partitions
            .iter()
            .flat_map(|p| {
                std::iter::once(p.queue.as_str()).chain(p.retry_queues.iter().map(String::as_str))
            })
            .chain(self.legacy_retry_queues.iter().map(String::as_str))
    }
}

/// The most steps a retry schedule may have (`FLOODGATE_RETRY_DELAYS_MS`).
pub const MAX_RETRY_STEPS: usize = 10;

/// The most intake partitions a namespace may have.
pub const MAX_PARTITIONS: usize = 64;

/// The intake partition of an order whose first line (as the order lists its lines) is
/// `sku`, among `partitions`: `fnv1a_64(utf8(sku)) % partitions`, with FNV-1a's 64-bit
/// offset basis 0xcbf29ce484222325 and prime 0x100000001b3. Fixed forever (a test pins
/// it): every ingress of every version puts a SKU's orders in the same partition.
pub fn partition_of(sku: &str, partitions: usize) -> usize {
    // The same function as a SKU's Redis shard.
    crate::redis::shard_of(sku, partitions)
}

/// Header carrying how many scheduled retries a message has had.
pub const ATTEMPT_HEADER: &str = "x-floodgate-attempt";
/// Header carrying why a message was dead-lettered.
pub const REASON_HEADER: &str = "x-floodgate-reason";
/// Header a dead letter carries: the intake partition it came from, so a replay returns
/// it there.
pub const PARTITION_HEADER: &str = "x-floodgate-partition";
/// Header carrying when a message was published for a worker, in ms since the Unix epoch:
/// ingress's publish, or a dead letter's replay (a scheduled retry keeps its order's).
/// The worker's queue-wait histogram is measured from it on a first delivery of a first
/// attempt; a message without it (from an older ingress) is consumed as ever, only not
/// measured.
pub const PUBLISHED_HEADER: &str = "x-floodgate-published-ms";

/// Now, in ms since the Unix epoch (what [`PUBLISHED_HEADER`] carries).
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The properties of a new order's intake message (ingress's publish, the waitlist
/// promoter's): persistent (written to disk by the quorum queue before the confirm),
/// JSON, the order id as `message_id`, [`PUBLISHED_HEADER`] now, and the order's
/// `trace` in `traceparent`.
pub fn intake_properties(
    message_id: &str,
    trace: Option<&crate::trace::TraceParent>,
) -> lapin::BasicProperties {
    let mut headers = match trace {
        Some(t) => super::trace_headers(t),
        None => FieldTable::default(),
    };
    headers.insert(PUBLISHED_HEADER.into(), AMQPValue::LongLongInt(unix_ms()));
    lapin::BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message_id.into())
        .with_headers(headers)
}

/// The [`PUBLISHED_HEADER`] of a message's headers, if it has a usable one.
pub fn published_ms(headers: Option<&FieldTable>) -> Option<i64> {
    match headers?.inner().get(PUBLISHED_HEADER)? {
        AMQPValue::LongLongInt(ms) => Some(*ms),
        AMQPValue::LongUInt(ms) => Some(i64::from(*ms)),
        AMQPValue::LongInt(ms) => Some(i64::from(*ms)),
        _ => None,
    }
}

impl Topology {
    /// The names of `cfg`'s namespace, with its partitions and retry steps.
    pub fn of(cfg: &Config) -> Self {
        Self::new(
            &cfg.namespace,
            cfg.intake_partitions,
            cfg.retry_delays.len(),
        )
    }

    /// The names of `ns` with `partitions` intake partitions (at least one) and
    /// `retry_steps` delay queues per partition (one per step of the retry schedule:
    /// `Config::retry_delays.len()`).
    pub fn new(ns: &Namespace, partitions: usize, retry_steps: usize) -> Self {
        let mut t = Self {
            ns: ns.clone(),
            orders_exchange: format!("{ns}.orders"),
            partitions: Vec::new(),
            dead_exchange: format!("{ns}.orders.dlx"),
            dead_queue: format!("{ns}.orders.dead"),
            events_exchange: format!("{ns}.events"),
            retry_steps,
        };
        t.partitions = (0..partitions.max(1)).map(|i| t.partition(i)).collect();
        t
    }

    /// The names of partition `i`, whether or not this topology has it (a partition
    /// left over from a larger `FLOODGATE_INTAKE_PARTITIONS`).
    pub fn partition(&self, i: usize) -> Partition {
        let ns = &self.ns;
        let suffix = if i == 0 {
            String::new()
        } else {
            format!(".{i}")
        };
        Partition {
            index: i,
            queue: format!("{ns}.orders.intake{suffix}"),
            key: format!("intake{suffix}"),
            retry_queues: (1..=self.retry_steps)
                .map(|step| format!("{ns}.orders.delay.{step}{suffix}"))
                .collect(),
        }
    }

    /// The partition an order with these lines goes to: by its first SKU
    /// ([`partition_of`]).
    pub fn partition_for(&self, lines: &OrderLines) -> &Partition {
        let first = lines.as_slice()[0].sku.as_str();
        &self.partitions[partition_of(first, self.partitions.len())]
    }

    /// What exists on the broker beyond this topology ([`Leftovers`]). Probed with
    /// passive declares, each on a channel of its own (a missing queue closes its
    /// channel): partitions from N up to the first missing, and the classic delay queues
    /// of earlier versions.
    pub async fn leftovers(&self, link: &Link) -> lapin::Result<Leftovers> {
        let mut partitions = Vec::new();
        for i in self.partitions.len()..MAX_PARTITIONS {
            let mut p = self.partition(i);
            if !queue_exists(link, &p.queue).await? {
                break;
            }
            let mut kept = Vec::new();
            for q in p.retry_queues.drain(..) {
                if queue_exists(link, &q).await? {
                    kept.push(q);
                }
            }
            p.retry_queues = kept;
            partitions.push(p);
        }
        let mut legacy_retry_queues = Vec::new();
        for step in 1..=MAX_RETRY_STEPS {
            let q = format!("{}.orders.retry.{step}", self.ns);
            if queue_exists(link, &q).await? {
                legacy_retry_queues.push(q);
            }
        }
        Ok(Leftovers {
            partitions,
            legacy_retry_queues,
        })
    }

    /// Declares every exchange, queue and binding. Idempotent; publishers and consumers
    /// both call it at start-up, so either may start first.
    pub async fn declare(&self, ch: &Channel) -> lapin::Result<()> {
        let durable_exchange = ExchangeDeclareOptions {
            // Survives a broker restart, like the messages routed through it.
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        ch.exchange_declare(
            self.orders_exchange.as_str().into(),
            ExchangeKind::Direct,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
        ch.exchange_declare(
            self.dead_exchange.as_str().into(),
            // Every dead letter lands in one queue, whatever its routing key.
            ExchangeKind::Fanout,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
        self.declare_events(ch).await?;

        let durable_queue = QueueDeclareOptions {
            // Quorum queues must be durable and neither exclusive nor auto-deleted.
            durable: true,
            exclusive: false,
            auto_delete: false,
            ..QueueDeclareOptions::default()
        };
        ch.queue_declare(self.dead_queue.as_str().into(), durable_queue, quorum())
            .await?;
        for p in &self.partitions {
            let mut intake_args = quorum();
            // A message a worker rejects (nack, requeue=false) goes to the dead-letter
            // queue.
            intake_args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(self.dead_exchange.as_str().into()),
            );
            // Quorum queues dead-letter at-least-once only with this overflow mode.
            intake_args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
            intake_args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            if p.index > 0 {
                // Leaders spread over the cluster's nodes: the node with the fewest
                // leaders gets the new one (default: the node of the declaring
                // connection, which would put every partition on one node). Partition 0
                // goes without: a queue declared before partitions existed lacks the
                // argument, and a redeclare with an argument the queue lacks is refused.
                intake_args.insert(
                    "x-queue-leader-locator".into(),
                    AMQPValue::LongString("balanced".into()),
                );
            }
            ch.queue_declare(p.queue.as_str().into(), durable_queue, intake_args)
                .await?;
            ch.queue_bind(
                p.queue.as_str().into(),
                self.orders_exchange.as_str().into(),
                p.key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
            for q in &p.retry_queues {
                // Quorum queues, so a node down takes no delayed order out of reach (see
                // [`Partition`]); nothing consumes them, they only hold messages a while.
                let mut args = quorum();
                // Expired messages (each carries its own jittered TTL) go back to their
                // own partition.
                args.insert(
                    "x-dead-letter-exchange".into(),
                    AMQPValue::LongString(self.orders_exchange.as_str().into()),
                );
                args.insert(
                    "x-dead-letter-routing-key".into(),
                    AMQPValue::LongString(p.key.as_str().into()),
                );
                // At-least-once: an expired message leaves only once the partition took
                // it (at-most-once would drop it while the partition elects a leader).
                args.insert(
                    "x-overflow".into(),
                    AMQPValue::LongString("reject-publish".into()),
                );
                args.insert(
                    "x-dead-letter-strategy".into(),
                    AMQPValue::LongString("at-least-once".into()),
                );
                ch.queue_declare(q.as_str().into(), durable_queue, args)
                    .await?;
            }
        }
        ch.queue_bind(
            self.dead_queue.as_str().into(),
            self.dead_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        Ok(())
    }

    /// Declares only the `events` exchange: what the outbox relay publishes to and the
    /// notifiers bind to. They never touch the order queues (declaring those would also
    /// re-create bindings an operator removed on purpose).
    pub async fn declare_events(&self, ch: &Channel) -> lapin::Result<()> {
        ch.exchange_declare(
            self.events_exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
    }

    /// The name of a new notifier instance's own event queue: one per instance, so every
    /// instance sees every event.
    pub fn notifier_queue(&self) -> String {
        format!("{}.notifier.{}", self.events_exchange, uuid::Uuid::now_v7())
    }

    /// Declares a notifier instance's event queue and binds it to every order event.
    pub async fn declare_notifier_queue(&self, ch: &Channel, queue: &str) -> lapin::Result<()> {
        let mut args = FieldTable::default();
        // Deleted a minute after its last consumer went away: long enough to ride out a
        // reconnect, short enough that a dead instance's queue does not pile up events.
        args.insert("x-expires".into(), AMQPValue::LongInt(60_000));
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                // Survives a broker restart with its binding (events are published
                // persistent); neither exclusive nor auto-deleted, so it outlives a broken
                // connection.
                durable: true,
                exclusive: false,
                auto_delete: false,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await?;
        // Every order event, whatever its status (`order.<status>`, `order.batch` runs).
        ch.queue_bind(
            queue.into(),
            self.events_exchange.as_str().into(),
            "order.*".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    }

    /// Every queue of the intake path: the partitions' queues and their delay queues.
    pub fn intake_and_retry_queues(&self) -> impl Iterator<Item = &str> {
        self.partitions.iter().flat_map(|p| {
            std::iter::once(p.queue.as_str()).chain(p.retry_queues.iter().map(String::as_str))
        })
    }

    /// Deletes everything [`Topology::declare`] made (tests clean up their namespace).
    pub async fn delete(&self, ch: &Channel) -> lapin::Result<()> {
        for q in self
            .intake_and_retry_queues()
            .chain(std::iter::once(self.dead_queue.as_str()))
        {
            ch.queue_delete(q.into(), Default::default()).await?;
        }
        for e in [
            &self.orders_exchange,
            &self.dead_exchange,
            &self.events_exchange,
        ] {
            ch.exchange_delete(e.as_str().into(), Default::default())
                .await?;
        }
        Ok(())
    }
}

/// Whether `queue` exists, asked on a channel of its own (a passive declare of a missing
/// queue closes its channel).
async fn queue_exists(link: &Link, queue: &str) -> lapin::Result<bool> {
    let ch = link.channel().await?;
    let found = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match found {
        Ok(_) => {
            let _ = ch.close(200, "probed".into()).await;
            Ok(true)
        }
        // 404 NOT_FOUND closes the channel, not the connection.
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// True for the broker's 404 NOT_FOUND (a passive declare of a missing queue).
pub fn is_not_found(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// Arguments of a quorum queue: replicated across a cluster, and it keeps a delivery
/// count so poison messages can be recognised.
fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partition_of_a_sku_never_changes() {
        // FNV-1a 64 test vectors, then the partitions they give: pinned, so no release
        // can move a SKU's orders to another partition.
        assert_eq!(
            partition_of("", usize::MAX),
            0xcbf2_9ce4_8422_2325 % usize::MAX
        );
        assert_eq!(
            partition_of("a", usize::MAX) as u64,
            0xaf63_dc4c_8601_ec8c % usize::MAX as u64
        );
        assert_eq!(
            partition_of("foobar", usize::MAX) as u64,
            0x8594_4171_f739_67e8 % usize::MAX as u64
        );
        let got: Vec<usize> = ["tee", "mug", "cap", "sock", "hoodie"]
            .iter()
            .map(|s| partition_of(s, 3))
            .collect();
        assert_eq!(got, [2, 2, 0, 1, 0]);
        assert!((0..1000).all(|i| partition_of(&format!("sku-{i}"), 1) == 0));
    }

    #[test]
    fn partition_zero_keeps_the_names_of_a_deployment_without_partitions() {
        let ns = Namespace::parse("shop").unwrap();
        let one = Topology::new(&ns, 1, 2);
        assert_eq!(one.partitions.len(), 1);
        let p0 = &one.partitions[0];
        assert_eq!(p0.queue, "shop.orders.intake");
        assert_eq!(p0.key, "intake");
        assert_eq!(
            p0.retry_queues,
            ["shop.orders.delay.1", "shop.orders.delay.2"]
        );
        let three = Topology::new(&ns, 3, 2);
        assert_eq!(three.partitions[0], *p0);
        let p2 = &three.partitions[2];
        assert_eq!(p2.queue, "shop.orders.intake.2");
        assert_eq!(p2.key, "intake.2");
        assert_eq!(
            p2.retry_queues,
            ["shop.orders.delay.1.2", "shop.orders.delay.2.2"]
        );
        assert_eq!(three.partition(5).queue, "shop.orders.intake.5");
        assert_eq!(three.intake_and_retry_queues().count(), 9);
    }
}
