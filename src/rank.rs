//! Ranking stored product vectors against a query: cosine similarity (vectors are unit
//! length, so a dot product), keep `>= threshold`, best `k` first. Two sources with the
//! same results: vectors streamed from MongoDB (memory flat in catalogue size) or an
//! in-memory cache in one contiguous array.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use mongodb::bson::DateTime;
use mongodb::bson::RawDocumentBuf;
use mongodb::Cursor;

use crate::store::{le_floats, raw_meta, raw_vector, ProductId, StoredMeta};

#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    pub id: ProductId,
    pub score: f32,
}

/// Bounded best-k with a threshold: a min-heap of the k best seen so far.
pub struct TopK {
    k: usize,
    threshold: f32,
    heap: BinaryHeap<MinScore>,
}

struct MinScore(Scored);

impl PartialEq for MinScore {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for MinScore {}
impl PartialOrd for MinScore {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for MinScore {
    // Reversed so the heap's top is the worst kept result; ties broken by id so both
    // ranking modes agree exactly.
    fn cmp(&self, o: &Self) -> Ordering {
        o.0.score
            .total_cmp(&self.0.score)
            .then_with(|| self.0.id.to_string().cmp(&o.0.id.to_string()))
    }
}

impl TopK {
    pub fn new(k: usize, threshold: f32) -> Self {
        Self {
            k,
            threshold,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }

    /// Whether a score could enter (checked before building the id).
    #[inline]
    pub fn admits(&self, score: f32) -> bool {
        score >= self.threshold
            && self.k > 0
            && (self.heap.len() < self.k || self.heap.peek().is_some_and(|w| score >= w.0.score))
    }

    pub fn push(&mut self, id: ProductId, score: f32) {
        if !self.admits(score) {
            return;
        }
        self.heap.push(MinScore(Scored { id, score }));
        if self.heap.len() > self.k {
            self.heap.pop();
        }
    }

    /// Best first.
    pub fn into_sorted(self) -> Vec<Scored> {
        let mut v: Vec<Scored> = self.heap.into_iter().map(|m| m.0).collect();
        v.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| a.id.to_string().cmp(&b.id.to_string()))
        });
        v
    }
}

/// Hands memory that is free inside the allocator back to the OS. An index pass reads
/// the catalogue and every stored embedding's metadata, and loading the cache reads every
/// vector through cursor batches: megabytes that are freed when they are done, but that
/// glibc keeps in its heap (and in RSS) until told. Called after each pass and cache
/// load (at most every CATALOG_SYNC_INTERVAL_SECS).
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        let t = std::time::Instant::now();
        // SAFETY: malloc_trim only returns free pages to the OS; callable at any time.
        let released = unsafe { malloc_trim(0) } == 1;
        tracing::debug!(released, us = t.elapsed().as_micros() as u64, "malloc_trim");
    }
}

/// Below this many cached floats (4 MB) one thread ranks faster than starting others.
/// Above it the scan is bound by memory bandwidth, which one core does not saturate:
/// 10,000 x 512 floats ranked in 2.0-2.2 ms on one core and 1.2-1.3 ms on two, in the
/// service, once the model's threads stop spinning after each run
/// (`ORT_STOP_SPINNING_AFTER_RUN`; while they spin, the second core is theirs and two
/// threads took 2.4-2.9 ms).
const PARALLEL_MIN_FLOATS: usize = 1 << 20;

fn parallelism(floats: usize) -> usize {
    if floats < PARALLEL_MIN_FLOATS {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// Independent partial sums in a dot product: eight 8-float vectors, enough to hide the
/// latency of the additions (a 10,000 x 512 scan took 2.0 ms with 64 lanes on AVX2 vs
/// 2.5 ms with the 8 lanes it had before).
const LANES: usize = 64;

/// Dot product with `LANES` partial sums reduced in a fixed order: no reassociation and
/// no fused multiply-add, so every build and CPU path gives the same bits, and the
/// cached and streamed rankings agree exactly.
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0] + tail
}

/// Dot product (one call; scans go through `scan`, which picks the CPU path once).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

/// Scores every `dim`-wide row of `vectors` against `query`, in order, calling
/// `f(row, score)`: compiled for AVX2 when the CPU has it (a 64-lane sum is eight AVX2
/// registers; the baseline x86-64 build only has 128-bit SSE2), the same bits either way.
pub fn scan(vectors: &[f32], dim: usize, query: &[f32], f: impl FnMut(usize, f32)) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { scan_avx2(vectors, dim, query, f) };
        return;
    }
    scan_portable(vectors, dim, query, f)
}

#[inline(always)]
fn scan_portable(vectors: &[f32], dim: usize, query: &[f32], mut f: impl FnMut(usize, f32)) {
    if dim == 0 {
        return;
    }
    for (row, v) in vectors.chunks_exact(dim).enumerate() {
        f(row, dot_lanes(query, v));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scan_avx2(vectors: &[f32], dim: usize, query: &[f32], f: impl FnMut(usize, f32)) {
    scan_portable(vectors, dim, query, f)
}

/// Ranks vectors streamed from a MongoDB cursor, one batch at a time.
pub async fn rank_stream(
    mut cursor: Cursor<RawDocumentBuf>,
    model: &str,
    query: &[f32],
    k: usize,
    threshold: f32,
) -> mongodb::error::Result<Vec<Scored>> {
    let mut top = TopK::new(k, threshold);
    let want = query.len() * 4;
    let mut row = Vec::with_capacity(query.len());
    while cursor.advance().await? {
        let Some((id, bytes)) = raw_vector(cursor.current(), model) else {
            continue;
        };
        if bytes.len() != want {
            continue; // another model's width: never comparable
        }
        // Floats first, then the same kernel as the cache: identical scores.
        row.clear();
        row.extend(le_floats(bytes));
        let score = dot(query, &row);
        if top.admits(score) {
            top.push(id, score);
        }
    }
    Ok(top.into_sorted())
}

/// Product vectors of one model in memory: one contiguous row-major array, the ids
/// beside it, and an index from id to row for updates.
#[derive(Default)]
pub struct VectorCache {
    pub model: String,
    dim: usize,
    ids: Vec<ProductId>,
    updated: Vec<DateTime>,
    vectors: Vec<f32>,
    rows: HashMap<ProductId, usize>,
}

impl VectorCache {
    pub fn new(model: String, dim: usize) -> Self {
        Self {
            model,
            dim,
            ..Default::default()
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Room for `n` more products, exactly: growing by doubling while loading would
    /// briefly need twice the vectors' memory.
    pub fn reserve_exact(&mut self, n: usize) {
        self.vectors.reserve_exact(n * self.dim);
        self.ids.reserve_exact(n);
        self.updated.reserve_exact(n);
        self.rows.reserve(n);
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn updated_at(&self, id: &ProductId) -> Option<DateTime> {
        self.rows.get(id).map(|&r| self.updated[r])
    }

    pub fn ids(&self) -> impl Iterator<Item = &ProductId> {
        self.ids.iter()
    }

    /// Inserts or replaces a product's vector (ignored if its width is not the model's).
    pub fn upsert(&mut self, id: ProductId, vector: &[f32], updated: DateTime) {
        if vector.len() != self.dim {
            return;
        }
        match self.rows.get(&id) {
            Some(&r) => {
                self.vectors[r * self.dim..(r + 1) * self.dim].copy_from_slice(vector);
                self.updated[r] = updated;
            }
            None => {
                self.rows.insert(id.clone(), self.ids.len());
                self.ids.push(id);
                self.updated.push(updated);
                self.vectors.extend_from_slice(vector);
            }
        }
    }

    /// Removes a product, moving the last row into its place.
    pub fn remove(&mut self, id: &ProductId) {
        let Some(r) = self.rows.remove(id) else {
            return;
        };
        let last = self.ids.len() - 1;
        if r != last {
            self.vectors
                .copy_within(last * self.dim..(last + 1) * self.dim, r * self.dim);
            self.ids.swap(r, last);
            self.updated.swap(r, last);
            self.rows.insert(self.ids[r].clone(), r);
        }
        self.ids.pop();
        self.updated.pop();
        self.vectors.truncate(last * self.dim);
    }

    /// Loads rows from a `vectors()` cursor.
    pub async fn load(&mut self, cursor: Cursor<RawDocumentBuf>) -> mongodb::error::Result<usize> {
        self.load_with_metas(cursor, None).await
    }

    /// Loads rows from a `vectors()` cursor (only the usable vectors of the cache's model:
    /// status ok, the model's width) and, given `metas`, records every document's
    /// metadata in it, whatever its model or status: one read of the collection serves
    /// both the cache and an index pass's plan.
    pub async fn load_with_metas(
        &mut self,
        mut cursor: Cursor<RawDocumentBuf>,
        mut metas: Option<&mut HashMap<ProductId, StoredMeta>>,
    ) -> mongodb::error::Result<usize> {
        let mut n = 0;
        let mut buf = Vec::with_capacity(self.dim);
        while cursor.advance().await? {
            let d = cursor.current();
            if let Some(metas) = metas.as_deref_mut() {
                if let Some((id, meta)) = raw_meta(d) {
                    metas.insert(id, meta);
                }
            }
            let Some((id, bytes)) = raw_vector(d, &self.model) else {
                continue;
            };
            if bytes.len() != self.dim * 4 {
                continue;
            }
            buf.clear();
            buf.extend(le_floats(bytes));
            let updated = d.get_datetime("updated_at").ok().unwrap_or(DateTime::MIN);
            self.upsert(id, &buf, updated);
            n += 1;
        }
        Ok(n)
    }

    /// Releases spare capacity after bulk loading.
    pub fn shrink(&mut self) {
        self.vectors.shrink_to_fit();
        self.ids.shrink_to_fit();
        self.updated.shrink_to_fit();
        self.rows.shrink_to_fit();
    }

    pub fn rank(&self, query: &[f32], k: usize, threshold: f32) -> Vec<Scored> {
        self.rank_with(query, k, threshold, parallelism(self.vectors.len()))
    }

    /// `rank` on `threads` threads, each over its share of the rows; the partial top-k
    /// lists merge into the same result in any order (ties break by id).
    pub fn rank_with(
        &self,
        query: &[f32],
        k: usize,
        threshold: f32,
        threads: usize,
    ) -> Vec<Scored> {
        if query.len() != self.dim || self.dim == 0 {
            return Vec::new();
        }
        let rows = self.ids.len();
        if threads <= 1 || rows < 2 {
            return self.rank_rows(query, 0..rows, k, threshold).into_sorted();
        }
        let per = rows.div_ceil(threads);
        let parts: Vec<TopK> = std::thread::scope(|s| {
            let others: Vec<_> = (per..rows)
                .step_by(per)
                .map(|from| {
                    let to = (from + per).min(rows);
                    s.spawn(move || self.rank_rows(query, from..to, k, threshold))
                })
                .collect();
            // The calling thread takes the first share.
            let mut parts = vec![self.rank_rows(query, 0..per, k, threshold)];
            for h in others {
                parts.push(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
            }
            parts
        });
        let mut top = TopK::new(k, threshold);
        for s in parts.into_iter().flat_map(TopK::into_sorted) {
            top.push(s.id, s.score);
        }
        top.into_sorted()
    }

    fn rank_rows(
        &self,
        query: &[f32],
        rows: std::ops::Range<usize>,
        k: usize,
        threshold: f32,
    ) -> TopK {
        let mut top = TopK::new(k, threshold);
        let vectors = &self.vectors[rows.start * self.dim..rows.end * self.dim];
        scan(vectors, self.dim, query, |i, score| {
            if top.admits(score) {
                top.push(self.ids[rows.start + i].clone(), score);
            }
        });
        top
    }

    /// Bytes held by vectors, ids and index (for the memory benchmark).
    pub fn heap_bytes(&self) -> usize {
        self.vectors.capacity() * 4
            + self.ids.capacity() * std::mem::size_of::<ProductId>()
            + self.updated.capacity() * 8
            + self.rows.capacity() * (std::mem::size_of::<(ProductId, usize)>() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::oid::ObjectId;

    fn id(n: u8) -> ProductId {
        ProductId::Oid(ObjectId::from_bytes([n; 12]))
    }

    #[test]
    fn topk_keeps_best_above_threshold_in_order() {
        let mut t = TopK::new(2, 0.5);
        for (n, s) in [(1, 0.4), (2, 0.9), (3, 0.6), (4, 0.95), (5, 0.5)] {
            t.push(id(n), s);
        }
        let r = t.into_sorted();
        assert_eq!(
            r.iter().map(|s| s.score).collect::<Vec<_>>(),
            vec![0.95, 0.9]
        );
        assert_eq!(r[0].id, id(4));
    }

    #[test]
    fn dot_products_agree() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.1).collect();
        let b: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.01).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-3);
    }

    #[test]
    fn parallel_rank_equals_one_thread_including_ties() {
        let dim = 16;
        let mut c = VectorCache::new("m".into(), dim);
        let mut x = 12345u32;
        for n in 0..2000u32 {
            // Every fifth vector repeats an earlier one: exact ties at the cut.
            let v: Vec<f32> = (0..dim)
                .map(|j| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    if n % 5 == 0 {
                        (j as f32 + 1.0) / 10.0
                    } else {
                        (x >> 16) as f32 / 65536.0
                    }
                })
                .collect();
            c.upsert(
                ProductId::from_bson(mongodb::bson::Bson::String(format!("p{n}"))),
                &v,
                DateTime::MIN,
            );
        }
        let q: Vec<f32> = (0..dim).map(|j| (j as f32 + 1.0) / 10.0).collect();
        for k in [1, 5, 50, 700] {
            let one = c.rank_with(&q, k, 0.0, 1);
            assert_eq!(one.len(), k);
            for threads in [2, 3, 4, 7] {
                let many = c.rank_with(&q, k, 0.0, threads);
                let ids = |r: &[Scored]| {
                    r.iter()
                        .map(|s| (s.id.clone(), s.score))
                        .collect::<Vec<_>>()
                };
                assert_eq!(ids(&many), ids(&one), "k {k}, {threads} threads");
            }
        }
    }

    #[test]
    fn every_cpu_path_gives_the_same_bits() {
        let mut x = 7u32;
        let mut next = || {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for dim in [3, 64, 100, 512, 1280] {
            let query: Vec<f32> = (0..dim).map(|_| next()).collect();
            let rows: Vec<f32> = (0..dim * 50).map(|_| next()).collect();
            let mut dispatched = Vec::new();
            scan(&rows, dim, &query, |_, s| dispatched.push(s.to_bits()));
            let mut portable = Vec::new();
            scan_portable(&rows, dim, &query, |_, s| portable.push(s.to_bits()));
            let single: Vec<u32> = rows
                .chunks_exact(dim)
                .map(|r| dot(&query, r).to_bits())
                .collect();
            assert_eq!(dispatched, portable, "dim {dim}");
            assert_eq!(dispatched, single, "dim {dim}");
        }
    }

    #[test]
    fn cache_upsert_remove_and_rank() {
        let mut c = VectorCache::new("m".into(), 2);
        c.upsert(id(1), &[1.0, 0.0], DateTime::MIN);
        c.upsert(id(2), &[0.0, 1.0], DateTime::MIN);
        c.upsert(id(3), &[0.6, 0.8], DateTime::MIN);
        c.upsert(id(1), &[0.8, 0.6], DateTime::MIN);
        c.remove(&id(2));
        assert_eq!(c.len(), 2);
        let r = c.rank(&[1.0, 0.0], 10, 0.0);
        assert_eq!(
            r.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
            vec![id(1), id(3)]
        );
        c.remove(&id(1));
        c.remove(&id(3));
        assert!(c.is_empty());
    }
}
