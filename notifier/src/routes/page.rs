//! The live page, embedded in the binary: no build step, no files to deploy.

use super::AppState;
use axum::{Json, extract::State, http::header, response::IntoResponse};
use serde_json::json;

const INDEX: &str = include_str!("../../assets/index.html");
const SCRIPT: &str = include_str!("../../assets/app.js");
const STYLE: &str = include_str!("../../assets/app.css");

#[utoipa::path(get, path = "/", tag = "page", summary = "The live page",
    responses((status = 200, content_type = "text/html", body = String)))]
pub async fn index() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX,
    )
}

#[utoipa::path(get, path = "/assets/app.js", tag = "page", summary = "The live page's script",
    responses((status = 200, content_type = "text/javascript", body = String)))]
pub async fn script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        SCRIPT,
    )
}

#[utoipa::path(get, path = "/assets/app.css", tag = "page", summary = "The live page's style sheet",
    responses((status = 200, content_type = "text/css", body = String)))]
pub async fn style() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        STYLE,
    )
}

/// What the page needs to know about the deployment.
#[utoipa::path(get, path = "/config.json", tag = "page",
    summary = "Where the live page finds ingress",
    responses((status = 200, body = super::openapi::PageConfig)))]
pub async fn config(State(st): State<AppState>) -> impl IntoResponse {
    Json(json!({ "ingress_url": st.cfg.public_ingress_url }))
}
