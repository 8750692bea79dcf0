//! Intake partitions (`FLOODGATE_INTAKE_PARTITIONS`) on the default RabbitMQ, each test in
//! its own namespace: an order lands in the partition its first SKU picks, every
//! partition is consumed, a scheduled retry comes back to its own partition, a dead
//! letter replays to its own partition, and partitions left over after lowering the
//! setting are drained. The broker list (`FLOODGATE_AMQP_URL`) is exercised too: every
//! test's list starts with a node that refuses connections.

use floodgate_common::{
    Config,
    amqp::{Link, partition_of},
    dlq,
};
use floodgate_tests::{Options, TestApp, eventually};
use lapin::{options::QueueDeclareOptions, types::FieldTable};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const PARTITIONS: usize = 3;

/// A SKU name that [`partition_of`] puts in partition `p` of [`PARTITIONS`].
fn sku_in(p: usize, tag: &str) -> String {
    (0..)
        .map(|k| format!("{tag}{k}"))
        .find(|s| partition_of(s, PARTITIONS) == p)
        .unwrap()
}

/// `url` behind a node that refuses connections: every link must fail over to `url`.
fn with_dead_node_first(url: &str) -> String {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f,{url}")
}

fn partitioned(tweak: impl FnOnce(&mut Config) + Send + 'static, worker: bool) -> Options {
    Options {
        worker,
        tweak: Box::new(move |c| {
            c.intake_partitions = PARTITIONS;
            c.amqp_url = with_dead_node_first(&c.amqp_url);
            tweak(c);
        }),
        ..Options::default()
    }
}

/// Messages ready in each intake partition, in order.
async fn depths(app: &TestApp) -> Vec<u32> {
    let mut out = Vec::new();
    for p in &app.topology.partitions {
        out.push(app.queue_info(&p.queue).await.0);
    }
    out
}

/// Messages waiting in each partition's delay queues, all steps together.
async fn retry_depths(app: &TestApp) -> Vec<u32> {
    let mut out = Vec::new();
    for p in &app.topology.partitions {
        let mut n = 0;
        for q in &p.retry_queues {
            n += app.queue_info(q).await.0;
        }
        out.push(n);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_land_in_their_skus_partition_and_every_partition_is_consumed() {
    let mut app = TestApp::spawn_with(partitioned(|_| {}, false)).await;
    let skus: Vec<String> = (0..PARTITIONS).map(|p| sku_in(p, "spread")).collect();
    for s in &skus {
        app.create_sku(s, 100, None).await;
    }
    let mut accepted = Vec::new();
    for (p, sku) in skus.iter().enumerate() {
        for u in 0..=p + 1 {
            let r = app
                .order(&app.customer(&format!("u{p}-{u}")), &[(sku, 1)], None)
                .await;
            assert_eq!(r.status, 202, "{r:?}");
            accepted.push(r.body["order_id"].as_str().unwrap().to_owned());
        }
    }
    // A two-line order goes by its first line's SKU.
    let r = app
        .order(
            &app.customer("multi"),
            &[(&skus[2], 1), (&skus[0], 1)],
            None,
        )
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    accepted.push(r.body["order_id"].as_str().unwrap().to_owned());
    assert_eq!(depths(&app).await, [2, 3, 5]);
    assert_eq!(app.queued().await, 10);

    app.start_worker().await;
    app.wait_idle().await;
    for p in &app.topology.partitions {
        assert_eq!(
            app.queue_info(&p.queue).await,
            (0, 1),
            "{} drained by the worker",
            p.queue
        );
    }
    let outcomes = app.assert_invariants(&accepted).await;
    assert_eq!(outcomes.get("confirmed"), Some(&10), "{outcomes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_retry_comes_back_to_its_own_partition() {
    let mut app = TestApp::spawn_with(partitioned(
        |c| {
            c.db_lock_timeout = Duration::from_millis(200);
            c.retry_delays = vec![Duration::from_secs(2); 3];
        },
        true,
    ))
    .await;
    let sku = sku_in(2, "retried");
    app.create_sku(&sku, 10, None).await;
    // The row stays locked while the worker runs: the order can only be retried.
    let pool = app.pg.clone();
    let (locked_tx, locked) = tokio::sync::oneshot::channel();
    let (release_tx, release) = tokio::sync::oneshot::channel::<()>();
    let lock_sku = sku.clone();
    let holder = tokio::spawn(async move {
        let mut db = pool.get().await.unwrap();
        let t = db.transaction().await.unwrap();
        t.execute(
            "SELECT 1 FROM inventory WHERE sku = $1 FOR UPDATE",
            &[&lock_sku],
        )
        .await
        .unwrap();
        let _ = locked_tx.send(());
        let _ = release.await;
        t.rollback().await.unwrap();
    });
    locked.await.unwrap();
    let r = app.order(&app.customer("r"), &[(&sku, 1)], None).await;
    assert_eq!(r.status, 202, "{r:?}");
    let id = r.body["order_id"].as_str().unwrap().to_owned();

    // Scheduled in partition 2's own delay queue...
    eventually(Duration::from_secs(20), || async {
        retry_depths(&app).await == [0, 0, 1]
    })
    .await;
    // ... and, with no worker to take it, back in partition 2 once its TTL passed.
    app.stop_worker().await;
    eventually(Duration::from_secs(20), || async {
        retry_depths(&app).await == [0, 0, 0] && depths(&app).await == [0, 0, 1]
    })
    .await;

    release_tx.send(()).unwrap();
    holder.await.unwrap();
    app.start_worker().await;
    app.wait_idle().await;
    let outcomes = app.assert_invariants(&[id]).await;
    assert_eq!(outcomes.get("confirmed"), Some(&1), "{outcomes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_replays_to_its_own_partition() {
    let mut app = TestApp::spawn_with(partitioned(|_| {}, false)).await;
    let sku = sku_in(1, "doomed");
    app.create_sku(&sku, 5, None).await;
    let r = app.order(&app.customer("d"), &[(&sku, 2)], None).await;
    assert_eq!(r.status, 202, "{r:?}");
    let id = r.body["order_id"].as_str().unwrap().to_owned();
    assert_eq!(depths(&app).await, [0, 1, 0]);
    // Unknown to PostgreSQL by the time a worker takes it: a permanent failure.
    app.pg
        .get()
        .await
        .unwrap()
        .execute("DELETE FROM skus WHERE sku = $1", &[&sku])
        .await
        .unwrap();
    app.start_worker().await;
    eventually(Duration::from_secs(20), || async {
        app.dead_letters().await == 1
    })
    .await;
    let letters = dlq::list(&app.cfg, 10).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].partition, 1, "{letters:?}");

    app.stop_worker().await;
    let (replayed, kept) = dlq::replay(&app.cfg, dlq::Select::All, 10).await.unwrap();
    assert_eq!((replayed.len(), kept), (1, 0));
    assert_eq!(depths(&app).await, [0, 1, 0], "replayed to partition 1");
    assert_eq!(app.dead_letters().await, 0);

    app.start_worker().await;
    app.wait_idle().await;
    assert_eq!(depths(&app).await, [0, 0, 0]);
    // The SKU went from PostgreSQL behind floodgate's back: Redis forgets it too, as
    // `floodgate reconcile` would make it.
    let _: i64 = redis::cmd("HDEL")
        .arg(app.keys_of(&sku).stock())
        .arg(&sku)
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
    let outcomes = app.assert_invariants(&[id]).await;
    assert_eq!(outcomes.get("failed:unknown_sku"), Some(&1), "{outcomes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_left_over_after_lowering_the_setting_are_drained() {
    let app = TestApp::spawn_with(partitioned(|_| {}, false)).await;
    let sku = sku_in(2, "left");
    app.create_sku(&sku, 50, None).await;
    let mut accepted = Vec::new();
    for u in 0..5 {
        let r = app
            .order(&app.customer(&format!("l{u}")), &[(&sku, 1)], None)
            .await;
        assert_eq!(r.status, 202, "{r:?}");
        accepted.push(r.body["order_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(depths(&app).await, [0, 0, 5]);

    // A worker configured with two partitions finds partition 2 and drains it.
    let mut cfg = app.cfg.clone();
    cfg.intake_partitions = 2;
    let stop = CancellationToken::new();
    let worker = floodgate_worker::Worker::build(cfg).await.unwrap();
    let running = tokio::spawn(worker.run_until_stopped(stop.clone()));
    app.wait_idle().await;
    assert_eq!(depths(&app).await, [0, 0, 0]);
    let outcomes = app.assert_invariants(&accepted).await;
    assert_eq!(outcomes.get("confirmed"), Some(&5), "{outcomes:?}");
    stop.cancel();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_versions_classic_delay_queue_is_drained_then_deleted() {
    let mut app = TestApp::spawn_with(Options {
        worker: false,
        ..Options::default()
    })
    .await;
    app.create_sku("old", 10, None).await;
    let r = app.order(&app.customer("o"), &[("old", 1)], None).await;
    assert_eq!(r.status, 202, "{r:?}");
    let id = r.body["order_id"].as_str().unwrap().to_owned();
    // What an earlier worker did with a retry: the message into a classic
    // `<ns>.orders.retry.1` that returns it to partition 0 when its TTL passes.
    let legacy = format!("{}.orders.retry.1", app.cfg.namespace);
    let m = app
        .channel
        .basic_get(
            app.topology.partitions[0].queue.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: false },
        )
        .await
        .unwrap()
        .expect("the order's message");
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        lapin::types::AMQPValue::LongString(app.topology.orders_exchange.as_str().into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        lapin::types::AMQPValue::LongString("intake".into()),
    );
    app.channel
        .queue_declare(
            legacy.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    app.channel
        .basic_publish(
            "".into(),
            legacy.as_str().into(),
            Default::default(),
            &m.delivery.data,
            m.delivery
                .properties
                .clone()
                .with_expiration("1500".into())
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    m.delivery.acker.ack(Default::default()).await.unwrap();
    assert_eq!(app.queue_info(&legacy).await.0, 1);

    // A worker leaves the queue while it holds the retry, which comes back by itself and
    // is committed; the next session deletes the empty queue.
    app.start_worker().await;
    app.wait_idle().await;
    let outcomes = app.assert_invariants(std::slice::from_ref(&id)).await;
    assert_eq!(outcomes.get("confirmed"), Some(&1), "{outcomes:?}");
    app.stop_worker().await;
    app.start_worker().await;
    eventually(Duration::from_secs(10), || async {
        let link = Link::open(&app.cfg.amqp_url, "floodgate-tests-partitions")
            .await
            .unwrap();
        let ch = link.channel().await.unwrap();
        let gone = ch
            .queue_declare(
                legacy.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .is_err();
        link.close().await;
        gone
    })
    .await;
}
