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
    #[error("inference failed: {0}")]
    Inference(String),
}

/// What a handler can fail with (cloneable: one index pass's outcome goes to every
/// request waiting for it).
#[derive(Clone, Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    BadRequest(String),
    /// A parameter out of its bounds or of the wrong type (FastAPI answered these 422).
    #[error("{0}")]
    Invalid(String),
    /// A protected endpoint called without credentials (401).
    #[error("{0}")]
    Unauthorized(String),
    /// A protected endpoint called with the wrong credentials (403).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Image(#[from] ImageError),
    #[error("{0}")]
    Fetch(#[from] FetchError),
    #[error("the model is not available: {0}")]
    Model(#[from] ModelError),
    #[error("the database is unavailable: {0}")]
    Database(String),
    #[error("the server is busy; try again shortly")]
    Overloaded,
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<mongodb::error::Error> for AppError {
    fn from(e: mongodb::error::Error) -> Self {
        AppError::Database(e.to_string())
    }
}

impl AppError {
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
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
            AppError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The message a client sees.
    pub fn detail(&self) -> String {
        match self {
            AppError::Fetch(e) => format!("could not fetch the image: {e}"),
            AppError::Database(_) => "the database is unavailable; try again shortly".into(),
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
