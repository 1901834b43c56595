//! The vector index: the stored embeddings (`store`), and with `CACHE_PRODUCTS=true` a
//! copy of the loaded model's vectors in memory, reconciled with the store every
//! CACHE_SYNC_INTERVAL_SECS (what other instances stored or removed). Searches `rank`
//! through it; index passes write through it and `apply` what they wrote to the cache.
//! Which of the two a search reads is decided here and nowhere else.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mongodb::bson::DateTime;
use tokio::sync::{Mutex, RwLock};

use crate::config::VectorSettings;
use crate::encoder::Encoder;
use crate::error::{DatabaseError, ModelError};
use crate::indexer::PassError;
use crate::rank::{rank_stream, Ask, Filter, Scored, VectorCache};
use crate::store::{Attrs, EmbeddingStore, ImageKey, StoredMeta};

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
}

/// `CACHE_PRODUCTS=true`: the vectors in memory (None until first loaded).
struct Cache {
    vectors: RwLock<Option<VectorCache>>,
    /// When the cache was last loaded or reconciled; held while doing either.
    reconciled: Mutex<Option<Instant>>,
    interval: Duration,
}

impl VectorIndex {
    pub fn new(store: EmbeddingStore, settings: &VectorSettings) -> Self {
        Self {
            store,
            cache: settings.cache_products.then(|| Cache {
                vectors: RwLock::new(None),
                reconciled: Mutex::new(None),
                interval: settings.reconcile_interval,
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
        let candidates = match &self.cache {
            Some(cache) => {
                self.cache_up_to_date(model, dim, false).await?;
                let guard = cache.vectors.read().await;
                match guard.as_ref() {
                    Some(c) => Some(c.shortlist(ask)),
                    None => return Ok(Vec::new()),
                }
            }
            None => None,
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
            let metas = self.cache_up_to_date(&id.key(), id.dim, true).await?;
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

    pub fn caching(&self) -> bool {
        self.cache.is_some()
    }

    /// Vectors in the cache now.
    pub async fn cached(&self) -> usize {
        match &self.cache {
            Some(c) => c.vectors.read().await.as_ref().map_or(0, |c| c.len()),
            None => 0,
        }
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
    /// The caller holds `reconciled`.
    async fn load_cache(
        &self,
        model: &str,
        dim: usize,
        mut metas: Option<&mut Metas>,
    ) -> Result<(), DatabaseError> {
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
        let cursor = self.store.vectors(None, self.batch_size).await?;
        let n = fresh.load_with_metas(cursor, metas).await?;
        fresh.shrink();
        crate::rank::release_freed_memory();
        tracing::info!(
            vectors = n,
            bytes = fresh.heap_bytes(),
            "product vectors cached in memory"
        );
        *cache.vectors.write().await = Some(fresh);
        Ok(())
    }

    /// Loads `model`'s vectors on first use, and every CACHE_SYNC_INTERVAL_SECS
    /// reconciles them with the store. With `want_metas` (an index pass), also returns
    /// every stored document's metadata, taken from the same read when there is one.
    async fn cache_up_to_date(
        &self,
        model: &str,
        dim: usize,
        want_metas: bool,
    ) -> Result<Option<Metas>, DatabaseError> {
        let Some(cache) = &self.cache else {
            return Ok(None);
        };
        let mut reconciled = cache.reconciled.lock().await;
        if !self.cache_holds(model).await {
            let mut metas = HashMap::new();
            self.load_cache(model, dim, want_metas.then_some(&mut metas))
                .await?;
            *reconciled = Some(Instant::now());
            return Ok(want_metas.then_some(metas));
        }
        let due = reconciled.is_none_or(|t| t.elapsed() >= cache.interval);
        if due {
            *reconciled = Some(Instant::now());
        }
        drop(reconciled);
        if !due && !want_metas {
            return Ok(None);
        }
        let metas = self.store.metas().await?;
        if due {
            self.reconcile(model, &metas).await?;
        }
        Ok(want_metas.then_some(metas))
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
        }
        tracing::debug!(
            changed = changed.len(),
            removed = gone.len(),
            "cache reconciled with the store"
        );
        Ok(())
    }
}
