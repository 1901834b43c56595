//! ONNX Runtime: finding the shared library, the process-wide environment, and the
//! session options that decide memory and speed.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::builder::SessionBuilder;
use ort::session::Session;

use crate::error::ModelError;

/// `ORT_PREPACKING=auto` prepacks models whose file is at most this size. Prepacking
/// keeps a second, repacked copy of the matmul weights: for the fp32 ViT-B/32 (351 MB
/// file) that took peak RSS from 403-409 MB to 548-608 MB, over a 512 MB instance; for
/// the int8 one (88 MB) it cost 11 MB (155 -> 166 MB) and made batch 1 25% faster
/// (28.2 -> 22.1 ms); EfficientNet-Lite0 (18 MB) was the same either way. 128 MB sits
/// between the int8 and fp32 files with room on both sides.
pub const PREPACK_AUTO_MAX_BYTES: u64 = 128 * 1024 * 1024;

pub use crate::config::{Prepacking, SessionSettings};

impl SessionSettings {
    pub fn threads(&self) -> usize {
        if self.intra_threads > 0 {
            self.intra_threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// Whether to prepack the weights of a model file of `model_bytes` bytes.
    pub fn prepacking_for(&self, model_bytes: u64) -> bool {
        match self.prepacking {
            Prepacking::On => true,
            Prepacking::Off => false,
            Prepacking::Auto => model_bytes <= PREPACK_AUTO_MAX_BYTES,
        }
    }

    /// Whether to prepack the weights of the model at `path` (`auto` by its file size;
    /// an unreadable file counts as large, and fails to load anyway).
    pub fn prepacking_for_file(&self, path: &Path) -> bool {
        self.prepacking_for(std::fs::metadata(path).map_or(u64::MAX, |m| m.len()))
    }

    /// A session builder; `prepacking` as resolved for the model file (`prepacking_for_file`).
    pub(crate) fn builder(
        &self,
        env: &Environment,
        prepacking: bool,
    ) -> Result<SessionBuilder, ModelError> {
        let e = |e: ort::Error<SessionBuilder>| ModelError::Runtime(e.to_string());
        let mut b = Session::builder(env)
            .map_err(|e| ModelError::Runtime(e.to_string()))?
            .with_optimization_level(self.optimization)
            .map_err(e)?
            .with_intra_threads(self.threads())
            .map_err(e)?
            .with_inter_threads(1)
            .map_err(e)?
            .with_prepacking(prepacking)
            .map_err(e)?
            .with_intra_op_spinning(self.allow_spinning)
            .map_err(e)?
            .with_config_entry(
                "session.x64quantprecision",
                if precise_qmm_needed() { "1" } else { "0" },
            )
            .map_err(e)?
            .with_config_entry(
                "session.force_spinning_stop",
                if self.stop_spinning_after_run {
                    "1"
                } else {
                    "0"
                },
            )
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

/// Whether ONNX Runtime must take its exact uint8 x uint8 path for int8 products. x86
/// CPUs without VNNI (AVX2 only, e.g. AMD Zen 3) multiply uint8 x int8 with int16 sums
/// that saturate: the int8 default drifted to a mean cosine of 0.85 to its float source
/// there. With VNNI the fast path sums in int32 (exact), and the precise one takes twice
/// as long (measured: 9.9 vs 4.6 ms an image for the int8 default), so it is set only
/// where needed. `models/qmm.py` decides the same way for the Python side.
pub fn precise_qmm_needed() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !(std::arch::is_x86_feature_detected!("avx512vnni")
            || std::arch::is_x86_feature_detected!("avxvnni"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The graph `models/optimize.py` saved beside a model file with ONNX Runtime's portable
/// optimizations done (`model.optimized.onnx`). Building the default model's session
/// from it took 10-12 ms of CPU instead of 19-22: under 0.1 CPU, 0.1 s of a wake.
#[derive(Debug, PartialEq, Eq)]
pub struct OptimizedGraph {
    pub file: PathBuf,
    /// What the source file's SHA-256 must be for `file` to stand for it.
    pub source_sha256: String,
}

/// `model_path`'s optimized graph, when its manifest says it was made by this ONNX
/// Runtime build with this CPU's quantized-product setting (`precise_qmm_needed`). The
/// caller still checks `source_sha256` against the file it hashes. Needs the environment.
pub fn optimized_graph(model_path: &Path) -> Option<OptimizedGraph> {
    let dir = model_path.parent()?;
    let text = std::fs::read_to_string(dir.join("model.optimized.json")).ok()?;
    let m: serde_json::Value = serde_json::from_str(&text).ok()?;
    let precise = if precise_qmm_needed() { "1" } else { "0" };
    let file = dir.join("model.optimized.onnx");
    let ours = m["onnxruntime_build"].as_str() == Some(ort::info())
        && m["x64quantprecision"].as_str() == Some(precise)
        && model_path.file_name() == Some(std::ffi::OsStr::new("model.onnx"))
        && file.is_file();
    let source_sha256 = m["source_sha256"].as_str()?.to_string();
    ours.then_some(OptimizedGraph {
        file,
        source_sha256,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn with_prepacking(p: Prepacking) -> SessionSettings {
        SessionSettings {
            prepacking: p,
            ..SessionSettings::default()
        }
    }

    #[test]
    fn auto_prepacks_small_models_only() {
        const MB: u64 = 1024 * 1024;
        let auto = with_prepacking(Prepacking::Auto);
        assert_eq!(SessionSettings::default().prepacking, Prepacking::Auto);
        // EfficientNet-Lite0, int8 ViT-B/32: on; fp32 ViT-B/32: off.
        assert!(auto.prepacking_for(18 * MB));
        assert!(auto.prepacking_for(88 * MB));
        assert!(!auto.prepacking_for(351 * MB));
        assert!(auto.prepacking_for(PREPACK_AUTO_MAX_BYTES));
        assert!(!auto.prepacking_for(PREPACK_AUTO_MAX_BYTES + 1));
        // An explicit setting wins whatever the size.
        let (on, off) = (
            with_prepacking(Prepacking::On),
            with_prepacking(Prepacking::Off),
        );
        assert!(on.prepacking_for(351 * MB) && on.prepacking_for(0));
        assert!(!off.prepacking_for(18 * MB) && !off.prepacking_for(u64::MAX));
    }

    #[test]
    fn auto_resolves_from_the_file_size() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small.onnx");
        std::fs::write(&small, [0u8; 1024]).unwrap();
        let auto = with_prepacking(Prepacking::Auto);
        assert!(auto.prepacking_for_file(&small));
        // A file that is not there counts as large.
        assert!(!auto.prepacking_for_file(&dir.path().join("missing.onnx")));
        let big = dir.path().join("big.onnx");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(PREPACK_AUTO_MAX_BYTES + 1).unwrap(); // sparse: no disk used
        assert!(!auto.prepacking_for_file(&big));
    }

    #[test]
    fn the_bench_scripts_resolve_auto_with_the_same_threshold() {
        let mb = PREPACK_AUTO_MAX_BYTES / (1024 * 1024);
        let line = format!("PREPACK_AUTO_MAX_BYTES = {mb} * 1024 * 1024");
        for script in ["bench/run.py", "bench/bare_ort.py"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(text.contains(&line), "{script} should say `{line}`");
        }
    }

    /// The CPU features std detects are the ones /proc/cpuinfo names (which models/qmm.py
    /// reads): both sides pick the same int8 path.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn precise_int8_products_only_without_vnni() {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let flags: Vec<&str> = info
            .lines()
            .find(|l| l.starts_with("flags"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, f)| f.split_whitespace().collect())
            .unwrap_or_default();
        let vnni = flags
            .iter()
            .any(|f| *f == "avx512_vnni" || *f == "avx_vnni");
        assert_eq!(precise_qmm_needed(), !vnni, "cpuinfo flags: {flags:?}");
    }
}
