//! Hostile and unusual images: every format users send decodes upright and embeds like the
//! same photo as a plain JPEG; unsupported, corrupt and oversized data gets a typed error
//! (and over HTTP a 4xx with a `detail`); decompression bombs are refused from the header;
//! a decode that takes too long is answered without waiting for it.
//!
//! Most files under `tests/fixtures/images/` were written by Pillow (libjpeg, libpng,
//! libwebp, giflib-style GIF writer), i.e. by other encoders than the `image` crate that
//! decodes them; `generate.py` there remakes them. All are the same 192x128 cat photo
//! (`chelsea.png`, lossless) unless named otherwise.

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::app::TestApp;
use common::*;
use image::{DynamicImage, ImageEncoder, RgbImage, RgbaImage};
use search_img::encoder::{decode, DecodeLimits, Encoder, EncoderOptions};
use search_img::error::ImageError;

const W: u32 = 192;
const H: u32 = 128;

fn fixture(name: &str) -> Vec<u8> {
    let p = root().join("tests/fixtures/images").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The lossless source of every fixture.
fn cat() -> RgbImage {
    image::load_from_memory(&fixture("chelsea.png"))
        .unwrap()
        .into_rgb8()
}

fn limits() -> DecodeLimits {
    DecodeLimits::default()
}

/// Mean absolute difference per channel, 0..255.
fn mad(a: &RgbImage, b: &RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let sum: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| (*x as i32 - *y as i32).unsigned_abs() as u64)
        .sum();
    sum as f64 / a.as_raw().len() as f64
}

fn decode_ok(name: &str, bytes: &[u8]) -> RgbImage {
    decode(bytes, limits()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The model, loaded once for the whole binary.
fn encoder() -> &'static Encoder {
    static ENC: OnceLock<Encoder> = OnceLock::new();
    ENC.get_or_init(|| {
        Encoder::load(&EncoderOptions::new(model("efficientnet-lite0"))).expect("model loads")
    })
}

fn embed(bytes: &[u8]) -> Vec<f32> {
    encoder().embed_bytes(bytes).unwrap()
}

/// Every supported variant, as (name, bytes, how close its pixels must be to the source).
/// The bound is the mean absolute difference per channel; lossy and palette formats get
/// more room, but far less than another photo would give (about 50).
fn variants() -> Vec<(String, Vec<u8>, f64)> {
    let cat = cat();
    let rgba = DynamicImage::ImageRgb8(cat.clone()).into_rgba8();
    let mut v: Vec<(String, Vec<u8>, f64)> = [
        ("baseline.jpg", 4.0),
        ("baseline-444.jpg", 4.0),
        ("progressive.jpg", 4.0),
        ("restart-markers.jpg", 4.0),
        ("cmyk.jpg", 5.0),
        ("exif6.jpg", 4.0),
        ("exif6.png", 0.5),
        ("exif6.webp", 6.0),
        ("palette.png", 4.0),
        ("lossy.webp", 6.0),
        ("lossless.webp", 0.5),
        ("animated.webp", 6.0),
        ("animated.gif", 4.0),
        ("rgb24.bmp", 0.5),
        ("palette8.bmp", 4.0),
    ]
    .into_iter()
    .map(|(n, tol)| (n.to_string(), fixture(n), tol))
    .collect();
    // Made here with the `image` crate's encoders: bit depths and channel layouts.
    let dynamic = |img: DynamicImage| encode(&img, image::ImageFormat::Png);
    v.push((
        "rgb8.png".into(),
        dynamic(DynamicImage::ImageRgb8(cat.clone())),
        0.5,
    ));
    v.push((
        "rgb16.png".into(),
        dynamic(DynamicImage::ImageRgb8(cat.clone()).into_rgb16().into()),
        0.5,
    ));
    v.push((
        "rgba16.png".into(),
        dynamic(DynamicImage::ImageRgba8(rgba.clone()).into_rgba16().into()),
        0.5,
    ));
    v.push((
        "rgba8.png".into(),
        dynamic(DynamicImage::ImageRgba8(rgba.clone())),
        0.5,
    ));
    v.push((
        "rgb.bmp".into(),
        encode(
            &DynamicImage::ImageRgb8(cat.clone()),
            image::ImageFormat::Bmp,
        ),
        0.5,
    ));
    v.push((
        "rgba.bmp".into(),
        encode(
            &DynamicImage::ImageRgba8(rgba.clone()),
            image::ImageFormat::Bmp,
        ),
        0.5,
    ));
    v.push((
        "lossless-rgba.webp".into(),
        encode(&DynamicImage::ImageRgba8(rgba), image::ImageFormat::WebP),
        0.5,
    ));
    v.push(("jpeg-q95.jpg".into(), jpeg(&cat, 95), 3.0));
    v
}

fn encode(img: &DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

#[test]
fn every_supported_variant_decodes_upright_and_true_to_colour() {
    let cat = cat();
    for (name, bytes, tol) in variants() {
        let img = decode_ok(&name, &bytes);
        assert_eq!(img.dimensions(), (W, H), "{name}: upright, full size");
        let d = mad(&img, &cat);
        assert!(
            d <= tol,
            "{name}: differs from the source by {d:.2} (> {tol})"
        );
    }
    // The yardstick: another photo is far away.
    let cup = image::imageops::resize(
        &photo("coffee.png"),
        W,
        H,
        image::imageops::FilterType::Lanczos3,
    );
    assert!(mad(&cup, &cat) > 30.0);
}

#[test]
fn grey_images_decode_to_grey_rgb() {
    let cat = cat();
    let grey = DynamicImage::ImageRgb8(cat.clone()).into_luma8();
    let grey_rgb = DynamicImage::ImageLuma8(grey.clone()).into_rgb8();
    let cases: Vec<(&str, Vec<u8>, f64)> = vec![
        ("gray.jpg (libjpeg)", fixture("gray.jpg"), 4.0),
        (
            "L8.png",
            encode(
                &DynamicImage::ImageLuma8(grey.clone()),
                image::ImageFormat::Png,
            ),
            0.5,
        ),
        (
            "L16.png",
            encode(
                &DynamicImage::ImageLuma8(grey.clone()).into_luma16().into(),
                image::ImageFormat::Png,
            ),
            0.5,
        ),
        (
            "LA8.png",
            encode(
                &DynamicImage::ImageLuma8(grey.clone())
                    .into_luma_alpha8()
                    .into(),
                image::ImageFormat::Png,
            ),
            0.5,
        ),
        (
            "LA16.png",
            encode(
                &DynamicImage::ImageLuma8(grey).into_luma_alpha16().into(),
                image::ImageFormat::Png,
            ),
            0.5,
        ),
    ];
    for (name, bytes, tol) in cases {
        let img = decode_ok(name, &bytes);
        assert!(
            img.pixels().all(|p| p[0] == p[1] && p[1] == p[2]),
            "{name}: grey stays grey"
        );
        let d = mad(&img, &grey_rgb);
        assert!(d <= tol, "{name}: {d:.2}");
    }
}

#[test]
fn transparent_pixels_are_composited_over_white() {
    // Top 8 rows transparent in both fixtures (palette tRNS entry, WebP alpha plane).
    for name in ["palette-trns.png", "alpha-lossy.webp"] {
        let img = decode_ok(name, &fixture(name));
        assert_eq!(img.dimensions(), (W, H));
        for x in 0..W {
            let p = img.get_pixel(x, 2).0;
            assert!(p.iter().all(|c| *c >= 250), "{name}: ({x},2) is {p:?}");
        }
        // The opaque middle is the photo.
        let mid = img.get_pixel(W / 2, H / 2).0;
        assert!(mid.iter().any(|c| *c < 240), "{name}: {mid:?}");
    }
    // Half-transparent black over white is mid grey, in 8 and 16 bits.
    let half = RgbaImage::from_pixel(4, 4, image::Rgba([0, 0, 0, 128]));
    for img in [
        DynamicImage::ImageRgba8(half.clone()),
        DynamicImage::ImageRgba8(half).into_rgba16().into(),
    ] {
        let out = decode_ok("half", &encode(&img, image::ImageFormat::Png));
        let p = out.get_pixel(1, 1).0;
        assert!(p.iter().all(|c| (125..=129).contains(c)), "{p:?}");
    }
    // A GIF frame with a transparent colour.
    let mut frame = RgbaImage::from_pixel(8, 8, image::Rgba([200, 0, 0, 255]));
    frame.put_pixel(0, 0, image::Rgba([0, 0, 0, 0]));
    let gif = gif_frames(&[frame]);
    let out = decode_ok("transparent.gif", &gif);
    assert_eq!(out.get_pixel(0, 0).0, [255, 255, 255]);
    assert_eq!(out.get_pixel(3, 3).0, [200, 0, 0]);
}

fn gif_frames(frames: &[RgbaImage]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = image::codecs::gif::GifEncoder::new(&mut out);
        enc.encode_frames(
            frames
                .iter()
                .map(|f| image::Frame::new(f.clone()))
                .collect::<Vec<_>>(),
        )
        .unwrap();
    }
    out
}

#[test]
fn animations_give_their_first_frame() {
    let red = RgbaImage::from_pixel(16, 16, image::Rgba([255, 0, 0, 255]));
    let blue = RgbaImage::from_pixel(16, 16, image::Rgba([0, 0, 255, 255]));
    let gif = gif_frames(&[red.clone(), blue.clone(), blue]);
    assert_eq!(decode_ok("gif", &gif).get_pixel(8, 8).0, [255, 0, 0]);
    // The fixtures: frame 1 is the cat, frame 2 a coffee cup (checked in the colour test
    // too); here the cup must not leak in at all.
    for name in ["animated.gif", "animated.webp"] {
        let img = decode_ok(name, &fixture(name));
        let d = mad(&img, &cat());
        assert!(d < 7.0, "{name}: {d:.2}");
    }
}

/// A minimal EXIF block (TIFF header + one IFD) holding only Orientation.
fn exif_orientation(orientation: u16, big_endian: bool) -> Vec<u8> {
    let u16b = |v: u16| {
        if big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    let u32b = |v: u32| {
        if big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    [
        &(if big_endian { *b"MM\0*" } else { *b"II*\0" })[..],
        &u32b(8),
        &u16b(1),
        &u16b(0x0112),
        &u16b(3),
        &u32b(1),
        &u16b(orientation),
        &[0, 0],
        &u32b(0),
    ]
    .concat()
}

/// What a camera stores for an upright scene when it writes `orientation` (EXIF 2.3: the
/// transform that turns the stored pixels upright is the inverse of this one).
fn stored_for(upright: &RgbImage, orientation: u16) -> RgbImage {
    use image::imageops::*;
    match orientation {
        1 => upright.clone(),
        2 => flip_horizontal(upright),
        3 => rotate180(upright),
        4 => flip_vertical(upright),
        // Transpose: mirror about the top-left to bottom-right diagonal (its own inverse).
        5 => flip_horizontal(&rotate90(upright)),
        // Displayed after a 90 degree clockwise turn, so stored turned counter-clockwise.
        6 => rotate270(upright),
        // Transverse: mirror about the other diagonal (its own inverse).
        7 => flip_horizontal(&rotate270(upright)),
        8 => rotate90(upright),
        _ => unreachable!(),
    }
}

#[test]
fn all_eight_exif_orientations_come_out_upright() {
    let cat = cat();
    for big_endian in [false, true] {
        for o in 1..=8u16 {
            let stored = stored_for(&cat, o);
            let mut bytes = Vec::new();
            let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 95);
            enc.set_exif_metadata(exif_orientation(o, big_endian))
                .unwrap();
            enc.write_image(
                &stored,
                stored.width(),
                stored.height(),
                image::ExtendedColorType::Rgb8,
            )
            .unwrap();
            let img = decode_ok(&format!("orientation {o}"), &bytes);
            assert_eq!(img.dimensions(), (W, H), "orientation {o}");
            let d = mad(&img, &cat);
            assert!(d < 3.0, "orientation {o} (big endian {big_endian}): {d:.2}");
        }
    }
    // Nonsense orientation values are ignored rather than fatal.
    for o in [0u16, 9, 0xFFFF] {
        let mut bytes = Vec::new();
        let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 95);
        enc.set_exif_metadata(exif_orientation(o, false)).unwrap();
        enc.write_image(&cat, W, H, image::ExtendedColorType::Rgb8)
            .unwrap();
        assert_eq!(decode_ok("bad orientation", &bytes).dimensions(), (W, H));
    }
}

#[test]
fn every_variant_embeds_like_the_plain_jpeg() {
    let reference = embed(&jpeg(&cat(), 90));
    let cup = embed(&jpeg(&photo("coffee.png"), 90));
    let stranger = cosine(&reference, &cup);
    let mut lines = Vec::new();
    for (name, bytes, _) in variants() {
        let v = embed(&bytes);
        let sim = cosine(&v, &reference);
        lines.push(format!("{name}: {sim:.4}"));
        assert!(sim > 0.95, "{name}: cosine {sim:.4} with the plain JPEG");
        assert!(cosine(&v, &cup) < sim - 0.2, "{name} looks like the cup");
    }
    assert!(stranger < 0.75, "cat vs cup {stranger:.4}");
    println!("cosine with the plain JPEG: {}", lines.join(", "));
}

#[test]
fn unsupported_formats_are_refused_as_such() {
    let unsupported: Vec<(&str, Vec<u8>)> = vec![
        ("tiff", fixture("unsupported.tiff")),
        ("avif", fixture("unsupported.avif")),
        (
            "svg",
            br#"<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>"#.to_vec(),
        ),
        ("svg no prolog", br#"<svg xmlns="http://www.w3.org/2000/svg"/>"#.to_vec()),
        (
            "html",
            b"<!DOCTYPE html><html><body><img src=x></body></html>".to_vec(),
        ),
        ("pdf", b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n%%EOF".to_vec()),
        ("json", br#"{"detail": "Not Found"}"#.to_vec()),
        ("zip", b"PK\x03\x04\x14\x00\x00\x00\x08\x00".to_vec()),
        ("zeros", vec![0u8; 4096]),
        ("one byte", vec![0xFF]),
        // Formats the `image` crate knows but this build does not decode.
        ("ico", b"\0\0\x01\0\x01\0\x10\x10\0\0\x01\0\x20\0\x68\x04\0\0\x16\0\0\0".to_vec()),
        ("qoi", b"qoif\0\0\0\x10\0\0\0\x10\x04\0".to_vec()),
        ("pnm", b"P6\n16 16\n255\n".to_vec()),
        ("hdr", b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 4 +X 4\n".to_vec()),
    ];
    for (name, bytes) in unsupported {
        match decode(&bytes, limits()) {
            Err(ImageError::UnsupportedFormat) => {}
            other => panic!("{name}: {:?}", other.map(|i| i.dimensions())),
        }
    }
    assert!(matches!(decode(b"", limits()), Err(ImageError::Empty)));
}

/// Cuts of each format at a few places: a typed error every time, never a panic, never a
/// grey-filled "success" for a JPEG cut in its pixel data.
#[test]
fn truncated_and_corrupt_files_are_errors() {
    let cat = cat();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("baseline.jpg", fixture("baseline.jpg")),
        ("progressive.jpg", fixture("progressive.jpg")),
        ("cmyk.jpg", fixture("cmyk.jpg")),
        ("png", fixture("chelsea.png")),
        ("palette.png", fixture("palette.png")),
        ("lossy.webp", fixture("lossy.webp")),
        ("lossless.webp", fixture("lossless.webp")),
        ("animated.gif", fixture("animated.gif")),
        ("rgb24.bmp", fixture("rgb24.bmp")),
        ("palette8.bmp", fixture("palette8.bmp")),
        (
            "rgb16.png",
            encode(
                &DynamicImage::ImageRgb8(cat).into_rgb16().into(),
                image::ImageFormat::Png,
            ),
        ),
    ];
    for (name, bytes) in &files {
        for cut in [
            8,
            20,
            40,
            bytes.len() / 4,
            bytes.len() / 2,
            bytes.len() - 40,
        ] {
            if *name == "animated.gif" && cut > bytes.len() / 2 {
                continue; // the cut is in the second frame; the first one is whole
            }
            match decode(&bytes[..cut], limits()) {
                Err(ImageError::Corrupt(_)) | Err(ImageError::UnsupportedFormat) => {}
                Err(e) => panic!("{name} cut at {cut}: unexpected {e:?}"),
                Ok(img) => panic!(
                    "{name} cut at {cut}/{}: decoded {:?}",
                    bytes.len(),
                    img.dimensions()
                ),
            }
        }
        // Flipped bytes in the middle: an error or some image, never a panic.
        let mut bad = bytes.clone();
        for i in (bad.len() / 3..bad.len() * 2 / 3).step_by(97) {
            bad[i] ^= 0x5A;
        }
        let _ = decode(&bad, limits());
    }
    // The same bytes over the HTTP-facing error: not a server fault.
    let e = decode(&fixture("baseline.jpg")[..3000], limits()).unwrap_err();
    let app_err = search_img::error::AppError::from(e);
    assert_eq!(app_err.status(), 400);
    assert!(
        app_err.detail().contains("truncated"),
        "{}",
        app_err.detail()
    );
}

// ---------------------------------------------------------------- decompression bombs

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut c = (data.len() as u32).to_be_bytes().to_vec();
    c.extend_from_slice(kind);
    c.extend_from_slice(data);
    let crc = crc32(&c[4..]);
    c.extend_from_slice(&crc.to_be_bytes());
    c
}

/// A zlib stream of `n` zero bytes in fixed-Huffman deflate: a literal, then runs of
/// 258 at distance 1 (13 bits each), so 64 MB take about 400 KB.
fn zlib_zeros(n: usize) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        acc: u64,
        len: u32,
    }
    impl Bits {
        /// A Huffman code, most significant bit first.
        fn code(&mut self, code: u32, len: u32) {
            for i in (0..len).rev() {
                self.raw((code >> i) & 1, 1);
            }
        }
        /// A plain field, least significant bit first.
        fn raw(&mut self, v: u32, len: u32) {
            self.acc |= (v as u64) << self.len;
            self.len += len;
            while self.len >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.len -= 8;
            }
        }
    }
    let mut b = Bits {
        out: vec![0x78, 0x01],
        acc: 0,
        len: 0,
    };
    b.raw(1, 1); // final block
    b.raw(1, 2); // fixed Huffman codes
    let literal_zero = |b: &mut Bits| b.code(0x30, 8);
    let mut left = n;
    if left > 0 {
        literal_zero(&mut b);
        left -= 1;
    }
    while left >= 258 {
        b.code(0xC5, 8); // length 258 (code 285)
        b.code(0, 5); // distance 1
        left -= 258;
    }
    for _ in 0..left {
        literal_zero(&mut b);
    }
    b.code(0, 7); // end of block
    if b.len > 0 {
        b.out.push(b.acc as u8);
    }
    let adler = (((n % 65_521) as u32) << 16) | 1;
    b.out.extend_from_slice(&adler.to_be_bytes());
    b.out
}

fn png_with_ihdr(width: u32, height: u32, bit_depth: u8, color: u8, idat: &[u8]) -> Vec<u8> {
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[bit_depth, color, 0, 0, 0]);
    [
        &b"\x89PNG\r\n\x1a\n"[..],
        &png_chunk(b"IHDR", &ihdr),
        &png_chunk(b"IDAT", idat),
        &png_chunk(b"IEND", b""),
    ]
    .concat()
}

/// Overwrites the dimensions in a JPEG's frame header (SOF0..SOF2).
fn jpeg_with_dims(mut bytes: Vec<u8>, width: u16, height: u16) -> Vec<u8> {
    let mut i = 2;
    loop {
        assert_eq!(bytes[i], 0xFF);
        let marker = bytes[i + 1];
        let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
        if (0xC0..=0xC2).contains(&marker) {
            bytes[i + 5..i + 7].copy_from_slice(&height.to_be_bytes());
            bytes[i + 7..i + 9].copy_from_slice(&width.to_be_bytes());
            return bytes;
        }
        i += 2 + len;
    }
}

/// A lossless WebP whose VP8L header declares `width` x `height` (at most 16384 each).
fn webp_vp8l_with_dims(width: u32, height: u32) -> Vec<u8> {
    let mut b = fixture("lossless.webp");
    let at = b.windows(4).position(|w| w == b"VP8L").unwrap() + 8;
    assert_eq!(b[at], 0x2F);
    let packed = (width - 1) | ((height - 1) << 14) | (u32::from(b[at + 4] >> 4) << 28);
    b[at + 1..at + 5].copy_from_slice(&packed.to_le_bytes());
    b
}

/// A lossy WebP whose VP8 frame header declares `width` x `height` (at most 16383 each).
fn webp_vp8_with_dims(width: u16, height: u16) -> Vec<u8> {
    let mut b = fixture("lossy.webp");
    let at = b.windows(4).position(|w| w == b"VP8 ").unwrap() + 8;
    // 3-byte frame tag, then the start code 9d 01 2a, then 14-bit width and height.
    assert_eq!(&b[at + 3..at + 6], b"\x9d\x01\x2a");
    b[at + 6..at + 8].copy_from_slice(&width.to_le_bytes());
    b[at + 8..at + 10].copy_from_slice(&height.to_le_bytes());
    b
}

/// An extended WebP (VP8X) whose canvas is `width` x `height` (24-bit each).
fn webp_vp8x_canvas(width: u32, height: u32) -> Vec<u8> {
    let mut b = fixture("animated.webp");
    let at = b.windows(4).position(|w| w == b"VP8X").unwrap() + 8;
    b[at + 4..at + 7].copy_from_slice(&(width - 1).to_le_bytes()[..3]);
    b[at + 7..at + 10].copy_from_slice(&(height - 1).to_le_bytes()[..3]);
    b
}

fn gif_with_screen(width: u16, height: u16) -> Vec<u8> {
    let mut b = fixture("animated.gif");
    b[6..8].copy_from_slice(&width.to_le_bytes());
    b[8..10].copy_from_slice(&height.to_le_bytes());
    b
}

fn bmp_with_dims(width: i32, height: i32) -> Vec<u8> {
    let mut b = fixture("rgb24.bmp");
    b[18..22].copy_from_slice(&width.to_le_bytes());
    b[22..26].copy_from_slice(&height.to_le_bytes());
    b
}

/// Every format with header dimensions far over the cap: refused from the header, at once
/// and without allocating for the pixels.
#[test]
fn bombs_are_refused_from_the_header_in_every_format() {
    let bombs: Vec<(&str, Vec<u8>, (u32, u32))> = vec![
        (
            "png 100000^2",
            png_with_ihdr(100_000, 100_000, 8, 2, &zlib_zeros(1000)),
            (100_000, 100_000),
        ),
        (
            "png 2^31-1 x 1",
            png_with_ihdr(0x7FFF_FFFF, 1, 16, 6, &zlib_zeros(1000)),
            (0x7FFF_FFFF, 1),
        ),
        (
            "jpeg baseline 65500^2",
            jpeg_with_dims(fixture("baseline.jpg"), 65_500, 65_500),
            (65_500, 65_500),
        ),
        (
            "jpeg progressive 65535^2",
            jpeg_with_dims(fixture("progressive.jpg"), 65_535, 65_535),
            (65_535, 65_535),
        ),
        (
            "jpeg cmyk 30000^2",
            jpeg_with_dims(fixture("cmyk.jpg"), 30_000, 30_000),
            (30_000, 30_000),
        ),
        (
            "webp lossless 16000^2",
            webp_vp8l_with_dims(16_000, 16_000),
            (16_000, 16_000),
        ),
        // image-webp 0.2.4 reads 16384 as 0 (`(1 + header) & 0x3FFF`): refused as empty.
        (
            "webp lossless 16384^2",
            webp_vp8l_with_dims(16_384, 16_384),
            (16_384, 16_384),
        ),
        (
            "webp lossy 16383^2",
            webp_vp8_with_dims(16_383, 16_383),
            (16_383, 16_383),
        ),
        (
            "webp canvas 2^24 x 2^24",
            webp_vp8x_canvas(1 << 24, 1 << 24),
            (1 << 24, 1 << 24),
        ),
        (
            "gif 65535^2",
            gif_with_screen(65_535, 65_535),
            (65_535, 65_535),
        ),
        (
            "bmp 100000^2",
            bmp_with_dims(100_000, 100_000),
            (100_000, 100_000),
        ),
        (
            "bmp top-down 100000^2",
            bmp_with_dims(100_000, -100_000),
            (100_000, 100_000),
        ),
    ];
    for (name, bytes, dims) in bombs {
        let t = Instant::now();
        match decode(&bytes, limits()) {
            Err(ImageError::TooManyPixels {
                width,
                height,
                limit,
            }) => {
                assert_eq!((width, height), dims, "{name}");
                assert_eq!(limit, limits().max_pixels);
            }
            // Some decoders reject absurd headers themselves before we ask: fine too, as
            // long as it is a client error and quick.
            Err(ImageError::Corrupt(reason)) => {
                println!("{name}: refused by the decoder: {reason}")
            }
            other => panic!("{name}: {:?}", other.map(|i| i.dimensions())),
        }
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{name}: {:?}",
            t.elapsed()
        );
    }
    // Just over the cap (a tighter one) in each format; just under it decodes.
    let tight = DecodeLimits {
        max_pixels: W as u64 * H as u64 - 1,
        ..limits()
    };
    for (name, bytes, _) in variants() {
        assert!(
            matches!(decode(&bytes, tight), Err(ImageError::TooManyPixels { .. })),
            "{name} over a tight cap"
        );
    }
    let exact = DecodeLimits {
        max_pixels: W as u64 * H as u64,
        ..limits()
    };
    assert!(decode(&fixture("baseline.jpg"), exact).is_ok());
}

/// Generous in unoptimised test builds (`cargo test` is about 40 times slower than
/// release on the decoders); these are bounds against hangs, not benchmarks.
fn quick() -> Duration {
    if cfg!(debug_assertions) {
        Duration::from_secs(30)
    } else {
        Duration::from_secs(1)
    }
}

/// Bombs that pass the header check: small files whose content inflates far beyond their
/// size. The caps bound the work: quick, with an image or an error, and never an
/// allocation of what the payload claims.
#[test]
fn compressed_payload_bombs_stay_bounded() {
    // 1x1 PNG whose IDAT inflates to 64 MB of zeros (the decoder needs 2 bytes of it).
    let zeros = zlib_zeros(64 << 20);
    assert!(zeros.len() < 500_000, "{}", zeros.len());
    let t = Instant::now();
    let r = decode(&png_with_ihdr(1, 1, 8, 0, &zeros), limits());
    println!(
        "1x1 png with 64 MB IDAT: {:?} in {:?}",
        r.as_ref().map(|i| i.dimensions()),
        t.elapsed()
    );
    assert!(t.elapsed() < quick());

    // 16-bit RGBA takes 8 bytes a pixel: held to the pixel cap's cost in 8-bit RGBA, so
    // at the pixel cap it is refused (with the cap that applies to it), and at half of it
    // it decodes. A smaller cap than the default keeps the unoptimised test quick (the
    // default-cap decodes take about 0.4 s in a release build).
    let cap = DecodeLimits {
        max_pixels: 1 << 20,
        ..limits()
    };
    let rgba16 = |w: u32, h: u32| {
        let row = 1 + w as usize * 8;
        png_with_ihdr(w, h, 16, 6, &zlib_zeros(row * h as usize))
    };
    match decode(&rgba16(1024, 1024), cap) {
        Err(ImageError::TooManyPixels {
            width: 1024,
            height: 1024,
            limit,
        }) => {
            assert_eq!(limit, 1 << 19)
        }
        other => panic!("{:?}", other.map(|i| i.dimensions())),
    }
    let t = Instant::now();
    let img = decode(&rgba16(1024, 512), cap).expect("within the budget");
    assert_eq!(img.dimensions(), (1024, 512));
    assert_eq!(
        img.get_pixel(100, 100).0,
        [255, 255, 255],
        "transparent over white"
    );
    // 8-bit RGBA at the full cap: the largest legal decode.
    let row = 1 + 1024 * 4;
    let img = decode(
        &png_with_ihdr(1024, 1024, 8, 6, &zlib_zeros(row * 1024)),
        cap,
    )
    .expect("at the cap");
    assert_eq!(img.dimensions(), (1024, 1024));
    println!(
        "1024^2 rgba16 refused, 1024x512 rgba16 and 1024^2 rgba8 decoded in {:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < quick() * 2);

    // Compressed ancillary chunks that inflate to 64 MB each: zTXt is kept compressed;
    // the ICC profile is inflated eagerly, within the decoder's memory budget...
    let chunk_bomb = |kind: &[u8; 4], payload: &[u8]| {
        let mut png_bytes = png_with_ihdr(4, 4, 8, 2, &zlib_zeros(4 * 13));
        png_bytes.splice(33..33, png_chunk(kind, payload)); // after signature and IHDR
        png_bytes
    };
    for (name, bytes) in [
        (
            "zTXt",
            chunk_bomb(b"zTXt", &[&b"Comment\0\0"[..], &zeros].concat()),
        ),
        (
            "iTXt",
            chunk_bomb(b"iTXt", &[&b"Comment\0\x01\0\0\0"[..], &zeros].concat()),
        ),
        (
            "iCCP",
            chunk_bomb(b"iCCP", &[&b"icc\0\0"[..], &zeros].concat()),
        ),
    ] {
        let t = Instant::now();
        let r = decode(&bytes, limits());
        println!(
            "png with a 64 MB {name}: {:?} in {:?}",
            r.as_ref().map(|i| i.dimensions()),
            t.elapsed()
        );
        assert!(t.elapsed() < quick(), "{name}");
    }
    // ...and past it, dropped: the PNG decoder stops inflating at the budget and ignores
    // the profile (which we never use), so memory and time stay bounded.
    let big_icc = [&b"icc\0\0"[..], &zlib_zeros(200 << 20)].concat();
    let t = Instant::now();
    let img = decode(&chunk_bomb(b"iCCP", &big_icc), limits()).expect("profile ignored");
    assert_eq!(img.dimensions(), (4, 4));
    assert!(t.elapsed() < quick(), "{:?}", t.elapsed());

    // A chunk that claims 2 GB in a small file.
    let mut lying = fixture("chelsea.png");
    lying[33..37].copy_from_slice(&0x7FFF_FFF0u32.to_be_bytes());
    assert!(decode(&lying, limits()).is_err());

    // A GIF whose logical screen is small but whose first frame claims 65535x65535.
    let mut gif = gif_frames(&[RgbaImage::from_pixel(8, 8, image::Rgba([1, 2, 3, 255]))]);
    let desc = gif.iter().position(|b| *b == 0x2C).unwrap();
    gif[desc + 5..desc + 7].copy_from_slice(&65_535u16.to_le_bytes());
    gif[desc + 7..desc + 9].copy_from_slice(&65_535u16.to_le_bytes());
    let t = Instant::now();
    let r = decode(&gif, limits());
    println!(
        "gif with a huge frame: {:?} in {:?}",
        r.as_ref().map(|i| i.dimensions()),
        t.elapsed()
    );
    assert!(r.is_err() || r.unwrap().dimensions() == (8, 8));
    assert!(t.elapsed() < Duration::from_secs(2));
}

/// Extreme aspect ratios within the pixel cap (found by the fuzzer: a 16 x 9496 JPEG
/// took 14 s; a 1 x 16-million strip would have asked for terabytes and aborted the
/// process): the preprocessing work is bounded by the output, not by the aspect ratio.
#[test]
fn extreme_aspect_ratios_preprocess_quickly_and_sensibly() {
    let prep = encoder().preprocessing().clone();
    let strip = |w: u32, h: u32| {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
        })
    };
    for (w, h) in [
        (1, 1_000_000),
        (1_000_000, 1),
        (16, 9_496),
        (9_496, 16),
        (2, 500_000),
        (1, 1),
        (3, 1),
    ] {
        let t = Instant::now();
        let tensor = prep.to_tensor(&strip(w, h));
        assert_eq!(tensor.shape(), &[3, 224, 224], "{w}x{h}");
        assert!(tensor.iter().all(|v| v.is_finite()), "{w}x{h}");
        assert!(t.elapsed() < quick(), "{w}x{h}: {:?}", t.elapsed());
    }
    // Just past the threshold the shortcut keeps what resize-then-crop keeps.
    let img = image::imageops::resize(&cat(), 20 * 112, 112, image::imageops::FilterType::Triangle);
    let fast = prep.to_tensor(&img);
    let big = image::imageops::resize(&img, 20 * 224, 224, image::imageops::FilterType::CatmullRom);
    let reference = image::imageops::crop_imm(&big, (20 * 224 - 224) / 2, 0, 224, 224).to_image();
    let mut diff = 0.0f64;
    for (x, y, p) in reference.enumerate_pixels() {
        for c in 0..3 {
            let want = (p[c] as f32 / 255.0 - 0.498) / 0.502;
            diff += (fast[[c, y as usize, x as usize]] - want).abs() as f64;
        }
    }
    let mean = diff / (224.0 * 224.0 * 3.0);
    assert!(mean < 0.02, "mean difference {mean:.4}");
    // Through the whole path: a decoded 1 x 500000 PNG strip.
    let t = Instant::now();
    let png_strip = png_with_ihdr(1, 500_000, 8, 0, &zlib_zeros(2 * 500_000));
    let tensor = encoder().prepare(&png_strip).expect("a strip is an image");
    assert_eq!(tensor.shape(), &[3, 224, 224]);
    assert!(t.elapsed() < quick() * 2, "{:?}", t.elapsed());
}

/// The fuzzer's committed seeds, including inputs it once found slow or crashing
/// (`regress-*`), through the fuzz target's path on every test run: decode, then
/// preprocess; an error is fine, a panic or a slow input is not.
#[test]
fn fuzz_seeds_and_past_findings_stay_harmless() {
    let dir = root().join("fuzz/seeds/decode");
    let prep = encoder().preprocessing().clone();
    let fuzz_limits = DecodeLimits {
        max_bytes: 1 << 20,
        max_pixels: 1 << 20,
    };
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "py") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let t = Instant::now();
        if let Ok(img) = decode(&bytes, fuzz_limits) {
            assert_eq!(prep.to_tensor(&img).shape(), &[3, 224, 224]);
        }
        assert!(
            t.elapsed() < quick(),
            "{}: {:?}",
            path.display(),
            t.elapsed()
        );
        n += 1;
    }
    assert!(n >= 30, "only {n} seeds in {}", dir.display());
}

// ------------------------------------------------------------------- over HTTP

/// Every format, uploaded and by URL: the cat figurine comes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_finds_the_cat_over_http() {
    let app = TestApp::start(&[]).await;
    for (name, bytes, _) in variants() {
        let (code, body) = app
            .search_upload(bytes.clone(), "top_k=3&threshold=0.3")
            .await;
        assert_eq!(code, 200, "{name}: {body}");
        assert_eq!(
            app.names(&body).first().map(String::as_str),
            Some("Cat figurine"),
            "{name}: {body}"
        );
        // By URL too, served with a generic content type: the bytes decide.
        let path = format!("q/{name}");
        app.images
            .put_with_type(&path, bytes, "application/octet-stream");
        let (code, body) = app
            .search_url(&app.images.url(&path), "&top_k=1&threshold=0.3")
            .await;
        assert_eq!(code, 200, "{name} by URL: {body}");
        assert_eq!(app.names(&body), vec!["Cat figurine"], "{name} by URL");
    }
}

/// Unsupported -> 415, corrupt or bomb -> 400, oversized -> 413: each with a `detail`,
/// uploaded or fetched, and none of them reaches the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_images_get_client_errors_with_a_detail() {
    let app = TestApp::start(&[("MAX_IMAGE_BYTES", "200000")]).await;
    // Index the catalogue first, so the model-run count below is the queries' alone.
    let (code, _) = app.search_upload(fixture("baseline.jpg"), "").await;
    assert_eq!(code, 200);
    let runs = app.model_runs().await;
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "tiff",
            fixture("unsupported.tiff"),
            415,
            "unsupported image format",
        ),
        (
            "avif",
            fixture("unsupported.avif"),
            415,
            "unsupported image format",
        ),
        (
            "svg",
            br#"<svg xmlns="http://www.w3.org/2000/svg"/>"#.to_vec(),
            415,
            "unsupported",
        ),
        (
            "html",
            b"<!doctype html><title>404</title>".to_vec(),
            415,
            "unsupported",
        ),
        (
            "truncated jpeg",
            fixture("progressive.jpg")[..4000].to_vec(),
            400,
            "truncated",
        ),
        (
            "truncated png",
            fixture("chelsea.png")[..20_000].to_vec(),
            400,
            "could not be decoded",
        ),
        (
            "truncated webp",
            fixture("lossless.webp")[..10_000].to_vec(),
            400,
            "could not be decoded",
        ),
        (
            "png bomb",
            png_with_ihdr(100_000, 100_000, 8, 2, &zlib_zeros(100)),
            400,
            "pixels",
        ),
        (
            "jpeg bomb",
            jpeg_with_dims(fixture("baseline.jpg"), 65_000, 65_000),
            400,
            "pixels",
        ),
        ("gif bomb", gif_with_screen(65_535, 65_535), 400, "pixels"),
        (
            "webp bomb",
            webp_vp8x_canvas(100_000, 100_000),
            400,
            "decod",
        ),
        ("bmp bomb", bmp_with_dims(60_000, 60_000), 400, "pixels"),
        ("too large", vec![0xFF; 300_000], 413, "larger than"),
    ];
    for (name, bytes, want, detail) in cases {
        let (code, body) = app.search_upload(bytes.clone(), "").await;
        assert_eq!(code, want, "{name} uploaded: {body}");
        let text = body["detail"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: {body}"));
        assert!(text.contains(detail), "{name}: {text}");
        let path = format!("bad/{}", name.replace(' ', "-"));
        app.images.put(&path, bytes);
        let (code, body) = app.search_url(&app.images.url(&path), "").await;
        assert_eq!(code, want, "{name} by URL: {body}");
        assert!(body["detail"].is_string(), "{name} by URL: {body}");
    }
    let (code, body) = app.search_upload(Vec::new(), "").await;
    assert_eq!(code, 400, "{body}");
    assert!(body["detail"].is_string());
    assert_eq!(
        app.model_runs().await,
        runs,
        "no bad image reached the model"
    );
}

/// A decode past DECODE_TIMEOUT_SECS answers 400 at the deadline; the decode finishes in
/// the background holding its slot (DECODE_CONCURRENCY), a search meanwhile waits for the
/// slot and then works, and a product whose image is that slow is recorded as failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_decode_is_answered_at_its_deadline() {
    // A 4096x4096 RGBA PNG (the default pixel cap) from a 700 KB file: legal, and slow to
    // decode and resize next to the small photo of the one product (680 times fewer
    // pixels): about 0.5 s optimised, and the dev profile optimises the decoders and our
    // crate too (Cargo.toml), so one deadline fits both with room either side.
    let deadline = if cfg!(debug_assertions) { 0.1 } else { 0.05 };
    let deadline_s = deadline.to_string();
    let mongo = common::mongo::MongoServer::start().await;
    let images = common::images::ImageServer::start().await;
    let vars = common::app::test_vars(
        &mongo,
        &[
            ("DECODE_TIMEOUT_SECS", deadline_s.as_str()),
            ("DECODE_CONCURRENCY", "1"),
        ],
    );
    images.put("cat.jpg", fixture("baseline.jpg"));
    let products = mongo
        .client()
        .await
        .database("test")
        .collection::<mongodb::bson::Document>("products");
    products
        .insert_one(common::app::product_doc(
            "Cat figurine",
            &images.url("cat.jpg"),
        ))
        .await
        .unwrap();
    let app = TestApp::serve(mongo, images, vars, Default::default()).await;
    let (code, body) = app.search_upload(fixture("lossy.webp"), "top_k=1").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(app.names(&body), vec!["Cat figurine"]);

    let side = 4096u32;
    let slow = png_with_ihdr(
        side,
        side,
        8,
        6,
        &zlib_zeros((1 + side as usize * 4) * side as usize),
    );
    assert!(slow.len() < 1_000_000, "{}", slow.len());
    let t = Instant::now();
    let (code, body) = app.search_upload(slow.clone(), "").await;
    let answered = t.elapsed();
    assert_eq!(code, 400, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("took too long to decode"),
        "{body}"
    );
    assert!(
        answered >= Duration::from_secs_f64(deadline),
        "{answered:?}"
    );
    // Answered without waiting for the decode, which still holds its slot; a search
    // meanwhile waits for the slot and then works.
    assert_eq!(
        app.state.embedder().decode_slots_free(),
        0,
        "the decode still holds its slot"
    );
    let ((code, body), ended) =
        tokio::join!(app.search_upload(fixture("lossy.webp"), "top_k=1"), async {
            while app.state.embedder().decode_slots_free() == 0 {
                assert!(
                    t.elapsed() < Duration::from_secs(300),
                    "the decode never ended"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            t.elapsed()
        });
    assert_eq!(code, 200, "{body}");
    assert_eq!(app.names(&body), vec!["Cat figurine"]);
    println!("answered after {answered:?}; the slot was free again after {ended:?}");

    // A product whose photo is that slow: skipped and recorded as failed.
    app.images.put("slow.png", slow);
    app.products()
        .insert_one(common::app::product_doc(
            "Slow photo",
            &app.images.url("slow.png"),
        ))
        .await
        .unwrap();
    let (code, report) = app.refresh().await;
    assert_eq!(code, 200, "{report}");
    let status = app.status().await;
    assert_eq!(status["failed_products"], 1, "{status} {report}");
    assert_eq!(status["products_with_features"], 1, "{status}");
}
