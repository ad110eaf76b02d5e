//! Starting the services of a fleet for a test, with the services' own
//! library code: the control services in this process, executors as tasks,
//! and the paths of the workspace's binaries.

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_kit::BusConfig;
use tokio_util::sync::CancellationToken;

use crate::{NatsServer, workspace_root};

fn config(server: &NatsServer) -> BusConfig {
    // A harness URL is always valid.
    BusConfig::for_url(server.url()).unwrap_or_else(|e| panic!("{e}"))
}

/// A binary of this workspace, next to the running test.
pub fn target_bin(name: &str) -> PathBuf {
    let bin = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name));
    assert!(
        bin.is_file(),
        "{} is missing: cargo test --workspace builds it",
        bin.display()
    );
    bin
}

fn spawn<F, E>(what: &'static str, run: F) -> tokio::task::JoinHandle<()>
where
    F: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    tokio::spawn(async move {
        if let Err(e) = run.await {
            panic!("{what}: {e}");
        }
    })
}

/// inventory (unhealthy after `unhealthy_after`), placement and the
/// model-provisioner (presets from `.tools/models`).
pub fn control_services(server: &NatsServer, unhealthy_after: Duration) {
    let inventory = flotilla_inventory::Config {
        bus: config(server),
        http_addr: ([127, 0, 0, 1], 0).into(),
        policy: flotilla_inventory::HealthPolicy {
            unhealthy_after_ms: i64::try_from(unhealthy_after.as_millis()).unwrap_or(i64::MAX),
            left_after_ms: 600_000,
            max_clock_skew_ms: 30_000,
        },
        check_interval: Duration::from_millis(100),
    };
    spawn(
        "inventory",
        flotilla_inventory::run(inventory, CancellationToken::new()),
    );
    let placement = flotilla_placement::Config {
        bus: config(server),
        http_addr: ([127, 0, 0, 1], 0).into(),
        settings: Default::default(),
        flap_probation_ms: 30_000,
    };
    spawn(
        "placement",
        flotilla_placement::run(placement, CancellationToken::new()),
    );
    model_provisioner(server);
}

/// The model-provisioner in this process, presets from `.tools/models`.
pub fn model_provisioner(server: &NatsServer) -> tokio::task::JoinHandle<()> {
    let provisioner = flotilla_model_provisioner::Config {
        bus: config(server),
        http_addr: ([127, 0, 0, 1], 0).into(),
        preset_dir: workspace_root().join(".tools/models"),
        takeover_after_ms: 60_000,
    };
    spawn(
        "model-provisioner",
        flotilla_model_provisioner::run(provisioner, CancellationToken::new()),
    )
}

/// The rollout service in this process.
pub fn rollout(server: &NatsServer, halt_after_failures: u32) {
    let rollout = flotilla_rollout::Config {
        bus: config(server),
        http_addr: ([127, 0, 0, 1], 0).into(),
        halt_after_failures,
    };
    spawn(
        "rollout",
        flotilla_rollout::run(rollout, CancellationToken::new()),
    );
}

/// A simulated cluster: an executor with declared `gpus` (`2xH100-80GB`),
/// `labels`, a cost, and a model cache under `caches`. Aborting the handle
/// kills it as a crash would: no more heartbeats.
pub fn executor(
    server: &NatsServer,
    cluster: &str,
    gpus: &str,
    labels: &[&str],
    cost_per_gpu_hour: f64,
    caches: &Path,
) -> tokio::task::JoinHandle<()> {
    let args = flotilla_executor::ExecutorArgs {
        bus: flotilla_kit::BusArgs {
            nats_url: server.url(),
            ..Default::default()
        },
        cluster: Some(cluster.into()),
        labels: labels.iter().map(|s| s.to_string()).collect(),
        gpus: gpus.into(),
        gpu_source: flotilla_executor::GpuSource::Declared,
        cost_per_gpu_hour,
        heartbeat_interval: Duration::from_millis(200),
        model_cache_dir: Some(caches.join(cluster)),
        runner_bin: Some(target_bin("flotilla-runner")),
        ..Default::default()
    };
    let config = args.validate().unwrap_or_else(|e| panic!("{e}"));
    spawn(
        "executor",
        flotilla_executor::run(config, CancellationToken::new()),
    )
}
