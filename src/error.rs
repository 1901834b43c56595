//! Every error type of the service, and how each maps to an HTTP answer.
//! Clients get `{"detail": "..."}` with a fitting status; internal causes are logged.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::fetch::FetchError;

/// An image the client (or a product) gave us that we cannot use.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the image is empty")]
    Empty,
    #[error("the image is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("unsupported image format (send JPEG, PNG, WebP, GIF or BMP)")]
    UnsupportedFormat,
    #[error("the image is {width}x{height} pixels, more than the {limit} pixels allowed")]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    #[error("the image could not be decoded: {0}")]
    Corrupt(String),
    /// A known format using a feature no decoder here has (e.g. arithmetic-coded JPEG).
    #[error("unsupported image: {0} (send a baseline or progressive JPEG, PNG, WebP, GIF or BMP)")]
    UnsupportedFeature(String),
    /// Decoding would take more memory than MAX_DECODE_MEMORY_BYTES allows at all.
    #[error(
        "the image would need {needed_mb} MiB to decode, more than the {limit_mb} MiB allowed"
    )]
    TooCostly { needed_mb: u64, limit_mb: u64 },
    /// Decoding ran past DECODE_TIMEOUT_SECS (the decode finishes in the background).
    #[error("the image took too long to decode (over {secs} s)")]
    TooSlow { secs: f64 },
}

/// The model could not be loaded or run: our fault, not the client's.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ModelError {
    #[error("ONNX Runtime library could not be loaded: {0}")]
    Runtime(String),
    #[error("model file {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("preprocessor config {path}: {reason}")]
    Preprocessor { path: String, reason: String },
    /// The blocking task loading the model panicked or was cancelled.
    #[error("the model loading task failed: {0}")]
    LoadTask(String),
    #[error("inference failed: {0}")]
    Inference(String),
}

/// MongoDB could not be used (the shop's catalogue or our embeddings).
#[derive(Clone, Debug, thiserror::Error)]
pub enum DatabaseError {
    /// The background ping says MongoDB is unreachable (see `dbwatch`).
    #[error("{0}")]
    Down(String),
    #[error(transparent)]
    Driver(#[from] mongodb::error::Error),
    /// The server accepted a write command but refused (part of) it.
    #[error("{0}")]
    Write(String),
}

/// What a handler can fail with. The variants named after an HTTP status answer with it;
/// the others take theirs from their cause (`status`).
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// 400: a request the HTTP layer cannot read (e.g. a broken multipart body).
    #[error("{0}")]
    BadRequest(String),
    /// 422: a parameter out of its bounds or of the wrong type (as FastAPI answered).
    #[error("{0}")]
    Unprocessable(String),
    /// 401: a protected endpoint called without credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: a protected endpoint called with the wrong credentials.
    #[error("{0}")]
    Forbidden(String),
    /// 404: what the request names does not exist (a product id).
    #[error("{0}")]
    NotFound(String),
    /// 409: what the request names is not ready yet (a product not embedded yet).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Image(#[from] ImageError),
    #[error("{0}")]
    Fetch(#[from] FetchError),
    #[error("the model is not available: {0}")]
    Model(#[from] ModelError),
    #[error("the database is unavailable: {0}")]
    Database(#[from] DatabaseError),
    /// An index pass the request waited for failed (shared by every waiter).
    #[error("the index pass failed: {0}")]
    Pass(#[from] std::sync::Arc<crate::indexer::PassError>),
    /// 503: no capacity left (request slots, body memory).
    #[error("the server is busy; try again shortly")]
    Overloaded,
    /// 500: a bug or a failed task of ours.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<mongodb::error::Error> for AppError {
    fn from(e: mongodb::error::Error) -> Self {
        AppError::Database(e.into())
    }
}

impl From<crate::encoder::EmbedError> for AppError {
    fn from(e: crate::encoder::EmbedError) -> Self {
        use crate::encoder::EmbedError;
        match e {
            EmbedError::Image(e) => e.into(),
            EmbedError::Model(e) => e.into(),
            EmbedError::Busy => AppError::Overloaded,
        }
    }
}

impl AppError {
    pub fn status(&self) -> StatusCode {
        use crate::indexer::PassError;
        match self {
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::Conflict(_) => StatusCode::CONFLICT,
            AppError::Image(ImageError::UnsupportedFormat | ImageError::UnsupportedFeature(_)) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            AppError::Image(ImageError::TooCostly { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::Image(ImageError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::Image(_) => StatusCode::BAD_REQUEST,
            AppError::Fetch(FetchError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::Fetch(e) if e.is_client_fault() => StatusCode::BAD_REQUEST,
            AppError::Fetch(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AppError::Model(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Database(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Pass(e) => match **e {
                PassError::Database(_) | PassError::Model(_) => StatusCode::SERVICE_UNAVAILABLE,
                PassError::Panicked(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            AppError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The message a client sees.
    pub fn detail(&self) -> String {
        use crate::indexer::PassError;
        const DATABASE_DOWN: &str = "the database is unavailable; try again shortly";
        match self {
            AppError::Fetch(e) => format!("could not fetch the image: {e}"),
            AppError::Database(_) => DATABASE_DOWN.into(),
            AppError::Pass(e) => match &**e {
                PassError::Database(_) => DATABASE_DOWN.into(),
                PassError::Model(m) => format!("the model is not available: {m}"),
                PassError::Panicked(_) => "internal server error".into(),
            },
            AppError::Internal(_) => "internal server error".into(),
            other => other.to_string(),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::info!(error = %self, "request rejected");
        }
        let mut resp = detail_response(status, self.detail());
        if matches!(self, AppError::Unauthorized(_)) {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

/// The one error body shape the frontend reads: `{"detail": "..."}`.
pub fn detail_response(status: StatusCode, detail: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "detail": detail.into() }))).into_response()
}
