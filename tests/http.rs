//! The HTTP layer in-process, through `tower::ServiceExt::oneshot` on `app()`: error
//! shapes, body limits and the admin token. Nothing here reaches MongoDB or loads the
//! model (the driver connects lazily; MONGO_URI points at a port nobody listens on), so
//! no server process is started.

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use http_body_util::BodyExt;
use search_img::config::Config;
use search_img::service::AppState;
use serde_json::Value;
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
