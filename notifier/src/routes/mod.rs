//! The HTTP surface: the two stream endpoints, the live page, health and metrics.
//! Handlers extract and delegate; the subscribing logic both transports share is here.
//! Each handler's `#[utoipa::path]` is its entry in the OpenAPI document ([`openapi`]).

pub mod openapi;
mod page;
mod sse;
mod ws;

use crate::{
    error::ApiError,
    hub::{CloseReason, Hub, StockLevel, SubscribeError, Subscription},
    repo,
    sources::SourceHealth,
    topics::Topic,
};
use axum::{Router, extract::State, http::HeaderMap, routing::get};
use deadpool_postgres::Pool;
use floodgate_common::redis::Redis;
use floodgate_common::{
    Config,
    auth::{Caller, Verifier},
    redis::Shards,
    telemetry::{self, names},
};
use serde_json::json;
use std::{sync::Arc, time::Duration};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

/// What every handler shares; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub cfg: Arc<Config>,
    pub hub: Hub,
    pub verifier: Arc<Verifier>,
    pub shards: Arc<Shards>,
    pub redis: Redis,
    /// For the order-topic lookup only.
    pub pg: Pool,
    /// The subscribe-time status read: the replica when it has caught up, else `pg`.
    pub reads: floodgate_common::reads::Reads,
    pub sources: SourceHealth,
    /// The background tasks `/readyz` reports (stock sampler, event consumer).
    pub supervisor: floodgate_common::supervise::Supervisor,
    /// Fired on shutdown: every stream ends with a `shutting_down` close.
    pub shutdown: CancellationToken,
}

pub fn router(state: AppState) -> Router {
    use floodgate_common::http::PerIp;
    // Stream subscriptions need no token: bounded per client address.
    let per_ip = PerIp::new(
        state.cfg.ip_rate_limit_per_sec,
        state.cfg.ip_rate_limit_burst,
    );
    let streams = Router::new()
        .route("/v1/stream", get(sse::stream))
        .route("/v1/ws", get(ws::upgrade))
        .route_layer(axum::middleware::from_fn_with_state(per_ip, PerIp::layer));
    Router::new()
        .merge(streams)
        .route("/", get(page::index))
        .route("/assets/app.js", get(page::script))
        .route("/assets/app.css", get(page::style))
        .route("/config.json", get(page::config))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(openapi::router())
        .fallback(|| async { ApiError::NoSuchEndpoint })
        .with_state(state)
}

#[utoipa::path(
    get, path = "/healthz", tag = "operations",
    summary = "The process is up",
    responses((status = 200, description = "`ok`", content_type = "text/plain", body = String)),
)]
async fn healthz() -> &'static str {
    "ok"
}

#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    summary = "Prometheus metrics",
    responses((status = 200, description = "Prometheus text exposition format",
        content_type = "text/plain", body = String)),
)]
async fn metrics() -> axum::response::Response {
    telemetry::metrics_response()
}

#[utoipa::path(
    get, path = "/readyz", tag = "operations",
    summary = "Whether Redis, RabbitMQ and PostgreSQL are reachable, and the subscriber count",
    responses(
        (status = 200, description = "ready", body = openapi::NotifierReadiness),
        (status = 503, description = "a dependency is down (named in `down`)",
            body = openapi::NotifierReadiness),
    ),
)]
async fn readyz(State(st): State<AppState>) -> axum::response::Response {
    let amqp = st
        .sources
        .amqp_up
        .load(std::sync::atomic::Ordering::Relaxed);
    let (ready, mut body) =
        floodgate_common::health::readiness(&st.redis, &st.shards, &st.pg, amqp, &st.supervisor)
            .await;
    body["subscribers"] = json!(st.hub.subscribers());
    floodgate_common::health::response(ready, body)
}

/// The caller, from `Authorization: Bearer` or `access_token` (browsers cannot set
/// headers on EventSource or WebSocket). No token is fine (public topics); a token
/// that does not verify is refused, never ignored.
fn caller(
    st: &AppState,
    headers: &HeaderMap,
    access_token: Option<&str>,
) -> Result<Option<Caller>, ApiError> {
    let Some(token) = floodgate_common::problem::bearer(headers).or(access_token) else {
        return Ok(None);
    };
    st.verifier.verify(token.trim()).map(Some).map_err(|e| {
        tracing::debug!(error = %e, "token refused");
        ApiError::BadToken
    })
}

/// Subscribes `topics` (all or none): registers them first, so no event falls between
/// the lookup and the subscription, then checks each order topic's owner and queues the
/// order's current status.
async fn subscribe(
    st: &AppState,
    sub: &mut Subscription,
    topics: &[Topic],
) -> Result<(), ApiError> {
    let held = sub.topics();
    // A SKU created a moment ago may not have reached the stock sampler yet (up to one
    // interval): ask Redis, which decides both ways. Known there: the hub learns its
    // level. Unknown there while stock is loaded: refused now, whether or not the
    // sampler's first pass has run (before it, the hub cannot tell).
    let unseen: Vec<&floodgate_common::domain::Sku> = topics
        .iter()
        .filter_map(|t| match t {
            Topic::Stock(sku) if !st.hub.knows_sku(sku.as_str()) => Some(sku),
            _ => None,
        })
        .collect();
    if !unseen.is_empty() {
        // Some only while every shard these SKUs live in is loaded.
        if let Ok(Some(levels)) =
            floodgate_common::redis::levels(&st.redis, &st.shards, &unseen).await
        {
            let found: Vec<(String, i64)> = unseen
                .iter()
                .zip(levels)
                .filter_map(|(sku, level)| level.map(|l| (sku.to_string(), l)))
                .collect();
            let missing = unseen.len() > found.len();
            if !found.is_empty() {
                st.hub.learn_skus(found, time::OffsetDateTime::now_utc());
            }
            if missing && let Some(sku) = unseen.iter().find(|s| !st.hub.knows_sku(s.as_str())) {
                sub.close(CloseReason::Rejected);
                return Err(SubscribeError::UnknownSku(sku.to_string()).into());
            }
        }
    }
    if let Err(e) = sub.add(topics) {
        sub.close(CloseReason::Rejected);
        return Err(e.into());
    }
    let fresh: Vec<Topic> = topics
        .iter()
        .filter(|t| !held.contains(&t.to_string()))
        .cloned()
        .collect();
    for t in topics {
        let Topic::Order(id) = t else { continue };
        let found = repo::current(&st.reads, &st.redis, &st.shards, id).await;
        let visible = match &found {
            Ok(Some(cur)) => sub
                .caller()
                .is_some_and(|c| c.is_admin() || c.user == cur.owner),
            _ => false,
        };
        match found {
            Ok(Some(cur)) if visible => {
                if let Some(ev) = cur.event {
                    sub.push_current(ev);
                }
            }
            // Another user's order is as absent as an unknown one: nothing leaks.
            Ok(_) => {
                sub.remove(&fresh);
                sub.close(CloseReason::Rejected);
                return Err(SubscribeError::OrderNotFound.into());
            }
            Err(e) => {
                sub.remove(&fresh);
                sub.close(CloseReason::Rejected);
                return Err(ApiError::Internal(e.context("looking up an order")));
            }
        }
    }
    Ok(())
}

/// One connection's metric handles (looked up once, not per event): events written
/// by type, and their lag from the event's time (status change, stock sample).
struct Sent {
    orders: metrics::Counter,
    stock: metrics::Counter,
    order_lag: metrics::Histogram,
    stock_lag: metrics::Histogram,
}

impl Sent {
    fn new(transport: &'static str) -> Self {
        Self {
            orders: metrics::counter!(names::EVENTS_OUT, "type" => "order", "transport" => transport),
            stock: metrics::counter!(names::EVENTS_OUT, "type" => "stock", "transport" => transport),
            order_lag: metrics::histogram!(names::DELIVERY_LAG, "type" => "order"),
            stock_lag: metrics::histogram!(names::DELIVERY_LAG, "type" => "stock"),
        }
    }

    fn order(&self, at: OffsetDateTime) {
        self.orders.increment(1);
        self.order_lag.record(lag(at));
    }

    fn stock(&self, level: &StockLevel) {
        self.stock.increment(1);
        if !level.snapshot {
            self.stock_lag.record(lag(level.at));
        }
    }
}

fn lag(at: OffsetDateTime) -> f64 {
    (OffsetDateTime::now_utc() - at).as_seconds_f64().max(0.0)
}

/// How long a stream the hub closed may take to flush its last message before its
/// connection is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
