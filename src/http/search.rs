//! The search endpoints: by image URL, by upload, and similar to a product. Parameters
//! come as query parameters (what the frontend sends) or, for `/search/url`, as a JSON
//! body with the same names.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use serde_json::{Map, Value};

use crate::config::SearchSettings;
use crate::error::{AppError, ImageError};
use crate::rank::Filter;
use crate::search::{SearchResult, Searched};
use crate::service::AppState;
use crate::vectors::RankQuery;

/// The results, and where the time went as a `Server-Timing` header (browsers' developer
/// tools show it; the benchmark reads it).
type Results = Result<([(header::HeaderName, String); 1], Json<Vec<SearchResult>>), AppError>;

fn timed((results, timings): Searched) -> Results {
    Ok((
        [(
            header::HeaderName::from_static("server-timing"),
            timings.header_value(),
        )],
        Json(results),
    ))
}
type QueryParams = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// `POST /api/v1/search/url?image_url=..&top_k=..&threshold=..` or with a JSON body.
pub async fn by_url(
    State(state): State<AppState>,
    query: QueryParams,
    headers: HeaderMap,
    body: Bytes,
) -> Results {
    let body = json_object(&headers, &body)?;
    let params = SearchParams::parse(state.search_defaults(), &query_map(query)?, body.as_ref())?;
    let url = params
        .image_url
        .ok_or_else(|| AppError::Unprocessable("image_url is required".into()))?;
    timed(state.search().by_url(&url, &params.rank).await?)
}

/// `POST /api/v1/search/image?top_k=..&threshold=..`, multipart with the image in `file`.
pub async fn by_upload(
    State(state): State<AppState>,
    query: QueryParams,
    multipart: Result<Multipart, MultipartRejection>,
) -> Results {
    let params = SearchParams::parse(state.search_defaults(), &query_map(query)?, None)?;
    let mut multipart = multipart.map_err(|e| {
        AppError::Unprocessable(format!(
            "send the image as multipart/form-data in the field `file` ({})",
            e.body_text()
        ))
    })?;
    let bytes = read_file_field(&mut multipart, state.max_image_bytes()).await?;
    timed(state.search().by_bytes(bytes, &params.rank).await?)
}

/// `GET /api/v1/products/{id}/similar?top_k=..&threshold=..`: from the product's stored
/// embeddings, no image and no model run.
pub async fn similar(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: QueryParams,
) -> Results {
    let params = SearchParams::parse(state.search_defaults(), &query_map(query)?, None)?;
    timed(state.search().similar(&id, &params.rank).await?)
}

/// The parameters each search reads (query parameters, and for `/search/url` the JSON
/// body's fields), as the OpenAPI document must list them.
pub const URL_PARAMETERS: &[&str] = &[IMAGE_URL, TOP_K, THRESHOLD, CATEGORY, MIN_PRICE, MAX_PRICE];
pub const UPLOAD_PARAMETERS: &[&str] = &[TOP_K, THRESHOLD, CATEGORY, MIN_PRICE, MAX_PRICE];
pub const SIMILAR_PARAMETERS: &[&str] = UPLOAD_PARAMETERS;
const IMAGE_URL: &str = "image_url";
const TOP_K: &str = "top_k";
const THRESHOLD: &str = "threshold";
const CATEGORY: &str = "category";
const MIN_PRICE: &str = "min_price";
const MAX_PRICE: &str = "max_price";

/// Validated search parameters.
#[derive(Debug, PartialEq)]
pub struct SearchParams {
    pub image_url: Option<String>,
    /// What the vector index is asked for.
    pub rank: RankQuery,
}

impl SearchParams {
    /// Merges query parameters and (optionally) a JSON object; the body wins. A query
    /// parameter given twice counts once, the last, except `category`, which takes
    /// every value given (and comma-separated lists).
    fn parse(
        cfg: &SearchSettings,
        query: &HashMap<String, Vec<String>>,
        body: Option<&Map<String, Value>>,
    ) -> Result<Self, AppError> {
        let from_body = |name: &str| body.and_then(|b| b.get(name).filter(|v| !v.is_null()));
        let get = |name: &str| -> Option<Value> {
            from_body(name).cloned().or_else(|| {
                query
                    .get(name)
                    .and_then(|v| v.last())
                    .map(|s| Value::String(s.clone()))
            })
        };
        let invalid =
            |what: &str, v: &Value| AppError::Unprocessable(format!("{what}, got {}", show(v)));
        let top_k = match get(TOP_K) {
            None => cfg.top_k,
            Some(v) => match number(&v).filter(|n| n.fract() == 0.0) {
                Some(n) if (1.0..=50.0).contains(&n) => n as usize,
                _ => return Err(invalid("top_k must be an integer from 1 to 50", &v)),
            },
        };
        let threshold = match get(THRESHOLD) {
            None => cfg.similarity_threshold,
            Some(v) => match number(&v) {
                Some(n) if (0.0..=1.0).contains(&n) => n as f32,
                _ => return Err(invalid("threshold must be a number from 0 to 1", &v)),
            },
        };
        let image_url = match get(IMAGE_URL) {
            None => None,
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
            Some(v) => return Err(invalid("image_url must be a non-empty string", &v)),
        };
        let categories = match from_body(CATEGORY) {
            Some(v) => categories(std::slice::from_ref(v)),
            None => match query.get(CATEGORY) {
                Some(values) => {
                    let values: Vec<Value> = values.iter().cloned().map(Value::String).collect();
                    categories(&values)
                }
                None => Ok(Vec::new()),
            },
        };
        let categories = categories.map_err(|v| {
            invalid(
                "category must be a non-empty string (an id or a name) or a list of them",
                &v,
            )
        })?;
        let price = |name: &str| match get(name) {
            None => Ok(None),
            Some(v) => number(&v)
                .map(Some)
                .ok_or_else(|| invalid(&format!("{name} must be a number"), &v)),
        };
        let (min_price, max_price) = (price(MIN_PRICE)?, price(MAX_PRICE)?);
        if let (Some(lo), Some(hi)) = (min_price, max_price) {
            if lo > hi {
                return Err(AppError::Unprocessable(format!(
                    "min_price must not exceed max_price, got {lo} and {hi}"
                )));
            }
        }
        Ok(Self {
            image_url,
            rank: RankQuery {
                top_k,
                threshold,
                filter: Filter::new(categories, min_price, max_price),
            },
        })
    }
}

/// The `category` values: strings (each may list several, comma-separated) or arrays of
/// them; an empty one is an error (the value is returned to name it).
fn categories(values: &[Value]) -> Result<Vec<String>, Value> {
    let mut out = Vec::new();
    for v in values {
        match v {
            Value::String(s) => {
                for part in s.split(',') {
                    let part = part.trim();
                    if part.is_empty() {
                        return Err(v.clone());
                    }
                    out.push(part.to_string());
                }
            }
            Value::Array(items) if !items.is_empty() => {
                let nested = categories(items).map_err(|_| v.clone())?;
                out.extend(nested);
            }
            other => return Err(other.clone()),
        }
    }
    Ok(out)
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        _ => None,
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

fn query_map(q: QueryParams) -> Result<HashMap<String, Vec<String>>, AppError> {
    let Query(pairs) =
        q.map_err(|e| AppError::Unprocessable(format!("invalid query string: {}", e.body_text())))?;
    let mut map: HashMap<String, Vec<String>> = HashMap::new();
    for (k, v) in pairs {
        map.entry(k).or_default().push(v);
    }
    Ok(map)
}

/// The JSON object body of `/search/url`, if there is a body.
fn json_object(headers: &HeaderMap, body: &[u8]) -> Result<Option<Map<String, Value>>, AppError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|ct| ct.contains("json"));
    if !is_json {
        return Err(AppError::Unprocessable(
            "send the parameters as query parameters or as a JSON body".into(),
        ));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        Ok(_) => Err(AppError::Unprocessable(
            "the JSON body must be an object".into(),
        )),
        Err(e) => Err(AppError::Unprocessable(format!(
            "the JSON body is not valid JSON: {e}"
        ))),
    }
}

/// The `file` field's bytes, refusing more than `max` while reading.
async fn read_file_field(multipart: &mut Multipart, max: usize) -> Result<Bytes, AppError> {
    let failed = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            AppError::Image(ImageError::TooLarge { limit: max })
        } else {
            AppError::BadRequest(format!("invalid multipart body: {}", e.body_text()))
        }
    };
    while let Some(mut field) = multipart.next_field().await.map_err(failed)? {
        if field.name() != Some("file") {
            continue;
        }
        let mut buf = bytes::BytesMut::new();
        while let Some(chunk) = field.chunk().await.map_err(failed)? {
            if buf.len() + chunk.len() > max {
                return Err(AppError::Image(ImageError::TooLarge { limit: max }));
            }
            buf.extend_from_slice(&chunk);
        }
        return Ok(buf.freeze());
    }
    Err(AppError::Unprocessable(
        "the multipart body has no field `file`".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(query: &str, body: Option<Value>) -> Result<SearchParams, AppError> {
        let Query(pairs): Query<Vec<(String, String)>> =
            Query::try_from_uri(&format!("http://x/?{query}").parse().unwrap()).unwrap();
        let map = query_map(Ok(Query(pairs))).unwrap();
        let cfg = crate::config::Config::defaults().search;
        SearchParams::parse(&cfg, &map, body.as_ref().and_then(Value::as_object))
    }

    #[test]
    fn filters_come_from_the_query_or_the_body() {
        let f = parse("category=b,a&category=c&min_price=10&max_price=20.5", None)
            .unwrap()
            .rank
            .filter;
        assert_eq!(f.categories, ["a", "b", "c"]);
        assert_eq!((f.min_price, f.max_price), (Some(10.0), Some(20.5)));
        let f = parse(
            "category=ignored&min_price=1",
            Some(serde_json::json!({ "category": ["x", "y,z"], "max_price": "7" })),
        )
        .unwrap()
        .rank
        .filter;
        assert_eq!(f.categories, ["x", "y", "z"], "the body wins");
        assert_eq!((f.min_price, f.max_price), (Some(1.0), Some(7.0)));
        assert!(parse("top_k=3&top_k=4", None)
            .unwrap()
            .rank
            .filter
            .is_empty());
        assert_eq!(parse("top_k=3&top_k=4", None).unwrap().rank.top_k, 4);
        let e = parse("min_price=9&max_price=3", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("min_price must not exceed max_price"), "{e}");
        let e = parse("category=", None).unwrap_err().to_string();
        assert!(e.starts_with("category must be"), "{e}");
    }
}
