//! floodgate worker: drains the intake queue and commits orders to PostgreSQL in batches.
//!
//! # Layout
//!
//! - [`consumer`] - the batch loop: collect, claim in Redis, commit, settle (ack, retry,
//!   dead letter), several batches in flight, and pause through outages.
//! - [`acks`] - the ack window: a multiple ack never covers another batch's unsettled
//!   deliveries.
//! - [`repo`] - the batch transaction (one aggregated inventory update per SKU) and the
//!   order-by-order fallback; database failures classified transient or permanent.
//! - [`session`] - the AMQP session: consuming channel, confirm-mode channel for delay
//!   queues and dead letters.
//! - [`outbox`] - the relay that publishes committed order events to the `events`
//!   exchange and deletes them after the broker's confirm.
//! - [`reaper`] - releases reservations past their deadline and records them failed.
//! - [`consistency`] - the periodic invariant check behind the consistency gauges, one
//!   worker of a namespace at a time.
//! - [`Worker`] - the supervisor that rebuilds the session after a broker failure, and
//!   the health/metrics endpoint.
#![forbid(unsafe_code)]

pub mod acks;
pub mod consistency;
pub mod consumer;
pub mod outbox;
pub mod promoter;
pub mod reaper;
pub mod repo;
pub mod retention;
pub mod session;
pub mod webhooks;

use anyhow::Context;
use axum::{Router, extract::State, routing::get};
use floodgate_common::{
    Config, amqp::Reconnect, redis::Shards, retry::Backoff, supervise::Role, telemetry,
};
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A built worker: connected, consuming once run.
pub struct Worker {
    listener: TcpListener,
    session: session::Session,
    pipeline: consumer::Pipeline,
}

#[derive(Clone)]
struct Health {
    amqp_up: Arc<AtomicBool>,
    redis: floodgate_common::redis::Redis,
    shards: Shards,
    pg: deadpool_postgres::Pool,
    tasks: floodgate_common::supervise::Supervisor,
}

impl Worker {
    /// Connects to Redis, PostgreSQL and RabbitMQ (declaring the topology) and binds the
    /// health endpoint. Fails fast if a dependency is unreachable at start.
    pub async fn build(cfg: Config) -> anyhow::Result<Self> {
        let mut redis = floodgate_common::redis::connect(&cfg.redis_url)
            .await
            .context("connecting to Redis")?;
        floodgate_common::stock::check_layout(&mut redis, &cfg.shards()).await?;
        let pg = floodgate_common::db::pool(&cfg)?;
        floodgate_common::db::require_migrated(&pg, &cfg.namespace).await?;
        let session = session::Session::open(&cfg)
            .await
            .context("connecting to RabbitMQ")?;
        let listener = TcpListener::bind(cfg.worker_addr)
            .await
            .with_context(|| format!("binding {}", cfg.worker_addr))?;
        Ok(Self {
            listener,
            session,
            pipeline: consumer::Pipeline {
                shards: cfg.shards(),
                cfg,
                redis,
                pg,
                paused: Arc::new(AtomicBool::new(false)),
                outbox_wake: Arc::new(tokio::sync::Notify::new()),
            },
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Consumes until `shutdown`, rebuilding the AMQP session with backoff whenever the
    /// broker fails. On shutdown it stops taking messages, settles or requeues the batch in
    /// hand, and closes.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let _ = telemetry::metrics();
        let Worker {
            listener,
            mut session,
            pipeline,
        } = self;
        let amqp_up = Arc::new(AtomicBool::new(true));
        let health = Health {
            amqp_up: amqp_up.clone(),
            redis: pipeline.redis.clone(),
            shards: pipeline.shards.clone(),
            pg: pipeline.pg.clone(),
            tasks: Default::default(),
        };
        let http_shutdown = shutdown.clone();
        let http = tokio::spawn(floodgate_common::http::serve(
            listener,
            floodgate_common::http::edge(health_router(health.clone())),
            floodgate_common::http::ServeOptions {
                send_buffer: None,
                http_buffer: floodgate_common::http::PARSE_BUFFER,
                grace: std::time::Duration::from_secs(2),
            },
            http_shutdown,
        ));
        // Counters of rare events exist at 0 from the start: Prometheus cannot see the
        // first increment of a series it has never scraped, so an alert on `increase()`
        // would miss the first dead letter or reaped reservation after a restart.
        for reason in floodgate_common::domain::FailReason::ALL {
            metrics::counter!(telemetry::names::DEAD_LETTERED, "reason" => reason.as_str())
                .increment(0);
        }
        metrics::counter!(telemetry::names::REAPED).increment(0);
        metrics::counter!(telemetry::names::WAITLIST_PROMOTED).increment(0);
        let background = tokio_util::task::TaskTracker::new();
        let (shards, redis, pg, interval, paused, stop) = (
            pipeline.shards.clone(),
            pipeline.redis.clone(),
            pipeline.pg.clone(),
            pipeline.cfg.reaper_interval,
            pipeline.paused.clone(),
            shutdown.clone(),
        );
        // Its own connection for WAIT (it blocks the connection it runs on).
        let mover = floodgate_common::redis::buckets::Mover::new(
            redis.clone(),
            shards.clone(),
            floodgate_common::redis::ReplicaWait::from_config(&pipeline.cfg)
                .await
                .context("connecting to Redis for WAIT")?,
        );
        health
            .tasks
            .spawn(&background, "reaper", shutdown.clone(), move || {
                reaper::run(
                    shards.clone(),
                    redis.clone(),
                    pg.clone(),
                    interval,
                    paused.clone(),
                    mover.clone(),
                    stop.clone(),
                )
            });
        let webhooks_wake = Arc::new(tokio::sync::Notify::new());
        let (cfg, pg, wake, owed, stop) = (
            pipeline.cfg.clone(),
            pipeline.pg.clone(),
            pipeline.outbox_wake.clone(),
            webhooks_wake.clone(),
            shutdown.clone(),
        );
        health
            .tasks
            .spawn(&background, "outbox_relay", shutdown.clone(), move || {
                outbox::run(
                    cfg.clone(),
                    pg.clone(),
                    wake.clone(),
                    owed.clone(),
                    stop.clone(),
                )
            });
        let (cfg, stop) = (pipeline.cfg.clone(), shutdown.clone());
        health
            .tasks
            .spawn(&background, "webhooks", shutdown.clone(), move || {
                webhooks::run(cfg.clone(), webhooks_wake.clone(), stop.clone())
            });
        // Pruning is housekeeping: a worker that cannot prune still commits and
        // delivers, so its failure shows under `tasks` without making it unready.
        let (cfg, pg, stop) = (pipeline.cfg.clone(), pipeline.pg.clone(), shutdown.clone());
        health.tasks.spawn_as(
            Role::Auxiliary,
            &background,
            "webhook_retention",
            shutdown.clone(),
            move || retention::run(cfg.clone(), pg.clone(), stop.clone()),
        );
        let (cfg, shards, redis, pg, wake, paused, stop) = (
            pipeline.cfg.clone(),
            pipeline.shards.clone(),
            pipeline.redis.clone(),
            pipeline.pg.clone(),
            pipeline.outbox_wake.clone(),
            pipeline.paused.clone(),
            shutdown.clone(),
        );
        health.tasks.spawn(
            &background,
            "waitlist_promoter",
            shutdown.clone(),
            move || {
                promoter::run(
                    cfg.clone(),
                    shards.clone(),
                    redis.clone(),
                    pg.clone(),
                    wake.clone(),
                    paused.clone(),
                    stop.clone(),
                )
            },
        );
        let (cfg, stop) = (pipeline.cfg.clone(), shutdown.clone());
        health.tasks.spawn_as(
            Role::Auxiliary,
            &background,
            "queue_depth",
            shutdown.clone(),
            move || floodgate_common::amqp::depth::watch(cfg.clone(), "worker", stop.clone()),
        );
        if let Some(every) = pipeline.cfg.consistency_check {
            let (ns, shards, redis, pg, paused, stop) = (
                pipeline.cfg.namespace.clone(),
                pipeline.shards.clone(),
                pipeline.redis.clone(),
                pipeline.pg.clone(),
                pipeline.paused.clone(),
                shutdown.clone(),
            );
            health.tasks.spawn(
                &background,
                "consistency_check",
                shutdown.clone(),
                move || {
                    consistency::run(
                        ns.clone(),
                        shards.clone(),
                        redis.clone(),
                        pg.clone(),
                        every,
                        paused.clone(),
                        stop.clone(),
                    )
                },
            );
        }
        background.close();

        let mut links = Reconnect::new("worker", Backoff::BACKGROUND).already_open();
        loop {
            match pipeline.run(&mut session, &shutdown).await {
                consumer::Stop::Shutdown => break,
                consumer::Stop::Broker(e) => {
                    amqp_up.store(false, Ordering::Relaxed);
                    links.lost(&e);
                    session.close().await;
                    match links
                        .next(&shutdown, || session::Session::open(&pipeline.cfg))
                        .await
                    {
                        Some(s) => session = s,
                        None => break,
                    }
                    amqp_up.store(true, Ordering::Relaxed);
                }
            }
        }
        session.close().await;
        shutdown.cancel();
        background.wait().await;
        http.await?;
        Ok(())
    }
}

fn health_router(h: Health) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(|| async { telemetry::metrics_response() }))
        .with_state(h)
}

async fn readyz(State(h): State<Health>) -> axum::response::Response {
    let (ready, body) = floodgate_common::health::readiness(
        &h.redis,
        &h.shards,
        &h.pg,
        h.amqp_up.load(Ordering::Relaxed),
        &h.tasks,
    )
    .await;
    floodgate_common::health::response(ready, body)
}

/// The `floodgate-worker` binary: config from the environment, logging, run until
/// SIGINT/SIGTERM. (Also what the fault tests start as a real process to SIGKILL.)
pub async fn main_from_env() -> anyhow::Result<()> {
    floodgate_common::process::service_args(
        "floodgate-worker",
        "floodgate worker: drains the intake queue and commits orders to PostgreSQL.",
    );
    let spans = telemetry::init_service("floodgate-worker");
    let cfg = Config::from_env().context("reading configuration")?;
    let worker = Worker::build(cfg).await?;
    tracing::info!(port = worker.port(), "worker consuming");
    let stopped = worker
        .run_until_stopped(floodgate_common::shutdown::on_signal())
        .await;
    spans.shutdown();
    stopped
}
