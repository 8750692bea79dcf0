//! The test harness: starts the real ingress, worker (and notifier) in-process on port 0, each test in
//! its own namespace (Redis keys, AMQP names, PostgreSQL schema), against the real
//! servers, and removes the namespace when the test ends, passed or failed.
#![forbid(unsafe_code)]

use deadpool_postgres::Pool;
use floodgate_common::redis::Redis;
use floodgate_common::{
    Config,
    amqp::Topology,
    auth,
    domain::{Role, UserId},
    redis::{Keys, Shards},
};
use lapin::{
    BasicProperties, Channel,
    options::{BasicPublishOptions, QueueDeclareOptions},
    types::FieldTable,
};
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
    /// Every shard's per-user limits: (shard, sku) -> limit.
    pub redis_limits: BTreeMap<(usize, String), i64>,
    /// Every SKU's settings (name, price, limit), as one digest.
    pub catalog: String,
    pub redis_keys: usize,
    pub tables: BTreeMap<&'static str, i64>,
    pub sold: i64,
    pub on_hand: i64,
    pub queued: u32,
}

pub mod mock_platform;
pub mod servers;
pub mod streams;

/// Options for [`TestApp::spawn_with`].
pub struct Options {
    /// Start a worker in-process.
    pub worker: bool,
    /// Start a notifier in-process ([`TestApp::notifier`] is its base URL).
    pub notifier: bool,
    /// Changes to the test's configuration (other servers, shorter timeouts...).
    pub tweak: Box<dyn FnOnce(&mut Config) + Send>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            worker: true,
            notifier: false,
            tweak: Box::new(|_| {}),
        }
    }
}

/// What a load run saw.
#[derive(Default)]
pub struct LoadResult {
    /// Order ids answered 202.
    pub accepted: Vec<String>,
    /// Answers by status (0 = no answer: connection failed).
    pub statuses: BTreeMap<u16, usize>,
}

impl std::fmt::Debug for LoadResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "accepted {}, answers {:?}",
            self.accepted.len(),
            self.statuses
        )
    }
}

impl LoadResult {
    pub fn count(&self, status: u16) -> usize {
        self.statuses.get(&status).copied().unwrap_or(0)
    }
}

/// The worker as a real OS process (the production entry point), to SIGKILL.
pub struct WorkerProcess {
    child: std::process::Child,
}

impl WorkerProcess {
    /// Starts `exe` (the test package's `worker-process` binary) with `cfg` as environment.
    pub fn start(exe: &str, cfg: &Config) -> Self {
        Self::start_with(exe, cfg, &[])
    }

    /// [`WorkerProcess::start`] with extra environment (a failpoint, say; it wins over
    /// the defaults).
    pub fn start_with(exe: &str, cfg: &Config, extra: &[(&str, &str)]) -> Self {
        let child = std::process::Command::new(exe)
            .envs(env_of(cfg))
            .env("FLOODGATE_WORKER_ADDR", "127.0.0.1:0")
            .env("FLOODGATE_LOG", "warn")
            .envs(extra.iter().copied())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start the worker process");
        Self { child }
    }

    /// True once the process has exited (a failpoint aborted it, say).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// SIGKILL: no shutdown, no cleanup, unacked messages stay with the dead connection.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a graceful exit.
    pub fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The environment that gives a process `cfg`.
pub fn env_of(cfg: &Config) -> Vec<(String, String)> {
    let ms = |d: Duration| d.as_millis().to_string();
    let delays: Vec<String> = cfg.retry_delays.iter().map(|d| ms(*d)).collect();
    [
        ("FLOODGATE_NAMESPACE", cfg.namespace.to_string()),
        ("FLOODGATE_REDIS_URL", cfg.redis_url.clone()),
        (
            "FLOODGATE_REDIS_WAIT_REPLICAS",
            cfg.redis_wait_replicas.to_string(),
        ),
        (
            "FLOODGATE_REDIS_WAIT_TIMEOUT_MS",
            ms(cfg.redis_wait_timeout),
        ),
        ("FLOODGATE_AMQP_URL", cfg.amqp_url.clone()),
        (
            "FLOODGATE_INTAKE_PARTITIONS",
            cfg.intake_partitions.to_string(),
        ),
        ("FLOODGATE_DATABASE_URL", cfg.database_url.clone()),
        ("FLOODGATE_JWT_SECRET", cfg.jwt_secret.expose().to_owned()),
        (
            "FLOODGATE_RESERVATION_TTL_SECS",
            cfg.reservation_ttl.as_secs().to_string(),
        ),
        ("FLOODGATE_PUBLISH_TIMEOUT_MS", ms(cfg.publish_timeout)),
        ("FLOODGATE_SOLD_OUT_CACHE_MS", ms(cfg.sold_out_cache)),
        ("FLOODGATE_BATCH_SIZE", cfg.batch_size.to_string()),
        ("FLOODGATE_BATCH_MAX_WAIT_MS", ms(cfg.batch_max_wait)),
        ("FLOODGATE_WORKER_PREFETCH", cfg.worker_prefetch.to_string()),
        ("FLOODGATE_WORKER_PIPELINE", cfg.worker_pipeline.to_string()),
        ("FLOODGATE_DB_POOL_SIZE", cfg.db_pool_size.to_string()),
        ("FLOODGATE_DB_LOCK_TIMEOUT_MS", ms(cfg.db_lock_timeout)),
        ("FLOODGATE_RETRY_DELAYS_MS", delays.join(",")),
        ("FLOODGATE_REAPER_INTERVAL_MS", ms(cfg.reaper_interval)),
        ("FLOODGATE_OUTBOX_POLL_MS", ms(cfg.outbox_poll)),
        (
            "FLOODGATE_CONSISTENCY_CHECK_SECS",
            cfg.consistency_check.map_or(0, |d| d.as_secs()).to_string(),
        ),
        (
            "FLOODGATE_WEBHOOK_RETRY_SECS",
            cfg.webhooks
                .retry
                .iter()
                .map(|d| d.as_secs_f64().to_string())
                .collect::<Vec<_>>()
                .join(","),
        ),
        ("FLOODGATE_WEBHOOK_TIMEOUT_MS", ms(cfg.webhooks.timeout)),
        (
            "FLOODGATE_WEBHOOK_CONCURRENCY",
            cfg.webhooks.concurrency.to_string(),
        ),
        (
            "FLOODGATE_WEBHOOK_BREAKER_FAILURES",
            cfg.webhooks.breaker_failures.to_string(),
        ),
        (
            "FLOODGATE_WEBHOOK_BREAKER_COOLDOWN_MS",
            ms(cfg.webhooks.breaker_cooldown),
        ),
        (
            "FLOODGATE_WEBHOOK_ALLOW_PRIVATE",
            cfg.webhooks.allow_private.to_string(),
        ),
        (
            "FLOODGATE_WEBHOOK_RETENTION_HOURS",
            cfg.webhooks
                .retention
                .map_or(0, |d| d.as_secs().div_ceil(3600))
                .to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

pub struct TestApp {
    pub cfg: Config,
    pub base: String,
    /// The notifier's base URL, when [`Options::notifier`] started one.
    pub notifier: Option<String>,
    pub client: reqwest::Client,
    pub redis: Redis,
    pub pg: Pool,
    /// Shard 0's keys: every key of a deployment with one shard (the default).
    pub keys: Keys,
    /// Every shard (`FLOODGATE_REDIS_SHARDS` of the test's environment).
    pub shards: Shards,
    pub topology: Topology,
    pub amqp: floodgate_common::amqp::Link,
    pub channel: Channel,
    /// The running in-process worker's health/metrics base URL.
    pub worker_url: Option<String>,
    /// The in-process ingress's publisher (which broker node it is on).
    pub publisher: floodgate_ingress::publisher::Publisher,
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
        let Options {
            worker,
            notifier,
            tweak,
        } = opts;
        floodgate_common::telemetry::init_logging_with_default("warn,lapin=off");
        let ns = namespace();
        let mut cfg = Config::from_lookup(|k| match k {
            "FLOODGATE_NAMESPACE" => Some(ns.clone()),
            "FLOODGATE_INGRESS_ADDR" | "FLOODGATE_WORKER_ADDR" | "FLOODGATE_NOTIFIER_ADDR" => {
                Some("127.0.0.1:0".into())
            }
            "FLOODGATE_JWT_SECRET" => Some(format!("test-secret-{ns}-0123456789abcdef0123456789")),
            "FLOODGATE_RATE_LIMIT_PER_SEC" => Some("0".into()),
            // Every test client is 127.0.0.1; the per-IP test turns it on.
            "FLOODGATE_IP_RATE_LIMIT_PER_SEC" => Some("0".into()),
            "FLOODGATE_DB_POOL_SIZE" => Some("8".into()),
            // Tests that sell out and restock at once would race the bound; the
            // sold-out cache's own test turns it on.
            "FLOODGATE_SOLD_OUT_CACHE_MS" => Some(std::env::var(k).unwrap_or_else(|_| "0".into())),
            k => std::env::var(k).ok(),
        })
        .expect("test config");
        tweak(&mut cfg);
        floodgate_common::db::ensure_database(&cfg)
            .await
            .expect("database");
        floodgate_common::db::migrate(&cfg).await.expect("migrate");
        let shutdown = CancellationToken::new();
        let ingress = floodgate_ingress::Application::build(cfg.clone())
            .await
            .expect("build ingress");
        let base = format!("http://127.0.0.1:{}", ingress.port());
        let publisher = ingress.publisher();
        cfg.public_ingress_url = base.clone();
        tokio::spawn(ingress.run_until_stopped(shutdown.clone()));
        let notifier = if notifier {
            let n = floodgate_notifier::Notifier::build(cfg.clone())
                .await
                .expect("build notifier");
            let url = format!("http://127.0.0.1:{}", n.port());
            tokio::spawn(n.run_until_stopped(shutdown.clone()));
            // Ready once its event queue is bound: events published before that have
            // nowhere to go.
            let ready = format!("{url}/readyz");
            eventually(Duration::from_secs(30), || async {
                reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200)
            })
            .await;
            Some(url)
        } else {
            None
        };
        let mut redis = floodgate_common::redis::connect(&cfg.redis_url)
            .await
            .expect("redis");
        let pg = floodgate_common::db::pool(&cfg).expect("pool");
        // What `floodgate reconcile --if-unloaded` does: open the gate of a new namespace.
        let shards = cfg.shards();
        let keys = shards.first().clone();
        floodgate_common::stock::load_if_absent(&pg, &mut redis, &shards)
            .await
            .expect("load stock");
        let amqp = floodgate_common::amqp::Link::open(&cfg.amqp_url, "floodgate-tests")
            .await
            .expect("amqp");
        let channel = amqp.channel().await.expect("channel");
        let mut app = TestApp {
            keys,
            shards,
            topology: Topology::of(&cfg),
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .expect("client"),
            cfg,
            base,
            notifier,
            redis,
            pg,
            amqp,
            channel,
            shutdown,
            worker_url: None,
            publisher,
            worker: None,
        };
        if worker {
            app.start_worker().await;
        }
        app
    }

    /// Shuts every in-process service down gracefully, as SIGTERM would.
    pub fn shut_down(&self) {
        self.shutdown.cancel();
    }

    /// Starts a worker (again) in-process.
    pub async fn start_worker(&mut self) {
        assert!(self.worker.is_none(), "a worker is running");
        let token = self.shutdown.child_token();
        let worker = floodgate_worker::Worker::build(self.cfg.clone())
            .await
            .expect("build worker");
        self.worker_url = Some(format!("http://127.0.0.1:{}", worker.port()));
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
    pub fn manager(&self, user: &str) -> String {
        self.token(user, Role::Manager)
    }

    pub async fn patch(&self, path: &str, token: Option<&str>, body: &Value) -> Resp {
        self.request(reqwest::Method::PATCH, path, token, Some(body), &[])
            .await
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

    /// The keys of the shard `sku` lives in.
    pub fn keys_of(&self, sku: &str) -> &Keys {
        self.shards
            .get(floodgate_common::redis::shard_of(sku, self.shards.count()))
    }

    /// Units available in Redis (in the SKU's shard; over all its buckets for a SKU with
    /// buckets), None when Redis does not know it or has no stock loaded.
    pub async fn available(&self, sku: &str) -> Option<i64> {
        let mut r = self.redis.clone();
        let (level, k): (Option<i64>, Option<usize>) = redis::pipe()
            .hget(self.keys_of(sku).stock(), sku)
            .hget(self.keys_of(sku).buckets(), sku)
            .query_async(&mut r)
            .await
            .unwrap();
        let parsed = floodgate_common::domain::Sku::parse(sku).unwrap();
        let mut total = level?;
        for g in self
            .shards
            .bucket_shards(&parsed, k.unwrap_or(1))
            .into_iter()
            .skip(1)
        {
            let more: Option<i64> = redis::cmd("HGET")
                .arg(self.shards.get(g).stock())
                .arg(sku)
                .query_async(&mut r)
                .await
                .unwrap();
            total += more.unwrap_or(0);
        }
        Some(total)
    }

    /// One number from PostgreSQL (the namespace's schema).
    pub async fn scalar(&self, sql: &str) -> i64 {
        let db = self.pg.get().await.unwrap();
        db.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// Messages ready in the intake queues, every partition together (a fresh connection
    /// each time, so it works across a broker restart).
    pub async fn queued(&self) -> u32 {
        let mut n = 0;
        for p in &self.topology.partitions {
            n += self.queue_depth(&p.queue).await;
        }
        n
    }

    /// Messages ready in the dead-letter queue.
    pub async fn dead_letters(&self) -> u32 {
        self.queue_depth(&self.topology.dead_queue).await
    }

    /// Messages ready in `queue`.
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        self.queue_info(queue).await.0
    }

    /// (messages ready, consumers) of `queue`, asked on a link of its own.
    pub async fn queue_info(&self, queue: &str) -> (u32, u32) {
        let conn = floodgate_common::amqp::Link::open(&self.cfg.amqp_url, "floodgate-tests-probe")
            .await
            .expect("amqp");
        let ch = conn.channel().await.expect("channel");
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("{queue}: {e}"));
        conn.close().await;
        (q.message_count(), q.consumer_count())
    }

    /// Reservations (parts of orders: one per shard an order touches) not yet committed
    /// or released, over every shard. Retries through a Redis restart (the first command
    /// on a broken connection fails before the manager reconnects).
    pub async fn open_reservations(&self) -> i64 {
        let mut r = self.redis.clone();
        let mut total = 0;
        for (_, keys) in self.shards.iter() {
            let mut tries = 0;
            total += loop {
                match redis::cmd("ZCARD")
                    .arg(keys.deadlines())
                    .query_async::<i64>(&mut r)
                    .await
                {
                    Ok(n) => break n,
                    Err(_) if tries < 50 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    Err(_) => panic!("Redis did not answer for 5 s"),
                }
            };
        }
        total
    }

    /// Waits until every accepted order is committed or released and the queue is empty.
    pub async fn wait_idle(&self) {
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (open, queued) = (self.open_reservations().await, self.queued().await);
            if open == 0 && queued == 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "not idle after 60 s: {open} open reservations, {queued} queued messages"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn snapshot(&self) -> Snapshot {
        let mut r = self.redis.clone();
        let mut redis_stock: BTreeMap<String, i64> = BTreeMap::new();
        let mut keys = Vec::new();
        let mut redis_limits = BTreeMap::new();
        for (g, k) in self.shards.iter() {
            let limits: BTreeMap<String, i64> = redis::cmd("HGETALL")
                .arg(k.limits())
                .query_async(&mut r)
                .await
                .unwrap();
            redis_limits.extend(limits.into_iter().map(|(sku, l)| ((g, sku), l)));
            let here: BTreeMap<String, i64> = redis::cmd("HGETALL")
                .arg(k.stock())
                .query_async(&mut r)
                .await
                .unwrap();
            // A SKU with buckets has a level in several shards: its units are the sum.
            for (sku, units) in here {
                *redis_stock.entry(sku).or_default() += units;
            }
            keys.extend(r.namespace_keys(k).await.unwrap());
        }
        let mut tables = BTreeMap::new();
        for t in [
            "skus",
            "inventory",
            "orders",
            "order_items",
            "stock_movements",
            "audit_log",
            "categories",
            "products",
        ] {
            tables.insert(t, self.scalar(&format!("SELECT count(*) FROM {t}")).await);
        }
        let catalog: String = self
            .pg
            .get()
            .await
            .unwrap()
            .query_one(
                "SELECT coalesce(md5(string_agg(format('%s|%s|%s|%s', sku, name, price_cents, per_user_limit), ',' ORDER BY sku)), '')
                   FROM skus",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        Snapshot {
            redis_stock,
            redis_limits,
            catalog,
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

    /// Publishes a raw message to the intake exchange (partition 0), as ingress would.
    pub async fn publish_raw(&self, payload: &[u8]) {
        let confirm = self
            .channel
            .basic_publish(
                self.topology.orders_exchange.as_str().into(),
                self.topology.partitions[0].key.as_str().into(),
                BasicPublishOptions::default(),
                payload,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
        confirm.await.unwrap();
    }
}

impl TestApp {
    /// `users` buyers each place a one-unit order of `sku` every `pace` for `duration`.
    pub async fn load(
        &self,
        sku: &str,
        users: usize,
        pace: Duration,
        duration: Duration,
    ) -> LoadResult {
        self.load_paying(sku, users, pace, duration, 0).await
    }

    /// [`Self::load`], with buyer `load-{u}` paying with points when `u % points_every
    /// == 0` (`points_every` 0: nobody does; see [`Self::fund`]).
    pub async fn load_paying(
        &self,
        sku: &str,
        users: usize,
        pace: Duration,
        duration: Duration,
        points_every: usize,
    ) -> LoadResult {
        let until = tokio::time::Instant::now() + duration;
        let runs = (0..users).map(|u| {
            let token = self.customer(&format!("load-{u}"));
            let mut body = serde_json::json!({"items": [{"sku": sku, "qty": 1}]});
            if points_every > 0 && u % points_every == 0 {
                body["payment"] = "points".into();
            }
            let url = format!("{}/v1/orders", self.base);
            let client = self.client.clone();
            async move {
                let mut r = LoadResult::default();
                while tokio::time::Instant::now() < until {
                    let resp = client
                        .post(&url)
                        .bearer_auth(&token)
                        .json(&body)
                        .timeout(Duration::from_secs(10))
                        .send()
                        .await;
                    let status = match resp {
                        Ok(resp) => {
                            let s = resp.status().as_u16();
                            let v: Value = resp.json().await.unwrap_or(Value::Null);
                            if s == 202 {
                                r.accepted
                                    .push(v["order_id"].as_str().unwrap_or_default().to_owned());
                            }
                            s
                        }
                        Err(_) => 0,
                    };
                    *r.statuses.entry(status).or_default() += 1;
                    tokio::time::sleep(pace).await;
                }
                r
            }
        });
        let mut total = LoadResult::default();
        for r in futures::future::join_all(runs).await {
            total.accepted.extend(r.accepted);
            for (s, n) in r.statuses {
                *total.statuses.entry(s).or_default() += n;
            }
        }
        total
    }

    /// Grants `points` to each of `users` through the admin API (asserting 200); returns
    /// what each was given, for [`Self::assert_points`].
    pub async fn fund(&self, users: &[String], points: i64) -> BTreeMap<String, i64> {
        let admin = self.admin();
        for u in users {
            let r = self
                .post(
                    &format!("/v1/users/{u}/points/grant"),
                    Some(&admin),
                    &serde_json::json!({"amount": points, "reference": "fund"}),
                )
                .await;
            assert_eq!(r.status, 200, "grant to {u}: {r:?}");
        }
        users.iter().map(|u| (u.clone(), points)).collect()
    }

    /// Every funded user's points are right once the pipeline is idle: PostgreSQL's
    /// balance is what they were given less the totals of their confirmed orders paid
    /// with points (and the sum of their spend entries is those totals), Redis may spend
    /// exactly that balance and holds nothing. Returns the points spent in all.
    pub async fn assert_points(&self, funded: &BTreeMap<String, i64>) -> i64 {
        let db = self.pg.get().await.unwrap();
        let mut redis = self.redis.clone();
        let mut total = 0;
        for (user, given) in funded {
            let row = db
                .query_one(
                    "SELECT
                       (SELECT coalesce(sum(total_cents), 0)::bigint FROM orders
                         WHERE user_id = $1 AND payment = 'points' AND status = 'confirmed'),
                       (SELECT coalesce(sum(amount), 0)::bigint FROM point_entries
                         WHERE user_id = $1 AND kind = 'spend'),
                       (SELECT coalesce(sum(amount), 0)::bigint FROM point_entries
                         WHERE user_id = $1 AND kind = 'refund'),
                       (SELECT balance FROM point_accounts WHERE user_id = $1)",
                    &[user],
                )
                .await
                .unwrap();
            let (confirmed, spent, refunded, balance): (i64, i64, i64, i64) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            assert_eq!(
                spent - refunded,
                confirmed,
                "{user}: spends less refunds are the confirmed orders' totals"
            );
            assert_eq!(balance, given - confirmed, "{user}: PostgreSQL's balance");
            let (spendable, held) =
                floodgate_common::redis::points_of(&mut redis, self.shards.first(), user)
                    .await
                    .unwrap();
            assert_eq!(
                (spendable, held),
                (balance, 0),
                "{user}: Redis may spend the balance and holds nothing"
            );
            total += confirmed;
        }
        total
    }

    /// `users` buyers order one unit of `sku` each, back to back, until it is sold out
    /// (each stops at its first 409). Returns the accepted order ids.
    pub async fn sell_out(&self, sku: &str, users: usize) -> Vec<String> {
        let runs = (0..users).map(|u| {
            let token = self.customer(&format!("buyer-{u}"));
            let body = serde_json::json!({"items": [{"sku": sku, "qty": 1}]});
            let url = format!("{}/v1/orders", self.base);
            let client = self.client.clone();
            async move {
                let mut accepted = Vec::new();
                loop {
                    let resp = client
                        .post(&url)
                        .bearer_auth(&token)
                        .json(&body)
                        .send()
                        .await
                        .expect("order sent");
                    let status = resp.status().as_u16();
                    let v: Value = resp.json().await.unwrap_or(Value::Null);
                    match status {
                        202 => accepted.push(v["order_id"].as_str().unwrap_or_default().to_owned()),
                        409 => return accepted,
                        other => panic!("unexpected answer {other}: {v}"),
                    }
                }
            }
        });
        futures::future::join_all(runs)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// DESIGN.md's invariants: every accepted order is in PostgreSQL as confirmed, failed
    /// with a reason, or cancelled; nothing oversold; Redis equals PostgreSQL.
    pub async fn assert_invariants(&self, accepted: &[String]) -> BTreeMap<String, i64> {
        let db = self.pg.get().await.unwrap();
        let ids: Vec<uuid::Uuid> = accepted.iter().map(|s| s.parse().unwrap()).collect();
        let rows = db
            .query(
                "SELECT status || coalesce(':' || reason, '') AS outcome, count(*)
                   FROM orders WHERE id = ANY($1) GROUP BY 1",
                &[&ids],
            )
            .await
            .unwrap();
        let outcomes: BTreeMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let recorded: i64 = outcomes.values().sum();
        assert_eq!(
            recorded as usize,
            accepted.len(),
            "every 202 is in PostgreSQL: {outcomes:?}"
        );
        for o in outcomes.keys() {
            assert!(
                o == "confirmed" || o == "cancelled" || o.starts_with("failed:"),
                "unexpected outcome {o}"
            );
        }
        let mut redis = self.redis.clone();
        let violations = floodgate_common::reconcile::check(&self.pg, &mut redis, &self.shards, 6)
            .await
            .unwrap();
        assert!(violations.is_empty(), "invariants broken: {violations:#?}");
        outcomes
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let cfg = self.cfg.clone();
        let shards = self.shards.clone();
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
                    for (_, keys) in shards.iter() {
                        let _ = r.delete_namespace(keys).await;
                    }
                }
                if let Ok(c) =
                    floodgate_common::amqp::Link::open(&cfg.amqp_url, "floodgate-tests-cleanup")
                        .await
                    && let Ok(ch) = c.channel().await
                {
                    let _ = topology.delete(&ch).await;
                    c.close().await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Deletes every key of a namespace from the Redis (or Redis Cluster) at `url`, on a
/// thread and runtime of its own: callable from `Drop`, inside or outside a runtime.
pub fn delete_redis_namespace(url: &str, keys: &Keys) {
    let (url, keys) = (url.to_owned(), keys.clone());
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            if let Ok(mut r) = floodgate_common::redis::connect(&url).await {
                let _ = r.delete_namespace(&keys).await;
            }
        });
    })
    .join();
}

/// The Redis the Redis-only tests use: `FLOODGATE_REDIS_URL` (one server or a cluster's
/// node list), else the local server.
pub fn redis_url() -> String {
    std::env::var("FLOODGATE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
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
