//! A catalogue in another shape than the old frontend's, configured only through
//! PRODUCT_IMAGE_FIELD, PRODUCT_FILTER and PRODUCT_FIELDS: Cloudinary-style products
//! (`name`, `price`, `category` as an ObjectId, `image: {url, public_id}`, `images: [..]`,
//! some `isHidden`), several photos each. Real MongoDB-protocol server, real image
//! server, real model.

mod common;

use std::collections::{HashMap, HashSet};

use common::app::{test_vars, TestApp};
use common::images::ImageServer;
use common::mongo::MongoServer;
use common::*;
use mongodb::bson::{doc, oid::ObjectId, Document};
use serde_json::Value;

/// (name, hidden, the photo at `image.url`, the two at `images`): the second of
/// `images` is the first photo again, re-encoded under another URL.
const PRODUCTS: &[(&str, bool, &str, &str)] = &[
    ("Cat figurine", false, "chelsea.png", "rocket.jpg"),
    ("Espresso cup", false, "coffee.png", "hubble_deep_field.jpg"),
    ("Astronaut poster", false, "astronaut.png", "retina.jpg"),
    ("Motorbike", true, "motorcycle_left.png", "ihc.png"),
];

/// The categories: the even products' (the third one keeps it as a string, as some
/// backends do) and the odd ones'.
const CATEGORY_A: &str = "65a1e9c2e4b0a1b2c3d4e5f6";
const CATEGORY_B: &str = "65a1e9c2e4b0a1b2c3d4e5f7";

const CLOUDINARY_VARS: &[(&str, &str)] = &[
    ("PRODUCT_IMAGE_FIELD", "image.url,images"),
    ("CATEGORY_FIELD", "category"),
    ("PRICE_FIELD", "price"),
    ("PRODUCT_FILTER", r#"{"isHidden": {"$ne": true}}"#),
    ("PRODUCT_FIELDS", "_id,name,price,category,image,images"),
    ("CATALOG_SYNC_INTERVAL_SECS", "3600"),
    ("CACHE_SYNC_INTERVAL_SECS", "3600"),
];

/// A fresh database and image server, and the products collection the service reads.
async fn servers() -> (MongoServer, ImageServer, mongodb::Collection<Document>) {
    let mongo = MongoServer::start().await;
    let images = ImageServer::start().await;
    let products = mongo
        .client()
        .await
        .database("test")
        .collection::<Document>("products");
    (mongo, images, products)
}

async fn cloudinary_shop(cache: &str) -> TestApp {
    let (mongo, images, products) = servers().await;
    let mut ids = HashMap::new();
    for (i, (name, hidden, main, other)) in PRODUCTS.iter().enumerate() {
        for file in [main, other] {
            images.put(file, photo_bytes(file));
        }
        let again = format!("again-{main}.jpg");
        images.put(&again, jpeg(&photo(main), 70));
        let category = match i {
            2 => mongodb::bson::Bson::String(CATEGORY_A.into()),
            _ if i % 2 == 0 => ObjectId::parse_str(CATEGORY_A).unwrap().into(),
            _ => ObjectId::parse_str(CATEGORY_B).unwrap().into(),
        };
        let mut d = doc! {
            "name": name,
            "price": 100 * (i as i32 + 1),
            "category": category,
            "image": { "url": images.url(main), "public_id": format!("shop/{i}") },
            "images": [images.url(other), images.url(&again)],
            "isHidden": hidden,
        };
        if i == 0 {
            // Not a URL: a failed image of this product, not an error of the pass.
            d.get_array_mut("images")
                .unwrap()
                .push("/uploads/local.jpg".into());
        }
        let id = products.insert_one(d).await.unwrap().inserted_id;
        ids.insert(name.to_string(), id.as_object_id().unwrap());
    }
    let vars = test_vars(
        &mongo,
        &[CLOUDINARY_VARS, &[("CACHE_PRODUCTS", cache)]].concat(),
    );
    TestApp::serve(mongo, images, vars, ids).await
}

fn names(results: &Value) -> Vec<String> {
    results
        .as_array()
        .unwrap_or_else(|| panic!("not a result array: {results}"))
        .iter()
        .map(|r| r["product"]["name"].as_str().unwrap_or("?").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloudinary_style_catalogue_is_searched_through_every_photo() {
    let mut by_mode = Vec::new();
    for cache in ["false", "true"] {
        let app = cloudinary_shop(cache).await;
        let (code, report) = app.refresh().await;
        assert_eq!(code, 200, "{report}");
        assert_eq!(
            report["total_products"], 3,
            "the hidden one is not searchable"
        );
        assert_eq!(
            report["total_images"], 10,
            "three photos each, and one non-URL"
        );
        assert_eq!(report["indexed_products"], 3, "{report}");
        assert_eq!(report["indexed_images"], 9, "{report}");
        assert_eq!(report["failed"], 1, "{report}");
        let status = app.status().await;
        assert_eq!(status["products_with_features"], 3, "{status}");
        assert_eq!(status["images_with_features"], 9, "{status}");
        assert_eq!(status["failed_images"], 1, "{status}");
        assert_eq!(status["failed_products"], 1, "{status}");

        let mut results = Vec::new();
        for (name, hidden, main, other) in PRODUCTS {
            for file in [main, other] {
                let q = jpeg(&photo(file), 85);
                let (code, body) = app.search_upload(q, "top_k=10&threshold=0").await;
                assert_eq!(code, 200, "{body}");
                let got = names(&body);
                let unique: HashSet<&String> = got.iter().collect();
                assert_eq!(unique.len(), got.len(), "a product twice: {got:?}");
                assert!(!got.contains(&"Motorbike".to_string()), "hidden: {got:?}");
                assert_eq!(got.len(), 3, "cache={cache}: {got:?}");
                if *hidden {
                    continue;
                }
                assert_eq!(got[0], *name, "cache={cache}, query {file}: {got:?}");
                let first = &body[0];
                let matched = first["matched_image"].as_str().unwrap();
                if file == other {
                    assert_eq!(matched, app.images.url(other));
                } else {
                    let again = app.images.url(&format!("again-{main}.jpg"));
                    assert!(
                        matched == app.images.url(main) || matched == again,
                        "{matched}"
                    );
                }
                // The configured fields, as stored.
                assert!(first["product"]["image"]["public_id"].is_string());
                let category = first["product"]["category"].as_str().unwrap();
                assert!([CATEGORY_A, CATEGORY_B].contains(&category), "{first}");
                assert!(first["product"].get("isHidden").is_none());
                results.push(body);
            }
        }
        // Hidden after indexing: gone from the next search, before any pass.
        app.products()
            .update_one(
                doc! { "_id": app.ids["Cat figurine"] },
                doc! { "$set": { "isHidden": true } },
            )
            .await
            .unwrap();
        let (_, body) = app
            .search_upload(jpeg(&photo("chelsea.png"), 85), "top_k=10&threshold=0")
            .await;
        let mut left = names(&body);
        left.sort();
        assert_eq!(left, ["Astronaut poster", "Espresso cup"], "{body}");
        by_mode.push(results);
    }
    // Both ranking modes give the same products, scores and matched images.
    assert_eq!(by_mode[0].len(), by_mode[1].len());
    for (a, b) in by_mode[0].iter().zip(&by_mode[1]) {
        for (x, y) in a.as_array().unwrap().iter().zip(b.as_array().unwrap()) {
            assert_eq!(x["product"]["name"], y["product"]["name"]);
            assert_eq!(x["similarity_score"], y["similarity_score"]);
            let file = |v: &Value| {
                let u = v["matched_image"].as_str().unwrap().to_string();
                u.rsplit('/').next().unwrap().to_string()
            };
            assert_eq!(file(x), file(y));
        }
    }
}

/// `GET /api/v1/products/{id}/similar`: from the stored embeddings (computed first when
/// the product has none yet; no model run once they are), the product itself left out,
/// hidden products never, the same in both ranking modes; 404 for an unknown or hidden
/// product, 409 for one none of whose images can be used, 422 for a bad parameter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn similar_products_come_from_the_stored_embeddings() {
    let mut by_mode = Vec::new();
    for cache in ["false", "true"] {
        let app = cloudinary_shop(cache).await;
        let similar = |id: String, params: &'static str| {
            let app = &app;
            async move {
                app.get(&format!("/api/v1/products/{id}/similar?{params}"))
                    .await
            }
        };
        let cup = app.ids["Espresso cup"].to_hex();
        // The first request of the service: the embeddings are computed first.
        let (code, body) = similar(cup.clone(), "top_k=10&threshold=0").await;
        assert_eq!(code, 200, "{body}");
        let got = names(&body);
        assert_eq!(got.len(), 2, "cache={cache}: {got:?}");
        assert!(
            !got.contains(&"Espresso cup".to_string()),
            "itself: {got:?}"
        );
        assert!(!got.contains(&"Motorbike".to_string()), "hidden: {got:?}");
        for (i, r) in body.as_array().unwrap().iter().enumerate() {
            assert_eq!(r["rank"], i + 1);
            assert!(r["matched_image"].as_str().unwrap().starts_with("http://"));
        }
        // No model run for it now.
        let runs = app.model_runs().await;
        let (code, again) = similar(cup.clone(), "top_k=10&threshold=0").await;
        assert_eq!((code, &again), (200, &body));
        assert_eq!(app.model_runs().await, runs, "no model run");
        let (_, one) = similar(cup.clone(), "top_k=1&threshold=0").await;
        assert_eq!(names(&one), got[..1]);

        for (id, why) in [
            (ObjectId::new().to_hex(), "unknown ObjectId"),
            ("no-such-product".to_string(), "unknown string id"),
            (app.ids["Motorbike"].to_hex(), "hidden"),
        ] {
            let (code, body) = similar(id, "").await;
            assert_eq!(code, 404, "{why}: {body}");
            assert!(body["detail"]
                .as_str()
                .unwrap()
                .contains("no searchable product"));
        }
        let (code, body) = similar(cup.clone(), "top_k=0").await;
        assert_eq!(code, 422, "{body}");
        assert!(body["detail"].as_str().unwrap().contains("top_k"), "{body}");

        // A product whose only photo cannot be fetched: 409, with a detail.
        let broken = app
            .products()
            .insert_one(
                doc! { "name": "Broken", "image": { "url": app.images.url("missing.jpg") } },
            )
            .await
            .unwrap()
            .inserted_id
            .as_object_id()
            .unwrap();
        let (code, body) = similar(broken.to_hex(), "").await;
        assert_eq!(code, 409, "{body}");
        assert!(
            body["detail"].as_str().unwrap().contains("not computed"),
            "{body}"
        );
        by_mode.push(body_scores(&body_of(&app, &cup).await));
    }
    assert_eq!(by_mode[0], by_mode[1], "both ranking modes");
}

async fn body_of(app: &TestApp, id: &str) -> Value {
    app.get(&format!(
        "/api/v1/products/{id}/similar?top_k=10&threshold=0"
    ))
    .await
    .1
}

fn body_scores(body: &Value) -> Vec<(String, String, String)> {
    body.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let file = r["matched_image"].as_str().unwrap();
            (
                r["product"]["name"].as_str().unwrap().to_string(),
                r["similarity_score"].to_string(),
                file.rsplit('/').next().unwrap().to_string(),
            )
        })
        .collect()
}

/// An upgrade: the embeddings collection as the one-per-product version wrote it
/// (`_id` = the product's `_id`, no `product` field) is carried over by the first pass
/// of the new version: nothing fetched or embedded again, the same results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_carries_the_old_layout_over_without_recomputing() {
    let app = TestApp::start(&[("CATALOG_SYNC_INTERVAL_SECS", "0")]).await;
    let (code, first) = app.refresh().await;
    assert_eq!(code, 200, "{first}");
    let q = || jpeg(&photo("coffee.png"), 85);
    let (_, before) = app.search_upload(q(), "top_k=5&threshold=0").await;
    // Rewrite every document in the old layout.
    let docs = app.embedding_docs(doc! {}).await;
    assert_eq!(docs.len(), common::app::CATALOGUE.len());
    app.embeddings().delete_many(doc! {}).await.unwrap();
    let old: Vec<Document> = docs
        .into_iter()
        .map(|mut d| {
            let product = d.remove("product").unwrap();
            d.insert("_id", product);
            d
        })
        .collect();
    app.embeddings().insert_many(old).await.unwrap();

    let (fetches, runs) = (app.images.total_hits(), app.model_runs().await);
    let app = app.restart_service().await;
    let (code, report) = app.refresh().await;
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["embedded"], 0, "{report}");
    assert_eq!(report["removed"], 0, "{report}");
    assert_eq!(report["indexed_products"], first["indexed_products"]);
    assert_eq!(app.images.total_hits(), fetches, "no photo fetched again");
    let docs = app.embedding_docs(doc! {}).await;
    assert!(
        docs.iter()
            .all(|d| d.contains_key("product") && d.get_str("_id").is_ok()),
        "every document in the new layout"
    );
    let (_, after) = app.search_upload(q(), "top_k=5&threshold=0").await;
    assert_eq!(after, before);
    // The new service ran the model for the query only.
    assert!(app.model_runs().await <= 1, "{runs} before");
}

/// The request filters, on both searches and on similar, in both ranking modes: applied
/// before the cut (top_k=1 in a category gives its best product, not an empty list),
/// ObjectId and string forms of a category both match, and a new price is seen after
/// one pass without embedding anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn category_and_price_filters_apply_before_the_cut() {
    for cache in ["false", "true"] {
        let app = cloudinary_shop(cache).await;
        let (code, report) = app.refresh().await;
        assert_eq!(code, 200, "{report}");
        let cat = jpeg(&photo("chelsea.png"), 85);
        let found = |params: String| {
            let (app, q) = (&app, cat.clone());
            async move {
                let (code, body) = app.search_upload(q, &format!("threshold=0&{params}")).await;
                assert_eq!(code, 200, "{params}: {body}");
                let mut got = names(&body);
                got.sort();
                got
            }
        };
        let a_and_b = format!("category={CATEGORY_A},{CATEGORY_B}");
        for (params, want) in [
            (
                format!("category={CATEGORY_A}"),
                vec!["Astronaut poster", "Cat figurine"],
            ),
            (format!("category={CATEGORY_B}"), vec!["Espresso cup"]),
            (
                format!("category={CATEGORY_B}&top_k=1"),
                vec!["Espresso cup"],
            ),
            (
                a_and_b.clone(),
                vec!["Astronaut poster", "Cat figurine", "Espresso cup"],
            ),
            (
                format!("category={CATEGORY_A}&category=none"),
                vec!["Astronaut poster", "Cat figurine"],
            ),
            ("category=none".into(), vec![]),
            (
                "min_price=150&max_price=350".into(),
                vec!["Astronaut poster", "Espresso cup"],
            ),
            ("max_price=100".into(), vec!["Cat figurine"]),
            (
                format!("min_price=250&category={CATEGORY_A}"),
                vec!["Astronaut poster"],
            ),
        ] {
            assert_eq!(found(params.clone()).await, want, "cache={cache}: {params}");
        }
        // The JSON body of /search/url takes the same filters.
        let r = app
            .http
            .post(app.url("/api/v1/search/url"))
            .json(&serde_json::json!({
                "image_url": app.images.url("chelsea.png"), "threshold": 0,
                "category": [CATEGORY_A, CATEGORY_B], "min_price": 150,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let mut got = names(&r.json().await.unwrap());
        got.sort();
        assert_eq!(got, ["Astronaut poster", "Espresso cup"], "cache={cache}");
        // Similar takes them too.
        let cat_id = app.ids["Cat figurine"].to_hex();
        let (code, body) = app
            .get(&format!(
                "/api/v1/products/{cat_id}/similar?threshold=0&category={CATEGORY_B}"
            ))
            .await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(names(&body), ["Espresso cup"]);

        // A new price and a new category: seen after one pass, nothing embedded for them.
        let runs = app.model_runs().await;
        app.products()
            .update_one(
                doc! { "_id": app.ids["Espresso cup"] },
                doc! { "$set": { "price": 1000 } },
            )
            .await
            .unwrap();
        app.products()
            .update_one(
                doc! { "_id": app.ids["Cat figurine"] },
                doc! { "$set": { "category": [ObjectId::parse_str(CATEGORY_B).unwrap()] } },
            )
            .await
            .unwrap();
        let (code, report) = app.refresh().await;
        assert_eq!(code, 200, "{report}");
        assert_eq!(report["embedded"], 0, "{report}");
        assert_eq!(report["retagged"], 6, "their three images each: {report}");
        assert_eq!(app.model_runs().await, runs, "no model run");
        assert_eq!(
            found("min_price=900".into()).await,
            ["Espresso cup"],
            "cache={cache}"
        );
        assert!(found("max_price=300".into())
            .await
            .iter()
            .all(|n| n != "Espresso cup"));
        assert_eq!(
            found(format!("category={CATEGORY_B}")).await,
            ["Cat figurine", "Espresso cup"],
            "cache={cache}"
        );
        assert_eq!(
            found(format!("category={CATEGORY_A}")).await,
            ["Astronaut poster"],
            "cache={cache}"
        );
    }
}

/// MAX_PRODUCTS counts products that have a photo at PRODUCT_IMAGE_FIELD (and match
/// PRODUCT_FILTER): one without (null, empty, missing) takes no place under the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_products_counts_only_products_with_a_photo() {
    let (mongo, images, products) = servers().await;
    let mut ids = HashMap::new();
    // First by _id: three without a photo, then the catalogue.
    for photo in [mongodb::bson::Bson::Null, "".into(), "  ".into()] {
        products
            .insert_one(doc! { "productName": "no photo", "productImage": photo })
            .await
            .unwrap();
    }
    products
        .insert_one(doc! { "productName": "none at all" })
        .await
        .unwrap();
    for (name, file) in common::app::CATALOGUE {
        images.put(file, photo_bytes(file));
        let d = common::app::product_doc(name, &images.url(file));
        let id = products.insert_one(d).await.unwrap().inserted_id;
        ids.insert(name.to_string(), id.as_object_id().unwrap());
    }
    let vars = test_vars(&mongo, &[("MAX_PRODUCTS", "3")]);
    let app = TestApp::serve(mongo, images, vars, ids).await;
    let (code, report) = app.refresh().await;
    assert_eq!(code, 200, "{report}");
    // The blank one ("  ") takes a place: a string is only trimmed when it is read.
    assert_eq!(report["total_products"], 2, "{report}");
    assert_eq!(report["indexed_products"], 2, "{report}");
    let (_, body) = app
        .search_upload(jpeg(&photo("coffee.png"), 85), "top_k=10&threshold=0")
        .await;
    let mut got = app.names(&body);
    got.sort();
    let mut want: Vec<String> = common::app::CATALOGUE[..2]
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    want.sort();
    assert_eq!(got, want);
}
