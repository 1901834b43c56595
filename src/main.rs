//! `search-img`: serve the API (default), index the catalogue, or watch a running service.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use search_img::config::Config;
use search_img::service::AppState;

#[derive(Parser)]
#[command(version, about = "Find the products that look most like a photo")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (the default).
    Serve,
    /// Bring every product's embedding up to date, with a progress bar.
    Index,
    /// Poll a running service's memory and health against the 512 MB budget.
    Monitor {
        /// The service's base URL.
        #[arg(long, default_value = "http://127.0.0.1:8001")]
        url: String,
        /// The service's process id (default: found by name).
        #[arg(long)]
        pid: Option<u32>,
        /// Seconds between lines.
        #[arg(long, default_value_t = 5)]
        interval: u64,
        /// Stop after this many lines (0 = until interrupted).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
}

fn main() -> anyhow::Result<()> {
    limit_malloc_arenas();
    let cli = Cli::parse();
    init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // The command runs as a task on the runtime's workers, not in `block_on` on this
    // thread, which is no worker: the accept loop there made each new connection wake
    // two threads (this one to accept, a worker for the connection's task): a health
    // probe on a new connection took about 0.35 ms of CPU under a quota, now 0.30.
    let result = rt.block_on(async move {
        match tokio::spawn(run(cli.command)).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(e.into()),
        }
    });
    // Blocking work still running (a decode, a model run, a DNS lookup) must not hold the
    // exit past the shutdown grace period: dropping the runtime would wait for it.
    rt.shutdown_timeout(Duration::from_millis(500));
    result
}

async fn run(command: Option<Command>) -> anyhow::Result<()> {
    match command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let cfg = Config::from_env()?;
            let state = AppState::new(cfg).await?;
            let warm = state.clone();
            tokio::spawn(async move { warm.warm_up().await });
            search_img::http::serve(state).await
        }
        Command::Index => index().await,
        Command::Monitor {
            url,
            pid,
            interval,
            count,
        } => search_img::monitor::run(&url, pid, Duration::from_secs(interval), count).await,
    }
}

async fn index() -> anyhow::Result<()> {
    let cfg = Config::from_env()?;
    let state = AppState::new(cfg).await?;
    state.prepare().await;
    let progress = Arc::new(|done: usize, total: usize| {
        let width = 30;
        let filled = (done * width).checked_div(total).unwrap_or(width);
        eprint!(
            "\r[{}{}] {done}/{total}",
            "#".repeat(filled),
            " ".repeat(width - filled)
        );
        let _ = std::io::stderr().flush();
    });
    let report = state.indexer().pass_now_with_progress(progress).await?;
    eprintln!();
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// glibc gives each thread that allocates under contention its own malloc arena (up to
/// 8 per core), and each arena keeps the memory freed in it. Images are decoded and the
/// model run on whichever blocking-pool thread is free, so every arena ends up holding
/// its own share: peak RSS under 10 concurrent searches was 168 MB with the default and
/// 153 MB with two arenas (int8 ViT-B/32, 10,000 cached products; indexing
/// EfficientNet-Lite0: 166 vs 141 MB), at no measurable speed cost on 2 cores.
/// `MALLOC_ARENA_MAX` in the environment still wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        // glibc's malloc.h
        const M_ARENA_MAX: std::ffi::c_int = -8;
        // SAFETY: mallopt only sets a tunable; called before any other thread exists.
        unsafe {
            mallopt(M_ARENA_MAX, 2);
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("LOG_LEVEL")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info,ort=warn"));
    // Logs on stderr, so `search-img index`'s JSON report on stdout stays parseable.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
}
