//! The outbox relay: publishes the events committed to the `outbox` table (by the batch
//! transaction, the reaper and cancellations) to the `events` exchange, and deletes each
//! row only after the broker confirmed it. Consecutive rows with one routing key travel
//! as one message ([`OrderEventBatch`]): one broker message per committed batch, not one
//! per order.
//!
//! One relay publishes at a time (a transaction-scoped advisory lock per namespace), so
//! one order's events leave in the order they were written, whichever worker relays. A crash after the publish
//! and before the delete publishes those rows again on the next pass, with the same
//! event ids (each event in a batch carries its row's): delivery is at least once and
//! subscribers de-duplicate by event id. A crash before the publish loses nothing; the rows wait.
//!
//! It has its own AMQP connection, so a relay failure never disturbs the consumer, and
//! it runs while the consumer is paused: events already committed still go out.

use anyhow::Context;
use deadpool_postgres::Pool;
use floodgate_common::{
    Config,
    amqp::{Link, ORDER_EVENT_BATCH, OrderEventBatch, Reconnect, Topology},
    retry::Backoff,
    telemetry::names,
    trace::{self, TraceParent},
};
use lapin::{BasicProperties, Channel, Confirmation, options::BasicPublishOptions};
use std::{sync::Arc, time::Duration};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Rows published per transaction at most.
const BATCH: i64 = 500;
/// How long the relay waits for the broker to confirm a batch.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// A whole pass (lock, read, publish, confirm, delete) at most; past it the link is
/// rebuilt and the transaction rolled back, so rows are never held indefinitely.
const PASS_TIMEOUT: Duration = Duration::from_secs(30);

/// Test hook: `FLOODGATE_TEST_FAILPOINT=outbox_before_publish|outbox_after_publish`
/// aborts the process at that point of the first non-empty pass, so the crash-window
/// tests can kill a real relay exactly there; `outbox_panic` panics at the start of every
/// pass (the supervision test). Read once; never set in production.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failpoint {
    BeforePublish,
    AfterPublish,
    Panic,
}

fn failpoint() -> Option<Failpoint> {
    match std::env::var("FLOODGATE_TEST_FAILPOINT").ok()?.as_str() {
        "outbox_before_publish" => Some(Failpoint::BeforePublish),
        "outbox_after_publish" => Some(Failpoint::AfterPublish),
        "outbox_panic" => Some(Failpoint::Panic),
        _ => None,
    }
}

fn trip(at: Failpoint, armed: Option<Failpoint>) {
    if armed == Some(at) {
        eprintln!("failpoint {at:?} reached: aborting");
        std::process::abort();
    }
}

/// The broker session of a worker task that publishes (the relay, the waitlist's
/// promoter): a link of its own, named `floodgate-<task> <namespace>`, and one
/// confirm-mode channel, so its failures never disturb the consumer.
pub(crate) struct Session {
    pub link: Link,
    pub channel: Channel,
    pub topology: Topology,
}

impl Session {
    pub async fn open(cfg: &Config, task: &str) -> anyhow::Result<Self> {
        let link = Link::open(
            &cfg.amqp_url,
            &format!("floodgate-{task} {}", cfg.namespace),
        )
        .await?;
        let channel = link.confirm_channel().await?;
        Ok(Self {
            link,
            channel,
            topology: Topology::of(cfg),
        })
    }

    /// The relay's session: the `events` exchange declared.
    async fn relay(cfg: &Config) -> anyhow::Result<Self> {
        let session = Self::open(cfg, "outbox").await?;
        session.topology.declare_events(&session.channel).await?;
        Ok(session)
    }
}

/// Why a pass failed: the broker link needs rebuilding, or the database failed.
enum PassError {
    Broker(anyhow::Error),
    Db(anyhow::Error),
}

/// Relays until `shutdown`. `wake` is notified after every commit of this process that
/// wrote outbox rows; `cfg.outbox_poll` bounds the wait for rows written elsewhere.
/// `webhooks` is notified after a commit that owed some webhook an event.
pub async fn run(
    cfg: Config,
    pg: Pool,
    wake: Arc<Notify>,
    webhooks: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let armed = failpoint();
    let mut links = Reconnect::new("outbox", Backoff::BACKGROUND);
    while let Some(session) = links.next(&shutdown, || Session::relay(&cfg)).await {
        let lost = relay(&cfg, &pg, &session, &wake, &webhooks, armed, &shutdown).await;
        session.link.close().await;
        match lost {
            Some(e) => links.lost(&e),
            None => break,
        }
    }
}

/// Relays over one broker session until it fails (returns why) or `shutdown` (None).
async fn relay(
    cfg: &Config,
    pg: &Pool,
    session: &Session,
    wake: &Notify,
    webhooks: &Notify,
    armed: Option<Failpoint>,
    shutdown: &CancellationToken,
) -> Option<anyhow::Error> {
    loop {
        let outcome = tokio::time::timeout(PASS_TIMEOUT, pass(pg, session, armed))
            .await
            .unwrap_or_else(|_| {
                Err(PassError::Broker(anyhow::anyhow!(
                    "a relay pass took longer than {PASS_TIMEOUT:?}"
                )))
            });
        let idle = match outcome {
            Ok((n, owed)) => {
                if owed > 0 {
                    webhooks.notify_one();
                }
                n < BATCH as usize
            }
            Err(PassError::Broker(e)) => return Some(e),
            Err(PassError::Db(e)) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "outbox relay: database failed; retrying in 1 s"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {},
                }
                false
            }
        };
        if shutdown.is_cancelled() {
            return None;
        }
        if idle {
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = wake.notified() => {},
                _ = tokio::time::sleep(cfg.outbox_poll) => {},
            }
        }
    }
}

/// One transaction: take the relay lock, lock up to [`BATCH`] rows, publish them, wait for every confirm,
/// owe them to the webhooks subscribed to their types, delete them. Returns how many
/// rows went out and how many webhook deliveries they made owed.
async fn pass(
    pg: &Pool,
    session: &Session,
    armed: Option<Failpoint>,
) -> Result<(usize, u64), PassError> {
    assert!(armed != Some(Failpoint::Panic), "failpoint outbox_panic");
    let db_err = |e: tokio_postgres::Error| PassError::Db(e.into());
    let mut db = pg.get().await.map_err(|e| PassError::Db(e.into()))?;
    let tx = db.transaction().await.map_err(db_err)?;
    // A relay that dies mid-pass (its host gone, its connection half-open) must not
    // hold the rows and the lock for long.
    tx.batch_execute("SET LOCAL idle_in_transaction_session_timeout = '60s'")
        .await
        .map_err(db_err)?;
    let locked: bool = tx
        .query_one(
            "SELECT pg_try_advisory_xact_lock(hashtext(current_schema() || '.outbox_relay'))",
            &[],
        )
        .await
        .map_err(db_err)?
        .get(0);
    if !locked {
        // Another worker is relaying; its rows will be gone when we look again.
        return Ok((0, 0));
    }
    let rows = tx
        .query(
            "SELECT id, event_id, routing_key, payload::text, created_at, traceparent
               FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
            &[&BATCH],
        )
        .await
        .map_err(db_err)?;
    if rows.is_empty() {
        return Ok((0, 0));
    }
    trip(Failpoint::BeforePublish, armed);
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    // Each event's order trace (its row's `traceparent`), sent beside the event.
    let traces: Vec<Option<TraceParent>> = rows
        .iter()
        .map(|r| r.get::<_, Option<&str>>(5).and_then(TraceParent::parse))
        .collect();
    let span = tracing::info_span!("outbox_relay", events = rows.len());
    trace::link(&span, traces.iter().flatten());
    let messages = publish_rows(session, &rows, &traces)
        .instrument(span)
        .await?;
    trip(Failpoint::AfterPublish, armed);
    let owed = owe_webhooks(&tx, &ids).await.map_err(db_err)?;
    if let Some(first) = rows.first() {
        let at: time::OffsetDateTime = first.get(4);
        tracing::debug!(
            rows = rows.len(),
            owed,
            oldest_ms = (time::OffsetDateTime::now_utc() - at).whole_milliseconds() as i64,
            "outbox relay: published"
        );
    }
    tx.execute("DELETE FROM outbox WHERE id = ANY($1)", &[&ids])
        .await
        .map_err(db_err)?;
    tx.commit().await.map_err(db_err)?;
    metrics::counter!(names::OUTBOX_RELAYED).increment(rows.len() as u64);
    metrics::counter!(names::OUTBOX_MESSAGES).increment(messages as u64);
    Ok((rows.len(), owed))
}

/// Owes every live webhook subscribed to an event's type (its routing key) that event,
/// in the transaction that deletes its outbox row: each committed event is owed to each
/// subscriber exactly once, however often the relay publishes it. An event is stored
/// (`webhook_events`) as its body's `data`: an order event with the order's lines and
/// times, a `stock.sold_out` as written. Events nobody subscribed to are not kept.
async fn owe_webhooks(
    tx: &deadpool_postgres::Transaction<'_>,
    ids: &[i64],
) -> Result<u64, tokio_postgres::Error> {
    let stmt = tx
        .prepare_cached(
            "WITH subs AS (
                SELECT id, events FROM webhooks WHERE deleted_at IS NULL
             ), ev AS (
                INSERT INTO webhook_events (event_id, type, at, data)
                SELECT o.event_id, o.routing_key, o.created_at,
                       CASE WHEN o.routing_key LIKE 'order.%' THEN
                         jsonb_strip_nulls(o.payload - 'type' - 'at') || jsonb_strip_nulls(jsonb_build_object(
                           'items', COALESCE((SELECT jsonb_agg(jsonb_build_object('sku', i.sku, 'qty', i.qty) ORDER BY i.sku)
                                                FROM order_items i WHERE i.order_id = (o.payload->>'order_id')::uuid),
                                             '[]'::jsonb),
                           'accepted_at', to_char(r.accepted_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                           'confirmed_at', to_char(r.confirmed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')))
                       ELSE o.payload - 'type' - 'at' END
                  FROM outbox o
                  LEFT JOIN orders r ON o.routing_key LIKE 'order.%' AND r.id = (o.payload->>'order_id')::uuid
                 WHERE o.id = ANY($1)
                   AND EXISTS (SELECT 1 FROM subs WHERE o.routing_key = ANY(subs.events))
                ON CONFLICT (event_id) DO NOTHING
                RETURNING event_id, type
             )
             INSERT INTO webhook_deliveries (webhook_id, event_id)
             SELECT subs.id, ev.event_id FROM ev JOIN subs ON ev.type = ANY(subs.events)
             ON CONFLICT DO NOTHING",
        )
        .await?;
    tx.execute(&stmt, &[&ids]).await
}

/// Publishes `rows` (each run of one routing key as one message, each event with its
/// trace) and waits for every confirm. Returns how many messages went out.
async fn publish_rows(
    session: &Session,
    rows: &[tokio_postgres::Row],
    traces: &[Option<TraceParent>],
) -> Result<usize, PassError> {
    let mut confirms = Vec::new();
    let mut offset = 0;
    // Each run of consecutive rows with one routing key is one message, in row order.
    for run in rows.chunk_by(|a, b| a.get::<_, &str>(2) == b.get::<_, &str>(2)) {
        let first_id: uuid::Uuid = run[0].get(1);
        let routing_key: &str = run[0].get(2);
        let at: time::OffsetDateTime = run[0].get(4);
        let payload = OrderEventBatch::encode_raw(
            run.iter()
                .zip(&traces[offset..])
                .map(|(r, t)| (r.get(1), *t, r.get(3))),
        );
        offset += run.len();
        let props = BasicProperties::default()
            .with_message_id(first_id.to_string().into())
            .with_type(ORDER_EVENT_BATCH.into())
            .with_content_type("application/json".into())
            // Persistent: the notifiers' queues are durable and outlive a broker restart.
            .with_delivery_mode(2)
            .with_timestamp(at.unix_timestamp().max(0) as u64);
        let confirm = session
            .channel
            .basic_publish(
                session.topology.events_exchange.as_str().into(),
                routing_key.into(),
                // Not mandatory: with no notifier running, nobody is bound, and that is
                // not a failure.
                BasicPublishOptions::default(),
                &payload,
                props,
            )
            .await
            .context("publishing events")
            .map_err(PassError::Broker)?;
        confirms.push(confirm);
    }
    let messages = confirms.len();
    for confirm in confirms {
        match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
            Ok(Ok(Confirmation::Ack(_))) => {}
            Ok(Ok(other)) => {
                return Err(PassError::Broker(anyhow::anyhow!(
                    "broker refused an event: {other:?}"
                )));
            }
            Ok(Err(e)) => return Err(PassError::Broker(e.into())),
            Err(_) => {
                return Err(PassError::Broker(anyhow::anyhow!(
                    "no publisher confirm within {CONFIRM_TIMEOUT:?}"
                )));
            }
        }
    }
    if tracing::enabled!(tracing::Level::DEBUG) {
        for (r, t) in rows.iter().zip(traces) {
            tracing::debug!(
                event_id = %r.get::<_, uuid::Uuid>(1),
                routing_key = r.get::<_, &str>(2),
                trace_id = t.map(|t| tracing::field::display(t.trace_id())),
                "event relayed"
            );
        }
    }
    Ok(messages)
}
