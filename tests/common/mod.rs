//! Shared test helpers: where `make setup` put models and photos, and image builders.
#![allow(dead_code)]

use std::io::Cursor;
use std::path::PathBuf;

use image::{DynamicImage, ImageEncoder, RgbImage};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn model(name: &str) -> PathBuf {
    let p = root().join("models/out").join(name).join("model.onnx");
    assert!(p.is_file(), "{} missing: run `make setup`", p.display());
    p
}

pub fn data(rel: &str) -> PathBuf {
    let p = root().join(".tools/data").join(rel);
    assert!(p.is_file(), "{} missing: run `make setup`", p.display());
    p
}

pub fn photo_bytes(name: &str) -> Vec<u8> {
    std::fs::read(data(&format!("skimage/{name}"))).unwrap()
}

pub fn photo(name: &str) -> RgbImage {
    image::load_from_memory(&photo_bytes(name))
        .unwrap()
        .into_rgb8()
}

pub fn jpeg(img: &RgbImage, quality: u8) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .write_image(
            img,
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
    out
}

pub fn png(img: &DynamicImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A JPEG whose pixels are stored rotated, with the EXIF orientation that turns them
/// upright again (orientation 6: rotate 90 degrees clockwise to display).
pub fn jpeg_with_exif_rotation(upright: &RgbImage, quality: u8) -> Vec<u8> {
    let stored = image::imageops::rotate270(upright);
    // Little-endian TIFF header, one IFD with one entry: Orientation (0x0112) = 6.
    let tiff: Vec<u8> = [
        &b"II*\0"[..],
        &8u32.to_le_bytes(),
        &1u16.to_le_bytes(),
        &0x0112u16.to_le_bytes(),
        &3u16.to_le_bytes(),
        &1u32.to_le_bytes(),
        &6u16.to_le_bytes(),
        &[0, 0],
        &0u32.to_le_bytes(),
    ]
    .concat();
    let mut out = Vec::new();
    let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
    enc.set_exif_metadata(tiff).unwrap();
    enc.write_image(
        &stored,
        stored.width(),
        stored.height(),
        image::ExtendedColorType::Rgb8,
    )
    .unwrap();
    out
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// Reads a little-endian float32 C-order `.npy` file.
pub fn read_npy_f32(path: &std::path::Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let (header_len, start) = if bytes[6] == 1 {
        (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10)
    } else {
        (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        )
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len]).unwrap();
    assert!(header.contains("'<f4'") && header.contains("'fortran_order': False"));
    let shape_str = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape: Vec<usize> = shape_str
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let data = bytes[start + header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (shape, data)
}

pub mod app;
pub mod images;
pub mod mongo;
pub mod netns;

/// PNG's CRC-32 (for forging valid chunks in decompression-bomb tests).
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
