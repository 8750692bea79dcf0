//! The order path end to end: ingress -> Redis Lua -> RabbitMQ -> worker -> PostgreSQL.

use floodgate_tests::{Options, TestApp, eventually};
use futures::future::join_all;
use serde_json::json;
use std::{collections::HashSet, time::Duration};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flash_sale_sells_exactly_the_stock() {
    let app = TestApp::spawn().await;
    app.create_sku("hot-tee", 100, None).await;
    let tokens: Vec<String> = (0..400)
        .map(|u| app.customer(&format!("buyer-{u}")))
        .collect();

    // 1,000 at once. A 503 (Redis or the broker too slow for the burst: on the cluster
    // suite every server shares two cores with debug builds) promises that nothing was
    // reserved: the buyer sends the order again, as a storefront does.
    let retried = std::sync::atomic::AtomicUsize::new(0);
    let results = join_all((0..1000).map(|i| {
        let (app, retried) = (&app, &retried);
        let token = &tokens[i % 400];
        async move {
            let mut tries = 0;
            loop {
                let r = app.order(token, &[("hot-tee", 1)], None).await;
                if r.status == 503 && tries < 50 {
                    tries += 1;
                    retried.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100 + 20 * i as u64 % 200)).await;
                    continue;
                }
                return r;
            }
        }
    }))
    .await;
    println!(
        "1,000 orders at once: {} answers 503 sent again",
        retried.load(std::sync::atomic::Ordering::Relaxed)
    );

    let accepted: Vec<_> = results.iter().filter(|r| r.status == 202).collect();
    let sold_out = results
        .iter()
        .filter(|r| r.status == 409 && r.code() == "sold_out")
        .count();
    assert_eq!(accepted.len(), 100, "exactly the stock is accepted");
    assert_eq!(sold_out, 900, "everyone else hears sold_out");
    let ids: HashSet<&str> = accepted
        .iter()
        .map(|r| r.body["order_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 100, "every acceptance is its own order");
    for r in &accepted {
        assert_eq!(r.body["status"], "accepted");
        let loc = r.header("location").unwrap();
        assert_eq!(
            loc,
            format!("/v1/orders/{}", r.body["order_id"].as_str().unwrap())
        );
    }

    app.wait_idle().await;
    assert_eq!(
        app.scalar("SELECT count(*) FROM orders WHERE status = 'confirmed'")
            .await,
        100
    );
    assert_eq!(app.scalar("SELECT count(*) FROM orders").await, 100);
    assert_eq!(
        app.scalar("SELECT sold FROM inventory WHERE sku = 'hot-tee'")
            .await,
        100
    );
    assert_eq!(
        app.scalar("SELECT count(*) FROM stock_movements WHERE kind = 'sale'")
            .await,
        100
    );
    assert_eq!(app.available("hot-tee").await, Some(0));
    let s = app.get("/v1/stock/hot-tee", None).await;
    assert_eq!(s.body["available"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_then_confirmed_through_the_status_endpoint() {
    let mut app = TestApp::spawn_with(Options {
        worker: false,
        ..Options::default()
    })
    .await;
    app.create_sku("mug", 10, None).await;
    let alice = app.customer("alice");
    let r = app.order(&alice, &[("mug", 3)], None).await;
    assert_eq!(r.status, 202, "{r:?}");
    let id = r.body["order_id"].as_str().unwrap().to_owned();
    let path = format!("/v1/orders/{id}");

    // No worker yet: the order is queued, reserved, and shows as accepted.
    let s = app.get(&path, Some(&alice)).await;
    assert_eq!(s.status, 200, "{s:?}");
    assert_eq!(s.body["status"], "accepted");
    assert_eq!(s.body["user_id"], "alice");
    assert_eq!(s.body["items"][0]["qty"], 3);
    assert_eq!(app.available("mug").await, Some(7));
    assert_eq!(app.queued().await, 1);

    app.start_worker().await;
    eventually(Duration::from_secs(20), || async {
        app.get(&path, Some(&alice)).await.body["status"] == "confirmed"
    })
    .await;
    let s = app.get(&path, Some(&alice)).await;
    assert_eq!(s.body["accepted_at"], r.body["accepted_at"]);
    assert!(s.body["confirmed_at"].is_string());
    // An admin sees it too; another customer does not.
    assert_eq!(app.get(&path, Some(&app.admin())).await.status, 200);
    assert_eq!(
        app.get(&path, Some(&app.customer("mallory"))).await.status,
        404
    );
    let sku = app.get("/v1/skus/mug", Some(&app.admin())).await;
    assert_eq!(sku.body["sold"], 3);
    assert_eq!(sku.body["on_hand"], 10);
    assert_eq!(sku.body["available"], 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_line_orders_are_all_or_nothing() {
    let app = TestApp::spawn().await;
    app.create_sku("cap", 5, None).await;
    app.create_sku("scarf", 1, None).await;
    let before = app.snapshot().await;
    let bob = app.customer("bob");
    let r = app.order(&bob, &[("cap", 2), ("scarf", 2)], None).await;
    assert_eq!(r.status, 409, "{r:?}");
    assert_eq!(r.code(), "sold_out");
    assert_eq!(r.body["sku"], "scarf");
    assert_eq!(r.body["available"], 1);
    assert_eq!(app.snapshot().await, before, "nothing reserved");

    let r = app.order(&bob, &[("cap", 2), ("scarf", 1)], None).await;
    assert_eq!(r.status, 202, "{r:?}");
    app.wait_idle().await;
    assert_eq!(app.available("cap").await, Some(3));
    assert_eq!(app.available("scarf").await, Some(0));
    assert_eq!(
        app.scalar("SELECT sum(sold)::bigint FROM inventory").await,
        3
    );
    assert_eq!(app.scalar("SELECT count(*) FROM order_items").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_key_gives_one_order_under_concurrency() {
    let app = TestApp::spawn().await;
    app.create_sku("vinyl", 50, None).await;
    let carol = app.customer("carol");
    let results =
        join_all((0..20).map(|_| app.order(&carol, &[("vinyl", 2)], Some("checkout-42")))).await;
    let ids: HashSet<String> = results
        .iter()
        .map(|r| {
            assert!(r.status == 202 || r.status == 200, "{r:?}");
            r.body["order_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "one order for one key");
    assert_eq!(app.available("vinyl").await, Some(48), "one decrement");

    app.wait_idle().await;
    assert_eq!(app.scalar("SELECT count(*) FROM orders").await, 1);
    assert_eq!(app.scalar("SELECT sold FROM inventory").await, 2);

    // A repeat after the commit answers the first order with its current status.
    let again = app
        .order(&carol, &[("vinyl", 2)], Some("checkout-42"))
        .await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.body["status"], "confirmed");
    assert_eq!(
        again.body["order_id"].as_str().unwrap(),
        ids.iter().next().unwrap()
    );

    // Same key, another body: refused, nothing changes.
    let before = app.snapshot().await;
    let reused = app
        .order(&carol, &[("vinyl", 3)], Some("checkout-42"))
        .await;
    assert_eq!(reused.status, 422, "{reused:?}");
    assert_eq!(reused.code(), "idempotency_key_reused");
    assert_eq!(app.snapshot().await, before);

    // The key is per user: another user may use the same string.
    let dave = app.customer("dave");
    let r = app.order(&dave, &[("vinyl", 3)], Some("checkout-42")).await;
    assert_eq!(r.status, 202, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_user_limit_holds_under_concurrency() {
    let app = TestApp::spawn().await;
    app.create_sku("sneaker", 100, Some(2)).await;
    let erin = app.customer("erin");
    let results = join_all((0..10).map(|_| app.order(&erin, &[("sneaker", 1)], None))).await;
    let ok = results.iter().filter(|r| r.status == 202).count();
    let limited: Vec<_> = results
        .iter()
        .filter(|r| r.status == 422 && r.code() == "limit_exceeded")
        .collect();
    assert_eq!(ok, 2);
    assert_eq!(limited.len(), 8);
    assert_eq!(limited[0].body["limit"], 2);
    assert_eq!(limited[0].body["already"], 2);
    assert_eq!(limited[0].body["sku"], "sneaker");
    // A multi-unit line that would pass the limit is refused whole.
    let frank = app.customer("frank");
    let r = app.order(&frank, &[("sneaker", 3)], None).await;
    assert_eq!(r.code(), "limit_exceeded");
    assert_eq!(r.body["already"], 0);
    app.wait_idle().await;
    assert_eq!(app.available("sneaker").await, Some(98));
    assert_eq!(app.scalar("SELECT sold FROM inventory").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redelivered_batches_create_nothing_twice() {
    let mut app = TestApp::spawn_with(Options {
        worker: false,
        ..Options::default()
    })
    .await;
    // Enough stock that a double count would not trip the CHECK: the test must see it.
    app.create_sku("lamp", 100, None).await;
    for u in 0..20 {
        let r = app
            .order(&app.customer(&format!("u{u}")), &[("lamp", 1)], None)
            .await;
        assert_eq!(r.status, 202, "{r:?}");
    }
    // Copy every queued message (get without ack, then requeue).
    let mut payloads = Vec::new();
    for _ in 0..20 {
        let m = app
            .channel
            .basic_get(
                app.topology.partitions
                    [floodgate_common::amqp::partition_of("lamp", app.topology.partitions.len())]
                .queue
                .as_str()
                .into(),
                lapin::options::BasicGetOptions { no_ack: false },
            )
            .await
            .unwrap()
            .expect("a queued message");
        payloads.push(m.delivery.data.clone());
    }
    app.channel
        .basic_recover(lapin::options::BasicRecoverOptions { requeue: true })
        .await
        .unwrap();
    // Every order is now queued twice: the batch meets each one twice.
    for p in &payloads {
        app.publish_raw(p).await;
    }
    eventually(Duration::from_secs(10), || async {
        app.queued().await == 40
    })
    .await;

    app.start_worker().await;
    let check = || async {
        app.wait_idle().await;
        assert_eq!(app.queued().await, 0);
        assert_eq!(app.scalar("SELECT count(*) FROM orders").await, 20);
        assert_eq!(app.scalar("SELECT count(*) FROM order_items").await, 20);
        assert_eq!(
            app.scalar("SELECT count(*) FROM stock_movements WHERE kind = 'sale'")
                .await,
            20
        );
        assert_eq!(app.scalar("SELECT sold FROM inventory").await, 20);
        assert_eq!(app.available("lamp").await, Some(80));
    };
    check().await;

    // Delivered again after the commit (a worker died before its ack): still no-ops.
    for p in &payloads {
        app.publish_raw(p).await;
    }
    eventually(Duration::from_secs(20), || async {
        app.queued().await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_short_of_stock_in_postgres_fails_only_the_orders_that_lack_it() {
    let mut app = TestApp::spawn_with(Options {
        worker: false,
        ..Options::default()
    })
    .await;
    app.create_sku("rare", 10, None).await;
    for u in 0..6 {
        let r = app
            .order(&app.customer(&format!("u{u}")), &[("rare", 1)], None)
            .await;
        assert_eq!(r.status, 202);
    }
    // PostgreSQL holds less than Redis believed (say, a stock count correction landed
    // directly in the database): only 4 of the 6 queued orders can be confirmed.
    app.pg
        .get()
        .await
        .unwrap()
        .execute("UPDATE inventory SET on_hand = 4", &[])
        .await
        .unwrap();
    app.start_worker().await;
    app.wait_idle().await;
    assert_eq!(
        app.scalar("SELECT count(*) FROM orders WHERE status = 'confirmed'")
            .await,
        4
    );
    assert_eq!(
        app.scalar(
            "SELECT count(*) FROM orders WHERE status = 'failed' AND reason = 'insufficient_stock'"
        )
        .await,
        2
    );
    assert_eq!(app.scalar("SELECT sold FROM inventory").await, 4);
    // The failed orders' reservations were released back to Redis.
    assert_eq!(app.available("rare").await, Some(6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returned_publish_releases_the_reservation_and_answers_503() {
    let app = TestApp::spawn().await;
    app.create_sku("poster", 5, None).await;
    let t = &app.topology;
    // The partition "poster" orders go to (the one of N the test's environment gives).
    let p = &t.partitions[floodgate_common::amqp::partition_of("poster", t.partitions.len())];
    // No queue bound: the mandatory publish comes back unroutable.
    app.channel
        .queue_unbind(
            p.queue.as_str().into(),
            t.orders_exchange.as_str().into(),
            p.key.as_str().into(),
            Default::default(),
        )
        .await
        .unwrap();
    let before = app.snapshot().await;
    let gus = app.customer("gus");
    let r = app.order(&gus, &[("poster", 2)], Some("k1")).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.code(), "unavailable");
    assert!(r.header("retry-after").is_some());
    assert_eq!(app.available("poster").await, Some(5), "stock released");
    assert_eq!(app.open_reservations().await, 0);
    assert_eq!(app.snapshot().await.redis_stock, before.redis_stock);

    // Bound again: the same Idempotency-Key places the order (the failed one left no record).
    app.channel
        .queue_bind(
            p.queue.as_str().into(),
            t.orders_exchange.as_str().into(),
            p.key.as_str().into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let r = app.order(&gus, &[("poster", 2)], Some("k1")).await;
    assert_eq!(r.status, 202, "{r:?}");
    app.wait_idle().await;
    assert_eq!(app.scalar("SELECT sold FROM inventory").await, 2);
    assert_eq!(app.available("poster").await, Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let app = TestApp::spawn().await;
    app.create_sku("pin", 5, None).await;
    assert_eq!(
        app.order(&app.customer("hal"), &[("pin", 1)], None)
            .await
            .status,
        202
    );
    assert_eq!(app.get("/healthz", None).await.status, 200);
    let ready = app.get("/readyz", None).await;
    assert_eq!(ready.status, 200, "{ready:?}");
    assert_eq!(ready.body["checks"]["redis"], true);
    assert_eq!(ready.body["checks"]["rabbitmq"], true);
    assert_eq!(ready.body["checks"]["postgres"], true);
    app.wait_idle().await;
    let m = app.get("/metrics", None).await;
    let text = m.body.as_str().expect("text");
    for name in [
        "floodgate_orders_accepted_total",
        "floodgate_reserve_duration_seconds_bucket",
        "floodgate_publish_duration_seconds_bucket",
        "floodgate_http_requests_total",
        "floodgate_worker_batch_orders_bucket",
        "floodgate_worker_commit_duration_seconds_bucket",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_returns_the_stock_once_and_refuses_failed_orders() {
    let mut app = TestApp::spawn_with(Options {
        worker: false,
        ..Options::default()
    })
    .await;
    app.create_sku("cap", 5, Some(2)).await;
    app.create_sku("rare", 3, None).await;
    let alice = app.customer("alice");
    let r = app.order(&alice, &[("cap", 2)], None).await;
    let id = r.body["order_id"].as_str().unwrap().to_owned();
    let doomed = app.order(&app.customer("bob"), &[("rare", 1)], None).await;
    let doomed_id = doomed.body["order_id"].as_str().unwrap().to_owned();
    // PostgreSQL holds none of "rare" (a stock count landed there directly): bob's fails.
    app.pg
        .get()
        .await
        .unwrap()
        .execute("UPDATE inventory SET on_hand = 0 WHERE sku = 'rare'", &[])
        .await
        .unwrap();
    app.start_worker().await;
    app.wait_idle().await;
    assert_eq!(app.available("cap").await, Some(3));
    assert_eq!(
        app.order(&alice, &[("cap", 1)], None).await.code(),
        "limit_exceeded"
    );

    let path = format!("/v1/orders/{id}/cancel");
    assert_eq!(
        app.post(&path, None, &serde_json::json!({})).await.status,
        401
    );
    let other = app
        .post(
            &path,
            Some(&app.customer("mallory")),
            &serde_json::json!({}),
        )
        .await;
    assert_eq!((other.status, other.code()), (404, "not_found"));

    let c = app.post(&path, Some(&alice), &serde_json::json!({})).await;
    assert_eq!(c.status, 200, "{c:?}");
    assert_eq!(c.body["status"], "cancelled");
    assert_eq!(app.available("cap").await, Some(5), "back on sale");
    assert_eq!(
        app.scalar("SELECT sold FROM inventory WHERE sku = 'cap'")
            .await,
        0
    );
    // Idempotent: again, nothing moves twice.
    let again = app
        .post(&path, Some(&app.admin()), &serde_json::json!({}))
        .await;
    assert_eq!(
        (again.status, again.body["status"].as_str()),
        (200, Some("cancelled"))
    );
    assert_eq!(app.available("cap").await, Some(5));
    assert_eq!(
        app.scalar("SELECT count(*) FROM stock_movements WHERE kind = 'cancel'")
            .await,
        1
    );
    let s = app.get(&format!("/v1/orders/{id}"), Some(&alice)).await;
    assert_eq!(s.body["status"], "cancelled");
    // The per-user limit is given back too.
    assert_eq!(app.order(&alice, &[("cap", 2)], None).await.status, 202);
    app.wait_idle().await;

    let before = app.snapshot().await;
    let f = app
        .post(
            &format!("/v1/orders/{doomed_id}/cancel"),
            Some(&app.admin()),
            &serde_json::json!({}),
        )
        .await;
    assert_eq!((f.status, f.code()), (409, "not_cancellable"), "{f:?}");
    assert_eq!(
        app.snapshot().await,
        before,
        "a refused cancel changes nothing"
    );
    app.wait_idle().await;
    let mut r2 = app.redis.clone();
    // Bob's reservation went back when his order failed; Redis and PostgreSQL agree
    // except for the units the direct database edit removed, which reconcile would fix.
    let found = floodgate_common::reconcile::check(&app.pg, &mut r2, &app.shards, 1)
        .await
        .unwrap();
    assert!(
        found.iter().all(|v| v.detail.starts_with("rare")),
        "{found:?}"
    );
}

/// After a sell-out, an ingress refuses key-less orders for the SKU from memory for
/// `FLOODGATE_SOLD_OUT_CACHE_MS` (no Redis call: units that came back in the meantime
/// are not sold yet), keyed orders still ask Redis, and after the bound the returned
/// units sell again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sold_out_is_answered_from_memory_for_a_bounded_time() {
    let bound = Duration::from_secs(10);
    let app = TestApp::spawn_with(Options {
        tweak: Box::new(move |c| c.sold_out_cache = bound),
        ..Options::default()
    })
    .await;
    app.create_sku("last-one", 1, None).await;
    let (alice, bob) = (app.customer("alice"), app.customer("bob"));
    let first = app.order(&alice, &[("last-one", 1)], None).await;
    assert_eq!(first.status, 202, "{first:?}");
    let id = first.body["order_id"].as_str().unwrap().to_owned();
    app.wait_idle().await;

    // Redis says sold out; from now on this ingress remembers it.
    let r = app.order(&bob, &[("last-one", 1)], None).await;
    let remembered = std::time::Instant::now();
    assert_eq!((r.status, r.code()), (409, "sold_out"), "{r:?}");
    assert_eq!(r.body["available"], 0);

    // The unit comes back, but within the bound a key-less order is refused unasked.
    let c = app
        .post(&format!("/v1/orders/{id}/cancel"), Some(&alice), &json!({}))
        .await;
    assert_eq!(c.status, 200, "{c:?}");
    assert_eq!(app.available("last-one").await, Some(1));
    let r = app.order(&bob, &[("last-one", 1)], None).await;
    if remembered.elapsed() < bound {
        assert_eq!((r.status, r.code()), (409, "sold_out"), "{r:?}");
        assert_eq!(app.available("last-one").await, Some(1), "nothing reserved");
    }
    let hits = reqwest::get(format!("{}/metrics", app.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        hits.lines()
            .any(|l| l.starts_with("floodgate_sold_out_cache_hits_total") && !l.ends_with(" 0")),
        "the refusal was counted as answered from memory"
    );

    // An order with an Idempotency-Key always asks Redis, and gets the unit.
    let keyed = app.order(&bob, &[("last-one", 1)], Some("bob-1")).await;
    assert_eq!(keyed.status, 202, "{keyed:?}");
    assert_eq!(app.available("last-one").await, Some(0));
}
