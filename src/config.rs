//! Configuration: read once at start-up from the environment (and `.env` if present),
//! typed, validated, then passed down. Nothing else in the crate reads the environment.
//!
//! Settings are grouped by the component that uses them, and each component takes only
//! its own group. They are parsed with clap: an argument's id is its variable's name in
//! lower case (`top_k` is `TOP_K`), and every value goes through [`Var`], which puts the
//! variable's name into the error itself.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{ArgAction, Args, CommandFactory, FromArgMatches, Parser};
use ort::session::builder::GraphOptimizationLevel;

/// Every setting of the service, by component.
#[derive(Clone, Debug, Parser)]
#[command(no_binary_name = true)]
pub struct Config {
    #[command(flatten)]
    pub database: DatabaseSettings,
    #[command(flatten)]
    pub http: HttpSettings,
    #[command(flatten)]
    pub fetch: FetchSettings,
    #[command(flatten)]
    pub embedder: EmbedderSettings,
    #[command(flatten)]
    pub catalog: CatalogSettings,
    #[command(flatten)]
    pub indexer: IndexerSettings,
    #[command(flatten)]
    pub vectors: VectorSettings,
    #[command(flatten)]
    pub search: SearchSettings,
}

/// MongoDB: where the shop's products are, and where our embeddings go.
#[derive(Clone, Debug, Args)]
pub struct DatabaseSettings {
    /// MongoDB connection string (required to serve; `make run` provides a local one).
    #[arg(long, value_parser = Var(text))]
    pub mongo_uri: Option<String>,
    #[arg(long, value_parser = Var(text), default_value = "test")]
    pub mongo_db_name: String,
    /// The shop's products collection: read-only for this service.
    #[arg(long, value_parser = Var(text), default_value = "products")]
    pub mongo_collection: String,
    /// Our own collection of product embeddings.
    #[arg(long, value_parser = Var(text), default_value = "product_embeddings")]
    pub embeddings_collection: String,
    /// Server selection and connect timeout: how long a request waits for an
    /// unreachable database before answering 503.
    #[arg(id = "mongo_timeout_secs", long = "mongo-timeout-secs", value_parser = Var(secs), default_value = "5")]
    pub timeout: Duration,
}

/// The HTTP server: address, request limits, CORS, the admin token.
#[derive(Clone, Debug, Args)]
pub struct HttpSettings {
    #[arg(long, value_parser = Var(text), default_value = "0.0.0.0")]
    pub host: String,
    #[arg(long, value_parser = Var(number::<u16>), default_value = "8001")]
    pub port: u16,
    /// Requests handled at once; past that the service answers 503 at once.
    #[arg(long, value_parser = Var(at_least_one), default_value = "10")]
    pub max_concurrent_requests: usize,
    /// Whole-request timeout, including a slow upload.
    #[arg(id = "request_timeout_secs", long = "request-timeout-secs", value_parser = Var(secs), default_value = "60")]
    pub request_timeout: Duration,
    /// A connection must send a request's headers within this long of being ready for
    /// one (slow-loris clients; also closes connections idle that long).
    #[arg(id = "header_read_timeout_secs", long = "header-read-timeout-secs", value_parser = Var(secs), default_value = "30")]
    pub header_read_timeout: Duration,
    /// Grace period for requests in flight on SIGTERM.
    #[arg(id = "shutdown_grace_secs", long = "shutdown-grace-secs", value_parser = Var(secs), default_value = "20")]
    pub shutdown_grace: Duration,
    /// Bytes of request bodies held in memory at once, over every request still sending
    /// or being handled; past it a body is refused with 503 (bodies are read in full
    /// before a request takes a slot, so this bounds what slow uploads can hold). Four
    /// uploads at MAX_IMAGE_BYTES' default, and room for the small JSON bodies.
    #[arg(long, value_parser = Var(number::<usize>), default_value_t = 48 * 1024 * 1024)]
    pub max_body_buffer_bytes: usize,
    /// After its first 5 s (`http::body::GRACE`), a request body must keep arriving at
    /// least this fast on average, or it is cut off with 408. A 10 MiB upload may take
    /// 10 minutes (a slow phone link); one byte every few seconds, which only holds a
    /// connection open, is cut off after the grace.
    #[arg(long, value_parser = Var(at_least_one_u64), default_value_t = 16 * 1024)]
    pub min_body_bytes_per_sec: u64,
    /// When set, `POST /api/v1/refresh` needs `Authorization: Bearer <ADMIN_TOKEN>`.
    #[arg(long, value_parser = Var(text))]
    pub admin_token: Option<String>,
    /// Allowed CORS origins, comma-separated; `*` allows any.
    #[arg(long, value_parser = Var(text), value_delimiter = ',', default_value = "*")]
    pub cors_allow_origins: Vec<String>,
}

/// Fetching image URLs (search queries and product photos).
#[derive(Clone, Debug, Args)]
pub struct FetchSettings {
    /// Allow loopback, private and other special addresses. Off by default; only tests
    /// (serving from 127.0.0.1) and trusted set-ups (internal image hosts) turn it on.
    #[arg(id = "allow_private_image_hosts", long = "allow-private-image-hosts", value_parser = Var(flag), action = ArgAction::Set, default_value = "false")]
    pub allow_private_hosts: bool,
    /// Time allowed for resolving the host and establishing the connection.
    #[arg(id = "fetch_connect_timeout_secs", long = "fetch-connect-timeout-secs", value_parser = Var(secs), default_value = "5")]
    pub connect_timeout: Duration,
    /// Time allowed for the whole fetch, redirects and body included.
    #[arg(id = "fetch_timeout_secs", long = "fetch-timeout-secs", value_parser = Var(secs), default_value = "20")]
    pub total_timeout: Duration,
    /// Largest image accepted, downloaded or uploaded (bytes); the encoder's
    /// `DecodeLimits::max_bytes` is the same setting.
    #[arg(id = "max_image_bytes", long = "max-image-bytes", value_parser = Var(number::<usize>), default_value_t = 10 * 1024 * 1024)]
    pub max_bytes: usize,
    /// Largest number of redirects followed.
    #[arg(long, value_parser = Var(number::<usize>), default_value = "5")]
    pub max_redirects: usize,
}

impl Default for FetchSettings {
    fn default() -> Self {
        defaults()
    }
}

/// The model, and the gates in front of it: image decodes and model runs at once.
#[derive(Clone, Debug, Args)]
pub struct EmbedderSettings {
    #[command(flatten)]
    pub encoder: EncoderOptions,
    /// Load the model on first use (true) or at start-up (false).
    #[arg(long, value_parser = Var(flag), action = ArgAction::Set, default_value = "true")]
    pub lazy_load_model: bool,
    /// Model runs at once (each holds its activations in memory).
    #[arg(long, value_parser = Var(at_least_one), default_value = "1")]
    pub max_concurrent_inferences: usize,
    /// Images per model run: an index pass's batches, and searches waiting for the
    /// model, which run together.
    #[arg(long, value_parser = Var(at_least_one), default_value = "4")]
    pub max_batch_size: usize,
    /// Images decoded at once (each holds its pixels in memory); 0 = one per core.
    #[arg(long, value_parser = Var(number::<usize>), default_value = "0")]
    pub decode_concurrency: usize,
    /// How long a request waits for one image to decode before answering 400 (seconds,
    /// fractions allowed). A decode past it finishes in the background, keeping its
    /// slot. The largest legal image decodes in about 0.5 s on one core; room for a
    /// fraction of a shared CPU.
    #[arg(id = "decode_timeout_secs", long = "decode-timeout-secs", value_parser = Var(decode_timeout), default_value = "10")]
    pub decode_timeout: Duration,
    /// Memory all image decodes at once may take, the decoders' own buffers included
    /// (judged from each image's header before it decodes; see `encoder::gate`). An
    /// image that needs more than this alone is refused with 413. The costliest image
    /// within MAX_IMAGE_BYTES and MAX_IMAGE_PIXELS, a 4096 x 4096 progressive CMYK JPEG,
    /// needs about 146 MB (its DCT coefficients): room for it alone, or for a few
    /// ordinary photos at once.
    #[arg(long, value_parser = Var(number::<u64>), default_value_t = 160 * 1024 * 1024)]
    pub max_decode_memory_bytes: u64,
}

impl EmbedderSettings {
    pub fn decode_permits(&self) -> usize {
        if self.decode_concurrency > 0 {
            self.decode_concurrency
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// Where to find a model and how to run it.
#[derive(Clone, Debug, Args)]
pub struct EncoderOptions {
    /// The ONNX image-embedding model; `preprocessor_config.json` sits beside it.
    #[arg(long, value_parser = Var(path), default_value = "models/out/efficientnet-lite0-int8/model.onnx")]
    pub model_path: PathBuf,
    /// Name reported for the model (default: the model's folder name).
    #[arg(id = "model_name", long = "model-name", value_parser = Var(text))]
    pub name: Option<String>,
    #[command(flatten)]
    pub session: SessionSettings,
    #[command(flatten)]
    pub limits: DecodeLimits,
    /// The ONNX Runtime shared library (default: the one `make setup` installs).
    #[arg(id = "ort_dylib_path", long = "ort-dylib-path", value_parser = Var(path))]
    pub dylib: Option<PathBuf>,
}

impl EncoderOptions {
    /// The model at `model_path` with every other setting at its default.
    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        Self {
            model_path: model_path.into(),
            ..defaults()
        }
    }
}

/// Limits for decoding untrusted bytes.
#[derive(Clone, Copy, Debug, Args)]
pub struct DecodeLimits {
    /// The bytes' limit is MAX_IMAGE_BYTES (`FetchSettings::max_bytes`), set from there.
    #[arg(skip = 10usize * 1024 * 1024)]
    pub max_bytes: usize,
    /// Largest image accepted, in pixels, checked from the header before decoding.
    /// 4096 x 4096: above a 12-megapixel phone photo, and 48 MB decoded.
    #[arg(id = "max_image_pixels", long = "max-image-pixels", value_parser = Var(number::<u64>), default_value_t = 16_777_216)]
    pub max_pixels: u64,
}

impl Default for DecodeLimits {
    /// What a tool or a test decodes with: a little more than the service's pixel
    /// default, so that one 5000 x 5000 test image still decodes.
    fn default() -> Self {
        Self {
            max_bytes: 10 * 1024 * 1024,
            max_pixels: 25_000_000,
        }
    }
}

/// ONNX Runtime session options. Defaults were chosen by measurement (see
/// docs/performance.md): prepacking only for small model files (see
/// `runtime::PREPACK_AUTO_MAX_BYTES`) keeps peak memory of ViT-B/32 fp32 well under
/// 512 MB and the int8 model fast.
#[derive(Clone, Debug, Args)]
pub struct SessionSettings {
    /// Intra-op threads; 0 = one per available core.
    #[arg(id = "ort_intra_threads", long = "ort-intra-threads", value_parser = Var(number::<usize>), default_value = "0")]
    pub intra_threads: usize,
    /// The CPU memory arena. On by default: without it every operator's activations
    /// come from malloc, and glibc kept far more of that freed memory than the arena
    /// holds (EfficientNet-Lite0 indexing peaked at 582 MB without, 166 MB with).
    #[arg(id = "ort_memory_arena", long = "ort-memory-arena", value_parser = Var(flag), action = ArgAction::Set, default_value = "true")]
    pub memory_arena: bool,
    /// Weight prepacking: faster matmuls for a second copy of the weights in memory.
    /// `auto`: on for model files up to `runtime::PREPACK_AUTO_MAX_BYTES`.
    #[arg(id = "ort_prepacking", long = "ort-prepacking", value_parser = Var(prepacking), default_value = "auto")]
    pub prepacking: Prepacking,
    /// Intra-op threads spin-wait for work between operators (ONNX Runtime's default)
    /// or sleep at once.
    #[arg(id = "ort_allow_spinning", long = "ort-allow-spinning", value_parser = Var(flag), action = ArgAction::Set, default_value = "true")]
    pub allow_spinning: bool,
    /// Stop the spinning as soon as a model run returns (`session.force_spinning_stop`):
    /// the threads spin only inside a run and leave the cores to the search's ranking,
    /// which uses both, and to decoding and MongoDB.
    #[arg(id = "ort_stop_spinning_after_run", long = "ort-stop-spinning-after-run", value_parser = Var(flag), action = ArgAction::Set, default_value = "true")]
    pub stop_spinning_after_run: bool,
    /// Graph optimisation level: disable, basic, extended or all.
    #[arg(id = "ort_optimization", long = "ort-optimization", value_parser = Var(optimization), default_value = "all")]
    pub optimization: GraphOptimizationLevel,
}

impl Default for SessionSettings {
    fn default() -> Self {
        defaults()
    }
}

/// ORT_PREPACKING: a flag, or `auto` to decide by the model file's size where the
/// session is built (`SessionSettings::prepacking_for`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prepacking {
    #[default]
    Auto,
    On,
    Off,
}

/// The shop's products collection.
#[derive(Clone, Debug, Args)]
pub struct CatalogSettings {
    /// Product fields returned with each result.
    #[arg(
        long,
        value_parser = Var(text),
        value_delimiter = ',',
        default_value = "_id,productName,productPrice,productImage,productCategory,productSize,productDescription,averageRating,totalRatings,createdAt,updatedAt"
    )]
    pub product_fields: Vec<String>,
    /// Cap on the products considered, 0 = no cap. The old service needed a cap because
    /// it re-embedded every product per search; with stored embeddings it does not.
    #[arg(long, value_parser = Var(number::<usize>), default_value = "0")]
    pub max_products: usize,
    /// Where a product's photos are: dotted paths (`image.url,images`); the value at a
    /// path may be a URL, an object with a `url`, or an array of either.
    #[arg(long, value_parser = Var(field_path), value_delimiter = ',', default_value = "productImage")]
    pub product_image_field: Vec<String>,
    /// The product's category for the `category` filter (a dotted path; an ObjectId,
    /// a string, or an array of them).
    #[arg(long, value_parser = Var(field_path), default_value = "productCategory")]
    pub category_field: String,
    /// The product's price for the `min_price`/`max_price` filters (a dotted path).
    #[arg(long, value_parser = Var(field_path), default_value = "productPrice")]
    pub price_field: String,
    /// Which products are searchable: a MongoDB query document in extended JSON, e.g.
    /// `{"isHidden": {"$ne": true}}`. None: every product with a photo.
    #[arg(long, value_parser = Var(query_document))]
    pub product_filter: Option<mongodb::bson::Document>,
}

/// Index passes: bringing the stored embeddings up to date with the catalogue.
#[derive(Clone, Debug, Args)]
pub struct IndexerSettings {
    /// Product images fetched at once while indexing.
    #[arg(long, value_parser = Var(at_least_one), default_value = "8")]
    pub index_fetch_concurrency: usize,
    /// A product whose image failed is retried after this long.
    #[arg(id = "retry_failed_after_secs", long = "retry-failed-after-secs", value_parser = Var(secs), default_value = "3600")]
    pub retry_failed_after: Duration,
    /// A search starts an index pass first when the last one is older than this
    /// (0 = before every search).
    #[arg(id = "catalog_sync_interval_secs", long = "catalog-sync-interval-secs", value_parser = Var(secs), default_value = "30")]
    pub pass_interval: Duration,
    /// How long a search waits for that pass before ranking what is stored.
    #[arg(id = "search_sync_wait_secs", long = "search-sync-wait-secs", value_parser = Var(secs), default_value = "20")]
    pub search_wait: Duration,
    /// Instances on one database take turns at index passes through a lease in
    /// `<EMBEDDINGS_COLLECTION>_leases`; one that crashed loses it after this long.
    #[arg(id = "index_lease_secs", long = "index-lease-secs", value_parser = Var(positive_secs), default_value = "30")]
    pub lease_ttl: Duration,
    /// Follow the products collection's change stream where the server has one (a
    /// replica set, Atlas): each change is indexed within seconds, and full passes run
    /// only every CATALOG_FULL_SYNC_INTERVAL_SECS. Where it has none, or with `false`,
    /// searches start a pass every CATALOG_SYNC_INTERVAL_SECS as before.
    #[arg(id = "catalog_change_stream", long = "catalog-change-stream", value_parser = Var(flag), action = ArgAction::Set, default_value = "true")]
    pub change_stream: bool,
    /// While the change stream is followed: how old the last full pass may be before a
    /// search starts one (the safety net for anything the stream could not tell).
    #[arg(id = "catalog_full_sync_interval_secs", long = "catalog-full-sync-interval-secs", value_parser = Var(secs), default_value = "3600")]
    pub full_pass_interval: Duration,
}

/// CACHE_PRODUCTS: where searches read the vectors from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// In memory while they fit VECTOR_CACHE_MAX_MB, streamed beyond.
    #[default]
    Auto,
    /// In memory, whatever their size.
    On,
    /// Streamed from MongoDB for each search.
    Off,
}

/// The stored vectors and how searches read them.
#[derive(Clone, Debug, Args)]
pub struct VectorSettings {
    /// Keep product vectors in memory (true), stream them from MongoDB per search
    /// (false), or keep them in memory while they fit VECTOR_CACHE_MAX_MB (auto).
    #[arg(long, value_parser = Var(cache_mode), default_value = "auto")]
    pub cache_products: CacheMode,
    /// With CACHE_PRODUCTS=auto, the most the in-memory vectors (codes, ids, URLs and
    /// filter attributes) may take; beyond it searches stream them from MongoDB.
    #[arg(id = "vector_cache_max_mb", long = "vector-cache-max-mb", value_parser = Var(megabytes), default_value = "256")]
    pub vector_cache_max_bytes: usize,
    /// With the vectors in memory, how often to reconcile them with the stored
    /// vectors (what other instances stored or removed).
    #[arg(id = "cache_sync_interval_secs", long = "cache-sync-interval-secs", value_parser = Var(secs), default_value = "30")]
    pub reconcile_interval: Duration,
    /// Vectors read per MongoDB batch when streaming them.
    #[arg(long, value_parser = Var(at_least_one_u32), default_value = "1000")]
    pub vector_batch_size: u32,
    /// How searches rank: `exact` (the service compares the vectors itself) or `atlas`
    /// (MongoDB Atlas Vector Search, once its index is queryable; exact meanwhile).
    #[arg(long, value_parser = Var(vector_search), default_value = "exact")]
    pub vector_search: VectorSearch,
    /// With VECTOR_SEARCH=atlas: the name of the vector search index on the embeddings
    /// collection (created when missing).
    #[arg(long, default_value = "search_img_vectors")]
    pub atlas_search_index: String,
}

/// VECTOR_SEARCH: who ranks the stored vectors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VectorSearch {
    #[default]
    Exact,
    Atlas,
}

/// The search parameters' defaults.
#[derive(Clone, Debug, Args)]
pub struct SearchSettings {
    #[arg(long, value_parser = Var(top_k), default_value = "10")]
    pub top_k: usize,
    #[arg(long, value_parser = Var(threshold), default_value = "0.5")]
    pub similarity_threshold: f32,
}

impl Config {
    /// Reads `.env` (if present) and the environment, then validates.
    pub fn from_env() -> anyhow::Result<Self> {
        let _ = dotenvy::dotenv();
        Self::from_vars(std::env::vars())
    }

    /// Builds a config from explicit variables (tests, tools); other variables of the
    /// environment are ignored. An empty variable counts as unset (its default), as
    /// `KEY=` lines in a `.env` or a dashboard field left blank mean "not configured",
    /// not "false" or "0". Names are matched in any case.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> anyhow::Result<Self> {
        let cmd = Self::command();
        let ids: Vec<String> = cmd
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect();
        let args = vars.into_iter().filter_map(|(k, v)| {
            let id = ids.iter().find(|id| id.eq_ignore_ascii_case(&k))?;
            (!v.trim().is_empty()).then(|| format!("--{}={v}", id.replace('_', "-")))
        });
        let matches = cmd.try_get_matches_from(args).map_err(explain)?;
        let mut cfg = Self::from_arg_matches(&matches).map_err(explain)?;
        // One setting, MAX_IMAGE_BYTES, bounds downloads, uploads and decodes alike.
        cfg.embedder.encoder.limits.max_bytes = cfg.fetch.max_bytes;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Defaults for every setting (what an empty environment gives).
    pub fn defaults() -> Self {
        Self::from_vars(std::iter::empty()).expect("defaults are valid")
    }

    /// What no single variable's parser can check.
    fn validate(&self) -> anyhow::Result<()> {
        if self.http.max_body_buffer_bytes < self.upload_limit() {
            return Err(invalid(
                "MAX_BODY_BUFFER_BYTES",
                "must be at least MAX_IMAGE_BYTES plus 64 KiB (one whole upload)",
            ));
        }
        if self.catalog.product_fields.iter().all(|f| f.is_empty()) {
            return Err(invalid("PRODUCT_FIELDS", "must name at least one field"));
        }
        Ok(())
    }

    /// The MongoDB URI, or an error naming the variable.
    pub fn require_mongo_uri(&self) -> anyhow::Result<&str> {
        self.database
            .mongo_uri
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| anyhow::anyhow!("configuration error: MONGO_URI is required"))
    }

    /// The largest upload body: the image plus room for the multipart framing.
    pub fn upload_limit(&self) -> usize {
        self.fetch.max_bytes.saturating_add(64 * 1024)
    }
}

/// A group's defaults, as an empty environment gives them.
fn defaults<T: Args + FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults").no_binary_name(true));
    let matches = cmd
        .try_get_matches_from(std::iter::empty::<String>())
        .expect("defaults parse");
    T::from_arg_matches(&matches).expect("defaults are valid")
}

fn invalid(var: &str, why: &str) -> anyhow::Error {
    anyhow::anyhow!("configuration error in {var}: {why}")
}

/// The message `Var` put in the error, or clap's own (which names no variable: it is
/// only reached by a bug in this module's declarations).
fn explain(e: clap::Error) -> anyhow::Error {
    match e.get(ContextKind::Custom) {
        Some(ContextValue::String(s)) => anyhow::anyhow!("{s}"),
        _ => anyhow::anyhow!("configuration error: {}", e.render()),
    }
}

/// Parses one variable's value with `.0`; a failure becomes `configuration error in
/// VAR: why`, the variable's name taken from the argument being parsed.
#[derive(Clone, Copy)]
struct Var<T>(fn(&str) -> Result<T, String>);

impl<T: Clone + Send + Sync + 'static> TypedValueParser for Var<T> {
    type Value = T;

    fn parse_ref(
        &self,
        _cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<T, clap::Error> {
        let var = arg.map_or(String::new(), |a| a.get_id().as_str().to_ascii_uppercase());
        let fail = |why: String| {
            let mut e = clap::Error::new(ErrorKind::ValueValidation);
            e.insert(
                ContextKind::Custom,
                ContextValue::String(invalid(&var, &why).to_string()),
            );
            e
        };
        let text = value
            .to_str()
            .ok_or_else(|| fail("not valid UTF-8".into()))?;
        (self.0)(text).map_err(fail)
    }
}

fn text(s: &str) -> Result<String, String> {
    Ok(s.to_string())
}

fn path(s: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(s))
}

fn number<T: FromStr>(s: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    s.trim()
        .parse()
        .map_err(|e| format!("invalid value {s:?}: {e}"))
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match number::<usize>(s)? {
        0 => Err("must be at least 1".into()),
        n => Ok(n),
    }
}

fn at_least_one_u64(s: &str) -> Result<u64, String> {
    Ok(at_least_one(s)? as u64)
}

fn at_least_one_u32(s: &str) -> Result<u32, String> {
    u32::try_from(at_least_one(s)?).map_err(|e| e.to_string())
}

/// Megabytes (MiB, fractions allowed) as bytes, more than 0.
fn megabytes(s: &str) -> Result<usize, String> {
    match s.trim().parse::<f64>() {
        Ok(mb) if mb > 0.0 && mb.is_finite() => Ok((mb * 1024.0 * 1024.0) as usize),
        _ => Err(format!(
            "must be a number of megabytes more than 0, got {s:?}"
        )),
    }
}

/// Whole seconds, at least 1.
fn positive_secs(s: &str) -> Result<Duration, String> {
    at_least_one(s).map(|n| Duration::from_secs(n as u64))
}

fn secs(s: &str) -> Result<Duration, String> {
    number::<u64>(s).map(Duration::from_secs)
}

/// A MongoDB query document written in (relaxed or canonical) extended JSON.
/// A dotted path of field names: no empty segment, no `$` operator.
fn field_path(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.split('.')
        .any(|seg| seg.is_empty() || seg.starts_with('$'))
    {
        return Err(format!(
            "invalid field path {s:?}: dotted field names like image.url"
        ));
    }
    Ok(s.to_string())
}

fn query_document(s: &str) -> Result<mongodb::bson::Document, String> {
    let value: serde_json::Value =
        serde_json::from_str(s).map_err(|e| format!("not valid JSON: {e}"))?;
    if !value.is_object() {
        return Err("must be a JSON object (a MongoDB query document)".into());
    }
    match mongodb::bson::Bson::try_from(value) {
        Ok(mongodb::bson::Bson::Document(d)) => Ok(d),
        Ok(_) => Err("must be a JSON object (a MongoDB query document)".into()),
        Err(e) => Err(format!("not valid extended JSON: {e}")),
    }
}

fn decode_timeout(s: &str) -> Result<Duration, String> {
    let secs = number::<f64>(s)?;
    if secs > 0.0 && secs <= 3600.0 {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err("must be more than 0 and at most 3600".into())
    }
}

fn top_k(s: &str) -> Result<usize, String> {
    match number::<usize>(s) {
        Ok(k) if (1..=50).contains(&k) => Ok(k),
        _ => Err("must be 1..50".into()),
    }
}

fn threshold(s: &str) -> Result<f32, String> {
    match number::<f32>(s) {
        Ok(t) if (0.0..=1.0).contains(&t) => Ok(t),
        _ => Err("must be 0..1".into()),
    }
}

/// Booleans as deployments write them: true/false in any case, 1/0, yes/no, on/off
/// (the old Python service accepted `True`).
fn flag(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        other => Err(format!("expected true or false, got {other:?}")),
    }
}

/// `auto` (None) in any case, or anything `flag` accepts.
fn auto_or_flag(s: &str) -> Result<Option<bool>, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("auto") {
        return Ok(None);
    }
    flag(t)
        .map(Some)
        .map_err(|_| format!("expected auto, true or false, got {t:?}"))
}

fn prepacking(s: &str) -> Result<Prepacking, String> {
    Ok(match auto_or_flag(s)? {
        None => Prepacking::Auto,
        Some(true) => Prepacking::On,
        Some(false) => Prepacking::Off,
    })
}

fn vector_search(s: &str) -> Result<VectorSearch, String> {
    match s.to_ascii_lowercase().as_str() {
        "exact" => Ok(VectorSearch::Exact),
        "atlas" => Ok(VectorSearch::Atlas),
        _ => Err(format!("expected exact or atlas, got {s:?}")),
    }
}

fn cache_mode(s: &str) -> Result<CacheMode, String> {
    Ok(match auto_or_flag(s)? {
        None => CacheMode::Auto,
        Some(true) => CacheMode::On,
        Some(false) => CacheMode::Off,
    })
}

fn optimization(s: &str) -> Result<GraphOptimizationLevel, String> {
    match s {
        "disable" => Ok(GraphOptimizationLevel::Disable),
        "basic" => Ok(GraphOptimizationLevel::Level1),
        "extended" => Ok(GraphOptimizationLevel::Level2),
        "all" => Ok(GraphOptimizationLevel::All),
        _ => Err("must be one of disable, basic, extended, all".into()),
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
        assert_eq!(
            (c.search.top_k, c.search.similarity_threshold, c.http.port),
            (10, 0.5, 8001)
        );
        assert_eq!(
            (
                c.database.mongo_db_name.as_str(),
                c.database.mongo_collection.as_str()
            ),
            ("test", "products")
        );
        assert_eq!(c.vectors.cache_products, CacheMode::Auto);
        assert_eq!(c.vectors.vector_cache_max_bytes, 256 << 20);
        assert!(c.embedder.lazy_load_model);
        assert_eq!(c.embedder.max_batch_size, 4);
        assert_eq!(c.http.max_concurrent_requests, 10);
        assert_eq!(c.embedder.encoder.limits.max_bytes, c.fetch.max_bytes);
        assert_eq!(c.embedder.encoder.limits.max_pixels, 16_777_216);
        assert!(c.require_mongo_uri().is_err());
    }

    #[test]
    fn booleans_lists_and_errors_name_the_variable() {
        let c = with(&[
            ("CACHE_PRODUCTS", "True"),
            ("LAZY_LOAD_MODEL", "0"),
            ("PRODUCT_FIELDS", "a,b"),
            ("PATH", "/usr/bin"),
        ])
        .unwrap();
        assert_eq!(c.vectors.cache_products, CacheMode::On);
        assert!(!c.embedder.lazy_load_model);
        for (v, mode) in [("false", CacheMode::Off), (" Auto", CacheMode::Auto)] {
            let c = with(&[("CACHE_PRODUCTS", v)]).unwrap();
            assert_eq!(c.vectors.cache_products, mode, "{v}");
        }
        assert_eq!(c.catalog.product_fields, vec!["a", "b"]);
        // Empty means unset: the default, not false.
        let c = with(&[("LAZY_LOAD_MODEL", ""), ("TOP_K", " "), ("MONGO_URI", "")]).unwrap();
        assert!(c.embedder.lazy_load_model);
        assert_eq!(c.search.top_k, 10);
        assert!(c.require_mongo_uri().is_err());
        for (var, value, why) in [
            ("PORT", "eighty", "invalid value"),
            ("TOP_K", "0", "must be 1..50"),
            ("CACHE_PRODUCTS", "maybe", "expected auto, true or false"),
            ("VECTOR_CACHE_MAX_MB", "0", "more than 0"),
            ("SIMILARITY_THRESHOLD", "2", "must be 0..1"),
            ("MAX_BATCH_SIZE", "0", "must be at least 1"),
            ("DECODE_TIMEOUT_SECS", "0", "more than 0"),
            ("REQUEST_TIMEOUT_SECS", "-1", "invalid value"),
            ("ORT_OPTIMIZATION", "most", "disable, basic, extended, all"),
            ("MAX_BODY_BUFFER_BYTES", "1000", "plus 64 KiB"),
        ] {
            let e = with(&[(var, value)]).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("configuration error in {var}: ")) && e.contains(why),
                "{var}={value}: {e}"
            );
        }
    }

    #[test]
    fn durations_and_groups_come_from_their_variables() {
        let c = with(&[
            ("REQUEST_TIMEOUT_SECS", "7"),
            ("DECODE_TIMEOUT_SECS", "0.25"),
            ("MAX_IMAGE_BYTES", "1234567"),
            ("ALLOW_PRIVATE_IMAGE_HOSTS", "yes"),
            ("CATALOG_SYNC_INTERVAL_SECS", "0"),
            ("ORT_OPTIMIZATION", "basic"),
        ])
        .unwrap();
        assert_eq!(c.http.request_timeout, Duration::from_secs(7));
        assert_eq!(c.embedder.decode_timeout, Duration::from_millis(250));
        assert_eq!(c.fetch.max_bytes, 1_234_567);
        assert_eq!(c.embedder.encoder.limits.max_bytes, 1_234_567);
        assert_eq!(c.upload_limit(), 1_234_567 + 65_536);
        assert!(c.fetch.allow_private_hosts);
        assert_eq!(c.indexer.pass_interval, Duration::ZERO);
        assert_eq!(
            c.embedder.encoder.session.optimization,
            GraphOptimizationLevel::Level1
        );
        // Each group's defaults are the whole config's.
        assert_eq!(
            SessionSettings::default().optimization,
            GraphOptimizationLevel::All
        );
        assert_eq!(
            FetchSettings::default().total_timeout,
            Duration::from_secs(20)
        );
    }

    #[test]
    fn product_filter_is_an_extended_json_document() {
        assert!(Config::defaults().catalog.product_filter.is_none());
        let c = with(&[(
            "PRODUCT_FILTER",
            r#"{"isHidden": {"$ne": true}, "shop": {"$oid": "65a1e9c2e4b0a1b2c3d4e5f6"}}"#,
        )])
        .unwrap();
        let f = c.catalog.product_filter.unwrap();
        assert_eq!(
            f.get_document("isHidden").unwrap().get_bool("$ne"),
            Ok(true)
        );
        assert!(f.get_object_id("shop").is_ok(), "{f}");
        for (value, why) in [
            ("{not json", "not valid JSON"),
            ("[1, 2]", "must be a JSON object"),
            ("\"isHidden\"", "must be a JSON object"),
            (r#"{"a": {"$oid": "nope"}}"#, "not valid extended JSON"),
        ] {
            let e = with(&[("PRODUCT_FILTER", value)]).unwrap_err().to_string();
            assert!(
                e.starts_with("configuration error in PRODUCT_FILTER: ") && e.contains(why),
                "{value}: {e}"
            );
        }
    }

    #[test]
    fn product_image_field_is_a_list_of_dotted_paths() {
        assert_eq!(
            Config::defaults().catalog.product_image_field,
            ["productImage"]
        );
        let c = with(&[("PRODUCT_IMAGE_FIELD", "image.url, images")]).unwrap();
        assert_eq!(c.catalog.product_image_field, ["image.url", "images"]);
        for value in ["image..url", "images,", "$where"] {
            let e = with(&[("PRODUCT_IMAGE_FIELD", value)])
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("configuration error in PRODUCT_IMAGE_FIELD: "),
                "{value}: {e}"
            );
        }
    }

    #[test]
    fn spinning_is_on_by_default_and_a_flag() {
        let s = |c: Config| c.embedder.encoder.session;
        assert!(s(Config::defaults()).allow_spinning);
        assert!(!s(with(&[("ORT_ALLOW_SPINNING", "off")]).unwrap()).allow_spinning);
        let e = with(&[("ORT_ALLOW_SPINNING", "auto")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("ORT_ALLOW_SPINNING"), "{e}");
        assert!(s(Config::defaults()).stop_spinning_after_run);
        assert!(
            !s(with(&[("ORT_STOP_SPINNING_AFTER_RUN", "false")]).unwrap()).stop_spinning_after_run
        );
        let e = with(&[("ORT_STOP_SPINNING_AFTER_RUN", "sometimes")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("ORT_STOP_SPINNING_AFTER_RUN"), "{e}");
    }

    #[test]
    fn prepacking_is_auto_by_default_and_takes_flags_or_auto() {
        let p = |c: Config| c.embedder.encoder.session.prepacking;
        assert_eq!(p(Config::defaults()), Prepacking::Auto);
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
            assert_eq!(p(c), want, "{v:?}");
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
