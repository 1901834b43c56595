//! Bytes -> decoded RGB image -> normalised CHW tensor, as a model's
//! HF-style `preprocessor_config.json` says.

use std::borrow::Cow;
use std::io::Cursor;
use std::path::Path;

use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};
use ndarray::Array3;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{ImageError, ModelError};

/// The preprocessing a model expects (parsed from `preprocessor_config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocessing {
    pub do_resize: bool,
    /// Target of the shorter side.
    pub shortest_edge: u32,
    pub resample: FilterType,
    pub do_center_crop: bool,
    pub crop_height: u32,
    pub crop_width: u32,
    pub rescale_factor: f32,
    pub do_normalize: bool,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// The fields we read; HF writes `size`/`crop_size` either as a number or as an object.
#[derive(Deserialize)]
struct RawConfig {
    #[serde(default = "yes")]
    do_resize: bool,
    size: Option<Value>,
    #[serde(default = "bicubic")]
    resample: u32,
    #[serde(default = "yes")]
    do_center_crop: bool,
    crop_size: Option<Value>,
    #[serde(default = "yes")]
    do_rescale: bool,
    #[serde(default = "one_255")]
    rescale_factor: f32,
    #[serde(default = "yes")]
    do_normalize: bool,
    image_mean: Option<Vec<f32>>,
    image_std: Option<Vec<f32>>,
}

fn yes() -> bool {
    true
}
fn bicubic() -> u32 {
    3
}
fn one_255() -> f32 {
    1.0 / 255.0
}

impl Preprocessing {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let err = |reason: String| ModelError::Preprocessor {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Self::from_json(&text).map_err(err)
    }

    pub fn from_json(text: &str) -> Result<Self, String> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        // `size` is {"shortest_edge": n}, {"height": h, "width": w} or a bare n.
        let shortest_edge = match &raw.size {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::Object(o)) => o
                .get("shortest_edge")
                .or_else(|| o.get("height"))
                .and_then(Value::as_u64),
            None => Some(224),
            _ => None,
        }
        .ok_or("`size` must be a number or have `shortest_edge`")?
            as u32;
        let (crop_height, crop_width) = match &raw.crop_size {
            Some(Value::Number(n)) => {
                let n = n.as_u64().ok_or("bad `crop_size`")? as u32;
                (n, n)
            }
            Some(Value::Object(o)) => {
                let get = |k| o.get(k).and_then(Value::as_u64).map(|v| v as u32);
                (
                    get("height").ok_or("`crop_size` needs `height`")?,
                    get("width").ok_or("`crop_size` needs `width`")?,
                )
            }
            None => (shortest_edge, shortest_edge),
            _ => return Err("bad `crop_size`".into()),
        };
        let triple = |v: Option<Vec<f32>>, name: &str, default: f32| -> Result<[f32; 3], String> {
            match v {
                None => Ok([default; 3]),
                Some(v) if v.len() == 3 => Ok([v[0], v[1], v[2]]),
                Some(v) if v.len() == 1 => Ok([v[0]; 3]),
                Some(_) => Err(format!("`{name}` must have 3 values")),
            }
        };
        let std = triple(raw.image_std, "image_std", 1.0)?;
        if std.iter().any(|s| *s <= 0.0) {
            return Err("`image_std` must be positive".into());
        }
        if shortest_edge == 0 || crop_height == 0 || crop_width == 0 {
            return Err("sizes must be positive".into());
        }
        Ok(Self {
            do_resize: raw.do_resize,
            shortest_edge,
            // PIL's resample codes.
            resample: match raw.resample {
                0 => FilterType::Nearest,
                1 => FilterType::Lanczos3,
                2 | 4 | 5 => FilterType::Triangle,
                _ => FilterType::CatmullRom,
            },
            do_center_crop: raw.do_center_crop,
            crop_height,
            crop_width,
            rescale_factor: if raw.do_rescale {
                raw.rescale_factor
            } else {
                1.0
            },
            do_normalize: raw.do_normalize,
            mean: triple(raw.image_mean, "image_mean", 0.0)?,
            std,
        })
    }

    /// The shorter side a decoded image needs so that preprocessing never scales it up
    /// (a JPEG is decoded no larger than that: `decode_for`).
    pub fn min_source_side(&self) -> u32 {
        let (oh, ow) = self.output_hw();
        let side = oh.max(ow);
        if self.do_resize {
            self.shortest_edge.max(side)
        } else {
            side
        }
    }

    /// The tensor size [3, H, W] this preprocessing produces.
    pub fn output_hw(&self) -> (u32, u32) {
        if self.do_center_crop {
            (self.crop_height, self.crop_width)
        } else {
            (self.shortest_edge, self.shortest_edge)
        }
    }

    /// Decoded image -> [3, H, W] float tensor. Filled plane by plane straight from the
    /// resized image's crop window: no zeroed buffer, no copy of the crop, no indexed
    /// writes (the fill and crop copy had been 3% of an EfficientNet-Lite0 indexing
    /// pass's CPU, as much as decoding the JPEG). Each channel has only 256 possible
    /// values, so they come from a table computed once a call with the same expression:
    /// the same bits, without a multiply and a divide per value (2% of a search's CPU).
    pub fn to_tensor(&self, img: &RgbImage) -> Array3<f32> {
        let (oh, ow) = self.output_hw();
        let (src, left, top) = self.resize_and_crop(img);
        let table = self.value_table();
        let (sw, ow, oh) = (src.width() as usize, ow as usize, oh as usize);
        let raw = src.as_raw();
        let mut data = Vec::with_capacity(3 * oh * ow);
        for (c, values) in table.iter().enumerate() {
            for y in top as usize..top as usize + oh {
                let start = (y * sw + left as usize) * 3;
                let row = &raw[start..start + ow * 3];
                data.extend(row.chunks_exact(3).map(|px| values[px[c] as usize]));
            }
        }
        Array3::from_shape_vec((3, oh, ow), data).expect("3 x height x width values")
    }

    /// Per channel, the tensor value of each 8-bit level: rescaled, then normalised.
    fn value_table(&self) -> [[f32; 256]; 3] {
        let scale = self.rescale_factor;
        let (mean, std) = if self.do_normalize {
            (self.mean, self.std)
        } else {
            ([0.0; 3], [1.0; 3])
        };
        std::array::from_fn(|c| {
            std::array::from_fn(|level| (level as f32 * scale - mean[c]) / std[c])
        })
    }

    /// The resized image and the top-left corner of the output window in it (the centre
    /// crop, or the whole image).
    fn resize_and_crop<'a>(&self, img: &'a RgbImage) -> (Cow<'a, RgbImage>, u32, u32) {
        let (oh, ow) = self.output_hw();
        let (w, h) = img.dimensions();
        let resized = if self.do_resize {
            // Shorter side to `shortest_edge`, the longer one scaled and truncated, as
            // torchvision's Resize(int) does in the CLIP reference.
            let s = self.shortest_edge as u64;
            let (nw, nh) = if w <= h {
                (s, (s * h as u64 / w as u64).max(1))
            } else {
                ((s * w as u64 / h as u64).max(1), s)
            };
            if nw * nh > MAX_RESIZE_OVERSHOOT * ow as u64 * oh as u64 {
                return (Cow::Owned(self.resize_extreme(img, nw, nh)), 0, 0);
            }
            if (nw as u32, nh as u32) == (w, h) {
                Cow::Borrowed(img)
            } else {
                Cow::Owned(resize(img, nw as u32, nh as u32, self.resample))
            }
        } else {
            Cow::Borrowed(img)
        };
        if !self.do_center_crop {
            return if resized.dimensions() == (ow, oh) {
                (resized, 0, 0)
            } else {
                (Cow::Owned(resize(&resized, ow, oh, self.resample)), 0, 0)
            };
        }
        let (rw, rh) = resized.dimensions();
        if rw < ow || rh < oh {
            // Smaller than the crop: the reference pads; scaling up is the closer fit for photos.
            return (Cow::Owned(resize(&resized, ow, oh, self.resample)), 0, 0);
        }
        let left = round_half_even((rw - ow) as f64 / 2.0);
        let top = round_half_even((rh - oh) as f64 / 2.0);
        (resized, left, top)
    }
}

/// Resamples with `fast_image_resize` (SIMD convolution with the same kernels): 10-12x
/// faster than `image::imageops::resize` (0.2 ms instead of 2.3 ms for a 320-pixel
/// photo; the resize was two thirds of a search's decode-and-preprocess time and the
/// largest CPU cost after the model while indexing), with results within 1-2 levels of
/// it (mean 0.05-0.18 levels). Falls back to the `image` crate if it refuses the sizes.
fn resize(img: &RgbImage, width: u32, height: u32, filter: FilterType) -> RgbImage {
    use fast_image_resize as fr;
    let alg = match filter {
        FilterType::Nearest => fr::ResizeAlg::Nearest,
        FilterType::Triangle => fr::ResizeAlg::Convolution(fr::FilterType::Bilinear),
        FilterType::CatmullRom => fr::ResizeAlg::Convolution(fr::FilterType::CatmullRom),
        FilterType::Gaussian => fr::ResizeAlg::Convolution(fr::FilterType::Gaussian),
        FilterType::Lanczos3 => fr::ResizeAlg::Convolution(fr::FilterType::Lanczos3),
    };
    let fast = || -> Option<RgbImage> {
        let src =
            fr::images::ImageRef::new(img.width(), img.height(), img.as_raw(), fr::PixelType::U8x3)
                .ok()?;
        let mut dst = fr::images::Image::new(width, height, fr::PixelType::U8x3);
        fr::Resizer::new()
            .resize(&src, &mut dst, &fr::ResizeOptions::new().resize_alg(alg))
            .ok()?;
        RgbImage::from_raw(width, height, dst.into_vec())
    };
    fast().unwrap_or_else(|| image::imageops::resize(img, width, height, filter))
}

/// How much larger than the output the shorter-side resize may be. Past it, the resize
/// costs more than the decode: a 1-pixel-wide strip within the pixel cap (1 x 16
/// million) would be resized to 224 x 3.7 billion pixels before the crop (tens of
/// gigabytes for the first buffer alone: the failed allocation aborts the process), and
/// the fuzzer's 16 x 9496 JPEG took seconds.
const MAX_RESIZE_OVERSHOOT: u64 = 16;

impl Preprocessing {
    /// An aspect ratio past `MAX_RESIZE_OVERSHOOT`: take from the source only the part
    /// the reference pipeline would keep (the centre region that the crop maps back to;
    /// all of it without a crop) and resize that straight to the output size. Borders
    /// may differ by a pixel from resize-then-crop; the work is bounded by the output.
    fn resize_extreme(&self, img: &RgbImage, nw: u64, nh: u64) -> RgbImage {
        let (oh, ow) = self.output_hw();
        if !self.do_center_crop {
            return resize(img, ow, oh, self.resample);
        }
        let (w, h) = (img.width() as u64, img.height() as u64);
        let span = |out: u64, resized: u64, src: u64| {
            (out.min(resized) * src).div_ceil(resized).clamp(1, src)
        };
        let (cw, ch) = (span(ow as u64, nw, w), span(oh as u64, nh, h));
        let region = image::imageops::crop_imm(
            img,
            ((w - cw) / 2) as u32,
            ((h - ch) / 2) as u32,
            cw as u32,
            ch as u32,
        )
        .to_image();
        resize(&region, ow, oh, self.resample)
    }
}

/// Python's `round` (half to even), which the reference centre crop uses for its offset.
fn round_half_even(v: f64) -> u32 {
    let r = v.round();
    let r = if (v - v.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - 1.0
    } else {
        r
    };
    r as u32
}

pub use crate::config::DecodeLimits;

/// Decodes untrusted bytes into an upright RGB image at full size.
pub fn decode(bytes: &[u8], limits: DecodeLimits) -> Result<RgbImage, ImageError> {
    decode_for(bytes, limits, 0)
}

/// Decodes untrusted bytes into an upright RGB image whose shorter side is at least
/// `min_side` (0: full size).
///
/// The format is judged from the content, not from any header or file name. The pixel
/// count is checked from the image header before any pixel is decoded (decompression
/// bombs), EXIF orientation is applied, the first frame of an animation is taken, and
/// transparent pixels are composited over white: product photos with a transparent
/// background are shown on white pages, and white keeps them like their JPEG copies.
/// JPEGs are scaled down while decoding (in the DCT domain: 1/2, 1/4 or 1/8) to the
/// smallest step whose shorter side still covers `min_side`.
pub fn decode_for(
    bytes: &[u8],
    limits: DecodeLimits,
    min_side: u32,
) -> Result<RgbImage, ImageError> {
    plan_decode(bytes, limits, min_side)?.decode(bytes, limits)
}

/// The most memory decoding `bytes` (for an image whose shorter side must cover
/// `min_side`) and preprocessing the result can take: `DecodePlan::cost`.
pub fn decode_cost(bytes: &[u8], limits: DecodeLimits, min_side: u32) -> Result<u64, ImageError> {
    Ok(plan_decode(bytes, limits, min_side)?.cost())
}

/// How to decode an image and what that costs, read from its header alone. Owned, so
/// `DecodeGate` can take the cost from its budget before the decode, which then starts
/// from the plan instead of reading the header again.
pub struct DecodePlan {
    format: image::ImageFormat,
    /// A JPEG decoded at a DCT scale (jpeg-decoder); `None`: image's own decoder.
    scaled_jpeg: Option<JpegHeader>,
    cost: u64,
}

impl DecodePlan {
    /// The most memory the decode and preprocessing can take, the decoder's own buffers
    /// included; `tests/decode_memory.rs` checks it against what the allocator sees.
    pub fn cost(&self) -> u64 {
        self.cost
    }

    /// Decodes `bytes`, the bytes this plan was made from.
    pub fn decode(&self, bytes: &[u8], limits: DecodeLimits) -> Result<RgbImage, ImageError> {
        match &self.scaled_jpeg {
            Some(header) => decode_jpeg(bytes, header),
            None => {
                let mut reader = ImageReader::with_format(Cursor::new(bytes), self.format);
                reader.limits(decoder_limits(limits));
                decode_other(reader)
            }
        }
    }
}

/// The checks every image gets before any pixel is decoded (size, the format from the
/// content, the pixel cap), then the plan.
pub fn plan_decode(
    bytes: &[u8],
    limits: DecodeLimits,
    min_side: u32,
) -> Result<DecodePlan, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    if bytes.len() > limits.max_bytes {
        return Err(ImageError::TooLarge {
            limit: limits.max_bytes,
        });
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Corrupt(e.to_string()))?;
    match reader.format() {
        None => Err(ImageError::UnsupportedFormat),
        // The JPEG decoder fills a cut-off file with grey instead of failing.
        Some(image::ImageFormat::Jpeg) if !jpeg_has_end(bytes) => {
            Err(ImageError::Corrupt("the JPEG data is truncated".into()))
        }
        Some(format @ image::ImageFormat::Jpeg) => {
            let header = JpegHeader::read(bytes, limits, min_side)?;
            Ok(DecodePlan {
                format,
                cost: header.cost(min_side),
                // Too small to scale: zune-jpeg (image's decoder) is twice as fast as
                // jpeg-decoder on a 320-px photo (0.55 vs 1.12 ms).
                scaled_jpeg: (header.scale < 8).then_some(header),
            })
        }
        Some(format) => {
            reader.limits(decoder_limits(limits));
            let mut decoder = reader.into_decoder().map_err(map_image_error)?;
            let (width, height) = decoder.dimensions();
            check_pixels(width, height, limits)?;
            // 16-bit images take up to 8 bytes a pixel: hold every format to what the
            // pixel cap costs in 8-bit RGBA. No real photo under the byte cap is refused
            // by this; synthetic bombs are.
            let bytes_per_pixel = decoder.color_type().bytes_per_pixel().max(1) as u64;
            if decoder.total_bytes() > pixel_bytes_budget(limits) {
                return Err(ImageError::TooManyPixels {
                    width,
                    height,
                    limit: pixel_bytes_budget(limits) / bytes_per_pixel,
                });
            }
            let rotates = decoder.orientation().is_ok_and(rotates);
            let cost = other_cost(
                format,
                width,
                height,
                decoder.total_bytes(),
                rotates,
                min_side,
            );
            Ok(DecodePlan {
                format,
                scaled_jpeg: None,
                cost,
            })
        }
    }
}

/// The decoders' own buffers (PNG also counts its eagerly inflated ICC profile here, a
/// favourite bomb). The pixels are checked from the header.
fn decoder_limits(limits: DecodeLimits) -> Limits {
    let mut l = Limits::default();
    l.max_alloc = Some(pixel_bytes_budget(limits).max(64 << 20));
    l
}

fn check_pixels(width: u32, height: u32, limits: DecodeLimits) -> Result<(), ImageError> {
    if width == 0 || height == 0 {
        return Err(ImageError::Corrupt("the image has no pixels".into()));
    }
    if width as u64 * height as u64 > limits.max_pixels {
        return Err(ImageError::TooManyPixels {
            width,
            height,
            limit: limits.max_pixels,
        });
    }
    Ok(())
}

/// Whether an orientation turns the image by 90 degrees (a rotated copy is made).
fn rotates(o: image::metadata::Orientation) -> bool {
    use image::metadata::Orientation as O;
    matches!(
        o,
        O::Rotate90 | O::Rotate270 | O::Rotate90FlipH | O::Rotate270FlipH
    )
}

/// Memory of decoding a non-JPEG image: the decoder's output, its own working buffers
/// (by format), the RGB copy, a rotated copy, and the resize.
fn other_cost(
    format: image::ImageFormat,
    w: u32,
    h: u32,
    output: u64,
    rotates: bool,
    min_side: u32,
) -> u64 {
    let px = w as u64 * h as u64;
    let working = match format {
        // Two rows and the inflater.
        image::ImageFormat::Png => 2 * output / h.max(1) as u64 + (1 << 20),
        // VP8's YUV planes (1.5 bytes a pixel); VP8L decodes into its output.
        image::ImageFormat::WebP => 2 * px,
        // The indexed frame.
        image::ImageFormat::Gif => px,
        _ => 1 << 20,
    };
    output + working + 3 * px + if rotates { 3 * px } else { 0 } + resize_cost(w, h, min_side)
}

/// The resize from a w x h RGB image to a shorter side of `min_side`:
/// fast_image_resize's intermediate (the width resized, every source row) and its
/// output, the tensor, slack.
fn resize_cost(w: u32, h: u32, min_side: u32) -> u64 {
    let (w, h) = (w as u64, h as u64);
    // A full-size decode (0) is preprocessed for some model: room for a 448-px one.
    let side = if min_side == 0 { 448 } else { min_side as u64 };
    let out_w = side.max(side * w / h.max(1)).min(w);
    out_w * h * 3 * 2 + (4 << 20)
}

/// A JPEG's frame, read without decoding pixels.
struct JpegHeader {
    width: u32,
    height: u32,
    components: u64,
    progressive: bool,
    /// Eighths: 8 is full size, 1 is 1/8.
    scale: u32,
}

impl JpegHeader {
    fn read(bytes: &[u8], limits: DecodeLimits, min_side: u32) -> Result<Self, ImageError> {
        let mut d = jpeg_decoder::Decoder::new(bytes);
        d.read_info().map_err(map_jpeg_error)?;
        let info = d
            .info()
            .ok_or_else(|| ImageError::Corrupt("no JPEG frame".into()))?;
        let (width, height) = (info.width as u32, info.height as u32);
        check_pixels(width, height, limits)?;
        let components = match info.pixel_format {
            jpeg_decoder::PixelFormat::L8 | jpeg_decoder::PixelFormat::L16 => 1,
            jpeg_decoder::PixelFormat::RGB24 => 3,
            jpeg_decoder::PixelFormat::CMYK32 => 4,
        };
        let lossless = info.coding_process == jpeg_decoder::CodingProcess::Lossless;
        let scale = if min_side == 0 || lossless {
            8
        } else {
            [1, 2, 4, 8]
                .into_iter()
                .find(|s| scaled(width.min(height), *s) >= min_side)
                .unwrap_or(8)
        };
        Ok(Self {
            width,
            height,
            components,
            progressive: info.coding_process == jpeg_decoder::CodingProcess::DctProgressive,
            scale,
        })
    }

    fn output(&self) -> (u32, u32) {
        (
            scaled(self.width, self.scale),
            scaled(self.height, self.scale),
        )
    }

    /// A progressive JPEG keeps every DCT coefficient (two bytes each, 64 per 8x8
    /// block, at full size whatever the output scale) until its last scan; every JPEG
    /// decodes into a plane per component and then one interleaved buffer at the output
    /// size, which becomes RGB (and maybe a rotated copy) before the resize. Unscaled
    /// JPEGs go through zune-jpeg, which keeps the same coefficients but no planes.
    fn cost(&self, min_side: u32) -> u64 {
        let pad = |n: u32| (n as u64).div_ceil(16) * 16;
        let coefficients = if self.progressive {
            self.components * pad(self.width) * pad(self.height) * 2
        } else {
            0
        };
        let (ow, oh) = self.output();
        let opx = (ow as u64 + 16) * (oh as u64 + 16);
        let pixels = if self.scale < 8 {
            // jpeg-decoder: a plane per component, then the interleaved output (L16 is
            // two bytes a sample), then RGB and maybe a rotated copy.
            2 * self.components * opx * 2 + 2 * 3 * opx
        } else {
            // zune-jpeg decodes straight to RGB (grey to one byte a pixel, then RGB),
            // then maybe a rotated copy.
            let grey = if self.components == 1 { 4 * opx } else { 0 };
            3 * opx + grey + 3 * opx
        };
        coefficients + pixels + resize_cost(ow, oh, min_side)
    }
}

/// A side at `scale` eighths, as jpeg-decoder rounds it.
fn scaled(len: u32, scale: u32) -> u32 {
    (len * scale).div_ceil(8)
}

fn decode_jpeg(bytes: &[u8], header: &JpegHeader) -> Result<RgbImage, ImageError> {
    let mut d = jpeg_decoder::Decoder::new(bytes);
    let (ow, oh) = header.output();
    if header.scale < 8 {
        // Asks for exactly this step: jpeg-decoder takes the smallest whose output
        // reaches the request in either axis.
        d.scale(
            ow.min(u16::MAX as u32) as u16,
            oh.min(u16::MAX as u32) as u16,
        )
        .map_err(map_jpeg_error)?;
    }
    let pixels = d.decode().map_err(map_jpeg_error)?;
    let info = d
        .info()
        .ok_or_else(|| ImageError::Corrupt("no JPEG frame".into()))?;
    let (w, h) = (info.width as u32, info.height as u32);
    let rgb: Vec<u8> = match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => pixels,
        jpeg_decoder::PixelFormat::L8 => pixels.iter().flat_map(|&l| [l, l, l]).collect(),
        // Big-endian 16-bit samples: keep the high byte.
        jpeg_decoder::PixelFormat::L16 => pixels.chunks_exact(2).flat_map(|l| [l[0]; 3]).collect(),
        // jpeg-decoder has undone Adobe's inversion: plain CMYK, as image 0.24 read it.
        jpeg_decoder::PixelFormat::CMYK32 => pixels
            .chunks_exact(4)
            .flat_map(|p| {
                let k = 255 - p[3] as u32;
                [0, 1, 2].map(|i| ((255 - p[i] as u32) * k / 255) as u8)
            })
            .collect(),
    };
    let img = RgbImage::from_raw(w, h, rgb)
        .ok_or_else(|| ImageError::Corrupt("the JPEG decoded to the wrong size".into()))?;
    let orientation = d
        .exif_data()
        .and_then(image::metadata::Orientation::from_exif_chunk);
    let mut img = DynamicImage::ImageRgb8(img);
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    Ok(img.into_rgb8())
}

fn map_jpeg_error(e: jpeg_decoder::Error) -> ImageError {
    match e {
        jpeg_decoder::Error::Unsupported(f) => {
            ImageError::UnsupportedFeature(format!("this JPEG uses {f:?}, which is not supported"))
        }
        other => ImageError::Corrupt(other.to_string()),
    }
}

fn decode_other(reader: ImageReader<Cursor<&[u8]>>) -> Result<RgbImage, ImageError> {
    let mut decoder = reader.into_decoder().map_err(map_image_error)?;
    let orientation = decoder.orientation().ok();
    let img = DynamicImage::from_decoder(decoder).map_err(map_image_error)?;
    // To RGB first, so a rotation copies three bytes a pixel, not four or eight.
    let mut img = DynamicImage::ImageRgb8(flatten_to_rgb(img));
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    Ok(img.into_rgb8())
}

/// Bytes of decoded pixels allowed: the pixel cap in 8-bit RGBA.
fn pixel_bytes_budget(limits: DecodeLimits) -> u64 {
    limits.max_pixels.saturating_mul(4)
}

/// Whether a JPEG has its end-of-image marker after the first scan. Entropy-coded data
/// stuffs every 0xFF byte, so FF D9 after the first start-of-scan is the real end; an
/// EXIF thumbnail's own end marker comes before it and does not count.
fn jpeg_has_end(bytes: &[u8]) -> bool {
    let mut i = 2; // after SOI
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return false;
        }
        let marker = bytes[i + 1];
        if marker == 0xFF {
            i += 1; // fill byte
            continue;
        }
        if marker == 0xDA {
            return bytes[i + 2..].windows(2).any(|w| w == [0xFF, 0xD9]);
        }
        let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
        i += 2 + len;
    }
    false
}

fn map_image_error(e: image::ImageError) -> ImageError {
    use image::error::ImageError as E;
    match e {
        E::Unsupported(u) => match u.kind() {
            image::error::UnsupportedErrorKind::Format(_) => ImageError::UnsupportedFormat,
            _ => ImageError::Corrupt(u.to_string()),
        },
        E::Limits(l) => ImageError::Corrupt(format!("image exceeds decoding limits ({l})")),
        other => ImageError::Corrupt(other.to_string()),
    }
}

/// Any colour type -> 8-bit RGB, alpha composited over white.
fn flatten_to_rgb(img: DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.into_rgb8();
    }
    let rgba = img.into_rgba8();
    let (w, h) = rgba.dimensions();
    RgbImage::from_fn(w, h, |x, y| {
        let p = rgba.get_pixel(x, y).0;
        let a = p[3] as u32;
        let blend = |c: u8| ((c as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
        image::Rgb([blend(p[0]), blend(p[1]), blend(p[2])])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_half_even_matches_python() {
        assert_eq!(round_half_even(0.5), 0);
        assert_eq!(round_half_even(1.5), 2);
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(3.0), 3);
        assert_eq!(round_half_even(3.4), 3);
    }

    #[test]
    fn tensor_equals_crop_then_per_pixel_normalisation() {
        let json = r#"{"size": 224, "crop_size": 224, "image_mean": [0.48, 0.45, 0.40],
            "image_std": [0.26, 0.26, 0.27], "resample": 3}"#;
        let crop = Preprocessing::from_json(json).unwrap();
        let no_crop = Preprocessing {
            do_center_crop: false,
            ..crop.clone()
        };
        // Landscape, portrait, already square at the size, smaller than the crop.
        for (w, h) in [(320, 240), (181, 403), (224, 224), (100, 150)] {
            let img = RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([(x * 7 + y) as u8, (x ^ y) as u8, (y * 3) as u8])
            });
            for p in [&crop, &no_crop] {
                // The straightforward way: copy the crop out, then index every value.
                let (resized, left, top) = p.resize_and_crop(&img);
                let (oh, ow) = p.output_hw();
                let window = image::imageops::crop_imm(&*resized, left, top, ow, oh).to_image();
                let mut want = Array3::<f32>::zeros((3, oh as usize, ow as usize));
                for (x, y, px) in window.enumerate_pixels() {
                    for c in 0..3 {
                        want[[c, y as usize, x as usize]] =
                            (px[c] as f32 * p.rescale_factor - p.mean[c]) / p.std[c];
                    }
                }
                let got = p.to_tensor(&img);
                assert_eq!(got.shape(), &[3, oh as usize, ow as usize]);
                assert!(got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }

    #[test]
    fn parses_both_hf_size_styles() {
        let new = r#"{"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3}"#;
        let old = r#"{"size": 224, "crop_size": 224, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5]}"#;
        let a = Preprocessing::from_json(new).unwrap();
        let b = Preprocessing::from_json(old).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.output_hw(), (224, 224));
        assert!(Preprocessing::from_json(r#"{"image_std": [0, 1, 1]}"#).is_err());
        assert!(Preprocessing::from_json("not json").is_err());
    }

    /// No encoder here writes arithmetic coding, so a real baseline JPEG's frame marker
    /// (SOF0) is changed to SOF9 (extended sequential, arithmetic): the decoder must say
    /// "unsupported" (415), not "corrupt" (400).
    #[test]
    fn arithmetic_coded_jpeg_is_unsupported_not_corrupt() {
        use image::ImageEncoder;
        let img = RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 4, y as u8 * 5, 90]));
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
            .write_image(&img, 64, 48, image::ExtendedColorType::Rgb8)
            .unwrap();
        assert!(decode(&jpeg, DecodeLimits::default()).is_ok());
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        jpeg[sof + 1] = 0xC9;
        let e = decode(&jpeg, DecodeLimits::default()).unwrap_err();
        assert!(matches!(e, ImageError::UnsupportedFeature(_)), "{e:?}");
        assert!(e.to_string().contains("Arithmetic"), "{e}");
        let status = crate::error::AppError::Image(e).status();
        assert_eq!(status, axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    #[test]
    fn transparent_pixels_become_white() {
        let mut img = image::RgbaImage::new(2, 1);
        img.put_pixel(0, 0, image::Rgba([0, 0, 0, 0]));
        img.put_pixel(1, 0, image::Rgba([10, 20, 30, 255]));
        let rgb = flatten_to_rgb(DynamicImage::ImageRgba8(img));
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(rgb.get_pixel(1, 0).0, [10, 20, 30]);
    }
}
