//! MongoDB Atlas Vector Search (`VECTOR_SEARCH=atlas`): ranking by a `$vectorSearch`
//! stage on the embeddings collection instead of reading every vector.
//!
//! The service creates its vector search index when it is missing (or updates it when the
//! model's dimensions changed), ranks exactly until Atlas says the index is queryable,
//! then ranks through it. A server without search (a plain mongod, the local test server)
//! answers the search commands with an error: that is shown in `/api/v1/status` and
//! searches rank exactly, checking again now and then.
//!
//! Scores: the index uses the `cosine` similarity, for which Atlas returns
//! `(1 + cosine) / 2`; `cosine_from_score` turns it back, so `threshold` means the same
//! in every mode.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::{Collection, Database};

use crate::rank::{Ask, Filter, Scored, TopK};
use crate::store::{encode_vector, ProductId};

/// Atlas's upper bound on `numCandidates` (and so on `limit`).
pub const MAX_CANDIDATES: usize = 10_000;
/// Candidates per result asked for, as Atlas advises for recall close to exact search.
const CANDIDATES_PER_RESULT: usize = 20;
/// Images asked per product wanted: a product with several photos can take several of
/// the nearest images, and each product is kept once.
const IMAGES_PER_PRODUCT: usize = 3;
/// How often to look at the index again while it is not queryable (building, or the
/// server has no search).
const RECHECK: Duration = Duration::from_secs(30);

/// The fields the index filters on: the model identity and status (every query), the
/// request filters (category, price) and the product left out of its own similar list.
const FILTER_FIELDS: [&str; 5] = ["model", "status", "category", "price", "product"];

/// What `/api/v1/status` shows of vector search.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct AtlasStatus {
    /// `exact` (VECTOR_SEARCH=exact) or `atlas`.
    pub mode: &'static str,
    /// With `atlas`: `checking`, `building` (ranking exactly meanwhile), `ready`, or
    /// `unavailable` (the server has no vector search, or the index failed: see reason).
    pub state: &'static str,
    pub index: Option<String>,
    pub reason: Option<String>,
}

/// The `createSearchIndexes` index document: the vector path, its dimensions, the
/// similarity, and the filter fields.
pub fn index_definition(name: &str, dim: usize) -> Document {
    doc! { "name": name, "type": "vectorSearch", "definition": definition(dim) }
}

fn definition(dim: usize) -> Document {
    let mut fields = vec![Bson::Document(doc! {
        "type": "vector",
        "path": "vector",
        "numDimensions": dim as i64,
        "similarity": "cosine",
    })];
    fields.extend(
        FILTER_FIELDS
            .iter()
            .map(|p| Bson::Document(doc! { "type": "filter", "path": *p })),
    );
    doc! { "fields": fields }
}

/// Images asked of `$vectorSearch` (its `limit`) for `k` products, and its
/// `numCandidates`: about 20 times that, within Atlas's bound.
pub fn limits(k: usize) -> (usize, usize) {
    let limit = (k.max(1) * IMAGES_PER_PRODUCT).min(MAX_CANDIDATES);
    (limit, (limit * CANDIDATES_PER_RESULT).min(MAX_CANDIDATES))
}

/// The `$vectorSearch` pre-filter: this model's usable vectors, the request filters,
/// and not the product `exclude`.
pub fn filter(model: &str, f: Option<&Filter>, exclude: Option<&ProductId>) -> Document {
    let mut all = vec![
        Bson::Document(doc! { "model": { "$eq": model } }),
        Bson::Document(doc! { "status": { "$eq": "ok" } }),
    ];
    if let Some(f) = f {
        if !f.categories.is_empty() {
            all.push(Bson::Document(
                doc! { "category": { "$in": &f.categories } },
            ));
        }
        if let Some(min) = f.min_price {
            all.push(Bson::Document(doc! { "price": { "$gte": min } }));
        }
        if let Some(max) = f.max_price {
            all.push(Bson::Document(doc! { "price": { "$lte": max } }));
        }
    }
    if let Some(p) = exclude {
        all.push(Bson::Document(doc! { "product": { "$ne": p.to_bson() } }));
    }
    doc! { "$and": all }
}

/// The pipeline for one query vector: `$vectorSearch` (the vector in the stored vectors'
/// BSON type, binary subtype 9 float32: a query of another type matches nothing, without
/// an error), then each product once, with its best image (on equal scores the smaller
/// URL, as exact ranking), best first.
pub fn pipeline(index: &str, query: &[f32], model: &str, ask: &Ask<'_>) -> Vec<Document> {
    let (limit, candidates) = limits(ask.k);
    vec![
        doc! { "$vectorSearch": {
            "index": index,
            "path": "vector",
            "queryVector": encode_vector(query),
            "numCandidates": candidates as i64,
            "limit": limit as i64,
            "filter": filter(model, ask.filter, ask.exclude),
        } },
        doc! { "$project": {
            "_id": 0, "product": 1, "image_url": 1, "score": { "$meta": "vectorSearchScore" },
        } },
        doc! { "$sort": { "score": -1, "image_url": 1 } },
        doc! { "$group": {
            "_id": "$product",
            "score": { "$first": "$score" },
            "image_url": { "$first": "$image_url" },
        } },
        doc! { "$sort": { "score": -1, "image_url": 1 } },
        doc! { "$limit": ask.k as i64 },
    ]
}

/// Atlas's score for the `cosine` similarity, `(1 + cosine) / 2`, back to the cosine.
pub fn cosine_from_score(score: f64) -> f32 {
    (2.0 * score - 1.0) as f32
}

pub struct AtlasSearch {
    db: Database,
    coll: Collection<Document>,
    index: String,
    state: Mutex<State>,
}

struct State {
    status: &'static str,
    reason: Option<String>,
    /// The dimensions the index was found queryable for.
    ready_dim: Option<usize>,
    checked: Option<Instant>,
    checking: bool,
}

impl AtlasSearch {
    pub fn new(db: &Database, collection: &str, index: &str) -> Arc<Self> {
        Arc::new(Self {
            db: db.clone(),
            coll: db.collection(collection),
            index: index.to_string(),
            state: Mutex::new(State {
                status: "checking",
                reason: None,
                ready_dim: None,
                checked: None,
                checking: false,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> AtlasStatus {
        let s = self.lock();
        AtlasStatus {
            mode: "atlas",
            state: s.status,
            index: Some(self.index.clone()),
            reason: s.reason.clone(),
        }
    }

    /// Whether searches of a `dim`-dimensional model may rank through the index now.
    /// Never waits: while it is not known to be, a check (creating or updating the
    /// index as needed) starts in the background every RECHECK.
    pub fn queryable(self: &Arc<Self>, dim: usize) -> bool {
        let mut s = self.lock();
        if s.ready_dim == Some(dim) {
            return true;
        }
        let due = s.checked.is_none_or(|t| t.elapsed() >= RECHECK);
        if due && !s.checking {
            s.checking = true;
            let this = self.clone();
            tokio::spawn(async move {
                let outcome = this.check(dim).await;
                this.record(dim, outcome);
            });
        }
        false
    }

    /// What a check found, for the next searches and the status.
    fn record(&self, dim: usize, outcome: Result<Ready, String>) {
        let mut s = self.lock();
        (s.checking, s.checked) = (false, Some(Instant::now()));
        let (status, reason) = match outcome {
            Ok(Ready::Yes) => {
                tracing::info!(index = %self.index, "ranking with Atlas Vector Search");
                ("ready", None)
            }
            Ok(Ready::Building(why)) => ("building", Some(why)),
            Err(why) => {
                if s.reason.as_deref() != Some(why.as_str()) {
                    tracing::warn!(reason = %why, "no Atlas Vector Search: ranking exactly");
                }
                ("unavailable", Some(why))
            }
        };
        s.ready_dim = (status == "ready").then_some(dim);
        (s.status, s.reason) = (status, reason);
    }

    /// Looks the index up; creates it when missing, updates it when its dimensions are
    /// not the model's. Err: why vector search cannot be used (the server's answer).
    async fn check(&self, dim: usize) -> Result<Ready, String> {
        let found: Vec<Document> = self
            .coll
            .aggregate([doc! { "$listSearchIndexes": { "name": &self.index } }])
            .await
            .map_err(|e| e.to_string())?
            .try_collect()
            .await
            .map_err(|e| e.to_string())?;
        let Some(index) = found.into_iter().next() else {
            self.command(doc! {
                "createSearchIndexes": self.coll.name(),
                "indexes": [index_definition(&self.index, dim)],
            })
            .await?;
            tracing::info!(index = %self.index, dim, "created the Atlas vector search index");
            return Ok(Ready::Building(
                "index created; Atlas is building it".into(),
            ));
        };
        let dims = index
            .get_document("latestDefinition")
            .ok()
            .and_then(|d| d.get_array("fields").ok())
            .and_then(|f| {
                f.iter()
                    .filter_map(Bson::as_document)
                    .find(|f| f.get_str("type") == Ok("vector"))
                    .and_then(|f| f.get("numDimensions").cloned())
            });
        let dims = dims.and_then(|d| match d {
            Bson::Int32(n) => Some(n as usize),
            Bson::Int64(n) => Some(n as usize),
            Bson::Double(n) => Some(n as usize),
            _ => None,
        });
        if dims != Some(dim) {
            self.command(doc! {
                "updateSearchIndex": self.coll.name(),
                "name": &self.index,
                "definition": definition(dim),
            })
            .await?;
            tracing::info!(index = %self.index, from = ?dims, to = dim, "updated the Atlas vector search index to the model's dimensions");
            return Ok(Ready::Building(format!(
                "index updated from {dims:?} to {dim} dimensions; Atlas is rebuilding it"
            )));
        }
        let status = index.get_str("status").unwrap_or("unknown");
        if index.get_bool("queryable") == Ok(true) {
            return Ok(Ready::Yes);
        }
        if status == "FAILED" {
            return Err(format!("the index {} failed to build", self.index));
        }
        Ok(Ready::Building(format!("index status {status}")))
    }

    /// A `$vectorSearch` failed although the index was queryable: rank exactly and
    /// look at the index again.
    pub fn failed(&self, e: &mongodb::error::Error) {
        tracing::warn!(error = %e, "Atlas Vector Search failed: ranking exactly");
        let mut s = self.lock();
        s.ready_dim = None;
        s.checked = None;
        (s.status, s.reason) = ("unavailable", Some(format!("$vectorSearch failed: {e}")));
    }

    async fn command(&self, cmd: Document) -> Result<(), String> {
        self.db
            .run_command(cmd)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// The best `ask.k` products for `ask`, best first, through the index: one stage per
    /// query vector, kept by exact ranking's `TopK` (a product's best image, the
    /// threshold, the same tie-breaks).
    pub async fn rank(&self, model: &str, ask: Ask<'_>) -> mongodb::error::Result<Vec<Scored>> {
        let mut top = TopK::new(ask.k, ask.threshold);
        for q in ask.queries {
            let mut cursor = self
                .coll
                .aggregate(pipeline(&self.index, q, model, &ask))
                .await?;
            while let Some(d) = cursor.try_next().await? {
                if let (Some(id), Ok(image), Ok(score)) =
                    (d.get("_id"), d.get_str("image_url"), d.get_f64("score"))
                {
                    top.push(
                        &ProductId::from_bson(id.clone()),
                        image,
                        cosine_from_score(score),
                    );
                }
            }
        }
        Ok(top.into_sorted())
    }
}

enum Ready {
    Yes,
    Building(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::spec::BinarySubtype;

    fn ask<'a>(q: &'a [&'a [f32]], f: Option<&'a Filter>, ex: Option<&'a ProductId>) -> Ask<'a> {
        Ask {
            queries: q,
            k: 7,
            threshold: 0.5,
            exclude: ex,
            filter: f,
        }
    }

    #[test]
    fn the_index_definition_has_the_documented_shape() {
        let d = index_definition("search_img", 1280);
        assert_eq!(d.get_str("name"), Ok("search_img"));
        assert_eq!(d.get_str("type"), Ok("vectorSearch"));
        let fields = d
            .get_document("definition")
            .unwrap()
            .get_array("fields")
            .unwrap();
        assert_eq!(
            fields[0].as_document().unwrap(),
            &doc! { "type": "vector", "path": "vector", "numDimensions": 1280_i64, "similarity": "cosine" }
        );
        let filters: Vec<&str> = fields[1..]
            .iter()
            .map(|f| {
                let f = f.as_document().unwrap();
                assert_eq!(f.get_str("type"), Ok("filter"));
                f.get_str("path").unwrap()
            })
            .collect();
        assert_eq!(filters, ["model", "status", "category", "price", "product"]);
    }

    #[test]
    fn candidates_are_twenty_per_result_within_atlas_bounds() {
        assert_eq!(limits(5), (15, 300));
        assert_eq!(limits(0), (3, 60));
        let (limit, candidates) = limits(100_000);
        assert_eq!((limit, candidates), (MAX_CANDIDATES, MAX_CANDIDATES));
        for k in [1, 17, 400, 3_333, 5_000] {
            let (l, c) = limits(k);
            assert!(
                l <= c && c <= MAX_CANDIDATES && l >= k.min(MAX_CANDIDATES),
                "{k}"
            );
        }
    }

    #[test]
    fn the_stage_queries_with_a_float32_binary_vector_and_the_request_filters() {
        let q: &[f32] = &[0.5, -0.25, 1.0];
        let f = Filter::new(vec!["b".into(), "a".into()], Some(10.0), Some(99.5));
        let ex = ProductId::from_bson(Bson::ObjectId(Default::default()));
        let queries = [q];
        let p = pipeline("idx", q, "m@1234", &ask(&queries, Some(&f), Some(&ex)));
        let vs = p[0].get_document("$vectorSearch").unwrap();
        assert_eq!(vs.get_str("index"), Ok("idx"));
        assert_eq!(vs.get_str("path"), Ok("vector"));
        assert_eq!(vs.get_i64("limit"), Ok(21));
        assert_eq!(vs.get_i64("numCandidates"), Ok(420));
        let Some(Bson::Binary(b)) = vs.get("queryVector") else {
            panic!("queryVector is {:?}", vs.get("queryVector"));
        };
        assert_eq!(b.subtype, BinarySubtype::Vector);
        assert_eq!(&b.bytes[..2], &[0x27, 0x00], "float32 dtype, no padding");
        assert_eq!(&b.bytes[2..6], &0.5f32.to_le_bytes());
        assert_eq!(
            vs.get_document("filter").unwrap(),
            &doc! { "$and": [
                { "model": { "$eq": "m@1234" } },
                { "status": { "$eq": "ok" } },
                { "category": { "$in": ["a", "b"] } },
                { "price": { "$gte": 10.0 } },
                { "price": { "$lte": 99.5 } },
                { "product": { "$ne": ex.to_bson() } },
            ] }
        );
        // Each product once, with its best image, best first; the score from the stage.
        assert_eq!(
            p[1].get_document("$project").unwrap().get_document("score"),
            Ok(&doc! { "$meta": "vectorSearchScore" })
        );
        assert_eq!(
            p[3].get_document("$group").unwrap().get_str("_id"),
            Ok("$product")
        );
        assert_eq!(p.last().unwrap(), &doc! { "$limit": 7_i64 });
    }

    #[test]
    fn no_request_filter_leaves_only_the_model_and_status() {
        let q: &[f32] = &[1.0];
        let queries = [q];
        let p = pipeline("idx", q, "m", &ask(&queries, None, None));
        let f = p[0]
            .get_document("$vectorSearch")
            .unwrap()
            .get_document("filter")
            .unwrap();
        assert_eq!(f.get_array("$and").unwrap().len(), 2);
    }

    #[test]
    fn atlas_cosine_scores_convert_back_to_the_cosine() {
        // Atlas: score = (1 + cosine) / 2.
        for cos in [-1.0f64, -0.3, 0.0, 0.5, 0.87, 1.0] {
            let got = cosine_from_score((1.0 + cos) / 2.0);
            assert!((got as f64 - cos).abs() < 1e-6, "{cos} -> {got}");
        }
    }
}
