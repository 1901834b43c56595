//! Product embeddings, kept in a MongoDB collection of our own (never the shop's).
//!
//! One document per product image, `_id` = `"<the product's _id> <image URL>"` (see
//! `ImageKey::doc_id`; the same for every instance, so writes are idempotent upserts):
//! `{ product, image_url, model, dim, vector: Binary(subtype 9, float32), category:
//! [string], price, status: "ok", updated_at }` or, when the image could not be used,
//! `{ product, image_url, model, status: "failed", error, updated_at }`. `category` and
//! `price` are the product's (CATEGORY_FIELD, PRICE_FIELD), kept beside the vector for
//! the request filters. Flat documents, one vector each, as Atlas
//! Vector Search indexes them. Each document is written whole in one operation, so a
//! crash leaves either the old document or the new one: never a vector for the wrong
//! image or model.
//!
//! Versions before several photos per product stored one document per product with
//! `_id` = the product's `_id` and no `product` field; `migrate_layout` carries those
//! over, and until it has, readers take them as the image they name.

use std::collections::HashMap;
use std::fmt;

use futures::TryStreamExt;
use mongodb::bson::{
    self, doc, oid::ObjectId, spec::BinarySubtype, Binary, Bson, DateTime, Document, RawDocumentBuf,
};
use mongodb::options::IndexOptions;
use mongodb::{Collection, Cursor, Database, IndexModel};

use crate::error::DatabaseError;

/// A product `_id` that can key a map. Mongoose ids are ObjectIds; anything else is kept
/// as its BSON value with its extended-JSON text as the key.
#[derive(Clone, Debug)]
pub enum ProductId {
    Oid(ObjectId),
    Other(String, Box<Bson>),
}

// Equality and hashing by ObjectId or by the extended-JSON key, never by the raw BSON.
impl PartialEq for ProductId {
    fn eq(&self, o: &Self) -> bool {
        match (self, o) {
            (ProductId::Oid(a), ProductId::Oid(b)) => a == b,
            (ProductId::Other(a, _), ProductId::Other(b, _)) => a == b,
            _ => false,
        }
    }
}
impl Eq for ProductId {}
impl std::hash::Hash for ProductId {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        match self {
            ProductId::Oid(o) => o.bytes().hash(h),
            ProductId::Other(k, _) => k.hash(h),
        }
    }
}

impl ProductId {
    pub fn from_bson(b: Bson) -> Self {
        match b {
            Bson::ObjectId(o) => ProductId::Oid(o),
            other => ProductId::Other(
                other.clone().into_relaxed_extjson().to_string(),
                Box::new(other),
            ),
        }
    }

    pub fn from_raw(b: bson::RawBsonRef<'_>) -> Option<Self> {
        match b {
            bson::RawBsonRef::ObjectId(o) => Some(ProductId::Oid(o)),
            other => other
                .to_raw_bson()
                .try_into()
                .ok()
                .map(ProductId::from_bson),
        }
    }

    pub fn to_bson(&self) -> Bson {
        match self {
            ProductId::Oid(o) => Bson::ObjectId(*o),
            ProductId::Other(_, b) => (**b).clone(),
        }
    }
}

impl fmt::Display for ProductId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProductId::Oid(o) => write!(f, "{o}"),
            ProductId::Other(s, _) => f.write_str(s),
        }
    }
}

/// One image of a product: what an embedding document is stored for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageKey {
    pub product: ProductId,
    pub url: String,
}

impl ImageKey {
    pub fn new(product: ProductId, url: impl Into<String>) -> Self {
        Self {
            product,
            url: url.into(),
        }
    }

    /// The embedding document's `_id`: a string, `<ObjectId hex> <url>`, or for another
    /// kind of product id `<length>:<its extended JSON> <url>` (no two images share
    /// one). A string and not a `{p, u}` document: SecantusDB finds documents by a
    /// document `_id` with a collection scan (an upsert of 3,000 took 26 ms each, against
    /// 0.27 ms by a string `_id`), and the readable form costs nothing elsewhere.
    pub fn doc_id(&self) -> Bson {
        Bson::String(match &self.product {
            ProductId::Oid(o) => format!("{o} {}", self.url),
            ProductId::Other(key, _) => format!("{}:{key} {}", key.len(), self.url),
        })
    }
}

/// What the request filters compare, stored beside each vector: the product's
/// categories (ObjectIds as hex, so both forms of an id match) and price.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Attrs {
    pub categories: Vec<String>,
    pub price: Option<f64>,
}

impl Attrs {
    fn insert_into(&self, d: &mut Document) {
        d.insert("category", self.categories.clone());
        d.insert("price", self.price.map_or(Bson::Null, Bson::Double));
    }
}

/// What we know about an image's stored embedding, without its vector.
#[derive(Clone, Debug)]
pub struct StoredMeta {
    /// Written by the one-per-product layout (no `product` field): `migrate_layout`
    /// carries it over.
    pub legacy: bool,
    pub attrs: Attrs,
    pub model: String,
    pub ok: bool,
    pub updated_at: DateTime,
}

/// The MongoDB binary vector format (subtype 9): dtype byte 0x27 (float32), padding 0,
/// then little-endian floats. Atlas Vector Search reads the same layout.
const VECTOR_F32_HEADER: [u8; 2] = [0x27, 0x00];

pub fn encode_vector(v: &[f32]) -> Binary {
    let mut bytes = Vec::with_capacity(2 + v.len() * 4);
    bytes.extend_from_slice(&VECTOR_F32_HEADER);
    for x in v {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    Binary {
        subtype: BinarySubtype::Vector,
        bytes,
    }
}

/// The float bytes of a stored vector (subtype 9 float32, or plain little-endian floats).
pub fn vector_bytes(subtype: BinarySubtype, bytes: &[u8]) -> Option<&[u8]> {
    let floats = match subtype {
        BinarySubtype::Vector if bytes.len() >= 2 && bytes[0] == VECTOR_F32_HEADER[0] => {
            &bytes[2..]
        }
        BinarySubtype::Generic => bytes,
        _ => return None,
    };
    (floats.len() % 4 == 0).then_some(floats)
}

pub fn decode_vector(floats: &[u8]) -> Vec<f32> {
    le_floats(floats).collect()
}

/// Little-endian f32s, as a stored vector holds them (a trailing partial float is
/// ignored; `vector_bytes` only gives whole ones).
pub fn le_floats(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

#[derive(Clone)]
pub struct EmbeddingStore {
    db: Database,
    coll: Collection<Document>,
    raw: Collection<RawDocumentBuf>,
}

impl EmbeddingStore {
    pub fn new(db: &Database, name: &str) -> Self {
        Self {
            db: db.clone(),
            coll: db.collection(name),
            raw: db.collection(name),
        }
    }

    /// Atlas Vector Search over this collection, through the index `index`.
    pub fn atlas(&self, index: &str) -> std::sync::Arc<crate::atlas::AtlasSearch> {
        crate::atlas::AtlasSearch::new(&self.db, self.coll.name(), index)
    }

    /// The indexes the counts and incremental passes (a few products' embeddings) use;
    /// creating them again is a no-op.
    pub async fn ensure_indexes(&self) -> mongodb::error::Result<()> {
        let index = |keys: Document, name: &str| {
            IndexModel::builder()
                .keys(keys)
                .options(IndexOptions::builder().name(name.to_string()).build())
                .build()
        };
        let indexes = [
            index(doc! { "model": 1, "status": 1 }, "model_status"),
            index(doc! { "product": 1 }, "product"),
        ];
        self.coll.create_indexes(indexes).await.map(|_| ())
    }

    /// Carries documents of the one-per-product layout over to the per-image one,
    /// vectors and all (nothing is recomputed): each is upserted under its new `_id`
    /// first and deleted under its old one after, so a crash in between leaves a
    /// duplicate that readers collapse and the next call removes. Returns how many
    /// were carried over.
    pub async fn migrate_layout(&self) -> Result<u64, DatabaseError> {
        let mut moved = 0;
        loop {
            let old: Vec<Document> = self
                .coll
                .find(doc! { "product": { "$exists": false } })
                .limit(1000)
                .await?
                .try_collect()
                .await?;
            if old.is_empty() {
                return Ok(moved);
            }
            let (mut upserts, mut old_ids) = (Vec::new(), Vec::new());
            for mut d in old {
                let Some(old_id) = d.remove("_id") else {
                    continue;
                };
                let url = d.get_str("image_url").unwrap_or_default().to_string();
                let key = ImageKey::new(ProductId::from_bson(old_id.clone()), url);
                let mut new = doc! { "_id": key.doc_id(), "product": old_id.clone() };
                new.extend(d);
                upserts.push(new);
                old_ids.push(old_id);
            }
            self.upsert_all(upserts).await?;
            moved += old_ids.len() as u64;
            self.coll
                .delete_many(doc! { "_id": { "$in": old_ids } })
                .await?;
        }
    }

    /// Every stored embedding's metadata (no vectors: cheap to read), parsed from raw
    /// documents. (With `CACHE_PRODUCTS=true` the service reads the metadata from the
    /// same scan that loads its cache instead: `VectorCache::load_with_metas`.)
    pub async fn metas(&self) -> mongodb::error::Result<HashMap<ImageKey, StoredMeta>> {
        self.metas_where(doc! {}).await
    }

    /// The metadata of `products`' embeddings (in the one-per-product layout too).
    pub async fn metas_of(
        &self,
        products: &[ProductId],
    ) -> mongodb::error::Result<HashMap<ImageKey, StoredMeta>> {
        let ids: Vec<Bson> = products.iter().map(ProductId::to_bson).collect();
        self.metas_where(
            doc! { "$or": [{ "product": { "$in": &ids } }, { "_id": { "$in": &ids } }] },
        )
        .await
    }

    async fn metas_where(
        &self,
        filter: Document,
    ) -> mongodb::error::Result<HashMap<ImageKey, StoredMeta>> {
        let mut cursor = self
            .raw
            .find(filter)
            .projection(doc! {
                "product": 1, "image_url": 1, "model": 1, "status": 1, "updated_at": 1,
                "category": 1, "price": 1,
            })
            .batch_size(5000)
            .await?;
        let mut out = HashMap::new();
        while cursor.advance().await? {
            if let Some((id, meta)) = raw_meta(cursor.current()) {
                out.insert(id, meta);
            }
        }
        Ok(out)
    }

    /// Stores a batch of vectors (`(image, its product's attributes, vector)`, the
    /// document layout above) and returns their update time.
    pub async fn put_vectors(
        &self,
        items: &[(&ImageKey, &Attrs, &[f32])],
        model: &str,
    ) -> Result<DateTime, DatabaseError> {
        let now = DateTime::now();
        let docs = items
            .iter()
            .map(|(key, attrs, vector)| {
                let mut d = doc! {
                    "_id": key.doc_id(),
                    "product": key.product.to_bson(),
                    "image_url": &key.url,
                    "model": model,
                    "dim": vector.len() as i32,
                    "vector": encode_vector(vector),
                };
                attrs.insert_into(&mut d);
                d.insert("status", "ok");
                d.insert("updated_at", now);
                d
            })
            .collect();
        self.upsert_all(docs).await?;
        Ok(now)
    }

    /// Sets the stored attributes of images whose product's category or price changed
    /// (the vector stays), in one `update` command; returns their update time, which
    /// moves so other instances' caches pick the change up.
    pub async fn set_attrs(
        &self,
        items: &[(&ImageKey, &Attrs)],
    ) -> Result<DateTime, DatabaseError> {
        let now = DateTime::now();
        let updates = items
            .iter()
            .map(|(key, attrs)| {
                let mut set = doc! { "updated_at": now };
                attrs.insert_into(&mut set);
                doc! { "q": { "_id": key.doc_id() }, "u": { "$set": set } }
            })
            .collect();
        self.update_command(updates).await?;
        Ok(now)
    }

    /// Writes whole documents by `_id` with one `update` command of one upserted
    /// replacement each. One round trip instead of one per document, and one command for
    /// the server to log: against SecantusDB a `replace_one` each (a retryable write)
    /// cost the server about 7 ms of CPU per product, on the cores the model needs, and
    /// this 0.4 ms. Idempotent, so not retried here: a failed batch fails the pass and
    /// the next pass redoes it.
    async fn upsert_all(&self, docs: Vec<Document>) -> Result<(), DatabaseError> {
        let updates: Vec<Document> = docs
            .into_iter()
            .map(|d| {
                let id = d.get("_id").cloned().unwrap_or(Bson::Null);
                doc! { "q": { "_id": id }, "u": d, "upsert": true }
            })
            .collect();
        self.update_command(updates).await
    }

    /// One `update` command of `updates` (unordered), with the URI's write concern.
    async fn update_command(&self, updates: Vec<Document>) -> Result<(), DatabaseError> {
        if updates.is_empty() {
            return Ok(());
        }
        let n = updates.len();
        let mut cmd = doc! {
            "update": self.coll.name(),
            "updates": updates,
            "ordered": false,
        };
        // The URI's write concern (`w=majority`...), which `run_command` does not add.
        if let Some(wc) = self.coll.write_concern() {
            let wc = bson::to_document(wc)
                .map_err(|e| DatabaseError::Write(format!("the URI's write concern: {e}")))?;
            if !wc.is_empty() {
                cmd.insert("writeConcern", wc);
            }
        }
        let reply = self.db.run_command(cmd).await?;
        if let Ok(errors) = reply.get_array("writeErrors") {
            if let Some(Bson::Document(first)) = errors.first() {
                return Err(DatabaseError::Write(format!(
                    "storing {} embeddings: {} failed, first: {}",
                    n,
                    errors.len(),
                    first.get_str("errmsg").unwrap_or("unknown error")
                )));
            }
        }
        if let Ok(wce) = reply.get_document("writeConcernError") {
            return Err(DatabaseError::Write(format!(
                "storing embeddings: write concern: {}",
                wce.get_str("errmsg").unwrap_or("unknown error")
            )));
        }
        Ok(())
    }

    pub async fn put_failure(
        &self,
        key: &ImageKey,
        model: &str,
        error: &str,
    ) -> mongodb::error::Result<()> {
        let d = doc! {
            "_id": key.doc_id(),
            "product": key.product.to_bson(),
            "image_url": &key.url,
            "model": model,
            "status": "failed",
            "error": error,
            "updated_at": DateTime::now(),
        };
        self.coll
            .replace_one(doc! { "_id": key.doc_id() }, d)
            .upsert(true)
            .await
            .map(|_| ())
    }

    pub async fn delete(&self, keys: &[ImageKey]) -> mongodb::error::Result<u64> {
        let mut deleted = 0;
        for chunk in keys.chunks(1000) {
            let ids: Vec<Bson> = chunk.iter().map(ImageKey::doc_id).collect();
            deleted += self
                .coll
                .delete_many(doc! { "_id": { "$in": ids } })
                .await?
                .deleted_count;
        }
        Ok(deleted)
    }

    /// The stored embedding documents, raw; `raw_vector(d, model)` picks a model's
    /// usable vectors. All of them: every document whole, with no filter
    /// and no projection, since nearly all are the current model's and a plain collection
    /// scan is the cheapest read (10,000 vectors from SecantusDB: 205 ms, against 499 ms
    /// with the model/status filter and a projection; the bytes are the same). Given
    /// images: those, found by `_id` alone (SecantusDB took 306 ms for 3 of 10,000 with
    /// the model and status beside the `_id`s, 1.0 ms without).
    pub async fn vectors(
        &self,
        keys: Option<&[ImageKey]>,
        batch_size: u32,
    ) -> mongodb::error::Result<Cursor<RawDocumentBuf>> {
        let filter = match keys {
            None => doc! {},
            Some(keys) => {
                let ids: Vec<Bson> = keys.iter().map(ImageKey::doc_id).collect();
                doc! { "_id": { "$in": ids } }
            }
        };
        self.raw.find(filter).batch_size(batch_size).await
    }

    /// The usable vectors of `model` stored for `images`: (URL, vector).
    pub async fn vectors_of(
        &self,
        model: &str,
        images: &[ImageKey],
    ) -> mongodb::error::Result<Vec<(String, Vec<f32>)>> {
        let mut cursor = self.vectors(Some(images), 100).await?;
        let mut out = Vec::new();
        while cursor.advance().await? {
            if let Some(v) = raw_vector(cursor.current(), model) {
                out.push((v.url.to_string(), decode_vector(v.floats)));
            }
        }
        Ok(out)
    }

    /// How many embedding documents there are, from the collection's metadata (cheap):
    /// an upper bound on the vectors of one model.
    pub async fn estimated_count(&self) -> mongodb::error::Result<u64> {
        self.coll.estimated_document_count().await
    }

    /// Stored images of `model` that are usable (`ok`) or failed, and the products
    /// they belong to: (images, products).
    pub async fn count(&self, model: &str, ok: bool) -> mongodb::error::Result<(u64, u64)> {
        let status = if ok { "ok" } else { "failed" };
        let filter = doc! { "model": model, "status": status };
        let images = self.coll.count_documents(filter.clone()).await?;
        let products = self.coll.distinct("product", filter).await?.len() as u64;
        Ok((images, products))
    }
}

/// The fields of a raw embedding document that readers use, found in one walk over it.
/// Each `RawDocument::get` walks the document from its start, and reading an image's
/// metadata, vector and attributes took about fifteen: a fifth of the CPU of loading
/// 10,000 vectors into the cache. A field of another type than the layout's is absent.
#[derive(Default)]
pub struct RawEmbedding<'a> {
    id: Option<bson::RawBsonRef<'a>>,
    product: Option<bson::RawBsonRef<'a>>,
    image_url: Option<&'a str>,
    model: Option<&'a str>,
    status: Option<&'a str>,
    vector: Option<bson::RawBinaryRef<'a>>,
    updated_at: Option<DateTime>,
    category: Option<&'a bson::RawArray>,
    price: Option<f64>,
}

impl<'a> RawEmbedding<'a> {
    /// The first occurrence of each field, as `get` finds it; a malformed document
    /// yields what came before the damage.
    pub fn parse(d: &'a bson::RawDocument) -> Self {
        use bson::RawBsonRef as R;
        let mut e = Self::default();
        for field in d.iter() {
            let Ok((key, value)) = field else { break };
            match (key, value) {
                ("_id", v) if e.id.is_none() => e.id = Some(v),
                ("product", v) if e.product.is_none() => e.product = Some(v),
                ("image_url", R::String(s)) if e.image_url.is_none() => e.image_url = Some(s),
                ("model", R::String(s)) if e.model.is_none() => e.model = Some(s),
                ("status", R::String(s)) if e.status.is_none() => e.status = Some(s),
                ("vector", R::Binary(b)) if e.vector.is_none() => e.vector = Some(b),
                ("updated_at", R::DateTime(t)) if e.updated_at.is_none() => e.updated_at = Some(t),
                ("category", R::Array(a)) if e.category.is_none() => e.category = Some(a),
                ("price", R::Double(f)) if e.price.is_none() => e.price = Some(f),
                _ => {}
            }
        }
        e
    }

    /// The product it belongs to: `product`, or in the old layout `_id`.
    fn product(&self) -> Option<ProductId> {
        ProductId::from_raw(self.product.or(self.id)?)
    }

    pub fn attrs(&self) -> Attrs {
        let categories = self.category.map_or_else(Vec::new, |a| {
            a.into_iter()
                .filter_map(|v| v.ok()?.as_str().map(str::to_string))
                .collect()
        });
        Attrs {
            categories,
            price: self.price,
        }
    }

    pub fn updated_at(&self) -> DateTime {
        self.updated_at.unwrap_or(DateTime::MIN)
    }

    /// Image and metadata.
    pub fn meta(&self) -> Option<(ImageKey, StoredMeta)> {
        let key = ImageKey::new(self.product()?, self.image_url?);
        let meta = StoredMeta {
            legacy: self.product.is_none(),
            attrs: self.attrs(),
            model: self.model.unwrap_or_default().to_string(),
            ok: self.status == Some("ok"),
            updated_at: self.updated_at(),
        };
        Some((key, meta))
    }

    /// The image and vector bytes, borrowed; `None` unless a usable vector of `model`.
    pub fn vector(&self, model: &str) -> Option<RawVector<'a>> {
        if self.model != Some(model) || self.status != Some("ok") {
            return None;
        }
        let bin = self.vector?;
        Some(RawVector {
            product: self.product()?,
            url: self.image_url?,
            floats: vector_bytes(bin.subtype, bin.bytes)?,
        })
    }
}

/// Image and metadata of a raw embedding document (from `metas()` or `vectors()`).
pub fn raw_meta(d: &bson::RawDocument) -> Option<(ImageKey, StoredMeta)> {
    RawEmbedding::parse(d).meta()
}

/// A usable vector in a raw `vectors()` document, borrowed from it.
pub struct RawVector<'a> {
    pub product: ProductId,
    pub url: &'a str,
    /// Little-endian f32s.
    pub floats: &'a [u8],
}

impl RawVector<'_> {
    pub fn key(&self) -> ImageKey {
        ImageKey::new(self.product.clone(), self.url)
    }
}

/// Reads the image and the vector bytes out of a raw `vectors()` document without
/// copying; `None` unless it is a usable vector of `model`.
pub fn raw_vector<'a>(d: &'a bson::RawDocument, model: &str) -> Option<RawVector<'a>> {
    RawEmbedding::parse(d).vector(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_round_trip_in_the_mongodb_vector_format() {
        let v = vec![0.25f32, -1.5, 3.0];
        let b = encode_vector(&v);
        assert_eq!(b.subtype, BinarySubtype::Vector);
        assert_eq!(&b.bytes[..2], &[0x27, 0x00]);
        let floats = vector_bytes(b.subtype, &b.bytes).unwrap();
        assert_eq!(decode_vector(floats), v);
        assert!(vector_bytes(BinarySubtype::Vector, &[0x03, 0x00, 1]).is_none());
    }

    #[test]
    fn image_ids_are_readable_and_never_shared() {
        let o = ObjectId::parse_str("65a1f0c2e4b0a1b2c3d4e5f6").unwrap();
        let key = ImageKey::new(ProductId::Oid(o), "https://x/a.jpg");
        assert_eq!(
            key.doc_id(),
            Bson::String("65a1f0c2e4b0a1b2c3d4e5f6 https://x/a.jpg".into())
        );
        let s = |id: &str, url: &str| {
            ImageKey::new(ProductId::from_bson(Bson::String(id.into())), url).doc_id()
        };
        assert_eq!(s("sku 1", "u"), Bson::String("7:\"sku 1\" u".into()));
        // A space in the id or in the URL cannot make two images one.
        assert_ne!(s("a b", "c"), s("a", "b c"));
        assert_ne!(
            s("65a1f0c2e4b0a1b2c3d4e5f6", "https://x/a.jpg"),
            key.doc_id()
        );
    }

    #[test]
    fn one_walk_reads_what_each_layout_stores() {
        let o = ObjectId::new();
        let at = DateTime::from_millis(1_700_000_000_000);
        let raw = |d: Document| RawDocumentBuf::from_document(&d).unwrap();
        // The current layout, fields in another order than put_vectors writes them.
        let d = raw(doc! {
            "status": "ok", "price": 12.5, "vector": encode_vector(&[1.0, -2.0]),
            "_id": "x", "updated_at": at, "model": "m", "image_url": "https://x/a.jpg",
            "category": ["c1", 7, "c2"], "product": o,
        });
        let (key, meta) = raw_meta(&d).unwrap();
        assert_eq!(key, ImageKey::new(ProductId::Oid(o), "https://x/a.jpg"));
        assert!(!meta.legacy && meta.ok && meta.model == "m" && meta.updated_at == at);
        let attrs = Attrs {
            categories: vec!["c1".into(), "c2".into()],
            price: Some(12.5),
        };
        assert_eq!(meta.attrs, attrs);
        assert_eq!(RawEmbedding::parse(&d).attrs(), attrs);
        let v = raw_vector(&d, "m").unwrap();
        assert_eq!((v.key(), decode_vector(v.floats)), (key, vec![1.0, -2.0]));
        assert!(raw_vector(&d, "other").is_none());
        // The one-per-product layout: the product is the `_id`.
        let legacy = raw(
            doc! { "_id": o, "image_url": "u", "model": "m", "status": "ok",
            "vector": encode_vector(&[0.5]) },
        );
        let (key, meta) = raw_meta(&legacy).unwrap();
        assert!(meta.legacy && meta.updated_at == DateTime::MIN);
        assert_eq!(key.product, ProductId::Oid(o));
        assert_eq!(meta.attrs, Attrs::default());
        // A failure, and fields of the wrong type: no vector, no price.
        let failed = raw(doc! { "product": o, "image_url": "u", "model": "m",
        "status": "failed", "price": "12" });
        assert!(!raw_meta(&failed).unwrap().1.ok);
        assert!(raw_vector(&failed, "m").is_none());
        assert_eq!(RawEmbedding::parse(&failed).attrs().price, None);
        let no_url = raw(
            doc! { "product": o, "image_url": 3, "model": "m", "status": "ok",
            "vector": encode_vector(&[0.5]) },
        );
        assert!(raw_meta(&no_url).is_none() && raw_vector(&no_url, "m").is_none());
    }

    #[test]
    fn product_ids_key_maps() {
        let o = ObjectId::new();
        assert_eq!(ProductId::from_bson(Bson::ObjectId(o)), ProductId::Oid(o));
        let s = ProductId::from_bson(Bson::String("sku-1".into()));
        assert_eq!(s.to_bson(), Bson::String("sku-1".into()));
        assert_ne!(s, ProductId::from_bson(Bson::Int32(1)));
    }
}
