//! Request extractors: the caller from the bearer token, and JSON bodies whose every
//! failure maps to API.md's codes (415, 413, 400) instead of axum's defaults.

use crate::{error::ApiError, state::AppState};
use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::{header, request::Parts},
};
use floodgate_common::auth::Caller;
use serde::de::DeserializeOwned;

/// Largest accepted body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token =
            floodgate_common::problem::bearer(&parts.headers).ok_or(ApiError::Unauthorized)?;
        state.verifier.verify(token).map_err(|e| {
            tracing::debug!(error = %e, "token refused");
            ApiError::Unauthorized
        })
    }
}

/// A caller with the admin role; anyone else gets 403 (401 without a valid token).
pub struct Admin(pub Caller);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        if caller.is_admin() {
            Ok(Admin(caller))
        } else {
            Err(ApiError::Forbidden("admin"))
        }
    }
}

/// A caller who may do catalog and stock work: a manager or an admin (API.md "Roles").
pub struct Manager(pub Caller);

impl FromRequestParts<AppState> for Manager {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        if caller.can_manage() {
            Ok(Manager(caller))
        } else {
            Err(ApiError::Forbidden("manager or admin"))
        }
    }
}

/// A JSON body deserialized into `T`; any shape error is 400 `malformed`.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = json_bytes(req, state).await?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::Malformed(format!("the body is not a valid request: {e}")))
    }
}

/// A JSON object whose keys are unique: `{"qty":1,"qty":1000}` is refused as malformed
/// (400), as the order body's derived struct refuses it, instead of the last one winning.
pub struct Object(pub serde_json::Map<String, serde_json::Value>);

impl<'de> serde::Deserialize<'de> for Object {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Object;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Object, A::Error> {
                let mut out = serde_json::Map::new();
                while let Some((k, v)) = m.next_entry::<String, serde_json::Value>()? {
                    if out.contains_key(&k) {
                        return Err(serde::de::Error::custom(format_args!(
                            "duplicate field `{k}`"
                        )));
                    }
                    out.insert(k, v);
                }
                Ok(Object(out))
            }
        }
        d.deserialize_map(Visitor)
    }
}

async fn json_bytes(req: Request, state: &AppState) -> Result<Bytes, ApiError> {
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| {
            let m = m.trim().to_ascii_lowercase();
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        })
        .unwrap_or(false);
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    Bytes::from_request(req, state).await.map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge
        } else if floodgate_common::http::is_body_timeout(&e) {
            ApiError::RequestTimeout(floodgate_common::http::BODY_DEADLINE)
        } else {
            ApiError::Malformed(format!("the body could not be read: {e}"))
        }
    })
}

/// The integer a JSON number stands for, if it stands for one. JSON has one number
/// type, and JSON Schema counts `2.0` as the integer 2, so a client (or a generator
/// working from the OpenAPI document) may write an integer either way; a fraction, or a
/// float too large to be exact, is not an integer.
pub fn integral(n: &serde_json::Number) -> Option<i64> {
    /// Past 2^53 a float no longer names one integer.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    n.as_i64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() <= EXACT)
            .map(|f| f as i64)
    })
}

/// `#[serde(deserialize_with)]` for an integer field that takes [`integral`] numbers.
pub fn integer<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    use serde::{Deserialize, de::Error};
    let n = serde_json::Number::deserialize(d)?;
    integral(&n).ok_or_else(|| D::Error::custom(format!("invalid value: {n}, expected an integer")))
}

#[cfg(test)]
mod tests {
    use super::integral;

    #[test]
    fn integral_numbers_are_integers_whichever_way_written() {
        let n = |s: &str| serde_json::from_str::<serde_json::Number>(s).unwrap();
        assert_eq!(integral(&n("325")), Some(325));
        assert_eq!(integral(&n("325.0")), Some(325));
        assert_eq!(integral(&n("3.25e2")), Some(325));
        assert_eq!(integral(&n("-0.0")), Some(0));
        assert_eq!(integral(&n("3.5")), None);
        assert_eq!(integral(&n("1e300")), None);
        assert_eq!(integral(&n("18446744073709551615")), None);
    }
}
