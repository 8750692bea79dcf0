//! The waitlist (API.md "v1 additions", Waitlist): an order sent with `"waitlist": true`
//! that is short of stock waits (202 `waitlisted`, with its position) instead of 409;
//! units that come back (a cancel, a receipt, an expired or failed reservation) promote
//! the oldest waitlisted orders first in the same Redis decision, and a promoted order
//! flows through the normal pipeline to `confirmed`. A newer order never takes units an
//! older waitlisted one waits for. Cancel, expiry, positions, the per-user limit, a
//! reload, and the fairness of it all under concurrency.

use floodgate_common::domain::UserId;
use floodgate_tests::{Options, Resp, TestApp, eventually};
use futures::{StreamExt, stream};
use serde_json::json;
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

async fn wait_order(app: &TestApp, token: &str, sku: &str, qty: i64) -> Resp {
    app.post(
        "/v1/orders",
        Some(token),
        &json!({"items": [{"sku": sku, "qty": qty}], "waitlist": true}),
    )
    .await
}

async fn cancel(app: &TestApp, id: &str, token: &str) -> Resp {
    app.post(&format!("/v1/orders/{id}/cancel"), Some(token), &json!({}))
        .await
}

async fn status(app: &TestApp, id: &str) -> Resp {
    app.get(&format!("/v1/orders/{id}"), Some(&app.admin()))
        .await
}

async fn pg_status(app: &TestApp, id: &str) -> Option<String> {
    let db = app.pg.get().await.unwrap();
    db.query_opt(
        "SELECT status || coalesce(':' || reason, '') FROM orders WHERE id = $1::text::uuid",
        &[&id],
    )
    .await
    .unwrap()
    .map(|r| r.get(0))
}

async fn holding(app: &TestApp, user: &str, sku: &str) -> i64 {
    let mut r = app.redis.clone();
    let held: Option<i64> = redis::cmd("HGET")
        .arg(app.keys_of(sku).user(&UserId::parse(user).unwrap()))
        .arg(sku)
        .query_async(&mut r)
        .await
        .unwrap();
    held.unwrap_or(0)
}

async fn waiting(app: &TestApp, sku: &str) -> i64 {
    let mut r = app.redis.clone();
    let w: Option<i64> = redis::cmd("HGET")
        .arg(app.keys_of(sku).waiting())
        .arg(sku)
        .query_async(&mut r)
        .await
        .unwrap();
    w.unwrap_or(0)
}

async fn check_clean(app: &TestApp) {
    let mut redis = app.redis.clone();
    let violations = floodgate_common::reconcile::check(&app.pg, &mut redis, &app.shards, 6)
        .await
        .unwrap();
    assert!(violations.is_empty(), "{violations:#?}");
}

async fn until_status(app: &TestApp, id: &str, want: &str) {
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = pg_status(app, id).await;
        if got.as_deref() == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{id}: {got:?} in PostgreSQL after 30 s, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The whole life: waitlisted with positions, the per-user limit counting waitlisted
/// units, a newer plain order refused while the waitlist waits, a waitlisted order
/// cancelled, a receipt promoting the head to `confirmed`, and a cancel promoting the
/// next; every status visible in `GET /v1/orders/{id}` and PostgreSQL; a reload keeps
/// the waitlist; `reconcile --check` clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waitlisted_orders_are_promoted_first_come_first_served() {
    let app = TestApp::spawn().await;
    app.create_sku("hat", 2, Some(3)).await;
    let ann = app.customer("ann");
    let first = app.order(&ann, &[("hat", 2)], None).await;
    assert_eq!(first.status, 202, "{first:?}");
    let first = first.body["order_id"].as_str().unwrap().to_owned();

    // Short of stock: waitlisted, in order, nothing reserved.
    let bob = wait_order(&app, &app.customer("bob"), "hat", 1).await;
    assert_eq!(bob.status, 202, "{bob:?}");
    assert_eq!(bob.body["status"], "waitlisted");
    assert_eq!(bob.body["position"], 1);
    let bob_id = bob.body["order_id"].as_str().unwrap().to_owned();
    let cat = wait_order(&app, &app.customer("cat"), "hat", 2).await;
    assert_eq!((cat.status, cat.body["position"].as_i64()), (202, Some(2)));
    let cat_id = cat.body["order_id"].as_str().unwrap().to_owned();
    let dan = wait_order(&app, &app.customer("dan"), "hat", 1).await;
    assert_eq!(dan.body["position"], 3);
    let dan_id = dan.body["order_id"].as_str().unwrap().to_owned();
    assert_eq!(app.available("hat").await, Some(0));
    assert_eq!(holding(&app, "bob", "hat").await, 1, "the limit counts it");
    assert_eq!(waiting(&app, "hat").await, 4);

    // The per-user limit counts waitlisted units: bob holds 1 of 3.
    let more = wait_order(&app, &app.customer("bob"), "hat", 3).await;
    assert_eq!(
        (more.status, more.code()),
        (422, "limit_exceeded"),
        "{more:?}"
    );

    let v = status(&app, &bob_id).await;
    assert_eq!(v.status, 200, "{v:?}");
    assert_eq!(
        (v.body["status"].as_str(), v.body["position"].as_i64()),
        (Some("waitlisted"), Some(1))
    );
    let sku = app.get("/v1/skus/hat", Some(&app.admin())).await;
    assert_eq!(sku.body["waitlisted"], 4, "{sku:?}");
    // Only the owner (or an admin) sees it.
    let other = app
        .get(&format!("/v1/orders/{bob_id}"), Some(&app.customer("eve")))
        .await;
    assert_eq!(other.status, 404);

    // A receipt of 1 while the head waits for 1: the head gets it, in the same decision.
    // First a cancel of cat (position 2): dan moves up.
    let c = cancel(&app, &cat_id, &app.customer("cat")).await;
    assert_eq!(
        (c.status, c.body["status"].as_str()),
        (200, Some("cancelled")),
        "{c:?}"
    );
    let again = cancel(&app, &cat_id, &app.customer("cat")).await;
    assert_eq!(again.status, 200, "a cancel is idempotent: {again:?}");
    assert_eq!(status(&app, &dan_id).await.body["position"], 2);
    assert_eq!(holding(&app, "cat", "hat").await, 0);
    until_status(&app, &cat_id, "cancelled").await;
    // Once more after PostgreSQL recorded it: it never held a unit, so it returns none.
    let third = cancel(&app, &cat_id, &app.customer("cat")).await;
    assert_eq!(third.body["status"], "cancelled", "{third:?}");
    assert_eq!(app.available("hat").await, Some(0));
    assert_eq!(holding(&app, "cat", "hat").await, 0);
    assert_eq!(waiting(&app, "hat").await, 2);

    // A new plain order finds nothing: the units that come back are the waitlist's.
    let r = app
        .post(
            "/v1/skus/hat/receive",
            Some(&app.admin()),
            &json!({"qty": 1, "reference": "po-1"}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    until_status(&app, &bob_id, "confirmed").await;
    assert_eq!(app.available("hat").await, Some(0));
    let v = status(&app, &bob_id).await;
    assert_eq!(v.body["status"], "confirmed");
    assert!(v.body.get("position").is_none());
    let late = app.order(&app.customer("fay"), &[("hat", 1)], None).await;
    assert_eq!((late.status, late.code()), (409, "sold_out"));

    // Bob, who bought one, waits for one more, behind dan.
    let bob2 = wait_order(&app, &app.customer("bob"), "hat", 1).await;
    assert_eq!(bob2.body["position"], 2, "{bob2:?}");
    let bob2 = bob2.body["order_id"].as_str().unwrap().to_owned();
    assert_eq!(holding(&app, "bob", "hat").await, 2);

    // A reload of a live Redis keeps the waitlist and its holdings: dan's (no order in
    // PostgreSQL: kept as Redis had it) and bob's (1 confirmed in PostgreSQL + 1 waiting).
    app.wait_idle().await;
    let mut redis = app.redis.clone();
    floodgate_common::stock::load(&app.pg, &mut redis, &app.shards)
        .await
        .unwrap();
    assert_eq!(waiting(&app, "hat").await, 2);
    assert_eq!(holding(&app, "dan", "hat").await, 1);
    assert_eq!(holding(&app, "bob", "hat").await, 2);
    assert_eq!(status(&app, &dan_id).await.body["position"], 1);
    check_clean(&app).await;

    // Ann's cancel gives back 2: dan and then bob are promoted.
    let c = cancel(&app, &first, &ann).await;
    assert_eq!(c.status, 200, "{c:?}");
    until_status(&app, &dan_id, "confirmed").await;
    until_status(&app, &bob2, "confirmed").await;
    app.wait_idle().await;
    assert_eq!(app.available("hat").await, Some(0));
    assert_eq!(waiting(&app, "hat").await, 0);
    let sold: i64 = app
        .scalar("SELECT sold FROM inventory WHERE sku = 'hat'")
        .await;
    assert_eq!(sold, 3, "bob twice and dan");
    check_clean(&app).await;
}

/// A waitlisted order not promoted within `FLOODGATE_WAITLIST_TTL_SECS` fails as
/// `waitlist_expired`: off the list, its holding back, recorded in PostgreSQL; a repeat
/// of its Idempotency-Key answers with it; and a waitlist order that cannot wait (two
/// lines) is 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waitlisted_order_expires_unpromoted() {
    let app = TestApp::spawn_with(Options {
        tweak: Box::new(|c| c.waitlist_ttl = Duration::from_secs(1)),
        ..Options::default()
    })
    .await;
    app.create_sku("cap", 1, None).await;
    app.create_sku("pin", 5, None).await;
    let ann = app.customer("ann");
    assert_eq!(app.order(&ann, &[("cap", 1)], None).await.status, 202);
    let bob = app.customer("bob");
    let key = [("Idempotency-Key", "bob-cap-1")];
    let body = json!({"items": [{"sku": "cap", "qty": 1}], "waitlist": true});
    let w = app
        .request(
            reqwest::Method::POST,
            "/v1/orders",
            Some(&bob),
            Some(&body),
            &key,
        )
        .await;
    if w.status == 422 {
        // With several shards the key's record may live in another shard than the
        // SKU: such an order cannot wait (documented).
        assert!(app.shards.count() > 1, "{w:?}");
        assert_eq!(w.code(), "invalid_order");
        return;
    }
    assert_eq!(w.body["status"], "waitlisted", "{w:?}");
    let id = w.body["order_id"].as_str().unwrap().to_owned();
    let repeat = app
        .request(
            reqwest::Method::POST,
            "/v1/orders",
            Some(&bob),
            Some(&body),
            &key,
        )
        .await;
    assert_eq!(
        (repeat.status, repeat.body["order_id"].as_str()),
        (202, Some(id.as_str())),
        "a repeat answers with the waitlisted order: {repeat:?}"
    );
    until_status(&app, &id, "failed:waitlist_expired").await;
    let v = status(&app, &id).await;
    assert_eq!(
        (v.body["status"].as_str(), v.body["reason"].as_str()),
        (Some("failed"), Some("waitlist_expired"))
    );
    assert_eq!(holding(&app, "bob", "cap").await, 0);
    assert_eq!(waiting(&app, "cap").await, 0);
    let c = cancel(&app, &id, &bob).await;
    assert_eq!((c.status, c.code()), (409, "not_cancellable"), "{c:?}");
    let ledger = app
        .scalar(&format!(
            "SELECT count(*) FROM stock_movements WHERE reference = '{id}'"
        ))
        .await;
    assert_eq!(ledger, 0, "a waitlisted order never held a unit");

    let two = app
        .post(
            "/v1/orders",
            Some(&bob),
            &json!({"items": [{"sku": "cap", "qty": 1}, {"sku": "pin", "qty": 1}],
                    "waitlist": true}),
        )
        .await;
    assert_eq!((two.status, two.code()), (422, "invalid_order"), "{two:?}");
    // With stock, a waitlist order is an ordinary one.
    let plain = wait_order(&app, &bob, "pin", 1).await;
    assert_eq!(plain.body["status"], "accepted", "{plain:?}");
    app.wait_idle().await;
    check_clean(&app).await;
}

/// Issue #12's fairness test: 200 units, 2,000 buyers at once, half of them willing to
/// wait; then 300 cancels and a receipt of 100, interleaved with new orders (plain and
/// waitlisted). The promoted orders are exactly the oldest waitlisted ones (by their
/// 202's position), no plain order gets a unit while the waitlist waits, nothing is
/// oversold, every promoted order is confirmed, and Redis and PostgreSQL agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waitlist_is_fair_under_concurrency() {
    let app = TestApp::spawn().await;
    app.create_sku("drop", 200, None).await;
    let buyers: Vec<(usize, String)> = (0..2000)
        .map(|i| (i, app.customer(&format!("b{i}"))))
        .collect();
    let started = std::time::Instant::now();
    let answers: Vec<(usize, Resp)> = stream::iter(buyers.iter().cloned())
        .map(|(i, t)| {
            let app = &app;
            async move {
                let r = if i % 2 == 0 {
                    wait_order(app, &t, "drop", 1).await
                } else {
                    app.order(&t, &[("drop", 1)], None).await
                };
                (i, r)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let burst = started.elapsed();
    let mut accepted = Vec::new();
    let mut waitlisted: BTreeMap<i64, String> = BTreeMap::new();
    let mut refused = 0;
    for (i, r) in &answers {
        match (r.status, r.body["status"].as_str()) {
            (202, Some("accepted")) => {
                accepted.push(r.body["order_id"].as_str().unwrap().to_owned())
            }
            (202, Some("waitlisted")) => {
                assert_eq!(i % 2, 0, "only a buyer who asked waits");
                let p = r.body["position"].as_i64().unwrap();
                let prev = waitlisted.insert(p, r.body["order_id"].as_str().unwrap().to_owned());
                assert!(prev.is_none(), "position {p} given twice");
            }
            (409, _) if r.code() == "sold_out" => {
                assert_eq!(i % 2, 1, "a buyer who may wait is never refused");
                refused += 1;
            }
            _ => panic!("unexpected answer {r:?}"),
        }
    }
    assert_eq!(accepted.len(), 200, "the stock sold exactly");
    let w = waitlisted.len() as i64;
    assert_eq!(
        waitlisted.keys().copied().collect::<Vec<_>>(),
        (1..=w).collect::<Vec<_>>(),
        "positions are 1..{w}, each once"
    );
    app.wait_idle().await;
    eprintln!(
        "fairness: 2,000 buyers in {burst:?}: {} accepted, {w} waitlisted, {refused} refused",
        accepted.len()
    );

    // 300 cancels of confirmed orders (the first buyers, then promoted ones as they are
    // confirmed), a receipt of 100 halfway, and new orders beside them.
    let mut cancelled: BTreeSet<String> = BTreeSet::new();
    let mut received = false;
    let late: Vec<(usize, String)> = (0..200)
        .map(|i| (i, app.customer(&format!("late{i}"))))
        .collect();
    let app_ref = &app;
    let late_orders = {
        let app = app_ref;
        stream::iter(late.iter().cloned())
            .map(move |(i, t)| async move {
                tokio::time::sleep(Duration::from_millis(10 * i as u64)).await;
                let r = if i % 2 == 0 {
                    wait_order(app, &t, "drop", 1).await
                } else {
                    app.order(&t, &[("drop", 1)], None).await
                };
                (i, r)
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
    };
    let cancels = async {
        let until = tokio::time::Instant::now() + Duration::from_secs(120);
        while cancelled.len() < 300 {
            assert!(
                tokio::time::Instant::now() < until,
                "300 cancels took over 120 s"
            );
            let db = app.pg.get().await.unwrap();
            let confirmed: Vec<String> = db
                .query(
                    "SELECT id::text FROM orders WHERE status = 'confirmed' ORDER BY confirmed_at LIMIT 40",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .filter(|id: &String| !cancelled.contains(id))
                .take(300 - cancelled.len())
                .collect();
            drop(db);
            let done: Vec<String> = stream::iter(confirmed)
                .map(|id| {
                    let app = &app;
                    async move {
                        let r = cancel(app, &id, &app.admin()).await;
                        assert_eq!(r.status, 200, "cancel {id}: {r:?}");
                        id
                    }
                })
                .buffer_unordered(16)
                .collect()
                .await;
            cancelled.extend(done);
            if cancelled.len() >= 150 && !received {
                let r = app
                    .post(
                        "/v1/skus/drop/receive",
                        Some(&app.admin()),
                        &json!({"qty": 100, "reference": "restock"}),
                    )
                    .await;
                assert_eq!(r.status, 200, "{r:?}");
                received = true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (late_answers, ()) = tokio::join!(late_orders, cancels);
    let mut late_waitlisted = 0;
    for (i, r) in &late_answers {
        if i % 2 == 1 {
            assert_eq!(
                (r.status, r.code()),
                (409, "sold_out"),
                "a plain order never takes a unit the waitlist waits for: {r:?}"
            );
        } else {
            assert_eq!(r.body["status"], "waitlisted", "{r:?}");
            late_waitlisted += 1;
        }
    }

    // 300 + 100 units came back: the 400 oldest waitlisted orders, and no other.
    let promoted: BTreeSet<String> = waitlisted.values().take(400).cloned().collect();
    eventually(Duration::from_secs(60), || async {
        let db = app.pg.get().await.unwrap();
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM orders WHERE status IN ('confirmed', 'cancelled')
                    AND id::text = ANY($1)",
                &[&promoted.iter().cloned().collect::<Vec<_>>()],
            )
            .await
            .unwrap()
            .get(0);
        n == 400
    })
    .await;
    app.wait_idle().await;
    let db = app.pg.get().await.unwrap();
    let in_pg: BTreeSet<String> = db
        .query("SELECT id::text FROM orders", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let not_promoted: Vec<&String> = waitlisted
        .values()
        .skip(400)
        .filter(|id| in_pg.contains(*id))
        .collect();
    assert!(
        not_promoted.is_empty(),
        "promoted out of turn: {not_promoted:?}"
    );
    let (on_hand, sold): (i64, i64) = {
        let r = db
            .query_one(
                "SELECT on_hand, sold FROM inventory WHERE sku = 'drop'",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((on_hand, sold), (300, 300), "sold out again, never over");
    let sales: i64 = app
        .scalar("SELECT count(*) FROM stock_movements WHERE kind = 'sale' AND sku = 'drop'")
        .await;
    assert_eq!(
        sales, 600,
        "each unit sold once per order: 200 + 400 promoted"
    );
    assert_eq!(app.available("drop").await, Some(0));
    assert_eq!(waiting(&app, "drop").await, w - 400 + late_waitlisted);
    check_clean(&app).await;
    eprintln!(
        "fairness: {} cancels, +100 received, {late_waitlisted} late waitlisted, 400 promoted in order, in {:?}",
        cancelled.len(),
        started.elapsed()
    );
}

/// Every status change of a waitlisted order reaches `orders:mine` (and `order:<id>`):
/// `waitlisted`, then `accepted` at its promotion, then `confirmed`; a subscriber
/// arriving while it waits learns `waitlisted` at once; an admin's cancel of a
/// waitlisted order is audited and pushed as `cancelled`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waitlisted_order_s_status_changes_are_pushed() {
    use floodgate_tests::streams::Sse;
    async fn next(sse: &mut Sse) -> (String, String) {
        let ev = sse
            .next(Duration::from_secs(15))
            .await
            .expect("an event within 15 s");
        (
            ev.data["order_id"].as_str().unwrap_or_default().to_owned(),
            ev.data["status"].as_str().unwrap_or_default().to_owned(),
        )
    }
    let app = TestApp::spawn_with(Options {
        notifier: true,
        ..Options::default()
    })
    .await;
    let notifier = app.notifier.clone().unwrap();
    let url = |topics: &str, token: &str| {
        format!("{notifier}/v1/stream?topics={topics}&access_token={token}")
    };
    app.create_sku("tote", 1, None).await;
    let ann = app.customer("ann");
    let first = app.order(&ann, &[("tote", 1)], None).await;
    let first = first.body["order_id"].as_str().unwrap().to_owned();
    app.wait_idle().await;

    let bob = app.customer("bob");
    let mut mine = Sse::connect(&app.client, &url("orders:mine", &bob))
        .await
        .expect("orders:mine");
    let w = wait_order(&app, &bob, "tote", 1).await;
    assert_eq!(w.body["status"], "waitlisted", "{w:?}");
    let id = w.body["order_id"].as_str().unwrap().to_owned();
    assert_eq!(next(&mut mine).await, (id.clone(), "waitlisted".into()));
    let mut one = Sse::connect(&app.client, &url(&format!("order:{id}"), &bob))
        .await
        .expect("order:<id>");
    assert_eq!(next(&mut one).await, (id.clone(), "waitlisted".into()));

    // Another waits behind bob and is cancelled by an admin: audited, pushed.
    let cat = wait_order(&app, &app.customer("cat"), "tote", 1).await;
    let cat_id = cat.body["order_id"].as_str().unwrap().to_owned();
    let c = cancel(&app, &cat_id, &app.admin()).await;
    assert_eq!(c.body["status"], "cancelled", "{c:?}");
    // Written with the order's PostgreSQL record, by the reaper.
    until_status(&app, &cat_id, "cancelled").await;
    let audit = app
        .get(
            &format!("/v1/audit?target=order:{cat_id}"),
            Some(&app.admin()),
        )
        .await;
    let e = &audit.body["entries"][0];
    assert_eq!(
        (
            e["action"].as_str(),
            e["before"]["status"].as_str(),
            e["after"]["status"].as_str()
        ),
        (Some("order.cancel"), Some("waitlisted"), Some("cancelled")),
        "{audit:?}"
    );

    // Ann's cancel returns the unit: bob's order is promoted and committed.
    let r = cancel(&app, &first, &ann).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(next(&mut mine).await, (id.clone(), "accepted".into()));
    assert_eq!(next(&mut mine).await, (id.clone(), "confirmed".into()));
    assert_eq!(next(&mut one).await, (id.clone(), "accepted".into()));
    assert_eq!(next(&mut one).await, (id.clone(), "confirmed".into()));
    until_status(&app, &cat_id, "cancelled").await;
    app.wait_idle().await;
    check_clean(&app).await;
}

/// `reconcile --check` sees a waitlist out of step: `wlw` not what the list holds
/// (`waitlist_differs`), and units on sale that the head fits in (`waitlist_stalled`,
/// units that came back by a path that does not promote); the workers' promoter heals
/// the second within its sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_sees_a_waitlist_out_of_step_and_the_promoter_heals_a_stalled_one() {
    let mut app = TestApp::spawn().await;
    app.create_sku("mug", 1, None).await;
    assert_eq!(
        app.order(&app.customer("ann"), &[("mug", 1)], None)
            .await
            .status,
        202
    );
    let w = wait_order(&app, &app.customer("bob"), "mug", 1).await;
    let id = w.body["order_id"].as_str().unwrap().to_owned();
    app.wait_idle().await;
    check_clean(&app).await;
    let keys = app.keys_of("mug").clone();
    let mut r = app.redis.clone();
    let kinds = |vs: Vec<floodgate_common::reconcile::Violation>| {
        vs.iter().map(|v| v.kind.to_string()).collect::<Vec<_>>()
    };

    let _: () = redis::cmd("HINCRBY")
        .arg(keys.waiting())
        .arg("mug")
        .arg(2)
        .query_async(&mut r)
        .await
        .unwrap();
    let found = floodgate_common::reconcile::check(&app.pg, &mut r, &app.shards, 2)
        .await
        .unwrap();
    assert_eq!(kinds(found), ["waitlist_differs"]);
    // A reload rebuilds it from the list.
    floodgate_common::stock::load(&app.pg, &mut r, &app.shards)
        .await
        .unwrap();
    assert_eq!(waiting(&app, "mug").await, 1);
    check_clean(&app).await;

    // A unit appears on sale without a promotion (no worker runs meanwhile).
    app.stop_worker().await;
    let _: () = redis::cmd("HINCRBY")
        .arg(keys.stock())
        .arg("mug")
        .arg(1)
        .query_async(&mut r)
        .await
        .unwrap();
    let found = floodgate_common::reconcile::check(&app.pg, &mut r, &app.shards, 2)
        .await
        .unwrap();
    assert!(kinds(found).contains(&"waitlist_stalled".to_owned()));
    // What reserve.lua decides by is still fair: a plain order does not take it.
    let plain = app.order(&app.customer("cat"), &[("mug", 1)], None).await;
    assert_eq!((plain.status, plain.code()), (409, "sold_out"));
    app.start_worker().await;
    // The promoter's sweep promotes it; the unit added by hand is not in PostgreSQL, so
    // its commit is refused there (never oversold) and the order fails.
    until_status(&app, &id, "failed:insufficient_stock").await;
    assert_eq!(waiting(&app, "mug").await, 0);
}

/// A re-sent reserve of a waitlisted order (a cluster client re-sends a script whose
/// reply was lost) answers `waitlisted` again, never `ok` (which would publish it), and
/// changes nothing; a message for an order still waiting is never committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_sent_waitlist_decision_answers_the_same_and_a_stray_message_is_ignored() {
    use floodgate_common::{
        domain::{OrderId, OrderLine, OrderLines, Quantity, Sku},
        redis::{self as fredis, Claim, Reserve, ReserveRequest},
    };
    let app = TestApp::spawn().await;
    app.create_sku("pen", 1, None).await;
    assert_eq!(
        app.order(&app.customer("ann"), &[("pen", 1)], None)
            .await
            .status,
        202
    );
    let user = UserId::parse("bob").unwrap();
    let lines = OrderLines::try_from(vec![OrderLine {
        sku: Sku::parse("pen").unwrap(),
        qty: Quantity::try_from(1).unwrap(),
    }])
    .unwrap();
    let now = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    let req = ReserveRequest {
        order_id: OrderId::new(),
        user: &user,
        lines: &lines,
        held: None,
        first: None,
        buckets: &fredis::one_bucket,
        idempotency: None,
        accepted_at: "2026-12-05T00:00:00Z",
        deadline_ms: now + 30_000,
        waitlist_until_ms: Some(now + 3_600_000),
        idempotency_ttl_secs: 60,
        points: None,
    };
    let keys = app.keys_of("pen").clone();
    let mut r = app.redis.clone();
    let first = fredis::reserve(&mut r, &keys, &req).await.unwrap();
    assert_eq!(first, Reserve::Waitlisted { position: 1 });
    let again = fredis::reserve(&mut r, &keys, &req).await.unwrap();
    assert_eq!(again, first, "the re-sent call answers the same");
    assert_eq!(waiting(&app, "pen").await, 1, "and counts it once");
    assert_eq!(holding(&app, "bob", "pen").await, 1);
    let claimed = fredis::claim(&mut r, &keys, &[req.order_id]).await.unwrap();
    assert_eq!(claimed, [Claim::Unpublished]);
    let v = status(&app, &req.order_id.to_string()).await;
    assert_eq!(v.body["status"], "waitlisted", "{v:?}");
    // Cancelled since: a late re-send still answers `waitlisted` (no place in the list),
    // and a stray message for it is not committed.
    let c = cancel(&app, &req.order_id.to_string(), &app.customer("bob")).await;
    assert_eq!(c.body["status"], "cancelled", "{c:?}");
    let late = fredis::reserve(&mut r, &keys, &req).await.unwrap();
    assert_eq!(late, Reserve::Waitlisted { position: 0 });
    let claimed = fredis::claim(&mut r, &keys, &[req.order_id]).await.unwrap();
    assert_eq!(claimed, [Claim::Unpublished]);
    until_status(&app, &req.order_id.to_string(), "cancelled").await;
    assert_eq!(holding(&app, "bob", "pen").await, 0);
    app.wait_idle().await;
    check_clean(&app).await;
}

/// A waitlisted order promoted before a release for its lost reserve reply arrives
/// (ingress releases an order whose reserve failed, `refused`): it was accepted when it
/// went on the waitlist, so the release leaves it, its units and its key alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_for_a_lost_reply_leaves_a_promoted_order_alone() {
    use floodgate_common::{
        domain::{IdempotencyKey, OrderId, OrderLine, OrderLines, Quantity, Sku},
        redis::{self as fredis, Release, Reserve, ReserveRequest},
    };
    // No worker: ann's order stays queued, and nothing publishes bob's once promoted.
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Options::default()
    })
    .await;
    app.create_sku("ink", 1, None).await;
    let ann = app.order(&app.customer("ann"), &[("ink", 1)], None).await;
    assert_eq!(ann.status, 202, "{ann:?}");
    let ann_id = OrderId::parse(ann.body["order_id"].as_str().unwrap()).unwrap();
    let bob = UserId::parse("bob").unwrap();
    let key = IdempotencyKey::parse("bob-1").unwrap();
    let lines = OrderLines::try_from(vec![OrderLine {
        sku: Sku::parse("ink").unwrap(),
        qty: Quantity::try_from(1).unwrap(),
    }])
    .unwrap();
    let now = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    let hash = "h".repeat(64);
    let req = ReserveRequest {
        order_id: OrderId::new(),
        user: &bob,
        lines: &lines,
        held: None,
        first: None,
        buckets: &fredis::one_bucket,
        idempotency: Some((&key, &hash)),
        accepted_at: "2026-12-06T00:00:00Z",
        deadline_ms: now + 30_000,
        waitlist_until_ms: Some(now + 3_600_000),
        idempotency_ttl_secs: 600,
        points: None,
    };
    let keys = app.keys_of("ink").clone();
    let mut r = app.redis.clone();
    assert_eq!(
        fredis::reserve(&mut r, &keys, &req).await.unwrap(),
        Reserve::Waitlisted { position: 1 }
    );
    // Ann's order fails in a worker: its unit promotes bob's order in the same script.
    let ann_user = UserId::parse("ann").unwrap();
    let released = fredis::release(&mut r, &keys, &ann_id, &ann_user, None, "failed")
        .await
        .unwrap();
    assert_eq!(released, Release::Released);
    assert_eq!(holding(&app, "bob", "ink").await, 1);
    assert_eq!(app.available("ink").await, Some(0));
    // Then the release for bob's lost reply: nothing is taken back.
    let late = fredis::release(&mut r, &keys, &req.order_id, &bob, Some(&key), "refused")
        .await
        .unwrap();
    assert_eq!(late, Release::NotHeld);
    let (state, idem): (Option<String>, Option<String>) = redis::pipe()
        .hget(keys.resv(&req.order_id), "state")
        .hget(keys.idem(&bob, &key), "order_id")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(state.as_deref(), Some("reserved"), "still promoted");
    assert_eq!(
        idem,
        Some(req.order_id.to_string()),
        "a repeat of the key still answers it"
    );
    assert_eq!(holding(&app, "bob", "ink").await, 1);
    assert_eq!(app.available("ink").await, Some(0));
}
