//! Notifier delivery lag under load: opens `PROBE_SUBSCRIBERS` SSE streams (default
//! 1000): `PROBE_ADMINS` of them (default 10) are ops dashboards on `orders:*,stock:*`
//! with an admin token, the rest storefront pages on `stock:*,orders:mine` as the load
//! test's buyers (`buyer-<i>`, the same tokens it orders with). Reads them for
//! `PROBE_SECONDS` (default 30) and prints the delivery lag of every event received:
//! receive time minus the event's `at`.
//!
//! For an order event `at` is the moment its status changed in the worker's commit
//! (the outbox row), so its lag covers commit, outbox relay, broker and notifier. For a
//! stock event `at` is the notifier's sample, so its lag is the fan-out alone (the
//! sample itself trails the Redis change by at most `FLOODGATE_STOCK_INTERVAL_MS`).
//! Run by `ops/bench/notifier-lag` beside a flash-sale load.

use floodgate_common::{
    Config, auth,
    domain::{Role, UserId},
};
use futures::StreamExt;
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// Lag histogram in 0.1 ms buckets up to 10 s (the last bucket holds the rest).
struct Histogram {
    buckets: Vec<AtomicU64>,
}

impl Histogram {
    fn new() -> Self {
        Self {
            buckets: (0..100_001).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    fn record(&self, lag: Duration) {
        let i = ((lag.as_secs_f64() * 10_000.0) as usize).min(self.buckets.len() - 1);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }
    fn report(&self, name: &str) {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            println!("{name}: no events");
            return;
        }
        let q = |p: f64| {
            let want = (total as f64 * p).ceil() as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= want {
                    return i as f64 / 10.0;
                }
            }
            f64::NAN
        };
        println!(
            "{name}: {total} deliveries, lag p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            q(0.5),
            q(0.9),
            q(0.99),
            q(1.0)
        );
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::from_env()?;
    let n: usize = std::env::var("PROBE_SUBSCRIBERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let secs: u64 = std::env::var("PROBE_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    let admins: usize = std::env::var("PROBE_ADMINS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let base = std::env::var("PROBE_NOTIFIER").unwrap_or_else(|_| "http://127.0.0.1:8081".into());
    let admin = auth::mint(cfg.jwt_secret.expose(), &UserId::parse("lagprobe")?, Role::Admin, Duration::from_secs(3600));
    let orders = Arc::new(Histogram::new());
    let stock = Arc::new(Histogram::new());
    let until = tokio::time::Instant::now() + Duration::from_secs(secs);
    let clients: Vec<reqwest::Client> = (0..(n / 100 + 1)).map(|_| reqwest::Client::new()).collect();
    let mut tasks = Vec::new();
    for i in 0..n {
        let url = if i < admins {
            format!("{base}/v1/stream?topics=orders:*,stock:*&access_token={admin}")
        } else {
            let buyer = UserId::parse(format!("buyer-{}", i - admins))?;
            let token = auth::mint(cfg.jwt_secret.expose(), &buyer, Role::Customer, Duration::from_secs(3600));
            format!("{base}/v1/stream?topics=stock:*,orders:mine&access_token={token}")
        };
        let resp = clients[i / 100].get(&url).send().await?;
        anyhow::ensure!(resp.status() == 200, "subscriber {i}: {}", resp.text().await?);
        let (orders, stock) = (orders.clone(), stock.clone());
        tasks.push(tokio::spawn(async move {
            let mut body = resp.bytes_stream();
            let mut buf = Vec::new();
            let mut closed = None;
            // The first level of each SKU is the current level on subscribing, not a
            // change: its `at` says how old it is, not how late it came.
            let mut seen_skus = std::collections::HashSet::new();
            while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(until, body.next()).await {
                let now = OffsetDateTime::now_utc();
                buf.extend_from_slice(&chunk);
                while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                    let block: Vec<u8> = buf.drain(..end + 2).collect();
                    let text = String::from_utf8_lossy(&block);
                    let Some(data) = text.lines().find_map(|l| l.strip_prefix("data:")) else { continue };
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(data.trim()) else { continue };
                    let at = v["at"].as_str().and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok());
                    let lag = at.map(|at| Duration::try_from(now - at).unwrap_or(Duration::ZERO));
                    match (v["type"].as_str(), lag) {
                        (Some("order"), Some(l)) => orders.record(l),
                        (Some("stock"), Some(l)) => {
                            if !seen_skus.insert(v["sku"].as_str().unwrap_or_default().to_owned()) {
                                stock.record(l);
                            }
                        }
                        (Some("error"), _) => closed = v["code"].as_str().map(str::to_owned),
                        _ => {}
                    }
                }
            }
            closed
        }));
    }
    eprintln!("{n} subscribers connected; reading for {secs} s");
    let mut closed = 0;
    for t in tasks {
        if let Ok(Some(code)) = t.await {
            closed += 1;
            eprintln!("a subscriber was closed: {code}");
        }
    }
    println!("subscribers: {n} ({} admins on orders:*, the rest buyers on orders:mine), closed by the notifier: {closed}", admins.min(n));
    orders.report("order events");
    stock.report("stock events");
    Ok(())
}
