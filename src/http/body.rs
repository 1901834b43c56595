//! Request bodies are read in full before a request takes a search slot, so a client
//! that is still sending (or trickling one byte every few seconds) holds no slot.
//!
//! While a body arrives:
//! - a declared `Content-Length` over the route's limit is refused with 413 at once,
//!   before any of the body is read, and a body that grows past it while read, too;
//! - every byte held counts against one budget shared by all requests
//!   (MAX_BODY_BUFFER_BYTES), taken as the bytes arrive, so clients that send slowly hold
//!   nearly nothing; past the budget: 503;
//! - after `GRACE`, the body must keep arriving at MIN_BODY_BYTES_PER_SEC on average, and
//!   it must be complete within REQUEST_TIMEOUT_SECS; otherwise: 408.
//!
//! The bytes (and their share of the budget) are held until the response is written.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::error::detail_response;

/// How long a body may take before the minimum rate applies (a client's first packets,
/// TCP slow start, a phone waking its radio).
pub const GRACE: Duration = Duration::from_secs(5);

/// The limits of one route's bodies, over a budget shared by every route.
#[derive(Clone)]
pub struct BodyReader {
    /// Largest body of this route.
    pub limit: usize,
    /// Bytes of bodies held at once, over all routes.
    pub budget: Arc<Semaphore>,
    pub min_bytes_per_sec: u64,
    /// The whole body must have arrived by then.
    pub timeout: Duration,
}

/// A body that could not be read, as the client sees it.
struct Refused(StatusCode, String);

/// Middleware: reads the body in full (see the module doc), then runs the request with it.
pub async fn read_body_first(
    State(reader): State<BodyReader>,
    req: Request,
    next: Next,
) -> Response {
    let declared = declared_length(req.headers());
    if declared.is_some_and(|n| n > reader.limit as u64) {
        return too_large(reader.limit);
    }
    let chunked = req.headers().contains_key(header::TRANSFER_ENCODING);
    if declared.unwrap_or(0) == 0 && !chunked {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    match reader.read(body).await {
        Ok((chunks, _held)) => {
            let body = Body::from_stream(futures::stream::iter(
                chunks.into_iter().map(Ok::<_, std::convert::Infallible>),
            ));
            next.run(Request::from_parts(parts, body)).await
        }
        Err(Refused(status, detail)) => detail_response(status, detail),
    }
}

impl BodyReader {
    async fn read(
        &self,
        body: Body,
    ) -> Result<(Vec<Bytes>, Option<OwnedSemaphorePermit>), Refused> {
        let start = Instant::now();
        let mut stream = body.into_data_stream();
        let mut chunks = Vec::new();
        let mut held: Option<OwnedSemaphorePermit> = None;
        let mut received = 0usize;
        loop {
            // The next byte is due when the average rate would fall below the minimum.
            let due = start
                + GRACE
                + Duration::from_secs_f64((received + 1) as f64 / self.min_bytes_per_sec as f64);
            let deadline = due.min(start + self.timeout);
            let chunk = match tokio::time::timeout_at(deadline, stream.next()).await {
                Err(_) => {
                    return Err(Refused(
                        StatusCode::REQUEST_TIMEOUT,
                        "the request body arrived too slowly".into(),
                    ))
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    return Err(Refused(
                        StatusCode::BAD_REQUEST,
                        format!("the request body could not be read: {e}"),
                    ))
                }
                Ok(Some(Ok(chunk))) => chunk,
            };
            if chunk.len() > self.limit - received {
                return Err(Refused(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    too_large_detail(self.limit),
                ));
            }
            let n = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
            let Ok(permit) = self.budget.clone().try_acquire_many_owned(n) else {
                return Err(Refused(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the server is busy receiving other uploads; try again shortly".into(),
                ));
            };
            match held.as_mut() {
                Some(h) => h.merge(permit),
                None => held = Some(permit),
            }
            received += chunk.len();
            chunks.push(chunk);
        }
        Ok((chunks, held))
    }
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn too_large_detail(limit: usize) -> String {
    format!("the request body is larger than the limit of {limit} bytes")
}

fn too_large(limit: usize) -> Response {
    detail_response(StatusCode::PAYLOAD_TOO_LARGE, too_large_detail(limit))
}
