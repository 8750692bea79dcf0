//! The one error type of the HTTP API and its problem+json (RFC 9457) rendering.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::{Map, Value, json};

/// Every way a request can fail. Each variant has the stable `code` of API.md.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("a valid bearer token is required")]
    Unauthorized,
    /// The caller's role may not do this; the text names the roles that may.
    #[error("this needs the {0} role")]
    Forbidden(&'static str),
    #[error("no such order")]
    OrderNotFound,
    #[error("no such endpoint")]
    NoSuchEndpoint,
    #[error("no such webhook")]
    WebhookNotFound,
    #[error("unknown SKU {sku}")]
    SkuNotFound { sku: String },
    #[error("SKU {sku} is sold out")]
    SoldOut { sku: String, available: i64 },
    #[error("the per-user limit of SKU {sku} would be passed")]
    LimitExceeded {
        sku: String,
        limit: i64,
        already: i64,
    },
    #[error("unknown SKU {sku}")]
    UnknownSku { sku: String },
    #[error("{0}")]
    InvalidOrder(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    Malformed(String),
    #[error("the body is larger than 64 KiB")]
    TooLarge,
    #[error("the body must be application/json")]
    UnsupportedMediaType,
    #[error("the body did not arrive within {0:?}")]
    RequestTimeout(std::time::Duration),
    #[error("too many orders; retry after {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("this Idempotency-Key was used with another body")]
    IdempotencyKeyReused,
    #[error("SKU {sku} exists already")]
    SkuExists { sku: String },
    #[error("{0}")]
    NotCancellable(String),
    #[error("category {id} exists already")]
    CategoryExists { id: String },
    #[error("no category {id}")]
    UnknownCategory { id: String },
    #[error("product {id} exists already")]
    ProductExists { id: String },
    /// A product named in a body that does not exist (422).
    #[error("no product {id}")]
    UnknownProduct { id: String },
    /// A product in the path that does not exist (404).
    #[error("no product {id}")]
    ProductNotFound { id: String },
    #[error("SKU {sku} of this product has these options already")]
    VariantExists { sku: String },
    #[error("the sale of SKU {sku} starts at {starts_at}")]
    SaleNotStarted { sku: String, starts_at: String },
    #[error("the sale of SKU {sku} ended at {ended_at}")]
    SaleEnded { sku: String, ended_at: String },
    /// A receipt or an adjustment of a bundle, which has no stock of its own.
    #[error("{sku} is a bundle: it has no stock of its own; receive or adjust its components")]
    BundleHasNoStock { sku: String },
    /// An adjustment would leave fewer units than are sold or reserved.
    #[error("SKU {sku} has {available} units free to write off")]
    InsufficientStock { sku: String, available: i64 },
    /// Paid with points and too few are spendable (`balance`: what may be spent now).
    #[error("the order needs {needed} points and {balance} are spendable")]
    InsufficientPoints { balance: i64, needed: i64 },
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            Unauthorized => StatusCode::UNAUTHORIZED,
            Forbidden(_) => StatusCode::FORBIDDEN,
            OrderNotFound
            | NoSuchEndpoint
            | WebhookNotFound
            | SkuNotFound { .. }
            | ProductNotFound { .. } => StatusCode::NOT_FOUND,
            CategoryExists { .. } | ProductExists { .. } | VariantExists { .. } => {
                StatusCode::CONFLICT
            }
            SoldOut { .. }
            | SkuExists { .. }
            | NotCancellable(_)
            | InsufficientStock { .. }
            | InsufficientPoints { .. }
            | BundleHasNoStock { .. }
            | SaleNotStarted { .. }
            | SaleEnded { .. } => StatusCode::CONFLICT,
            LimitExceeded { .. }
            | UnknownSku { .. }
            | UnknownCategory { .. }
            | UnknownProduct { .. }
            | InvalidOrder(_)
            | InvalidRequest(_)
            | IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Malformed(_) => StatusCode::BAD_REQUEST,
            TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code of API.md.
    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            Unauthorized => "unauthorized",
            Forbidden(_) => "forbidden",
            OrderNotFound | NoSuchEndpoint | WebhookNotFound => "not_found",
            SkuNotFound { .. } | UnknownSku { .. } => "unknown_sku",
            SoldOut { .. } => "sold_out",
            LimitExceeded { .. } => "limit_exceeded",
            InvalidOrder(_) => "invalid_order",
            InvalidRequest(_) => "invalid_request",
            Malformed(_) => "malformed",
            TooLarge => "too_large",
            UnsupportedMediaType => "unsupported_media_type",
            RequestTimeout(_) => "request_timeout",
            RateLimited { .. } => "rate_limited",
            IdempotencyKeyReused => "idempotency_key_reused",
            SkuExists { .. } => "sku_exists",
            NotCancellable(_) => "not_cancellable",
            InsufficientStock { .. } => "insufficient_stock",
            InsufficientPoints { .. } => "insufficient_points",
            BundleHasNoStock { .. } => "bundle_has_no_stock",
            SaleNotStarted { .. } => "sale_not_started",
            CategoryExists { .. } => "category_exists",
            UnknownCategory { .. } => "unknown_category",
            ProductExists { .. } => "product_exists",
            UnknownProduct { .. } | ProductNotFound { .. } => "unknown_product",
            VariantExists { .. } => "variant_exists",
            SaleEnded { .. } => "sale_ended",
            Unavailable(_) => "unavailable",
            Internal(_) => "internal",
        }
    }

    fn extensions(&self) -> Map<String, Value> {
        use ApiError::*;
        let v = match self {
            SoldOut { sku, available } | InsufficientStock { sku, available } => {
                json!({"sku": sku, "available": available})
            }
            LimitExceeded {
                sku,
                limit,
                already,
            } => json!({"sku": sku, "limit": limit, "already": already}),
            UnknownSku { sku }
            | SkuNotFound { sku }
            | SkuExists { sku }
            | BundleHasNoStock { sku } => {
                json!({"sku": sku})
            }
            SaleNotStarted { sku, starts_at } => json!({"sku": sku, "starts_at": starts_at}),
            CategoryExists { id } | UnknownCategory { id } => json!({"category_id": id}),
            ProductExists { id } | UnknownProduct { id } | ProductNotFound { id } => {
                json!({"product_id": id})
            }
            VariantExists { sku } => json!({"sku": sku}),
            SaleEnded { sku, ended_at } => json!({"sku": sku, "ended_at": ended_at}),
            InsufficientPoints { balance, needed } => {
                json!({"balance": balance, "needed": needed})
            }
            _ => json!({}),
        };
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    /// Seconds a client should wait before trying again, for the errors that say so.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited { retry_after_secs } => Some(*retry_after_secs),
            ApiError::Unavailable(_) => Some(1),
            _ => None,
        }
    }
}

/// A database failure nothing can be done about: a 500 (logged, never sent).
pub(crate) fn pg(e: impl Into<anyhow::Error>) -> ApiError {
    ApiError::Internal(e.into())
}

/// Anything unexpected is a 500 whose cause chain is logged, never sent.
impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::Internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(e) = &self {
            tracing::error!(error = format!("{e:#}"), "request failed");
        }
        floodgate_common::problem::response(
            self.status(),
            self.code(),
            &self.to_string(),
            self.extensions(),
            self.retry_after(),
        )
    }
}
