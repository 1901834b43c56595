//! VECTOR_SEARCH=atlas. Against the local server (which, as a mongod without a search
//! process, answers the search commands with an error): searches rank exactly and
//! `/api/v1/status` says why. Against a real Atlas cluster, when `ATLAS_TEST_URI` is set
//! (run it outside the test network namespace, which only has loopback): the service's
//! own index is created, becomes queryable, and ranks as exact search does, filters
//! and the left-out product included. The stage and index definitions themselves are
//! checked against the documented syntax in src/atlas.rs's unit tests.

mod common;

use std::time::{Duration, Instant};

use common::app::TestApp;
use mongodb::bson::{doc, oid::ObjectId, Document};
use search_img::rank::{Ask, Filter};
use search_img::store::{encode_vector, EmbeddingStore, ProductId};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_vector_search_on_the_server_searches_rank_exactly_and_status_says_why() {
    let app = TestApp::start(&[("VECTOR_SEARCH", "atlas")]).await;
    let exact = TestApp::start(&[]).await;
    let query = app.images.url("coffee.png");
    let (code, first) = app.search_url(&query, "&threshold=0").await;
    assert_eq!(code, 200, "{first}");
    assert_eq!(app.names(&first)[0], "Espresso cup");

    // The background check finds the server has no vector search.
    let start = Instant::now();
    let vs = loop {
        let vs = app.status().await["vector_search"].clone();
        if vs["state"] == "unavailable" {
            break vs;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{vs}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(vs["mode"], "atlas");
    assert_eq!(vs["index"], "search_img_vectors");
    let reason = vs["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("Atlas"), "{vs}");

    // Searches go on ranking exactly: the same results and scores as VECTOR_SEARCH=exact.
    let (code, again) = app.search_url(&query, "&threshold=0").await;
    assert_eq!(code, 200, "{again}");
    let (code, theirs) = exact
        .search_url(&exact.images.url("coffee.png"), "&threshold=0")
        .await;
    assert_eq!(code, 200, "{theirs}");
    let scores = |v: &Value| -> Vec<(String, f64)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let name = r["product"]["productName"].as_str().unwrap().to_string();
                (
                    name,
                    (r["similarity_score"].as_f64().unwrap() * 1e4).round(),
                )
            })
            .collect()
    };
    assert_eq!(scores(&again), scores(&first));
    assert_eq!(scores(&again), scores(&theirs));
    let status = exact.status().await;
    assert_eq!(status["vector_search"]["mode"], "exact");
    assert_eq!(status["vector_search"]["state"], "off");
}

/// Unit vectors of `dim` dimensions from a small deterministic generator.
fn vectors(n: usize, dim: usize, mut seed: u64) -> Vec<Vec<f32>> {
    (0..n)
        .map(|_| {
            let v: Vec<f32> = (0..dim)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
                })
                .collect();
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / n).collect()
        })
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_a_real_atlas_cluster_when_atlas_test_uri_is_set() {
    let Ok(uri) = std::env::var("ATLAS_TEST_URI") else {
        eprintln!("skipped: ATLAS_TEST_URI is not set (a MongoDB Atlas connection string)");
        return;
    };
    let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
    let db = client.database(&format!("search_img_test_{}", ObjectId::new().to_hex()));
    let coll = db.collection::<Document>("embeddings");
    let (dim, n, model) = (16, 300, "test-model@0123456789abcdef");
    let vs = vectors(n, dim, 7);
    let products: Vec<ObjectId> = (0..n).map(|_| ObjectId::new()).collect();
    let docs: Vec<Document> = (0..n)
        .map(|i| {
            doc! {
                "_id": format!("{} https://shop.test/{i}.jpg", products[i].to_hex()),
                "product": products[i],
                "image_url": format!("https://shop.test/{i}.jpg"),
                "model": model, "dim": dim as i32,
                "vector": encode_vector(&vs[i]),
                "category": [format!("c{}", i % 3)],
                "price": (i * 10) as f64,
                "status": "ok",
            }
        })
        .collect();
    coll.insert_many(docs).await.unwrap();
    let atlas = EmbeddingStore::new(&db, "embeddings").atlas("search_img_test");
    let start = Instant::now();
    while !atlas.queryable(dim) {
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "not queryable after 10 min: {:?}",
            atlas.status()
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let q = vectors(1, dim, 99).remove(0);
    let queries = [q.as_slice()];
    let filter = Filter::new(vec!["c1".into()], Some(500.0), None);
    let exclude = ProductId::from_bson(products[1].into());
    for (f, ex) in [(None, None), (Some(&filter), Some(&exclude))] {
        let ask = Ask {
            queries: &queries,
            k: 5,
            threshold: -1.0,
            exclude: ex,
            filter: f,
        };
        let got = atlas.rank(model, ask).await.unwrap();
        let mut want: Vec<(usize, f32)> = (0..n)
            .filter(|&i| f.is_none_or(|_| i % 3 == 1 && i * 10 >= 500) && ex.is_none_or(|_| i != 1))
            .map(|i| (i, dot(&q, &vs[i])))
            .collect();
        want.sort_by(|a, b| b.1.total_cmp(&a.1));
        want.truncate(5);
        assert_eq!(got.len(), 5);
        for (g, (i, cos)) in got.iter().zip(&want) {
            assert_eq!(g.id, ProductId::from_bson(products[*i].into()));
            assert!((g.score - cos).abs() < 1e-3, "{} vs {cos}", g.score);
        }
    }
    db.drop().await.unwrap();
}
