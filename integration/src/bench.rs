//! What the benchmark binaries (`src/bin/bench-*.rs`) share: ports for
//! the processes they start, waiting for those to answer, the line that
//! says which CPU a figure was measured on, and what a process used (CPU
//! seconds, peak memory).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::bail;

/// A free local TCP address for a process to listen on.
pub fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Polls `url` (with `bearer` as its API key, when given) until it
/// answers 200 with a body containing `want`.
pub async fn wait_until(
    url: &str,
    want: &str,
    bearer: Option<&str>,
    deadline: Duration,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let start = Instant::now();
    loop {
        let mut request = http.get(url);
        if let Some(key) = bearer {
            request = request.bearer_auth(key);
        }
        if let Ok(r) = request.send().await
            && r.status() == 200
            && r.text().await.is_ok_and(|t| t.contains(want))
        {
            return Ok(());
        }
        if start.elapsed() > deadline {
            bail!("{url} not ready within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The CPU's model, its count and the SIMD extensions the kernels choose
/// between: figures differ between AVX2-only and AVX-512 VNNI machines.
pub fn cpu_line() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model_name = cpu
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let flags = cpu
        .lines()
        .find_map(|l| l.strip_prefix("flags"))
        .unwrap_or_default();
    let isa: Vec<&str> = ["avx2", "avx512f", "avx512_vnni", "avx_vnni"]
        .into_iter()
        .filter(|f| flags.split_whitespace().any(|x| x == *f))
        .collect();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{model_name}; {cpus} CPUs; {}", isa.join(" "))
}

/// CPU seconds (user + system) a live process has used.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // Linux's USER_HZ is 100 on every architecture it runs on.
    Some(ticks / 100.0)
}

/// Peak resident memory of a live process, in bytes (`VmHWM`).
pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}
