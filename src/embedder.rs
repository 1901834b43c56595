//! The embedder: the model (loaded on first use), the decode gate in front of it, and the
//! permits for model runs. Searches and index passes embed through it alike.
//!
//! Searches that wait for the model run together: one task takes the first query, waits
//! for a run permit, and adds every query that arrived meanwhile (up to MAX_BATCH_SIZE) to
//! the same run. A search that is alone runs at once; under load a batch of 4 costs
//! about what 2 single runs do.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use ndarray::Array3;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::config::EmbedderSettings;
use crate::encoder::{DecodeGate, DecodeSlot, EmbedError, Encoder, LazyEncoder};
use crate::error::ModelError;

pub struct Embedder {
    model: LazyEncoder,
    /// Image decodes at once (memory is per decoded image), each waited for at most
    /// DECODE_TIMEOUT_SECS.
    decode: DecodeGate,
    /// Model runs at once (memory is per run).
    runs: Arc<Semaphore>,
    lazy: bool,
    max_batch: usize,
    /// Where searches queue for the model; the batching task starts with the first.
    queries: OnceLock<mpsc::UnboundedSender<Query>>,
}

/// A search's tensor waiting for a model run, and where its vector goes.
struct Query {
    model: Arc<Encoder>,
    tensor: Array3<f32>,
    reply: oneshot::Sender<Result<Vec<f32>, ModelError>>,
}

/// One query image embedded, and where its time went (milliseconds).
pub struct Embedded {
    pub vector: Vec<f32>,
    pub model: Arc<Encoder>,
    /// Getting the model (its load, on the first search).
    pub load_ms: f64,
    /// Decoding and preprocessing, waiting for the decode gate included.
    pub decode_ms: f64,
    /// The model run, waiting for a run permit included.
    pub model_ms: f64,
}

impl Embedder {
    pub fn new(settings: &EmbedderSettings) -> Self {
        Self {
            model: LazyEncoder::new(settings.encoder.clone()),
            decode: DecodeGate::new(
                settings.decode_permits(),
                settings.max_decode_memory_bytes,
                settings.decode_timeout,
            ),
            runs: Arc::new(Semaphore::new(settings.max_concurrent_inferences)),
            lazy: settings.lazy_load_model,
            max_batch: settings.max_batch_size.max(1),
            queries: OnceLock::new(),
        }
    }

    /// Images per model run (MAX_BATCH_SIZE).
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// At start-up: loads the model now unless it loads on first use.
    pub async fn warm_up(&self) {
        if self.lazy {
            tracing::info!("Services will be initialized on first request");
        } else if let Err(e) = self.model.get().await {
            tracing::error!(error = %e, "model failed to load at start-up");
        }
    }

    /// The model, loading it if this is the first call.
    pub async fn model(&self) -> Result<Arc<Encoder>, ModelError> {
        self.model.get().await
    }

    /// The model if it is loaded; never loads (health and status).
    pub fn loaded(&self) -> Option<Arc<Encoder>> {
        self.model.loaded()
    }

    /// Decode slots free now (decodes past their deadline still hold theirs).
    pub fn decode_slots_free(&self) -> usize {
        self.decode.available()
    }

    /// A query image: untrusted bytes -> its unit vector. `start` is when the search
    /// began, so that `load_ms` counts from there.
    pub async fn embed_query(&self, bytes: Bytes, start: Instant) -> Result<Embedded, EmbedError> {
        let model = self.model().await?;
        let load_ms = ms_since(start);
        let t = Instant::now();
        let tensor = self.decode.prepare(&model, bytes).await?;
        let decode_ms = ms_since(t);
        let t = Instant::now();
        let vector = self.run_query(&model, tensor).await?;
        Ok(Embedded {
            vector,
            model,
            load_ms,
            decode_ms,
            model_ms: ms_since(t),
        })
    }

    /// Waits for a decode slot (an index pass decodes each photo in one, as it is fetched).
    pub async fn decode_slot(&self) -> Result<DecodeSlot, EmbedError> {
        self.decode.slot().await
    }

    /// Prepared tensors -> unit vectors in one model run, on the blocking pool.
    pub async fn run(
        &self,
        model: &Arc<Encoder>,
        tensors: Vec<Array3<f32>>,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        // Never closed: an error here would be a bug, reported as a failed run.
        let _permit = self
            .runs
            .acquire()
            .await
            .map_err(|e| ModelError::Inference(e.to_string()))?;
        run_on_pool(model.clone(), tensors).await
    }

    /// One search's tensor -> its vector, in a run shared with the searches waiting
    /// beside it.
    async fn run_query(
        &self,
        model: &Arc<Encoder>,
        tensor: Array3<f32>,
    ) -> Result<Vec<f32>, EmbedError> {
        let queue = self.queries.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(batch_queries(rx, self.runs.clone(), self.max_batch));
            tx
        });
        let (reply, vector) = oneshot::channel();
        let query = Query {
            model: model.clone(),
            tensor,
            reply,
        };
        queue.send(query).map_err(|_| EmbedError::Busy)?;
        // The task never drops a query unanswered unless the runtime is shutting down.
        vector
            .await
            .map_err(|_| EmbedError::Busy)?
            .map_err(EmbedError::from)
    }
}

/// The batching task: for each first query, a run permit, then every query queued by
/// then (up to `max`) in one run. A task of its own, so that a search whose client goes
/// away cannot strand the others of its batch.
async fn batch_queries(
    mut queue: mpsc::UnboundedReceiver<Query>,
    runs: Arc<Semaphore>,
    max: usize,
) {
    while let Some(first) = queue.recv().await {
        let Ok(_permit) = runs.acquire().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match queue.try_recv() {
                Ok(q) => batch.push(q),
                Err(_) => break,
            }
        }
        // A search whose client went away costs no model time.
        batch.retain(|q| !q.reply.is_closed());
        let Some(model) = batch.first().map(|q| q.model.clone()) else {
            continue;
        };
        let (tensors, replies): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|q| (q.tensor, q.reply)).unzip();
        let n = tensors.len();
        match run_on_pool(model, tensors).await {
            Ok(vectors) if vectors.len() == n => {
                for (reply, v) in replies.into_iter().zip(vectors) {
                    let _ = reply.send(Ok(v));
                }
            }
            Ok(vectors) => {
                let e = ModelError::Inference(format!("{n} images gave {} vectors", vectors.len()));
                replies
                    .into_iter()
                    .for_each(|r| drop(r.send(Err(e.clone()))));
            }
            Err(e) => replies
                .into_iter()
                .for_each(|r| drop(r.send(Err(e.clone())))),
        }
    }
}

/// One model run on the blocking pool (the caller holds a run permit).
async fn run_on_pool(
    model: Arc<Encoder>,
    tensors: Vec<Array3<f32>>,
) -> Result<Vec<Vec<f32>>, ModelError> {
    tokio::task::spawn_blocking(move || model.embed_prepared(&tensors))
        .await
        .map_err(|e| ModelError::Inference(format!("the model run's task failed: {e}")))?
}

pub fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
