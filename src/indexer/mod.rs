//! The indexer: index passes, which bring the stored embeddings up to date with the
//! catalogue (embed product images whose embedding is missing or stale, drop those of
//! deleted products and removed photos, record photos that could not be used). It decides when a pass runs: one at
//! a time, shared by everyone waiting for it; `pipeline` does a pass's work.
//!
//! A search asks for a pass when the last one is older than CATALOG_SYNC_INTERVAL_SECS
//! (`pass_if_due`); `POST /refresh` and `search-img index` ask for one that sees every
//! change made before the call (`pass_now`). While the products collection's change
//! stream is followed (`follow`), each change gets an incremental pass over just the
//! products it names (`pass_products`), and full passes are due only every
//! CATALOG_FULL_SYNC_INTERVAL_SECS.

pub mod follow;
pub mod pipeline;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use mongodb::bson::DateTime;
use serde::Serialize;

use crate::catalog::Catalog;
use crate::config::IndexerSettings;
use crate::embedder::Embedder;
use crate::error::{DatabaseError, ModelError};
use crate::fetch::Fetcher;
use crate::lease::Lease;
use crate::store::ProductId;
use crate::vectors::VectorIndex;
use pipeline::Pipeline;

/// The outcome of one pass over the catalogue.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IndexReport {
    /// Searchable products considered (after MAX_PRODUCTS).
    pub total_products: usize,
    /// Their images (PRODUCT_IMAGE_FIELD).
    pub total_images: usize,
    /// Products with at least one usable embedding for the current model after this pass.
    pub indexed_products: usize,
    /// Images with a usable embedding for the current model after this pass.
    pub indexed_images: usize,
    /// Embeddings computed in this pass.
    pub embedded: usize,
    /// Embeddings whose product's category or price changed: attributes rewritten,
    /// nothing embedded.
    pub retagged: usize,
    /// Images that failed in this pass.
    pub failed: usize,
    /// Images that failed earlier and are not due for a retry yet.
    pub failed_waiting: usize,
    /// Embeddings removed because their product is gone or no longer searchable, or the
    /// photo is no longer the product's.
    pub removed: usize,
    /// Where the time went, in milliseconds.
    pub timings: Timings,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    pub total_ms: f64,
    /// Reading the catalogue and the stored metadata, and planning (on the service's
    /// first pass this overlaps loading the model, and with `CACHE_PRODUCTS=true`
    /// includes loading the cache from the same read).
    pub plan_ms: f64,
    /// Summed over concurrent fetches.
    pub fetch_ms: f64,
    pub decode_ms: f64,
    pub model_ms: f64,
    pub store_ms: f64,
}

/// Why a pass failed (one product's photo failing is not a failure of the pass).
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    Database(#[from] DatabaseError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("the index pass panicked: {0}")]
    Panicked(String),
}

impl From<mongodb::error::Error> for PassError {
    fn from(e: mongodb::error::Error) -> Self {
        PassError::Database(e.into())
    }
}

/// One pass's outcome, shared by everyone waiting for it.
pub type PassResult = Result<IndexReport, Arc<PassError>>;
type PassFuture = Shared<BoxFuture<'static, PassResult>>;

/// Told (done, todo) as a pass processes product images.
pub type Progress = Arc<dyn Fn(usize, usize) + Send + Sync>;

/// How far the pass under way has got, for `/api/v1/status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PassProgress {
    pub running: bool,
    /// Images of this pass embedded or failed so far.
    pub done: usize,
    /// Images this pass has to embed.
    pub todo: usize,
    /// Seconds since the pass under way (or the last one) started.
    pub started_secs_ago: Option<f64>,
    /// Full passes started since the service started.
    pub passes: u64,
    /// Incremental passes (changes told by the change stream) since the service started.
    pub incremental_passes: u64,
}

#[derive(Default)]
struct Schedule {
    running: Option<PassFuture>,
    /// The pass that `pass_now` asked for while one was running: it starts when that
    /// one ends, and every call made meanwhile shares it.
    queued: Option<PassFuture>,
    /// When the last full pass that succeeded started: it saw every change made before.
    last_done: Option<Instant>,
    /// The same, by the clock (kept with the change stream's resume token).
    last_done_at: Option<DateTime>,
    /// When changes were last found to have gone untold (a change stream opened afresh):
    /// a full pass that started earlier no longer counts.
    missed_changes: Option<Instant>,
    /// The pass under way or the last one: (done, todo), when it started, how many.
    done_todo: (usize, usize),
    started: Option<Instant>,
    passes: u64,
    incremental_passes: u64,
}

/// How long a search waits for a starting follower (`expect_follower`) before it decides
/// on its own. The model loads meanwhile, which takes longer under 0.1 CPU.
const FOLLOWER_START_WAIT: Duration = Duration::from_secs(2);

pub struct Indexer {
    catalog: Catalog,
    embedder: Arc<Embedder>,
    vectors: Arc<VectorIndex>,
    fetcher: Fetcher,
    settings: IndexerSettings,
    /// Held for each pass: instances on one database take turns.
    lease: Lease,
    /// Held for each pass, full or incremental: they run one at a time here too (the
    /// lease is this instance's for both).
    turn: tokio::sync::Mutex<()>,
    /// Whether the change stream is followed now: full passes are then due only every
    /// CATALOG_FULL_SYNC_INTERVAL_SECS.
    following: AtomicBool,
    /// False from `expect_follower` until the follower first tells whether it follows.
    follower_told: tokio::sync::watch::Sender<bool>,
    /// Locked briefly, never across an await.
    schedule: Arc<Mutex<Schedule>>,
}

impl Indexer {
    pub fn new(
        catalog: Catalog,
        embedder: Arc<Embedder>,
        vectors: Arc<VectorIndex>,
        fetcher: Fetcher,
        settings: IndexerSettings,
        lease: Lease,
    ) -> Arc<Self> {
        Arc::new(Self {
            catalog,
            embedder,
            vectors,
            fetcher,
            settings,
            lease,
            turn: Default::default(),
            following: AtomicBool::new(false),
            follower_told: tokio::sync::watch::Sender::new(true),
            schedule: Default::default(),
        })
    }

    /// Told by the change stream's follower whether it follows the stream now (after a
    /// resume, once it has restored the last instance's full pass).
    pub fn set_following(&self, following: bool) {
        self.following.store(following, Ordering::Relaxed);
        self.follower_told.send_replace(true);
    }

    /// A follower is starting: searches wait for its first word before deciding that a
    /// full pass is due (`pass_if_due`).
    pub fn expect_follower(&self) {
        self.follower_told.send_replace(false);
    }

    /// Changes made until now may have gone untold (a stream opened afresh, not from a
    /// resume token, or ended): a full pass is due, whatever the last one's age.
    pub fn changes_missed(&self) {
        self.lock().missed_changes = Some(Instant::now());
    }

    /// When the last full pass started, if no change has gone untold since: the change
    /// stream's follower stores it with its resume token.
    pub fn covering_full_pass(&self) -> Option<DateTime> {
        let s = self.lock();
        match (s.last_done, s.missed_changes) {
            (Some(t), Some(m)) if t < m => None,
            _ => s.last_done_at,
        }
    }

    /// After a restart that resumed the change stream where the last instance left it:
    /// that instance's last full pass counts here, so none is due before its time.
    pub fn restore_full_pass(&self, at: DateTime) {
        let age = DateTime::now().timestamp_millis() - at.timestamp_millis();
        let age = Duration::from_millis(age.max(0) as u64);
        let mut s = self.lock();
        if s.last_done.is_none() {
            if let Some(t) = Instant::now().checked_sub(age) {
                (s.last_done, s.last_done_at) = (Some(t), Some(at));
            }
        }
    }

    /// How old the last full pass may be before a search starts one.
    fn pass_interval(&self) -> Duration {
        match self.following.load(Ordering::Relaxed) {
            true => self.settings.full_pass_interval,
            false => self.settings.pass_interval,
        }
    }

    /// Before a search: a pass if the last one is older than CATALOG_SYNC_INTERVAL_SECS,
    /// waited for at most SEARCH_SYNC_WAIT_SECS (the pass goes on in the background and
    /// the search uses what is stored so far). A failed pass does not fail the search.
    pub async fn pass_if_due(self: &Arc<Self>) {
        if !*self.follower_told.borrow() {
            // Just after start-up: a follower that resumes the stream restores the last
            // instance's full pass, and none is due. Under 0.1 CPU the first search came
            // before it and started a needless full pass (2.3 s at 10,000 products).
            let mut told = self.follower_told.subscribe();
            if tokio::time::timeout(FOLLOWER_START_WAIT, told.wait_for(|t| *t))
                .await
                .is_err()
            {
                // Only the first searches wait for a follower that stays silent.
                self.follower_told.send_replace(true);
            }
        }
        let pass = {
            let mut s = self.lock();
            let interval = self.pass_interval();
            let due = s
                .last_done
                .is_none_or(|t| t.elapsed() >= interval || s.missed_changes.is_some_and(|m| t < m));
            // A pass that is not due (a refresh's) does not hold searches up.
            match (&s.running, due) {
                (Some(f), true) => f.clone(),
                (None, true) => self.start(&mut s, Arc::new(|_, _| {})),
                (_, false) => return,
            }
        };
        match tokio::time::timeout(self.settings.search_wait, pass).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "index pass failed; searching stored embeddings")
            }
            Err(_) => tracing::info!("index pass still running; searching what is stored so far"),
        }
    }

    /// A pass that starts now or later, so that changes made before the call are seen.
    /// With none running it starts one; while one runs, it waits for that one and then
    /// for one more, which every call made meanwhile shares: N concurrent calls cost at
    /// most two passes, not N.
    pub async fn pass_now(self: &Arc<Self>) -> PassResult {
        self.pass_now_with_progress(Arc::new(|_, _| {})).await
    }

    pub async fn pass_now_with_progress(self: &Arc<Self>, progress: Progress) -> PassResult {
        let pass = {
            let mut s = self.lock();
            match (&s.running, &s.queued) {
                (None, _) => self.start(&mut s, progress),
                (Some(_), Some(queued)) => queued.clone(),
                (Some(running), None) => {
                    let queued = self.queue_after(running.clone(), progress);
                    s.queued = Some(queued.clone());
                    queued
                }
            }
        };
        pass.await
    }

    /// SEARCH_SYNC_WAIT_SECS: how long a request waits for a pass.
    pub fn search_wait(&self) -> std::time::Duration {
        self.settings.search_wait
    }

    /// The pass under way, or the last one.
    pub fn progress(&self) -> PassProgress {
        let s = self.lock();
        PassProgress {
            running: s.running.is_some(),
            done: s.done_todo.0,
            todo: s.done_todo.1,
            started_secs_ago: s.started.map(|t| t.elapsed().as_secs_f64()),
            passes: s.passes,
            incremental_passes: s.incremental_passes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.schedule.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A pass that starts when `running` ends (spawned, so it happens even if every
    /// caller gives up). If something else started a pass in between, that one will do.
    fn queue_after(self: &Arc<Self>, running: PassFuture, progress: Progress) -> PassFuture {
        let this = self.clone();
        let handle = tokio::spawn(async move {
            let _ = running.await;
            let next = {
                let mut s = this.lock();
                s.queued = None;
                match &s.running {
                    Some(f) => f.clone(),
                    None => this.start(&mut s, progress),
                }
            };
            next.await
        });
        shared(handle)
    }

    /// Spawns a pass (so it finishes even if every waiter goes away) and records it.
    fn start(self: &Arc<Self>, s: &mut Schedule, progress: Progress) -> PassFuture {
        let started = (Instant::now(), DateTime::now());
        s.started = Some(started.0);
        s.passes += 1;
        s.done_todo = (0, 0);
        let schedule = self.schedule.clone();
        let progress: Progress = Arc::new(move |done, todo| {
            schedule.lock().unwrap_or_else(|p| p.into_inner()).done_todo = (done, todo);
            progress(done, todo)
        });
        let this = self.clone();
        let handle = tokio::spawn(async move {
            let result = this.pass(Scope::All, progress).await;
            let mut s = this.lock();
            s.running = None;
            if result.is_ok() {
                (s.last_done, s.last_done_at) = (Some(started.0), Some(started.1));
            }
            result.map_err(Arc::new)
        });
        let pass = shared(handle);
        s.running = Some(pass.clone());
        pass
    }

    /// An incremental pass: `products` (changed, added, hidden or deleted) brought up to
    /// date, and nothing else read. With embeddings still in the one-per-product layout
    /// it marks a full pass due instead, which carries them over.
    pub async fn pass_products(&self, products: Vec<ProductId>) -> Result<IndexReport, PassError> {
        self.lock().incremental_passes += 1;
        self.pass(Scope::Products(products), Arc::new(|_, _| {}))
            .await
    }

    /// A pass under the lease: while another instance runs one, this one waits, and
    /// then plans with that one's embeddings stored (none embedded twice).
    async fn pass(&self, scope: Scope, progress: Progress) -> Result<IndexReport, PassError> {
        let _one_at_a_time = self.turn.lock().await;
        self.lease.hold(self.pass_held(scope, progress)).await?
    }

    async fn pass_held(&self, scope: Scope, progress: Progress) -> Result<IndexReport, PassError> {
        let start = Instant::now();
        let (catalog, model, metas) = match scope {
            Scope::All => {
                // The catalogue read needs no model: on the first pass it runs while the
                // model loads.
                let catalog = async { Ok::<_, PassError>(self.catalog.searchable().await?) };
                let model_and_metas =
                    async { self.vectors.metas_for_pass(self.embedder.model()).await };
                let (catalog, (model, metas)) = tokio::try_join!(catalog, model_and_metas)?;
                (catalog, model, metas)
            }
            Scope::Products(ids) => {
                let catalog =
                    async { Ok::<_, PassError>(self.catalog.searchable_among(&ids).await?) };
                let metas = async { Ok::<_, PassError>(self.vectors.metas_of(&ids).await?) };
                let model = async { Ok::<_, PassError>(self.embedder.model().await?) };
                let (catalog, metas, model) = tokio::try_join!(catalog, metas, model)?;
                let Some(metas) = metas else {
                    self.changes_missed();
                    return Ok(IndexReport::default());
                };
                (catalog, model, metas)
            }
        };
        let pipeline = Pipeline {
            embedder: &self.embedder,
            model,
            fetcher: &self.fetcher,
            vectors: &self.vectors,
            batch_size: self.embedder.max_batch(),
            fetch_concurrency: self.settings.index_fetch_concurrency,
            retry_failed_after: self.settings.retry_failed_after,
            progress: &*progress,
        };
        let report = pipeline.run(catalog, metas, start).await;
        // The pass's catalogue, metadata map and image buffers are freed now.
        crate::rank::release_freed_memory();
        report
    }
}

/// What a pass covers.
enum Scope {
    /// The whole catalogue and every stored embedding.
    All,
    /// These products and their embeddings.
    Products(Vec<ProductId>),
}

/// A spawned pass as a future every waiter can share.
fn shared(handle: tokio::task::JoinHandle<PassResult>) -> PassFuture {
    async move {
        handle
            .await
            .unwrap_or_else(|e| Err(Arc::new(PassError::Panicked(e.to_string()))))
    }
    .boxed()
    .shared()
}
