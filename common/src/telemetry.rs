//! Logging, span export and metrics. Metric names live here so every service spells
//! them the same.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Metric names (`floodgate_` prefix, base units in the name).
pub mod names {
    pub const HTTP_REQUESTS: &str = "floodgate_http_requests_total";
    pub const HTTP_DURATION: &str = "floodgate_http_request_duration_seconds";
    pub const ORDERS_ACCEPTED: &str = "floodgate_orders_accepted_total";
    pub const ORDERS_REJECTED: &str = "floodgate_orders_rejected_total";
    /// Orders answered 202 `waitlisted` (short of stock, `"waitlist": true`).
    pub const ORDERS_WAITLISTED: &str = "floodgate_orders_waitlisted_total";
    /// Waitlisted orders promoted (reserved when units came back) and published by the
    /// worker's promoter.
    pub const WAITLIST_PROMOTED: &str = "floodgate_waitlist_promoted_total";
    /// Waitlisted orders that left their waitlist unpromoted, by `reason`: `cancelled`,
    /// `waitlist_expired`.
    pub const WAITLIST_LEFT: &str = "floodgate_waitlist_left_total";
    pub const RESERVE_DURATION: &str = "floodgate_reserve_duration_seconds";
    pub const PUBLISH_DURATION: &str = "floodgate_publish_duration_seconds";
    /// Publishes not confirmed (released, answered 503), by `reason`: `not_connected`,
    /// `broker` (a channel or connection error), `nacked`, `returned` (no queue bound),
    /// `timeout` (no confirm within `FLOODGATE_PUBLISH_TIMEOUT_MS`).
    pub const PUBLISH_FAILURES: &str = "floodgate_publish_failures_total";
    /// Orders refused `sold_out` from an ingress's memory, without Redis.
    pub const SOLD_OUT_CACHED: &str = "floodgate_sold_out_cache_hits_total";
    /// Confirmed orders marked queued per `queued.lua` call (ingress batches them).
    pub const QUEUED_MARK_BATCH: &str = "floodgate_queued_mark_batch_orders";
    /// Confirmed orders ingress could not mark queued (Redis unreachable); by outcome.
    pub const QUEUED_MARK_FAILURES: &str = "floodgate_queued_mark_failures_total";
    /// Orders answered 202 before `FLOODGATE_REDIS_WAIT_REPLICAS` replicas had their
    /// reservation (the `WAIT` timed out or failed): a failover could lose them.
    pub const REDIS_WAIT_SHORT: &str = "floodgate_redis_wait_short_total";
    pub const BATCH_SIZE: &str = "floodgate_worker_batch_orders";
    pub const COMMIT_DURATION: &str = "floodgate_worker_commit_duration_seconds";
    pub const ORDERS_COMMITTED: &str = "floodgate_worker_orders_total";
    pub const WORKER_ERRORS: &str = "floodgate_worker_errors_total";
    pub const DEAD_LETTERED: &str = "floodgate_worker_dead_lettered_total";
    pub const RETRIES: &str = "floodgate_worker_retries_scheduled_total";
    pub const WORKER_PAUSED: &str = "floodgate_worker_paused";
    pub const REAPED: &str = "floodgate_reservations_reaped_total";
    /// Units the rebalancer moved between the buckets of hot SKUs (`buckets` > 1).
    pub const BUCKET_UNITS_MOVED: &str = "floodgate_bucket_units_moved_total";
    pub const RECONNECTS: &str = "floodgate_amqp_reconnects_total";
    /// By `outcome` (replica: served there; lagging: it had not replayed every commit
    /// made before the read, so the primary served it; error: it failed, the primary
    /// served it): order-status reads while a replica is configured.
    pub const REPLICA_READS: &str = "floodgate_replica_reads_total";
    /// By `task`: supervised background tasks that panicked or ended unexpectedly.
    pub const TASK_FAILURES: &str = "floodgate_task_failures_total";
    /// By `reason` (in_flight, per_ip): requests refused at the edge before any work.
    pub const SHED: &str = "floodgate_http_shed_total";
    pub const OUTBOX_RELAYED: &str = "floodgate_outbox_relayed_total";
    /// Broker messages the relay published for them (a run of events is one message).
    pub const OUTBOX_MESSAGES: &str = "floodgate_outbox_messages_total";
    /// Gauge, by `transport` (sse, ws).
    pub const SUBSCRIBERS: &str = "floodgate_notifier_subscribers";
    /// By `type` (order, stock): events that reached the notifier.
    pub const EVENTS_IN: &str = "floodgate_notifier_events_in_total";
    /// By `type` and `transport`: events written to subscribers.
    pub const EVENTS_OUT: &str = "floodgate_notifier_events_out_total";
    /// By `reason`: events not delivered (duplicate, conflated, undecodable).
    pub const EVENTS_DROPPED: &str = "floodgate_notifier_events_dropped_total";
    /// By `reason`: streams the notifier ended (slow_consumer, shutting_down,
    /// ping_timeout, protocol_error) or the client closed (client_closed).
    pub const DISCONNECTS: &str = "floodgate_notifier_disconnects_total";
    /// By `type`: from the event's time (status change, stock sample) to its write to a
    /// subscriber.
    pub const DELIVERY_LAG: &str = "floodgate_notifier_delivery_lag_seconds";
    /// Gauge, by `queue` (`intake`; `retry`: all delay queues of the retry schedule
    /// together; `dead`): messages ready in the namespace's queues, as floodgate itself
    /// sees them (a passive declare every 5 s by every ingress and worker, so alerts need
    /// no broker plugin; aggregate with `max`). While the broker cannot be asked it keeps
    /// the last value read (a backlog alert keeps firing, its `for:` keeps counting);
    /// [`QUEUE_POLLED`] says how old that value is.
    pub const QUEUE_MESSAGES: &str = "floodgate_queue_messages";
    /// Gauge, by `queue` (`intake`): consumers of the intake queue (0: no worker drains
    /// it). Kept at the last value read while the broker cannot be asked, like
    /// [`QUEUE_MESSAGES`].
    pub const QUEUE_CONSUMERS: &str = "floodgate_queue_consumers";
    /// Gauge: Unix time of this process's last successful poll of the queue gauges
    /// (absent until the first). `time() - max(...)` well above 5 s means the depths are
    /// stale: nobody can read the queues (broker outages have alerts of their own too:
    /// `/readyz`, `floodgate_amqp_reconnects_total`).
    pub const QUEUE_POLLED: &str = "floodgate_queue_polled_timestamp_seconds";
    /// Histogram: from an order's publish to the first time a worker took it into a
    /// batch, observed once per order: redeliveries (after a worker's pause or crash, a
    /// failed batch) and scheduled retries (`x-floodgate-attempt`) are not observed, so
    /// the count is the orders taken and the buckets are the queue's wait, not retry
    /// delays. A replayed dead letter is a first attempt again, measured from its replay.
    /// Carried in the `x-floodgate-published-ms` header; messages without it (published
    /// by an older ingress) are not observed. Buckets up to 30 min, for "oldest order
    /// waits too long".
    pub const QUEUE_WAIT: &str = "floodgate_worker_queue_wait_seconds";
    /// Gauge: invariant violations found by this worker's latest consistency check (the
    /// check of `floodgate reconcile --check`; every `FLOODGATE_CONSISTENCY_CHECK_SECS`,
    /// one worker of the namespace at a time). NaN when this worker's latest turn
    /// completed no check (another worker held the lock, the worker was paused, the check
    /// failed or timed out), so a worker never shows an old count after a repair. Alert on
    /// `max(...)`: Prometheus' `max` and `min` skip NaN unless every series is NaN, and
    /// `NaN > 0` is false, so the max is the count of the workers that just checked; an
    /// all-NaN max means nobody completed a check, which [`CONSISTENCY_CHECKED`] shows. A
    /// difference counts only if seen in three passes 500 ms apart, so under steady
    /// traffic a Redis drift shows once its SKU has been quiet for a moment.
    pub const CONSISTENCY_VIOLATIONS: &str = "floodgate_consistency_violations";
    /// Gauge: Unix time of this worker's last completed consistency check (absent until
    /// it completed one; not moved by turns that completed none).
    /// `time() - max(...)` far above the interval means no worker checks.
    pub const CONSISTENCY_CHECKED: &str = "floodgate_consistency_checked_timestamp_seconds";
    /// Counter: webhook attempts by `outcome`: `delivered` (2xx), `retry` (a timeout,
    /// connection error, 408, 429 or 5xx; scheduled again), `dead` (another 4xx, or the
    /// end of `FLOODGATE_WEBHOOK_RETRY_SECS`).
    pub const WEBHOOK_ATTEMPTS: &str = "floodgate_webhook_attempts_total";
    /// Gauge per `webhook` id: its circuit as this worker last saw it, 0 closed,
    /// 1 half-open (one probe), 2 open (its deliveries wait).
    pub const WEBHOOK_CIRCUIT: &str = "floodgate_webhook_circuit_state";
    /// Gauge per `webhook` id: deliveries owed (pending), as this worker last counted.
    pub const WEBHOOK_PENDING: &str = "floodgate_webhook_pending";
    /// Counter per `table` (`attempts`, `deliveries`, `events`): webhook rows deleted
    /// past `FLOODGATE_WEBHOOK_RETENTION_HOURS`.
    pub const WEBHOOK_PRUNED: &str = "floodgate_webhook_pruned_total";
    /// Histogram: from an event's commit to a 2xx for it (a replayed event's counts from
    /// its commit too).
    pub const WEBHOOK_LAG: &str = "floodgate_webhook_delivery_lag_seconds";
    // Process metrics (metrics-process, on every /metrics render, unprefixed as
    // Prometheus' own clients name them): process_cpu_seconds_total (typed gauge, to keep
    // its fraction of a second; rate() it as a counter), process_resident_memory_bytes,
    // process_virtual_memory_bytes, process_open_fds, process_max_fds, process_threads,
    // process_start_time_seconds.
}

/// Buckets of [`names::QUEUE_WAIT`]: a healthy wait is milliseconds, a backlog minutes.
/// Now as Unix seconds, the unit of the `*_timestamp_seconds` gauges.
pub fn unix_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// How long a service's exit waits for its last spans to reach the OTLP collector.
const SPAN_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

const QUEUE_WAIT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 1800.0,
];

/// JSON logs (or human ones with `FLOODGATE_LOG_FORMAT=pretty`), filtered by
/// `FLOODGATE_LOG` (default `info`). Safe to call more than once. No span export: the
/// services start with [`init_service`].
pub fn init_logging() {
    init_logging_with_default("info");
}

/// [`init_logging`] with another default filter (tests log warnings only).
pub fn init_logging_with_default(default: &str) {
    install(default, None);
}

/// A service's telemetry: [`init_logging`], plus OpenTelemetry span export over
/// OTLP/HTTP (protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set. Off by default, and then nothing more
/// than the logs is installed: no exporter, no extra layer.
///
/// Spans go to `<endpoint>/v1/traces` with the resource `service.name` = `service`
/// (`OTEL_SERVICE_NAME` wins). Exported: every span at `info` and above whatever
/// `FLOODGATE_LOG` says (the request, batch, relay and delivery spans), batched in the
/// background. Keep the returned guard until the process ends: dropping it flushes.
pub fn init_service(service: &'static str) -> Telemetry {
    let telemetry = init_export(service);
    crate::config::warn_unknown_env();
    telemetry
}

fn init_export(service: &'static str) -> Telemetry {
    if !otlp_configured() {
        init_logging();
        return Telemetry { provider: None };
    }
    match otlp::provider(service) {
        Ok(provider) => {
            use opentelemetry::trace::TracerProvider as _;
            let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("floodgate"));
            if install("info", Some(Box::new(layer))) {
                crate::trace::set_exporting();
            }
            tracing::info!(service, "exporting spans over OTLP");
            Telemetry {
                provider: Some(provider),
            }
        }
        Err(e) => {
            init_logging();
            tracing::error!(
                error = format!("{e:#}"),
                "OTLP span export is off: the exporter could not be built"
            );
            Telemetry { provider: None }
        }
    }
}

fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()))
}

type BoxedLayer = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;

/// Installs the global subscriber: the log layer filtered by `FLOODGATE_LOG` (else
/// `default`), and, when given, the span-export layer with a filter of its own
/// (`info`, the chatty dependencies off). False if a subscriber was installed already.
fn install(default: &str, export: Option<BoxedLayer>) -> bool {
    use tracing_subscriber::Layer as _;
    let filter =
        EnvFilter::try_from_env("FLOODGATE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let Some(export) = export else {
        // As before span export existed: one global filter, one layer.
        return tracing_subscriber::registry()
            .with(filter)
            .with(log_layer())
            .try_init()
            .is_ok();
    };
    // Each layer its own filter: exporting `info` spans must not turn on `info` logs.
    // The exporter's own HTTP client must not trace itself into the export.
    let quiet = EnvFilter::new(
        "info,lapin=off,h2=off,hyper=off,hyper_util=off,reqwest=off,\
         opentelemetry=off,opentelemetry_sdk=off,opentelemetry_otlp=off",
    );
    let layers = vec![
        log_layer().with_filter(filter).boxed(),
        export.with_filter(quiet).boxed(),
    ];
    tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .is_ok()
}

/// Log lines on stdout: JSON (each line with its spans' fields, `request_id` and
/// `trace_id` among them), or human ones with `FLOODGATE_LOG_FORMAT=pretty`.
fn log_layer<S>() -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let pretty = std::env::var("FLOODGATE_LOG_FORMAT").is_ok_and(|v| v == "pretty");
    if pretty {
        Box::new(fmt::layer())
    } else {
        Box::new(
            fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(false),
        )
    }
}

/// What [`init_service`] installed. Dropping it (or [`Telemetry::shutdown`]) flushes the
/// spans not yet exported and stops the exporter; without export it does nothing.
#[must_use = "dropping it stops span export"]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops span export (at shutdown).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown_with_timeout(SPAN_FLUSH_TIMEOUT)
        {
            eprintln!("flushing spans at shutdown failed: {e}");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

mod otlp {
    use opentelemetry_otlp::{SpanExporter, WithExportConfig as _};
    use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};

    /// The exporter (endpoint, headers and timeout from the standard `OTEL_EXPORTER_OTLP_*`
    /// variables) behind a batch processor with its own thread.
    pub(super) fn provider(service: &'static str) -> anyhow::Result<SdkTracerProvider> {
        let exporter = SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()?;
        let name = std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| service.to_owned());
        Ok(SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name(name).build())
            .build())
    }
}

/// The process-wide Prometheus recorder, installed on first use. Latencies are
/// histograms with buckets from 100 µs to 10 s.
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                        0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Suffix("_orders".into()),
                        &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0],
                    )
                })
                // A full name wins over the `_seconds` suffix.
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(names::QUEUE_WAIT.into()),
                        QUEUE_WAIT_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(names::WEBHOOK_LAG.into()),
                        QUEUE_WAIT_BUCKETS,
                    )
                })
                .expect("bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed already (a test harness); keep ours
            // rendering anyway.
            let _ = metrics::set_global_recorder(recorder);
            let h = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(5));
                        h.run_upkeep();
                    }
                })
                .expect("spawn metrics upkeep thread");
            handle
        })
        .clone()
}

/// Samples the process metrics (CPU, memory, open fds, threads: a few reads of
/// `/proc/self`) into the recorder; [`metrics_response`] does it on every render.
pub fn collect_process_metrics() {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    let _ = metrics();
    COLLECTOR
        .get_or_init(|| {
            let c = metrics_process::Collector::default();
            c.describe();
            c
        })
        .collect();
}

/// The `/metrics` answer of every service: the process's metrics in Prometheus text,
/// with the process metrics sampled now.
pub fn metrics_response() -> axum::response::Response {
    use axum::{http::header, response::IntoResponse};
    collect_process_metrics();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics().render(),
    )
        .into_response()
}
