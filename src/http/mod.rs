//! The HTTP layer: thin handlers over `service::AppState`'s components, the old service's routes,
//! CORS, request limits and graceful shutdown.

mod body;
mod docs;
mod meta;
mod search;

pub use meta::{HealthReport, RefreshAccepted, RefreshReport};
pub use search::{SIMILAR_PARAMETERS, UPLOAD_PARAMETERS, URL_PARAMETERS};

/// Every route the OpenAPI document describes: (method, path). tests/http.rs checks
/// that the document lists exactly these and that each one is served.
pub const API_ROUTES: &[(&str, &str)] = &[
    ("get", "/"),
    ("get", "/api/v1/health"),
    ("get", "/api/v1/status"),
    ("post", "/api/v1/search/url"),
    ("post", "/api/v1/search/image"),
    ("get", "/api/v1/products/{id}/similar"),
    ("post", "/api/v1/refresh"),
];

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
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
/// answer at once however busy the searches are. Request bodies are read in full before
/// a request takes a slot (`body`), so a client still sending holds none.
pub fn app(state: AppState) -> Router {
    let cfg = state.http_settings().clone();
    let upload_limit = state.upload_limit();
    let limit = Limiter {
        slots: Arc::new(Semaphore::new(cfg.max_concurrent_requests)),
        timeout: cfg.request_timeout,
    };
    let budget = Arc::new(Semaphore::new(cfg.max_body_buffer_bytes));
    let bodies = |limit: usize| body::BodyReader {
        limit,
        budget: budget.clone(),
        min_bytes_per_sec: cfg.min_body_bytes_per_sec,
        timeout: cfg.request_timeout,
    };
    // Each route: its body read first (holding no slot), then a slot, then the handler.
    let slot = || middleware::from_fn_with_state(limit.clone(), limit_requests);
    let body_first = |limit| middleware::from_fn_with_state(bodies(limit), body::read_body_first);
    let limited = Router::new()
        .route(
            "/api/v1/search/url",
            post(search::by_url)
                .route_layer(slot())
                .route_layer(body_first(SMALL_BODY_LIMIT)),
        )
        .route(
            "/api/v1/search/image",
            post(search::by_upload)
                .route_layer(slot())
                .route_layer(body_first(upload_limit))
                // The limit is `body_first`'s; the multipart extractor's own 2 MB default
                // would otherwise refuse uploads under it.
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route(
            "/api/v1/products/{id}/similar",
            get(search::similar).route_layer(slot()),
        )
        .route("/api/v1/status", get(meta::status).route_layer(slot()));
    Router::new()
        .route("/", get(meta::root))
        .route("/api/v1/health", get(meta::health))
        // Concurrent refreshes share one pass and answer within REQUEST_TIMEOUT_SECS, so
        // they hold no search slot.
        .route(
            "/api/v1/refresh",
            post(meta::refresh).route_layer(body_first(SMALL_BODY_LIMIT)),
        )
        .route("/openapi.json", get(docs::openapi))
        .route("/docs", get(docs::swagger_ui))
        .merge(limited)
        .fallback(|| async { detail_response(StatusCode::NOT_FOUND, "Not Found") })
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn_with_state(
            upload_limit,
            close_if_body_unread,
        ))
        .layer(cors(&cfg.cors_allow_origins))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// The largest body of the routes that take JSON parameters (or nothing).
const SMALL_BODY_LIMIT: usize = 64 * 1024;

/// Every error the application writes is `{"detail": "..."}` (the frontend shows
/// `response.data.detail`), including what axum and its extractors answer themselves in
/// plain text or with an empty body: 405 (which keeps its `Allow` header), 413, 415 and
/// the like. The plain text, when there is one, becomes the detail.
async fn json_errors(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 8 * 1024)
        .await
        .ok()
        .and_then(|b| String::from_utf8(b.to_vec()).ok())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty());
    let detail = if status == StatusCode::METHOD_NOT_ALLOWED {
        let allowed = parts
            .headers
            .get(header::ALLOW)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        format!("method {method} is not allowed here (allowed: {allowed})")
    } else {
        text.unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_string())
    };
    let mut out = detail_response(status, detail);
    // `append`: a header given more than once (Vary, Set-Cookie) keeps every value.
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().append(name.clone(), value.clone());
        }
    }
    out
}

#[derive(Clone)]
struct Limiter {
    slots: Arc<Semaphore>,
    timeout: Duration,
}

/// At most MAX_CONCURRENT_REQUESTS in flight, the rest refused with 503 at once (as the
/// old service did); each bounded by REQUEST_TIMEOUT_SECS once it has its slot (its body
/// was read before, under the same deadline: see `body`).
async fn limit_requests(State(limit): State<Limiter>, req: Request, next: Next) -> Response {
    let Ok(_permit) = limit.slots.clone().try_acquire_owned() else {
        return detail_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is busy; try again shortly",
        );
    };
    match tokio::time::timeout(limit.timeout, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => detail_response(StatusCode::REQUEST_TIMEOUT, "the request took too long"),
    }
}

/// An error answered to a request with a body may leave the body unread (refused when
/// busy, rejected before the upload was read, timed out). hyper then closes the
/// connection after the answer without saying so: a client that reused the connection
/// got a connection error instead of an answer, and one still sending its upload got a
/// broken pipe instead of the 503 (both seen under overload). So such answers say
/// `Connection: close`, and the rest of an abandoned body is read and discarded in the
/// background (at most `drain_bytes`, for at most `DRAIN_TIME`, holding no request slot)
/// so that the client gets to read the answer before the connection closes. Not after a
/// 408: a client too slow to send its request in time is not waited for.
async fn close_if_body_unread(
    State(drain_bytes): State<usize>,
    req: Request,
    next: Next,
) -> Response {
    let headers = req.headers();
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if !has_body {
        return next.run(req).await;
    }
    let abandoned = Abandoned::default();
    let req = req.map(|b| {
        Body::new(WatchedBody {
            inner: Some(b),
            done: false,
            abandoned: abandoned.clone(),
        })
    });
    let mut resp = next.run(req).await;
    let status = resp.status();
    if status.is_client_error() || status.is_server_error() {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let rest = abandoned.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(mut body) = rest.filter(|_| status != StatusCode::REQUEST_TIMEOUT) {
        tokio::spawn(async move {
            let read_rest = async {
                let mut n = 0usize;
                while let Some(Ok(frame)) =
                    std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
                {
                    n += frame.data_ref().map_or(0, |d| d.len());
                    if n > drain_bytes {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIME, read_rest).await;
        });
    }
    resp
}

/// How long an abandoned request body is read for.
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Where a request body dropped before its end is left for `close_if_body_unread`.
type Abandoned = Arc<std::sync::Mutex<Option<Body>>>;

/// A request body that, dropped before its end, leaves the rest in `abandoned`.
struct WatchedBody {
    inner: Option<Body>,
    done: bool,
    abandoned: Abandoned,
}

impl HttpBody for WatchedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        let polled = std::pin::Pin::new(inner).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None)) {
            self.done = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner
            .as_ref()
            .map(HttpBody::size_hint)
            .unwrap_or_default()
    }
}

impl Drop for WatchedBody {
    fn drop(&mut self) {
        if let Some(body) = self.inner.take() {
            if !self.done && !body.is_end_stream() {
                *self.abandoned.lock().unwrap_or_else(|p| p.into_inner()) = Some(body);
            }
        }
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
    let addr = format!(
        "{}:{}",
        state.http_settings().host,
        state.http_settings().port
    );
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (HOST/PORT): {e}"))?;
    tracing::info!(%addr, "listening");
    serve_on(listener, state).await
}

pub async fn serve_on(listener: tokio::net::TcpListener, state: AppState) -> anyhow::Result<()> {
    serve_until(listener, state, shutdown_signal()).await
}

/// Serves until `stop` resolves, then stops accepting (new connections are refused),
/// closes idle connections, lets requests in flight finish for up to SHUTDOWN_GRACE_SECS,
/// and returns.
///
/// HTTP/1.1, as Render's proxy and the old uvicorn service speak it, with a deadline for
/// each request's headers (HEADER_READ_TIMEOUT_SECS): a client that trickles its headers
/// or holds a connection without sending a request is disconnected. (`axum::serve` sets
/// no timer, so hyper's header timeout never fires there.) Bodies are bounded by
/// REQUEST_TIMEOUT_SECS in `limit_requests`.
pub async fn serve_until(
    mut listener: tokio::net::TcpListener,
    state: AppState,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use axum::serve::Listener;
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let grace = state.http_settings().shutdown_grace;
    let header_timeout = state
        .http_settings()
        .header_read_timeout
        .max(Duration::from_secs(1));
    let app = app(state);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    loop {
        // `Listener::accept` retries accept errors (e.g. out of file descriptors) itself.
        let (io, _peer) = tokio::select! {
            conn = Listener::accept(&mut listener) => conn,
            _ = &mut stop => break,
        };
        let conn = http.serve_connection(TokioIo::new(io), TowerToHyperService::new(app.clone()));
        let mut closing = closing_rx.clone();
        connections.spawn(async move {
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = closing.wait_for(|c| *c) => {}
            }
            // Finish the request in flight (if any), then close.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    tracing::info!(
        grace_secs = grace.as_secs(),
        connections = connections.len(),
        "shutting down: finishing requests in flight"
    );
    let _ = closing_tx.send(true);
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "grace period over; exiting with requests still running"
        );
        connections.abort_all();
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
