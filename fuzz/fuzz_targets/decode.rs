//! Untrusted bytes -> `decode` -> the model's preprocessing, as an upload takes them.
//! Any panic, abort, sanitizer report, out-of-memory or slow input is a finding.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use search_img::encoder::{decode, DecodeLimits, Preprocessing};

/// A smaller pixel cap than the service's default (the same code path): it keeps the
/// fuzzer fast, and makes any input that still takes seconds a real pathology rather
/// than just a big picture.
const LIMITS: DecodeLimits = DecodeLimits {
    max_bytes: 1 << 20,
    max_pixels: 1 << 20,
};

/// EfficientNet-Lite0's `preprocessor_config.json` (resize, centre crop, normalise).
static PREPROCESSING: LazyLock<Preprocessing> = LazyLock::new(|| {
    Preprocessing::from_json(
        r#"{"crop_size": {"height": 224, "width": 224}, "do_center_crop": true,
            "do_normalize": true, "do_rescale": true, "do_resize": true,
            "image_mean": [0.498, 0.498, 0.498], "image_std": [0.502, 0.502, 0.502],
            "resample": 3, "rescale_factor": 0.00392156862745098,
            "size": {"shortest_edge": 224}}"#,
    )
    .expect("valid preprocessing")
});

fuzz_target!(|data: &[u8]| {
    let Ok(img) = decode(data, LIMITS) else {
        return;
    };
    let (w, h) = img.dimensions();
    assert!(w > 0 && h > 0, "decoded an empty image");
    assert!(
        w as u64 * h as u64 <= LIMITS.max_pixels,
        "decoded {w}x{h}, over the pixel cap"
    );
    let tensor = PREPROCESSING.to_tensor(&img);
    assert_eq!(tensor.shape(), &[3, 224, 224]);
    assert!(
        tensor.iter().all(|v| v.is_finite()),
        "non-finite input tensor"
    );
});
