//! The monitoring as shipped, proven against live services: a real `prometheus` binary
//! with `ops/prometheus/prometheus.yml` (1 s intervals instead of 5 s) and the real
//! `alerts.yml`, scraping this test's ingress, worker and notifier through file_sd
//! files of the same names as the committed ones. Under load, every target of every
//! panel of `ops/grafana/dashboards/floodgate.json` must return data (a renamed metric
//! fails here); then the worker stops under load and `FloodgateIntakeNoConsumer`,
//! `FloodgateServiceDown` and `FloodgateDeadLetterQueueNotEmpty` must reach `firing`
//! within their `for` plus a margin. With Chromium installed, a screenshot of
//! Prometheus' /alerts page is kept in `target/artifacts/prometheus-alerts.png`.
//!
//! Without a `prometheus` binary (Debian's `prometheus`; `ops/stack test` installs it)
//! the live test says so and passes, except in CI (`CI` set), where it fails.

use floodgate_tests::{Options, TestApp, eventually, servers::free_port, streams::Sse};
use serde_json::Value;
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The file_sd files prometheus.yml reads, one per job: docker compose provides the same
/// names in ops/prometheus/targets-compose/.
const TARGET_FILES: [&str; 6] = [
    "floodgate-ingress.yml",
    "floodgate-worker.yml",
    "floodgate-notifier.yml",
    "rabbitmq.yml",
    "redis.yml",
    "postgres.yml",
];

/// What the live test waits for once the worker is stopped.
const EXPECTED_ALERTS: [&str; 3] = [
    "FloodgateIntakeNoConsumer",
    "FloodgateServiceDown",
    "FloodgateDeadLetterQueueNotEmpty",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `- alert: Name` of every rule in alerts.yml.
fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(|n| n.trim().to_owned())
        .collect()
}

/// The `for:` of one alert in alerts.yml (0 when it has none).
fn alert_for(rules: &str, name: &str) -> Duration {
    let start = rules
        .find(&format!("- alert: {name}\n"))
        .unwrap_or_else(|| panic!("{name} is not in alerts.yml"));
    let block = &rules[start + 1..];
    let block = &block[..block.find("- alert: ").unwrap_or(block.len())];
    let Some(v) = block.lines().find_map(|l| l.trim().strip_prefix("for: ")) else {
        return Duration::ZERO;
    };
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("{name}: for {v}"));
    match unit {
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => panic!("{name}: for {v}: use s or m"),
    }
}

/// Every `expr` of every panel target, with Grafana's interval variables fixed.
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    while let Some(p) = panels.pop() {
        if let Some(inner) = p["panels"].as_array() {
            panels.extend(inner);
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("a target has an expr");
            let expr = expr
                .replace("$__rate_interval", "30s")
                .replace("$__interval", "5s")
                .replace("$__range", "5m");
            out.push((p["title"].as_str().unwrap_or("?").to_owned(), expr));
        }
    }
    out
}

/// The shipped files agree with each other: every alert has a severity, a runbook entry in
/// docs/OPERATIONS.md at the anchor its runbook_url names, and a promtool test that
/// expects it to fire; every file_sd file exists for the local stack; every panel
/// queries the provisioned datasource (uid `prometheus`).
#[test]
fn alerts_runbook_targets_and_dashboard_agree() {
    let rules = read("ops/prometheus/alerts.yml");
    let tests = read("ops/prometheus/alerts_test.yml");
    let ops = read("docs/OPERATIONS.md");
    let anchors: BTreeSet<String> = ops
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .map(|h| h.trim().to_lowercase())
        .collect();
    let names = alert_names(&rules);
    assert!(names.len() >= 20, "alerts: {names:?}");
    for name in &names {
        let lower = name.to_lowercase();
        assert!(
            anchors.contains(&lower),
            "no `### {name}` in docs/OPERATIONS.md"
        );
        assert!(
            rules.contains(&format!("runbook_url: docs/OPERATIONS.md#{lower}\n")),
            "{name}: runbook_url is not docs/OPERATIONS.md#{lower}"
        );
        // A firing case: the alertname followed by a non-empty exp_alerts.
        let firing = tests
            .match_indices(&format!("alertname: {name}\n"))
            .any(|(i, _)| {
                let rest = &tests[i..];
                let next = rest.lines().nth(1).unwrap_or("").trim();
                next == "exp_alerts:"
            });
        assert!(firing, "alerts_test.yml never expects {name} to fire");
    }
    let severities = rules.matches("severity: ").count();
    assert_eq!(
        severities,
        names.len(),
        "every alert has one severity label"
    );
    let docs_alerts = ops
        .lines()
        .filter(|l| l.starts_with("### Floodgate"))
        .count();
    assert_eq!(
        docs_alerts,
        names.len(),
        "one runbook entry per alert, no more"
    );

    let config = read("ops/prometheus/prometheus.yml");
    for f in TARGET_FILES {
        assert!(
            config.contains(&format!("targets/{f}")),
            "prometheus.yml reads no targets/{f}"
        );
        assert!(
            repo().join("ops/prometheus/targets").join(f).is_file(),
            "ops/prometheus/targets/{f} is missing"
        );
    }
    let referenced = config.matches("files: [targets/").count();
    // rabbitmq.yml serves two jobs (aggregated and per-object).
    assert_eq!(
        referenced,
        TARGET_FILES.len() + 1,
        "a new file_sd file needs its name in TARGET_FILES"
    );

    let dashboard: Value = serde_json::from_str(&read("ops/grafana/dashboards/floodgate.json"))
        .expect("dashboard JSON");
    assert_eq!(dashboard["uid"], "floodgate");
    let mut panels: Vec<&Value> = dashboard["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = panels.pop() {
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "prometheus", "panel {}", p["title"]);
        for t in p["targets"].as_array().expect("targets") {
            assert_eq!(t["datasource"]["uid"], "prometheus", "panel {}", p["title"]);
        }
    }
    assert!(dashboard_exprs(&dashboard).len() >= 20);
}

/// A private Prometheus: its config, targets and data in a temporary directory.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Prometheus {
    /// Starts `bin` with the shipped prometheus.yml (global intervals 1 s) and alerts.yml,
    /// the floodgate jobs scraping `services` (ingress, worker, notifier base URLs), the
    /// other jobs without targets.
    fn start(bin: &str, services: [&str; 3]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "floodgate-prometheus-{}",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(dir.join("targets")).unwrap();
        std::fs::write(
            dir.join("prometheus.yml"),
            fast_config(&read("ops/prometheus/prometheus.yml")),
        )
        .unwrap();
        std::fs::copy(
            repo().join("ops/prometheus/alerts.yml"),
            dir.join("alerts.yml"),
        )
        .unwrap();
        for f in TARGET_FILES {
            let body = match f {
                "floodgate-ingress.yml" => target(services[0]),
                "floodgate-worker.yml" => target(services[1]),
                "floodgate-notifier.yml" => target(services[2]),
                // No test depends on the broker's plugin or on exporters.
                _ => "[]\n".to_owned(),
            };
            std::fs::write(dir.join("targets").join(f), body).unwrap();
        }
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Self {
            child,
            dir,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let url = reqwest::Url::parse_with_params(&format!("{}{path}", self.url), query)
            .expect("a query URL");
        let r = reqwest::Client::new()
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .expect("prometheus answers");
        let status = r.status();
        let v: Value = r.json().await.expect("prometheus JSON");
        assert!(
            status.is_success() && v["status"] == "success",
            "{path} {query:?}: {v}"
        );
        v
    }

    /// The result of an instant query (an error, say a syntax error, fails the test).
    async fn query(&self, expr: &str) -> Vec<Value> {
        let v = self.get("/api/v1/query", &[("query", expr)]).await;
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The active (pending or firing) alerts.
    async fn alerts(&self) -> Vec<Value> {
        let v = self.get("/api/v1/alerts", &[]).await;
        v["data"]["alerts"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A file_sd file with one target (host:port of a base URL).
fn target(base: &str) -> String {
    format!("- targets: [\"{}\"]\n", base.trim_start_matches("http://"))
}

/// prometheus.yml with its global scrape and evaluation intervals at 1 s.
fn fast_config(config: &str) -> String {
    let mut out = String::new();
    let mut in_global = false;
    let mut changed = 0;
    for line in config.lines() {
        if !line.starts_with(' ') && !line.starts_with('#') && !line.is_empty() {
            in_global = line.trim_end() == "global:";
        }
        let key = line.trim_start().split(':').next().unwrap_or("");
        if in_global && ["scrape_interval", "scrape_timeout", "evaluation_interval"].contains(&key)
        {
            out.push_str(&format!("  {key}: 1s\n"));
            changed += 1;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert_eq!(
        changed, 3,
        "prometheus.yml's global block has no scrape_interval, scrape_timeout or evaluation_interval"
    );
    out
}

/// The prometheus binary: FLOODGATE_PROMETHEUS_BIN, or `prometheus` on PATH.
fn prometheus_bin() -> Option<String> {
    let bin = std::env::var("FLOODGATE_PROMETHEUS_BIN").unwrap_or_else(|_| "prometheus".into());
    Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        .then_some(bin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboard_panels_have_data_and_a_stopped_worker_fires_its_alerts() {
    let Some(bin) = prometheus_bin() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI: no prometheus binary (apt-get install prometheus; ops/stack test installs it)"
        );
        eprintln!(
            "SKIPPED: no prometheus binary on PATH (apt-get install prometheus, or set FLOODGATE_PROMETHEUS_BIN)"
        );
        return;
    };
    let started = Instant::now();
    let mut app = TestApp::spawn_with(Options {
        worker: true,
        notifier: true,
        ..Options::default()
    })
    .await;
    let worker = app.worker_url.clone().expect("worker");
    let notifier = app.notifier.clone().expect("notifier");
    let prom = Prometheus::start(&bin, [&app.base, &worker, &notifier]);
    let ready = format!("{}/-/ready", prom.url);
    eventually(Duration::from_secs(30), || async {
        reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200)
    })
    .await;

    // Traffic for every panel: orders accepted and sold out, a subscriber reading stock
    // and order events, one that leaves (a disconnect), a poison message (a dead letter).
    app.create_sku("obs-plenty", 1_000_000, None).await;
    app.create_sku("obs-few", 20, None).await;
    let admin = app.admin();
    let stream = format!("{notifier}/v1/stream?topics=stock:*,orders:*&access_token={admin}");
    let mut reader = Sse::connect(&app.client, &stream).await.expect("subscribe");
    let reading = tokio::spawn(async move {
        while !reader.ended {
            reader.next(Duration::from_secs(1)).await;
        }
    });
    let leaver = Sse::connect(&app.client, &stream).await.expect("subscribe");
    drop(leaver);
    app.publish_raw(b"{ not an order").await;
    let (load, sold) = tokio::join!(
        app.load(
            "obs-plenty",
            8,
            Duration::from_millis(20),
            Duration::from_secs(8)
        ),
        app.sell_out("obs-few", 4),
    );
    assert!(!load.accepted.is_empty(), "{load:?}");
    assert_eq!(sold.len(), 20);

    // Every panel target returns data.
    let dashboard: Value = serde_json::from_str(&read("ops/grafana/dashboards/floodgate.json"))
        .expect("dashboard JSON");
    let exprs = dashboard_exprs(&dashboard);
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let mut empty = Vec::new();
        for (title, expr) in &exprs {
            if prom.query(expr).await.is_empty() {
                empty.push(format!("{title}: {expr}"));
            }
        }
        if empty.is_empty() {
            break;
        }
        assert!(
            Instant::now() < until,
            "panel targets without data after 60 s:\n  {}\nprometheus log:\n{}",
            empty.join("\n  "),
            prom.log()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    eprintln!(
        "{} panel targets have data ({:?} in)",
        exprs.len(),
        started.elapsed()
    );

    // The worker stops while orders keep coming: they wait in intake with no consumer.
    app.stop_worker().await;
    let stopped = Instant::now();
    let buyer = app.customer("obs-late");
    let url = format!("{}/v1/orders", app.base);
    let client = app.client.clone();
    let still_ordering = tokio::spawn(async move {
        let body = serde_json::json!({"items": [{"sku": "obs-plenty", "qty": 1}]});
        loop {
            let _ = client
                .post(&url)
                .bearer_auth(&buyer)
                .json(&body)
                .send()
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let rules = read("ops/prometheus/alerts.yml");
    let wait = EXPECTED_ALERTS
        .iter()
        .map(|a| alert_for(&rules, a))
        .max()
        .unwrap()
        + Duration::from_secs(45);
    let mut missing: Vec<&str> = EXPECTED_ALERTS.to_vec();
    while !missing.is_empty() {
        let alerts = prom.alerts().await;
        missing.retain(|name| {
            !alerts.iter().any(|a| {
                a["labels"]["alertname"] == *name
                    && a["state"] == "firing"
                    && (*name != "FloodgateServiceDown" || a["labels"]["job"] == "floodgate-worker")
            })
        });
        assert!(
            stopped.elapsed() < wait,
            "not firing {wait:?} after the worker stopped: {missing:?}; active: {alerts:#?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!(
        "{EXPECTED_ALERTS:?} firing {:?} after the worker stopped",
        stopped.elapsed()
    );
    still_ordering.abort();
    reading.abort();
    screenshot(&alerts_page(&prom.url).await);
    eprintln!("monitoring test took {:?}", started.elapsed());
}

/// Prometheus' alerts page: `/alerts` upstream, `/classic/alerts` in Debian's build
/// (which ships only the classic UI).
async fn alerts_page(prometheus: &str) -> String {
    for path in ["/alerts", "/classic/alerts"] {
        let url = format!("{prometheus}{path}");
        if reqwest::get(&url).await.is_ok_and(|r| r.status() == 200) {
            return url;
        }
    }
    panic!("{prometheus} serves no alerts page");
}

/// Chromium's screenshot of Prometheus' alerts page (`page`), for the record; Chromium missing
/// only says so (outside CI).
fn screenshot(page: &str) {
    let Some(chromium) = ["chromium", "chromium-browser"].into_iter().find(|b| {
        Command::new(b)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI: no chromium for the screenshot"
        );
        eprintln!("no chromium: no screenshot of the alerts page");
        return;
    };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("prometheus-alerts.png");
    let _ = std::fs::remove_file(&png);
    let profile = std::env::temp_dir().join(format!(
        "floodgate-chromium-{}",
        uuid::Uuid::now_v7().simple()
    ));
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--window-size=1400,1600", "--virtual-time-budget=8000"])
        .arg(format!("--screenshot={}", png.display()))
        .arg(page)
        .output()
        .expect("run chromium");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        png.is_file(),
        "chromium made no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("screenshot of the firing alerts: {}", png.display());
}
