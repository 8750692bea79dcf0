//! The HTTP edge of every service under hostile clients: slow headers and bodies are cut
//! off, what axum or hyper refuse by themselves is problem+json, and a client cannot grow
//! `/metrics` with made-up methods.

use floodgate_common::http::{BODY_DEADLINE, HEADER_TIMEOUT};
use floodgate_tests::{Options, TestApp};
use serde_json::Value;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn addr(base: &str) -> String {
    base.trim_start_matches("http://").to_owned()
}

/// Sends `head` (and nothing more) and reads until the server closes; returns what came
/// back and when.
async fn send_and_wait(base: &str, head: &str) -> (String, Duration) {
    let mut s = TcpStream::connect(addr(base)).await.unwrap();
    let started = Instant::now();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    // Bounded: a server that never gives up on the client fails the test here.
    let limit = (HEADER_TIMEOUT + BODY_DEADLINE) * 3;
    tokio::time::timeout(limit, s.read_to_end(&mut out))
        .await
        .expect("the server held the connection open")
        .ok();
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

async fn problem(client: &reqwest::Client, rb: reqwest::RequestBuilder) -> (u16, Value) {
    let _ = client;
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(ct.as_deref(), Some("application/problem+json"), "{status}");
    (status, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_every_refusal_is_problem_json() {
    let app = TestApp::spawn_with(Options {
        notifier: true,
        ..Options::default()
    })
    .await;
    let notifier = app.notifier.clone().unwrap();
    let worker = app.worker_url.clone().unwrap();
    let token = app.customer("slowpoke");

    // Three slow clients at once, on ingress and the notifier.
    let headers_never_end =
        async { send_and_wait(&app.base, "GET /v1/stock/x HTTP/1.1\r\nHost: x\r\n").await };
    let notifier_headers = async {
        send_and_wait(
            &notifier,
            "GET /v1/stream?topics=stock:* HTTP/1.1\r\nHost: x\r\n",
        )
        .await
    };
    let body_never_ends = async {
        let head = format!(
            "POST /v1/orders HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"items\":"
        );
        send_and_wait(&app.base, &head).await
    };
    let ((_, t1), (_, t2), (body, t3)) =
        tokio::join!(headers_never_end, notifier_headers, body_never_ends);
    // Cut off at the bound, not held (5 s of slack for a busy machine), and not before.
    let slack = Duration::from_secs(5);
    for (t, bound) in [
        (t1, HEADER_TIMEOUT),
        (t2, HEADER_TIMEOUT),
        (t3, BODY_DEADLINE),
    ] {
        assert!(
            t + Duration::from_millis(100) >= bound && t < bound + slack,
            "{t:?} vs {bound:?}"
        );
    }
    assert!(body.starts_with("HTTP/1.1 408"), "{body}");
    assert!(
        body.contains("application/problem+json") && body.contains("request_timeout"),
        "{body}"
    );

    let c = &app.client;
    // The notifier: no route, wrong method, a WebSocket request without the upgrade,
    // too many header bytes.
    let (s, b) = problem(c, c.get(format!("{notifier}/nothing"))).await;
    assert_eq!((s, b["code"].as_str()), (404, Some("not_found")));
    let (s, b) = problem(c, c.post(format!("{notifier}/v1/stream?topics=stock:*"))).await;
    assert_eq!((s, b["code"].as_str()), (405, Some("method_not_allowed")));
    let (s, b) = problem(c, c.get(format!("{notifier}/v1/ws"))).await;
    assert!(s == 400 || s == 426, "{s} {b}");
    assert!(!b["detail"].as_str().unwrap().is_empty());
    let (s, b) = problem(
        c,
        c.get(format!("{notifier}/healthz"))
            .header("x-pad", "p".repeat(9 * 1024)),
    )
    .await;
    assert_eq!((s, b["code"].as_str()), (431, Some("headers_too_large")));
    // The worker's health port.
    let (s, b) = problem(c, c.get(format!("{worker}/nothing"))).await;
    assert_eq!((s, b["code"].as_str()), (404, Some("not_found")));
    let (s, b) = problem(c, c.post(format!("{worker}/metrics"))).await;
    assert_eq!((s, b["code"].as_str()), (405, Some("method_not_allowed")));

    // 300 made-up methods grow no metric series.
    let metrics_lines = || async {
        c.get(format!("{}/metrics", app.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .lines()
            .filter(|l| l.contains("method=\""))
            // The series, not its value.
            .filter_map(|l| l.rsplit_once(' ').map(|(series, _)| series.to_owned()))
            .collect::<std::collections::BTreeSet<_>>()
    };
    let m = reqwest::Method::from_bytes(b"WARMUP").unwrap();
    c.request(m, format!("{}/v1/stock/x", app.base))
        .send()
        .await
        .unwrap();
    metrics_lines().await;
    let before = metrics_lines().await;
    for i in 0..300 {
        let m = reqwest::Method::from_bytes(format!("M{i}").as_bytes()).unwrap();
        let r = c
            .request(m, format!("{}/v1/stock/x", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405);
    }
    let after = metrics_lines().await;
    let new: Vec<_> = after.difference(&before).collect();
    assert!(new.is_empty(), "new metric lines: {new:#?}");
}

/// The `X-Request-Id` every answer carries, and the `request_id` of a problem body.
fn request_id(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-request-id")
        .expect("every answer names its request")
        .to_str()
        .unwrap()
        .to_owned()
}

async fn problem_with_id(rb: reqwest::RequestBuilder) -> (u16, String, Value) {
    let r = rb.send().await.unwrap();
    let id = request_id(&r);
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["request_id"], id.as_str(), "{status} {body}");
    (status, id, body)
}

fn is_made_here(id: &str) -> bool {
    uuid::Uuid::parse_str(id).is_ok_and(|u| u.get_version_num() == 7)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_names_its_request_and_problems_carry_the_id() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        notifier: true,
        ..Options::default()
    })
    .await;
    let notifier = app.notifier.clone().unwrap();
    let c = &app.client;

    // A valid id from the client is echoed; without one, a new one is made (UUIDv7).
    let r = c
        .get(format!("{}/healthz", app.base))
        .header("X-Request-Id", "shop-42:retry.1")
        .send()
        .await
        .unwrap();
    assert_eq!(request_id(&r), "shop-42:retry.1");
    let r = c.get(format!("{}/healthz", app.base)).send().await.unwrap();
    assert!(is_made_here(&request_id(&r)));
    let (a, b) = (
        request_id(&c.get(format!("{notifier}/healthz")).send().await.unwrap()),
        request_id(&c.get(format!("{notifier}/healthz")).send().await.unwrap()),
    );
    assert!(is_made_here(&a) && is_made_here(&b) && a != b);

    // Junk is never reflected: too long, a tab, repeated.
    for junk in [&*"x".repeat(129), "a\tb"] {
        let r = c
            .get(format!("{}/healthz", app.base))
            .header("X-Request-Id", junk)
            .send()
            .await
            .unwrap();
        assert!(is_made_here(&request_id(&r)), "{junk:?}");
    }
    let r = c
        .get(format!("{}/healthz", app.base))
        .header("X-Request-Id", "one")
        .header("X-Request-Id", "two")
        .send()
        .await
        .unwrap();
    assert!(is_made_here(&request_id(&r)));

    // Problems carry it: a handler's own (404, 422, 401), the edge's rewrites (405, 431),
    // the notifier's.
    let given = |rb: reqwest::RequestBuilder| rb.header("X-Request-Id", "given-1");
    let (s, id, _) = problem_with_id(given(c.get(format!("{}/nothing", app.base)))).await;
    assert_eq!((s, id.as_str()), (404, "given-1"));
    let token = app.customer("ider");
    let (s, _, b) = problem_with_id(
        c.post(format!("{}/v1/orders", app.base))
            .bearer_auth(&token)
            .json(&serde_json::json!({"items": [{"sku": "x", "qty": 0}]})),
    )
    .await;
    assert_eq!((s, b["code"].as_str()), (422, Some("invalid_order")));
    let (s, _, _) = problem_with_id(c.get(format!("{}/v1/orders/x", app.base))).await;
    assert_eq!(s, 401);
    let (s, _, b) = problem_with_id(c.post(format!("{}/v1/stock/x", app.base))).await;
    assert_eq!((s, b["code"].as_str()), (405, Some("method_not_allowed")));
    let (s, _, _) = problem_with_id(
        c.get(format!("{}/healthz", app.base))
            .header("x-pad", "p".repeat(9 * 1024)),
    )
    .await;
    assert_eq!(s, 431);
    let (s, id, b) =
        problem_with_id(given(c.get(format!("{notifier}/v1/stream?topics=bogus")))).await;
    assert_eq!((s, id.as_str()), (400, "given-1"));
    assert_eq!(b["code"], "invalid_topic");

    // A malformed traceparent is ignored, never an error.
    let r = c
        .get(format!("{}/v1/stock/none", app.base))
        .header("traceparent", "00-zz-zz-01")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}
