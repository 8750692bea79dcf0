use crate::Namespace;
use lapin::{
    Channel, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};

/// Every AMQP name of one namespace.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Direct exchange orders are published to.
    pub orders_exchange: String,
    /// Routing key of new orders on `orders_exchange`.
    pub intake_key: String,
    /// Quorum queue the workers consume.
    pub intake_queue: String,
    /// Exchange that rejected intake messages are dead-lettered to.
    pub dead_exchange: String,
    /// Quorum queue holding dead letters for an operator.
    pub dead_queue: String,
    /// Topic exchange of committed events (`order.<status>`, `stock.<sku>`).
    pub events_exchange: String,
    /// Delay queues of the scheduled retries, one per step of the schedule; a message
    /// waits out its TTL there and is dead-lettered back to `orders_exchange`.
    pub retry_queues: Vec<String>,
}

/// Header carrying how many scheduled retries a message has had.
pub const ATTEMPT_HEADER: &str = "x-floodgate-attempt";
/// Header carrying why a message was dead-lettered.
pub const REASON_HEADER: &str = "x-floodgate-reason";
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
    /// The names of `ns`, with `retry_steps` delay queues (one per step of the retry
    /// schedule: `Config::retry_delays.len()`).
    pub fn with_retry_steps(ns: &Namespace, retry_steps: usize) -> Self {
        Self {
            retry_queues: (1..=retry_steps)
                .map(|i| format!("{ns}.orders.retry.{i}"))
                .collect(),
            orders_exchange: format!("{ns}.orders"),
            intake_key: "intake".to_owned(),
            intake_queue: format!("{ns}.orders.intake"),
            dead_exchange: format!("{ns}.orders.dlx"),
            dead_queue: format!("{ns}.orders.dead"),
            events_exchange: format!("{ns}.events"),
        }
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
        let mut intake_args = quorum();
        // A message a worker rejects (nack, requeue=false) goes to the dead-letter queue.
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
        ch.queue_declare(
            self.intake_queue.as_str().into(),
            durable_queue,
            intake_args,
        )
        .await?;
        ch.queue_bind(
            self.intake_queue.as_str().into(),
            self.orders_exchange.as_str().into(),
            self.intake_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

        ch.queue_declare(self.dead_queue.as_str().into(), durable_queue, quorum())
            .await?;
        for q in &self.retry_queues {
            let mut args = FieldTable::default();
            // Expired messages (each carries its own jittered TTL) go back to intake.
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(self.orders_exchange.as_str().into()),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(self.intake_key.as_str().into()),
            );
            // Classic queues: nothing consumes them, they only hold messages for a while.
            ch.queue_declare(q.as_str().into(), durable_queue, args)
                .await?;
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

    /// Deletes everything [`Topology::declare`] made (tests clean up their namespace).
    pub async fn delete(&self, ch: &Channel) -> lapin::Result<()> {
        for q in [&self.intake_queue, &self.dead_queue]
            .into_iter()
            .chain(&self.retry_queues)
        {
            ch.queue_delete(q.as_str().into(), Default::default())
                .await?;
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
