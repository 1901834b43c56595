//! Bringing stored embeddings up to date with the catalogue: embed products whose
//! embedding is missing or stale (image changed, model changed), drop those of deleted
//! products, and record images that could not be used so they are retried later, not on
//! every search. Images are fetched concurrently with a bound, embedded `MAX_BATCH_SIZE`
//! at a time, and each batch is stored while the next one is in the model.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{stream, StreamExt};
use mongodb::bson::DateTime;
use ndarray::Array3;
use serde::Serialize;

use crate::catalog::ProductRef;
use crate::encoder::{DecodeGate, Encoder};
use crate::error::AppError;
use crate::fetch::Fetcher;
use crate::store::{EmbeddingStore, ProductId, StoredMeta};

/// The outcome of one pass over the catalogue.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IndexReport {
    /// Searchable products considered (after MAX_PRODUCTS).
    pub total_products: usize,
    /// Products with a usable embedding for the current model after this pass.
    pub indexed_products: usize,
    /// Embeddings computed in this pass.
    pub embedded: usize,
    /// Products whose image failed in this pass.
    pub failed: usize,
    /// Products whose image failed earlier and is not due for a retry yet.
    pub failed_waiting: usize,
    /// Embeddings removed because their product is gone or no longer searchable.
    pub removed: usize,
    /// Where the time went, in milliseconds.
    pub timings: Timings,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    pub total_ms: f64,
    /// Reading the catalogue and the stored metadata, and planning (on the service's first
    /// pass this overlaps loading the model, and with `CACHE_PRODUCTS=true` includes
    /// loading the cache from the same read).
    pub plan_ms: f64,
    /// Summed over concurrent fetches.
    pub fetch_ms: f64,
    pub decode_ms: f64,
    pub model_ms: f64,
    pub store_ms: f64,
}

/// What the indexer needs from the rest of the service.
pub struct IndexContext<'a> {
    pub store: &'a EmbeddingStore,
    pub encoder: Arc<Encoder>,
    pub fetcher: &'a Fetcher,
    pub inference: &'a tokio::sync::Semaphore,
    pub decode: &'a DecodeGate,
    pub batch_size: usize,
    pub fetch_concurrency: usize,
    pub retry_failed_after: Duration,
    /// Told about every stored or removed vector, failures included (the in-memory
    /// cache).
    pub on_change: &'a (dyn Fn(Change) + Send + Sync),
    /// Told (done, todo) as products are processed.
    pub progress: &'a (dyn Fn(usize, usize) + Send + Sync),
}

pub enum Change {
    Stored(ProductId, Vec<f32>, DateTime),
    Removed(ProductId),
}

/// Which products need an embedding, and which stored embeddings must go.
pub fn plan(
    products: &[ProductRef],
    metas: &HashMap<ProductId, StoredMeta>,
    model: &str,
    retry_failed_after: Duration,
    now: DateTime,
) -> (Vec<ProductRef>, Vec<ProductId>, usize) {
    let mut todo = Vec::new();
    let mut waiting = 0;
    for p in products {
        match metas.get(&p.id) {
            Some(m) if m.image_url == p.image_url && m.model == model => {
                if !m.ok {
                    let age = now.timestamp_millis() - m.updated_at.timestamp_millis();
                    if age >= retry_failed_after.as_millis() as i64 {
                        todo.push(p.clone());
                    } else {
                        waiting += 1;
                    }
                }
            }
            _ => todo.push(p.clone()),
        }
    }
    let live: HashSet<&ProductId> = products.iter().map(|p| &p.id).collect();
    let gone = metas
        .keys()
        .filter(|id| !live.contains(id))
        .cloned()
        .collect();
    (todo, gone, waiting)
}

/// One pass: plan, remove what is gone, embed what is missing or stale. `products` (the
/// searchable products) and `metas` (every stored embedding's metadata) are read by the
/// caller, which started at `start`: the service reads the catalogue while the model
/// loads, and with `CACHE_PRODUCTS=true` takes the metadata from the scan that loads its
/// cache.
pub async fn run(
    ctx: IndexContext<'_>,
    products: Vec<ProductRef>,
    metas: HashMap<ProductId, StoredMeta>,
    start: Instant,
) -> Result<IndexReport, AppError> {
    let model = ctx.encoder.identity().key();
    let (todo, gone, failed_waiting) = plan(
        &products,
        &metas,
        &model,
        ctx.retry_failed_after,
        DateTime::now(),
    );
    let mut report = IndexReport {
        total_products: products.len(),
        failed_waiting,
        ..Default::default()
    };
    report.timings.plan_ms = ms(start);
    if !gone.is_empty() {
        report.removed = ctx.store.delete(&gone).await? as usize;
        for id in gone {
            (ctx.on_change)(Change::Removed(id));
        }
    }
    let todo_ids: HashSet<&ProductId> = todo.iter().map(|t| &t.id).collect();
    let live: HashSet<&ProductId> = products.iter().map(|p| &p.id).collect();
    let already_ok = metas
        .iter()
        .filter(|(id, m)| m.ok && m.model == model && live.contains(id) && !todo_ids.contains(id))
        .count();
    drop(todo_ids);
    if !todo.is_empty() {
        tracing::info!(
            todo = todo.len(),
            total = products.len(),
            "indexing product images"
        );
    }
    let total_todo = todo.len();
    (ctx.progress)(0, total_todo);

    // Three stages run at once, joined by small channels: fetch and decode (bounded
    // concurrency), the model (MAX_BATCH_SIZE at a time), and MongoDB writes. Writing a
    // batch while the next one is in the model keeps the model from waiting on the
    // database (the writes of a batch took 2-12 ms a product when they were in line).
    let (tx, rx) = tokio::sync::mpsc::channel(ctx.batch_size * 2);
    let (store_tx, store_rx) = tokio::sync::mpsc::channel::<(Vec<ProductRef>, Vec<Vec<f32>>)>(1);
    let done = std::sync::atomic::AtomicUsize::new(0);
    let advance = |n: usize| {
        let d = done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        (ctx.progress)(d, total_todo);
    };
    let producer = async {
        let tx = tx;
        let mut prepared = stream::iter(todo)
            .map(|p| prepare(&ctx, p))
            .buffer_unordered(ctx.fetch_concurrency);
        while let Some(item) = prepared.next().await {
            if tx.send(item).await.is_err() {
                break; // the consumer failed
            }
        }
    };
    let consumer = async {
        // Owned here so a failed consumer drops them, which stops the producer and lets
        // the writer finish what it was given.
        let (mut rx, store_tx) = (rx, store_tx);
        let mut stats = ConsumerStats::default();
        let mut batch = Vec::with_capacity(ctx.batch_size);
        loop {
            batch.clear();
            while batch.len() < ctx.batch_size {
                match rx.recv().await {
                    Some(item) => batch.push(item),
                    None => break,
                }
            }
            if batch.is_empty() {
                return Ok::<_, AppError>(stats);
            }
            let mut ready = Vec::new();
            let mut tensors = Vec::new();
            for (p, result, fetch_ms, decode_ms) in batch.drain(..) {
                stats.fetch_ms += fetch_ms;
                stats.decode_ms += decode_ms;
                match result {
                    Ok(t) => {
                        ready.push(p);
                        tensors.push(t);
                    }
                    Err(reason) => {
                        tracing::warn!(product = %p.id, url = %p.image_url, %reason, "product image skipped");
                        let t = Instant::now();
                        ctx.store
                            .put_failure(&p.id, &p.image_url, &model, &reason)
                            .await?;
                        stats.store_ms += ms(t);
                        // Its old vector (another image or model) is no longer usable.
                        (ctx.on_change)(Change::Removed(p.id.clone()));
                        stats.failed += 1;
                        advance(1);
                    }
                }
            }
            if ready.is_empty() {
                continue;
            }
            let t = Instant::now();
            let vectors = {
                let _permit = ctx
                    .inference
                    .acquire()
                    .await
                    .map_err(|e| AppError::Internal(e.to_string()))?;
                let enc = ctx.encoder.clone();
                tokio::task::spawn_blocking(move || enc.embed_prepared(&tensors))
                    .await
                    .map_err(|e| AppError::Internal(e.to_string()))??
            };
            stats.model_ms += ms(t);
            if store_tx.send((ready, vectors)).await.is_err() {
                return Ok(stats); // the writer failed: its error is the pass's
            }
        }
    };
    let writer = async {
        let mut store_rx = store_rx;
        let (mut embedded, mut store_ms) = (0, 0.0);
        while let Some((ready, vectors)) = store_rx.recv().await {
            let t = Instant::now();
            let items: Vec<_> = ready
                .iter()
                .zip(&vectors)
                .map(|(p, v)| (&p.id, p.image_url.as_str(), v.as_slice()))
                .collect();
            let at = ctx.store.put_vectors(&items, &model).await?;
            store_ms += ms(t);
            for (p, v) in ready.iter().zip(vectors) {
                (ctx.on_change)(Change::Stored(p.id.clone(), v, at));
            }
            embedded += ready.len();
            advance(ready.len());
        }
        Ok::<_, AppError>((embedded, store_ms))
    };
    let ((), consumed, written) = tokio::join!(producer, consumer, writer);
    let (embedded, store_ms) = written?;
    let stats = consumed?;
    report.embedded = embedded;
    report.failed = stats.failed;
    report.timings.fetch_ms = stats.fetch_ms;
    report.timings.decode_ms = stats.decode_ms;
    report.timings.model_ms = stats.model_ms;
    report.timings.store_ms = stats.store_ms + store_ms;
    report.indexed_products = already_ok + report.embedded;
    report.timings.total_ms = ms(start);
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

/// Fetches and decodes one product image; failures are the product's, not the pass's.
async fn prepare(
    ctx: &IndexContext<'_>,
    p: ProductRef,
) -> (ProductRef, Result<Array3<f32>, String>, f64, f64) {
    let t = Instant::now();
    let bytes = match ctx.fetcher.fetch(&p.image_url).await {
        Ok(b) => b,
        Err(e) => {
            let f = ms(t);
            return (p, Err(e.to_string()), f, 0.0);
        }
    };
    let fetch_ms = ms(t);
    let slot = match ctx.decode.slot().await {
        Ok(slot) => slot,
        Err(e) => return (p, Err(e.detail()), fetch_ms, 0.0),
    };
    let t = Instant::now();
    let tensor = slot
        .prepare(&ctx.encoder, bytes)
        .await
        .map_err(|e| e.detail());
    (p, tensor, fetch_ms, ms(t))
}

/// What the model stage counts (the writer counts the rest).
#[derive(Default)]
struct ConsumerStats {
    failed: usize,
    fetch_ms: f64,
    decode_ms: f64,
    model_ms: f64,
    store_ms: f64,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::oid::ObjectId;

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
        let (todo, gone, waiting) = plan(&products, &metas, "m", Duration::from_secs(5), now);
        let ids: Vec<_> = todo.iter().map(|t| t.image_url.as_str()).collect();
        assert_eq!(ids, vec!["b", "c", "e"]);
        assert_eq!(gone, vec![p(9, "").id]);
        assert_eq!(waiting, 1);
        // Once the retry delay has passed the failed one is tried again.
        let (todo, _, waiting) = plan(&products, &metas, "m", Duration::from_secs(1), now);
        assert!(todo.iter().any(|t| t.image_url == "d"));
        assert_eq!(waiting, 0);
    }
}
