//! The embedder: the model (loaded on first use), the decode gate in front of it, and the
//! permits for model runs. Searches and index passes embed through it alike.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use ndarray::Array3;
use tokio::sync::Semaphore;

use crate::config::EmbedderSettings;
use crate::encoder::{DecodeGate, DecodeSlot, EmbedError, Encoder, LazyEncoder};
use crate::error::ModelError;

pub struct Embedder {
    model: LazyEncoder,
    /// Image decodes at once (memory is per decoded image), each waited for at most
    /// DECODE_TIMEOUT_SECS.
    decode: DecodeGate,
    /// Model runs at once (memory is per run).
    runs: Semaphore,
    lazy: bool,
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
            runs: Semaphore::new(settings.max_concurrent_inferences),
            lazy: settings.lazy_load_model,
        }
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
        let vector = self
            .run(&model, vec![tensor])
            .await?
            .pop()
            .unwrap_or_default();
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
        let model = model.clone();
        tokio::task::spawn_blocking(move || model.embed_prepared(&tensors))
            .await
            .map_err(|e| ModelError::Inference(format!("the model run's task failed: {e}")))?
    }
}

pub fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
