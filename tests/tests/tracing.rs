//! One order's trace across real processes: the trace id a buyer's `traceparent` gives
//! ingress shows in the worker's and the notifier's log lines for that order (at debug,
//! which the processes are started with); a malformed `traceparent` starts a new trace
//! and is never an error; and with `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans really
//! arrive at an OTLP/HTTP receiver, flushed at shutdown.

use floodgate_tests::{Options, TestApp, env_of, eventually};
use serde_json::{Value, json};
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

const WAIT: Duration = Duration::from_secs(30);

/// A service binary as a real process, its stdout (the log) in a file; killed on drop.
struct Service {
    child: Child,
    log: PathBuf,
}

impl Service {
    fn start(exe: &str, name: &str, app: &TestApp, extra: &[(&str, &str)]) -> Self {
        let log = std::env::temp_dir().join(format!("floodgate-{}-{name}.log", app.cfg.namespace));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(exe)
            .envs(env_of(&app.cfg))
            .env("FLOODGATE_INGRESS_ADDR", "127.0.0.1:0")
            .env("FLOODGATE_WORKER_ADDR", "127.0.0.1:0")
            .env("FLOODGATE_NOTIFIER_ADDR", "127.0.0.1:0")
            .env("FLOODGATE_RATE_LIMIT_PER_SEC", "0")
            .envs(extra.iter().copied())
            .stdout(file)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the process");
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The JSON log lines whose `message` is `message`.
    fn lines(&self, message: &str) -> Vec<Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == message)
            .collect()
    }

    /// SIGTERM, then wait for the process to exit.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn random_hex(bytes: usize) -> String {
    let mut s = String::new();
    while s.len() < bytes * 2 {
        s.push_str(&uuid::Uuid::now_v7().simple().to_string()[16..]);
    }
    s.truncate(bytes * 2);
    s
}

async fn order_with_headers(app: &TestApp, sku: &str, headers: &[(&str, &str)]) -> String {
    let token = app.customer("tracer");
    let body = json!({"items": [{"sku": sku, "qty": 1}]});
    let r = app
        .request(
            reqwest::Method::POST,
            "/v1/orders",
            Some(&token),
            Some(&body),
            headers,
        )
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    r.body["order_id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_given_to_ingress_shows_in_the_worker_and_notifier_logs() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        notifier: false,
        ..Options::default()
    })
    .await;
    app.create_sku("trace-tee", 10, None).await;
    let debug = |krate: &str| format!("warn,lapin=off,{krate}=debug");
    let notifier = Service::start(
        env!("CARGO_BIN_EXE_notifier-process"),
        "notifier",
        &app,
        &[("FLOODGATE_LOG", &debug("floodgate_notifier"))],
    );
    let worker = Service::start(
        env!("CARGO_BIN_EXE_worker-process"),
        "worker",
        &app,
        &[("FLOODGATE_LOG", &debug("floodgate_worker"))],
    );
    // Events published before the notifier's queue is bound would go nowhere.
    eventually(WAIT, || async {
        !notifier.lines("consuming order events").is_empty()
    })
    .await;

    let trace_id = random_hex(16);
    let traceparent = format!("00-{trace_id}-{}-01", random_hex(8));
    let order = order_with_headers(&app, "trace-tee", &[("traceparent", &traceparent)]).await;

    let has = |lines: Vec<Value>| {
        lines
            .iter()
            .any(|l| l["order_id"] == order.as_str() && l["trace_id"] == trace_id.as_str())
    };
    eventually(WAIT, || async { has(worker.lines("order committed")) }).await;
    eventually(WAIT, || async { has(notifier.lines("order event in")) }).await;
    // The relay's line names the trace too. (It is written once the broker confirmed
    // the publish, which can be after the notifier already took the event: seen in CI.)
    eventually(WAIT, || async {
        worker
            .lines("event relayed")
            .iter()
            .any(|l| l["trace_id"] == trace_id.as_str())
    })
    .await;

    // A malformed traceparent is ignored: the order goes through on a trace of its own.
    let other =
        order_with_headers(&app, "trace-tee", &[("traceparent", "00-not-a-trace-01")]).await;
    eventually(WAIT, || async {
        worker.lines("order committed").iter().any(|l| {
            l["order_id"] == other.as_str()
                && l["trace_id"]
                    .as_str()
                    .is_some_and(|t| t.len() == 32 && t != trace_id)
        })
    })
    .await;
}

/// A tiny OTLP/HTTP receiver: keeps the body of every `POST /v1/traces`.
async fn otlp_receiver() -> (String, Arc<Mutex<Vec<bytes::Bytes>>>) {
    let got: Arc<Mutex<Vec<bytes::Bytes>>> = Arc::default();
    let keep = got.clone();
    let router = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: bytes::Bytes| {
            let keep = keep.clone();
            async move {
                keep.lock().unwrap().push(body);
                // An empty ExportTraceServiceResponse.
                (
                    [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, got)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_otlp_endpoint_every_step_exports_the_orders_trace_and_flushes_at_shutdown() {
    let app = TestApp::spawn_with(Options {
        worker: false,
        notifier: false,
        ..Options::default()
    })
    .await;
    app.create_sku("otlp-tee", 10, None).await;
    let (endpoint, got) = otlp_receiver().await;
    let start = |exe: &str, name: &str, log: &str| {
        Service::start(
            exe,
            name,
            &app,
            &[
                ("FLOODGATE_LOG", log),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ],
        )
    };
    let ingress = start(
        env!("CARGO_BIN_EXE_ingress-process"),
        "ingress",
        "info,lapin=off",
    );
    let notifier = start(
        env!("CARGO_BIN_EXE_notifier-process"),
        "notifier",
        "info,lapin=off,floodgate_notifier=debug",
    );
    let worker = start(
        env!("CARGO_BIN_EXE_worker-process"),
        "worker",
        "warn,lapin=off",
    );
    let mut port = None;
    eventually(WAIT, || {
        let found = ingress
            .lines("ingress listening")
            .first()
            .and_then(|l| l["port"].as_u64());
        port = found;
        async move { found.is_some() }
    })
    .await;
    eventually(WAIT, || async {
        !notifier.lines("consuming order events").is_empty()
    })
    .await;
    let base = format!("http://127.0.0.1:{}", port.unwrap());
    let trace_id = random_hex(16);
    let r = app
        .client
        .post(format!("{base}/v1/orders"))
        .bearer_auth(app.customer("exported"))
        .header("traceparent", format!("00-{trace_id}-{}-01", random_hex(8)))
        .json(&json!({"items": [{"sku": "otlp-tee", "qty": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let order: Value = r.json().await.unwrap();
    let order = order["order_id"].as_str().unwrap().to_owned();
    eventually(WAIT, || async {
        notifier
            .lines("order event in")
            .iter()
            .any(|l| l["order_id"] == order.as_str())
    })
    .await;
    // Stopped before the batch processors' 5 s schedule: what arrives was flushed.
    ingress.stop();
    worker.stop();
    notifier.stop();
    let got = got.lock().unwrap().clone();
    let trace_bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    // Ingress's request span is in the trace; the worker's batch span links to it; the
    // notifier's deliver span is in it.
    for service in [
        "floodgate-ingress",
        "floodgate-worker",
        "floodgate-notifier",
    ] {
        assert!(
            got.iter()
                .any(|b| contains(b, service.as_bytes()) && contains(b, &trace_bytes)),
            "no span of the order's trace from {service} in {} exports",
            got.len()
        );
    }
}
