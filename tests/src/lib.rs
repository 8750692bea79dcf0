//! The test harness: starts the real ingress and worker in-process on port 0, each test in
//! its own namespace (Redis keys, AMQP names, PostgreSQL schema), against the real
//! servers, and removes the namespace when the test ends, passed or failed.
#![forbid(unsafe_code)]

use deadpool_postgres::Pool;
use floodgate_common::{
    Config,
    amqp::Topology,
    auth,
    domain::{Role, UserId},
    redis::Keys,
};
use lapin::{
    BasicProperties, Channel, Connection,
    options::{BasicPublishOptions, QueueDeclareOptions},
    types::FieldTable,
};
use redis::aio::ConnectionManager;
use serde_json::Value;
use std::{collections::BTreeMap, future::Future, time::Duration};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A response, read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Resp {
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Everything observable that a rejected request must leave as it was.
#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub redis_stock: BTreeMap<String, i64>,
    pub redis_keys: usize,
    pub tables: BTreeMap<&'static str, i64>,
    pub sold: i64,
    pub on_hand: i64,
    pub queued: u32,
}

/// Options for [`TestApp::spawn_with`].
pub struct Options {
    pub worker: bool,
    pub tweak: fn(&mut Config),
}

impl Default for Options {
    fn default() -> Self {
        Self {
            worker: true,
            tweak: |_| {},
        }
    }
}

pub struct TestApp {
    pub cfg: Config,
    pub base: String,
    pub client: reqwest::Client,
    pub redis: ConnectionManager,
    pub pg: Pool,
    pub keys: Keys,
    pub topology: Topology,
    pub amqp: Connection,
    pub channel: Channel,
    shutdown: CancellationToken,
    worker: Option<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
}

/// A fresh namespace name.
pub fn namespace() -> String {
    format!("t{}", &uuid::Uuid::now_v7().simple().to_string()[20..])
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(opts: Options) -> Self {
        floodgate_common::telemetry::init_logging_with_default("warn");
        let ns = namespace();
        let mut cfg = Config::from_lookup(|k| match k {
            "FLOODGATE_NAMESPACE" => Some(ns.clone()),
            "FLOODGATE_INGRESS_ADDR" | "FLOODGATE_WORKER_ADDR" => Some("127.0.0.1:0".into()),
            "FLOODGATE_JWT_SECRET" => Some(format!("test-secret-{ns}-0123456789")),
            "FLOODGATE_RATE_LIMIT_PER_SEC" => Some("0".into()),
            "FLOODGATE_DB_POOL_SIZE" => Some("8".into()),
            k => std::env::var(k).ok(),
        })
        .expect("test config");
        (opts.tweak)(&mut cfg);
        floodgate_common::db::ensure_database(&cfg)
            .await
            .expect("database");
        floodgate_common::db::migrate(&cfg).await.expect("migrate");
        let shutdown = CancellationToken::new();
        let ingress = floodgate_ingress::Application::build(cfg.clone())
            .await
            .expect("build ingress");
        let base = format!("http://127.0.0.1:{}", ingress.port());
        tokio::spawn(ingress.run_until_stopped(shutdown.clone()));
        let mut redis = floodgate_common::redis::connect(&cfg.redis_url)
            .await
            .expect("redis");
        let pg = floodgate_common::db::pool(&cfg).expect("pool");
        // What `floodgate reconcile --if-unloaded` does: open the gate of a new namespace.
        let keys = Keys::new(&cfg.namespace);
        floodgate_common::stock::load_if_absent(&pg, &mut redis, &keys)
            .await
            .expect("load stock");
        let amqp = floodgate_common::amqp::connect(&cfg.amqp_url, "floodgate-tests")
            .await
            .expect("amqp");
        let channel = amqp.create_channel().await.expect("channel");
        let mut app = TestApp {
            keys,
            topology: Topology::with_retry_steps(&cfg.namespace, cfg.retry_delays.len()),
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .expect("client"),
            cfg,
            base,
            redis,
            pg,
            amqp,
            channel,
            shutdown,
            worker: None,
        };
        if opts.worker {
            app.start_worker().await;
        }
        app
    }

    /// Starts a worker (again) in-process.
    pub async fn start_worker(&mut self) {
        assert!(self.worker.is_none(), "a worker is running");
        let token = self.shutdown.child_token();
        let worker = floodgate_worker::Worker::build(self.cfg.clone())
            .await
            .expect("build worker");
        let handle = tokio::spawn(worker.run_until_stopped(token.clone()));
        self.worker = Some((token, handle));
    }

    /// Stops the worker gracefully; its unacked messages return to the queue.
    pub async fn stop_worker(&mut self) {
        if let Some((token, handle)) = self.worker.take() {
            token.cancel();
            handle.await.expect("worker task").expect("worker result");
        }
    }

    pub fn token(&self, user: &str, role: Role) -> String {
        auth::mint(
            self.cfg.jwt_secret.expose(),
            &UserId::parse(user).unwrap(),
            role,
            Duration::from_secs(600),
        )
    }
    pub fn customer(&self, user: &str) -> String {
        self.token(user, Role::Customer)
    }
    pub fn admin(&self) -> String {
        self.token("admin", Role::Admin)
    }

    /// Sends a request; `body` is sent as JSON when given.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut rb = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        let r = rb.send().await.expect("request sent");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Resp {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Resp {
        self.request(reqwest::Method::GET, path, token, None, &[])
            .await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> Resp {
        self.request(reqwest::Method::POST, path, token, Some(body), &[])
            .await
    }

    pub async fn order(&self, token: &str, items: &[(&str, i64)], key: Option<&str>) -> Resp {
        let body = serde_json::json!({
            "items": items.iter().map(|(s, q)| serde_json::json!({"sku": s, "qty": q})).collect::<Vec<_>>()
        });
        let headers: Vec<(&str, &str)> = key.map(|k| ("Idempotency-Key", k)).into_iter().collect();
        self.request(
            reqwest::Method::POST,
            "/v1/orders",
            Some(token),
            Some(&body),
            &headers,
        )
        .await
    }

    /// Creates a SKU through the admin API and asserts 201.
    pub async fn create_sku(&self, sku: &str, stock: i64, per_user_limit: Option<i64>) {
        let mut body = serde_json::json!({
            "sku": sku, "name": format!("Test {sku}"), "price_cents": 1999, "initial_stock": stock
        });
        if let Some(l) = per_user_limit {
            body["per_user_limit"] = l.into();
        }
        let r = self.post("/v1/skus", Some(&self.admin()), &body).await;
        assert_eq!(r.status, 201, "create SKU: {r:?}");
    }

    /// Units available in Redis.
    pub async fn available(&self, sku: &str) -> Option<i64> {
        let mut r = self.redis.clone();
        redis::cmd("HGET")
            .arg(self.keys.stock())
            .arg(sku)
            .query_async(&mut r)
            .await
            .unwrap()
    }

    /// One number from PostgreSQL (the namespace's schema).
    pub async fn scalar(&self, sql: &str) -> i64 {
        let db = self.pg.get().await.unwrap();
        db.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// Messages ready in the intake queue.
    pub async fn queued(&self) -> u32 {
        let q = self
            .channel
            .queue_declare(
                self.topology.intake_queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        q.message_count()
    }

    /// Reservations not yet committed or released.
    pub async fn open_reservations(&self) -> i64 {
        let mut r = self.redis.clone();
        redis::cmd("ZCARD")
            .arg(self.keys.deadlines())
            .query_async(&mut r)
            .await
            .unwrap()
    }

    /// Waits until every accepted order is committed or released and the queue is empty.
    pub async fn wait_idle(&self) {
        eventually(Duration::from_secs(60), || async {
            self.open_reservations().await == 0 && self.queued().await == 0
        })
        .await;
    }

    pub async fn snapshot(&self) -> Snapshot {
        let mut r = self.redis.clone();
        let redis_stock: BTreeMap<String, i64> = redis::cmd("HGETALL")
            .arg(self.keys.stock())
            .query_async(&mut r)
            .await
            .unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(self.keys.pattern())
            .query_async(&mut r)
            .await
            .unwrap();
        let mut tables = BTreeMap::new();
        for t in [
            "skus",
            "inventory",
            "orders",
            "order_items",
            "stock_movements",
        ] {
            tables.insert(t, self.scalar(&format!("SELECT count(*) FROM {t}")).await);
        }
        Snapshot {
            redis_stock,
            redis_keys: keys.len(),
            tables,
            sold: self
                .scalar("SELECT coalesce(sum(sold), 0)::bigint FROM inventory")
                .await,
            on_hand: self
                .scalar("SELECT coalesce(sum(on_hand), 0)::bigint FROM inventory")
                .await,
            queued: self.queued().await,
        }
    }

    /// Publishes a raw message to the intake exchange, as ingress would.
    pub async fn publish_raw(&self, payload: &[u8]) {
        let confirm = self
            .channel
            .basic_publish(
                self.topology.orders_exchange.as_str().into(),
                self.topology.intake_key.as_str().into(),
                BasicPublishOptions::default(),
                payload,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
        confirm.await.unwrap();
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let cfg = self.cfg.clone();
        let keys = self.keys.clone();
        let topology = self.topology.clone();
        // The test's runtime is going away: clean up on a runtime of our own.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = floodgate_common::db::drop_schema(&cfg).await;
                if let Ok(mut r) = floodgate_common::redis::connect(&cfg.redis_url).await {
                    let ks: Vec<String> = redis::cmd("KEYS")
                        .arg(keys.pattern())
                        .query_async(&mut r)
                        .await
                        .unwrap_or_default();
                    if !ks.is_empty() {
                        let _: Result<(), _> = redis::cmd("DEL").arg(ks).query_async(&mut r).await;
                    }
                }
                if let Ok(c) =
                    floodgate_common::amqp::connect(&cfg.amqp_url, "floodgate-tests-cleanup").await
                    && let Ok(ch) = c.create_channel().await
                {
                    let _ = topology.delete(&ch).await;
                    let _ = c.close(200, "bye".into()).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Polls `check` until it is true; panics after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "condition not met within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
