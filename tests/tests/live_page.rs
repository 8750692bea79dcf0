//! The live page in a real browser: headless Chromium (Debian's `chromium`) driven by
//! playwright-core (`tests/browser/live-page.mjs`) against a real notifier and ingress.
//! `ops/stack test` installs both; the screenshot is kept as a test artifact in
//! `target/artifacts/live-page.png`.

use floodgate_tests::{Options, TestApp};
use serde_json::Value;
use std::{path::PathBuf, process::Command};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_shows_stock_draining_and_orders_confirming_in_chromium() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = root.join("tests/browser/live-page.mjs");
    assert!(
        root.join("tests/browser/node_modules/playwright-core")
            .exists(),
        "playwright-core is not installed: run `ops/stack test` (or `npm ci --prefix tests/browser`)"
    );
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "Chromium is not installed: run `ops/stack test` (or `apt-get install chromium`)"
    );
    let app = TestApp::spawn_with(Options {
        notifier: true,
        ..Options::default()
    })
    .await;
    app.create_sku("tee-red-m", 50, None).await;
    app.create_sku("cap-navy", 12, None).await;
    let screenshot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../artifacts/live-page.png");
    let page = format!("{}/", app.notifier.as_ref().unwrap());
    let token = app.admin();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .current_dir(root)
            .env("PAGE_URL", page)
            .env("TOKEN", token)
            .env("SKU", "tee-red-m")
            .env("ORDERS", "5")
            .env("SCREENSHOT", &screenshot)
            .output()
            .expect("run node")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let result: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no result line; stdout: {stdout}\nstderr: {stderr}"));
    assert!(
        out.status.success() && result["ok"] == true,
        "{result}\nstderr: {stderr}"
    );
    assert_eq!(
        (result["before"].as_i64(), result["after"].as_i64()),
        (Some(50), Some(45)),
        "{result}"
    );
    assert!(
        result["seen"].as_array().is_some_and(|s| s.len() >= 2),
        "the number changed on screen: {result}"
    );
    // The orders placed through the page are real: confirmed in PostgreSQL.
    let ids: Vec<String> = result["order_ids"]
        .as_array()
        .expect("order ids")
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 5);
    let outcomes = app.assert_invariants(&ids).await;
    assert_eq!(outcomes.get("confirmed"), Some(&5), "{outcomes:?}");
    println!(
        "live page screenshot: {}",
        std::fs::canonicalize(
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../artifacts/live-page.png")
        )
        .unwrap()
        .display()
    );
}

/// The back office on the live page, in Chromium: a manager creates a SKU whose sale
/// opens seconds later, its card counts down and flips to the live level at the opening
/// (by the server's clock), and goods received and written off through the page's forms
/// reach PostgreSQL, Redis and the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_runs_a_drop_from_the_live_page_in_chromium() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = root.join("tests/browser/back-office.mjs");
    assert!(
        root.join("tests/browser/node_modules/playwright-core")
            .exists(),
        "playwright-core is not installed: run `ops/stack test` (or `npm ci --prefix tests/browser`)"
    );
    let app = TestApp::spawn_with(Options {
        notifier: true,
        ..Options::default()
    })
    .await;
    // Something on sale already, so the stream has levels from the start.
    app.create_sku("cap-navy", 12, None).await;
    // A sold-out SKU with two orders on its waitlist.
    app.create_sku("wl-1", 1, None).await;
    assert_eq!(
        app.order(&app.customer("ann"), &[("wl-1", 1)], None)
            .await
            .status,
        202
    );
    let mut waiting = Vec::new();
    for user in ["bob", "cat"] {
        let w = app
            .post(
                "/v1/orders",
                Some(&app.customer(user)),
                &serde_json::json!({"items": [{"sku": "wl-1", "qty": 1}], "waitlist": true}),
            )
            .await;
        assert_eq!(w.body["status"], "waitlisted", "{w:?}");
        waiting.push(w.body["order_id"].as_str().unwrap().to_owned());
    }
    let screenshot =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../artifacts/back-office.png");
    let page = format!("{}/", app.notifier.as_ref().unwrap());
    let token = app.manager("mia");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .current_dir(root)
            .env("PAGE_URL", page)
            .env("TOKEN", token)
            .env("SKU", "drop-1")
            .env("STOCK", "20")
            .env("OPENS_IN_SECS", "6")
            .env("WAITLIST_SKU", "wl-1")
            .env("WAITLISTED", "2")
            .env("SCREENSHOT", &screenshot)
            .output()
            .expect("run node")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let result: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no result line; stdout: {stdout}\nstderr: {stderr}"));
    assert!(
        out.status.success() && result["ok"] == true,
        "{result}\nstderr: {stderr}"
    );
    // The flip follows the opening within a page tick or two (the page's 250 ms timer),
    // by this machine's clock give or take the page's estimate of the server's (orders
    // themselves are decided by Redis's clock: tests/tests/catalog.rs).
    let flipped = result["flipped_after_ms"].as_i64().unwrap();
    assert!((-300..3_000).contains(&flipped), "{result}");
    let sku = app.get("/v1/skus/drop-1", Some(&app.admin())).await;
    assert_eq!(
        (sku.body["on_hand"].as_i64(), sku.body["available"].as_i64()),
        (Some(22), Some(22)),
        "{sku:?}"
    );
    assert!(sku.body["sale_starts_at"].as_str().is_some(), "{sku:?}");
    // The page's receipt promoted the head of the waitlist (bob), and it was committed.
    assert_eq!(result["promoted"], waiting[0].as_str(), "{result}");
    let bob = waiting[0].clone();
    floodgate_tests::eventually(std::time::Duration::from_secs(20), || async {
        app.get(&format!("/v1/orders/{bob}"), Some(&app.admin()))
            .await
            .body["status"]
            == "confirmed"
    })
    .await;
    let cat = app
        .get(&format!("/v1/orders/{}", waiting[1]), Some(&app.admin()))
        .await;
    assert_eq!(
        (cat.body["status"].as_str(), cat.body["position"].as_i64()),
        (Some("waitlisted"), Some(1)),
        "{cat:?}"
    );
    let audit = app.get("/v1/audit?actor=mia", Some(&app.admin())).await;
    let actions: Vec<&str> = audit.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "stock.receive",
            "stock.adjust",
            "stock.receive",
            "sku.create"
        ]
    );
    assert_eq!(audit.body["entries"][0]["target"], "sku:wl-1");
    app.assert_invariants(&[]).await;
}
