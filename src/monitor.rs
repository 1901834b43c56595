//! `search-img monitor`: like the old service's memory monitor, a line every few
//! seconds with the service's memory against the 512 MB budget and its health.

use std::time::{Duration, Instant};

/// The free-tier instance's memory.
pub const BUDGET_MB: f64 = 512.0;

/// Resident and peak resident memory of a process, in MB, from `/proc/PID/status`.
pub fn memory_mb(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The pid of a running `search-img` process other than this one.
pub fn find_service_pid() -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let mut args = c.split('\0');
                    let exe_is_ours = args.next().is_some_and(|a| a.ends_with("search-img"));
                    exe_is_ours && !c.contains("monitor")
                })
                .unwrap_or(false)
        })
}

pub async fn run(url: &str, pid: Option<u32>, every: Duration, count: u64) -> anyhow::Result<()> {
    let pid = pid
        .or_else(find_service_pid)
        .ok_or_else(|| anyhow::anyhow!("no running search-img process found; pass --pid"))?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let health_url = format!("{}/api/v1/health", url.trim_end_matches('/'));
    println!("monitoring pid {pid}, {health_url}, budget {BUDGET_MB:.0} MB");
    let mut n = 0;
    loop {
        let t = Instant::now();
        let health = match client.get(&health_url).send().await {
            Ok(r) => format!("{} in {} ms", r.status().as_u16(), t.elapsed().as_millis()),
            Err(e) => format!("unreachable ({e})"),
        };
        match memory_mb(pid) {
            Some((rss, peak)) => println!(
                "rss {rss:7.1} MB ({:4.1}% of budget)  peak {peak:7.1} MB  {}  health {health}",
                rss / BUDGET_MB * 100.0,
                if peak > BUDGET_MB {
                    "OVER BUDGET"
                } else {
                    "ok"
                },
            ),
            None => {
                println!("process {pid} has exited");
                return Ok(());
            }
        }
        n += 1;
        if count > 0 && n >= count {
            return Ok(());
        }
        tokio::time::sleep(every).await;
    }
}
