//! What an operator watches, read from the services' `/metrics`: process metrics on
//! every service, the queue gauges and the queue wait, and the consistency gauges.
//!
//! The gauges have no namespace label and the metrics recorder is per process, so the
//! services whose gauges are read run as real processes of their own (the in-process
//! services of parallel tests would overwrite each other's values).

use floodgate_tests::{Options, TestApp, WorkerProcess, env_of};
use std::time::{Duration, Instant};

const INGRESS_EXE: &str = env!("CARGO_BIN_EXE_ingress-process");
const WORKER_EXE: &str = env!("CARGO_BIN_EXE_worker-process");

/// The value of the sample `series` (a name, with its labels as rendered:
/// `name{queue="intake"}`) in a Prometheus text page.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

async fn metrics_page(base: &str) -> String {
    match reqwest::get(format!("{base}/metrics")).await {
        Ok(r) if r.status() == 200 => r.text().await.unwrap_or_default(),
        _ => String::new(),
    }
}

/// Polls `base`'s `/metrics` until `ok` holds for the page; panics with the last page
/// after `timeout`.
async fn metrics_until(base: &str, timeout: Duration, what: &str, ok: impl Fn(&str) -> bool) {
    let until = Instant::now() + timeout;
    loop {
        let page = metrics_page(base).await;
        if ok(&page) {
            return;
        }
        assert!(
            Instant::now() < until,
            "{what}: not seen within {timeout:?} on {base}/metrics:\n{}",
            page.lines()
                .filter(|l| l.starts_with("floodgate_queue")
                    || l.starts_with("floodgate_consistency")
                    || l.starts_with("floodgate_worker_queue_wait_seconds_count"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn free_addr() -> String {
    format!("127.0.0.1:{}", floodgate_tests::servers::free_port())
}

/// An ingress as a real process, on `addr`; killed on drop.
struct IngressProcess(std::process::Child);

impl IngressProcess {
    fn start(app: &TestApp, addr: &str) -> Self {
        let child = std::process::Command::new(INGRESS_EXE)
            .envs(env_of(&app.cfg))
            .env("FLOODGATE_INGRESS_ADDR", addr)
            .env("FLOODGATE_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start the ingress process");
        Self(child)
    }
}

impl Drop for IngressProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_exports_process_metrics() {
    let app = TestApp::spawn_with(Options {
        notifier: true,
        ..Options::default()
    })
    .await;
    let bases = [
        app.base.clone(),
        app.worker_url.clone().unwrap(),
        app.notifier.clone().unwrap(),
    ];
    for base in bases {
        let page = metrics_page(&base).await;
        let get = |name: &str| {
            sample(&page, name).unwrap_or_else(|| panic!("{name} missing on {base}/metrics"))
        };
        assert!(get("process_resident_memory_bytes") > 1_000_000.0, "{base}");
        assert!(get("process_open_fds") > 0.0, "{base}");
        assert!(get("process_max_fds") >= get("process_open_fds"), "{base}");
        assert!(get("process_threads") >= 1.0, "{base}");
        assert!(get("process_cpu_seconds_total") > 0.0, "{base}");
        let started = get("process_start_time_seconds");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            started > now - 3600.0 && started <= now,
            "{base}: {started}"
        );
    }
    // Rare-event counters are there at 0 before their first event, so an alert on
    // `increase()` sees the first one (the services here share one recorder).
    let page = metrics_page(&app.base).await;
    for series in [
        r#"floodgate_worker_dead_lettered_total{reason="undecodable"}"#,
        r#"floodgate_worker_dead_lettered_total{reason="retries_exhausted"}"#,
        "floodgate_reservations_reaped_total",
        r#"floodgate_queued_mark_failures_total{outcome="unmarked"}"#,
        r#"floodgate_task_failures_total{task="reaper"}"#,
        r#"floodgate_amqp_reconnects_total{service="ingress"}"#,
    ] {
        assert!(
            sample(&page, series).is_some(),
            "{series} missing before any event"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_gauges_and_the_queue_wait_come_from_floodgate_itself() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Options::default()
    })
    .await;
    app.create_sku("gauge", 100, None).await;
    for i in 0..5 {
        let r = app
            .order(&app.customer(&format!("q{i}")), &[("gauge", 1)], None)
            .await;
        assert_eq!(r.status, 202, "{r:?}");
    }
    // An ingress of its own polls the queues: five waiting, nobody consuming.
    let ingress_addr = free_addr();
    let _ingress = IngressProcess::start(&app, &ingress_addr);
    let ingress = format!("http://{ingress_addr}");
    metrics_until(
        &ingress,
        Duration::from_secs(30),
        "5 queued, no consumer",
        |p| {
            sample(p, r#"floodgate_queue_messages{queue="intake"}"#) == Some(5.0)
                && sample(p, r#"floodgate_queue_consumers{queue="intake"}"#) == Some(0.0)
                && sample(p, r#"floodgate_queue_messages{queue="retry"}"#) == Some(0.0)
                && sample(p, r#"floodgate_queue_messages{queue="dead"}"#) == Some(0.0)
        },
    )
    .await;
    // One of them is taken and given back, as by a worker that died with it: its next
    // delivery is a redelivery, and its wait was the first taker's to measure.
    let taken = app
        .channel
        .basic_get(
            app.topology.partitions[0].queue.as_str().into(),
            Default::default(),
        )
        .await
        .unwrap()
        .expect("a queued order");
    taken
        .delivery
        .acker
        .nack(lapin::options::BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    // Let them wait a measurable while, then a worker takes them.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let worker_addr = free_addr();
    let worker = WorkerProcess::start_with(
        WORKER_EXE,
        &app.cfg,
        &[("FLOODGATE_WORKER_ADDR", &worker_addr)],
    );
    let worker_url = format!("http://{worker_addr}");
    app.wait_idle().await;
    // Every order first taken by the worker was measured once, from its publish, and
    // each waited over a second; the redelivered one was not.
    metrics_until(
        &worker_url,
        Duration::from_secs(30),
        "4 waits of > 1 s",
        |p| {
            sample(p, "floodgate_worker_queue_wait_seconds_count") == Some(4.0)
                && sample(p, "floodgate_worker_queue_wait_seconds_sum").is_some_and(|s| s > 4.0)
                && sample(p, r#"floodgate_worker_queue_wait_seconds_bucket{le="0.5"}"#) == Some(0.0)
        },
    )
    .await;
    // A message without the publish header (an older ingress's) is consumed as ever, not
    // measured, nor is a scheduled retry (its wait includes its delay); undecodable, both
    // land in the dead-letter queue, and the gauges of both processes say so: the queue
    // drained, one consumer, two dead letters.
    app.publish_raw(b"not an order").await;
    let retry_headers: lapin::types::FieldTable = [
        (
            floodgate_common::amqp::PUBLISHED_HEADER.into(),
            lapin::types::AMQPValue::LongLongInt(floodgate_common::amqp::unix_ms() - 60_000),
        ),
        (
            floodgate_common::amqp::ATTEMPT_HEADER.into(),
            lapin::types::AMQPValue::LongLongInt(1),
        ),
    ]
    .into_iter()
    .collect::<std::collections::BTreeMap<_, _>>()
    .into();
    app.channel
        .basic_publish(
            app.topology.orders_exchange.as_str().into(),
            app.topology.partitions[0].key.as_str().into(),
            Default::default(),
            b"not an order either",
            lapin::BasicProperties::default()
                .with_headers(retry_headers)
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    for base in [&ingress, &worker_url] {
        metrics_until(
            base,
            Duration::from_secs(30),
            "drained, 2 dead letters",
            |p| {
                sample(p, r#"floodgate_queue_messages{queue="intake"}"#) == Some(0.0)
                    && sample(p, r#"floodgate_queue_consumers{queue="intake"}"#) == Some(1.0)
                    && sample(p, r#"floodgate_queue_messages{queue="dead"}"#) == Some(2.0)
            },
        )
        .await;
    }
    assert_eq!(
        sample(
            &metrics_page(&worker_url).await,
            "floodgate_worker_queue_wait_seconds_count"
        ),
        Some(4.0)
    );

    // A poll that fails (a queue gone) kills nothing: the gauges keep the last values
    // read (a backlog alert keeps firing) and the poll timestamp stops; once the queue is
    // back they read again and the timestamp moves on. Ingress stays ready throughout.
    let polled = |p: &str| sample(p, "floodgate_queue_polled_timestamp_seconds");
    let reconnects = |p: &str| {
        sample(
            p,
            r#"floodgate_amqp_reconnects_total{service="queue_depth"}"#,
        )
        .unwrap_or(0.0)
    };
    let before = metrics_page(&ingress).await;
    assert!(polled(&before).is_some(), "no poll timestamp");
    let failed_before = reconnects(&before);
    app.channel
        .queue_delete(app.topology.dead_queue.as_str().into(), Default::default())
        .await
        .unwrap();
    let deleted_at = floodgate_common::telemetry::unix_secs();
    // A poll failed and the link was rebuilt: polls after the delete fail.
    metrics_until(&ingress, Duration::from_secs(30), "a failed poll", |p| {
        reconnects(p) > failed_before
    })
    .await;
    let stale = metrics_page(&ingress).await;
    let last_poll = polled(&stale).unwrap();
    // (A poll that read the dead queue just before the delete records just after it.)
    assert!(
        last_poll < deleted_at + 1.0,
        "polled at {last_poll}, after the delete at {deleted_at}"
    );
    assert_eq!(
        sample(&stale, r#"floodgate_queue_messages{queue="dead"}"#),
        Some(2.0)
    );
    assert_eq!(
        sample(&stale, r#"floodgate_queue_messages{queue="intake"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(&stale, r#"floodgate_queue_consumers{queue="intake"}"#),
        Some(1.0)
    );
    // More than a poll interval later, still the same: the timestamp does not advance.
    tokio::time::sleep(floodgate_common::amqp::depth::POLL_INTERVAL + Duration::from_secs(1)).await;
    let still = metrics_page(&ingress).await;
    assert_eq!(polled(&still), Some(last_poll));
    assert_eq!(
        sample(&still, r#"floodgate_queue_messages{queue="dead"}"#),
        Some(2.0)
    );
    let ready = reqwest::get(format!("{ingress}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    app.topology.declare(&app.channel).await.unwrap();
    metrics_until(&ingress, Duration::from_secs(30), "read again", |p| {
        sample(p, r#"floodgate_queue_messages{queue="dead"}"#) == Some(0.0)
            && sample(p, r#"floodgate_queue_consumers{queue="intake"}"#) == Some(1.0)
            && polled(p).is_some_and(|t| t > last_poll)
    })
    .await;
    let ready = reqwest::get(format!("{ingress}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    worker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consistency_gauges_see_redis_drift_and_its_repair() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Options::default()
    })
    .await;
    app.create_sku("drift", 10, None).await;
    let addr = free_addr();
    let worker = WorkerProcess::start_with(
        WORKER_EXE,
        &app.cfg,
        &[
            ("FLOODGATE_WORKER_ADDR", &addr),
            ("FLOODGATE_CONSISTENCY_CHECK_SECS", "1"),
        ],
    );
    let url = format!("http://{addr}");
    let violations = |p: &str| sample(p, "floodgate_consistency_violations");
    let checked = |p: &str| sample(p, "floodgate_consistency_checked_timestamp_seconds");
    metrics_until(&url, Duration::from_secs(30), "a clean check", |p| {
        violations(p) == Some(0.0) && checked(p).is_some()
    })
    .await;

    // Redis changed behind floodgate's back: 3 units fewer than PostgreSQL says.
    let set_stock = |n: i64| {
        let (mut redis, keys) = (app.redis.clone(), app.keys_of("drift").clone());
        async move {
            let _: () = redis::cmd("HSET")
                .arg(keys.stock())
                .arg("drift")
                .arg(n)
                .query_async(&mut redis)
                .await
                .unwrap();
        }
    };
    set_stock(7).await;
    metrics_until(&url, Duration::from_secs(30), "the drift counted", |p| {
        violations(p).is_some_and(|v| v >= 1.0)
    })
    .await;
    let seen_at = checked(&metrics_page(&url).await).unwrap();

    // Repaired: the next completed check finds nothing.
    set_stock(10).await;
    metrics_until(&url, Duration::from_secs(30), "the repair seen", |p| {
        violations(p) == Some(0.0) && checked(p).is_some_and(|t| t > seen_at)
    })
    .await;

    // Another worker holds the check lock: this one's turns complete no check, so its
    // count is NaN (not current; `max` over the workers skips it) and its timestamp stays
    // at its last completed check.
    let mut other = app.pg.get().await.unwrap();
    let held = other.transaction().await.unwrap();
    held.execute(
        "SELECT pg_advisory_xact_lock(hashtext('floodgate-consistency:' || $1))",
        &[&app.cfg.namespace.as_str()],
    )
    .await
    .unwrap();
    metrics_until(&url, Duration::from_secs(30), "NaN while skipping", |p| {
        violations(p).is_some_and(f64::is_nan)
    })
    .await;
    let last = checked(&metrics_page(&url).await).unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let page = metrics_page(&url).await;
    assert!(violations(&page).is_some_and(f64::is_nan));
    assert_eq!(checked(&page), Some(last));
    held.rollback().await.unwrap();
    metrics_until(&url, Duration::from_secs(30), "checking again", |p| {
        violations(p) == Some(0.0) && checked(p).is_some_and(|t| t > last)
    })
    .await;
    worker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_of_a_namespace_checks_at_a_time() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Options::default()
    })
    .await;
    app.create_sku("locked", 4, None).await;
    let keys = app.shards.clone();
    let mut redis = app.redis.clone();
    // Another worker holds the namespace's check lock: this one skips its turn.
    let mut other = app.pg.get().await.unwrap();
    let held = other.transaction().await.unwrap();
    held.execute(
        "SELECT pg_advisory_xact_lock(hashtext('floodgate-consistency:' || $1))",
        &[&app.cfg.namespace.as_str()],
    )
    .await
    .unwrap();
    let turn = floodgate_worker::consistency::once(&app.cfg.namespace, &keys, &mut redis, &app.pg)
        .await
        .unwrap();
    assert_eq!(turn, floodgate_worker::consistency::Turn::Skipped);
    // Released: the next turn checks (and finds this namespace consistent).
    held.rollback().await.unwrap();
    let turn = floodgate_worker::consistency::once(&app.cfg.namespace, &keys, &mut redis, &app.pg)
        .await
        .unwrap();
    assert_eq!(turn, floodgate_worker::consistency::Turn::Checked(vec![]));
    // ... and gave the lock back: no pooled connection keeps it.
    let free: bool = other
        .query_one(
            "SELECT pg_try_advisory_lock(hashtext('floodgate-consistency:' || $1))",
            &[&app.cfg.namespace.as_str()],
        )
        .await
        .unwrap()
        .get(0);
    assert!(free, "the check lock is still held after the check");
    other
        .execute(
            "SELECT pg_advisory_unlock(hashtext('floodgate-consistency:' || $1))",
            &[&app.cfg.namespace.as_str()],
        )
        .await
        .unwrap();
    // A check abandoned at any point (the worker's timeout, shutdown) leaves no pooled
    // connection holding the lock: its connection is closed, which ends the lock.
    for ms in [1, 3, 10, 30, 100] {
        let _ = tokio::time::timeout(
            Duration::from_millis(ms),
            floodgate_worker::consistency::once(&app.cfg.namespace, &keys, &mut redis, &app.pg),
        )
        .await;
        floodgate_tests::eventually(Duration::from_secs(10), || async {
            let free: bool = other
                .query_one(
                    "SELECT pg_try_advisory_lock(hashtext('floodgate-consistency:' || $1))",
                    &[&app.cfg.namespace.as_str()],
                )
                .await
                .unwrap()
                .get(0);
            if free {
                other
                    .execute(
                        "SELECT pg_advisory_unlock(hashtext('floodgate-consistency:' || $1))",
                        &[&app.cfg.namespace.as_str()],
                    )
                    .await
                    .unwrap();
            }
            free
        })
        .await;
        // And the pool still serves: a whole turn checks.
        let turn =
            floodgate_worker::consistency::once(&app.cfg.namespace, &keys, &mut redis, &app.pg)
                .await
                .unwrap();
        assert_eq!(turn, floodgate_worker::consistency::Turn::Checked(vec![]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_check_counts_every_open_reservation_of_a_large_namespace_once() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        ..Options::default()
    })
    .await;
    app.create_sku("many", 10_000, None).await;
    // 2,500 reservations in every state (more than one ZSCAN step and one pipeline of the
    // check), written as reserve.lua writes them; Redis's level is what the open ones
    // leave.
    let mut redis = app.redis.clone();
    let mut pipe = redis::pipe();
    let mut held = 0;
    for i in 0..2_500i64 {
        let id = floodgate_common::domain::OrderId::new();
        let state = ["reserved", "queued", "claimed", "done", "released"][i as usize % 5];
        let qty = 1 + i % 3;
        let items = format!(r#"[{{"sku":"many","qty":{qty}}}]"#);
        pipe.cmd("HSET")
            .arg(app.keys_of("many").resv(&id))
            .arg(&[("state", state), ("user", "many-user"), ("items", &items)])
            .ignore();
        pipe.cmd("ZADD")
            .arg(app.keys_of("many").deadlines())
            .arg(4_102_444_800_000 + i) // 2100: the reaper leaves them be
            .arg(id.to_string())
            .ignore();
        if !["done", "released"].contains(&state) {
            held += qty;
        }
    }
    pipe.cmd("HINCRBY")
        .arg(app.keys_of("many").stock())
        .arg("many")
        .arg(-held)
        .ignore();
    let _: () = pipe.query_async(&mut redis).await.unwrap();
    let found = floodgate_common::reconcile::check(&app.pg, &mut redis, &app.shards, 1)
        .await
        .unwrap();
    assert_eq!(found, vec![], "{held} units held");
    // One unit off is seen, with the exact count.
    let _: () = redis::cmd("HINCRBY")
        .arg(app.keys_of("many").stock())
        .arg("many")
        .arg(-1)
        .query_async(&mut redis)
        .await
        .unwrap();
    let found = floodgate_common::reconcile::check(&app.pg, &mut redis, &app.shards, 1)
        .await
        .unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].kind, "redis_differs");
    let expected = 10_000 - held;
    assert!(
        found[0].detail.ends_with(&format!("= {expected}")),
        "{found:?}"
    );
}
