//! What an order over two Redis shards costs beside an order of the same two lines in
//! one shard, side by side in one run (alternating rounds, so noise hits both alike).
//!
//!     parts-bench [--users 64] [--secs 5] [--rounds 3]
//!
//! Against `FLOODGATE_REDIS_URL`, in a fresh namespace of 4 shards removed afterwards.
//! Each of `--users` tasks loops over the Redis work of one order's life: reserve
//! (`parts::reserve_parts`), queued mark, claim and finish, each grouped per shard as
//! ingress and the worker do (one order per call here: no batching across orders, the
//! worst case for parts). Prints per round orders/s, p50 and p99 of one order's Redis
//! time, and Redis's own CPU per order (`INFO cpu`, user + sys; on a cluster, the node
//! the URL names first only), then the medians and the ratio.

use floodgate_common::{
    Namespace,
    domain::{OrderId, OrderLine, OrderLines, Quantity, Sku, UserId},
    redis::{self as fredis, ConfirmedOrder, OrderParts, ReserveRequest, Shards, shard_of},
};
use std::time::{Duration, Instant};

const SHARDS: usize = 4;

struct Args {
    users: usize,
    secs: u64,
    rounds: usize,
}

fn args() -> Args {
    let mut a = Args {
        users: 64,
        secs: 5,
        rounds: 3,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let v: u64 = pair
            .get(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("usage: parts-bench [--users N] [--secs N] [--rounds N]"));
        match pair[0].as_str() {
            "--users" => a.users = v as usize,
            "--secs" => a.secs = v,
            "--rounds" => a.rounds = v as usize,
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

struct Round {
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    redis_cpu_us: f64,
}

/// Redis's CPU seconds so far (user + sys) of the node the connection reaches first.
async fn redis_cpu(url: &str) -> f64 {
    let first = url.split(',').next().unwrap_or(url);
    let client = redis::Client::open(first).expect("a Redis URL");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis");
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(&mut con)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| *k == "used_cpu_user" || *k == "used_cpu_sys")
        .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
        .sum()
}

fn sku_in(prefix: &str, g: usize) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|s| shard_of(s, SHARDS) == g)
        .unwrap()
}

async fn round(
    url: &str,
    redis: &fredis::Redis,
    shards: &Shards,
    skus: [&str; 2],
    a: &Args,
) -> Round {
    let cpu0 = redis_cpu(url).await;
    let until = Instant::now() + Duration::from_secs(a.secs);
    let started = Instant::now();
    let tasks: Vec<_> = (0..a.users)
        .map(|u| {
            let (redis, shards) = (redis.clone(), shards.clone());
            let skus = skus.map(str::to_owned);
            tokio::spawn(async move {
                let user = UserId::parse(format!("u{u}")).unwrap();
                let lines = OrderLines::try_from(
                    skus.iter()
                        .map(|s| OrderLine {
                            sku: Sku::parse(s.as_str()).unwrap(),
                            qty: Quantity::try_from(1).unwrap(),
                        })
                        .collect::<Vec<_>>(),
                )
                .unwrap();
                let parts = shards.parts(
                    &floodgate_common::bundle::held_lines(lines.as_slice(), &Default::default()),
                    &user,
                    None,
                    |_| 1,
                );
                let part_shards: Vec<usize> = parts.iter().map(|p| p.shard).collect();
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
                        accepted_at: "2026-12-03T00:00:00Z",
                        deadline_ms: i64::MAX / 2,
                        waitlist_until_ms: None,
                        idempotency_ttl_secs: 60,
                        points: None,
                    };
                    let r = fredis::reserve_parts(&redis, &shards, &parts, &req)
                        .await
                        .unwrap();
                    assert_eq!(r, fredis::Reserve::Reserved);
                    let confirmed = ConfirmedOrder {
                        order_id,
                        user: user.clone(),
                        idempotency_key: None,
                    };
                    let marks: Vec<(usize, &ConfirmedOrder)> =
                        part_shards.iter().map(|&g| (g, &confirmed)).collect();
                    fredis::mark_parts_queued(&redis, &shards, &marks)
                        .await
                        .unwrap();
                    let one = [OrderParts {
                        order_id,
                        user: &user,
                        key: None,
                        shards: part_shards.clone(),
                    }];
                    let c = fredis::claim_orders(&redis, &shards, &one).await.unwrap();
                    assert_eq!(c, [fredis::Claim::Claimed]);
                    fredis::finish_orders(&redis, &shards, &one).await.unwrap();
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
    let cpu = redis_cpu(url).await - cpu0;
    took.sort_unstable();
    let pct = |p: f64| took[((took.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    Round {
        per_sec: took.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        redis_cpu_us: cpu / took.len() as f64 * 1e6,
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
    let shards = Shards::new(&ns, SHARDS);
    let mut redis = fredis::connect(&url).await.expect("Redis");
    let (a0, b0, b1) = (sku_in("a", 0), sku_in("b", 0), sku_in("c", 1));
    for (g, keys) in shards.iter() {
        let mut pipe = redis::pipe();
        pipe.set(keys.epoch(), "bench");
        for s in [&a0, &b0, &b1] {
            if shard_of(s, SHARDS) == g {
                pipe.hset(keys.stock(), s.as_str(), 1_000_000_000_i64);
            }
        }
        let _: () = pipe.query_async(&mut redis).await.unwrap();
    }
    println!(
        "{} users, {} s per round, {SHARDS} shards, against {url}",
        a.users, a.secs
    );
    let variants: [(&str, [&str; 2]); 2] = [
        ("one part ", [a0.as_str(), b0.as_str()]),
        ("two parts", [a0.as_str(), b1.as_str()]),
    ];
    let mut results: Vec<Vec<Round>> = vec![Vec::new(), Vec::new()];
    for r in 1..=a.rounds {
        for (i, (name, skus)) in variants.iter().enumerate() {
            let x = round(&url, &redis, &shards, *skus, &a).await;
            println!(
                "round {r} {name}: {:>8.0} orders/s  p50 {:.2} ms  p99 {:.2} ms  Redis {:.0} µs/order",
                x.per_sec, x.p50_ms, x.p99_ms, x.redis_cpu_us
            );
            results[i].push(x);
        }
    }
    let med = |v: &Vec<Round>, f: fn(&Round) -> f64| median(v.iter().map(f).collect());
    for (i, (name, _)) in variants.iter().enumerate() {
        println!(
            "median {name}: {:>8.0} orders/s  p50 {:.2} ms  p99 {:.2} ms  Redis {:.0} µs/order",
            med(&results[i], |x| x.per_sec),
            med(&results[i], |x| x.p50_ms),
            med(&results[i], |x| x.p99_ms),
            med(&results[i], |x| x.redis_cpu_us),
        );
    }
    println!(
        "two parts / one part: {:.2}x orders/s, {:.2}x p50, {:.2}x Redis CPU per order",
        med(&results[1], |x| x.per_sec) / med(&results[0], |x| x.per_sec),
        med(&results[1], |x| x.p50_ms) / med(&results[0], |x| x.p50_ms),
        med(&results[1], |x| x.redis_cpu_us) / med(&results[0], |x| x.redis_cpu_us),
    );
    let mut n = 0;
    for (_, keys) in shards.iter() {
        n += redis.delete_namespace(keys).await.unwrap();
    }
    println!("removed {n} keys");
}
