//! floodgate notifier: streams order status and stock levels to browsers and other
//! subscribers over Server-Sent Events and WebSocket, and serves the live page.
//!
//! Order events come from the `events` exchange (the worker's outbox relay), each
//! instance on its own queue, so any number of notifiers can run side by side.
//! Stock levels are sampled from Redis every `FLOODGATE_STOCK_INTERVAL_MS`: the order
//! path only marks SKUs changed, and a subscriber gets the latest level of each SKU at
//! most that often, never a backlog.
//!
//! # Layout
//!
//! - [`hub`] - the fan-out: topics to subscribers, per-subscriber bounded buffers,
//!   conflated stock levels, slow subscribers closed.
//! - [`sources`] - events in: the stock sampler and the order-event consumer.
//! - [`routes`] - SSE, WebSocket, the live page, health and metrics.
//! - [`topics`] - the topic grammar.
//! - [`repo`] - the order lookup behind `order:<id>` subscriptions.
//! - [`error`] - errors as problem+json and as WebSocket close frames.
#![forbid(unsafe_code)]

pub mod error;
pub mod hub;
pub mod repo;
pub mod routes;
pub mod sources;
pub mod topics;

use anyhow::Context;
use floodgate_common::{Config, auth::Verifier};
use std::{sync::Arc, time::Duration};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long shutdown waits for streams to say goodbye.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A built notifier, bound to its port, not yet serving.
pub struct Notifier {
    listener: TcpListener,
    state: routes::AppState,
}

impl Notifier {
    /// Connects to Redis and PostgreSQL and binds `cfg.notifier_addr` (port 0 picks a
    /// free port). The broker is connected by the running consumer, with backoff.
    pub async fn build(cfg: Config) -> anyhow::Result<Self> {
        let mut redis = floodgate_common::redis::connect(&cfg.redis_url)
            .await
            .context("connecting to Redis")?;
        floodgate_common::stock::check_layout(&mut redis, &cfg.shards()).await?;
        let pg = floodgate_common::db::pool(&cfg)?;
        let reads = floodgate_common::reads::Reads::with_replica(
            pg.clone(),
            floodgate_common::db::replica_pool(&cfg)?,
        );
        let listener = TcpListener::bind(cfg.notifier_addr)
            .await
            .with_context(|| format!("binding {}", cfg.notifier_addr))?;
        let state = routes::AppState {
            hub: hub::Hub::new(cfg.subscriber_buffer, cfg.max_subscribers),
            verifier: Arc::new(Verifier::from_config(&cfg)),
            shards: Arc::new(cfg.shards()),
            redis,
            pg,
            reads,
            sources: sources::SourceHealth::default(),
            supervisor: Default::default(),
            shutdown: CancellationToken::new(),
            cfg: Arc::new(cfg),
        };
        Ok(Self { listener, state })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serves until `shutdown`; then every stream gets its `shutting_down` close and
    /// the server waits up to 5 s for them to go.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let _ = floodgate_common::telemetry::metrics();
        let st = self.state;
        let cfg = st.cfg.clone();
        let tasks = tokio_util::task::TaskTracker::new();
        let (hub, redis, shards, stop) = (
            st.hub.clone(),
            st.redis.clone(),
            (*st.shards).clone(),
            st.shutdown.clone(),
        );
        let interval = cfg.stock_interval;
        st.supervisor
            .spawn(&tasks, "stock_sampler", st.shutdown.clone(), move || {
                sources::sample_stock(
                    hub.clone(),
                    redis.clone(),
                    shards.clone(),
                    interval,
                    stop.clone(),
                )
            });
        let (hub, c, health, stop) = (
            st.hub.clone(),
            (*cfg).clone(),
            st.sources.clone(),
            st.shutdown.clone(),
        );
        st.supervisor
            .spawn(&tasks, "order_events", st.shutdown.clone(), move || {
                sources::consume_orders(hub.clone(), c.clone(), health.clone(), stop.clone())
            });
        tasks.close();
        let streams_done = st.shutdown.clone();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            trigger.cancelled().await;
            streams_done.cancel();
        });
        let hub = st.hub.clone();
        floodgate_common::http::serve(
            self.listener,
            floodgate_common::http::edge(routes::router(st)),
            floodgate_common::http::ServeOptions {
                send_buffer: Some(cfg.subscriber_send_buffer),
                // Bounds each subscriber's HTTP/1 write buffer: a client that stopped
                // reading is found out after kilobytes (hyper's minimum is 8 KiB).
                http_buffer: 16 * 1024,
                grace: SHUTDOWN_GRACE,
            },
            shutdown,
        )
        .await;
        // WebSockets outlive their HTTP connection: give them the same grace.
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while hub.subscribers() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tasks.wait().await;
        Ok(())
    }
}

/// The `floodgate-notifier` binary: config from the environment, logging, run until
/// SIGINT/SIGTERM.
pub async fn main_from_env() -> anyhow::Result<()> {
    floodgate_common::process::service_args(
        "floodgate-notifier",
        "floodgate notifier: streams order status and stock levels (SSE, WebSocket).",
    );
    let spans = floodgate_common::telemetry::init_service("floodgate-notifier");
    let cfg = Config::from_env().context("reading configuration")?;
    let notifier = Notifier::build(cfg).await?;
    tracing::info!(port = notifier.port(), "notifier listening");
    let stopped = notifier
        .run_until_stopped(floodgate_common::shutdown::on_signal())
        .await;
    spans.shutdown();
    stopped
}
