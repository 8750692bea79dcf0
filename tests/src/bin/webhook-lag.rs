//! `ops/bench/webhook-lag`: the delivery lag of webhooks during a sell-out, from each
//! event's commit (its `at`) to the mock data platform's receipt, with the platform
//! healthy and with it failing half of the requests (500), side by side in one run.
//!
//!   webhook-lag [UNITS] [BUYERS] [healthy|failing|both]    (defaults 2000 50 both)
//!
//! The retry schedule is `FLOODGATE_WEBHOOK_RETRY_SECS` of the environment (default
//! 1,5,30,120,...): with half the requests failing, one event in 2^k needs k retries, so
//! the failing run's tail is the schedule's; a short schedule (e.g. `0.5,1,2,4,8,16,32`)
//! measures the machinery instead.
//!
//! Each run is a fresh in-process stack (ingress, worker) in a namespace of its own on
//! the local servers, the production code with its default breaker and timeout
//! (loopback allowed). `BUYERS` buyers order one unit each, back to back, until
//! `UNITS` are sold; every `order.confirmed` (and the `stock.sold_out`) must arrive.
//! Prints p50/p90/p99/max of the first successful receipt of each event.

use floodgate_tests::{
    Options, TestApp,
    mock_platform::{MockPlatform, Mode, percentile},
};
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let units: i64 = args.next().map_or(Ok(2_000), |a| a.parse())?;
    let buyers: usize = args.next().map_or(Ok(50), |a| a.parse())?;
    let which = args.next().unwrap_or_else(|| "both".into());
    println!(
        "sell-out of {units} units to {buyers} buyers, each run a fresh namespace; retry schedule {}",
        std::env::var("FLOODGATE_WEBHOOK_RETRY_SECS")
            .unwrap_or_else(|_| "1,5,30,120,600,1800,7200 (default)".into())
    );
    for (name, mode) in [
        ("healthy", Mode::Ok),
        ("failing 50 %", Mode::FailRatio(0.5)),
    ] {
        if which != "both" && !name.starts_with(which.as_str()) {
            continue;
        }
        run(name, mode, units, buyers).await?;
    }
    Ok(())
}

async fn run(name: &str, mode: Mode, units: i64, buyers: usize) -> anyhow::Result<()> {
    let app = TestApp::spawn_with(Options {
        tweak: Box::new(|cfg| cfg.webhooks.allow_private = true),
        ..Options::default()
    })
    .await;
    let platform = MockPlatform::start().await;
    let r = app
        .post(
            "/v1/webhooks",
            Some(&app.admin()),
            &json!({"url": platform.url(), "events": ["order.confirmed", "stock.sold_out"]}),
        )
        .await;
    anyhow::ensure!(r.status == 201, "subscribing: {r:?}");
    platform.set_secret(r.body["secret"].as_str().unwrap_or_default());
    platform.set_mode(mode).await;
    // Past the workers' webhook refresh (2 s): the sender is running when the sale
    // starts, as it would be for a webhook created before the sale.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sku = "lag-tee";
    app.create_sku(sku, units, None).await;
    let started = Instant::now();
    let accepted = app.sell_out(sku, buyers).await;
    let sale = started.elapsed();
    anyhow::ensure!(accepted.len() as i64 == units, "sold {}", accepted.len());
    // Every event, or five minutes: with half the requests failing the tail is the retry
    // schedule's and the breaker's (a run of failures opens it for its cool-down).
    let all = platform
        .wait_until_unique(units as usize + 1, Duration::from_secs(300))
        .await;
    let delivered = started.elapsed();
    let arrived = platform.unique_accepted_ids().len();
    if !all {
        println!(
            "{name:>13}: only {arrived} of {} events arrived within 300 s (dead: {})",
            units + 1,
            app.scalar("SELECT count(*) FROM webhook_deliveries WHERE state = 'dead'")
                .await
        );
    }
    let lags = platform.lags_ms();
    let requests = platform.received().len();
    println!(
        "{name:>13}: sale {:.1} s, all delivered at {:.1} s, {requests} requests for {} events; \
         lag commit->receipt p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
        sale.as_secs_f64(),
        delivered.as_secs_f64(),
        lags.len(),
        percentile(&lags, 50.0),
        percentile(&lags, 90.0),
        percentile(&lags, 99.0),
        lags.last().copied().unwrap_or(0),
    );
    Ok(())
}
