//! Configuration: read once at start-up from the environment (and `.env` if present),
//! typed, validated, then passed down. Nothing else in the crate reads the environment.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Every setting of the service. Field `foo_bar` is the environment variable `FOO_BAR`.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    /// MongoDB connection string (required to serve; `make run` provides a local one).
    pub mongo_uri: Option<String>,
    #[serde(default = "d::mongo_db_name")]
    pub mongo_db_name: String,
    /// The shop's products collection: read-only for this service.
    #[serde(default = "d::mongo_collection")]
    pub mongo_collection: String,
    /// Our own collection of product embeddings.
    #[serde(default = "d::embeddings_collection")]
    pub embeddings_collection: String,
    #[serde(default = "d::host")]
    pub host: String,
    #[serde(default = "d::port")]
    pub port: u16,

    /// Keep product vectors in memory (true) or stream them from MongoDB per search (false).
    #[serde(default, deserialize_with = "flag")]
    pub cache_products: bool,
    /// Load the model on first use (true) or at start-up (false).
    #[serde(default = "d::yes", deserialize_with = "flag")]
    pub lazy_load_model: bool,
    /// Images per model run when indexing.
    #[serde(default = "d::max_batch_size")]
    pub max_batch_size: usize,
    /// Cap on the products considered, 0 = no cap. The old service needed a cap because it
    /// re-embedded every product per search; with stored embeddings it does not.
    #[serde(default)]
    pub max_products: usize,
    #[serde(default = "d::top_k")]
    pub top_k: usize,
    #[serde(default = "d::similarity_threshold")]
    pub similarity_threshold: f32,
    /// Product fields returned with each result.
    #[serde(default = "d::product_fields")]
    pub product_fields: Vec<String>,

    /// The ONNX image-embedding model; `preprocessor_config.json` sits beside it.
    #[serde(default = "d::model_path")]
    pub model_path: PathBuf,
    /// Name reported for the model (default: the model's folder name).
    pub model_name: Option<String>,
    /// The ONNX Runtime shared library (default: the one `make setup` installs).
    pub ort_dylib_path: Option<PathBuf>,
    /// ONNX Runtime intra-op threads (0 = one per available core).
    #[serde(default)]
    pub ort_intra_threads: usize,
    /// ONNX Runtime CPU memory arena. On by default: without it every operator's
    /// activations come from malloc, and glibc kept far more of that freed memory than
    /// the arena holds (EfficientNet-Lite0 indexing peaked at 582 MB without, 166 MB with).
    #[serde(default = "d::yes", deserialize_with = "flag")]
    pub ort_memory_arena: bool,
    /// Weight prepacking: faster matmuls for a second copy of the weights in memory.
    /// `auto` (default): on for model files up to `runtime::PREPACK_AUTO_MAX_BYTES`.
    #[serde(default, deserialize_with = "prepacking")]
    pub ort_prepacking: Prepacking,
    /// Intra-op threads spin-wait for work between operators (ONNX Runtime's default) or
    /// sleep at once.
    #[serde(default = "d::yes", deserialize_with = "flag")]
    pub ort_allow_spinning: bool,
    /// Stop the spinning as soon as a model run returns (ONNX Runtime's
    /// `session.force_spinning_stop`): the threads spin only inside a run and leave the
    /// cores to the search's ranking, which uses both, and to decoding and MongoDB.
    #[serde(default = "d::yes", deserialize_with = "flag")]
    pub ort_stop_spinning_after_run: bool,
    /// Graph optimisation level: disable, basic, extended or all.
    #[serde(default = "d::ort_optimization")]
    pub ort_optimization: String,
    /// Images decoded at once (each holds its pixels in memory); 0 = one per core.
    #[serde(default)]
    pub decode_concurrency: usize,
    /// How long a request waits for one image to decode before answering 400 (seconds,
    /// fractions allowed). A decode past it finishes in the background, keeping its slot.
    #[serde(default = "d::decode_timeout_secs")]
    pub decode_timeout_secs: f64,
    /// Memory all image decodes at once may take, the decoders' own buffers included
    /// (judged from each image's header before it decodes; see `encoder::gate`). An
    /// image that needs more than this alone is refused with 413.
    #[serde(default = "d::max_decode_memory_bytes")]
    pub max_decode_memory_bytes: u64,
    /// Model runs at once (each holds its activations in memory).
    #[serde(default = "d::one")]
    pub max_concurrent_inferences: usize,

    /// Requests handled at once; past that the service answers 503 at once.
    #[serde(default = "d::max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// Whole-request timeout (seconds), including a slow upload.
    #[serde(default = "d::request_timeout_secs")]
    pub request_timeout_secs: u64,
    /// A connection must send a request's headers within this many seconds of being
    /// ready for one (slow-loris clients; also closes connections idle that long).
    #[serde(default = "d::header_read_timeout_secs")]
    pub header_read_timeout_secs: u64,
    /// Grace period for requests in flight on SIGTERM (seconds).
    #[serde(default = "d::shutdown_grace_secs")]
    pub shutdown_grace_secs: u64,
    /// Bytes of request bodies held in memory at once, over every request still sending
    /// or being handled; past it a body is refused with 503 (bodies are read in full
    /// before a request takes a slot, so this bounds what slow uploads can hold).
    #[serde(default = "d::max_body_buffer_bytes")]
    pub max_body_buffer_bytes: usize,
    /// After its first 5 s (`http::body::GRACE`), a request body must keep arriving at
    /// least this fast on average, or it is cut off with 408.
    #[serde(default = "d::min_body_bytes_per_sec")]
    pub min_body_bytes_per_sec: u64,
    /// When set, `POST /api/v1/refresh` needs `Authorization: Bearer <ADMIN_TOKEN>`.
    pub admin_token: Option<String>,
    /// Allowed CORS origins, comma-separated; `*` allows any.
    #[serde(default = "d::cors_allow_origins")]
    pub cors_allow_origins: Vec<String>,

    /// Largest image accepted, downloaded or uploaded (bytes).
    #[serde(default = "d::max_image_bytes")]
    pub max_image_bytes: usize,
    /// Largest image accepted, in pixels, checked from the header before decoding.
    #[serde(default = "d::max_image_pixels")]
    pub max_image_pixels: u64,
    #[serde(default = "d::fetch_connect_timeout_secs")]
    pub fetch_connect_timeout_secs: u64,
    #[serde(default = "d::fetch_timeout_secs")]
    pub fetch_timeout_secs: u64,
    #[serde(default = "d::max_redirects")]
    pub max_redirects: usize,
    /// Allow image URLs on loopback/private hosts (local development, internal image hosts).
    #[serde(default, deserialize_with = "flag")]
    pub allow_private_image_hosts: bool,

    /// Product images fetched at once while indexing.
    #[serde(default = "d::index_fetch_concurrency")]
    pub index_fetch_concurrency: usize,
    /// A product whose image failed is retried after this many seconds.
    #[serde(default = "d::retry_failed_after_secs")]
    pub retry_failed_after_secs: u64,
    /// Vectors read per MongoDB batch when streaming them.
    #[serde(default = "d::vector_batch_size")]
    pub vector_batch_size: u32,
    /// MongoDB server selection and connect timeout (seconds): how long a request waits
    /// for an unreachable database before answering 503.
    #[serde(default = "d::mongo_timeout_secs")]
    pub mongo_timeout_secs: u64,
    /// A search brings embeddings up to date first when the last pass is older than this
    /// (seconds; 0 = before every search).
    #[serde(default = "d::catalog_sync_interval_secs")]
    pub catalog_sync_interval_secs: u64,
    /// How long a search waits for that pass before ranking what is stored (seconds).
    #[serde(default = "d::search_sync_wait_secs")]
    pub search_sync_wait_secs: u64,
    /// With CACHE_PRODUCTS=true, how often (seconds) to pick up vectors another instance wrote.
    #[serde(default = "d::cache_sync_interval_secs")]
    pub cache_sync_interval_secs: u64,
}

/// Booleans as deployments write them: true/false in any case, 1/0, yes/no, on/off
/// (the old Python service accepted `True`).
fn flag<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    parse_flag(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}

fn parse_flag(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        other => Err(format!("expected true or false, got {other:?}")),
    }
}

/// ORT_PREPACKING: a flag, or `auto` to decide by the model file's size where the session
/// is built (`SessionSettings::prepacking_for`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prepacking {
    #[default]
    Auto,
    On,
    Off,
}

fn prepacking<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Prepacking, D::Error> {
    parse_prepacking(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}

/// `auto` in any case, or anything `parse_flag` accepts. (An empty value never gets
/// here: `from_vars` treats it as unset, which means `auto`.)
fn parse_prepacking(s: &str) -> Result<Prepacking, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("auto") {
        return Ok(Prepacking::Auto);
    }
    match parse_flag(t) {
        Ok(true) => Ok(Prepacking::On),
        Ok(false) => Ok(Prepacking::Off),
        Err(_) => Err(format!("expected auto, true or false, got {t:?}")),
    }
}

/// The boolean variables, checked first so an error can name the variable (serde's
/// custom errors do not carry the field).
const FLAGS: &[&str] = &[
    "CACHE_PRODUCTS",
    "LAZY_LOAD_MODEL",
    "ORT_MEMORY_ARENA",
    "ORT_ALLOW_SPINNING",
    "ORT_STOP_SPINNING_AFTER_RUN",
    "ALLOW_PRIVATE_IMAGE_HOSTS",
];

/// Defaults, named so serde can call them.
mod d {
    use std::path::PathBuf;
    pub fn mongo_db_name() -> String {
        "test".into()
    }
    pub fn mongo_collection() -> String {
        "products".into()
    }
    pub fn embeddings_collection() -> String {
        "product_embeddings".into()
    }
    pub fn host() -> String {
        "0.0.0.0".into()
    }
    pub fn port() -> u16 {
        8001
    }
    pub fn yes() -> bool {
        true
    }
    pub fn one() -> usize {
        1
    }
    pub fn max_batch_size() -> usize {
        4
    }
    pub fn top_k() -> usize {
        10
    }
    pub fn similarity_threshold() -> f32 {
        0.5
    }
    pub fn product_fields() -> Vec<String> {
        [
            "_id",
            "productName",
            "productPrice",
            "productImage",
            "productCategory",
            "productSize",
            "productDescription",
            "averageRating",
            "totalRatings",
            "createdAt",
            "updatedAt",
        ]
        .map(String::from)
        .to_vec()
    }
    pub fn model_path() -> PathBuf {
        "models/out/efficientnet-lite0/model.onnx".into()
    }
    pub fn ort_optimization() -> String {
        "all".into()
    }
    pub fn max_concurrent_requests() -> usize {
        10
    }
    pub fn request_timeout_secs() -> u64 {
        60
    }
    pub fn header_read_timeout_secs() -> u64 {
        30
    }
    pub fn shutdown_grace_secs() -> u64 {
        20
    }
    pub fn max_body_buffer_bytes() -> usize {
        // Four uploads at MAX_IMAGE_BYTES' default, and room for the small JSON bodies.
        48 * 1024 * 1024
    }
    pub fn min_body_bytes_per_sec() -> u64 {
        // A 10 MiB upload may take 10 minutes (a slow phone link); one byte every few
        // seconds, which only holds a connection open, is cut off after the grace.
        16 * 1024
    }
    pub fn cors_allow_origins() -> Vec<String> {
        vec!["*".into()]
    }
    pub fn max_image_bytes() -> usize {
        10 * 1024 * 1024
    }
    pub fn decode_timeout_secs() -> f64 {
        // The largest legal image decodes in about 0.5 s on one core; room for a
        // fraction of a shared CPU.
        10.0
    }
    pub fn max_decode_memory_bytes() -> u64 {
        // The costliest image within MAX_IMAGE_BYTES and MAX_IMAGE_PIXELS, a 4096 x 4096
        // progressive CMYK JPEG, needs about 146 MB (its DCT coefficients): room for it
        // alone, or for a few ordinary photos at once.
        160 * 1024 * 1024
    }
    pub fn max_image_pixels() -> u64 {
        // 4096 x 4096: above a 12-megapixel phone photo, and 48 MB decoded.
        16_777_216
    }
    pub fn fetch_connect_timeout_secs() -> u64 {
        5
    }
    pub fn fetch_timeout_secs() -> u64 {
        20
    }
    pub fn max_redirects() -> usize {
        5
    }
    pub fn index_fetch_concurrency() -> usize {
        8
    }
    pub fn retry_failed_after_secs() -> u64 {
        3600
    }
    pub fn vector_batch_size() -> u32 {
        1000
    }
    pub fn mongo_timeout_secs() -> u64 {
        5
    }
    pub fn catalog_sync_interval_secs() -> u64 {
        30
    }
    pub fn search_sync_wait_secs() -> u64 {
        20
    }
    pub fn cache_sync_interval_secs() -> u64 {
        30
    }
}

impl Config {
    /// Reads `.env` (if present) and the environment, then validates.
    pub fn from_env() -> anyhow::Result<Self> {
        let _ = dotenvy::dotenv();
        Self::from_vars(std::env::vars())
    }

    /// Builds a config from explicit variables (tests, tools).
    /// An empty variable counts as unset (its default), as `KEY=` lines in a `.env` or a
    /// dashboard field left blank mean "not configured", not "false" or "0".
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> anyhow::Result<Self> {
        let vars: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(_, v)| !v.trim().is_empty())
            .collect();
        for (k, v) in &vars {
            if FLAGS.contains(&k.to_ascii_uppercase().as_str()) {
                parse_flag(v).map_err(|e| anyhow::anyhow!("configuration error in {k}: {e}"))?;
            }
            if k.eq_ignore_ascii_case("ORT_PREPACKING") {
                parse_prepacking(v)
                    .map_err(|e| anyhow::anyhow!("configuration error in {k}: {e}"))?;
            }
        }
        // envy reports "missing value for field x"/"invalid value for x"; name the variable.
        let cfg: Config = envy::from_iter(vars).map_err(|e| {
            let msg = e.to_string();
            let var = msg
                .split_whitespace()
                .find(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '_') && w.contains('_'))
                .map(|w| w.to_ascii_uppercase());
            match var {
                Some(var) => anyhow::anyhow!("configuration error in {var}: {msg}"),
                None => anyhow::anyhow!("configuration error: {msg}"),
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Defaults for every setting (what an empty environment gives).
    pub fn defaults() -> Self {
        Self::from_vars(std::iter::empty()).expect("defaults are valid")
    }

    fn validate(&self) -> anyhow::Result<()> {
        let check = |ok: bool, var: &str, why: &str| {
            if ok {
                Ok(())
            } else {
                Err(anyhow::anyhow!("configuration error in {var}: {why}"))
            }
        };
        check((1..=50).contains(&self.top_k), "TOP_K", "must be 1..50")?;
        check(
            (0.0..=1.0).contains(&self.similarity_threshold),
            "SIMILARITY_THRESHOLD",
            "must be 0..1",
        )?;
        check(
            self.max_batch_size >= 1,
            "MAX_BATCH_SIZE",
            "must be at least 1",
        )?;
        check(
            self.max_concurrent_requests >= 1,
            "MAX_CONCURRENT_REQUESTS",
            "must be at least 1",
        )?;
        check(
            self.max_concurrent_inferences >= 1,
            "MAX_CONCURRENT_INFERENCES",
            "must be at least 1",
        )?;
        check(
            self.index_fetch_concurrency >= 1,
            "INDEX_FETCH_CONCURRENCY",
            "must be at least 1",
        )?;
        check(
            self.decode_timeout_secs > 0.0 && self.decode_timeout_secs <= 3600.0,
            "DECODE_TIMEOUT_SECS",
            "must be more than 0 and at most 3600",
        )?;
        check(
            self.vector_batch_size >= 1,
            "VECTOR_BATCH_SIZE",
            "must be at least 1",
        )?;
        check(
            self.min_body_bytes_per_sec >= 1,
            "MIN_BODY_BYTES_PER_SEC",
            "must be at least 1",
        )?;
        check(
            self.max_body_buffer_bytes >= self.upload_limit(),
            "MAX_BODY_BUFFER_BYTES",
            "must be at least MAX_IMAGE_BYTES plus 64 KiB (one whole upload)",
        )?;
        check(
            !self.product_fields.is_empty(),
            "PRODUCT_FIELDS",
            "must name at least one field",
        )?;
        check(
            ["disable", "basic", "extended", "all"].contains(&self.ort_optimization.as_str()),
            "ORT_OPTIMIZATION",
            "must be one of disable, basic, extended, all",
        )?;
        Ok(())
    }

    /// The MongoDB URI, or an error naming the variable.
    pub fn require_mongo_uri(&self) -> anyhow::Result<&str> {
        self.mongo_uri
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| anyhow::anyhow!("configuration error: MONGO_URI is required"))
    }

    pub fn decode_permits(&self) -> usize {
        if self.decode_concurrency > 0 {
            self.decode_concurrency
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    pub fn decode_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.decode_timeout_secs)
    }

    /// The largest upload body: the image plus room for the multipart framing.
    pub fn upload_limit(&self) -> usize {
        self.max_image_bytes.saturating_add(64 * 1024)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vars: &[(&str, &str)]) -> anyhow::Result<Config> {
        Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_match_the_old_service() {
        let c = Config::defaults();
        assert_eq!((c.top_k, c.similarity_threshold, c.port), (10, 0.5, 8001));
        assert_eq!(
            (c.mongo_db_name.as_str(), c.mongo_collection.as_str()),
            ("test", "products")
        );
        assert!(!c.cache_products && c.lazy_load_model);
        assert_eq!(c.max_batch_size, 4);
        assert_eq!(c.max_concurrent_requests, 10);
        assert!(c.require_mongo_uri().is_err());
    }

    #[test]
    fn booleans_lists_and_errors_name_the_variable() {
        let c = with(&[
            ("CACHE_PRODUCTS", "True"),
            ("LAZY_LOAD_MODEL", "0"),
            ("PRODUCT_FIELDS", "a,b"),
        ])
        .unwrap();
        assert!(c.cache_products && !c.lazy_load_model);
        assert_eq!(c.product_fields, vec!["a", "b"]);
        // Empty means unset: the default, not false.
        let c = with(&[("LAZY_LOAD_MODEL", ""), ("TOP_K", " "), ("MONGO_URI", "")]).unwrap();
        assert!(c.lazy_load_model);
        assert_eq!(c.top_k, 10);
        assert!(c.require_mongo_uri().is_err());
        let e = with(&[("PORT", "eighty")]).unwrap_err().to_string();
        assert!(e.contains("PORT"), "{e}");
        let e = with(&[("TOP_K", "0")]).unwrap_err().to_string();
        assert!(e.contains("TOP_K"), "{e}");
        let e = with(&[("CACHE_PRODUCTS", "maybe")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("CACHE_PRODUCTS"), "{e}");
    }

    #[test]
    fn spinning_is_on_by_default_and_a_flag() {
        assert!(Config::defaults().ort_allow_spinning);
        assert!(
            !with(&[("ORT_ALLOW_SPINNING", "off")])
                .unwrap()
                .ort_allow_spinning
        );
        let e = with(&[("ORT_ALLOW_SPINNING", "auto")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("ORT_ALLOW_SPINNING"), "{e}");
    }

    #[test]
    fn spinning_stops_after_each_run_by_default() {
        assert!(Config::defaults().ort_stop_spinning_after_run);
        assert!(
            !with(&[("ORT_STOP_SPINNING_AFTER_RUN", "false")])
                .unwrap()
                .ort_stop_spinning_after_run
        );
        let e = with(&[("ORT_STOP_SPINNING_AFTER_RUN", "sometimes")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("ORT_STOP_SPINNING_AFTER_RUN"), "{e}");
    }

    #[test]
    fn prepacking_is_auto_by_default_and_takes_flags_or_auto() {
        assert_eq!(Config::defaults().ort_prepacking, Prepacking::Auto);
        for (v, want) in [
            ("auto", Prepacking::Auto),
            (" AUTO ", Prepacking::Auto),
            ("", Prepacking::Auto),
            ("true", Prepacking::On),
            ("True", Prepacking::On),
            ("1", Prepacking::On),
            ("on", Prepacking::On),
            ("yes", Prepacking::On),
            ("false", Prepacking::Off),
            ("FALSE", Prepacking::Off),
            ("0", Prepacking::Off),
            ("off", Prepacking::Off),
            ("no", Prepacking::Off),
        ] {
            let c = with(&[("ORT_PREPACKING", v)]).unwrap();
            assert_eq!(c.ort_prepacking, want, "{v:?}");
        }
        for v in ["maybe", "automatic", "2"] {
            let e = with(&[("ORT_PREPACKING", v)]).unwrap_err().to_string();
            assert!(
                e.contains("ORT_PREPACKING") && e.contains("auto, true or false"),
                "{v:?}: {e}"
            );
        }
    }
}
