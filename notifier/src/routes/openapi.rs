//! The notifier's OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]`
//! attributes, served at `GET /openapi.json` with Swagger UI at `GET /docs`.
//!
//! The error responses are built from [`ApiError`] values, so their status and `code`
//! are what `ApiError::status` and `ApiError::code` answer. The committed
//! `docs/openapi-notifier.json` must equal [`document`]: the `openapi` test fails
//! otherwise (`UPDATE_OPENAPI=1 cargo test -p floodgate-notifier openapi` rewrites it).

use super::{page, sse, ws};
use crate::{error::ApiError, hub::SubscribeError};
use axum::{Json, Router, http::StatusCode};
use floodgate_common::openapi::{ProblemDoc, StreamAuth, problems};
use std::collections::BTreeMap;
use utoipa::{
    IntoResponses, OpenApi, ToSchema,
    openapi::{RefOr, response::Response},
};
use utoipa_swagger_ui::SwaggerUi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "floodgate notifier",
        description = "Order statuses and stock levels, live, over Server-Sent Events and \
                       WebSocket; the live page. The contract is API.md.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        sse::stream,
        ws::upgrade,
        page::index,
        page::script,
        page::style,
        page::config,
        super::healthz,
        super::readyz,
        super::metrics,
        openapi_json,
    ),
    components(schemas(
        floodgate_common::openapi::Problem,
        Topics,
        StreamEvent,
        StockEvent,
        OrderEvent,
        ErrorEvent,
    )),
    modifiers(&StreamAuth),
    tags(
        (name = "streams", description = "live order statuses and stock levels"),
        (name = "page", description = "the live page"),
        (name = "operations", description = "health, readiness, metrics, this document"),
    ),
)]
struct ApiDoc;

/// The document, as served and committed.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// `GET /openapi.json` and Swagger UI at `/docs` (its assets are compiled in).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    SwaggerUi::new("/docs")
        .url("/openapi.json", document())
        .into()
}

/// The document itself (the route is Swagger UI's; this documents it).
#[utoipa::path(
    get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "this OpenAPI 3.1 document", content_type = "application/json", body = Object)),
)]
#[allow(dead_code)]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(document())
}

impl From<ApiError> for ProblemDoc {
    fn from(e: ApiError) -> Self {
        ProblemDoc {
            status: e.status().as_u16(),
            code: e.code(),
            // As `IntoResponse for ApiError` sets it: only a full notifier says when.
            retry_after: matches!(e, ApiError::Subscribe(SubscribeError::Full(_))),
        }
    }
}

/// What refuses a subscription before its stream starts, and the shared edge's per-address
/// limit on the (public) stream routes.
pub(super) struct SubscribeErrors;

impl SubscribeErrors {
    fn docs() -> Vec<ProblemDoc> {
        use SubscribeError::*;
        let refused = [
            InvalidTopic(String::new()),
            Unauthorized,
            Forbidden(String::new()),
            OrderNotFound,
            UnknownSku(String::new()),
            Full(0),
        ];
        refused
            .into_iter()
            .map(ApiError::Subscribe)
            .chain([ApiError::BadToken])
            .map(ProblemDoc::from)
            .chain([floodgate_common::openapi::per_ip_limited()])
            .collect()
    }
}

impl IntoResponses for SubscribeErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problems(Self::docs())
    }
}

/// What refuses a WebSocket before the upgrade: a subscription `?topics=` names, or a
/// request that is not a WebSocket upgrade at all (answered by the shared HTTP edge).
pub(super) struct UpgradeErrors;

impl IntoResponses for UpgradeErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut responses = SubscribeErrors::responses();
        let not_an_upgrade =
            [StatusCode::BAD_REQUEST, StatusCode::UPGRADE_REQUIRED].map(|status| ProblemDoc {
                status: status.as_u16(),
                code: floodgate_common::http::code_of(status),
                retry_after: false,
            });
        let refused = SubscribeErrors::docs().into_iter().chain(not_an_upgrade);
        responses.extend(problems(refused));
        responses
    }
}

/// `GET /config.json`.
#[derive(ToSchema)]
#[allow(dead_code)] // the handler writes it with `json!`
pub(super) struct PageConfig {
    /// Ingress as a browser sees it.
    ingress_url: String,
}

/// The `/readyz` body: every service's, plus the subscribers served.
#[derive(ToSchema)]
#[allow(dead_code)] // the handler writes it with `json!`
pub(super) struct NotifierReadiness {
    #[schema(inline)]
    #[serde(flatten)]
    readiness: floodgate_common::openapi::Readiness,
    subscribers: usize,
}

/// The `topics` parameter: a comma-separated list of `stock:<sku>`, `stock:*`,
/// `order:<id>`, `orders:mine`, `orders:*` (what `Topic::parse_list` accepts).
pub(super) struct Topics;

impl utoipa::PartialSchema for Topics {
    fn schema() -> RefOr<utoipa::openapi::Schema> {
        topics_schema().into()
    }
}
impl ToSchema for Topics {}

fn topics_schema() -> utoipa::openapi::Object {
    const SKU: &str = "[A-Za-z0-9._-]{1,64}";
    const UUID: &str =
        "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}";
    let topic = format!(r"(stock:(\*|{SKU})|order:{UUID}|orders:(mine|\*))");
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::String)
        .pattern(Some(format!("^{topic}(,{topic})*$")))
        .examples([serde_json::json!("stock:*,orders:mine")])
        .build()
}

/// One event of `GET /v1/stream`, as OpenAPI 3.1 describes an event stream: `event` names
/// it and `data` is its JSON.
pub(super) struct StreamEvent;

impl utoipa::PartialSchema for StreamEvent {
    fn schema() -> RefOr<utoipa::openapi::Schema> {
        use utoipa::openapi::{ObjectBuilder, OneOfBuilder, Type, extensions::Extensions};
        let event = |name: &str, payload: &str| {
            // utoipa has no builder for `contentSchema`; an extension map without the
            // `x-` prefix serializes as the plain keyword.
            let content_schema = Extensions::from_iter([(
                "contentSchema",
                serde_json::json!({ "$ref": format!("#/components/schemas/{payload}") }),
            )]);
            ObjectBuilder::new()
                .property(
                    "event",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .enum_values(Some([name])),
                )
                .required("event")
                .property(
                    "data",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .content_media_type("application/json")
                        .extensions(Some(content_schema)),
                )
                .required("data")
        };
        OneOfBuilder::new()
            .item(event("stock", "StockEvent"))
            .item(event("order", "OrderEvent"))
            .item(event("error", "ErrorEvent"))
            .into()
    }
}
impl ToSchema for StreamEvent {}

/// A stock level (conflated: the latest of each SKU, at most every 100 ms).
#[derive(ToSchema)]
#[allow(dead_code)] // written by the hub as JSON text
pub(super) struct StockEvent {
    #[schema(pattern = "^stock$")]
    r#type: String,
    #[schema(value_type = floodgate_common::domain::Sku)]
    sku: String,
    available: i64,
    #[schema(format = DateTime)]
    at: String,
}

/// An order's status change (each once, in order).
#[derive(ToSchema)]
#[allow(dead_code)] // written by the hub as JSON text
pub(super) struct OrderEvent {
    #[schema(pattern = "^order$")]
    r#type: String,
    #[schema(value_type = floodgate_common::domain::OrderId)]
    order_id: String,
    user_id: String,
    #[schema(value_type = floodgate_common::domain::OrderStatus)]
    status: String,
    #[schema(nullable = false)]
    reason: Option<String>,
    /// When the status changed.
    #[schema(format = DateTime)]
    at: String,
}

/// The last event of a stream the notifier ends.
#[derive(ToSchema)]
#[allow(dead_code)] // written by the SSE handler
pub(super) struct ErrorEvent {
    #[schema(pattern = "^error$")]
    r#type: String,
    /// `slow_consumer`, `shutting_down`, `resync` or `token_expired`.
    code: String,
    detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi-notifier.json");

    /// The committed document is the generated one; `UPDATE_OPENAPI=1` rewrites it.
    /// What `/openapi.json` serves is the document, and `/docs` is Swagger UI from the
    /// binary (no CDN).
    #[tokio::test]
    async fn openapi_json_and_docs_are_served() {
        use tower::ServiceExt;
        let get = |uri: &str| {
            router::<()>().oneshot(
                axum::http::Request::get(uri)
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
        };
        let served = get("/openapi.json").await.unwrap();
        assert_eq!(served.status(), 200);
        let body = axum::body::to_bytes(served.into_body(), usize::MAX)
            .await
            .unwrap();
        let served: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(served, serde_json::to_value(document()).unwrap());
        for page in ["/docs/", "/docs/swagger-ui-bundle.js"] {
            let resp = get(page).await.unwrap();
            assert_eq!(resp.status(), 200, "{page}");
        }
    }

    #[test]
    fn openapi_document_is_committed() {
        let generated = document()
            .to_pretty_json()
            .expect("the document serializes");
        floodgate_common::openapi::assert_committed(&generated, COMMITTED);
    }
}
