//! Server-side request forgery, at the service's front door: with
//! `ALLOW_PRIVATE_IMAGE_HOSTS=false` (the default), `POST /api/v1/search/url` refuses every
//! spelling of an internal address with 400 and a `detail`, and nothing reaches the image
//! server on 127.0.0.1 that stands in for an internal service. Product photos on private
//! hosts are recorded as failed without being fetched.
//!
//! No traffic leaves loopback: URLs naming a non-loopback address are first shown to be
//! refused by `check_url`, the check the fetcher runs before any connection, and only then
//! sent to the service. The only host name used is `localhost` (resolved locally).

mod common;

use common::app::{product_doc, TestApp};
use common::*;
use search_img::fetch::{check_url, parse_url};
use serde_json::Value;

/// Spellings of loopback and of "this host" (0.0.0.0 and :: reach local services on
/// Linux), for the image server's port. Sending them is safe: they can only reach this
/// machine, and the test asserts they reach nothing.
fn loopback_urls(port: u16) -> Vec<String> {
    [
        "http://127.0.0.1:{p}/x.png",
        "https://127.0.0.1:{p}/x.png",
        "http://127.0.0.1.:{p}/x.png",
        "http://127.9.9.9:{p}/x.png",
        "http://2130706433:{p}/x.png",
        "http://0x7f000001:{p}/x.png",
        "http://0x7F.0.0.1:{p}/x.png",
        "http://0177.0.0.1:{p}/x.png",
        "http://00000177.0.0.01:{p}/x.png",
        "http://0x7f.1:{p}/x.png",
        "http://127.1:{p}/x.png",
        "http://127.0.1:{p}/x.png",
        "http://%31%32%37.0.0.1:{p}/x.png",
        "http://\u{ff11}\u{ff12}\u{ff17}.\u{ff10}.\u{ff10}.\u{ff11}:{p}/x.png",
        "http://[::1]:{p}/x.png",
        "http://[0:0:0:0:0:0:0:1]:{p}/x.png",
        "http://[::ffff:127.0.0.1]:{p}/x.png",
        "http://[::ffff:7f00:1]:{p}/x.png",
        "http://[0:0:0:0:0:ffff:127.0.0.1]:{p}/x.png",
        "http://[::127.0.0.1]:{p}/x.png",
        "http://[::ffff:0:127.0.0.1]:{p}/x.png",
        "http://localhost:{p}/x.png",
        "http://LOCALHOST:{p}/x.png",
        "http://localhost.:{p}/x.png",
        "http://good.com@127.0.0.1:{p}/x.png",
        "http://good.com:secret@127.0.0.1:{p}/x.png",
        "http://127.0.0.1:{p}\\@good.com/x.png",
        "http://127.0.0.1:{p}/x.png#@good.com",
        "http://127.0.0.1:{p}/x.png?@good.com",
        "http://0.0.0.0:{p}/x.png",
        "http://0:{p}/x.png",
        "http://[::]:{p}/x.png",
        "HTTP://127.0.0.1:{p}/x.png",
        " http://127.0.0.1:{p}/x.png ",
        "http://127.0.0.1:{p}/x.png\t",
    ]
    .iter()
    .map(|u| u.replace("{p}", &port.to_string()))
    .collect()
}

/// Internal addresses elsewhere: never contacted by this test (checked first).
const OTHER_PRIVATE_URLS: &[&str] = &[
    "http://169.254.169.254/latest/meta-data/",
    "http://169.254.169.254./latest/meta-data/iam/security-credentials/",
    "http://2852039166/latest/meta-data/",
    "http://0xa9fea9fe/latest/meta-data/",
    "http://0251.0376.0251.0376/latest/meta-data/",
    "http://169.254.43518/latest/meta-data/",
    "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "http://[::ffff:a9fe:a9fe]/latest/meta-data/",
    "http://[64:ff9b::169.254.169.254]/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://metadata@169.254.169.254/computeMetadata/v1/",
    "http://10.0.0.1/",
    "http://10.255.255.255:8080/admin",
    "http://172.16.0.1/",
    "http://172.31.255.254/",
    "http://192.168.0.1/",
    "http://192.168.1.1:8443/",
    "http://100.64.0.1/",
    "http://100.127.255.254/",
    "http://224.0.0.1/",
    "http://239.255.255.250:1900/",
    "http://255.255.255.255/",
    "http://192.0.0.8/",
    "http://198.18.0.1/",
    "http://240.0.0.1/",
    "http://[fc00::1]/",
    "http://[fd12:3456:789a::1]/",
    "http://[fe80::1]/",
    "http://[ff02::1]/",
    "http://[::ffff:10.0.0.1]/",
    "http://[::ffff:192.168.0.1]/",
    "http://[2001:db8::1]/",
];

/// Not http(s), or not a URL at all.
fn other_scheme_urls(port: u16) -> Vec<String> {
    [
        "file:///etc/passwd",
        "file://localhost/etc/passwd",
        "FILE:///etc/passwd",
        "ftp://127.0.0.1:{p}/x.png",
        "gopher://127.0.0.1:{p}/_GET%20/x.png",
        "dict://127.0.0.1:{p}/info",
        "ldap://127.0.0.1:{p}/",
        "sftp://127.0.0.1:{p}/",
        "tftp://127.0.0.1:{p}/x.png",
        "ws://127.0.0.1:{p}/x.png",
        "jar:http://127.0.0.1:{p}/x.zip!/x.png",
        "data:image/png;base64,iVBORw0KGgo=",
        "javascript:alert(1)",
        "//127.0.0.1:{p}/x.png",
        "127.0.0.1:{p}/x.png",
        "/etc/passwd",
        "http://",
        "http:///x.png",
    ]
    .iter()
    .map(|u| u.replace("{p}", &port.to_string()))
    .collect()
}

async fn refused(app: &TestApp, url: &str) {
    // As query parameters...
    let (code, body) = app.search_url(url, "").await;
    assert_eq!(code, 400, "{url:?}: {body}");
    let detail = body["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("{url:?}: no detail in {body}"));
    assert!(!detail.is_empty());
    // ...and as a JSON body.
    let r = app
        .http
        .post(app.url("/api/v1/search/url"))
        .json(&serde_json::json!({ "image_url": url, "top_k": 5 }))
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!(code, 400, "{url:?} (JSON body): {body}");
    assert!(body["detail"].is_string(), "{url:?}: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_addresses_are_refused_in_every_spelling() {
    if !common::netns::loopback_only() {
        return;
    }
    let app = TestApp::start(&[("ALLOW_PRIVATE_IMAGE_HOSTS", "false")]).await;
    app.images.put("x.png", photo_bytes("chelsea.png"));
    let port = app.images.addr().port();

    for url in loopback_urls(port) {
        refused(&app, &url).await;
    }
    for url in OTHER_PRIVATE_URLS {
        let parsed = parse_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        assert!(
            check_url(&parsed, false).is_err(),
            "{url} would be contacted: not sending it"
        );
        refused(&app, url).await;
    }
    for url in other_scheme_urls(port) {
        refused(&app, &url).await;
    }
    // Some details, as the sender reads them.
    let (_, body) = app
        .search_url(&format!("http://2130706433:{port}/x.png"), "")
        .await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("private or reserved address"),
        "{body}"
    );
    // The detail names neither the host nor what it resolves to (internal names).
    for host in ["localhost", "127.0.0.1", "[::1]", "2130706433"] {
        let (_, body) = app
            .search_url(&format!("http://{host}:{port}/x.png"), "")
            .await;
        let detail = body["detail"].as_str().unwrap();
        for leak in ["localhost", "127.", "::1", "2130706433", "->"] {
            assert!(!detail.contains(leak), "{host}: {detail}");
        }
    }
    let (_, body) = app.search_url("file:///etc/passwd", "").await;
    assert!(
        body["detail"].as_str().unwrap().contains("scheme"),
        "{body}"
    );

    assert_eq!(
        app.images.total_hits(),
        0,
        "a refused URL reached the server"
    );
    let total =
        loopback_urls(port).len() + OTHER_PRIVATE_URLS.len() + other_scheme_urls(port).len();
    println!("{total} URL forms refused, each as a query parameter and as a JSON body");
}

/// Product photos on private hosts are not fetched either: each is recorded as failed
/// (and retried later, still without a fetch while the setting is off); searches work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_product_images_are_recorded_as_failed_not_fetched() {
    if !common::netns::loopback_only() {
        return;
    }
    // The catalogue's photos are served from 127.0.0.1.
    let app = TestApp::start(&[("ALLOW_PRIVATE_IMAGE_HOSTS", "false")]).await;
    let port = app.images.addr().port();
    let extra = [
        (
            "Metadata",
            "http://169.254.169.254/latest/meta-data/".to_string(),
        ),
        (
            "Decimal loopback",
            format!("http://2130706433:{port}/chelsea.png"),
        ),
        ("Localhost", format!("http://localhost:{port}/chelsea.png")),
        ("Local file", "file:///etc/passwd".to_string()),
    ];
    for (name, url) in &extra {
        if let Ok(parsed) = parse_url(url) {
            if parsed.scheme().starts_with("http") && !url.contains(&port.to_string()) {
                assert!(check_url(&parsed, false).is_err(), "{url}");
            }
        }
        app.products()
            .insert_one(product_doc(name, url))
            .await
            .unwrap();
    }
    let (code, body) = app
        .search_upload(photo_bytes("chelsea.png"), "top_k=50&threshold=0")
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body, Value::Array(vec![]), "nothing could be indexed");
    let status = app.status().await;
    let all = common::app::CATALOGUE.len() + extra.len();
    assert_eq!(status["failed_products"], all, "{status}");
    assert_eq!(status["products_with_features"], 0, "{status}");
    // The reason is stored with each failure.
    let failures = app
        .embedding_docs(mongodb::bson::doc! { "status": "failed" })
        .await;
    assert_eq!(failures.len(), all);
    let text = format!("{failures:?}");
    assert!(text.contains("private or reserved address"), "{text}");
    assert!(text.contains("scheme"), "{text}");
    // A refresh retries nothing that is not due, and fetches nothing.
    let (code, report) = app.refresh().await;
    assert_eq!(code, 200, "{report}");
    assert_eq!(
        app.images.total_hits(),
        0,
        "a private product photo was fetched"
    );
}
