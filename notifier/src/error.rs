//! The notifier's HTTP errors (before a stream starts) as problem+json, and the same
//! errors as WebSocket close frames (after the upgrade).

use crate::hub::SubscribeError;
use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Subscribe(#[from] SubscribeError),
    #[error("the token is invalid or expired")]
    BadToken,
    #[error("no such endpoint")]
    NoSuchEndpoint,
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::Internal(e)
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Subscribe(e) => match e {
                SubscribeError::InvalidTopic(_) => StatusCode::BAD_REQUEST,
                SubscribeError::Unauthorized => StatusCode::UNAUTHORIZED,
                SubscribeError::Forbidden(_) => StatusCode::FORBIDDEN,
                SubscribeError::OrderNotFound | SubscribeError::UnknownSku(_) => {
                    StatusCode::NOT_FOUND
                }
                SubscribeError::Full(_) => StatusCode::SERVICE_UNAVAILABLE,
            },
            ApiError::BadToken => StatusCode::UNAUTHORIZED,
            ApiError::NoSuchEndpoint => StatusCode::NOT_FOUND,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code (API.md's where it has one).
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Subscribe(e) => match e {
                SubscribeError::InvalidTopic(_) => "invalid_topic",
                SubscribeError::Unauthorized => "unauthorized",
                SubscribeError::Forbidden(_) => "forbidden",
                SubscribeError::OrderNotFound => "not_found",
                SubscribeError::UnknownSku(_) => "unknown_sku",
                SubscribeError::Full(_) => "unavailable",
            },
            ApiError::BadToken => "unauthorized",
            ApiError::NoSuchEndpoint => "not_found",
            ApiError::Internal(_) => "internal",
        }
    }

    /// A WebSocket close code mirroring the HTTP status in the private range (4400,
    /// 4401, ...), or 1011 for an internal error.
    pub fn close_code(&self) -> u16 {
        match self {
            ApiError::Internal(_) => 1011,
            e => 4000 + e.status().as_u16(),
        }
    }

    /// `code: detail`, cut to the 123 bytes a close frame's reason may hold.
    pub fn close_reason(&self) -> String {
        truncate(format!("{}: {}", self.code(), self), 123)
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(e) = &self {
            tracing::error!(error = format!("{e:#}"), "request failed");
        }
        let mut ext = serde_json::Map::new();
        if let ApiError::Subscribe(SubscribeError::UnknownSku(sku)) = &self {
            ext.insert("sku".into(), sku.clone().into());
        }
        let retry = matches!(self, ApiError::Subscribe(SubscribeError::Full(_))).then_some(5);
        floodgate_common::problem::response(
            self.status(),
            self.code(),
            &self.to_string(),
            ext,
            retry,
        )
    }
}
