//! `bench-inventory`: heartbeats of N simulated clusters at 1 Hz through a
//! real nats-server into a real `flotilla-inventory` process. Prints the
//! inventory's CPU use and heartbeat-to-KV latency next to a baseline taken
//! in the same run: a plain KV put seen by the same kind of KV watch.
//!
//! Run with `scripts/bench-inventory` (builds both binaries first).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use flotilla_integration::NatsServer;
use flotilla_proto::v1;
use futures::StreamExt;
use prost::Message;

#[derive(Debug, Parser)]
struct Args {
    /// Simulated clusters, each sending one heartbeat a second.
    #[arg(long, default_value_t = 1000)]
    clusters: usize,
    /// Measured seconds, after the warm-up.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Seconds before measuring (every cluster joins in the first one).
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    /// GPUs per simulated cluster (heartbeat size).
    #[arg(long, default_value_t = 8)]
    gpus: usize,
    /// Heartbeats that change only their GPUs' gauges, as an idle fleet's
    /// do: the inventory writes them once per refresh, not each second.
    /// Without it every heartbeat changes a label and is written.
    #[arg(long)]
    steady: bool,
}

type Sent = Arc<Mutex<HashMap<(String, u64), Instant>>>;

fn heartbeat(cluster: &str, seq: u64, gpus: usize, steady: bool) -> v1::ClusterHeartbeat {
    let region = if steady { 0 } else { seq % 3 };
    let gpus = (0..gpus)
        .map(|i| v1::GpuDevice {
            index: i as u32,
            uuid: format!("GPU-{cluster}-{i}"),
            model: "H100-80GB".into(),
            memory_total_bytes: 80 << 30,
            memory_free_bytes: 60 << 30,
            utilization_percent: (seq % 100) as u32,
            temperature_celsius: 55,
            ..Default::default()
        })
        .collect();
    v1::ClusterHeartbeat {
        cluster: cluster.into(),
        sequence: seq,
        sent_at_unix_ms: flotilla_kit::now_unix_ms(),
        executor_instance: format!("bench-{cluster}"),
        executor_version: "bench".into(),
        inventory: Some(v1::ClusterInventory {
            labels: [
                ("region".to_string(), format!("r{region}")),
                ("env".to_string(), "prod".to_string()),
            ]
            .into(),
            gpus,
            cpu_cores: 96,
            memory_bytes: 1 << 40,
            cost_per_gpu_hour: 2.5,
            source: v1::InventorySource::Declared.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    flotilla_integration::bench::cpu_seconds(pid)
        .with_context(|| format!("reading /proc/{pid}/stat"))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server = NatsServer::start().await?;
    let client = server.connect().await?;
    let bus = server.provisioned_bus("bench").await?;

    let inventory_bin = std::env::current_exe()?
        .parent()
        .map(|d| d.join("flotilla-inventory"))
        .unwrap_or_else(|| PathBuf::from("flotilla-inventory"));
    if !inventory_bin.is_file() {
        bail!(
            "{} not found; run scripts/bench-inventory, which builds it",
            inventory_bin.display()
        );
    }
    let mut inventory = tokio::process::Command::new(&inventory_bin)
        .args(["--nats-url", &server.url(), "--http-addr", "127.0.0.1:0"])
        .env("FLOTILLA_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", inventory_bin.display()))?;
    let inventory_pid = inventory.id().context("inventory exited")?;

    // Baseline: the same KV watch path, fed by plain puts.
    let scratch = bus
        .jetstream
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: "bench_baseline".into(),
            history: 1,
            ..Default::default()
        })
        .await?;
    let clusters_kv = bus.jetstream.get_key_value("clusters").await?;

    let sent: Sent = Arc::default();
    let baseline_sent: Sent = Arc::default();
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let baseline_latencies = Arc::new(Mutex::new(Vec::<f64>::new()));

    for (kv, sent, out) in [
        (clusters_kv.clone(), sent.clone(), latencies.clone()),
        (
            scratch.clone(),
            baseline_sent.clone(),
            baseline_latencies.clone(),
        ),
    ] {
        let measuring = measuring.clone();
        let mut watch = kv.watch_all().await?;
        tokio::spawn(async move {
            while let Some(Ok(entry)) = watch.next().await {
                let seen = Instant::now();
                let Ok(record) = v1::ClusterRecord::decode(entry.value) else {
                    continue;
                };
                let key = (record.name.clone(), record.last_heartbeat_sequence);
                let started = sent.lock().ok().and_then(|mut s| s.remove(&key));
                if let Some(t) = started
                    && measuring.load(std::sync::atomic::Ordering::Relaxed)
                    && let Ok(mut out) = out.lock()
                {
                    out.push(seen.duration_since(t).as_secs_f64() * 1000.0);
                }
            }
        });
    }

    let names: Vec<String> = (0..args.clusters)
        .map(|i| format!("bench-{i:04}"))
        .collect();
    let telemetry: Vec<String> = names
        .iter()
        .map(|n| bus.subjects.telemetry(n))
        .collect::<Result<_, _>>()?;
    let per_tick = Duration::from_secs(1) / args.clusters as u32;
    let total_ticks = (args.warmup + args.seconds) * args.clusters as u64;
    let measure_from = args.warmup * args.clusters as u64;
    let mut ticker = tokio::time::interval(per_tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut cpu_start = (0.0, 0.0, 0.0, Instant::now());
    let nats_pid = server.pid().context("nats-server not running")?;
    let me = std::process::id();

    println!(
        "feeding {} clusters x 1 Hz ({} GPUs each) for {} s after {} s warm-up ...",
        args.clusters, args.gpus, args.seconds, args.warmup
    );
    for tick in 0..total_ticks {
        ticker.tick().await;
        if tick == measure_from {
            measuring.store(true, std::sync::atomic::Ordering::Relaxed);
            cpu_start = (
                cpu_seconds(inventory_pid)?,
                cpu_seconds(nats_pid)?,
                cpu_seconds(me)?,
                Instant::now(),
            );
        }
        let i = (tick % args.clusters as u64) as usize;
        let seq = tick / args.clusters as u64 + 1;
        let hb = heartbeat(&names[i], seq, args.gpus, args.steady);
        let payload = Bytes::from(hb.encode_to_vec());
        let measured = tick >= measure_from;
        if measured && let Ok(mut s) = sent.lock() {
            s.insert((names[i].clone(), seq), Instant::now());
        }
        client
            .publish(telemetry[i].clone(), payload.clone())
            .await?;
        // The baseline sees the same record written by a plain put, at the
        // same rate, so both paths share the server's load.
        let baseline_key = format!("b{i}");
        let mut record = v1::ClusterRecord {
            name: baseline_key.clone(),
            last_heartbeat_sequence: seq,
            ..Default::default()
        };
        record.inventory.clone_from(&hb.inventory);
        if measured && let Ok(mut s) = baseline_sent.lock() {
            s.insert((baseline_key.clone(), seq), Instant::now());
        }
        let scratch = scratch.clone();
        tokio::spawn(async move {
            let _ = scratch
                .put(baseline_key, Bytes::from(record.encode_to_vec()))
                .await;
        });
    }
    let wall = cpu_start.3.elapsed().as_secs_f64();
    let cpu_inventory = (cpu_seconds(inventory_pid)? - cpu_start.0) / wall * 100.0;
    let cpu_nats = (cpu_seconds(nats_pid)? - cpu_start.1) / wall * 100.0;
    let cpu_me = (cpu_seconds(me)? - cpu_start.2) / wall * 100.0;
    // Let the last writes land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    measuring.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = inventory.start_kill();

    let mut lat = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    let mut base = baseline_latencies
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    lat.sort_by(f64::total_cmp);
    base.sort_by(f64::total_cmp);
    let expected = args.seconds as usize * args.clusters;
    let row = |name: &str, v: &[f64]| {
        println!(
            "{name:<34} {:>8.2} {:>8.2} {:>8.2} {:>9}",
            percentile(v, 0.5),
            percentile(v, 0.99),
            v.last().copied().unwrap_or(f64::NAN),
            v.len()
        )
    };
    println!();
    println!(
        "{:<34} {:>8} {:>8} {:>8} {:>9}",
        "latency (ms)", "p50", "p99", "max", "samples"
    );
    row("heartbeat -> KV (inventory)", &lat);
    row("put -> KV watch (baseline)", &base);
    println!(
        "{:<34} {:>7.1}x {:>7.1}x",
        "ratio inventory / baseline",
        percentile(&lat, 0.5) / percentile(&base, 0.5),
        percentile(&lat, 0.99) / percentile(&base, 0.99)
    );
    println!();
    println!("CPU, % of one core, over {wall:.1} s:");
    println!("  inventory        {cpu_inventory:6.1} %");
    println!("  nats-server      {cpu_nats:6.1} %");
    println!("  load generator   {cpu_me:6.1} %  (this process, incl. the baseline writer)");
    println!();
    let coverage = lat.len() as f64 / expected as f64 * 100.0;
    if args.steady {
        println!(
            "records written: {} for {expected} heartbeats ({coverage:.1} %; the rest only refreshed liveness in memory)",
            lat.len()
        );
        println!(
            "goal (inventory CPU < 20 %): {}",
            if cpu_inventory < 20.0 {
                "met"
            } else {
                "NOT met"
            }
        );
        return Ok(());
    }
    println!(
        "heartbeats measured: {} of {expected} sent ({coverage:.1} %)",
        lat.len()
    );
    let p99 = percentile(&lat, 0.99);
    let pass = cpu_inventory < 20.0 && p99 < 50.0 && coverage > 95.0;
    println!(
        "goal (inventory CPU < 20 %, p99 < 50 ms, > 95 % of heartbeats reach KV): {}",
        if pass { "met" } else { "NOT met" }
    );
    Ok(())
}
