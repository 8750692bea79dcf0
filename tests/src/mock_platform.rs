//! A stand-in for the data platform floodgate's webhooks deliver to. It checks each
//! delivery's Standard Webhooks signature with code of its own, not floodgate's (the same
//! mistake on both sides would otherwise pass), answers as the test tells it (success,
//! errors, slowness, a port that refuses connections) and records every request, so a
//! test can ask what arrived, how often, and how late.
//!
//! Tests use it in-process ([`MockPlatform::start`]); `ops/mock-platform` runs the same
//! server as a process for demos, steered over HTTP on the same port: `POST /control`,
//! `POST /secret`, `GET /stats`, `GET|DELETE /received`. Deliveries go to `POST /hook`.
//!
//! The signature (<https://www.standardwebhooks.com>): `webhook-signature` holds one or
//! more space-separated `v1,<standard base64 of HMAC-SHA256(key,
//! "{webhook-id}.{webhook-timestamp}.{body}")>`, any one matching is enough; the key is
//! the secret `whsec_<standard base64>` decoded, and a timestamp more than
//! [`TOLERANCE_SECS`] from now fails, as the specification's receivers do.

use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Sha256;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::{
    net::TcpListener,
    sync::{broadcast, oneshot},
    task::{JoinHandle, JoinSet},
};

/// How far a `webhook-timestamp` may be from now, either way: the specification's
/// tolerance, which keeps a captured delivery from being replayed later.
pub const TOLERANCE_SECS: i64 = 5 * 60;

const SECRET_PREFIX: &str = "whsec_";

/// How the mock answers deliveries (`POST /hook`). A bad signature is answered 401
/// whatever the mode, as a real platform would.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// 200 `{"ok":true}`.
    Ok,
    /// This fraction of the requests (0.0..=1.0, drawn at random per request) is answered
    /// 500, the rest 200: a flaky platform, whose failures the retries must absorb.
    FailRatio(f64),
    /// Always this status. 429 comes with `Retry-After: 1`, so the sender's handling of
    /// it is exercised.
    Status(u16),
    /// Holds each request this long, then answers 200: a platform slower than the
    /// sender's timeout, or one that ties up its concurrency.
    Hang(Duration),
    /// The port refuses connections: the listener is closed and every open connection
    /// dropped (a crashed platform, not a slow one). Any other mode opens the same port
    /// again.
    Down,
}

impl Mode {
    /// The mode as `POST /control` takes it, so `/stats` can be read back into it.
    fn to_json(&self) -> Value {
        match self {
            Mode::Ok => json!({"mode": "ok"}),
            Mode::FailRatio(r) => json!({"mode": "fail", "ratio": r}),
            Mode::Status(s) => json!({"mode": "status", "status": s}),
            Mode::Hang(d) => json!({"mode": "hang", "secs": d.as_secs_f64()}),
            Mode::Down => json!({"mode": "down"}),
        }
    }
}

/// One request to `POST /hook`, whatever it was answered.
#[derive(Debug, Clone, Serialize)]
pub struct Received {
    /// `webhook-id`: the event id, the same on every retry ("" when missing).
    pub webhook_id: String,
    /// `webhook-timestamp` (0 when missing or not a number).
    pub timestamp: i64,
    /// The body's `event_id` ("" when missing).
    pub event_id: String,
    /// The body's `type` ("" when missing).
    pub event_type: String,
    /// The body's `at`: when floodgate says the event happened, the start of its lag.
    #[serde(with = "time::serde::rfc3339::option")]
    pub at: Option<OffsetDateTime>,
    /// The body as JSON (null when it was not JSON).
    pub body: Value,
    /// When the request arrived (before any hang).
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    /// The signature matched the secret set at the time. Always false while no secret
    /// is set.
    pub verified: bool,
    /// The status answered; 0 while the request is in flight, and for good when its
    /// connection closed first: the sender gave up (its timeout), or the mock went down.
    pub answered: u16,
}

impl Received {
    /// Verified and answered 2xx: a delivery the platform took.
    pub fn accepted(&self) -> bool {
        self.verified && (200..300).contains(&self.answered)
    }
}

/// The mock, serving until dropped.
pub struct MockPlatform {
    inner: Arc<Inner>,
}

impl MockPlatform {
    /// A mock on a free port of 127.0.0.1, with no secret yet: the webhook's secret is
    /// known only once the webhook is created, which needs the mock's URL first
    /// ([`MockPlatform::set_secret`]).
    pub async fn start() -> Self {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("bind the mock platform")
    }

    /// A mock on `addr` (port 0: a free one), with no secret yet.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        // The port found, so that going down and up again reopens the very same one.
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            addr,
            key: Mutex::new(None),
            mode: Mutex::new(Mode::Ok),
            records: Mutex::new(Vec::new()),
            next_seq: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            answered_hanging: AtomicUsize::new(0),
            switching: tokio::sync::Mutex::new(0),
            server: Mutex::new(None),
            closed: AtomicBool::new(false),
            log: broadcast::channel(4096).0,
        });
        inner.spawn_server(listener);
        Ok(Self { inner })
    }

    /// The address bound.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Where to send the deliveries: `http://127.0.0.1:<port>/hook`.
    pub fn url(&self) -> String {
        format!("{}/hook", self.base_url())
    }

    /// The control surface's base (`/stats`, `/received`, `/control`, `/secret`).
    pub fn base_url(&self) -> String {
        let mut addr = self.inner.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        format!("http://{addr}")
    }

    /// Verifies every later delivery against `secret` (`whsec_<base64>`). Panics on a
    /// malformed secret: in a test that is the test's own mistake.
    pub fn set_secret(&self, secret: &str) {
        self.try_set_secret(secret)
            .unwrap_or_else(|e| panic!("mock platform: {e}"));
    }

    /// [`MockPlatform::set_secret`] for a secret from outside (a flag, a request).
    pub fn try_set_secret(&self, secret: &str) -> anyhow::Result<()> {
        let key = secret_key(secret).map_err(anyhow::Error::msg)?;
        *self.inner.key.lock().unwrap() = Some(key);
        Ok(())
    }

    /// Back to no secret: deliveries are recorded unverified and answered by the mode.
    pub fn clear_secret(&self) {
        *self.inner.key.lock().unwrap() = None;
    }

    pub fn mode(&self) -> Mode {
        self.inner.mode()
    }

    /// Answers by `mode` from now on. Async because [`Mode::Down`] returns only once the
    /// port is closed, and leaving it only once the port is open again, so a test can
    /// act on it at once. Panics if the port cannot be bound again (someone else took
    /// it while the mock was down).
    pub async fn set_mode(&self, mode: Mode) {
        self.inner
            .switch(mode, None)
            .await
            .expect("mock platform: bind its port again");
    }

    /// `mode` now, [`Mode::Ok`] after `d` (in the background), unless the mode was set
    /// again meanwhile: the later setting wins.
    pub async fn set_mode_for(&self, mode: Mode, d: Duration) {
        self.inner
            .switch_for(mode, d)
            .await
            .expect("mock platform: bind its port again");
    }

    /// Down now, up again after `d`: a platform that restarts.
    pub async fn down_for(&self, d: Duration) {
        self.set_mode_for(Mode::Down, d).await;
    }

    /// Every request so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.inner.received()
    }

    /// The requests verified and answered 2xx, in arrival order (retries and
    /// duplicates included).
    pub fn accepted(&self) -> Vec<Received> {
        self.inner.accepted()
    }

    /// The `webhook-id`s accepted at least once: the events the platform has, however
    /// many times each came.
    pub fn unique_accepted_ids(&self) -> BTreeSet<String> {
        self.inner.unique_accepted_ids()
    }

    /// Requests so far (all of them).
    pub fn count(&self) -> usize {
        self.inner.records.lock().unwrap().len()
    }

    /// Requests being handled now (hanging, say).
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    /// Requests held by [`Mode::Hang`] that were answered in the end: the sender waited
    /// the hang out. One whose sender gave up first (its timeout) is dropped with its
    /// connection (hyper sees the close), as is one in flight when the mock goes down;
    /// those stay `answered` 0 and are not counted here.
    pub fn answered_hanging(&self) -> usize {
        self.inner.answered_hanging.load(Ordering::SeqCst)
    }

    /// Forgets every request so far (between phases of a test).
    pub fn clear(&self) {
        self.inner.records.lock().unwrap().clear();
    }

    /// Waits until `n` distinct events were accepted; false if `timeout` passed first.
    pub async fn wait_until_unique(&self, n: usize, timeout: Duration) -> bool {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            if self.unique_accepted_ids().len() >= n {
                return true;
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Each accepted event's delivery lag in ms, sorted: its first accepted arrival
    /// minus the body's `at`. The end-to-end figure a platform sees (outbox, queue,
    /// retries included); events without a readable `at` are left out.
    pub fn lags_ms(&self) -> Vec<i64> {
        let mut first: BTreeMap<String, (OffsetDateTime, Option<OffsetDateTime>)> = BTreeMap::new();
        for r in self.accepted() {
            let e = first
                .entry(r.webhook_id.clone())
                .or_insert((r.received_at, r.at));
            if r.received_at < e.0 {
                *e = (r.received_at, r.at);
            }
        }
        let mut lags: Vec<i64> = first
            .into_values()
            .filter_map(|(received, at)| at.map(|at| (received - at).whole_milliseconds() as i64))
            .collect();
        lags.sort_unstable();
        lags
    }

    /// Every request as it is answered (or dropped, `answered` 0): the process's log.
    /// A receiver too slow loses the oldest (`Lagged`), never holds the mock up.
    pub fn subscribe(&self) -> broadcast::Receiver<Received> {
        self.inner.log.subscribe()
    }
}

impl Drop for MockPlatform {
    fn drop(&mut self) {
        // Closed first: a switch under way sees it and stops the server it just started.
        self.inner.closed.store(true, Ordering::SeqCst);
        if let Some(server) = self.inner.server.lock().unwrap().take() {
            // Dropping the accept loop drops its connections too.
            server.task.abort();
        }
    }
}

/// The `p`th percentile (0..=100, nearest rank) of `sorted`; 0 when it is empty.
pub fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Whether `signatures` (the `webhook-signature` header) holds a valid `v1` signature of
/// the delivery under `key`, within [`TOLERANCE_SECS`] of `now` (unix seconds). The
/// signed timestamp is the header's text as sent, not a re-rendering of it.
fn verify(key: &[u8], id: &str, timestamp: &str, signatures: &str, body: &[u8], now: i64) -> bool {
    let Ok(ts) = timestamp.parse::<i64>() else {
        return false;
    };
    // abs_diff: a forged timestamp near i64::MIN must fail, not overflow.
    if now.abs_diff(ts) > TOLERANCE_SECS.unsigned_abs() {
        return false;
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    signatures.split(' ').any(|entry| {
        entry
            .strip_prefix("v1,")
            .and_then(|sig| STANDARD.decode(sig).ok())
            // Constant time: a receiver that compares bytes early-out leaks the signature.
            .is_some_and(|sig| mac.clone().verify_slice(&sig).is_ok())
    })
}

/// The key `whsec_<standard base64>` stands for (the prefix may be left off, as the
/// specification's libraries allow).
fn secret_key(secret: &str) -> Result<Vec<u8>, String> {
    let b64 = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
    match STANDARD.decode(b64) {
        Ok(key) if !key.is_empty() => Ok(key),
        _ => Err("the secret is not whsec_<standard base64 of the key>".into()),
    }
}

/// The accept loop of one up period, and how to end it.
struct Server {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

struct Inner {
    addr: SocketAddr,
    key: Mutex<Option<Vec<u8>>>,
    mode: Mutex<Mode>,
    /// Each request with a sequence number, so its answer finds it after a `clear`.
    records: Mutex<Vec<(u64, Received)>>,
    next_seq: AtomicU64,
    in_flight: AtomicUsize,
    answered_hanging: AtomicUsize,
    /// Serializes mode changes (down and up must not interleave); holds the number of
    /// changes so far, so a timed mode reverts only if nothing was set after it.
    switching: tokio::sync::Mutex<u64>,
    /// The running server; None while down.
    server: Mutex<Option<Server>>,
    /// The MockPlatform was dropped: nothing starts again.
    closed: AtomicBool,
    log: broadcast::Sender<Received>,
}

impl Inner {
    fn mode(&self) -> Mode {
        self.mode.lock().unwrap().clone()
    }

    fn received(&self) -> Vec<Received> {
        let records = self.records.lock().unwrap();
        records.iter().map(|(_, r)| r.clone()).collect()
    }

    fn accepted(&self) -> Vec<Received> {
        let records = self.records.lock().unwrap();
        records
            .iter()
            .filter(|(_, r)| r.accepted())
            .map(|(_, r)| r.clone())
            .collect()
    }

    fn unique_accepted_ids(&self) -> BTreeSet<String> {
        let records = self.records.lock().unwrap();
        records
            .iter()
            .filter(|(_, r)| r.accepted())
            .map(|(_, r)| r.webhook_id.clone())
            .collect()
    }

    fn spawn_server(self: &Arc<Self>, listener: TcpListener) {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(listener, routes(self.clone()), stopped));
        *self.server.lock().unwrap() = Some(Server { stop, task });
        // Dropped while this switch was under way: Drop may have looked before the
        // server was stored, so stop it here.
        if self.closed.load(Ordering::SeqCst)
            && let Some(server) = self.server.lock().unwrap().take()
        {
            server.task.abort();
        }
    }

    /// Sets `mode`, closing or reopening the port as it needs; with `only_if`, only if
    /// no other change came since that one. Returns this change's number (None when
    /// skipped).
    async fn switch(
        self: &Arc<Self>,
        mode: Mode,
        only_if: Option<u64>,
    ) -> std::io::Result<Option<u64>> {
        let mut changes = self.switching.lock().await;
        if self.closed.load(Ordering::SeqCst) || only_if.is_some_and(|n| n != *changes) {
            return Ok(None);
        }
        if mode == Mode::Down {
            // The mode first: a request that slips in before the listener closes is
            // answered 503, not by the mode before.
            *self.mode.lock().unwrap() = mode;
            let server = self.server.lock().unwrap().take();
            if let Some(server) = server {
                let _ = server.stop.send(());
                // Done once the listener is closed and every connection dropped.
                let _ = server.task.await;
            }
        } else {
            let down = self.server.lock().unwrap().is_none();
            if down {
                let listener = bind_again(self.addr).await?;
                self.spawn_server(listener);
            }
            *self.mode.lock().unwrap() = mode;
        }
        *changes += 1;
        Ok(Some(*changes))
    }

    async fn switch_for(self: &Arc<Self>, mode: Mode, d: Duration) -> std::io::Result<()> {
        if let Some(n) = self.switch(mode, None).await? {
            let inner = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(d).await;
                if let Err(e) = inner.switch(Mode::Ok, Some(n)).await {
                    eprintln!(
                        "mock platform: could not come back up on {}: {e}",
                        inner.addr
                    );
                }
            });
        }
        Ok(())
    }

    /// Records a request as it arrives (answered 0): one dropped in flight is still
    /// seen to have come.
    fn arrive(self: &Arc<Self>, received: Received) -> Pending {
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        self.records.lock().unwrap().push((seq, received));
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Pending {
            inner: self.clone(),
            seq,
            answered: false,
        }
    }

    fn answer(&self, seq: u64, status: u16) {
        let record = {
            let mut records = self.records.lock().unwrap();
            // The newest are at the end, and so is the one being answered, mostly.
            records
                .iter_mut()
                .rev()
                .find(|(s, _)| *s == seq)
                .map(|(_, r)| {
                    r.answered = status;
                    r.clone()
                })
        };
        if let Some(r) = record {
            // No subscriber is no error.
            let _ = self.log.send(r);
        }
    }
}

/// A request being handled: counted in flight until dropped, and answered 0 if it is
/// dropped unanswered (its connection closed by the sender, or by going down).
struct Pending {
    inner: Arc<Inner>,
    seq: u64,
    answered: bool,
}

impl Pending {
    fn answer(mut self, status: u16) {
        self.inner.answer(self.seq, status);
        self.answered = true;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.inner.in_flight.fetch_sub(1, Ordering::SeqCst);
        if !self.answered {
            self.inner.answer(self.seq, 0);
        }
    }
}

/// Binds the port again. The old listener is closed by now; tokio sets SO_REUSEADDR, so
/// connections of the last up period in TIME_WAIT do not stand in the way. A short retry
/// covers the kernel's release of the old socket.
async fn bind_again(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let mut tries = 0;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if tries >= 40 => return Err(e),
            Err(_) => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The accept loop, with hyper's per-connection server rather than `axum::serve`:
/// axum::serve spawns connections where nothing can reach them, and its graceful
/// shutdown waits for them, while going down must close them at once. Here they live
/// in a JoinSet this task owns: stopping (or aborting) it aborts them all.
async fn serve(listener: TcpListener, app: Router, mut stop: oneshot::Receiver<()>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            // A send or the sender dropped: either way, down.
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let svc = TowerToHyperService::new(app.clone());
                    conns.spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
                // Out of file descriptors, say: breathe rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    conns.shutdown().await;
}

fn routes(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/hook", post(hook))
        .route("/received", get(list_received).delete(clear_received))
        .route("/stats", get(stats))
        .route("/control", post(control))
        .route("/secret", post(set_secret))
        .with_state(inner)
}

async fn hook(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    let received_at = OffsetDateTime::now_utc();
    // The mode when the request came decides its answer, even if it changes meanwhile.
    let mode = inner.mode();
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let (webhook_id, timestamp_raw) = (text("webhook-id"), text("webhook-timestamp"));
    let key = inner.key.lock().unwrap().clone();
    let verified = key.as_deref().is_some_and(|key| {
        verify(
            key,
            &webhook_id,
            &timestamp_raw,
            &text("webhook-signature"),
            &body,
            received_at.unix_timestamp(),
        )
    });
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let field = |name: &str| parsed[name].as_str().unwrap_or("").to_owned();
    let pending = inner.arrive(Received {
        timestamp: timestamp_raw.parse().unwrap_or(0),
        webhook_id,
        event_id: field("event_id"),
        event_type: field("type"),
        at: parsed["at"]
            .as_str()
            .and_then(|at| OffsetDateTime::parse(at, &Rfc3339).ok()),
        body: parsed.clone(),
        received_at,
        verified,
        answered: 0,
    });
    let status = if key.is_some() && !verified {
        401
    } else {
        match mode {
            Mode::Ok => 200,
            Mode::FailRatio(ratio) => {
                if rand::random::<f64>() < ratio {
                    500
                } else {
                    200
                }
            }
            Mode::Status(status) => status,
            Mode::Hang(d) => {
                tokio::time::sleep(d).await;
                inner.answered_hanging.fetch_add(1, Ordering::SeqCst);
                200
            }
            // Came in as the port was closing.
            Mode::Down => 503,
        }
    };
    pending.answer(status);
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = match status {
        200..=299 => json!({"ok": true}),
        401 => json!({"ok": false, "error": "invalid signature"}),
        _ => json!({"ok": false}),
    };
    let mut response = (code, Json(body)).into_response();
    if status == 429 {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

async fn list_received(State(inner): State<Arc<Inner>>) -> Json<Vec<Received>> {
    Json(inner.received())
}

async fn clear_received(State(inner): State<Arc<Inner>>) -> StatusCode {
    inner.records.lock().unwrap().clear();
    StatusCode::NO_CONTENT
}

async fn stats(State(inner): State<Arc<Inner>>) -> Json<Value> {
    let (requests, unverified) = {
        let records = inner.records.lock().unwrap();
        let unverified = records.iter().filter(|(_, r)| !r.verified).count();
        (records.len(), unverified)
    };
    Json(json!({
        "requests": requests,
        "accepted": inner.accepted().len(),
        "unique": inner.unique_accepted_ids().len(),
        "unverified": unverified,
        "in_flight": inner.in_flight.load(Ordering::SeqCst),
        "answered_hanging": inner.answered_hanging.load(Ordering::SeqCst),
        "secret_set": inner.key.lock().unwrap().is_some(),
        "mode": inner.mode().to_json(),
    }))
}

/// `POST /control`'s body. Unknown fields are refused: a misspelt `for_secs` must not
/// leave the mock failing for good.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Control {
    mode: String,
    /// "fail": the fraction failed (default 0.5).
    ratio: Option<f64>,
    /// "status": the status (default 500).
    status: Option<u16>,
    /// "hang": how long each request is held (default 30).
    secs: Option<f64>,
    /// Back to "ok" after this long; required by "down", whose control surface is down
    /// with it.
    for_secs: Option<f64>,
}

fn unprocessable(message: &str) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(json!({"error": message})),
    )
        .into_response()
}

fn seconds(secs: f64) -> Option<Duration> {
    Duration::try_from_secs_f64(secs).ok()
}

async fn control(State(inner): State<Arc<Inner>>, Json(c): Json<Control>) -> Response {
    let mode = match c.mode.as_str() {
        "ok" => Mode::Ok,
        "fail" => match c.ratio.unwrap_or(0.5) {
            r if (0.0..=1.0).contains(&r) => Mode::FailRatio(r),
            _ => return unprocessable("ratio: 0.0 to 1.0"),
        },
        "status" => match c.status.unwrap_or(500) {
            s if (100..=999).contains(&s) => Mode::Status(s),
            _ => return unprocessable("status: 100 to 999"),
        },
        "hang" => match seconds(c.secs.unwrap_or(30.0)) {
            Some(d) => Mode::Hang(d),
            None => return unprocessable("secs: a number of seconds, 0 or more"),
        },
        "down" => Mode::Down,
        _ => return unprocessable("mode: ok, fail, status, hang or down"),
    };
    let for_d = match c.for_secs.map(seconds) {
        None => None,
        Some(Some(d)) if !d.is_zero() => Some(d),
        Some(_) => return unprocessable("for_secs: a number of seconds above 0"),
    };
    let answer = json!({"mode": mode.to_json(), "for_secs": c.for_secs});
    if mode == Mode::Down {
        let Some(d) = for_d else {
            return unprocessable(
                "down takes for_secs: this surface goes down with the port, nothing could bring it back up",
            );
        };
        // Down closes this very connection: answer first, go down a moment later, from
        // a task of its own (not this connection's, which going down aborts).
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Err(e) = inner.switch_for(Mode::Down, d).await {
                eprintln!("mock platform: {e}");
            }
        });
        return (StatusCode::ACCEPTED, Json(answer)).into_response();
    }
    let switched = match for_d {
        Some(d) => inner.switch_for(mode, d).await,
        None => inner.switch(mode, None).await.map(drop),
    };
    match switched {
        Ok(()) => Json(answer).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretBody {
    /// null: no secret (deliveries recorded unverified).
    secret: Option<String>,
}

async fn set_secret(State(inner): State<Arc<Inner>>, Json(b): Json<SecretBody>) -> Response {
    let key = match b.secret.as_deref().map(secret_key) {
        None => None,
        Some(Ok(key)) => Some(key),
        Some(Err(e)) => return unprocessable(&e),
    };
    let set = key.is_some();
    *inner.key.lock().unwrap() = key;
    Json(json!({"secret_set": set})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Standard Webhooks specification's example secret.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    /// A signer of the test's own, straight from the specification's text.
    fn sign(secret: &str, id: &str, ts: i64, body: &[u8]) -> String {
        let key = STANDARD
            .decode(secret.strip_prefix("whsec_").unwrap())
            .unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{id}.{ts}.").as_bytes());
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }

    fn event(id: &str, at: OffsetDateTime) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "type": "order.confirmed",
            "event_id": id,
            "at": at.format(&Rfc3339).unwrap(),
            "data": {"order_id": "o-1"},
        }))
        .unwrap()
    }

    /// No pooled connections: a connection kept from before a down period would fail
    /// the next request for the wrong reason.
    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    }

    async fn post(
        mock: &MockPlatform,
        id: &str,
        ts: i64,
        signature: &str,
        body: Vec<u8>,
    ) -> reqwest::Result<reqwest::Response> {
        client()
            .post(mock.url())
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await
    }

    /// A delivery as floodgate makes it: signed with [`SECRET`] now, its event 1 s old.
    async fn deliver(mock: &MockPlatform, id: &str) -> reqwest::Result<reqwest::Response> {
        let now = OffsetDateTime::now_utc();
        let body = event(id, now - Duration::from_secs(1));
        let ts = now.unix_timestamp();
        post(mock, id, ts, &sign(SECRET, id, ts, &body), body).await
    }

    async fn started() -> MockPlatform {
        let mock = MockPlatform::start().await;
        mock.set_secret(SECRET);
        mock
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let until = std::time::Instant::now() + Duration::from_secs(2);
        while !f() {
            assert!(std::time::Instant::now() < until, "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn the_specifications_example_verifies() {
        let key = secret_key(SECRET).unwrap();
        let (id, ts) = ("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330);
        let body = br#"{"test": 2432232314}"#;
        let good = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        assert_eq!(sign(SECRET, id, ts, body), good);
        assert!(verify(&key, id, "1614265330", good, body, ts));
        // Any one of several signatures (a secret being rotated) is enough.
        let several = format!("v1,AAAA {good}");
        assert!(verify(&key, id, "1614265330", &several, body, ts));
        assert!(!verify(&key, id, "1614265330", good, b"{}", ts));
        assert!(!verify(&key, "msg_other", "1614265330", good, body, ts));
        assert!(!verify(
            &key,
            id,
            "1614265330",
            &good.replace("v1,", "v2,"),
            body,
            ts
        ));
        assert!(!verify(&key, id, "1614265330", "", body, ts));
        // Within the tolerance either way, and not a second beyond it.
        assert!(verify(&key, id, "1614265330", good, body, ts + 300));
        assert!(verify(&key, id, "1614265330", good, body, ts - 300));
        assert!(!verify(&key, id, "1614265330", good, body, ts + 301));
        assert!(!verify(&key, id, "1614265330", good, body, ts - 301));
        assert!(!verify(&key, id, &i64::MIN.to_string(), good, body, ts));
        assert!(secret_key("whsec_not base64!").is_err());
        assert!(secret_key("whsec_").is_err());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[tokio::test]
    async fn a_signed_delivery_is_accepted_and_recorded() {
        let mock = started().await;
        let r = deliver(&mock, "ev-1").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap(), json!({"ok": true}));
        let got = mock.received();
        assert_eq!(got.len(), 1);
        let r = &got[0];
        assert!(r.verified);
        assert_eq!(r.answered, 200);
        assert_eq!(
            (r.webhook_id.as_str(), r.event_id.as_str()),
            ("ev-1", "ev-1")
        );
        assert_eq!(r.event_type, "order.confirmed");
        assert!(r.at.is_some());
        // A retry of the same event: two requests, one event.
        assert_eq!(deliver(&mock, "ev-1").await.unwrap().status(), 200);
        assert_eq!(deliver(&mock, "ev-2").await.unwrap().status(), 200);
        assert_eq!((mock.count(), mock.accepted().len()), (3, 3));
        assert_eq!(
            mock.unique_accepted_ids(),
            BTreeSet::from(["ev-1".to_owned(), "ev-2".to_owned()])
        );
        assert!(mock.wait_until_unique(2, Duration::from_millis(10)).await);
        assert!(!mock.wait_until_unique(3, Duration::from_millis(30)).await);
        let lags = mock.lags_ms();
        assert_eq!(lags.len(), 2);
        assert!(lags.iter().all(|l| (900..5000).contains(l)), "{lags:?}");
        mock.clear();
        assert_eq!(mock.count(), 0);
    }

    #[tokio::test]
    async fn a_bad_or_stale_signature_is_refused_whatever_the_mode() {
        let mock = started().await;
        mock.set_mode(Mode::Hang(Duration::from_secs(10))).await;
        let ts = OffsetDateTime::now_utc().unix_timestamp();
        let body = event("ev-1", OffsetDateTime::now_utc());
        let other = sign("whsec_c2VjcmV0LW9mLWFub3RoZXI=", "ev-1", ts, &body);
        let r = post(&mock, "ev-1", ts, &other, body.clone()).await.unwrap();
        assert_eq!(r.status(), 401);
        // Signed right, but ten minutes ago: a replay.
        let old = ts - 600;
        let r = post(&mock, "ev-1", old, &sign(SECRET, "ev-1", old, &body), body)
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let got = mock.received();
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|r| !r.verified && r.answered == 401));
        assert!(mock.accepted().is_empty());
        assert_eq!(mock.answered_hanging(), 0);
    }

    #[tokio::test]
    async fn without_a_secret_deliveries_are_answered_but_unverified() {
        let mock = MockPlatform::start().await;
        assert_eq!(deliver(&mock, "ev-1").await.unwrap().status(), 200);
        mock.set_mode(Mode::Status(503)).await;
        assert_eq!(deliver(&mock, "ev-2").await.unwrap().status(), 503);
        assert!(mock.received().iter().all(|r| !r.verified));
        assert!(mock.accepted().is_empty());
        // Learnt later, as a test does once the webhook is created.
        mock.set_secret(SECRET);
        mock.set_mode(Mode::Ok).await;
        assert_eq!(deliver(&mock, "ev-3").await.unwrap().status(), 200);
        assert_eq!(mock.unique_accepted_ids().len(), 1);
    }

    #[tokio::test]
    async fn fail_ratio_fails_that_fraction() {
        let mock = started().await;
        mock.set_mode(Mode::FailRatio(1.0)).await;
        for i in 0..3 {
            let r = deliver(&mock, &format!("ev-{i}")).await.unwrap();
            assert_eq!(r.status(), 500);
        }
        mock.set_mode(Mode::FailRatio(0.0)).await;
        assert_eq!(deliver(&mock, "ev-9").await.unwrap().status(), 200);
        // Verified all, accepted only the one answered 200.
        assert!(mock.received().iter().all(|r| r.verified));
        assert_eq!(mock.accepted().len(), 1);
    }

    #[tokio::test]
    async fn a_status_mode_answers_that_status_and_429_says_when_to_retry() {
        let mock = started().await;
        mock.set_mode(Mode::Status(429)).await;
        let r = deliver(&mock, "ev-1").await.unwrap();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "1");
        for status in [400, 410, 500] {
            mock.set_mode(Mode::Status(status)).await;
            let r = deliver(&mock, "ev-1").await.unwrap();
            assert_eq!(r.status(), status);
            assert!(r.headers().get("retry-after").is_none());
        }
        assert!(mock.accepted().is_empty());
    }

    #[tokio::test]
    async fn a_timed_mode_reverts_unless_set_again() {
        let mock = started().await;
        mock.set_mode_for(Mode::Status(500), Duration::from_millis(150))
            .await;
        assert_eq!(deliver(&mock, "ev-1").await.unwrap().status(), 500);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(mock.mode(), Mode::Ok);
        assert_eq!(deliver(&mock, "ev-1").await.unwrap().status(), 200);
        mock.set_mode_for(Mode::Status(500), Duration::from_millis(150))
            .await;
        mock.set_mode(Mode::Status(503)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(mock.mode(), Mode::Status(503));
    }

    #[tokio::test]
    async fn down_refuses_connections_and_up_serves_the_same_port_again() {
        let mock = started().await;
        let addr = mock.addr();
        assert_eq!(deliver(&mock, "ev-1").await.unwrap().status(), 200);
        mock.set_mode(Mode::Down).await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        let err = deliver(&mock, "ev-2").await.unwrap_err();
        assert!(err.is_connect(), "{err:?}");
        mock.set_mode(Mode::Ok).await;
        assert_eq!(mock.addr(), addr);
        assert_eq!(deliver(&mock, "ev-2").await.unwrap().status(), 200);
        // A restart: down now, up by itself.
        mock.down_for(Duration::from_millis(200)).await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(deliver(&mock, "ev-3").await.unwrap().status(), 200);
        assert_eq!(mock.unique_accepted_ids().len(), 3);
    }

    #[tokio::test]
    async fn hang_holds_the_request_in_flight() {
        let mock = Arc::new(started().await);
        mock.set_mode(Mode::Hang(Duration::from_millis(300))).await;
        let m = mock.clone();
        let sent = tokio::spawn(async move { deliver(&m, "ev-1").await.unwrap().status() });
        until("one request in flight", || mock.in_flight() == 1).await;
        assert_eq!(mock.answered_hanging(), 0);
        assert_eq!(mock.received()[0].answered, 0);
        assert_eq!(sent.await.unwrap(), 200);
        assert_eq!((mock.in_flight(), mock.answered_hanging()), (0, 1));
        assert_eq!(mock.accepted().len(), 1);
    }

    #[tokio::test]
    async fn going_down_drops_the_requests_in_flight() {
        let mock = Arc::new(started().await);
        mock.set_mode(Mode::Hang(Duration::from_secs(30))).await;
        let m = mock.clone();
        let sent = tokio::spawn(async move { deliver(&m, "ev-1").await });
        until("one request in flight", || mock.in_flight() == 1).await;
        mock.set_mode(Mode::Down).await;
        assert!(sent.await.unwrap().is_err(), "the connection was dropped");
        assert_eq!((mock.in_flight(), mock.answered_hanging()), (0, 0));
        let got = mock.received();
        assert_eq!((got.len(), got[0].answered), (1, 0));
    }

    #[tokio::test]
    async fn the_control_surface_steers_the_mock() {
        let mock = MockPlatform::start().await;
        let (http, base) = (client(), mock.base_url());
        let control = |body: Value| {
            let (http, base) = (http.clone(), base.clone());
            async move {
                let r = http
                    .post(format!("{base}/control"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                r.status().as_u16()
            }
        };
        let r = http
            .post(format!("{base}/secret"))
            .json(&json!({"secret": SECRET}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = http
            .post(format!("{base}/secret"))
            .json(&json!({"secret": "whsec_???"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422);
        assert_eq!(control(json!({"mode": "status", "status": 410})).await, 200);
        assert_eq!(mock.mode(), Mode::Status(410));
        assert_eq!(deliver(&mock, "ev-1").await.unwrap().status(), 410);
        assert_eq!(control(json!({"mode": "ok"})).await, 200);
        assert_eq!(deliver(&mock, "ev-1").await.unwrap().status(), 200);
        let stats: Value = http
            .get(format!("{base}/stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(stats["requests"], 2);
        assert_eq!(stats["accepted"], 1);
        assert_eq!(stats["unique"], 1);
        assert_eq!(stats["unverified"], 0);
        assert_eq!(stats["in_flight"], 0);
        assert_eq!(stats["mode"], json!({"mode": "ok"}));
        let list: Vec<Value> = http
            .get(format!("{base}/received"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[1]["webhook_id"], "ev-1");
        assert_eq!(list[1]["answered"], 200);
        let r = http
            .delete(format!("{base}/received"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        assert_eq!(mock.count(), 0);
        // Refused: no way back up; out of range; a misspelt field.
        assert_eq!(control(json!({"mode": "down"})).await, 422);
        assert_eq!(control(json!({"mode": "fail", "ratio": 2.0})).await, 422);
        assert_eq!(control(json!({"mode": "ok", "for_sec": 1})).await, 422);
        assert_eq!(mock.mode(), Mode::Ok);
        // Down for a while: answered first, then the port closes, then opens again.
        assert_eq!(control(json!({"mode": "down", "for_secs": 0.4})).await, 202);
        let until_closed = std::time::Instant::now() + Duration::from_secs(2);
        while tokio::net::TcpStream::connect(mock.addr()).await.is_ok() {
            assert!(std::time::Instant::now() < until_closed, "down");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        until("up again", || mock.mode() == Mode::Ok).await;
        assert_eq!(deliver(&mock, "ev-2").await.unwrap().status(), 200);
    }

    #[tokio::test]
    async fn a_sender_that_gives_up_leaves_the_hang_unanswered() {
        let mock = started().await;
        mock.set_mode(Mode::Hang(Duration::from_millis(400))).await;
        let now = OffsetDateTime::now_utc();
        let (body, ts) = (event("ev-1", now), now.unix_timestamp());
        let _provider = client();
        let impatient = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_millis(100))
            .build()
            .unwrap();
        let r = impatient
            .post(mock.url())
            .header("webhook-id", "ev-1")
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sign(SECRET, "ev-1", ts, &body))
            .body(body)
            .send()
            .await;
        assert!(r.unwrap_err().is_timeout());
        // The closed connection ends the hang early: nothing answered, nothing accepted.
        until("the hang dropped", || mock.in_flight() == 0).await;
        assert_eq!(mock.answered_hanging(), 0);
        assert_eq!(mock.received()[0].answered, 0);
        assert!(mock.accepted().is_empty());
    }
}
