//! The service under test, for real: a SecantusDB process, an image server on 127.0.0.1,
//! the real model, and the app served over HTTP on 127.0.0.1:0.

use std::collections::HashMap;
use std::time::Duration;

use mongodb::bson::{doc, oid::ObjectId, DateTime, Document};
use search_img::config::Config;
use search_img::service::AppState;
use serde_json::Value;

use super::images::ImageServer;
use super::mongo::MongoServer;

/// Product photos of the test catalogue: real photos from scikit-image's wheel.
pub const CATALOGUE: &[(&str, &str)] = &[
    ("Cat figurine", "chelsea.png"),
    ("Espresso cup", "coffee.png"),
    ("Astronaut poster", "astronaut.png"),
    ("Rocket model", "rocket.jpg"),
    ("Motorbike", "motorcycle_left.png"),
    ("Galaxy print", "hubble_deep_field.jpg"),
    ("Retina art", "retina.jpg"),
    ("Tissue slide", "ihc.png"),
];

pub struct TestApp {
    pub mongo: MongoServer,
    pub images: ImageServer,
    pub state: AppState,
    /// The test's own connection to the service's database (`test`).
    pub db: mongodb::Database,
    pub base: String,
    pub http: reqwest::Client,
    /// Product name -> _id.
    pub ids: HashMap<String, ObjectId>,
    pub vars: Vec<(String, String)>,
    server: AbortOnDrop,
}

/// Stops the served app when the test app goes away.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The configuration tests run with; `extra` overrides.
pub fn test_vars(mongo: &MongoServer, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let model = super::model("efficientnet-lite0");
    let mut vars: HashMap<String, String> = [
        ("MONGO_URI", mongo.uri()),
        ("MODEL_PATH", model.display().to_string()),
        ("ALLOW_PRIVATE_IMAGE_HOSTS", "true".into()),
        ("CATALOG_SYNC_INTERVAL_SECS", "0".into()),
        ("ORT_INTRA_THREADS", "1".into()),
        ("MONGO_TIMEOUT_SECS", "2".into()),
        // A pass before every search, as the tests expect; tests/changes.rs follows the
        // change stream.
        ("CATALOG_CHANGE_STREAM", "false".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in extra {
        vars.insert(k.to_string(), v.to_string());
    }
    vars.into_iter().collect()
}

/// A product document as the shop's mongoose backend writes it.
pub fn product_doc(name: &str, image_url: &str) -> Document {
    let at = DateTime::from_millis(1_735_795_001_123);
    doc! {
        "productName": name,
        "productPrice": 250000,
        "productImage": image_url,
        "productCategory": ObjectId::parse_str("65a1e9c2e4b0a1b2c3d4e5f6").unwrap(),
        "productSize": 18,
        "productDescription": format!("{name}, handmade"),
        "averageRating": 4.5,
        "totalRatings": 12,
        "productQuantity": 7,
        "productDiscount": 10,
        "isHidden": false,
        "createdAt": at,
        "updatedAt": at,
        "__v": 0,
    }
}

impl TestApp {
    /// Mongo + image server + the catalogue seeded + the service serving.
    pub async fn start(extra: &[(&str, &str)]) -> TestApp {
        Self::start_on(MongoServer::start().await, extra).await
    }

    /// Like [`start`](Self::start) on a server already started.
    pub async fn start_on(mongo: MongoServer, extra: &[(&str, &str)]) -> TestApp {
        let images = ImageServer::start().await;
        let vars = test_vars(&mongo, extra);
        let client = mongo.client().await;
        let products = client.database("test").collection::<Document>("products");
        let mut ids = HashMap::new();
        for (name, file) in CATALOGUE {
            images.put(file, super::photo_bytes(file));
            let id = products
                .insert_one(product_doc(name, &images.url(file)))
                .await
                .unwrap()
                .inserted_id
                .as_object_id()
                .unwrap();
            ids.insert(name.to_string(), id);
        }
        Self::serve(mongo, images, vars, ids).await
    }

    pub async fn serve(
        mongo: MongoServer,
        images: ImageServer,
        vars: Vec<(String, String)>,
        ids: HashMap<String, ObjectId>,
    ) -> TestApp {
        let state = AppState::new(Config::from_vars(vars.clone()).unwrap())
            .await
            .unwrap();
        state.warm_up().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = search_img::http::app(state.clone());
        let server = AbortOnDrop(tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        }));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .no_proxy()
            .build()
            .unwrap();
        let db = mongo.client().await.database("test");
        TestApp {
            mongo,
            images,
            state,
            db,
            base,
            http,
            ids,
            vars,
            server,
        }
    }

    /// Stops serving and starts a new service on the same database and images, as a
    /// process restart would.
    pub async fn restart_service(self) -> TestApp {
        let (mongo, images, vars, ids) = self.stop_service().await;
        Self::serve(mongo, images, vars, ids).await
    }

    /// Stops the service (its background tasks too) and hands back what
    /// [`serve`](Self::serve) starts the next one with.
    pub async fn stop_service(
        self,
    ) -> (
        MongoServer,
        ImageServer,
        Vec<(String, String)>,
        HashMap<String, ObjectId>,
    ) {
        let TestApp {
            mongo,
            images,
            vars,
            ids,
            server,
            state,
            ..
        } = self;
        drop((server, state));
        // The aborted tasks are dropped by the runtime at their next turn.
        tokio::time::sleep(Duration::from_millis(300)).await;
        (mongo, images, vars, ids)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn products(&self) -> mongodb::Collection<Document> {
        self.db.collection("products")
    }

    /// The service's own collection of embeddings.
    pub fn embeddings(&self) -> mongodb::Collection<Document> {
        self.db.collection("product_embeddings")
    }

    /// Every embedding document matching `filter`.
    pub async fn embedding_docs(&self, filter: Document) -> Vec<Document> {
        super::mongo::embedding_docs(&self.db, filter).await
    }

    /// `POST /api/v1/search/url` with query parameters; returns (status, body).
    pub async fn search_url(&self, image_url: &str, params: &str) -> (u16, Value) {
        let url = format!(
            "{}/api/v1/search/url?image_url={}{}",
            self.base,
            urlencode(image_url),
            params
        );
        let r = self.http.post(url).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// `POST /api/v1/search/image` with the bytes in the multipart field `file`.
    pub async fn search_upload(&self, bytes: Vec<u8>, params: &str) -> (u16, Value) {
        let form = reqwest::multipart::Form::new().part(
            "file",
            reqwest::multipart::Part::bytes(bytes).file_name("query.jpg"),
        );
        let r = self
            .http
            .post(format!("{}/api/v1/search/image?{}", self.base, params))
            .multipart(form)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// `POST /api/v1/refresh`; returns (status, body).
    pub async fn refresh(&self) -> (u16, Value) {
        let r = self
            .http
            .post(self.url("/api/v1/refresh"))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(self.url(path)).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    pub async fn status(&self) -> Value {
        let (code, body) = self.get("/api/v1/status").await;
        assert_eq!(code, 200, "{body}");
        body
    }

    pub async fn model_runs(&self) -> u64 {
        self.status().await["model_runs"].as_u64().unwrap()
    }

    /// Names of the products in a result array, best first.
    pub fn names(&self, results: &Value) -> Vec<String> {
        results
            .as_array()
            .unwrap_or_else(|| panic!("not a result array: {results}"))
            .iter()
            .map(|r| {
                r["product"]["productName"]
                    .as_str()
                    .unwrap_or("?")
                    .to_string()
            })
            .collect()
    }
}

pub fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
