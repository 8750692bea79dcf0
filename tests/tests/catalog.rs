//! Catalog and stock work as API.md's "v1 additions" define it: the roles of every route,
//! the SKU list, PATCH, adjustments (write-offs racing orders), and the audit log that
//! records every manager and admin write and refuses to be changed.

use floodgate_tests::{Resp, TestApp};
use futures::future::join_all;
use reqwest::Method;
use serde_json::{Value, json};

/// Who may call what (API.md "Roles"): each route with the roles that get past the role
/// check. A caller who may not gets 403 `forbidden`; one who may gets anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_checks_the_role_api_md_gives_it() {
    let app = TestApp::spawn().await;
    app.create_sku("tee", 100, None).await;
    let customer = app.customer("cora");
    let placed = app.order(&customer, &[("tee", 1)], None).await;
    assert_eq!(placed.status, 202);
    let order = placed.body["order_id"].as_str().unwrap().to_owned();
    app.wait_idle().await;
    let tokens = [
        ("customer", customer),
        ("manager", app.manager("mia")),
        ("admin", app.admin()),
    ];
    let (c, m, a) = ("customer", "manager", "admin");
    let mut n = 0;
    let mut fresh = || {
        n += 1;
        n
    };
    // (method, path, body, roles allowed). Bodies differ per call where a repeat would
    // be a no-op, so each allowed call really does its work.
    let mut routes: Vec<(Method, String, Option<Value>, Vec<&str>)> = Vec::new();
    for role in [c, m, a] {
        let i = fresh();
        routes.extend([
            (Method::POST, "/v1/orders".into(), Some(json!({"items": [{"sku": "tee", "qty": 1}]})), vec![c, a]),
            (Method::POST, "/v1/skus".into(),
                Some(json!({"sku": format!("new-{role}"), "name": "n", "price_cents": 1, "initial_stock": 1})),
                vec![m, a]),
            (Method::POST, "/v1/bundles".into(),
                Some(json!({"sku": format!("pack-{role}"), "name": "n", "price_cents": 1,
                            "components": [{"sku": "tee", "qty": 1}, {"sku": format!("new-{role}"), "qty": 1}]})),
                vec![m, a]),
            (Method::GET, "/v1/skus".into(), None, vec![m, a]),
            (Method::GET, "/v1/skus/tee".into(), None, vec![m, a]),
            (Method::PATCH, "/v1/skus/tee".into(), Some(json!({"name": format!("Tee {i}")})), vec![m, a]),
            (Method::POST, "/v1/skus/tee/receive".into(), Some(json!({"qty": 1, "reference": format!("po-{i}")})), vec![m, a]),
            (Method::POST, "/v1/skus/tee/adjust".into(),
                Some(json!({"delta": -1, "reason": "damaged", "reference": format!("adj-{i}")})), vec![m, a]),
            (Method::GET, "/v1/skus/tee/movements".into(), None, vec![m, a]),
            (Method::GET, "/v1/skus/tee/waitlist".into(), None, vec![m, a]),
            (Method::GET, "/v1/audit".into(), None, vec![a]),
            (Method::POST, "/v1/categories".into(), Some(json!({"id": format!("cat-{role}"), "name": "c"})), vec![m, a]),
            (Method::POST, "/v1/products".into(), Some(json!({"product_id": format!("p-{role}"), "name": "p"})), vec![m, a]),
            (Method::GET, "/v1/categories".into(), None, vec![c, m, a]),
            (Method::GET, "/v1/products".into(), None, vec![c, m, a]),
            // Anyone with a token gets past the role check; visibility answers 404.
            (Method::GET, format!("/v1/orders/{order}"), None, vec![c, m, a]),
            (Method::POST, format!("/v1/orders/{order}/cancel"), Some(json!({})), vec![c, m, a]),
            (Method::GET, "/v1/stock/tee".into(), None, vec![c, m, a]),
        ]);
    }
    let mut failures = Vec::new();
    for (i, (method, path, body, allowed)) in routes.iter().enumerate() {
        // Each block of routes above is sent by one role.
        let (role, token) = &tokens[i / (routes.len() / 3)];
        let r = app
            .request(method.clone(), path, Some(token), body.as_ref(), &[])
            .await;
        let may = allowed.contains(role);
        let refused = r.status == 403 && r.code() == "forbidden";
        // Allowed: it did its work, or (an order not theirs) could not see it.
        let done = r.status < 300
            || (r.status == 404 && *role == "manager" && path.starts_with("/v1/orders/"));
        if (may && !done) || (!may && !refused) {
            failures.push(format!(
                "{role} {method} {path}: got {} {:?}",
                r.status, r.body
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // A manager's order was refused before anything was reserved.
    app.wait_idle().await;
    assert_eq!(
        app.scalar("SELECT count(*) FROM orders WHERE user_id = 'mia'")
            .await,
        0
    );
    assert_eq!(app.scalar("SELECT count(*) FROM orders").await, 3);
    let mut redis = app.redis.clone();
    let violations = floodgate_common::reconcile::check(&app.pg, &mut redis, &app.shards, 6)
        .await
        .unwrap();
    assert!(violations.is_empty(), "{violations:#?}");
}

fn entries(r: &Resp) -> Vec<Value> {
    r.body["entries"].as_array().cloned().unwrap_or_default()
}

/// Every manager and admin write appends one record with actor, role, request id and
/// before/after, in the change's own transaction; repeats that change nothing append
/// nothing; ledger rows name who made them; and the table itself refuses UPDATE, DELETE
/// and TRUNCATE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_records_every_write_and_cannot_be_changed() {
    let app = TestApp::spawn().await;
    let mia = app.manager("mia");
    let admin = app.admin();
    let with_id = |id: &'static str| [("X-Request-Id", id)];
    let r = app
        .request(
            Method::POST,
            "/v1/skus",
            Some(&mia),
            Some(&json!({"sku": "mug", "name": "Mug", "price_cents": 900, "initial_stock": 10, "per_user_limit": 3})),
            &with_id("req-create"),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    for _ in 0..2 {
        let r = app
            .request(
                Method::POST,
                "/v1/skus/mug/receive",
                Some(&mia),
                Some(&json!({"qty": 5, "reference": "po-1"})),
                &with_id("req-receive"),
            )
            .await;
        assert_eq!(
            (r.status, r.body["on_hand"].as_i64()),
            (200, Some(15)),
            "{r:?}"
        );
    }
    for _ in 0..2 {
        let r = app
            .post(
                "/v1/skus/mug/adjust",
                Some(&mia),
                &json!({"delta": -2, "reason": "dropped in the warehouse", "reference": "wo-1"}),
            )
            .await;
        assert_eq!(
            (
                r.status,
                r.body["on_hand"].as_i64(),
                r.body["available"].as_i64()
            ),
            (200, Some(13), Some(13)),
            "{r:?}"
        );
    }
    let r = app
        .post(
            "/v1/skus/mug/adjust",
            Some(&admin),
            &json!({"delta": 4, "reason": "found in a back room", "reference": "found-1"}),
        )
        .await;
    assert_eq!(
        (r.status, r.body["on_hand"].as_i64()),
        (200, Some(17)),
        "{r:?}"
    );
    let r = app
        .patch(
            "/v1/skus/mug",
            Some(&mia),
            &json!({"price_cents": 1100, "name": "Big mug"}),
        )
        .await;
    assert_eq!(
        (
            r.status,
            r.body["price_cents"].as_i64(),
            r.body["name"].as_str()
        ),
        (200, Some(1100), Some("Big mug")),
        "{r:?}"
    );
    // The same values again: nothing changed, nothing recorded.
    let r = app
        .patch("/v1/skus/mug", Some(&mia), &json!({"price_cents": 1100}))
        .await;
    assert_eq!(r.status, 200);
    // A customer's cancel is no audited write; an admin's cancel of her order is.
    let cora = app.customer("cora");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let placed = app.order(&cora, &[("mug", 1)], None).await;
        assert_eq!(placed.status, 202, "{placed:?}");
        ids.push(placed.body["order_id"].as_str().unwrap().to_owned());
    }
    app.wait_idle().await;
    let r = app
        .post(
            &format!("/v1/orders/{}/cancel", ids[0]),
            Some(&cora),
            &json!({}),
        )
        .await;
    assert_eq!(r.body["status"], "cancelled", "{r:?}");
    let r = app
        .post(
            &format!("/v1/orders/{}/cancel", ids[1]),
            Some(&admin),
            &json!({}),
        )
        .await;
    assert_eq!(r.body["status"], "cancelled", "{r:?}");

    let log = app.get("/v1/audit", Some(&admin)).await;
    assert_eq!(log.status, 200, "{log:?}");
    let got: Vec<(String, String, String, String)> = entries(&log)
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
            (s("actor"), s("role"), s("action"), s("target"))
        })
        .collect();
    let want = |a: &str, r: &str, act: &str, t: &str| (a.into(), r.into(), act.into(), t.into());
    assert_eq!(
        got,
        vec![
            want(
                "admin",
                "admin",
                "order.cancel",
                &format!("order:{}", ids[1])
            ),
            want("mia", "manager", "sku.update", "sku:mug"),
            want("admin", "admin", "stock.adjust", "sku:mug"),
            want("mia", "manager", "stock.adjust", "sku:mug"),
            want("mia", "manager", "stock.receive", "sku:mug"),
            want("mia", "manager", "sku.create", "sku:mug"),
        ],
        "newest first, one per change: {log:?}"
    );
    let e = entries(&log);
    assert_eq!(e[5]["request_id"], "req-create");
    assert_eq!(e[4]["request_id"], "req-receive");
    assert!(
        e[0]["request_id"].as_str().is_some_and(|s| !s.is_empty()),
        "a made-up id when none was sent"
    );
    assert_eq!(e[5]["after"]["per_user_limit"], 3);
    assert!(e[5].get("before").is_none());
    assert_eq!(
        (
            e[4]["before"]["on_hand"].as_i64(),
            e[4]["after"]["on_hand"].as_i64()
        ),
        (Some(10), Some(15))
    );
    assert_eq!(
        (
            e[3]["before"]["on_hand"].as_i64(),
            e[3]["after"]["on_hand"].as_i64(),
            e[3]["after"]["delta"].as_i64()
        ),
        (Some(15), Some(13), Some(-2))
    );
    assert_eq!(e[3]["after"]["reason"], "dropped in the warehouse");
    assert_eq!(
        (
            e[1]["before"]["price_cents"].as_i64(),
            e[1]["after"]["price_cents"].as_i64()
        ),
        (Some(900), Some(1100))
    );
    assert_eq!(
        (
            e[1]["before"]["name"].as_str(),
            e[1]["after"]["name"].as_str()
        ),
        (Some("Mug"), Some("Big mug"))
    );
    assert!(
        e.iter()
            .all(|e| e["at"].as_str().is_some_and(|t| t.ends_with('Z')))
    );

    // Filters and paging.
    let mine = app.get("/v1/audit?actor=mia&limit=2", Some(&admin)).await;
    assert_eq!(entries(&mine).len(), 2);
    assert!(entries(&mine).iter().all(|e| e["actor"] == "mia"));
    let cursor = mine.body["next_cursor"]
        .as_str()
        .expect("a second page")
        .to_owned();
    let rest = app
        .get(
            &format!("/v1/audit?actor=mia&limit=2&cursor={cursor}"),
            Some(&admin),
        )
        .await;
    let actions: Vec<String> = entries(&rest)
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(actions, ["stock.receive", "sku.create"]);
    assert!(rest.body["next_cursor"].is_null());
    let order_log = app
        .get(&format!("/v1/audit?target=order:{}", ids[1]), Some(&admin))
        .await;
    assert_eq!(entries(&order_log).len(), 1);

    // Ledger rows carry their actor; an adjustment its reason and signed units.
    let m = app.get("/v1/skus/mug/movements", Some(&mia)).await;
    let rows: Vec<(String, i64, Option<String>, Option<String>)> = m.body["movements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap().to_owned(),
                r["qty"].as_i64().unwrap(),
                r["actor"].as_str().map(str::to_owned),
                r["reason"].as_str().map(str::to_owned),
            )
        })
        .collect();
    let row = |k: &str, q: i64, a: Option<&str>, r: Option<&str>| {
        (k.to_owned(), q, a.map(str::to_owned), r.map(str::to_owned))
    };
    assert_eq!(
        rows,
        vec![
            row("cancel", 1, Some("admin"), None),
            row("cancel", 1, Some("cora"), None),
            row("sale", 1, None, None),
            row("sale", 1, None, None),
            row("adjust", 4, Some("admin"), Some("found in a back room")),
            row("adjust", -2, Some("mia"), Some("dropped in the warehouse")),
            row("receive", 5, Some("mia"), None),
            row("receive", 10, Some("mia"), None),
        ]
    );

    // Append-only, whoever asks: the database refuses, not just the code.
    let db = app.pg.get().await.unwrap();
    for sql in [
        "UPDATE audit_log SET actor = 'someone-else'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ] {
        let e = db.execute(sql, &[]).await.expect_err(sql);
        assert!(format!("{e:?}").contains("append-only"), "{sql}: {e:?}");
    }
    assert_eq!(app.scalar("SELECT count(*) FROM audit_log").await, 6);
    assert_eq!(
        app.scalar("SELECT count(*) FROM audit_log WHERE actor = 'someone-else'")
            .await,
        0
    );
    let mut redis = app.redis.clone();
    let violations = floodgate_common::reconcile::check(&app.pg, &mut redis, &app.shards, 6)
        .await
        .unwrap();
    assert!(violations.is_empty(), "{violations:#?}");
}

/// Write-offs race a sell-out: each one is decided in Redis atomically with the orders,
/// so no unit is both sold and written off, and PostgreSQL agrees with Redis afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_offs_racing_a_sell_out_never_oversell() {
    let app = TestApp::spawn().await;
    app.create_sku("drop", 100, None).await;
    let mia = app.manager("mia");
    let buyers: Vec<String> = (0..150).map(|i| app.customer(&format!("b{i}"))).collect();
    let orders = join_all(buyers.iter().map(|t| app.order(t, &[("drop", 1)], None)));
    let (app_ref, mia_ref) = (&app, &mia);
    let write_offs = join_all((0..12).map(|i| async move {
        let body = json!({"delta": -5, "reason": "crushed", "reference": format!("wo-{i}")});
        app_ref
            .post("/v1/skus/drop/adjust", Some(mia_ref), &body)
            .await
    }));
    let (orders, write_offs) = tokio::join!(orders, write_offs);
    let accepted: Vec<String> = orders
        .iter()
        .filter(|r| r.status == 202)
        .map(|r| r.body["order_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        orders
            .iter()
            .all(|r| r.status == 202 || r.code() == "sold_out"),
        "{orders:?}"
    );
    let written: i64 = write_offs
        .iter()
        .map(|r| match (r.status, r.code()) {
            (200, _) => 5,
            (409, "insufficient_stock") => 0,
            _ => panic!("{r:?}"),
        })
        .sum();
    app.wait_idle().await;
    let outcomes = app.assert_invariants(&accepted).await;
    assert_eq!(
        outcomes.get("confirmed").copied().unwrap_or(0) as usize,
        accepted.len()
    );
    let sku = app.get("/v1/skus/drop", Some(&mia)).await;
    let (on_hand, sold, available) = (
        sku.body["on_hand"].as_i64().unwrap(),
        sku.body["sold"].as_i64().unwrap(),
        sku.body["available"].as_i64().unwrap(),
    );
    assert_eq!(on_hand, 100 - written, "{sku:?}");
    assert_eq!(sold, accepted.len() as i64);
    assert_eq!(
        sold + available,
        on_hand,
        "every unit sold, on sale or written off, once"
    );
    // A repeat of a write-off that went through changes nothing.
    if let Some(i) = write_offs.iter().position(|r| r.status == 200) {
        let again = app
            .post(
                "/v1/skus/drop/adjust",
                Some(&mia),
                &json!({"delta": -5, "reason": "crushed", "reference": format!("wo-{i}")}),
            )
            .await;
        assert_eq!(
            (again.status, again.body["on_hand"].as_i64()),
            (200, Some(on_hand))
        );
    }
    assert_eq!(
        app.scalar("SELECT count(*) FROM audit_log WHERE action = 'stock.adjust'")
            .await,
        written / 5
    );
}

/// PATCH reaches what the reserve decision reads: a new per-user limit holds for the
/// next order, `null` clears it; the SKU list pages newest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patched_limit_holds_at_once_and_the_list_pages_newest_first() {
    let app = TestApp::spawn().await;
    let mia = app.manager("mia");
    for sku in ["a-1", "a-2", "a-3"] {
        app.create_sku(sku, 50, None).await;
    }
    let cora = app.customer("cora");
    assert_eq!(app.order(&cora, &[("a-2", 2)], None).await.status, 202);
    let r = app
        .patch("/v1/skus/a-2", Some(&mia), &json!({"per_user_limit": 3}))
        .await;
    assert_eq!(
        (r.status, r.body["per_user_limit"].as_i64()),
        (200, Some(3)),
        "{r:?}"
    );
    let refused = app.order(&cora, &[("a-2", 2)], None).await;
    assert_eq!(
        (
            refused.status,
            refused.code(),
            refused.body["limit"].as_i64(),
            refused.body["already"].as_i64()
        ),
        (422, "limit_exceeded", Some(3), Some(2)),
        "{refused:?}"
    );
    assert_eq!(app.order(&cora, &[("a-2", 1)], None).await.status, 202);
    let r = app
        .patch("/v1/skus/a-2", Some(&mia), &json!({"per_user_limit": null}))
        .await;
    assert_eq!(
        (r.status, r.body["per_user_limit"].as_i64()),
        (200, Some(0)),
        "{r:?}"
    );
    assert_eq!(app.order(&cora, &[("a-2", 10)], None).await.status, 202);

    let first = app.get("/v1/skus?limit=2", Some(&mia)).await;
    assert_eq!(first.status, 200, "{first:?}");
    let ids = |r: &Resp| -> Vec<String> {
        r.body["skus"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["sku"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&first), ["a-3", "a-2"]);
    assert_eq!(first.body["skus"][1]["available"], 50 - 2 - 1 - 10);
    let cursor = first.body["next_cursor"].as_str().expect("more").to_owned();
    let second = app
        .get(&format!("/v1/skus?limit=2&cursor={cursor}"), Some(&mia))
        .await;
    assert_eq!(ids(&second), ["a-1"]);
    assert!(second.body["next_cursor"].is_null());
    app.wait_idle().await;
    let mut redis = app.redis.clone();
    let violations = floodgate_common::reconcile::check(&app.pg, &mut redis, &app.shards, 6)
        .await
        .unwrap();
    assert!(violations.is_empty(), "{violations:#?}");
    // A limit Redis lost (a PATCH dropped in a failover, say) is reported, and a reload
    // restores it.
    let _: () = redis::cmd("HSET")
        .arg(app.keys_of("a-1").limits())
        .arg("a-1")
        .arg(7)
        .query_async(&mut redis)
        .await
        .unwrap();
    let violations = floodgate_common::reconcile::check(&app.pg, &mut redis, &app.shards, 1)
        .await
        .unwrap();
    let kinds: Vec<&str> = violations.iter().map(|v| v.kind).collect();
    assert_eq!(kinds, ["redis_rules_differ"], "{violations:#?}");
    // The worker's settle pass rewrites it from PostgreSQL, unless a PATCH holds the row.
    {
        let mut db = app.pg.get().await.unwrap();
        let tx = db.transaction().await.unwrap();
        tx.execute("SELECT 1 FROM skus WHERE sku = 'a-1' FOR UPDATE", &[])
            .await
            .unwrap();
        let settled = floodgate_common::reconcile::settle(&app.pg, &mut redis, &app.shards)
            .await
            .unwrap();
        assert_eq!(settled.resynced, 0, "a PATCH in flight is left alone");
        tx.rollback().await.unwrap();
    }
    let settled = floodgate_common::reconcile::settle(&app.pg, &mut redis, &app.shards)
        .await
        .unwrap();
    assert_eq!(settled.resynced, 1);
    let violations = floodgate_common::reconcile::check(&app.pg, &mut redis, &app.shards, 1)
        .await
        .unwrap();
    assert!(violations.is_empty(), "{violations:#?}");
}

/// A write-off whose request died between taking its units in Redis and recording them
/// in PostgreSQL: the worker's settle pass gives the units back (none recorded), or
/// forgets the entry (recorded); a reload in between starts from PostgreSQL, and the
/// request repeated afterwards takes its units again from the reloaded level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_off_cut_before_its_commit_is_given_back_or_settled() {
    let app = TestApp::spawn().await;
    app.create_sku("box", 20, None).await;
    let sku = floodgate_common::domain::Sku::parse("box").unwrap();
    let keys = app.keys_of("box").clone();
    let mut con = app.redis.clone();
    let token = |r: &str| floodgate_common::redis::adjust_token(&sku, r);
    let settle = || async {
        floodgate_common::reconcile::settle(&app.pg, &mut app.redis.clone(), &app.shards)
            .await
            .unwrap()
    };
    // Taken by a request still in flight (it holds the SKU's adjustment lock): settle
    // leaves it alone.
    floodgate_common::redis::take_stock(&mut con, &keys, &sku, 5, &token("busy"))
        .await
        .unwrap();
    {
        let mut db = app.pg.get().await.unwrap();
        let tx = db.transaction().await.unwrap();
        tx.execute(floodgate_common::stock::ADJUST_LOCK, &[&"box"])
            .await
            .unwrap();
        assert_eq!(settle().await.given_back, 0, "in flight: not touched");
        assert_eq!(app.available("box").await, Some(15));
        tx.rollback().await.unwrap();
    }
    // The request died without a record: now settle gives the units back.
    assert_eq!(settle().await.given_back, 1);
    assert_eq!(app.available("box").await, Some(20));

    // Taken, never recorded: given back by the settle pass.
    let taken = floodgate_common::redis::take_stock(&mut con, &keys, &sku, 3, &token("lost-1"))
        .await
        .unwrap();
    assert!(
        matches!(
            taken,
            floodgate_common::redis::Take::Taken {
                units: 3,
                level: 17,
                again: false
            }
        ),
        "{taken:?}"
    );
    assert_eq!(app.available("box").await, Some(17));
    assert_eq!(settle().await.given_back, 1);
    assert_eq!(app.available("box").await, Some(20));
    assert_eq!(settle().await.given_back, 0, "once");

    // Recorded, its entry left behind (the request died after the commit): forgotten,
    // the units stay gone.
    let mia = app.manager("mia");
    let r = app
        .post(
            "/v1/skus/box/adjust",
            Some(&mia),
            &json!({"delta": -2, "reason": "torn", "reference": "wo-1"}),
        )
        .await;
    assert_eq!(
        (r.status, r.body["available"].as_i64()),
        (200, Some(18)),
        "{r:?}"
    );
    let _: () = redis::cmd("HSET")
        .arg(keys.takes())
        .arg(token("wo-1"))
        .arg(2)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(settle().await.given_back, 0);
    assert_eq!(app.available("box").await, Some(18));
    let left: i64 = redis::cmd("HLEN")
        .arg(keys.takes())
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(left, 0);

    // Taken, then a reload (`floodgate reconcile`) before the request is repeated: the
    // reload restores the level from PostgreSQL and forgets the take; the repeat takes
    // its units from the reloaded level, once.
    floodgate_common::redis::take_stock(&mut con, &keys, &sku, 4, &token("wo-2"))
        .await
        .unwrap();
    assert_eq!(app.available("box").await, Some(14));
    floodgate_common::stock::load(&app.pg, &mut con, &app.shards)
        .await
        .unwrap();
    assert_eq!(app.available("box").await, Some(18));
    for _ in 0..2 {
        let r = app
            .post(
                "/v1/skus/box/adjust",
                Some(&mia),
                &json!({"delta": -4, "reason": "wet", "reference": "wo-2"}),
            )
            .await;
        assert_eq!(
            (
                r.status,
                r.body["on_hand"].as_i64(),
                r.body["available"].as_i64()
            ),
            (200, Some(14), Some(14)),
            "{r:?}"
        );
    }
    app.wait_idle().await;
    let violations = floodgate_common::reconcile::check(&app.pg, &mut con, &app.shards, 6)
        .await
        .unwrap();
    assert!(violations.is_empty(), "{violations:#?}");
}

/// Redis's clock, in milliseconds since the Unix epoch.
async fn redis_ms(app: &TestApp) -> i64 {
    let (s, us): (i64, i64) = redis::cmd("TIME")
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
    s * 1000 + us / 1000
}

fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// The sale window is decided in the reserve script by Redis's clock: every order
/// answered before the opening (by that clock) is refused `sale_not_started`, every
/// order sent after it is accepted, and every one sent after the end is `sale_ended`;
/// a PATCH moves the window at once, null clears it, and a reload keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sale_window_opens_and_closes_by_redis_clock() {
    let app = TestApp::spawn().await;
    let mia = app.manager("mia");
    let opens = redis_ms(&app).await + 1_500;
    let created = app
        .post(
            "/v1/skus",
            Some(&mia),
            &json!({"sku": "launch", "name": "Launch", "price_cents": 100, "initial_stock": 1000,
                    "sale_starts_at": rfc3339_ms(opens)}),
        )
        .await;
    assert_eq!(created.status, 201, "{created:?}");
    assert_eq!(created.body["sale_starts_at"], rfc3339_ms(opens));
    assert!(created.body["sale_ends_at"].is_null());
    // The public read carries the window, for a storefront's countdown.
    let public = app.get("/v1/stock/launch", None).await;
    assert_eq!(
        public.body,
        json!({"sku": "launch", "available": 1000, "sale_starts_at": rfc3339_ms(opens)})
    );
    let (mut early, mut open) = (0, 0);
    let mut failures = Vec::new();
    let mut i = 0;
    while redis_ms(&app).await < opens + 500 {
        i += 1;
        let before = redis_ms(&app).await;
        let r = app
            .order(&app.customer(&format!("b{i}")), &[("launch", 1)], None)
            .await;
        let after = redis_ms(&app).await;
        match (r.status, r.code()) {
            (409, "sale_not_started") if before < opens => {
                assert_eq!(r.body["starts_at"], rfc3339_ms(opens));
                early += 1;
            }
            (202, _) if after >= opens => open += 1,
            _ => failures.push(format!(
                "sent at {before}, answered at {after}, opens {opens}: {} {:?}",
                r.status, r.body
            )),
        }
        if after < opens {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        early > 5 && open > 5,
        "both sides seen: {early} early, {open} open"
    );

    // A window field this code did not write refuses orders rather than sell outside it.
    let _: () = redis::cmd("HSET")
        .arg(app.keys_of("launch").windows())
        .arg("launch")
        .arg("tomorrow")
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
    let broken = app
        .order(&app.customer("odd"), &[("launch", 1)], None)
        .await;
    assert_eq!(
        (broken.status, broken.code()),
        (503, "unavailable"),
        "{broken:?}"
    );

    // Closed by a PATCH; a reload keeps the window; null reopens.
    let r = app
        .patch(
            "/v1/skus/launch",
            Some(&mia),
            &json!({"sale_ends_at": rfc3339_ms(redis_ms(&app).await)}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let late = app
        .order(&app.customer("late"), &[("launch", 1)], None)
        .await;
    assert_eq!((late.status, late.code()), (409, "sale_ended"), "{late:?}");
    // A reload with every accepted order committed (as `floodgate reconcile` waits for).
    app.wait_idle().await;
    floodgate_common::stock::load(&app.pg, &mut app.redis.clone(), &app.shards)
        .await
        .unwrap();
    let late = app
        .order(&app.customer("late"), &[("launch", 1)], None)
        .await;
    assert_eq!(
        (late.status, late.code()),
        (409, "sale_ended"),
        "after a reload: {late:?}"
    );
    let r = app
        .patch(
            "/v1/skus/launch",
            Some(&mia),
            &json!({"sale_starts_at": null, "sale_ends_at": null}),
        )
        .await;
    assert_eq!(
        (r.status, r.body["sale_starts_at"].is_null()),
        (200, true),
        "{r:?}"
    );
    assert_eq!(
        app.order(&app.customer("late"), &[("launch", 1)], None)
            .await
            .status,
        202
    );
    let changes = app
        .scalar(
            "SELECT count(*) FROM audit_log WHERE action = 'sku.update' AND target = 'sku:launch'",
        )
        .await;
    assert_eq!(changes, 2);
    app.wait_idle().await;
    let mut redis = app.redis.clone();
    let violations = floodgate_common::reconcile::check(&app.pg, &mut redis, &app.shards, 6)
        .await
        .unwrap();
    assert!(violations.is_empty(), "{violations:#?}");
}

/// Categories form a tree; products carry options; a SKU of a product takes one value of
/// each option (else 422), one SKU per combination (else 409); the public reads show
/// each product with its SKUs and their live stock, a category's list takes in its
/// subcategories, and every write is audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn products_with_options_and_their_skus_in_a_category_tree() {
    let app = TestApp::spawn().await;
    let mia = app.manager("mia");
    for (id, parent) in [
        ("clothing", None),
        ("shirts", Some("clothing")),
        ("mugs", None),
    ] {
        let mut body = json!({"id": id, "name": id.to_uppercase()});
        if let Some(p) = parent {
            body["parent_id"] = p.into();
        }
        let r = app.post("/v1/categories", Some(&mia), &body).await;
        assert_eq!(r.status, 201, "{r:?}");
    }
    let again = app
        .post(
            "/v1/categories",
            Some(&mia),
            &json!({"id": "mugs", "name": "x"}),
        )
        .await;
    assert_eq!((again.status, again.code()), (409, "category_exists"));
    let orphan = app
        .post(
            "/v1/categories",
            Some(&mia),
            &json!({"id": "socks", "name": "x", "parent_id": "nope"}),
        )
        .await;
    assert_eq!((orphan.status, orphan.code()), (422, "unknown_category"));
    // Nested at most 8 deep: clothing > shirts > l3 > ... > l8, and no l9.
    let mut parent = "shirts".to_owned();
    for depth in 3..=9 {
        let id = format!("l{depth}");
        let r = app
            .post(
                "/v1/categories",
                Some(&mia),
                &json!({"id": id, "name": id, "parent_id": parent}),
            )
            .await;
        if depth <= 8 {
            assert_eq!(r.status, 201, "depth {depth}: {r:?}");
        } else {
            assert_eq!(
                (r.status, r.code()),
                (422, "invalid_request"),
                "depth {depth}: {r:?}"
            );
        }
        parent = id;
    }
    let tree = app.get("/v1/categories", None).await;
    assert_eq!(
        tree.body,
        json!({"categories": [
            {"id": "clothing", "name": "CLOTHING", "children": [{"id": "shirts", "name": "SHIRTS", "children": [
                {"id": "l3", "name": "l3", "children": [{"id": "l4", "name": "l4", "children": [
                    {"id": "l5", "name": "l5", "children": [{"id": "l6", "name": "l6", "children": [
                        {"id": "l7", "name": "l7", "children": [{"id": "l8", "name": "l8", "children": []}]}]}]}]}]}]}]},
            {"id": "mugs", "name": "MUGS", "children": []},
        ]})
    );

    let tee = json!({"product_id": "tee", "name": "Tee", "description": "Cotton.", "category_id": "shirts",
        "options": [{"name": "size", "values": ["S", "M"]}, {"name": "colour", "values": ["red", "blue"]}]});
    let r = app.post("/v1/products", Some(&mia), &tee).await;
    assert_eq!(
        (r.status, r.header("location")),
        (201, Some("/v1/products/tee")),
        "{r:?}"
    );
    assert_eq!(
        app.post("/v1/products", Some(&mia), &tee).await.code(),
        "product_exists"
    );
    let r = app
        .post(
            "/v1/products",
            Some(&mia),
            &json!({"product_id": "cup", "name": "Cup", "category_id": "mugs"}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");

    let sku = |id: &str, options: Value| {
        json!({"sku": id, "name": id, "price_cents": 1500, "initial_stock": 10,
               "product_id": "tee", "options": options})
    };
    let r = app
        .post(
            "/v1/skus",
            Some(&mia),
            &sku("tee-s-red", json!({"size": "S", "colour": "red"})),
        )
        .await;
    assert_eq!(
        (r.status, r.body["product_id"].as_str()),
        (201, Some("tee")),
        "{r:?}"
    );
    assert_eq!(r.body["options"], json!({"size": "S", "colour": "red"}));
    let r = app
        .post(
            "/v1/skus",
            Some(&mia),
            &sku("tee-m-blue", json!({"colour": "blue", "size": "M"})),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    for (options, code) in [
        (json!({"size": "XL", "colour": "red"}), "invalid_request"),
        (json!({"size": "S"}), "invalid_request"),
        (
            json!({"size": "S", "colour": "red", "fit": "slim"}),
            "invalid_request",
        ),
        (json!("S"), "invalid_request"),
        (json!({"size": "S", "colour": "red"}), "variant_exists"),
    ] {
        let before = app.snapshot().await;
        let r = app
            .post("/v1/skus", Some(&mia), &sku("tee-x", options.clone()))
            .await;
        assert_eq!(r.code(), code, "{options}: {r:?}");
        assert_eq!(app.snapshot().await, before, "{options}: nothing changed");
    }
    let r = app
        .post("/v1/skus", Some(&mia), &json!({"sku": "x", "name": "x", "price_cents": 1, "initial_stock": 1, "product_id": "ghost"}))
        .await;
    assert_eq!((r.status, r.code()), (422, "unknown_product"), "{r:?}");
    assert_eq!(
        app.order(&app.customer("cora"), &[("tee-m-blue", 3)], None)
            .await
            .status,
        202
    );

    let p = app.get("/v1/products/tee", None).await;
    assert_eq!(p.status, 200, "{p:?}");
    assert_eq!(p.body["category_id"], "shirts");
    assert_eq!(
        p.body["options"][1],
        json!({"name": "colour", "values": ["red", "blue"]})
    );
    assert_eq!(
        p.body["skus"],
        json!([
            {"sku": "tee-m-blue", "options": {"colour": "blue", "size": "M"}, "price_cents": 1500, "available": 7},
            {"sku": "tee-s-red", "options": {"colour": "red", "size": "S"}, "price_cents": 1500, "available": 10},
        ])
    );
    assert_eq!(
        app.get("/v1/products/ghost", None).await.code(),
        "unknown_product"
    );
    let ids = |r: &Resp| -> Vec<String> {
        r.body["products"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["product_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        ids(&app.get("/v1/products?category_id=clothing", None).await),
        ["tee"],
        "a parent takes in its children"
    );
    assert_eq!(
        ids(&app.get("/v1/products?category_id=mugs", None).await),
        ["cup"]
    );
    let first = app.get("/v1/products?limit=1", None).await;
    assert_eq!(ids(&first), ["cup"]);
    let cursor = first.body["next_cursor"].as_str().unwrap().to_owned();
    assert_eq!(
        ids(&app
            .get(&format!("/v1/products?limit=1&cursor={cursor}"), None)
            .await),
        ["tee"]
    );
    assert_eq!(
        app.get("/v1/products?category_id=ghost", None).await.code(),
        "unknown_category"
    );
    let of_tee = app.get("/v1/skus?product_id=tee", Some(&mia)).await;
    let skus: Vec<&str> = of_tee.body["skus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sku"].as_str().unwrap())
        .collect();
    assert_eq!(skus, ["tee-m-blue", "tee-s-red"]);
    assert_eq!(
        app.get("/v1/skus?product_id=ghost", Some(&mia))
            .await
            .code(),
        "unknown_product"
    );

    let actions = app
        .scalar(
            "SELECT count(*) FROM audit_log WHERE action IN ('category.create', 'product.create')",
        )
        .await;
    assert_eq!(actions, 11);
}

/// A SKU whose creation committed in PostgreSQL but never reached Redis (ingress died
/// in between): a receipt for it waits instead of putting it on sale without its window
/// and limit; the worker's settle pass brings the initial stock with its window, then
/// the receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_never_puts_a_sku_on_sale_before_its_window_reaches_redis() {
    let app = TestApp::spawn().await;
    let mia = app.manager("mia");
    let r = app
        .post(
            "/v1/skus",
            Some(&mia),
            &json!({"sku": "later", "name": "Later", "price_cents": 100, "initial_stock": 10,
                    "per_user_limit": 2, "sale_starts_at": "2060-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    // What a crash right after the commit leaves: nothing of the SKU in Redis.
    let keys = app.keys_of("later").clone();
    let sku = floodgate_common::domain::Sku::parse("later").unwrap();
    let _: () = redis::pipe()
        .hdel(keys.stock(), "later")
        .hdel(keys.windows(), "later")
        .hdel(keys.limits(), "later")
        .srem(keys.applied(), floodgate_common::redis::initial_token(&sku))
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
    // The settle pass brings it back whole: window and limit with its first units.
    let settled = floodgate_common::reconcile::settle(&app.pg, &mut app.redis.clone(), &app.shards)
        .await
        .unwrap();
    assert_eq!(settled.reapplied, 1, "the initial stock");
    let early = app
        .order(&app.customer("cora"), &[("later", 1)], None)
        .await;
    assert_eq!(
        (early.status, early.code()),
        (409, "sale_not_started"),
        "{early:?}"
    );
    // The same loss again, then a receipt before any settle pass: the receipt brings the
    // initial stock (with its window) first, then applies.
    let _: () = redis::pipe()
        .hdel(keys.stock(), "later")
        .hdel(keys.windows(), "later")
        .hdel(keys.limits(), "later")
        .srem(keys.applied(), floodgate_common::redis::initial_token(&sku))
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
    let r = app
        .post(
            "/v1/skus/later/receive",
            Some(&mia),
            &json!({"qty": 5, "reference": "po-1"}),
        )
        .await;
    assert_eq!(
        (
            r.status,
            r.body["on_hand"].as_i64(),
            r.body["available"].as_i64()
        ),
        (200, Some(15), Some(15)),
        "{r:?}"
    );
    let early = app
        .order(&app.customer("cora"), &[("later", 1)], None)
        .await;
    assert_eq!(
        (early.status, early.code()),
        (409, "sale_not_started"),
        "{early:?}"
    );
    let settled = floodgate_common::reconcile::settle(&app.pg, &mut app.redis.clone(), &app.shards)
        .await
        .unwrap();
    assert_eq!(settled.reapplied, 0, "nothing left to re-apply");
    let mut redis = app.redis.clone();
    let violations = floodgate_common::reconcile::check(&app.pg, &mut redis, &app.shards, 6)
        .await
        .unwrap();
    assert!(violations.is_empty(), "{violations:#?}");
}
