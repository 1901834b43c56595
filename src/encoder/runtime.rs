//! ONNX Runtime: finding the shared library, the process-wide environment, and the
//! session options that decide memory and speed.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;

use crate::config::Config;
use crate::error::ModelError;

/// Session options, from configuration. Defaults were chosen by measurement
/// (see the README's memory section): no prepacking keeps peak memory of ViT-B/32 fp32
/// well under 512 MB for a small latency cost; the arena (on) reuses activation memory,
/// where malloc without it kept much more (see `Config::ort_memory_arena`).
#[derive(Clone, Debug)]
pub struct SessionSettings {
    /// Intra-op threads; 0 = one per available core.
    pub intra_threads: usize,
    pub memory_arena: bool,
    pub prepacking: bool,
    pub optimization: GraphOptimizationLevel,
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self::from_config(&Config::defaults())
    }
}

impl SessionSettings {
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            intra_threads: cfg.ort_intra_threads,
            memory_arena: cfg.ort_memory_arena,
            prepacking: cfg.ort_prepacking,
            optimization: match cfg.ort_optimization.as_str() {
                "disable" => GraphOptimizationLevel::Disable,
                "basic" => GraphOptimizationLevel::Level1,
                "extended" => GraphOptimizationLevel::Level2,
                _ => GraphOptimizationLevel::All,
            },
        }
    }

    pub fn threads(&self) -> usize {
        if self.intra_threads > 0 {
            self.intra_threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    pub(crate) fn builder(&self, env: &Environment) -> Result<SessionBuilder, ModelError> {
        let e = |e: ort::Error<SessionBuilder>| ModelError::Runtime(e.to_string());
        let mut b = Session::builder(env)
            .map_err(|e| ModelError::Runtime(e.to_string()))?
            .with_optimization_level(self.optimization)
            .map_err(e)?
            .with_intra_threads(self.threads())
            .map_err(e)?
            .with_inter_threads(1)
            .map_err(e)?
            .with_prepacking(self.prepacking)
            .map_err(e)?;
        if !self.memory_arena {
            b = b
                .with_execution_providers([ort::ep::CPU::default()
                    .with_arena_allocator(false)
                    .build()])
                .map_err(e)?;
        }
        Ok(b)
    }
}

static ENV: OnceLock<Result<Environment, String>> = OnceLock::new();

/// The process-wide ONNX Runtime environment, loading the shared library on first use.
/// `dylib` overrides where the library is looked for (ORT_DYLIB_PATH).
pub fn environment(dylib: Option<&Path>) -> Result<&'static Environment, ModelError> {
    ENV.get_or_init(|| init(dylib))
        .as_ref()
        .map_err(|e| ModelError::Runtime(e.clone()))
}

#[cfg(feature = "load-dynamic")]
fn init(dylib: Option<&Path>) -> Result<Environment, String> {
    let path = match dylib {
        Some(p) => p.to_path_buf(),
        None => find_dylib().ok_or_else(|| {
            "libonnxruntime.so not found: run `make setup` or set ORT_DYLIB_PATH".to_string()
        })?,
    };
    tracing::debug!(path = %path.display(), "loading ONNX Runtime");
    ort::init_from(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .with_name("search-img")
        .with_telemetry(false)
        .build()
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "load-dynamic"))]
fn init(_dylib: Option<&Path>) -> Result<Environment, String> {
    ort::init()
        .with_name("search-img")
        .with_telemetry(false)
        .build()
        .map_err(|e| e.to_string())
}

/// Where `make setup` and the Docker image put the library, nearest first.
pub fn dylib_candidates() -> Vec<PathBuf> {
    const REL: &str = ".tools/onnxruntime/libonnxruntime.so";
    let mut out = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            out.push(dir.join("libonnxruntime.so"));
            // target/{debug,release}[/deps] -> repository root
            for up in dir.ancestors().skip(1).take(3) {
                out.push(up.join(REL));
            }
        }
    }
    out.push(PathBuf::from(REL));
    out.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(REL));
    out.push(PathBuf::from("/usr/local/lib/libonnxruntime.so"));
    out.push(PathBuf::from("/usr/lib/libonnxruntime.so"));
    out
}

fn find_dylib() -> Option<PathBuf> {
    dylib_candidates().into_iter().find(|p| p.is_file())
}
