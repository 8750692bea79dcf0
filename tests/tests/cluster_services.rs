//! Service processes killed on the cluster topology (issue #11): a Redis Cluster (3
//! masters, 3 replicas), a three-node RabbitMQ cluster and a PostgreSQL primary with a
//! streaming replica (tests/src/servers.rs, through ops/cluster), two worker and two
//! ingress processes (the production entry points). Under load, one of the two workers
//! is `kill -9`ed, then one of the two ingresses; the buyers of a dead ingress move to the
//! other one, as behind a load balancer. After each: every 202 is in PostgreSQL with an
//! outcome, nothing is oversold, and the invariants (`reconcile::check`, what
//! `floodgate reconcile --check` runs) hold. Each prints a `FAULT` line with what the
//! clients saw.
//!
//! Needs a build whose FLOODGATE_REDIS_URL and FLOODGATE_AMQP_URL take node lists; an
//! older one fails at the first step, saying so.

use floodgate_tests::{
    Options, TestApp, env_of, eventually,
    servers::{PrivateCluster, free_port},
};
use serde_json::Value;
use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

const INGRESS_EXE: &str = env!("CARGO_BIN_EXE_ingress-process");
const WORKER_EXE: &str = env!("CARGO_BIN_EXE_worker-process");
/// Buyers per ingress process; each orders one unit every [`PACE`].
const BUYERS: usize = 12;
const PACE: Duration = Duration::from_millis(25);
const LOAD_FOR: Duration = Duration::from_secs(10);
/// When the process is killed, counted from the start of the load.
const KILL_AFTER: Duration = Duration::from_secs(3);

/// Variables of the topology a process takes from the test's own environment, beyond
/// [`env_of`] (`ops/stack test --cluster` sets the partitions).
const PASSED_THROUGH: &[&str] = &["FLOODGATE_INTAKE_PARTITIONS"];

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// A service as a real OS process, its output in a log file shown when it fails.
struct Service {
    child: Option<Child>,
    name: String,
    url: String,
    log: PathBuf,
}

impl Service {
    fn start(exe: &str, name: &str, app: &TestApp, cluster: &PrivateCluster) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::env::temp_dir().join(format!(
            "floodgate-cluster-{}-{name}.log",
            app.cfg.namespace
        ));
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let passed = PASSED_THROUGH
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (*k, v)));
        let child = Command::new(exe)
            .envs(env_of(&app.cfg))
            // The node lists and the replica, whatever env_of knows of them.
            .envs(cluster.env())
            .envs(passed)
            .env("FLOODGATE_INGRESS_ADDR", &addr)
            .env("FLOODGATE_WORKER_ADDR", &addr)
            .env("FLOODGATE_NOTIFIER_ADDR", &addr)
            .env("FLOODGATE_RATE_LIMIT_PER_SEC", "0")
            .env("FLOODGATE_IP_RATE_LIMIT_PER_SEC", "0")
            .env("FLOODGATE_LOG", "warn,lapin=off")
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Self {
            child: Some(child),
            name: name.to_owned(),
            url: format!("http://{addr}"),
            log,
        }
    }

    async fn ready(&mut self) {
        let ready = format!("{}/readyz", self.url);
        let until = Instant::now() + Duration::from_secs(60);
        while !reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200) {
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            assert!(
                Instant::now() < until && !exited,
                "{} {} within 60 s on the cluster topology; its log:\n{}",
                self.name,
                if exited { "exited" } else { "not ready" },
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `kill -9`: no shutdown, no cleanup.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// What the buyers saw.
#[derive(Default, Debug)]
struct Seen {
    accepted: Vec<String>,
    /// Answers by status (0: no answer, the connection failed).
    statuses: BTreeMap<u16, usize>,
    /// Requests that failed without an answer, then went to the other ingress.
    failovers: usize,
    /// The longest time any buyer went without an answer (202 or 409).
    longest_gap: Duration,
}

/// `BUYERS` buyers per ingress in `ingresses`, each ordering one unit of `sku` every
/// [`PACE`] for [`LOAD_FOR`]; a buyer whose ingress does not answer moves to the next.
async fn load(app: &TestApp, ingresses: &[String], sku: &str) -> Seen {
    let until = tokio::time::Instant::now() + LOAD_FOR;
    let runs = (0..BUYERS * ingresses.len()).map(|u| {
        let token = app.customer(&format!("cluster-{u}"));
        let body = serde_json::json!({"items": [{"sku": sku, "qty": 1}]});
        let client = app.client.clone();
        let ingresses = ingresses.to_vec();
        async move {
            let mut seen = Seen::default();
            let mut at = u % ingresses.len();
            let mut last_answer = Instant::now();
            while tokio::time::Instant::now() < until {
                let resp = client
                    .post(format!("{}/v1/orders", ingresses[at]))
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
                            seen.accepted
                                .push(v["order_id"].as_str().unwrap_or_default().to_owned());
                        }
                        s
                    }
                    Err(_) => {
                        seen.failovers += 1;
                        at = (at + 1) % ingresses.len();
                        0
                    }
                };
                if status == 202 || status == 409 {
                    seen.longest_gap = seen.longest_gap.max(last_answer.elapsed());
                    last_answer = Instant::now();
                }
                *seen.statuses.entry(status).or_default() += 1;
                tokio::time::sleep(PACE).await;
            }
            seen
        }
    });
    let mut total = Seen::default();
    for s in futures::future::join_all(runs).await {
        total.accepted.extend(s.accepted);
        for (k, n) in s.statuses {
            *total.statuses.entry(k).or_default() += n;
        }
        total.failovers += s.failovers;
        total.longest_gap = total.longest_gap.max(s.longest_gap);
    }
    total
}

/// The cluster, a test app on it (its own namespace; no in-process worker), stock
/// loaded. Fails first, and clearly, if this build cannot use node lists. Bind the pair
/// as `let (cluster, app)` and the services after it: they drop first, then the app
/// (cleaning its namespace), then the cluster.
async fn topology(sku: &str, stock: i64) -> (PrivateCluster, TestApp) {
    let cluster = blocking(PrivateCluster::start).await;
    let (redis, amqp, db) = (cluster.redis.url(), cluster.rabbit.url(), cluster.pg.url());
    if let Err(e) = floodgate_common::redis::connect(&redis).await {
        panic!(
            "this build cannot use FLOODGATE_REDIS_URL as a list of Redis Cluster nodes \
             ({redis}): {e}"
        );
    }
    if let Err(e) = floodgate_common::amqp::Link::open(&amqp, "floodgate-tests-probe").await {
        panic!(
            "this build cannot use FLOODGATE_AMQP_URL as a list of RabbitMQ nodes ({amqp}): {e}"
        );
    }
    let app = TestApp::spawn_with(Options {
        worker: false,
        tweak: Box::new(move |c| {
            c.redis_url = redis;
            c.amqp_url = amqp;
            c.database_url = db;
            // An ingress killed between its reservation and its answer leaves a
            // reservation nobody confirms: expired after 8 s (at least the publish
            // timeout + 2 s, the services insist), so the run ends soon.
            c.reservation_ttl = Duration::from_secs(8);
            c.reaper_interval = Duration::from_millis(200);
        }),
        ..Options::default()
    })
    .await;
    app.create_sku(sku, stock, None).await;
    (cluster, app)
}

/// Every 202 recorded with an outcome, nothing oversold, Redis equal to PostgreSQL;
/// prints the `FAULT` line.
async fn check(app: &TestApp, fault: &str, sku: &str, seen: &Seen, stock: i64) {
    assert!(seen.accepted.len() > 50, "the sale ran: {seen:?}");
    app.wait_idle().await;
    let outcomes = app.assert_invariants(&seen.accepted).await;
    let sold = app
        .scalar(&format!("SELECT sold FROM inventory WHERE sku = '{sku}'"))
        .await;
    assert!(sold <= stock, "oversold: {sold} of {stock}");
    // An ingress killed after its publish but before its answer leaves orders that are
    // committed although their buyer saw no 202: sold counts them, the 202s do not.
    let confirmed = outcomes.get("confirmed").copied().unwrap_or(0);
    assert!(
        confirmed <= sold,
        "{confirmed} confirmed 202s of {sku} but only {sold} sold"
    );
    let sent: usize = seen.statuses.values().sum();
    eprintln!(
        "FAULT | cluster: {fault} | sent {sent} | answers {:?} | accepted {} | failed over {} | \
         longest gap {:?} | outcomes {outcomes:?} | committed without a 202 {} | invariants hold",
        seen.statuses,
        seen.accepted.len(),
        seen.failovers,
        seen.longest_gap,
        sold - confirmed
    );
}

/// One topology for both faults (a RabbitMQ cluster takes 15-40 s to start): first one
/// of the two workers is killed, then (two workers again) one of the two ingresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_of_two_workers_then_one_of_two_ingresses_killed_under_load() {
    let stock = 4000;
    let (cluster, app) = topology("cw-tee", stock).await;
    app.create_sku("ci-tee", stock, None).await;
    let mut ingresses = [
        Service::start(INGRESS_EXE, "ingress-1", &app, &cluster),
        Service::start(INGRESS_EXE, "ingress-2", &app, &cluster),
    ];
    let mut workers = [
        Service::start(WORKER_EXE, "worker-1", &app, &cluster),
        Service::start(WORKER_EXE, "worker-2", &app, &cluster),
    ];
    for s in ingresses.iter_mut().chain(workers.iter_mut()) {
        s.ready().await;
    }
    let urls: Vec<String> = ingresses.iter().map(|i| i.url.clone()).collect();

    // 1. One of two workers.
    let killer = async {
        tokio::time::sleep(KILL_AFTER).await;
        workers[0].kill();
        Instant::now()
    };
    let (seen, killed_at) = tokio::join!(load(&app, &urls, "cw-tee"), killer);
    // The survivor drains what the dead worker held (redelivered) and the rest.
    eventually(Duration::from_secs(60), || async {
        app.queued().await == 0
    })
    .await;
    eprintln!(
        "worker-1 killed; queue drained {:?} after the kill",
        killed_at.elapsed()
    );
    check(&app, "1 of 2 workers kill -9", "cw-tee", &seen, stock).await;

    // 2. One of two ingresses, with two workers again.
    workers[0] = Service::start(WORKER_EXE, "worker-1b", &app, &cluster);
    workers[0].ready().await;
    let killer = async {
        tokio::time::sleep(KILL_AFTER).await;
        ingresses[0].kill();
    };
    let (seen, ()) = tokio::join!(load(&app, &urls, "ci-tee"), killer);
    assert!(
        seen.failovers > 0,
        "buyers of the killed ingress moved: {seen:?}"
    );
    check(&app, "1 of 2 ingresses kill -9", "ci-tee", &seen, stock).await;
}
