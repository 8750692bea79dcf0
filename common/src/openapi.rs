//! The pieces of the services' OpenAPI documents that every service shares: the
//! problem+json schema, error responses built from each service's own error type (so a
//! status or `code` changed in code changes the document), the security schemes, and the
//! schemas of the domain types.
//!
//! The domain types' schemas are written here rather than derived in `domain`: the
//! newtypes (de)serialize through `String`/`u16` with checks that a derive cannot see, so
//! the constraints (pattern, range) are stated once beside the `MAX_*` constants they use.

use crate::domain::{IdempotencyKey, OrderId, OrderLine, OrderStatus, Quantity, Reference, Sku};
use std::collections::{BTreeMap, BTreeSet};
use utoipa::{
    Modify, PartialSchema, ToSchema,
    openapi::{
        AllOfBuilder, ArrayBuilder, ContentBuilder, ObjectBuilder, OpenApi, Ref, RefOr, Response,
        ResponseBuilder, Schema, SchemaFormat, Type,
        header::HeaderBuilder,
        security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};

/// The media type of every error answer.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An RFC 9457 problem, the body of every error answer. Each response of the documents
/// narrows `code` (and `status`) to what that operation can answer with that status.
#[derive(ToSchema)]
#[allow(dead_code)] // a schema, never built: `problem::response` writes the body
pub struct Problem {
    /// `/problems/{code}`.
    #[schema(example = "/problems/sold_out")]
    r#type: String,
    /// The HTTP reason phrase of `status`.
    title: String,
    /// The HTTP status, repeated.
    status: u16,
    /// What went wrong, for people; it names the field when a body is refused.
    detail: String,
    /// The stable machine-readable code of API.md.
    code: String,
    /// The SKU the problem is about (`sold_out`, `limit_exceeded`, `unknown_sku`,
    /// `sku_exists`).
    #[schema(nullable = false)]
    sku: Option<String>,
    /// `sold_out`: units left of `sku`.
    #[schema(nullable = false)]
    available: Option<i64>,
    /// `limit_exceeded`: the per-user limit of `sku`.
    #[schema(nullable = false)]
    limit: Option<i64>,
    /// `limit_exceeded`: units of `sku` the buyer holds already.
    #[schema(nullable = false)]
    already: Option<i64>,
    /// The request's id, as answered in `X-Request-Id` (the client's own if it sent a
    /// valid one); quote it when reporting a problem. Every problem the service itself
    /// answers carries it.
    #[schema(nullable = false, example = "0190f0b4-1a2b-7c3d-8e4f-123456789abc")]
    request_id: Option<String>,
}

/// One error a service can answer: its status, its `code`, and whether it carries
/// `Retry-After`. Each service builds these from its own error type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProblemDoc {
    pub status: u16,
    pub code: &'static str,
    pub retry_after: bool,
}

/// The error responses of one operation, one per status: problem+json whose `code` is
/// one of the codes given for that status.
pub fn problems(errors: impl IntoIterator<Item = ProblemDoc>) -> BTreeMap<String, RefOr<Response>> {
    let mut by_status: BTreeMap<u16, (BTreeSet<&'static str>, bool)> = BTreeMap::new();
    for e in errors {
        let entry = by_status.entry(e.status).or_default();
        entry.0.insert(e.code);
        entry.1 |= e.retry_after;
    }
    by_status
        .into_iter()
        .map(|(status, (codes, retry_after))| {
            let schema = AllOfBuilder::new()
                .item(Ref::from_schema_name("Problem"))
                .item(
                    ObjectBuilder::new()
                        .property(
                            "status",
                            ObjectBuilder::new()
                                .schema_type(Type::Integer)
                                .enum_values(Some([status])),
                        )
                        .property(
                            "code",
                            ObjectBuilder::new()
                                .schema_type(Type::String)
                                .enum_values(Some(codes.iter().copied())),
                        ),
                );
            let reason = axum::http::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("Error");
            let codes: Vec<String> = codes.iter().map(|c| format!("`{c}`")).collect();
            let mut response = ResponseBuilder::new()
                .description(format!("{reason}: {}", codes.join(", ")))
                .content(
                    PROBLEM_JSON,
                    ContentBuilder::new().schema(Some(schema)).build(),
                );
            if retry_after {
                response = response.header(
                    "Retry-After",
                    HeaderBuilder::new()
                        .schema(
                            ObjectBuilder::new()
                                .schema_type(Type::Integer)
                                .minimum(Some(1)),
                        )
                        .description(Some("seconds to wait before trying again"))
                        .build(),
                );
            }
            (status.to_string(), RefOr::T(response.build()))
        })
        .collect()
}

/// The answer of the shared HTTP edge to a request past ingress's in-flight bound
/// ([`crate::http::InFlight`]): 503, shed at once, with `Retry-After`.
pub fn shed() -> ProblemDoc {
    edge(axum::http::StatusCode::SERVICE_UNAVAILABLE)
}

/// The answer of the shared HTTP edge to one address past the public routes' rate
/// ([`crate::http::PerIp`]): 429 with `Retry-After`.
pub fn per_ip_limited() -> ProblemDoc {
    edge(axum::http::StatusCode::TOO_MANY_REQUESTS)
}

fn edge(status: axum::http::StatusCode) -> ProblemDoc {
    ProblemDoc {
        status: status.as_u16(),
        code: crate::http::code_of(status),
        retry_after: true,
    }
}

/// `bearer`: the `Authorization: Bearer <JWT>` every authenticated route takes.
pub struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "HS256 JWT with `sub`, `role` (`customer` or `admin`) and `exp`",
                    ))
                    .build(),
            ),
        );
    }
}

/// `bearer` and `access_token`: the streams also take the token as a query parameter,
/// because EventSource and browsers' WebSocket cannot set headers.
pub struct StreamAuth;

impl Modify for StreamAuth {
    fn modify(&self, openapi: &mut OpenApi) {
        BearerAuth.modify(openapi);
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "access_token",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "access_token",
                "the same JWT as `Authorization: Bearer`, for clients that cannot set headers",
            ))),
        );
    }
}

impl PartialSchema for Sku {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(SKU_PATTERN))
            .description(Some("1-64 characters of [A-Za-z0-9._-]"))
            .examples([serde_json::json!("tee-red-m")])
            .into()
    }
}
impl ToSchema for Sku {}

/// A SKU id, as `Sku::parse` accepts it.
pub const SKU_PATTERN: &str = "^[A-Za-z0-9._-]{1,64}$";

impl PartialSchema for IdempotencyKey {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^[\\x20-\\x7e]{1,128}$"))
            .description(Some("1-128 printable ASCII characters"))
            .into()
    }
}
impl ToSchema for IdempotencyKey {}

impl PartialSchema for Reference {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^[\\x20-\\x7e]{1,128}$"))
            .description(Some(
                "1-128 printable ASCII characters, e.g. a delivery note",
            ))
            .into()
    }
}
impl ToSchema for Reference {}

impl PartialSchema for Quantity {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(1))
            .maximum(Some(Quantity::MAX))
            .into()
    }
}
impl ToSchema for Quantity {}

impl PartialSchema for OrderId {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::Custom("uuid".into())))
            .description(Some("a UUIDv7"))
            .into()
    }
}
impl ToSchema for OrderId {}

impl PartialSchema for OrderStatus {
    fn schema() -> RefOr<Schema> {
        use OrderStatus::*;
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(
                [Waitlisted, Accepted, Confirmed, Failed, Cancelled].map(OrderStatus::as_str),
            ))
            .into()
    }
}
impl ToSchema for OrderStatus {}

impl PartialSchema for OrderLine {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .property("sku", Sku::schema())
            .required("sku")
            .property("qty", Quantity::schema())
            .required("qty")
            .into()
    }
}
impl ToSchema for OrderLine {}

/// The lines of an order: 1 to `OrderLines::MAX_LINES`.
pub fn order_lines_schema() -> RefOr<Schema> {
    ArrayBuilder::new()
        .items(OrderLine::schema())
        .min_items(Some(1))
        .max_items(Some(crate::domain::OrderLines::MAX_LINES))
        .into()
}

/// The `/readyz` body of every service.
#[derive(ToSchema)]
#[allow(dead_code)] // a schema, never built: `health::readiness` writes the body
pub struct Readiness {
    #[schema(example = "ready")]
    status: ReadyStatus,
    /// The dependencies that are down.
    down: Vec<String>,
    /// Each dependency (and `task:<name>`) and whether it is up.
    checks: BTreeMap<String, bool>,
    /// Each supervised background task's state.
    tasks: BTreeMap<String, crate::supervise::TaskState>,
}

impl PartialSchema for crate::supervise::TaskState {
    fn schema() -> RefOr<Schema> {
        use crate::supervise::TaskState::*;
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some([Running, Restarting, Dead].map(|s| s.as_str())))
            .into()
    }
}
impl ToSchema for crate::supervise::TaskState {}

#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
enum ReadyStatus {
    Ready,
    Unavailable,
}

/// The check behind each service's `openapi_document_is_committed` test: the committed
/// file `committed` (e.g. `docs/openapi-ingress.json`) is exactly `generated`; with
/// `UPDATE_OPENAPI` set, the file is rewritten instead.
pub fn assert_committed(generated: &str, committed: &str) {
    let generated = format!("{generated}\n");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(committed, &generated).expect("writing the committed document");
        return;
    }
    let on_disk = std::fs::read_to_string(committed).unwrap_or_default();
    assert!(
        on_disk == generated,
        "{committed} differs from the generated document; run \
         `UPDATE_OPENAPI=1 cargo test -p floodgate-ingress -p floodgate-notifier openapi` \
         and commit it"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_response_per_status_with_every_code_of_it() {
        let doc = |status, code, retry_after| ProblemDoc {
            status,
            code,
            retry_after,
        };
        let r = problems([
            doc(404, "not_found", false),
            doc(404, "unknown_sku", false),
            doc(503, "unavailable", true),
        ]);
        assert_eq!(r.keys().collect::<Vec<_>>(), ["404", "503"]);
        let json = serde_json::to_value(&r).unwrap();
        let codes = &json["404"]["content"][PROBLEM_JSON]["schema"]["allOf"][1]["properties"]["code"]
            ["enum"];
        assert_eq!(codes, &serde_json::json!(["not_found", "unknown_sku"]));
        assert!(json["503"]["headers"]["Retry-After"].is_object());
        assert!(json["404"]["headers"].is_null());
    }
}
