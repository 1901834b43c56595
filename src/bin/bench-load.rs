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
//! - `cursor`: how long a bare driver cursor takes to read the stored vectors of a model,
//!   as a plain read of the whole collection and with a model/status filter and a
//!   projection (the floor is the faster), and a bare `_id $in` read of product documents
//!   (what the service's join costs the database), as JSON.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Uploads FILE to URL (multipart field `file`) REQUESTS times at CONCURRENCY.
    Load {
        /// Full search URL, query string included.
        #[arg(long)]
        url: String,
        #[arg(long)]
        file: PathBuf,
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
            let body = std::fs::read(&file).with_context(|| file.display().to_string())?;
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

fn images(
    src: &Path,
    out: &Path,
    count: usize,
    size: u32,
    seed: u64,
    query: Option<&Path>,
) -> anyhow::Result<()> {
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
    std::fs::create_dir_all(out)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let sources = &sources;
                s.spawn(move || -> anyhow::Result<()> {
                    for i in (t..count).step_by(threads) {
                        let mut rng = Rng::new(seed.wrapping_mul(1_000_003) ^ i as u64);
                        let (img, q) = variant(&sources[i % sources.len()], &mut rng, size);
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
    let gain = [
        rng.range(0.8, 1.2),
        rng.range(0.8, 1.2),
        rng.range(0.8, 1.2),
    ];
    let offset = rng.range(-25.0, 25.0);
    let sat = if rng.chance(0.1) {
        0.0
    } else {
        rng.range(0.6, 1.3)
    };
    for p in img.pixels_mut() {
        let c = [0, 1, 2].map(|i| p[i] as f32 * gain[i] + offset);
        let grey = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2];
        for i in 0..3 {
            p[i] = (grey + (c[i] - grey) * sat).round().clamp(0.0, 255.0) as u8;
        }
    }
    let quality = 70 + rng.below(23) as u8;
    (img, quality)
}

fn write_jpeg(path: &Path, img: &RgbImage, quality: u8) -> anyhow::Result<()> {
    let mut buf = Vec::with_capacity(32 * 1024);
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality)
        .encode_image(img)
        .with_context(|| path.display().to_string())?;
    std::fs::write(path, buf).with_context(|| path.display().to_string())
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
    image: Vec<u8>,
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
}

const BOUNDARY: &str = "----search-img-bench-7f3a9c";

async fn load(spec: LoadSpec) -> anyhow::Result<Value> {
    let mut body = Vec::with_capacity(spec.image.len() + 256);
    body.extend_from_slice(
        format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"query.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(&spec.image);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    let body = bytes::Bytes::from(body);
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

async fn request(client: &reqwest::Client, url: &str, body: bytes::Bytes) -> Sample {
    let t = Instant::now();
    let resp = client
        .post(url)
        .header(
            reqwest::header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(body)
        .send()
        .await;
    let (status, timing, text) = match resp {
        Ok(r) => {
            let status = r.status().as_u16();
            let timing = r
                .headers()
                .get("server-timing")
                .and_then(|v| v.to_str().ok())
                .map(parse_server_timing)
                .unwrap_or_default();
            (status, timing, r.bytes().await.ok())
        }
        Err(e) => {
            eprintln!("request failed: {e}");
            (0, Vec::new(), None)
        }
    };
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
        let mut projection = Document::new();
        for f in [
            "_id",
            "productName",
            "productPrice",
            "productImage",
            "productCategory",
            "productSize",
            "productDescription",
            "averageRating",
            "totalRatings",
            "createdAt",
            "updatedAt",
        ] {
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
