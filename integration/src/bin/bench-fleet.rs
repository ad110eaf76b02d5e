//! `bench-fleet`: the whole control plane at fleet scale, against the
//! figures KubeFleet published for the same scenario (1,000 member
//! clusters, placements that pick 100, 100 concurrent three-stage
//! rollouts, a hub restart). Simulated members run in this process
//! ([`flotilla_executor::simulate`]); the hub services are the real
//! binaries, each its own process, on a real nats-server.
//!
//! Run with `scripts/bench-fleet` (builds the binaries first).

use std::time::Duration;

use clap::Parser;
use flotilla_integration::fleet_scale::{Report, Scenario, Spread};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    clusters: usize,
    #[arg(long, default_value_t = 1000)]
    deployments: usize,
    /// PickN: clusters per deployment, one replica on each.
    #[arg(long, default_value_t = 100)]
    pick: usize,
    /// Deployments rolled out at once in each rollout round.
    #[arg(long, default_value_t = 100)]
    rollouts: usize,
    /// Deployments applied per second in the placement phase.
    #[arg(long, default_value_t = 20.0)]
    apply_rate: f64,
    /// Then, on the loaded fleet, this many new deployments applied and
    /// this many rolled out, one at a time.
    #[arg(long, default_value_t = 10)]
    singles: usize,
    /// How long a simulated replica takes to become ready.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    ready_after: Duration,
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// GPUs of each simulated cluster.
    #[arg(long, default_value = "128xH100-80GB")]
    gpus: String,
    /// Instances of every hub service (2: active-active, one of each is
    /// killed in a rollout round).
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// nats-servers of the hub: 1, or 3 (streams replicated three times,
    /// one server killed in a rollout round).
    #[arg(long, default_value_t = 1)]
    nats_servers: usize,
    /// How long into a rollout round the kills come.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    kill_after: Duration,
    /// Skip the round that kills every hub service.
    #[arg(long)]
    no_hub_restart: bool,
    /// Keep the hub services' logs here (`<service>-<instance>.log`).
    #[arg(long)]
    log_dir: Option<std::path::PathBuf>,
    /// The hub services' `RUST_LOG`.
    #[arg(long, default_value = "warn")]
    service_log: String,
    /// Inventory's `--unhealthy-after` (at least three heartbeats). The
    /// simulated members share the hub's CPUs, so their heartbeats can
    /// queue for seconds at a thousand clusters on two cores.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    unhealthy_after: Duration,
    /// The longest a phase may take.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    phase_deadline: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The simulated members run in this process: `RUST_LOG` shows their
    // logs (errors only by default, so the table stays readable).
    flotilla_process::logging::init(flotilla_process::logging::LogFormat::Text, "error");
    let scenario = Scenario {
        clusters: args.clusters,
        deployments: args.deployments,
        clusters_per_deployment: args.pick,
        rollouts: args.rollouts,
        apply_rate: args.apply_rate,
        singles: args.singles,
        ready_after: args.ready_after,
        heartbeat_interval: args.heartbeat_interval,
        gpus: args.gpus,
        instances: args.instances,
        nats_servers: args.nats_servers,
        hub_restart: !args.no_hub_restart,
        kill_after: args.kill_after,
        phase_deadline: args.phase_deadline,
        log_dir: args.log_dir,
        service_log: args.service_log,
        unhealthy_after: args.unhealthy_after,
    };
    println!("machine: {}", flotilla_integration::bench::cpu_line());
    println!(
        "scenario: {} clusters (heartbeat every {:?}, unhealthy after {:?} of silence), {} deployments x PickN {} (one replica per cluster, ready {:?} after its start), applied at {}/s; rounds of {} concurrent 3-stage rollouts (20/30/50 %); {} instance(s) of each hub service; {} nats-server(s)",
        scenario.clusters,
        scenario.heartbeat_interval,
        scenario.unhealthy_after,
        scenario.deployments,
        scenario.clusters_per_deployment,
        scenario.ready_after,
        scenario.apply_rate,
        scenario.rollouts,
        scenario.instances,
        scenario.nats_servers,
    );
    let report = scenario
        .run(&mut |line| eprintln!("[bench-fleet] {line}"))
        .await?;
    print_report(&scenario, &report);
    Ok(())
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn spread(s: &Spread) -> String {
    format!("{} / {} / {}", secs(s.p50), secs(s.p90), secs(s.max))
}

/// `ours` against KubeFleet's published figure (seconds): how many times
/// faster.
fn ratio(ours: Duration, theirs: f64) -> String {
    let ours = ours.as_secs_f64();
    if ours <= 0.0 {
        return "-".into();
    }
    format!("{:.0}x", theirs / ours)
}

/// A rollout measure's row, and the same less its three stages'
/// simulated starts, beside KubeFleet's `theirs` (seconds).
fn rollout_rows(what: &str, s: &Spread, ready_after: Duration, theirs: f64) {
    let minus = Spread {
        p50: s.p50.saturating_sub(ready_after * 3),
        p90: s.p90.saturating_sub(ready_after * 3),
        max: s.max.saturating_sub(ready_after * 3),
        ..*s
    };
    println!(
        "| {what}, start -> complete | {} | {theirs:.0} s | {} |",
        spread(s),
        ratio(s.p90, theirs)
    );
    println!(
        "| the same, less 3 x {ready_after:?} simulated starts | {} | {theirs:.0} s | {} |",
        spread(&minus),
        ratio(minus.p90, theirs)
    );
}

fn print_report(scenario: &Scenario, r: &Report) {
    let ready_after = scenario.ready_after;
    println!();
    println!("| measure | Flotilla p50 / p90 / max | KubeFleet p90 (published) | ratio (p90) |");
    println!("| --- | --- | --- | --- |");
    if r.single_placed.count > 0 {
        println!(
            "| apply -> placed, one new deployment at a time into the loaded fleet (picks {} of {}) | {} | 20 s | {} |",
            scenario.clusters_per_deployment,
            scenario.clusters,
            spread(&r.single_placed),
            ratio(r.single_placed.p90, 20.0)
        );
    }
    println!(
        "| apply -> placed, {} deployments applied at {}/s (picks {} of {}) | {} | 20 s | {} |",
        scenario.deployments,
        scenario.apply_rate,
        scenario.clusters_per_deployment,
        scenario.clusters,
        spread(&r.place_placed),
        ratio(r.place_placed.p90, 20.0)
    );
    println!(
        "| apply -> placed, during {} concurrent rollouts | {} | 30 s | {} |",
        scenario.rollouts,
        spread(&r.placed_during_rollouts),
        ratio(r.placed_during_rollouts.p90, 30.0)
    );
    println!(
        "| apply -> every replica ready (includes the {:?} simulated start) | {} | - | - |",
        ready_after,
        spread(&r.place_ready)
    );
    if r.single_rollout.count > 0 {
        rollout_rows(
            &format!(
                "one 3-stage rollout at a time over {} clusters",
                scenario.clusters_per_deployment
            ),
            &r.single_rollout,
            ready_after,
            96.0,
        );
    }
    rollout_rows(
        &format!("{} concurrent 3-stage rollouts", scenario.rollouts),
        &r.rollout,
        ready_after,
        135.0,
    );
    if let (Some(p), Some(n)) = (r.restart_progressing, r.restart_new_placed) {
        let consistent = p.max(n);
        println!(
            "| hub restart (SIGKILL to every service) -> every interrupted rollout's next step and a new deployment placed, {} placements | {} | 660 s (resync) | {} |",
            r.replicas_ready / scenario.clusters_per_deployment.max(1),
            secs(consistent),
            ratio(consistent, 660.0)
        );
    }
    if let Some(c) = r.restart_consistent {
        println!(
            "| hub restart -> every rollout of the round complete | {} | - | - |",
            secs(c)
        );
    }
    if let Some(p) = r.restart_first_progress {
        println!(
            "| hub restart -> first replica progress | {} | - | - |",
            secs(p)
        );
    }
    if let Some(p) = r.restart_new_placed {
        println!(
            "| hub restart -> a deployment applied at the restart placed | {} | queued for the resync | - |",
            secs(p)
        );
    }
    if let Some((after, before)) = r.instance_loss_pause {
        println!(
            "| one of 2 instances of every service killed: longest pause in progress | {} (before the kill: {}) | - | - |",
            secs(after),
            secs(before)
        );
    }
    if let Some((after, before, name)) = &r.nats_loss_pause {
        println!(
            "| nats-server {name} of 3 killed: longest pause in progress | {} (before the kill: {}) | - | - |",
            secs(*after),
            secs(*before)
        );
    }
    println!();
    println!("| process | CPU s | CPU share of the run | peak RSS |");
    println!("| --- | --- | --- | --- |");
    let total = r.total.as_secs_f64().max(0.001);
    let mut rows = r.usage.clone();
    rows.push((
        "simulated members + bench (one process)".into(),
        r.simulator_cpu,
        r.simulator_rss,
    ));
    for (name, cpu, rss) in rows {
        println!(
            "| {name} | {cpu:.1} | {:.0} % of a core | {} MiB |",
            100.0 * cpu / total,
            rss >> 20
        );
    }
    println!(
        "(KubeFleet at 100 concurrent rollouts: hub agent > 5 cores / 11 GB, API server > 8 cores / 31 GB; restart peak 13 cores / 47 GB)"
    );
    if let Some((messages, bytes)) = r.traffic_per_placement {
        println!(
            "bus traffic of the placement phase per deployment placed (all servers, in + out, heartbeats and replica records included): {messages:.0} messages, {:.1} KiB",
            bytes / 1024.0
        );
    }
    println!(
        "end state: {} replicas ready, as desired; {} replicas started, each once; halted rollouts: {}; placements rebalanced by fleet changes: {}",
        r.replicas_ready,
        r.replicas_started,
        r.halted.len(),
        r.rebalanced
    );
    println!("the run took {}", secs(r.total));
}
