//! `/`, health, status and refresh.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::error::AppError;
use crate::service::AppState;

pub async fn root() -> Json<serde_json::Value> {
    Json(json!({
        "name": "search-img",
        "version": env!("CARGO_PKG_VERSION"),
        "description": "Find the products that look most like a photo",
        "endpoints": {
            "health": "GET /api/v1/health",
            "status": "GET /api/v1/status",
            "search_by_url": "POST /api/v1/search/url",
            "search_by_image": "POST /api/v1/search/image",
            "refresh": "POST /api/v1/refresh",
            "docs": "GET /docs",
            "openapi": "GET /openapi.json"
        }
    }))
}

/// Never loads the model and never waits on MongoDB (see `dbwatch`): 503 while MongoDB
/// is unreachable.
pub async fn health(State(state): State<AppState>) -> Response {
    let db = state.db_watch.status().await;
    let model_loaded = state.encoder.loaded().is_some();
    match db.result {
        Ok(()) => Json(json!({
            "status": "healthy",
            "message": "API is running",
            "database": "connected",
            "model_loaded": model_loaded,
        }))
        .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "unhealthy",
                "message": "API is running but the database is unreachable",
                "database": "disconnected",
                "model_loaded": model_loaded,
                "detail": "the database is unreachable",
            })),
        )
            .into_response(),
    }
}

pub async fn status(
    State(state): State<AppState>,
) -> Result<Json<crate::service::Status>, AppError> {
    Ok(Json(state.status().await?))
}

pub async fn refresh(State(state): State<AppState>) -> Result<Json<serde_json::Value>, AppError> {
    let r = state.refresh().await?;
    Ok(Json(json!({
        "message": "Product features refreshed",
        "total_products": r.total_products,
        "indexed_products": r.indexed_products,
        "embedded": r.embedded,
        "failed": r.failed,
        "failed_waiting": r.failed_waiting,
        "removed": r.removed,
        "timings": r.timings,
    })))
}
