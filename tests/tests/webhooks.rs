//! Webhooks (API.md "v1 additions", Webhooks): committed events exported to a data
//! platform, signed as Standard Webhooks says, delivered at least once through a
//! platform that fails half the time and goes down, with a circuit breaker per
//! endpoint; a hanging endpoint slows no other endpoint, the relay or intake; refused
//! events are dead and replayable; URLs into the private network are refused.
//!
//! The platform is `floodgate_tests::mock_platform`, a real HTTP server that verifies
//! the signatures with its own implementation of the specification.

use floodgate_tests::{
    Options, Resp, TestApp, eventually,
    mock_platform::{MockPlatform, Mode, percentile},
};
use serde_json::{Value, json};
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

const ALL: [&str; 4] = [
    "order.confirmed",
    "order.failed",
    "order.cancelled",
    "stock.sold_out",
];

/// A test app whose webhooks may reach the mock on 127.0.0.1, with a retry schedule
/// and a breaker short enough for a test.
async fn app() -> TestApp {
    TestApp::spawn_with(Options {
        tweak: Box::new(|cfg| {
            cfg.webhooks.allow_private = true;
            cfg.webhooks.retry = vec![Duration::from_millis(200); 3]
                .into_iter()
                .chain(vec![Duration::from_millis(1_000); 27])
                .collect();
            cfg.webhooks.breaker_failures = 5;
            cfg.webhooks.breaker_cooldown = Duration::from_millis(1_000);
            cfg.webhooks.timeout = Duration::from_secs(10);
        }),
        ..Options::default()
    })
    .await
}

/// Subscribes `platform` to `events`; tells it the secret. Returns the webhook's id.
async fn subscribe(app: &TestApp, platform: &MockPlatform, events: &[&str]) -> String {
    let r = app
        .post(
            "/v1/webhooks",
            Some(&app.admin()),
            &json!({"url": platform.url(), "events": events, "description": "test platform"}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let secret = r.body["secret"]
        .as_str()
        .expect("the secret, once")
        .to_owned();
    platform.set_secret(&secret);
    r.body["id"].as_str().unwrap().to_owned()
}

async fn webhook(app: &TestApp, id: &str) -> Resp {
    app.get(&format!("/v1/webhooks/{id}"), Some(&app.admin()))
        .await
}

/// Whether webhook `id`'s delivery counts are (pending, delivered, dead).
async fn counts_are(app: &TestApp, id: &str, (pending, delivered, dead): (i64, i64, i64)) -> bool {
    webhook(app, id).await.body["deliveries"]
        == json!({"pending": pending, "delivered": delivered, "dead": dead})
}

async fn delete_webhook(app: &TestApp, id: &str) -> Resp {
    app.request(
        reqwest::Method::DELETE,
        &format!("/v1/webhooks/{id}"),
        Some(&app.admin()),
        None,
        &[],
    )
    .await
}

/// `n` orders of one unit of `sku` by `token`, each accepted; their ids.
async fn place(app: &TestApp, token: &str, sku: &str, n: usize) -> Vec<String> {
    let mut orders = Vec::new();
    for _ in 0..n {
        let r = app.order(token, &[(sku, 1)], None).await;
        assert_eq!(r.status, 202, "{r:?}");
        orders.push(r.body["order_id"].as_str().unwrap().to_owned());
    }
    orders
}

/// The order ids of the `order.confirmed` events the platform took, each counted once
/// per distinct `webhook-id` (its de-duplication): an order delivered under two ids
/// would count twice.
fn confirmed_orders(platform: &MockPlatform) -> BTreeMap<String, usize> {
    let mut seen = BTreeSet::new();
    let mut orders = BTreeMap::new();
    for r in platform.accepted() {
        if r.event_type == "order.confirmed" && seen.insert(r.webhook_id.clone()) {
            assert_eq!(r.webhook_id, r.event_id, "webhook-id is the event id");
            let order = r.body["data"]["order_id"].as_str().unwrap().to_owned();
            *orders.entry(order).or_default() += 1;
        }
    }
    orders
}

async fn circuit_metric(app: &TestApp, id: &str) -> Option<f64> {
    worker_metric(
        app,
        &format!("floodgate_webhook_circuit_state{{webhook=\"{id}\"}}"),
    )
    .await
}

/// One worker metric's value (`series` as written in the exposition, labels included).
async fn worker_metric(app: &TestApp, series: &str) -> Option<f64> {
    let text = reqwest::get(format!("{}/metrics", app.worker_url.as_ref()?))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{series} ")))
        .and_then(|v| v.trim().parse().ok())
}

fn lag_report(what: &str, platform: &MockPlatform) -> (i64, i64) {
    let lags = platform.lags_ms();
    let (p50, p99) = (percentile(&lags, 50.0), percentile(&lags, 99.0));
    eprintln!(
        "delivery lag, {what}: {} events, p50 {p50} ms, p99 {p99} ms, max {} ms",
        lags.len(),
        lags.last().copied().unwrap_or(0)
    );
    (p50, p99)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhooks_are_admin_only_and_refuse_what_they_must() {
    // The default: private addresses refused.
    let app = TestApp::spawn().await;
    let admin = app.admin();
    let body = json!({"url": "https://1.1.1.1/hook", "events": ["order.confirmed"]});
    for token in [app.customer("c1"), app.manager("m1")] {
        let r = app.post("/v1/webhooks", Some(&token), &body).await;
        assert_eq!((r.status, r.code()), (403, "forbidden"), "{r:?}");
        let r = app.get("/v1/webhooks", Some(&token)).await;
        assert_eq!(r.status, 403, "{r:?}");
    }
    let r = app.post("/v1/webhooks", None, &body).await;
    assert_eq!(r.status, 401);
    // Into the private network, in every spelling: refused, and why.
    for url in [
        "http://127.0.0.1:9/x",
        "http://localhost/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.7/",
        "http://192.168.1.1/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://2130706433/",
        "http://0x7f.0.0.1/",
        "http://100.64.0.1/",
    ] {
        let r = app
            .post(
                "/v1/webhooks",
                Some(&admin),
                &json!({"url": url, "events": ["order.confirmed"]}),
            )
            .await;
        assert_eq!(
            (r.status, r.code()),
            (422, "invalid_request"),
            "{url}: {r:?}"
        );
        assert!(
            r.body["detail"]
                .as_str()
                .unwrap()
                .contains("FLOODGATE_WEBHOOK_ALLOW_PRIVATE"),
            "{url}: {r:?}"
        );
    }
    for (bad, field) in [
        (
            json!({"url": "ftp://1.1.1.1/", "events": ["order.confirmed"]}),
            "url",
        ),
        (
            json!({"url": "not a url", "events": ["order.confirmed"]}),
            "url",
        ),
        (
            json!({"url": "http://u:p@1.1.1.1/", "events": ["order.confirmed"]}),
            "url",
        ),
        (json!({"url": 7, "events": ["order.confirmed"]}), "url"),
        (json!({"events": ["order.confirmed"]}), "url"),
        (json!({"url": "https://1.1.1.1/"}), "events"),
        (json!({"url": "https://1.1.1.1/", "events": []}), "events"),
        (
            json!({"url": "https://1.1.1.1/", "events": ["order.shipped"]}),
            "events",
        ),
        (
            json!({"url": "https://1.1.1.1/", "events": ["order.failed", "order.failed"]}),
            "events",
        ),
        (
            json!({"url": "https://1.1.1.1/", "events": "order.failed"}),
            "events",
        ),
        (
            json!({"url": "https://1.1.1.1/", "events": ["order.failed"], "description": ""}),
            "description",
        ),
    ] {
        let r = app.post("/v1/webhooks", Some(&admin), &bad).await;
        assert_eq!(
            (r.status, r.code()),
            (422, "invalid_request"),
            "{bad}: {r:?}"
        );
        assert!(
            r.body["detail"].as_str().unwrap().starts_with(field),
            "{bad}: {r:?}"
        );
    }
    let r = app.get("/v1/webhooks", Some(&admin)).await;
    assert_eq!(r.body["webhooks"], json!([]), "nothing was created: {r:?}");

    // A public endpoint: created, its secret shown once.
    let r = app.post("/v1/webhooks", Some(&admin), &body).await;
    assert_eq!(r.status, 201, "{r:?}");
    let id = r.body["id"].as_str().unwrap().to_owned();
    assert_eq!(
        r.header("location"),
        Some(format!("/v1/webhooks/{id}").as_str())
    );
    assert!(r.body["secret"].as_str().unwrap().starts_with("whsec_"));
    assert_eq!(r.body["circuit"]["state"], "closed");
    let got = webhook(&app, &id).await;
    assert_eq!(got.status, 200);
    assert!(
        got.body.get("secret").is_none(),
        "the secret is shown once: {got:?}"
    );
    assert_eq!(got.body["events"], json!(["order.confirmed"]));
    assert_eq!(
        got.body["deliveries"],
        json!({"pending": 0, "delivered": 0, "dead": 0})
    );
    let list = app.get("/v1/webhooks", Some(&admin)).await;
    assert_eq!(list.body["webhooks"].as_array().unwrap().len(), 1);
    // Replay needs an instant.
    for bad in [
        json!({}),
        json!({"since": "yesterday"}),
        json!({"since": 5}),
    ] {
        let r = app
            .post(&format!("/v1/webhooks/{id}/replay"), Some(&admin), &bad)
            .await;
        assert_eq!(
            (r.status, r.code()),
            (422, "invalid_request"),
            "{bad}: {r:?}"
        );
    }
    let r = app
        .get(
            &format!("/v1/webhooks/{id}/deliveries?limit=0"),
            Some(&admin),
        )
        .await;
    assert_eq!((r.status, r.code()), (422, "invalid_request"));
    // Unknown ids, and the delete.
    for path in [
        "/v1/webhooks/not-a-uuid".to_owned(),
        format!("/v1/webhooks/{}", uuid::Uuid::now_v7()),
        format!("/v1/webhooks/{}/deliveries", uuid::Uuid::now_v7()),
    ] {
        let r = app.get(&path, Some(&admin)).await;
        assert_eq!((r.status, r.code()), (404, "not_found"), "{path}: {r:?}");
    }
    let del = |id: String| {
        let app = &app;
        let admin = admin.clone();
        async move {
            app.request(
                reqwest::Method::DELETE,
                &format!("/v1/webhooks/{id}"),
                Some(&admin),
                None,
                &[],
            )
            .await
        }
    };
    assert_eq!(del(id.clone()).await.status, 204);
    assert_eq!(del(id.clone()).await.status, 404, "deleted once");
    assert_eq!(webhook(&app, &id).await.status, 404);
    // Both changes are in the audit log.
    let audit = app
        .get(&format!("/v1/audit?target=webhook:{id}"), Some(&admin))
        .await;
    let actions: Vec<&str> = audit.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["webhook.delete", "webhook.create"], "{audit:?}");
    assert!(
        !audit.body.to_string().contains("whsec_"),
        "the audit log never holds the secret"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_confirmed_order_reaches_a_failing_platform_once() {
    let app = app().await;
    let platform = MockPlatform::start().await;
    let id = subscribe(&app, &platform, &ALL).await;
    app.create_sku("hook-tee", 300, None).await;
    platform.set_mode(Mode::FailRatio(0.5)).await;

    // The sale; a second in, the platform goes down for 10 s.
    let sale = app.sell_out("hook-tee", 60);
    let outage = async {
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        platform.down_for(Duration::from_secs(10)).await;
        // While it is down the circuit opens, in the API and in the metrics.
        let mut seen_open = (false, false);
        let back = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < back - Duration::from_secs(1)
            && seen_open != (true, true)
        {
            seen_open.0 |= webhook(&app, &id).await.body["circuit"]["state"] == "open";
            seen_open.1 |= circuit_metric(&app, &id).await == Some(2.0);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Back up, and failing half the time again to the end.
        tokio::time::sleep_until(back + Duration::from_millis(500)).await;
        platform.set_mode(Mode::FailRatio(0.5)).await;
        seen_open
    };
    let (accepted, seen_open) = tokio::join!(sale, outage);
    assert_eq!(accepted.len(), 300);
    assert_eq!(seen_open, (true, true), "the circuit opened (API, metric)");
    app.wait_idle().await;

    // Every confirmed order arrives, under exactly one webhook-id, signed.
    eventually(Duration::from_secs(120), || async {
        confirmed_orders(&platform).len() == 300
    })
    .await;
    let orders = confirmed_orders(&platform);
    assert_eq!(
        orders.keys().cloned().collect::<BTreeSet<_>>(),
        accepted.iter().cloned().collect::<BTreeSet<_>>()
    );
    assert!(orders.values().all(|n| *n == 1), "one event id per order");
    let sample = platform
        .accepted()
        .into_iter()
        .find(|r| r.event_type == "order.confirmed")
        .unwrap();
    assert_eq!(sample.body["data"]["status"], "confirmed");
    assert_eq!(
        sample.body["data"]["items"],
        json!([{"sku": "hook-tee", "qty": 1}])
    );
    assert!(sample.body["data"]["user_id"].is_string());
    assert!(
        platform
            .received()
            .iter()
            .all(|r| r.verified || r.answered == 0)
    );
    // The SKU sold out once.
    eventually(Duration::from_secs(30), || async {
        platform
            .accepted()
            .iter()
            .any(|r| r.event_type == "stock.sold_out")
    })
    .await;
    let sold_out: BTreeSet<String> = platform
        .accepted()
        .iter()
        .filter(|r| r.event_type == "stock.sold_out")
        .map(|r| r.webhook_id.clone())
        .collect();
    assert_eq!(sold_out.len(), 1);
    let event = platform
        .accepted()
        .into_iter()
        .find(|r| r.event_type == "stock.sold_out")
        .unwrap();
    assert_eq!(event.body["data"]["sku"], "hook-tee");
    assert_eq!(event.body["data"]["sold"], 300);

    // The circuit closed again; nothing owed, nothing dead.
    eventually(Duration::from_secs(30), || async {
        let w = webhook(&app, &id).await;
        w.body["circuit"]["state"] == "closed" && w.body["deliveries"]["pending"] == 0
    })
    .await;
    let w = webhook(&app, &id).await;
    assert_eq!(w.body["deliveries"]["dead"], 0, "{w:?}");
    assert_eq!(w.body["deliveries"]["delivered"], 301, "{w:?}");
    eventually(Duration::from_secs(10), || async {
        circuit_metric(&app, &id).await == Some(0.0)
    })
    .await;
    // The log shows the failures and the retries that absorbed them.
    let log = app
        .get(
            &format!("/v1/webhooks/{id}/deliveries?limit=500"),
            Some(&app.admin()),
        )
        .await;
    let entries = log.body["deliveries"].as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["outcome"] == "retry" && e["status_code"] == 500)
    );
    assert!(
        app.scalar(&format!(
            "SELECT count(*) FROM webhook_attempts WHERE webhook_id = '{id}' AND status_code IS NULL AND next_attempt_at IS NOT NULL"
        ))
        .await
            > 0,
        "connection errors retried while it was down"
    );
    assert!(
        entries
            .iter()
            .any(|e| e["outcome"] == "delivered" && e["attempt"].as_i64() > Some(1))
    );
    // Pages follow one another.
    let page = app
        .get(
            &format!("/v1/webhooks/{id}/deliveries?limit=3"),
            Some(&app.admin()),
        )
        .await;
    let cursor = page.body["next_cursor"].as_str().unwrap();
    let next = app
        .get(
            &format!("/v1/webhooks/{id}/deliveries?limit=3&cursor={cursor}"),
            Some(&app.admin()),
        )
        .await;
    assert_eq!(
        page.body["deliveries"].as_array().unwrap()[..],
        entries[..3]
    );
    assert_eq!(
        next.body["deliveries"].as_array().unwrap()[..],
        entries[3..6]
    );
    lag_report("platform failing 50 % (and down 10 s)", &platform);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_endpoint_slows_nothing_else() {
    let app = app().await;
    let (slow, fast) = (MockPlatform::start().await, MockPlatform::start().await);
    let slow_id = subscribe(&app, &slow, &["order.confirmed"]).await;
    subscribe(&app, &fast, &["order.confirmed", "stock.sold_out"]).await;
    slow.set_mode(Mode::Hang(Duration::from_secs(30))).await;
    app.create_sku("hang-tee", 100, None).await;

    let accepted = app.sell_out("hang-tee", 20).await;
    assert_eq!(accepted.len(), 100);
    app.wait_idle().await;
    // The fast platform gets everything, and the relay empties the outbox, while
    // every request to the slow one is still hanging (it answers after 30 s; the
    // sender gives up at 10 s).
    assert!(
        fast.wait_until_unique(101, Duration::from_secs(20)).await,
        "the fast platform got {} events",
        fast.unique_accepted_ids().len()
    );
    assert_eq!(confirmed_orders(&fast).len(), 100);
    assert_eq!(app.scalar("SELECT count(*) FROM outbox").await, 0);
    assert!(
        !slow.received().is_empty(),
        "the slow platform was sent requests"
    );
    assert!(
        slow.accepted().is_empty(),
        "nothing reached the slow platform yet"
    );
    let w = webhook(&app, &slow_id).await;
    assert_eq!(w.body["deliveries"]["pending"], 100, "{w:?}");
    lag_report("healthy platform beside a hanging one", &fast);

    // Intake is not held up either: a new sale goes through while it hangs.
    app.create_sku("hang-cap", 10, None).await;
    assert_eq!(app.sell_out("hang-cap", 5).await.len(), 10);
    app.wait_idle().await;
    assert!(fast.wait_until_unique(112, Duration::from_secs(20)).await);
    assert!(slow.accepted().is_empty());

    // The slow platform recovers: it gets everything, through its retries.
    slow.set_mode(Mode::Ok).await;
    eventually(Duration::from_secs(120), || async {
        confirmed_orders(&slow).len() == 110
    })
    .await;
    eventually(Duration::from_secs(30), || async {
        webhook(&app, &slow_id).await.body["deliveries"]["pending"] == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_event_is_dead_until_replayed() {
    let app = app().await;
    let platform = MockPlatform::start().await;
    let id = subscribe(&app, &platform, &["order.confirmed", "order.cancelled"]).await;
    // 410: not retried; dead at once.
    platform.set_mode(Mode::Status(410)).await;
    app.create_sku("dead-tee", 5, None).await;
    let token = app.customer("dead-buyer");
    let orders = place(&app, &token, "dead-tee", 5).await;
    app.wait_idle().await;
    eventually(Duration::from_secs(30), || async {
        webhook(&app, &id).await.body["deliveries"]["dead"] == 5
    })
    .await;
    let log = app
        .get(&format!("/v1/webhooks/{id}/deliveries"), Some(&app.admin()))
        .await;
    let entries = log.body["deliveries"].as_array().unwrap();
    assert_eq!(entries.len(), 5, "one attempt each: {log:?}");
    for e in entries {
        assert_eq!(e["outcome"], "dead");
        assert_eq!(e["status_code"], 410);
        assert_eq!(e["attempt"], 1);
        assert_eq!(e["type"], "order.confirmed");
        assert!(e.get("next_attempt_at").is_none());
    }
    // 429 is retried (with its Retry-After), not dead.
    platform.set_mode(Mode::Status(429)).await;
    let r = app
        .post(
            &format!("/v1/orders/{}/cancel", orders[0]),
            Some(&token),
            &json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    eventually(Duration::from_secs(30), || async {
        let log = app
            .get(&format!("/v1/webhooks/{id}/deliveries"), Some(&app.admin()))
            .await;
        log.body["deliveries"][0]["status_code"] == 429
            && log.body["deliveries"][0]["outcome"] == "retry"
    })
    .await;
    // Back up, and replayed: every dead event arrives; the pending cancel too.
    platform.set_mode(Mode::Ok).await;
    let r = app
        .post(
            &format!("/v1/webhooks/{id}/replay"),
            Some(&app.admin()),
            &json!({"since": "2020-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(r.body["replayed"], 6, "five confirmations and the cancel");
    eventually(Duration::from_secs(30), || async {
        let w = webhook(&app, &id).await;
        w.body["deliveries"] == json!({"pending": 0, "delivered": 6, "dead": 0})
    })
    .await;
    assert_eq!(confirmed_orders(&platform).len(), 5);
    let cancelled: Vec<Value> = platform
        .accepted()
        .iter()
        .filter(|r| r.event_type == "order.cancelled")
        .map(|r| r.body["data"]["order_id"].clone())
        .collect();
    assert!(cancelled.iter().all(|o| *o == json!(orders[0])) && !cancelled.is_empty());
    let audit = app
        .get(
            &format!("/v1/audit?target=webhook:{id}"),
            Some(&app.admin()),
        )
        .await;
    assert_eq!(
        audit.body["entries"][0]["action"], "webhook.replay",
        "{audit:?}"
    );
    // A delete stops deliveries.
    let r = delete_webhook(&app, &id).await;
    assert_eq!(r.status, 204);
    let before = platform.received().len();
    let r = app.order(&token, &[("dead-tee", 1)], None).await;
    assert_eq!(r.status, 202, "the cancelled unit is back: {r:?}");
    app.wait_idle().await;
    eventually(Duration::from_secs(30), || async {
        app.scalar("SELECT count(*) FROM outbox").await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        platform.received().len(),
        before,
        "nothing after the delete"
    );
    assert_eq!(
        app.scalar("SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'")
            .await,
        0,
        "nothing owed to a deleted webhook"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_past_the_retention_are_pruned_and_what_is_owed_stays() {
    let app = TestApp::spawn_with(Options {
        tweak: Box::new(|cfg| {
            cfg.webhooks.allow_private = true;
            cfg.webhooks.retry = vec![Duration::from_millis(200); 30];
            cfg.webhooks.retention = Some(Duration::from_secs(3600));
            cfg.webhooks.prune_every = Duration::from_millis(200);
        }),
        ..Options::default()
    })
    .await;
    // A takes everything; B refuses (its deliveries die); C fails and is deleted while
    // it is still owed the cancels; D (below) is owed one cancel for a long time.
    let (pa, pb, pc, pd) = tokio::join!(
        MockPlatform::start(),
        MockPlatform::start(),
        MockPlatform::start(),
        MockPlatform::start()
    );
    let a = subscribe(&app, &pa, &["order.confirmed", "order.cancelled"]).await;
    let b = subscribe(&app, &pb, &["order.confirmed"]).await;
    let c = subscribe(&app, &pc, &["order.cancelled"]).await;
    pb.set_mode(Mode::Status(410)).await;
    pc.set_mode(Mode::Status(500)).await;
    app.create_sku("kept-tee", 10, None).await;
    let token = app.customer("kept-buyer");
    let orders = place(&app, &token, "kept-tee", 4).await;
    app.wait_idle().await;
    for o in &orders[..2] {
        let r = app
            .post(&format!("/v1/orders/{o}/cancel"), Some(&token), &json!({}))
            .await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    eventually(Duration::from_secs(30), || async {
        counts_are(&app, &a, (0, 6, 0)).await
            && counts_are(&app, &b, (0, 0, 4)).await
            && !pc.received().is_empty()
    })
    .await;
    let r = delete_webhook(&app, &c).await;
    assert_eq!(r.status, 204, "{r:?}");
    // C's sender records its last 500 (the lease goes with it); nothing claims a deleted
    // webhook's deliveries after that.
    eventually(Duration::from_secs(30), || async {
        app.scalar(&format!(
            "SELECT count(*) FROM webhook_deliveries WHERE webhook_id = '{c}' AND lease IS NOT NULL"
        ))
        .await
            == 0
    })
    .await;
    // D, live, owed the first cancel and not due for a day (as an endpoint whose
    // retries are far apart would be).
    let d = subscribe(&app, &pd, &["order.cancelled"]).await;
    let db = app.pg.get().await.unwrap();
    db.execute(
        "INSERT INTO webhook_deliveries (webhook_id, event_id, next_attempt_at)
         SELECT $1::text::uuid, event_id, now() + interval '1 day' FROM webhook_events
          WHERE type = 'order.cancelled' AND data->>'order_id' = $2",
        &[&d, &orders[0]],
    )
    .await
    .unwrap();
    // Age everything by two hours: past the retention of one.
    db.batch_execute(
        "UPDATE webhook_attempts SET at = at - interval '2 hours';
         UPDATE webhook_deliveries SET updated_at = updated_at - interval '2 hours';
         UPDATE webhook_events SET at = at - interval '2 hours';
         UPDATE webhooks SET deleted_at = deleted_at - interval '2 hours'
          WHERE deleted_at IS NOT NULL;",
    )
    .await
    .unwrap();
    // One fresh order: its event and attempts are young.
    let r = app.order(&token, &[("kept-tee", 1)], None).await;
    assert_eq!(r.status, 202, "{r:?}");
    app.wait_idle().await;
    // The worker's own pass: A's old deliveries go (its fresh one stays), B's dead ones
    // all stay, C's (deleted) go, D's pending one stays; the second cancel's event goes
    // with the last delivery naming it, the first stays for D, the confirmations stay
    // for B; only young attempts are left.
    let cancel_events = |o: &str| {
        format!(
            "SELECT count(*) FROM webhook_events WHERE type = 'order.cancelled' AND data->>'order_id' = '{o}'"
        )
    };
    eventually(Duration::from_secs(30), || async {
        counts_are(&app, &a, (0, 1, 0)).await
            && counts_are(&app, &b, (0, 0, 5)).await
            && app.scalar(&cancel_events(&orders[1])).await == 0
            && app
                .scalar(
                    "SELECT count(*) FROM webhook_attempts WHERE at < now() - interval '1 hour'",
                )
                .await
                == 0
    })
    .await;
    assert_eq!(
        webhook(&app, &d).await.body["deliveries"],
        json!({"pending": 1, "delivered": 0, "dead": 0}),
        "a live webhook's pending delivery stays however old"
    );
    assert_eq!(app.scalar(&cancel_events(&orders[0])).await, 1);
    assert_eq!(
        app.scalar("SELECT count(*) FROM webhook_events").await,
        6,
        "five confirmations (B's dead deliveries) and D's cancel"
    );
    assert_eq!(
        app.scalar(&format!(
            "SELECT count(*) FROM webhook_deliveries WHERE webhook_id = '{c}'"
        ))
        .await,
        0,
        "a deleted webhook's deliveries go"
    );
    assert_eq!(
        app.scalar(&format!(
            "SELECT count(*) FROM webhooks WHERE id = '{c}' AND deleted_at IS NOT NULL"
        ))
        .await,
        1,
        "the webhook's row stays"
    );
    assert_eq!(
        app.scalar("SELECT count(*) FROM webhook_attempts").await,
        2,
        "the fresh order's attempt at A and at B"
    );
    for (table, least) in [("attempts", 10.0), ("deliveries", 7.0), ("events", 1.0)] {
        let n = worker_metric(
            &app,
            &format!("floodgate_webhook_pruned_total{{table=\"{table}\"}}"),
        )
        .await
        .unwrap_or(0.0);
        assert!(n >= least, "{table}: {n} pruned, at least {least} expected");
    }
    // Another pass finds nothing more.
    let again = floodgate_worker::retention::prune(
        &app.pg,
        Duration::from_secs(3600),
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(again, floodgate_worker::retention::Pruned::default());
    // Replays reach what is stored: A gets the five confirmations and the first cancel
    // again, not the pruned second cancel; B, fixed, gets its five dead ones.
    pb.set_mode(Mode::Ok).await;
    for (id, want) in [(&a, 6), (&b, 5)] {
        let r = app
            .post(
                &format!("/v1/webhooks/{id}/replay"),
                Some(&app.admin()),
                &json!({"since": "2020-01-01T00:00:00Z"}),
            )
            .await;
        assert_eq!(
            (r.status, r.body["replayed"].clone()),
            (202, json!(want)),
            "{r:?}"
        );
    }
    eventually(Duration::from_secs(30), || async {
        counts_are(&app, &b, (0, 5, 0)).await && counts_are(&app, &a, (0, 6, 0)).await
    })
    .await;
    assert_eq!(confirmed_orders(&pb).len(), 5);
}
