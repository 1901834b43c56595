//! The search service end to end: real SecantusDB process, real image server on
//! 127.0.0.1, the real EfficientNet-Lite0 model, HTTP over loopback.

mod common;

use std::time::Duration;

use common::app::{product_doc, TestApp, CATALOGUE};
use common::*;
use mongodb::bson::{doc, Document};
use serde_json::Value;

fn transformed(name: &str) -> Vec<(&'static str, Vec<u8>)> {
    let img = photo(name);
    let (w, h) = img.dimensions();
    let resized = image::imageops::resize(
        &img,
        w * 3 / 5,
        h * 3 / 5,
        image::imageops::FilterType::Triangle,
    );
    let cropped =
        image::imageops::crop_imm(&img, w / 10, h / 10, w * 8 / 10, h * 8 / 10).to_image();
    let mirrored = image::imageops::flip_horizontal(&img);
    vec![
        ("resized", png(&image::DynamicImage::ImageRgb8(resized))),
        ("cropped", jpeg(&cropped, 90)),
        ("jpeg q60", jpeg(&img, 60)),
        ("mirrored", jpeg(&mirrored, 85)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transformed_copies_find_their_product_first_and_strangers_find_nothing() {
    let app = TestApp::start(&[]).await;
    for (name, file) in &CATALOGUE[..5] {
        for (how, bytes) in transformed(file) {
            let (code, body) = app.search_upload(bytes, "top_k=3&threshold=0.3").await;
            assert_eq!(code, 200, "{body}");
            let names = app.names(&body);
            assert_eq!(
                names.first().map(String::as_str),
                Some(*name),
                "{how} {file}: {body}"
            );
        }
    }
    // A grey-scale photo of the moon looks like none of the products.
    let (code, body) = app
        .search_upload(photo_bytes("moon.png"), "top_k=5&threshold=0.6")
        .await;
    assert_eq!(code, 200);
    assert_eq!(
        body,
        Value::Array(vec![]),
        "nothing should be that similar: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_search_accepts_query_parameters_json_body_and_upload_alike() {
    let app = TestApp::start(&[]).await;
    app.images.put("query.jpg", jpeg(&photo("coffee.png"), 80));
    let query_url = app.images.url("query.jpg");
    let (code, by_query) = app.search_url(&query_url, "&top_k=3&threshold=0.2").await;
    assert_eq!(code, 200, "{by_query}");
    let r = app
        .http
        .post(app.url("/api/v1/search/url"))
        .json(&serde_json::json!({ "image_url": query_url, "top_k": 3, "threshold": 0.2 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let by_json: Value = r.json().await.unwrap();
    let (code, by_upload) = app
        .search_upload(jpeg(&photo("coffee.png"), 80), "top_k=3&threshold=0.2")
        .await;
    assert_eq!(code, 200);
    assert_eq!(by_query, by_json);
    assert_eq!(by_query, by_upload);
    assert_eq!(app.names(&by_query)[0], "Espresso cup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_query_images_are_client_errors_not_empty_results() {
    let app = TestApp::start(&[]).await;
    let (code, body) = app.search_url(&app.images.url("missing.png"), "").await;
    assert_eq!(code, 400, "{body}");
    // One detail for every way the host failed (no port probing): not the status.
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("could not fetch"), "{body}");
    assert!(!detail.contains("404"), "{body}");
    app.images
        .put("notes.txt", b"this is text, not an image".to_vec());
    let (code, body) = app.search_url(&app.images.url("notes.txt"), "").await;
    assert_eq!(code, 415, "{body}");
    let (code, body) = app
        .search_upload(b"\x89PNG\r\n\x1a\n garbage".to_vec(), "")
        .await;
    assert!(code == 400 || code == 415, "{code} {body}");
    assert!(body["detail"].is_string());
    let (code, body) = app.search_url("ftp://example.com/x.png", "").await;
    assert_eq!(code, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threshold_and_top_k_shape_the_results() {
    let app = TestApp::start(&[]).await;
    let q = jpeg(&photo("chelsea.png"), 85);
    let (_, all) = app.search_upload(q.clone(), "top_k=50&threshold=0").await;
    let all = all.as_array().unwrap().clone();
    assert_eq!(
        all.len(),
        CATALOGUE.len(),
        "threshold 0 keeps every product"
    );
    let scores: Vec<f64> = all
        .iter()
        .map(|r| r["similarity_score"].as_f64().unwrap())
        .collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "best first: {scores:?}"
    );
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r["rank"], i + 1);
    }
    let (_, two) = app.search_upload(q.clone(), "top_k=2&threshold=0").await;
    assert_eq!(two.as_array().unwrap(), &all[..2]);
    let cut = (scores[1] + scores[2]) / 2.0;
    let (_, above) = app
        .search_upload(q.clone(), &format!("top_k=50&threshold={cut}"))
        .await;
    assert_eq!(
        above.as_array().unwrap(),
        &all[..2],
        "only scores >= threshold"
    );
    // Defaults from the environment: TOP_K=10, SIMILARITY_THRESHOLD=0.5.
    let (_, defaults) = app.search_upload(q, "").await;
    let n = scores.iter().filter(|s| **s >= 0.5).count().min(10);
    assert_eq!(defaults.as_array().unwrap().len(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_shape_matches_the_contract_field_by_field() {
    let app = TestApp::start(&[]).await;
    let (code, body) = app
        .search_upload(photo_bytes("coffee.png"), "top_k=1")
        .await;
    assert_eq!(code, 200);
    let r = &body[0];
    assert_eq!(r["rank"], 1);
    assert!(r["similarity_score"].as_f64().unwrap() > 0.99);
    let p = r["product"].as_object().unwrap();
    assert_eq!(p["_id"], app.ids["Espresso cup"].to_hex());
    assert_eq!(p["productName"], "Espresso cup");
    assert_eq!(p["productPrice"], 250000);
    assert_eq!(p["productImage"], app.images.url("coffee.png"));
    assert_eq!(p["productCategory"], "65a1e9c2e4b0a1b2c3d4e5f6");
    assert_eq!(p["productSize"], 18);
    assert_eq!(p["productDescription"], "Espresso cup, handmade");
    assert_eq!(p["averageRating"], 4.5);
    assert_eq!(p["totalRatings"], 12);
    assert_eq!(p["createdAt"], "2025-01-02T05:16:41.123Z");
    assert_eq!(p["updatedAt"], "2025-01-02T05:16:41.123Z");
    for dropped in ["productQuantity", "productDiscount", "isHidden", "__v"] {
        assert!(!p.contains_key(dropped), "{dropped} must not be returned");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn product_fields_are_configurable() {
    let app = TestApp::start(&[("PRODUCT_FIELDS", "productName,productQuantity")]).await;
    let (_, body) = app
        .search_upload(photo_bytes("coffee.png"), "top_k=1")
        .await;
    let p = body[0]["product"].as_object().unwrap();
    let mut keys: Vec<&str> = p.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, vec!["productName", "productQuantity"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_computed_once_kept_across_restarts_and_follow_the_catalogue() {
    let app = TestApp::start(&[]).await;
    let q = jpeg(&photo("rocket.jpg"), 85);
    let (code, body) = app.search_upload(q.clone(), "top_k=1").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(app.names(&body), vec!["Rocket model"]);
    let photo_hits = app.images.total_hits();
    let runs = app.model_runs().await;
    // The second search embeds the query only and fetches no product photo.
    app.search_upload(q.clone(), "top_k=1").await;
    assert_eq!(
        app.model_runs().await,
        runs + 1,
        "second search runs the model once"
    );
    assert_eq!(
        app.images.total_hits(),
        photo_hits,
        "no product photo fetched again"
    );

    // The shop changes a product's photo: its embedding is recomputed.
    let cat = app.ids["Cat figurine"];
    app.images
        .put("new-cat.jpg", jpeg(&photo("motorcycle_right.png"), 90));
    app.products()
        .update_one(
            doc! { "_id": cat },
            doc! { "$set": { "productImage": app.images.url("new-cat.jpg") } },
        )
        .await
        .unwrap();
    let (_, body) = app
        .search_upload(photo_bytes("motorcycle_right.png"), "top_k=1")
        .await;
    assert_eq!(
        app.names(&body),
        vec!["Cat figurine"],
        "now shows the new photo"
    );
    assert_eq!(app.images.hits("new-cat.jpg"), 1);

    // A deleted product never appears again.
    let rocket = app.ids["Rocket model"];
    app.products()
        .delete_one(doc! { "_id": rocket })
        .await
        .unwrap();
    let (_, body) = app.search_upload(q.clone(), "top_k=50&threshold=0").await;
    assert!(!app.names(&body).contains(&"Rocket model".to_string()));
    let stored: Document = app
        .embeddings()
        .find_one(doc! { "product": rocket })
        .await
        .unwrap()
        .unwrap_or_default();
    assert!(stored.is_empty(), "its embedding is removed too");

    // A restart (new service on the same database) recomputes nothing.
    let hits = app.images.total_hits();
    let app = app.restart_service().await;
    let (_, body) = app
        .search_upload(jpeg(&photo("coffee.png"), 85), "top_k=1")
        .await;
    assert_eq!(app.names(&body), vec!["Espresso cup"]);
    assert_eq!(
        app.model_runs().await,
        1,
        "only the query is embedded after a restart"
    );
    assert_eq!(app.images.total_hits(), hits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_product_images_are_skipped_reported_and_retried_later() {
    let app = TestApp::start(&[("RETRY_FAILED_AFTER_SECS", "3600")]).await;
    let products = app.products();
    products
        .insert_one(product_doc("Gone photo", &app.images.url("gone.png")))
        .await
        .unwrap();
    app.images.put("junk.png", b"not a png".to_vec());
    products
        .insert_one(product_doc("Junk photo", &app.images.url("junk.png")))
        .await
        .unwrap();
    products
        .insert_one(product_doc("No photo", ""))
        .await
        .unwrap();
    let (code, body) = app
        .search_upload(photo_bytes("coffee.png"), "top_k=50&threshold=0")
        .await;
    assert_eq!(code, 200, "{body}");
    let names = app.names(&body);
    assert_eq!(
        names.len(),
        CATALOGUE.len(),
        "only products with usable photos: {names:?}"
    );
    let status = app.status().await;
    assert_eq!(status["failed_products"], 2, "{status}");
    // ORT_PREPACKING=auto prepacks a model file this small; spinning is on by default,
    // and stops when each run returns.
    assert_eq!(status["prepacking"], true, "{status}");
    assert_eq!(status["allow_spinning"], true, "{status}");
    assert_eq!(status["stop_spinning_after_run"], true, "{status}");
    assert_eq!(status["products_with_features"], CATALOGUE.len());
    assert_eq!(status["total_products"], CATALOGUE.len() + 3);
    // Not retried on every search...
    app.search_upload(photo_bytes("coffee.png"), "").await;
    assert_eq!(app.images.hits("gone.png"), 1);
    // ...but after RETRY_FAILED_AFTER_SECS: the photo is there now, so it is indexed.
    // (The failures are made an hour and a second old rather than waiting an hour.)
    app.images
        .put("gone.png", jpeg(&photo("astronaut.png"), 80));
    let an_hour_ago = mongodb::bson::DateTime::from_millis(
        mongodb::bson::DateTime::now().timestamp_millis() - 3_601_000,
    );
    app.embeddings()
        .update_many(
            doc! { "status": "failed" },
            doc! { "$set": { "updated_at": an_hour_ago } },
        )
        .await
        .unwrap();
    let (_, body) = app
        .search_upload(photo_bytes("coffee.png"), "top_k=50&threshold=0")
        .await;
    assert_eq!(app.images.hits("gone.png"), 2);
    assert!(app.names(&body).contains(&"Gone photo".to_string()));
    assert_eq!(app.status().await["failed_products"], 1);
}

/// A cached service's first pass takes the stored metadata from the scan that loads its
/// cache: only usable vectors of the current model go in, and what that pass changes
/// (deleted products, new photos, images that fail now) is applied to the cache at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_services_first_pass_loads_only_usable_vectors_and_applies_its_changes() {
    let app = TestApp::start(&[("CACHE_PRODUCTS", "false")]).await;
    app.state.indexer().pass_now().await.unwrap();
    let embeddings = app.embeddings();
    // While no cached service runs: a product is deleted, one gets a new photo, and one
    // holds another model's vector while its photo is now broken.
    let products = app.products();
    products
        .delete_one(doc! { "_id": app.ids["Rocket model"] })
        .await
        .unwrap();
    app.images
        .put("new-cat.jpg", jpeg(&photo("motorcycle_right.png"), 90));
    products
        .update_one(
            doc! { "_id": app.ids["Cat figurine"] },
            doc! { "$set": { "productImage": app.images.url("new-cat.jpg") } },
        )
        .await
        .unwrap();
    let motorbike = app.ids["Motorbike"];
    embeddings
        .update_one(
            doc! { "_id": motorbike },
            doc! { "$set": { "model": "another-model@0000000000000000" } },
        )
        .await
        .unwrap();
    products
        .update_one(
            doc! { "_id": motorbike },
            doc! { "$set": { "productImage": app.images.url("missing.png") } },
        )
        .await
        .unwrap();

    // No periodic reconciling with the store: the pass alone must keep the cache right.
    let cached = cached_twin(&app, "3600").await;
    let names = |r: &[search_img::search::SearchResult]| -> Vec<String> {
        r.iter()
            .map(|x| x.product["productName"].as_str().unwrap().to_string())
            .collect()
    };
    let query = bytes::Bytes::from(photo_bytes("motorcycle_right.png"));
    let first = search_all(&cached, query.clone()).await;
    let first = names(&first);
    assert_eq!(first[0], "Cat figurine", "the new photo: {first:?}");
    assert!(!first.contains(&"Rocket model".to_string()), "{first:?}");
    assert!(!first.contains(&"Motorbike".to_string()), "{first:?}");
    assert_eq!(first.len(), CATALOGUE.len() - 2, "{first:?}");
    assert_eq!(
        cached.status().await.unwrap().cached_vectors,
        CATALOGUE.len() - 2
    );
    let streamed = search_all(&app.state, query.clone()).await;
    assert_eq!(names(&streamed), first, "both modes agree");

    // A cached product whose photo breaks leaves the cache with the pass that records it.
    products
        .update_one(
            doc! { "_id": app.ids["Galaxy print"] },
            doc! { "$set": { "productImage": app.images.url("also-missing.png") } },
        )
        .await
        .unwrap();
    let r = names(&search_all(&cached, query.clone()).await);
    assert!(!r.contains(&"Galaxy print".to_string()), "{r:?}");
    assert_eq!(
        cached.status().await.unwrap().cached_vectors,
        CATALOGUE.len() - 3
    );
    let streamed = search_all(&app.state, query).await;
    assert_eq!(names(&streamed), r, "both modes agree");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_and_streamed_ranking_return_identical_results() {
    let streamed = TestApp::start(&[("CACHE_PRODUCTS", "false")]).await;
    // A second service on the same database and images, with the cache on; it picks up
    // other instances' changes before every search (default: every 30 s).
    let cached_state = cached_twin(&streamed, "0").await;
    let queries = [
        "chelsea.png",
        "moon.png",
        "coffee.png",
        "motorcycle_right.png",
        "astronaut.png",
    ];
    for q in queries {
        let bytes = bytes::Bytes::from(jpeg(&photo(q), 75));
        let a = search_all(&streamed.state, bytes.clone()).await;
        let b = search_all(&cached_state, bytes).await;
        assert_eq!(a.len(), b.len(), "{q}");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.product, y.product, "{q}");
            assert!((x.similarity_score - y.similarity_score).abs() < 1e-6);
            assert_eq!(x.rank, y.rank);
        }
    }
    // The cache follows changes made through the other instance.
    let coffee = streamed.ids["Espresso cup"];
    streamed
        .products()
        .delete_one(doc! { "_id": coffee })
        .await
        .unwrap();
    streamed.state.indexer().pass_now().await.unwrap();
    let r = search_all(&cached_state, photo_bytes("coffee.png").into()).await;
    assert!(r.iter().all(|x| x.product["productName"] != "Espresso cup"));
    assert_eq!(
        cached_state.status().await.unwrap().cached_vectors,
        CATALOGUE.len() - 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_eleventh_concurrent_request_is_refused_with_503_while_health_answers() {
    let app = TestApp::start(&[("MAX_CONCURRENT_REQUESTS", "10")]).await;
    app.search_upload(photo_bytes("coffee.png"), "").await; // load the model, index
    app.images.put("slow.jpg", jpeg(&photo("coffee.png"), 80));
    app.images.delay("slow.jpg", Duration::from_secs(3));
    let slow = app.images.url("slow.jpg");
    let mut pending = Vec::new();
    for _ in 0..10 {
        let (http, url) = (
            app.http.clone(),
            format!(
                "{}/api/v1/search/url?image_url={}",
                app.base,
                common::app::urlencode(&slow)
            ),
        );
        pending.push(tokio::spawn(async move {
            http.post(url).send().await.unwrap().status().as_u16()
        }));
    }
    // Wait until all ten are in flight at the image server.
    let t = std::time::Instant::now();
    while app.images.hits("slow.jpg") < 10 && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, body) = app.search_url(&slow, "").await;
    assert_eq!(code, 503, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("busy"));
    let (code, _) = app.get("/api/v1/health").await;
    assert_eq!(code, 200, "health is never refused");
    for p in pending {
        assert_eq!(p.await.unwrap(), 200);
    }
    let (code, _) = app.search_url(&app.images.url("coffee.png"), "").await;
    assert_eq!(code, 200, "serves normally afterwards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_database_without_a_restart() {
    let mut app = TestApp::start(&[]).await;
    let (code, body) = app.get("/api/v1/health").await;
    assert_eq!(code, 200);
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["message"], "API is running");
    assert_eq!(body["database"], "connected");
    assert_eq!(body["model_loaded"], false, "health never loads the model");
    app.mongo.stop().await;
    // Health answers from a ping made every second in the background (it never waits on
    // MongoDB), so the outage shows within MONGO_TIMEOUT_SECS (2 s here) plus a second.
    let t = std::time::Instant::now();
    let (mut code, mut body) = app.get("/api/v1/health").await;
    while code == 200 && t.elapsed() < Duration::from_secs(6) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        (code, body) = app.get("/api/v1/health").await;
    }
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["status"], "unhealthy");
    assert_eq!(body["database"], "disconnected");
    assert!(body["detail"].is_string());
    let (code, body) = app.search_upload(photo_bytes("coffee.png"), "").await;
    assert_eq!(code, 503, "search while the database is down: {body}");
    assert!(body["detail"].is_string());
    app.mongo.restart().await;
    let mut code = 0;
    for _ in 0..50 {
        code = app.get("/api/v1/health").await.0;
        if code == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(code, 200, "recovers by itself");
    let (code, body) = app
        .search_upload(photo_bytes("coffee.png"), "top_k=1")
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(app.names(&body), vec!["Espresso cup"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_refresh_over_the_real_catalogue() {
    // CORS, `/`, the docs, the OpenAPI document and 404 are tested in-process (http.rs).
    let app = TestApp::start(&[]).await;
    let status = app.status().await;
    assert_eq!(status["model_loaded"], false);
    assert_eq!(status["caching_enabled"], false);
    let (code, body) = app.refresh().await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["total_products"], CATALOGUE.len());
    assert_eq!(body["indexed_products"], CATALOGUE.len());
    assert!(body["message"].is_string());
}

/// With the vectors in memory, what a pass has stored is searchable before the pass
/// ends: it goes to the cache batch by batch (holding every stored vector until the end
/// took 5 KB a product, 785 MB at 100,000). One photo that takes 8 s to arrive holds the
/// pass open here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_puts_what_it_stored_in_the_cache_before_it_ends() {
    let app = TestApp::start(&[("CACHE_PRODUCTS", "true")]).await;
    app.images.put("slow.jpg", jpeg(&photo("rocket.jpg"), 80));
    app.images.delay("slow.jpg", Duration::from_secs(8));
    app.products()
        .insert_one(product_doc("Slow arrival", &app.images.url("slow.jpg")))
        .await
        .unwrap();
    let state = app.state.clone();
    let pass = tokio::spawn(async move { state.indexer().pass_now().await });
    let t = std::time::Instant::now();
    loop {
        let status = app.status().await;
        if status["cached_vectors"] == CATALOGUE.len() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(6), "{status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !pass.is_finished(),
        "the slow photo should hold the pass open"
    );
    let report = pass.await.unwrap().unwrap();
    assert_eq!(report.embedded, CATALOGUE.len() + 1);
    assert_eq!(app.status().await["cached_vectors"], CATALOGUE.len() + 1);
}

/// A second service on `app`'s database and images with `CACHE_PRODUCTS=true`,
/// reconciling its cache with the store every `sync_interval_secs`.
async fn cached_twin(app: &TestApp, sync_interval_secs: &str) -> search_img::service::AppState {
    twin(
        app,
        &[
            ("CACHE_PRODUCTS", "true"),
            ("CACHE_SYNC_INTERVAL_SECS", sync_interval_secs),
        ],
    )
    .await
}

/// A second service on `app`'s database and images, with these settings changed.
async fn twin(app: &TestApp, set: &[(&str, &str)]) -> search_img::service::AppState {
    let mut vars = app.vars.clone();
    vars.retain(|(k, _)| set.iter().all(|(s, _)| k != s));
    vars.extend(set.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    search_img::service::AppState::new(search_img::config::Config::from_vars(vars).unwrap())
        .await
        .unwrap()
}

/// CACHE_PRODUCTS=auto: the vectors stay in memory while they fit VECTOR_CACHE_MAX_MB,
/// are streamed when they would not, and leave memory when the catalogue outgrows it;
/// the results are the streamed ones throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_caches_while_the_vectors_fit_and_streams_beyond() {
    let streamed = TestApp::start(&[("CACHE_PRODUCTS", "false")]).await;
    let mb = |bytes: usize| format!("{:.9}", (bytes + 16) as f64 / (1024.0 * 1024.0));
    let roomy = twin(&streamed, &[("CACHE_PRODUCTS", "auto")]).await;
    let small = twin(
        &streamed,
        &[
            ("CACHE_PRODUCTS", "auto"),
            ("VECTOR_CACHE_MAX_MB", &mb(2000)),
        ],
    )
    .await;
    let query = bytes::Bytes::from(photo_bytes("chelsea.png"));
    let want = search_all(&streamed.state, query.clone()).await;
    let same = |got: &[search_img::search::SearchResult], what: &str| {
        let ids = |r: &[search_img::search::SearchResult]| {
            r.iter()
                .map(|x| (x.product["_id"].clone(), x.similarity_score))
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(got), ids(&want), "{what}");
    };
    same(&search_all(&roomy, query.clone()).await, "in memory");
    same(&search_all(&small, query.clone()).await, "streamed");
    let (r, s) = (roomy.status().await.unwrap(), small.status().await.unwrap());
    assert_eq!((r.cache_products, s.cache_products), ("auto", "auto"));
    assert!(
        r.caching_enabled && r.cached_vectors == CATALOGUE.len(),
        "{r:?}"
    );
    let bytes = r.cached_bytes.unwrap();
    assert!(bytes < 3000 * CATALOGUE.len(), "compact: {bytes} bytes");
    assert_eq!(r.cache_limit_bytes, Some(256 << 20));
    assert!(!s.caching_enabled && s.cached_vectors == 0 && s.cached_bytes.is_none());

    // A limit the catalogue fits now (by the estimate that decides before reading it,
    // and once read), reconciled before every search; then the catalogue doubles.
    let docs = streamed
        .embeddings()
        .estimated_document_count()
        .await
        .unwrap() as usize;
    let per_row = search_img::rank::VectorCache::row_bytes_estimate(1280);
    let limit = (docs * per_row).max(bytes) + 64;
    let tight = twin(
        &streamed,
        &[
            ("CACHE_PRODUCTS", "auto"),
            ("VECTOR_CACHE_MAX_MB", &mb(limit)),
            ("CACHE_SYNC_INTERVAL_SECS", "0"),
        ],
    )
    .await;
    same(&search_all(&tight, query.clone()).await, "fits");
    assert!(tight.status().await.unwrap().caching_enabled);
    let products = streamed.products();
    for (i, name) in CATALOGUE.iter().enumerate() {
        let copy = product_doc(&format!("Copy {i}"), &streamed.images.url(name.1));
        products.insert_one(copy).await.unwrap();
    }
    streamed.state.indexer().pass_now().await.unwrap();
    let want = search_all(&streamed.state, query.clone()).await;
    assert!(want.len() > CATALOGUE.len(), "{}", want.len());
    let got = search_all(&tight, query.clone()).await;
    assert_eq!(got.len(), want.len());
    for (x, y) in got.iter().zip(&want) {
        assert_eq!(x.similarity_score, y.similarity_score);
    }
    let t = tight.status().await.unwrap();
    assert!(!t.caching_enabled && t.cached_vectors == 0, "{t:?}");
    // Searches go on streaming (the load is not retried at each one).
    assert_eq!(search_all(&tight, query).await.len(), want.len());
    assert!(!tight.status().await.unwrap().caching_enabled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn products_deleted_since_the_last_pass_give_way_to_the_next_best() {
    // No pass for an hour: the deleted products' vectors stay stored (and cached).
    for cache in ["false", "true"] {
        let app = TestApp::start(&[
            ("CACHE_PRODUCTS", cache),
            ("CATALOG_SYNC_INTERVAL_SECS", "3600"),
            ("CACHE_SYNC_INTERVAL_SECS", "3600"),
        ])
        .await;
        let q = jpeg(&photo("coffee.png"), 85);
        let (_, all) = app.search_upload(q.clone(), "top_k=50&threshold=0").await;
        let all = all.as_array().unwrap().clone();
        assert!(all.len() >= 6, "{all:?}");
        for r in &all[..2] {
            let id = r["product"]["_id"].as_str().unwrap();
            let oid = mongodb::bson::oid::ObjectId::parse_str(id).unwrap();
            let gone = app
                .products()
                .delete_one(doc! { "_id": oid })
                .await
                .unwrap();
            assert_eq!(gone.deleted_count, 1);
        }
        let (status, three) = app.search_upload(q, "top_k=3&threshold=0").await;
        assert_eq!(status, 200, "{three}");
        let three = three.as_array().unwrap();
        assert_eq!(
            three.len(),
            3,
            "cache={cache}: the next best fill in: {three:?}"
        );
        for (i, (got, want)) in three.iter().zip(&all[2..5]).enumerate() {
            assert_eq!(got["product"], want["product"], "cache={cache}");
            assert_eq!(got["similarity_score"], want["similarity_score"]);
            assert_eq!(got["rank"], i + 1);
        }
    }
}

/// Every product a search by `bytes` finds (top 50, no threshold), in-process.
async fn search_all(
    state: &search_img::service::AppState,
    bytes: bytes::Bytes,
) -> Vec<search_img::search::SearchResult> {
    let everything = search_img::vectors::RankQuery {
        top_k: 50,
        threshold: 0.0,
        filter: Default::default(),
    };
    state.search().by_bytes(bytes, &everything).await.unwrap().0
}

/// PRODUCT_FILTER decides which products are searchable: those it leaves out are never
/// embedded, and a product hidden after the last pass is not returned either: the join
/// checks the filter again and the next products fill the list, however many of the
/// best candidates are hidden.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn product_filter_hides_products_at_once_and_the_next_ones_fill_in() {
    for cache in ["false", "true"] {
        let mongo = common::mongo::MongoServer::start().await;
        let images = common::images::ImageServer::start().await;
        let products = mongo
            .client()
            .await
            .database("test")
            .collection::<Document>("products");
        let mut ids = std::collections::HashMap::new();
        for (i, (name, file)) in CATALOGUE.iter().enumerate() {
            images.put(file, photo_bytes(file));
            let mut d = product_doc(name, &images.url(file));
            // Hidden from the start: the first one.
            d.insert("isHidden", i == 0);
            let id = products.insert_one(d).await.unwrap().inserted_id;
            ids.insert(name.to_string(), id.as_object_id().unwrap());
        }
        let vars = common::app::test_vars(
            &mongo,
            &[
                ("PRODUCT_FILTER", r#"{"isHidden": {"$ne": true}}"#),
                ("CACHE_PRODUCTS", cache),
                ("CATALOG_SYNC_INTERVAL_SECS", "3600"),
                ("CACHE_SYNC_INTERVAL_SECS", "3600"),
            ],
        );
        let app = TestApp::serve(mongo, images, vars, ids).await;
        let q = jpeg(&photo("coffee.png"), 85);
        let (_, all) = app.search_upload(q.clone(), "top_k=50&threshold=0").await;
        let all = all.as_array().unwrap().clone();
        assert_eq!(all.len(), CATALOGUE.len() - 1, "cache={cache}: {all:?}");
        assert!(!app
            .names(&Value::Array(all.clone()))
            .contains(&CATALOGUE[0].0.to_string()));
        let status = app.status().await;
        assert_eq!(status["products_with_features"], CATALOGUE.len() - 1);

        // Hide all but the last two (no pass runs: the interval is an hour), more than
        // the spare candidates of a top-2 search.
        for r in &all[..all.len() - 2] {
            let oid =
                mongodb::bson::oid::ObjectId::parse_str(r["product"]["_id"].as_str().unwrap())
                    .unwrap();
            app.products()
                .update_one(doc! { "_id": oid }, doc! { "$set": { "isHidden": true } })
                .await
                .unwrap();
        }
        let (code, two) = app.search_upload(q, "top_k=2&threshold=0").await;
        assert_eq!(code, 200, "{two}");
        let two = two.as_array().unwrap();
        assert_eq!(two.len(), 2, "cache={cache}: the last two fill in: {two:?}");
        for (i, (got, want)) in two.iter().zip(&all[all.len() - 2..]).enumerate() {
            assert_eq!(got["product"], want["product"], "cache={cache}");
            assert_eq!(got["rank"], i + 1);
        }
    }
}
