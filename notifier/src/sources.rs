//! Where events come from.
//!
//! - [`sample_stock`]: every `FLOODGATE_STOCK_INTERVAL_MS`, one Lua call returns the SKUs
//!   the order path marked changed since the last call, with their levels. The order path
//!   pays one `INCR` and one `ZADD` per script; a quiet SKU costs nothing.
//! - [`consume_orders`]: this instance's own queue, bound to `order.*` on the `events`
//!   exchange, fed by the worker's outbox relay. The queue is named after the instance
//!   and outlives a broken connection (it expires a minute after its consumer is
//!   gone), so events published while the notifier reconnects wait for it; deliveries
//!   are acknowledged, so those in flight on a broken channel come again (and are
//!   de-duplicated). If the queue was lost anyway (a broker restart), subscribers of
//!   order topics are closed with `resync` and reconnect to read the current status.

use crate::hub::{CloseReason, Hub};
use floodgate_common::redis::Redis;
use floodgate_common::{
    Config,
    amqp::{
        CLOSE_TIMEOUT, Link, ORDER_EVENT_BATCH, OrderEvent, OrderEventBatch, Reconnect, Topology,
        trace_of,
    },
    bundle::BundleDef,
    redis::{Shards, StockCursor, stock_changes},
    retry::Backoff,
    telemetry::names,
    trace::{self, TraceParent},
};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::{Channel, types::FieldTable};
use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

/// Health of the sources, for `/readyz`.
#[derive(Clone, Default)]
pub struct SourceHealth {
    pub amqp_up: Arc<AtomicBool>,
    /// True once the event queue was consumed: a consumer restarted by the supervisor
    /// must check whether the queue survived, as a reconnect does.
    pub consumed_before: Arc<AtomicBool>,
}

/// Samples changed stock levels until `shutdown`: each tick, every shard's changes (one
/// call per shard). A SKU lives in one shard, or in several when it has buckets: the
/// level published is the sum of the last level read from each shard that holds it.
pub async fn sample_stock(
    hub: Hub,
    mut redis: Redis,
    shards: Shards,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut cursors = vec![StockCursor::default(); shards.count()];
    // sku -> shard -> level, for the sums of SKUs with buckets; stays empty with one shard.
    let mut per_shard: HashMap<String, BTreeMap<usize, i64>> = HashMap::new();
    let mut bundles = BundleLevels::default();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut changed = Vec::new();
        let mut failed = None;
        // New bundles (their definitions never change) about once a second.
        let mut new_bundles = Vec::new();
        if ticks.is_multiple_of(BUNDLE_REFRESH_TICKS) {
            match bundles.refresh(&mut redis, &shards).await {
                Ok(new) => new_bundles = new,
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        ticks += 1;
        for ((g, keys), cursor) in shards.iter().zip(cursors.iter_mut()) {
            match stock_changes(&mut redis, keys, cursor).await {
                Ok(Some((next, levels))) if shards.count() == 1 => {
                    *cursor = next;
                    changed.extend(levels);
                }
                Ok(Some((next, levels))) => {
                    *cursor = next;
                    for (sku, level) in levels {
                        let by_shard = per_shard.entry(sku.clone()).or_default();
                        by_shard.insert(g, level);
                        changed.push((sku, by_shard.values().sum()));
                    }
                }
                // Not loaded (a fresh or restarted Redis): the next load has a new epoch
                // and the first read after it returns every level.
                Ok(None) => {
                    *cursor = StockCursor::default();
                    // Its levels are gone with its load: they leave the sums.
                    for by_shard in per_shard.values_mut() {
                        by_shard.remove(&g);
                    }
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if !changed.is_empty() {
            // A SKU changed in several shards this tick: its last sum counts.
            if shards.count() > 1 {
                let mut last: HashMap<String, i64> = HashMap::new();
                for (sku, level) in changed.drain(..) {
                    last.insert(sku, level);
                }
                changed.extend(last);
            }
        }
        // Every bundle holding a changed SKU, and every bundle new this tick, from its
        // components' last levels.
        let derived = bundles.levels(&changed, &new_bundles);
        changed.extend(derived);
        if !changed.is_empty() {
            hub.publish_stock(changed, OffsetDateTime::now_utc());
        }
        match failed {
            None if failing => {
                tracing::info!("stock sampling works again");
                failing = false;
            }
            Some(e) if !failing => {
                tracing::warn!(error = %e, "stock sampling failed; retrying every tick");
                failing = true;
            }
            _ => {}
        }
    }
}

/// Ticks between two reads of the bundle definitions.
const BUNDLE_REFRESH_TICKS: u64 = 10;

/// The bundles and the last level of every SKU the sampler has seen, for a bundle's
/// level: `min(floor(component level / qty))` ([`BundleDef::available`]), published on
/// the bundle's own `stock:` topic whenever a component's changes.
#[derive(Default)]
struct BundleLevels {
    defs: HashMap<String, BundleDef>,
    /// component -> the bundles that hold it
    holding: HashMap<String, Vec<String>>,
    last: HashMap<String, i64>,
}

impl BundleLevels {
    /// Reads the definitions in every shard; returns the bundles not known before.
    async fn refresh(
        &mut self,
        redis: &mut Redis,
        shards: &Shards,
    ) -> redis::RedisResult<Vec<String>> {
        let mut new = Vec::new();
        for (_, keys) in shards.iter() {
            let here: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(keys.bundles())
                .query_async(redis)
                .await?;
            for (bundle, field) in here {
                if self.defs.contains_key(&bundle) {
                    continue;
                }
                let Ok(def) = BundleDef::parse_field(&field) else {
                    tracing::warn!(
                        bundle,
                        field,
                        "a bundle definition in Redis breaks the rules; its level is not published"
                    );
                    continue;
                };
                for (c, _) in def.components() {
                    self.holding
                        .entry(c.to_string())
                        .or_default()
                        .push(bundle.clone());
                }
                self.defs.insert(bundle.clone(), def);
                new.push(bundle);
            }
        }
        Ok(new)
    }

    /// Notes `changed` levels; returns the levels of the bundles they change, and of
    /// `new` bundles whose components' levels are all known.
    /// Every level is noted, bundles or not: a bundle created later needs its
    /// components' levels, which change only when they do.
    fn levels(&mut self, changed: &[(String, i64)], new: &[String]) -> Vec<(String, i64)> {
        let mut affected: Vec<&String> = new.iter().collect();
        for (sku, level) in changed {
            self.last.insert(sku.clone(), *level);
            if let Some(b) = self.holding.get(sku) {
                affected.extend(b);
            }
        }
        affected.sort();
        affected.dedup();
        affected
            .into_iter()
            .filter_map(|b| {
                let def = self.defs.get(b)?;
                let level = def.available(|c| self.last.get(c.as_str()).copied())?;
                Some((b.clone(), level))
            })
            .collect()
    }
}

/// Consumes order events until `shutdown`, reconnecting with backoff
/// ([`Backoff::BACKGROUND`]).
pub async fn consume_orders(
    hub: Hub,
    cfg: Config,
    health: SourceHealth,
    shutdown: CancellationToken,
) {
    let queue = Topology::of(&cfg).notifier_queue();
    let mut links = Reconnect::new("notifier", Backoff::BACKGROUND);
    loop {
        // Per attempt: once one attempt failed, the queue may have been lost (or never
        // existed while subscribers came), so the next one probes.
        let mut first = links.is_first() && !health.consumed_before.load(Ordering::Relaxed);
        let Some((link, consumer)) = links
            .next(&shutdown, || {
                open(&hub, &cfg, &queue, std::mem::replace(&mut first, false))
            })
            .await
        else {
            return;
        };
        health.amqp_up.store(true, Ordering::Relaxed);
        health.consumed_before.store(true, Ordering::Relaxed);
        tracing::info!(queue, "consuming order events");
        match consume(&hub, &link, &queue, consumer, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                health.amqp_up.store(false, Ordering::Relaxed);
                link.close().await;
                links.lost(&e);
            }
        }
    }
}

/// Opens a session: declares the exchange and this instance's queue and starts
/// consuming. After an outage (`first` false), checks first whether the queue survived.
async fn open(
    hub: &Hub,
    cfg: &Config,
    queue: &str,
    first: bool,
) -> anyhow::Result<(Link, (Channel, lapin::Consumer))> {
    let link = Link::open(
        &cfg.amqp_url,
        &format!("floodgate-notifier {}", cfg.namespace),
    )
    .await?;
    if !first {
        // Did our queue survive the outage? A passive declare fails (and closes its
        // channel) if it did not.
        let probe = link.channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        if probe
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .is_err()
        {
            let n = hub.close_order_subscribers(CloseReason::Resync);
            tracing::warn!(
                subscribers = n,
                "the event queue was lost; order subscribers must resync"
            );
        } else {
            let _ = probe.close(200, "probed".into()).await;
        }
    }
    let ch = link.channel().await?;
    let topology = Topology::of(cfg);
    topology.declare_events(&ch).await?;
    topology.declare_notifier_queue(&ch, queue).await?;
    // Deliveries in flight at once; acknowledged one by one as the hub takes them.
    ch.basic_qos(1_000, BasicQosOptions { global: false })
        .await?;
    let consumer = ch
        .basic_consume(
            queue.into(),
            "notifier".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((link, (ch, consumer)))
}

/// Hands order events to the hub until the broker fails (Err) or `shutdown` (Ok, the
/// queue deleted and the link closed).
async fn consume(
    hub: &Hub,
    link: &Link,
    queue: &str,
    (ch, mut consumer): (Channel, lapin::Consumer),
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => {
                // One bound for both: the notifier's whole shutdown grace is 5 s.
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                    let _ = ch.queue_delete(queue.into(), Default::default()).await;
                    link.close().await;
                })
                .await;
                return Ok(());
            }
            d = consumer.next() => d,
        };
        let delivery = match delivery {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("the broker ended the consumer"),
        };
        let batch = delivery
            .properties
            .kind()
            .as_ref()
            .is_some_and(|k| k.as_str() == ORDER_EVENT_BATCH);
        if batch {
            match OrderEventBatch::decode_each(&delivery.data) {
                Ok(events) => {
                    for e in events {
                        match e.event {
                            Ok(event) => deliver(hub, Some(e.id), e.trace, event),
                            Err(err) => undecodable(&err),
                        }
                    }
                }
                Err(e) => undecodable(&e),
            }
        } else {
            // One event per message (a relay from before batches).
            let event_id = delivery
                .properties
                .message_id()
                .as_ref()
                .and_then(|id| uuid::Uuid::parse_str(id.as_str()).ok());
            match OrderEvent::from_bytes(&delivery.data) {
                Ok(event) => deliver(hub, event_id, trace_of(&delivery.properties), event),
                Err(e) => undecodable(&e),
            }
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
}

/// Hands one order event to the hub. Its line (debug) names the order's `trace_id`;
/// when spans are exported, a `deliver` span continues the order's trace.
fn deliver(hub: &Hub, event_id: Option<uuid::Uuid>, trace: Option<TraceParent>, event: OrderEvent) {
    let span = if trace::exporting() {
        let span = tracing::info_span!("deliver", order_id = %event.order_id);
        trace::set_parent(&span, trace.as_ref());
        span
    } else {
        tracing::Span::none()
    };
    let _in = span.enter();
    tracing::debug!(
        order_id = %event.order_id,
        trace_id = trace.map(|t| tracing::field::display(t.trace_id())),
        status = event.status.as_str(),
        "order event in"
    );
    hub.publish_order(event_id, event);
}

fn undecodable(e: &serde_json::Error) {
    metrics::counter!(names::EVENTS_DROPPED, "reason" => "undecodable").increment(1);
    tracing::warn!(error = %e, "an order event could not be read; dropped");
}
