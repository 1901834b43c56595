//! Loading the model on first use. Concurrent first callers wait for one load; a failed
//! load is returned to its callers and tried again by the next one, never cached.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::OnceCell;

use super::{Encoder, EncoderOptions};
use crate::error::ModelError;

pub struct LazyEncoder {
    opts: EncoderOptions,
    cell: OnceCell<Arc<Encoder>>,
}

impl LazyEncoder {
    pub fn new(opts: EncoderOptions) -> Self {
        Self {
            opts,
            cell: OnceCell::new(),
        }
    }

    pub fn options(&self) -> &EncoderOptions {
        &self.opts
    }

    /// The encoder if it is loaded; never loads (for health and status).
    pub fn loaded(&self) -> Option<Arc<Encoder>> {
        self.cell.get().cloned()
    }

    /// The encoder, loading it on the blocking pool if this is the first call.
    pub async fn get(&self) -> Result<Arc<Encoder>, ModelError> {
        self.cell
            .get_or_try_init(|| async {
                tracing::info!("Lazy loading search service components...");
                let opts = self.opts.clone();
                let start = Instant::now();
                let encoder = tokio::task::spawn_blocking(move || Encoder::load(&opts))
                    .await
                    .map_err(|e| ModelError::LoadTask(e.to_string()))?;
                match encoder {
                    Ok(enc) => {
                        let id = enc.identity();
                        tracing::info!(
                            model = %id.name,
                            dim = id.dim,
                            sha256 = %&id.sha256[..16],
                            load_ms = start.elapsed().as_millis() as u64,
                            prepacking = enc.prepacking(),
                            optimized_graph = enc.optimized(),
                            allow_spinning = self.opts.session.allow_spinning,
                            stop_spinning_after_run = self.opts.session.stop_spinning_after_run,
                            "CLIP model loaded successfully ({})",
                            id.name
                        );
                        Ok(Arc::new(enc))
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "model load failed; the next request will try again");
                        Err(e)
                    }
                }
            })
            .await
            .cloned()
    }
}
