//! problem+json (RFC 9457) responses, the one error body of every floodgate endpoint.

use axum::{
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Map, Value, json};

/// A problem+json response: `type`, `title`, `status`, `detail` and the stable `code`,
/// plus `extensions` (for example `{"sku": ...}`), with `Retry-After` when given, and
/// `request_id` when answering a request that passed the edge ([`crate::request`]).
pub fn response(
    status: StatusCode,
    code: &str,
    detail: &str,
    extensions: Map<String, Value>,
    retry_after_secs: Option<u64>,
) -> Response {
    let mut body = extensions;
    let title = status.canonical_reason().unwrap_or("Error");
    body.insert("type".into(), json!(format!("/problems/{code}")));
    body.insert("title".into(), json!(title));
    body.insert("status".into(), json!(status.as_u16()));
    body.insert("detail".into(), json!(detail));
    body.insert("code".into(), json!(code));
    if let Some(id) = crate::request::current_id()
        && let Ok(id) = id.to_str()
    {
        body.insert("request_id".into(), json!(id));
    }
    let mut resp = (status, axum::Json(Value::Object(body))).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if let Some(secs) = retry_after_secs {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// The token of an `Authorization: Bearer ...` header, if there is one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
}
