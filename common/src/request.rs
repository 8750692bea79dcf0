//! What every HTTP request carries through the edge ([`crate::http::edge`]): a request
//! id and a span.
//!
//! - **Request id**: the client's `X-Request-Id` if it is 1-128 visible ASCII
//!   characters, else a new UUIDv7 (junk is never reflected). tower-http's
//!   `SetRequestIdLayer` makes one when there is none and `PropagateRequestIdLayer`
//!   answers it in `X-Request-Id`; [`drop_invalid_id`] runs first so a junk header
//!   counts as none. problem+json bodies carry it as `request_id` ([`current_id`]).
//! - **Span**: `request{request_id, trace_id}` around the whole request, so every log
//!   line of the request names both. The span is at `ERROR` level: enabled whenever any
//!   line is logged (a `warn` filter must not lose the id from the warnings). It continues a valid incoming `traceparent` (else
//!   starts a trace); the request's own [`TraceParent`] is in its extensions, for
//!   handlers that hand work on (ingress puts it on the order's AMQP message).

use crate::trace::{self, TraceParent};
use axum::{
    extract::Request,
    http::{HeaderName, HeaderValue},
    middleware::Next,
    response::Response,
};
use tower_http::request_id::{MakeRequestId, RequestId};
use tracing::Instrument;

/// The request id header, in and out.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest client request id kept; a longer one is replaced.
pub const MAX_REQUEST_ID: usize = 128;

tokio::task_local! {
    static CURRENT: HeaderValue;
}

/// The id of the request being answered, inside [`context`]'s scope.
pub fn current_id() -> Option<HeaderValue> {
    CURRENT.try_with(HeaderValue::clone).ok()
}

/// True for 1-[`MAX_REQUEST_ID`] visible ASCII characters (no spaces, no controls).
pub fn valid_id(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= MAX_REQUEST_ID && v.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// Removes an `X-Request-Id` that is not [`valid_id`] (or is repeated), so a new one
/// is made instead of the junk being reflected. Synchronous: a plain
/// `tower::util::MapRequestLayer`, no future per request.
pub fn drop_invalid_id<B>(mut req: axum::http::Request<B>) -> axum::http::Request<B> {
    let h = req.headers();
    let mut values = h.get_all(&REQUEST_ID).iter();
    let keep = match (values.next(), values.next()) {
        (None, _) => true,
        (Some(v), None) => valid_id(v.as_bytes()),
        (Some(_), Some(_)) => false,
    };
    if !keep {
        req.headers_mut().remove(&REQUEST_ID);
    }
    req
}

/// Makes request ids: UUIDv7, so they sort by time.
#[derive(Clone, Copy, Default)]
pub struct MakeId;

impl MakeRequestId for MakeId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let id = uuid::Uuid::now_v7();
        let mut buf = uuid::Uuid::encode_buffer();
        let s = id.hyphenated().encode_lower(&mut buf);
        HeaderValue::from_str(s).ok().map(RequestId::new)
    }
}

/// The middleware: the request's span and trace context, and its id for problem bodies.
pub async fn context(mut req: Request, next: Next) -> Response {
    let id = req
        .extensions()
        .get::<RequestId>()
        .map(|r| r.header_value().clone())
        .or_else(|| req.headers().get(&REQUEST_ID).cloned())
        .unwrap_or_else(|| HeaderValue::from_static("-"));
    let shown = id.to_str().unwrap_or("-");
    let incoming = req
        .headers()
        .get(trace::HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse);
    let (span, own) = if trace::exporting() {
        let span = tracing::error_span!(
            "request",
            request_id = shown,
            trace_id = tracing::field::Empty
        );
        let own = trace::continue_trace(&span, incoming);
        span.record("trace_id", tracing::field::display(own.trace_id()));
        (span, own)
    } else {
        // No OpenTelemetry: the ids are ours, known before the span exists.
        let own = trace::continue_trace(&tracing::Span::none(), incoming);
        let span = tracing::error_span!(
            "request",
            request_id = shown,
            trace_id = %own.trace_id()
        );
        (span, own)
    };
    req.extensions_mut().insert(own);
    CURRENT.scope(id, next.run(req).instrument(span)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_bounded_visible_ascii() {
        assert!(valid_id(b"abc-123_X.Y:z"));
        assert!(valid_id(&[b'a'; MAX_REQUEST_ID]));
        for bad in [
            &b""[..],
            b"has space",
            b"tab\there",
            b"nul\0",
            "é".as_bytes(),
            &[b'a'; MAX_REQUEST_ID + 1],
        ] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
