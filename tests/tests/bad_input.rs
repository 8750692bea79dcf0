//! Every error row of API.md for the order, stock and SKU endpoints: the status, the
//! stable `code`, problem+json, and that Redis, RabbitMQ and PostgreSQL are unchanged.

use floodgate_common::{
    auth,
    domain::{Role, UserId},
};
use floodgate_tests::{Options, Resp, TestApp};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

struct Case {
    name: &'static str,
    method: Method,
    path: String,
    token: Option<String>,
    body: Option<Body>,
    headers: Vec<(&'static str, String)>,
    status: u16,
    code: &'static str,
}

enum Body {
    Json(Value),
    Raw(&'static str, String),
}

fn case(name: &'static str, method: Method, path: &str, status: u16, code: &'static str) -> Case {
    Case {
        name,
        method,
        path: path.to_owned(),
        token: None,
        body: None,
        headers: Vec::new(),
        status,
        code,
    }
}

impl Case {
    fn token(mut self, t: &str) -> Self {
        self.token = Some(t.to_owned());
        self
    }
    fn json(mut self, v: Value) -> Self {
        self.body = Some(Body::Json(v));
        self
    }
    fn raw(mut self, content_type: &'static str, body: String) -> Self {
        self.body = Some(Body::Raw(content_type, body));
        self
    }
    fn header(mut self, k: &'static str, v: &str) -> Self {
        self.headers.push((k, v.to_owned()));
        self
    }
}

async fn send(app: &TestApp, c: &Case) -> Resp {
    let mut rb = app
        .client
        .request(c.method.clone(), format!("{}{}", app.base, c.path));
    if let Some(t) = &c.token {
        rb = rb.bearer_auth(t);
    }
    match &c.body {
        Some(Body::Json(v)) => rb = rb.json(v),
        Some(Body::Raw(ct, b)) => rb = rb.header("content-type", *ct).body(b.clone()),
        None => {}
    }
    for (k, v) in &c.headers {
        rb = rb.header(*k, v);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    Resp {
        status,
        headers,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
    }
}

fn order(items: Value) -> Value {
    json!({ "items": items })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_its_code_and_changes_nothing() {
    let app = TestApp::spawn().await;
    app.create_sku("tee", 5, Some(2)).await;
    app.create_sku("last-one", 1, None).await;
    app.create_sku("few", 3, None).await;
    let admin = app.admin();
    for (sku, window) in [
        (
            "windowed",
            json!({"sale_starts_at": "2050-01-01T00:00:00Z"}),
        ),
        (
            "gone",
            json!({"sale_starts_at": "2001-01-01T00:00:00Z", "sale_ends_at": "2002-01-01T00:00:00Z"}),
        ),
    ] {
        let mut body = json!({"sku": sku, "name": sku, "price_cents": 1, "initial_stock": 5});
        body.as_object_mut()
            .unwrap()
            .extend(window.as_object().unwrap().clone());
        assert_eq!(app.post("/v1/skus", Some(&admin), &body).await.status, 201);
    }
    assert_eq!(
        app.post(
            "/v1/categories",
            Some(&admin),
            &json!({"id": "shirts", "name": "Shirts"})
        )
        .await
        .status,
        201
    );
    assert_eq!(
        app.post(
            "/v1/products",
            Some(&admin),
            &json!({"product_id": "shirt", "name": "Shirt", "options": [{"name": "size", "values": ["S", "M"]}]})
        )
        .await
        .status,
        201
    );
    let shirt = |sku: &str, options: Value| json!({"sku": sku, "name": "n", "price_cents": 1, "initial_stock": 1, "product_id": "shirt", "options": options});
    assert_eq!(
        app.post(
            "/v1/skus",
            Some(&admin),
            &shirt("shirt-s", json!({"size": "S"}))
        )
        .await
        .status,
        201
    );
    let alice = app.customer("alice");
    // State the error cases build on: alice holds 2 tees (her limit), bob's order exists,
    // one Idempotency-Key is taken, last-one is sold out.
    for _ in 0..2 {
        assert_eq!(app.order(&alice, &[("tee", 1)], None).await.status, 202);
    }
    let bob = app.customer("bob");
    let bobs = app.order(&bob, &[("last-one", 1)], Some("bob-key")).await;
    assert_eq!(bobs.status, 202);
    let bob_order = bobs.body["order_id"].as_str().unwrap().to_owned();
    // Bundles: dave holds one duo (its limit); lastpack's component last-one is sold out.
    // With several Redis shards an order is reserved in parts, and the parts reserved
    // before one refuses keep their released records for a minute (a re-sent reserve
    // must find them): so each bundle's refusal must come from its order's first part,
    // the lowest shard. The ids are picked for the shard count in use.
    let count = app.shards.count();
    let shard = |s: &str| floodgate_common::redis::shard_of(s, count);
    let named = |base: &str, fits: &dyn Fn(usize) -> bool| -> String {
        (0..)
            .map(|i| match i {
                0 => base.to_owned(),
                i => format!("{base}-{i}"),
            })
            .find(|s| fits(shard(s)))
            .unwrap()
    };
    let duo = named("duo", &|g| g <= shard("tee").min(shard("few")));
    let pack_part = named("pack-part", &|g| g >= shard("last-one"));
    app.create_sku(&pack_part, 5, None).await;
    let lastpack = named("lastpack", &|g| g >= shard("last-one"));
    for (sku, components, limit) in [
        (
            duo.as_str(),
            json!([{"sku": "tee", "qty": 1}, {"sku": "few", "qty": 1}]),
            json!(1),
        ),
        (
            lastpack.as_str(),
            json!([{"sku": "last-one", "qty": 1}, {"sku": pack_part, "qty": 1}]),
            json!(null),
        ),
    ] {
        let r = app
            .post(
                "/v1/bundles",
                Some(&app.admin()),
                &json!({"sku": sku, "name": sku, "price_cents": 1, "components": components, "per_user_limit": limit}),
            )
            .await;
        assert_eq!(r.status, 201, "{r:?}");
    }
    let dave = app.customer("dave");
    assert_eq!(app.order(&dave, &[(&duo, 1)], None).await.status, 202);
    app.wait_idle().await;

    let secret = app.cfg.jwt_secret.expose().to_owned();
    let carol = UserId::parse("carol").unwrap();
    let expired = auth::mint_expiring_at(&secret, &carol, Role::Customer, 1_000_000);
    let forged = auth::mint(
        "some-other-secret-0123456789",
        &carol,
        Role::Admin,
        Duration::from_secs(600),
    );
    let carol_t = app.customer("carol");
    let manager = app.manager("mia");
    // A role API.md does not name: 401, like any other invalid token.
    let superuser = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "carol", "role": "superuser", "exp": auth::now_secs() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let good = order(json!([{"sku": "tee", "qty": 1}]));
    let big = format!(
        "{{\"items\":[{{\"sku\":\"tee\",\"qty\":1}}],\"pad\":\"{}\"}}",
        "x".repeat(70 * 1024)
    );
    let fifty_one: Vec<Value> = (0..51)
        .map(|i| json!({"sku": format!("s{i}"), "qty": 1}))
        .collect();
    let o = "/v1/orders";
    let p = Method::POST;
    let g = Method::GET;
    let pa = Method::PATCH;

    let cases = vec![
        // POST /v1/orders: auth
        case("no token", p.clone(), o, 401, "unauthorized").json(good.clone()),
        case("garbage token", p.clone(), o, 401, "unauthorized").token("nope").json(good.clone()),
        case("expired token", p.clone(), o, 401, "unauthorized").token(&expired).json(good.clone()),
        case("forged token", p.clone(), o, 401, "unauthorized").token(&forged).json(good.clone()),
        case("unknown role", p.clone(), o, 401, "unauthorized").token(&superuser).json(good.clone()),
        case("order as manager", p.clone(), o, 403, "forbidden").token(&manager).json(good.clone()),
        // POST /v1/orders: body
        case("not json content type", p.clone(), o, 415, "unsupported_media_type")
            .token(&carol_t)
            .raw("text/plain", good.to_string()),
        case("too large", p.clone(), o, 413, "too_large").token(&carol_t).raw("application/json", big),
        case("not json", p.clone(), o, 400, "malformed").token(&carol_t).raw("application/json", "{items".into()),
        case("items not a list", p.clone(), o, 400, "malformed").token(&carol_t).json(json!({"items": "tee"})),
        case("no items field", p.clone(), o, 400, "malformed").token(&carol_t).json(json!({"sku": "tee"})),
        case("qty a string", p.clone(), o, 400, "malformed")
            .token(&carol_t)
            .json(order(json!([{"sku": "tee", "qty": "one"}]))),
        case("qty fractional", p.clone(), o, 400, "malformed")
            .token(&carol_t)
            .json(order(json!([{"sku": "tee", "qty": 1.5}]))),
        case("qty zero", p.clone(), o, 422, "invalid_order")
            .token(&carol_t)
            .json(order(json!([{"sku": "tee", "qty": 0}]))),
        case("qty negative", p.clone(), o, 422, "invalid_order")
            .token(&carol_t)
            .json(order(json!([{"sku": "tee", "qty": -1}]))),
        case("qty over 1000", p.clone(), o, 422, "invalid_order")
            .token(&carol_t)
            .json(order(json!([{"sku": "tee", "qty": 1001}]))),
        case("bad sku characters", p.clone(), o, 422, "invalid_order")
            .token(&carol_t)
            .json(order(json!([{"sku": "tee shirt!", "qty": 1}]))),
        case("sku too long", p.clone(), o, 422, "invalid_order")
            .token(&carol_t)
            .json(order(json!([{"sku": "x".repeat(65), "qty": 1}]))),
        case("no lines", p.clone(), o, 422, "invalid_order").token(&carol_t).json(order(json!([]))),
        case("51 lines", p.clone(), o, 422, "invalid_order").token(&carol_t).json(order(json!(fifty_one))),
        case("sku twice", p.clone(), o, 422, "invalid_order")
            .token(&carol_t)
            .json(order(json!([{"sku": "tee", "qty": 1}, {"sku": "tee", "qty": 1}]))),
        case("idempotency key too long", p.clone(), o, 422, "invalid_order")
            .token(&carol_t)
            .json(good.clone())
            .header("Idempotency-Key", &"k".repeat(129)),
        // POST /v1/orders: business refusals
        case("unknown sku", p.clone(), o, 422, "unknown_sku")
            .token(&carol_t)
            .json(order(json!([{"sku": "tee", "qty": 1}, {"sku": "ghost", "qty": 1}]))),
        case("sold out", p.clone(), o, 409, "sold_out")
            .token(&carol_t)
            .json(order(json!([{"sku": "last-one", "qty": 1}]))),
        case("sold out, more than left", p.clone(), o, 409, "sold_out")
            .token(&carol_t)
            .json(order(json!([{"sku": "few", "qty": 4}]))),
        case("per-user limit", p.clone(), o, 422, "limit_exceeded").token(&alice).json(good.clone()),
        // POST /v1/orders with "waitlist": true: refused before anything waits
        case("waitlist not a boolean", p.clone(), o, 400, "malformed")
            .token(&carol_t)
            .json(json!({"items": [{"sku": "last-one", "qty": 1}], "waitlist": "yes"})),
        case("waitlist with two lines", p.clone(), o, 422, "invalid_order")
            .token(&carol_t)
            .json(json!({"items": [{"sku": "last-one", "qty": 1}, {"sku": "few", "qty": 1}], "waitlist": true})),
        case("waitlist for a bundle", p.clone(), o, 422, "invalid_order")
            .token(&carol_t)
            .json(json!({"items": [{"sku": duo, "qty": 1}], "waitlist": true})),
        case("waitlist for an unknown sku", p.clone(), o, 422, "unknown_sku")
            .token(&carol_t)
            .json(json!({"items": [{"sku": "ghost", "qty": 1}], "waitlist": true})),
        case("waitlist over the per-user limit", p.clone(), o, 422, "limit_exceeded")
            .token(&alice)
            .json(json!({"items": [{"sku": "tee", "qty": 1}], "waitlist": true})),
        case("idempotency key reused", p.clone(), o, 422, "idempotency_key_reused")
            .token(&bob)
            .json(order(json!([{"sku": "tee", "qty": 1}])))
            .header("Idempotency-Key", "bob-key"),
        // GET /v1/orders/{id}
        case("order without token", g.clone(), &format!("/v1/orders/{bob_order}"), 401, "unauthorized"),
        case("another user's order", g.clone(), &format!("/v1/orders/{bob_order}"), 404, "not_found")
            .token(&carol_t),
        case("order id not a uuid", g.clone(), "/v1/orders/12345", 404, "not_found").token(&carol_t),
        case(
            "order that does not exist",
            g.clone(),
            "/v1/orders/01900000-0000-7000-8000-000000000000",
            404,
            "not_found",
        )
        .token(&carol_t),
        // Stock
        case("stock of unknown sku", g.clone(), "/v1/stock/ghost", 404, "unknown_sku"),
        case("stock of impossible sku", g.clone(), "/v1/stock/no%20such", 404, "unknown_sku"),
        case("stock list without skus", g.clone(), "/v1/stock", 422, "invalid_request"),
        case(
            "stock list over 100",
            g.clone(),
            &format!("/v1/stock?skus={}", (0..101).map(|i| format!("s{i}")).collect::<Vec<_>>().join(",")),
            422,
            "invalid_request",
        ),
        // POST /v1/skus
        case("create sku without token", p.clone(), "/v1/skus", 401, "unauthorized")
            .json(json!({"sku": "new", "name": "n", "price_cents": 1, "initial_stock": 1})),
        case("create sku as customer", p.clone(), "/v1/skus", 403, "forbidden")
            .token(&carol_t)
            .json(json!({"sku": "new", "name": "n", "price_cents": 1, "initial_stock": 1})),
        case("create sku missing name", p.clone(), "/v1/skus", 422, "invalid_request")
            .token(&admin)
            .json(json!({"sku": "new", "price_cents": 1, "initial_stock": 1})),
        case("create sku negative price", p.clone(), "/v1/skus", 422, "invalid_request")
            .token(&admin)
            .json(json!({"sku": "new", "name": "n", "price_cents": -1, "initial_stock": 1})),
        case("create sku negative stock", p.clone(), "/v1/skus", 422, "invalid_request")
            .token(&admin)
            .json(json!({"sku": "new", "name": "n", "price_cents": 1, "initial_stock": -5})),
        case("create sku zero limit", p.clone(), "/v1/skus", 422, "invalid_request")
            .token(&admin)
            .json(json!({"sku": "new", "name": "n", "price_cents": 1, "initial_stock": 1, "per_user_limit": 0})),
        case("create sku bad id", p.clone(), "/v1/skus", 422, "invalid_request")
            .token(&admin)
            .json(json!({"sku": "new sku", "name": "n", "price_cents": 1, "initial_stock": 1})),
        case("create sku price as string", p.clone(), "/v1/skus", 422, "invalid_request")
            .token(&admin)
            .json(json!({"sku": "new", "name": "n", "price_cents": "1", "initial_stock": 1})),
        case("create sku not json", p.clone(), "/v1/skus", 400, "malformed")
            .token(&admin)
            .raw("application/json", "[1,2".into()),
        case("create sku that exists", p.clone(), "/v1/skus", 409, "sku_exists")
            .token(&admin)
            .json(json!({"sku": "tee", "name": "again", "price_cents": 1, "initial_stock": 99})),
        // GET /v1/skus/{sku}
        case("read sku as customer", g.clone(), "/v1/skus/tee", 403, "forbidden").token(&carol_t),
        case("read unknown sku", g.clone(), "/v1/skus/ghost", 404, "unknown_sku").token(&admin),
        // POST /v1/skus/{sku}/receive
        case("receive as customer", p.clone(), "/v1/skus/tee/receive", 403, "forbidden")
            .token(&carol_t)
            .json(json!({"qty": 5, "reference": "po-1"})),
        case("receive zero", p.clone(), "/v1/skus/tee/receive", 422, "invalid_request")
            .token(&admin)
            .json(json!({"qty": 0, "reference": "po-1"})),
        case("receive too many", p.clone(), "/v1/skus/tee/receive", 422, "invalid_request")
            .token(&admin)
            .json(json!({"qty": 1_000_001, "reference": "po-1"})),
        case("receive without reference", p.clone(), "/v1/skus/tee/receive", 422, "invalid_request")
            .token(&admin)
            .json(json!({"qty": 5})),
        case("receive unknown sku", p.clone(), "/v1/skus/ghost/receive", 404, "unknown_sku")
            .token(&admin)
            .json(json!({"qty": 5, "reference": "po-1"})),
        // GET /v1/skus/{sku}/movements
        case("movements bad cursor", g.clone(), "/v1/skus/tee/movements?cursor=abc", 422, "invalid_request")
            .token(&admin),
        case("movements limit zero", g.clone(), "/v1/skus/tee/movements?limit=0", 422, "invalid_request")
            .token(&admin),
        case("movements unknown sku", g.clone(), "/v1/skus/ghost/movements", 404, "unknown_sku").token(&admin),
        case("movements as customer", g.clone(), "/v1/skus/tee/movements", 403, "forbidden").token(&carol_t),
        // GET /v1/skus/{sku}/waitlist
        case("waitlist limit zero", g.clone(), "/v1/skus/tee/waitlist?limit=0", 422, "invalid_request")
            .token(&admin),
        case("waitlist limit too large", g.clone(), "/v1/skus/tee/waitlist?limit=501", 422, "invalid_request")
            .token(&admin),
        case("waitlist unknown sku", g.clone(), "/v1/skus/ghost/waitlist", 404, "unknown_sku").token(&admin),
        case("waitlist as customer", g.clone(), "/v1/skus/tee/waitlist", 403, "forbidden").token(&carol_t),
        // GET /v1/skus
        case("list skus as customer", g.clone(), "/v1/skus", 403, "forbidden").token(&carol_t),
        case("list skus without token", g.clone(), "/v1/skus", 401, "unauthorized"),
        case("list skus limit zero", g.clone(), "/v1/skus?limit=0", 422, "invalid_request").token(&manager),
        case("list skus limit 501", g.clone(), "/v1/skus?limit=501", 422, "invalid_request").token(&manager),
        case("list skus bad cursor", g.clone(), "/v1/skus?cursor=abc", 422, "invalid_request").token(&manager),
        case("list skus cursor with a bad sku", g.clone(), "/v1/skus?cursor=123.no%20way", 422, "invalid_request")
            .token(&manager),
        case("list skus negative cursor", g.clone(), "/v1/skus?cursor=-5.tee", 422, "invalid_request").token(&manager),
        // PATCH /v1/skus/{sku}
        case("patch sku as customer", pa.clone(), "/v1/skus/tee", 403, "forbidden")
            .token(&carol_t)
            .json(json!({"name": "x"})),
        case("patch sku without token", pa.clone(), "/v1/skus/tee", 401, "unauthorized").json(json!({"name": "x"})),
        case("patch unknown sku", pa.clone(), "/v1/skus/ghost", 404, "unknown_sku")
            .token(&manager)
            .json(json!({"name": "x"})),
        case("patch nothing", pa.clone(), "/v1/skus/tee", 422, "invalid_request").token(&manager).json(json!({})),
        case("patch the id", pa.clone(), "/v1/skus/tee", 422, "invalid_request")
            .token(&manager)
            .json(json!({"sku": "other"})),
        case("patch the buckets", pa.clone(), "/v1/skus/tee", 422, "invalid_request")
            .token(&manager)
            .json(json!({"buckets": 2})),
        case("patch stock", pa.clone(), "/v1/skus/tee", 422, "invalid_request")
            .token(&manager)
            .json(json!({"name": "fine", "on_hand": 99})),
        case("patch empty name", pa.clone(), "/v1/skus/tee", 422, "invalid_request")
            .token(&manager)
            .json(json!({"name": "  "})),
        case("patch null name", pa.clone(), "/v1/skus/tee", 422, "invalid_request")
            .token(&manager)
            .json(json!({"name": null})),
        case("patch negative price", pa.clone(), "/v1/skus/tee", 422, "invalid_request")
            .token(&manager)
            .json(json!({"price_cents": -1})),
        case("patch zero limit", pa.clone(), "/v1/skus/tee", 422, "invalid_request")
            .token(&manager)
            .json(json!({"per_user_limit": 0})),
        case("patch limit as string", pa.clone(), "/v1/skus/tee", 422, "invalid_request")
            .token(&manager)
            .json(json!({"per_user_limit": "5"})),
        case("patch a good field and a bad one", pa.clone(), "/v1/skus/tee", 422, "invalid_request")
            .token(&manager)
            .json(json!({"name": "Renamed", "price_cents": 1.5})),
        case("patch a window ending before it starts", pa.clone(), "/v1/skus/tee", 422, "invalid_request")
            .token(&manager)
            .json(json!({"sale_starts_at": "2030-01-02T00:00:00Z", "sale_ends_at": "2030-01-01T00:00:00Z"})),
        case("patch an end before the start it has", pa.clone(), "/v1/skus/windowed", 422, "invalid_request")
            .token(&manager)
            .json(json!({"sale_ends_at": "2040-01-01T00:00:00Z"})),
        case("patch a start that is no date", pa.clone(), "/v1/skus/tee", 422, "invalid_request")
            .token(&manager)
            .json(json!({"sale_starts_at": "tomorrow"})),
        case("patch a start finer than a millisecond", pa.clone(), "/v1/skus/tee", 422, "invalid_request")
            .token(&manager)
            .json(json!({"sale_starts_at": "2030-01-01T00:00:00.0000001Z"})),
        case("patch a start past 9999 in UTC", pa.clone(), "/v1/skus/tee", 422, "invalid_request")
            .token(&manager)
            .json(json!({"sale_starts_at": "9999-12-31T23:00:00-05:00"})),
        case("patch a start before 1970 in UTC", pa.clone(), "/v1/skus/tee", 422, "invalid_request")
            .token(&manager)
            .json(json!({"sale_starts_at": "1970-01-01T00:30:00+01:00"})),
        case("patch a start as a number", pa.clone(), "/v1/skus/tee", 422, "invalid_request")
            .token(&manager)
            .json(json!({"sale_starts_at": 1_900_000_000})),
        case("create sku with an empty window", p.clone(), "/v1/skus", 422, "invalid_request")
            .token(&manager)
            .json(json!({"sku": "new", "name": "n", "price_cents": 1, "initial_stock": 1,
                "sale_starts_at": "2030-01-01T00:00:00Z", "sale_ends_at": "2030-01-01T00:00:00Z"})),
        case("create sku with a start before 1970", p.clone(), "/v1/skus", 422, "invalid_request")
            .token(&manager)
            .json(json!({"sku": "new", "name": "n", "price_cents": 1, "initial_stock": 1,
                "sale_starts_at": "1969-12-31T23:59:59Z"})),
        case("order before the sale starts", p.clone(), o, 409, "sale_not_started")
            .token(&carol_t)
            .json(order(json!([{"sku": "windowed", "qty": 1}]))),
        case("order after the sale ended", p.clone(), o, 409, "sale_ended")
            .token(&carol_t)
            .json(order(json!([{"sku": "gone", "qty": 1}]))),
        case("patch not json", pa.clone(), "/v1/skus/tee", 400, "malformed")
            .token(&manager)
            .raw("application/json", "{name".into()),
        case("patch not an object", pa.clone(), "/v1/skus/tee", 400, "malformed")
            .token(&manager)
            .json(json!(["name"])),
        // POST /v1/skus/{sku}/adjust
        case("adjust as customer", p.clone(), "/v1/skus/tee/adjust", 403, "forbidden")
            .token(&carol_t)
            .json(json!({"delta": -1, "reason": "damaged", "reference": "adj-1"})),
        case("adjust unknown sku", p.clone(), "/v1/skus/ghost/adjust", 404, "unknown_sku")
            .token(&manager)
            .json(json!({"delta": -1, "reason": "damaged", "reference": "adj-1"})),
        case("adjust zero", p.clone(), "/v1/skus/tee/adjust", 422, "invalid_request")
            .token(&manager)
            .json(json!({"delta": 0, "reason": "damaged", "reference": "adj-1"})),
        case("adjust fractional", p.clone(), "/v1/skus/tee/adjust", 422, "invalid_request")
            .token(&manager)
            .json(json!({"delta": -1.5, "reason": "damaged", "reference": "adj-1"})),
        case("adjust too far down", p.clone(), "/v1/skus/tee/adjust", 422, "invalid_request")
            .token(&manager)
            .json(json!({"delta": -1_000_001, "reason": "damaged", "reference": "adj-1"})),
        case("adjust without reason", p.clone(), "/v1/skus/tee/adjust", 422, "invalid_request")
            .token(&manager)
            .json(json!({"delta": -1, "reference": "adj-1"})),
        case("adjust with a control character in the reason", p.clone(), "/v1/skus/tee/adjust", 422, "invalid_request")
            .token(&manager)
            .json(json!({"delta": -1, "reason": "a\u{7}b", "reference": "adj-1"})),
        case("adjust without reference", p.clone(), "/v1/skus/tee/adjust", 422, "invalid_request")
            .token(&manager)
            .json(json!({"delta": -1, "reason": "damaged"})),
        case("adjust bad reference", p.clone(), "/v1/skus/tee/adjust", 422, "invalid_request")
            .token(&manager)
            .json(json!({"delta": -1, "reason": "damaged", "reference": ""})),
        case("write off more than is free", p.clone(), "/v1/skus/tee/adjust", 409, "insufficient_stock")
            .token(&manager)
            .json(json!({"delta": -4, "reason": "flood", "reference": "adj-2"})),
        case("write off from a sold-out sku", p.clone(), "/v1/skus/last-one/adjust", 409, "insufficient_stock")
            .token(&manager)
            .json(json!({"delta": -1, "reason": "lost", "reference": "adj-3"})),
        case("adjust with a repeated key", p.clone(), "/v1/skus/tee/adjust", 400, "malformed")
            .token(&manager)
            .raw("application/json", r#"{"delta":1,"delta":-1,"reason":"r","reference":"adj-9"}"#.into()),
        // POST /v1/bundles
        case("bundle as customer", p.clone(), "/v1/bundles", 403, "forbidden")
            .token(&carol_t)
            .json(json!({"sku": "b1", "name": "b", "price_cents": 1, "components": [{"sku": "tee", "qty": 1}, {"sku": "few", "qty": 1}]})),
        case("bundle without token", p.clone(), "/v1/bundles", 401, "unauthorized")
            .json(json!({"sku": "b1", "name": "b", "price_cents": 1, "components": [{"sku": "tee", "qty": 1}, {"sku": "few", "qty": 1}]})),
        case("bundle without components", p.clone(), "/v1/bundles", 422, "invalid_request")
            .token(&manager)
            .json(json!({"sku": "b1", "name": "b", "price_cents": 1})),
        case("bundle of one component", p.clone(), "/v1/bundles", 422, "invalid_request")
            .token(&manager)
            .json(json!({"sku": "b1", "name": "b", "price_cents": 1, "components": [{"sku": "tee", "qty": 2}]})),
        case("bundle of 21 components", p.clone(), "/v1/bundles", 422, "invalid_request")
            .token(&manager)
            .json(json!({"sku": "b1", "name": "b", "price_cents": 1,
                "components": (0..21).map(|i| json!({"sku": format!("c{i}"), "qty": 1})).collect::<Vec<_>>()})),
        case("bundle with a component twice", p.clone(), "/v1/bundles", 422, "invalid_request")
            .token(&manager)
            .json(json!({"sku": "b1", "name": "b", "price_cents": 1, "components": [{"sku": "tee", "qty": 1}, {"sku": "tee", "qty": 1}]})),
        case("bundle with a missing component", p.clone(), "/v1/bundles", 422, "unknown_sku")
            .token(&manager)
            .json(json!({"sku": "b1", "name": "b", "price_cents": 1, "components": [{"sku": "tee", "qty": 1}, {"sku": "ghost", "qty": 1}]})),
        case("bundle of a bundle", p.clone(), "/v1/bundles", 422, "invalid_request")
            .token(&manager)
            .json(json!({"sku": "b1", "name": "b", "price_cents": 1, "components": [{"sku": "tee", "qty": 1}, {"sku": duo, "qty": 1}]})),
        case("bundle containing itself", p.clone(), "/v1/bundles", 422, "invalid_request")
            .token(&manager)
            .json(json!({"sku": "b1", "name": "b", "price_cents": 1, "components": [{"sku": "tee", "qty": 1}, {"sku": "b1", "qty": 1}]})),
        case("bundle component qty 0", p.clone(), "/v1/bundles", 422, "invalid_request")
            .token(&manager)
            .json(json!({"sku": "b1", "name": "b", "price_cents": 1, "components": [{"sku": "tee", "qty": 0}, {"sku": "few", "qty": 1}]})),
        case("bundle component qty 1001", p.clone(), "/v1/bundles", 422, "invalid_request")
            .token(&manager)
            .json(json!({"sku": "b1", "name": "b", "price_cents": 1, "components": [{"sku": "tee", "qty": 1001}, {"sku": "few", "qty": 1}]})),
        case("bundle component not an object", p.clone(), "/v1/bundles", 422, "invalid_request")
            .token(&manager)
            .json(json!({"sku": "b1", "name": "b", "price_cents": 1, "components": ["tee", "few"]})),
        case("bundle that exists", p.clone(), "/v1/bundles", 409, "sku_exists")
            .token(&manager)
            .json(json!({"sku": duo, "name": "b", "price_cents": 1, "components": [{"sku": "tee", "qty": 1}, {"sku": "few", "qty": 1}]})),
        case("bundle over a SKU's id", p.clone(), "/v1/bundles", 409, "sku_exists")
            .token(&manager)
            .json(json!({"sku": "tee", "name": "b", "price_cents": 1, "components": [{"sku": "few", "qty": 1}, {"sku": "last-one", "qty": 1}]})),
        case("receive a bundle", p.clone(), &format!("/v1/skus/{duo}/receive"), 409, "bundle_has_no_stock")
            .token(&manager)
            .json(json!({"qty": 1, "reference": "po-b"})),
        case("adjust a bundle", p.clone(), &format!("/v1/skus/{duo}/adjust"), 409, "bundle_has_no_stock")
            .token(&manager)
            .json(json!({"delta": 1, "reason": "found", "reference": "adj-b"})),
        case("bundle over its per-user limit", p.clone(), o, 422, "limit_exceeded")
            .token(&dave)
            .json(order(json!([{"sku": duo, "qty": 1}]))),
        case("bundle with a sold-out component", p.clone(), o, 409, "sold_out")
            .token(&carol_t)
            .json(order(json!([{"sku": lastpack, "qty": 1}]))),
        // POST /v1/categories
        case("category as customer", p.clone(), "/v1/categories", 403, "forbidden")
            .token(&carol_t)
            .json(json!({"id": "new", "name": "n"})),
        case("category without token", p.clone(), "/v1/categories", 401, "unauthorized").json(json!({"id": "new", "name": "n"})),
        case("category without name", p.clone(), "/v1/categories", 422, "invalid_request")
            .token(&manager)
            .json(json!({"id": "new"})),
        case("category with a bad id", p.clone(), "/v1/categories", 422, "invalid_request")
            .token(&manager)
            .json(json!({"id": "a b", "name": "n"})),
        case("category under a missing parent", p.clone(), "/v1/categories", 422, "unknown_category")
            .token(&manager)
            .json(json!({"id": "new", "name": "n", "parent_id": "ghost"})),
        case("category that exists", p.clone(), "/v1/categories", 409, "category_exists")
            .token(&manager)
            .json(json!({"id": "shirts", "name": "again"})),
        case("category its own parent", p.clone(), "/v1/categories", 422, "unknown_category")
            .token(&manager)
            .json(json!({"id": "loop", "name": "n", "parent_id": "loop"})),
        case("an existing category its own parent", p.clone(), "/v1/categories", 422, "unknown_category")
            .token(&manager)
            .json(json!({"id": "shirts", "name": "n", "parent_id": "shirts"})),
        case("sku of a product id with a NUL", p.clone(), "/v1/skus", 422, "unknown_product")
            .token(&manager)
            .json(json!({"sku": "new", "name": "n", "price_cents": 1, "initial_stock": 1, "product_id": "a\u{0}b"})),
        case("category with a repeated key", p.clone(), "/v1/categories", 400, "malformed")
            .token(&manager)
            .raw("application/json", r#"{"id":"a","id":"b","name":"n"}"#.into()),
        // POST /v1/products
        case("product as customer", p.clone(), "/v1/products", 403, "forbidden")
            .token(&carol_t)
            .json(json!({"product_id": "new", "name": "n"})),
        case("product without name", p.clone(), "/v1/products", 422, "invalid_request")
            .token(&manager)
            .json(json!({"product_id": "new"})),
        case("product that exists", p.clone(), "/v1/products", 409, "product_exists")
            .token(&manager)
            .json(json!({"product_id": "shirt", "name": "again"})),
        case("product in a missing category", p.clone(), "/v1/products", 422, "unknown_category")
            .token(&manager)
            .json(json!({"product_id": "new", "name": "n", "category_id": "ghost"})),
        case("product options not a list", p.clone(), "/v1/products", 422, "invalid_request")
            .token(&manager)
            .json(json!({"product_id": "new", "name": "n", "options": {"size": ["S"]}})),
        case("product option twice", p.clone(), "/v1/products", 422, "invalid_request")
            .token(&manager)
            .json(json!({"product_id": "new", "name": "n",
                "options": [{"name": "size", "values": ["S"]}, {"name": "size", "values": ["M"]}]})),
        case("product option without values", p.clone(), "/v1/products", 422, "invalid_request")
            .token(&manager)
            .json(json!({"product_id": "new", "name": "n", "options": [{"name": "size", "values": []}]})),
        case("product option value twice", p.clone(), "/v1/products", 422, "invalid_request")
            .token(&manager)
            .json(json!({"product_id": "new", "name": "n", "options": [{"name": "size", "values": ["S", "S"]}]})),
        case("product with six options", p.clone(), "/v1/products", 422, "invalid_request")
            .token(&manager)
            .json(json!({"product_id": "new", "name": "n",
                "options": (0..6).map(|i| json!({"name": format!("o{i}"), "values": ["a"]})).collect::<Vec<_>>()})),
        case("product option with a stray member", p.clone(), "/v1/products", 422, "invalid_request")
            .token(&manager)
            .json(json!({"product_id": "new", "name": "n", "options": [{"name": "size", "values": ["S"], "x": 1}]})),
        case("product description too long", p.clone(), "/v1/products", 422, "invalid_request")
            .token(&manager)
            .json(json!({"product_id": "new", "name": "n", "description": "d".repeat(2001)})),
        // Product reads
        case("products limit zero", g.clone(), "/v1/products?limit=0", 422, "invalid_request"),
        case("products bad cursor", g.clone(), "/v1/products?cursor=zzz", 422, "invalid_request"),
        case("products cursor past 9999", g.clone(), "/v1/products?cursor=9223372036854775807.x", 422, "invalid_request"),
        case("skus cursor past 9999", g.clone(), "/v1/skus?cursor=9223372036854775807.tee", 422, "invalid_request")
            .token(&manager),
        case("products of a missing category", g.clone(), "/v1/products?category_id=ghost", 422, "unknown_category"),
        case("a missing product", g.clone(), "/v1/products/ghost", 404, "unknown_product"),
        case("an impossible product id", g.clone(), "/v1/products/a%20b", 404, "unknown_product"),
        // SKUs of products
        case("sku of a missing product", p.clone(), "/v1/skus", 422, "unknown_product")
            .token(&manager)
            .json(json!({"sku": "new", "name": "n", "price_cents": 1, "initial_stock": 1, "product_id": "ghost"})),
        case("sku with an option value not offered", p.clone(), "/v1/skus", 422, "invalid_request")
            .token(&manager)
            .json(shirt("new", json!({"size": "XXL"}))),
        case("sku missing an option", p.clone(), "/v1/skus", 422, "invalid_request")
            .token(&manager)
            .json(shirt("new", json!({}))),
        case("sku with options but no product", p.clone(), "/v1/skus", 422, "invalid_request")
            .token(&manager)
            .json(json!({"sku": "new", "name": "n", "price_cents": 1, "initial_stock": 1, "options": {"size": "S"}})),
        case("sku whose options another has", p.clone(), "/v1/skus", 409, "variant_exists")
            .token(&manager)
            .json(shirt("new", json!({"size": "S"}))),
        case("skus of a missing product", g.clone(), "/v1/skus?product_id=ghost", 422, "unknown_product").token(&manager),
        // GET /v1/audit
        case("audit as customer", g.clone(), "/v1/audit", 403, "forbidden").token(&carol_t),
        case("audit as manager", g.clone(), "/v1/audit", 403, "forbidden").token(&manager),
        case("audit without token", g.clone(), "/v1/audit", 401, "unauthorized"),
        case("audit limit zero", g.clone(), "/v1/audit?limit=0", 422, "invalid_request").token(&admin),
        case("audit bad cursor", g.clone(), "/v1/audit?cursor=x", 422, "invalid_request").token(&admin),
        case("audit actor too long", g.clone(), &format!("/v1/audit?actor={}", "a".repeat(201)), 422, "invalid_request")
            .token(&admin),
        // Admin bodies: a NUL in a name was a 500; a repeated key let the last one win.
        case("create sku with NUL in name", p.clone(), "/v1/skus", 422, "invalid_request")
            .token(&admin)
            .json(json!({"sku": "new", "name": "a\u{0}b", "price_cents": 1, "initial_stock": 1})),
        case("create sku with a repeated key", p.clone(), "/v1/skus", 400, "malformed")
            .token(&admin)
            .raw("application/json", r#"{"sku":"new","name":"n","price_cents":1,"initial_stock":1,"initial_stock":9}"#.into()),
        case("receive with a repeated key", p.clone(), "/v1/skus/tee/receive", 400, "malformed")
            .token(&admin)
            .raw("application/json", r#"{"qty":1,"qty":1000,"reference":"po-9"}"#.into()),
        // What axum and hyper answer by themselves is problem+json too.
        case("wrong method", Method::DELETE, o, 405, "method_not_allowed").token(&carol_t),
        case("made-up method", Method::from_bytes(b"BREW").unwrap(), "/v1/stock/tee", 405, "method_not_allowed"),
        case("path not UTF-8", g.clone(), "/v1/orders/%FF", 400, "bad_request").token(&carol_t),
        case("stock path not UTF-8", g.clone(), "/v1/stock/%FF%FE", 400, "bad_request"),
        case("no such endpoint", g.clone(), "/v1/nothing", 404, "not_found"),
        case("headers too large", g.clone(), "/v1/stock/tee", 431, "headers_too_large")
            .header("x-pad", &"a".repeat(9 * 1024)),
    ];

    let before = app.snapshot().await;
    let mut failures = Vec::new();
    for c in &cases {
        let r = send(&app, c).await;
        let problem = r.header("content-type") == Some("application/problem+json");
        if r.status != c.status || r.code() != c.code || !problem || r.body["status"] != c.status {
            failures.push(format!(
                "{}: wanted {} {}, got {} {:?}",
                c.name, c.status, c.code, r.status, r.body
            ));
        }
        if r.body["detail"].as_str().is_none_or(|d| d.is_empty()) {
            failures.push(format!("{}: no detail in {:?}", c.name, r.body));
        }
        let after = app.snapshot().await;
        if after != before {
            failures.push(format!("{} changed state:\n{before:?}\n{after:?}", c.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Extensions named in API.md.
    let r = send(&app, cases.iter().find(|c| c.name == "sold out").unwrap()).await;
    assert_eq!(
        (r.body["sku"].as_str(), r.body["available"].as_i64()),
        (Some("last-one"), Some(0))
    );
    let r = send(
        &app,
        cases.iter().find(|c| c.name == "unknown sku").unwrap(),
    )
    .await;
    assert_eq!(r.body["sku"], "ghost");
    let r = send(
        &app,
        cases
            .iter()
            .find(|c| c.name == "order before the sale starts")
            .unwrap(),
    )
    .await;
    assert_eq!(
        (r.body["sku"].as_str(), r.body["starts_at"].as_str()),
        (Some("windowed"), Some("2050-01-01T00:00:00Z"))
    );
    let r = send(
        &app,
        cases
            .iter()
            .find(|c| c.name == "order after the sale ended")
            .unwrap(),
    )
    .await;
    assert_eq!(
        (r.body["sku"].as_str(), r.body["ended_at"].as_str()),
        (Some("gone"), Some("2002-01-01T00:00:00Z"))
    );
    let r = send(
        &app,
        cases
            .iter()
            .find(|c| c.name == "write off more than is free")
            .unwrap(),
    )
    .await;
    // tee: 5, alice holds 2, dave's duo 1.
    assert_eq!(
        (r.body["sku"].as_str(), r.body["available"].as_i64()),
        (Some("tee"), Some(2))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_not_loaded_is_503_and_reserves_nothing() {
    let app = TestApp::spawn().await;
    app.create_sku("tee", 5, None).await;
    let mut r = app.redis.clone();
    // Every shard's gate (the SKU's is one of them).
    for (_, keys) in app.shards.iter() {
        let _: () = redis::cmd("DEL")
            .arg(keys.epoch())
            .query_async(&mut r)
            .await
            .unwrap();
    }
    let before = app.snapshot().await;
    let resp = app.order(&app.customer("zoe"), &[("tee", 1)], None).await;
    assert_eq!(resp.status, 503, "{resp:?}");
    assert_eq!(resp.code(), "unavailable");
    assert!(resp.header("retry-after").is_some());
    assert_eq!(app.get("/v1/stock/tee", None).await.status, 503);
    assert_eq!(app.snapshot().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_rate_limit_answers_429_with_retry_after() {
    let app = TestApp::spawn_with(Options {
        tweak: Box::new(|c| {
            c.rate_limit_per_sec = 1;
            c.rate_limit_burst = 2;
        }),
        ..Options::default()
    })
    .await;
    app.create_sku("tee", 100, None).await;
    let yan = app.customer("yan");
    // Back to back: the third comes well within the second it takes to earn a token
    // (waiting for the worker in between could outlast it on a slow cluster).
    assert_eq!(app.order(&yan, &[("tee", 1)], None).await.status, 202);
    assert_eq!(app.order(&yan, &[("tee", 1)], None).await.status, 202);
    let r = app.order(&yan, &[("tee", 1)], None).await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.code(), "rate_limited");
    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    app.wait_idle().await;
    // The refusal changed nothing: two orders, two units.
    assert_eq!(app.available("tee").await, Some(98));
    assert_eq!(app.scalar("SELECT count(*) FROM orders").await, 2);
    // Another user is not limited by yan's rate.
    assert_eq!(
        app.order(&app.customer("zed"), &[("tee", 1)], None)
            .await
            .status,
        202
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_catalog_round_trip() {
    let app = TestApp::spawn().await;
    let admin = app.admin();
    let created = app
        .post(
            "/v1/skus",
            Some(&admin),
            &json!({"sku": "hoodie", "name": "Hoodie", "price_cents": 4999, "initial_stock": 10, "per_user_limit": 1}),
        )
        .await;
    assert_eq!(created.status, 201, "{created:?}");
    assert_eq!(created.body["available"], 10);
    assert_eq!(created.body["per_user_limit"], 1);

    let recv = json!({"qty": 5, "reference": "po-77"});
    let r = app
        .post("/v1/skus/hoodie/receive", Some(&admin), &recv)
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        (r.body["on_hand"].as_i64(), r.body["available"].as_i64()),
        (Some(15), Some(15))
    );
    // A repeat of the same reference changes nothing.
    let r = app
        .post("/v1/skus/hoodie/receive", Some(&admin), &recv)
        .await;
    assert_eq!(
        (r.body["on_hand"].as_i64(), r.body["available"].as_i64()),
        (Some(15), Some(15))
    );
    assert_eq!(
        app.get("/v1/stock/hoodie", None).await.body["available"],
        15
    );
    let many = app.get("/v1/stock?skus=hoodie,ghost,no%20way", None).await;
    assert_eq!(
        many.body,
        json!({"stock": [{"sku": "hoodie", "available": 15}]})
    );

    assert_eq!(
        app.order(&app.customer("u1"), &[("hoodie", 1)], None)
            .await
            .status,
        202
    );
    app.wait_idle().await;
    // The ledger, newest first, paged.
    let page = app
        .get("/v1/skus/hoodie/movements?limit=2", Some(&admin))
        .await;
    let kinds: Vec<&str> = page.body["movements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["sale", "receive"]);
    let cursor = page.body["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let rest = app
        .get(
            &format!("/v1/skus/hoodie/movements?limit=2&cursor={cursor}"),
            Some(&admin),
        )
        .await;
    let m = rest.body["movements"].as_array().unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(
        (
            m[0]["kind"].as_str(),
            m[0]["qty"].as_i64(),
            m[0]["reference"].as_str()
        ),
        (Some("receive"), Some(10), Some("initial"))
    );
    assert!(rest.body["next_cursor"].is_null());
    let sku = app.get("/v1/skus/hoodie", Some(&admin)).await;
    assert_eq!(
        (
            sku.body["on_hand"].as_i64(),
            sku.body["sold"].as_i64(),
            sku.body["available"].as_i64()
        ),
        (Some(15), Some(1), Some(14))
    );
}
