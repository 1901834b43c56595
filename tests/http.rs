//! The HTTP layer in-process, through `tower::ServiceExt::oneshot` on `app()`: error
//! shapes, parameter validation, body limits, the admin token, CORS, the docs and the
//! OpenAPI document against the handlers. Nothing here reaches MongoDB or loads the
//! model (the driver connects lazily; MONGO_URI points at a port nobody listens on), so
//! no server process is started.

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use http_body_util::BodyExt;
use search_img::config::Config;
use search_img::service::AppState;
use std::collections::BTreeSet;

use serde_json::{json, Value};
use tower::ServiceExt;

async fn app(extra: &[(&str, &str)]) -> axum::Router {
    let mut vars = vec![
        ("MONGO_URI".to_string(), "mongodb://127.0.0.1:9".to_string()),
        ("MONGO_TIMEOUT_SECS".to_string(), "1".to_string()),
    ];
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let state = AppState::new(Config::from_vars(vars).unwrap())
        .await
        .unwrap();
    search_img::http::app(state)
}

/// Status, headers and the JSON body (panics unless the body is JSON).
async fn send(app: axum::Router, req: Request<Body>) -> (StatusCode, header::HeaderMap, Value) {
    let resp = app.oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let ct = parts
        .headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    assert!(
        ct.starts_with("application/json"),
        "{} answered {ct:?}: {:?}",
        parts.status,
        String::from_utf8_lossy(&bytes)
    );
    let json = serde_json::from_slice(&bytes).unwrap();
    (parts.status, parts.headers, json)
}

fn detail(body: &Value) -> &str {
    body["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("no detail in {body}"))
}

#[tokio::test]
async fn wrong_methods_get_json_405_with_allow() {
    for (method, path, allowed) in [
        (Method::GET, "/api/v1/search/url", "POST"),
        (Method::DELETE, "/api/v1/refresh", "POST"),
        (Method::POST, "/api/v1/health", "GET"),
        (Method::PUT, "/api/v1/search/image", "POST"),
        (Method::POST, "/api/v1/status", "GET"),
    ] {
        let req = Request::builder()
            .method(method.clone())
            .uri(path)
            .body(Body::empty())
            .unwrap();
        let (status, headers, body) = send(app(&[]).await, req).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        let allow = headers[header::ALLOW].to_str().unwrap();
        assert!(allow.contains(allowed), "{method} {path}: Allow {allow}");
        assert!(detail(&body).contains(method.as_str()), "{body}");
    }
}

#[tokio::test]
async fn unknown_paths_get_json_404() {
    let req = Request::get("/no/such/path").body(Body::empty()).unwrap();
    let (status, _, body) = send(app(&[]).await, req).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(detail(&body), "Not Found");
}

#[tokio::test]
async fn a_declared_length_over_the_limit_is_refused_before_reading() {
    // The body never comes: the answer must not wait for it.
    let never = Body::from_stream(futures::stream::pending::<
        Result<bytes::Bytes, std::io::Error>,
    >());
    let req = Request::post("/api/v1/search/image")
        .header(header::CONTENT_TYPE, "multipart/form-data; boundary=X")
        .header(header::CONTENT_LENGTH, "50000000")
        .body(never)
        .unwrap();
    let answer = send(app(&[("MAX_IMAGE_BYTES", "1000000")]).await, req);
    let (status, _, body) = tokio::time::timeout(std::time::Duration::from_secs(5), answer)
        .await
        .expect("answered without reading the body");
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(detail(&body).contains("1065536"), "{body}");
}

#[tokio::test]
async fn a_json_body_over_the_limit_gets_json_413() {
    let big = format!("{{\"image_url\": \"{}\"}}", "a".repeat(200_000));
    for declared in [true, false] {
        let mut req =
            Request::post("/api/v1/search/url").header(header::CONTENT_TYPE, "application/json");
        let body = if declared {
            req = req.header(header::CONTENT_LENGTH, big.len());
            Body::from(big.clone())
        } else {
            // Chunked: only the reading finds out.
            let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = big
                .as_bytes()
                .chunks(16 * 1024)
                .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
                .collect();
            req = req.header(header::TRANSFER_ENCODING, "chunked");
            Body::from_stream(futures::stream::iter(chunks))
        };
        let (status, _, body) = send(app(&[]).await, req.body(body).unwrap()).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "declared={declared}");
        assert!(detail(&body).contains("larger than"), "{body}");
    }
}

#[tokio::test]
async fn a_body_that_fails_mid_way_gets_json_400() {
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = vec![
        Ok(bytes::Bytes::from_static(b"{\"image_url\": ")),
        Err(std::io::Error::other("invalid chunk size")),
    ];
    let req = Request::post("/api/v1/search/url")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::TRANSFER_ENCODING, "chunked")
        .body(Body::from_stream(futures::stream::iter(chunks)))
        .unwrap();
    let (status, _, body) = send(app(&[]).await, req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(detail(&body).contains("could not be read"), "{body}");
}

#[tokio::test]
async fn extractor_rejections_are_json() {
    // Not multipart at all.
    let req = Request::post("/api/v1/search/image")
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from("hello"))
        .unwrap();
    let (status, _, body) = send(app(&[]).await, req).await;
    assert!(status.is_client_error(), "{status}");
    assert!(detail(&body).contains("multipart"), "{body}");
    // A query string that is not one.
    let req = Request::post("/api/v1/search/url?top_k=%ZZ")
        .body(Body::empty())
        .unwrap();
    let (status, _, body) = send(app(&[]).await, req).await;
    assert!(status.is_client_error(), "{status}");
    assert!(!detail(&body).is_empty());
}

#[tokio::test]
async fn refresh_needs_the_admin_token_when_one_is_set() {
    let cases = [
        (None, StatusCode::UNAUTHORIZED),
        (Some("Basic czNjcmV0"), StatusCode::UNAUTHORIZED),
        (Some("Bearer wrong"), StatusCode::FORBIDDEN),
        (Some("Bearer s3cret-but-longer"), StatusCode::FORBIDDEN),
    ];
    for (auth, want) in cases {
        let mut req = Request::post("/api/v1/refresh");
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        let app = app(&[("ADMIN_TOKEN", "s3cret")]).await;
        let (status, headers, body) = send(app, req.body(Body::empty()).unwrap()).await;
        assert_eq!(status, want, "{auth:?}: {body}");
        assert!(!detail(&body).contains("s3cret"), "{body}");
        if want == StatusCode::UNAUTHORIZED {
            assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
        }
    }
}

/// Every script and stylesheet /docs loads from elsewhere is pinned to an exact version
/// and carries an integrity hash.
#[tokio::test]
async fn docs_pin_their_assets_with_integrity_hashes() {
    let resp = app(&[])
        .await
        .oneshot(Request::get("/docs").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let html = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let tags: Vec<&str> = html
        .split('<')
        .filter(|t| t.starts_with("script src=") || t.starts_with("link rel=\"stylesheet\""))
        .collect();
    assert_eq!(tags.len(), 2, "{html}");
    for tag in tags {
        assert!(tag.contains("integrity=\"sha384-"), "{tag}");
        assert!(tag.contains("crossorigin=\"anonymous\""), "{tag}");
        assert!(
            tag.contains("swagger-ui-dist@5.35.0/"),
            "not an exact version: {tag}"
        );
    }
}

fn post(uri: &str, content_type: &str, body: &'static str) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(body))
        .unwrap()
}

/// A multipart body with one text field `name`.
fn multipart_without_file(name: &str) -> Request<Body> {
    let body =
        format!("--XyZ\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\nx\r\n--XyZ--\r\n");
    Request::post("/api/v1/search/image")
        .header(header::CONTENT_TYPE, "multipart/form-data; boundary=XyZ")
        .body(Body::from(body))
        .unwrap()
}

#[tokio::test]
async fn bad_parameters_get_422_with_a_detail() {
    let app = app(&[]).await;
    let img = "image_url=http%3A%2F%2F127.0.0.1%3A9%2Fchelsea.png";
    for params in [
        "&top_k=0",
        "&top_k=51",
        "&top_k=abc",
        "&top_k=2.5",
        "&threshold=-0.1",
        "&threshold=1.5",
        "&threshold=nan",
        "&min_price=abc",
        "&max_price=",
        "&min_price=10&max_price=5",
        "&category=",
        "&category=a,,b",
        "&category=a&category=%20",
    ] {
        let uri = format!("/api/v1/search/url?{img}{params}");
        let req = Request::post(uri).body(Body::empty()).unwrap();
        let (status, _, body) = send(app.clone(), req).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{params}: {body}");
        assert!(!detail(&body).is_empty());
    }
    for body in [
        "",
        "{\"top_k\": 3}",
        "{not json",
        "[1,2]",
        "{\"image_url\": 5}",
        "{\"image_url\": \"http://127.0.0.1:9/a.png\", \"category\": []}",
        "{\"image_url\": \"http://127.0.0.1:9/a.png\", \"category\": [\"a\", 5]}",
        "{\"image_url\": \"http://127.0.0.1:9/a.png\", \"min_price\": \"cheap\"}",
        "{\"image_url\": \"http://127.0.0.1:9/a.png\", \"min_price\": 3, \"max_price\": 2}",
    ] {
        let req = post("/api/v1/search/url", "application/json", body);
        let (status, _, v) = send(app.clone(), req).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {v}");
        assert!(!detail(&v).is_empty());
    }
    // Upload without the `file` field, and not multipart at all.
    let (status, _, v) = send(app.clone(), multipart_without_file("other")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(detail(&v).contains("file"), "{v}");
    let req = post("/api/v1/search/image", "text/plain", "x");
    let (status, _, v) = send(app, req).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(!detail(&v).is_empty());
}

#[tokio::test]
async fn cors_preflight_root_and_docs() {
    let app = app(&[]).await;
    let preflight = Request::builder()
        .method(Method::OPTIONS)
        .uri("/api/v1/search/url")
        .header("Origin", "https://shop.example")
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "content-type")
        .body(Body::empty())
        .unwrap();
    let resp = app.clone().oneshot(preflight).await.unwrap();
    assert!(resp.status().is_success());
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
    let (status, _, root) = send(app.clone(), Request::get("/").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(root["name"], "search-img");
    assert!(root["endpoints"].is_object());
    let resp = app
        .oneshot(Request::get("/docs").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let html = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&html).contains("/openapi.json"));
}

/// `{"$ref": "#/components/..."}` (or an `allOf` of one) resolved in `spec`.
fn resolve<'a>(spec: &'a Value, v: &'a Value) -> &'a Value {
    let v = v["allOf"].get(0).unwrap_or(v);
    match v["$ref"].as_str() {
        Some(r) => {
            let mut at = spec;
            for part in r.trim_start_matches("#/").split('/') {
                at = &at[part];
            }
            assert!(!at.is_null(), "dangling {r}");
            resolve(spec, at)
        }
        None => v,
    }
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map_or(BTreeSet::new(), |m| m.keys().cloned().collect())
}

/// The schema's properties are exactly the value's fields, nested objects included.
fn same_fields(spec: &Value, schema: &Value, value: &Value, at: &str) {
    let schema = resolve(spec, schema);
    let props = &schema["properties"];
    assert_eq!(
        keys(props),
        keys(value),
        "{at}: the document against the handler"
    );
    for (name, v) in value.as_object().unwrap() {
        let prop = resolve(spec, &props[name]);
        if v.is_object() && prop["properties"].is_object() {
            same_fields(spec, prop, v, &format!("{at}.{name}"));
        }
    }
}

/// The OpenAPI document is hand-written, so this checks it against the handlers: the
/// same routes (each one served), the same parameters (each one read: a bad value gets
/// a 422 that names it), and the same fields in every response body.
#[tokio::test]
async fn the_openapi_document_matches_the_handlers() {
    let app = app(&[("ADMIN_TOKEN", "s3cret")]).await;
    let req = Request::get("/openapi.json").body(Body::empty()).unwrap();
    let (status, _, spec) = send(app.clone(), req).await;
    assert_eq!(status, StatusCode::OK);

    let documented: BTreeSet<(String, String)> = spec["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            keys(ops)
                .into_iter()
                .filter(|m| ["get", "post", "put", "delete", "patch"].contains(&m.as_str()))
                .map(move |m| (m, path.clone()))
        })
        .collect();
    let routes: BTreeSet<(String, String)> = search_img::http::API_ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, routes);
    for (method, path) in &routes {
        let req = Request::builder()
            .method(method.to_uppercase().as_str())
            .uri(path)
            .body(Body::empty())
            .unwrap();
        let status = app.clone().oneshot(req).await.unwrap().status();
        assert!(
            status != StatusCode::NOT_FOUND && status != StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}: {status}"
        );
    }

    for (method, path, read) in [
        (
            "post",
            "/api/v1/search/url",
            search_img::http::URL_PARAMETERS,
        ),
        (
            "post",
            "/api/v1/search/image",
            search_img::http::UPLOAD_PARAMETERS,
        ),
        (
            "get",
            "/api/v1/products/{id}/similar",
            search_img::http::SIMILAR_PARAMETERS,
        ),
    ] {
        let op = &spec["paths"][path][method];
        let params: BTreeSet<String> = op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| resolve(&spec, p))
            .filter(|p| p["in"] != "path")
            .map(|p| {
                assert_eq!(p["in"], "query", "{path}: {p}");
                p["name"].as_str().unwrap().to_string()
            })
            .collect();
        let read: BTreeSet<String> = read.iter().map(|s| s.to_string()).collect();
        assert_eq!(params, read, "{path}: parameters");
        let path = path.replace("{id}", "65a1f0c2e4b0a1b2c3d4e5f6");
        for name in &read {
            // A blank value is invalid for each of them.
            let uri = format!("{path}?{name}=%20");
            let req = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(uri)
                .body(Body::empty())
                .unwrap();
            let (status, _, body) = send(app.clone(), req).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{path} {name}");
            assert!(
                detail(&body).contains(name.as_str()),
                "{path} {name}: {body}"
            );
        }
    }
    let body = &spec["paths"]["/api/v1/search/url"]["post"]["requestBody"]["content"]
        ["application/json"]["schema"];
    let fields: BTreeSet<String> = search_img::http::URL_PARAMETERS
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(
        keys(&body["properties"]),
        fields,
        "the JSON body of /search/url"
    );

    let schema = |name: &str| json!({ "$ref": format!("#/components/schemas/{name}") });
    let product: Value = search_img::config::Config::defaults()
        .catalog
        .product_fields
        .iter()
        .map(|f| (f.clone(), Value::Null))
        .collect::<serde_json::Map<_, _>>()
        .into();
    let result = search_img::search::SearchResult {
        product,
        similarity_score: 0.5,
        rank: 1,
        matched_image: "http://127.0.0.1/a.jpg".into(),
    };
    let responses = [
        ("Result", serde_json::to_value(result).unwrap()),
        (
            "Health",
            serde_json::to_value(search_img::http::HealthReport {
                detail: Some("down"),
                ..Default::default()
            })
            .unwrap(),
        ),
        (
            "Status",
            serde_json::to_value(search_img::service::Status {
                model: Some(search_img::encoder::ModelIdentity {
                    name: "m".into(),
                    dim: 2,
                    sha256: "00".into(),
                }),
                ..Default::default()
            })
            .unwrap(),
        ),
        (
            "RefreshReport",
            serde_json::to_value(search_img::http::RefreshReport::default()).unwrap(),
        ),
        (
            "RefreshAccepted",
            serde_json::to_value(search_img::http::RefreshAccepted::default()).unwrap(),
        ),
    ];
    for (name, value) in responses {
        same_fields(&spec, &schema(name), &value, name);
    }
    // Each of those schemas is what its route answers.
    let answers = |path: &str, method: &str, code: &str| {
        let response = resolve(&spec, &spec["paths"][path][method]["responses"][code]);
        let s = &response["content"]["application/json"]["schema"];
        let s = if s["type"] == "array" { &s["items"] } else { s };
        s["$ref"]
            .as_str()
            .unwrap_or_default()
            .rsplit('/')
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(answers("/api/v1/search/url", "post", "200"), "Result");
    assert_eq!(answers("/api/v1/search/image", "post", "200"), "Result");
    assert_eq!(answers("/api/v1/health", "get", "200"), "Health");
    assert_eq!(answers("/api/v1/health", "get", "503"), "Health");
    assert_eq!(answers("/api/v1/status", "get", "200"), "Status");
    assert_eq!(answers("/api/v1/refresh", "post", "200"), "RefreshReport");
    assert_eq!(answers("/api/v1/refresh", "post", "202"), "RefreshAccepted");
}
