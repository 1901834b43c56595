//! Integration tests of `search_img::fetch` against real HTTP servers on 127.0.0.1.
//!
//! Every server listens on 127.0.0.1 on a port chosen by the OS and lives inside the test's
//! runtime, so it stops with the test; every test is bounded in time. No traffic goes
//! anywhere but loopback: refusal tests for non-loopback addresses first assert that the
//! URL is refused by `check_url` (the check `fetch` runs before any connection), and only
//! then call `fetch`.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Path;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use search_img::fetch::{check_url, parse_url, FetchError, FetchSettings, Fetcher};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Upper bound for any single test.
const TEST_BOUND: Duration = Duration::from_secs(30);

async fn bounded<F: Future<Output = ()>>(fut: F) {
    tokio::time::timeout(TEST_BOUND, fut)
        .await
        .expect("test exceeded its time bound");
}

fn image_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

const IMG_LEN: usize = 3000;

/// 302 to `target`.
fn found(target: &str) -> Response {
    (StatusCode::FOUND, [(header::LOCATION, target.to_owned())]).into_response()
}

async fn redirect_chain(Path(n): Path<u32>) -> Response {
    if n == 0 {
        found("/img")
    } else {
        found(&format!("/redirect/{}", n - 1))
    }
}

/// Serves the test routes on 127.0.0.1:0; returns the address and a request counter.
async fn start_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = Router::new()
        .route("/img", get(|| async { image_bytes(IMG_LEN) }))
        .route("/big", get(|| async { image_bytes(4096) }))
        .route(
            "/chunked",
            get(|| async {
                let chunks = (0..16).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![7u8; 1024])));
                Body::from_stream(futures::stream::iter(chunks))
            }),
        )
        .route(
            "/chunked-small",
            get(|| async {
                let chunks = (0..4).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![9u8; 100])));
                Body::from_stream(futures::stream::iter(chunks))
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                "too late"
            }),
        )
        .route(
            "/trickle",
            get(|| async {
                let stream = futures::stream::unfold(0u32, |i| async move {
                    if i >= 100 {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Some((Ok::<_, std::io::Error>(Bytes::from_static(b"x")), i + 1))
                });
                Body::from_stream(stream)
            }),
        )
        .route("/redirect/{n}", get(redirect_chain))
        .route("/loop", get(|| async { found("/loop") }))
        .route(
            "/to-localhost",
            get(|headers: HeaderMap| async move {
                let host = headers
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let port = host.rsplit(':').next().unwrap_or("80");
                found(&format!("http://localhost:{port}/img"))
            }),
        )
        .route("/to-file", get(|| async { found("file:///etc/passwd") }))
        .route("/to-ftp", get(|| async { found("ftp://127.0.0.1/x") }))
        .route("/no-location", get(|| async { StatusCode::FOUND }))
        .route(
            "/server-error",
            get(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
        )
        .route(
            "/ua",
            get(|headers: HeaderMap| async move {
                headers
                    .get(header::USER_AGENT)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            }),
        )
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                counter.fetch_add(1, Ordering::SeqCst);
                next.run(req)
            },
        ));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, hits)
}

fn private_cfg() -> FetchSettings {
    FetchSettings {
        allow_private_hosts: true,
        connect_timeout: Duration::from_secs(2),
        total_timeout: Duration::from_secs(5),
        max_bytes: 1024 * 1024,
        max_redirects: 5,
    }
}

fn fetcher(cfg: FetchSettings) -> Fetcher {
    Fetcher::new(cfg).expect("fetcher builds")
}

#[tokio::test]
async fn fetch_ok_returns_body() {
    if !common::netns::loopback_only() {
        return;
    }
    bounded(async {
        let (addr, _) = start_server().await;
        let f = fetcher(private_cfg());
        let body = f
            .fetch(&format!("http://{addr}/img"))
            .await
            .expect("fetch ok");
        assert_eq!(&body[..], &image_bytes(IMG_LEN)[..]);

        // Through the guarded resolver (a host name rather than a literal).
        let body = f
            .fetch(&format!("http://localhost:{}/img", addr.port()))
            .await
            .expect("fetch via localhost ok");
        assert_eq!(&body[..], &image_bytes(IMG_LEN)[..]);

        // Chunked body under the cap.
        let body = f
            .fetch(&format!("http://{addr}/chunked-small"))
            .await
            .expect("chunked ok");
        assert_eq!(&body[..], &[9u8; 400][..]);

        // Exactly at the cap is accepted.
        let exact = fetcher(FetchSettings {
            max_bytes: IMG_LEN,
            ..private_cfg()
        });
        let body = exact
            .fetch(&format!("http://{addr}/img"))
            .await
            .expect("at cap");
        assert_eq!(body.len(), IMG_LEN);
    })
    .await;
}

#[tokio::test]
async fn sends_user_agent() {
    if !common::netns::loopback_only() {
        return;
    }
    bounded(async {
        let (addr, _) = start_server().await;
        let body = fetcher(private_cfg())
            .fetch(&format!("http://{addr}/ua"))
            .await
            .expect("fetch ok");
        let ua = std::str::from_utf8(&body).expect("utf8");
        assert_eq!(ua, format!("search-img/{}", env!("CARGO_PKG_VERSION")));
    })
    .await;
}

#[tokio::test]
async fn clones_share_client_and_run_concurrently() {
    if !common::netns::loopback_only() {
        return;
    }
    bounded(async {
        let (addr, _) = start_server().await;
        let f = fetcher(private_cfg());
        let url = format!("http://{addr}/img");
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let f = f.clone();
                let url = url.clone();
                tokio::spawn(async move { f.fetch(&url).await })
            })
            .collect();
        for t in tasks {
            let body = t.await.expect("task").expect("fetch ok");
            assert_eq!(body.len(), IMG_LEN);
        }
    })
    .await;
}

#[tokio::test]
async fn too_large_with_content_length() {
    if !common::netns::loopback_only() {
        return;
    }
    bounded(async {
        let (addr, _) = start_server().await;
        let f = fetcher(FetchSettings {
            max_bytes: 1024,
            ..private_cfg()
        });
        let err = f.fetch(&format!("http://{addr}/big")).await.unwrap_err();
        assert_eq!(err, FetchError::TooLarge { limit: 1024 });
        assert!(err.is_client_fault());
    })
    .await;
}

#[tokio::test]
async fn too_large_chunked_without_content_length() {
    if !common::netns::loopback_only() {
        return;
    }
    bounded(async {
        let (addr, _) = start_server().await;
        let f = fetcher(FetchSettings {
            max_bytes: 4096,
            ..private_cfg()
        });
        let err = f
            .fetch(&format!("http://{addr}/chunked"))
            .await
            .unwrap_err();
        assert_eq!(err, FetchError::TooLarge { limit: 4096 });
    })
    .await;
}

/// Reads from `sock` until the end of the request headers (or EOF / 64 KiB).
async fn read_request_head(sock: &mut tokio::net::TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 64 * 1024 {
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[tokio::test]
async fn endless_chunked_body_is_cut_off_early() {
    if !common::netns::loopback_only() {
        return;
    }
    bounded(async {
        // A raw server that streams chunks for as long as the client reads (up to 64 MiB)
        // and reports how much it wrote and whether the client hung up.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        const SERVER_CAP: usize = 64 * 1024 * 1024;
        let (tx, rx) = tokio::sync::oneshot::channel::<(usize, bool)>();
        tokio::spawn(async move {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            read_request_head(&mut sock).await;
            let head = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n";
            let mut hung_up = sock.write_all(head).await.is_err();
            let mut chunk = b"4000\r\n".to_vec();
            chunk.extend_from_slice(&[1u8; 0x4000]);
            chunk.extend_from_slice(b"\r\n");
            let mut written = 0usize;
            while !hung_up && written < SERVER_CAP {
                match tokio::time::timeout(Duration::from_secs(5), sock.write_all(&chunk)).await {
                    Ok(Ok(())) => written += 0x4000,
                    Ok(Err(_)) => hung_up = true,
                    Err(_) => break, // client stalled without hanging up
                }
            }
            let _ = tx.send((written, hung_up));
        });

        let f = fetcher(FetchSettings {
            max_bytes: 64 * 1024,
            ..private_cfg()
        });
        let started = Instant::now();
        let err = f.fetch(&format!("http://{addr}/")).await.unwrap_err();
        assert_eq!(err, FetchError::TooLarge { limit: 64 * 1024 });
        assert!(started.elapsed() < Duration::from_secs(3));

        let (written, hung_up) = tokio::time::timeout(Duration::from_secs(15), rx)
            .await
            .expect("server finished")
            .expect("server reported");
        assert!(hung_up, "the client should drop the connection");
        assert!(
            written < SERVER_CAP,
            "server wrote {written} bytes before noticing"
        );
    })
    .await;
}

#[tokio::test]
async fn declared_too_large_is_refused_without_reading_body() {
    if !common::netns::loopback_only() {
        return;
    }
    bounded(async {
        // Declares a 1 GiB body and then sends nothing: only the header can refuse it fast.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            read_request_head(&mut sock).await;
            let head = b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n";
            let _ = sock.write_all(head).await;
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let f = fetcher(FetchSettings {
            max_bytes: 1024,
            ..private_cfg()
        });
        let started = Instant::now();
        let err = f.fetch(&format!("http://{addr}/")).await.unwrap_err();
        assert_eq!(err, FetchError::TooLarge { limit: 1024 });
        assert!(started.elapsed() < Duration::from_secs(2));
    })
    .await;
}

#[tokio::test]
async fn slow_server_times_out() {
    if !common::netns::loopback_only() {
        return;
    }
    bounded(async {
        let (addr, _) = start_server().await;
        let f = fetcher(FetchSettings {
            total_timeout: Duration::from_millis(500),
            ..private_cfg()
        });
        let started = Instant::now();
        let err = f.fetch(&format!("http://{addr}/slow")).await.unwrap_err();
        assert_eq!(err, FetchError::Timeout);
        assert!(err.is_client_fault());
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    })
    .await;
}

#[tokio::test]
async fn trickling_body_times_out() {
    if !common::netns::loopback_only() {
        return;
    }
    bounded(async {
        let (addr, _) = start_server().await;
        let f = fetcher(FetchSettings {
            total_timeout: Duration::from_millis(700),
            ..private_cfg()
        });
        let started = Instant::now();
        let err = f
            .fetch(&format!("http://{addr}/trickle"))
            .await
            .unwrap_err();
        assert_eq!(err, FetchError::Timeout);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    })
    .await;
}

#[tokio::test]
async fn silent_server_times_out() {
    if !common::netns::loopback_only() {
        return;
    }
    bounded(async {
        // Accepts the connection and never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            if let Ok((sock, _)) = listener.accept().await {
                tokio::time::sleep(Duration::from_secs(10)).await;
                drop(sock);
            }
        });
        let f = fetcher(FetchSettings {
            total_timeout: Duration::from_millis(500),
            ..private_cfg()
        });
        let started = Instant::now();
        let err = f.fetch(&format!("http://{addr}/")).await.unwrap_err();
        assert_eq!(err, FetchError::Timeout);
        assert!(started.elapsed() < Duration::from_secs(3));
    })
    .await;
}

#[tokio::test]
async fn upstream_status_errors() {
    if !common::netns::loopback_only() {
        return;
    }
    bounded(async {
        let (addr, _) = start_server().await;
        let f = fetcher(private_cfg());
        let err = f
            .fetch(&format!("http://{addr}/missing"))
            .await
            .unwrap_err();
        assert_eq!(err, FetchError::HttpStatus(404));
        assert!(err.is_client_fault());
        let err = f
            .fetch(&format!("http://{addr}/server-error"))
            .await
            .unwrap_err();
        assert_eq!(err, FetchError::HttpStatus(500));
    })
    .await;
}

#[tokio::test]
async fn connection_refused_is_network_error() {
    if !common::netns::loopback_only() {
        return;
    }
    bounded(async {
        // A port that was just free on loopback.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let err = fetcher(private_cfg())
            .fetch(&format!("http://{addr}/"))
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Network(_)), "{err:?}");
        assert!(err.is_client_fault());
    })
    .await;
}

#[tokio::test]
async fn redirects_followed_within_limit() {
    if !common::netns::loopback_only() {
        return;
    }
    bounded(async {
        let (addr, _) = start_server().await;
        let f = fetcher(private_cfg());
        for n in [0, 1, 4] {
            // /redirect/n makes n + 1 redirects.
            let body = f
                .fetch(&format!("http://{addr}/redirect/{n}"))
                .await
                .unwrap_or_else(|e| panic!("chain of {} redirects: {e}", n + 1));
            assert_eq!(&body[..], &image_bytes(IMG_LEN)[..]);
        }
        // Redirect to a host name (connects through the guarded resolver).
        let body = f
            .fetch(&format!("http://{addr}/to-localhost"))
            .await
            .expect("redirect to localhost ok");
        assert_eq!(&body[..], &image_bytes(IMG_LEN)[..]);
    })
    .await;
}

#[tokio::test]
async fn too_many_redirects() {
    if !common::netns::loopback_only() {
        return;
    }
    bounded(async {
        let (addr, _) = start_server().await;
        let f = fetcher(private_cfg());
        // 6 redirects with a limit of 5.
        let err = f
            .fetch(&format!("http://{addr}/redirect/5"))
            .await
            .unwrap_err();
        assert_eq!(err, FetchError::TooManyRedirects);
        let err = f.fetch(&format!("http://{addr}/loop")).await.unwrap_err();
        assert_eq!(err, FetchError::TooManyRedirects);

        let none = fetcher(FetchSettings {
            max_redirects: 0,
            ..private_cfg()
        });
        let err = none
            .fetch(&format!("http://{addr}/redirect/0"))
            .await
            .unwrap_err();
        assert_eq!(err, FetchError::TooManyRedirects);
    })
    .await;
}

#[tokio::test]
async fn redirect_to_other_scheme_is_refused() {
    if !common::netns::loopback_only() {
        return;
    }
    bounded(async {
        let (addr, _) = start_server().await;
        let f = fetcher(private_cfg());
        let err = f
            .fetch(&format!("http://{addr}/to-file"))
            .await
            .unwrap_err();
        assert_eq!(err, FetchError::UnsupportedScheme("file".to_owned()));
        let err = f.fetch(&format!("http://{addr}/to-ftp")).await.unwrap_err();
        assert_eq!(err, FetchError::UnsupportedScheme("ftp".to_owned()));
        // A redirect without a target is just an unsuccessful status.
        let err = f
            .fetch(&format!("http://{addr}/no-location"))
            .await
            .unwrap_err();
        assert_eq!(err, FetchError::HttpStatus(302));
    })
    .await;
}

#[tokio::test]
async fn redirect_targets_are_checked() {
    if !common::netns::loopback_only() {
        return;
    }
    // A forbidden redirect target cannot be served from a public address in a test, so the
    // check the redirect policy runs on every hop is exercised directly.
    for target in [
        "http://127.0.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/",
        "http://2130706433/",
        "http://10.0.0.1/",
    ] {
        let url = parse_url(target).expect("parses");
        assert!(
            matches!(
                search_img::fetch::check_redirect(&url, 1, 5, false),
                Err(FetchError::ForbiddenHost(_))
            ),
            "{target}"
        );
    }
}

/// Loopback URLs: refused whether or not a connection would reach something, and the
/// server must see no request.
#[tokio::test]
async fn refuses_loopback_hosts() {
    if !common::netns::loopback_only() {
        return;
    }
    bounded(async {
        // Counts raw TCP accepts, so even a connection without a request would show.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepts = Arc::new(AtomicUsize::new(0));
        let seen = accepts.clone();
        tokio::spawn(async move {
            while let Ok((_sock, _)) = listener.accept().await {
                seen.fetch_add(1, Ordering::SeqCst);
            }
        });
        let port = addr.port();
        let f = fetcher(FetchSettings {
            allow_private_hosts: false,
            connect_timeout: Duration::from_secs(1),
            total_timeout: Duration::from_secs(3),
            ..FetchSettings::default()
        });
        for url in [
            format!("http://127.0.0.1:{port}/"),
            format!("http://localhost:{port}/"),
            format!("http://localhost.:{port}/"),
            format!("http://LOCALHOST:{port}/img.png"),
            format!("http://2130706433:{port}/"),
            format!("http://0177.0.0.1:{port}/"),
            format!("http://0x7f.0.0.1:{port}/"),
            format!("http://127.1:{port}/"),
            format!("http://good.com@127.0.0.1:{port}/"),
            format!("http://[::ffff:127.0.0.1]:{port}/"),
        ] {
            let err = f.fetch(&url).await.unwrap_err();
            assert!(
                matches!(err, FetchError::ForbiddenHost(_)),
                "{url}: {err:?}"
            );
            assert!(err.is_client_fault());
            assert!(
                err.to_string().contains("private or reserved address"),
                "{url}: {err}"
            );
        }
        // Give any stray connection a moment to be accepted, then check none happened.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(accepts.load(Ordering::SeqCst), 0, "a refused URL connected");
    })
    .await;
}

#[tokio::test]
async fn refuses_forbidden_hosts_before_connecting() {
    if !common::netns::loopback_only() {
        return;
    }
    bounded(async {
        let f = fetcher(FetchSettings {
            allow_private_hosts: false,
            connect_timeout: Duration::from_secs(1),
            total_timeout: Duration::from_secs(3),
            ..FetchSettings::default()
        });
        for url in [
            "http://127.0.0.1/",
            "http://2130706433/",
            "http://0177.0.0.1/",
            "http://0x7f.0.0.1/",
            "http://127.1/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.0.0.1/",
            "http://192.168.1.1/",
            "http://172.16.0.1/",
            "http://100.64.0.1/",
            "http://0.0.0.0/",
            "http://[fc00::1]/",
            "http://[fe80::1]/",
            "http://224.0.0.1/",
            "http://255.255.255.255/",
            "http://good.com@127.0.0.1/",
            "http://[64:ff9b::7f00:1]/",
            "http://[::]/",
            "https://[2002:7f00:1::1]/",
        ] {
            // Literal hosts: the pre-connection check must refuse them, so a broken fetch
            // could never send anything to these addresses.
            let parsed = parse_url(url).expect("parses");
            assert!(
                matches!(check_url(&parsed, false), Err(FetchError::ForbiddenHost(_))),
                "{url} must be refused before any connection"
            );
            let err = f.fetch(url).await.unwrap_err();
            assert!(
                matches!(err, FetchError::ForbiddenHost(_)),
                "{url}: {err:?}"
            );
        }
        // Host names resolving to loopback: refused by the resolver.
        for url in [
            "http://localhost/",
            "http://localhost./",
            "http://a.localhost/",
        ] {
            let err = f.fetch(url).await.unwrap_err();
            assert!(
                matches!(err, FetchError::ForbiddenHost(_)),
                "{url}: {err:?}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn refuses_other_schemes_and_garbage() {
    if !common::netns::loopback_only() {
        return;
    }
    bounded(async {
        let f = fetcher(private_cfg());
        for (url, scheme) in [
            ("file:///etc/passwd", "file"),
            ("ftp://x/", "ftp"),
            ("gopher://x/", "gopher"),
            ("gopher://", "gopher"),
            ("data:image/png;base64,iVBORw0KGgo=", "data"),
            ("data:", "data"),
        ] {
            let err = f.fetch(url).await.unwrap_err();
            assert_eq!(
                err,
                FetchError::UnsupportedScheme(scheme.to_owned()),
                "{url}"
            );
            assert!(err.is_client_fault());
        }
        for url in ["not a url", "", "http://", "http://[::1", "//example.com/x"] {
            let err = f.fetch(url).await.unwrap_err();
            assert!(matches!(err, FetchError::InvalidUrl(_)), "{url:?}: {err:?}");
            assert!(err.is_client_fault());
        }
        let err = f
            .fetch("https://user:secret@example.com/x.png")
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::InvalidUrl(_)), "{err:?}");
    })
    .await;
}
