//! Outages, in process: MongoDB stopped during searches and during indexing, image
//! hosts that are down, slow or failing. The service answers every request (503 with a
//! `detail` while the database is away), never panics, and recovers by itself.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use common::app::{product_doc, TestApp, CATALOGUE};
use common::*;
use mongodb::bson::doc;
use serde_json::Value;

/// Panics raised outside the tests' own code (in the service or its dependencies).
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn record_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_tests = info
                .location()
                .is_some_and(|l| l.file().starts_with("tests/"));
            if !in_tests {
                PANICS
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(info.to_string());
            }
            previous(info);
        }));
    });
}

fn assert_no_panics() {
    let p = PANICS.lock().unwrap_or_else(|p| p.into_inner());
    assert!(p.is_empty(), "the service panicked: {p:#?}");
}

/// Polls `path` until it answers `code`; how long that took.
async fn until_status(app: &TestApp, path: &str, code: u16, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let (c, body) = app.get(path).await;
        if c == code {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < limit,
            "{path} still {c} after {limit:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The test app, with room for debug-build decoding on a loaded machine (the decode
/// deadline is not what these tests are about).
async fn start(extra: &[(&str, &str)]) -> TestApp {
    let mut vars = vec![("DECODE_TIMEOUT_SECS", "120")];
    vars.extend_from_slice(extra);
    TestApp::start(&vars).await
}

fn is_detail_503(code: u16, body: &Value) -> bool {
    code == 503 && body["detail"].as_str().is_some_and(|d| !d.is_empty())
}

/// One search answer seen by a client.
struct Seen {
    sent: Instant,
    done: Instant,
    code: u16,
    body: Value,
}

/// MongoDB stopped while clients search continuously: health turns `disconnected` with
/// 503, every search gets either results or a 503 with a `detail` (no other status, no
/// dropped connection), and once MongoDB is back both recover without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_stopped_during_searches_gives_503s_then_recovers_by_itself() {
    record_panics();
    let app = start(&[]).await;
    let (code, body) = app
        .search_upload(photo_bytes("coffee.png"), "top_k=1")
        .await;
    assert_eq!(code, 200, "{body}");
    until_status(&app, "/api/v1/health", 200, Duration::from_secs(5)).await;

    // Four clients searching in a loop, by upload and by URL.
    let app = Arc::new(tokio::sync::RwLock::new(app));
    let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (base, images) = {
        let a = app.read().await;
        let urls: Vec<String> = CATALOGUE.iter().map(|(_, f)| a.images.url(f)).collect();
        (a.base.clone(), urls)
    };
    let queries: Vec<Vec<u8>> = ["chelsea.png", "rocket.jpg"]
        .iter()
        .map(|f| jpeg(&photo(f), 80))
        .collect();
    let mut clients = Vec::new();
    for c in 0..4 {
        let (seen, stop, base, images, queries) = (
            seen.clone(),
            stop.clone(),
            base.clone(),
            images.clone(),
            queries.clone(),
        );
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .no_proxy()
                .build()
                .unwrap();
            let mut n = c;
            while !stop.load(Ordering::Relaxed) {
                let req = if n % 2 == 0 {
                    http.post(format!(
                        "{base}/api/v1/search/url?top_k=3&image_url={}",
                        common::app::urlencode(&images[n % images.len()])
                    ))
                } else {
                    let form = reqwest::multipart::Form::new().part(
                        "file",
                        reqwest::multipart::Part::bytes(queries[n % queries.len()].clone())
                            .file_name("q.jpg"),
                    );
                    http.post(format!("{base}/api/v1/search/image?top_k=3"))
                        .multipart(form)
                };
                let sent = Instant::now();
                let r = req.send().await.expect("every search gets an answer");
                let code = r.status().as_u16();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                seen.lock().unwrap().push(Seen {
                    sent,
                    done: Instant::now(),
                    code,
                    body,
                });
                n += 1;
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    app.write().await.mongo.stop().await;
    let stopped = Instant::now();
    let to_disconnected = {
        let a = app.read().await;
        until_status(&a, "/api/v1/health", 503, Duration::from_secs(10)).await
    };
    let (_, body) = app.read().await.get("/api/v1/health").await;
    assert_eq!(body["database"], "disconnected", "{body}");
    assert_eq!(body["status"], "unhealthy");
    assert!(body["detail"].is_string());
    // Health answers at once while the database is away (it never waits on it).
    let t = Instant::now();
    let (code, _) = app.read().await.get("/api/v1/health").await;
    let health_down_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(code, 503);
    // Let the clients run into the outage for a while.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let restarting = Instant::now();
    app.write().await.mongo.restart().await;
    let restarted = Instant::now();
    let to_connected = {
        let a = app.read().await;
        until_status(&a, "/api/v1/health", 200, Duration::from_secs(15)).await
    };
    // Searches recover by themselves: wait for the clients' first success after restart.
    let t = Instant::now();
    loop {
        let ok = seen
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.sent > restarted && s.code == 200);
        if ok {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "searches never recovered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let search_recovered = restarted.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let mut by_code: HashMap<u16, usize> = HashMap::new();
    for s in &seen {
        *by_code.entry(s.code).or_default() += 1;
        match s.code {
            200 => assert!(s.body.is_array(), "{}", s.body),
            _ => assert!(
                is_detail_503(s.code, &s.body),
                "only results or 503 with a detail: {} {}",
                s.code,
                s.body
            ),
        }
    }
    // A search sent once the outage was visible and answered before MongoDB was started
    // again cannot have succeeded (one still waiting when it is back may)...
    let down_from = stopped + to_disconnected;
    let during: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.sent >= down_from && s.done <= restarting)
        .collect();
    assert!(!during.is_empty(), "no search ran during the outage");
    for s in &during {
        assert_eq!(
            s.code,
            503,
            "sent {:?} after the stop, answered {:?} after it: {}",
            s.sent - stopped,
            s.done - stopped,
            s.body
        );
    }
    // ...and everything sent after recovery succeeded.
    let after: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.sent >= restarted + search_recovered)
        .collect();
    assert!(after.iter().all(|s| s.code == 200));
    let slowest_503 = seen
        .iter()
        .filter(|s| s.code == 503)
        .map(|s| s.done - s.sent)
        .max()
        .unwrap_or_default();
    println!(
        "MongoDB stopped during searches: {} searches ({by_code:?}), {} during the outage, \
         slowest 503 {slowest_503:?}; health disconnected {to_disconnected:?} after the stop \
         (answering in {health_down_ms:.1} ms while down), connected {to_connected:?} after the \
         restart, searches succeeding again {search_recovered:?} after it",
        seen.len(),
        during.len()
    );
    let app = app.read().await;
    let (code, body) = app
        .search_upload(photo_bytes("coffee.png"), "top_k=1")
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(app.names(&body), ["Espresso cup"]);
    assert_no_panics();
}

/// Small photos for extra products: crops of the test photos.
fn crops(n: usize) -> Vec<Vec<u8>> {
    let bases: Vec<image::RgbImage> = CATALOGUE.iter().map(|(_, f)| photo(f)).collect();
    (0..n)
        .map(|i| {
            let b = &bases[i % bases.len()];
            let side = b.width().min(b.height()) / 2;
            let off = (i as u32 * 31) % side;
            let crop = image::imageops::crop_imm(b, off, off / 2, side, side).to_image();
            jpeg(
                &image::imageops::resize(&crop, 96, 96, image::imageops::FilterType::Nearest),
                85,
            )
        })
        .collect()
}

async fn count_current(app: &TestApp) -> u64 {
    app.embeddings()
        .count_documents(doc! { "status": "ok" })
        .await
        .unwrap()
}

/// MongoDB stopped in the middle of an index pass: the refresh answers 503 with a
/// `detail`, health and searches say the database is away, and after MongoDB returns the
/// next pass embeds exactly what was not stored yet; every stored document is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_stopped_during_indexing_then_the_next_pass_completes_it() {
    record_panics();
    let mut app = start(&[
        ("LAZY_LOAD_MODEL", "false"),
        ("INDEX_FETCH_CONCURRENCY", "2"),
    ])
    .await;
    const EXTRA: usize = 60;
    let products = app.products();
    for (i, bytes) in crops(EXTRA).into_iter().enumerate() {
        let path = format!("extra/{i}.jpg");
        app.images.put(&path, bytes);
        app.images.delay(&path, Duration::from_millis(60));
        products
            .insert_one(product_doc(&format!("Extra {i}"), &app.images.url(&path)))
            .await
            .unwrap();
    }
    let total = CATALOGUE.len() + EXTRA;
    let refresh = tokio::spawn({
        let (http, url) = (app.http.clone(), app.url("/api/v1/refresh"));
        async move {
            let r = http
                .post(url)
                .send()
                .await
                .expect("the refresh is answered");
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    });
    let t = Instant::now();
    while count_current(&app).await < 10 {
        assert!(t.elapsed() < Duration::from_secs(60), "indexing too slow");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.mongo.stop().await;
    let (code, body) = tokio::time::timeout(Duration::from_secs(30), refresh)
        .await
        .expect("the refresh fails within bounded time")
        .unwrap();
    assert!(is_detail_503(code, &body), "refresh: {code} {body}");
    until_status(&app, "/api/v1/health", 503, Duration::from_secs(10)).await;
    let (code, body) = app.search_upload(photo_bytes("coffee.png"), "").await;
    assert!(is_detail_503(code, &body), "search: {code} {body}");
    let (code, body) = app.get("/api/v1/status").await;
    assert!(is_detail_503(code, &body), "status: {code} {body}");

    app.mongo.restart().await;
    until_status(&app, "/api/v1/health", 200, Duration::from_secs(15)).await;
    let stored = count_current(&app).await as usize;
    assert!(stored < total, "the stop came too late");
    let (code, report) = app.refresh().await;
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["indexed_products"], total, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(
        report["embedded"].as_u64().unwrap() as usize,
        total - stored,
        "{report}"
    );
    println!(
        "MongoDB stopped during indexing: {stored} of {total} stored before the stop, \
         the next pass embedded {}",
        report["embedded"]
    );
    let docs = app.embedding_docs(doc! {}).await;
    assert_eq!(docs.len(), total);
    for d in &docs {
        for f in [
            "product",
            "image_url",
            "model",
            "dim",
            "vector",
            "status",
            "updated_at",
        ] {
            assert!(d.contains_key(f), "incomplete: {d}");
        }
    }
    let (code, body) = app
        .search_upload(photo_bytes("coffee.png"), "top_k=1")
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(app.names(&body), ["Espresso cup"]);
    assert_no_panics();
}

fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Image hosts that refuse connections, hang past FETCH_TIMEOUT_SECS, or answer 500, 503
/// or 429 while indexing: those products are skipped (the search answers with the
/// rest), not retried on every search, and indexed once RETRY_FAILED_AFTER_SECS has
/// passed and their hosts work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_image_hosts_are_skipped_then_retried_later() {
    record_panics();
    let retry_after = 4;
    let app = start(&[
        ("FETCH_TIMEOUT_SECS", "2"),
        ("FETCH_CONNECT_TIMEOUT_SECS", "2"),
        ("RETRY_FAILED_AFTER_SECS", &retry_after.to_string()),
    ])
    .await;
    // The good products first, so only the failing hosts are in question below.
    app.state.indexer().pass_now().await.unwrap();
    let down_port = closed_port();
    let down_url = format!("http://127.0.0.1:{down_port}/down.jpg");
    let bad: Vec<(&str, String)> = vec![
        ("Down host", down_url.clone()),
        ("Slow host", app.images.url("slow.jpg")),
        ("Erroring host", app.images.url("e500.jpg")),
        ("Unavailable host", app.images.url("e503.jpg")),
        ("Rate-limited host", app.images.url("e429.jpg")),
    ];
    let photos = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"];
    app.images.put("slow.jpg", jpeg(&photo(photos[0]), 80));
    app.images.delay("slow.jpg", Duration::from_secs(8));
    for (path, status) in [("e500.jpg", 500), ("e503.jpg", 503), ("e429.jpg", 429)] {
        app.images.fail(path, status);
    }
    for (name, url) in &bad {
        app.products()
            .insert_one(product_doc(name, url))
            .await
            .unwrap();
    }
    let t = Instant::now();
    let (code, body) = app
        .search_upload(photo_bytes("coffee.png"), "top_k=50&threshold=0")
        .await;
    let first_ms = t.elapsed().as_millis();
    assert_eq!(code, 200, "{body}");
    assert_eq!(app.names(&body).len(), CATALOGUE.len(), "{body}");
    let status = app.status().await;
    assert_eq!(status["failed_products"], bad.len(), "{status}");
    assert_eq!(status["products_with_features"], CATALOGUE.len());
    // Not retried on every search.
    let hits: Vec<usize> = ["slow.jpg", "e500.jpg", "e503.jpg", "e429.jpg"]
        .iter()
        .map(|p| app.images.hits(p))
        .collect();
    let (code, _) = app.search_upload(photo_bytes("coffee.png"), "").await;
    assert_eq!(code, 200);
    let again: Vec<usize> = ["slow.jpg", "e500.jpg", "e503.jpg", "e429.jpg"]
        .iter()
        .map(|p| app.images.hits(p))
        .collect();
    assert_eq!(hits, again, "failed images are not fetched on every search");

    // The hosts recover: the down one comes up on its port, the others answer normally.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", down_port))
        .await
        .unwrap();
    let down_bytes = jpeg(&photo(photos[1]), 80);
    let down_server = tokio::spawn(async move {
        let app = axum::Router::new().route(
            "/down.jpg",
            axum::routing::get(move || {
                let b = down_bytes.clone();
                async move { ([("content-type", "image/jpeg")], b) }
            }),
        );
        axum::serve(listener, app).await.unwrap();
    });
    app.images.clear_behaviour("slow.jpg");
    for (i, path) in ["e500.jpg", "e503.jpg", "e429.jpg"].iter().enumerate() {
        app.images.clear_behaviour(path);
        app.images.put(path, jpeg(&photo(photos[i + 1]), 80));
    }
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let (code, body) = app
        .search_upload(photo_bytes("coffee.png"), "top_k=50&threshold=0")
        .await;
    assert_eq!(code, 200, "{body}");
    let names = app.names(&body);
    for (name, _) in &bad {
        assert!(
            names.contains(&name.to_string()),
            "{name} not indexed: {names:?}"
        );
    }
    let status = app.status().await;
    assert_eq!(status["failed_products"], 0, "{status}");
    assert_eq!(
        status["products_with_features"],
        CATALOGUE.len() + bad.len()
    );
    println!(
        "failing image hosts: first search with 5 failing hosts answered in {first_ms} ms; \
         all 5 indexed after they recovered and {retry_after} s passed"
    );
    down_server.abort();
    assert_no_panics();
}

/// A product image host that hangs does not hold searches up: the search waits at most
/// SEARCH_SYNC_WAIT_SECS for the index pass, answers from what is stored, and the product
/// is searchable once its image arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_image_host_does_not_hold_up_searches() {
    record_panics();
    let app = start(&[("SEARCH_SYNC_WAIT_SECS", "1"), ("FETCH_TIMEOUT_SECS", "20")]).await;
    app.state.indexer().pass_now().await.unwrap();
    app.images
        .put("late.jpg", jpeg(&photo("astronaut.png"), 80));
    let delay = Duration::from_secs(6);
    app.images.delay("late.jpg", delay);
    app.products()
        .insert_one(product_doc("Late photo", &app.images.url("late.jpg")))
        .await
        .unwrap();
    let added = Instant::now();
    let t = Instant::now();
    let (code, body) = app
        .search_upload(photo_bytes("coffee.png"), "top_k=50&threshold=0")
        .await;
    let waited = t.elapsed();
    assert_eq!(code, 200, "{body}");
    assert_eq!(app.names(&body).len(), CATALOGUE.len());
    assert!(
        waited < Duration::from_secs(5),
        "the search waited {waited:?} for a slow image host"
    );
    assert_eq!(app.images.hits("late.jpg"), 1);
    // Once the image has arrived, the product is found.
    let t = Instant::now();
    loop {
        let (code, body) = app
            .search_upload(photo_bytes("astronaut.png"), "top_k=1&threshold=0")
            .await;
        assert_eq!(code, 200, "{body}");
        if app.names(&body) == ["Late photo"] || app.names(&body) == ["Astronaut poster"] {
            let status = app.status().await;
            if status["products_with_features"] == CATALOGUE.len() + 1 {
                break;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(30), "never indexed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(added.elapsed() >= delay);
    println!("slow image host: a search answered in {waited:?} while the pass waited for it");
    assert_no_panics();
}

/// Uploads refused while the service is busy, or rejected before their body is read,
/// get their answer (503 or 422 with a `detail`), not a broken pipe or a reset
/// connection, and the client's next requests work (no dead connection reused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_uploads_get_their_answer_not_a_broken_connection() {
    record_panics();
    let app = start(&[("MAX_CONCURRENT_REQUESTS", "1")]).await;
    app.state.indexer().pass_now().await.unwrap();
    app.images.put("slow.jpg", jpeg(&photo("coffee.png"), 80));
    app.images.delay("slow.jpg", Duration::from_secs(4));
    let slow_url = app.images.url("slow.jpg");
    let holder = tokio::spawn({
        let (http, url) = (
            app.http.clone(),
            app.url(&format!(
                "/api/v1/search/url?image_url={}",
                common::app::urlencode(&slow_url)
            )),
        );
        async move { http.post(url).send().await.unwrap().status().as_u16() }
    });
    let t = Instant::now();
    while app.images.hits("slow.jpg") == 0 {
        assert!(t.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // 4 MB uploads, refused without being read.
    let big = vec![0x5a_u8; 4 << 20];
    let upload = |params: &str| {
        let form = reqwest::multipart::Form::new().part(
            "file",
            reqwest::multipart::Part::bytes(big.clone()).file_name("big.jpg"),
        );
        app.http
            .post(app.url(&format!("/api/v1/search/image?{params}")))
            .multipart(form)
            .send()
    };
    for i in 0..4 {
        let r = upload("top_k=3").await.unwrap_or_else(|e| {
            panic!("refused upload {i} got a connection error instead of its 503: {e:?}")
        });
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["connection"], "close");
        let body: Value = r.json().await.unwrap();
        assert!(body["detail"].as_str().unwrap().contains("busy"), "{body}");
    }
    assert_eq!(holder.await.unwrap(), 200);
    // Rejected for its parameters before the body is read.
    let r = upload("top_k=0")
        .await
        .expect("a 422, not a connection error");
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    assert!(body["detail"].is_string(), "{body}");
    // And the same client goes on working.
    let (code, body) = app
        .search_upload(jpeg(&photo("coffee.png"), 80), "top_k=1")
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(app.names(&body), ["Espresso cup"]);
    assert_no_panics();
}
