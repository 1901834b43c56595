//! The test harness itself works: a real MongoDB-compatible server that can be stopped,
//! crashed and restarted with its data, and an image server with per-path behaviours.

mod common;

use std::time::{Duration, Instant};

use common::images::ImageServer;
use common::mongo::MongoServer;
use mongodb::bson::{doc, Document};
use mongodb::Client;

async fn ping(client: &Client) -> mongodb::error::Result<Document> {
    client.database("admin").run_command(doc! {"ping": 1}).await
}

async fn names(client: &Client) -> Vec<String> {
    let coll = client.database("test").collection::<Document>("products");
    let mut cursor = coll.find(doc! {}).sort(doc! {"n": 1}).await.unwrap();
    let mut out = Vec::new();
    while cursor.advance().await.unwrap() {
        out.push(
            cursor
                .deserialize_current()
                .unwrap()
                .get_str("name")
                .unwrap()
                .to_string(),
        );
    }
    out
}

#[tokio::test]
async fn mongo_starts_and_answers_the_driver() {
    let t = Instant::now();
    let mongo = MongoServer::start().await;
    eprintln!("MongoDB ready in {:?} on {}", t.elapsed(), mongo.uri());
    assert!(mongo.is_running());

    let client = mongo.client().await;
    ping(&client).await.unwrap();
    let coll = client.database("test").collection::<Document>("products");
    coll.insert_many([
        doc! {"n": 1, "name": "Espresso cup"},
        doc! {"n": 2, "name": "Cat figurine"},
    ])
    .await
    .unwrap();
    let found = coll
        .find_one(doc! {"name": "Cat figurine"})
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.get_i32("n").unwrap(), 2);
    assert_eq!(names(&client).await, ["Espresso cup", "Cat figurine"]);
}

#[tokio::test]
async fn mongo_stop_fails_fast_and_restart_keeps_data() {
    let mut mongo = MongoServer::start().await;
    let port = mongo.port();
    let client = mongo.client().await;
    let coll = client.database("test").collection::<Document>("products");
    coll.insert_one(doc! {"n": 1, "name": "Espresso cup"})
        .await
        .unwrap();
    // Written just before the stop: a graceful stop must keep it.
    coll.update_one(doc! {"n": 1}, doc! {"$set": {"name": "Espresso cup (red)"}})
        .await
        .unwrap();

    let t = Instant::now();
    mongo.stop().await;
    eprintln!("stopped in {:?}", t.elapsed());
    assert!(!mongo.is_running());

    // Both a client that was connected and a new one fail within the 2 s selection timeout.
    let t = Instant::now();
    let fresh = mongo.client().await;
    let (old, new) = tokio::join!(ping(&client), ping(&fresh));
    assert!(old.is_err() && new.is_err());
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "took {:?}",
        t.elapsed()
    );

    let t = Instant::now();
    mongo.restart().await;
    eprintln!("restarted in {:?}", t.elapsed());
    assert_eq!(mongo.port(), port);
    // The long-lived client reconnects by itself, as a service's client must.
    ping(&client).await.unwrap();
    assert_eq!(names(&client).await, ["Espresso cup (red)"]);
}

#[tokio::test]
async fn mongo_kill_then_restart_with_sync_on_commit_keeps_data() {
    let mut mongo = MongoServer::start_with_args(&["--sync-on-commit"]).await;
    let client = mongo.client().await;
    let coll = client.database("test").collection::<Document>("products");
    coll.insert_one(doc! {"n": 1, "name": "Cat figurine"})
        .await
        .unwrap();
    mongo.kill().await;
    assert!(!mongo.is_running());
    mongo.restart().await;
    assert_eq!(names(&client).await, ["Cat figurine"]);
}

#[tokio::test]
async fn mongo_servers_are_independent_and_die_on_drop() {
    let (a, b) = tokio::join!(MongoServer::start(), MongoServer::start());
    assert_ne!(a.port(), b.port());
    let (ca, cb) = (a.client().await, b.client().await);
    ca.database("test")
        .collection::<Document>("products")
        .insert_one(doc! {"n": 1, "name": "only in a"})
        .await
        .unwrap();
    assert_eq!(names(&ca).await, ["only in a"]);
    assert!(names(&cb).await.is_empty());

    let port = a.port();
    drop(a);
    // Drop kills and reaps synchronously: the port is closed at once.
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err());
    ping(&cb).await.unwrap();
}

#[tokio::test]
async fn image_server_serves_counts_and_misbehaves_on_request() {
    let images = ImageServer::start().await;
    let http = reqwest::Client::new();
    let png = common::photo_bytes("coffee.png");
    images.put("products/coffee.png", png.clone());

    let url = images.url("products/coffee.png");
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(r.bytes().await.unwrap(), png);
    // The query string is ignored for matching and counting.
    let r = http
        .get(images.url("products/coffee.png?v=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(images.hits("products/coffee.png"), 2);

    images.fail("products/coffee.png", 503);
    assert_eq!(http.get(&url).send().await.unwrap().status(), 503);
    images.clear_behaviour("products/coffee.png");
    assert_eq!(http.get(&url).send().await.unwrap().status(), 200);
    assert_eq!(images.hits("products/coffee.png"), 4);

    images.put_with_type("page.html", "<html></html>", "text/html");
    let r = http.get(images.url("page.html")).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "text/html");

    let r = http.get(images.url("nope.png")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(images.hits("nope.png"), 1);

    images.remove("products/coffee.png");
    assert_eq!(http.get(&url).send().await.unwrap().status(), 404);
    assert_eq!(images.total_hits(), 7);
}

#[tokio::test]
async fn image_server_delays_and_redirects() {
    let images = ImageServer::start().await;
    images.put("slow.jpg", common::jpeg(&common::photo("chelsea.png"), 80));
    images.delay("slow.jpg", Duration::from_millis(400));
    images.redirect("old.jpg", &images.url("slow.jpg"));

    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_redirects
        .get(images.url("old.jpg"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], images.url("slow.jpg").as_str());

    // A delayed path does not hold up the others.
    let t = Instant::now();
    let slow = reqwest::get(images.url("slow.jpg"));
    let fast = reqwest::get(images.url("missing.jpg"));
    let (slow, fast) = tokio::join!(slow, fast);
    assert_eq!(fast.unwrap().status(), 404);
    let slow = slow.unwrap();
    assert_eq!(slow.headers()["content-type"], "image/jpeg");
    assert!(t.elapsed() >= Duration::from_millis(400));

    // A client timeout shorter than the delay fails.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    assert!(impatient
        .get(images.url("slow.jpg"))
        .send()
        .await
        .unwrap_err()
        .is_timeout());

    let url = images.url("slow.jpg");
    drop(images);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(reqwest::get(url).await.is_err(), "still serving after drop");
}
