//! A Redis write lost after the PostgreSQL commit (a failover that dropped the last
//! acknowledged writes, a worker killed between the two steps) leaves a reservation open
//! for good. `reconcile::settle` (run by the workers' consistency turn and by `floodgate
//! reconcile`) closes it by what PostgreSQL decided, and the invariants hold again.

use floodgate_common::{
    domain::{OrderId, OrderLines, UserId},
    reconcile::{self, Settled},
    redis::{self as fredis, Reserve, ReserveRequest},
};
use floodgate_tests::{Options, TestApp};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_left_open_by_a_lost_write_are_settled_by_postgresql() {
    let mut app = TestApp::spawn_with(Options::default()).await;
    app.create_sku("mug", 10, None).await;
    let alice = app.customer("alice");
    let confirmed = app.order(&alice, &[("mug", 2)], None).await;
    assert_eq!(confirmed.status, 202, "{confirmed:?}");
    let confirmed = confirmed.body["order_id"].as_str().unwrap().to_owned();
    app.wait_idle().await;

    // The worker's `finish` is lost: the reservation is back to `claimed` and open.
    let mut redis = app.redis.clone();
    let id = OrderId::parse(&confirmed).unwrap();
    let _: () = redis::pipe()
        .hset(app.keys_of("mug").resv(&id), "state", "claimed")
        .persist(app.keys_of("mug").resv(&id))
        .zadd(app.keys_of("mug").deadlines(), &confirmed, "+inf")
        .query_async(&mut redis)
        .await
        .unwrap();

    // An order the worker recorded failed, whose release was lost: reserved (no worker
    // runs from here on, so nothing reaps it), then PostgreSQL holds it failed.
    app.stop_worker().await;
    let failed_id = OrderId::new();
    let user = UserId::parse("alice").unwrap();
    let lines: OrderLines = serde_json::from_value(json!([{"sku": "mug", "qty": 3}])).unwrap();
    let reserved = fredis::reserve(
        &mut redis,
        &app.keys,
        &ReserveRequest {
            order_id: failed_id,
            user: &user,
            lines: &lines,
            held: None,
            first: None,
            buckets: &floodgate_common::redis::one_bucket,
            idempotency: None,
            accepted_at: "2026-12-03T00:00:00Z",
            deadline_ms: i64::MAX / 2,
            waitlist_until_ms: None,
            idempotency_ttl_secs: 60,
            points: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(reserved, Reserve::Reserved);
    app.pg
        .get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO orders (id, user_id, status, reason, accepted_at)
             VALUES ($1, 'alice', 'failed', 'insufficient_stock', now())",
            &[&failed_id.as_uuid()],
        )
        .await
        .unwrap();
    assert_eq!(app.available("mug").await, Some(5), "2 sold, 3 held");

    let before = reconcile::check(&app.pg, &mut redis, &app.shards, 1)
        .await
        .unwrap();
    assert!(
        before.iter().any(|v| v.kind == "redis_differs"),
        "the lost writes show: {before:?}"
    );

    let settled = reconcile::settle(&app.pg, &mut redis, &app.shards)
        .await
        .unwrap();
    assert_eq!(
        settled,
        Settled {
            finished: 1,
            released: 1,
            reapplied: 0,
            given_back: 0,
            resynced: 0,
            refunded: 0,
        }
    );
    assert_eq!(
        app.available("mug").await,
        Some(8),
        "the failed order's 3 are back"
    );
    let after = reconcile::check(&app.pg, &mut redis, &app.shards, 1)
        .await
        .unwrap();
    assert!(after.is_empty(), "{after:?}");
    // Settling again changes nothing.
    let again = reconcile::settle(&app.pg, &mut redis, &app.shards)
        .await
        .unwrap();
    assert_eq!(again, Settled::default());
    assert_eq!(app.available("mug").await, Some(8));

    // A receipt committed in PostgreSQL whose Redis half was lost: its token is missing
    // and its units are not on sale. Settling applies it, once.
    let r = app
        .post(
            "/v1/skus/mug/receive",
            Some(&app.admin()),
            &json!({"qty": 4, "reference": "po-1"}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(app.available("mug").await, Some(12));
    let _: () = redis::pipe()
        .srem(app.keys_of("mug").applied(), "receive:mug:po-1")
        .hincr(app.keys_of("mug").stock(), "mug", -4)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        !reconcile::check(&app.pg, &mut redis, &app.shards, 1)
            .await
            .unwrap()
            .is_empty()
    );
    let settled = reconcile::settle(&app.pg, &mut redis, &app.shards)
        .await
        .unwrap();
    assert_eq!(settled.reapplied, 1, "{settled:?}");
    assert_eq!(app.available("mug").await, Some(12));
    let again = reconcile::settle(&app.pg, &mut redis, &app.shards)
        .await
        .unwrap();
    assert_eq!(again, Settled::default());
    assert_eq!(app.available("mug").await, Some(12));
    let after = reconcile::check(&app.pg, &mut redis, &app.shards, 1)
        .await
        .unwrap();
    assert!(after.is_empty(), "{after:?}");

    // A cancel committed in PostgreSQL whose Redis half was lost: the 2 units and alice's
    // holding of them stay taken until settled.
    let c = app
        .post(
            &format!("/v1/orders/{confirmed}/cancel"),
            Some(&alice),
            &json!({}),
        )
        .await;
    assert_eq!(c.status, 200, "{c:?}");
    assert_eq!(app.available("mug").await, Some(14));
    let token = format!("cancel:{confirmed}:mug");
    let alice_key = app.keys_of("mug").user(&user);
    let _: () = redis::pipe()
        .srem(app.keys_of("mug").applied(), &token)
        .hincr(app.keys_of("mug").stock(), "mug", -2)
        .hincr(&alice_key, "mug", 2)
        .query_async(&mut redis)
        .await
        .unwrap();
    let settled = reconcile::settle(&app.pg, &mut redis, &app.shards)
        .await
        .unwrap();
    assert_eq!(settled.reapplied, 1, "{settled:?}");
    assert_eq!(app.available("mug").await, Some(14));
    let held: i64 = redis::cmd("HGET")
        .arg(&alice_key)
        .arg("mug")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(
        held, 0,
        "alice holds nothing: the failed order's 3 released, the cancelled 2 given back"
    );
    let after = reconcile::check(&app.pg, &mut redis, &app.shards, 1)
        .await
        .unwrap();
    assert!(after.is_empty(), "{after:?}");
}
