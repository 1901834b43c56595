//! One index pass's work: plan what is missing or stale, remove what is gone, then
//! fetch -> decode -> embed -> store. Images are fetched concurrently with a bound,
//! embedded MAX_BATCH_SIZE at a time, and each batch is stored while the next one is in
//! the model. A photo that cannot be used is recorded as failed (retried after
//! RETRY_FAILED_AFTER_SECS), not an error of the pass.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{stream, StreamExt};
use mongodb::bson::DateTime;
use ndarray::Array3;
use tokio::sync::mpsc;

use super::{IndexReport, PassError};
use crate::catalog::ProductRef;
use crate::embedder::{ms_since, Embedder};
use crate::encoder::Encoder;
use crate::fetch::Fetcher;
use crate::store::ProductId;
use crate::vectors::{Change, Metas, VectorIndex};

/// Which products need an embedding, and which stored embeddings must go.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Products whose embedding is missing or stale (image or model changed), or whose
    /// failed image is due for a retry.
    pub todo: Vec<ProductRef>,
    /// Stored embeddings of products that are gone or no longer searchable.
    pub gone: Vec<ProductId>,
    /// Products whose image failed earlier and is not due for a retry yet.
    pub failed_waiting: usize,
    /// Products whose stored embedding is usable as it is.
    pub up_to_date: usize,
}

pub fn plan(
    products: &[ProductRef],
    metas: &Metas,
    model: &str,
    retry_failed_after: Duration,
    now: DateTime,
) -> Plan {
    let mut plan = Plan::default();
    for p in products {
        match metas.get(&p.id) {
            Some(m) if m.image_url == p.image_url && m.model == model => {
                let age = now.timestamp_millis() - m.updated_at.timestamp_millis();
                if m.ok {
                    plan.up_to_date += 1;
                } else if age >= retry_failed_after.as_millis() as i64 {
                    plan.todo.push(p.clone());
                } else {
                    plan.failed_waiting += 1;
                }
            }
            _ => plan.todo.push(p.clone()),
        }
    }
    let live: HashSet<&ProductId> = products.iter().map(|p| &p.id).collect();
    plan.gone = metas
        .keys()
        .filter(|id| !live.contains(id))
        .cloned()
        .collect();
    plan
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
    product: ProductRef,
    tensor: Result<Array3<f32>, String>,
    fetch_ms: f64,
    decode_ms: f64,
}

/// A batch out of the model, to be stored.
struct Embedded {
    products: Vec<ProductRef>,
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
    /// One pass over `products` (the searchable products) against `metas` (every stored
    /// embedding's metadata), both read by the caller, which started at `start`. Returns
    /// the report and every write made, failed or not (for the cache).
    pub async fn run(
        &self,
        products: Vec<ProductRef>,
        metas: Metas,
        start: Instant,
    ) -> (Result<IndexReport, PassError>, Vec<Change>) {
        let changes = Mutex::new(Vec::new());
        let report = self.run_recording(products, metas, start, &changes).await;
        (
            report,
            changes.into_inner().unwrap_or_else(|p| p.into_inner()),
        )
    }

    async fn run_recording(
        &self,
        products: Vec<ProductRef>,
        metas: Metas,
        start: Instant,
        changes: &Mutex<Vec<Change>>,
    ) -> Result<IndexReport, PassError> {
        let record = |c: Change| changes.lock().unwrap_or_else(|p| p.into_inner()).push(c);
        let model = self.model.identity().key();
        let plan = plan(
            &products,
            &metas,
            &model,
            self.retry_failed_after,
            DateTime::now(),
        );
        drop(metas);
        let mut report = IndexReport {
            total_products: products.len(),
            failed_waiting: plan.failed_waiting,
            ..Default::default()
        };
        report.timings.plan_ms = ms_since(start);
        if !plan.gone.is_empty() {
            report.removed = self.vectors.delete(&plan.gone).await? as usize;
            plan.gone
                .into_iter()
                .for_each(|id| record(Change::Removed(id)));
        }
        let todo = plan.todo;
        if !todo.is_empty() {
            tracing::info!(
                todo = todo.len(),
                total = products.len(),
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
            let (mut embedded, mut store_ms) = (0, 0.0);
            while let Some(Embedded { products, vectors }) = rx.recv().await {
                let t = Instant::now();
                let items: Vec<_> = products
                    .iter()
                    .zip(&vectors)
                    .map(|(p, v)| (&p.id, p.image_url.as_str(), v.as_slice()))
                    .collect();
                let at = self.vectors.put_vectors(&items, &model).await?;
                store_ms += ms_since(t);
                for (p, v) in products.iter().zip(vectors) {
                    record(Change::Stored(p.id.clone(), v, at));
                }
                embedded += products.len();
                advance(products.len());
            }
            Ok::<_, PassError>((embedded, store_ms))
        };
        let ((), stats, stored) = tokio::join!(fetching, embedding, storing);
        let (embedded, store_ms) = stored?;
        let stats = stats?;
        report.embedded = embedded;
        report.failed = stats.failed;
        report.timings.fetch_ms = stats.fetch_ms;
        report.timings.decode_ms = stats.decode_ms;
        report.timings.model_ms = stats.model_ms;
        report.timings.store_ms = stats.store_ms + store_ms;
        report.indexed_products = plan.up_to_date + report.embedded;
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

    /// Fetches and decodes one product photo; failures are the product's, not the pass's.
    async fn prepare(&self, product: ProductRef) -> Prepared {
        let t = Instant::now();
        let fetched = self.fetcher.fetch(&product.image_url).await;
        let fetch_ms = ms_since(t);
        let failed = |reason: String, decode_ms| Prepared {
            product: product.clone(),
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
            product,
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
            let (mut products, mut tensors) = (Vec::new(), Vec::new());
            for p in batch.drain(..) {
                stats.fetch_ms += p.fetch_ms;
                stats.decode_ms += p.decode_ms;
                match p.tensor {
                    Ok(t) => {
                        products.push(p.product);
                        tensors.push(t);
                    }
                    Err(reason) => {
                        let p = p.product;
                        tracing::warn!(product = %p.id, url = %p.image_url, %reason, "product image skipped");
                        let t = Instant::now();
                        self.vectors
                            .put_failure(&p.id, &p.image_url, model, &reason)
                            .await?;
                        stats.store_ms += ms_since(t);
                        // Its old vector (another image or model) is no longer usable.
                        record(Change::Removed(p.id));
                        stats.failed += 1;
                        advance(1);
                    }
                }
            }
            if products.is_empty() {
                continue;
            }
            let t = Instant::now();
            let vectors = self.embedder.run(&self.model, tensors).await?;
            stats.model_ms += ms_since(t);
            if tx.send(Embedded { products, vectors }).await.is_err() {
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

    fn p(n: u8, url: &str) -> ProductRef {
        ProductRef {
            id: ProductId::Oid(ObjectId::from_bytes([n; 12])),
            image_url: url.into(),
        }
    }

    fn meta(url: &str, model: &str, ok: bool, at: i64) -> StoredMeta {
        StoredMeta {
            image_url: url.into(),
            model: model.into(),
            ok,
            updated_at: DateTime::from_millis(at),
        }
    }

    #[test]
    fn plan_embeds_missing_and_stale_and_drops_gone() {
        let products = vec![p(1, "a"), p(2, "b"), p(3, "c"), p(4, "d"), p(5, "e")];
        let mut metas = HashMap::new();
        metas.insert(p(1, "").id, meta("a", "m", true, 0)); // fresh
        metas.insert(p(2, "").id, meta("old", "m", true, 0)); // image changed
        metas.insert(p(3, "").id, meta("c", "other", true, 0)); // model changed
        metas.insert(p(4, "").id, meta("d", "m", false, 9_000)); // failed recently
        metas.insert(p(9, "").id, meta("z", "m", true, 0)); // product deleted
        let now = DateTime::from_millis(10_000);
        let plan1 = plan(&products, &metas, "m", Duration::from_secs(5), now);
        let ids: Vec<_> = plan1.todo.iter().map(|t| t.image_url.as_str()).collect();
        assert_eq!(ids, vec!["b", "c", "e"]);
        assert_eq!(plan1.gone, vec![p(9, "").id]);
        assert_eq!((plan1.failed_waiting, plan1.up_to_date), (1, 1));
        // Once the retry delay has passed the failed one is tried again.
        let plan2 = plan(&products, &metas, "m", Duration::from_secs(1), now);
        assert!(plan2.todo.iter().any(|t| t.image_url == "d"));
        assert_eq!(plan2.failed_waiting, 0);
    }
}
