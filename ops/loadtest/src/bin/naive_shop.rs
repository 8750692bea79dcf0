//! `naive-shop`: the naive design, the baseline `ops/bench/compare` measures floodgate against.
//!
//! It builds its shop the way seed document 004 does (an infrastructure note for a Spring
//! Boot + JPA shop): stateless application servers in front of one primary database,
//! concurrency controlled by database row locks (pessimistic locking), and an order that is
//! one transaction: check the stock, decrement it, create the order, answer. Here the
//! database is PostgreSQL instead of MySQL, and the seed's points balance and its call to a
//! data platform are left out: stock is the contended part.
//!
//! Every `POST /v1/orders` is one transaction on one pooled connection: for each line, in
//! SKU order, `SELECT stock FROM skus WHERE sku = $1 FOR UPDATE`; if every line has enough,
//! `UPDATE` the stock, `INSERT` the order (`confirmed`) and its items, `COMMIT`, and only
//! then answer. Nothing is queued and nothing is batched, so all buyers of a hot SKU queue
//! on its row lock, each holding it for a few round trips and a commit (an fsync). That
//! ceiling is what floodgate's design (reserve in Redis, publish, batch-commit in workers)
//! is compared with; do not optimise it away.
//!
//! The HTTP contract follows floodgate's ingress as far as `ops/loadtest` needs, so the
//! same goose run drives both:
//!
//! - `POST /v1/skus` (admin token), `{"sku", "name", "price_cents", "initial_stock"}`
//!   (other fields ignored): 201 `{"sku", ...}`, 409 `sku_exists`.
//! - `POST /v1/orders` (any valid token), `{"items": [{"sku", "qty"}]}`: 202
//!   `{"order_id", "status": "confirmed"}` (202, not 201, so the load test's expectations
//!   hold), 409 `sold_out`, 404 `unknown_sku`, 422 `invalid_order`.
//! - `GET /readyz`: 200 while `SELECT 1` works, else 503. `GET /healthz`: 200.
//!
//! Errors are problem+json with floodgate's codes; a missing or bad token is 401. Tokens
//! are verified as ingress verifies them (`floodgate_common::auth::Verifier`), so the
//! per-request CPU stays comparable.
//!
//! Configuration: `NAIVE_ADDR` (default `127.0.0.1:8090`), `NAIVE_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/floodgate`; the database must exist), `NAIVE_SCHEMA`
//! (default `naive`; created with its tables at start if missing), `NAIVE_POOL_SIZE`
//! (default 32) and `FLOODGATE_JWT_SECRET`, read through `floodgate_common::Config`.
//!
//! ```text
//! cd ops/loadtest && cargo build --release --bin naive-shop
//! FLOODGATE_JWT_SECRET=... target/release/naive-shop
//! ```

use anyhow::Context;
use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, FromRequestParts, State, rejection::JsonRejection},
    http::{StatusCode, request::Parts},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use floodgate_common::{
    Config, Namespace,
    auth::{Caller, Verifier},
    domain::{Invalid, OrderId, OrderLine, OrderLines, Quantity, Sku},
    problem,
};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::{net::SocketAddr, sync::Arc, time::Duration};
use tokio_postgres::NoTls;

/// Largest accepted body, as at ingress.
const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Clone)]
struct App {
    pool: Pool,
    verifier: Arc<Verifier>,
}

// ---------------------------------------------------------------------------------------
// Errors: problem+json with floodgate's codes.

enum ApiError {
    Unauthorized,
    Forbidden,
    NotFound,
    Body(JsonRejection),
    InvalidRequest(String),
    InvalidOrder(String),
    UnknownSku(String),
    SoldOut { sku: String, available: i64 },
    SkuExists(String),
    Unavailable(PoolError),
    Internal(anyhow::Error),
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError::Body(e)
    }
}

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> Self {
        ApiError::Unavailable(e)
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        ApiError::Internal(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let none = Map::new;
        let sku_ext = |sku: &str| {
            let mut m = Map::new();
            m.insert("sku".into(), json!(sku));
            m
        };
        let (status, code, detail, ext, retry) = match self {
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid bearer token is required".to_owned(),
                none(),
                None,
            ),
            ApiError::Forbidden => (
                StatusCode::FORBIDDEN,
                "forbidden",
                "this needs the admin role".to_owned(),
                none(),
                None,
            ),
            ApiError::NotFound => (
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint".to_owned(),
                none(),
                None,
            ),
            ApiError::Body(e) => {
                // As at ingress: any shape error is 400 `malformed`.
                let (status, code) = match e.status() {
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => (e.status(), "unsupported_media_type"),
                    StatusCode::PAYLOAD_TOO_LARGE => (e.status(), "too_large"),
                    _ => (StatusCode::BAD_REQUEST, "malformed"),
                };
                (status, code, e.body_text(), none(), None)
            }
            ApiError::InvalidRequest(d) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                d,
                none(),
                None,
            ),
            ApiError::InvalidOrder(d) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_order",
                d,
                none(),
                None,
            ),
            ApiError::UnknownSku(sku) => (
                StatusCode::NOT_FOUND,
                "unknown_sku",
                format!("unknown SKU {sku}"),
                sku_ext(&sku),
                None,
            ),
            ApiError::SoldOut { sku, available } => {
                let mut m = sku_ext(&sku);
                m.insert("available".into(), json!(available));
                (
                    StatusCode::CONFLICT,
                    "sold_out",
                    format!("SKU {sku} is sold out"),
                    m,
                    None,
                )
            }
            ApiError::SkuExists(sku) => (
                StatusCode::CONFLICT,
                "sku_exists",
                format!("SKU {sku} exists already"),
                sku_ext(&sku),
                None,
            ),
            ApiError::Unavailable(e) => {
                eprintln!("naive-shop: no database connection: {e}");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "PostgreSQL is unavailable".to_owned(),
                    none(),
                    Some(1),
                )
            }
            ApiError::Internal(e) => {
                eprintln!("naive-shop: request failed: {e:#}");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error".to_owned(),
                    none(),
                    None,
                )
            }
        };
        problem::response(status, code, &detail, ext, retry)
    }
}

// ---------------------------------------------------------------------------------------
// Callers: the bearer token, verified as ingress verifies it.

impl FromRequestParts<App> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, ApiError> {
        let token = problem::bearer(&parts.headers).ok_or(ApiError::Unauthorized)?;
        app.verifier
            .verify(token)
            .map_err(|_| ApiError::Unauthorized)
    }
}

/// A caller with the admin role; anyone else gets 403 (401 without a valid token).
struct Admin;

impl FromRequestParts<App> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, ApiError> {
        if Caller::from_request_parts(parts, app).await?.is_admin() {
            Ok(Admin)
        } else {
            Err(ApiError::Forbidden)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Handlers.

#[derive(Deserialize)]
struct NewSku {
    sku: String,
    name: String,
    price_cents: i64,
    initial_stock: i64,
}

async fn create_sku(
    State(app): State<App>,
    _admin: Admin,
    body: Result<Json<NewSku>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Json(new) = body?;
    let sku = Sku::parse(new.sku).map_err(|e| ApiError::InvalidRequest(format!("sku: {e}")))?;
    if new.price_cents < 0 {
        return Err(ApiError::InvalidRequest("price_cents: must be >= 0".into()));
    }
    if new.initial_stock < 0 {
        return Err(ApiError::InvalidRequest("initial_stock: must be >= 0".into()));
    }
    let client = app.pool.get().await?;
    let inserted = client
        .execute(
            "INSERT INTO skus (sku, name, price_cents, stock) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (sku) DO NOTHING",
            &[&sku.as_str(), &new.name, &new.price_cents, &new.initial_stock],
        )
        .await?;
    if inserted == 0 {
        return Err(ApiError::SkuExists(sku.to_string()));
    }
    let body = json!({
        "sku": sku,
        "name": new.name,
        "price_cents": new.price_cents,
        "stock": new.initial_stock,
    });
    Ok((StatusCode::CREATED, Json(body)))
}

#[derive(Deserialize)]
struct OrderRequest {
    items: Vec<LineRequest>,
}

#[derive(Deserialize)]
struct LineRequest {
    sku: String,
    qty: i64,
}

impl OrderRequest {
    /// The same rules as ingress: valid SKU ids, qty 1..=1000, 1-50 lines, no SKU twice.
    fn validate(self) -> Result<Vec<OrderLine>, ApiError> {
        let at = |i: usize, field: &str, e: Invalid| {
            ApiError::InvalidOrder(format!("items[{i}].{field}: {}", e.0))
        };
        let lines = self
            .items
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                let sku = Sku::parse(l.sku).map_err(|e| at(i, "sku", e))?;
                let qty = Quantity::try_from(l.qty).map_err(|e| at(i, "qty", e))?;
                Ok(OrderLine { sku, qty })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        let lines = OrderLines::try_from(lines).map_err(|e| ApiError::InvalidOrder(e.0))?;
        Ok(lines.into())
    }
}

/// One order, one transaction: lock, check, decrement, insert, commit, answer.
async fn place_order(
    State(app): State<App>,
    caller: Caller,
    body: Result<Json<OrderRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Json(req) = body?;
    let mut lines = req.validate()?;
    // Rows are always locked in SKU order, so two orders never wait on each other in a cycle.
    lines.sort_by(|a, b| a.sku.cmp(&b.sku));

    let mut client = app.pool.get().await?;
    let tx = client.transaction().await?;
    let lock = tx
        .prepare_cached("SELECT stock FROM skus WHERE sku = $1 FOR UPDATE")
        .await?;
    for l in &lines {
        let Some(row) = tx.query_opt(&lock, &[&l.sku.as_str()]).await? else {
            tx.rollback().await?;
            return Err(ApiError::UnknownSku(l.sku.to_string()));
        };
        let stock: i64 = row.get(0);
        if stock < l.qty.get() {
            tx.rollback().await?;
            return Err(ApiError::SoldOut {
                sku: l.sku.to_string(),
                available: stock,
            });
        }
    }
    let decrement = tx
        .prepare_cached("UPDATE skus SET stock = stock - $2 WHERE sku = $1")
        .await?;
    for l in &lines {
        tx.execute(&decrement, &[&l.sku.as_str(), &l.qty.get()])
            .await?;
    }
    let order_id = OrderId::new();
    let id = order_id.as_uuid();
    let insert_order = tx
        .prepare_cached("INSERT INTO orders (id, user_id, status) VALUES ($1, $2, 'confirmed')")
        .await?;
    tx.execute(&insert_order, &[&id, &caller.user.as_str()])
        .await?;
    let insert_item = tx
        .prepare_cached("INSERT INTO order_items (order_id, sku, qty) VALUES ($1, $2, $3)")
        .await?;
    for l in &lines {
        let qty = l.qty.get() as i32; // at most Quantity::MAX
        tx.execute(&insert_item, &[&id, &l.sku.as_str(), &qty])
            .await?;
    }
    tx.commit().await?;
    let body = json!({"order_id": order_id, "status": "confirmed"});
    Ok((StatusCode::ACCEPTED, Json(body)))
}

async fn readyz(State(app): State<App>) -> Response {
    if floodgate_common::health::postgres_ok(&app.pool).await {
        (StatusCode::OK, Json(json!({"status": "ready"}))).into_response()
    } else {
        let body = json!({"status": "unavailable", "down": ["postgres"]});
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

fn router(app: App) -> Router {
    Router::new()
        .route("/v1/skus", post(create_sku))
        .route("/v1/orders", post(place_order))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::NotFound })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(app)
}

// ---------------------------------------------------------------------------------------
// Start-up.

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// A pool whose sessions search `schema`.
fn pool(url: &str, schema: &Namespace, size: usize) -> anyhow::Result<Pool> {
    let mut pg: tokio_postgres::Config = url
        .parse()
        .context("NAIVE_DATABASE_URL is not a PostgreSQL URL")?;
    pg.options(format!("-c search_path={schema}"));
    pg.application_name("naive-shop");
    pg.connect_timeout(Duration::from_secs(5));
    let mgr = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(Duration::from_secs(5)))
        .wait_timeout(Some(Duration::from_secs(10)))
        .build()
        .context("building the PostgreSQL pool")
}

/// Creates the schema and its tables if they are missing. `schema` is a [`Namespace`]
/// (`[a-z][a-z0-9_]*`), so it needs no quoting.
async fn create_schema(pool: &Pool, schema: &Namespace) -> anyhow::Result<()> {
    let client = pool.get().await.context("connecting to PostgreSQL")?;
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {schema}.skus (
                 sku         text PRIMARY KEY,
                 name        text NOT NULL,
                 price_cents bigint NOT NULL,
                 stock       bigint NOT NULL CHECK (stock >= 0)
             );
             CREATE TABLE IF NOT EXISTS {schema}.orders (
                 id         uuid PRIMARY KEY,
                 user_id    text NOT NULL,
                 status     text NOT NULL,
                 created_at timestamptz NOT NULL DEFAULT now()
             );
             CREATE TABLE IF NOT EXISTS {schema}.order_items (
                 order_id uuid NOT NULL REFERENCES {schema}.orders (id),
                 sku      text NOT NULL,
                 qty      int NOT NULL
             );"
        ))
        .await
        .with_context(|| format!("creating schema {schema} and its tables"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::from_env()?;
    let addr: SocketAddr = env_or("NAIVE_ADDR", "127.0.0.1:8090")
        .parse()
        .context("NAIVE_ADDR is not a socket address")?;
    let url = env_or(
        "NAIVE_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/floodgate",
    );
    let schema = Namespace::parse(&env_or("NAIVE_SCHEMA", "naive"))
        .map_err(|e| anyhow::anyhow!("NAIVE_SCHEMA: {e}"))?;
    let pool_size: usize = env_or("NAIVE_POOL_SIZE", "32")
        .parse()
        .ok()
        .filter(|&n| n > 0)
        .context("NAIVE_POOL_SIZE must be a positive integer")?;

    let pool = pool(&url, &schema, pool_size)?;
    create_schema(&pool, &schema).await?;
    let app = App {
        pool,
        verifier: Arc::new(Verifier::from_config(&cfg)),
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    eprintln!("naive-shop: listening on {addr}, schema {schema}, {pool_size} connections");
    let shutdown = floodgate_common::shutdown::on_signal();
    axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("serving HTTP")?;
    Ok(())
}
