//! Points (API.md "v1 additions", Points): balances, top-ups (a customer's own charge,
//! an admin's audited grant), their history, idempotency per (user, reference) under
//! concurrent repeats; paying for orders with points (the hold in the order's Redis
//! decision, the spend in its commit, the release of a failed order's hold, a cancel's
//! refund), and Redis's copy rebuilt and repaired from PostgreSQL.

use floodgate_tests::{Options, Resp, TestApp};
use futures::future::join_all;
use serde_json::{Value, json};

async fn charge(app: &TestApp, token: &str, amount: Value, reference: &str) -> Resp {
    app.post(
        "/v1/points/charge",
        Some(token),
        &json!({"amount": amount, "reference": reference}),
    )
    .await
}

async fn balance(app: &TestApp, token: &str) -> i64 {
    let (balance, held) = points(app, token).await;
    assert_eq!(held, 0);
    balance
}

/// `GET /v1/points`: (balance, held).
async fn points(app: &TestApp, token: &str) -> (i64, i64) {
    let r = app.get("/v1/points", Some(token)).await;
    assert_eq!(r.status, 200, "{r:?}");
    (
        r.body["balance"].as_i64().unwrap(),
        r.body["held"].as_i64().unwrap(),
    )
}

/// An order of `items` paid with points.
async fn pay(app: &TestApp, token: &str, items: &[(&str, i64)]) -> Resp {
    let items: Vec<Value> = items
        .iter()
        .map(|(s, q)| json!({"sku": s, "qty": q}))
        .collect();
    app.post(
        "/v1/orders",
        Some(token),
        &json!({"items": items, "payment": "points"}),
    )
    .await
}

/// What Redis lets `user` spend, and holds for their orders.
async fn in_redis(app: &TestApp, user: &str) -> (i64, i64) {
    floodgate_common::redis::points_of(&mut app.redis.clone(), app.shards.first(), user)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn charges_and_grants_add_once_per_reference() {
    let app = TestApp::spawn().await;
    let ann = app.customer("ann");
    assert_eq!(balance(&app, &ann).await, 0, "no account yet: 0");
    assert_eq!(app.get("/v1/points", None).await.status, 401);

    let r = charge(&app, &ann, json!(500), "topup-1").await;
    assert_eq!((r.status, &r.body), (200, &json!({"balance": 500})));
    // The same top-up again: nothing added; another amount under it: refused.
    let r = charge(&app, &ann, json!(500), "topup-1").await;
    assert_eq!((r.status, &r.body), (200, &json!({"balance": 500})));
    let r = charge(&app, &ann, json!(700), "topup-1").await;
    assert_eq!((r.status, r.code()), (422, "invalid_request"), "{r:?}");
    assert!(r.body["detail"].as_str().unwrap().starts_with("reference"));

    // Concurrent repeats of one reference add it once; distinct ones each once.
    let same = (0..40).map(|_| charge(&app, &ann, json!(25), "burst"));
    let answers = join_all(same).await;
    assert!(answers.iter().all(|r| r.status == 200), "{answers:?}");
    assert_eq!(balance(&app, &ann).await, 525);
    let distinct = (0..40).map(|i| {
        let ann = ann.clone();
        let app = &app;
        async move { charge(app, &ann, json!(10), &format!("d-{i}")).await }
    });
    assert!(join_all(distinct).await.iter().all(|r| r.status == 200));
    assert_eq!(balance(&app, &ann).await, 925);

    // Bad input changes nothing.
    for (amount, reference) in [
        (json!(0), "r"),
        (json!(-5), "r"),
        (json!(10_000_001), "r"),
        (json!(1.5), "r"),
        (json!("10"), "r"),
        (json!(10), ""),
        (json!(10), "caf\u{e9}"),
    ] {
        let r = charge(&app, &ann, amount.clone(), reference).await;
        assert_eq!(
            (r.status, r.code()),
            (422, "invalid_request"),
            "{amount} {reference:?}: {r:?}"
        );
    }
    let r = app
        .post("/v1/points/charge", Some(&ann), &json!({"amount": 5}))
        .await;
    assert_eq!((r.status, r.code()), (422, "invalid_request"));
    assert_eq!(balance(&app, &ann).await, 925);

    // Grants: admins only, audited, for any user; a charge's reference is taken.
    let grant = |user: &str, amount: i64, reference: &str, token: &str| {
        let (path, body, token) = (
            format!("/v1/users/{user}/points/grant"),
            json!({"amount": amount, "reference": reference}),
            token.to_owned(),
        );
        let app = &app;
        async move { app.post(&path, Some(&token), &body).await }
    };
    for token in [app.customer("ann"), app.manager("mo")] {
        let r = grant("ann", 100, "gift-1", &token).await;
        assert_eq!((r.status, r.code()), (403, "forbidden"), "{r:?}");
    }
    let r = grant("ann", 100, "gift-1", &app.admin()).await;
    assert_eq!((r.status, &r.body), (200, &json!({"balance": 1025})));
    let r = grant("ann", 100, "gift-1", &app.admin()).await;
    assert_eq!(
        (r.status, &r.body),
        (200, &json!({"balance": 1025})),
        "once"
    );
    let r = grant("ann", 100, "topup-1", &app.admin()).await;
    assert_eq!(
        (r.status, r.code()),
        (422, "invalid_request"),
        "a charge's reference"
    );
    let r = grant("bob", 30, "welcome", &app.admin()).await;
    assert_eq!((r.status, &r.body), (200, &json!({"balance": 30})));
    let r = grant(&"x".repeat(65), 30, "welcome", &app.admin()).await;
    assert_eq!((r.status, r.code()), (422, "invalid_request"));
    let audit = app
        .get("/v1/audit?target=user:ann", Some(&app.admin()))
        .await;
    let entries = audit.body["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "one grant recorded: {audit:?}");
    assert_eq!(entries[0]["action"], "points.grant");
    assert_eq!(entries[0]["before"], json!({"balance": 925}));
    assert_eq!(entries[0]["after"]["balance"], 1025);

    // The history: every entry once, newest first, in pages.
    let page = app.get("/v1/points/history?limit=2", Some(&ann)).await;
    assert_eq!(page.status, 200);
    let first = &page.body["entries"][0];
    assert_eq!(
        (
            first["kind"].as_str(),
            first["amount"].as_i64(),
            first["reference"].as_str()
        ),
        (Some("grant"), Some(100), Some("gift-1"))
    );
    assert!(first.get("order_id").is_none());
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            None => "/v1/points/history?limit=7".to_owned(),
            Some(c) => format!("/v1/points/history?limit=7&cursor={c}"),
        };
        let r = app.get(&path, Some(&ann)).await;
        all.extend(r.body["entries"].as_array().unwrap().iter().cloned());
        match r.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    // topup-1, burst, d-0..d-39, gift-1
    assert_eq!(all.len(), 43);
    let sum: i64 = all.iter().map(|e| e["amount"].as_i64().unwrap()).sum();
    assert_eq!(sum, 1025);
    let r = app.get("/v1/points/history?cursor=abc", Some(&ann)).await;
    assert_eq!((r.status, r.code()), (422, "invalid_request"));
    // PostgreSQL agrees: the account is the sum of its entries.
    assert_eq!(
        app.scalar("SELECT balance FROM point_accounts WHERE user_id = 'ann'")
            .await,
        app.scalar("SELECT sum(amount)::bigint FROM point_entries WHERE user_id = 'ann'")
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_orders_against_a_balance_for_thirty_seven() {
    let app = TestApp::spawn().await;
    app.create_sku("pts-tee", 500, None).await; // 1999 cents
    let ann = app.customer("ann");
    let r = charge(&app, &ann, json!(37 * 1999), "t1").await;
    assert_eq!(r.status, 200, "{r:?}");

    // Redis's spendable points and PostgreSQL's balance, sampled all through the burst.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, mut redis, keys, pg) = (
            stop.clone(),
            app.redis.clone(),
            app.shards.first().clone(),
            app.pg.clone(),
        );
        tokio::spawn(async move {
            let (mut lowest, mut samples) = (i64::MAX, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (spendable, _) = floodgate_common::redis::points_of(&mut redis, &keys, "ann")
                    .await
                    .unwrap();
                let db = pg.get().await.unwrap();
                let balance: i64 = db
                    .query_one(
                        "SELECT balance FROM point_accounts WHERE user_id = 'ann'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                lowest = lowest.min(spendable).min(balance);
                samples += 1;
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            (lowest, samples)
        })
    };
    let answers = join_all((0..200).map(|_| pay(&app, &ann, &[("pts-tee", 1)]))).await;
    let accepted: Vec<String> = answers
        .iter()
        .filter(|r| r.status == 202)
        .map(|r| r.body["order_id"].as_str().unwrap().to_owned())
        .collect();
    let refused: Vec<&Resp> = answers.iter().filter(|r| r.status == 409).collect();
    assert_eq!(accepted.len(), 37, "exactly the orders the balance covers");
    assert_eq!(refused.len(), 163, "{answers:?}");
    for r in &refused {
        assert_eq!(r.code(), "insufficient_points", "{r:?}");
        assert_eq!(r.body["needed"], 1999);
        assert!(r.body["balance"].as_i64().unwrap() < 1999, "{r:?}");
    }
    let first = answers.iter().find(|r| r.status == 202).unwrap();
    assert_eq!(
        (&first.body["payment"], &first.body["total_cents"]),
        (&json!("points"), &json!(1999))
    );
    app.wait_idle().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (lowest, samples) = sampler.await.unwrap();
    assert!(samples > 0);
    assert!(
        lowest >= 0,
        "never negative, in Redis or PostgreSQL: {lowest}"
    );

    let outcomes = app.assert_invariants(&accepted).await;
    assert_eq!(outcomes.get("confirmed"), Some(&37), "{outcomes:?}");
    assert_eq!(points(&app, &ann).await, (0, 0), "balance exactly 0");
    assert_eq!(in_redis(&app, "ann").await, (0, 0));
    assert_eq!(app.available("pts-tee").await, Some(500 - 37));
    assert_eq!(
        app.scalar("SELECT count(*) FROM point_entries WHERE user_id = 'ann' AND kind = 'spend'")
            .await,
        37
    );
    let o = app
        .get(&format!("/v1/orders/{}", accepted[0]), Some(&ann))
        .await;
    assert_eq!(
        (
            &o.body["status"],
            &o.body["payment"],
            &o.body["total_cents"]
        ),
        (&json!("confirmed"), &json!("points"), &json!(1999)),
        "{o:?}"
    );
    eprintln!(
        "POINTS | 200 concurrent orders vs a balance for 37 | accepted 37 | refused 163 insufficient_points | confirmed 37 | balance 0 | lowest sampled {lowest} over {samples} samples"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn holds_spends_refunds_and_releases() {
    let mut app = TestApp::spawn().await;
    app.create_sku("pts-a", 100, None).await; // 1999 cents
    let ann = app.customer("ann");
    assert_eq!(charge(&app, &ann, json!(10_000), "t1").await.status, 200);

    // Bad payments and combinations: refused, nothing held.
    for body in [
        json!({"items": [{"sku": "pts-a", "qty": 1}], "payment": "card"}),
        json!({"items": [{"sku": "pts-a", "qty": 1}], "payment": "points", "waitlist": true}),
    ] {
        let r = app.post("/v1/orders", Some(&ann), &body).await;
        assert_eq!((r.status, r.code()), (422, "invalid_order"), "{r:?}");
        assert!(r.body["detail"].as_str().unwrap().starts_with("payment"));
    }
    let r = app
        .post(
            "/v1/orders",
            Some(&ann),
            &json!({"items": [{"sku": "pts-a", "qty": 1}], "payment": 5}),
        )
        .await;
    assert_eq!((r.status, r.code()), (400, "malformed"), "{r:?}");
    let r = pay(&app, &ann, &[("no-such", 1)]).await;
    assert_eq!((r.status, r.code()), (422, "unknown_sku"), "{r:?}");
    let r = pay(&app, &ann, &[("pts-a", 6)]).await;
    assert_eq!(
        (r.status, r.code(), &r.body["balance"], &r.body["needed"]),
        (409, "insufficient_points", &json!(10_000), &json!(6 * 1999)),
        "{r:?}"
    );
    assert_eq!(points(&app, &ann).await, (10_000, 0));
    assert_eq!(app.available("pts-a").await, Some(100), "nothing reserved");

    // Held while accepted, spent when committed.
    app.stop_worker().await;
    let r = pay(&app, &ann, &[("pts-a", 2)]).await;
    assert_eq!(r.status, 202, "{r:?}");
    let id = r.body["order_id"].as_str().unwrap().to_owned();
    assert_eq!(points(&app, &ann).await, (10_000, 3998), "held, not spent");
    let o = app.get(&format!("/v1/orders/{id}"), Some(&ann)).await;
    assert_eq!(
        (&o.body["status"], &o.body["total_cents"]),
        (&json!("accepted"), &json!(3998))
    );
    // The same Idempotency-Key with and without points are two bodies.
    let keyed = |payment: Value| {
        let app = &app;
        let ann = ann.clone();
        async move {
            app.request(
                reqwest::Method::POST,
                "/v1/orders",
                Some(&ann),
                Some(&json!({"items": [{"sku": "pts-a", "qty": 1}], "payment": payment})),
                &[("Idempotency-Key", "k-1")],
            )
            .await
        }
    };
    assert_eq!(keyed(json!("points")).await.status, 202);
    assert_eq!(keyed(json!("points")).await.status, 202, "a repeat");
    let r = keyed(Value::Null).await;
    assert_eq!(
        (r.status, r.code()),
        (422, "idempotency_key_reused"),
        "{r:?}"
    );
    assert_eq!(points(&app, &ann).await, (10_000, 3998 + 1999), "held once");
    app.start_worker().await;
    app.wait_idle().await;
    assert_eq!(points(&app, &ann).await, (10_000 - 3 * 1999, 0));

    // A cancel refunds, once.
    for _ in 0..2 {
        let r = app
            .post(&format!("/v1/orders/{id}/cancel"), Some(&ann), &json!({}))
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body["status"], "cancelled");
    }
    assert_eq!(points(&app, &ann).await, (10_000 - 1999, 0));
    assert_eq!(in_redis(&app, "ann").await, (10_000 - 1999, 0));
    let h = app.get("/v1/points/history", Some(&ann)).await;
    let refund = &h.body["entries"][0];
    assert_eq!(
        (&refund["kind"], &refund["amount"], &refund["order_id"]),
        (&json!("refund"), &json!(3998), &json!(id))
    );

    // PostgreSQL is the final arbiter: a balance it lowered behind Redis's back (a lost
    // Redis write, say) refuses the spend of what it cannot pay. Two orders in one batch,
    // the balance covering one: the batch is refused, committed order by order, and the
    // one that cannot be paid fails with its hold released.
    app.stop_worker().await;
    let (a, b) = (
        pay(&app, &ann, &[("pts-a", 1)]).await,
        pay(&app, &ann, &[("pts-a", 1)]).await,
    );
    assert_eq!(
        (a.status, b.status),
        (202, 202),
        "Redis believes in 8001: {a:?} {b:?}"
    );
    app.pg
        .get()
        .await
        .unwrap()
        .execute(
            "UPDATE point_accounts SET balance = 2499 WHERE user_id = 'ann'",
            &[],
        )
        .await
        .unwrap();
    app.start_worker().await;
    app.wait_idle().await;
    let mut outcomes = Vec::new();
    for r in [&a, &b] {
        let id = r.body["order_id"].as_str().unwrap();
        let o = app.get(&format!("/v1/orders/{id}"), Some(&ann)).await;
        outcomes.push(format!("{}:{}", o.body["status"], o.body["reason"]));
    }
    outcomes.sort();
    assert_eq!(
        outcomes,
        ["\"confirmed\":null", "\"failed\":\"insufficient_points\""],
        "one paid, one refused"
    );
    assert_eq!(
        app.scalar("SELECT balance FROM point_accounts WHERE user_id = 'ann'")
            .await,
        500
    );
    assert_eq!(
        in_redis(&app, "ann").await,
        (10_000 - 1999 - 1999, 0),
        "the refused order's hold went back; the paid one's is spent"
    );
    let mut redis = app.redis.clone();
    let v = floodgate_common::reconcile::check(&app.pg, &mut redis, &app.shards, 2)
        .await
        .unwrap();
    assert!(
        v.iter().any(|v| v.kind == "points_differ"),
        "the check sees the drift: {v:?}"
    );
    assert_eq!(
        app.available("pts-a").await,
        Some(100 - 1 - 1),
        "its unit went back"
    );
    // A reload takes PostgreSQL's word.
    floodgate_common::stock::load(&app.pg, &mut redis, &app.shards)
        .await
        .unwrap();
    assert_eq!(in_redis(&app, "ann").await, (500, 0));
    app.assert_invariants(&[]).await;

    // A total of 0 (a free SKU) holds, spends and refunds nothing, and still shows.
    let r = app
        .post(
            "/v1/skus",
            Some(&app.admin()),
            &json!({"sku": "free", "name": "Free", "price_cents": 0, "initial_stock": 5}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let r = pay(&app, &ann, &[("free", 2)]).await;
    assert_eq!(
        (r.status, &r.body["total_cents"]),
        (202, &json!(0)),
        "{r:?}"
    );
    let id = r.body["order_id"].as_str().unwrap().to_owned();
    app.wait_idle().await;
    let r = app
        .post(&format!("/v1/orders/{id}/cancel"), Some(&ann), &json!({}))
        .await;
    assert_eq!(
        (r.status, &r.body["payment"], &r.body["total_cents"]),
        (200, &json!("points"), &json!(0)),
        "{r:?}"
    );
    assert_eq!(in_redis(&app, "ann").await, (500, 0));
    assert_eq!(
        app.scalar(&format!(
            "SELECT count(*) FROM point_entries WHERE order_id = '{id}'"
        ))
        .await,
        0
    );
    app.assert_invariants(&[id]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_that_refunded_nothing_is_refunded_by_the_settle_pass() {
    // The worker's own consistency pass would settle too: only this test's runs.
    let app = TestApp::spawn_with(Options {
        tweak: Box::new(|c| c.consistency_check = None),
        ..Options::default()
    })
    .await;
    app.create_sku("pts-c", 10, None).await;
    let ann = app.customer("ann");
    assert_eq!(charge(&app, &ann, json!(5_000), "t1").await.status, 200);
    let r = pay(&app, &ann, &[("pts-c", 2)]).await;
    assert_eq!(r.status, 202, "{r:?}");
    let id = r.body["order_id"].as_str().unwrap().to_owned();
    app.wait_idle().await;
    // A cancel by a version before points (a rolling deploy): the status and the units
    // as it did them, no refund.
    let db = app.pg.get().await.unwrap();
    db.batch_execute(&format!(
        "UPDATE orders SET status = 'cancelled' WHERE id = '{id}';
         UPDATE inventory SET sold = sold - 2 WHERE sku = 'pts-c';
         INSERT INTO stock_movements (sku, kind, qty, reference) VALUES ('pts-c', 'cancel', 2, '{id}');"
    ))
    .await
    .unwrap();
    let mut redis = app.redis.clone();
    let settled = floodgate_common::reconcile::settle(&app.pg, &mut redis, &app.shards)
        .await
        .unwrap();
    assert_eq!(settled.refunded, 1, "{settled:?}");
    assert_eq!(
        points(&app, &ann).await,
        (5_000, 0),
        "refunded in PostgreSQL"
    );
    assert_eq!(in_redis(&app, "ann").await, (5_000, 0), "and in Redis");
    let settled = floodgate_common::reconcile::settle(&app.pg, &mut redis, &app.shards)
        .await
        .unwrap();
    assert_eq!(settled.refunded, 0, "once");
    // The new cancel finds the refund and adds nothing.
    let r = app
        .post(&format!("/v1/orders/{id}/cancel"), Some(&ann), &json!({}))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(points(&app, &ann).await, (5_000, 0));
    assert_eq!(in_redis(&app, "ann").await, (5_000, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_rebuilt_from_postgres_and_a_lost_credit_reapplied() {
    // The worker's own consistency pass would settle too: only this test's runs.
    let mut app = TestApp::spawn_with(Options {
        tweak: Box::new(|c| c.consistency_check = None),
        ..Options::default()
    })
    .await;
    app.create_sku("pts-b", 100, None).await;
    let (ann, bob) = (app.customer("ann"), app.customer("bob"));
    assert_eq!(charge(&app, &ann, json!(5_000), "t1").await.status, 200);
    assert_eq!(charge(&app, &bob, json!(3_000), "t1").await.status, 200);
    assert_eq!(pay(&app, &ann, &[("pts-b", 2)]).await.status, 202);
    app.wait_idle().await;
    assert_eq!(in_redis(&app, "ann").await, (5_000 - 3998, 0));

    // Redis lost: a load rebuilds what each may spend from PostgreSQL.
    for (_, keys) in app.shards.iter() {
        floodgate_tests::delete_redis_namespace(&app.cfg.redis_url, keys);
    }
    assert_eq!(in_redis(&app, "ann").await, (0, 0));
    let mut redis = app.redis.clone();
    floodgate_common::stock::load(&app.pg, &mut redis, &app.shards)
        .await
        .unwrap();
    assert_eq!(in_redis(&app, "ann").await, (5_000 - 3998, 0));
    assert_eq!(in_redis(&app, "bob").await, (3_000, 0));
    // A repeated top-up after the load adds nothing (its token came with the load).
    assert_eq!(charge(&app, &bob, json!(3_000), "t1").await.status, 200);
    assert_eq!(in_redis(&app, "bob").await, (3_000, 0));
    app.assert_invariants(&[]).await;

    // A committed credit whose Redis half was lost: the settle pass applies it, once.
    assert_eq!(charge(&app, &bob, json!(700), "t2").await.status, 200);
    let entry = app
        .scalar("SELECT id FROM point_entries WHERE user_id = 'bob' AND reference = 't2'")
        .await;
    let keys = app.shards.first().clone();
    let _: () = redis::pipe()
        .srem(keys.applied(), floodgate_common::redis::points_token(entry))
        .hincr(keys.points(), "bob", -700)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(in_redis(&app, "bob").await, (3_000, 0));
    let v = floodgate_common::reconcile::check(&app.pg, &mut redis, &app.shards, 2)
        .await
        .unwrap();
    assert!(
        v.iter()
            .any(|v| v.kind == "points_differ" && v.detail.contains("bob")),
        "{v:?}"
    );
    let settled = floodgate_common::reconcile::settle(&app.pg, &mut redis, &app.shards)
        .await
        .unwrap();
    assert!(settled.reapplied >= 1, "{settled:?}");
    assert_eq!(in_redis(&app, "bob").await, (3_700, 0));
    floodgate_common::reconcile::settle(&app.pg, &mut redis, &app.shards)
        .await
        .unwrap();
    assert_eq!(in_redis(&app, "bob").await, (3_700, 0), "once");
    app.assert_invariants(&[]).await;

    // A reload with a hold open rebuilds the holds from the open reservations: one that
    // drifted (an older script gave units back without it) is repaired.
    app.stop_worker().await;
    let r = pay(&app, &bob, &[("pts-b", 1)]).await;
    assert_eq!(r.status, 202, "{r:?}");
    let _: () = redis::cmd("HSET")
        .arg(keys.points_held())
        .arg("bob")
        .arg(12_345)
        .query_async(&mut redis)
        .await
        .unwrap();
    floodgate_common::stock::load(&app.pg, &mut redis, &app.shards)
        .await
        .unwrap();
    assert_eq!(in_redis(&app, "bob").await, (3_700 - 1999, 1999));
    app.start_worker().await;
    app.wait_idle().await;
    assert_eq!(in_redis(&app, "bob").await, (3_700 - 1999, 0));
    assert_eq!(points(&app, &bob).await, (3_700 - 1999, 0));
    // (The stock check differs here: a load with an order in flight counts its unit as
    // available again, which is why `floodgate reconcile` waits for the queues to drain.
    // The points are right whatever is in flight.)
    let v = floodgate_common::reconcile::check(&app.pg, &mut redis, &app.shards, 2)
        .await
        .unwrap();
    assert!(!v.iter().any(|v| v.kind.starts_with("points")), "{v:?}");
}
