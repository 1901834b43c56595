//! search-img: find the products in a shop's MongoDB catalogue that look most like a photo.
//!
//! The modules follow the path a search takes:
//! fetch (image bytes) -> encoder (decode, preprocess, embed) -> store (product vectors in
//! MongoDB) -> rank (top-k by cosine) -> catalog (join product documents) -> http.

pub mod atlas;
pub mod catalog;
pub mod compact;
pub mod config;
pub mod dbwatch;
pub mod embedder;
pub mod encoder;
pub mod error;
pub mod fetch;
pub mod http;
pub mod indexer;
pub mod lease;
pub mod monitor;
pub mod rank;
pub mod search;
pub mod service;
pub mod simd;
pub mod store;
pub mod vectors;
