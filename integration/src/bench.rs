//! What the benchmark binaries (`src/bin/bench-*.rs`) share: ports for
//! the processes they start, waiting for those to answer, and the line
//! that says which CPU a figure was measured on.

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
