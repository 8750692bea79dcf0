//! DESIGN.md's crash windows, caused for real: processes SIGKILLed, servers stopped and
//! restarted (private instances on their own ports), poison messages, expired
//! reservations, lock timeouts. Each ends with the invariant check. The tests take turns
//! (one lock), because each loads the machine.
//!
//! Every test prints a `FAULT` line (accepted, outcomes, verdict) for the operators' table.

use floodgate_common::{
    amqp::{IntakeMessage, OrderPlaced},
    dlq,
    domain::{OrderId, OrderLine, OrderLines, Quantity, Sku, UserId},
    reconcile,
    redis::{self as fredis, ReserveRequest},
};
use floodgate_tests::{
    LoadResult, Options, TestApp, WorkerProcess, eventually,
    servers::{PrivatePostgres, PrivateRabbit, PrivateRedis},
};
use std::{collections::BTreeMap, time::Duration};

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const WORKER_EXE: &str = env!("CARGO_BIN_EXE_worker-process");
/// Each simulated buyer orders every 25 ms: a steady flow of orders through every fault,
/// selling out the SKU towards the end of the run.
const PACE: Duration = Duration::from_millis(25);

fn report(fault: &str, load: &LoadResult, outcomes: &BTreeMap<String, i64>) {
    let sent: usize = load.statuses.values().sum();
    eprintln!(
        "FAULT | {fault} | sent {sent} | answers {:?} | accepted {} | outcomes {outcomes:?} | invariants hold",
        load.statuses,
        load.accepted.len()
    );
}

/// The buyers of [`TestApp::load_paying`] that pay with points (every other one).
fn paying_buyers(users: usize) -> Vec<String> {
    (0..users).step_by(2).map(|u| format!("load-{u}")).collect()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_sigkilled_mid_batch_again_and_again() {
    let _turn = TURN.lock().await;
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Options::default()
    })
    .await;
    app.create_sku("kill-tee", 3000, None).await;
    // Every other buyer pays with points, and may run out of them.
    let funded = app.fund(&paying_buyers(24), 1999 * 30).await;
    let mut worker = Some(WorkerProcess::start(WORKER_EXE, &app.cfg));
    let killer = async {
        let mut kills = 0;
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            worker.take().unwrap().kill();
            kills += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            worker = Some(WorkerProcess::start(WORKER_EXE, &app.cfg));
        }
        kills
    };
    let (load, kills) = tokio::join!(
        app.load_paying("kill-tee", 24, PACE, Duration::from_secs(8), 2),
        killer
    );
    assert_eq!(kills, 4);
    assert!(load.accepted.len() > 50, "the sale ran: {load:?}");
    app.wait_idle().await;
    let outcomes = app.assert_invariants(&load.accepted).await;
    let spent = app.assert_points(&funded).await;
    assert!(spent > 0, "orders were paid with points: {load:?}");
    assert_eq!(
        outcomes.get("confirmed").copied().unwrap_or(0),
        app.scalar("SELECT sold FROM inventory").await,
        "every confirmed unit is sold once"
    );
    worker.take().unwrap().stop();
    report("worker SIGKILL x4", &load, &outcomes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_restarted_mid_load() {
    let _turn = TURN.lock().await;
    let rabbit = blocking(PrivateRabbit::start).await;
    let url = rabbit.url();
    let app = TestApp::spawn_with(Options {
        tweak: Box::new(move |c| c.amqp_url = url),
        ..Options::default()
    })
    .await;
    app.create_sku("rabbit-tee", 4000, None).await;
    // Every other buyer pays with points, and may run out of them.
    let funded = app.fund(&paying_buyers(16), 1999 * 30).await;
    let restart = async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        blocking(move || {
            let mut rabbit = rabbit;
            rabbit.restart();
            rabbit
        })
        .await
    };
    let (load, rabbit) = tokio::join!(
        app.load_paying("rabbit-tee", 16, PACE, Duration::from_secs(14), 2),
        restart
    );
    assert!(load.count(503) > 0, "the restart was felt: {load:?}");
    assert!(
        load.accepted.len() > 10,
        "orders were accepted around the restart: {load:?}"
    );
    app.wait_idle().await;
    let outcomes = app.assert_invariants(&load.accepted).await;
    let spent = app.assert_points(&funded).await;
    assert!(spent > 0, "orders were paid with points: {load:?}");
    report("RabbitMQ restart", &load, &outcomes);
    drop(app);
    drop(rabbit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_down_longer_than_the_retry_schedule() {
    let _turn = TURN.lock().await;
    let pg = blocking(PrivatePostgres::start).await;
    let url = pg.url();
    let app = TestApp::spawn_with(Options {
        tweak: Box::new(move |c| {
            c.database_url = url;
            c.retry_delays = vec![Duration::from_millis(200), Duration::from_millis(400)];
        }),
        ..Options::default()
    })
    .await;
    app.create_sku("pg-tee", 3000, None).await;
    // Every other buyer pays with points, and may run out of them.
    let funded = app.fund(&paying_buyers(16), 1999 * 30).await;
    let outage = async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pg = blocking(move || {
            let mut pg = pg;
            pg.stop_server();
            pg
        })
        .await;
        // Far longer than 200 + 400 ms: a retry spent per failure would exhaust them all.
        tokio::time::sleep(Duration::from_secs(4)).await;
        blocking(move || {
            let mut pg = pg;
            pg.start_server();
            pg
        })
        .await
    };
    let (load, pg) = tokio::join!(
        app.load_paying("pg-tee", 16, PACE, Duration::from_secs(9), 2),
        outage
    );
    assert!(load.accepted.len() > 10, "{load:?}");
    app.wait_idle().await;
    let outcomes = app.assert_invariants(&load.accepted).await;
    let spent = app.assert_points(&funded).await;
    assert!(spent > 0, "orders were paid with points: {load:?}");
    assert!(
        outcomes.keys().all(|o| o == "confirmed"),
        "an outage fails nothing: {outcomes:?}"
    );
    assert_eq!(
        app.dead_letters().await,
        0,
        "nothing dead-lettered during the outage"
    );
    report("PostgreSQL down 4 s", &load, &outcomes);
    drop(app);
    drop(pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restarted_empty_then_reconciled() {
    let _turn = TURN.lock().await;
    let mut redis = PrivateRedis::start();
    let url = redis.url();
    let app = TestApp::spawn_with(Options {
        tweak: Box::new(move |c| c.redis_url = url),
        ..Options::default()
    })
    .await;
    app.create_sku("redis-tee", 2500, None).await;
    // Every other buyer pays with points, and may run out of them.
    let funded = app.fund(&paying_buyers(16), 1999 * 30).await;
    let cfg = app.cfg.clone();
    let pg = app.pg.clone();
    let fault = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        redis.restart_empty();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut con = floodgate_common::redis::connect(&cfg.redis_url)
            .await
            .unwrap();
        reconcile::repair(
            &cfg,
            &pg,
            &mut con,
            Duration::from_millis(500),
            Duration::from_secs(60),
            |m| eprintln!("reconcile: {m}"),
        )
        .await
        .expect("reconcile");
    };
    let (load, ()) = tokio::join!(
        app.load_paying("redis-tee", 16, PACE, Duration::from_secs(9), 2),
        fault
    );
    assert!(
        load.count(503) > 0,
        "ingress refused while stock was not loaded: {load:?}"
    );
    app.wait_idle().await;
    let outcomes = app.assert_invariants(&load.accepted).await;
    let spent = app.assert_points(&funded).await;
    assert!(spent > 0, "orders were paid with points: {load:?}");
    let after = app
        .order(&app.customer("late"), &[("redis-tee", 1)], None)
        .await;
    assert!(
        after.status == 202 || after.status == 409,
        "gate open again: {after:?}"
    );
    report("Redis restarted empty + reconcile", &load, &outcomes);
    drop(app);
    drop(redis);
}

/// A reserve whose reply never comes (Redis stalls past the client's 3 s response
/// timeout; on a cluster, a failover or an overloaded node past its 2 s bound): ingress
/// answers 503, and the reservation the script made once Redis went on is given back at
/// once, not held until its deadline and then recorded as an expired order the buyer
/// never had an id for.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reserve_whose_reply_never_came_answers_503_and_holds_nothing() {
    let _turn = TURN.lock().await;
    let redis = PrivateRedis::start();
    let url = redis.url();
    let ttl = Duration::from_secs(7);
    let app = TestApp::spawn_with(Options {
        tweak: Box::new(move |c| {
            c.redis_url = url;
            c.reservation_ttl = ttl;
        }),
        ..Options::default()
    })
    .await;
    app.create_sku("stall-tee", 5, None).await;
    let token = app.customer("stall-buyer");
    let first = app
        .order(&token, &[("stall-tee", 1)], Some("stall-1"))
        .await;
    assert_eq!(first.status, 202, "{first:?}");
    app.wait_idle().await;
    // Writes (scripts that write among them) wait 4 s: the reserve is sent and runs only
    // after ingress's client gave up on it; reads go on.
    let mut admin = floodgate_common::redis::connect(&redis.url())
        .await
        .unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(4_000)
        .arg("WRITE")
        .query_async(&mut admin)
        .await
        .unwrap();
    let seq = || async {
        let n: Option<i64> = redis::cmd("GET")
            .arg(app.keys.stock_seq())
            .query_async(&mut app.redis.clone())
            .await
            .unwrap();
        n.unwrap_or(0)
    };
    let seq_before = seq().await;
    let paused = std::time::Instant::now();
    let lost = app
        .order(&token, &[("stall-tee", 1)], Some("stall-2"))
        .await;
    assert_eq!((lost.status, lost.code()), (503, "unavailable"), "{lost:?}");
    // Once Redis goes on, the reserve runs and the release sent after it gives the unit
    // back at once: well before the reservation's deadline, no reservation is open.
    tokio::time::sleep(Duration::from_millis(4_500).saturating_sub(paused.elapsed())).await;
    let open = || async {
        let n: i64 = redis::cmd("ZCARD")
            .arg(app.keys.deadlines())
            .query_async(&mut app.redis.clone())
            .await
            .unwrap();
        n
    };
    eventually(Duration::from_secs(2), || async {
        open().await == 0 && app.available("stall-tee").await == Some(4)
    })
    .await;
    assert!(paused.elapsed() < ttl, "checked before the deadline");
    assert_eq!(
        seq().await - seq_before,
        2,
        "the reserve ran (taking the unit) and then the release (giving it back)"
    );
    // Past the deadline and a reaper tick: nothing was reaped, no order was recorded for
    // the 503.
    tokio::time::sleep((ttl + Duration::from_secs(2)).saturating_sub(paused.elapsed())).await;
    assert_eq!(app.scalar("SELECT count(*) FROM orders").await, 1);
    assert_eq!(app.available("stall-tee").await, Some(4));
    assert_eq!(open().await, 0);
    // The key is free again: the same request now places the order.
    let again = app
        .order(&token, &[("stall-tee", 1)], Some("stall-2"))
        .await;
    assert_eq!(again.status, 202, "{again:?}");
    app.wait_idle().await;
    let ids: Vec<String> = [&first, &again]
        .iter()
        .map(|r| r.body["order_id"].as_str().unwrap().to_owned())
        .collect();
    let outcomes = app.assert_invariants(&ids).await;
    assert_eq!(outcomes.get("confirmed"), Some(&2), "{outcomes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_message_and_deleted_sku_are_dead_lettered_with_reasons() {
    let _turn = TURN.lock().await;
    let mut app = TestApp::spawn_with(Options {
        worker: false,
        ..Options::default()
    })
    .await;
    app.create_sku("good", 10, None).await;
    app.create_sku("doomed", 5, None).await;
    let mut accepted = Vec::new();
    for u in 0..3 {
        let r = app
            .order(&app.customer(&format!("g{u}")), &[("good", 1)], None)
            .await;
        accepted.push(r.body["order_id"].as_str().unwrap().to_owned());
    }
    let doomed = app.order(&app.customer("d"), &[("doomed", 2)], None).await;
    let doomed_id = doomed.body["order_id"].as_str().unwrap().to_owned();
    assert_eq!(app.available("doomed").await, Some(3));
    app.publish_raw(b"{this is not an order").await;
    app.pg
        .get()
        .await
        .unwrap()
        .execute("DELETE FROM skus WHERE sku = 'doomed'", &[])
        .await
        .unwrap();

    app.start_worker().await;
    eventually(Duration::from_secs(20), || async {
        app.dead_letters().await == 2 && app.scalar("SELECT count(*) FROM orders").await == 4
    })
    .await;
    assert_eq!(
        app.scalar("SELECT count(*) FROM orders WHERE status = 'confirmed'")
            .await,
        3,
        "the rest of the batch committed"
    );
    let reason: String = app
        .pg
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT status || ':' || reason FROM orders WHERE id = $1::text::uuid",
            &[&doomed_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(reason, "failed:unknown_sku");
    assert_eq!(
        app.available("doomed").await,
        Some(5),
        "its stock was released"
    );
    // What `floodgate dlq list` shows: both, with reasons, and nothing removed.
    let letters = dlq::list(&app.cfg, 10).await.unwrap();
    let mut reasons: Vec<&str> = letters.iter().map(|l| l.reason.as_str()).collect();
    reasons.sort();
    assert_eq!(reasons.len(), 2, "{letters:?}");
    assert!(reasons[0].starts_with("undecodable: "), "{reasons:?}");
    assert!(reasons[1].starts_with("unknown_sku: "), "{reasons:?}");
    assert_eq!(app.dead_letters().await, 2, "listing removes nothing");

    // `floodgate dlq replay --order <id>`: back to intake; the order, already recorded
    // failed, stays failed, its stock is not released twice, and the message is consumed.
    let (replayed, kept) = dlq::replay(
        &app.cfg,
        dlq::Select::Orders(std::slice::from_ref(&doomed_id)),
        10,
    )
    .await
    .unwrap();
    assert_eq!((replayed.len(), kept), (1, 1));
    eventually(Duration::from_secs(20), || async {
        app.dead_letters().await == 1 && app.queued().await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.available("doomed").await, Some(5));
    assert_eq!(
        app.scalar("SELECT count(*) FROM orders WHERE reason = 'unknown_sku'")
            .await,
        1
    );
    let mut outcomes = BTreeMap::new();
    outcomes.insert("confirmed".to_owned(), 3);
    outcomes.insert("failed:unknown_sku".to_owned(), 1);
    eprintln!(
        "FAULT | poison message + deleted SKU | accepted 4 | outcomes {outcomes:?} | dead letters 2 | stock released"
    );
}

/// Reserves `qty` of `sku` for `user` straight in Redis with a deadline of `ttl` from
/// now, as ingress does before it publishes. Returns the order and its message.
async fn reserve_directly(
    app: &TestApp,
    user: &str,
    sku: &str,
    qty: i64,
    ttl: Duration,
) -> (OrderId, Vec<u8>) {
    let id = OrderId::new();
    let user = UserId::parse(user).unwrap();
    let lines = OrderLines::try_from(vec![OrderLine {
        sku: Sku::parse(sku).unwrap(),
        qty: Quantity::try_from(qty).unwrap(),
    }])
    .unwrap();
    let now = time::OffsetDateTime::now_utc();
    let accepted_at = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let deadline_ms = ((now + ttl).unix_timestamp_nanos() / 1_000_000) as i64;
    let mut r = app.redis.clone();
    let decision = fredis::reserve(
        &mut r,
        app.keys_of(sku),
        &ReserveRequest {
            order_id: id,
            user: &user,
            lines: &lines,
            held: None,
            first: None,
            buckets: &floodgate_common::redis::one_bucket,
            idempotency: None,
            accepted_at: &accepted_at,
            deadline_ms,
            waitlist_until_ms: None,
            idempotency_ttl_secs: 60,
            points: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(decision, fredis::Reserve::Reserved);
    let msg = IntakeMessage::of(OrderPlaced {
        order_id: id,
        user_id: user,
        items: lines,
        accepted_at,
        deadline_ms,
        idempotency_key: None,
        buckets: Default::default(),
        bundles: Default::default(),
        points: None,
    });
    (id, msg.to_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_orders_wait_for_workers_however_long_only_unconfirmed_ones_expire() {
    let _turn = TURN.lock().await;
    let ttl = Duration::from_secs(3);
    let mut app = TestApp::spawn_with(Options {
        worker: false,
        notifier: false,
        tweak: Box::new(move |c| {
            c.reservation_ttl = ttl;
            c.publish_timeout = Duration::from_millis(1_000);
            c.reaper_interval = Duration::from_millis(200);
        }),
    })
    .await;
    app.create_sku("slow", 40, None).await;
    // Every worker is down: 30 orders are accepted and wait in the queue.
    let mut accepted = Vec::new();
    for u in 0..30 {
        let r = app
            .order(&app.customer(&format!("s{u}")), &[("slow", 1)], None)
            .await;
        assert_eq!(r.status, 202, "{:?}", r.body);
        accepted.push(r.body["order_id"].as_str().unwrap().to_owned());
    }
    // Ingress died after the reserve, before the publish: no message, no 202.
    let (lost, _) = reserve_directly(&app, "crashed", "slow", 3, ttl).await;
    // Ingress died after the confirm, before its mark and its answer: the message is
    // queued but no 202 was sent, so the reaper may take its stock back.
    let (unmarked, message) = reserve_directly(&app, "crashed2", "slow", 2, ttl).await;
    app.publish_raw(&message).await;
    assert_eq!(app.available("slow").await, Some(5));
    // Buyers who hang up the moment their request is sent: whatever ingress reserved for
    // them it still publishes and marks (or releases); nothing of theirs may be reaped.
    app.create_sku("hangup", 100, None).await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    for u in 0..20 {
        let body = r#"{"items":[{"sku":"hangup","qty":1}]}"#;
        let req = format!(
            "POST /v1/orders HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            app.customer(&format!("h{u}")),
            body.len()
        );
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(u % 4)).await;
        drop(s);
    }

    // Far past the TTL, with a reaper running as often as a worker's would (the
    // consumers are still down).
    tokio::time::sleep(ttl + Duration::from_millis(500)).await;
    let mut r = app.redis.clone();
    let reaped = floodgate_worker::reaper::once(&app.shards, &mut r, &app.pg)
        .await
        .unwrap();
    assert_eq!(
        reaped, 2,
        "only the two unconfirmed reservations expire, no hung-up buyer's"
    );
    assert_eq!(app.available("slow").await, Some(10));
    tokio::time::sleep(ttl).await;
    assert_eq!(
        floodgate_worker::reaper::once(&app.shards, &mut r, &app.pg)
            .await
            .unwrap(),
        0
    );

    app.start_worker().await;
    eventually(Duration::from_secs(30), || async {
        app.scalar(
            "SELECT count(*) FROM orders o JOIN order_items i ON i.order_id = o.id \
              WHERE i.sku = 'slow'",
        )
        .await
            == 32
    })
    .await;
    app.wait_idle().await;
    let hung_up = app
        .scalar(
            "SELECT count(*) FROM orders o JOIN order_items i ON i.order_id = o.id \
              WHERE i.sku = 'hangup' AND o.status = 'confirmed'",
        )
        .await;
    assert_eq!(
        app.scalar("SELECT count(*) FROM order_items WHERE sku = 'hangup'")
            .await,
        hung_up,
        "every order a hung-up buyer got reserved is confirmed"
    );
    assert_eq!(app.available("hangup").await, Some(100 - hung_up));
    let ids: Vec<uuid::Uuid> = accepted.iter().map(|s| s.parse().unwrap()).collect();
    let confirmed: i64 = app
        .pg
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM orders WHERE id = ANY($1) AND status = 'confirmed'",
            &[&ids],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(confirmed, 30, "every 202 ends confirmed");
    assert_eq!(
        app.scalar("SELECT count(*) FROM orders WHERE reason = 'reservation_expired'")
            .await,
        2
    );
    assert_eq!(app.available("slow").await, Some(10));
    assert_eq!(
        app.scalar("SELECT sold FROM inventory WHERE sku = 'slow'")
            .await,
        30
    );
    assert_eq!(
        app.scalar("SELECT count(*) FROM stock_movements WHERE kind = 'release'")
            .await,
        2
    );
    let mut all = accepted.clone();
    all.push(lost.to_string());
    all.push(unmarked.to_string());
    let outcomes = app.assert_invariants(&all).await;
    eprintln!(
        "FAULT | no worker for {:?} (TTL {ttl:?}) | accepted 30 | outcomes {outcomes:?} | 2 unconfirmed reservations reaped; {hung_up} of 20 hung-up buyers' orders confirmed, none reaped; invariants hold",
        ttl * 2 + Duration::from_millis(500)
    );
}

/// Holds the inventory row lock of `sku` for `hold`, from another connection.
async fn hold_row_lock(
    app: &TestApp,
    sku: &'static str,
    hold: Duration,
) -> tokio::task::JoinHandle<()> {
    let pool = app.pg.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let h = tokio::spawn(async move {
        let mut db = pool.get().await.unwrap();
        let t = db.transaction().await.unwrap();
        t.execute("SELECT 1 FROM inventory WHERE sku = $1 FOR UPDATE", &[&sku])
            .await
            .unwrap();
        let _ = tx.send(());
        tokio::time::sleep(hold).await;
        t.rollback().await.unwrap();
    });
    rx.await.unwrap();
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_retry_through_delay_queues() {
    let _turn = TURN.lock().await;
    let app = TestApp::spawn_with(Options {
        tweak: Box::new(|c| {
            c.db_lock_timeout = Duration::from_millis(200);
            c.retry_delays = vec![
                Duration::from_millis(300),
                Duration::from_millis(600),
                Duration::from_millis(1200),
                Duration::from_millis(2400),
            ];
        }),
        ..Options::default()
    })
    .await;
    app.create_sku("locked", 10, None).await;
    let lock = hold_row_lock(&app, "locked", Duration::from_millis(1500)).await;
    let mut accepted = Vec::new();
    for u in 0..3 {
        let r = app
            .order(&app.customer(&format!("l{u}")), &[("locked", 1)], None)
            .await;
        accepted.push(r.body["order_id"].as_str().unwrap().to_owned());
    }
    lock.await.unwrap();
    eventually(Duration::from_secs(20), || async {
        app.scalar("SELECT count(*) FROM orders WHERE status = 'confirmed'")
            .await
            == 3
    })
    .await;
    app.wait_idle().await;
    let metrics = app.get("/metrics", None).await;
    assert!(
        metrics
            .body
            .as_str()
            .unwrap()
            .contains("floodgate_worker_retries_scheduled_total"),
        "retries went through the delay queues"
    );
    assert_eq!(app.dead_letters().await, 0);
    let outcomes = app.assert_invariants(&accepted).await;
    eprintln!(
        "FAULT | row lock held 1.5 s (lock_timeout 200 ms) | accepted 3 | outcomes {outcomes:?} | retried, invariants hold"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_dead_letter_and_release() {
    let _turn = TURN.lock().await;
    let app = TestApp::spawn_with(Options {
        tweak: Box::new(|c| {
            c.db_lock_timeout = Duration::from_millis(100);
            c.retry_delays = vec![Duration::from_millis(100), Duration::from_millis(200)];
        }),
        ..Options::default()
    })
    .await;
    app.create_sku("stuck", 10, None).await;
    let lock = hold_row_lock(&app, "stuck", Duration::from_secs(4)).await;
    let r = app.order(&app.customer("x"), &[("stuck", 4)], None).await;
    let id = r.body["order_id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(20), || async {
        app.dead_letters().await == 1
    })
    .await;
    lock.await.unwrap();
    app.wait_idle().await;
    assert_eq!(
        app.scalar("SELECT count(*) FROM orders WHERE reason = 'retries_exhausted'")
            .await,
        1
    );
    assert_eq!(
        app.available("stuck").await,
        Some(10),
        "its stock was released"
    );
    let outcomes = app.assert_invariants(&[id]).await;
    eprintln!(
        "FAULT | row lock held past the whole retry schedule | accepted 1 | outcomes {outcomes:?} | dead-lettered, invariants hold"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_check_finds_drift_and_repair_fixes_it() {
    let _turn = TURN.lock().await;
    let app = TestApp::spawn().await;
    app.create_sku("drift", 10, None).await;
    let r = app.order(&app.customer("a"), &[("drift", 2)], None).await;
    app.wait_idle().await;
    app.assert_invariants(&[r.body["order_id"].as_str().unwrap().to_owned()])
        .await;

    let mut con = app.redis.clone();
    let _: () = redis::cmd("HSET")
        .arg(app.keys_of("drift").stock())
        .arg("drift")
        .arg(50)
        .query_async(&mut con)
        .await
        .unwrap();
    let found = reconcile::check(&app.pg, &mut con, &app.shards, 1)
        .await
        .unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].kind, "redis_differs");

    reconcile::repair(
        &app.cfg,
        &app.pg,
        &mut con,
        Duration::from_millis(200),
        Duration::from_secs(30),
        |_| {},
    )
    .await
    .unwrap();
    assert!(
        reconcile::check(&app.pg, &mut con, &app.shards, 1)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(app.available("drift").await, Some(8));

    // Stock not loaded: reported, and ingress stays closed until the repair.
    let _: () = redis::cmd("DEL")
        .arg(app.keys.epoch())
        .query_async(&mut con)
        .await
        .unwrap();
    let found = reconcile::check(&app.pg, &mut con, &app.shards, 1)
        .await
        .unwrap();
    assert!(
        found.iter().any(|v| v.kind == "stock_not_loaded"),
        "{found:?}"
    );
    assert_eq!(
        app.order(&app.customer("b"), &[("drift", 1)], None)
            .await
            .status,
        503
    );
    reconcile::repair(
        &app.cfg,
        &app.pg,
        &mut con,
        Duration::from_millis(200),
        Duration::from_secs(30),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(
        app.order(&app.customer("b"), &[("drift", 1)], None)
            .await
            .status,
        202
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reused_after_redis_forgot_it_fails_that_order_and_jams_nothing() {
    let _turn = TURN.lock().await;
    let app = TestApp::spawn().await;
    app.create_sku("keyed", 10, None).await;
    let buyer = app.customer("k");
    let first = app.order(&buyer, &[("keyed", 1)], Some("checkout-1")).await;
    assert_eq!(first.status, 202);
    app.wait_idle().await;
    // Redis forgets the key (its TTL passed); PostgreSQL still holds it on the first order.
    let mut r = app.redis.clone();
    let mut idem = r.namespace_keys(&app.keys).await.unwrap();
    idem.retain(|k| k.contains(":idem:"));
    assert_eq!(idem.len(), 1, "{idem:?}");
    let _: () = redis::cmd("DEL")
        .arg(&idem)
        .query_async(&mut r)
        .await
        .unwrap();
    let second = app.order(&buyer, &[("keyed", 2)], Some("checkout-1")).await;
    assert_eq!(second.status, 202, "{:?}", second.body);
    let second_id = second.body["order_id"].as_str().unwrap().to_owned();
    // The second order fails for its key, is dead-lettered, and gives its stock back;
    // the worker carries on (a later order is confirmed).
    eventually(Duration::from_secs(20), || async {
        app.scalar("SELECT count(*) FROM orders WHERE reason = 'duplicate_idempotency_key'")
            .await
            == 1
    })
    .await;
    let later = app
        .order(&app.customer("other"), &[("keyed", 1)], None)
        .await;
    assert_eq!(later.status, 202);
    app.wait_idle().await;
    assert_eq!(app.dead_letters().await, 1);
    assert_eq!(app.available("keyed").await, Some(8));
    let ids = [
        first.body["order_id"].as_str().unwrap().to_owned(),
        second_id,
        later.body["order_id"].as_str().unwrap().to_owned(),
    ];
    let outcomes = app.assert_invariants(&ids).await;
    eprintln!(
        "FAULT | Idempotency-Key reused after Redis forgot it | accepted 3 | outcomes {outcomes:?} | dead-lettered, nothing jammed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_task_that_keeps_dying_makes_readyz_name_it() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Options::default()
    })
    .await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let w = floodgate_tests::WorkerProcess::start_with(
        WORKER_EXE,
        &app.cfg,
        &[
            ("FLOODGATE_TEST_FAILPOINT", "outbox_panic"),
            ("FLOODGATE_WORKER_ADDR", &addr),
        ],
    );
    let url = format!("http://{addr}/readyz");
    // Five quick panics with backoff between them: a few seconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut seen;
    let last = loop {
        let got = reqwest::get(&url).await;
        seen = format!("{got:?}");
        if let Ok(r) = got {
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            if status == 503 && body["tasks"]["outbox_relay"] == "dead" {
                break body;
            }
            seen = format!("{status} {body}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "readyz never named the dead relay: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Only the dead task is down; the reaper and every dependency are fine.
    assert_eq!(
        last["down"],
        serde_json::json!(["task:outbox_relay"]),
        "{last}"
    );
    assert_eq!(last["tasks"]["reaper"], "running", "{last}");
    w.stop();
}
