//! The service: its components, built from the configuration and shared by every
//! request. Each component has one job and its own settings:
//!
//! - `Embedder` (embedder.rs): the model, loaded on first use, behind the decode gate
//!   and the model-run permits;
//! - `VectorIndex` (vectors.rs): the stored embeddings and the optional in-memory cache;
//! - `Indexer` (indexer/): index passes, one at a time, bringing the embeddings up to
//!   date with the catalogue;
//! - `Search` (search.rs): fetch -> embed -> rank -> join;
//! - `Catalog` (catalog.rs), `Fetcher` (fetch.rs) and `DbWatch` (dbwatch.rs), which the
//!   others share.

use std::sync::Arc;
use std::time::Instant;

use mongodb::options::ClientOptions;
use mongodb::Client;
use serde::Serialize;

use crate::atlas::AtlasStatus;
use crate::catalog::Catalog;
use crate::config::{Config, HttpSettings, SearchSettings, SessionSettings};
use crate::dbwatch::DbWatch;
use crate::embedder::Embedder;
use crate::error::AppError;
use crate::fetch::Fetcher;
use crate::indexer::follow::{FollowStatus, Follower};
use crate::indexer::{Indexer, PassProgress};
use crate::lease::Lease;
use crate::search::Search;
use crate::store::EmbeddingStore;
use crate::vectors::VectorIndex;

/// Shared by every request; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    http: HttpSettings,
    upload_limit: usize,
    max_image_bytes: usize,
    search_defaults: SearchSettings,
    session: SessionSettings,
    catalog: Catalog,
    /// MongoDB reachability for the health check, and for searches to fail fast.
    db_watch: Arc<DbWatch>,
    embedder: Arc<Embedder>,
    vectors: Arc<VectorIndex>,
    indexer: Arc<Indexer>,
    /// The products collection's change stream (CATALOG_CHANGE_STREAM), or why not.
    follower: Result<Arc<Follower>, &'static str>,
    /// The follower's task, once started; it stops with the service.
    following: std::sync::OnceLock<AbortOnDrop>,
    search: Search,
    started: Instant,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What `/api/v1/health` reports.
pub struct Health {
    /// Whether MongoDB answered the latest ping (and why not).
    pub database: Result<(), String>,
    pub model_loaded: bool,
}

impl AppState {
    /// Connects lazily (the driver connects on first use, so a database that is down at
    /// start-up does not stop the service from starting and answering health checks).
    pub async fn new(config: Config) -> anyhow::Result<Self> {
        let uri = config.require_mongo_uri()?;
        let db_settings = &config.database;
        let mut opts = ClientOptions::parse(uri)
            .await
            .map_err(|e| anyhow::anyhow!("configuration error in MONGO_URI: {e}"))?;
        opts.app_name.get_or_insert_with(|| "search-img".into());
        opts.server_selection_timeout
            .get_or_insert(db_settings.timeout);
        opts.connect_timeout.get_or_insert(db_settings.timeout);
        // The health watch's own client: see `dbwatch::watch_options`.
        let watch_client = Client::with_options(crate::dbwatch::watch_options(&opts))?;
        let db = Client::with_options(opts)?.database(&db_settings.mongo_db_name);
        let catalog = Catalog::new(
            db.collection(&db_settings.mongo_collection),
            &config.catalog,
        );
        let fetcher = Fetcher::new(config.fetch.clone())?;
        let db_watch = Arc::new(DbWatch::new(
            watch_client.database(&db_settings.mongo_db_name),
            db_settings.timeout,
        ));
        let embedder = Arc::new(Embedder::new(&config.embedder));
        let vectors = Arc::new(VectorIndex::new(
            EmbeddingStore::new(&db, &db_settings.embeddings_collection),
            &config.vectors,
        ));
        // Shared by the instances on the database: the index-pass lease and the change
        // stream's resume point.
        let shared = format!("{}_leases", db_settings.embeddings_collection);
        let lease = Lease::new(&db, &shared, "index-pass", config.indexer.lease_ttl);
        let indexer = Indexer::new(
            catalog.clone(),
            embedder.clone(),
            vectors.clone(),
            fetcher.clone(),
            config.indexer.clone(),
            lease,
        );
        let follower = match (config.indexer.change_stream, catalog.capped()) {
            (false, _) => Err("CATALOG_CHANGE_STREAM=false"),
            (true, true) => Err("MAX_PRODUCTS is set: changes are found by full passes"),
            (true, false) => Ok(Follower::new(
                catalog.clone(),
                indexer.clone(),
                &db,
                &shared,
                &db_settings.mongo_collection,
            )),
        };
        let search = Search::new(
            fetcher,
            embedder.clone(),
            vectors.clone(),
            indexer.clone(),
            catalog.clone(),
            db_watch.clone(),
        );
        Ok(Self(Arc::new(Inner {
            upload_limit: config.upload_limit(),
            max_image_bytes: config.fetch.max_bytes,
            http: config.http,
            search_defaults: config.search,
            session: config.embedder.encoder.session,
            catalog,
            db_watch,
            embedder,
            vectors,
            indexer,
            follower,
            following: Default::default(),
            search,
            started: Instant::now(),
        })))
    }

    /// Start-up work that must not block serving: the database watch, indexes, and the
    /// model when `LAZY_LOAD_MODEL=false`.
    pub async fn warm_up(&self) {
        self.0.db_watch.start();
        if let Ok(f) = &self.0.follower {
            self.0.indexer.expect_follower();
            self.0
                .following
                .get_or_init(|| AbortOnDrop(tokio::spawn(f.clone().run())));
        }
        self.prepare().await;
    }

    /// The embeddings index and the model, without the database watch a server needs:
    /// `search-img index` runs one pass and prints its report, with no pings that could
    /// log past it.
    pub async fn prepare(&self) {
        if let Err(e) = self.0.vectors.ensure_indexes().await {
            tracing::warn!(error = %e, "could not create the embeddings index (will work without it)");
        }
        self.0.embedder.warm_up().await;
    }

    pub fn search(&self) -> &Search {
        &self.0.search
    }

    pub fn indexer(&self) -> &Arc<Indexer> {
        &self.0.indexer
    }

    pub fn embedder(&self) -> &Embedder {
        &self.0.embedder
    }

    pub fn http_settings(&self) -> &HttpSettings {
        &self.0.http
    }

    /// The largest upload body (MAX_IMAGE_BYTES and room for the multipart framing).
    pub fn upload_limit(&self) -> usize {
        self.0.upload_limit
    }

    /// MAX_IMAGE_BYTES.
    pub fn max_image_bytes(&self) -> usize {
        self.0.max_image_bytes
    }

    /// TOP_K and SIMILARITY_THRESHOLD: what a search without those parameters uses.
    pub fn search_defaults(&self) -> &SearchSettings {
        &self.0.search_defaults
    }

    /// Never loads the model and never waits on MongoDB (see `dbwatch`).
    pub async fn health(&self) -> Health {
        Health {
            database: self.0.db_watch.status().await.result,
            model_loaded: self.0.embedder.loaded().is_some(),
        }
    }

    /// Counts for `/api/v1/status`.
    pub async fn status(&self) -> Result<Status, AppError> {
        let this = &self.0;
        let encoder = this.embedder.loaded();
        let total_products = this.catalog.count_all().await?;
        let counts = match &encoder {
            Some(e) => Some(this.vectors.counts(&e.identity().key()).await?),
            None => None,
        };
        let cached = this.vectors.cached().await;
        Ok(Status {
            model_loaded: encoder.is_some(),
            model: encoder.as_ref().map(|e| e.identity().clone()),
            prepacking: encoder.as_ref().map(|e| e.prepacking()),
            optimized_graph: encoder.as_ref().map(|e| e.optimized()),
            allow_spinning: this.session.allow_spinning,
            stop_spinning_after_run: this.session.stop_spinning_after_run,
            model_runs: encoder.as_ref().map_or(0, |e| e.runs()),
            total_products,
            products_with_features: counts.map(|c| c.ok.1),
            failed_products: counts.map(|c| c.failed.1),
            images_with_features: counts.map(|c| c.ok.0),
            failed_images: counts.map(|c| c.failed.0),
            cache_products: this.vectors.mode(),
            caching_enabled: cached.is_some(),
            cached_vectors: cached.map_or(0, |c| c.0),
            cached_bytes: cached.map(|c| c.1),
            cache_limit_bytes: this.vectors.cache_limit(),
            index_pass: this.indexer.progress(),
            catalog_changes: match &this.follower {
                Ok(f) => f.status(),
                Err(why) => Follower::status_off(why),
            },
            vector_search: this.vectors.vector_search(),
            uptime_secs: this.started.elapsed().as_secs(),
        })
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Status {
    pub model_loaded: bool,
    pub model: Option<crate::encoder::ModelIdentity>,
    /// Whether the loaded session prepacks weights (`ORT_PREPACKING=auto` decides by the
    /// model file's size; null before the model loads).
    pub prepacking: Option<bool>,
    /// Whether the session was built from the optimized graph `make setup` saves beside
    /// the model file (null before the model loads).
    pub optimized_graph: Option<bool>,
    /// ONNX Runtime intra-op thread spinning (`ORT_ALLOW_SPINNING`).
    pub allow_spinning: bool,
    /// Spinning ends when each model run returns (`ORT_STOP_SPINNING_AFTER_RUN`).
    pub stop_spinning_after_run: bool,
    /// Model runs since start (each batch counts once).
    pub model_runs: u64,
    pub total_products: u64,
    /// Products with a stored embedding for the loaded model, of at least one of their
    /// images (null before the model loads).
    pub products_with_features: Option<u64>,
    /// Products with an image that could not be fetched or decoded (retried later).
    pub failed_products: Option<u64>,
    /// Product images with a stored embedding for the loaded model.
    pub images_with_features: Option<u64>,
    /// Product images that could not be fetched or decoded (retried later).
    pub failed_images: Option<u64>,
    /// CACHE_PRODUCTS: `auto`, `true` or `false`.
    pub cache_products: &'static str,
    /// Whether the vectors are in memory now (with `auto`, they may not fit).
    pub caching_enabled: bool,
    pub cached_vectors: usize,
    /// What the vectors in memory take (codes, ids, URLs, filter attributes).
    pub cached_bytes: Option<usize>,
    /// VECTOR_CACHE_MAX_MB in bytes, with `CACHE_PRODUCTS=auto`.
    pub cache_limit_bytes: Option<usize>,
    /// The index pass under way, or the last one (a refresh answered 202 goes on here).
    pub index_pass: PassProgress,
    /// Whether catalogue changes come from the products collection's change stream.
    pub catalog_changes: FollowStatus,
    /// VECTOR_SEARCH: `exact`, or `atlas` with the index's state.
    pub vector_search: AtlasStatus,
    pub uptime_secs: u64,
}
