//! RabbitMQ cluster faults under load: a three-node cluster of its own
//! ([`PrivateRabbitCluster`]), ingress and worker in-process with the node list as
//! `FLOODGATE_AMQP_URL` and three intake partitions, the default Redis and PostgreSQL
//! in a fresh namespace per phase.
//!
//! 1. `kill -9` of the node holding an intake partition's leader and the ingress
//!    publisher's connection (then the node is started again);
//! 2. a node restarted (a graceful stop, then a start) under load.
//!
//! After each: nothing oversold, every 202 in PostgreSQL, the invariants and `reconcile
//! --check` hold. Each prints a `FAULT` line with what the buyers saw (answers, the
//! longest stretch without a 202) and what the publisher saw (failures by reason,
//! reconnects). Both phases share one cluster: starting one takes about a minute.

use floodgate_common::amqp::partition_of;
use floodgate_tests::{Options, TestApp, servers::PrivateRabbitCluster};
use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

const PARTITIONS: usize = 3;
/// Simulated buyers, each ordering every [`PACE`].
const USERS: usize = 8;
const PACE: Duration = Duration::from_millis(20);

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// One SKU per partition (the first name [`partition_of`] puts there).
fn skus() -> Vec<String> {
    (0..PARTITIONS)
        .map(|p| {
            (0..)
                .map(|k| format!("c{k}"))
                .find(|s| partition_of(s, PARTITIONS) == p)
                .unwrap()
        })
        .collect()
}

/// What the buyers saw.
#[derive(Default)]
struct Seen {
    accepted: Vec<String>,
    statuses: BTreeMap<u16, usize>,
    /// When each 202 arrived.
    ok_at: Vec<Instant>,
}

impl Seen {
    /// The longest stretch without a 202 inside [from, to], and where it started.
    fn longest_gap(&self, from: Instant, to: Instant) -> (Duration, Duration) {
        let mut t: Vec<Instant> = self
            .ok_at
            .iter()
            .copied()
            .filter(|t| *t >= from && *t <= to)
            .collect();
        t.sort();
        let mut edges = vec![from];
        edges.extend(t);
        edges.push(to);
        edges
            .windows(2)
            .map(|w| (w[1] - w[0], w[0] - from))
            .max()
            .unwrap_or_default()
    }
}

/// [`USERS`] buyers order one unit of each SKU in turn until `until`.
async fn load(app: &TestApp, skus: &[String], until: Instant) -> Seen {
    let runs = (0..USERS).map(|u| {
        let token = app.customer(&format!("load-{u}"));
        let url = format!("{}/v1/orders", app.base);
        let client = app.client.clone();
        let skus = skus.to_vec();
        async move {
            let mut seen = Seen::default();
            let mut k = u;
            while Instant::now() < until {
                let body = serde_json::json!({"items": [{"sku": skus[k % skus.len()], "qty": 1}]});
                k += 1;
                let resp = client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&body)
                    .timeout(Duration::from_secs(15))
                    .send()
                    .await;
                let status = match resp {
                    Ok(r) => {
                        let s = r.status().as_u16();
                        let v: serde_json::Value = r.json().await.unwrap_or_default();
                        if s == 202 {
                            seen.accepted
                                .push(v["order_id"].as_str().unwrap_or_default().to_owned());
                            seen.ok_at.push(Instant::now());
                        }
                        s
                    }
                    Err(_) => 0,
                };
                *seen.statuses.entry(status).or_default() += 1;
                tokio::time::sleep(PACE).await;
            }
            seen
        }
    });
    let mut all = Seen::default();
    for s in futures::future::join_all(runs).await {
        all.accepted.extend(s.accepted);
        all.ok_at.extend(s.ok_at);
        for (k, n) in s.statuses {
            *all.statuses.entry(k).or_default() += n;
        }
    }
    all
}

/// Ingress's publish failures by reason and the process's reconnects by service (the
/// in-process services share one registry, so phases compare before and after).
async fn publisher_metrics(app: &TestApp) -> BTreeMap<String, f64> {
    let m = app.get("/metrics", None).await;
    m.body
        .as_str()
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.starts_with("floodgate_publish_failures_total")
                || l.starts_with("floodgate_amqp_reconnects_total")
        })
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            let k = k
                .trim_start_matches("floodgate_")
                .replace("_total", "")
                .replace('"', "");
            Some((k, v.parse().ok()?))
        })
        .collect()
}

/// What rose between two [`publisher_metrics`].
fn rise(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect()
}

/// Which node `host:port` is.
fn node_index(cluster: &PrivateRabbitCluster, addr: &str) -> usize {
    (0..PrivateRabbitCluster::NODES)
        .find(|i| addr.ends_with(&format!(":{}", cluster.port(*i))))
        .unwrap_or_else(|| panic!("{addr} is no node of the cluster"))
}

/// The node of each intake partition's leader (None while it has none).
fn leaders(cluster: &PrivateRabbitCluster, app: &TestApp) -> Vec<Option<usize>> {
    let all = cluster.leaders();
    app.topology
        .partitions
        .iter()
        .map(|p| all.get(&p.queue).copied())
        .collect()
}

async fn spawn(cluster: &PrivateRabbitCluster) -> TestApp {
    let url = cluster.url();
    let app = TestApp::spawn_with(Options {
        tweak: Box::new(move |c| {
            c.amqp_url = url;
            c.intake_partitions = PARTITIONS;
        }),
        ..Options::default()
    })
    .await;
    for s in skus() {
        app.create_sku(&s, 100_000, None).await;
    }
    app
}

/// Waits until the app is idle, then checks and prints.
async fn verdict(
    fault: &str,
    app: &TestApp,
    seen: &Seen,
    window: (Instant, Instant),
    before: &BTreeMap<String, f64>,
) {
    app.wait_idle().await;
    let outcomes = app.assert_invariants(&seen.accepted).await;
    let sold = app
        .scalar("SELECT coalesce(sum(sold), 0)::bigint FROM inventory")
        .await;
    let confirmed = outcomes.get("confirmed").copied().unwrap_or(0);
    assert_eq!(sold, confirmed, "sold units = confirmed one-unit orders");
    let (gap, at) = seen.longest_gap(window.0, window.1);
    eprintln!(
        "FAULT | {fault} | answers {:?} | accepted {} | outcomes {outcomes:?} | longest stretch without a 202: {gap:?} (from {at:?} after the fault) | publisher: {:?} | invariants and reconcile --check hold",
        seen.statuses,
        seen.accepted.len(),
        rise(before, &publisher_metrics(app).await)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_cluster_node_killed_and_restarted_under_load() {
    let started = Instant::now();
    let cluster = Arc::new(blocking(PrivateRabbitCluster::start).await);
    eprintln!("three-node RabbitMQ cluster up in {:?}", started.elapsed());

    // 1. kill -9 of the node holding a partition leader and the publisher's connection.
    {
        let app = spawn(&cluster).await;
        let mut lead = leaders(&cluster, &app);
        eprintln!("partition leaders on nodes {lead:?} (x-queue-leader-locator: balanced)");
        let publisher = node_index(&cluster, &app.publisher.node().expect("connected"));
        if !lead.contains(&Some(publisher)) {
            // The publisher's node leads no partition: spread the leaders.
            let c = cluster.clone();
            blocking(move || c.rebalance()).await;
            lead = leaders(&cluster, &app);
            eprintln!("after rebalance: partition leaders on nodes {lead:?}");
        }
        assert!(
            lead.contains(&Some(publisher)),
            "the publisher's node {publisher} leads no partition: {lead:?}"
        );
        let skus = skus();
        let before = publisher_metrics(&app).await;
        let until = Instant::now() + Duration::from_secs(20);
        let buyers = load(&app, &skus, until);
        let fault = async {
            tokio::time::sleep(Duration::from_secs(4)).await;
            let c = cluster.clone();
            let at = Instant::now();
            blocking(move || c.kill_node(publisher)).await;
            at
        };
        let (seen, killed_at) = tokio::join!(buyers, fault);
        let moved = app.publisher.node();
        eprintln!(
            "killed node {publisher}; the publisher is now on {moved:?}; leaders {:?}",
            leaders(&cluster, &app)
        );
        verdict(
            &format!(
                "kill -9 of RabbitMQ node {publisher} (leader of partitions {:?} and the publisher's connection)",
                lead.iter()
                    .enumerate()
                    .filter(|(_, n)| **n == Some(publisher))
                    .map(|(p, _)| p)
                    .collect::<Vec<_>>()
            ),
            &app,
            &seen,
            (killed_at, until),
            &before,
        )
        .await;
        drop(app);
        let c = cluster.clone();
        let t = Instant::now();
        blocking(move || c.start_node(publisher)).await;
        eprintln!(
            "node {publisher} back in the cluster after {:?}",
            t.elapsed()
        );
    }

    // 2. A node restarted under load.
    {
        let app = spawn(&cluster).await;
        let lead = leaders(&cluster, &app);
        let target = lead[1].unwrap_or(1);
        eprintln!("partition leaders on nodes {lead:?}; restarting node {target}");
        let skus = skus();
        let before = publisher_metrics(&app).await;
        let until = Instant::now() + Duration::from_secs(30);
        let buyers = load(&app, &skus, until);
        let fault = async {
            tokio::time::sleep(Duration::from_secs(4)).await;
            let c = cluster.clone();
            let at = Instant::now();
            blocking(move || {
                c.stop_node(target);
                c.start_node(target);
            })
            .await;
            eprintln!("node {target} stopped and back after {:?}", at.elapsed());
            at
        };
        let (seen, stopped_at) = tokio::join!(buyers, fault);
        verdict(
            &format!("RabbitMQ node {target} restarted (stop, start) under load"),
            &app,
            &seen,
            (stopped_at, until),
            &before,
        )
        .await;
        eprintln!(
            "partition leaders afterwards: {:?}",
            leaders(&cluster, &app)
        );
    }
}
