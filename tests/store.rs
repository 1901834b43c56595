//! The embeddings collection against a real MongoDB-protocol server: a batch of vectors
//! written in one command replaces whatever each product had, and honours the URI's
//! write concern.

mod common;

use common::mongo::MongoServer;
use mongodb::bson::{oid::ObjectId, Bson};
use search_img::rank::VectorCache;
use search_img::store::{EmbeddingStore, ProductId};

fn id(n: u8) -> ProductId {
    ProductId::Oid(ObjectId::from_bytes([n; 12]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_vectors_replaces_each_products_document_in_one_write() {
    let mongo = MongoServer::start().await;
    let client = mongo.client().await;
    let store = EmbeddingStore::new(&client.database("t"), "emb");
    let (a, b, c) = (id(1), id(2), id(3));
    // `a` failed before, `b` has another model's vector, `c` is new.
    store
        .put_failure(&a, "http://x/a.jpg", "m", "404")
        .await
        .unwrap();
    store
        .put_vectors(&[(&b, "http://x/b.jpg", &[0.0, 1.0, 0.0])], "old-model")
        .await
        .unwrap();
    let (va, vb, vc) = ([1.0f32, 0.0, 0.0], [0.0f32, 1.0, 0.0], [0.6f32, 0.8, 0.0]);
    let at = store
        .put_vectors(
            &[
                (&a, "http://x/a2.jpg", &va),
                (&b, "http://x/b.jpg", &vb),
                (&c, "http://x/c.jpg", &vc),
            ],
            "m",
        )
        .await
        .unwrap();

    let metas = store.metas().await.unwrap();
    assert_eq!(metas.len(), 3, "one document per product");
    for (p, url) in [
        (&a, "http://x/a2.jpg"),
        (&b, "http://x/b.jpg"),
        (&c, "http://x/c.jpg"),
    ] {
        let m = &metas[p];
        assert!(m.ok && m.model == "m" && m.image_url == url, "{p}: {m:?}");
        assert_eq!(m.updated_at, at);
    }
    // The vectors read back exactly, and a failure's error field is gone.
    let mut cache = VectorCache::new("m".into(), 3);
    let n = cache
        .load(store.vectors("m", None, 100).await.unwrap())
        .await
        .unwrap();
    assert_eq!(n, 3);
    let top = cache.rank(&[0.6, 0.8, 0.0], 3, -1.0);
    assert_eq!(top[0].id, c);
    assert!((top[0].score - 1.0).abs() < 1e-6);
    let raw = client
        .database("t")
        .collection::<mongodb::bson::Document>("emb")
        .find_one(mongodb::bson::doc! { "_id": a.to_bson() })
        .await
        .unwrap()
        .unwrap();
    assert!(raw.get("error").is_none(), "{raw}");
    assert_eq!(raw.get("status"), Some(&Bson::String("ok".into())));
    // An empty batch writes nothing and is no error.
    store.put_vectors(&[], "m").await.unwrap();
    assert_eq!(store.metas().await.unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_concern_the_server_cannot_meet_is_an_error() {
    let mongo = MongoServer::start().await;
    // One node cannot acknowledge for five.
    let client = mongodb::Client::with_uri_str(format!("{}&w=5&wtimeoutMS=2000", mongo.uri()))
        .await
        .unwrap();
    let store = EmbeddingStore::new(&client.database("t"), "emb");
    let err = store
        .put_vectors(&[(&id(1), "http://x/a.jpg", &[1.0, 0.0])], "m")
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("write concern") || err.to_string().contains("5"),
        "{err}"
    );
    // With the default write concern the same batch is stored.
    let ok = EmbeddingStore::new(&mongo.client().await.database("t"), "emb");
    ok.put_vectors(&[(&id(1), "http://x/a.jpg", &[1.0, 0.0])], "m")
        .await
        .unwrap();
}
