//! The image encoder: any ONNX image-embedding model plus its `preprocessor_config.json`.
//! Bytes are decoded and preprocessed (`preprocess`), run through ONNX Runtime
//! (`runtime`), and returned as L2-normalised vectors. `lazy` loads it on first use.

pub mod gate;
pub mod lazy;
pub mod preprocess;
pub mod runtime;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use ndarray::{Array2, Array4, ArrayView3, Axis};
use ort::session::Session;
use ort::value::{TensorRef, ValueType};
use serde::Serialize;
use sha2::{Digest, Sha256};

pub use gate::{DecodeGate, DecodeSlot};
pub use lazy::LazyEncoder;
pub use preprocess::{
    decode, decode_cost, decode_for, plan_decode, DecodeLimits, DecodePlan, Preprocessing,
};
pub use runtime::SessionSettings;

use crate::error::{ImageError, ModelError};

/// Which model made an embedding: stored with every vector, so vectors from another model
/// (or another file of the same name) are recognised as stale.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModelIdentity {
    pub name: String,
    pub dim: usize,
    /// SHA-256 of the model file, hex.
    pub sha256: String,
}

impl ModelIdentity {
    /// Short stable key: name plus the first 16 hex digits of the file hash.
    pub fn key(&self) -> String {
        format!(
            "{}@{}",
            self.name,
            &self.sha256[..16.min(self.sha256.len())]
        )
    }
}

pub use crate::config::EncoderOptions;

/// A loaded model. Runs are serialised by a mutex: one session with all cores is both
/// the fastest and the smallest way to run a CPU model, and callers bound concurrency.
pub struct Encoder {
    session: Mutex<Session>,
    preprocessing: Preprocessing,
    limits: DecodeLimits,
    identity: ModelIdentity,
    input_name: String,
    output_name: String,
    runs: AtomicU64,
    /// Weight prepacking as resolved for this model file (ORT_PREPACKING=auto).
    prepacking: bool,
    /// Whether the session was built from the optimized graph beside the file.
    optimized: bool,
}

impl Encoder {
    /// Loads the model and its preprocessing (blocking: file I/O and graph optimisation).
    pub fn load(opts: &EncoderOptions) -> Result<Self, ModelError> {
        let path = &opts.model_path;
        let load_err = |reason: String| ModelError::Load {
            path: path.display().to_string(),
            reason,
        };
        if !path.is_file() {
            return Err(load_err(
                "no such file (run `make setup` or set MODEL_PATH)".into(),
            ));
        }
        let preprocessing = Preprocessing::from_file(&preprocessor_path(path))?;
        let env = runtime::environment(opts.dylib.as_deref())?;
        let prepacking = opts.session.prepacking_for_file(path);
        let build = |file: &Path| {
            opts.session.builder(env, prepacking).and_then(|mut b| {
                b.commit_from_file(file)
                    .map_err(|e| load_err(e.to_string()))
            })
        };
        let mut optimized = runtime::optimized_graph(path);
        // Hash the file on another core while ONNX Runtime builds the session.
        let (session, sha256) = std::thread::scope(|s| {
            let hash = s.spawn(|| sha256_file(path));
            let session = build(optimized.as_ref().map_or(path.as_path(), |o| &o.file));
            (session, hash.join())
        });
        let sha256 = sha256
            .map_err(|_| load_err("hashing panicked".into()))?
            .map_err(|e| load_err(e.to_string()))?;
        let session = match (&optimized, session) {
            (Some(o), _) if o.source_sha256 != sha256 => {
                // model.onnx changed after `make setup` optimized it.
                tracing::warn!(file = %o.file.display(), "the optimized graph is of another model file; loading the model file itself");
                optimized = None;
                build(path)?
            }
            (Some(o), Err(e)) => {
                tracing::warn!(file = %o.file.display(), error = %e, "the optimized graph does not load; loading the model file itself");
                optimized = None;
                build(path)?
            }
            (_, session) => session?,
        };

        let input_name = session
            .inputs()
            .first()
            .map(|i| i.name().to_string())
            .ok_or_else(|| load_err("the model has no input".into()))?;
        let (output_name, dim) = pick_embedding_output(&session)
            .ok_or_else(|| load_err("no 2-D float output to use as the embedding".into()))?;
        let name = opts.name.clone().unwrap_or_else(|| default_name(path));
        let mut encoder = Self {
            session: Mutex::new(session),
            preprocessing,
            limits: opts.limits,
            identity: ModelIdentity { name, dim, sha256 },
            input_name,
            output_name,
            runs: AtomicU64::new(0),
            prepacking,
            optimized: optimized.is_some(),
        };
        if dim == 0 {
            // Dynamic output width: learn it from one run on a blank image.
            let (h, w) = encoder.preprocessing.output_hw();
            let blank = ndarray::Array3::zeros((3, h as usize, w as usize));
            encoder.identity.dim = encoder.embed_prepared(&[blank])?[0].len();
            encoder.runs.store(0, Ordering::Relaxed);
        }
        Ok(encoder)
    }

    pub fn identity(&self) -> &ModelIdentity {
        &self.identity
    }

    /// Whether the session prepacked the weights (ORT_PREPACKING resolved for this file).
    pub fn prepacking(&self) -> bool {
        self.prepacking
    }

    /// Whether the session was built from `model.optimized.onnx` (`optimized_graph`).
    pub fn optimized(&self) -> bool {
        self.optimized
    }

    pub fn preprocessing(&self) -> &Preprocessing {
        &self.preprocessing
    }

    /// How many times the model has run (each batch counts once).
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    /// Untrusted bytes -> the model's input tensor [3, H, W]. JPEGs are decoded no
    /// larger than the preprocessing needs.
    pub fn prepare(&self, bytes: &[u8]) -> Result<ndarray::Array3<f32>, ImageError> {
        self.prepare_planned(&self.plan(bytes)?, bytes)
    }

    /// How `prepare` will decode `bytes`, and its cost, from the image header alone.
    pub fn plan(&self, bytes: &[u8]) -> Result<DecodePlan, ImageError> {
        plan_decode(bytes, self.limits, self.preprocessing.min_source_side())
    }

    /// `prepare` from a plan `plan` made of these bytes.
    pub fn prepare_planned(
        &self,
        plan: &DecodePlan,
        bytes: &[u8],
    ) -> Result<ndarray::Array3<f32>, ImageError> {
        let img = plan.decode(bytes, self.limits)?;
        Ok(self.preprocessing.to_tensor(&img))
    }

    /// Embeds prepared tensors in one model run; returns L2-normalised vectors.
    pub fn embed_prepared(
        &self,
        batch: &[ndarray::Array3<f32>],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let out = self.run_output(batch, &self.output_name.clone())?;
        Ok(out
            .outer_iter()
            .map(|row| l2_normalised(row.to_vec()))
            .collect())
    }

    /// Decodes, preprocesses and embeds one image.
    pub fn embed_bytes(&self, bytes: &[u8]) -> Result<Vec<f32>, EmbedError> {
        let t = self.prepare(bytes)?;
        let mut v = self.embed_prepared(std::slice::from_ref(&t))?;
        Ok(v.pop().expect("one input gives one output"))
    }

    /// Runs the model on a batch and returns a named 2-D output as it is (e.g. `logits`).
    pub fn run_output(
        &self,
        batch: &[ndarray::Array3<f32>],
        output: &str,
    ) -> Result<Array2<f32>, ModelError> {
        let inf = |e: String| ModelError::Inference(e);
        if batch.is_empty() {
            return Ok(Array2::zeros((0, self.identity.dim)));
        }
        let views: Vec<ArrayView3<f32>> = batch.iter().map(|a| a.view()).collect();
        let input: Array4<f32> = ndarray::stack(Axis(0), &views).map_err(|e| inf(e.to_string()))?;
        let tensor = TensorRef::from_array_view(&input).map_err(|e| inf(e.to_string()))?;
        let start = Instant::now();
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let outputs = session
            .run(ort::inputs![self.input_name.as_str() => tensor])
            .map_err(|e| inf(e.to_string()))?;
        self.runs.fetch_add(1, Ordering::Relaxed);
        let value = outputs
            .get(output)
            .ok_or_else(|| inf(format!("the model has no output `{output}`")))?;
        let arr = value
            .try_extract_array::<f32>()
            .map_err(|e| inf(e.to_string()))?
            .into_dimensionality::<ndarray::Ix2>()
            .map_err(|e| inf(e.to_string()))?
            .to_owned();
        tracing::trace!(
            batch = batch.len(),
            ms = start.elapsed().as_secs_f64() * 1e3,
            "model run"
        );
        Ok(arr)
    }
}

/// Decoding or running failed for one image.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A gate in front of decoding or the model was closed (the service is stopping).
    #[error("the server is busy; try again shortly")]
    Busy,
}

/// `image_embeds` if the model has it, else the first 2-D float output.
fn pick_embedding_output(session: &Session) -> Option<(String, usize)> {
    let two_d_float = |o: &ort::value::Outlet| match o.dtype() {
        ValueType::Tensor { ty, shape, .. }
            if *ty == ort::value::TensorElementType::Float32 && shape.len() == 2 =>
        {
            Some((o.name().to_string(), shape[1].max(0) as usize))
        }
        _ => None,
    };
    let outputs = session.outputs();
    outputs
        .iter()
        .find(|o| o.name() == "image_embeds")
        .and_then(two_d_float)
        .or_else(|| outputs.iter().find_map(two_d_float))
}

pub fn preprocessor_path(model_path: &Path) -> PathBuf {
    model_path.with_file_name("preprocessor_config.json")
}

fn default_name(path: &Path) -> String {
    path.parent()
        .and_then(|p| p.file_name())
        .or_else(|| path.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// SHA-256 of a file, hex (the model identity; read in 1 MiB pieces).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Scales a vector to unit length (a zero vector stays zero).
pub fn l2_normalised(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}
