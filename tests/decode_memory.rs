//! Decode memory, as the allocator sees it: every accepted format's decode and
//! preprocessing stays within the cost `decode_cost` judged from its header (which
//! `DecodeGate` takes from its budget), that cost is not wildly above what is used, and
//! concurrent decodes through the real gate stay within MAX_DECODE_MEMORY_BYTES.
//! The photos are `make setup`'s large test photos (scripts/make_large_images.py).
//!
//! One test function a concern, run one after another: the allocator counts the whole
//! process, so nothing else may allocate meanwhile.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use search_img::encoder::{
    decode, decode_cost, decode_for, preprocessor_path, DecodeGate, DecodeLimits, Encoder,
    EncoderOptions, Preprocessing,
};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        System.dealloc(p, layout);
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, layout, new);
        if !q.is_null() {
            if new > layout.size() {
                let now =
                    CURRENT.fetch_add(new - layout.size(), Ordering::Relaxed) + new - layout.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                CURRENT.fetch_sub(layout.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Bytes allocated at the peak of `f`, above what was allocated before it.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = CURRENT.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed) - before)
}

const FILES: &[&str] = &[
    "cmyk-progressive-444-4096.jpg",
    "rgb-progressive-444-4096.jpg",
    "rgb-baseline-420-4096.jpg",
    "rgb-baseline-1600.jpg",
    "rgb-progressive-1600.jpg",
    "rotated-progressive-2048.jpg",
    "rgba-4096.png",
    "gray16-2048.png",
    "rgb-2048.webp",
    "rgba-2048-lossless.webp",
    "2048.gif",
    "2048.bmp",
];

fn limits() -> DecodeLimits {
    // The service's pixel cap; the BMP is over the default byte cap, which is not what
    // this is about.
    DecodeLimits {
        max_bytes: 16 << 20,
        max_pixels: 16_777_216,
    }
}

fn preprocessing(model: &str) -> Preprocessing {
    Preprocessing::from_file(&preprocessor_path(&common::model(model))).unwrap()
}

fn large(name: &str) -> Vec<u8> {
    std::fs::read(common::data(&format!("large/{name}"))).unwrap()
}

#[test]
fn decodes_stay_within_their_judged_cost_and_the_gate_within_its_budget() {
    each_format_stays_within_its_cost();
    scaled_jpegs_look_like_full_ones();
    concurrent_decodes_stay_within_the_budget();
}

fn each_format_stays_within_its_cost() {
    // Both models' input sizes; and full size (min_side 0), which is how JPEGs too small
    // to scale decode (through zune-jpeg), here at their largest.
    let cases = [
        ("efficientnet-lite0", None),
        ("clip-vit-b32-int8", None),
        ("clip-vit-b32-int8", Some(0)),
    ];
    for (model, side) in cases {
        let pre = preprocessing(model);
        let min_side = side.unwrap_or(pre.min_source_side());
        let model = if side.is_some() { "full size" } else { model };
        for name in FILES {
            let bytes = large(name);
            let cost = decode_cost(&bytes, limits(), min_side).unwrap() as usize;
            let (tensor, used) = peak_of(|| {
                let img = decode_for(&bytes, limits(), min_side).unwrap();
                pre.to_tensor(&img)
            });
            drop(tensor);
            println!(
                "{model:20} {name:32} used {:6.1} MB  judged {:6.1} MB",
                used as f64 / 1e6,
                cost as f64 / 1e6
            );
            assert!(used <= cost, "{name}: used {used} > judged {cost}");
            // Not so far above that ordinary images would wait or be refused for nothing.
            assert!(
                cost <= 3 * used + (8 << 20),
                "{name}: judged {cost} for {used} used"
            );
        }
    }
}

/// Decoding a JPEG at a reduced DCT scale gives the model nearly what the full-size
/// decode gives it (the preprocessing then resizes less), and CMYK comes out in the
/// colours of the RGB original.
fn scaled_jpegs_look_like_full_ones() {
    let pre = preprocessing("clip-vit-b32-int8");
    for name in [
        "rgb-baseline-1600.jpg",
        "rgb-progressive-1600.jpg",
        "rgb-baseline-420-4096.jpg",
        "rotated-progressive-2048.jpg",
    ] {
        let bytes = large(name);
        let full = pre.to_tensor(&decode(&bytes, limits()).unwrap());
        let scaled = pre.to_tensor(&decode_for(&bytes, limits(), pre.min_source_side()).unwrap());
        let diff = mean_abs_diff(full.as_slice().unwrap(), scaled.as_slice().unwrap());
        println!("{name:32} scaled vs full tensor: mean |diff| {diff:.4}");
        assert!(diff < 0.03, "{name}: {diff}");
    }
    let rgb =
        pre.to_tensor(&decode_for(&large("rgb-progressive-444-4096.jpg"), limits(), 224).unwrap());
    let cmyk =
        pre.to_tensor(&decode_for(&large("cmyk-progressive-444-4096.jpg"), limits(), 224).unwrap());
    let diff = mean_abs_diff(rgb.as_slice().unwrap(), cmyk.as_slice().unwrap());
    println!("CMYK vs RGB copy: mean |diff| {diff:.4}");
    assert!(
        diff < 0.15,
        "the CMYK copy decodes to other colours: {diff}"
    );
    // Upright: the rotated file's stored pixels are landscape, the picture portrait.
    let img = decode_for(&large("rotated-progressive-2048.jpg"), limits(), 224).unwrap();
    assert!(img.height() > img.width(), "{:?}", img.dimensions());
}

fn mean_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
}

/// Four progressive CMYK uploads and four PNGs at once through the real gate and model
/// preprocessing: the allocator's peak stays within the budget, and every one decodes.
fn concurrent_decodes_stay_within_the_budget() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut opts = EncoderOptions::new(common::model("efficientnet-lite0"));
    opts.limits = limits();
    let encoder = Arc::new(Encoder::load(&opts).unwrap());
    let budget: u64 = 160 << 20;
    let gate = Arc::new(DecodeGate::new(4, budget, Duration::from_secs(120)));
    let files: Vec<bytes::Bytes> = ["cmyk-progressive-444-4096.jpg", "rgba-4096.png"]
        .iter()
        .flat_map(|n| std::iter::repeat_n(bytes::Bytes::from(large(n)), 4))
        .collect();
    let (done, used) = peak_of(|| {
        rt.block_on(async {
            let tasks: Vec<_> = files
                .iter()
                .map(|b| {
                    let (gate, enc, b) = (gate.clone(), encoder.clone(), b.clone());
                    tokio::spawn(async move { gate.prepare(&enc, b).await.map(|t| t.len()) })
                })
                .collect();
            let mut n = 0;
            for t in tasks {
                t.await.unwrap().unwrap();
                n += 1;
            }
            n
        })
    });
    assert_eq!(done, 8);
    println!(
        "8 concurrent decodes: peak {:.1} MB over a budget of {:.1} MB",
        used as f64 / 1e6,
        budget as f64 / 1e6
    );
    // The tensors (0.6 MB each) and the tasks are outside the decode budget.
    assert!(used as u64 <= budget + (8 << 20), "{used} > {budget}");
    assert_eq!(gate.memory_available(), budget / 1024 * 1024);
}
