//! The HTTP layer: thin handlers over `service::AppState`, the old service's routes,
//! CORS, request limits and graceful shutdown.

mod docs;
mod meta;
mod search;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::Semaphore;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use tower_http::trace::TraceLayer;

use crate::error::detail_response;
use crate::service::AppState;

/// The whole application. Health and the docs are outside the request limit so they
/// answer at once however busy the searches are.
pub fn app(state: AppState) -> Router {
    let cfg = &state.config;
    let slots = Arc::new(Semaphore::new(cfg.max_concurrent_requests));
    let limit = Limiter {
        slots: slots.clone(),
        timeout: Some(cfg.request_timeout()),
    };
    // A full refresh of a large catalogue may take minutes: it holds a slot but has no
    // deadline (the pass goes on even if the client gives up).
    let untimed = Limiter {
        slots,
        timeout: None,
    };
    let limited = Router::new()
        .route("/api/v1/search/url", post(search::by_url))
        .route(
            "/api/v1/search/image",
            post(search::by_upload).layer(axum::extract::DefaultBodyLimit::max(
                cfg.max_image_bytes + 64 * 1024,
            )),
        )
        .route("/api/v1/status", get(meta::status))
        .layer(middleware::from_fn_with_state(limit, limit_requests))
        .merge(
            Router::new()
                .route("/api/v1/refresh", post(meta::refresh))
                .layer(middleware::from_fn_with_state(untimed, limit_requests)),
        );
    Router::new()
        .route("/", get(meta::root))
        .route("/api/v1/health", get(meta::health))
        .route("/openapi.json", get(docs::openapi))
        .route("/docs", get(docs::swagger_ui))
        .merge(limited)
        .fallback(|| async { detail_response(StatusCode::NOT_FOUND, "Not Found") })
        .layer(cors(&cfg.cors_allow_origins))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

#[derive(Clone)]
struct Limiter {
    slots: Arc<Semaphore>,
    timeout: Option<Duration>,
}

/// At most MAX_CONCURRENT_REQUESTS in flight, the rest refused with 503 at once (as the
/// old service did); each request, body upload included, bounded by REQUEST_TIMEOUT_SECS.
async fn limit_requests(State(limit): State<Limiter>, req: Request, next: Next) -> Response {
    let Ok(_permit) = limit.slots.clone().try_acquire_owned() else {
        return detail_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is busy; try again shortly",
        );
    };
    let Some(timeout) = limit.timeout else {
        return next.run(req).await;
    };
    match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => detail_response(StatusCode::REQUEST_TIMEOUT, "the request took too long"),
    }
}

fn cors(origins: &[String]) -> CorsLayer {
    let layer = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers(Any)
        .max_age(Duration::from_secs(600));
    if origins.iter().any(|o| o.trim() == "*") {
        layer.allow_origin(Any)
    } else {
        let list: Vec<HeaderValue> = origins
            .iter()
            .filter_map(|o| o.trim().parse().ok())
            .collect();
        layer.allow_origin(AllowOrigin::list(list))
    }
}

/// Serves until SIGTERM/Ctrl-C, then stops accepting, lets requests in flight finish for
/// up to SHUTDOWN_GRACE_SECS, and returns.
pub async fn serve(state: AppState) -> anyhow::Result<()> {
    let addr = format!("{}:{}", state.config.host, state.config.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (HOST/PORT): {e}"))?;
    tracing::info!(%addr, "listening");
    serve_on(listener, state).await
}

pub async fn serve_on(listener: tokio::net::TcpListener, state: AppState) -> anyhow::Result<()> {
    let grace = Duration::from_secs(state.config.shutdown_grace_secs);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stopped = stop_rx.clone();
    let server = axum::serve(listener, app(state)).with_graceful_shutdown(async move {
        let _ = stopped.wait_for(|s| *s).await;
    });
    let server = tokio::spawn(async move { server.await });
    shutdown_signal().await;
    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: finishing requests in flight"
    );
    let _ = stop_tx.send(true);
    drop(stop_rx);
    match tokio::time::timeout(grace, server).await {
        Ok(r) => r??,
        Err(_) => tracing::warn!("grace period over; exiting with requests still running"),
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
