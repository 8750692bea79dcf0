//! Far more load than the stack can serve: every request is answered quickly with a
//! status of the contract (202, 409, 429 or 503), nothing else, memory stays bounded,
//! and the invariants hold. And the per-IP bound on the public routes.

use floodgate_tests::{Options, TestApp};
use std::time::Duration;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_times_the_load_is_shed_fast_and_changes_no_invariant() {
    // A small in-flight bound, so that this machine's share of the load is far past it.
    let app = TestApp::spawn_with(Options {
        tweak: Box::new(|c| c.max_in_flight = 16),
        ..Options::default()
    })
    .await;
    // Stock for the whole run: the load is orders that reserve, not cheap sold-out 409s.
    app.create_sku("crowd", 1_000_000, None).await;
    // Warm-up, so the baseline RSS includes connections and buffers at steady state.
    let warm = app
        .load("crowd", 64, Duration::ZERO, Duration::from_secs(2))
        .await;
    let before = rss_kib();
    // 320 buyers with no pause between orders: 20x the bound, and far more than two
    // cores commit (each answer is waited for up to 10 s; none may take longer).
    let load = app
        .load("crowd", 320, Duration::ZERO, Duration::from_secs(30))
        .await;
    let after = rss_kib();
    let statuses: Vec<u16> = load.statuses.keys().copied().collect();
    eprintln!("OVERLOAD | {load:?} | rss {before} -> {after} KiB");
    assert!(
        statuses.iter().all(|s| [202, 409, 429, 503].contains(s)),
        "only contract answers, every one within 10 s: {load:?}"
    );
    assert!(
        load.statuses.get(&503).copied().unwrap_or(0) > 0,
        "the bound shed: {load:?}"
    );
    assert!(
        !load.accepted.is_empty(),
        "orders still went through: {load:?}"
    );
    assert_eq!(load.statuses.get(&409), None, "the stock lasted: {load:?}");
    assert!(
        after < before + 256 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    let mut accepted = warm.accepted;
    accepted.extend(load.accepted);
    app.wait_idle().await;
    app.assert_invariants(&accepted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_routes_are_bounded_per_address() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        notifier: true,
        tweak: Box::new(|c| {
            c.ip_rate_limit_per_sec = 5;
            c.ip_rate_limit_burst = 10;
        }),
    })
    .await;
    app.create_sku("tee", 5, None).await;
    let notifier = app.notifier.clone().unwrap();
    for (what, url) in [
        ("stock", format!("{}/v1/stock/tee", app.base)),
        ("stream", format!("{notifier}/v1/stream?topics=stock:tee")),
    ] {
        let mut limited = None;
        for i in 0..40 {
            let r = app
                .client
                .get(&url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .unwrap();
            if r.status() == 429 {
                limited = Some((i, r));
                break;
            }
            // Streams stay open otherwise: drop it.
            drop(r);
        }
        let (i, r) = limited.unwrap_or_else(|| panic!("{what}: never limited"));
        assert!(i >= 10, "{what}: limited after {i}, before the burst of 10");
        assert!(r.headers().contains_key("retry-after"));
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["code"], "rate_limited", "{what}");
    }
    // Orders carry a token and are not bounded per address.
    let alice = app.customer("alice");
    for _ in 0..3 {
        assert_eq!(app.order(&alice, &[("tee", 1)], None).await.status, 202);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_sending_slowly_take_no_in_flight_slot() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::spawn_with(Options {
        worker: false,
        tweak: Box::new(|c| c.max_in_flight = 2),
        ..Options::default()
    })
    .await;
    app.create_sku("tee", 5, None).await;
    let token = app.customer("slow");
    let addr = app.base.trim_start_matches("http://").to_owned();
    // Four clients that send a little of their body and then stall.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /v1/orders HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"items\":"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The slots are free: a stock read and an order go through.
    let r = app
        .client
        .get(format!("{}/v1/stock/tee", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        app.order(&app.customer("quick"), &[("tee", 1)], None)
            .await
            .status,
        202
    );
    drop(stalled);
}
