//! The shop's products collection: read-only. Which products are searchable, and their
//! documents projected to the fields the frontend renders.

use std::collections::HashMap;

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::Collection;
use serde_json::{Map, Value};

use crate::config::CatalogSettings;
use crate::store::ProductId;

/// A searchable product: its id and the image its embedding is made from.
#[derive(Clone, Debug, PartialEq)]
pub struct ProductRef {
    pub id: ProductId,
    pub image_url: String,
}

#[derive(Clone)]
pub struct Catalog {
    coll: Collection<Document>,
    fields: Vec<String>,
    max_products: usize,
    /// PRODUCT_FILTER: what else a product must match to be searchable.
    filter: Option<Document>,
}

impl Catalog {
    pub fn new(coll: Collection<Document>, settings: &CatalogSettings) -> Self {
        Self {
            coll,
            fields: settings.product_fields.clone(),
            max_products: settings.max_products,
            filter: settings.product_filter.clone(),
        }
    }

    /// Products whose `productImage` is a non-empty string and that match
    /// PRODUCT_FILTER; with `max_products` > 0 the first that many by `_id`. Without a
    /// cap, products are read with no sort and only PRODUCT_FILTER as the filter (the
    /// photo check is made here): nearly every product has a photo, and that filter and
    /// the sort made this read take twice as long (10,000 products from SecantusDB:
    /// 442 ms with them, 223 ms without). It runs on every index pass.
    pub async fn searchable(&self) -> mongodb::error::Result<Vec<ProductRef>> {
        let find = if self.max_products > 0 {
            self.coll
                .find(self.with_filter(searchable_filter()))
                .sort(doc! { "_id": 1 })
                .limit(self.max_products as i64)
        } else {
            self.coll.find(self.filter.clone().unwrap_or_default())
        };
        let find = find.projection(doc! { "productImage": 1 }).batch_size(5000);
        let mut cursor = find.await?;
        let mut out = Vec::new();
        while let Some(d) = cursor.try_next().await? {
            let (Some(id), Ok(url)) = (d.get("_id"), d.get_str("productImage")) else {
                continue;
            };
            let url = url.trim();
            if !url.is_empty() {
                out.push(ProductRef {
                    id: ProductId::from_bson(id.clone()),
                    image_url: url.to_string(),
                });
            }
        }
        Ok(out)
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

pub fn searchable_filter() -> Document {
    doc! { "productImage": { "$type": "string", "$ne": "" } }
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
