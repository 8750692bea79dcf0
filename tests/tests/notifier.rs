//! The notifier end to end: SSE and WebSocket subscribers against the real pipeline
//! (ingress, worker, outbox relay, Redis, RabbitMQ, PostgreSQL).

use floodgate_tests::{
    Options, TestApp, eventually,
    streams::{Sse, SseEvent, Ws},
};
use serde_json::{Value, json};
use std::{collections::HashMap, time::Duration};

const WAIT: Duration = Duration::from_secs(20);

async fn with_notifier() -> TestApp {
    TestApp::spawn_with(Options {
        notifier: true,
        ..Options::default()
    })
    .await
}

fn stream_url(app: &TestApp, topics: &str, token: Option<&str>) -> String {
    let mut url = format!(
        "{}/v1/stream?topics={topics}",
        app.notifier.as_ref().unwrap()
    );
    if let Some(t) = token {
        url.push_str(&format!("&access_token={t}"));
    }
    url
}

fn ws_url(app: &TestApp, token: Option<&str>) -> String {
    let base = app.notifier.as_ref().unwrap().replace("http://", "ws://");
    match token {
        Some(t) => format!("{base}/v1/ws?access_token={t}"),
        None => format!("{base}/v1/ws"),
    }
}

/// What one subscriber saw: stock levels per SKU in order, and order events.
#[derive(Default, Debug)]
struct Seen {
    levels: HashMap<String, Vec<i64>>,
    orders: Vec<Value>,
}

impl Seen {
    fn take(&mut self, v: Value) {
        match v["type"].as_str() {
            Some("stock") => self
                .levels
                .entry(v["sku"].as_str().unwrap().to_owned())
                .or_default()
                .push(v["available"].as_i64().unwrap()),
            Some("order") => self.orders.push(v),
            _ => panic!("unexpected event {v}"),
        }
    }
    fn last(&self, sku: &str) -> Option<i64> {
        self.levels.get(sku).and_then(|l| l.last().copied())
    }
    fn confirmed(&self) -> usize {
        self.orders
            .iter()
            .filter(|o| o["status"] == "confirmed")
            .count()
    }
}

async fn sse_until(sse: &mut Sse, seen: &mut Seen, done: impl Fn(&Seen) -> bool) {
    while !done(seen) {
        let ev: SseEvent = sse
            .next(WAIT)
            .await
            .unwrap_or_else(|| panic!("stream ended or stalled; saw {seen:?}"));
        seen.take(ev.data);
    }
}

async fn ws_until(ws: &mut Ws, seen: &mut Seen, done: impl Fn(&Seen) -> bool) {
    while !done(seen) {
        let v = ws
            .next(WAIT)
            .await
            .unwrap_or_else(|| panic!("socket closed or stalled ({:?}); saw {seen:?}", ws.closed));
        if v["type"] == "subscribed" {
            continue;
        }
        seen.take(v);
    }
}

fn assert_draining(levels: &[i64], from: i64, to: i64) {
    assert_eq!(
        levels.first(),
        Some(&from),
        "the current level first: {levels:?}"
    );
    assert_eq!(
        levels.last(),
        Some(&to),
        "ends at the true level: {levels:?}"
    );
    assert!(
        levels.windows(2).all(|w| w[0] > w[1]),
        "only changes, in order: {levels:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_and_websocket_get_the_level_its_changes_and_only_their_own_orders() {
    let app = with_notifier().await;
    app.create_sku("tee", 50, None).await;
    app.create_sku("cap", 7, None).await;
    let (alice, bob) = (app.customer("alice"), app.customer("bob"));

    let mut sse = Sse::connect(
        &app.client,
        &stream_url(&app, "stock:tee,orders:mine", Some(&alice)),
    )
    .await
    .expect("alice's stream");
    let mut ws = Ws::connect(&ws_url(&app, Some(&bob)))
        .await
        .expect("bob's socket");
    ws.send(&json!({"subscribe": ["stock:*", "orders:mine"]}))
        .await;
    let ack = ws.next(WAIT).await.expect("subscribed");
    assert_eq!(ack["type"], "subscribed");
    assert_eq!(ack["topics"], json!(["orders:mine", "stock:*"]));

    let (mut a, mut b) = (Seen::default(), Seen::default());
    sse_until(&mut sse, &mut a, |s| s.last("tee") == Some(50)).await;
    ws_until(&mut ws, &mut b, |s| {
        s.last("tee") == Some(50) && s.last("cap") == Some(7)
    })
    .await;

    let mut alice_orders = Vec::new();
    for _ in 0..3 {
        let r = app.order(&alice, &[("tee", 2)], None).await;
        assert_eq!(r.status, 202, "{r:?}");
        alice_orders.push(r.body["order_id"].as_str().unwrap().to_owned());
    }
    for _ in 0..2 {
        assert_eq!(
            app.order(&bob, &[("tee", 1), ("cap", 1)], None)
                .await
                .status,
            202
        );
    }

    sse_until(&mut sse, &mut a, |s| {
        s.confirmed() == 3 && s.last("tee") == Some(42)
    })
    .await;
    ws_until(&mut ws, &mut b, |s| {
        s.confirmed() == 2 && s.last("tee") == Some(42) && s.last("cap") == Some(5)
    })
    .await;
    assert_draining(&a.levels["tee"], 50, 42);
    assert_draining(&b.levels["tee"], 50, 42);
    assert_draining(&b.levels["cap"], 7, 5);
    assert!(
        !a.levels.contains_key("cap"),
        "alice subscribed stock:tee only"
    );
    assert!(
        a.orders.iter().all(|o| o["user_id"] == "alice"),
        "{:?}",
        a.orders
    );
    assert!(
        b.orders.iter().all(|o| o["user_id"] == "bob"),
        "{:?}",
        b.orders
    );
    let mut got: Vec<String> = a
        .orders
        .iter()
        .map(|o| o["order_id"].as_str().unwrap().to_owned())
        .collect();
    got.sort();
    alice_orders.sort();
    assert_eq!(got, alice_orders);
    for o in &a.orders {
        assert!(o["at"].as_str().is_some_and(|t| t.ends_with('Z')), "{o}");
    }

    // Nothing else arrives: no other user's order, no repeated event.
    assert!(sse.next(Duration::from_millis(500)).await.is_none());
    assert!(ws.next(Duration::from_millis(500)).await.is_none());

    // A subscriber arriving after the commit learns the current status at once.
    let id = &alice_orders[0];
    let mut late = Sse::connect(
        &app.client,
        &stream_url(&app, &format!("order:{id}"), Some(&alice)),
    )
    .await
    .expect("late stream");
    let ev = late.next(WAIT).await.expect("current status");
    assert_eq!(
        (
            ev.name.as_str(),
            ev.data["order_id"].as_str(),
            ev.data["status"].as_str()
        ),
        ("order", Some(id.as_str()), Some("confirmed"))
    );
    // An admin may watch it too; bob may not know it exists.
    assert!(
        Sse::connect(
            &app.client,
            &stream_url(&app, &format!("order:{id}"), Some(&app.admin()))
        )
        .await
        .is_ok()
    );
    let (status, body) = Sse::connect(
        &app.client,
        &stream_url(&app, &format!("order:{id}"), Some(&bob)),
    )
    .await
    .err()
    .expect("bob is refused");
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));

    // Cancelling moves the level back and tells the owner.
    let r = app
        .post(&format!("/v1/orders/{id}/cancel"), Some(&alice), &json!({}))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    sse_until(&mut sse, &mut a, |s| {
        s.orders.iter().any(|o| o["status"] == "cancelled") && s.last("tee") == Some(44)
    })
    .await;
    // So do goods received.
    let r = app
        .post(
            "/v1/skus/tee/receive",
            Some(&app.admin()),
            &json!({"qty": 10, "reference": "po-1"}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    sse_until(&mut sse, &mut a, |s| s.last("tee") == Some(54)).await;
    ws.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_topics_and_tokens_are_refused_before_the_stream_or_with_a_close_reason() {
    let app = with_notifier().await;
    app.create_sku("tee", 5, None).await;
    let alice = app.customer("alice");
    let cases: Vec<(String, Option<String>, u16, &str)> = vec![
        ("weather:today".into(), None, 400, "invalid_topic"),
        ("".into(), None, 400, "invalid_topic"),
        ("stock:".into(), None, 400, "invalid_topic"),
        ("order:42".into(), Some(alice.clone()), 400, "invalid_topic"),
        ("orders:mine".into(), None, 401, "unauthorized"),
        (
            format!("order:{}", uuid::Uuid::now_v7()),
            None,
            401,
            "unauthorized",
        ),
        (
            "stock:*".into(),
            Some("garbage".into()),
            401,
            "unauthorized",
        ),
        ("orders:*".into(), Some(alice.clone()), 403, "forbidden"),
        (
            format!("order:{}", uuid::Uuid::now_v7()),
            Some(alice.clone()),
            404,
            "not_found",
        ),
        ("stock:nope".into(), None, 404, "unknown_sku"),
    ];
    // The sampler has read the levels once the known SKU streams.
    eventually(WAIT, || async {
        let mut s = match Sse::connect(&app.client, &stream_url(&app, "stock:tee", None)).await {
            Ok(s) => s,
            Err(_) => return false,
        };
        s.next(Duration::from_secs(1)).await.is_some()
    })
    .await;
    for (topics, token, status, code) in &cases {
        let (got, body) = Sse::connect(&app.client, &stream_url(&app, topics, token.as_deref()))
            .await
            .err()
            .unwrap_or_else(|| panic!("{topics} should be refused"));
        assert_eq!(
            (got, body["code"].as_str()),
            (*status, Some(*code)),
            "{topics}: {body}"
        );
        assert!(
            body["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{body}"
        );
    }
    // WebSocket: a bad token is refused before the upgrade...
    assert_eq!(
        Ws::connect(&ws_url(&app, Some("garbage"))).await.err(),
        Some(401)
    );
    // ...and a bad subscription after it closes the socket with the code and reason.
    for (msg, code, reason) in [
        (
            json!({"subscribe": ["weather:today"]}),
            4400,
            "invalid_topic",
        ),
        (json!({"subscribe": ["orders:mine"]}), 4401, "unauthorized"),
        (json!({"subscribe": "stock:*"}), 4400, "invalid_topic"),
        (json!({"listen": ["stock:*"]}), 4400, "invalid_topic"),
    ] {
        let mut ws = Ws::connect(&ws_url(&app, None)).await.expect("socket");
        ws.send(&msg).await;
        assert!(ws.next(WAIT).await.is_none(), "{msg} closes the socket");
        let (got, why) = ws.closed.clone().expect("a close frame");
        assert_eq!(got, code, "{msg}: {why}");
        assert!(why.starts_with(reason), "{msg}: {why}");
    }
    // A refused request subscribed nothing.
    let base = app.notifier.clone().unwrap();
    assert_eq!(readyz(&app.client, &base).await["status"], "ready");
    eventually(WAIT, || async {
        readyz(&app.client, &base).await["subscribers"] == 0
    })
    .await;
}

async fn metrics_text(client: &reqwest::Client, base: &str) -> String {
    let r = client.get(format!("{base}/metrics")).send().await.unwrap();
    r.text().await.unwrap()
}

/// The notifier's readiness body; Null when the request failed, so a caller polling it
/// until a condition holds takes a failed request (a pooled connection the server closed
/// as it was reused, seen once on the cluster) as "not yet" rather than panicking.
async fn readyz(client: &reqwest::Client, base: &str) -> Value {
    match client.get(format!("{base}/readyz")).send().await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sse_and_two_hundred_websocket_subscribers_all_see_the_sale_end_at_zero() {
    const STOCK: i64 = 400;
    let app = with_notifier().await;
    app.create_sku("flash", STOCK, None).await;
    // One client per 100 streams, so the test does not trip over its own pool limits.
    let clients: Vec<reqwest::Client> = (0..10).map(|_| reqwest::Client::new()).collect();
    let mut sse = Vec::new();
    for i in 0..1_000 {
        let s = Sse::connect(&clients[i % 10], &stream_url(&app, "stock:flash", None))
            .await
            .expect("stream");
        sse.push(s);
    }
    let mut ws = Vec::new();
    for _ in 0..200 {
        let mut w = Ws::connect(&ws_url(&app, None)).await.expect("socket");
        w.send(&json!({"subscribe": ["stock:*"]})).await;
        assert_eq!(w.next(WAIT).await.expect("ack")["type"], "subscribed");
        ws.push(w);
    }
    let readers = sse
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut seen = Seen::default();
                sse_until(&mut s, &mut seen, |s| s.last("flash") == Some(0)).await;
                seen.levels.remove("flash").unwrap()
            })
        })
        .chain(ws.into_iter().map(|mut w| {
            tokio::spawn(async move {
                let mut seen = Seen::default();
                ws_until(&mut w, &mut seen, |s| s.last("flash") == Some(0)).await;
                w.close().await;
                seen.levels.remove("flash").unwrap()
            })
        }))
        .collect::<Vec<_>>();
    let sale = app.sell_out("flash", 32).await;
    assert_eq!(sale.len() as i64, STOCK);
    let mut updates = Vec::new();
    for r in readers {
        let levels = tokio::time::timeout(WAIT, r)
            .await
            .expect("reader finished")
            .expect("reader");
        assert_eq!(levels.first(), Some(&STOCK), "{levels:?}");
        assert!(levels.windows(2).all(|w| w[0] > w[1]), "{levels:?}");
        updates.push(levels.len());
    }
    updates.sort();
    println!(
        "1,200 subscribers all ended at 0; updates per subscriber: min {}, median {}, max {} (for {STOCK} sales)",
        updates[0],
        updates[updates.len() / 2],
        updates[updates.len() - 1]
    );
    assert!(
        updates[updates.len() - 1] < STOCK as usize,
        "levels are conflated, not one per sale"
    );
    app.wait_idle().await;
    app.assert_invariants(&sale).await;
}

/// A client that sends the request and then reads only when told: a small receive
/// buffer, so the server finds out quickly when it stops.
struct StalledClient {
    stream: tokio::net::TcpStream,
    data: Vec<u8>,
}

impl StalledClient {
    async fn open(base: &str, path: &str) -> Self {
        let addr: std::net::SocketAddr = base.trim_start_matches("http://").parse().unwrap();
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(&addr.into()).unwrap();
        socket.set_nonblocking(true).unwrap();
        let mut stream = tokio::net::TcpStream::from_std(socket.into()).unwrap();
        use tokio::io::AsyncWriteExt;
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut c = Self {
            stream,
            data: Vec::new(),
        };
        c.read_until(|d| d.windows(4).any(|w| w == b"\r\n\r\n"), WAIT)
            .await;
        assert!(c.text().starts_with("HTTP/1.1 200"), "{}", c.text());
        c
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }

    /// Reads until `done(data)`, EOF or a reset (false), or `timeout` (false).
    async fn read_until(&mut self, done: impl Fn(&[u8]) -> bool, timeout: Duration) -> bool {
        use tokio::io::AsyncReadExt;
        let until = tokio::time::Instant::now() + timeout;
        let mut buf = [0u8; 8192];
        while !done(&self.data) {
            match tokio::time::timeout_at(until, self.stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return false,
                Ok(Ok(n)) => self.data.extend_from_slice(&buf[..n]),
            }
        }
        true
    }

    /// Reads to the end of the connection; true if the server closed it within `timeout`.
    async fn read_to_close(&mut self, timeout: Duration) -> bool {
        use tokio::io::AsyncReadExt;
        let until = tokio::time::Instant::now() + timeout;
        let mut buf = [0u8; 8192];
        loop {
            match tokio::time::timeout_at(until, self.stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(n)) => self.data.extend_from_slice(&buf[..n]),
                Err(_) => return false,
            }
        }
    }

    fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_is_closed_for_order_events_and_conflated_for_stock_without_delaying_a_fast_one()
 {
    const STOCK: i64 = 3_000;
    let app = TestApp::spawn_with(Options {
        notifier: true,
        tweak: Box::new(|c| {
            // Room for the relay's bursts (up to 500 events), far below the sale.
            c.subscriber_buffer = 2_048;
            c.subscriber_send_buffer = 4096;
        }),
        ..Options::default()
    })
    .await;
    app.create_sku("slow", STOCK, None).await;
    let admin = app.admin();
    let base = app.notifier.clone().unwrap();
    let mut fast = Sse::connect(
        &app.client,
        &stream_url(&app, "orders:*,stock:*", Some(&admin)),
    )
    .await
    .expect("fast stream");
    let mut fast_seen = Seen::default();
    sse_until(&mut fast, &mut fast_seen, |s| s.last("slow") == Some(STOCK)).await;
    let mut stalled_orders = StalledClient::open(
        &base,
        &format!("/v1/stream?topics=orders:*,stock:*&access_token={admin}"),
    )
    .await;
    let mut stalled_stock = StalledClient::open(&base, "/v1/stream?topics=stock:*").await;
    assert!(
        stalled_stock
            .read_until(
                |d| String::from_utf8_lossy(d).contains(&format!("\"available\":{STOCK}")),
                WAIT
            )
            .await
    );

    // The fast subscriber reads everything while the two others read nothing.
    let reader = tokio::spawn(async move {
        sse_until(&mut fast, &mut fast_seen, |s| {
            s.confirmed() == STOCK as usize && s.last("slow") == Some(0)
        })
        .await;
        fast_seen
    });
    let sale = app.sell_out("slow", 32).await;
    assert_eq!(sale.len() as i64, STOCK);
    let fast_seen = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("the fast subscriber got every event while the others stalled")
        .unwrap();
    assert_eq!(fast_seen.confirmed(), STOCK as usize);

    // The stalled order subscriber was disconnected: its connection ends, short of the
    // events, never having held up the fast one.
    assert!(
        stalled_orders.read_to_close(WAIT).await,
        "the server closed the stalled order stream"
    );
    let got = stalled_orders.count("event: order");
    assert!(
        got < STOCK as usize,
        "stalled subscriber got {got} order events, fewer than {STOCK}"
    );
    println!(
        "stalled order subscriber: {got} of {STOCK} order events, then closed; reason sent: {}",
        stalled_orders.text().contains("slow_consumer")
    );

    // The stalled stock subscriber is still connected and, reading again, gets the
    // latest level at once: conflated, never a backlog, never disconnected.
    assert!(
        stalled_stock
            .read_until(
                |d| String::from_utf8_lossy(d).contains("\"available\":0"),
                WAIT
            )
            .await,
        "the stock subscriber reaches the final level: {}",
        stalled_stock.text()
    );
    let levels = stalled_stock.count("event: stock");
    assert!(!stalled_stock.text().contains("slow_consumer"));
    assert!(
        levels < STOCK as usize / 2,
        "{levels} stock events for {STOCK} changes"
    );
    println!("stalled stock subscriber: {levels} stock events for {STOCK} sales, ended at 0");
    app.assert_invariants(&sale).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_relay_killed_around_the_publish_still_delivers_the_event_exactly_once() {
    use floodgate_tests::WorkerProcess;
    let exe = env!("CARGO_BIN_EXE_worker-process");
    let app = TestApp::spawn_with(Options {
        worker: false,
        notifier: true,
        ..Options::default()
    })
    .await;
    app.create_sku("box", 10, None).await;
    let alice = app.customer("alice");
    let mut sse = Sse::connect(&app.client, &stream_url(&app, "orders:mine", Some(&alice)))
        .await
        .expect("stream");
    let outbox = || app.scalar("SELECT count(*) FROM outbox");

    // 1. The worker commits the order with its outbox row, then dies before publishing.
    let mut w = WorkerProcess::start_with(
        exe,
        &app.cfg,
        &[("FLOODGATE_TEST_FAILPOINT", "outbox_before_publish")],
    );
    let r = app.order(&alice, &[("box", 1)], None).await;
    assert_eq!(r.status, 202, "{r:?}");
    let id = r.body["order_id"].as_str().unwrap().to_owned();
    eventually(WAIT, || {
        let exited = w.exited();
        async move { exited }
    })
    .await;
    assert_eq!(
        app.scalar(&format!(
            "SELECT count(*) FROM orders WHERE id = '{id}' AND status = 'confirmed'"
        ))
        .await,
        1
    );
    assert_eq!(outbox().await, 1, "the event waits in the outbox");
    assert!(
        sse.next(Duration::from_millis(500)).await.is_none(),
        "nothing was published"
    );

    // 2. The next relay publishes it and dies before deleting the row.
    let mut w = WorkerProcess::start_with(
        exe,
        &app.cfg,
        &[("FLOODGATE_TEST_FAILPOINT", "outbox_after_publish")],
    );
    let ev = sse.next(WAIT).await.expect("the event arrives");
    assert_eq!(
        (ev.data["order_id"].as_str(), ev.data["status"].as_str()),
        (Some(id.as_str()), Some("confirmed"))
    );
    eventually(WAIT, || {
        let exited = w.exited();
        async move { exited }
    })
    .await;
    assert_eq!(outbox().await, 1, "published but not deleted");

    // 3. A healthy relay publishes it again and deletes it; the notifier drops the
    //    duplicate (same event id), so the subscriber saw it once.
    let w = WorkerProcess::start(exe, &app.cfg);
    eventually(WAIT, || async { outbox().await == 0 }).await;
    assert!(
        sse.next(Duration::from_secs(1)).await.is_none(),
        "the re-published event is not delivered again"
    );
    // ...because the notifier recognised it (the counter is per test process).
    let metrics = metrics_text(&app.client, app.notifier.as_ref().unwrap()).await;
    assert!(
        metrics.contains("floodgate_notifier_events_dropped_total{reason=\"duplicate\"}"),
        "the duplicate reached the notifier and was dropped"
    );
    w.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_notifier_instance_sees_every_event_and_shutdown_closes_streams_cleanly() {
    let app = with_notifier().await;
    app.create_sku("duo", 5, None).await;
    // A second instance on the same namespace, as behind a load balancer.
    let mut cfg = app.cfg.clone();
    cfg.notifier_addr = "127.0.0.1:0".parse().unwrap();
    let second = floodgate_notifier::Notifier::build(cfg)
        .await
        .expect("second notifier");
    let second_url = format!("http://127.0.0.1:{}", second.port());
    let stop_second = tokio_util::sync::CancellationToken::new();
    let second_run = tokio::spawn(second.run_until_stopped(stop_second.clone()));

    let alice = app.customer("alice");
    let mut one = Sse::connect(&app.client, &stream_url(&app, "orders:mine", Some(&alice)))
        .await
        .expect("first instance");
    let mut two = Sse::connect(
        &app.client,
        &format!("{second_url}/v1/stream?topics=orders:mine&access_token={alice}"),
    )
    .await
    .expect("second instance");
    let mut ws = Ws::connect(&ws_url(&app, Some(&alice)))
        .await
        .expect("socket");
    ws.send(&json!({"subscribe": ["stock:duo"]})).await;
    assert_eq!(ws.next(WAIT).await.expect("ack")["type"], "subscribed");
    // Both instances bind their queues as they start; wait until the second's is there.
    eventually(WAIT, || async {
        readyz(&app.client, &second_url).await["status"] == "ready"
    })
    .await;

    let r = app.order(&alice, &[("duo", 1)], None).await;
    assert_eq!(r.status, 202, "{r:?}");
    let id = r.body["order_id"].as_str().unwrap();
    for s in [&mut one, &mut two] {
        let ev = s.next(WAIT).await.expect("the event");
        assert_eq!(
            (ev.data["order_id"].as_str(), ev.data["status"].as_str()),
            (Some(id), Some("confirmed"))
        );
    }

    // SIGTERM-like shutdown: SSE streams get their last event and end; sockets get 1001.
    stop_second.cancel();
    let last = two.next(WAIT).await.expect("a last event");
    assert_eq!(
        (last.name.as_str(), last.data["code"].as_str()),
        ("error", Some("shutting_down"))
    );
    assert!(
        two.next(WAIT).await.is_none() && two.ended,
        "the stream ended"
    );
    tokio::time::timeout(WAIT, second_run)
        .await
        .expect("the second notifier stopped")
        .unwrap()
        .unwrap();

    app.shut_down();
    let last = one.next(WAIT).await.expect("a last event");
    assert_eq!(last.data["code"], "shutting_down");
    loop {
        match ws.next(WAIT).await {
            Some(v) if v["type"] == "stock" => continue,
            Some(v) => panic!("unexpected {v}"),
            None => break,
        }
    }
    let (code, reason) = ws.closed.clone().expect("a close frame");
    assert_eq!(code, 1001);
    assert!(reason.starts_with("shutting_down"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_event_queue_closes_order_subscribers_with_resync_and_recovers() {
    let app = with_notifier().await;
    app.create_sku("gone", 5, None).await;
    let alice = app.customer("alice");
    let mut orders = Sse::connect(&app.client, &stream_url(&app, "orders:mine", Some(&alice)))
        .await
        .expect("order stream");
    let mut stock = Sse::connect(&app.client, &stream_url(&app, "stock:gone", None))
        .await
        .expect("stock stream");
    assert_eq!(stock.next(WAIT).await.expect("level").data["available"], 5);

    // The notifier's queue vanishes under it (an operator, a broker that lost its data).
    let prefix = format!("{}.events.notifier.", app.cfg.namespace);
    // FG_TEST_RABBITMQCTL: the command that lists the test broker's queues when it is not
    // the local node (`ops/stack test --cluster` names `ops/cluster ... rabbitmq ctl`).
    let ctl = std::env::var("FG_TEST_RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into());
    let mut ctl = ctl.split_whitespace();
    let listed = std::process::Command::new(ctl.next().expect("a command"))
        .args(ctl)
        .args(["list_queues", "-q", "--no-table-headers", "name"])
        .output()
        .expect("rabbitmqctl");
    let queue = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(str::trim)
        .find(|q| q.starts_with(&prefix))
        .expect("the notifier's queue")
        .to_owned();
    app.channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await
        .expect("delete the queue");

    // Order subscribers may have missed events: told to resync, their stream ends.
    let last = orders.next(WAIT).await.expect("a last event");
    assert_eq!(
        (last.name.as_str(), last.data["code"].as_str()),
        ("error", Some("resync"))
    );
    assert!(orders.next(WAIT).await.is_none() && orders.ended);

    // Once the notifier has its queue again, a new stream gets new events; stock-only
    // subscribers were never disturbed.
    let base = app.notifier.clone().unwrap();
    eventually(WAIT, || async {
        readyz(&app.client, &base).await["status"] == "ready"
    })
    .await;
    let mut again = Sse::connect(&app.client, &stream_url(&app, "orders:mine", Some(&alice)))
        .await
        .expect("order stream again");
    assert_eq!(app.order(&alice, &[("gone", 1)], None).await.status, 202);
    let ev = again.next(WAIT).await.expect("the event");
    assert_eq!(ev.data["status"], "confirmed");
    assert_eq!(
        stock.next(WAIT).await.expect("a change").data["available"],
        4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_that_never_answers_pings_is_closed() {
    let app = TestApp::spawn_with(Options {
        notifier: true,
        tweak: Box::new(|c| c.keepalive = Duration::from_secs(1)),
        ..Options::default()
    })
    .await;
    app.create_sku("quiet", 5, None).await;
    let mut ws = Ws::connect(&ws_url(&app, None)).await.expect("socket");
    ws.send(&json!({"subscribe": ["stock:quiet"]})).await;
    // Do not read (reading answers pings) for three ping intervals.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    loop {
        match ws.next(WAIT).await {
            Some(v) if v["type"] == "subscribed" || v["type"] == "stock" => continue,
            Some(v) => panic!("unexpected {v}"),
            None => break,
        }
    }
    // The server gave up on it: with a close frame (1001 ping_timeout) if the client
    // read that before answering the pings, else the connection is simply gone.
    if let Some((code, reason)) = ws.closed.clone() {
        assert_eq!(code, 1001);
        assert!(reason.starts_with("ping_timeout"), "{reason}");
    }
    let metrics = metrics_text(&app.client, app.notifier.as_ref().unwrap()).await;
    assert!(
        metrics.contains("floodgate_notifier_disconnects_total{reason=\"ping_timeout\"}"),
        "counted as a ping timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_token_expires_is_closed_with_token_expired() {
    let app = with_notifier().await;
    app.create_sku("tee", 5, None).await;
    // Valid for two more seconds; streams end once exp plus the leeway has passed.
    let exp = floodgate_common::auth::now_secs() + 2;
    let token = floodgate_common::auth::mint_expiring_at(
        app.cfg.jwt_secret.expose(),
        &floodgate_common::domain::UserId::parse("alice").unwrap(),
        floodgate_common::domain::Role::Customer,
        exp,
    );
    let mut sse = Sse::connect(&app.client, &stream_url(&app, "orders:mine", Some(&token)))
        .await
        .expect("stream");
    let mut ws = Ws::connect(&ws_url(&app, Some(&token))).await.expect("ws");
    ws.send(&json!({"subscribe": ["orders:mine"]})).await;
    assert_eq!(
        ws.next(Duration::from_secs(5)).await.unwrap()["type"],
        "subscribed"
    );

    let wait = Duration::from_secs(2 + floodgate_common::auth::LEEWAY_SECS + 20);
    let ended = loop {
        match sse.next(wait).await {
            Some(e) if e.name == "error" => break e,
            Some(_) => continue,
            None => panic!("the stream outlived its token"),
        }
    };
    assert_eq!(ended.data["code"], "token_expired", "{:?}", ended.data);
    while ws.next(wait).await.is_some() {}
    let (code, reason) = ws.closed.clone().expect("a close frame");
    assert_eq!(code, 4401, "{reason}");
    assert!(reason.starts_with("token_expired"), "{reason}");
    // Never before the token expired.
    assert!(floodgate_common::auth::now_secs() >= exp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sku_is_subscribable_the_moment_it_exists() {
    // A slow sampler: without asking Redis the notifier would call the SKU unknown for
    // up to five seconds after it was created.
    let app = TestApp::spawn_with(Options {
        notifier: true,
        tweak: Box::new(|c| c.stock_interval = Duration::from_secs(5)),
        ..Options::default()
    })
    .await;
    app.create_sku("first", 3, None).await;
    // Let the sampler's first read load the levels (so unknown SKUs are refused at all).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let ghost = Sse::connect(&app.client, &stream_url(&app, "stock:ghost", None)).await;
    assert_eq!(
        ghost.err().map(|(s, b)| (s, b["code"].clone())),
        Some((404, json!("unknown_sku")))
    );

    app.create_sku("fresh", 7, None).await;
    let mut sse = Sse::connect(&app.client, &stream_url(&app, "stock:fresh", None))
        .await
        .expect("a SKU that exists is subscribable at once");
    let first = sse.next(WAIT).await.expect("its level");
    assert_eq!(
        (first.data["sku"].clone(), first.data["available"].clone()),
        (json!("fresh"), json!(7))
    );
    let mut ws = Ws::connect(&ws_url(&app, None)).await.expect("ws");
    app.create_sku("fresher", 2, None).await;
    ws.send(&json!({"subscribe": ["stock:fresher"]})).await;
    assert_eq!(ws.next(WAIT).await.unwrap()["type"], "subscribed");
}

/// A bundle's `stock:` topic: subscribable once created, its level derived from its
/// components' (`min(floor(level / qty))`), and every change of a component moves it,
/// whether the bundle or the component alone was ordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundles_stock_topic_follows_its_components() {
    let app = with_notifier().await;
    app.create_sku("lens", 7, None).await;
    app.create_sku("cap", 50, None).await;
    let r = app
        .post(
            "/v1/bundles",
            Some(&app.admin()),
            &json!({"sku": "lens-kit", "name": "Lens kit", "price_cents": 100,
                    "components": [{"sku": "lens", "qty": 2}, {"sku": "cap", "qty": 1}]}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let mut sse = Sse::connect(&app.client, &stream_url(&app, "stock:lens-kit", None))
        .await
        .expect("a bundle is subscribable at once");
    let mut seen = Seen::default();
    sse_until(&mut sse, &mut seen, |s| s.last("lens-kit") == Some(3)).await;
    // 7 lenses make 3 kits; one kit (2 lenses) then one lens alone: 2, then still 2
    // (4 left), then one more lens: 1 (3 left).
    let ann = app.customer("ann");
    assert_eq!(app.order(&ann, &[("lens-kit", 1)], None).await.status, 202);
    sse_until(&mut sse, &mut seen, |s| s.last("lens-kit") == Some(2)).await;
    assert_eq!(app.order(&ann, &[("lens", 1)], None).await.status, 202);
    assert_eq!(app.order(&ann, &[("lens", 1)], None).await.status, 202);
    sse_until(&mut sse, &mut seen, |s| s.last("lens-kit") == Some(1)).await;
    let levels = &seen.levels["lens-kit"];
    assert!(
        levels.windows(2).all(|w| w[0] > w[1]),
        "only changes, in order: {levels:?}"
    );
    assert_eq!(
        app.get("/v1/stock/lens-kit", None).await.body["available"],
        1
    );
}
