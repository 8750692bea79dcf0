//! A namespace over several Redis shards (`FLOODGATE_REDIS_SHARDS`): SKUs spread over
//! slots, an order over several shards is reserved in parts and stays all or nothing
//! (refusals, a crash between the parts, a part that expired while another was queued),
//! idempotent (re-sent, repeated keys whose record lives in a shard none of the SKUs
//! does), and a process with another shard count refuses to start. Runs on the default
//! Redis (the shards are slots; on one server they are all on it) and in the cluster
//! suite on a Redis Cluster.

use floodgate_common::{
    amqp::{IntakeMessage, OrderPlaced},
    bundle::held_lines,
    domain::{IdempotencyKey, OrderId, OrderLine, OrderLines, Quantity, Sku, UserId},
    redis::{self as fredis, ConfirmedOrder, Reserve, ReserveRequest, shard_of},
};
use floodgate_tests::{Options, TestApp};
use futures::future::join_all;
use std::time::Duration;

const SHARDS: usize = 4;

fn sharded(tweak: impl Fn(&mut floodgate_common::Config) + Send + 'static) -> Options {
    Options {
        tweak: Box::new(move |c| {
            c.redis_shards = SHARDS;
            tweak(c)
        }),
        ..Options::default()
    }
}

/// A SKU name starting with `prefix` that lives in shard `g`.
fn sku_in(prefix: &str, g: usize) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|s| shard_of(s, SHARDS) == g)
        .unwrap()
}

/// An Idempotency-Key of `user` whose record lives in shard `g`.
fn key_in(user: &str, g: usize) -> String {
    let shards = floodgate_common::redis::Shards::new(
        &floodgate_common::Namespace::parse("any").unwrap(),
        SHARDS,
    );
    let u = UserId::parse(user).unwrap();
    (0..)
        .map(|i| format!("key-{i}"))
        .find(|k| shards.of_idempotency_key(&u, &IdempotencyKey::parse(k).unwrap()) == g)
        .unwrap()
}

fn lines(items: &[(&str, i64)]) -> OrderLines {
    OrderLines::try_from(
        items
            .iter()
            .map(|(s, q)| OrderLine {
                sku: Sku::parse(*s).unwrap(),
                qty: Quantity::try_from(*q).unwrap(),
            })
            .collect::<Vec<_>>(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_over_shards_is_all_or_nothing() {
    let app = TestApp::spawn_with(sharded(|_| {})).await;
    let (a, b, c, d) = (
        sku_in("a", 1),
        sku_in("b", 2),
        sku_in("c", 3),
        sku_in("d", 0),
    );
    app.create_sku(&a, 5, None).await;
    app.create_sku(&b, 1, None).await;
    app.create_sku(&c, 5, None).await;
    app.create_sku(&d, 5, Some(1)).await;
    let zoe = app.customer("zoe");

    // One part refused: nothing anywhere.
    let before = app.snapshot().await;
    let r = app.order(&zoe, &[(&a, 2), (&b, 2), (&c, 1)], None).await;
    assert_eq!(r.status, 409, "{r:?}");
    assert_eq!(
        (r.code(), r.body["sku"].as_str()),
        ("sold_out", Some(b.as_str()))
    );
    // Nothing held; what remains is the released records of the parts that were
    // reserved (kept a minute, for a re-sent reserve) and their change marks.
    let unchanged = |mut after: floodgate_tests::Snapshot| {
        after.redis_keys = before.redis_keys;
        after
    };
    assert_eq!(unchanged(app.snapshot().await), before, "nothing reserved");
    assert_eq!(app.open_reservations().await, 0);
    // The part that was reserved (a's) is released as refused, kept a minute only.
    let mut con = app.redis.clone();
    let kept: Vec<String> = con
        .namespace_keys(app.keys_of(&a))
        .await
        .unwrap()
        .into_iter()
        .filter(|k| k.contains(":resv:"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let (reason, ttl): (String, i64) = redis::pipe()
        .hget(&kept[0], "reason")
        .ttl(&kept[0])
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(reason, "refused");
    assert!((1..=60).contains(&ttl), "{ttl}");
    let r = app.order(&zoe, &[(&a, 1), (&d, 2)], None).await;
    assert_eq!((r.status, r.code()), (422, "limit_exceeded"), "{r:?}");
    assert_eq!(unchanged(app.snapshot().await), before, "nothing reserved");

    // All parts there: one order, each shard's units taken once.
    let r = app
        .order(&zoe, &[(&a, 2), (&b, 1), (&c, 1), (&d, 1)], None)
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    let id = r.body["order_id"].as_str().unwrap().to_owned();
    app.wait_idle().await;
    for (sku, left) in [(&a, 3), (&b, 0), (&c, 4), (&d, 4)] {
        assert_eq!(app.available(sku).await, Some(left), "{sku}");
    }
    let got = app.get(&format!("/v1/orders/{id}"), Some(&zoe)).await;
    assert_eq!(got.body["status"], "confirmed", "{got:?}");
    assert_eq!(got.body["items"].as_array().unwrap().len(), 4);
    let stock = app
        .get(&format!("/v1/stock?skus={a},{b},{c},{d}"), None)
        .await;
    assert_eq!(stock.status, 200, "{stock:?}");
    let outcomes = app.assert_invariants(&[id]).await;
    assert_eq!(outcomes.get("confirmed"), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_in_a_shard_of_its_own_gives_one_order() {
    let app = TestApp::spawn_with(sharded(|_| {})).await;
    let (a, b) = (sku_in("a", 1), sku_in("b", 2));
    app.create_sku(&a, 50, None).await;
    app.create_sku(&b, 50, None).await;
    let key = key_in("carol", 3);
    let carol = app.customer("carol");
    let items = [(a.as_str(), 2), (b.as_str(), 1)];
    let results = join_all((0..12).map(|_| app.order(&carol, &items, Some(&key)))).await;
    let ids: std::collections::HashSet<String> = results
        .iter()
        .map(|r| {
            assert!(r.status == 202 || r.status == 200, "{r:?}");
            r.body["order_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "one order for one key");
    assert_eq!(app.available(&a).await, Some(48));
    assert_eq!(app.available(&b).await, Some(49));
    app.wait_idle().await;
    let id = ids.into_iter().next().unwrap();
    let again = app.order(&carol, &[(&b, 1), (&a, 2)], Some(&key)).await;
    assert_eq!(
        (again.status, again.body["order_id"].as_str()),
        (200, Some(id.as_str()))
    );
    let before = app.snapshot().await;
    let reused = app.order(&carol, &[(&a, 1)], Some(&key)).await;
    assert_eq!(
        (reused.status, reused.code()),
        (422, "idempotency_key_reused")
    );
    assert_eq!(app.snapshot().await, before);
    app.assert_invariants(&[id]).await;
}

/// Ingress died mid-order: after the deciding part (with the key's record), before the
/// others and the publish. The part expires with the order's deadline, the order is
/// recorded failed, and a repeat of the key answers that order instead of waiting for
/// ever or placing a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_parts_returns_every_unit_and_answers_the_key() {
    let ttl = Duration::from_secs(4);
    let app = TestApp::spawn_with(sharded(move |c| {
        c.reservation_ttl = ttl;
        c.publish_timeout = Duration::from_millis(500);
    }))
    .await;
    let (a, b) = (sku_in("a", 1), sku_in("b", 2));
    app.create_sku(&a, 10, None).await;
    app.create_sku(&b, 10, None).await;
    let user = UserId::parse("crash").unwrap();
    let key_text = key_in("crash", 1);
    let key = IdempotencyKey::parse(&key_text).unwrap();
    let order = lines(&[(&a, 3), (&b, 4)]);
    let parts = app.shards.parts(
        &held_lines(order.as_slice(), &Default::default()),
        &user,
        Some(&key),
        |_| 1,
    );
    assert_eq!(parts.len(), 2, "{parts:?}");
    let id = OrderId::new();
    let now = time::OffsetDateTime::now_utc();
    let accepted_at = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let deadline_ms = ((now + ttl).unix_timestamp_nanos() / 1_000_000) as i64;
    let hash = floodgate_ingress::orders::body_hash(&order, false);
    let req = ReserveRequest {
        order_id: id,
        user: &user,
        lines: &order,
        held: Some(&parts[0].lines),
        first: Some(parts[0].shard),
        buckets: &floodgate_common::redis::one_bucket,
        idempotency: Some((&key, &hash)),
        accepted_at: &accepted_at,
        deadline_ms,
        waitlist_until_ms: None,
        idempotency_ttl_secs: 60,
        points: None,
    };
    let mut r = app.redis.clone();
    let first = fredis::reserve(&mut r, app.shards.get(parts[0].shard), &req)
        .await
        .unwrap();
    assert_eq!(first, Reserve::Reserved);
    assert_eq!(app.available(&a).await, Some(7));
    assert_eq!(
        app.available(&b).await,
        Some(10),
        "the second part never ran"
    );

    // A repeat while the first is undecided: it waits, then says so.
    let token = app.customer("crash");
    let early = app
        .order(&token, &[(&a, 3), (&b, 4)], Some(&key_text))
        .await;
    assert_eq!(
        (early.status, early.code()),
        (503, "unavailable"),
        "{early:?}"
    );

    // Past the deadline the worker's reaper takes it back and records it.
    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    floodgate_tests::eventually(Duration::from_secs(20), || async {
        app.available(&a).await == Some(10)
    })
    .await;
    let late = app
        .order(&token, &[(&a, 3), (&b, 4)], Some(&key_text))
        .await;
    assert_eq!(late.status, 200, "{late:?}");
    assert_eq!(
        late.body["order_id"].as_str(),
        Some(id.to_string().as_str())
    );
    assert_eq!(late.body["status"], "failed");
    assert_eq!(late.body["reason"], "reservation_expired");
    assert_eq!(
        late.body["items"].as_array().unwrap().len(),
        2,
        "the whole order"
    );
    app.wait_idle().await;
    let outcomes = app.assert_invariants(&[id.to_string()]).await;
    assert_eq!(outcomes.get("failed:reservation_expired"), Some(&1));
}

/// The message is queued and one part is marked, but ingress died before marking the
/// other, which expired: the worker fails the order and gives back the marked part too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_that_expired_fails_the_whole_order_in_the_worker() {
    // Long enough for the two reserves, the reads and a quorum-queue publish before the
    // mark on a loaded machine.
    let ttl = Duration::from_secs(4);
    let mut app = TestApp::spawn_with(Options {
        worker: false,
        ..sharded(move |c| c.reservation_ttl = ttl)
    })
    .await;
    let (a, b) = (sku_in("a", 1), sku_in("b", 2));
    app.create_sku(&a, 10, None).await;
    app.create_sku(&b, 10, None).await;
    let user = UserId::parse("half").unwrap();
    let order = lines(&[(&a, 1), (&b, 2)]);
    let parts = app.shards.parts(
        &held_lines(order.as_slice(), &Default::default()),
        &user,
        None,
        |_| 1,
    );
    assert_eq!(parts.len(), 2);
    let id = OrderId::new();
    let now = time::OffsetDateTime::now_utc();
    let accepted_at = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let deadline_ms = ((now + ttl).unix_timestamp_nanos() / 1_000_000) as i64;
    let req = ReserveRequest {
        order_id: id,
        user: &user,
        lines: &order,
        held: None,
        first: None,
        buckets: &floodgate_common::redis::one_bucket,
        idempotency: None,
        accepted_at: &accepted_at,
        deadline_ms,
        waitlist_until_ms: None,
        idempotency_ttl_secs: 60,
        points: None,
    };
    // Re-sent (a cluster client's retry): every part is taken once.
    for _ in 0..2 {
        let d = fredis::reserve_parts(&app.redis, &app.shards, &parts, &req)
            .await
            .unwrap();
        assert_eq!(d, Reserve::Reserved);
    }
    assert_eq!(app.available(&a).await, Some(9));
    assert_eq!(app.available(&b).await, Some(8));
    app.publish_raw(
        &IntakeMessage::of(OrderPlaced {
            order_id: id,
            user_id: user.clone(),
            items: order.clone(),
            accepted_at: accepted_at.clone(),
            deadline_ms,
            idempotency_key: None,
            buckets: Default::default(),
            bundles: Default::default(),
            points: None,
        })
        .to_bytes(),
    )
    .await;
    let confirmed = ConfirmedOrder {
        order_id: id,
        user: user.clone(),
        idempotency_key: None,
    };
    let marks = fredis::mark_parts_queued(&app.redis, &app.shards, &[(parts[0].shard, &confirmed)])
        .await
        .unwrap();
    assert_eq!(marks, [fredis::Queued::Accepted]);
    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    let mut r = app.redis.clone();
    let reaped = floodgate_worker::reaper::once(&app.shards, &mut r, &app.pg)
        .await
        .unwrap();
    assert_eq!(reaped, 1, "the unmarked part only");
    assert_eq!(app.available(&b).await, Some(10));
    assert_eq!(
        app.available(&a).await,
        Some(9),
        "the queued part waits for the worker"
    );

    app.start_worker().await;
    app.wait_idle().await;
    assert_eq!(app.available(&a).await, Some(10));
    let outcomes = app.assert_invariants(&[id.to_string()]).await;
    assert_eq!(outcomes.get("failed:reservation_expired"), Some(&1));
}

/// Many buyers, two SKUs in two shards, orders of both: exactly the stock of the scarcer
/// one is sold, no unit of the other is stranded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_orders_over_shards_never_oversell() {
    let app = TestApp::spawn_with(sharded(|_| {})).await;
    let (x, y) = (sku_in("x", 0), sku_in("y", 3));
    app.create_sku(&x, 20, None).await;
    app.create_sku(&y, 35, Some(1)).await;
    let tokens: Vec<String> = (0..60).map(|u| app.customer(&format!("u{u}"))).collect();
    let items = [(x.as_str(), 1), (y.as_str(), 1)];
    let results = join_all(tokens.iter().map(|t| app.order(t, &items, None))).await;
    let accepted: Vec<String> = results
        .iter()
        .filter(|r| r.status == 202)
        .map(|r| r.body["order_id"].as_str().unwrap().to_owned())
        .collect();
    for r in &results {
        assert!(r.status == 202 || r.code() == "sold_out", "{r:?}");
    }
    assert_eq!(accepted.len(), 20);
    // A buyer who got one may not get another y: the per-user limit holds in its shard.
    let buyer = results.iter().position(|r| r.status == 202).unwrap();
    let again = app.order(&tokens[buyer], &[(&y, 1)], None).await;
    assert_eq!(
        (again.status, again.code()),
        (422, "limit_exceeded"),
        "{again:?}"
    );
    app.wait_idle().await;
    assert_eq!(app.available(&x).await, Some(0));
    assert_eq!(app.available(&y).await, Some(15));
    app.assert_invariants(&accepted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_with_another_shard_count_refuses_to_start() {
    let app = TestApp::spawn_with(sharded(|_| {})).await;
    let mut other = app.cfg.clone();
    other.redis_shards = 2;
    other.ingress_addr = "127.0.0.1:0".parse().unwrap();
    other.worker_addr = "127.0.0.1:0".parse().unwrap();
    let e = floodgate_ingress::Application::build(other.clone())
        .await
        .err()
        .expect("ingress refuses");
    assert!(
        format!("{e:#}").contains("FLOODGATE_REDIS_SHARDS is 2"),
        "{e:#}"
    );
    let e = floodgate_worker::Worker::build(other.clone())
        .await
        .err()
        .expect("worker refuses");
    assert!(format!("{e:#}").contains("4 shards"), "{e:#}");
    let e =
        floodgate_common::stock::load_if_absent(&app.pg, &mut app.redis.clone(), &other.shards())
            .await
            .expect_err("no load with another count");
    assert!(format!("{e:#}").contains("4 shards"), "{e:#}");
    let e = floodgate_notifier::Notifier::build(other)
        .await
        .err()
        .expect("notifier refuses");
    assert!(format!("{e:#}").contains("4 shards"), "{e:#}");
}

/// A part left behind by an order another part refused (its release was lost): the
/// reaper returns its units, but records nothing, since that order was answered 409 and
/// its key is free for the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leftover_part_of_a_refused_order_returns_its_units_and_records_nothing() {
    // The hand-built reservation's own deadline; the app keeps its usual TTL (the real
    // order at the end must not expire under a loaded machine).
    let ttl = Duration::from_secs(1);
    let mut app = TestApp::spawn_with(Options {
        worker: false,
        ..sharded(|_| {})
    })
    .await;
    let (a, b) = (sku_in("a", 1), sku_in("b", 2));
    app.create_sku(&a, 10, None).await;
    app.create_sku(&b, 10, None).await;
    let user = UserId::parse("left").unwrap();
    let key_text = key_in("left", 3);
    let key = IdempotencyKey::parse(&key_text).unwrap();
    let order = lines(&[(&a, 2), (&b, 3)]);
    let parts = app.shards.parts(
        &held_lines(order.as_slice(), &Default::default()),
        &user,
        Some(&key),
        |_| 1,
    );
    assert_eq!(parts.iter().map(|p| p.shard).collect::<Vec<_>>(), [3, 1, 2]);
    let id = OrderId::new();
    let now = time::OffsetDateTime::now_utc();
    let accepted_at = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let hash = floodgate_ingress::orders::body_hash(&order, false);
    let req = ReserveRequest {
        order_id: id,
        user: &user,
        lines: &order,
        held: None,
        first: None,
        buckets: &floodgate_common::redis::one_bucket,
        idempotency: Some((&key, &hash)),
        accepted_at: &accepted_at,
        deadline_ms: ((now + ttl).unix_timestamp_nanos() / 1_000_000) as i64,
        waitlist_until_ms: None,
        idempotency_ttl_secs: 60,
        points: None,
    };
    let d = fredis::reserve_parts(&app.redis, &app.shards, &parts, &req)
        .await
        .unwrap();
    assert_eq!(d, Reserve::Reserved);
    // The refusal released the deciding part and the first other one; the release of
    // the last was lost.
    for g in [3, 1] {
        let r = fredis::release(
            &mut app.redis.clone(),
            app.shards.get(g),
            &id,
            &user,
            Some(&key),
            "refused",
        )
        .await
        .unwrap();
        assert_eq!(r, fredis::Release::Released);
    }
    assert_eq!(
        app.available(&b).await,
        Some(7),
        "held by the leftover part"
    );
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    let mut r = app.redis.clone();
    let reaped = floodgate_worker::reaper::once(&app.shards, &mut r, &app.pg)
        .await
        .unwrap();
    assert_eq!(reaped, 1);
    assert_eq!(app.available(&b).await, Some(10));
    assert_eq!(
        app.scalar("SELECT count(*) FROM orders").await,
        0,
        "no phantom order"
    );
    app.start_worker().await;
    let again = app
        .order(&app.customer("left"), &[(&a, 2), (&b, 3)], Some(&key_text))
        .await;
    assert_eq!(again.status, 202, "the key is free: {again:?}");
    assert_ne!(
        again.body["order_id"].as_str(),
        Some(id.to_string().as_str())
    );
    app.wait_idle().await;
    app.assert_invariants(&[again.body["order_id"].as_str().unwrap().to_owned()])
        .await;
}

/// A namespace a version before shards loaded has no recorded count: it counts as one
/// shard, so a process with more refuses instead of looking for SKUs where they are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_from_before_shards_counts_as_one() {
    let ns = floodgate_common::Namespace::parse(&floodgate_tests::namespace()).unwrap();
    let one = floodgate_common::redis::Shards::new(&ns, 1);
    let mut con = fredis::connect(&floodgate_tests::redis_url())
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(one.first().epoch())
        .arg("before-shards")
        .query_async(&mut con)
        .await
        .unwrap();
    floodgate_common::stock::check_layout(&mut con, &one)
        .await
        .unwrap();
    let e = floodgate_common::stock::check_layout(
        &mut con,
        &floodgate_common::redis::Shards::new(&ns, SHARDS),
    )
    .await
    .unwrap_err();
    assert!(format!("{e:#}").contains("1 shards"), "{e:#}");
    con.delete_namespace(one.first()).await.unwrap();
}

/// A part reaped while its deciding part is still `reserved` (that order's publish is
/// undecided) is recorded only once the deciding part says the order may have been
/// accepted: never when its publish then fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reaped_part_waits_for_its_deciding_part() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..sharded(|_| {})
    })
    .await;
    let (a, b) = (sku_in("a", 1), sku_in("b", 2));
    app.create_sku(&a, 10, None).await;
    app.create_sku(&b, 10, None).await;
    let user = UserId::parse("wait").unwrap();
    let order = lines(&[(&a, 1), (&b, 1)]);
    let parts = app.shards.parts(
        &held_lines(order.as_slice(), &Default::default()),
        &user,
        None,
        |_| 1,
    );
    assert_eq!(parts.iter().map(|p| p.shard).collect::<Vec<_>>(), [1, 2]);
    let now = time::OffsetDateTime::now_utc();
    let accepted_at = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let ms = |d: time::OffsetDateTime| (d.unix_timestamp_nanos() / 1_000_000) as i64;
    let mut r = app.redis.clone();
    // Two orders, each with its deciding part far from due and the other part due.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let id = OrderId::new();
        for (p, deadline) in [
            (&parts[0], now + Duration::from_secs(600)),
            (&parts[1], now),
        ] {
            let req = ReserveRequest {
                order_id: id,
                user: &user,
                lines: &order,
                held: Some(&p.lines),
                first: Some(parts[0].shard),
                buckets: &floodgate_common::redis::one_bucket,
                idempotency: None,
                accepted_at: &accepted_at,
                deadline_ms: ms(deadline),
                waitlist_until_ms: None,
                idempotency_ttl_secs: 60,
                points: None,
            };
            let d = fredis::reserve(&mut r, app.shards.get(p.shard), &req)
                .await
                .unwrap();
            assert_eq!(d, Reserve::Reserved);
        }
        ids.push(id);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let reaped = floodgate_worker::reaper::once(&app.shards, &mut r, &app.pg)
        .await
        .unwrap();
    assert_eq!(reaped, 2);
    assert_eq!(app.available(&b).await, Some(10));
    assert_eq!(
        app.scalar("SELECT count(*) FROM orders").await,
        0,
        "undecided"
    );
    // The first order's publish fails; the second's is confirmed.
    let rel = fredis::release_unpublished(&app.redis, &app.shards, &[1, 2], &ids[0], &user, None)
        .await
        .unwrap();
    assert_eq!(rel, fredis::Release::Released);
    let confirmed = ConfirmedOrder {
        order_id: ids[1],
        user: user.clone(),
        idempotency_key: None,
    };
    fredis::mark_parts_queued(&app.redis, &app.shards, &[(1, &confirmed)])
        .await
        .unwrap();
    floodgate_worker::reaper::once(&app.shards, &mut r, &app.pg)
        .await
        .unwrap();
    let recorded: Vec<String> = app
        .pg
        .get()
        .await
        .unwrap()
        .query("SELECT id::text FROM orders", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        recorded,
        [ids[1].to_string()],
        "only the one that may have been accepted"
    );
}
