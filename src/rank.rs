//! Ranking stored image vectors against a query: cosine similarity (vectors are unit
//! length, so a dot product), keep `>= threshold`, best `k` products first, each
//! product once with its best image. Two sources with the same results: vectors
//! streamed from MongoDB (memory flat in catalogue size), or an in-memory cache of
//! compact int8 rows that picks the candidates whose stored vectors are then ranked
//! exactly.

use std::cmp::Ordering;
use std::collections::{BTreeSet, BinaryHeap, HashMap};

use mongodb::bson::DateTime;
use mongodb::bson::RawDocumentBuf;
use mongodb::Cursor;

use crate::compact::{quantize_row, QueryCodes};
use crate::simd;
use crate::store::{le_floats, Attrs, ImageKey, ProductId, RawEmbedding, StoredMeta};

/// The request filters: products in one of `categories` (any, when empty), priced
/// within the bounds given (a product without a price is out when a bound is given).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filter {
    /// Sorted, each once (`new` makes it so): looked up by binary search, so a request
    /// listing thousands costs a few comparisons a row, not thousands.
    pub categories: Vec<String>,
    pub min_price: Option<f64>,
    pub max_price: Option<f64>,
}

impl Filter {
    pub fn new(
        mut categories: Vec<String>,
        min_price: Option<f64>,
        max_price: Option<f64>,
    ) -> Self {
        categories.sort_unstable();
        categories.dedup();
        Self {
            categories,
            min_price,
            max_price,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.categories.is_empty() && self.min_price.is_none() && self.max_price.is_none()
    }

    fn price_ok(&self, price: Option<f64>) -> bool {
        if self.min_price.is_none() && self.max_price.is_none() {
            return true;
        }
        price.is_some_and(|p| {
            self.min_price.is_none_or(|m| p >= m) && self.max_price.is_none_or(|m| p <= m)
        })
    }

    pub fn matches(&self, a: &Attrs) -> bool {
        (self.categories.is_empty()
            || a.categories
                .iter()
                .any(|c| self.categories.binary_search(c).is_ok()))
            && self.price_ok(a.price)
    }
}

/// A ranked product: its best image and that image's score.
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    pub id: ProductId,
    pub image: String,
    pub score: f32,
}

/// What to rank for: one query vector (a search) or several (a product's photos, when
/// looking for similar products: a product's score is then its best pair's), the best
/// `k` products at or above `threshold`, leaving out `exclude`.
#[derive(Clone, Copy, Debug)]
pub struct Ask<'a> {
    pub queries: &'a [&'a [f32]],
    pub k: usize,
    pub threshold: f32,
    pub exclude: Option<&'a ProductId>,
    /// Applied before the cut: only matching products enter the top k.
    pub filter: Option<&'a Filter>,
}

impl<'a> Ask<'a> {
    /// One query, nothing left out.
    pub fn one(query: &'a [&'a [f32]; 1], k: usize, threshold: f32) -> Self {
        Self {
            queries: query,
            k,
            threshold,
            exclude: None,
            filter: None,
        }
    }

    fn dim(&self) -> Option<usize> {
        let dim = self.queries.first()?.len();
        self.queries.iter().all(|q| q.len() == dim).then_some(dim)
    }
}

/// Bounded best-k products with a threshold: the k best products seen so far, ordered,
/// and each one's best image.
pub struct TopK {
    k: usize,
    threshold: f32,
    exclude: Option<ProductId>,
    order: BTreeSet<Entry>,
    best: HashMap<ProductId, (f32, String)>,
}

/// A kept product in ranking order: higher score first, ties broken by id text so both
/// ranking modes agree exactly.
struct Entry {
    score: f32,
    key: String,
    id: ProductId,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> Ordering {
        o.score
            .total_cmp(&self.score)
            .then_with(|| self.key.cmp(&o.key))
    }
}

impl TopK {
    pub fn new(k: usize, threshold: f32) -> Self {
        Self {
            k,
            threshold,
            exclude: None,
            order: BTreeSet::new(),
            best: HashMap::with_capacity(k + 1),
        }
    }

    fn for_ask(ask: &Ask<'_>) -> Self {
        let mut top = Self::new(ask.k, ask.threshold);
        top.exclude = ask.exclude.cloned();
        top
    }

    /// Whether a score could enter (checked before building the id).
    #[inline]
    pub fn admits(&self, score: f32) -> bool {
        score >= self.threshold
            && self.k > 0
            && (self.order.len() < self.k || self.order.last().is_some_and(|w| score >= w.score))
    }

    /// Offers one image of a product. A product keeps its best image (on equal scores the
    /// smaller URL, whatever the order they come in).
    pub fn push(&mut self, id: &ProductId, image: &str, score: f32) {
        if !self.admits(score) || self.exclude.as_ref() == Some(id) {
            return;
        }
        if let Some((kept, kept_image)) = self.best.get_mut(id) {
            let better = match score.total_cmp(kept) {
                Ordering::Greater => true,
                Ordering::Equal => image < kept_image.as_str(),
                Ordering::Less => false,
            };
            if better {
                let key = id.to_string();
                self.order.remove(&Entry {
                    score: *kept,
                    key: key.clone(),
                    id: id.clone(),
                });
                self.order.insert(Entry {
                    score,
                    key,
                    id: id.clone(),
                });
                (*kept, *kept_image) = (score, image.to_string());
            }
            return;
        }
        self.best.insert(id.clone(), (score, image.to_string()));
        self.order.insert(Entry {
            score,
            key: id.to_string(),
            id: id.clone(),
        });
        if self.order.len() > self.k {
            if let Some(worst) = self.order.pop_last() {
                self.best.remove(&worst.id);
            }
        }
    }

    /// Best first.
    pub fn into_sorted(mut self) -> Vec<Scored> {
        self.order
            .into_iter()
            .filter_map(|e| {
                let (score, image) = self.best.remove(&e.id)?;
                Some(Scored {
                    id: e.id,
                    image,
                    score,
                })
            })
            .collect()
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
const PARALLEL_MIN_VALUES: usize = 1 << 20;

fn parallelism(values: usize) -> usize {
    if values < PARALLEL_MIN_VALUES {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// Dot product (the f32 kernel of `simd`: the same bits on every CPU path, so the
/// cached and streamed rankings agree exactly).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    simd::dot(a, b)
}

/// Scores every `dim`-wide row of `vectors` against `query`, in order, calling
/// `f(row, score)`.
pub fn scan(vectors: &[f32], dim: usize, query: &[f32], mut f: impl FnMut(usize, f32)) {
    if dim == 0 {
        return;
    }
    let level = simd::Level::detect();
    for (row, v) in vectors.chunks_exact(dim).enumerate() {
        f(row, simd::dot_at(level, query, v));
    }
}

/// Ranks vectors streamed from a MongoDB cursor, one batch at a time (one read of the
/// vectors whatever the number of queries).
pub async fn rank_stream(
    mut cursor: Cursor<RawDocumentBuf>,
    model: &str,
    ask: Ask<'_>,
) -> mongodb::error::Result<Vec<Scored>> {
    let Some(dim) = ask.dim() else {
        return Ok(Vec::new());
    };
    let mut top = TopK::for_ask(&ask);
    let mut row = Vec::with_capacity(dim);
    while cursor.advance().await? {
        let d = RawEmbedding::parse(cursor.current());
        let Some(v) = d.vector(model) else {
            continue;
        };
        if v.floats.len() != dim * 4 {
            continue; // another model's width: never comparable
        }
        // Floats first, then the same kernel as the cache: identical scores.
        row.clear();
        row.extend(le_floats(v.floats));
        // The filter is read from the document the first time a score could enter.
        let mut passes = None;
        for query in ask.queries {
            let score = dot(query, &row);
            if top.admits(score)
                && *passes.get_or_insert_with(|| ask.filter.is_none_or(|f| f.matches(&d.attrs())))
            {
                top.push(&v.product, v.url, score);
            }
        }
    }
    Ok(top.into_sorted())
}

/// Image vectors of one model in memory, compact: one contiguous row-major array of int8
/// codes and a scale a row (`compact`), the images and their filter attributes beside
/// it, and an index from image to row for updates. It picks candidates; their exact
/// scores come from the stored vectors.
#[derive(Default)]
pub struct VectorCache {
    pub model: String,
    dim: usize,
    ids: Vec<ImageKey>,
    updated: Vec<DateTime>,
    attrs: Vec<RowAttrs>,
    /// Category text -> the number rows hold.
    categories: HashMap<String, u32>,
    codes: Vec<i8>,
    scales: Vec<f32>,
    rows: RowIndex,
    /// The heap bytes of the ids (URLs, non-ObjectId product ids), kept as rows come
    /// and go so that `approx_bytes` never walks the rows.
    key_bytes: usize,
}

/// The bytes of a row beside its codes and its key's heap: scale, id, update time,
/// filter attributes (one category), row table slot.
const ROW_FIXED_BYTES: usize =
    4 + std::mem::size_of::<ImageKey>() + 8 + std::mem::size_of::<RowAttrs>() + 4 + 6;

fn key_heap_bytes(k: &ImageKey) -> usize {
    let product = match &k.product {
        ProductId::Oid(_) => 0,
        ProductId::Other(text, value) => {
            text.capacity() + std::mem::size_of_val(&**value) + text.len()
        }
    };
    k.url.capacity() + product
}

/// Image -> row without a second copy of each image's key (its URL is most of a row's
/// bytes beside the codes): the table holds row numbers and compares through `ids`.
#[derive(Default)]
struct RowIndex {
    table: hashbrown::HashTable<u32>,
    hasher: std::hash::RandomState,
}

impl RowIndex {
    fn hash(&self, id: &ImageKey) -> u64 {
        std::hash::BuildHasher::hash_one(&self.hasher, id)
    }

    fn get(&self, ids: &[ImageKey], id: &ImageKey) -> Option<usize> {
        let found = self.table.find(self.hash(id), |&r| ids[r as usize] == *id);
        found.map(|&r| r as usize)
    }

    /// Indexes row `row`, whose key is `ids[row]`.
    fn insert(&mut self, ids: &[ImageKey], row: usize) {
        let hash = self.hash(&ids[row]);
        let hasher = &self.hasher;
        let rehash = |&r: &u32| std::hash::BuildHasher::hash_one(hasher, &ids[r as usize]);
        self.table.insert_unique(hash, row as u32, rehash);
    }

    fn remove(&mut self, ids: &[ImageKey], id: &ImageKey) -> Option<usize> {
        let hash = self.hash(id);
        let entry = self
            .table
            .find_entry(hash, |&r| ids[r as usize] == *id)
            .ok()?;
        Some(entry.remove().0 as usize)
    }

    /// The key at `ids[from]` is moving to row `to`.
    fn moved(&mut self, ids: &[ImageKey], from: usize, to: usize) {
        let hash = self.hash(&ids[from]);
        if let Some(r) = self.table.find_mut(hash, |&r| r as usize == from) {
            *r = to as u32;
        }
    }

    fn reserve(&mut self, ids: &[ImageKey], n: usize) {
        let hasher = &self.hasher;
        let rehash = |&r: &u32| std::hash::BuildHasher::hash_one(hasher, &ids[r as usize]);
        self.table.reserve(n, rehash);
    }

    fn shrink(&mut self, ids: &[ImageKey]) {
        let hasher = &self.hasher;
        let rehash = |&r: &u32| std::hash::BuildHasher::hash_one(hasher, &ids[r as usize]);
        self.table.shrink_to_fit(rehash);
    }

    /// A row number and a control byte a slot.
    fn heap_bytes(&self) -> usize {
        self.table.capacity() * (std::mem::size_of::<u32>() + 1)
    }
}

/// The window the cache picks candidates from for `ask.k` products; each candidate
/// costs its stored vector's read (2 KB at 512-d, 5 KB at 1280-d) and exact score. On
/// 3,000 relevance photos (`bench-load relevance --count 3000 --seed 2`) the top 5 and
/// top 10 equalled exact ranking for 85-89% of the queries with all of 1x + 0, 97.6-98.3%
/// with 2x + 8, 99.6-100% with 4x + 16, and 99.9-100% with those of 4x + 16 within
/// RESCORE_MARGIN (6-19 images read back).
const RESCORE_FACTOR: usize = 4;
const RESCORE_EXTRA: usize = 16;

/// The margin below the k-th product's approximate score, in code steps (the largest
/// row scale among the candidates) times the query's norm. A score's rounding error has
/// a standard deviation of about 0.29 of that (a uniform error of one step a
/// coordinate), so the difference of two scores stays within 2 steps but for about one
/// in a million pairs.
const RESCORE_MARGIN: f32 = 2.0;

/// A row that may be among the best, ordered worst first (lower score, then later row)
/// so that a max-heap of them pops the worst: the same set whatever the thread split.
#[derive(Clone, Copy, PartialEq)]
struct Candidate {
    score: f32,
    row: usize,
}

impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Candidate {
    fn cmp(&self, o: &Self) -> Ordering {
        o.score
            .total_cmp(&self.score)
            .then_with(|| self.row.cmp(&o.row))
    }
}

/// The best `n` rows seen so far by approximate score.
struct Shortlist {
    n: usize,
    heap: BinaryHeap<Candidate>,
}

impl Shortlist {
    fn new(n: usize) -> Self {
        Self {
            n,
            heap: BinaryHeap::with_capacity(n + 1),
        }
    }

    #[inline]
    fn admits(&self, score: f32) -> bool {
        self.n > 0
            && (self.heap.len() < self.n || self.heap.peek().is_some_and(|w| score >= w.score))
    }

    fn push(&mut self, c: Candidate) {
        if self.heap.len() < self.n {
            self.heap.push(c);
        } else if self.heap.peek().is_some_and(|w| c < *w) {
            self.heap.pop();
            self.heap.push(c);
        }
    }
}

/// A row's filter attributes, categories as numbers (compared per row while ranking).
#[derive(Clone, Debug, Default)]
struct RowAttrs {
    categories: Box<[u32]>,
    price: Option<f64>,
}

/// A `Filter` in the cache's category numbers.
struct RowFilter<'a> {
    filter: &'a Filter,
    categories: Vec<u32>,
}

impl RowFilter<'_> {
    fn matches(&self, a: &RowAttrs) -> bool {
        (self.filter.categories.is_empty()
            || a.categories
                .iter()
                .any(|c| self.categories.binary_search(c).is_ok()))
            && self.filter.price_ok(a.price)
    }
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

    /// Whether a scan reads enough values to run on several threads (10,000 x 1280 is
    /// 12.8 M: about 1.5 ms of CPU, 15 ms or more of wall time at 0.1 CPU); the service
    /// then also leaves the runtime's worker to other tasks meanwhile.
    pub fn long_scan(&self) -> bool {
        self.codes.len() >= PARALLEL_MIN_VALUES
    }

    /// Room for `n` more products, exactly: growing by doubling while loading would
    /// briefly need twice the vectors' memory.
    pub fn reserve_exact(&mut self, n: usize) {
        self.codes.reserve_exact(n * self.dim);
        self.scales.reserve_exact(n);
        self.ids.reserve_exact(n);
        self.updated.reserve_exact(n);
        self.attrs.reserve_exact(n);
        self.rows.reserve(&self.ids, n);
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn updated_at(&self, id: &ImageKey) -> Option<DateTime> {
        self.rows.get(&self.ids, id).map(|r| self.updated[r])
    }

    pub fn ids(&self) -> impl Iterator<Item = &ImageKey> {
        self.ids.iter()
    }

    /// Inserts or replaces an image's vector (ignored if its width is not the model's).
    pub fn upsert(&mut self, id: ImageKey, vector: &[f32], attrs: &Attrs, updated: DateTime) {
        if vector.len() != self.dim {
            return;
        }
        let attrs = self.row_attrs(attrs);
        match self.rows.get(&self.ids, &id) {
            Some(r) => {
                let mut codes = Vec::with_capacity(self.dim);
                self.scales[r] = quantize_row(vector, &mut codes);
                self.codes[r * self.dim..(r + 1) * self.dim].copy_from_slice(&codes);
                self.updated[r] = updated;
                self.attrs[r] = attrs;
            }
            None => {
                self.key_bytes += key_heap_bytes(&id);
                self.ids.push(id);
                self.rows.insert(&self.ids, self.ids.len() - 1);
                self.updated.push(updated);
                self.attrs.push(attrs);
                let scale = quantize_row(vector, &mut self.codes);
                self.scales.push(scale);
            }
        }
    }

    /// New filter attributes for an image already held (its vector unchanged).
    pub fn set_attrs(&mut self, id: &ImageKey, attrs: &Attrs, updated: DateTime) {
        if let Some(r) = self.rows.get(&self.ids, id) {
            self.attrs[r] = self.row_attrs(attrs);
            self.updated[r] = updated;
        }
    }

    fn row_attrs(&mut self, a: &Attrs) -> RowAttrs {
        let categories = a
            .categories
            .iter()
            .map(|c| {
                let next = self.categories.len() as u32;
                *self.categories.entry(c.clone()).or_insert(next)
            })
            .collect();
        RowAttrs {
            categories,
            price: a.price,
        }
    }

    /// Removes an image, moving the last row into its place.
    pub fn remove(&mut self, id: &ImageKey) {
        let Some(r) = self.rows.remove(&self.ids, id) else {
            return;
        };
        self.key_bytes -= key_heap_bytes(&self.ids[r]);
        let last = self.ids.len() - 1;
        if r != last {
            self.rows.moved(&self.ids, last, r);
            self.codes
                .copy_within(last * self.dim..(last + 1) * self.dim, r * self.dim);
            self.scales.swap(r, last);
            self.ids.swap(r, last);
            self.updated.swap(r, last);
            self.attrs.swap(r, last);
        }
        self.ids.pop();
        self.updated.pop();
        self.attrs.pop();
        self.scales.pop();
        self.codes.truncate(last * self.dim);
    }

    /// Loads rows from a `vectors()` cursor.
    pub async fn load(&mut self, cursor: Cursor<RawDocumentBuf>) -> mongodb::error::Result<usize> {
        let n = self.load_with_metas(cursor, None, None).await?;
        Ok(n.unwrap_or_default())
    }

    /// Loads rows from a `vectors()` cursor (only the usable vectors of the cache's model:
    /// status ok, the model's width) and, given `metas`, records every document's
    /// metadata in it, whatever its model or status: one read of the collection serves
    /// both the cache and an index pass's plan. Stops, returning None, once the rows
    /// take more than `limit` bytes (`metas` then holds what was read so far).
    pub async fn load_with_metas(
        &mut self,
        mut cursor: Cursor<RawDocumentBuf>,
        mut metas: Option<&mut HashMap<ImageKey, StoredMeta>>,
        limit: Option<usize>,
    ) -> mongodb::error::Result<Option<usize>> {
        let mut n = 0;
        let mut buf = Vec::with_capacity(self.dim);
        while cursor.advance().await? {
            let d = RawEmbedding::parse(cursor.current());
            if let Some(metas) = metas.as_deref_mut() {
                if let Some((id, meta)) = d.meta() {
                    metas.insert(id, meta);
                }
            }
            let Some(v) = d.vector(&self.model) else {
                continue;
            };
            if v.floats.len() != self.dim * 4 {
                continue;
            }
            buf.clear();
            buf.extend(le_floats(v.floats));
            self.upsert(v.key(), &buf, &d.attrs(), d.updated_at());
            n += 1;
            if limit.is_some_and(|l| self.approx_bytes() > l) {
                return Ok(None);
            }
        }
        Ok(Some(n))
    }

    /// Releases spare capacity after bulk loading.
    pub fn shrink(&mut self) {
        self.codes.shrink_to_fit();
        self.scales.shrink_to_fit();
        self.ids.shrink_to_fit();
        self.updated.shrink_to_fit();
        self.attrs.shrink_to_fit();
        self.rows.shrink(&self.ids);
    }

    /// The candidates for `ask.k` products, whose stored vectors the caller ranks
    /// exactly: out of a window of RESCORE_FACTOR times as many images and RESCORE_EXTRA
    /// more, those whose approximate score is within RESCORE_MARGIN of the k-th
    /// product's; a larger window while every image in it is (a product with several
    /// photos may take several places), or all there are. On the free instance's 0.1
    /// CPU every stored vector read costs: the whole window took a search from one CPU
    /// period to two.
    pub fn shortlist(&self, ask: Ask<'_>) -> Vec<ImageKey> {
        let q_norm = ask
            .queries
            .iter()
            .map(|q| q.iter().map(|x| x * x).sum::<f32>().sqrt())
            .fold(0f32, f32::max);
        let mut n = ask.k.saturating_mul(RESCORE_FACTOR) + RESCORE_EXTRA;
        loop {
            let picked = self.pick(ask, n, parallelism(self.codes.len()));
            let keep = self.within_margin(&picked, ask.k, q_norm);
            if keep < picked.len() || picked.len() < n {
                return picked[..keep]
                    .iter()
                    .map(|c| self.ids[c.row].clone())
                    .collect();
            }
            n = n.saturating_mul(4);
        }
    }

    /// How many of `picked` (best first) could be among the best `k` products: those
    /// scored within the margin of the k-th product's approximate score (all of them
    /// when they hold fewer than k products).
    fn within_margin(&self, picked: &[Candidate], k: usize, q_norm: f32) -> usize {
        let mut products = std::collections::HashSet::new();
        let Some(kth) = picked
            .iter()
            .find(|c| products.insert(&self.ids[c.row].product) && products.len() >= k)
        else {
            return picked.len();
        };
        let step = picked
            .iter()
            .map(|c| self.scales[c.row])
            .fold(0f32, f32::max);
        let cut = kth.score - RESCORE_MARGIN * step * q_norm;
        picked.iter().take_while(|c| c.score >= cut).count()
    }

    /// `pick`'s images, on as many threads as the rows call for (for the tests).
    #[cfg(test)]
    fn candidates(&self, ask: Ask<'_>, n: usize) -> Vec<ImageKey> {
        self.candidates_with(ask, n, parallelism(self.codes.len()))
    }

    #[cfg(test)]
    fn candidates_with(&self, ask: Ask<'_>, n: usize, threads: usize) -> Vec<ImageKey> {
        let picked = self.pick(ask, n, threads);
        picked.iter().map(|c| self.ids[c.row].clone()).collect()
    }

    /// The rows most likely to be the best for `ask`, best first by approximate score:
    /// at most `n`, filtered and leaving out `ask.exclude`, none that cannot reach
    /// `ask.threshold` (the bound of the rounding error is allowed for). On `threads`
    /// threads, each over its share of the rows; the shares' shortlists merge into the
    /// same set in any order (ties break by row).
    fn pick(&self, ask: Ask<'_>, n: usize, threads: usize) -> Vec<Candidate> {
        if ask.dim() != Some(self.dim) || self.dim == 0 || n == 0 {
            return Vec::new();
        }
        let queries: Vec<QueryCodes> = ask.queries.iter().map(|q| QueryCodes::new(q)).collect();
        let rows = self.ids.len();
        let mut all = Shortlist::new(n);
        if threads <= 1 || rows < 2 {
            all = self.shortlist_rows(&ask, &queries, n, 0..rows);
        } else {
            let per = rows.div_ceil(threads);
            let parts: Vec<Shortlist> = std::thread::scope(|s| {
                let others: Vec<_> = (per..rows)
                    .step_by(per)
                    .map(|from| {
                        let to = (from + per).min(rows);
                        let (ask, queries) = (&ask, &queries);
                        s.spawn(move || self.shortlist_rows(ask, queries, n, from..to))
                    })
                    .collect();
                // The calling thread takes the first share.
                let mut parts = vec![self.shortlist_rows(&ask, &queries, n, 0..per)];
                for h in others {
                    parts.push(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
                }
                parts
            });
            for c in parts.into_iter().flat_map(|p| p.heap) {
                all.push(c);
            }
        }
        all.heap.into_sorted_vec()
    }

    fn shortlist_rows(
        &self,
        ask: &Ask<'_>,
        queries: &[QueryCodes],
        n: usize,
        rows: std::ops::Range<usize>,
    ) -> Shortlist {
        let mut list = Shortlist::new(n);
        let filter = ask.filter.map(|filter| {
            let mut categories: Vec<u32> = filter
                .categories
                .iter()
                .filter_map(|c| self.categories.get(c).copied())
                .collect();
            categories.sort_unstable();
            RowFilter { filter, categories }
        });
        let codes = &self.codes[rows.start * self.dim..rows.end * self.dim];
        for (i, row_codes) in codes.chunks_exact(self.dim.max(1)).enumerate() {
            let row = rows.start + i;
            let scale = self.scales[row];
            let (mut best, mut reaches) = (f32::NEG_INFINITY, false);
            for q in queries {
                let score = q.score(row_codes, scale);
                best = best.max(score);
                reaches |= score + q.error_bound(scale) >= ask.threshold;
            }
            if reaches
                && list.admits(best)
                && filter.as_ref().is_none_or(|f| f.matches(&self.attrs[row]))
                && ask.exclude != Some(&self.ids[row].product)
            {
                list.push(Candidate { score: best, row });
            }
        }
        list
    }

    /// Bytes held by the vectors' codes and scales: a quarter of their f32 bytes and
    /// four bytes a row.
    pub fn vector_bytes(&self) -> usize {
        self.codes.capacity() + self.scales.capacity() * 4
    }

    /// What `heap_bytes` would say, within a few bytes a row, without walking the rows.
    pub fn approx_bytes(&self) -> usize {
        self.codes.len() + self.ids.len() * ROW_FIXED_BYTES + self.key_bytes
    }

    /// What a row of `dim` takes, with a URL of 100 bytes and an ObjectId product id:
    /// for deciding whether a catalogue will fit before reading it.
    pub fn row_bytes_estimate(dim: usize) -> usize {
        dim + ROW_FIXED_BYTES + 100
    }

    /// Bytes held by vectors, ids and index (for the memory benchmark; the URLs'
    /// text counted once).
    pub fn heap_bytes(&self) -> usize {
        self.vector_bytes()
            + self.ids.capacity() * std::mem::size_of::<ImageKey>()
            + self.key_bytes
            + self.updated.capacity() * 8
            + self.attrs.capacity() * std::mem::size_of::<RowAttrs>()
            + self
                .attrs
                .iter()
                .map(|a| a.categories.len() * 4)
                .sum::<usize>()
            + self.rows.heap_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::oid::ObjectId;

    fn id(n: u8) -> ProductId {
        ProductId::Oid(ObjectId::from_bytes([n; 12]))
    }

    fn img(n: u8) -> ImageKey {
        ImageKey::new(id(n), format!("http://x/{n}.jpg"))
    }

    #[test]
    fn topk_keeps_best_above_threshold_in_order() {
        let mut t = TopK::new(2, 0.5);
        for (n, s) in [(1, 0.4), (2, 0.9), (3, 0.6), (4, 0.95), (5, 0.5)] {
            t.push(&id(n), "u", s);
        }
        let r = t.into_sorted();
        assert_eq!(
            r.iter().map(|s| s.score).collect::<Vec<_>>(),
            vec![0.95, 0.9]
        );
        assert_eq!(r[0].id, id(4));
    }

    #[test]
    fn topk_keeps_each_product_once_with_its_best_image_in_any_order() {
        let offers = [
            (1, "a", 0.7),
            (2, "b", 0.8),
            (1, "c", 0.9),
            (3, "d", 0.6),
            (1, "e", 0.5),
            (2, "f", 0.8),
            (4, "g", 0.65),
            (2, "a", 0.8),
        ];
        for rotation in 0..offers.len() {
            let mut t = TopK::new(3, 0.0);
            for (n, url, s) in offers.iter().cycle().skip(rotation).take(offers.len()) {
                t.push(&id(*n), url, *s);
            }
            let r: Vec<_> = t
                .into_sorted()
                .into_iter()
                .map(|s| (s.id, s.image, s.score))
                .collect();
            let want = vec![
                (id(1), "c".to_string(), 0.9),
                (id(2), "a".to_string(), 0.8),
                (id(4), "g".to_string(), 0.65),
            ];
            assert_eq!(r, want, "rotation {rotation}");
        }
    }

    #[test]
    fn filters_apply_before_the_cut() {
        let f = Filter::new(vec!["b".into(), "a".into(), "b".into()], None, Some(10.0));
        assert_eq!(f.categories, ["a", "b"]);
        let attrs = |cats: &[&str], price| Attrs {
            categories: cats.iter().map(|c| c.to_string()).collect(),
            price,
        };
        assert!(f.matches(&attrs(&["z", "b"], Some(10.0))));
        assert!(!f.matches(&attrs(&["b"], Some(10.5))), "too dear");
        assert!(!f.matches(&attrs(&["b"], None)), "no price with a bound");
        assert!(!f.matches(&attrs(&["c"], Some(1.0))));
        // The best image belongs to a product outside the filter: the next one is the
        // top 1, not an empty list.
        let mut c = VectorCache::new("m".into(), 2);
        c.upsert(
            img(1),
            &[1.0, 0.0],
            &attrs(&["c"], Some(1.0)),
            DateTime::MIN,
        );
        c.upsert(
            img(2),
            &[0.8, 0.6],
            &attrs(&["a"], Some(5.0)),
            DateTime::MIN,
        );
        c.upsert(
            img(3),
            &[0.6, 0.8],
            &attrs(&["b"], Some(50.0)),
            DateTime::MIN,
        );
        let q: &[f32] = &[1.0, 0.0];
        let query = [q];
        let ask = Ask {
            filter: Some(&f),
            ..Ask::one(&query, 1, 0.0)
        };
        assert_eq!(c.candidates(ask, 1), [img(2)]);
        let none = Filter::new(vec!["unknown".into()], None, None);
        assert!(c
            .candidates(
                Ask {
                    filter: Some(&none),
                    ..Ask::one(&[q], 3, 0.0)
                },
                3
            )
            .is_empty());
    }

    #[test]
    fn dot_products_agree() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.1).collect();
        let b: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.01).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-3);
    }

    #[test]
    fn parallel_candidates_equal_one_thread_including_ties() {
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
            // Two images a product, so the cut also has to keep each product once.
            c.upsert(
                ImageKey::new(
                    ProductId::from_bson(mongodb::bson::Bson::String(format!("p{}", n / 2))),
                    format!("u{n}"),
                ),
                &v,
                &Attrs::default(),
                DateTime::MIN,
            );
        }
        let q: Vec<f32> = (0..dim).map(|j| (j as f32 + 1.0) / 10.0).collect();
        for n in [1, 5, 50, 700] {
            let one = c.candidates_with(Ask::one(&[&q], n, 0.0), n, 1);
            assert_eq!(one.len(), n);
            for threads in [2, 3, 4, 7] {
                let many = c.candidates_with(Ask::one(&[&q], n, 0.0), n, threads);
                assert_eq!(many, one, "n {n}, {threads} threads");
            }
        }
    }

    #[test]
    fn a_scan_scores_each_row_as_dot_does() {
        let mut x = 7u32;
        let mut next = || {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for dim in [3, 64, 100, 512, 1280] {
            let query: Vec<f32> = (0..dim).map(|_| next()).collect();
            let rows: Vec<f32> = (0..dim * 50).map(|_| next()).collect();
            let mut scanned = Vec::new();
            scan(&rows, dim, &query, |_, s| scanned.push(s.to_bits()));
            let single: Vec<u32> = rows
                .chunks_exact(dim)
                .map(|r| dot(&query, r).to_bits())
                .collect();
            assert_eq!(scanned, single, "dim {dim}");
        }
    }

    #[test]
    fn shortlist_reads_back_what_can_be_in_the_top_and_widens_when_all_can() {
        let key = |n: u32| ImageKey::new(ProductId::from_bson(format!("p{n}").into()), "u");
        let at = DateTime::MIN;
        // Three clear leaders, then 97 far behind: the leaders alone.
        let mut c = VectorCache::new("m".into(), 2);
        for n in 0..100u32 {
            let a = if n < 3 {
                0.3 * n as f32
            } else {
                1.2 + n as f32 * 0.001
            };
            c.upsert(key(n), &[a.cos(), a.sin()], &Attrs::default(), at);
        }
        let q: &[f32] = &[1.0, 0.0];
        let query = [q];
        assert_eq!(c.shortlist(Ask::one(&query, 2, -1.0)), [key(0), key(1)]);
        // 100 look-alikes: every one could be in the top 2, past the first window.
        let mut same = VectorCache::new("m".into(), 2);
        for n in 0..100u32 {
            same.upsert(key(n), &[0.6, 0.8], &Attrs::default(), at);
        }
        assert_eq!(same.shortlist(Ask::one(&query, 2, -1.0)).len(), 100);
    }

    #[test]
    fn rows_stay_found_through_removals() {
        let key = |n: u32| ImageKey::new(ProductId::from_bson(format!("p{n}").into()), "u");
        let vector = |n: u32| [1.0, n as f32];
        let mut c = VectorCache::new("m".into(), 2);
        for n in 0..1000 {
            let at = DateTime::from_millis(n.into());
            c.upsert(key(n), &vector(n), &Attrs::default(), at);
        }
        for n in (0..1000).step_by(3) {
            c.remove(&key(n));
        }
        c.shrink();
        assert_eq!(c.len(), 666);
        for n in 0..1000 {
            let want = (n % 3 != 0).then(|| DateTime::from_millis(n.into()));
            assert_eq!(c.updated_at(&key(n)), want, "{n}");
        }
    }

    #[test]
    fn cache_upsert_remove_and_pick_candidates() {
        let mut c = VectorCache::new("m".into(), 2);
        c.upsert(img(1), &[1.0, 0.0], &Attrs::default(), DateTime::MIN);
        c.upsert(img(2), &[0.0, 1.0], &Attrs::default(), DateTime::MIN);
        c.upsert(img(3), &[0.6, 0.8], &Attrs::default(), DateTime::MIN);
        c.upsert(img(1), &[0.8, 0.6], &Attrs::default(), DateTime::MIN);
        c.remove(&img(2));
        assert_eq!(c.len(), 2);
        let q: &[f32] = &[1.0, 0.0];
        assert_eq!(c.candidates(Ask::one(&[q], 10, 0.0), 10), [img(1), img(3)]);
        // A threshold only the first reaches.
        assert_eq!(c.candidates(Ask::one(&[q], 10, 0.75), 10), [img(1)]);
        // Several queries: each product's best pair; one product left out.
        c.upsert(
            ImageKey::new(id(3), "second"),
            &[0.0, 1.0],
            &Attrs::default(),
            DateTime::MIN,
        );
        let (qa, qb): (&[f32], &[f32]) = (&[1.0, 0.0], &[0.0, 1.0]);
        let ask = Ask {
            queries: &[qa, qb],
            k: 10,
            threshold: 0.0,
            exclude: None,
            filter: None,
        };
        // Each image by its best query; every image of a product is a candidate.
        let second = ImageKey::new(id(3), "second");
        assert_eq!(c.candidates(ask, 10), [second.clone(), img(1), img(3)]);
        assert_eq!(c.candidates(ask, 1), [second]);
        let r = c.candidates(
            Ask {
                exclude: Some(&id(3)),
                ..ask
            },
            10,
        );
        assert_eq!(r, [img(1)]);
        c.remove(&ImageKey::new(id(3), "second"));
        c.remove(&img(1));
        c.remove(&img(3));
        assert!(c.is_empty());
    }
}
