//! floodgate ingress: the public HTTP API. On the order path it touches Redis (one Lua
//! call decides and reserves) and RabbitMQ (one confirmed publish), nothing else.
//!
//! # Layout
//!
//! - [`routes`] - the axum router; handlers extract and delegate.
//! - [`orders`] - placing an order (validate, reserve, publish) and reading one.
//! - [`stock`] - public stock levels from Redis.
//! - [`catalog`] - admin SKU operations (PostgreSQL first, then Redis once per change).
//! - [`handover`] - publish, then mark queued or release, in a task a hang-up cannot
//!   cut short.
//! - [`publisher`] - confirm-mode publishing, pipelined across channels.
//! - [`queued`] - marks confirmed orders queued in Redis (never expired), batched.
//! - [`repo`] - every SQL statement ingress runs.
//! - [`extract`] - the bearer-token caller and JSON bodies with API.md's error codes.
//! - [`error`] - [`error::ApiError`], rendered as problem+json.
//! - [`state`] - [`state::AppState`], shared by every handler.
#![forbid(unsafe_code)]

pub mod buckets;
pub mod bundles;
pub mod catalog;
pub mod error;
pub mod extract;
pub mod handover;
pub mod orders;
pub mod points;
pub mod products;
pub mod publisher;
pub mod queued;
pub mod repo;
pub mod routes;
pub mod sold_out;
pub mod state;
pub mod stock;
pub mod webhooks;

use anyhow::Context;
use floodgate_common::{Config, auth::Verifier, supervise::Role};
use std::{sync::Arc, time::Duration};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A built ingress, bound to its port, not yet serving.
pub struct Application {
    listener: TcpListener,
    state: state::AppState,
}

impl Application {
    /// Connects to Redis, RabbitMQ (declaring the topology) and PostgreSQL and binds
    /// `cfg.ingress_addr` (port 0 picks a free port, for tests). Orders are refused with
    /// 503 until the stock is loaded into Redis (`floodgate reconcile`).
    pub async fn build(cfg: Config) -> anyhow::Result<Self> {
        // Rare-event counters exist at 0 from the start: Prometheus cannot see the first
        // increment of a series it never scraped, and the alerts use `increase()`.
        let _ = floodgate_common::telemetry::metrics(); // the recorder, before any counter
        for outcome in ["late", "expired", "unmarked"] {
            metrics::counter!(
                floodgate_common::telemetry::names::QUEUED_MARK_FAILURES,
                "outcome" => outcome
            )
            .increment(0);
        }
        metrics::counter!(floodgate_common::telemetry::names::REDIS_WAIT_SHORT).increment(0);
        let shards = Arc::new(cfg.shards());
        let mut redis = floodgate_common::redis::connect(&cfg.redis_url)
            .await
            .context("connecting to Redis")?;
        floodgate_common::stock::check_layout(&mut redis, &shards).await?;
        let pg = floodgate_common::db::pool(&cfg)?;
        let reads = floodgate_common::reads::Reads::with_replica(
            pg.clone(),
            floodgate_common::db::replica_pool(&cfg)?,
        );
        let publisher = publisher::Publisher::connect(&cfg)
            .await
            .context("connecting to RabbitMQ")?;
        let listener = TcpListener::bind(cfg.ingress_addr)
            .await
            .with_context(|| format!("binding {}", cfg.ingress_addr))?;
        let limiter = state::AppState::limiter_for(&cfg);
        if let Some(l) = &limiter {
            let l = Arc::downgrade(l);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    let Some(l) = l.upgrade() else { break };
                    l.retain_recent();
                }
            });
        }
        let verifier = Arc::new(Verifier::from_config(&cfg));
        let supervisor = floodgate_common::supervise::Supervisor::default();
        let wait = if cfg.redis_wait_replicas > 0 {
            Some(queued::ReplicaWait {
                redis: floodgate_common::redis::connect(&cfg.redis_url)
                    .await
                    .context("connecting to Redis for WAIT")?,
                replicas: cfg.redis_wait_replicas,
                timeout: cfg.redis_wait_timeout,
            })
        } else {
            None
        };
        let queued = queued::QueuedMarker::spawn(redis.clone(), shards.clone(), wait, &supervisor);
        let mover = floodgate_common::redis::buckets::Mover::new(
            redis.clone(),
            (*shards).clone(),
            floodgate_common::redis::ReplicaWait::from_config(&cfg)
                .await
                .context("connecting to Redis for WAIT")?,
        );
        Ok(Self {
            listener,
            state: state::AppState {
                shards,
                redis,
                queued,
                tasks: tokio_util::task::TaskTracker::new(),
                pg,
                reads,
                sold_out: Arc::new(sold_out::SoldOut::new(cfg.sold_out_cache)),
                buckets: Arc::default(),
                bundles: Arc::default(),
                mover,
                publisher,
                verifier,
                supervisor,
                limiter,
                cfg: Arc::new(cfg),
            },
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// A handle on the publisher (tests ask which broker node it is connected to).
    pub fn publisher(&self) -> publisher::Publisher {
        self.state.publisher.clone()
    }

    /// Serves until `shutdown` is cancelled, then finishes in-flight requests (each of
    /// which either answers 202 after its confirm or releases its reservation).
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let _ = floodgate_common::telemetry::metrics();
        // The queue-depth gauges, so alerts on the backlog need no broker plugin.
        let background = tokio_util::task::TaskTracker::new();
        let (cfg, stop) = ((*self.state.cfg).clone(), shutdown.clone());
        self.state.supervisor.spawn_as(
            Role::Auxiliary,
            &background,
            "queue_depth",
            shutdown.clone(),
            move || floodgate_common::amqp::depth::watch(cfg.clone(), "ingress", stop.clone()),
        );
        background.close();
        let publisher = self.state.publisher.clone();
        let tasks = self.state.tasks.clone();
        let grace = self.state.cfg.reservation_ttl;
        let opts = floodgate_common::http::ServeOptions {
            send_buffer: None,
            http_buffer: floodgate_common::http::PARSE_BUFFER,
            // The longest an order request takes to answer: a duplicate's wait for its
            // first (publish timeout + 1 s), or a publish and its mark (publish
            // timeout + ANSWER_WITHIN), plus Redis. Past that the work is in tasks the
            // wait below covers.
            grace: self.state.cfg.publish_timeout
                + handover::ANSWER_WITHIN
                + Duration::from_secs(2),
        };
        let app = routes::router(self.state);
        floodgate_common::http::serve(self.listener, app, opts, shutdown).await;
        // Orders whose buyer hung up, and marks still retrying after an early 202, finish
        // before the publisher goes (bounded: past the TTL the reaper decides anyway).
        tasks.close();
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            tracing::warn!(tasks = tasks.len(), "order tasks still running at shutdown");
        }
        publisher.close().await;
        background.wait().await;
        Ok(())
    }
}

/// The `floodgate-ingress` binary: `--help`/`--version`, config from the environment,
/// logging, run until SIGINT/SIGTERM.
pub async fn main_from_env() -> anyhow::Result<()> {
    floodgate_common::process::service_args(
        "floodgate-ingress",
        "floodgate ingress: the public order API (reserve in Redis, publish to RabbitMQ).",
    );
    let spans = floodgate_common::telemetry::init_service("floodgate-ingress");
    let cfg = Config::from_env().context("reading configuration")?;
    let app = Application::build(cfg).await?;
    tracing::info!(port = app.port(), "ingress listening");
    let stopped = app
        .run_until_stopped(floodgate_common::shutdown::on_signal())
        .await;
    spans.shutdown();
    stopped
}
