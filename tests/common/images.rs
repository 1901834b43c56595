//! A real HTTP server on 127.0.0.1 for product photos, with per-path behaviours that
//! tests change while it runs:
//!
//! ```ignore
//! let images = ImageServer::start().await;
//! images.put("cat.png", photo_bytes("chelsea.png"));
//! let url = images.url("cat.png");          // http://127.0.0.1:PORT/cat.png
//! images.fail("cat.png", 500);              // now answers 500
//! images.delay("cat.png", Duration::from_secs(5));
//! assert_eq!(images.hits("cat.png"), 1);
//! ```
//!
//! Paths are matched without the query string and without the leading `/`, so
//! `url("a.png?v=2")` is served as `a.png` (handy to defeat a cache) and counted there.
//! Any method is answered the same way. Unknown paths answer 404.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use tokio::sync::oneshot;

/// What is set for one path. Each part is independent: a path may have no body and
/// still have a status or a delay.
#[derive(Default)]
struct Entry {
    body: Option<(Bytes, String)>,
    status: Option<StatusCode>,
    delay: Option<Duration>,
    redirect: Option<String>,
    hits: usize,
}

type Shared = Arc<Mutex<HashMap<String, Entry>>>;

/// Serves until dropped.
pub struct ImageServer {
    addr: SocketAddr,
    state: Shared,
    shutdown: Option<oneshot::Sender<()>>,
}

impl ImageServer {
    /// Binds 127.0.0.1 on a free port and serves from a spawned task (needs a tokio
    /// runtime, e.g. inside `#[tokio::test]`).
    pub async fn start() -> ImageServer {
        let state: Shared = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind image server");
        let addr = listener.local_addr().unwrap();
        let app = Router::new().fallback(serve).with_state(state.clone());
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
                .expect("image server");
        });
        ImageServer {
            addr,
            state,
            shutdown: Some(tx),
        }
    }

    /// `http://127.0.0.1:PORT/<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `bytes` at `path`, with a content type guessed from the bytes (PNG, JPEG,
    /// GIF, WebP, BMP; else `application/octet-stream`).
    pub fn put(&self, path: &str, bytes: impl Into<Bytes>) {
        let bytes = bytes.into();
        let ct = sniff(&bytes);
        self.put_with_type(path, bytes, ct);
    }

    /// Serves `bytes` at `path` with this `Content-Type` (e.g. a wrong one on purpose).
    pub fn put_with_type(&self, path: &str, bytes: impl Into<Bytes>, content_type: &str) {
        self.with(path, |e| {
            e.body = Some((bytes.into(), content_type.to_string()))
        });
    }

    /// Forgets the body and every behaviour of `path` (404 from now on); keeps its hits.
    pub fn remove(&self, path: &str) {
        self.with(path, |e| {
            *e = Entry {
                hits: e.hits,
                ..Entry::default()
            }
        });
    }

    /// Answers `status` (with a short text body) instead of the content.
    pub fn fail(&self, path: &str, status: u16) {
        let status = StatusCode::from_u16(status).expect("valid HTTP status");
        self.with(path, |e| e.status = Some(status));
    }

    /// Waits this long before answering (whatever the answer is).
    pub fn delay(&self, path: &str, delay: Duration) {
        self.with(path, |e| e.delay = Some(delay));
    }

    /// Answers `302 Found` with `Location: location` (absolute URL or path).
    pub fn redirect(&self, path: &str, location: &str) {
        self.with(path, |e| e.redirect = Some(location.to_string()));
    }

    /// Drops the status, delay and redirect set for `path`; keeps its body and hits.
    pub fn clear_behaviour(&self, path: &str) {
        self.with(path, |e| {
            e.status = None;
            e.delay = None;
            e.redirect = None;
        });
    }

    /// Requests received for `path` so far (counted on arrival, before any delay).
    pub fn hits(&self, path: &str) -> usize {
        let map = self.state.lock().unwrap();
        map.get(key(path)).map_or(0, |e| e.hits)
    }

    /// Requests received for all paths so far.
    pub fn total_hits(&self) -> usize {
        self.state.lock().unwrap().values().map(|e| e.hits).sum()
    }

    fn with(&self, path: &str, f: impl FnOnce(&mut Entry)) {
        let mut map = self.state.lock().unwrap();
        f(map.entry(key(path).to_string()).or_default());
    }
}

impl Drop for ImageServer {
    fn drop(&mut self) {
        // Stops accepting; connections end after their request in flight.
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn key(path: &str) -> &str {
    let path = path.split('?').next().unwrap_or_default();
    path.trim_start_matches('/')
}

async fn serve(State(state): State<Shared>, uri: Uri) -> Response {
    // Decide under the lock, answer after it: the delay must not block other paths.
    let (delay, answer) = {
        let mut map = state.lock().unwrap();
        let entry = map.entry(key(uri.path()).to_string()).or_default();
        entry.hits += 1;
        let answer = if let Some(status) = entry.status {
            (status, format!("status {status} set by the test")).into_response()
        } else if let Some(loc) = &entry.redirect {
            (StatusCode::FOUND, [(header::LOCATION, loc.clone())]).into_response()
        } else if let Some((bytes, ct)) = &entry.body {
            ([(header::CONTENT_TYPE, ct.clone())], bytes.clone()).into_response()
        } else {
            (StatusCode::NOT_FOUND, "not found").into_response()
        };
        (entry.delay, answer)
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    answer
}

fn sniff(b: &[u8]) -> &'static str {
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        "image/png"
    } else if b.starts_with(b"\xff\xd8\xff") {
        "image/jpeg"
    } else if b.starts_with(b"GIF8") {
        "image/gif"
    } else if b.len() >= 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WEBP" {
        "image/webp"
    } else if b.starts_with(b"BM") {
        "image/bmp"
    } else {
        "application/octet-stream"
    }
}
