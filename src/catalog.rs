//! The shop's products collection: read-only. Which products are searchable and where
//! their photos are (PRODUCT_IMAGE_FIELD), and their documents projected to the fields
//! the frontend renders.

use std::collections::HashMap;

use futures::TryStreamExt;
use mongodb::action::Find;
use mongodb::bson::{doc, oid::ObjectId, Bson, Document};
use mongodb::change_stream::event::{ChangeStreamEvent, ResumeToken};
use mongodb::change_stream::ChangeStream;
use mongodb::Collection;
use serde_json::{Map, Value};

use crate::config::CatalogSettings;
use crate::store::{Attrs, ImageKey, ProductId};

/// The searchable products' images, and each product's filter attributes.
#[derive(Debug, Default)]
pub struct Searchable {
    pub images: Vec<ImageKey>,
    pub attrs: HashMap<ProductId, Attrs>,
}

#[derive(Clone)]
pub struct Catalog {
    coll: Collection<Document>,
    fields: Vec<String>,
    /// PRODUCT_IMAGE_FIELD, each path split at its dots.
    image_paths: Vec<Vec<String>>,
    /// CATEGORY_FIELD and PRICE_FIELD, split at their dots.
    category_path: Vec<String>,
    price_path: Vec<String>,
    max_products: usize,
    /// PRODUCT_FILTER: what else a product must match to be searchable.
    filter: Option<Document>,
}

impl Catalog {
    pub fn new(coll: Collection<Document>, settings: &CatalogSettings) -> Self {
        Self {
            coll,
            fields: settings.product_fields.clone(),
            image_paths: settings
                .product_image_field
                .iter()
                .map(|p| split_path(p))
                .collect(),
            category_path: split_path(&settings.category_field),
            price_path: split_path(&settings.price_field),
            max_products: settings.max_products,
            filter: settings.product_filter.clone(),
        }
    }

    /// Every image of the products that have one at PRODUCT_IMAGE_FIELD and match
    /// PRODUCT_FILTER, each image once per product; with `max_products` > 0 the first
    /// that many products by `_id`. Without a cap, products are read with no sort and
    /// only PRODUCT_FILTER as the filter (the photo check is made here): nearly every
    /// product has a photo, and that filter and the sort made this read take twice as
    /// long (10,000 products from SecantusDB: 442 ms with them, 223 ms without). It runs
    /// on every index pass. A value that is not an http(s) URL is returned too: fetching
    /// it fails, and it is recorded as a failed image.
    pub async fn searchable(&self) -> mongodb::error::Result<Searchable> {
        let find = if self.max_products > 0 {
            self.coll
                .find(self.with_filter(self.has_image_filter()))
                .sort(doc! { "_id": 1 })
                .limit(self.max_products as i64)
        } else {
            self.coll.find(self.filter.clone().unwrap_or_default())
        };
        self.read_searchable(find).await
    }

    /// The images and attributes of those of `ids` that are searchable now (MAX_PRODUCTS
    /// aside): what an incremental pass compares with their stored embeddings.
    pub async fn searchable_among(&self, ids: &[ProductId]) -> mongodb::error::Result<Searchable> {
        let bson_ids: Vec<Bson> = ids.iter().map(ProductId::to_bson).collect();
        let find = self
            .coll
            .find(self.with_filter(doc! { "_id": { "$in": bson_ids } }));
        self.read_searchable(find).await
    }

    async fn read_searchable(
        &self,
        find: Find<'_, Document>,
    ) -> mongodb::error::Result<Searchable> {
        let mut projection = self.images_projection();
        for path in [&self.category_path, &self.price_path] {
            projection.insert(path[0].as_str(), 1);
        }
        let find = find.projection(projection).batch_size(5000);
        let mut cursor = find.await?;
        let mut out = Searchable::default();
        while let Some(d) = cursor.try_next().await? {
            let Some(id) = d.get("_id") else {
                continue;
            };
            let id = ProductId::from_bson(id.clone());
            let images = self.images(&id, &d);
            if !images.is_empty() {
                out.images.extend(images);
                out.attrs.insert(id, self.attrs(&d));
            }
        }
        Ok(out)
    }

    /// The fields PRODUCT_IMAGE_FIELD reads.
    fn images_projection(&self) -> Document {
        let mut projection = Document::new();
        for path in &self.image_paths {
            projection.insert(path[0].as_str(), 1);
        }
        projection
    }

    /// A product document's images, each once.
    fn images(&self, id: &ProductId, d: &Document) -> Vec<ImageKey> {
        let mut values = Vec::new();
        for path in &self.image_paths {
            values_at(d, path, &mut values);
        }
        let mut out: Vec<ImageKey> = Vec::with_capacity(values.len());
        for url in values.into_iter().filter_map(image_url) {
            if !out.iter().any(|k| k.url == url) {
                out.push(ImageKey::new(id.clone(), url));
            }
        }
        out
    }

    /// A product document's categories and price, as the filters compare them.
    fn attrs(&self, d: &Document) -> Attrs {
        let mut values = Vec::new();
        values_at(d, &self.category_path, &mut values);
        let mut categories: Vec<String> = values.into_iter().filter_map(category_text).collect();
        categories.sort_unstable();
        categories.dedup();
        let mut prices = Vec::new();
        values_at(d, &self.price_path, &mut prices);
        Attrs {
            categories,
            price: prices.into_iter().find_map(price_number),
        }
    }

    /// Products with something at one of the image paths (the values are checked as
    /// they are read).
    fn has_image_filter(&self) -> Document {
        let any: Vec<Document> = self
            .image_paths
            .iter()
            .map(|p| doc! { p.join("."): { "$nin": [Bson::Null, ""] } })
            .collect();
        match any.len() {
            1 => any.into_iter().next().unwrap_or_default(),
            _ => doc! { "$or": any },
        }
    }

    /// The images of the product whose `_id` is `id` as the frontend sends it (the hex
    /// of an ObjectId, or a string `_id`), if it exists, matches PRODUCT_FILTER and has
    /// a photo.
    pub async fn searchable_images(&self, id: &str) -> mongodb::error::Result<Vec<ImageKey>> {
        let mut candidates = vec![Bson::String(id.to_string())];
        if let Ok(oid) = ObjectId::parse_str(id) {
            candidates.insert(0, Bson::ObjectId(oid));
        }
        let found = self
            .coll
            .find_one(self.with_filter(doc! { "_id": { "$in": candidates } }))
            .projection(self.images_projection())
            .await?;
        let product = found.as_ref().and_then(|d| Some((d.get("_id")?, d)));
        Ok(product.map_or_else(Vec::new, |(id, d)| {
            self.images(&ProductId::from_bson(id.clone()), d)
        }))
    }

    /// Whether MAX_PRODUCTS caps the catalogue: an incremental pass would not know which
    /// products the cap keeps, so changes are then found by full passes only.
    pub fn capped(&self) -> bool {
        self.max_products > 0
    }

    /// The products collection's changes after `token` (or from now): only each event's
    /// kind and document `_id` are sent, which is all an incremental pass needs (it reads
    /// the products themselves, with the filter).
    pub async fn watch(
        &self,
        token: Option<ResumeToken>,
    ) -> mongodb::error::Result<ChangeStream<ChangeStreamEvent<Document>>> {
        // The driver needs `_id`, `operationType` and `ns` to resume.
        let pipeline = [doc! { "$project": { "operationType": 1, "ns": 1, "documentKey": 1 } }];
        self.coll
            .watch()
            .pipeline(pipeline)
            .resume_after(token)
            .max_await_time(std::time::Duration::from_secs(1))
            .await
    }

    pub async fn count_all(&self) -> mongodb::error::Result<u64> {
        self.coll.estimated_document_count().await
    }

    /// The documents of `ids` that still exist and match PRODUCT_FILTER, projected to
    /// the configured fields and converted to the JSON the frontend reads.
    pub async fn documents(
        &self,
        ids: &[ProductId],
    ) -> mongodb::error::Result<HashMap<ProductId, Value>> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let mut projection = Document::new();
        for f in &self.fields {
            projection.insert(f.as_str(), 1);
        }
        if !self.fields.iter().any(|f| f == "_id") {
            projection.insert("_id", 1);
        }
        let bson_ids: Vec<Bson> = ids.iter().map(ProductId::to_bson).collect();
        // The filter again: a product hidden since the last pass is not returned.
        let mut cursor = self
            .coll
            .find(self.with_filter(doc! { "_id": { "$in": bson_ids } }))
            .projection(projection)
            .await?;
        let mut out = HashMap::with_capacity(ids.len());
        while let Some(mut d) = cursor.try_next().await? {
            let Some(id) = d.get("_id").cloned() else {
                continue;
            };
            if !self.fields.iter().any(|f| f == "_id") {
                d.remove("_id");
            }
            out.insert(ProductId::from_bson(id), document_to_json(d));
        }
        Ok(out)
    }
}

impl Catalog {
    /// `query` and PRODUCT_FILTER both.
    fn with_filter(&self, query: Document) -> Document {
        match &self.filter {
            Some(f) => doc! { "$and": [query, f.clone()] },
            None => query,
        }
    }
}

fn split_path(p: &str) -> Vec<String> {
    p.split('.').map(str::to_string).collect()
}

/// The values at a dotted `path` of `d`, through arrays at any level (as MongoDB reads
/// dotted paths; arrays at the end give their items).
fn values_at<'a>(d: &'a Document, path: &[String], out: &mut Vec<&'a Bson>) {
    fn walk<'a>(v: &'a Bson, rest: &[String], out: &mut Vec<&'a Bson>) {
        match (v, rest.split_first()) {
            (Bson::Array(items), _) => items.iter().for_each(|i| walk(i, rest, out)),
            (v, None) => out.push(v),
            (Bson::Document(d), Some((field, rest))) => {
                if let Some(inner) = d.get(field) {
                    walk(inner, rest, out)
                }
            }
            _ => {}
        }
    }
    if let Some((first, rest)) = path.split_first() {
        if let Some(v) = d.get(first) {
            walk(v, rest, out);
        }
    }
}

/// A category as the `category` filter compares it: an ObjectId's hex, a string, a
/// number's text.
fn category_text(v: &Bson) -> Option<String> {
    match v {
        Bson::ObjectId(o) => Some(o.to_hex()),
        Bson::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Bson::Int32(i) => Some(i.to_string()),
        Bson::Int64(i) => Some(i.to_string()),
        _ => None,
    }
}

/// A price as the price filters compare it: any BSON number, or a string holding one.
fn price_number(v: &Bson) -> Option<f64> {
    let f = match v {
        Bson::Double(f) => *f,
        Bson::Int32(i) => f64::from(*i),
        Bson::Int64(i) => *i as f64,
        Bson::Decimal128(d) => d.to_string().parse().ok()?,
        Bson::String(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    f.is_finite().then_some(f)
}

/// An image URL as PRODUCT_IMAGE_FIELD holds one: a string, or an object's `url`
/// string; blank ones are none.
fn image_url(v: &Bson) -> Option<String> {
    let s = match v {
        Bson::String(s) => s,
        Bson::Document(d) => d.get_str("url").ok()?,
        _ => return None,
    };
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// BSON -> the JSON the old service produced: ObjectIds as hex strings, dates as
/// ISO-8601 strings with milliseconds, numbers as numbers.
pub fn bson_to_json(b: Bson) -> Value {
    match b {
        Bson::ObjectId(o) => Value::String(o.to_hex()),
        Bson::DateTime(d) => Value::String(
            d.try_to_rfc3339_string()
                .map(|s| iso_millis(&s))
                .unwrap_or_else(|_| d.timestamp_millis().to_string()),
        ),
        Bson::Double(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        Bson::Int32(i) => Value::from(i),
        Bson::Int64(i) => Value::from(i),
        Bson::Decimal128(d) => d
            .to_string()
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or_else(|| Value::String(d.to_string()), Value::Number),
        Bson::String(s) => Value::String(s),
        Bson::Boolean(b) => Value::Bool(b),
        Bson::Null | Bson::Undefined => Value::Null,
        Bson::Array(a) => Value::Array(a.into_iter().map(bson_to_json).collect()),
        Bson::Document(d) => document_to_json(d),
        other => other.into_relaxed_extjson(),
    }
}

pub fn document_to_json(d: Document) -> Value {
    Value::Object(
        d.into_iter()
            .map(|(k, v)| (k, bson_to_json(v)))
            .collect::<Map<_, _>>(),
    )
}

/// `2025-01-02T05:16:41Z` -> `2025-01-02T05:16:41.000Z`, as JavaScript's toISOString writes.
fn iso_millis(s: &str) -> String {
    match s.strip_suffix('Z') {
        Some(body) if !body.contains('.') => format!("{body}.000Z"),
        _ => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{oid::ObjectId, DateTime};

    #[test]
    fn images_are_found_in_every_shape() {
        let d = doc! {
            "productImage": " http://x/a.jpg ",
            "image": { "url": "http://x/b.jpg", "public_id": "b" },
            "images": ["http://x/c.jpg", { "url": "http://x/d.jpg" }, 5, "", ["http://x/e.jpg"]],
            "gallery": [{ "src": { "url": "http://x/f.jpg" } }, { "src": "http://x/g.jpg" }],
            "avatar": null,
        };
        let found = |path: &str| {
            let mut values = Vec::new();
            values_at(&d, &split_path(path), &mut values);
            values.into_iter().filter_map(image_url).collect::<Vec<_>>()
        };
        assert_eq!(found("productImage"), ["http://x/a.jpg"]);
        assert_eq!(found("image"), ["http://x/b.jpg"]);
        assert_eq!(found("image.url"), ["http://x/b.jpg"]);
        assert_eq!(
            found("images"),
            ["http://x/c.jpg", "http://x/d.jpg", "http://x/e.jpg"]
        );
        assert_eq!(found("gallery.src"), ["http://x/f.jpg", "http://x/g.jpg"]);
        assert!(found("avatar").is_empty());
        assert!(found("missing.url").is_empty());
        assert!(found("image.public_id.x").is_empty());
    }

    #[test]
    fn categories_and_prices_are_read_in_every_shape() {
        let o = ObjectId::parse_str("65a1e9c2e4b0a1b2c3d4e5f6").unwrap();
        let d = doc! {
            "one": o, "many": [o, "shoes", " ", 7], "nested": [{ "id": "a" }, { "id": "b" }],
            "int": 250000, "double": 12.5, "text": " 99.9 ", "bad": "n/a",
        };
        let texts = |path: &str| {
            let mut v = Vec::new();
            values_at(&d, &split_path(path), &mut v);
            v.into_iter().filter_map(category_text).collect::<Vec<_>>()
        };
        assert_eq!(texts("one"), ["65a1e9c2e4b0a1b2c3d4e5f6"]);
        assert_eq!(texts("many"), ["65a1e9c2e4b0a1b2c3d4e5f6", "shoes", "7"]);
        assert_eq!(texts("nested.id"), ["a", "b"]);
        assert!(texts("missing").is_empty());
        let price = |path: &str| {
            let mut v = Vec::new();
            values_at(&d, &split_path(path), &mut v);
            v.into_iter().find_map(price_number)
        };
        assert_eq!(price("int"), Some(250000.0));
        assert_eq!(price("double"), Some(12.5));
        assert_eq!(price("text"), Some(99.9));
        assert_eq!(price("bad"), None);
        assert_eq!(price("missing"), None);
    }

    #[test]
    fn bson_converts_like_the_old_service() {
        let o = ObjectId::parse_str("65a1f0c2e4b0a1b2c3d4e5f6").unwrap();
        let d = DateTime::from_millis(1_735_795_001_123);
        let doc = doc! { "_id": o, "createdAt": d, "productPrice": 250000, "averageRating": 4.5,
        "tags": ["a"], "at0": DateTime::from_millis(1_735_795_001_000) };
        let v = document_to_json(doc);
        assert_eq!(v["_id"], "65a1f0c2e4b0a1b2c3d4e5f6");
        assert_eq!(v["createdAt"], "2025-01-02T05:16:41.123Z");
        assert_eq!(v["at0"], "2025-01-02T05:16:41.000Z");
        assert_eq!(v["productPrice"], 250000);
        assert_eq!(v["averageRating"], 4.5);
        assert_eq!(v["tags"][0], "a");
    }
}
