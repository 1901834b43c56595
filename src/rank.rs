//! Ranking stored product vectors against a query: cosine similarity (vectors are unit
//! length, so a dot product), keep `>= threshold`, best `k` first. Two sources with the
//! same results: vectors streamed from MongoDB (memory flat in catalogue size) or an
//! in-memory cache in one contiguous array.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use mongodb::bson::DateTime;
use mongodb::bson::RawDocumentBuf;
use mongodb::Cursor;

use crate::store::{raw_meta, raw_vector, ProductId, StoredMeta};

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

/// Dot product; eight independent sums so the compiler vectorises it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Dot product of a query with little-endian float bytes as stored in MongoDB.
#[inline]
pub fn dot_le_bytes(query: &[f32], bytes: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = bytes.chunks_exact(32);
    let mut q = query.chunks_exact(8);
    for (c, qc) in (&mut chunks).zip(&mut q) {
        for i in 0..8 {
            let f = f32::from_le_bytes([c[4 * i], c[4 * i + 1], c[4 * i + 2], c[4 * i + 3]]);
            acc[i] += f * qc[i];
        }
    }
    let tail: f32 = chunks
        .remainder()
        .chunks_exact(4)
        .zip(q.remainder())
        .map(|(c, y)| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * y)
        .sum();
    acc.iter().sum::<f32>() + tail
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
    while cursor.advance().await? {
        let Some((id, bytes)) = raw_vector(cursor.current(), model) else {
            continue;
        };
        if bytes.len() != want {
            continue; // another model's width: never comparable
        }
        let score = dot_le_bytes(query, bytes);
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
            buf.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
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
        let mut top = TopK::new(k, threshold);
        if query.len() != self.dim || self.dim == 0 {
            return Vec::new();
        }
        for (row, v) in self.vectors.chunks_exact(self.dim).enumerate() {
            let score = dot(query, v);
            if top.admits(score) {
                top.push(self.ids[row].clone(), score);
            }
        }
        top.into_sorted()
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
        let bytes: Vec<u8> = b.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert!((dot(&a, &b) - naive).abs() < 1e-3);
        assert!((dot_le_bytes(&a, &bytes) - naive).abs() < 1e-3);
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
