//! `bench-gateway`: the gateway's added latency and its maximum request
//! rate, against a baseline measured in the same run: the same requests
//! sent straight to the one real `flotilla-runner` behind it.
//!
//! One run starts a nats-server, a `flotilla-runner` process with the
//! SmolLM2 GGUF, registers it in KV `replicas` as an executor would, and
//! starts a `flotilla-gateway` process in front of it. A closed-loop load
//! generator (N keep-alive connections, each sending its next request when
//! the last answer is read) then measures, directly and through the
//! gateway, two fast stub-free requests:
//!
//! - `GET /v1/models`: the runner answers it; the gateway answers it from
//!   its own replica table (the gateway's HTTP stack, auth, no proxying);
//! - `POST /v1/chat/completions` with no messages: the runner refuses it
//!   at once (400) without running the model; through the gateway it is
//!   routed and proxied like any completion (the whole proxy path).
//!
//! First with one connection (latency: p50, p99), then with many (the
//! maximum rate). Then the multi-cluster path: a global gateway that
//! reaches the replica's cluster through its edge (a second
//! `flotilla-gateway` run with `--cluster`) over mutual TLS, two hops,
//! against the same direct baseline. Build the services first:
//!
//! ```text
//! cargo build -p flotilla-runner -p flotilla-gateway -p flotilla-integration --bin bench-gateway
//! "$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"/debug/bench-gateway
//! ```
//!
//! It prints the target directory's path in its reproduce line.

#![allow(clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use flotilla_integration::bench::{cpu_line, free_port, wait_until};
use flotilla_integration::{NatsServer, shipped_model};
use flotilla_kit::RecordStore;
use flotilla_proto::v1::{
    ClusterHealth, ClusterInventory, ClusterRecord, ReplicaPhase, ReplicaStatus,
};
use tokio::process::{Child, Command};

const KEY: &str = "bench-key";
const MODEL: &str = "smollm2";

#[derive(Debug, Parser)]
struct Args {
    /// Seconds measured per target and load.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Alternating direct/gateway rounds the seconds are split into.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Seconds of unmeasured requests before each measurement.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Connections of the maximum-rate runs.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Where `flotilla-runner` and `flotilla-gateway` are; default: next to
    /// this binary.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    #[arg(long)]
    model: Option<PathBuf>,
}

fn spawn(binary: &Path, args: &[String]) -> anyhow::Result<Child> {
    Command::new(binary)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} (build it first)", binary.display()))
}

#[derive(Clone, Copy, PartialEq)]
enum Route {
    Models,
    RefusedChat,
}

impl Route {
    fn label(self) -> &'static str {
        match self {
            Self::Models => "GET /v1/models",
            Self::RefusedChat => "POST /v1/chat/completions (400)",
        }
    }
}

struct Measured {
    requests: usize,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
}

/// One connection's closed loop until `until`; latencies in microseconds
/// of the requests that started after `measure_from`.
async fn one_connection(
    base: String,
    route: Route,
    measure_from: Instant,
    until: Instant,
) -> anyhow::Result<Vec<u32>> {
    // One client per connection: its own keep-alive connection.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .tcp_nodelay(true)
        .build()?;
    let models = format!("{base}/v1/models");
    let chat = format!("{base}/v1/chat/completions");
    let body = bytes::Bytes::from(format!(r#"{{"model":"{MODEL}","messages":[]}}"#));
    let mut latencies = Vec::with_capacity(1 << 16);
    loop {
        let start = Instant::now();
        if start >= until {
            return Ok(latencies);
        }
        let request = match route {
            Route::Models => http.get(&models),
            Route::RefusedChat => http
                .post(&chat)
                .header("content-type", "application/json")
                .body(body.clone()),
        };
        let answer = request.bearer_auth(KEY).send().await?;
        let status = answer.status().as_u16();
        answer.bytes().await?;
        let expected = if route == Route::Models { 200 } else { 400 };
        if status != expected {
            bail!("{} answered {status}, not {expected}", route.label());
        }
        if start >= measure_from {
            latencies.push(u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX));
        }
    }
}

/// One closed-loop run: the latencies (µs) of the measured seconds.
async fn run_once(
    base: &str,
    route: Route,
    connections: usize,
    warmup: Duration,
    seconds: Duration,
) -> anyhow::Result<Vec<u32>> {
    let measure_from = Instant::now() + warmup;
    let until = measure_from + seconds;
    let tasks: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(one_connection(base.to_string(), route, measure_from, until)))
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    Ok(all)
}

fn summarise(mut all: Vec<u32>, seconds: Duration) -> anyhow::Result<Measured> {
    if all.is_empty() {
        bail!("no request completed");
    }
    all.sort_unstable();
    let at = |q: f64| f64::from(all[((all.len() - 1) as f64 * q).round() as usize]) / 1000.0;
    Ok(Measured {
        requests: all.len(),
        seconds: seconds.as_secs_f64(),
        p50_ms: at(0.50),
        p99_ms: at(0.99),
    })
}

/// Direct and through the gateway in alternating rounds, so that both see
/// the same noise from whatever else shares the machine.
async fn compare(
    direct: &str,
    gateway: &str,
    route: Route,
    connections: usize,
    args: &Args,
) -> anyhow::Result<(Measured, Measured)> {
    let rounds = args.rounds.max(1);
    let warmup = Duration::from_secs(args.warmup);
    let round = Duration::from_secs_f64(args.seconds as f64 / f64::from(rounds));
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        // Only the first round of each warms up.
        let warm = if i == 0 { warmup } else { Duration::ZERO };
        a.extend(run_once(direct, route, connections, warm, round).await?);
        b.extend(run_once(gateway, route, connections, warm, round).await?);
    }
    let total = round * rounds;
    Ok((summarise(a, total)?, summarise(b, total)?))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no folder of this binary")?
            .to_path_buf(),
    };
    let model = args.model.clone().unwrap_or_else(shipped_model);
    if !model.is_file() {
        bail!("{} missing; run scripts/install-tools", model.display());
    }

    let server = NatsServer::start().await?;
    let runner_addr = free_port()?;
    let _runner = spawn(
        &bin_dir.join("flotilla-runner"),
        &[
            "--model".into(),
            model.display().to_string(),
            "--served-model-name".into(),
            MODEL.into(),
            "--addr".into(),
            runner_addr.to_string(),
        ],
    )?;
    let runner = format!("http://{runner_addr}");
    wait_until(
        &format!("{runner}/health"),
        "",
        Some(KEY),
        Duration::from_secs(120),
    )
    .await?;

    // What the runner's executor would write.
    let bus = server.provisioned_bus("bench").await?;
    let replicas = RecordStore::<ReplicaStatus>::open(&bus, "replicas").await?;
    let replica = ReplicaStatus {
        replica_id: "bench-1".into(),
        cluster: "local".into(),
        deployment: "bench".into(),
        phase: ReplicaPhase::Ready.into(),
        endpoint: runner.clone(),
        model: MODEL.into(),
        region: "local".into(),
        ..Default::default()
    };
    replicas
        .update("local.bench-1", |_| Some(replica.clone()))
        .await?;

    let gateway_addr = free_port()?;
    let _gateway = spawn(
        &bin_dir.join("flotilla-gateway"),
        &[
            "--nats-url".into(),
            server.url(),
            "--listen".into(),
            gateway_addr.to_string(),
            "--region".into(),
            "local".into(),
            "--api-key".into(),
            KEY.into(),
        ],
    )?;
    let gateway = format!("http://{gateway_addr}");
    wait_until(
        &format!("{gateway}/v1/models"),
        MODEL,
        Some(KEY),
        Duration::from_secs(30),
    )
    .await?;

    // The multi-cluster path: the same runner also recorded as a replica
    // of cluster `remote` (region `remote`, so the gateway above, of
    // region `local`, keeps going direct), that cluster's edge serving
    // HTTPS with client certificates required, and a global gateway of
    // region `remote` that knows the edge from KV clusters (as the
    // cluster's executor would report it) and presents its own
    // certificate.
    let remote = ReplicaStatus {
        replica_id: "bench-2".into(),
        cluster: "remote".into(),
        region: "remote".into(),
        ..replica.clone()
    };
    replicas
        .update("remote.bench-2", |_| Some(remote.clone()))
        .await?;
    let pki = tempfile::tempdir()?;
    let ca = flotilla_tls::Authority::generate("bench CA")?;
    ca.write_cert(&pki.path().join("ca.crt"))?;
    let (edge_cert, edge_key) = ca
        .issue_server(&["127.0.0.1".into()])?
        .write(pki.path(), "edge")?;
    let (client_cert, client_key) = ca.issue_client("gateway")?.write(pki.path(), "gateway")?;
    let path = |p: &Path| p.display().to_string();
    let edge_addr = free_port()?;
    let edge_local = free_port()?;
    let _edge = spawn(
        &bin_dir.join("flotilla-gateway"),
        &[
            "--nats-url".into(),
            server.url(),
            "--cluster".into(),
            "remote".into(),
            "--listen".into(),
            edge_addr.to_string(),
            "--local-listen".into(),
            edge_local.to_string(),
            "--tls-cert".into(),
            path(&edge_cert),
            "--tls-key".into(),
            path(&edge_key),
            "--tls-client-ca".into(),
            path(&pki.path().join("ca.crt")),
        ],
    )?;
    wait_until(
        &format!("http://{edge_local}/v1/models"),
        MODEL,
        Some(KEY),
        Duration::from_secs(30),
    )
    .await?;
    let clusters = RecordStore::<ClusterRecord>::open(&bus, "clusters").await?;
    let cluster = ClusterRecord {
        name: "remote".into(),
        health: ClusterHealth::Healthy.into(),
        inventory: Some(ClusterInventory {
            edge_url: format!("https://{edge_addr}"),
            ..Default::default()
        }),
        ..Default::default()
    };
    clusters.update("remote", |_| Some(cluster.clone())).await?;
    let global_addr = free_port()?;
    let _global = spawn(
        &bin_dir.join("flotilla-gateway"),
        &[
            "--nats-url".into(),
            server.url(),
            "--listen".into(),
            global_addr.to_string(),
            "--region".into(),
            "remote".into(),
            "--api-key".into(),
            KEY.into(),
            "--edge-ca".into(),
            path(&pki.path().join("ca.crt")),
            "--edge-client-cert".into(),
            path(&client_cert),
            "--edge-client-key".into(),
            path(&client_key),
        ],
    )?;
    let global = format!("http://{global_addr}");
    wait_until(
        &format!("{global}/v1/models"),
        MODEL,
        Some(KEY),
        Duration::from_secs(30),
    )
    .await?;
    // The first request that crosses both hops proves the path (and the
    // certificates) before anything is measured.
    let probe = reqwest::Client::new()
        .post(format!("{global}/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(format!(r#"{{"model":"{MODEL}","messages":[]}}"#))
        .send()
        .await?;
    let via = probe
        .headers()
        .get("x-flotilla-cluster")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if probe.status() != 400 || via != "remote" {
        bail!(
            "the global gateway did not reach the replica through the edge: {} (cluster {via:?}): {}",
            probe.status(),
            probe.text().await.unwrap_or_default()
        );
    }

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "bench-gateway: {cpus} CPUs, load average {}, {} s per target in {} alternating rounds after {} s warm-up",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        args.seconds,
        args.rounds,
        args.warmup
    );
    println!(
        "{:<34} {:>5} {:>8} {:>10} {:>9} {:>9}",
        "route", "conns", "target", "req/s", "p50 ms", "p99 ms"
    );
    let mut worst_p99_overhead: f64 = 0.0;
    for route in [Route::Models, Route::RefusedChat] {
        for connections in [1, args.connections] {
            let (direct, through) = compare(&runner, &gateway, route, connections, &args).await?;
            for (target, m) in [("direct", &direct), ("gateway", &through)] {
                println!(
                    "{:<34} {:>5} {:>8} {:>10.0} {:>9.3} {:>9.3}",
                    route.label(),
                    connections,
                    target,
                    m.rate(),
                    m.p50_ms,
                    m.p99_ms
                );
            }
            let p99_overhead = through.p99_ms - direct.p99_ms;
            println!(
                "{:<34} {:>5} {:>8} {:>9.2}x {:>+9.3} {:>+9.3}",
                "  gateway - direct (rate: ratio)",
                connections,
                "",
                through.rate() / direct.rate(),
                through.p50_ms - direct.p50_ms,
                p99_overhead
            );
            if connections == 1 {
                worst_p99_overhead = worst_p99_overhead.max(p99_overhead);
            }
        }
    }
    println!(
        "p99 overhead at one connection: {worst_p99_overhead:.3} ms (goal < 1 ms: {})",
        if worst_p99_overhead < 1.0 {
            "met"
        } else {
            "missed"
        }
    );
    println!();
    println!(
        "global gateway -> cluster edge (mutual TLS) -> replica, against the replica directly:"
    );
    let mut worst_two_hops: f64 = 0.0;
    for connections in [1, args.connections] {
        let route = Route::RefusedChat;
        let (direct, through) = compare(&runner, &global, route, connections, &args).await?;
        for (target, m) in [("direct", &direct), ("2 hops", &through)] {
            println!(
                "{:<34} {:>5} {:>8} {:>10.0} {:>9.3} {:>9.3}",
                route.label(),
                connections,
                target,
                m.rate(),
                m.p50_ms,
                m.p99_ms
            );
        }
        let p99_overhead = through.p99_ms - direct.p99_ms;
        println!(
            "{:<34} {:>5} {:>8} {:>9.2}x {:>+9.3} {:>+9.3}",
            "  2 hops - direct (rate: ratio)",
            connections,
            "",
            through.rate() / direct.rate(),
            through.p50_ms - direct.p50_ms,
            p99_overhead
        );
        if connections == 1 {
            worst_two_hops = p99_overhead;
        }
    }
    println!(
        "p99 added by the two hops at one connection: {worst_two_hops:.3} ms (goal < 2 ms: {})",
        if worst_two_hops < 2.0 {
            "met"
        } else {
            "missed"
        }
    );
    println!("cpu: {}", cpu_line());
    println!(
        "reproduce: cargo build -p flotilla-runner -p flotilla-gateway -p flotilla-integration --bin bench-gateway && {} --seconds {} --rounds {} --warmup {} --connections {}",
        std::env::current_exe()?.display(),
        args.seconds,
        args.rounds,
        args.warmup,
        args.connections
    );
    Ok(())
}
