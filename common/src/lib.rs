//! Everything the floodgate services share: configuration, the domain types, the Redis Lua
//! scripts, the AMQP topology, the PostgreSQL pool and migrations, and telemetry.
//!
//! # Layout
//!
//! - [`config`] - one [`Config`] struct read from `FLOODGATE_*` environment variables.
//! - [`domain`] - newtypes ([`domain::Sku`], [`domain::Quantity`], [`domain::UserId`], ...)
//!   that cannot hold an invalid value.
//! - [`auth`] - JWT claims, minting and verification (HS256).
//! - [`bundle`] - bundle definitions and an order's held lines (bundles expanded).
//! - [`audit`] - the append-only audit log of manager and admin writes.
//! - [`redis`] - key names ([`redis::Keys`]) and the typed wrappers around the Lua scripts.
//! - [`amqp`] - the topology, declared in one function, and the versioned intake message.
//! - [`db`] - the PostgreSQL pool (one schema per namespace) and migrations under an
//!   advisory lock.
//! - [`stock`] - loading Redis stock levels from PostgreSQL, the system of record.
//! - [`health`] - the `/readyz` probes every service shares.
//! - [`problem`] - problem+json error responses and the bearer token of a request.
//! - [`request`] - every HTTP request's id (`X-Request-Id`) and span.
//! - [`trace`] - W3C `traceparent` values that travel with an order, and the few
//!   OpenTelemetry calls made when spans are exported.
//! - [`openapi`] - what the services' OpenAPI documents share: the problem schema, error
//!   responses built from each service's error type, security schemes, domain schemas.
//! - [`dlq`] - reading and replaying the dead-letter queue.
//! - [`reconcile`] - checking and repairing the invariants between Redis and PostgreSQL.
//! - [`retry`] - waiting for a server to come back: jittered backoff, cancellable.
//! - [`telemetry`] - logging, span export (OTLP, when configured), the Prometheus
//!   recorder and metric names.
//! - [`shutdown`] - a [`tokio_util::sync::CancellationToken`] fired by SIGINT/SIGTERM.
#![forbid(unsafe_code)]

pub mod amqp;
pub mod audit;
pub mod auth;
pub mod bundle;
pub mod config;
pub mod db;
pub mod dlq;
pub mod domain;
pub mod health;
pub mod http;
pub mod openapi;
pub mod problem;
pub mod process;
pub mod reads;
pub mod reconcile;
pub mod redis;
pub mod request;
pub mod retry;
pub mod shutdown;
pub mod stock;
pub mod supervise;
pub mod telemetry;
pub mod trace;
pub mod webhook;

pub use config::{Config, Namespace};
