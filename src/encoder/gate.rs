//! Decoding untrusted images off the async runtime, with a bound on how many decode at
//! once (each holds its pixels in memory) and on how long a caller waits for one.
//!
//! A blocking thread cannot be interrupted, so a decode that overruns its deadline runs on
//! in the background while the caller gets an error at once. Its slot goes with it and is
//! freed only when the decode really ends: abandoned decodes still count against the
//! bound and cannot pile up. The header pixel cap (`DecodeLimits::max_pixels`) is what
//! bounds that background time; the deadline bounds what a client sees.
//!
//! Memory: before a decode starts, its cost is judged from the image header
//! (`DecodePlan::cost`: the decoder's own buffers, such as a progressive JPEG's
//! coefficients, the pixels, the RGB copy and the resize) and taken from one budget,
//! MAX_DECODE_MEMORY_BYTES, held until the decode really ends. So the memory of all
//! decodes at once stays within that budget whatever the images; a decode that would
//! not fit even alone is refused (413), and the others wait their turn.

use std::sync::Arc;
use std::time::Duration;

use ndarray::Array3;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{EmbedError, Encoder};
use crate::error::ImageError;

/// Decodes judged at least this costly return the heap's free memory to the OS first
/// (a malloc_trim takes well under a millisecond; such a decode takes hundreds).
const TRIM_BEFORE_COST: u64 = 32 << 20;

pub struct DecodeGate {
    slots: Arc<Semaphore>,
    memory: Memory,
    timeout: Duration,
}

/// The decode memory budget, in KiB permits.
#[derive(Clone)]
struct Memory {
    kib: Arc<Semaphore>,
    total_kib: u32,
}

impl DecodeGate {
    /// At most `permits` decodes at once, together taking at most `memory_bytes`; each
    /// caller waits at most `timeout` for its decode.
    pub fn new(permits: usize, memory_bytes: u64, timeout: Duration) -> Self {
        let total_kib = u32::try_from((memory_bytes / 1024).max(1)).unwrap_or(u32::MAX >> 3);
        Self {
            slots: Arc::new(Semaphore::new(permits.max(1))),
            memory: Memory {
                kib: Arc::new(Semaphore::new(total_kib as usize)),
                total_kib,
            },
            timeout,
        }
    }

    /// Bytes of the memory budget not taken by decodes now.
    pub fn memory_available(&self) -> u64 {
        self.memory.kib.available_permits() as u64 * 1024
    }

    /// Slots free now (decodes past their deadline still hold theirs).
    pub fn available(&self) -> usize {
        self.slots.available_permits()
    }

    /// Untrusted bytes -> the model's input tensor, on the blocking pool: `slot` then
    /// `DecodeSlot::prepare`.
    pub async fn prepare(
        &self,
        encoder: &Arc<Encoder>,
        bytes: bytes::Bytes,
    ) -> Result<Array3<f32>, EmbedError> {
        self.slot().await?.prepare(encoder, bytes).await
    }

    /// Waits for a free slot. Not part of the deadline: a busy server is not the image's
    /// fault (the request timeout bounds this wait).
    pub async fn slot(&self) -> Result<DecodeSlot, EmbedError> {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| EmbedError::Busy)?;
        Ok(DecodeSlot {
            permit,
            memory: self.memory.clone(),
            timeout: self.timeout,
        })
    }
}

/// The right to run one decode.
pub struct DecodeSlot {
    permit: OwnedSemaphorePermit,
    memory: Memory,
    timeout: Duration,
}

impl DecodeSlot {
    /// Decodes and preprocesses on the blocking pool, waiting at most the gate's timeout.
    /// A decoder that panics is reported as an undecodable image: the bytes came from the
    /// client.
    pub async fn prepare(
        self,
        encoder: &Arc<Encoder>,
        bytes: bytes::Bytes,
    ) -> Result<Array3<f32>, EmbedError> {
        let Self {
            permit,
            memory,
            timeout,
        } = self;
        // The header read is quick, but PNG inflates an ICC profile there: off the runtime.
        let (enc, b) = (encoder.clone(), bytes.clone());
        let plan = tokio::task::spawn_blocking(move || enc.plan(&b))
            .await
            .map_err(|_| ImageError::Corrupt("the decoder failed on this image".into()))??;
        let cost = plan.cost();
        let kib = u32::try_from(cost.div_ceil(1024)).unwrap_or(u32::MAX);
        if kib > memory.total_kib {
            return Err(ImageError::TooCostly {
                needed_mb: cost.div_ceil(1 << 20),
                limit_mb: memory.total_kib as u64 / 1024,
            }
            .into());
        }
        // Waiting for memory is the server being busy, not the image's fault: the
        // request timeout bounds it, not the decode deadline.
        let held = memory
            .kib
            .acquire_many_owned(kib)
            .await
            .map_err(|_| EmbedError::Busy)?;
        let enc = encoder.clone();
        let decode = tokio::task::spawn_blocking(move || {
            let _slot = (permit, held);
            if cost >= TRIM_BEFORE_COST {
                // What request bodies and their parsing left free in the heap would
                // otherwise stay in RSS under this decode's peak.
                crate::rank::release_freed_memory();
            }
            enc.prepare_planned(&plan, &bytes)
        });
        match tokio::time::timeout(timeout, decode).await {
            Ok(Ok(result)) => Ok(result?),
            Ok(Err(join)) => {
                tracing::error!(error = %join, "image decoder panicked");
                Err(ImageError::Corrupt("the decoder failed on this image".into()).into())
            }
            Err(_) => {
                tracing::warn!(
                    timeout_ms = timeout.as_millis() as u64,
                    "image decode past its deadline; left to finish in the background"
                );
                Err(ImageError::TooSlow {
                    secs: timeout.as_secs_f64(),
                }
                .into())
            }
        }
    }
}
