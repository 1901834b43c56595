//! `/openapi.json` and `/docs` (Swagger UI, as FastAPI served).

use axum::response::{Html, IntoResponse};
use axum::Json;

const SPEC: &str = include_str!("openapi.json");

pub async fn openapi() -> impl IntoResponse {
    let mut spec: serde_json::Value =
        serde_json::from_str(SPEC).expect("openapi.json is valid JSON");
    spec["info"]["version"] = env!("CARGO_PKG_VERSION").into();
    Json(spec)
}

/// Swagger UI loaded by the browser from a CDN; the service itself serves only this page
/// and the spec.
pub async fn swagger_ui() -> Html<&'static str> {
    Html(
        r##"<!doctype html>
<html><head><meta charset="utf-8"><title>search-img API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>"##,
    )
}
