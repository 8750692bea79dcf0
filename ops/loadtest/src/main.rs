//! Flash-sale load: many buyers POST one-unit orders for one hot SKU as fast as they can.
//!
//! Before the attack it creates the SKU (`LOADTEST_STOCK` units, default 10000) through
//! the admin API and mints `LOADTEST_BUYERS` customer tokens (default 5000) with
//! `FLOODGATE_JWT_SECRET`. Every goose user then loops: pick a buyer at random, POST an
//! order. 202 and 409 `sold_out` both count as success (they are the two right answers);
//! anything else is a failure. Goose flags (`--host`, `--users`, `--run-time`, ...)
//! pass through; see `ops/bench/flash-sale`.
//!
//! `LOADTEST_PAYMENT=points`: every buyer is granted 10,000,000 points (admin API, 32 at
//! a time) before the attack, and every order is paid with points.

use floodgate_common::{
    Config, auth,
    domain::{Role, UserId},
};
use goose::prelude::*;
use rand::Rng;
use std::{sync::OnceLock, time::Duration};

static SKU: OnceLock<String> = OnceLock::new();
static TOKENS: OnceLock<Vec<String>> = OnceLock::new();
static POINTS: OnceLock<bool> = OnceLock::new();

fn env_num(name: &str, default: i64) -> i64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn order(user: &mut GooseUser) -> TransactionResult {
    let tokens = TOKENS.get().expect("tokens minted");
    let token = &tokens[rand::rng().random_range(0..tokens.len())];
    let mut body = serde_json::json!({"items": [{"sku": SKU.get().unwrap(), "qty": 1}]});
    if POINTS.get().copied().unwrap_or(false) {
        body["payment"] = "points".into();
    }
    let rb = user
        .get_request_builder(&GooseMethod::Post, "/v1/orders")?
        .bearer_auth(token)
        .json(&body);
    let req = GooseRequest::builder()
        .name("/v1/orders")
        .set_request_builder(rb)
        .expect_status_code(202)
        .build();
    let mut goose = user.request(req).await?;
    if let Ok(r) = &goose.response
        && r.status() == 409
    {
        return user.set_success(&mut goose.request);
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::from_env()?;
    let host = std::env::var("LOADTEST_HOST").unwrap_or_else(|_| "http://127.0.0.1:8080".into());
    let stock = env_num("LOADTEST_STOCK", 10_000);
    let buyers = env_num("LOADTEST_BUYERS", 5_000);
    let secret = cfg.jwt_secret.expose();

    let sku = format!(
        "flash-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
    );
    let admin = auth::mint(secret, &UserId::parse("loadtest-admin")?, Role::Admin, Duration::from_secs(3600));
    let created = reqwest::Client::new()
        .post(format!("{host}/v1/skus"))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"sku": sku, "name": "Load test", "price_cents": 100, "initial_stock": stock}))
        .send()
        .await?;
    anyhow::ensure!(created.status() == 201, "creating the SKU: {}", created.text().await?);
    eprintln!("SKU {sku} with {stock} units; {buyers} buyers");
    println!("LOADTEST_SKU={sku}");
    SKU.set(sku).expect("set once");
    TOKENS
        .set(
            (0..buyers)
                .map(|i| {
                    let u = UserId::parse(format!("buyer-{i}")).expect("valid id");
                    auth::mint(secret, &u, Role::Customer, Duration::from_secs(3600))
                })
                .collect(),
        )
        .expect("set once");
    let points = std::env::var("LOADTEST_PAYMENT").is_ok_and(|p| p == "points");
    POINTS.set(points).expect("set once");
    if points {
        use futures::StreamExt;
        let client = reqwest::Client::new();
        let grants = futures::stream::iter(0..buyers).map(|i| {
            let (client, admin, host) = (client.clone(), admin.clone(), host.clone());
            async move {
                let r = client
                    .post(format!("{host}/v1/users/buyer-{i}/points/grant"))
                    .bearer_auth(&admin)
                    .json(&serde_json::json!({"amount": 10_000_000, "reference": "loadtest"}))
                    .send()
                    .await?;
                anyhow::ensure!(r.status() == 200, "granting points: {}", r.text().await?);
                anyhow::Ok(())
            }
        });
        let results: Vec<anyhow::Result<()>> = grants.buffer_unordered(32).collect().await;
        results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
        eprintln!("{buyers} buyers granted points; orders paid with points");
    }

    let started = std::time::Instant::now();
    let metrics = GooseAttack::initialize()?
        .register_scenario(scenario!("Buyer").register_transaction(transaction!(order)))
        .set_default(GooseDefault::Host, host.as_str())?
        .execute()
        .await?;
    // One machine-readable line for ops/bench/compare: the order route's answers by
    // status, its latency percentiles, and how long the attack ran.
    if let Some(r) = metrics.requests.values().find(|r| r.path == "/v1/orders") {
        let t = &r.raw_data;
        let ms = |p: f32| t.percentile_us(p) as f64 / 1000.0;
        let status: serde_json::Map<String, serde_json::Value> = r
            .status_code_counts
            .iter()
            .map(|(code, n)| (code.to_string(), (*n).into()))
            .collect();
        println!(
            "LOADTEST_RESULT {}",
            serde_json::json!({
                "requests": t.counter,
                "status": status,
                "secs": started.elapsed().as_secs_f64(),
                "p50_ms": ms(0.5),
                "p99_ms": ms(0.99),
            })
        );
    }
    Ok(())
}
