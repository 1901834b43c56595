//! Incremental catalogue changes from the products collection's change stream
//! (CATALOG_CHANGE_STREAM), against a real SecantusDB process (a one-node replica set,
//! as Atlas is) and the real model: each kind of change is indexed within seconds with
//! no full pass, the stream resumes from its stored token after a database restart and
//! after a service restart, and a standalone server falls back to passes before
//! searches.

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use common::app::{product_doc, test_vars, TestApp};
use common::mongo::MongoServer;
use mongodb::bson::{doc, DateTime, Document};
use search_img::config::Config;
use search_img::service::AppState;
use serde_json::Value;

/// Following the stream; a full pass only hourly; hidden products are not searchable.
const FOLLOW: &[(&str, &str)] = &[
    ("CATALOG_CHANGE_STREAM", "true"),
    ("CATALOG_FULL_SYNC_INTERVAL_SECS", "3600"),
    ("PRODUCT_FILTER", r#"{"isHidden": {"$ne": true}}"#),
];

/// How long a change may take to be indexed here (it takes about a second; the
/// machines are shared and the model runs on one thread).
const WITHIN: Duration = Duration::from_secs(20);

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < WITHIN, "not within {WITHIN:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `/api/v1/status`'s `catalog_changes` once its state is `state`.
async fn wait_changes_state(app: &TestApp, state: &str) -> Value {
    let start = Instant::now();
    loop {
        let changes = app.status().await["catalog_changes"].clone();
        if changes["state"] == state {
            return changes;
        }
        assert!(
            start.elapsed() < WITHIN,
            "not {state} within {WITHIN:?}: {changes}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_following(app: &TestApp) {
    wait_changes_state(app, "following").await;
}

/// The stored image URLs of `product` (usable embeddings).
async fn stored_urls(app: &TestApp, product: &mongodb::bson::oid::ObjectId) -> Vec<String> {
    let mut urls: Vec<String> = app
        .embedding_docs(doc! { "product": product, "status": "ok" })
        .await
        .iter()
        .filter_map(|d| d.get_str("image_url").ok().map(str::to_string))
        .collect();
    urls.sort();
    urls
}

fn passes(status: &Value) -> (u64, u64) {
    let p = &status["index_pass"];
    (
        p["passes"].as_u64().unwrap(),
        p["incremental_passes"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_change_is_indexed_within_seconds_without_a_full_pass() {
    let app = TestApp::start(FOLLOW).await;
    wait_following(&app).await;
    let (code, body) = app.refresh().await;
    assert_eq!(code, 200, "{body}");
    let before = passes(&app.status().await);
    assert_eq!(before.0, 1);

    // Insert: a new product's photo is embedded, and a search finds it.
    app.images
        .put("coins.png", common::photo_bytes("coins.png"));
    let coin = app
        .products()
        .insert_one(product_doc("Coin set", &app.images.url("coins.png")))
        .await
        .unwrap()
        .inserted_id
        .as_object_id()
        .unwrap();
    eventually("the inserted product is embedded", || async {
        stored_urls(&app, &coin).await == [app.images.url("coins.png")]
    })
    .await;
    let (code, body) = app.search_url(&app.images.url("coins.png"), "").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(app.names(&body)[0], "Coin set");

    // Photo change: the new photo is embedded, the old one's embedding goes.
    app.images
        .put("camera.png", common::photo_bytes("camera.png"));
    app.products()
        .update_one(
            doc! { "_id": coin },
            doc! { "$set": { "productImage": app.images.url("camera.png") } },
        )
        .await
        .unwrap();
    eventually(
        "the changed photo is embedded in place of the old",
        || async { stored_urls(&app, &coin).await == [app.images.url("camera.png")] },
    )
    .await;

    // Price change: the stored price follows (the price filters read it), nothing is
    // embedded.
    let runs = app.model_runs().await;
    app.products()
        .update_one(
            doc! { "_id": coin },
            doc! { "$set": { "productPrice": 99 } },
        )
        .await
        .unwrap();
    eventually("the new price is stored beside the vector", || async {
        let docs = app.embedding_docs(doc! { "product": coin }).await;
        docs.len() == 1 && docs[0].get_f64("price").ok() == Some(99.0)
    })
    .await;
    assert_eq!(
        app.model_runs().await,
        runs,
        "a price change embeds nothing"
    );
    let (_, body) = app
        .search_url(&app.images.url("camera.png"), "&max_price=100")
        .await;
    assert_eq!(app.names(&body), ["Coin set"]);

    // Hide: the product's embeddings go.
    let cup = app.ids["Espresso cup"];
    assert!(!stored_urls(&app, &cup).await.is_empty());
    app.products()
        .update_one(doc! { "_id": cup }, doc! { "$set": { "isHidden": true } })
        .await
        .unwrap();
    eventually("the hidden product's embedding is removed", || async {
        stored_urls(&app, &cup).await.is_empty()
    })
    .await;

    // Delete.
    app.products()
        .delete_one(doc! { "_id": coin })
        .await
        .unwrap();
    eventually("the deleted product's embedding is removed", || async {
        app.embedding_docs(doc! { "product": coin })
            .await
            .is_empty()
    })
    .await;

    let status = app.status().await;
    let after = passes(&status);
    assert_eq!(after.0, before.0, "no full pass ran: {status}");
    assert!(
        after.1 >= 5,
        "one incremental pass a change at least: {status}"
    );
    assert!(
        status["catalog_changes"]["changes"].as_u64().unwrap() >= 5,
        "{status}"
    );
    // Searches do not start full passes while the stream is followed.
    let (_, body) = app.search_url(&app.images.url("chelsea.png"), "").await;
    assert_eq!(app.names(&body)[0], "Cat figurine");
    assert!(!app.names(&body).contains(&"Espresso cup".to_string()));
    assert_eq!(passes(&app.status().await).0, before.0);
}

/// A product with a photo, inserted straight into the database.
async fn insert(app: &TestApp, name: &str, file: &str) -> mongodb::bson::oid::ObjectId {
    app.images.put(file, common::photo_bytes(file));
    app.products()
        .insert_one(product_doc(name, &app.images.url(file)))
        .await
        .unwrap()
        .inserted_id
        .as_object_id()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_resumes_after_a_database_restart_and_a_service_restart() {
    let mut app = TestApp::start(FOLLOW).await;
    wait_following(&app).await;
    let (code, body) = app.refresh().await;
    assert_eq!(code, 200, "{body}");

    // The database is down long enough for the stream to fail, then back; a change made
    // as soon as it is back, before the service has reconnected (its retries are seconds
    // apart by then), is told by the resumed stream (one opened afresh would not).
    app.mongo.stop().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    app.mongo.restart().await;
    let coin = insert(&app, "Coin set", "coins.png").await;
    eventually("the change made across the restart is embedded", || async {
        stored_urls(&app, &coin).await == [app.images.url("coins.png")]
    })
    .await;
    let status = app.status().await;
    assert_eq!(passes(&status).0, 1, "no full pass: {status}");
    assert_eq!(status["catalog_changes"]["state"], "following", "{status}");

    // The service stops; changes made meanwhile are indexed by the next one, from the
    // stored token, and its first searches start no full pass: the last one's counts.
    let moon = app.ids["Galaxy print"];
    let (mongo, images, vars, ids) = app.stop_service().await;
    // Nothing follows the stream while these are made.
    let products = mongo
        .client()
        .await
        .database("test")
        .collection::<Document>("products");
    products.delete_one(doc! { "_id": coin }).await.unwrap();
    products
        .update_one(doc! { "_id": moon }, doc! { "$set": { "productPrice": 5 } })
        .await
        .unwrap();
    let app = TestApp::serve(mongo, images, vars, ids).await;
    eventually(
        "changes made while the service was down are indexed",
        || async {
            let moon_price = app.embedding_docs(doc! { "product": moon }).await;
            app.embedding_docs(doc! { "product": coin })
                .await
                .is_empty()
                && moon_price.first().and_then(|d| d.get_f64("price").ok()) == Some(5.0)
        },
    )
    .await;
    let (_, body) = app.search_url(&app.images.url("chelsea.png"), "").await;
    assert_eq!(app.names(&body)[0], "Cat figurine");
    let status = app.status().await;
    assert_eq!(
        passes(&status).0,
        0,
        "the last full pass still counts: {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_waits_for_a_starting_follower_before_it_starts_a_full_pass() {
    // Waking on Render's 0.1 CPU, the first search came before the new follower had
    // resumed the stream and restored the last instance's full pass, so it started a
    // needless full pass (2.3 s at 10,000 products). Here the follower's two calls are
    // made by hand, so the order is certain (the real one wins the race unconstrained).
    let mongo = MongoServer::start().await;
    let config = Config::from_vars(test_vars(&mongo, FOLLOW)).unwrap();
    let state = AppState::new(config).await.unwrap();
    let indexer = state.indexer().clone();
    let first_search = |i: &std::sync::Arc<search_img::indexer::Indexer>| {
        let i = i.clone();
        tokio::spawn(async move { i.pass_if_due().await })
    };

    indexer.expect_follower();
    let search = first_search(&indexer);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let p = indexer.progress();
    assert!(
        !p.running && p.passes == 0,
        "a pass before the follower told: {p:?}"
    );
    assert!(!search.is_finished(), "the search did not wait");
    // The stream resumed: the last instance's pass of a minute ago counts.
    let a_minute_ago = DateTime::from_millis(DateTime::now().timestamp_millis() - 60_000);
    indexer.restore_full_pass(a_minute_ago);
    indexer.set_following(true);
    search.await.unwrap();
    assert_eq!(indexer.progress().passes, 0, "{:?}", indexer.progress());

    // A follower that never tells holds searches up for two seconds at most.
    let state = AppState::new(Config::from_vars(test_vars(&mongo, FOLLOW)).unwrap())
        .await
        .unwrap();
    let indexer = state.indexer().clone();
    indexer.expect_follower();
    let t = Instant::now();
    first_search(&indexer).await.unwrap();
    assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(indexer.progress().passes, 1, "{:?}", indexer.progress());
    // ... and only the first searches: the next one does not wait for it again.
    let t = Instant::now();
    first_search(&indexer).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "waited again: {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_change_streams_falls_back_to_passes_before_searches() {
    let mongo = MongoServer::start_with_args(&["--standalone"]).await;
    let mut vars = FOLLOW.to_vec();
    vars.push(("CATALOG_SYNC_INTERVAL_SECS", "0"));
    let app = TestApp::start_on(mongo, &vars).await;
    let changes = wait_changes_state(&app, "polling").await;
    assert!(
        changes["reason"]
            .as_str()
            .unwrap()
            .contains("no change stream"),
        "{changes}"
    );
    let coin = insert(&app, "Coin set", "coins.png").await;
    let (code, body) = app.search_url(&app.images.url("coins.png"), "").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(app.names(&body)[0], "Coin set");
    assert_eq!(
        stored_urls(&app, &coin).await,
        [app.images.url("coins.png")]
    );
}
