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

/// Swagger UI loaded by the browser from a CDN, pinned to one release with Subresource
/// Integrity: a changed or tampered file is refused by the browser, not run on a page of
/// this origin. The hashes are of the files in the `swagger-ui-dist` 5.35.0 package, the
/// bytes the CDN serves (`npm pack swagger-ui-dist@5.35.0`, then
/// `openssl dgst -sha384 -binary FILE | base64`). The service itself serves only this
/// page and the spec.
pub async fn swagger_ui() -> Html<&'static str> {
    Html(
        r##"<!doctype html>
<html><head><meta charset="utf-8"><title>search-img API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.35.0/swagger-ui.css"
 integrity="sha384-WlYgdmXYOOBWL5apwjDEZwN+U3HmXSSu5R6V5aGxEcf7z+KuRNwBhoxKVN1i3D5I" crossorigin="anonymous"></head>
<body><div id="swagger-ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.35.0/swagger-ui-bundle.js"
 integrity="sha384-gjRm0bEPMeTmMh5jT2cHccIwCUZSTd8YC+j0d0sXw0MdGEfScduGpSyF3ZSSLkX9" crossorigin="anonymous"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>"##,
    )
}
