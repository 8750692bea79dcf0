//! floodgate worker: drains the intake queue and commits orders to PostgreSQL in batches.
//!
//! # Layout
//!
//! - [`consumer`] - the batch loop: collect, claim in Redis, commit, settle, ack.
//! - [`repo`] - the batch transaction (one aggregated inventory update per SKU) and the
//!   order-by-order fallback; failures classified transient or permanent.
//! - [`Worker`] - connections, the consumer, and the health/metrics endpoint.
#![forbid(unsafe_code)]

pub mod consumer;
pub mod repo;

use anyhow::Context;
use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use floodgate_common::{Config, amqp::Topology, redis::Keys, telemetry};
use lapin::{
    Connection,
    options::{BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use serde_json::json;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A built worker: connected, consuming once run.
pub struct Worker {
    listener: TcpListener,
    conn: Arc<Connection>,
    pipeline: consumer::Pipeline,
    consumer: lapin::Consumer,
}

#[derive(Clone)]
struct Health {
    conn: Arc<Connection>,
    redis: redis::aio::ConnectionManager,
    pg: deadpool_postgres::Pool,
}

impl Worker {
    /// Connects to Redis, PostgreSQL and RabbitMQ, declares the topology, starts consuming
    /// with the configured prefetch window, and binds the health endpoint.
    pub async fn build(cfg: Config) -> anyhow::Result<Self> {
        let redis = floodgate_common::redis::connect(&cfg.redis_url)
            .await
            .context("connecting to Redis")?;
        let pg = floodgate_common::db::pool(&cfg)?;
        let conn = floodgate_common::amqp::connect(
            &cfg.amqp_url,
            &format!("floodgate-worker {}", cfg.namespace),
        )
        .await
        .context("connecting to RabbitMQ")?;
        let channel = conn.create_channel().await?;
        let topology = Topology::new(&cfg.namespace);
        topology.declare(&channel).await?;
        // The prefetch window: how many unacked deliveries the broker hands us at once.
        channel
            .basic_qos(cfg.worker_prefetch, BasicQosOptions { global: false })
            .await?;
        let consumer = channel
            .basic_consume(
                topology.intake_queue.as_str().into(),
                format!("worker-{}", uuid::Uuid::now_v7()).as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("consuming the intake queue")?;
        let listener = TcpListener::bind(cfg.worker_addr)
            .await
            .with_context(|| format!("binding {}", cfg.worker_addr))?;
        Ok(Self {
            listener,
            conn: Arc::new(conn),
            consumer,
            pipeline: consumer::Pipeline {
                keys: Keys::new(&cfg.namespace),
                cfg,
                redis,
                pg,
                channel,
            },
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Consumes until `shutdown`; then stops taking messages, lets the batch in hand
    /// finish, and closes. Unacked messages return to the queue.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let _ = telemetry::metrics();
        let Worker {
            listener,
            conn,
            mut pipeline,
            consumer,
        } = self;
        let health = Health {
            conn: conn.clone(),
            redis: pipeline.redis.clone(),
            pg: pipeline.pg.clone(),
        };
        let app = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .route(
                "/metrics",
                get(|| async {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        telemetry::metrics().render(),
                    )
                }),
            )
            .with_state(health);
        let http_shutdown = shutdown.clone();
        let http = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(http_shutdown.cancelled_owned())
                .await
        });
        pipeline.run(consumer, shutdown.clone()).await;
        if !shutdown.is_cancelled() {
            tracing::error!("the intake consumer ended; the worker stops");
        }
        let _ = pipeline.channel.close(200, "shutdown".into()).await;
        let _ = conn.close(200, "shutdown".into()).await;
        shutdown.cancel();
        http.await??;
        Ok(())
    }
}

async fn readyz(State(h): State<Health>) -> impl IntoResponse {
    let mut redis = h.redis.clone();
    let redis_ok = redis::cmd("PING")
        .query_async::<String>(&mut redis)
        .await
        .is_ok();
    let pg_ok = repo::ping(&h.pg).await.is_ok();
    let amqp_ok = h.conn.status().connected();
    let checks = json!({"redis": redis_ok, "rabbitmq": amqp_ok, "postgres": pg_ok});
    let down: Vec<&str> = [
        ("redis", redis_ok),
        ("rabbitmq", amqp_ok),
        ("postgres", pg_ok),
    ]
    .into_iter()
    .filter(|(_, ok)| !ok)
    .map(|(n, _)| n)
    .collect();
    let status = if down.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(
            json!({"status": if down.is_empty() {"ready"} else {"unavailable"}, "down": down, "checks": checks}),
        ),
    )
}
