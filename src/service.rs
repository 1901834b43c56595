//! The search service: shared state and the operations the HTTP layer exposes.
//! A search: image bytes -> query vector -> (catalogue brought up to date) -> rank ->
//! product documents.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use mongodb::options::ClientOptions;
use mongodb::{Client, Database};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{Mutex, RwLock, Semaphore};

use crate::catalog::Catalog;
use crate::config::Config;
use crate::dbwatch::DbWatch;
use crate::encoder::{DecodeGate, Encoder, EncoderOptions, LazyEncoder};
use crate::error::AppError;
use crate::fetch::{FetchConfig, Fetcher};
use crate::index::{self, Change, IndexContext, IndexReport};
use crate::rank::{rank_stream, Scored, VectorCache};
use crate::store::{EmbeddingStore, ProductId, StoredMeta};

#[derive(Clone, Debug, Serialize)]
pub struct SearchResult {
    pub product: Value,
    pub similarity_score: f32,
    pub rank: usize,
}

/// Where one search's time went, in milliseconds (sent as the `Server-Timing` header).
/// `decode` and `model` include waiting for their permits; `sync` (bringing embeddings
/// up to date) runs at the same time as `load`, `decode` and `model`; `rank` includes
/// reading the vectors (from MongoDB, or loading the cache), `join` reading the product
/// documents.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SearchTimings {
    pub fetch_ms: Option<f64>,
    /// Getting the model (its lazy load on the first search).
    pub load_ms: f64,
    pub decode_ms: f64,
    pub model_ms: f64,
    pub sync_ms: f64,
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
            ("sync", Some(self.sync_ms)),
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

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

type SyncFuture = Shared<BoxFuture<'static, Result<IndexReport, AppError>>>;

/// A spawned pass as a future every waiter can share.
fn shared_pass(handle: tokio::task::JoinHandle<Result<IndexReport, AppError>>) -> SyncFuture {
    async move {
        handle
            .await
            .unwrap_or_else(|e| Err(AppError::Internal(format!("index pass panicked: {e}"))))
    }
    .boxed()
    .shared()
}

#[derive(Default)]
struct SyncState {
    running: Option<SyncFuture>,
    /// The pass that refreshes asked for while one was running: it starts when that one
    /// ends, and every refresh made meanwhile shares it.
    queued: Option<SyncFuture>,
    last_done: Option<Instant>,
}

/// How far the index pass under way has got, for `/api/v1/status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PassProgress {
    pub running: bool,
    /// Products of this pass whose image was embedded or failed so far.
    pub done: usize,
    /// Products this pass has to embed.
    pub todo: usize,
    /// Seconds since the pass under way (or the last one) started.
    pub started_secs_ago: Option<f64>,
    /// Passes started since the service started.
    pub passes: u64,
    #[serde(skip)]
    started: Option<Instant>,
}

/// Shared by every request; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: Config,
    pub client: Client,
    pub db: Database,
    pub catalog: Catalog,
    pub store: EmbeddingStore,
    pub encoder: LazyEncoder,
    pub fetcher: Fetcher,
    /// MongoDB reachability for the health check, and for searches to fail fast.
    pub db_watch: DbWatch,
    /// Model runs at once (memory is per run).
    pub inference: Semaphore,
    /// Image decodes at once (memory is per decoded image), each waited for at most
    /// DECODE_TIMEOUT_SECS.
    pub decode: DecodeGate,
    /// `CACHE_PRODUCTS=true`: the vectors in memory (None until first loaded).
    cache: Option<RwLock<Option<VectorCache>>>,
    cache_synced: Mutex<Option<Instant>>,
    sync: Mutex<SyncState>,
    progress: Arc<std::sync::Mutex<PassProgress>>,
    pub started: Instant,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    /// Connects lazily (the driver connects on first use, so a database that is down at
    /// start-up does not stop the service from starting and answering health checks).
    pub async fn new(config: Config) -> anyhow::Result<Self> {
        let uri = config.require_mongo_uri()?;
        let mut opts = ClientOptions::parse(uri)
            .await
            .map_err(|e| anyhow::anyhow!("configuration error in MONGO_URI: {e}"))?;
        opts.app_name.get_or_insert_with(|| "search-img".into());
        opts.server_selection_timeout
            .get_or_insert(Duration::from_secs(config.mongo_timeout_secs));
        opts.connect_timeout
            .get_or_insert(Duration::from_secs(config.mongo_timeout_secs));
        // The health watch's own client: see `dbwatch::watch_options`.
        let watch_client = Client::with_options(crate::dbwatch::watch_options(&opts))?;
        let client = Client::with_options(opts)?;
        let db = client.database(&config.mongo_db_name);
        let catalog = Catalog::new(
            db.collection(&config.mongo_collection),
            config.product_fields.clone(),
            config.max_products,
        );
        let store = EmbeddingStore::new(&db, &config.embeddings_collection);
        let fetcher = Fetcher::new(FetchConfig {
            allow_private_hosts: config.allow_private_image_hosts,
            connect_timeout: Duration::from_secs(config.fetch_connect_timeout_secs),
            total_timeout: Duration::from_secs(config.fetch_timeout_secs),
            max_bytes: config.max_image_bytes,
            max_redirects: config.max_redirects,
        })?;
        let encoder = LazyEncoder::new(EncoderOptions::from_config(&config));
        let db_watch = DbWatch::new(
            watch_client.database(&config.mongo_db_name),
            Duration::from_secs(config.mongo_timeout_secs),
        );
        Ok(Self(Arc::new(Inner {
            db_watch,
            inference: Semaphore::new(config.max_concurrent_inferences),
            decode: DecodeGate::new(
                config.decode_permits(),
                config.max_decode_memory_bytes,
                config.decode_timeout(),
            ),
            cache: config.cache_products.then(|| RwLock::new(None)),
            cache_synced: Mutex::new(None),
            sync: Mutex::new(SyncState::default()),
            progress: Default::default(),
            started: Instant::now(),
            config,
            client,
            db,
            catalog,
            store,
            encoder,
            fetcher,
        })))
    }

    /// Start-up work that must not block serving: indexes, and the model when
    /// `LAZY_LOAD_MODEL=false`.
    pub async fn warm_up(&self) {
        self.db_watch.start();
        if let Err(e) = self.store.ensure_indexes().await {
            tracing::warn!(error = %e, "could not create the embeddings index (will work without it)");
        }
        if !self.config.lazy_load_model {
            if let Err(e) = self.encoder.get().await {
                tracing::error!(error = %e, "model failed to load at start-up");
            }
        } else {
            tracing::info!("Services will be initialized on first request");
        }
    }

    /// Whether MongoDB answers a ping now (health uses `db_watch`, which never waits).
    pub async fn database_ok(&self) -> Result<(), String> {
        DbWatch::ping(
            &self.db,
            Duration::from_secs(self.config.mongo_timeout_secs),
        )
        .await
    }

    pub async fn search_url(
        &self,
        url: &str,
        top_k: usize,
        threshold: f32,
    ) -> Result<Vec<SearchResult>, AppError> {
        Ok(self.search_url_timed(url, top_k, threshold).await?.0)
    }

    /// `search_url`, and where its time went (the `Server-Timing` header).
    pub async fn search_url_timed(
        &self,
        url: &str,
        top_k: usize,
        threshold: f32,
    ) -> Result<(Vec<SearchResult>, SearchTimings), AppError> {
        let start = Instant::now();
        self.fail_fast_if_database_down()?;
        let bytes = self.fetcher.fetch(url).await?;
        let fetch_ms = ms_since(start);
        let (results, mut timings) = self.search_bytes_timed(bytes, top_k, threshold).await?;
        timings.fetch_ms = Some(fetch_ms);
        timings.total_ms += fetch_ms;
        Ok((results, timings))
    }

    pub async fn search_bytes(
        &self,
        bytes: bytes::Bytes,
        top_k: usize,
        threshold: f32,
    ) -> Result<Vec<SearchResult>, AppError> {
        Ok(self.search_bytes_timed(bytes, top_k, threshold).await?.0)
    }

    /// `search_bytes`, and where its time went (the `Server-Timing` header).
    pub async fn search_bytes_timed(
        &self,
        bytes: bytes::Bytes,
        top_k: usize,
        threshold: f32,
    ) -> Result<(Vec<SearchResult>, SearchTimings), AppError> {
        let start = Instant::now();
        self.fail_fast_if_database_down()?;
        let mut tm = SearchTimings::default();
        // Bring the catalogue up to date while the model loads (the first search: the
        // pass reads the catalogue meanwhile) and the query is embedded.
        let sync = async {
            let t = Instant::now();
            self.sync_for_search().await.map(|()| ms_since(t))
        };
        let query = async {
            let encoder = self.encoder.get().await?;
            let load_ms = ms_since(start);
            let (query, decode_ms, model_ms) = self.embed_query(&encoder, bytes).await?;
            Ok::<_, AppError>((encoder, load_ms, query, decode_ms, model_ms))
        };
        let ((encoder, load_ms, query, decode_ms, model_ms), sync_ms) =
            tokio::try_join!(query, sync)?;
        (tm.load_ms, tm.decode_ms, tm.model_ms, tm.sync_ms) =
            (load_ms, decode_ms, model_ms, sync_ms);
        let model = encoder.identity().key();
        // A few spare candidates, in case products were deleted since the last pass.
        let want = top_k + top_k / 2 + 2;
        let t = Instant::now();
        let scored = self.rank(&model, &query, want, threshold).await?;
        tm.rank_ms = ms_since(t);
        let t = Instant::now();
        let results = self.join_products(scored, top_k).await?;
        tm.join_ms = ms_since(t);
        tm.total_ms = ms_since(start);
        Ok((results, tm))
    }

    /// A search needs MongoDB (at least to read the products it returns): while the
    /// background ping says it is down, answer 503 now rather than after the driver's
    /// timeouts.
    fn fail_fast_if_database_down(&self) -> Result<(), AppError> {
        match self.db_watch.known_down() {
            Some(reason) => Err(AppError::Database(reason)),
            None => Ok(()),
        }
    }

    async fn embed_query(
        &self,
        encoder: &Arc<Encoder>,
        bytes: bytes::Bytes,
    ) -> Result<(Vec<f32>, f64, f64), AppError> {
        let t = Instant::now();
        let tensor = self.decode.prepare(encoder, bytes).await?;
        let decode_ms = ms_since(t);
        let t = Instant::now();
        let _permit = self
            .inference
            .acquire()
            .await
            .map_err(|e| AppError::Internal(e.to_string()))?;
        let enc = encoder.clone();
        let mut v = tokio::task::spawn_blocking(move || enc.embed_prepared(&[tensor]))
            .await
            .map_err(|e| AppError::Internal(e.to_string()))??;
        Ok((v.pop().unwrap_or_default(), decode_ms, ms_since(t)))
    }

    async fn rank(
        &self,
        model: &str,
        query: &[f32],
        k: usize,
        threshold: f32,
    ) -> Result<Vec<Scored>, AppError> {
        match &self.cache {
            Some(cache) => {
                self.cache_up_to_date(model, query.len(), false).await?;
                let guard = cache.read().await;
                Ok(guard
                    .as_ref()
                    .map(|c| c.rank(query, k, threshold))
                    .unwrap_or_default())
            }
            None => {
                let cursor = self
                    .store
                    .vectors(model, None, self.config.vector_batch_size)
                    .await?;
                Ok(rank_stream(cursor, model, query, k, threshold).await?)
            }
        }
    }

    /// The documents of the best `top_k` candidates that still exist, best first. Asks
    /// for the first `top_k` and only goes on to the spares when some were deleted since
    /// the last pass: MongoDB's cost grows with the ids asked for (a bare `$in` read of
    /// 10 products took 1.2 ms, of 17 2.4 ms).
    async fn join_products(
        &self,
        scored: Vec<Scored>,
        top_k: usize,
    ) -> Result<Vec<SearchResult>, AppError> {
        let mut out = Vec::with_capacity(top_k.min(scored.len()));
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
                    });
                }
            }
        }
        Ok(out)
    }

    /// Before a search: bring embeddings up to date if the last pass is older than
    /// CATALOG_SYNC_INTERVAL_SECS, waiting at most SEARCH_SYNC_WAIT_SECS for it (the pass
    /// goes on in the background and the search uses what is stored so far).
    async fn sync_for_search(&self) -> Result<(), AppError> {
        let interval = Duration::from_secs(self.config.catalog_sync_interval_secs);
        let fut = {
            let mut st = self.sync.lock().await;
            let due = st.last_done.is_none_or(|t| t.elapsed() >= interval);
            // A pass that is not due (a refresh's) does not hold searches up.
            match (&st.running, due) {
                (Some(f), true) => f.clone(),
                (None, true) => self.start_sync(&mut st),
                (_, false) => return Ok(()),
            }
        };
        let wait = Duration::from_secs(self.config.search_sync_wait_secs);
        match tokio::time::timeout(wait, fut).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                // A failed pass must not fail searches over what is already stored.
                tracing::warn!(error = %e, "index pass failed; searching stored embeddings");
                Ok(())
            }
            Err(_) => {
                tracing::info!("index pass still running; searching what is stored so far");
                Ok(())
            }
        }
    }

    /// A full pass that starts now or later (`POST /refresh`, `search-img index`), so
    /// that changes made before the call are seen. With none running it starts one; while
    /// one runs, it waits for that one and then for one more, which every call made
    /// meanwhile shares: N concurrent calls cost at most two passes, not N.
    pub async fn refresh(&self) -> Result<IndexReport, AppError> {
        self.refresh_with_progress(Arc::new(|_, _| {})).await
    }

    pub async fn refresh_with_progress(
        &self,
        progress: Arc<dyn Fn(usize, usize) + Send + Sync>,
    ) -> Result<IndexReport, AppError> {
        let fut = {
            let mut st = self.sync.lock().await;
            match (&st.running, &st.queued) {
                (None, _) => self.start_sync_with(&mut st, progress),
                (Some(_), Some(queued)) => queued.clone(),
                (Some(running), None) => {
                    let queued = self.queue_after(running.clone(), progress);
                    st.queued = Some(queued.clone());
                    queued
                }
            }
        };
        fut.await
    }

    /// A pass that starts when `running` ends (spawned, so it happens even if every
    /// caller gives up). If something else started a pass in between, that one will do.
    fn queue_after(
        &self,
        running: SyncFuture,
        progress: Arc<dyn Fn(usize, usize) + Send + Sync>,
    ) -> SyncFuture {
        let this = self.clone();
        let handle = tokio::spawn(async move {
            let _ = running.await;
            let next = {
                let mut st = this.sync.lock().await;
                st.queued = None;
                match &st.running {
                    Some(f) => f.clone(),
                    None => this.start_sync_with(&mut st, progress),
                }
            };
            next.await
        });
        shared_pass(handle)
    }

    /// The pass under way, or the last one.
    pub fn pass_progress(&self) -> PassProgress {
        let mut p = self
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        p.started_secs_ago = p.started.map(|t| t.elapsed().as_secs_f64());
        p
    }

    fn start_sync(&self, st: &mut SyncState) -> SyncFuture {
        self.start_sync_with(st, Arc::new(|_, _| {}))
    }

    /// Spawns a pass (so it finishes even if every waiter goes away) and records it.
    fn start_sync_with(
        &self,
        st: &mut SyncState,
        progress: Arc<dyn Fn(usize, usize) + Send + Sync>,
    ) -> SyncFuture {
        let this = self.clone();
        let shared = self.progress.clone();
        {
            let mut p = shared.lock().unwrap_or_else(|p| p.into_inner());
            *p = PassProgress {
                running: true,
                started: Some(Instant::now()),
                passes: p.passes + 1,
                ..Default::default()
            };
        }
        let progress: Arc<dyn Fn(usize, usize) + Send + Sync> = Arc::new(move |done, todo| {
            {
                let mut p = shared.lock().unwrap_or_else(|p| p.into_inner());
                (p.done, p.todo) = (done, todo);
            }
            progress(done, todo)
        });
        let handle = tokio::spawn(async move {
            let result = this.index_pass(progress).await;
            let mut st = this.sync.lock().await;
            st.running = None;
            this.progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .running = false;
            if result.is_ok() {
                st.last_done = Some(Instant::now());
            }
            result
        });
        let fut = shared_pass(handle);
        st.running = Some(fut.clone());
        fut
    }

    async fn index_pass(
        &self,
        progress: Arc<dyn Fn(usize, usize) + Send + Sync>,
    ) -> Result<IndexReport, AppError> {
        let start = Instant::now();
        // The catalogue read needs no model: on the first pass it runs while the model
        // loads. With the cache on, the stored metadata comes from the read that loads or
        // reconciles the cache (the collection is read once, not twice).
        let products = async { Ok::<_, AppError>(self.catalog.searchable().await?) };
        let encoder_and_metas = async {
            if self.cache.is_some() {
                let encoder = self.encoder.get().await?;
                let id = encoder.identity();
                let metas = self.cache_up_to_date(&id.key(), id.dim, true).await?;
                Ok((encoder, metas.unwrap_or_default()))
            } else {
                let encoder = async { Ok::<_, AppError>(self.encoder.get().await?) };
                let metas = async { Ok::<_, AppError>(self.store.metas().await?) };
                tokio::try_join!(encoder, metas)
            }
        };
        let (products, (encoder, metas)) = tokio::try_join!(products, encoder_and_metas)?;
        let changes = std::sync::Mutex::new(Vec::new());
        let on_change = |c: Change| changes.lock().unwrap_or_else(|p| p.into_inner()).push(c);
        let ctx = IndexContext {
            store: &self.store,
            encoder,
            fetcher: &self.fetcher,
            inference: &self.inference,
            decode: &self.decode,
            batch_size: self.config.max_batch_size,
            fetch_concurrency: self.config.index_fetch_concurrency,
            retry_failed_after: Duration::from_secs(self.config.retry_failed_after_secs),
            on_change: &on_change,
            progress: &*progress,
        };
        let report = index::run(ctx, products, metas, start).await;
        // The pass's catalogue, metadata map and image buffers are freed now.
        crate::rank::release_freed_memory();
        // Apply what was stored even if the pass failed half-way.
        if let Some(cache) = &self.cache {
            let mut guard = cache.write().await;
            if let Some(c) = guard.as_mut() {
                for change in changes.into_inner().unwrap_or_else(|p| p.into_inner()) {
                    match change {
                        Change::Stored(id, v, at) => c.upsert(id, &v, at),
                        Change::Removed(id) => c.remove(&id),
                    }
                }
            }
        }
        report
    }

    /// Whether the cache holds `model`'s vectors.
    async fn cache_holds(&self, model: &str) -> bool {
        match &self.cache {
            Some(cache) => cache
                .read()
                .await
                .as_ref()
                .is_some_and(|c| c.model == model),
            None => false,
        }
    }

    /// Loads `model`'s vectors into a fresh cache, replacing the old one, from one plain
    /// scan of the collection; given `metas`, every document's metadata goes there too.
    /// The caller holds `cache_synced`.
    async fn load_cache(
        &self,
        model: &str,
        dim: usize,
        mut metas: Option<&mut HashMap<ProductId, StoredMeta>>,
    ) -> Result<(), AppError> {
        let Some(cache) = &self.cache else {
            return Ok(());
        };
        let mut fresh = VectorCache::new(model.to_string(), dim);
        // An upper bound from metadata (a count of the model's vectors took as long as
        // reading half of them); `shrink` below returns what was not used.
        let estimate = self.store.estimated_count().await? as usize;
        fresh.reserve_exact(estimate);
        if let Some(m) = metas.as_deref_mut() {
            m.reserve(estimate);
        }
        let cursor = self
            .store
            .vectors(model, None, self.config.vector_batch_size)
            .await?;
        let n = fresh.load_with_metas(cursor, metas).await?;
        fresh.shrink();
        crate::rank::release_freed_memory();
        tracing::info!(
            vectors = n,
            bytes = fresh.heap_bytes(),
            "product vectors cached in memory"
        );
        *cache.write().await = Some(fresh);
        Ok(())
    }

    /// `CACHE_PRODUCTS=true`: load `model`'s vectors on first use, and every
    /// CACHE_SYNC_INTERVAL_SECS reconcile them with the store (what other instances stored
    /// or removed). With `want_metas` (an index pass), also returns every stored
    /// document's metadata, taken from the same read when there is one.
    async fn cache_up_to_date(
        &self,
        model: &str,
        dim: usize,
        want_metas: bool,
    ) -> Result<Option<HashMap<ProductId, StoredMeta>>, AppError> {
        if self.cache.is_none() {
            return Ok(None);
        }
        let interval = Duration::from_secs(self.config.cache_sync_interval_secs);
        let mut synced = self.cache_synced.lock().await;
        if !self.cache_holds(model).await {
            let mut metas = HashMap::new();
            self.load_cache(model, dim, want_metas.then_some(&mut metas))
                .await?;
            *synced = Some(Instant::now());
            return Ok(want_metas.then_some(metas));
        }
        let due = synced.is_none_or(|t| t.elapsed() >= interval);
        if due {
            *synced = Some(Instant::now());
        }
        drop(synced);
        if !due && !want_metas {
            return Ok(None);
        }
        let metas = self.store.metas().await?;
        if due {
            self.reconcile_cache(model, &metas).await?;
        }
        Ok(want_metas.then_some(metas))
    }

    /// Reconciles the cache with the stored metadata by comparing update times, then
    /// reads just the vectors that changed.
    async fn reconcile_cache(
        &self,
        model: &str,
        metas: &HashMap<ProductId, StoredMeta>,
    ) -> Result<(), AppError> {
        let Some(cache) = &self.cache else {
            return Ok(());
        };
        let (changed, gone): (Vec<ProductId>, Vec<ProductId>) = {
            let guard = cache.read().await;
            let Some(c) = guard.as_ref() else {
                return Ok(());
            };
            let changed = metas
                .iter()
                .filter(|(id, m)| {
                    m.ok && m.model == model && c.updated_at(id) != Some(m.updated_at)
                })
                .map(|(id, _)| id.clone())
                .collect();
            let gone = c
                .ids()
                .filter(|id| metas.get(*id).is_none_or(|m| !m.ok || m.model != model))
                .cloned()
                .collect();
            (changed, gone)
        };
        if changed.is_empty() && gone.is_empty() {
            return Ok(());
        }
        let mut guard = cache.write().await;
        if let Some(c) = guard.as_mut() {
            for id in &gone {
                c.remove(id);
            }
            for chunk in changed.chunks(1000) {
                let cursor = self
                    .store
                    .vectors(model, Some(chunk), self.config.vector_batch_size)
                    .await?;
                c.load(cursor).await?;
            }
        }
        tracing::debug!(
            changed = changed.len(),
            removed = gone.len(),
            "cache synced from store"
        );
        Ok(())
    }

    /// Counts for `/api/v1/status`.
    pub async fn status(&self) -> Result<Status, AppError> {
        let encoder = self.encoder.loaded();
        let total_products = self.catalog.count_all().await?;
        let (indexed, failed) = match &encoder {
            Some(e) => {
                let key = e.identity().key();
                (
                    Some(self.store.count(&key, true).await?),
                    Some(self.store.count(&key, false).await?),
                )
            }
            None => (None, None),
        };
        let cached = match &self.cache {
            Some(c) => c.read().await.as_ref().map_or(0, |c| c.len()),
            None => 0,
        };
        Ok(Status {
            model_loaded: encoder.is_some(),
            model: encoder.as_ref().map(|e| e.identity().clone()),
            prepacking: encoder.as_ref().map(|e| e.prepacking()),
            allow_spinning: self.config.ort_allow_spinning,
            stop_spinning_after_run: self.config.ort_stop_spinning_after_run,
            model_runs: encoder.as_ref().map_or(0, |e| e.runs()),
            total_products,
            products_with_features: indexed,
            failed_products: failed,
            caching_enabled: self.config.cache_products,
            cached_vectors: cached,
            index_pass: self.pass_progress(),
            uptime_secs: self.started.elapsed().as_secs(),
        })
    }
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub model_loaded: bool,
    pub model: Option<crate::encoder::ModelIdentity>,
    /// Whether the loaded session prepacks weights (`ORT_PREPACKING=auto` decides by the
    /// model file's size; null before the model loads).
    pub prepacking: Option<bool>,
    /// ONNX Runtime intra-op thread spinning (`ORT_ALLOW_SPINNING`).
    pub allow_spinning: bool,
    /// Spinning ends when each model run returns (`ORT_STOP_SPINNING_AFTER_RUN`).
    pub stop_spinning_after_run: bool,
    /// Model runs since start (each batch counts once).
    pub model_runs: u64,
    pub total_products: u64,
    /// Products with a stored embedding for the loaded model (null before it loads).
    pub products_with_features: Option<u64>,
    /// Products whose image could not be fetched or decoded (retried later).
    pub failed_products: Option<u64>,
    pub caching_enabled: bool,
    pub cached_vectors: usize,
    /// The index pass under way, or the last one (a refresh answered 202 goes on here).
    pub index_pass: PassProgress,
    pub uptime_secs: u64,
}
