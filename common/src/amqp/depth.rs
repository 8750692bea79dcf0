//! The depth of a namespace's queues as floodgate itself sees them, for alerts that must
//! not depend on the broker's Prometheus plugin: every ingress and worker asks the broker
//! every [`POLL_INTERVAL`] (passive declares: they read, never create) and sets
//! `floodgate_queue_messages{queue}`, `floodgate_queue_consumers{queue}` and
//! `floodgate_queue_polled_timestamp_seconds`.
//!
//! With several intake partitions, `queue="intake"` is all of them together (like
//! `retry`, every delay queue together), partitions left over from a larger
//! `FLOODGATE_INTAKE_PARTITIONS` included, and `floodgate_queue_consumers{queue="intake"}`
//! is the fewest consumers any partition has: 0 means some partition is not drained.
//!
//! A failed poll kills nothing: the gauges keep the last values read (not NaN: `NaN > x`
//! is false, so a backlog alert would resolve and its `for:` timer restart while the
//! broker cannot be asked), the poll timestamp stops, so staleness is alerted on by
//! itself, and the link is rebuilt through [`Reconnect`] with its backoff. The task only
//! feeds metrics: it is supervised as [`crate::supervise::Role::Auxiliary`], so it can
//! never make `/readyz` answer 503.

use super::{Leftovers, Link, Reconnect, Topology};
use crate::{Config, retry::Backoff, telemetry::names};
use lapin::{Channel, options::QueueDeclareOptions, types::FieldTable};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the queues are read.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);
/// One poll at most; a broker that accepts the declares but never answers must not
/// freeze the gauges at an old value.
const POLL_TIMEOUT: Duration = Duration::from_secs(10);

/// What one poll read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Depths {
    /// Messages ready in the intake partitions, all together.
    pub intake: u64,
    /// Consumers (workers) of the intake partition that has the fewest.
    pub intake_consumers: u64,
    /// Messages waiting out a delay in the retry queues, all steps together.
    pub retry: u64,
    /// Messages in the dead-letter queue.
    pub dead: u64,
}

/// Reads every queue of `topology`, and the `leftover` ones, with passive declares. A
/// missing queue is an error (and closes `ch`, as the protocol says).
pub async fn read(
    ch: &Channel,
    topology: &Topology,
    leftover: &Leftovers,
) -> lapin::Result<Depths> {
    let passive = |q: &str| {
        ch.queue_declare(
            q.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
    };
    let (mut intake, mut intake_consumers, mut retry) = (0, u64::MAX, 0);
    for p in topology.partitions.iter().chain(&leftover.partitions) {
        let q = passive(&p.queue).await?;
        intake += u64::from(q.message_count());
        intake_consumers = intake_consumers.min(q.consumer_count().into());
        for r in &p.retry_queues {
            retry += u64::from(passive(r).await?.message_count());
        }
    }
    for q in &leftover.legacy_retry_queues {
        retry += u64::from(passive(q).await?.message_count());
    }
    let dead = passive(&topology.dead_queue).await?;
    Ok(Depths {
        intake,
        intake_consumers,
        retry,
        dead: dead.message_count().into(),
    })
}

/// Sets the gauges and the time of this successful poll.
fn record(d: Depths) {
    metrics::gauge!(names::QUEUE_MESSAGES, "queue" => "intake").set(d.intake as f64);
    metrics::gauge!(names::QUEUE_MESSAGES, "queue" => "retry").set(d.retry as f64);
    metrics::gauge!(names::QUEUE_MESSAGES, "queue" => "dead").set(d.dead as f64);
    metrics::gauge!(names::QUEUE_CONSUMERS, "queue" => "intake").set(d.intake_consumers as f64);
    metrics::gauge!(names::QUEUE_POLLED).set(crate::telemetry::unix_secs());
}

/// One link, the channel the polls use, and the leftover partitions found when it
/// opened.
struct Session {
    link: Link,
    channel: Channel,
    leftover: Leftovers,
}

impl Session {
    async fn open(url: &str, name: &str, topology: &Topology) -> anyhow::Result<Self> {
        let link = Link::open(url, name).await?;
        let leftover = topology.leftovers(&link).await?;
        let channel = link.channel().await?;
        Ok(Self {
            link,
            channel,
            leftover,
        })
    }
}

/// Polls the queues of `cfg`'s namespace every [`POLL_INTERVAL`] until `shutdown`, on a
/// link of its own (named after `service`), rebuilt with backoff whenever a poll fails.
pub async fn watch(cfg: Config, service: &'static str, shutdown: CancellationToken) {
    let topology = Topology::of(&cfg);
    let name = format!("floodgate-{service} queue-depth {}", cfg.namespace);
    let mut links = Reconnect::new("queue_depth", Backoff::BACKGROUND);
    while let Some(session) = links
        .next(&shutdown, || Session::open(&cfg.amqp_url, &name, &topology))
        .await
    {
        let lost = poll(&session, &topology, &shutdown).await;
        session.link.close().await;
        match lost {
            Some(e) => links.lost(&e),
            None => break,
        }
    }
}

/// Polls on one channel until a poll fails (returns why) or `shutdown` (None).
async fn poll(
    session: &Session,
    topology: &Topology,
    shutdown: &CancellationToken,
) -> Option<anyhow::Error> {
    loop {
        let polled = tokio::select! {
            _ = shutdown.cancelled() => return None,
            p = tokio::time::timeout(
                POLL_TIMEOUT,
                read(&session.channel, topology, &session.leftover),
            ) => p,
        };
        match polled {
            Ok(Ok(d)) => record(d),
            Ok(Err(e)) => return Some(anyhow::Error::new(e).context("reading queue depths")),
            Err(_) => {
                return Some(anyhow::anyhow!(
                    "reading queue depths took longer than {POLL_TIMEOUT:?}"
                ));
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
        }
    }
}
