//! A real MongoDB-compatible server per test: SecantusDB (`secantusd-py`, installed by
//! `make setup` into `.tools/venv`) in a child process, on its own port and temp storage.
//!
//! ```ignore
//! let mongo = MongoServer::start().await;
//! let client = mongo.client().await;
//! mongo.stop().await;    // graceful: everything written so far is kept
//! mongo.restart().await; // same port, same storage
//! ```
//!
//! SecantusDB is GPL: it is only ever run as a separate process, never linked.
//!
//! Life-cycle guarantees (the server must never outlive the test binary):
//! - `Drop` kills the process and reaps it.
//! - The process gets `PR_SET_PDEATHSIG(SIGKILL)`, so it also dies when the test binary is
//!   killed outright (timeout, SIGKILL) and no destructor runs. The death signal fires when
//!   the *thread* that spawned the child exits, so each child is spawned and owned by a
//!   dedicated thread that lives exactly as long as the child.
//! - The child stays in the test binary's process group, so Ctrl-C in a terminal reaches it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mongodb::bson::doc;
use tempfile::TempDir;
use tokio::sync::watch;

/// How long `start`/`restart` wait for the first successful `ping`. A start takes about
/// 1.1 s on an idle machine; parallel tests on 2 cores slow that down.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `stop` waits after SIGTERM before it sends SIGKILL (a clean stop takes ~0.3 s).
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Sets the parent-death signal, checks the parent did not already die in between, then
/// becomes secantusd. Run by the venv's python, which is there anyway (no libc crate).
const PDEATHSIG_EXEC: &str = "\
import ctypes, os, signal, sys
PR_SET_PDEATHSIG = 1
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
if os.getppid() != int(sys.argv[1]):
    sys.exit('secantusd wrapper: parent already gone')
os.execv(sys.argv[2], sys.argv[2:])
";

/// One SecantusDB server. Independent of every other instance: own port, own storage.
pub struct MongoServer {
    port: u16,
    /// Holds the storage (`data/`), the log and an empty config; deleted on drop.
    dir: TempDir,
    extra_args: Vec<String>,
    proc: Option<Proc>,
}

impl MongoServer {
    /// Starts a server on a free port with fresh storage and waits until it answers `ping`.
    pub async fn start() -> MongoServer {
        Self::start_with_args(&[]).await
    }

    /// Like [`start`](Self::start) with extra `secantusd-py` flags, kept for restarts.
    /// E.g. `--sync-on-commit` makes every acknowledged write survive [`kill`](Self::kill);
    /// `--standalone` advertises a standalone server instead of a one-node replica set.
    pub async fn start_with_args(extra_args: &[&str]) -> MongoServer {
        let dir = tempfile::Builder::new()
            .prefix("search-img-mongo-")
            .tempdir()
            .expect("create temp dir for MongoDB");
        // An explicit (empty) config turns off secantusd's auto-discovery of
        // ./secantusd.toml and ~/.secantus/secantusd.toml, which could change its behaviour.
        std::fs::write(dir.path().join("secantusd.toml"), "").unwrap();
        let mut server = MongoServer {
            port: 0,
            dir,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            proc: None,
        };
        // The port is picked by binding port 0 and releasing it, so another process can
        // grab it before secantusd binds it. The server then exits at once: retry.
        let mut last_err = String::new();
        for _ in 0..3 {
            server.port = free_port();
            match server.launch().await {
                Ok(()) => return server,
                Err(e) => last_err = e,
            }
        }
        panic!("MongoDB (secantusd) did not start: {last_err}");
    }

    /// Port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection string for the official driver. `directConnection=true` talks to this
    /// one server without replica-set discovery (secantusd advertises itself as the primary
    /// of the one-node set `secantus`); the short server selection timeout makes operations
    /// fail after 2 s instead of the driver's 30 s default while the server is stopped.
    pub fn uri(&self) -> String {
        format!(
            "mongodb://127.0.0.1:{}/?directConnection=true&serverSelectionTimeoutMS=2000",
            self.port
        )
    }

    /// A new driver client for [`uri`](Self::uri).
    pub async fn client(&self) -> mongodb::Client {
        mongodb::Client::with_uri_str(self.uri())
            .await
            .expect("MongoDB client from uri")
    }

    /// The server's stdout and stderr so far (across restarts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether the process is alive (it may still be starting).
    pub fn is_running(&self) -> bool {
        self.proc
            .as_ref()
            .is_some_and(|p| p.exit_status().is_none())
    }

    /// Graceful stop: SIGTERM, wait for the exit (SIGKILL after 10 s). Writes are flushed,
    /// so a [`restart`](Self::restart) sees everything acknowledged before. No-op if stopped.
    pub async fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.send(Signal::Term);
            if tokio::time::timeout(STOP_TIMEOUT, p.wait()).await.is_err() {
                p.send(Signal::Kill);
                p.wait().await;
            }
            p.join();
        }
    }

    /// Crash: SIGKILL, wait for the exit. Without `--sync-on-commit`, writes acknowledged
    /// in the last moment (~100 ms, the journal is flushed in the background) are lost,
    /// as after a mongod crash with the default `j: false`.
    pub async fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.send(Signal::Kill);
            p.wait().await;
            p.join();
        }
    }

    /// Starts the server again on the same port with the same storage and waits until it
    /// answers `ping`. Stops it first if it is running.
    pub async fn restart(&mut self) {
        self.stop().await;
        if let Err(e) = self.launch().await {
            panic!("MongoDB (secantusd) did not restart: {e}");
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("secantusd.log")
    }

    /// Spawns the process on `self.port` and waits until it is ready. On failure the
    /// process is gone and the error says why, with the end of its log.
    async fn launch(&mut self) -> Result<(), String> {
        let exe = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/venv/bin/secantusd-py");
        let python = exe.with_file_name("python");
        assert!(
            exe.is_file() && python.is_file(),
            "{} missing: run `make setup`",
            exe.display()
        );
        // Appending keeps the log of earlier runs, for post-mortems after a restart.
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open secantusd log");
        let mut cmd = Command::new(&python);
        cmd.arg("-c")
            .arg(PDEATHSIG_EXEC)
            .arg(std::process::id().to_string())
            .arg(&exe)
            .arg("--config")
            .arg(self.dir.path().join("secantusd.toml"))
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--storage-path")
            .arg(self.dir.path().join("data"))
            .args(["--cache-size", "256M", "--log-level", "WARNING"])
            .args(&self.extra_args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut proc = Proc::spawn(cmd);

        let started = Instant::now();
        let result = loop {
            if let Some(status) = proc.exit_status() {
                break Err(format!("secantusd exited with {status}"));
            }
            if started.elapsed() > READY_TIMEOUT {
                break Err(format!("not ready after {READY_TIMEOUT:?}"));
            }
            // A TCP connect is cheap; the driver ping only once the port is open. A fresh
            // client each time: a client that saw the server down re-checks it only after
            // its heartbeat interval (>= 500 ms).
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
                && self.ping().await.is_ok()
            {
                break Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        match result {
            Ok(()) => {
                self.proc = Some(proc);
                Ok(())
            }
            Err(e) => {
                proc.send(Signal::Kill);
                proc.wait().await;
                proc.join();
                Err(format!(
                    "{e} (port {}); end of {}:\n{}",
                    self.port,
                    self.log_path().display(),
                    tail(&self.log_path(), 4000)
                ))
            }
        }
    }

    async fn ping(&self) -> mongodb::error::Result<()> {
        let client = mongodb::Client::with_uri_str(format!(
            "mongodb://127.0.0.1:{}/?directConnection=true&serverSelectionTimeoutMS=1000",
            self.port
        ))
        .await?;
        let r = client.database("admin").run_command(doc! {"ping": 1}).await;
        client.shutdown().immediate(true).await;
        r.map(|_| ())
    }
}

impl Drop for MongoServer {
    fn drop(&mut self) {
        if let Some(p) = self.proc.take() {
            // Kill and reap synchronously: quick, and Drop cannot await.
            p.send(Signal::Kill);
            p.join();
        }
    }
}

enum Signal {
    Term,
    Kill,
}

/// A child process owned by its own thread (see the module docs for why). The thread
/// polls the child, delivers signals and publishes the exit status.
struct Proc {
    signals: mpsc::Sender<Signal>,
    exited: watch::Receiver<Option<ExitStatus>>,
    thread: JoinHandle<()>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        let (sig_tx, sig_rx) = mpsc::channel();
        let (exit_tx, exit_rx) = watch::channel(None);
        let (spawned_tx, spawned_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("secantusd-owner".into())
            .spawn(move || {
                let mut child = match cmd.spawn() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = spawned_tx.send(Err(e));
                        return;
                    }
                };
                let _ = spawned_tx.send(Ok(()));
                let pid = child.id().to_string();
                let status = loop {
                    // Only this thread reaps the child, so `pid` cannot be reused by
                    // another process while we may still signal it.
                    if let Ok(Some(s)) = child.try_wait() {
                        break s;
                    }
                    match sig_rx.recv_timeout(Duration::from_millis(20)) {
                        Ok(Signal::Term) => {
                            // std can only SIGKILL; `kill(1)` avoids a libc dependency.
                            let _ = Command::new("kill").args(["-TERM", &pid]).status();
                        }
                        // Kill asked for, or the owner (MongoServer) is gone.
                        Ok(Signal::Kill) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                            let _ = child.kill();
                            break child.wait().expect("wait for secantusd");
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                    }
                };
                let _ = exit_tx.send(Some(status));
            })
            .expect("spawn secantusd owner thread");
        spawned_rx
            .recv()
            .expect("owner thread died")
            .expect("spawn secantusd (venv python)");
        Proc {
            signals: sig_tx,
            exited: exit_rx,
            thread,
        }
    }

    fn send(&self, s: Signal) {
        let _ = self.signals.send(s);
    }

    fn exit_status(&self) -> Option<ExitStatus> {
        *self.exited.borrow()
    }

    async fn wait(&mut self) {
        // Err only if the thread is gone, which happens after it published the status.
        let _ = self.exited.wait_for(Option::is_some).await;
    }

    /// Waits for the owner thread; call after the child exited (or was told to die).
    fn join(self) {
        drop(self.signals);
        let _ = self.thread.join();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// The last `max` bytes of a file, lossily decoded.
fn tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Every embedding document matching `filter`, from the service's `product_embeddings`.
pub async fn embedding_docs(
    db: &mongodb::Database,
    filter: mongodb::bson::Document,
) -> Vec<mongodb::bson::Document> {
    use futures::TryStreamExt;
    db.collection::<mongodb::bson::Document>("product_embeddings")
        .find(filter)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}
