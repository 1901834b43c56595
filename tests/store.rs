//! The embeddings collection against a real MongoDB-protocol server: one document per
//! product image, a batch of vectors written in one command replaces whatever each image
//! had, the URI's write concern is honoured, and documents of the one-per-product layout
//! are carried over with their vectors.

mod common;

use common::mongo::MongoServer;
use mongodb::bson::{doc, oid::ObjectId, Bson, DateTime, Document};
use search_img::rank::{rank_stream, Ask, VectorCache};
use search_img::store::{encode_vector, Attrs, EmbeddingStore, ImageKey, ProductId};

fn id(n: u8) -> ProductId {
    ProductId::Oid(ObjectId::from_bytes([n; 12]))
}

fn img(n: u8, url: &str) -> ImageKey {
    ImageKey::new(id(n), url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_vectors_replaces_each_images_document_in_one_write() {
    let mongo = MongoServer::start().await;
    let client = mongo.client().await;
    let store = EmbeddingStore::new(&client.database("t"), "emb");
    let (a, a2, b, c) = (
        img(1, "http://x/a.jpg"),
        img(1, "http://x/a2.jpg"),
        img(2, "http://x/b.jpg"),
        img(3, "http://x/c.jpg"),
    );
    // `a` failed before, `b` has another model's vector, `a2` and `c` are new.
    store.put_failure(&a, "m", "404").await.unwrap();
    store
        .put_vectors(&[(&b, &Attrs::default(), &[0.0, 1.0, 0.0])], "old-model")
        .await
        .unwrap();
    let (va, va2, vb, vc) = (
        [1.0f32, 0.0, 0.0],
        [0.0f32, 0.0, 1.0],
        [0.0f32, 1.0, 0.0],
        [0.6f32, 0.8, 0.0],
    );
    let none = Attrs::default();
    let shoes = Attrs {
        categories: vec!["65a1e9c2e4b0a1b2c3d4e5f6".into(), "shoes".into()],
        price: Some(12.5),
    };
    let at = store
        .put_vectors(
            &[
                (&a, &none, &va),
                (&a2, &none, &va2),
                (&b, &none, &vb),
                (&c, &shoes, &vc),
            ],
            "m",
        )
        .await
        .unwrap();

    let metas = store.metas().await.unwrap();
    assert_eq!(metas.len(), 4, "one document per product image");
    assert_eq!(
        metas[&c].attrs, shoes,
        "the filter attributes beside the vector"
    );
    assert_eq!(metas[&a].attrs, none);
    for key in [&a, &a2, &b, &c] {
        let m = &metas[key];
        assert!(m.ok && m.model == "m", "{key:?}: {m:?}");
        assert_eq!(m.updated_at, at);
    }
    // The vectors read back exactly, each product once with its best image, and a
    // failure's error field is gone.
    let mut cache = VectorCache::new("m".into(), 3);
    let n = cache
        .load(store.vectors(None, 100).await.unwrap())
        .await
        .unwrap();
    assert_eq!(n, 4);
    // The cache picks candidates, their stored vectors are ranked exactly (as the
    // service does).
    let q: &[f32] = &[0.6, 0.8, 0.0];
    let query = [q];
    let ask = Ask::one(&query, 3, -1.0);
    let picked = cache.shortlist(ask);
    assert_eq!(
        picked.len(),
        3,
        "the images that can be a top-3 product's best, not a's other one: {picked:?}"
    );
    assert!(!picked.contains(&a2));
    let cursor = store.vectors(Some(&picked), 100).await.unwrap();
    let top = rank_stream(cursor, "m", ask).await.unwrap();
    assert_eq!(top[0].id, c.product);
    assert!((top[0].score - 1.0).abs() < 1e-6);
    let a_rank = top.iter().find(|s| s.id == a.product).unwrap();
    assert_eq!(a_rank.image, a.url, "product 1's better image");
    assert_eq!(top.len(), 3, "three products, not four images");
    let raw = client
        .database("t")
        .collection::<Document>("emb")
        .find_one(doc! { "_id": a.doc_id() })
        .await
        .unwrap()
        .unwrap();
    assert!(raw.get("error").is_none(), "{raw}");
    assert_eq!(raw.get("status"), Some(&Bson::String("ok".into())));
    assert_eq!(raw.get("product"), Some(&a.product.to_bson()));
    // New attributes, same vector, a later time.
    let cheaper = Attrs {
        price: Some(9.0),
        ..shoes.clone()
    };
    let later = store.set_attrs(&[(&c, &cheaper)]).await.unwrap();
    let m = &store.metas().await.unwrap()[&c];
    assert_eq!((&m.attrs, m.updated_at), (&cheaper, later));
    assert!(later >= at);
    let mut reloaded = VectorCache::new("m".into(), 3);
    reloaded
        .load(store.vectors(None, 100).await.unwrap())
        .await
        .unwrap();
    let best = reloaded.shortlist(Ask::one(&query, 1, 0.9));
    assert_eq!(best, std::slice::from_ref(&c), "only one image reaches 0.9");
    // An empty batch writes nothing and is no error; deleting by image leaves the
    // product's other image.
    store.put_vectors(&[], "m").await.unwrap();
    assert_eq!(store.metas().await.unwrap().len(), 4);
    assert_eq!(store.delete(std::slice::from_ref(&a2)).await.unwrap(), 1);
    let metas = store.metas().await.unwrap();
    assert!(metas.contains_key(&a) && !metas.contains_key(&a2));
}

/// Documents written by the one-per-product layout (`_id` = the product's id) become
/// per-image documents with the same vector, model, status and time, nothing else
/// changes, and a crash between the upsert and the delete (both layouts present) heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_one_per_product_layout_is_carried_over_without_recomputing() {
    let mongo = MongoServer::start().await;
    let client = mongo.client().await;
    let db = client.database("t");
    let coll = db.collection::<Document>("emb");
    let at = DateTime::from_millis(1_700_000_000_000);
    let old = |n: u8, url: &str, v: &[f32]| {
        doc! {
            "_id": id(n).to_bson(), "image_url": url, "model": "m", "dim": v.len() as i32,
            "vector": encode_vector(v), "status": "ok", "updated_at": at,
        }
    };
    coll.insert_many([
        old(1, "http://x/a.jpg", &[1.0, 0.0]),
        old(2, "http://x/b.jpg", &[0.0, 1.0]),
        doc! { "_id": "sku-3", "image_url": "http://x/c.jpg", "model": "m",
        "status": "failed", "error": "404", "updated_at": at },
    ])
    .await
    .unwrap();
    let store = EmbeddingStore::new(&db, "emb");
    // As if a crash had come after product 2's upsert and before its delete.
    store
        .put_vectors(
            &[(&img(2, "http://x/b.jpg"), &Attrs::default(), &[0.0, 1.0])],
            "m",
        )
        .await
        .unwrap();
    let before = store.metas().await.unwrap();
    assert_eq!(before.len(), 3, "the duplicate reads as one image");

    assert_eq!(store.migrate_layout().await.unwrap(), 3);
    assert_eq!(store.migrate_layout().await.unwrap(), 0, "idempotent");
    let docs: Vec<Document> = {
        use futures::TryStreamExt;
        coll.find(doc! {})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    };
    assert_eq!(docs.len(), 3, "{docs:?}");
    let a = docs
        .iter()
        .find(|d| d.get("product") == Some(&id(1).to_bson()))
        .unwrap();
    assert_eq!(a.get("_id"), Some(&img(1, "http://x/a.jpg").doc_id()));
    assert_eq!(a.get_datetime("updated_at").unwrap(), &at, "not rewritten");
    assert_eq!(
        a.get("vector"),
        Some(&Bson::Binary(encode_vector(&[1.0, 0.0])))
    );
    let sku = docs
        .iter()
        .find(|d| d.get_str("product") == Ok("sku-3"))
        .unwrap();
    assert_eq!(sku.get_str("status"), Ok("failed"));
    assert_eq!(sku.get_str("error"), Ok("404"));
    let after = store.metas().await.unwrap();
    let sku_key = ImageKey::new(
        ProductId::from_bson(Bson::String("sku-3".into())),
        "http://x/c.jpg",
    );
    assert!(after.contains_key(&sku_key) && !after[&sku_key].ok);
    assert_eq!(after.len(), 3);
    let mut cache = VectorCache::new("m".into(), 2);
    let n = cache
        .load(store.vectors(None, 100).await.unwrap())
        .await
        .unwrap();
    assert_eq!(n, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_concern_the_server_cannot_meet_is_an_error() {
    let mongo = MongoServer::start().await;
    // One node cannot acknowledge for five.
    let client = mongodb::Client::with_uri_str(format!("{}&w=5&wtimeoutMS=2000", mongo.uri()))
        .await
        .unwrap();
    let store = EmbeddingStore::new(&client.database("t"), "emb");
    let key = img(1, "http://x/a.jpg");
    let none = Attrs::default();
    let err = store
        .put_vectors(&[(&key, &none, &[1.0, 0.0])], "m")
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("write concern") || err.to_string().contains("5"),
        "{err}"
    );
    // With the default write concern the same batch is stored.
    let ok = EmbeddingStore::new(&mongo.client().await.database("t"), "emb");
    ok.put_vectors(&[(&key, &none, &[1.0, 0.0])], "m")
        .await
        .unwrap();
}
