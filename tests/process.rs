//! The real `search-img` binary as a process: overload and memory, slow clients,
//! SIGKILL in the middle of indexing, SIGTERM with a request in flight, the monitor.
//!
//! Each test starts its own SecantusDB, image server on 127.0.0.1 and service process on
//! a free port; the service dies with the test binary (parent-death signal) and on drop.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::app::{product_doc, test_vars, CATALOGUE};
use common::images::ImageServer;
use common::mongo::MongoServer;
use common::*;
use mongodb::bson::{doc, Document};
use search_img::monitor::BUDGET_MB;
use serde_json::Value;

/// Sets the parent-death signal, then becomes the service (same pid), so the service
/// never outlives the test binary even when it is killed outright.
const PDEATHSIG_EXEC: &str = "\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
if os.getppid() != int(sys.argv[1]):
    sys.exit('parent already gone')
os.execv(sys.argv[2], sys.argv[2:])
";

const MB: u64 = 1024 * 1024;

/// These tests run one at a time: each loads the machine on purpose (and the overload
/// figures mean little with another service process competing for the cores).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One `search-img` process.
struct Service {
    child: tokio::process::Child,
    pid: u32,
    port: u16,
    base: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Service {
    /// Spawns `search-img <args>` with exactly `vars` (plus HOST/PORT) in an empty
    /// directory (no `.env` picked up), stdout and stderr (the log) into a file. Does
    /// not wait for readiness.
    fn spawn(vars: &[(String, String)], args: &[&str]) -> Service {
        let dir = tempfile::Builder::new()
            .prefix("search-img-proc-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let log = dir.path().join("service.log");
        let logf = std::fs::File::create(&log).unwrap();
        let python = root().join(".tools/venv/bin/python");
        let mut cmd = tokio::process::Command::new(python);
        cmd.arg("-c")
            .arg(PDEATHSIG_EXEC)
            .arg(std::process::id().to_string())
            .arg(env!("CARGO_BIN_EXE_search-img"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LOG_LEVEL", "info,ort=warn")
            .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .current_dir(dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .kill_on_drop(true);
        let child = cmd.spawn().expect("spawn search-img");
        let pid = child.id().unwrap();
        Service {
            child,
            pid,
            port,
            base: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        }
    }

    /// Spawns `search-img serve` and waits until `/api/v1/health` answers 200.
    async fn serve(vars: &[(String, String)]) -> Service {
        let mut s = Service::spawn(vars, &["serve"]);
        let http = client();
        let t = Instant::now();
        loop {
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("search-img exited with {status}:\n{}", s.log_tail());
            }
            if let Ok(r) = http.get(s.url("/api/v1/health")).send().await {
                if r.status() == 200 {
                    return s;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "not healthy after 60 s:\n{}",
                s.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {}", self.pid);
    }

    /// SIGKILL and reap.
    async fn kill9(&mut self) {
        self.child.kill().await.unwrap();
    }

    async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .ok()
            .map(|r| r.unwrap())
    }

    /// A field of /proc/PID/status in bytes (VmRSS, VmHWM).
    fn proc_status_bytes(&self, field: &str) -> u64 {
        proc_status_bytes(self.pid, field).unwrap_or(0)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let s = self.log();
        s[s.len().saturating_sub(6000)..].to_string()
    }
}

fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(&format!("{field}:")))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .no_proxy()
        .build()
        .unwrap()
}

/// `base` with `extra` set, and room for debug-build decoding on a loaded machine (the
/// decode deadline is not what these tests are about).
fn vars_with(base: Vec<(String, String)>, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut m: HashMap<String, String> = base.into_iter().collect();
    m.entry("DECODE_TIMEOUT_SECS".into())
        .or_insert_with(|| "120".into());
    for (k, v) in extra {
        m.insert(k.to_string(), v.to_string());
    }
    m.into_iter().collect()
}

/// Seeds the eight-photo test catalogue; returns name -> image URL.
async fn seed_catalogue(mongo: &MongoServer, images: &ImageServer) -> HashMap<String, String> {
    let products = mongo
        .client()
        .await
        .database("test")
        .collection::<Document>("products");
    let mut urls = HashMap::new();
    for (name, file) in CATALOGUE {
        images.put(file, photo_bytes(file));
        let url = images.url(file);
        products.insert_one(product_doc(name, &url)).await.unwrap();
        urls.insert(name.to_string(), url);
    }
    urls
}

fn upload_form(bytes: Vec<u8>) -> reqwest::multipart::Form {
    reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(bytes).file_name("query.jpg"),
    )
}

fn names(results: &Value) -> Vec<String> {
    results
        .as_array()
        .unwrap_or_else(|| panic!("not a result array: {results}"))
        .iter()
        .map(|r| r["product"]["productName"].as_str().unwrap_or("?").into())
        .collect()
}

/// A 4032 x 3024 JPEG (a phone camera's size), made once per target directory: encoding
/// it takes seconds in a debug build.
fn phone_photo() -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("phone-4032x3024.jpg");
    if let Ok(b) = std::fs::read(&path) {
        return b;
    }
    let big = image::imageops::resize(
        &photo("astronaut.png"),
        4032,
        3024,
        image::imageops::FilterType::Nearest,
    );
    let bytes = jpeg(&big, 90);
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    std::fs::write(&tmp, &bytes).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    bytes
}

/// Quantile of a sorted slice.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Polls `/api/v1/health` (and, for comparison, `/`, which touches neither MongoDB nor
/// the model) from its own OS thread, a new connection per check as a platform health
/// checker does, so its timings are not those of the test's runtime.
struct HealthProbe {
    stop: Arc<AtomicBool>,
    started: Instant,
    thread: Option<std::thread::JoinHandle<Vec<Check>>>,
}

#[derive(Clone, Copy)]
struct Check {
    /// Seconds since the probe started.
    at: f64,
    health: bool,
    code: u16,
    ms: f64,
}

impl HealthProbe {
    fn start(port: u16, every: Duration) -> HealthProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                let health = n.is_multiple_of(2);
                n += 1;
                let path = if health { "/api/v1/health" } else { "/" };
                let t = Instant::now();
                let code = raw_get(port, path, Duration::from_secs(10));
                out.push(Check {
                    at: started.elapsed().as_secs_f64(),
                    health,
                    code,
                    ms: t.elapsed().as_secs_f64() * 1e3,
                });
                std::thread::sleep(every);
            }
            out
        });
        HealthProbe {
            stop,
            started,
            thread: Some(thread),
        }
    }

    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn finish(mut self) -> Vec<Check> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// "n checks, non-200 k, p50/p99/max ms" of the checks of one kind in a time window.
fn probe_stats(checks: &[Check], health: bool, from: f64, to: f64) -> (usize, usize, Vec<f64>) {
    let sel: Vec<&Check> = checks
        .iter()
        .filter(|c| c.health == health && c.at >= from && c.at < to)
        .collect();
    let bad = sel.iter().filter(|c| c.code != 200).count();
    (sel.len(), bad, sorted(sel.iter().map(|c| c.ms).collect()))
}

fn fmt_stats((n, bad, ms): &(usize, usize, Vec<f64>)) -> String {
    format!(
        "{n} checks, {bad} non-200, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        quantile(ms, 0.5),
        quantile(ms, 0.99),
        quantile(ms, 1.0)
    )
}

/// A blocking HTTP/1.1 GET on a fresh connection; the status code, or 0 on failure.
fn raw_get(port: u16, path: &str, timeout: Duration) -> u16 {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(timeout));
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return 0;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let head = String::from_utf8_lossy(&buf[..buf.len().min(32)]).into_owned();
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[derive(Default, Debug)]
struct Tally {
    ok: usize,
    busy: usize,
    other: Vec<String>,
    busy_ms: Vec<f64>,
    ok_ms: Vec<f64>,
}

impl Tally {
    fn record(&mut self, r: Result<(u16, Value), String>, ms: f64) {
        match r {
            Ok((200, _)) => {
                self.ok += 1;
                self.ok_ms.push(ms);
            }
            Ok((503, body)) if body["detail"].as_str().is_some_and(|d| d.contains("busy")) => {
                self.busy += 1;
                self.busy_ms.push(ms);
            }
            Ok((code, body)) => self.other.push(format!("{code} {body}")),
            Err(e) => self.other.push(e),
        }
    }

    fn total(&self) -> usize {
        self.ok + self.busy + self.other.len()
    }
}

async fn send(req: reqwest::RequestBuilder) -> Result<(u16, Value), String> {
    let r = req.send().await.map_err(|e| format!("{e:?}"))?;
    let code = r.status().as_u16();
    let body = r.json().await.unwrap_or(Value::Null);
    Ok((code, body))
}

/// `POST /api/v1/refresh` until a pass has run to its end (a refresh that outlasts
/// REQUEST_TIMEOUT_SECS answers 202 and goes on; asking again waits for it and one more).
async fn refresh_to_end(http: &reqwest::Client, svc: &Service) -> Value {
    let t = Instant::now();
    loop {
        let (code, body) = send(http.post(svc.url("/api/v1/refresh"))).await.unwrap();
        match code {
            200 => return body,
            202 => assert!(t.elapsed() < Duration::from_secs(120), "{body}"),
            _ => panic!("refresh: {code} {body}"),
        }
    }
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// Overload with the int8 ViT-B/32 model, as deployed on a 512 MB instance: a burst of
/// 200 clients at once (at most MAX_CONCURRENT_REQUESTS admitted, the rest refused with
/// 503 at once), then 200 clients searching in a loop for a while. Health keeps
/// answering throughout, memory stays under 512 MB, and it serves normally afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_get_a_slot_or_a_quick_503_within_512_mb() {
    let _one = ONE_AT_A_TIME.lock().await;
    const CLIENTS: usize = 200;
    const SLOTS: usize = 10;
    const SLOW_IMAGE: Duration = Duration::from_secs(6);
    let mongo = MongoServer::start().await;
    let images = ImageServer::start().await;
    let urls = seed_catalogue(&mongo, &images).await;
    let vit = model("clip-vit-b32-int8");
    let vars = vars_with(
        test_vars(&mongo, &[]),
        &[
            ("MODEL_PATH", &vit.display().to_string()),
            ("MAX_CONCURRENT_REQUESTS", &SLOTS.to_string()),
            // As deployed: one intra-op thread per core, index pass at most every 30 s.
            ("ORT_INTRA_THREADS", "0"),
            ("CATALOG_SYNC_INTERVAL_SECS", "30"),
        ],
    );
    let svc = Service::serve(&vars).await;
    let http = client();
    // Load the model and index the catalogue.
    let (code, body) = send(
        http.post(svc.url("/api/v1/search/image?top_k=1"))
            .multipart(upload_form(jpeg(&photo("coffee.png"), 85))),
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(names(&body), ["Espresso cup"]);
    let rss_warm = svc.proc_status_bytes("VmRSS");

    let probe = HealthProbe::start(svc.port, Duration::from_millis(50));

    // Burst: 200 clients at once, each a URL search whose image takes 6 s to arrive, so
    // every admitted request is still in flight while the others are answered.
    images.put("slow.jpg", jpeg(&photo("coffee.png"), 80));
    images.delay("slow.jpg", SLOW_IMAGE);
    let slow = svc.url(&format!(
        "/api/v1/search/url?image_url={}",
        common::app::urlencode(&images.url("slow.jpg"))
    ));
    let burst = Arc::new(Mutex::new(Tally::default()));
    let burst_from = probe.now();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (http, url, burst) = (http.clone(), slow.clone(), burst.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = send(http.post(url)).await;
            burst
                .lock()
                .unwrap()
                .record(r, t.elapsed().as_secs_f64() * 1e3);
        }));
    }
    // Until every request is either answered or in flight at the image server, the
    // image server never sees more than SLOTS of them.
    let mut max_in_flight = 0;
    loop {
        let in_flight = images.hits("slow.jpg");
        max_in_flight = max_in_flight.max(in_flight);
        assert!(in_flight <= SLOTS, "{in_flight} requests admitted");
        let answered = burst.lock().unwrap().total();
        if answered + in_flight >= CLIENTS || t0.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused_by = t0.elapsed();
    for t in tasks {
        t.await.unwrap();
    }
    let burst = std::mem::take(&mut *burst.lock().unwrap());
    assert!(burst.other.is_empty(), "burst errors: {:?}", burst.other);
    assert_eq!(burst.ok, images.hits("slow.jpg"));
    assert!(burst.ok <= SLOTS);
    assert_eq!(burst.ok + burst.busy, CLIENTS);
    let busy_ms = sorted(burst.busy_ms.clone());

    // Sustained: 200 clients searching in a loop (half by URL, half by upload), each
    // backing off 50 ms after a 503.
    images.clear_behaviour("slow.jpg");
    let queries: Vec<(String, Vec<u8>)> = [
        "chelsea.png",
        "coffee.png",
        "rocket.jpg",
        "motorcycle_right.png",
    ]
    .iter()
    .map(|f| {
        let bytes = jpeg(&photo(f), 85);
        images.put(&format!("q/{f}"), bytes.clone());
        (images.url(&format!("q/{f}")), bytes)
    })
    .collect();
    let queries = Arc::new(queries);
    let load = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let (http, load, stop, queries, base) = (
            http.clone(),
            load.clone(),
            stop.clone(),
            queries.clone(),
            svc.base.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = i;
            while !stop.load(Ordering::Relaxed) {
                let (url, bytes) = &queries[n % queries.len()];
                let req = if n % 2 == 0 {
                    http.post(format!(
                        "{base}/api/v1/search/url?top_k=3&image_url={}",
                        common::app::urlencode(url)
                    ))
                } else {
                    http.post(format!("{base}/api/v1/search/image?top_k=3"))
                        .multipart(upload_form(bytes.clone()))
                };
                let t = Instant::now();
                let r = send(req).await;
                let busy = matches!(r, Ok((503, _)));
                load.lock()
                    .unwrap()
                    .record(r, t.elapsed().as_secs_f64() * 1e3);
                if busy {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                n += 1;
            }
        }));
    }
    let load_for = Duration::from_secs(10);
    let sustained_from = probe.now();
    let t1 = Instant::now();
    let mut rss_max = 0;
    while t1.elapsed() < load_for {
        rss_max = rss_max.max(svc.proc_status_bytes("VmRSS"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let load = std::mem::take(&mut *load.lock().unwrap());
    let sustained_to = probe.now();

    // Then phone photos, 4032 x 3024 (12 megapixels, 37 MB decoded), one by URL and one
    // uploaded, at once: what decoding costs in memory on top of the model. (In a debug
    // build each takes seconds to decode and resize; in release about 0.3 s.)
    let phone = phone_photo();
    images.put("q/phone.jpg", phone.clone());
    let phone_url = svc.url(&format!(
        "/api/v1/search/url?top_k=1&image_url={}",
        common::app::urlencode(&images.url("q/phone.jpg"))
    ));
    let phones_started = Instant::now();
    let phones = futures::future::join_all([
        send(http.post(phone_url)),
        send(
            http.post(svc.url("/api/v1/search/image?top_k=1"))
                .multipart(upload_form(phone)),
        ),
    ])
    .await;
    let phones_took = phones_started.elapsed();
    for r in &phones {
        let (code, body) = r.as_ref().unwrap();
        assert_eq!(*code, 200, "{body}");
        assert_eq!(names(body), ["Astronaut poster"]);
    }
    let checks = probe.finish();
    let health_all = probe_stats(&checks, true, 0.0, f64::MAX);
    let burst_health = probe_stats(&checks, true, burst_from, sustained_from);
    let sustained_health = probe_stats(&checks, true, sustained_from, sustained_to);
    let sustained_root = probe_stats(&checks, false, sustained_from, sustained_to);
    let burst_root = probe_stats(&checks, false, burst_from, sustained_from);
    let hwm = svc.proc_status_bytes("VmHWM");
    let ok_ms = sorted(load.ok_ms.clone());
    let load_busy_ms = sorted(load.busy_ms.clone());

    let report = format!(
        "overload (int8 ViT-B/32, {SLOTS} slots, {CLIENTS} clients):\n\
         burst: {} requests, {} admitted (max {} in flight at the image server), {} refused 503 \
         (all answered or admitted after {:.2} s; 503 latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms), \
         {} errors\n\
         sustained {:.0} s: {} requests, {} ok (p50 {:.0} ms, p99 {:.0} ms), {} refused 503 \
         (p99 {:.1} ms, max {:.1} ms), {} errors {:?}\n\
         then 2 phone photos (12 Mpx) at once: both 200 after {:.1} s\n\
         memory: RSS warm {} MB, max sampled under load {} MB, VmHWM (phone photos included) {} MB\n\
         health during the burst: {}\n\
         health under sustained load: {}\n\
         `/` (no database, no model) for comparison: burst {}; sustained {}",
        burst.total(),
        burst.ok,
        max_in_flight,
        burst.busy,
        refused_by.as_secs_f64(),
        quantile(&busy_ms, 0.5),
        quantile(&busy_ms, 0.99),
        quantile(&busy_ms, 1.0),
        burst.other.len(),
        load_for.as_secs_f64(),
        load.total(),
        load.ok,
        quantile(&ok_ms, 0.5),
        quantile(&ok_ms, 0.99),
        load.busy,
        quantile(&load_busy_ms, 0.99),
        quantile(&load_busy_ms, 1.0),
        load.other.len(),
        &load.other[..load.other.len().min(5)],
        phones_took.as_secs_f64(),
        rss_warm / MB,
        rss_max / MB,
        hwm / MB,
        fmt_stats(&burst_health),
        fmt_stats(&sustained_health),
        fmt_stats(&burst_root),
        fmt_stats(&sustained_root),
    );
    println!("{report}");

    assert!(load.other.is_empty(), "errors under load:\n{report}");
    assert!(load.ok > 0 && load.busy > 0, "{report}");
    // Refused requests never waited for a slot: every 503 of the burst came back while
    // the admitted requests were still waiting for their 6 s image. (Latency itself is
    // not asserted here: on a shared 2-core machine one dropped SYN costs 1 s. The
    // figures are measured by `make bench`'s overload phase and printed above.)
    assert!(
        quantile(&busy_ms, 1.0) < SLOW_IMAGE.as_secs_f64() * 1e3,
        "{report}"
    );
    assert!(hwm < 512 * MB, "over the 512 MB budget:\n{report}");
    // Health never failed and never stalled: each check had 10 s to answer 200.
    assert!(health_all.0 > 0, "{report}");
    assert_eq!(health_all.1, 0, "health failed under load:\n{report}");

    // Serves normally afterwards.
    let url = format!(
        "{}/api/v1/search/url?top_k=1&image_url={}",
        svc.base,
        common::app::urlencode(&urls["Rocket model"])
    );
    let (code, body) = send(http.post(url)).await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(names(&body), ["Rocket model"]);
    let (code, _) = send(http.get(svc.url("/api/v1/health"))).await.unwrap();
    assert_eq!(code, 200);
}

/// What a slow client saw.
#[derive(Debug)]
struct Slow {
    /// The status line's code, if an answer came.
    status: Option<u16>,
    answered_after: Option<Duration>,
    /// When the server closed the connection (EOF or reset).
    closed_after: Option<Duration>,
}

/// Sends `head`, then one byte of `drip` every `every` (never finishing), reading
/// whatever comes back, until the server closes the connection or `limit` passes.
fn slow_client(port: u16, head: String, every: Duration, limit: Duration) -> Slow {
    let start = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(every)).unwrap();
    if !head.is_empty() {
        s.write_all(head.as_bytes()).unwrap();
    }
    let mut got = Vec::new();
    let mut out = Slow {
        status: None,
        answered_after: None,
        closed_after: None,
    };
    while start.elapsed() < limit {
        if !head.is_empty() && out.answered_after.is_none() && s.write_all(b"a").is_err() {
            out.closed_after = Some(start.elapsed());
            break;
        }
        let mut buf = [0u8; 4096];
        match s.read(&mut buf) {
            Ok(0) => {
                out.closed_after = Some(start.elapsed());
                break;
            }
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                out.answered_after.get_or_insert(start.elapsed());
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                out.closed_after = Some(start.elapsed());
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&got);
    out.status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok());
    out
}

/// Slow clients cannot take the service down: an upload trickling in holds no slot and is
/// answered 408 by REQUEST_TIMEOUT_SECS, its connection closed; headers trickling in,
/// or a connection that never sends a request, hold no slot and are disconnected at
/// HEADER_READ_TIMEOUT_SECS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_clients_time_out_without_holding_slots() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mongo = MongoServer::start().await;
    let images = ImageServer::start().await;
    seed_catalogue(&mongo, &images).await;
    let (request_timeout, header_timeout) = (3u64, 6u64);
    let vars = vars_with(
        test_vars(&mongo, &[]),
        &[
            ("MAX_CONCURRENT_REQUESTS", "2"),
            ("REQUEST_TIMEOUT_SECS", &request_timeout.to_string()),
            ("HEADER_READ_TIMEOUT_SECS", &header_timeout.to_string()),
            ("LAZY_LOAD_MODEL", "false"),
            ("CATALOG_SYNC_INTERVAL_SECS", "3600"),
        ],
    );
    let svc = Service::serve(&vars).await;
    let http = client();
    // Index first, so the searches below are quick.
    refresh_to_end(&http, &svc).await;
    let small = {
        let img = photo("coffee.png");
        jpeg(&image::imageops::thumbnail(&img, 160, 107), 85)
    };
    let search = |http: reqwest::Client| {
        let (url, small) = (svc.url("/api/v1/search/image?top_k=1"), small.clone());
        async move {
            send(http.post(url).multipart(upload_form(small)))
                .await
                .unwrap()
        }
    };

    let port = svc.port;
    let upload_head = "POST /api/v1/search/image HTTP/1.1\r\nHost: 127.0.0.1\r\n\
        Content-Type: multipart/form-data; boundary=XYZ\r\nContent-Length: 1000000\r\n\r\n\
        --XYZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\
        Content-Type: image/jpeg\r\n\r\n"
        .to_string();
    let header_head = "GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ".to_string();
    let every = Duration::from_millis(200);
    let limit = Duration::from_secs(header_timeout + 10);
    let t0 = Instant::now();
    let bodies: Vec<_> = (0..2)
        .map(|_| {
            let h = upload_head.clone();
            std::thread::spawn(move || slow_client(port, h, every, limit))
        })
        .collect();
    let headers: Vec<_> = (0..3)
        .map(|_| {
            let h = header_head.clone();
            std::thread::spawn(move || slow_client(port, h, every, limit))
        })
        .collect();
    let idle = std::thread::spawn(move || slow_client(port, String::new(), every, limit));

    // The two trickling uploads hold neither slot: their bodies are still arriving...
    tokio::time::sleep(Duration::from_millis(800)).await;
    for _ in 0..3 {
        let (code, body) = search(http.clone()).await;
        assert_eq!(code, 200, "a slow upload holds a slot: {body}");
    }
    let (code, _) = send(http.get(svc.url("/api/v1/health"))).await.unwrap();
    assert_eq!(code, 200);
    // ...and are cut off by REQUEST_TIMEOUT_SECS: 408, and the connection is closed.
    for b in bodies {
        let r = b.join().unwrap();
        assert_eq!(r.status, Some(408), "{r:?}");
        let answered = r.answered_after.unwrap();
        assert!(
            answered >= Duration::from_secs(request_timeout) - Duration::from_millis(300)
                && answered < Duration::from_secs(request_timeout + 4),
            "{r:?}"
        );
        assert!(r.closed_after.is_some(), "connection left open: {r:?}");
        println!("slow upload: {r:?}");
    }
    // The slots are free again while the slow headers are still trickling in: those
    // never reached the request limit.
    let (code, body) = search(http.clone()).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(names(&body), ["Espresso cup"]);
    assert!(
        t0.elapsed() < Duration::from_secs(header_timeout),
        "too slow to tell the header timeout apart"
    );
    for h in headers.into_iter().chain([idle]) {
        let r = h.join().unwrap();
        let closed = r
            .closed_after
            .unwrap_or_else(|| panic!("never closed: {r:?}"));
        assert!(
            closed >= Duration::from_secs(header_timeout) - Duration::from_millis(300)
                && closed < Duration::from_secs(header_timeout + 4),
            "{r:?}"
        );
        assert!(matches!(r.status, None | Some(408)), "{r:?}");
        println!("slow headers / idle connection: {r:?}");
    }
    let (code, _) = search(http.clone()).await;
    assert_eq!(code, 200);
}

/// Waits until connecting to `port` is refused (the listener is closed).
async fn until_refused(port: u16, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Some(t.elapsed())
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    None
}

/// SIGTERM (Render's stop signal): the listener closes at once (new connections are
/// refused), the search in flight finishes with its results, idle keep-alive connections
/// do not hold the exit, and the process exits 0 well within the grace period. A request
/// longer than the grace period does not keep the process alive past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_request_in_flight_refuses_new_ones_and_exits_0() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mongo = MongoServer::start().await;
    let images = ImageServer::start().await;
    seed_catalogue(&mongo, &images).await;
    images.put("slow.jpg", jpeg(&photo("coffee.png"), 85));
    let grace = 10u64;
    let vars = vars_with(
        test_vars(&mongo, &[]),
        &[
            ("SHUTDOWN_GRACE_SECS", &grace.to_string()),
            ("LAZY_LOAD_MODEL", "false"),
            ("CATALOG_SYNC_INTERVAL_SECS", "3600"),
        ],
    );
    let mut svc = Service::serve(&vars).await;
    let http = client();
    refresh_to_end(&http, &svc).await;
    // A kept-alive connection with nothing in flight (the client pool keeps it).
    let (code, _) = send(http.get(svc.url("/api/v1/health"))).await.unwrap();
    assert_eq!(code, 200);

    let delay = Duration::from_secs(2);
    images.delay("slow.jpg", delay);
    let url = format!(
        "{}/api/v1/search/url?top_k=1&image_url={}",
        svc.base,
        common::app::urlencode(&images.url("slow.jpg"))
    );
    let slow = tokio::spawn({
        let http = client();
        async move { send(http.post(url)).await }
    });
    let t = Instant::now();
    while images.hits("slow.jpg") == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "search never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let term = Instant::now();
    svc.signal("TERM");
    let refused = until_refused(svc.port, Duration::from_secs(3)).await;
    assert!(
        refused.is_some(),
        "still accepting connections 3 s after SIGTERM"
    );
    let (code, body) = slow.await.unwrap().expect("the search in flight completes");
    let answered = term.elapsed();
    assert_eq!(code, 200, "{body}");
    assert_eq!(names(&body), ["Espresso cup"]);
    let status = svc
        .wait_exit(Duration::from_secs(grace + 5))
        .await
        .unwrap_or_else(|| panic!("still running:\n{}", svc.log_tail()));
    let exited = term.elapsed();
    assert_eq!(status.code(), Some(0), "{}", svc.log_tail());
    assert!(
        exited < Duration::from_secs(grace),
        "exit took {exited:?}, the grace period is {grace} s"
    );
    assert!(svc.log().contains("shutting down"), "{}", svc.log_tail());
    println!(
        "SIGTERM: refused new connections after {:?}, search in flight answered 200 after {answered:?}, exit 0 after {exited:?}",
        refused.unwrap()
    );

    // Requests longer than the grace period, one waiting for its image and one decoding
    // a phone photo on a blocking thread (seconds in a debug build): exit at the end of
    // the grace period all the same.
    let grace = 2u64;
    let vars = vars_with(vars, &[("SHUTDOWN_GRACE_SECS", &grace.to_string())]);
    let mut svc = Service::serve(&vars).await;
    images.delay("slow.jpg", Duration::from_secs(30));
    let hits = images.hits("slow.jpg");
    let url = format!(
        "{}/api/v1/search/url?top_k=1&image_url={}",
        svc.base,
        common::app::urlencode(&images.url("slow.jpg"))
    );
    let stuck = tokio::spawn({
        let http = client();
        async move { send(http.post(url)).await }
    });
    let t = Instant::now();
    while images.hits("slow.jpg") == hits {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "search never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let decoding = tokio::spawn({
        let (http, url) = (client(), svc.url("/api/v1/search/image?top_k=1"));
        async move { send(http.post(url).multipart(upload_form(phone_photo()))).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let term = Instant::now();
    svc.signal("TERM");
    let status = svc
        .wait_exit(Duration::from_secs(grace + 8))
        .await
        .unwrap_or_else(|| panic!("still running after the grace period:\n{}", svc.log_tail()));
    let exited = term.elapsed();
    assert_eq!(status.code(), Some(0), "{}", svc.log_tail());
    assert!(
        exited >= Duration::from_secs(grace) - Duration::from_millis(200)
            && exited < Duration::from_secs(grace + 3),
        "exited after {exited:?} with a {grace} s grace period"
    );
    assert!(
        svc.log().contains("grace period over"),
        "{}",
        svc.log_tail()
    );
    assert!(stuck.await.unwrap().is_err(), "the cut-off request fails");
    if let Ok((code, body)) = decoding.await.unwrap() {
        // Only possible if the decode finished within the grace period (release build).
        assert_eq!(code, 200, "{body}");
    }
    println!(
        "SIGTERM with requests longer than the {grace} s grace period: exit 0 after {exited:?}"
    );
}

/// A catalogue of `n` products, each with its own small photo (a different crop of one
/// of the test photos, some mirrored): name, path on the image server, JPEG bytes.
fn varied_catalogue(n: usize) -> Vec<(String, String, Vec<u8>)> {
    let bases: Vec<image::RgbImage> = CATALOGUE.iter().map(|(_, f)| photo(f)).collect();
    (0..n)
        .map(|i| {
            let base = &bases[i % bases.len()];
            let (w, h) = base.dimensions();
            let side = (w.min(h) / 3) + ((i as u32 * 37) % (w.min(h) / 2));
            let x = (i as u32 * 53) % (w - side);
            let y = (i as u32 * 29) % (h - side);
            let crop = image::imageops::crop_imm(base, x, y, side, side).to_image();
            let mut small =
                image::imageops::resize(&crop, 96, 96, image::imageops::FilterType::Nearest);
            if (i / bases.len()) % 2 == 1 {
                small = image::imageops::flip_horizontal(&small);
            }
            (
                format!("Product {i:03}"),
                format!("p/{i:03}.jpg"),
                jpeg(&small, 85),
            )
        })
        .collect()
}

/// Checks every stored embedding document: complete (every field, vector of `dim`
/// floats), and if it is marked usable for the current model, stored for the product's
/// current image URL with the vector the model gives for that image. Returns the ids of
/// the documents that are usable for the current model.
fn check_embeddings(
    docs: &[Document],
    url_of: &HashMap<mongodb::bson::oid::ObjectId, String>,
    bytes_of: &HashMap<String, Vec<u8>>,
    encoder: &search_img::encoder::Encoder,
    check_vector: &dyn Fn(usize) -> bool,
) -> Vec<mongodb::bson::oid::ObjectId> {
    let key = encoder.identity().key();
    let dim = encoder.identity().dim;
    let mut usable = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        let id = d.get_object_id("product").unwrap();
        let model = d.get_str("model").unwrap();
        let mut fields: Vec<&str> = d.keys().map(String::as_str).collect();
        fields.sort_unstable();
        let mut want = vec![
            "_id",
            "dim",
            "image_url",
            "model",
            "product",
            "status",
            "updated_at",
            "vector",
        ];
        if model == key {
            // Written by this version: the filter attributes beside the vector.
            want.extend(["category", "price"]);
            want.sort_unstable();
        }
        assert_eq!(fields, want, "incomplete document {d}");
        let url = d.get_str("image_url").unwrap();
        let image = search_img::store::ImageKey::new(search_img::store::ProductId::Oid(id), url);
        assert_eq!(d.get("_id"), Some(&image.doc_id()), "the image's _id");
        assert_eq!(d.get_str("status").unwrap(), "ok");
        let bin = d
            .get_binary_generic("vector")
            .ok()
            .cloned()
            .unwrap_or_else(|| match d.get("vector") {
                Some(mongodb::bson::Bson::Binary(b)) => b.bytes.clone(),
                other => panic!("vector is {other:?}"),
            });
        let doc_dim = d.get_i32("dim").unwrap() as usize;
        assert_eq!(bin.len(), 2 + 4 * doc_dim, "vector length in {id}");
        if model != key || url_of.get(&id).map(String::as_str) != Some(url) {
            // Stale (left from before); the indexer recognises it as such.
            continue;
        }
        assert_eq!(doc_dim, dim);
        usable.push(id);
        if !check_vector(i) {
            continue;
        }
        let stored = search_img::store::decode_vector(&bin[2..]);
        let path = url
            .rsplit_once("/p/")
            .map(|(_, p)| format!("p/{p}"))
            .unwrap();
        let fresh = encoder.embed_bytes(&bytes_of[&path]).unwrap();
        let cos = cosine(&stored, &fresh);
        assert!(
            cos > 0.9999,
            "{id}: stored vector is not its image's (cosine {cos})"
        );
    }
    usable
}

async fn embedding_docs(mongo: &MongoServer) -> Vec<Document> {
    common::mongo::embedding_docs(&mongo.client().await.database("test"), doc! {}).await
}

/// SIGKILL in the middle of indexing a catalogue of 200 products: every embedding stored
/// before the kill is whole and right (the image and model it says, the vector that image
/// gives), stale documents left from an older model or image are never taken for current
/// ones, and the next pass (`search-img index`) embeds exactly the products not done yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_indexing_leaves_only_whole_correct_embeddings_and_indexing_resumes() {
    let _one = ONE_AT_A_TIME.lock().await;
    const N: usize = 200;
    let mongo = MongoServer::start().await;
    let images = ImageServer::start().await;
    let catalogue = varied_catalogue(N);
    let db = mongo.client().await.database("test");
    let products = db.collection::<Document>("products");
    let mut url_of = HashMap::new();
    let mut bytes_of = HashMap::new();
    let mut docs = Vec::new();
    for (name, path, bytes) in &catalogue {
        images.put(path, bytes.clone());
        // Slow enough that indexing takes a few seconds.
        images.delay(path, Duration::from_millis(40));
        bytes_of.insert(path.clone(), bytes.clone());
        docs.push(product_doc(name, &images.url(path)));
    }
    let ids = products.insert_many(docs).await.unwrap().inserted_ids;
    for (i, (_, path, _)) in catalogue.iter().enumerate() {
        url_of.insert(ids[&i].as_object_id().unwrap(), images.url(path));
    }
    let vars = vars_with(
        test_vars(&mongo, &[]),
        &[
            ("LAZY_LOAD_MODEL", "false"),
            ("MAX_BATCH_SIZE", "4"),
            ("INDEX_FETCH_CONCURRENCY", "4"),
            // The killed pass's lease: the restart waits until it expires.
            ("INDEX_LEASE_SECS", "3"),
        ],
    );
    let config = search_img::config::Config::from_vars(vars.clone()).unwrap();
    let encoder = search_img::encoder::Encoder::load(&config.embedder.encoder).unwrap();
    let key = encoder.identity().key();
    // Left from before, for the last products of the catalogue (so still there at the
    // kill): vectors of another model, and of the products' previous photos.
    let embeddings = db.collection::<Document>("product_embeddings");
    for i in N - 8..N {
        let id = ids[&i].as_object_id().unwrap();
        let (model, url) = if i < N - 4 {
            (
                "old-model@0123456789abcdef".to_string(),
                url_of[&id].clone(),
            )
        } else {
            (key.clone(), "http://old.example/photo.jpg".to_string())
        };
        let v = [0.5f32; 4];
        let mut bytes = vec![0x27, 0];
        bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        embeddings
            .insert_one(doc! {
                "_id": id, "image_url": url, "model": model, "dim": 4,
                "vector": mongodb::bson::Binary { subtype: mongodb::bson::spec::BinarySubtype::Vector, bytes },
                "status": "ok", "updated_at": mongodb::bson::DateTime::now(),
            })
            .await
            .unwrap();
    }

    let mut svc = Service::serve(&vars).await;
    let refresh = tokio::spawn({
        let (http, url) = (client(), svc.url("/api/v1/refresh"));
        async move { send(http.post(url)).await }
    });
    let t = Instant::now();
    let current = doc! {
        "model": &key, "status": "ok", "image_url": { "$ne": "http://old.example/photo.jpg" },
    };
    loop {
        let n = embeddings.count_documents(current.clone()).await.unwrap();
        if n >= 50 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "indexing too slow: {n} after 60 s\n{}",
            svc.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    svc.kill9().await;
    let killed_after = t.elapsed();
    assert!(refresh.await.unwrap().is_err(), "the refresh was cut off");
    // Writes the server had received may still land: wait until the stored documents
    // stop changing.
    let mut after_kill = embedding_docs(&mongo).await;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let again = embedding_docs(&mongo).await;
        if again == after_kill {
            break;
        }
        after_kill = again;
    }
    let done = check_embeddings(&after_kill, &url_of, &bytes_of, &encoder, &|_| true);
    assert!(
        done.len() < N,
        "the kill came too late: all {N} were indexed"
    );
    println!(
        "SIGKILL after {killed_after:?}: {} documents, {} current and checked against their image",
        after_kill.len(),
        done.len()
    );
    // The pass removed the embeddings of the products' previous photos (images no
    // longer theirs) first; the other model's are replaced when their image comes up.
    assert_eq!(
        after_kill.len(),
        done.len() + 4,
        "the other model's documents are still there, the old photos' are gone"
    );
    assert!(after_kill
        .iter()
        .all(|d| d.get_str("image_url") != Ok("http://old.example/photo.jpg")));

    // Restart: `search-img index` picks up where the killed pass stopped.
    let mut index = Service::spawn(&vars, &["index"]);
    let status = index
        .wait_exit(Duration::from_secs(120))
        .await
        .unwrap_or_else(|| panic!("index did not finish:\n{}", index.log_tail()));
    assert!(status.success(), "{}", index.log_tail());
    let out = index.log();
    let json_start = out
        .rfind("\n{\n")
        .unwrap_or_else(|| panic!("no report:\n{out}"));
    // Log lines on stderr share the file and may follow the report: read one value.
    let mut values = serde_json::Deserializer::from_str(&out[json_start..]).into_iter::<Value>();
    let report = values.next().unwrap().unwrap();
    println!(
        "second pass: {report}\nafter it: {:?}",
        &out[json_start + values.byte_offset()..]
    );
    assert_eq!(report["total_products"], N);
    assert_eq!(report["indexed_products"], N);
    assert_eq!(report["failed"], 0);
    assert_eq!(
        report["embedded"].as_u64().unwrap() as usize,
        N - done.len(),
        "the second pass embeds exactly the products not done before the kill"
    );

    // Everything whole and right now; every vector stored before the kill was checked
    // above, so check a sample of the rest.
    let all = embedding_docs(&mongo).await;
    assert_eq!(all.len(), N);
    let before: std::collections::HashSet<_> = done.iter().collect();
    let usable = check_embeddings(&all, &url_of, &bytes_of, &encoder, &|i| {
        let id = all[i].get_object_id("product").unwrap();
        !before.contains(&id) && i % 5 == 0
    });
    assert_eq!(usable.len(), N);
}

/// `search-img monitor --pid P --count N` against a running service, then a dead one.
async fn monitor(base: &str, pid: u32, count: u64) -> (std::process::ExitStatus, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_search-img"))
            .args(["monitor", "--url", base, "--pid", &pid.to_string()])
            .args(["--interval", "1", "--count", &count.to_string()])
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("monitor did not stop by itself")
    .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_prints_memory_and_health_against_the_budget_then_notices_the_exit() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mongo = MongoServer::start().await;
    let mut svc = Service::serve(&vars_with(test_vars(&mongo, &[]), &[])).await;

    let (status, out) = monitor(&svc.base, svc.pid, 2).await;
    assert!(status.success(), "{status}\n{out}");
    assert!(
        out.contains(&format!("monitoring pid {}", svc.pid)),
        "{out}"
    );
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("rss")).collect();
    assert_eq!(lines.len(), 2, "one line per interval, then stop:\n{out}");
    let hwm_mb = svc.proc_status_bytes("VmHWM") as f64 / MB as f64;
    for line in &lines {
        // "rss    12.6 MB ( 2.5% of budget)  peak    13.0 MB  ok  health 200 in 1 ms"
        let rss: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        // Printed to 0.1 MB: at most the later VmHWM once rounded.
        assert!(
            rss > 1.0 && rss <= hwm_mb + 0.05,
            "{line} (VmHWM {hwm_mb:.2} MB)"
        );
        let pct = line.split_once('(').and_then(|(_, t)| t.split_once('%'));
        let pct: f64 = pct.unwrap().0.trim().parse().unwrap();
        assert!(
            (pct - rss / BUDGET_MB * 100.0).abs() < 0.1,
            "{line}: share of {BUDGET_MB} MB"
        );
        assert!(line.contains("  ok  health 200 in "), "{line}");
    }

    svc.kill9().await;
    let (status, out) = monitor(&svc.base, svc.pid, 0).await;
    assert!(status.success(), "{status}\n{out}");
    assert!(
        out.contains(&format!("process {} has exited", svc.pid)),
        "{out}"
    );
}

/// Everything a test of an indexed, warm service needs (held whole by the test, so the
/// database and image server live as long as it): a database with the test
/// catalogue, its image server, and the service (model loaded at start, no pass due for
/// an hour) after one refresh has run to its end, with `extra` settings.
struct Indexed {
    mongo: MongoServer,
    images: ImageServer,
    urls: HashMap<String, String>,
    svc: Service,
    http: reqwest::Client,
}

async fn indexed_service(extra: &[(&str, &str)]) -> Indexed {
    let mongo = MongoServer::start().await;
    let images = ImageServer::start().await;
    let urls = seed_catalogue(&mongo, &images).await;
    let mut settings = vec![
        ("LAZY_LOAD_MODEL", "false"),
        ("CATALOG_SYNC_INTERVAL_SECS", "3600"),
    ];
    settings.extend_from_slice(extra);
    let svc = Service::serve(&vars_with(test_vars(&mongo, &[]), &settings)).await;
    let http = client();
    refresh_to_end(&http, &svc).await;
    Indexed {
        mongo,
        images,
        urls,
        svc,
        http,
    }
}

/// Thirty clients that send a search's headers and then one body byte a second hold no
/// request slot: ordinary searches keep answering 200 meanwhile, and each slow body is
/// cut off with 408 once the minimum body rate applies (after its grace of 5 s), far
/// before REQUEST_TIMEOUT_SECS (60 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_slow_bodies_hold_no_slot_and_are_cut_off_at_the_minimum_rate() {
    let _one = ONE_AT_A_TIME.lock().await;
    let t = indexed_service(&[]).await;
    let (urls, svc, http) = (&t.urls, &t.svc, &t.http);
    let query = format!(
        "/api/v1/search/url?top_k=1&image_url={}",
        common::app::urlencode(&urls["Rocket model"])
    );
    let head = format!(
        "POST {query} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: 1000\r\n\r\n"
    );
    let port = svc.port;
    let slow: Vec<_> = (0..30)
        .map(|_| {
            let h = head.clone();
            std::thread::spawn(move || {
                slow_client(port, h, Duration::from_secs(1), Duration::from_secs(30))
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Ten slots, thirty slow bodies: one after another, then ten at once.
    for _ in 0..5 {
        let (code, body) = send(http.post(svc.url(&query))).await.unwrap();
        assert_eq!(code, 200, "{body}");
        assert_eq!(names(&body), ["Rocket model"]);
    }
    let burst: Vec<_> = (0..10)
        .map(|_| tokio::spawn(send(http.post(svc.url(&query)))))
        .collect();
    for b in burst {
        let (code, body) = b.await.unwrap().unwrap();
        assert_eq!(code, 200, "{body}");
    }
    for s in slow {
        let r = s.join().unwrap();
        assert_eq!(r.status, Some(408), "{r:?}");
        let answered = r.answered_after.unwrap();
        assert!(
            answered >= Duration::from_millis(4500) && answered < Duration::from_secs(20),
            "{r:?}"
        );
        assert!(r.closed_after.is_some(), "connection left open: {r:?}");
    }
    let (code, _) = send(http.post(svc.url(&query))).await.unwrap();
    assert_eq!(code, 200);
}

/// Request bodies held in memory are bounded by MAX_BODY_BUFFER_BYTES over all requests:
/// with room for one upload, a second one that would pass the budget is refused with a
/// 503 detail while the first is still arriving, and uploads work again once it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_in_progress_stay_within_their_memory_budget() {
    let _one = ONE_AT_A_TIME.lock().await;
    let t = indexed_service(&[
        ("MAX_IMAGE_BYTES", "1000000"),
        ("MAX_BODY_BUFFER_BYTES", "1065536"),
    ])
    .await;
    let (svc, http) = (&t.svc, &t.http);
    let port = svc.port;
    let head = "POST /api/v1/search/image HTTP/1.1\r\nHost: 127.0.0.1\r\n\
        Content-Type: multipart/form-data; boundary=XYZ\r\nContent-Length: 1000000\r\n\r\n";
    let part = vec![b'a'; 700_000];
    // The first upload sends 700 KB and then waits (well within the minimum rate).
    let mut first = TcpStream::connect(("127.0.0.1", port)).unwrap();
    first.write_all(head.as_bytes()).unwrap();
    first.write_all(&part).unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let second = {
        let part = part.clone();
        tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s.write_all(head.as_bytes()).unwrap();
            let _ = s.write_all(&part);
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            String::from_utf8_lossy(&got).into_owned()
        })
        .await
        .unwrap()
    };
    assert!(second.starts_with("HTTP/1.1 503"), "{second}");
    assert!(second.contains("busy receiving other uploads"), "{second}");
    drop(first);
    // Once the server has seen the first connection close, its bytes are released.
    let small = jpeg(
        &image::imageops::thumbnail(&photo("coffee.png"), 160, 107),
        85,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let (code, body) = loop {
        let (code, body) = send(
            http.post(svc.url("/api/v1/search/image?top_k=1"))
                .multipart(upload_form(small.clone())),
        )
        .await
        .unwrap();
        if code != 503 || Instant::now() > deadline {
            break (code, body);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code, 200, "{body}");
    assert_eq!(names(&body), ["Espresso cup"]);
}

/// Ten refreshes at once while a product's image host hangs: each answers 202 within
/// REQUEST_TIMEOUT_SECS, searches keep answering meanwhile, and the ten share passes
/// (the one running and at most one more), so the hanging host is asked once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_refreshes_share_one_following_pass_and_answer_in_time() {
    let _one = ONE_AT_A_TIME.lock().await;
    let t = indexed_service(&[("REQUEST_TIMEOUT_SECS", "2"), ("FETCH_TIMEOUT_SECS", "5")]).await;
    let (mongo, images, svc, http) = (&t.mongo, &t.images, &t.svc, &t.http);
    let passes_before = status_of(http, svc).await["index_pass"]["passes"]
        .as_u64()
        .unwrap();
    images.put("hang.jpg", photo_bytes("rocket.jpg"));
    images.delay("hang.jpg", Duration::from_secs(60));
    mongo
        .client()
        .await
        .database("test")
        .collection::<Document>("products")
        .insert_one(product_doc("Hanging", &images.url("hang.jpg")))
        .await
        .unwrap();
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let (http, url) = (http.clone(), svc.url("/api/v1/refresh"));
            tokio::spawn(async move {
                let t = Instant::now();
                let r = send(http.post(url)).await.unwrap();
                (r, t.elapsed())
            })
        })
        .collect();
    // Searches are not held up by the refreshes.
    let small = jpeg(
        &image::imageops::thumbnail(&photo("coffee.png"), 160, 107),
        85,
    );
    for _ in 0..3 {
        let (code, body) = send(
            http.post(svc.url("/api/v1/search/image?top_k=1"))
                .multipart(upload_form(small.clone())),
        )
        .await
        .unwrap();
        assert_eq!(code, 200, "{body}");
    }
    for c in calls {
        let ((code, body), took) = c.await.unwrap();
        assert_eq!(code, 202, "{body}");
        assert!(body["message"].is_string() && body["index_pass"]["running"] == true);
        assert!(took < Duration::from_secs(4), "took {took:?}");
    }
    let t = Instant::now();
    loop {
        let st = status_of(http, svc).await;
        if st["index_pass"]["running"] == false {
            let passes = st["index_pass"]["passes"].as_u64().unwrap() - passes_before;
            assert!(
                (1..=2).contains(&passes),
                "{passes} passes for ten calls: {st}"
            );
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        images.hits("hang.jpg"),
        1,
        "the hanging host was asked once"
    );
}

/// Two instances on one database take turns at index passes (a lease in MongoDB): no
/// product photo is fetched or embedded twice, each finds what the other embedded, and
/// the lease of an instance killed mid-pass passes to the other after INDEX_LEASE_SECS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_embed_each_photo_once_and_a_killed_ones_lease_expires() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mongo = MongoServer::start().await;
    let images = ImageServer::start().await;
    seed_catalogue(&mongo, &images).await;
    // A slow photo keeps the first instance's pass going while the second asks for one.
    images.delay(CATALOGUE[0].1, Duration::from_secs(2));
    let settings = [
        ("LAZY_LOAD_MODEL", "false"),
        ("CATALOG_SYNC_INTERVAL_SECS", "3600"),
        ("INDEX_LEASE_SECS", "2"),
    ];
    let vars = vars_with(test_vars(&mongo, &[]), &settings);
    let (mut a, b) = (Service::serve(&vars).await, Service::serve(&vars).await);
    let http = client();
    let first = spawn_refresh(&http, &a);
    wait_for_fetch(&images, CATALOGUE[0].1, &a).await;
    let from_b = refresh_to_end(&http, &b).await;
    assert_eq!(from_b["indexed_products"], CATALOGUE.len(), "{from_b}");
    first.await.unwrap().unwrap();
    refresh_to_end(&http, &a).await;
    for (_, file) in CATALOGUE {
        assert_eq!(
            images.hits(file),
            1,
            "{file} fetched once over both instances"
        );
    }
    assert_eq!(embedding_docs(&mongo).await.len(), CATALOGUE.len());
    for svc in [&a, &b] {
        for (name, file) in &CATALOGUE[..3] {
            let (code, body) = send(
                http.post(svc.url("/api/v1/search/image?top_k=1"))
                    .multipart(upload_form(photo_bytes(file))),
            )
            .await
            .unwrap();
            assert_eq!(code, 200, "{body}");
            assert_eq!(body[0]["product"]["productName"], *name, "{body}");
        }
    }

    // The first instance dies holding the lease, in a pass stuck on a photo.
    images.put("hang.jpg", photo_bytes("rocket.jpg"));
    images.delay("hang.jpg", Duration::from_secs(60));
    let products = mongo
        .client()
        .await
        .database("test")
        .collection::<Document>("products");
    products
        .insert_one(product_doc("Hanging", &images.url("hang.jpg")))
        .await
        .unwrap();
    let stuck = spawn_refresh(&http, &a);
    wait_for_fetch(&images, "hang.jpg", &a).await;
    a.kill9().await;
    let _ = stuck.await;
    images.clear_behaviour("hang.jpg");
    let after = refresh_to_end(&http, &b).await;
    assert_eq!(after["indexed_products"], CATALOGUE.len() + 1, "{after}");
    assert!(
        b.log().contains("another instance holds the lease"),
        "{}",
        b.log_tail()
    );
}

/// POST /api/v1/refresh to `svc` in the background.
fn spawn_refresh(
    http: &reqwest::Client,
    svc: &Service,
) -> tokio::task::JoinHandle<Result<(u16, Value), String>> {
    let (http, url) = (http.clone(), svc.url("/api/v1/refresh"));
    tokio::spawn(async move { send(http.post(url)).await })
}

/// Until `file` has been fetched (by `svc`'s pass, whose log a timeout shows).
async fn wait_for_fetch(images: &ImageServer, file: &str, svc: &Service) {
    let t = Instant::now();
    while images.hits(file) == 0 {
        assert!(t.elapsed() < Duration::from_secs(30), "{}", svc.log_tail());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn status_of(http: &reqwest::Client, svc: &Service) -> Value {
    let (code, body) = send(http.get(svc.url("/api/v1/status"))).await.unwrap();
    assert_eq!(code, 200, "{body}");
    body
}
