//! `/`, health, status and refresh.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;

use crate::error::AppError;
use crate::indexer::{IndexReport, PassProgress};
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
            "similar_products": "GET /api/v1/products/{id}/similar",
            "refresh": "POST /api/v1/refresh",
            "docs": "GET /docs",
            "openapi": "GET /openapi.json"
        }
    }))
}

/// Never loads the model and never waits on MongoDB (see `dbwatch`): 503 while MongoDB
/// is unreachable.
pub async fn health(State(state): State<AppState>) -> Response {
    let health = state.health().await;
    let model_loaded = health.model_loaded;
    match health.database {
        Ok(()) => Json(HealthReport {
            status: "healthy",
            message: "API is running",
            database: "connected",
            model_loaded,
            detail: None,
        })
        .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(HealthReport {
                status: "unhealthy",
                message: "API is running but the database is unreachable",
                database: "disconnected",
                model_loaded,
                detail: Some("the database is unreachable"),
            }),
        )
            .into_response(),
    }
}

/// `/api/v1/health`'s body (the old service's fields, and a detail when unhealthy).
#[derive(Debug, Default, Serialize)]
pub struct HealthReport {
    pub status: &'static str,
    pub message: &'static str,
    pub database: &'static str,
    pub model_loaded: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'static str>,
}

/// `/api/v1/refresh`'s 200: the pass's report.
#[derive(Debug, Default, Serialize)]
pub struct RefreshReport {
    pub message: &'static str,
    #[serde(flatten)]
    pub report: IndexReport,
}

/// `/api/v1/refresh`'s 202: the pass goes on.
#[derive(Debug, Default, Serialize)]
pub struct RefreshAccepted {
    pub message: &'static str,
    pub index_pass: PassProgress,
}

pub async fn status(
    State(state): State<AppState>,
) -> Result<Json<crate::service::Status>, AppError> {
    Ok(Json(state.status().await?))
}

/// Brings embeddings up to date (see `Indexer::pass_now`): 200 with the pass's report
/// when it ends within REQUEST_TIMEOUT_SECS, else 202 while it goes on (progress in
/// `/api/v1/status`). With ADMIN_TOKEN set, only for `Authorization: Bearer <token>`.
pub async fn refresh(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    authorize(state.http_settings().admin_token.as_deref(), &headers)?;
    // Answer a little before the request deadline, so the client gets the 202.
    let timeout = state.http_settings().request_timeout;
    let wait = timeout
        .saturating_sub(timeout / 10)
        .max(Duration::from_millis(100));
    match tokio::time::timeout(wait, state.indexer().pass_now()).await {
        Ok(report) => Ok(Json(RefreshReport {
            message: "Product features refreshed",
            report: report?,
        })
        .into_response()),
        Err(_) => Ok((
            StatusCode::ACCEPTED,
            Json(RefreshAccepted {
                message: "Refresh under way; it goes on in the background (see /api/v1/status)",
                index_pass: state.indexer().progress(),
            }),
        )
            .into_response()),
    }
}

/// ADMIN_TOKEN, when set: 401 without a bearer token, 403 with a wrong one.
fn authorize(token: Option<&str>, headers: &HeaderMap) -> Result<(), AppError> {
    let Some(token) = token else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    match given {
        None => Err(AppError::Unauthorized(
            "this endpoint needs `Authorization: Bearer <ADMIN_TOKEN>`".into(),
        )),
        Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(AppError::Forbidden("the admin token is not valid".into())),
    }
}

/// Compares without stopping at the first difference (no timing hint of the token).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_token_needs_the_exact_bearer_token() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::AUTHORIZATION, v.parse().unwrap());
            m
        };
        assert!(authorize(None, &HeaderMap::new()).is_ok());
        let e = authorize(Some("s3cret"), &HeaderMap::new()).unwrap_err();
        assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
        let e = authorize(Some("s3cret"), &h("Basic s3cret")).unwrap_err();
        assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
        let e = authorize(Some("s3cret"), &h("Bearer s3cre")).unwrap_err();
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
        let e = authorize(Some("s3cret"), &h("Bearer s3cret!")).unwrap_err();
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
        assert!(authorize(Some("s3cret"), &h("Bearer s3cret")).is_ok());
    }
}
