//! The HTTP edge every service shares: the server loop, the limits every listener
//! enforces, and the rule that every error answer is problem+json.
//!
//! - [`serve`]: hyper's HTTP/1 server with a header read timeout ([`HEADER_TIMEOUT`]),
//!   a bounded parse buffer, an optional bounded kernel send buffer, the peer address
//!   in each request's extensions (`ConnectInfo`), and a kill switch per connection
//!   ([`ConnectionHandle`]): axum's `serve` can neither time out a client that never
//!   finishes its headers nor drop one chosen connection (the notifier must, for a
//!   subscriber that stopped reading with its send buffer full).
//! - [`edge`]: the layers every router gets: request headers bounded
//!   ([`MAX_HEADER_BYTES`], [`MAX_HEADERS`]; 431), the whole request body bounded in time
//!   ([`BODY_DEADLINE`]; 408), and any error answer that is not problem+json yet (axum's
//!   405, a path that is not valid UTF-8, a failed WebSocket upgrade, ...) rewritten as
//!   one with a stable `code`; and every request its id (`X-Request-Id`) and span
//!   ([`crate::request`]).
//!
//! What no floodgate code can see: a request head larger than the connection's buffer
//! ([`ServeOptions::http_buffer`]: 64 KiB, the notifier's 16 KiB) or that is not HTTP at
//! all is refused by hyper itself (431 or 400, empty body, connection closed).

use crate::problem;
use axum::{
    Router,
    body::{Body, to_bytes},
    extract::{ConnectInfo, Request},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::Response,
};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use serde_json::Map;
use std::{net::SocketAddr, sync::Arc, time::Duration};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

/// How long a client may take to send its request line and headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a whole request body (64 KiB at most).
pub const BODY_DEADLINE: Duration = Duration::from_secs(10);
/// Request header bytes (names and values) floodgate accepts; more is 431.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Request headers floodgate accepts; more is 431.
pub const MAX_HEADERS: usize = 64;
/// hyper's default buffer bound: request heads past it never reach floodgate (hyper
/// answers 431 with no body). Well above [`MAX_HEADER_BYTES`], so that is what clients meet.
pub const PARSE_BUFFER: usize = 64 * 1024;
/// hyper's own header count limit, above [`MAX_HEADERS`] for the same reason.
const PARSE_HEADERS: usize = 256;

/// A connection's kill switch, found in every request's extensions.
#[derive(Clone, Debug)]
pub struct ConnectionHandle {
    kill: CancellationToken,
}

impl ConnectionHandle {
    /// Drops the connection now, whatever it is doing.
    pub fn kill(&self) {
        self.kill.cancel();
    }
}

/// How [`serve`] treats each connection.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Kernel send buffer per connection (the notifier bounds it so a client that stops
    /// reading is found out after kilobytes); None leaves the kernel's autotuning.
    pub send_buffer: Option<usize>,
    /// hyper's read and write buffer bound per connection ([`PARSE_BUFFER`] unless a
    /// service needs less: the notifier's 16 KiB makes a stalled subscriber show sooner).
    pub http_buffer: usize,
    /// How long connections may finish after shutdown before they are dropped.
    pub grace: Duration,
}

/// Serves `router` on `listener` until `shutdown`; then stops accepting, lets each
/// connection finish gracefully for up to `opts.grace`, and drops the rest.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    opts: ServeOptions,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, usually: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        if let Some(bytes) = opts.send_buffer
            && let Err(e) = socket2::SockRef::from(&stream).set_send_buffer_size(bytes)
        {
            tracing::debug!(error = %e, "could not bound the send buffer");
        }
        let handle = ConnectionHandle {
            kill: CancellationToken::new(),
        };
        let kill = handle.kill.clone();
        let service = router
            .clone()
            .map_request(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(handle.clone());
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            });
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(opts.http_buffer)
                .max_headers(PARSE_HEADERS)
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = kill.cancelled() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(opts.grace, conn).await;
                }
            }
        });
    }
    // Stop accepting: new connections are refused, not left waiting in the backlog.
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// The peer address [`serve`] put in the request (None under another server).
pub fn peer(req: &Request) -> Option<SocketAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

/// The layers every service's router gets; see the module docs.
pub fn edge(router: Router) -> Router {
    use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
    // Outermost last: the request id is settled first, then the span and the id's
    // scope wrap everything that can answer an error (so every problem body has it).
    router
        .layer(middleware::from_fn(bound_request))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .layer(middleware::from_fn(problem_errors))
        .layer(middleware::from_fn(crate::request::context))
        .layer(PropagateRequestIdLayer::new(crate::request::REQUEST_ID))
        .layer(SetRequestIdLayer::new(
            crate::request::REQUEST_ID,
            crate::request::MakeId,
        ))
        .layer(tower::util::MapRequestLayer::new(
            crate::request::drop_invalid_id::<Body>,
        ))
}

/// A handler that panicked answers 500 problem+json (and is logged), instead of the
/// connection being reset.
fn panicked(err: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = err
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| err.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    tracing::error!(panic = what, "a request handler panicked");
    problem::response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error",
        Map::new(),
        None,
    )
}

/// 431 for too many or too large headers; the body must arrive within [`BODY_DEADLINE`]
/// (a body read that passes it fails, and the extractor answers 408).
async fn bound_request(req: Request, next: Next) -> Response {
    let headers = req.headers();
    let bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return problem::response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            &format!(
                "request headers: at most {MAX_HEADERS} and {MAX_HEADER_BYTES} bytes, got {} and {bytes}",
                headers.len()
            ),
            Map::new(),
            None,
        );
    }
    let req =
        req.map(|body| Body::new(tower_http::timeout::DeadlineBody::new(BODY_DEADLINE, body)));
    next.run(req).await
}

/// True if `e` (or what caused it) is a body read that ran past [`BODY_DEADLINE`].
pub fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The stable code of an error status that floodgate's own handlers did not answer.
pub fn code_of(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UPGRADE_REQUIRED => "upgrade_required",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "headers_too_large",
        StatusCode::TOO_MANY_REQUESTS => "rate_limited",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    }
}

/// Rewrites an error answer that is not JSON (axum's and tower's own) as problem+json;
/// its text, if any, becomes `detail`. Headers such as `Allow` are kept.
async fn problem_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    // Ours already: problem+json, or a JSON body of its own (`/readyz`'s 503 names
    // what is down).
    let is_ours = resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.starts_with(b"application/problem+json") || v.starts_with(b"application/json")
    });
    if is_ours {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let detail = match text.trim() {
        "" => status.canonical_reason().unwrap_or("error").to_owned(),
        t => t.to_owned(),
    };
    let mut fixed = problem::response(status, code_of(status), &detail, Map::new(), None);
    // Keep what describes the exchange (Allow, CORS, Retry-After; every value of a
    // repeated one), not what described the old body.
    for (name, value) in parts.headers.iter() {
        let about_body = [
            header::CONTENT_TYPE,
            header::CONTENT_LENGTH,
            header::CONTENT_ENCODING,
        ];
        if !about_body.contains(name) {
            fixed.headers_mut().append(name.clone(), value.clone());
        }
    }
    fixed
}

/// Sheds requests past a fixed number in flight: 503 `unavailable` with `Retry-After`
/// at once, instead of a queue whose wait grows with the crowd.
///
/// A request counts once its body has arrived (a client sending slowly holds a
/// connection until [`BODY_DEADLINE`], never a slot), and for as long as any work it
/// started runs: a handler that hands work to a task of its own moves the request's
/// [`InFlightPermit`] (in its extensions) into that task.
#[derive(Clone)]
pub struct InFlight {
    permits: Arc<tokio::sync::Semaphore>,
    max_body: usize,
}

/// A request's slot; the slot is free once every clone is dropped.
#[derive(Clone)]
pub struct InFlightPermit(#[allow(dead_code)] Arc<tokio::sync::OwnedSemaphorePermit>);

fn chain_has<E: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<E>() {
            return true;
        }
        cur = err.source();
    }
    false
}

impl InFlight {
    /// At most `max` requests at once, each body at most `max_body` bytes.
    pub fn new(max: usize, max_body: usize) -> Self {
        Self {
            permits: Arc::new(tokio::sync::Semaphore::new(max)),
            max_body,
        }
    }

    /// The middleware (`axum::middleware::from_fn_with_state`).
    pub async fn layer(
        axum::extract::State(me): axum::extract::State<InFlight>,
        req: Request,
        next: Next,
    ) -> Response {
        let (parts, body) = req.into_parts();
        let bytes = match to_bytes(body, me.max_body).await {
            Ok(b) => b,
            Err(e) => {
                let e = e.into_inner();
                let (status, code, detail) = if is_body_timeout(&*e) {
                    (
                        StatusCode::REQUEST_TIMEOUT,
                        "request_timeout",
                        format!("the body did not arrive within {BODY_DEADLINE:?}"),
                    )
                } else if chain_has::<http_body_util::LengthLimitError>(&*e) {
                    (
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "too_large",
                        format!("the body is larger than {} KiB", me.max_body / 1024),
                    )
                } else {
                    (
                        StatusCode::BAD_REQUEST,
                        "malformed",
                        format!("the body could not be read: {e}"),
                    )
                };
                return problem::response(status, code, &detail, Map::new(), None);
            }
        };
        let mut req = Request::from_parts(parts, Body::from(bytes));
        let Ok(permit) = me.permits.clone().try_acquire_owned() else {
            metrics::counter!(crate::telemetry::names::SHED, "reason" => "in_flight").increment(1);
            return problem::response(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "overloaded: too many requests in flight; retry shortly",
                Map::new(),
                Some(1),
            );
        };
        req.extensions_mut()
            .insert(InFlightPermit(Arc::new(permit)));
        next.run(req).await
    }
}

/// Requests per second per client IP, for public routes that need no token.
#[derive(Clone)]
pub struct PerIp {
    limiter: Arc<governor::DefaultKeyedRateLimiter<std::net::IpAddr>>,
}

impl PerIp {
    /// None when `per_sec` is 0 (off).
    pub fn new(per_sec: u32, burst: u32) -> Option<Self> {
        let rate = std::num::NonZeroU32::new(per_sec)?;
        let burst = std::num::NonZeroU32::new(burst).unwrap_or(rate);
        let limiter = Arc::new(governor::DefaultKeyedRateLimiter::keyed(
            governor::Quota::per_second(rate).allow_burst(burst),
        ));
        // Forget idle addresses, so memory follows the clients of the last minute.
        let weak = Arc::downgrade(&limiter);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                let Some(l) = weak.upgrade() else { break };
                l.retain_recent();
            }
        });
        Some(Self { limiter })
    }

    /// The middleware (`axum::middleware::from_fn_with_state`); a request without a
    /// known peer (another server) passes.
    pub async fn layer(
        axum::extract::State(me): axum::extract::State<Option<PerIp>>,
        req: Request,
        next: Next,
    ) -> Response {
        if let (Some(me), Some(peer)) = (&me, peer(&req))
            && let Err(not_until) = me.limiter.check_key(&peer.ip())
        {
            use governor::clock::Clock;
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            metrics::counter!(crate::telemetry::names::SHED, "reason" => "per_ip").increment(1);
            return problem::response(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests from this address; retry after the wait",
                Map::new(),
                Some(wait.as_secs().max(1)),
            );
        }
        next.run(req).await
    }
}

/// HTTP methods as a metric label: a closed set, so a client inventing methods cannot
/// grow `/metrics`.
pub fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};

    async fn call(
        router: Router,
        req: Request,
    ) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
        let resp = edge(router).oneshot(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let bytes = to_bytes(body, 1 << 16).await.unwrap();
        (
            parts.status,
            parts.headers,
            serde_json::from_slice(&bytes).unwrap_or_default(),
        )
    }

    fn get_req(path: &str) -> Request {
        Request::builder().uri(path).body(Body::empty()).unwrap()
    }

    async fn boom() -> &'static str {
        panic!("boom")
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500_problem_json() {
        let router = Router::new().route("/boom", get(boom));
        let (status, headers, body) = call(router, get_req("/boom")).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
        assert_eq!(body["code"], "internal");
    }

    #[tokio::test]
    async fn plain_errors_become_problems_keeping_allow_and_json_stays_as_it_is() {
        let router = Router::new()
            .route("/only-post", post(|| async { "ok" }))
            .route(
                "/json-503",
                get(|| async {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        axum::Json(serde_json::json!({"down": ["redis"]})),
                    )
                }),
            );
        let (status, headers, body) = call(router.clone(), get_req("/only-post")).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(body["code"], "method_not_allowed");
        assert!(headers[header::ALLOW].to_str().unwrap().contains("POST"));
        let (status, _, body) = call(router, get_req("/json-503")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, serde_json::json!({"down": ["redis"]}));
    }
}
