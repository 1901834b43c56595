//! The vector index: the stored embeddings (`store`), and unless `CACHE_PRODUCTS=false`
//! a compact copy of the loaded model's vectors in memory (with `auto`, while it fits
//! VECTOR_CACHE_MAX_MB), reconciled with the store every CACHE_SYNC_INTERVAL_SECS (what
//! other instances stored or removed). Searches `rank` through it; index passes write
//! through it and `apply` what they wrote to the cache. Which of the two a search reads
//! is decided here and nowhere else.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mongodb::bson::DateTime;
use tokio::sync::{Mutex, RwLock};

use crate::atlas::{AtlasSearch, AtlasStatus};
use crate::config::{CacheMode, VectorSearch, VectorSettings};
use crate::encoder::Encoder;
use crate::error::{DatabaseError, ModelError};
use crate::indexer::PassError;
use crate::rank::{rank_stream, Ask, Filter, Scored, VectorCache};
use crate::store::{Attrs, EmbeddingStore, ImageKey, ProductId, StoredMeta};

/// What a search asks of the index beside its vector.
#[derive(Clone, Debug, PartialEq)]
pub struct RankQuery {
    /// Results wanted (the search asks the index for a few spares beyond).
    pub top_k: usize,
    /// Lowest cosine similarity returned.
    pub threshold: f32,
    /// The request filters (category, price), applied before the cut.
    pub filter: Filter,
}

/// Every stored embedding's metadata, by product image.
pub type Metas = HashMap<ImageKey, StoredMeta>;

/// Stored embeddings of one model: (images, products) usable and failed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub ok: (u64, u64),
    pub failed: (u64, u64),
}

/// A write of an index pass, for the cache.
pub enum Change {
    Stored {
        image: ImageKey,
        vector: Vec<f32>,
        attrs: Attrs,
        at: DateTime,
    },
    /// New category or price, same vector.
    Retagged {
        image: ImageKey,
        attrs: Attrs,
        at: DateTime,
    },
    Removed(ImageKey),
}

pub struct VectorIndex {
    store: EmbeddingStore,
    cache: Option<Cache>,
    batch_size: u32,
    /// VECTOR_SEARCH=atlas: ranks through Atlas once its index is queryable.
    atlas: Option<Arc<AtlasSearch>>,
}

/// `CACHE_PRODUCTS=true` or `auto`: the vectors in memory (None until first loaded, and
/// while they do not fit).
struct Cache {
    vectors: RwLock<Option<VectorCache>>,
    /// Held while loading or reconciling.
    clock: Mutex<Clock>,
    interval: Duration,
    /// With `auto`, the bytes the vectors may take.
    limit: Option<usize>,
}

impl Cache {
    /// With `auto`, vectors that grew past the limit (new products, longer URLs) leave
    /// memory; searches stream them until a reload finds they fit again.
    fn drop_if_too_big(&self, vectors: &mut Option<VectorCache>) {
        let bytes = vectors.as_ref().map_or(0, VectorCache::approx_bytes);
        if self.limit.is_some_and(|l| bytes > l) {
            tracing::warn!(
                bytes,
                "the product vectors outgrew VECTOR_CACHE_MAX_MB; searches stream them from MongoDB"
            );
            *vectors = None;
        }
    }
}

#[derive(Default)]
struct Clock {
    /// When the cache was last loaded or reconciled.
    reconciled: Option<Instant>,
    /// When the vectors were last found not to fit: streamed until REFIT_INTERVALS
    /// reconcile intervals have passed (a load that stops midway reads them for nothing).
    too_big: Option<Instant>,
}

const REFIT_INTERVALS: u32 = 10;

/// Runs `f` (CPU-bound, without awaiting) so that, when `long`, the runtime's other
/// tasks do not wait for it: on the multi-thread runtime the worker first hands them to
/// another thread (`block_in_place`). Under a CPU quota tokio runs one worker, and a
/// health check queued behind a long scan waited several CFS periods.
fn cpu_bound<R>(long: bool, f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let multi =
        Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
    if long && multi {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

impl VectorIndex {
    pub fn new(store: EmbeddingStore, settings: &VectorSettings) -> Self {
        let atlas = (settings.vector_search == VectorSearch::Atlas)
            .then(|| store.atlas(&settings.atlas_search_index));
        Self {
            atlas,
            store,
            cache: (settings.cache_products != CacheMode::Off).then(|| Cache {
                vectors: RwLock::new(None),
                clock: Mutex::new(Clock::default()),
                interval: settings.reconcile_interval,
                limit: (settings.cache_products == CacheMode::Auto)
                    .then_some(settings.vector_cache_max_bytes),
            }),
            batch_size: settings.vector_batch_size,
        }
    }

    pub async fn ensure_indexes(&self) -> mongodb::error::Result<()> {
        self.store.ensure_indexes().await
    }

    /// The best `ask.k` products of `model`'s stored vectors for `ask`, best first.
    pub async fn rank(&self, model: &str, ask: Ask<'_>) -> Result<Vec<Scored>, DatabaseError> {
        let Some(dim) = ask.queries.first().map(|q| q.len()) else {
            return Ok(Vec::new());
        };
        if let Some(atlas) = self.atlas.as_ref().filter(|a| a.queryable(dim)) {
            match atlas.rank(model, ask).await {
                Ok(found) => return Ok(found),
                // The index dropped or the stage refused: exact this time, and the
                // index is looked at again.
                Err(e) => atlas.failed(&e),
            }
        }
        let candidates = match &self.cache {
            Some(cache) if self.cache_up_to_date(model, dim, false).await?.0 => {
                let guard = cache.vectors.read().await;
                guard
                    .as_ref()
                    .filter(|c| c.model == model)
                    .map(|c| cpu_bound(c.long_scan(), || c.shortlist(ask)))
            }
            _ => None,
        };
        // Streaming reads every vector; with the cache, just the candidates', which are
        // ranked exactly: the scores are the stored vectors' cosines in both modes.
        if candidates.as_ref().is_some_and(Vec::is_empty) {
            return Ok(Vec::new());
        }
        let cursor = self
            .store
            .vectors(candidates.as_deref(), self.batch_size)
            .await?;
        Ok(rank_stream(cursor, model, ask).await?)
    }

    /// The stored usable vectors of `model` for `images`, from the store (by `_id`, in
    /// either mode): (image URL, vector).
    pub async fn vectors_of(
        &self,
        model: &str,
        images: &[ImageKey],
    ) -> Result<Vec<(String, Vec<f32>)>, DatabaseError> {
        Ok(self.store.vectors_of(model, images).await?)
    }

    /// For an index pass: the model (from `model`) and every stored embedding's
    /// metadata. Streaming, the metadata is read while the model loads; with the cache,
    /// it comes from the read that loads or reconciles the cache (the collection is read
    /// once, not twice), which needs the model first. When that metadata shows documents
    /// of the one-per-product layout, they are carried over first: the pass deletes by
    /// image `_id`, which they do not have yet. Their metadata stays as read (same
    /// image, model, status and time).
    pub async fn metas_for_pass(
        &self,
        model: impl Future<Output = Result<Arc<Encoder>, ModelError>>,
    ) -> Result<(Arc<Encoder>, Metas), PassError> {
        let (encoder, metas) = if self.cache.is_some() {
            let encoder = model.await?;
            let id = encoder.identity();
            let (_, metas) = self.cache_up_to_date(&id.key(), id.dim, true).await?;
            (encoder, metas.unwrap_or_default())
        } else {
            let metas = async { self.store.metas().await.map_err(PassError::from) };
            let model = async { model.await.map_err(PassError::from) };
            tokio::try_join!(model, metas)?
        };
        if metas.values().any(|m| m.legacy) {
            let moved = self.store.migrate_layout().await?;
            tracing::info!(moved, "embeddings carried over to one document per image");
        }
        Ok((encoder, metas))
    }

    /// For an incremental pass: the metadata of `products`' stored embeddings, or None
    /// when some are still in the one-per-product layout (a full pass carries them over).
    pub async fn metas_of(&self, products: &[ProductId]) -> Result<Option<Metas>, DatabaseError> {
        let metas = self.store.metas_of(products).await?;
        Ok((!metas.values().any(|m| m.legacy)).then_some(metas))
    }

    /// Stores the vectors of one batch; returns their update time.
    pub async fn put_vectors(
        &self,
        items: &[(&ImageKey, &Attrs, &[f32])],
        model: &str,
    ) -> Result<DateTime, DatabaseError> {
        self.store.put_vectors(items, model).await
    }

    /// Stores new filter attributes for images whose vectors stay; returns the time.
    pub async fn set_attrs(
        &self,
        items: &[(&ImageKey, &Attrs)],
    ) -> Result<DateTime, DatabaseError> {
        self.store.set_attrs(items).await
    }

    /// Records that a product image could not be used (retried later).
    pub async fn put_failure(
        &self,
        key: &ImageKey,
        model: &str,
        reason: &str,
    ) -> Result<(), DatabaseError> {
        Ok(self.store.put_failure(key, model, reason).await?)
    }

    pub async fn delete(&self, keys: &[ImageKey]) -> Result<u64, DatabaseError> {
        Ok(self.store.delete(keys).await?)
    }

    /// An index pass's writes, into the cache (nothing to do when streaming).
    pub async fn apply(&self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        let Some(cache) = &self.cache else {
            return;
        };
        let mut guard = cache.vectors.write().await;
        if let Some(c) = guard.as_mut() {
            for change in changes {
                match change {
                    Change::Stored {
                        image,
                        vector,
                        attrs,
                        at,
                    } => c.upsert(image, &vector, &attrs, at),
                    Change::Retagged { image, attrs, at } => c.set_attrs(&image, &attrs, at),
                    Change::Removed(image) => c.remove(&image),
                }
            }
            cache.drop_if_too_big(&mut guard);
        }
    }

    /// Stored embeddings of `model`, usable and failed, as (images, products) each.
    pub async fn counts(&self, model: &str) -> Result<Counts, DatabaseError> {
        let (ok, failed) = tokio::try_join!(
            self.store.count(model, true),
            self.store.count(model, false)
        )?;
        Ok(Counts { ok, failed })
    }

    /// Whether the vectors are in memory now, how many, and the bytes they take.
    pub async fn cached(&self) -> Option<(usize, usize)> {
        let c = self.cache.as_ref()?.vectors.read().await;
        c.as_ref().map(|c| (c.len(), c.heap_bytes()))
    }

    /// Whether searches rank through Atlas Vector Search, and why not.
    pub fn vector_search(&self) -> AtlasStatus {
        self.atlas.as_ref().map_or(
            AtlasStatus {
                mode: "exact",
                state: "off",
                index: None,
                reason: None,
            },
            |a| a.status(),
        )
    }

    /// CACHE_PRODUCTS as configured.
    pub fn mode(&self) -> &'static str {
        match &self.cache {
            None => "false",
            Some(c) if c.limit.is_some() => "auto",
            Some(_) => "true",
        }
    }

    /// VECTOR_CACHE_MAX_MB in bytes, when it applies (`CACHE_PRODUCTS=auto`).
    pub fn cache_limit(&self) -> Option<usize> {
        self.cache.as_ref()?.limit
    }

    /// Whether the cache holds `model`'s vectors.
    async fn cache_holds(&self, model: &str) -> bool {
        match &self.cache {
            Some(cache) => cache
                .vectors
                .read()
                .await
                .as_ref()
                .is_some_and(|c| c.model == model),
            None => false,
        }
    }

    /// Loads `model`'s vectors into a fresh cache, replacing the old one, from one plain
    /// scan of the collection; given `metas`, every document's metadata goes there too.
    /// False, with the old cache gone, when they do not fit the limit (`metas` then may
    /// be partial). The caller holds `clock`.
    async fn load_cache(
        &self,
        model: &str,
        dim: usize,
        mut metas: Option<&mut Metas>,
    ) -> Result<bool, DatabaseError> {
        let Some(cache) = &self.cache else {
            return Ok(false);
        };
        *cache.vectors.write().await = None;
        let mut fresh = VectorCache::new(model.to_string(), dim);
        // An upper bound from metadata (a count of the model's vectors took as long as
        // reading half of them); `shrink` below returns what was not used.
        let estimate = self.store.estimated_count().await? as usize;
        if let Some(limit) = cache.limit {
            let need = estimate.saturating_mul(VectorCache::row_bytes_estimate(dim));
            if need > limit {
                tracing::info!(
                    documents = estimate,
                    need,
                    limit,
                    "product vectors would not fit VECTOR_CACHE_MAX_MB; searches stream them from MongoDB"
                );
                return Ok(false);
            }
        }
        fresh.reserve_exact(estimate);
        if let Some(m) = metas.as_deref_mut() {
            m.reserve(estimate);
        }
        let cursor = self.store.vectors(None, self.batch_size).await?;
        let Some(n) = fresh.load_with_metas(cursor, metas, cache.limit).await? else {
            drop(fresh);
            crate::rank::release_freed_memory();
            tracing::info!(
                limit = cache.limit,
                "product vectors outgrew VECTOR_CACHE_MAX_MB while loading; searches stream them from MongoDB"
            );
            return Ok(false);
        };
        fresh.shrink();
        crate::rank::release_freed_memory();
        tracing::info!(
            vectors = n,
            bytes = fresh.heap_bytes(),
            "product vectors cached in memory"
        );
        *cache.vectors.write().await = Some(fresh);
        Ok(true)
    }

    /// Loads `model`'s vectors on first use (with `auto`, when they fit; after they did
    /// not, again every REFIT_INTERVALS intervals), and every CACHE_SYNC_INTERVAL_SECS
    /// reconciles them with the store. Returns whether they are in memory, and with
    /// `want_metas` (an index pass) every stored document's metadata, taken from the
    /// same read when there is one.
    async fn cache_up_to_date(
        &self,
        model: &str,
        dim: usize,
        want_metas: bool,
    ) -> Result<(bool, Option<Metas>), DatabaseError> {
        let Some(cache) = &self.cache else {
            return Ok((false, None));
        };
        let mut clock = cache.clock.lock().await;
        if !self.cache_holds(model).await {
            let refit = cache.interval * REFIT_INTERVALS;
            if clock.too_big.is_none_or(|t| t.elapsed() >= refit) {
                let mut metas = HashMap::new();
                if self
                    .load_cache(model, dim, want_metas.then_some(&mut metas))
                    .await?
                {
                    *clock = Clock {
                        reconciled: Some(Instant::now()),
                        too_big: None,
                    };
                    return Ok((true, want_metas.then_some(metas)));
                }
                clock.too_big = Some(Instant::now());
            }
            drop(clock);
            let metas = match want_metas {
                true => Some(self.store.metas().await?),
                false => None,
            };
            return Ok((false, metas));
        }
        let due = clock
            .reconciled
            .is_none_or(|t| t.elapsed() >= cache.interval);
        if due {
            clock.reconciled = Some(Instant::now());
        }
        drop(clock);
        if !due && !want_metas {
            return Ok((true, None));
        }
        let metas = self.store.metas().await?;
        if due {
            self.reconcile(model, &metas).await?;
        }
        Ok((true, want_metas.then_some(metas)))
    }

    /// Reconciles the cache with the stored metadata by comparing update times, then
    /// reads just the vectors that changed.
    async fn reconcile(&self, model: &str, metas: &Metas) -> Result<(), DatabaseError> {
        let Some(cache) = &self.cache else {
            return Ok(());
        };
        let (changed, gone): (Vec<ImageKey>, Vec<ImageKey>) = {
            let guard = cache.vectors.read().await;
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
        let mut guard = cache.vectors.write().await;
        if let Some(c) = guard.as_mut() {
            for id in &gone {
                c.remove(id);
            }
            for chunk in changed.chunks(1000) {
                let cursor = self.store.vectors(Some(chunk), self.batch_size).await?;
                c.load(cursor).await?;
            }
            cache.drop_if_too_big(&mut guard);
        }
        tracing::debug!(
            changed = changed.len(),
            removed = gone.len(),
            "cache reconciled with the store"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::cpu_bound;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// With one worker (as under a CPU quota), a task spawned before a long scan still
    /// runs while the scan does: the scan waits here for that task, within 10 s.
    #[test]
    fn a_long_scan_leaves_the_only_worker_to_other_tasks() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        // On the worker (block_on's own future runs on the calling thread).
        let scan = rt.spawn(async {
            let flag = Arc::new(AtomicBool::new(false));
            let f = flag.clone();
            tokio::spawn(async move { f.store(true, Ordering::SeqCst) });
            cpu_bound(true, || {
                let t = Instant::now();
                while !flag.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                flag.load(Ordering::SeqCst)
            })
        });
        let ran = rt.block_on(scan).unwrap();
        assert!(ran, "the other task did not run during the scan");
    }

    /// The current-thread runtime (where block_in_place would panic) runs it inline.
    #[tokio::test]
    async fn on_the_current_thread_runtime_it_runs_inline() {
        assert_eq!(cpu_bound(true, || 7), 7);
    }
}
