//! The Rust helpers of `make bench` (`scripts/bench.sh` runs `bench/run.py`, which calls
//! these). Rust rather than Python for the parts that compete with the service for the
//! two cores while it is being measured: the load generator and the image server each
//! run on one thread and cost microseconds per request; the bare cursor read uses the
//! same MongoDB driver as the service.
//!
//! - `images`: varied product photos made from the scikit-image sample photos (random
//!   crop, scale, flips, rotation, colour shifts, JPEG re-encode at random quality).
//! - `serve-images`: a static file server for those photos on 127.0.0.1.
//! - `load`: N multipart uploads to `/api/v1/search/image` at concurrency C; latency
//!   percentiles, requests/s and the service's own `Server-Timing` split, as JSON.
//! - `overload`: CLIENTS clients searching in a loop for SECS (half uploads, half by URL,
//!   each backing off after a 503), with a probe on its own OS thread checking
//!   `/api/v1/health` and `/` on a new connection every PROBE_MS each; statuses,
//!   latencies of the 503s and of the admitted searches, the probe's latencies, the
//!   service's peak RSS during the phase, and whether a normal search works afterwards,
//!   as JSON.
//! - `cursor`: how long a bare driver cursor takes to read the stored vectors of a model,
//!   as a plain read of the whole collection and with a model/status filter and a
//!   projection (the floor is the faster), and a bare `_id $in` read of product documents
//!   (what the service's join costs the database), as JSON.
//! - `relevance`: recall@1 and @5 of shoppers' photos of catalogue photos, per model
//!   (fp32 against its int8 copy, say), and how often each model's top 5 equals the
//!   first model's, as JSON.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use image::imageops::{self, FilterType};
use image::RgbImage;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "Helpers of `make bench`: photos, image server, load generator, cursor read")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Writes COUNT varied JPEG photos OUT/00000.jpg.. made from the photos in SRC.
    Images {
        #[arg(long)]
        src: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// Longer side of the photos, before a random 80-100% scale.
        #[arg(long, default_value_t = 320)]
        size: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Also write one more variant (another seed) here, to use as the query photo.
        #[arg(long)]
        query: Option<PathBuf>,
    },
    /// Serves DIR's files at http://127.0.0.1:PORT/img/NAME until killed.
    ServeImages {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        port: u16,
    },
    /// Uploads FILE to URL (multipart field `file`) REQUESTS times at CONCURRENCY; without
    /// FILE, GETs URL (similar products).
    Load {
        /// Full search URL, query string included.
        #[arg(long)]
        url: String,
        #[arg(long)]
        file: Option<PathBuf>,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long, default_value_t = 100)]
        requests: usize,
        /// Sequential requests first, not counted.
        #[arg(long, default_value_t = 0)]
        warmup: usize,
        /// Stop issuing requests after this long (the ones in flight finish).
        #[arg(long, default_value_t = 60.0)]
        max_secs: f64,
        /// Per-request timeout.
        #[arg(long, default_value_t = 120.0)]
        timeout_secs: f64,
    },
    /// CLIENTS clients searching BASE in a loop for SECS, with a health probe beside them.
    Overload {
        /// The service, e.g. http://127.0.0.1:8000.
        #[arg(long)]
        base: String,
        /// Uploaded by half of the requests.
        #[arg(long)]
        file: PathBuf,
        /// Searched by URL by the other half, in turn (repeatable).
        #[arg(long = "image-url", required = true)]
        image_urls: Vec<String>,
        #[arg(long, default_value_t = 200)]
        clients: usize,
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        /// How long a client waits after a 503 before its next request.
        #[arg(long, default_value_t = 50)]
        backoff_ms: u64,
        /// The probe checks `/api/v1/health` and `/` each this often, alternately.
        #[arg(long, default_value_t = 50)]
        probe_ms: u64,
        /// The service's process: its RSS is sampled and its VmHWM reset at the start.
        #[arg(long)]
        pid: Option<u32>,
        #[arg(long, default_value_t = 10)]
        top_k: usize,
        /// Per-request timeout.
        #[arg(long, default_value_t = 120.0)]
        timeout_secs: f64,
    },
    /// Recall of COUNT queries, each a re-shot of one of COUNT catalogue photos made as
    /// `images` makes them (a milder crop and scale, a colour shift, another JPEG
    /// quality), ranked exactly among the catalogue by each MODEL.
    Relevance {
        #[arg(long)]
        src: PathBuf,
        /// A model to measure (repeatable; the first is the reference for agreement).
        #[arg(long = "model", required = true)]
        models: Vec<PathBuf>,
        #[arg(long, default_value_t = 300)]
        count: usize,
        #[arg(long, default_value_t = 320)]
        size: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Intra-op threads (0 = one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// The in-memory index at catalogue sizes beyond what is indexed here: clustered
    /// unit vectors, the old f32 scan against the compact codes plus exact rescoring
    /// (one thread each), bytes a row, and how often their top 10 agree.
    Scale {
        #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
        rows: Vec<usize>,
        #[arg(long, value_delimiter = ',', default_value = "512,1280")]
        dims: Vec<usize>,
        #[arg(long, default_value_t = 50)]
        queries: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Times a bare cursor over the stored vectors of MODEL.
    Cursor {
        #[arg(long)]
        uri: String,
        #[arg(long)]
        db: String,
        #[arg(long)]
        collection: String,
        /// The model key stored with each vector (`name@sha16`, from /api/v1/status).
        #[arg(long)]
        model: String,
        #[arg(long, default_value_t = 1000)]
        batch_size: u32,
        #[arg(long, default_value_t = 7)]
        runs: usize,
        /// Also time reading this many product documents by `_id $in` (0 = no).
        #[arg(long, default_value_t = 17)]
        join: usize,
        /// The products collection for `--join`.
        #[arg(long, default_value = "products")]
        products: String,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Images {
            src,
            out,
            count,
            size,
            seed,
            query,
        } => images(&src, &out, count, size, seed, query.as_deref()),
        Cmd::ServeImages { dir, port } => rt()?.block_on(serve_images(dir, port)),
        Cmd::Load {
            url,
            file,
            concurrency,
            requests,
            warmup,
            max_secs,
            timeout_secs,
        } => {
            let body = match &file {
                Some(f) => Some(std::fs::read(f).with_context(|| f.display().to_string())?),
                None => None,
            };
            let out = rt()?.block_on(load(LoadSpec {
                url,
                image: body,
                concurrency: concurrency.max(1),
                requests,
                warmup,
                max: Duration::from_secs_f64(max_secs),
                timeout: Duration::from_secs_f64(timeout_secs),
            }))?;
            println!("{out}");
            Ok(())
        }
        Cmd::Overload {
            base,
            file,
            image_urls,
            clients,
            secs,
            backoff_ms,
            probe_ms,
            pid,
            top_k,
            timeout_secs,
        } => {
            let image = std::fs::read(&file).with_context(|| file.display().to_string())?;
            let out = rt()?.block_on(overload(OverloadSpec {
                base: base.trim_end_matches('/').to_string(),
                image,
                image_urls,
                clients: clients.max(1),
                run_for: Duration::from_secs_f64(secs),
                backoff: Duration::from_millis(backoff_ms),
                probe_every: Duration::from_millis(probe_ms.max(1)),
                pid,
                top_k,
                timeout: Duration::from_secs_f64(timeout_secs),
            }))?;
            println!("{out}");
            Ok(())
        }
        Cmd::Scale {
            rows,
            dims,
            queries,
            seed,
        } => {
            println!("{}", scale(&rows, &dims, queries, seed));
            Ok(())
        }
        Cmd::Relevance {
            src,
            models,
            count,
            size,
            seed,
            threads,
        } => {
            println!("{}", relevance(&src, &models, count, size, seed, threads)?);
            Ok(())
        }
        Cmd::Cursor {
            uri,
            db,
            collection,
            model,
            batch_size,
            runs,
            join,
            products,
        } => {
            let out = rt()?.block_on(cursor(
                &uri,
                &db,
                &collection,
                &model,
                batch_size,
                runs,
                join,
                &products,
            ))?;
            println!("{out}");
            Ok(())
        }
    }
}

/// One thread: the helpers must leave the cores to the service being measured.
fn rt() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

// ---------------------------------------------------------------------------------------
// Photos

/// SplitMix64: small, seeded, reproducible across platforms.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut r = Rng(seed ^ 0x9E37_79B9_7F4A_7C15);
        r.next();
        r
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi).
    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
    /// Uniform in 0..n.
    fn below(&mut self, n: u32) -> u32 {
        (self.next() % n.max(1) as u64) as u32
    }
    fn chance(&mut self, p: f32) -> bool {
        self.range(0.0, 1.0) < p
    }
}

/// The photos in `src` (sorted by name) with their paths, as RGB, very large ones first
/// scaled down to twice `size`.
fn load_sources(src: &Path, size: u32) -> anyhow::Result<(Vec<PathBuf>, Vec<RgbImage>)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(src)
        .with_context(|| src.display().to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("png" | "jpg" | "jpeg")
            )
        })
        .collect();
    paths.sort();
    let sources: Vec<RgbImage> = paths
        .iter()
        .map(|p| {
            let img = image::open(p).with_context(|| p.display().to_string())?;
            // Very large sources (retina, hubble) first down to 2x the target: faster crops.
            let img = if img.width().max(img.height()) > size * 2 {
                img.resize(size * 2, size * 2, FilterType::Triangle)
            } else {
                img
            };
            Ok(img.to_rgb8())
        })
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(!sources.is_empty(), "no photos in {}", src.display());
    Ok((paths, sources))
}

/// The catalogue photo `i` of `seed`, as `images` writes it, with its JPEG quality.
fn catalogue_photo(sources: &[RgbImage], seed: u64, i: usize, size: u32) -> (RgbImage, u8) {
    let mut rng = Rng::new(seed.wrapping_mul(1_000_003) ^ i as u64);
    variant(&sources[i % sources.len()], &mut rng, size)
}

fn images(
    src: &Path,
    out: &Path,
    count: usize,
    size: u32,
    seed: u64,
    query: Option<&Path>,
) -> anyhow::Result<()> {
    let (paths, sources) = load_sources(src, size)?;
    std::fs::create_dir_all(out)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let sources = &sources;
                s.spawn(move || -> anyhow::Result<()> {
                    for i in (t..count).step_by(threads) {
                        let (img, q) = catalogue_photo(sources, seed, i, size);
                        write_jpeg(&out.join(format!("{i:05}.jpg")), &img, q)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("image thread panicked"))
    })?;
    if let Some(q) = query {
        // A photo that is none of the catalogue's, but like some of them.
        let mut rng = Rng::new(seed ^ 0x5EED_0F0E);
        let i = paths
            .iter()
            .position(|p| p.file_name().is_some_and(|n| n == "chelsea.png"))
            .unwrap_or(0);
        let (img, q_) = variant(&sources[i], &mut rng, size);
        write_jpeg(q, &img, q_)?;
    }
    Ok(())
}

/// A random product-photo-like variant: crop, scale, flips, rotation, colour shift;
/// returns it with the JPEG quality to encode it at.
fn variant(src: &RgbImage, rng: &mut Rng, size: u32) -> (RgbImage, u8) {
    let (w, h) = src.dimensions();
    let cw = ((w as f32 * rng.range(0.55, 1.0)) as u32).clamp(1, w);
    let ch = ((h as f32 * rng.range(0.55, 1.0)) as u32).clamp(1, h);
    let (x, y) = (rng.below(w - cw + 1), rng.below(h - ch + 1));
    let crop = imageops::crop_imm(src, x, y, cw, ch).to_image();
    let long = (size as f32 * rng.range(0.8, 1.0)) as u32;
    let (nw, nh) = if cw >= ch {
        (long, (long as u64 * ch as u64 / cw as u64).max(1) as u32)
    } else {
        ((long as u64 * cw as u64 / ch as u64).max(1) as u32, long)
    };
    let mut img = imageops::resize(&crop, nw, nh, FilterType::Triangle);
    if rng.chance(0.5) {
        imageops::flip_horizontal_in_place(&mut img);
    }
    if rng.chance(0.1) {
        imageops::flip_vertical_in_place(&mut img);
    }
    if rng.chance(0.15) {
        img = imageops::rotate90(&img);
    }
    // Colour: per-channel gain and offset, saturation change, sometimes greyscale.
    let gains = colour_gains(rng, 0.2);
    let offset = rng.range(-25.0, 25.0);
    let sat = if rng.chance(0.1) {
        0.0
    } else {
        rng.range(0.6, 1.3)
    };
    shift_colour(&mut img, gains, offset, sat);
    let quality = 70 + rng.below(23) as u8;
    (img, quality)
}

/// A shopper's photo of a catalogue photo: a milder crop and scale than `variant`, a
/// small colour shift, another JPEG quality.
fn reshoot(src: &RgbImage, rng: &mut Rng) -> (RgbImage, u8) {
    let (w, h) = src.dimensions();
    let cw = ((w as f32 * rng.range(0.8, 1.0)) as u32).clamp(1, w);
    let ch = ((h as f32 * rng.range(0.8, 1.0)) as u32).clamp(1, h);
    let (x, y) = (rng.below(w - cw + 1), rng.below(h - ch + 1));
    let crop = imageops::crop_imm(src, x, y, cw, ch).to_image();
    let scale = rng.range(0.7, 1.1);
    let (nw, nh) = (
        ((cw as f32 * scale) as u32).max(1),
        ((ch as f32 * scale) as u32).max(1),
    );
    let mut img = imageops::resize(&crop, nw, nh, FilterType::Triangle);
    let gains = colour_gains(rng, 0.1);
    let offset = rng.range(-12.0, 12.0);
    shift_colour(&mut img, gains, offset, 1.0);
    (img, 60 + rng.below(31) as u8)
}

/// Three channel gains in 1 +- `spread`.
fn colour_gains(rng: &mut Rng, spread: f32) -> [f32; 3] {
    [0, 1, 2].map(|_| rng.range(1.0 - spread, 1.0 + spread))
}

/// Per-channel `gains` and one `offset`, then saturation `sat` (0: grey).
fn shift_colour(img: &mut RgbImage, gains: [f32; 3], offset: f32, sat: f32) {
    for p in img.pixels_mut() {
        let c = [0, 1, 2].map(|i| p[i] as f32 * gains[i] + offset);
        let grey = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2];
        for i in 0..3 {
            p[i] = (grey + (c[i] - grey) * sat).round().clamp(0.0, 255.0) as u8;
        }
    }
}

fn jpeg_bytes(img: &RgbImage, quality: u8) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(32 * 1024);
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality).encode_image(img)?;
    Ok(buf)
}

fn write_jpeg(path: &Path, img: &RgbImage, quality: u8) -> anyhow::Result<()> {
    let buf = jpeg_bytes(img, quality).with_context(|| path.display().to_string())?;
    std::fs::write(path, buf).with_context(|| path.display().to_string())
}

// ---------------------------------------------------------------------------------------
// Relevance

fn relevance(
    src: &Path,
    models: &[PathBuf],
    count: usize,
    size: u32,
    seed: u64,
    threads: usize,
) -> anyhow::Result<Value> {
    use search_img::encoder::{Encoder, EncoderOptions};
    anyhow::ensure!(count >= 5, "--count must be at least 5");
    let (_, sources) = load_sources(src, size)?;
    let (mut catalogue, mut queries) = (Vec::new(), Vec::new());
    for i in 0..count {
        let (img, q) = catalogue_photo(&sources, seed, i, size);
        catalogue.push(jpeg_bytes(&img, q)?);
        let mut rng = Rng::new((seed ^ 0x5E_0000_0000).wrapping_mul(1_000_033) ^ i as u64);
        let (shot, q) = reshoot(&img, &mut rng);
        queries.push(jpeg_bytes(&shot, q)?);
    }
    let mut rows = Vec::new();
    let mut reference: Option<Vec<Vec<usize>>> = None;
    for path in models {
        let mut opts = EncoderOptions::new(path);
        opts.session.intra_threads = threads;
        let enc = Encoder::load(&opts).with_context(|| path.display().to_string())?;
        let t = Instant::now();
        let (cat, qs) = (embed_all(&enc, &catalogue)?, embed_all(&enc, &queries)?);
        let ms_per_image = t.elapsed().as_secs_f64() * 1e3 / (2 * count) as f64;
        let tops: Vec<Vec<usize>> = qs.iter().map(|q| top_n(q, &cat, 5)).collect();
        let share = |f: &dyn Fn(usize, &Vec<usize>) -> bool| {
            tops.iter().enumerate().filter(|(i, t)| f(*i, t)).count() as f64 / count as f64
        };
        let same_top5 = reference.as_ref().map(|r| share(&|i, t| *t == r[i]));
        let compact = compact_agreement(&cat, &qs);
        rows.push(json!({
            "model": enc.identity().name,
            "path": path,
            "recall_at_1": share(&|i, t| t[0] == i),
            "recall_at_5": share(&|i, t| t.contains(&i)),
            "same_top5_as_first": same_top5,
            "ms_per_image": ms_per_image,
            "compact": compact,
        }));
        reference.get_or_insert(tops);
    }
    eprintln!(
        "| model | recall@1 | recall@5 | top 5 as the first model's | ms per image \
         | compact index: top 5 / top 10 as exact f32 (images rescored), bytes vs f32 |"
    );
    eprintln!("|---|---|---|---|---|---|");
    for r in &rows {
        let pct = |v: &Value| {
            v.as_f64()
                .map_or("-".into(), |v| format!("{:.1}%", v * 100.0))
        };
        let c = &r["compact"];
        eprintln!(
            "| {} | {} | {} | {} | {:.2} | {} / {} ({:.1} / {:.1} rescored), {:.3}x |",
            r["model"].as_str().unwrap_or("?"),
            pct(&r["recall_at_1"]),
            pct(&r["recall_at_5"]),
            pct(&r["same_top5_as_first"]),
            r["ms_per_image"].as_f64().unwrap_or(f64::NAN),
            pct(&c["same_top5"]),
            pct(&c["same_top10"]),
            c["rescored_top5"].as_f64().unwrap_or(f64::NAN),
            c["rescored_top10"].as_f64().unwrap_or(f64::NAN),
            c["vector_bytes_vs_f32"].as_f64().unwrap_or(f64::NAN),
        );
    }
    Ok(json!({ "count": count, "seed": seed, "models": rows }))
}

/// How often the service's compact index (int8 rows picking candidates, their f32
/// vectors ranked exactly) returns the same top 5 and top 10 products, scores included,
/// as exact f32 ranking of every photo; and its vectors' bytes against f32's.
fn compact_agreement(catalogue: &[Vec<f32>], queries: &[Vec<f32>]) -> Value {
    use search_img::rank::{dot, TopK, VectorCache};
    use search_img::store::{Attrs, ImageKey, ProductId};
    let dim = catalogue.first().map_or(0, Vec::len);
    let key = |i: usize| {
        ImageKey::new(
            ProductId::from_bson(mongodb::bson::Bson::String(format!("p{i:06}"))),
            format!("u{i}"),
        )
    };
    let mut cache = VectorCache::new("m".into(), dim);
    for (i, v) in catalogue.iter().enumerate() {
        cache.upsert(key(i), v, &Attrs::default(), mongodb::bson::DateTime::MIN);
    }
    cache.shrink();
    let (mut same, mut rescored) = ([0usize; 2], [0usize; 2]);
    for q in queries {
        for (slot, k) in [5, 10].into_iter().enumerate() {
            let exact = {
                let mut top = TopK::new(k, -1.0);
                for (i, v) in catalogue.iter().enumerate() {
                    top.push(&key(i).product, &key(i).url, dot(q, v));
                }
                top.into_sorted()
            };
            let (compact, n) = rescored_top(&cache, q, k, |image| {
                &catalogue[image.url[1..].parse::<usize>().expect("our own key")]
            });
            rescored[slot] += n;
            same[slot] += usize::from(compact == exact);
        }
    }
    let n = queries.len().max(1) as f64;
    json!({
        "same_top5": same[0] as f64 / n,
        "same_top10": same[1] as f64 / n,
        "rescored_top5": rescored[0] as f64 / n,
        "rescored_top10": rescored[1] as f64 / n,
        "vector_bytes_vs_f32": cache.vector_bytes() as f64 / (catalogue.len() * dim * 4).max(1) as f64,
    })
}

/// The compact index's top `k` for `q`, as the service ranks it: the cache's shortlist,
/// each candidate scored exactly against its f32 vector (`vector_of`, where the
/// service reads MongoDB); and how many candidates there were.
fn rescored_top<'v>(
    cache: &search_img::rank::VectorCache,
    q: &[f32],
    k: usize,
    vector_of: impl Fn(&search_img::store::ImageKey) -> &'v [f32],
) -> (Vec<search_img::rank::Scored>, usize) {
    use search_img::rank::{dot, Ask, TopK};
    let query = [q];
    let picked = cache.shortlist(Ask::one(&query, k, -1.0));
    let mut top = TopK::new(k, -1.0);
    for image in &picked {
        top.push(&image.product, &image.url, dot(q, vector_of(image)));
    }
    (top.into_sorted(), picked.len())
}

/// `scale`: see `Cmd::Scale`.
fn scale(sizes: &[usize], dims: &[usize], queries: usize, seed: u64) -> Value {
    use search_img::rank::{scan, TopK, VectorCache};
    use search_img::store::{Attrs, ImageKey, ProductId};
    let mut rows_out = Vec::new();
    eprintln!(
        "| products | dim | f32 bytes a row | compact bytes a row (all) | of which codes | \
         f32 scan ms | compact + rescore ms | ratio | top 10 as f32 |"
    );
    eprintln!("|---|---|---|---|---|---|---|---|---|");
    for &dim in dims {
        for &n in sizes {
            let mut rng = Rng::new(seed ^ (dim as u64) << 32 ^ n as u64);
            let mut gauss = || {
                // Sum of uniforms: near enough to normal for clustered test vectors.
                (0..4).map(|_| rng.range(0.0, 1.0)).sum::<f32>() - 2.0
            };
            let unit = |v: &mut Vec<f32>| {
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                v.iter_mut().for_each(|x| *x /= norm);
            };
            // Products in clusters of about 50 (a category of look-alikes).
            let centres: Vec<Vec<f32>> = (0..n.div_ceil(50))
                .map(|_| {
                    let mut c: Vec<f32> = (0..dim).map(|_| gauss()).collect();
                    unit(&mut c);
                    c
                })
                .collect();
            let mut flat = Vec::with_capacity(n * dim);
            let mut cache = VectorCache::new("m".into(), dim);
            cache.reserve_exact(n);
            let key = |i: usize| {
                ImageKey::new(
                    ProductId::Oid(mongodb::bson::oid::ObjectId::from_bytes(
                        [0, 0, 0, 0, 0, 0, 0, 0]
                            .into_iter()
                            .chain((i as u32).to_be_bytes())
                            .collect::<Vec<u8>>()
                            .try_into()
                            .expect("12 bytes"),
                    )),
                    format!("https://shop.example.com/uploads/products/{i:08}-photo.jpg"),
                )
            };
            for i in 0..n {
                let c = &centres[i % centres.len()];
                let mut v: Vec<f32> = c.iter().map(|x| x + 0.06 * gauss()).collect();
                unit(&mut v);
                cache.upsert(key(i), &v, &Attrs::default(), mongodb::bson::DateTime::MIN);
                flat.extend_from_slice(&v);
            }
            cache.shrink();
            // The old cache's ids, to push from as it did.
            let keys: Vec<ImageKey> = (0..n).map(key).collect();
            let (mut f32_ms, mut compact_ms, mut same) = (Vec::new(), Vec::new(), 0);
            for qi in 0..queries {
                let row = (qi * 7919) % n;
                let mut q: Vec<f32> = flat[row * dim..(row + 1) * dim]
                    .iter()
                    .map(|x| x + 0.03 * gauss())
                    .collect();
                unit(&mut q);
                let t = Instant::now();
                let mut top = TopK::new(10, -1.0);
                scan(&flat, dim, &q, |r, s| {
                    if top.admits(s) {
                        top.push(&keys[r].product, &keys[r].url, s);
                    }
                });
                let exact = top.into_sorted();
                f32_ms.push(t.elapsed().as_secs_f64() * 1e3);
                let t = Instant::now();
                let (compact, _) = rescored_top(&cache, &q, 10, |image| {
                    let name = image.url.rsplit('/').next().unwrap_or_default();
                    let r = name[..8].parse::<usize>().expect("our own URL");
                    &flat[r * dim..(r + 1) * dim]
                });
                compact_ms.push(t.elapsed().as_secs_f64() * 1e3);
                same += usize::from(compact == exact);
            }
            let median = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let (f, c) = (median(&mut f32_ms), median(&mut compact_ms));
            let all = cache.heap_bytes() as f64 / n as f64;
            let codes = cache.vector_bytes() as f64 / n as f64;
            let share = same as f64 / queries.max(1) as f64;
            eprintln!(
                "| {n} | {dim} | {} | {all:.0} | {codes:.0} | {f:.2} | {c:.2} | {:.2}x | {:.0}% |",
                dim * 4,
                c / f,
                share * 100.0
            );
            rows_out.push(json!({
                "products": n, "dim": dim, "f32_bytes_per_row": dim * 4,
                "compact_bytes_per_row": all, "compact_vector_bytes_per_row": codes,
                "f32_scan_ms_p50": f, "compact_ms_p50": c, "same_top10": share,
            }));
        }
    }
    json!({ "seed": seed, "queries": queries, "runs": rows_out })
}

/// Every photo's unit vector, in batches of 8.
fn embed_all(
    enc: &search_img::encoder::Encoder,
    photos: &[Vec<u8>],
) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(photos.len());
    for chunk in photos.chunks(8) {
        let batch = chunk
            .iter()
            .map(|b| enc.prepare(b))
            .collect::<Result<Vec<_>, _>>()?;
        out.extend(enc.embed_prepared(&batch)?);
    }
    Ok(out)
}

/// The `n` rows of `rows` most like `q` (dot product), best first; ties by index.
fn top_n(q: &[f32], rows: &[Vec<f32>], n: usize) -> Vec<usize> {
    let dot = |r: &Vec<f32>| r.iter().zip(q).map(|(a, b)| a * b).sum::<f32>();
    let mut scored: Vec<(f32, usize)> = rows.iter().map(dot).zip(0..).collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().take(n).map(|(_, i)| i).collect()
}

// ---------------------------------------------------------------------------------------
// Image server

async fn serve_images(dir: PathBuf, port: u16) -> anyhow::Result<()> {
    use axum::extract::{Path as UrlPath, State};
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;

    async fn file(
        State(dir): State<Arc<PathBuf>>,
        UrlPath(name): UrlPath<String>,
    ) -> axum::response::Response {
        let safe = !name.is_empty()
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
        if !safe {
            return StatusCode::NOT_FOUND.into_response();
        }
        match tokio::fs::read(dir.join(&name)).await {
            Ok(bytes) => ([(header::CONTENT_TYPE, "image/jpeg")], bytes).into_response(),
            Err(_) => StatusCode::NOT_FOUND.into_response(),
        }
    }

    let app = axum::Router::new()
        .route("/img/{name}", axum::routing::get(file))
        .with_state(Arc::new(dir));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Load generator

struct LoadSpec {
    url: String,
    /// None: GET.
    image: Option<Vec<u8>>,
    concurrency: usize,
    requests: usize,
    warmup: usize,
    max: Duration,
    timeout: Duration,
}

struct Sample {
    ms: f64,
    status: u16,
    results: Option<usize>,
    /// The service's `Server-Timing` entries (name -> ms).
    timing: Vec<(String, f64)>,
    /// Why there was no answer (status 0).
    error: Option<String>,
}

const BOUNDARY: &str = "----search-img-bench-7f3a9c";

/// The multipart body of an upload of `image` as the field `file`.
fn multipart_body(image: &[u8]) -> bytes::Bytes {
    let mut body = Vec::with_capacity(image.len() + 256);
    body.extend_from_slice(
        format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"query.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(image);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    bytes::Bytes::from(body)
}

async fn load(spec: LoadSpec) -> anyhow::Result<Value> {
    let body = spec.image.as_deref().map(multipart_body);
    let client = reqwest::Client::builder()
        .timeout(spec.timeout)
        .tcp_nodelay(true)
        .pool_max_idle_per_host(spec.concurrency)
        .build()?;
    let one = {
        let (client, body, url) = (client.clone(), body.clone(), spec.url.clone());
        move || {
            let (client, body, url) = (client.clone(), body.clone(), url.clone());
            async move { request(&client, &url, body).await }
        }
    };
    for _ in 0..spec.warmup {
        one().await;
    }
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..spec.concurrency)
        .map(|_| {
            let (next, one) = (next.clone(), one.clone());
            let (n, max) = (spec.requests, spec.max);
            tokio::spawn(async move {
                let mut out = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < n && start.elapsed() < max {
                    out.push(one().await);
                }
                out
            })
        })
        .collect();
    let mut samples = Vec::new();
    for w in workers {
        samples.extend(w.await?);
    }
    let wall = start.elapsed().as_secs_f64();
    Ok(summarise(&spec, samples, wall))
}

async fn request(client: &reqwest::Client, url: &str, body: Option<bytes::Bytes>) -> Sample {
    let Some(body) = body else {
        return send(client.get(url)).await;
    };
    send(
        client
            .post(url)
            .header(
                reqwest::header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .body(body),
    )
    .await
}

/// Sends one search; its status (0: no answer), time, number of results and timings.
async fn send(req: reqwest::RequestBuilder) -> Sample {
    let t = Instant::now();
    let resp = req.send().await;
    let (status, timing, text, error) = match resp {
        Ok(r) => {
            let status = r.status().as_u16();
            let timing = r
                .headers()
                .get("server-timing")
                .and_then(|v| v.to_str().ok())
                .map(parse_server_timing)
                .unwrap_or_default();
            match r.bytes().await {
                Ok(b) => (status, timing, Some(b), None),
                // The status line came but the body did not: not an answer.
                Err(e) => (0, timing, None, Some(format!("{status}, then: {e:#}"))),
            }
        }
        Err(e) => (0, Vec::new(), None, Some(format!("{e:#}"))),
    };
    if let Some(e) = &error {
        eprintln!("request failed: {e}");
    }
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let results = (status == 200)
        .then_some(text.as_deref())
        .flatten()
        .and_then(|b| serde_json::from_slice::<Vec<Value>>(b).ok())
        .map(|v| v.len());
    Sample {
        ms,
        status,
        results,
        timing,
        error,
    }
}

/// `a;dur=1.5, b;dur=2` -> [(a, 1.5), (b, 2.0)].
fn parse_server_timing(h: &str) -> Vec<(String, f64)> {
    h.split(',')
        .filter_map(|entry| {
            let mut parts = entry.split(';').map(str::trim);
            let name = parts.next()?.to_string();
            let dur = parts.find_map(|p| p.strip_prefix("dur="))?.parse().ok()?;
            Some((name, dur))
        })
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    Some(sorted[rank.min(sorted.len()) - 1])
}

fn summarise(spec: &LoadSpec, samples: Vec<Sample>, wall: f64) -> Value {
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for s in &samples {
        *statuses.entry(s.status.to_string()).or_default() += 1;
    }
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.status == 200).collect();
    let mut ms: Vec<f64> = ok.iter().map(|s| s.ms).collect();
    ms.sort_by(f64::total_cmp);
    let mut timing: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for s in &ok {
        for (k, v) in &s.timing {
            timing.entry(k.clone()).or_default().push(*v);
        }
    }
    let timing: BTreeMap<String, Value> = timing
        .into_iter()
        .map(|(k, mut v)| {
            v.sort_by(f64::total_cmp);
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            (k, json!({ "p50": percentile(&v, 50.0), "mean": mean }))
        })
        .collect();
    let mut results: Vec<usize> = ok.iter().filter_map(|s| s.results).collect();
    results.sort();
    json!({
        "url": spec.url,
        "concurrency": spec.concurrency,
        "requests": samples.len(),
        "ok": ok.len(),
        "statuses": statuses,
        "wall_s": wall,
        "rps": ok.len() as f64 / wall,
        "p50_ms": percentile(&ms, 50.0),
        "p95_ms": percentile(&ms, 95.0),
        "p99_ms": percentile(&ms, 99.0),
        "mean_ms": (!ms.is_empty()).then(|| ms.iter().sum::<f64>() / ms.len() as f64),
        "min_ms": ms.first(),
        "max_ms": ms.last(),
        "results_min": results.first(),
        "results_max": results.last(),
        "server_timing": timing,
    })
}

// ---------------------------------------------------------------------------------------
// Overload

struct OverloadSpec {
    base: String,
    image: Vec<u8>,
    image_urls: Vec<String>,
    clients: usize,
    run_for: Duration,
    backoff: Duration,
    probe_every: Duration,
    pid: Option<u32>,
    top_k: usize,
    timeout: Duration,
}

/// One search of the overload: when it started and ended (s since the phase started),
/// whether by URL, and how it went.
struct Attempt {
    from: f64,
    to: f64,
    by_url: bool,
    sample: Sample,
}

/// One check of the probe.
struct Check {
    health: bool,
    code: u16,
    ms: f64,
}

async fn overload(spec: OverloadSpec) -> anyhow::Result<Value> {
    let target = reqwest::Url::parse(&spec.base)?;
    let port = target.port_or_known_default().context("--base: no port")?;
    let host = target.host_str().context("--base: no host")?.to_string();
    let client = reqwest::Client::builder()
        .timeout(spec.timeout)
        .tcp_nodelay(true)
        .pool_max_idle_per_host(spec.clients)
        .build()?;
    let upload_url = format!("{}/api/v1/search/image?top_k={}", spec.base, spec.top_k);
    let url_searches: Vec<String> = spec
        .image_urls
        .iter()
        .map(|u| {
            format!(
                "{}/api/v1/search/url?top_k={}&image_url={}",
                spec.base,
                spec.top_k,
                urlencode(u)
            )
        })
        .collect();
    let body = multipart_body(&spec.image);
    let upload = {
        let (client, url, body) = (client.clone(), upload_url.clone(), body.clone());
        move || {
            client
                .post(&url)
                .header(
                    reqwest::header::CONTENT_TYPE,
                    format!("multipart/form-data; boundary={BOUNDARY}"),
                )
                .body(body.clone())
        }
    };

    let stop = Arc::new(AtomicBool::new(false));
    let rss_before = spec.pid.and_then(|p| proc_status_kb(p, "VmRSS"));
    // Peak RSS of this phase alone: reset the high-water mark (Linux: 5 > clear_refs).
    let hwm_reset = spec
        .pid
        .is_some_and(|p| std::fs::write(format!("/proc/{p}/clear_refs"), "5").is_ok());
    let sampler = spec.pid.map(|pid| {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut max, mut n) = (0u64, 0usize);
            while !stop.load(Ordering::Relaxed) {
                if let Some(kb) = proc_status_kb(pid, "VmRSS") {
                    max = max.max(kb);
                    n += 1;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (max, n)
        })
    });
    let probe = {
        let (stop, host, every) = (stop.clone(), host.clone(), spec.probe_every);
        std::thread::spawn(move || probe_loop(&host, port, every, &stop))
    };

    let start = Instant::now();
    let tasks: Vec<_> = (0..spec.clients)
        .map(|i| {
            let (upload, client, urls) = (upload.clone(), client.clone(), url_searches.clone());
            let (run_for, backoff) = (spec.run_for, spec.backoff);
            tokio::spawn(async move {
                let mut out = Vec::new();
                let mut n = i;
                while start.elapsed() < run_for {
                    let by_url = n % 2 == 0;
                    let req = if by_url {
                        client.post(&urls[(n / 2) % urls.len()])
                    } else {
                        upload()
                    };
                    let from = start.elapsed().as_secs_f64();
                    let sample = send(req).await;
                    let busy = sample.status == 503;
                    out.push(Attempt {
                        from,
                        to: start.elapsed().as_secs_f64(),
                        by_url,
                        sample,
                    });
                    if busy {
                        tokio::time::sleep(backoff).await;
                    }
                    n += 1;
                }
                out
            })
        })
        .collect();
    let mut attempts = Vec::new();
    for t in tasks {
        attempts.extend(t.await?);
    }
    let wall = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let checks = probe.join().expect("probe thread panicked");
    let (rss_max, rss_samples) = sampler
        .map(|s| s.join().expect("sampler thread panicked"))
        .unwrap_or((0, 0));
    let hwm = spec.pid.and_then(|p| proc_status_kb(p, "VmHWM"));

    // Afterwards, one normal search of each kind.
    let mut after = serde_json::Map::new();
    for (name, req) in [("upload", upload()), ("url", client.post(&url_searches[0]))] {
        let s = send(req).await;
        after.insert(
            name.into(),
            json!({ "status": s.status, "ms": s.ms, "results": s.results, "error": s.error }),
        );
    }

    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for a in &attempts {
        *statuses.entry(a.sample.status.to_string()).or_default() += 1;
    }
    let count = |f: &dyn Fn(&Attempt) -> bool| attempts.iter().filter(|a| f(a)).count();
    let ok = count(&|a| a.sample.status == 200);
    let busy = count(&|a| a.sample.status == 503);
    let ms_of = |status: u16| -> Vec<f64> {
        attempts
            .iter()
            .filter(|a| a.sample.status == status)
            .map(|a| a.sample.ms)
            .collect()
    };
    let by_kind = |by_url: bool| {
        json!({
            "requests": count(&|a| a.by_url == by_url),
            "ok": count(&|a| a.by_url == by_url && a.sample.status == 200),
            "busy": count(&|a| a.by_url == by_url && a.sample.status == 503),
        })
    };
    // Most admitted searches whose client-side spans overlap: each span contains the
    // server's, so this is an upper bound on how many the service had in flight.
    let mut edges: Vec<(f64, i32)> = attempts
        .iter()
        .filter(|a| a.sample.status == 200)
        .flat_map(|a| [(a.from, 1), (a.to, -1)])
        .collect();
    edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut cur, mut max_overlap) = (0i32, 0i32);
    for (_, d) in edges {
        cur += d;
        max_overlap = max_overlap.max(cur);
    }
    let mut timing: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for a in attempts.iter().filter(|a| a.sample.status == 200) {
        for (k, v) in &a.sample.timing {
            timing.entry(k.clone()).or_default().push(*v);
        }
    }
    let timing: BTreeMap<String, Option<f64>> = timing
        .into_iter()
        .map(|(k, mut v)| {
            v.sort_by(f64::total_cmp);
            (k, percentile(&v, 50.0))
        })
        .collect();
    let errors: Vec<&str> = attempts
        .iter()
        .filter_map(|a| a.sample.error.as_deref())
        .take(5)
        .collect();
    let probe_of = |health: bool| {
        let sel: Vec<&Check> = checks.iter().filter(|c| c.health == health).collect();
        let mut v = stats(sel.iter().map(|c| c.ms).collect());
        v["failures"] = json!(sel.iter().filter(|c| c.code != 200).count());
        v
    };
    let mb = |kb: Option<u64>| kb.map(|kb| kb as f64 / 1024.0);
    Ok(json!({
        "clients": spec.clients,
        "secs": spec.run_for.as_secs_f64(),
        "backoff_ms": spec.backoff.as_secs_f64() * 1e3,
        "probe_every_ms": spec.probe_every.as_secs_f64() * 1e3,
        "wall_s": wall,
        "requests": attempts.len(),
        "ok": ok,
        "busy": busy,
        "errors": attempts.len() - ok - busy,
        "error_samples": errors,
        "statuses": statuses,
        "upload": by_kind(false),
        "url": by_kind(true),
        "ok_rps": ok as f64 / wall,
        "ok_ms": stats(ms_of(200)),
        "busy_ms": stats(ms_of(503)),
        "ok_server_timing_p50": timing,
        "max_admitted_overlap": max_overlap,
        "probe": { "health": probe_of(true), "root": probe_of(false) },
        "rss": {
            "before_mb": mb(rss_before),
            "max_sampled_mb": (rss_samples > 0).then(|| rss_max as f64 / 1024.0),
            "samples": rss_samples,
            "hwm_mb": mb(hwm),
            "hwm_reset": hwm_reset,
        },
        "after": after,
    }))
}

/// Checks `/api/v1/health` and `/` alternately, each once per `every`, on a new
/// connection each time, until `stop`.
fn probe_loop(host: &str, port: u16, every: Duration, stop: &AtomicBool) -> Vec<Check> {
    let mut out = Vec::new();
    let half = every / 2;
    let mut next = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let health = n.is_multiple_of(2);
        n += 1;
        let path = if health { "/api/v1/health" } else { "/" };
        let t = Instant::now();
        let code = raw_get(host, port, path, Duration::from_secs(10));
        out.push(Check {
            health,
            code,
            ms: t.elapsed().as_secs_f64() * 1e3,
        });
        next = (next + half).max(Instant::now());
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    out
}

/// A blocking HTTP/1.1 GET on a fresh connection; the status code, or 0 on failure.
fn raw_get(host: &str, port: u16, path: &str, timeout: Duration) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect((host, port)) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_nodelay(true);
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return 0;
    }
    let mut buf = Vec::new();
    if s.read_to_end(&mut buf).is_err() {
        return 0;
    }
    let head = String::from_utf8_lossy(&buf[..buf.len().min(32)]).into_owned();
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Count, p50/p95/p99/max (ms) of some latencies.
fn stats(mut ms: Vec<f64>) -> Value {
    ms.sort_by(f64::total_cmp);
    json!({
        "n": ms.len(),
        "p50_ms": percentile(&ms, 50.0),
        "p95_ms": percentile(&ms, 95.0),
        "p99_ms": percentile(&ms, 99.0),
        "max_ms": ms.last(),
    })
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Bare cursor read

#[allow(clippy::too_many_arguments)]
async fn cursor(
    uri: &str,
    db: &str,
    collection: &str,
    model: &str,
    batch_size: u32,
    runs: usize,
    join: usize,
    products: &str,
) -> anyhow::Result<Value> {
    use mongodb::bson::{doc, Bson, Document, RawDocumentBuf};
    let client = mongodb::Client::with_uri_str(uri).await?;
    let db = client.database(db);
    let coll = db.collection::<RawDocumentBuf>(collection);
    let runs = runs.max(1);
    // Two ways of reading the same vectors; the floor is the faster. Each way's first run
    // warms the pool and the server's cache and is not counted; the ways alternate so
    // that the machine's drift hits both alike.
    let ways: [(&str, Document, Option<Document>); 2] = [
        ("plain", doc! {}, None),
        (
            "filtered",
            doc! { "model": model, "status": "ok" },
            Some(doc! { "vector": 1, "updated_at": 1 }),
        ),
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); ways.len()];
    let mut counts = vec![(0usize, 0usize); ways.len()];
    for run in 0..=runs {
        for (w, (_, filter, projection)) in ways.iter().enumerate() {
            let t = Instant::now();
            let mut cur = coll
                .find(filter.clone())
                .with_options(
                    mongodb::options::FindOptions::builder()
                        .projection(projection.clone())
                        .batch_size(batch_size)
                        .build(),
                )
                .await?;
            let (mut n, mut b) = (0usize, 0usize);
            while cur.advance().await? {
                let d = cur.current();
                // Count the model's usable vectors (the plain read returns every document).
                let usable = projection.is_some()
                    || (d.get_str("model").ok() == Some(model)
                        && d.get_str("status").ok() == Some("ok"));
                n += usize::from(usable);
                b += d.as_bytes().len();
            }
            if run > 0 {
                times[w].push(t.elapsed().as_secs_f64() * 1e3);
            }
            counts[w] = (n, b);
        }
    }
    let mut out = serde_json::Map::new();
    for (w, (name, _, _)) in ways.iter().enumerate() {
        times[w].sort_by(f64::total_cmp);
        out.insert(
            name.to_string(),
            json!({
                "docs": counts[w].0,
                "bytes": counts[w].1,
                "p50_ms": percentile(&times[w], 50.0),
                "min_ms": times[w].first(),
            }),
        );
    }
    let p50 = |w: usize| percentile(&times[w], 50.0).unwrap_or(f64::INFINITY);
    let best = if p50(0) <= p50(1) { 0 } else { 1 };

    // The join: `_id $in` of `join` products from the middle of the catalogue, with the
    // service's default projection.
    let mut join_ms = Vec::new();
    if join > 0 {
        let pc = db.collection::<Document>(products);
        let mut ids: Vec<Bson> = Vec::new();
        let mut cur = pc
            .find(doc! {})
            .projection(doc! { "_id": 1 })
            .skip(counts[0].0 as u64 / 2)
            .limit(join as i64)
            .await?;
        while cur.advance().await? {
            if let Ok(id) = cur.deserialize_current() {
                if let Some(id) = id.get("_id") {
                    ids.push(id.clone());
                }
            }
        }
        // The service's default PRODUCT_FIELDS, as its join projects them.
        let mut projection = Document::new();
        for f in search_img::config::Config::defaults()
            .catalog
            .product_fields
        {
            projection.insert(f, 1);
        }
        for run in 0..=runs * 3 {
            let t = Instant::now();
            let mut cur = pc
                .find(doc! { "_id": { "$in": ids.clone() } })
                .projection(projection.clone())
                .await?;
            while cur.advance().await? {}
            if run > 0 {
                join_ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        join_ms.sort_by(f64::total_cmp);
    }
    Ok(json!({
        "model": model,
        "collection": collection,
        "batch_size": batch_size,
        "runs": runs,
        "ways": out,
        "best": ways[best].0,
        "docs": counts[best].0,
        "bytes": counts[best].1,
        "p50_ms": percentile(&times[best], 50.0),
        "join_docs": join,
        "join_p50_ms": percentile(&join_ms, 50.0),
    }))
}
