//! One index pass's work, image by image (a product has one or several): plan what is
//! missing or stale, remove what is gone, then
//! fetch -> decode -> embed -> store. Images are fetched concurrently with a bound,
//! embedded MAX_BATCH_SIZE at a time, and each batch is stored while the next one is in
//! the model. A photo that cannot be used is recorded as failed (retried after
//! RETRY_FAILED_AFTER_SECS), not an error of the pass.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{stream, StreamExt};
use mongodb::bson::DateTime;
use ndarray::Array3;
use tokio::sync::mpsc;

use super::{IndexReport, PassError};
use crate::catalog::Searchable;
use crate::embedder::{ms_since, Embedder};
use crate::encoder::Encoder;
use crate::fetch::Fetcher;
use crate::store::{Attrs, ImageKey, ProductId};
use crate::vectors::{Change, Metas, VectorIndex};

/// Which product images need an embedding, and which stored embeddings must go.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Images whose embedding is missing or of another model, or whose failure is due
    /// for a retry.
    pub todo: Vec<ImageKey>,
    /// Stored embeddings of images that are gone: the product was deleted or is no
    /// longer searchable, or the photo is no longer at PRODUCT_IMAGE_FIELD.
    pub gone: Vec<ImageKey>,
    /// Images that failed earlier and are not due for a retry yet.
    pub failed_waiting: usize,
    /// Images whose stored embedding is usable as it is.
    pub up_to_date: usize,
    /// Of those, images whose product's category or price changed: their stored
    /// attributes are rewritten, the vector stays.
    pub retag: Vec<ImageKey>,
    /// Products with at least one usable embedding already.
    pub ready: HashSet<ProductId>,
}

pub fn plan(
    images: &[ImageKey],
    attrs: &HashMap<ProductId, Attrs>,
    metas: &Metas,
    model: &str,
    retry_failed_after: Duration,
    now: DateTime,
) -> Plan {
    let mut plan = Plan::default();
    for image in images {
        match metas.get(image) {
            Some(m) if m.model == model => {
                let age = now.timestamp_millis() - m.updated_at.timestamp_millis();
                if m.ok {
                    plan.up_to_date += 1;
                    plan.ready.insert(image.product.clone());
                    if attrs.get(&image.product).is_some_and(|a| *a != m.attrs) {
                        plan.retag.push(image.clone());
                    }
                } else if age >= retry_failed_after.as_millis() as i64 {
                    plan.todo.push(image.clone());
                } else {
                    plan.failed_waiting += 1;
                }
            }
            _ => plan.todo.push(image.clone()),
        }
    }
    let live: HashSet<&ImageKey> = images.iter().collect();
    plan.gone = metas
        .keys()
        .filter(|key| !live.contains(key))
        .cloned()
        .collect();
    plan
}

fn lock(changes: &Mutex<Vec<Change>>) -> std::sync::MutexGuard<'_, Vec<Change>> {
    changes.lock().unwrap_or_else(|p| p.into_inner())
}

/// The recorded writes, leaving none.
fn take(changes: &Mutex<Vec<Change>>) -> Vec<Change> {
    std::mem::take(&mut *lock(changes))
}

/// What a pass's pipeline works with.
pub struct Pipeline<'a> {
    pub embedder: &'a Embedder,
    pub model: Arc<Encoder>,
    pub fetcher: &'a Fetcher,
    pub vectors: &'a VectorIndex,
    pub batch_size: usize,
    pub fetch_concurrency: usize,
    pub retry_failed_after: Duration,
    /// Told (done, todo) as products are processed.
    pub progress: &'a (dyn Fn(usize, usize) + Send + Sync),
}

/// A product photo fetched and decoded, or why it could not be.
struct Prepared {
    image: ImageKey,
    tensor: Result<Array3<f32>, String>,
    fetch_ms: f64,
    decode_ms: f64,
}

/// A batch out of the model, to be stored.
struct Embedded {
    images: Vec<ImageKey>,
    vectors: Vec<Vec<f32>>,
}

/// What the model stage counts (the writer counts the rest).
#[derive(Default)]
struct ModelStageStats {
    failed: usize,
    fetch_ms: f64,
    decode_ms: f64,
    model_ms: f64,
    store_ms: f64,
}

impl Pipeline<'_> {
    /// One pass over `catalog` (the searchable products' images and attributes) against
    /// `metas` (every stored embedding's metadata), both read by the caller, which
    /// started at `start`. Every write goes to the cache too, batch by batch, even when
    /// the pass fails half-way.
    pub async fn run(
        &self,
        catalog: Searchable,
        metas: Metas,
        start: Instant,
    ) -> Result<IndexReport, PassError> {
        let changes = Mutex::new(Vec::new());
        let report = self.run_recording(catalog, metas, start, &changes).await;
        self.vectors.apply(take(&changes)).await;
        report
    }

    async fn run_recording(
        &self,
        catalog: Searchable,
        metas: Metas,
        start: Instant,
        changes: &Mutex<Vec<Change>>,
    ) -> Result<IndexReport, PassError> {
        let record = |c: Change| lock(changes).push(c);
        let model = self.model.identity().key();
        let Searchable { images, attrs } = catalog;
        let plan = plan(
            &images,
            &attrs,
            &metas,
            &model,
            self.retry_failed_after,
            DateTime::now(),
        );
        drop(metas);
        let mut report = IndexReport {
            // Products with at least one image, each with its attributes.
            total_products: attrs.len(),
            total_images: images.len(),
            failed_waiting: plan.failed_waiting,
            ..Default::default()
        };
        let mut ready = plan.ready;
        report.timings.plan_ms = ms_since(start);
        if !plan.gone.is_empty() {
            report.removed = self.vectors.delete(&plan.gone).await? as usize;
            plan.gone
                .into_iter()
                .for_each(|id| record(Change::Removed(id)));
        }
        for chunk in plan.retag.chunks(1000) {
            let items: Vec<_> = chunk
                .iter()
                .filter_map(|i| Some((i, attrs.get(&i.product)?)))
                .collect();
            let at = self.vectors.set_attrs(&items).await?;
            report.retagged += items.len();
            for (image, a) in items {
                record(Change::Retagged {
                    image: image.clone(),
                    attrs: a.clone(),
                    at,
                });
            }
        }
        let todo = plan.todo;
        if !todo.is_empty() {
            tracing::info!(
                todo = todo.len(),
                total = images.len(),
                "indexing product images"
            );
        }
        let total_todo = todo.len();
        (self.progress)(0, total_todo);
        let done = AtomicUsize::new(0);
        let advance = |n: usize| {
            let d = done.fetch_add(n, Ordering::Relaxed) + n;
            (self.progress)(d, total_todo);
        };

        // Three stages run at once, joined by small channels: fetch and decode (bounded
        // concurrency), the model (MAX_BATCH_SIZE at a time), and MongoDB writes. Writing
        // a batch while the next one is in the model keeps the model from waiting on the
        // database (the writes of a batch took 2-12 ms a product when they were in line).
        let (prepared_tx, prepared_rx) = mpsc::channel(self.batch_size * 2);
        let (embedded_tx, embedded_rx) = mpsc::channel(1);
        let fetching = async {
            let tx = prepared_tx;
            let mut prepared = stream::iter(todo)
                .map(|p| self.prepare(p))
                .buffer_unordered(self.fetch_concurrency);
            while let Some(item) = prepared.next().await {
                if tx.send(item).await.is_err() {
                    break; // the model stage failed
                }
            }
        };
        let embedding = self.model_stage(prepared_rx, embedded_tx, &model, &record, &advance);
        let storing = async {
            let mut rx = embedded_rx;
            let (mut embedded, mut store_ms, mut done_products) = (0, 0.0, Vec::new());
            while let Some(Embedded { images, vectors }) = rx.recv().await {
                let t = Instant::now();
                let none = Attrs::default();
                let attrs_of = |i: &ImageKey| attrs.get(&i.product).unwrap_or(&none);
                let items: Vec<_> = images
                    .iter()
                    .zip(&vectors)
                    .map(|(i, v)| (i, attrs_of(i), v.as_slice()))
                    .collect();
                let at = self.vectors.put_vectors(&items, &model).await?;
                store_ms += ms_since(t);
                embedded += images.len();
                advance(images.len());
                for (image, vector) in images.into_iter().zip(vectors) {
                    done_products.push(image.product.clone());
                    let attrs = attrs_of(&image).clone();
                    record(Change::Stored {
                        image,
                        vector,
                        attrs,
                        at,
                    });
                }
                // Into the cache batch by batch: holding every stored vector until the
                // pass ended took 5 KB an EfficientNet product (785 MB at 100,000).
                self.vectors.apply(take(changes)).await;
            }
            Ok::<_, PassError>((embedded, store_ms, done_products))
        };
        let ((), stats, stored) = tokio::join!(fetching, embedding, storing);
        let (embedded, store_ms, done_products) = stored?;
        ready.extend(done_products);
        let stats = stats?;
        report.embedded = embedded;
        report.failed = stats.failed;
        report.timings.fetch_ms = stats.fetch_ms;
        report.timings.decode_ms = stats.decode_ms;
        report.timings.model_ms = stats.model_ms;
        report.timings.store_ms = stats.store_ms + store_ms;
        report.indexed_images = plan.up_to_date + report.embedded;
        report.indexed_products = ready.len();
        report.timings.total_ms = ms_since(start);
        if total_todo > 0 || report.removed > 0 {
            tracing::info!(
                embedded = report.embedded,
                failed = report.failed,
                removed = report.removed,
                ms = report.timings.total_ms as u64,
                "index pass done"
            );
        }
        Ok(report)
    }

    /// Fetches and decodes one product photo; failures are the image's, not the pass's.
    async fn prepare(&self, image: ImageKey) -> Prepared {
        let t = Instant::now();
        let fetched = self.fetcher.fetch(&image.url).await;
        let fetch_ms = ms_since(t);
        let failed = |reason: String, decode_ms| Prepared {
            image: image.clone(),
            tensor: Err(reason),
            fetch_ms,
            decode_ms,
        };
        let bytes = match fetched {
            Ok(b) => b,
            Err(e) => return failed(e.to_string(), 0.0),
        };
        let slot = match self.embedder.decode_slot().await {
            Ok(slot) => slot,
            Err(e) => return failed(e.to_string(), 0.0),
        };
        let t = Instant::now();
        let tensor = slot
            .prepare(&self.model, bytes)
            .await
            .map_err(|e| e.to_string());
        let decode_ms = ms_since(t);
        Prepared {
            image,
            tensor,
            fetch_ms,
            decode_ms,
        }
    }

    /// Takes prepared photos MAX_BATCH_SIZE at a time: records the failed ones, runs the
    /// model on the rest and hands them to the writer. Owns both channel ends so that its
    /// failure stops the fetching and lets the writer finish what it was given.
    async fn model_stage(
        &self,
        mut rx: mpsc::Receiver<Prepared>,
        tx: mpsc::Sender<Embedded>,
        model: &str,
        record: &(dyn Fn(Change) + Sync),
        advance: &(dyn Fn(usize) + Sync),
    ) -> Result<ModelStageStats, PassError> {
        let mut stats = ModelStageStats::default();
        let mut batch = Vec::with_capacity(self.batch_size);
        loop {
            batch.clear();
            while batch.len() < self.batch_size {
                match rx.recv().await {
                    Some(item) => batch.push(item),
                    None => break,
                }
            }
            if batch.is_empty() {
                return Ok(stats);
            }
            let (mut images, mut tensors) = (Vec::new(), Vec::new());
            for p in batch.drain(..) {
                stats.fetch_ms += p.fetch_ms;
                stats.decode_ms += p.decode_ms;
                match p.tensor {
                    Ok(t) => {
                        images.push(p.image);
                        tensors.push(t);
                    }
                    Err(reason) => {
                        let i = p.image;
                        tracing::warn!(product = %i.product, url = %i.url, %reason, "product image skipped");
                        let t = Instant::now();
                        self.vectors.put_failure(&i, model, &reason).await?;
                        stats.store_ms += ms_since(t);
                        // Its old vector (another model's) is no longer usable.
                        record(Change::Removed(i));
                        stats.failed += 1;
                        advance(1);
                    }
                }
            }
            if images.is_empty() {
                continue;
            }
            let t = Instant::now();
            let vectors = self.embedder.run(&self.model, tensors).await?;
            stats.model_ms += ms_since(t);
            if tx.send(Embedded { images, vectors }).await.is_err() {
                return Ok(stats); // the writer failed: its error is the pass's
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoredMeta;
    use mongodb::bson::oid::ObjectId;
    use std::collections::HashMap;

    fn p(n: u8, url: &str) -> ImageKey {
        ImageKey::new(ProductId::Oid(ObjectId::from_bytes([n; 12])), url)
    }

    fn meta(model: &str, ok: bool, at: i64) -> StoredMeta {
        StoredMeta {
            legacy: false,
            attrs: Attrs::default(),
            model: model.into(),
            ok,
            updated_at: DateTime::from_millis(at),
        }
    }

    #[test]
    fn plan_embeds_missing_and_stale_and_drops_gone() {
        let images = vec![
            p(1, "a"),
            p(2, "b"),
            p(3, "c"),
            p(4, "d"),
            p(5, "e"),
            p(1, "a2"),
        ];
        let mut metas = HashMap::new();
        metas.insert(p(1, "a"), meta("m", true, 0)); // fresh
        metas.insert(p(2, "old"), meta("m", true, 0)); // image changed
        metas.insert(p(3, "c"), meta("other", true, 0)); // model changed
        metas.insert(p(4, "d"), meta("m", false, 9_000)); // failed recently
        metas.insert(p(9, "z"), meta("m", true, 0)); // product deleted
        let now = DateTime::from_millis(10_000);
        let mut attrs = HashMap::new();
        let plan1 = plan(&images, &attrs, &metas, "m", Duration::from_secs(5), now);
        let urls: Vec<_> = plan1.todo.iter().map(|t| t.url.as_str()).collect();
        assert_eq!(urls, vec!["b", "c", "e", "a2"]);
        let mut gone = plan1.gone.clone();
        gone.sort_by(|a, b| a.url.cmp(&b.url));
        assert_eq!(gone, vec![p(2, "old"), p(9, "z")]);
        assert_eq!((plan1.failed_waiting, plan1.up_to_date), (1, 1));
        assert_eq!(plan1.ready, HashSet::from([p(1, "").product]));
        assert!(plan1.retag.is_empty());
        // Once the retry delay has passed the failed one is tried again.
        let plan2 = plan(&images, &attrs, &metas, "m", Duration::from_secs(1), now);
        assert!(plan2.todo.iter().any(|t| t.url == "d"));
        assert_eq!(plan2.failed_waiting, 0);
        // A new price of product 1: its usable image is retagged, not embedded again.
        let priced = Attrs {
            categories: vec!["c".into()],
            price: Some(5.0),
        };
        attrs.insert(p(1, "").product, priced);
        let plan3 = plan(&images, &attrs, &metas, "m", Duration::from_secs(5), now);
        assert_eq!(plan3.retag, vec![p(1, "a")]);
        assert!(!plan3.todo.contains(&p(1, "a")));
    }
}
