//! A search: image (URL or bytes) -> query vector (while the catalogue is brought up to
//! date) -> rank -> product documents, recording where the time went.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use crate::catalog::Catalog;
use crate::dbwatch::DbWatch;
use crate::embedder::{ms_since, Embedder};
use crate::error::{AppError, DatabaseError};
use crate::fetch::Fetcher;
use crate::indexer::Indexer;
use crate::rank::{Ask, Scored};
use crate::store::ProductId;
use crate::vectors::{RankQuery, VectorIndex};

#[derive(Clone, Debug, Serialize)]
pub struct SearchResult {
    pub product: Value,
    pub similarity_score: f32,
    pub rank: usize,
    /// The URL of the product's image that matched best (it has one or several).
    pub matched_image: String,
}

/// Where one search's time went, in milliseconds (sent as the `Server-Timing` header).
/// `decode` and `model` include waiting for their permits; `pass` (the index pass a
/// search waits for when one is due) runs at the same time as `load`, `decode` and
/// `model`; `rank` includes reading the vectors (from MongoDB, or loading the cache),
/// `join` reading the product documents.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SearchTimings {
    pub fetch_ms: Option<f64>,
    /// Getting the model (its lazy load on the first search).
    pub load_ms: f64,
    pub decode_ms: f64,
    pub model_ms: f64,
    pub pass_ms: f64,
    pub rank_ms: f64,
    pub join_ms: f64,
    pub total_ms: f64,
}

impl SearchTimings {
    /// `fetch;dur=12.3, load;dur=0.0, ...` (the W3C Server-Timing syntax).
    pub fn header_value(&self) -> String {
        let parts = [
            ("fetch", self.fetch_ms),
            ("load", Some(self.load_ms)),
            ("decode", Some(self.decode_ms)),
            ("model", Some(self.model_ms)),
            ("pass", Some(self.pass_ms)),
            ("rank", Some(self.rank_ms)),
            ("join", Some(self.join_ms)),
            ("total", Some(self.total_ms)),
        ];
        parts
            .iter()
            .filter_map(|(name, v)| v.map(|v| format!("{name};dur={v:.2}")))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The results, and where the time went.
pub type Searched = (Vec<SearchResult>, SearchTimings);

pub struct Search {
    fetcher: Fetcher,
    embedder: Arc<Embedder>,
    vectors: Arc<VectorIndex>,
    indexer: Arc<Indexer>,
    catalog: Catalog,
    db_watch: Arc<DbWatch>,
}

impl Search {
    pub fn new(
        fetcher: Fetcher,
        embedder: Arc<Embedder>,
        vectors: Arc<VectorIndex>,
        indexer: Arc<Indexer>,
        catalog: Catalog,
        db_watch: Arc<DbWatch>,
    ) -> Self {
        Self {
            fetcher,
            embedder,
            vectors,
            indexer,
            catalog,
            db_watch,
        }
    }

    pub async fn by_url(&self, url: &str, query: &RankQuery) -> Result<Searched, AppError> {
        let start = Instant::now();
        self.fail_fast_if_database_down()?;
        let bytes = self.fetcher.fetch(url).await?;
        let fetch_ms = ms_since(start);
        let (results, mut timings) = self.by_bytes(bytes, query).await?;
        timings.fetch_ms = Some(fetch_ms);
        timings.total_ms += fetch_ms;
        Ok((results, timings))
    }

    pub async fn by_bytes(&self, bytes: Bytes, query: &RankQuery) -> Result<Searched, AppError> {
        let start = Instant::now();
        self.fail_fast_if_database_down()?;
        let mut tm = SearchTimings::default();
        // The pass (when one is due) reads the catalogue while the model loads (the
        // first search) and the query is embedded.
        // A query that fails stops waiting for the pass (which goes on).
        let pass = async {
            let t = Instant::now();
            self.indexer.pass_if_due().await;
            Ok(ms_since(t))
        };
        let embed = async { Ok::<_, AppError>(self.embedder.embed_query(bytes, start).await?) };
        let (q, pass_ms) = tokio::try_join!(embed, pass)?;
        (tm.load_ms, tm.decode_ms, tm.model_ms, tm.pass_ms) =
            (q.load_ms, q.decode_ms, q.model_ms, pass_ms);
        let model = q.model.identity().key();
        let results = self
            .rank_and_join(&model, &[&q.vector], None, query, &mut tm)
            .await?;
        tm.total_ms = ms_since(start);
        Ok((results, tm))
    }

    /// Products similar to product `id` (its `_id` as the frontend sends it: ObjectId
    /// hex or another string), from its stored embeddings: no image fetch and no model
    /// run; the best pair of photos counts, and the product itself is left out. Like a
    /// search it first brings the embeddings up to date when a pass is due, and when the
    /// product has none yet, waits for a pass (at most SEARCH_SYNC_WAIT_SECS) that sees
    /// it; still none: 409.
    pub async fn similar(&self, id: &str, query: &RankQuery) -> Result<Searched, AppError> {
        let start = Instant::now();
        self.fail_fast_if_database_down()?;
        let mut tm = SearchTimings::default();
        let t = Instant::now();
        let images = self.catalog.searchable_images(id).await?;
        let Some(product) = images.first().map(|i| i.product.clone()) else {
            return Err(AppError::NotFound(format!(
                "no searchable product with _id {id:?}"
            )));
        };
        let pass = async {
            self.indexer.pass_if_due().await;
            Ok(())
        };
        let model = async { Ok::<_, AppError>(self.embedder.model().await?) };
        let (model, ()) = tokio::try_join!(model, pass)?;
        let model = model.identity().key();
        let mut own = self.vectors.vectors_of(&model, &images).await?;
        if own.is_empty() {
            let _ = tokio::time::timeout(self.indexer.search_wait(), self.indexer.pass_now()).await;
            own = self.vectors.vectors_of(&model, &images).await?;
        }
        if own.is_empty() {
            return Err(AppError::Conflict(format!(
                "the embeddings of product {id} are not computed yet (or none of its images \
                 could be used): try again in a moment"
            )));
        }
        tm.pass_ms = ms_since(t);
        let queries: Vec<&[f32]> = own.iter().map(|(_, v)| v.as_slice()).collect();
        let results = self
            .rank_and_join(&model, &queries, Some(&product), query, &mut tm)
            .await?;
        tm.total_ms = ms_since(start);
        Ok((results, tm))
    }

    /// Ranks and joins the product documents, until `top_k` products are found or the
    /// candidates run out: a few spare candidates first, in case products were deleted
    /// or hidden since the last pass; when even those run out, four times as many, and
    /// so on.
    async fn rank_and_join(
        &self,
        model: &str,
        queries: &[&[f32]],
        exclude: Option<&ProductId>,
        query: &RankQuery,
        tm: &mut SearchTimings,
    ) -> Result<Vec<SearchResult>, AppError> {
        let mut want = query.top_k + query.top_k / 2 + 2;
        let mut results = Vec::with_capacity(query.top_k);
        let mut examined = 0;
        loop {
            let t = Instant::now();
            let ask = Ask {
                queries,
                k: want,
                threshold: query.threshold,
                exclude,
                filter: (!query.filter.is_empty()).then_some(&query.filter),
            };
            let scored = self.vectors.rank(model, ask).await?;
            tm.rank_ms += ms_since(t);
            let t = Instant::now();
            let more = scored.len() == want;
            let unseen = scored.into_iter().skip(examined);
            examined = want;
            self.join_products(unseen.collect(), query.top_k, &mut results)
                .await?;
            tm.join_ms += ms_since(t);
            if results.len() >= query.top_k || !more {
                return Ok(results);
            }
            want *= 4;
        }
    }

    /// A search needs MongoDB (at least to read the products it returns): while the
    /// background ping says it is down, answer 503 now rather than after the driver's
    /// timeouts.
    fn fail_fast_if_database_down(&self) -> Result<(), AppError> {
        match self.db_watch.known_down() {
            Some(reason) => Err(DatabaseError::Down(reason).into()),
            None => Ok(()),
        }
    }

    /// Appends to `out` the documents of the best candidates that still exist and are
    /// searchable, best first, until it holds `top_k`. Asks for as many as are missing
    /// and only goes on to the spares when some were deleted or hidden since the last
    /// pass: MongoDB's cost grows with the ids asked for (a bare `$in` read of 10
    /// products took 1.2 ms, of 17 2.4 ms).
    async fn join_products(
        &self,
        scored: Vec<Scored>,
        top_k: usize,
        out: &mut Vec<SearchResult>,
    ) -> Result<(), AppError> {
        let mut next = 0;
        while out.len() < top_k && next < scored.len() {
            let round = &scored[next..(next + top_k - out.len()).min(scored.len())];
            next += round.len();
            let ids: Vec<ProductId> = round.iter().map(|s| s.id.clone()).collect();
            let mut docs = self.catalog.documents(&ids).await?;
            for s in round {
                if let Some(product) = docs.remove(&s.id) {
                    out.push(SearchResult {
                        product,
                        // Rounding can put an identical image a hair above 1.
                        similarity_score: s.score.clamp(-1.0, 1.0),
                        rank: out.len() + 1,
                        matched_image: s.image.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}
