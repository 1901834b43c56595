//! Decoding untrusted images off the async runtime, with a bound on how many decode at
//! once (each holds its pixels in memory) and on how long a caller waits for one.
//!
//! A blocking thread cannot be interrupted, so a decode that overruns its deadline runs on
//! in the background while the caller gets an error at once. Its slot goes with it and is
//! freed only when the decode really ends: abandoned decodes still count against the
//! bound and cannot pile up. The header pixel cap (`DecodeLimits::max_pixels`) is what
//! bounds that background time; the deadline bounds what a client sees.

use std::sync::Arc;
use std::time::Duration;

use ndarray::Array3;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Encoder;
use crate::error::{AppError, ImageError};

pub struct DecodeGate {
    slots: Arc<Semaphore>,
    timeout: Duration,
}

impl DecodeGate {
    /// At most `permits` decodes at once; callers wait at most `timeout` for one.
    pub fn new(permits: usize, timeout: Duration) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(permits.max(1))),
            timeout,
        }
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
    ) -> Result<Array3<f32>, AppError> {
        self.slot().await?.prepare(encoder, bytes).await
    }

    /// Waits for a free slot. Not part of the deadline: a busy server is not the image's
    /// fault (the request timeout bounds this wait).
    pub async fn slot(&self) -> Result<DecodeSlot, AppError> {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| AppError::Overloaded)?;
        Ok(DecodeSlot {
            permit,
            timeout: self.timeout,
        })
    }
}

/// The right to run one decode.
pub struct DecodeSlot {
    permit: OwnedSemaphorePermit,
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
    ) -> Result<Array3<f32>, AppError> {
        let Self { permit, timeout } = self;
        let enc = encoder.clone();
        let decode = tokio::task::spawn_blocking(move || {
            let _slot = permit;
            enc.prepare(&bytes)
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
