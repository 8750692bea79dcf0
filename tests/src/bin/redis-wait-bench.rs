//! What `FLOODGATE_REDIS_WAIT_REPLICAS=1` costs the order path's Redis part, side by side
//! with 0 in one run (alternating rounds, so noise hits both alike).
//!
//!     redis-wait-bench [--users 64] [--secs 5] [--rounds 3] [--timeout-ms 50]
//!
//! Against `FLOODGATE_REDIS_URL` (one server with a replica, or a cluster's node list),
//! in a fresh namespace removed afterwards. Each of `--users` tasks loops over what
//! ingress does in Redis for one order: `reserve.lua`, then the queued mark through
//! ingress' own batching marker (`QueuedMarker`), which with WAIT on also waits for a
//! replica before answering. The publish to RabbitMQ (between the two in ingress) is
//! left out: this measures what WAIT adds, not the whole request. Prints orders/s, p50
//! and p99 of one order's Redis time per round, and the medians.

use floodgate_common::{
    Namespace,
    domain::{OrderId, OrderLine, OrderLines, Quantity, Sku, UserId},
    redis::{self as fredis, ConfirmedOrder, Keys, ReserveRequest},
    supervise::Supervisor,
};
use floodgate_ingress::queued::{QueuedMarker, ReplicaWait};
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

struct Args {
    users: usize,
    secs: u64,
    rounds: usize,
    timeout_ms: u64,
}

fn args() -> Args {
    let mut a = Args {
        users: 64,
        secs: 5,
        rounds: 3,
        timeout_ms: 50,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let v = pair.get(1).and_then(|v| v.parse().ok()).unwrap_or_else(|| {
            panic!("usage: redis-wait-bench [--users N] [--secs N] [--rounds N] [--timeout-ms N]")
        });
        match pair[0].as_str() {
            "--users" => a.users = v as usize,
            "--secs" => a.secs = v,
            "--rounds" => a.rounds = v as usize,
            "--timeout-ms" => a.timeout_ms = v,
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// One round's figures.
struct Round {
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

async fn round(url: &str, ns: &Namespace, keys: &Arc<Keys>, a: &Args, wait: bool) -> Round {
    let redis = fredis::connect(url).await.expect("Redis");
    let replica_wait = if wait {
        Some(ReplicaWait {
            redis: fredis::connect(url).await.expect("Redis"),
            replicas: 1,
            timeout: Duration::from_millis(a.timeout_ms),
        })
    } else {
        None
    };
    let marker = QueuedMarker::spawn(
        redis.clone(),
        Arc::new(fredis::Shards::new(ns, 1)),
        replica_wait,
        &Supervisor::default(),
    );
    let until = Instant::now() + Duration::from_secs(a.secs);
    let started = Instant::now();
    let tasks: Vec<_> = (0..a.users)
        .map(|u| {
            let (mut redis, keys, marker) = (redis.clone(), keys.clone(), marker.clone());
            tokio::spawn(async move {
                let user = UserId::parse(format!("u{u}")).unwrap();
                let lines = OrderLines::try_from(vec![OrderLine {
                    sku: Sku::parse("tee").unwrap(),
                    qty: Quantity::try_from(1).unwrap(),
                }])
                .unwrap();
                let mut took = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    let order_id = OrderId::new();
                    let req = ReserveRequest {
                        order_id,
                        user: &user,
                        lines: &lines,
                        held: None,
                        first: None,
                        buckets: &floodgate_common::redis::one_bucket,
                        idempotency: None,
                        accepted_at: "2026-11-21T00:00:00Z",
                        deadline_ms: i64::MAX / 2,
                        waitlist_until_ms: None,
                        idempotency_ttl_secs: 60,
                        points: None,
                    };
                    let r = fredis::reserve(&mut redis, &keys, &req).await.unwrap();
                    assert_eq!(r, fredis::Reserve::Reserved);
                    marker
                        .mark(
                            0,
                            ConfirmedOrder {
                                order_id,
                                user: user.clone(),
                                idempotency_key: None,
                            },
                        )
                        .await
                        .unwrap();
                    took.push(t.elapsed());
                }
                took
            })
        })
        .collect();
    let mut took: Vec<Duration> = Vec::new();
    for t in tasks {
        took.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    took.sort_unstable();
    let pct = |p: f64| took[((took.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    Round {
        per_sec: took.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let a = args();
    let url = floodgate_tests::redis_url();
    let ns = Namespace::parse(&floodgate_tests::namespace()).unwrap();
    let keys = Arc::new(Keys::new(&ns));
    let mut con = fredis::connect(&url).await.expect("Redis");
    let _: () = redis::pipe()
        .set(keys.epoch(), "bench")
        .hset(keys.stock(), "tee", 1_000_000_000_i64)
        .query_async(&mut con)
        .await
        .unwrap();
    println!(
        "{} users, {} s per round, WAIT 1 {} ms, against {url}",
        a.users, a.secs, a.timeout_ms
    );
    let mut off = Vec::new();
    let mut on = Vec::new();
    for r in 1..=a.rounds {
        for wait in [false, true] {
            let x = round(&url, &ns, &keys, &a, wait).await;
            println!(
                "round {r} WAIT {}: {:>8.0} orders/s  p50 {:.2} ms  p99 {:.2} ms",
                if wait { "on " } else { "off" },
                x.per_sec,
                x.p50_ms,
                x.p99_ms
            );
            if wait { &mut on } else { &mut off }.push(x);
        }
    }
    for (name, v) in [("off", off), ("on ", on)] {
        println!(
            "median WAIT {name}: {:>8.0} orders/s  p50 {:.2} ms  p99 {:.2} ms",
            median(v.iter().map(|x| x.per_sec).collect()),
            median(v.iter().map(|x| x.p50_ms).collect()),
            median(v.iter().map(|x| x.p99_ms).collect()),
        );
    }
    let n = con.delete_namespace(&keys).await.unwrap();
    println!("removed {n} keys");
}
