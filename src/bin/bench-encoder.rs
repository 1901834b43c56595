//! One encoder benchmark measurement, in its own process so that the peak RSS it reports
//! belongs to this model and these session settings alone.
//!
//! Loads a model through the library (`search_img::encoder`), preprocesses real photos
//! with the library, then measures load time, batch-1 latency and batch-B latency per
//! image (medians after warm-up), and prints one JSON line with those and the process's
//! memory from /proc/self/status (VmHWM = peak RSS). `scripts/bench-encoder.sh` runs it
//! beside `bench/bare_ort.py` (bare Python onnxruntime on the same file and input) and
//! prints the comparison table.
//!
//! `--dump-input FILE.npy` only preprocesses the photos and writes the [B,3,H,W] float32
//! tensor, so the bare runtime gets exactly the input the library made.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use ndarray::Array3;
use search_img::encoder::{
    decode, preprocessor_path, runtime, DecodeLimits, Encoder, EncoderOptions, Preprocessing,
    SessionSettings,
};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "Measure one image encoder: load time, latency, peak RSS (JSON line)")]
struct Args {
    /// The ONNX model (its preprocessor_config.json beside it).
    #[arg(long)]
    model: PathBuf,
    /// Photos to embed; cycled to fill the batch.
    #[arg(long, num_args = 1.., required = true)]
    images: Vec<PathBuf>,
    /// Intra-op threads (0 = one per core).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// CPU memory arena.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    arena: bool,
    /// Weight prepacking: true, false or auto (by the model file's size, as the service).
    #[arg(long, default_value = "false")]
    prepacking: String,
    /// Intra-op thread spinning (ONNX Runtime's default: on).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    spinning: bool,
    /// Spinning ends when a run returns (`session.force_spinning_stop`; ONNX Runtime's
    /// default: off, the service's: on).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    stop_spinning: bool,
    /// Graph optimisation level: disable, basic, extended or all.
    #[arg(long, default_value = "all")]
    optimization: String,
    /// Batch size of the batched measurement (MAX_BATCH_SIZE).
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Untimed runs before each measurement.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Label of the settings in the output.
    #[arg(long)]
    label: Option<String>,
    /// Only write the preprocessed batch as .npy and exit (no model load).
    #[arg(long)]
    dump_input: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.batch >= 1 && args.runs >= 1,
        "--batch and --runs must be >= 1"
    );
    let photos: Vec<Vec<u8>> = args
        .images
        .iter()
        .map(|p| std::fs::read(p).with_context(|| p.display().to_string()))
        .collect::<Result<_, _>>()?;

    if let Some(out) = &args.dump_input {
        let pre = Preprocessing::from_file(&preprocessor_path(&args.model))?;
        let tensors = photos
            .iter()
            .cycle()
            .take(args.batch)
            .map(|b| Ok(pre.to_tensor(&decode(b, DecodeLimits::default())?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        return write_npy(out, &tensors);
    }

    // ORT_OPTIMIZATION and ORT_PREPACKING parsed (and validated) exactly as the service does.
    let cfg = search_img::config::Config::from_vars([
        ("ORT_OPTIMIZATION".to_string(), args.optimization.clone()),
        ("ORT_PREPACKING".to_string(), args.prepacking.clone()),
    ])?;
    let from_cfg = cfg.embedder.encoder.session;
    let settings = SessionSettings {
        intra_threads: args.threads,
        memory_arena: args.arena,
        allow_spinning: args.spinning,
        stop_spinning_after_run: args.stop_spinning,
        ..from_cfg
    };
    let mut opts = EncoderOptions::new(&args.model);
    opts.session = settings.clone();

    // Load the runtime library first, as `import onnxruntime` does on the Python side,
    // so that load time and the baseline RSS cover the same things in both.
    runtime::environment(opts.dylib.as_deref())?;
    let rss_base = status_mb("VmRSS");

    let start = Instant::now();
    let encoder = Encoder::load(&opts)?;
    let prepacking = encoder.prepacking();
    let load_s = start.elapsed().as_secs_f64();
    let rss_loaded = status_mb("VmRSS");

    let start = Instant::now();
    let tensors = photos
        .iter()
        .cycle()
        .take(args.batch)
        .map(|b| encoder.prepare(b))
        .collect::<Result<Vec<_>, _>>()?;
    let prepare_ms = start.elapsed().as_secs_f64() * 1e3 / args.batch as f64;

    let one = &tensors[..1];
    let batch1 = time_runs(args.warmup, args.runs, || encoder.embed_prepared(one))?;
    let rss_batch1 = status_mb("VmRSS");
    let batch_b = time_runs(args.warmup, args.runs, || encoder.embed_prepared(&tensors))?;

    let rss_end = status_mb("VmRSS");
    let peak_rss = status_mb("VmHWM");
    // Part of load: Encoder::load hashes the file (the model identity) on a second thread
    // while ONNX Runtime builds the session. Timed alone here, after the peak is read.
    let start = Instant::now();
    search_img::encoder::sha256_file(&args.model)?;
    let sha256_s = start.elapsed().as_secs_f64();

    let line = json!({
        "impl": "ours",
        "label": args.label.as_deref().unwrap_or(&label(&settings, prepacking, &args.optimization)),
        "model": model_name(&args.model),
        "model_path": args.model,
        "model_mb": std::fs::metadata(&args.model).map(|m| m.len() as f64 / 1048576.0).ok(),
        "threads": settings.threads(),
        "arena": args.arena,
        "prepacking": prepacking,
        "prepacking_setting": args.prepacking.trim().to_ascii_lowercase(),
        "spinning": args.spinning,
        "stop_spinning": args.stop_spinning,
        "optimization": args.optimization,
        "batch": args.batch,
        "runs": args.runs,
        "load_s": load_s,
        "prepare_ms_per_img": prepare_ms,
        "batch1_ms": median(&batch1),
        "batch1_ms_min": min(&batch1),
        "batchB_ms": median(&batch_b),
        "batchB_ms_per_img": median(&batch_b) / args.batch as f64,
        "rss_base_mb": rss_base,
        "rss_loaded_mb": rss_loaded,
        "rss_after_batch1_mb": rss_batch1,
        "rss_end_mb": rss_end,
        "peak_rss_mb": peak_rss,
        "sha256_s": sha256_s,
        "dim": encoder.identity().dim,
        "malloc_mmap_threshold": std::env::var("MALLOC_MMAP_THRESHOLD_").ok(),
    });
    println!("{line}");
    Ok(())
}

fn label(s: &SessionSettings, prepacking: bool, optimization: &str) -> String {
    let onoff = |b: bool| if b { "on" } else { "off" };
    format!(
        "arena {} prepack {} opt {}{}{}",
        onoff(s.memory_arena),
        onoff(prepacking),
        optimization,
        if s.allow_spinning { "" } else { " no-spin" },
        if s.stop_spinning_after_run {
            " spin-stop"
        } else {
            ""
        }
    )
}

fn model_name(path: &Path) -> String {
    path.parent()
        .and_then(|p| p.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Milliseconds of each timed run, after `warmup` untimed ones.
fn time_runs<T, E: Into<anyhow::Error>>(
    warmup: usize,
    runs: usize,
    mut f: impl FnMut() -> Result<T, E>,
) -> anyhow::Result<Vec<f64>> {
    for _ in 0..warmup {
        f().map_err(Into::into)?;
    }
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f().map_err(Into::into)?);
            Ok(t.elapsed().as_secs_f64() * 1e3)
        })
        .collect()
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn min(xs: &[f64]) -> f64 {
    xs.iter().copied().fold(f64::INFINITY, f64::min)
}

/// A field of /proc/self/status (kB) in MB; None where there is no procfs.
fn status_mb(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        let kb: f64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb / 1024.0)
    })
}

/// Writes [B,3,H,W] little-endian float32 in NumPy's .npy format (version 1.0).
fn write_npy(path: &Path, tensors: &[Array3<f32>]) -> anyhow::Result<()> {
    let (c, h, w) = tensors[0].dim();
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {c}, {h}, {w}), }}",
        tensors.len()
    );
    // Magic (6) + version (2) + header length (2) + header + '\n', padded to 64 bytes.
    let pad = 64 - (10 + header.len() + 1) % 64;
    header.push_str(&" ".repeat(pad % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + tensors.len() * c * h * w * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&u16::try_from(header.len())?.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for t in tensors {
        for x in t.iter() {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, out).with_context(|| path.display().to_string())
}
