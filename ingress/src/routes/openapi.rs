//! Ingress's OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]`
//! attributes, served at `GET /openapi.json` with Swagger UI at `GET /docs`.
//!
//! Every error response is built from [`ApiError`] values, so its status and `code` are
//! the ones `ApiError::status` and `ApiError::code` answer, not a copy of them. The
//! committed `docs/openapi-ingress.json` must equal [`document`]: the `openapi` test
//! fails otherwise (`UPDATE_OPENAPI=1 cargo test -p floodgate-ingress openapi` rewrites
//! it), so every contract change shows in review.

use super::*;
use crate::catalog::{MAX_INITIAL_STOCK, MAX_RECEIVE};
use floodgate_common::{
    http::BODY_DEADLINE,
    openapi::{BearerAuth, ProblemDoc, per_ip_limited, problems, shed},
};
use std::collections::BTreeMap;
use utoipa::{
    IntoResponses, OpenApi, ToSchema,
    openapi::{RefOr, response::Response},
};
use utoipa_swagger_ui::SwaggerUi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "floodgate ingress",
        description = "Flash-sale order intake: orders are decided atomically in Redis, \
                       durably queued, then committed by the worker. The contract is API.md.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        place_order,
        get_order,
        cancel_order,
        stock_one,
        stock_many,
        create_sku,
        create_bundle,
        get_sku,
        receive,
        list_skus,
        patch_sku,
        adjust,
        movements,
        waitlist,
        audit,
        get_points,
        points_history,
        charge_points,
        grant_points,
        create_webhook,
        list_webhooks,
        get_webhook,
        delete_webhook,
        webhook_deliveries,
        replay_webhook,
        create_category,
        categories,
        create_product,
        list_products,
        get_product,
        healthz,
        readyz,
        metrics,
        openapi_json,
    ),
    components(schemas(
        floodgate_common::openapi::Problem,
        floodgate_common::domain::IdempotencyKey,
        floodgate_common::domain::OrderId,
        floodgate_common::domain::Sku,
    )),
    modifiers(&BearerAuth, &Links),
    tags(
        (name = "orders", description = "placing, reading and cancelling orders"),
        (name = "stock", description = "public stock levels"),
        (name = "skus", description = "managers and admins: the catalog, goods received, adjustments"),
        (name = "audit", description = "admins: who changed what"),
        (name = "points", description = "customers' points: balance, history, top-ups; admins grant"),
        (name = "webhooks", description = "admins: committed events exported to a data platform, signed per Standard Webhooks"),
        (name = "catalog", description = "categories and products: managers and admins write, anyone reads"),
        (name = "operations", description = "health, readiness, metrics, this document"),
    ),
)]
struct ApiDoc;

/// OpenAPI links: what a created order or SKU leads to, so a client (or a test generator
/// such as schemathesis) can follow the id an answer carries.
struct Links;

impl utoipa::Modify for Links {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{RefOr, extensions::Extensions, link::LinkBuilder};
        let link = |operation: &str, param: &str, field: &str| {
            // utoipa 5 writes `LinkBuilder::operation_id` as `operation_id`, which no
            // OpenAPI reader knows; an extension without the `x-` prefix is written as is.
            let operation_id = Extensions::from_iter([("operationId", operation)]);
            LinkBuilder::new()
                .extensions(Some(operation_id))
                .parameter(param, format!("$response.body#/{field}"))
                .build()
        };
        /// (operation to follow, its parameter, the answer's field that fills it).
        type Follow<'a> = &'a [(&'a str, &'a str, &'a str)];
        let follow: [(&str, &[&str], Follow); 2] = [
            (
                "/v1/orders",
                &["200", "202"],
                &[
                    ("get_order", "id", "order_id"),
                    ("cancel_order", "id", "order_id"),
                ],
            ),
            (
                "/v1/skus",
                &["201"],
                &[
                    ("get_sku", "sku", "sku"),
                    ("receive", "sku", "sku"),
                    ("patch_sku", "sku", "sku"),
                    ("adjust", "sku", "sku"),
                    ("movements", "sku", "sku"),
                    ("waitlist", "sku", "sku"),
                    ("stock_one", "sku", "sku"),
                ],
            ),
        ];
        for (path, statuses, links) in follow {
            let Some(op) = openapi
                .paths
                .paths
                .get_mut(path)
                .and_then(|p| p.post.as_mut())
            else {
                continue;
            };
            for status in statuses {
                if let Some(RefOr::T(response)) = op.responses.responses.get_mut(*status) {
                    for (operation, param, field) in links {
                        response
                            .links
                            .insert((*operation).into(), link(operation, param, field).into());
                    }
                }
            }
        }
    }
}

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
            retry_after: e.retry_after().is_some(),
        }
    }
}

/// Declares the error responses of one operation as a list of [`ApiError`] values.
/// After `;`, what the shared HTTP edge answers on that route (`shed()`,
/// `per_ip_limited()`).
macro_rules! errors {
    ($(#[$m:meta])* $name:ident: $($e:expr),+ $(,)? $(; $($edge:expr),+ $(,)?)?) => {
        $(#[$m])*
        pub(super) struct $name;

        impl IntoResponses for $name {
            fn responses() -> BTreeMap<String, RefOr<Response>> {
                use ApiError::*;
                problems([$(ProblemDoc::from($e)),+ $($(, $edge)+)?])
            }
        }
    };
}

fn s() -> String {
    String::new()
}

errors!(
    /// Besides the order's own refusals, what `JsonBody` answers for a body it cannot read.
    PlaceOrderErrors:
    Malformed(s()),
    Unauthorized,
    Forbidden(""),
    SoldOut { sku: s(), available: 0 },
    TooLarge,
    UnsupportedMediaType,
    RequestTimeout(BODY_DEADLINE),
    InvalidOrder(s()),
    UnknownSku { sku: s() },
    LimitExceeded { sku: s(), limit: 0, already: 0 },
    SaleNotStarted { sku: s(), starts_at: s() },
    SaleEnded { sku: s(), ended_at: s() },
    InsufficientPoints { balance: 0, needed: 0 },
    IdempotencyKeyReused,
    RateLimited { retry_after_secs: 1 },
    Unavailable(s()); shed(),
);

errors!(GetOrderErrors: Unauthorized, OrderNotFound, Unavailable(s()); shed());

errors!(
    CancelOrderErrors:
    Unauthorized,
    OrderNotFound,
    NotCancellable(s()),
    Unavailable(s()); shed(),
);

errors!(StockOneErrors: SkuNotFound { sku: s() }, Unavailable(s()); shed(), per_ip_limited());

errors!(StockManyErrors: InvalidRequest(s()), Unavailable(s()); shed(), per_ip_limited());

errors!(
    CreateSkuErrors:
    Malformed(s()),
    Unauthorized,
    Forbidden(""),
    SkuExists { sku: s() },
    VariantExists { sku: s() },
    UnknownProduct { id: s() },
    TooLarge,
    UnsupportedMediaType,
    RequestTimeout(BODY_DEADLINE),
    InvalidRequest(s()); shed(),
);

errors!(
    CreateBundleErrors:
    Malformed(s()),
    Unauthorized,
    Forbidden(""),
    SkuExists { sku: s() },
    UnknownSku { sku: s() },
    TooLarge,
    UnsupportedMediaType,
    RequestTimeout(BODY_DEADLINE),
    InvalidRequest(s()),
    Unavailable(s()); shed(),
);

errors!(GetSkuErrors: Unauthorized, Forbidden(""), SkuNotFound { sku: s() }; shed());

errors!(
    ReceiveErrors:
    Malformed(s()),
    Unauthorized,
    Forbidden(""),
    SkuNotFound { sku: s() },
    BundleHasNoStock { sku: s() },
    TooLarge,
    UnsupportedMediaType,
    RequestTimeout(BODY_DEADLINE),
    InvalidRequest(s()); shed(),
);

errors!(
    MovementsErrors:
    Unauthorized,
    Forbidden(""),
    SkuNotFound { sku: s() },
    InvalidRequest(s()); shed(),
);

errors!(
    ListSkusErrors:
    Unauthorized,
    Forbidden(""),
    InvalidRequest(s()),
    UnknownProduct { id: s() },
    Unavailable(s()); shed(),
);

errors!(
    PatchSkuErrors:
    Malformed(s()),
    Unauthorized,
    Forbidden(""),
    SkuNotFound { sku: s() },
    TooLarge,
    UnsupportedMediaType,
    RequestTimeout(BODY_DEADLINE),
    InvalidRequest(s()),
    Unavailable(s()); shed(),
);

errors!(
    AdjustErrors:
    Malformed(s()),
    Unauthorized,
    Forbidden(""),
    SkuNotFound { sku: s() },
    InsufficientStock { sku: s(), available: 0 },
    BundleHasNoStock { sku: s() },
    TooLarge,
    UnsupportedMediaType,
    RequestTimeout(BODY_DEADLINE),
    InvalidRequest(s()),
    Unavailable(s()); shed(),
);

errors!(
    CreateCategoryErrors:
    Malformed(s()),
    Unauthorized,
    Forbidden(""),
    CategoryExists { id: s() },
    UnknownCategory { id: s() },
    TooLarge,
    UnsupportedMediaType,
    RequestTimeout(BODY_DEADLINE),
    InvalidRequest(s()); shed(),
);

errors!(CategoriesErrors: Unavailable(s()); shed(), per_ip_limited());

errors!(
    CreateProductErrors:
    Malformed(s()),
    Unauthorized,
    Forbidden(""),
    ProductExists { id: s() },
    UnknownCategory { id: s() },
    TooLarge,
    UnsupportedMediaType,
    RequestTimeout(BODY_DEADLINE),
    InvalidRequest(s()); shed(),
);

errors!(ListProductsErrors: InvalidRequest(s()), UnknownCategory { id: s() }, Unavailable(s()); shed(), per_ip_limited());

errors!(GetProductErrors: ProductNotFound { id: s() }, Unavailable(s()); shed(), per_ip_limited());

errors!(AuditErrors: Unauthorized, Forbidden(""), InvalidRequest(s()); shed());

errors!(
    CreateWebhookErrors:
    Malformed(s()),
    Unauthorized,
    Forbidden(""),
    TooLarge,
    UnsupportedMediaType,
    RequestTimeout(BODY_DEADLINE),
    InvalidRequest(s()); shed(),
);

errors!(ListWebhooksErrors: Unauthorized, Forbidden(""); shed());

errors!(PointsErrors: Unauthorized, Unavailable(s()); shed());

errors!(PointsHistoryErrors: Unauthorized, InvalidRequest(s()); shed());

errors!(
    TopUpErrors:
    Malformed(s()),
    Unauthorized,
    TooLarge,
    UnsupportedMediaType,
    RequestTimeout(BODY_DEADLINE),
    InvalidRequest(s()); shed(),
);

errors!(
    GrantErrors:
    Malformed(s()),
    Unauthorized,
    Forbidden(""),
    TooLarge,
    UnsupportedMediaType,
    RequestTimeout(BODY_DEADLINE),
    InvalidRequest(s()); shed(),
);

/// A top-up. A field that breaks a rule: 422 `invalid_request` naming it.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct TopUp {
    #[schema(minimum = 1, maximum = 10_000_000)]
    amount: i64,
    /// 1-128 printable ASCII: the top-up's idempotency key for this user (the same
    /// reference again adds nothing; with another amount: 422).
    #[schema(min_length = 1, max_length = 128, pattern = "^[ -~]+$")]
    reference: String,
}

errors!(WebhookErrors: Unauthorized, Forbidden(""), WebhookNotFound; shed());

errors!(WebhookListErrors: Unauthorized, Forbidden(""), WebhookNotFound, InvalidRequest(s()); shed());

errors!(
    ReplayErrors:
    Malformed(s()),
    Unauthorized,
    Forbidden(""),
    WebhookNotFound,
    TooLarge,
    UnsupportedMediaType,
    RequestTimeout(BODY_DEADLINE),
    InvalidRequest(s()); shed(),
);

/// A new webhook. A field that breaks a rule: 422 `invalid_request` naming it.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct NewWebhook {
    /// http or https, at most 2048 bytes, no user info. A host that is or resolves to a
    /// loopback, private or reserved address is refused unless
    /// `FLOODGATE_WEBHOOK_ALLOW_PRIVATE=true`.
    #[schema(format = "uri", max_length = 2048)]
    url: String,
    /// 1-4 distinct event types.
    #[schema(min_items = 1, max_items = 4)]
    events: Vec<WebhookEvent>,
    /// 1-200 characters once trimmed.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    description: Option<String>,
}

/// An event type a webhook may subscribe to.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) enum WebhookEvent {
    #[schema(rename = "order.confirmed")]
    OrderConfirmed,
    #[schema(rename = "order.failed")]
    OrderFailed,
    #[schema(rename = "order.cancelled")]
    OrderCancelled,
    #[schema(rename = "stock.sold_out")]
    StockSoldOut,
}

/// What to deliver again.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct Replay {
    /// Events committed at or after this instant (RFC 3339, to the millisecond).
    #[schema(format = DateTime)]
    since: String,
}

/// One SKU's live level.
#[derive(ToSchema)]
#[allow(dead_code)] // the handler writes it with `json!`
pub(super) struct StockLevel {
    #[schema(value_type = floodgate_common::domain::Sku)]
    sku: String,
    /// Units that can still be ordered.
    #[schema(minimum = 0)]
    available: i64,
    /// Only for a SKU whose sale window has a start: orders are refused before it.
    #[schema(format = DateTime)]
    sale_starts_at: Option<String>,
    /// Only for a SKU whose sale window has an end.
    #[schema(format = DateTime)]
    sale_ends_at: Option<String>,
}

/// The known SKUs among those asked for.
#[derive(ToSchema)]
#[allow(dead_code)] // the handler writes it with `json!`
pub(super) struct StockLevels {
    stock: Vec<StockLevel>,
}

/// An integer in `min..=max`, from the limits the handlers check.
fn int_in(min: i64, max: i64) -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::Integer)
        .minimum(Some(min))
        .maximum(Some(max))
        .build()
}

fn initial_stock() -> utoipa::openapi::Object {
    int_in(0, MAX_INITIAL_STOCK)
}

fn receipt_qty() -> utoipa::openapi::Object {
    int_in(1, MAX_RECEIVE)
}

// The handler reads this body as a map, so that a wrong field is a 422 naming it
// (API.md) rather than serde's 400; this is the shape it accepts.
/// A new SKU. A field that breaks a rule: 422 `invalid_request` naming it.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct NewSku {
    #[schema(value_type = floodgate_common::domain::Sku)]
    sku: String,
    /// 1-200 characters once trimmed.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    name: String,
    #[schema(minimum = 0, maximum = 214_748_364_700_i64)]
    price_cents: i64,
    #[schema(schema_with = initial_stock)]
    initial_stock: i64,
    /// Units one buyer may hold; absent or null: no limit.
    #[schema(minimum = 1, maximum = 1_000_000, format = Int64)]
    per_user_limit: Option<i64>,
    /// Redis shards to split the SKU's stock over, for a SKU expected to outsell one
    /// Redis core; fixed at creation. At most `FLOODGATE_REDIS_SHARDS` (422 above it).
    /// Absent or null: 1.
    #[schema(minimum = 1, maximum = 64, format = Int64)]
    buckets: Option<i64>,
    /// The product this SKU is a variant of (422 `unknown_product` if none such).
    #[schema(value_type = Option<floodgate_common::domain::Sku>)]
    product_id: Option<String>,
    /// With `product_id`: one value of each of the product's options, e.g.
    /// `{"size": "M"}` (anything else: 422 `invalid_request`; another SKU of the product
    /// with the same values: 409 `variant_exists`).
    #[schema(value_type = Option<Object>)]
    options: Option<serde_json::Value>,
    /// Orders are refused (409 `sale_not_started`) before this instant, by Redis's
    /// clock. Absent or null: on sale at once.
    #[schema(format = DateTime)]
    sale_starts_at: Option<String>,
    /// Orders are refused (409 `sale_ended`) from this instant on; after
    /// `sale_starts_at`. Absent or null: no end.
    #[schema(format = DateTime)]
    sale_ends_at: Option<String>,
}

/// A new bundle: a SKU sold as 2-20 other SKUs, reserved all or nothing with the rest
/// of an order. A field that breaks a rule: 422 `invalid_request` naming it; a
/// component that is no SKU: 422 `unknown_sku`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct NewBundle {
    #[schema(value_type = floodgate_common::domain::Sku)]
    sku: String,
    /// 1-200 characters once trimmed.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    name: String,
    #[schema(minimum = 0, maximum = 214_748_364_700_i64)]
    price_cents: i64,
    /// Bundles one buyer may hold; absent or null: no limit. Each component's own
    /// per-user limit counts the units the bundle holds of it as well.
    #[schema(minimum = 1, maximum = 1_000_000, format = Int64)]
    per_user_limit: Option<i64>,
    /// 2-20 distinct SKUs that are not bundles, in any order.
    #[schema(min_items = 2, max_items = 20)]
    components: Vec<BundleComponent>,
    /// As for a SKU; a bundle is on sale only while its own window and every
    /// component's are open.
    #[schema(format = DateTime)]
    sale_starts_at: Option<String>,
    #[schema(format = DateTime)]
    sale_ends_at: Option<String>,
}

/// One component of a bundle: `qty` units of `sku` in each bundle.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct BundleComponent {
    #[schema(value_type = floodgate_common::domain::Sku)]
    sku: String,
    #[schema(minimum = 1, maximum = 1000, format = Int64)]
    qty: i64,
}

/// Goods received, idempotent per (sku, reference).
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct Receipt {
    #[schema(schema_with = receipt_qty)]
    qty: i64,
    #[schema(value_type = floodgate_common::domain::Reference)]
    reference: String,
}

/// A new category.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct NewCategory {
    /// 1-64 of `[A-Za-z0-9._-]`.
    #[schema(value_type = floodgate_common::domain::Sku)]
    id: String,
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    name: String,
    /// An existing category (422 `unknown_category` otherwise); absent or null: a root.
    #[schema(value_type = Option<floodgate_common::domain::Sku>)]
    parent_id: Option<String>,
}

/// A new product.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct NewProduct {
    /// 1-64 of `[A-Za-z0-9._-]`.
    #[schema(value_type = floodgate_common::domain::Sku)]
    product_id: String,
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    name: String,
    /// At most 2000 characters.
    #[schema(max_length = 2000)]
    description: Option<String>,
    #[schema(value_type = Option<floodgate_common::domain::Sku>)]
    category_id: Option<String>,
    /// At most 5 options, names unique; each 1-50 distinct values of 1-50 characters.
    #[schema(max_items = 5)]
    options: Option<Vec<crate::products::ProductOption>>,
}

fn adjust_delta() -> utoipa::openapi::Object {
    int_in(-MAX_RECEIVE, MAX_RECEIVE)
}

/// A change of a SKU's settings: any of the fields, at least one. Any other field
/// (`sku`, `buckets`, stock) is a 422 naming it.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct SkuChange {
    /// 1-200 characters once trimmed.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    name: Option<String>,
    #[schema(minimum = 0, maximum = 214_748_364_700_i64)]
    price_cents: Option<i64>,
    /// Units one buyer may hold; null: no limit. Buyers who hold more keep what they
    /// have and may buy no more.
    #[schema(minimum = 1, maximum = 1_000_000, format = Int64)]
    per_user_limit: Option<i64>,
    /// null: on sale now (no start).
    #[schema(format = DateTime)]
    sale_starts_at: Option<String>,
    /// null: no end. The window it leaves must end after it starts.
    #[schema(format = DateTime)]
    sale_ends_at: Option<String>,
}

/// A correction of the units on hand, idempotent per (sku, reference).
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct Adjustment {
    /// Non-zero: negative writes units off (damage, loss), positive adds them.
    #[schema(schema_with = adjust_delta)]
    delta: i64,
    /// Why, 1-200 characters once trimmed; kept on the ledger row.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    reason: String,
    #[schema(value_type = floodgate_common::domain::Reference)]
    reference: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi-ingress.json");

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

    #[test]
    fn every_error_code_of_an_operation_is_listed_under_its_status() {
        let doc = serde_json::to_value(document()).unwrap();
        let codes = &doc["paths"]["/v1/orders"]["post"]["responses"]["422"]["content"]["application/problem+json"]
            ["schema"]["allOf"][1]["properties"]["code"]["enum"];
        assert_eq!(
            codes,
            &serde_json::json!([
                "idempotency_key_reused",
                "invalid_order",
                "limit_exceeded",
                "unknown_sku"
            ])
        );
    }
}
