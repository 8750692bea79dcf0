//! The HTTP surface: handlers extract and delegate, nothing more. Each handler's
//! `#[utoipa::path]` is its entry in the OpenAPI document ([`openapi`]).

pub mod openapi;

use crate::{
    catalog,
    error::ApiError,
    extract::{Admin, JsonBody, MAX_BODY_BYTES, Manager, Object},
    orders::{self, OrderRequest, Placed},
    points, products,
    state::AppState,
    stock, webhooks,
};
use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use floodgate_common::{
    audit::Actor,
    auth::Caller,
    domain::{IdempotencyKey, OrderId, Sku},
    http::{InFlight, PerIp},
    telemetry::{self, names},
};
use serde_json::{Value, json};
use std::{collections::HashMap, time::Instant};

pub fn router(state: AppState) -> Router {
    let cors = cors(&state.cfg.cors_origins);
    let per_ip = PerIp::new(
        state.cfg.ip_rate_limit_per_sec,
        state.cfg.ip_rate_limit_burst,
    );
    let in_flight = InFlight::new(state.cfg.max_in_flight, MAX_BODY_BYTES);
    // Public and tokenless: bounded per client address.
    let public = Router::new()
        .route("/v1/stock/{sku}", get(stock_one))
        .route("/v1/stock", get(stock_many))
        .route("/v1/products/{id}", get(get_product))
        .route("/v1/products", get(list_products))
        .route("/v1/categories", get(categories))
        .route_layer(middleware::from_fn_with_state(per_ip, PerIp::layer));
    // Every API request counts against the in-flight bound; health and metrics do not,
    // so an overloaded ingress can still be watched.
    let api = Router::new()
        .route("/v1/orders", post(place_order))
        .route("/v1/orders/{id}", get(get_order))
        .route("/v1/orders/{id}/cancel", post(cancel_order))
        .route("/v1/skus", post(create_sku).get(list_skus))
        .route("/v1/bundles", post(create_bundle))
        .route("/v1/skus/{sku}", get(get_sku).patch(patch_sku))
        .route("/v1/skus/{sku}/receive", post(receive))
        .route("/v1/skus/{sku}/adjust", post(adjust))
        .route("/v1/skus/{sku}/movements", get(movements))
        .route("/v1/skus/{sku}/waitlist", get(waitlist))
        .route("/v1/audit", get(audit))
        .route("/v1/points", get(get_points))
        .route("/v1/points/history", get(points_history))
        .route("/v1/points/charge", post(charge_points))
        .route("/v1/users/{user}/points/grant", post(grant_points))
        .route("/v1/webhooks", post(create_webhook).get(list_webhooks))
        .route("/v1/webhooks/{id}", get(get_webhook).delete(delete_webhook))
        .route("/v1/webhooks/{id}/deliveries", get(webhook_deliveries))
        .route("/v1/webhooks/{id}/replay", post(replay_webhook))
        .route("/v1/categories", post(create_category))
        .route("/v1/products", post(create_product))
        .merge(public)
        .route_layer(middleware::from_fn_with_state(in_flight, InFlight::layer));
    let router = Router::new()
        .merge(api)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(openapi::router())
        .fallback(|| async { ApiError::NoSuchEndpoint })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(track))
        .layer(cors)
        .with_state(state);
    floodgate_common::http::edge(router)
}

/// CORS for browsers on other origins (the notifier's live page places test orders).
/// Tokens travel in the Authorization header, never in cookies, so `*` exposes nothing
/// a script on another origin could not send anyway.
fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use axum::http::{HeaderName, HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::PATCH])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
            floodgate_common::request::REQUEST_ID,
            HeaderName::from_static(floodgate_common::trace::HEADER),
        ])
        .expose_headers([
            header::LOCATION,
            header::RETRY_AFTER,
            floodgate_common::request::REQUEST_ID,
        ])
        .max_age(std::time::Duration::from_secs(600))
}

/// Counts requests and their latency by route and status.
async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = floodgate_common::http::method_label(req.method());
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!(names::HTTP_REQUESTS, "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!(names::HTTP_DURATION, "route" => route, "method" => method)
        .record(started.elapsed().as_secs_f64());
    resp
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .map_err(|_| ApiError::InvalidOrder("Idempotency-Key: must be printable ASCII".into()))?;
    IdempotencyKey::parse(s)
        .map(Some)
        .map_err(|e| ApiError::InvalidOrder(format!("Idempotency-Key: {e}")))
}

fn rejected(e: ApiError) -> ApiError {
    metrics::counter!(names::ORDERS_REJECTED, "code" => e.code()).increment(1);
    e
}

#[utoipa::path(
    post, path = "/v1/orders", tag = "orders", security(("bearer" = [])),
    summary = "Place an order: reserve every line or none, queue it durably",
    params(("Idempotency-Key" = Option<IdempotencyKey>, Header, nullable = false,
        description = "the same key and body from the same user answers the first order again")),
    request_body = OrderRequest,
    responses(
        (status = 202, description = "reserved and durably queued (or a repeat of a queued order)",
            body = orders::OrderView, headers(("Location" = String, description = "`/v1/orders/{id}`"))),
        (status = 200, description = "a repeated Idempotency-Key whose order has moved on",
            body = orders::OrderView, headers(("Location" = String, description = "`/v1/orders/{id}`"))),
        openapi::PlaceOrderErrors,
    ),
)]
async fn place_order(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    permit: Option<axum::Extension<floodgate_common::http::InFlightPermit>>,
    trace: Option<axum::Extension<floodgate_common::trace::TraceParent>>,
    body: Result<JsonBody<OrderRequest>, ApiError>,
) -> Result<Response, ApiError> {
    if !caller.can_order() {
        return Err(rejected(ApiError::Forbidden("customer or admin")));
    }
    if let Some(limiter) = &st.limiter
        && let Err(not_until) = limiter.check_key(&caller.user.to_string())
    {
        let wait = not_until.wait_time_from(governor::clock::Clock::now(
            &governor::clock::DefaultClock::default(),
        ));
        return Err(rejected(ApiError::RateLimited {
            retry_after_secs: wait.as_secs().max(1),
        }));
    }
    let JsonBody(body) = body.map_err(rejected)?;
    let (lines, terms) = body.validate().map_err(rejected)?;
    let key = idempotency_key(&headers).map_err(rejected)?;
    let trace = trace.map(|t| t.0);
    match orders::place(&st, &caller, lines, key, terms, permit.map(|p| p.0), trace)
        .await
        .map_err(rejected)?
    {
        Placed::New(view) => {
            let location = format!("/v1/orders/{}", view.order_id);
            Ok((
                StatusCode::ACCEPTED,
                [(header::LOCATION, location)],
                Json(view),
            )
                .into_response())
        }
        Placed::Repeat(view) => {
            use floodgate_common::domain::OrderStatus;
            let status = if matches!(view.status, OrderStatus::Accepted | OrderStatus::Waitlisted) {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            };
            let location = format!("/v1/orders/{}", view.order_id);
            Ok((status, [(header::LOCATION, location)], Json(view)).into_response())
        }
    }
}

#[utoipa::path(
    get, path = "/v1/orders/{id}", tag = "orders", security(("bearer" = [])),
    summary = "An order's status (its owner or an admin; anyone else gets 404)",
    params(("id" = OrderId, Path)),
    responses((status = 200, body = orders::OrderView), openapi::GetOrderErrors),
)]
async fn get_order(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<orders::OrderView>, ApiError> {
    let id = OrderId::parse(&id).ok_or(ApiError::OrderNotFound)?;
    orders::view(&st, &caller, id)
        .await?
        .map(Json)
        .ok_or(ApiError::OrderNotFound)
}

#[utoipa::path(
    post, path = "/v1/orders/{id}/cancel", tag = "orders", security(("bearer" = [])),
    summary = "Cancel an order: its stock returns to sale (idempotent)",
    params(("id" = OrderId, Path)),
    responses((status = 200, description = "the order, `cancelled`", body = orders::OrderView),
        openapi::CancelOrderErrors),
)]
async fn cancel_order(
    State(st): State<AppState>,
    caller: Caller,
    trace: Option<axum::Extension<floodgate_common::trace::TraceParent>>,
    Path(id): Path<String>,
) -> Result<Json<orders::OrderView>, ApiError> {
    let id = OrderId::parse(&id).ok_or(ApiError::OrderNotFound)?;
    orders::cancel(&st, &caller, id, trace.map(|t| t.0))
        .await?
        .map(Json)
        .ok_or(ApiError::OrderNotFound)
}

#[utoipa::path(
    get, path = "/v1/stock/{sku}", tag = "stock", security(()),
    summary = "One SKU's live stock level",
    params(("sku" = Sku, Path)),
    responses((status = 200, body = openapi::StockLevel), openapi::StockOneErrors),
)]
async fn stock_one(
    State(st): State<AppState>,
    Path(sku): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let not_found = || ApiError::SkuNotFound { sku: sku.clone() };
    let parsed = Sku::parse(sku.as_str()).map_err(|_| not_found())?;
    stock::public_levels(&st, &[parsed])
        .await?
        .pop()
        .map(Json)
        .ok_or_else(not_found)
}

#[utoipa::path(
    get, path = "/v1/stock", tag = "stock", security(()),
    summary = "Several SKUs' live stock levels; unknown SKUs are left out",
    params(("skus" = String, Query, description = "comma-separated SKU ids, at most 100")),
    responses((status = 200, body = openapi::StockLevels), openapi::StockManyErrors),
)]
async fn stock_many(
    State(st): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let list = q
        .get("skus")
        .ok_or_else(|| ApiError::InvalidRequest("skus: required, a comma-separated list".into()))?;
    let asked: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if asked.len() > stock::MAX_STOCK_QUERY {
        return Err(ApiError::InvalidRequest(format!(
            "skus: at most {}, got {}",
            stock::MAX_STOCK_QUERY,
            asked.len()
        )));
    }
    // Ids that cannot be SKUs are unknown, and unknown SKUs are left out.
    let skus: Vec<Sku> = asked
        .into_iter()
        .filter_map(|s| Sku::parse(s).ok())
        .collect();
    let stock = stock::public_levels(&st, &skus).await?;
    Ok(Json(json!({ "stock": stock })))
}

#[utoipa::path(
    post, path = "/v1/skus", tag = "skus", security(("bearer" = [])),
    summary = "Create a SKU with its initial stock (manager or admin)",
    request_body = openapi::NewSku,
    responses(
        (status = 201, body = catalog::SkuView,
            headers(("Location" = String, description = "`/v1/skus/{sku}`"))),
        openapi::CreateSkuErrors,
    ),
)]
async fn create_sku(
    State(st): State<AppState>,
    Manager(caller): Manager,
    JsonBody(Object(body)): JsonBody<Object>,
) -> Result<impl IntoResponse, ApiError> {
    let view = catalog::create(&st, &Actor::of(&caller), &body).await?;
    let location = format!("/v1/skus/{}", view.row.sku);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(view),
    ))
}

#[utoipa::path(
    post, path = "/v1/bundles", tag = "skus", security(("bearer" = [])),
    summary = "Create a bundle of 2-20 SKUs (manager or admin)",
    request_body = openapi::NewBundle,
    responses(
        (status = 201, body = catalog::SkuView,
            headers(("Location" = String, description = "`/v1/skus/{sku}`"))),
        openapi::CreateBundleErrors,
    ),
)]
async fn create_bundle(
    State(st): State<AppState>,
    Manager(caller): Manager,
    JsonBody(Object(body)): JsonBody<Object>,
) -> Result<impl IntoResponse, ApiError> {
    let view = catalog::create_bundle(&st, &Actor::of(&caller), &body).await?;
    let location = format!("/v1/skus/{}", view.row.sku);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(view),
    ))
}

#[utoipa::path(
    get, path = "/v1/skus/{sku}", tag = "skus", security(("bearer" = [])),
    summary = "A SKU with its stock (manager or admin)",
    params(("sku" = Sku, Path)),
    responses((status = 200, body = catalog::SkuView), openapi::GetSkuErrors),
)]
async fn get_sku(
    State(st): State<AppState>,
    _manager: Manager,
    Path(sku): Path<String>,
) -> Result<Json<catalog::SkuView>, ApiError> {
    catalog::get(&st, &sku).await.map(Json)
}

#[utoipa::path(
    post, path = "/v1/skus/{sku}/receive", tag = "skus", security(("bearer" = [])),
    summary = "Goods received: add units (manager or admin; idempotent per reference)",
    params(("sku" = Sku, Path)),
    request_body = openapi::Receipt,
    responses((status = 200, body = catalog::Received), openapi::ReceiveErrors),
)]
async fn receive(
    State(st): State<AppState>,
    Manager(caller): Manager,
    Path(sku): Path<String>,
    JsonBody(Object(body)): JsonBody<Object>,
) -> Result<Json<catalog::Received>, ApiError> {
    catalog::receive(&st, &Actor::of(&caller), &sku, &body)
        .await
        .map(Json)
}

#[utoipa::path(
    get, path = "/v1/skus", tag = "skus", security(("bearer" = [])),
    summary = "The SKUs, newest first (manager or admin)",
    params(
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "default 50"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses((status = 200, body = catalog::SkuPage), openapi::ListSkusErrors),
)]
async fn list_skus(
    State(st): State<AppState>,
    _manager: Manager,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<catalog::SkuPage>, ApiError> {
    catalog::list(
        &st,
        q.get("limit").map(String::as_str),
        q.get("cursor").map(String::as_str),
        q.get("product_id").map(String::as_str),
    )
    .await
    .map(Json)
}

#[utoipa::path(
    patch, path = "/v1/skus/{sku}", tag = "skus", security(("bearer" = [])),
    summary = "Change a SKU's name, price or per-user limit (manager or admin)",
    params(("sku" = Sku, Path)),
    request_body = openapi::SkuChange,
    responses((status = 200, body = catalog::SkuView), openapi::PatchSkuErrors),
)]
async fn patch_sku(
    State(st): State<AppState>,
    Manager(caller): Manager,
    Path(sku): Path<String>,
    JsonBody(Object(body)): JsonBody<Object>,
) -> Result<Json<catalog::SkuView>, ApiError> {
    catalog::patch(&st, &Actor::of(&caller), &sku, &body)
        .await
        .map(Json)
}

#[utoipa::path(
    post, path = "/v1/skus/{sku}/adjust", tag = "skus", security(("bearer" = [])),
    summary = "Correct the units on hand: write off (negative) or add (manager or admin; idempotent per reference)",
    params(("sku" = Sku, Path)),
    request_body = openapi::Adjustment,
    responses((status = 200, body = catalog::Received), openapi::AdjustErrors),
)]
async fn adjust(
    State(st): State<AppState>,
    Manager(caller): Manager,
    Path(sku): Path<String>,
    JsonBody(Object(body)): JsonBody<Object>,
) -> Result<Json<catalog::Received>, ApiError> {
    catalog::adjust(&st, &Actor::of(&caller), &sku, &body)
        .await
        .map(Json)
}

#[utoipa::path(
    get, path = "/v1/audit", tag = "audit", security(("bearer" = [])),
    summary = "Every manager and admin write, newest first (admin)",
    params(
        ("actor" = Option<String>, Query, description = "only this actor's records"),
        ("target" = Option<String>, Query, description = "only records of this target, e.g. `sku:tee-red-m`"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "default 50"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses((status = 200, body = AuditPage), openapi::AuditErrors),
)]
async fn audit(
    State(st): State<AppState>,
    _admin: Admin,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<AuditPage>, ApiError> {
    let limit = catalog::page_limit(q.get("limit").map(String::as_str))?;
    let before = catalog::id_cursor(q.get("cursor").map(String::as_str))?;
    let filter = |name: &str| match q.get(name).map(String::as_str) {
        None | Some("") => Ok(None),
        Some(v) if v.len() <= 200 && !v.chars().any(char::is_control) => Ok(Some(v)),
        Some(_) => Err(ApiError::InvalidRequest(format!(
            "{name}: at most 200 characters, no control characters"
        ))),
    };
    let (actor, target) = (filter("actor")?, filter("target")?);
    let db = st
        .pg
        .get()
        .await
        .map_err(|e| anyhow::Error::new(e).context("PostgreSQL connection"))?;
    let (entries, next_cursor) = catalog::page(
        floodgate_common::audit::page(&db, actor, target, limit + 1, before).await?,
        limit,
        |e| e.id.clone(),
    );
    Ok(Json(AuditPage {
        entries,
        next_cursor,
    }))
}

#[utoipa::path(
    post, path = "/v1/categories", tag = "catalog", security(("bearer" = [])),
    summary = "Create a category, under a parent or at the root (manager or admin)",
    request_body = openapi::NewCategory,
    responses((status = 201, body = products::Category), openapi::CreateCategoryErrors),
)]
async fn create_category(
    State(st): State<AppState>,
    Manager(caller): Manager,
    JsonBody(Object(body)): JsonBody<Object>,
) -> Result<impl IntoResponse, ApiError> {
    let c = products::create_category(&st, &Actor::of(&caller), &body).await?;
    Ok((StatusCode::CREATED, Json(c)))
}

#[utoipa::path(
    get, path = "/v1/categories", tag = "catalog", security(()),
    summary = "Every category, as a tree",
    responses((status = 200, body = products::CategoryTree), openapi::CategoriesErrors),
)]
async fn categories(State(st): State<AppState>) -> Result<Json<products::CategoryTree>, ApiError> {
    products::categories(&st).await.map(Json)
}

#[utoipa::path(
    post, path = "/v1/products", tag = "catalog", security(("bearer" = [])),
    summary = "Create a product with its options (manager or admin)",
    request_body = openapi::NewProduct,
    responses(
        (status = 201, body = products::ProductView,
            headers(("Location" = String, description = "`/v1/products/{id}`"))),
        openapi::CreateProductErrors,
    ),
)]
async fn create_product(
    State(st): State<AppState>,
    Manager(caller): Manager,
    JsonBody(Object(body)): JsonBody<Object>,
) -> Result<impl IntoResponse, ApiError> {
    let p = products::create_product(&st, &Actor::of(&caller), &body).await?;
    let location = format!("/v1/products/{}", p.product_id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(p)))
}

#[utoipa::path(
    get, path = "/v1/products", tag = "catalog", security(()),
    summary = "Products with their SKUs and live availability, newest first",
    params(
        ("category_id" = Option<String>, Query, description = "only this category and its subcategories"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "default 50; at most 100 are answered"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses((status = 200, body = products::ProductPage), openapi::ListProductsErrors),
)]
async fn list_products(
    State(st): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<products::ProductPage>, ApiError> {
    products::list(
        &st,
        q.get("category_id").map(String::as_str),
        q.get("limit").map(String::as_str),
        q.get("cursor").map(String::as_str),
    )
    .await
    .map(Json)
}

#[utoipa::path(
    get, path = "/v1/products/{id}", tag = "catalog", security(()),
    summary = "One product with its SKUs and live availability",
    params(("id" = String, Path)),
    responses((status = 200, body = products::ProductView), openapi::GetProductErrors),
)]
async fn get_product(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<products::ProductView>, ApiError> {
    products::product(&st, &id).await.map(Json)
}

/// A page of the audit log.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct AuditPage {
    pub entries: Vec<floodgate_common::audit::Record>,
    pub next_cursor: Option<String>,
}

#[utoipa::path(
    get, path = "/v1/skus/{sku}/movements", tag = "skus", security(("bearer" = [])),
    summary = "A SKU's ledger, newest first (manager or admin)",
    params(
        ("sku" = Sku, Path),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "default 50"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses((status = 200, body = catalog::MovementsPage), openapi::MovementsErrors),
)]
async fn movements(
    State(st): State<AppState>,
    _manager: Manager,
    Path(sku): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<catalog::MovementsPage>, ApiError> {
    catalog::movements(
        &st,
        &sku,
        q.get("limit").map(String::as_str),
        q.get("cursor").map(String::as_str),
    )
    .await
    .map(Json)
}

#[utoipa::path(
    get, path = "/v1/skus/{sku}/waitlist", tag = "skus", security(("bearer" = [])),
    summary = "A SKU's waitlist, next to be promoted first (manager or admin)",
    params(
        ("sku" = Sku, Path),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "default 50"),
    ),
    responses((status = 200, body = catalog::WaitlistPage), openapi::MovementsErrors),
)]
async fn waitlist(
    State(st): State<AppState>,
    _manager: Manager,
    Path(sku): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<catalog::WaitlistPage>, ApiError> {
    catalog::waitlist(&st, &sku, q.get("limit").map(String::as_str))
        .await
        .map(Json)
}

#[utoipa::path(
    get, path = "/v1/points", tag = "points", security(("bearer" = [])),
    summary = "The caller's points: balance and held",
    responses((status = 200, body = points::Points), openapi::PointsErrors),
)]
async fn get_points(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<Json<points::Points>, ApiError> {
    points::get(&st, &caller.user).await.map(Json)
}

#[utoipa::path(
    get, path = "/v1/points/history", tag = "points", security(("bearer" = [])),
    summary = "The caller's point entries, newest first",
    params(
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "default 50"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses((status = 200, body = points::History), openapi::PointsHistoryErrors),
)]
async fn points_history(
    State(st): State<AppState>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<points::History>, ApiError> {
    points::history(
        &st,
        &caller.user,
        q.get("limit").map(String::as_str),
        q.get("cursor").map(String::as_str),
    )
    .await
    .map(Json)
}

#[utoipa::path(
    post, path = "/v1/points/charge", tag = "points", security(("bearer" = [])),
    summary = "Add points the caller paid for; idempotent per reference",
    request_body = openapi::TopUp,
    responses((status = 200, body = points::Balance), openapi::TopUpErrors),
)]
async fn charge_points(
    State(st): State<AppState>,
    caller: Caller,
    JsonBody(Object(body)): JsonBody<Object>,
) -> Result<Json<points::Balance>, ApiError> {
    points::top_up(&st, &caller.user, None, &body)
        .await
        .map(Json)
}

#[utoipa::path(
    post, path = "/v1/users/{user}/points/grant", tag = "points", security(("bearer" = [])),
    summary = "Give a user points (admin, audited); idempotent per (user, reference)",
    params(("user" = String, Path, description = "the user's id (a token's `sub`)")),
    request_body = openapi::TopUp,
    responses((status = 200, body = points::Balance), openapi::GrantErrors),
)]
async fn grant_points(
    State(st): State<AppState>,
    Admin(caller): Admin,
    Path(user): Path<String>,
    JsonBody(Object(body)): JsonBody<Object>,
) -> Result<Json<points::Balance>, ApiError> {
    let user = points::user_of(&user)?;
    points::top_up(&st, &user, Some(&Actor::of(&caller)), &body)
        .await
        .map(Json)
}

#[utoipa::path(
    post, path = "/v1/webhooks", tag = "webhooks", security(("bearer" = [])),
    summary = "Subscribe an endpoint to committed events (admin); the secret is shown once",
    request_body = openapi::NewWebhook,
    responses(
        (status = 201, body = webhooks::WebhookView,
            headers(("Location" = String, description = "`/v1/webhooks/{id}`"))),
        openapi::CreateWebhookErrors,
    ),
)]
async fn create_webhook(
    State(st): State<AppState>,
    Admin(caller): Admin,
    JsonBody(Object(body)): JsonBody<Object>,
) -> Result<impl IntoResponse, ApiError> {
    let w = webhooks::create(&st, &Actor::of(&caller), &body).await?;
    let location = format!("/v1/webhooks/{}", w.id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(w)))
}

#[utoipa::path(
    get, path = "/v1/webhooks", tag = "webhooks", security(("bearer" = [])),
    summary = "Every webhook, with its circuit and delivery counts (admin)",
    responses((status = 200, body = webhooks::WebhookList), openapi::ListWebhooksErrors),
)]
async fn list_webhooks(
    State(st): State<AppState>,
    _admin: Admin,
) -> Result<Json<webhooks::WebhookList>, ApiError> {
    webhooks::list(&st).await.map(Json)
}

#[utoipa::path(
    get, path = "/v1/webhooks/{id}", tag = "webhooks", security(("bearer" = [])),
    summary = "One webhook: its circuit (closed, open, half_open) and delivery counts (admin)",
    params(("id" = String, Path, description = "the webhook's id (a UUID)")),
    responses((status = 200, body = webhooks::WebhookView), openapi::WebhookErrors),
)]
async fn get_webhook(
    State(st): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> Result<Json<webhooks::WebhookView>, ApiError> {
    webhooks::get(&st, &id).await.map(Json)
}

#[utoipa::path(
    delete, path = "/v1/webhooks/{id}", tag = "webhooks", security(("bearer" = [])),
    summary = "Stop delivering to a webhook (admin); the audit log records it",
    params(("id" = String, Path, description = "the webhook's id (a UUID)")),
    responses((status = 204, description = "deleted"), openapi::WebhookErrors),
)]
async fn delete_webhook(
    State(st): State<AppState>,
    Admin(caller): Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    webhooks::delete(&st, &Actor::of(&caller), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    get, path = "/v1/webhooks/{id}/deliveries", tag = "webhooks", security(("bearer" = [])),
    summary = "A webhook's delivery log: every attempt, newest first (admin)",
    params(
        ("id" = String, Path, description = "the webhook's id (a UUID)"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "default 50"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses((status = 200, body = webhooks::AttemptPage), openapi::WebhookListErrors),
)]
async fn webhook_deliveries(
    State(st): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<webhooks::AttemptPage>, ApiError> {
    webhooks::deliveries(
        &st,
        &id,
        q.get("limit").map(String::as_str),
        q.get("cursor").map(String::as_str),
    )
    .await
    .map(Json)
}

#[utoipa::path(
    post, path = "/v1/webhooks/{id}/replay", tag = "webhooks", security(("bearer" = [])),
    summary = "Deliver again every event of the webhook's types committed since `since` (admin)",
    params(("id" = String, Path, description = "the webhook's id (a UUID)")),
    request_body = openapi::Replay,
    responses((status = 202, body = webhooks::Replayed), openapi::ReplayErrors),
)]
async fn replay_webhook(
    State(st): State<AppState>,
    Admin(caller): Admin,
    Path(id): Path<String>,
    JsonBody(Object(body)): JsonBody<Object>,
) -> Result<impl IntoResponse, ApiError> {
    let r = webhooks::replay(&st, &Actor::of(&caller), &id, &body).await?;
    Ok((StatusCode::ACCEPTED, Json(r)))
}

#[utoipa::path(
    get, path = "/readyz", tag = "operations",
    summary = "Whether Redis, RabbitMQ and PostgreSQL are reachable",
    responses(
        (status = 200, description = "ready", body = floodgate_common::openapi::Readiness),
        (status = 503, description = "a dependency is down (named in `down`)",
            body = floodgate_common::openapi::Readiness),
    ),
)]
async fn readyz(State(st): State<AppState>) -> Response {
    let (ready, body) = floodgate_common::health::readiness(
        &st.redis,
        &st.shards,
        &st.pg,
        st.publisher.is_connected(),
        &st.supervisor,
    )
    .await;
    floodgate_common::health::response(ready, body)
}

#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    summary = "Prometheus metrics",
    responses((status = 200, description = "Prometheus text exposition format",
        content_type = "text/plain", body = String)),
)]
async fn metrics() -> Response {
    telemetry::metrics_response()
}

#[utoipa::path(
    get, path = "/healthz", tag = "operations",
    summary = "The process is up",
    responses((status = 200, description = "`ok`", content_type = "text/plain", body = String)),
)]
async fn healthz() -> &'static str {
    "ok"
}
