//! Starting the services of a fleet for a test, with the services' own
//! library code: the control services in this process, executors as tasks,
//! and the paths of the workspace's binaries.
//!
//! The settings are the tests' own (a cluster is unhealthy after a second or
//! three, not the production default): each starter takes the bus settings,
//! so a test can run a service with a user of its own (nats_security).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_kit::BusConfig;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{NatsServer, workspace_root};

/// The bus settings of a client of `server`.
pub fn config(server: &NatsServer) -> BusConfig {
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
        "{} is missing: cargo build --workspace --bins builds it",
        bin.display()
    );
    bin
}

fn spawn<F, E>(what: &'static str, run: F) -> JoinHandle<()>
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

/// Inventory: a cluster is unhealthy after `unhealthy_after` without a
/// heartbeat, checked every 100 ms.
pub fn inventory(bus: &BusConfig, unhealthy_after: Duration) {
    let inventory = flotilla_inventory::Config {
        bus: bus.clone(),
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
}

/// Placement with its default settings.
pub fn placement(bus: &BusConfig) {
    let placement = flotilla_placement::Config {
        bus: bus.clone(),
        http_addr: ([127, 0, 0, 1], 0).into(),
        settings: Default::default(),
        flap_probation_ms: 30_000,
    };
    spawn(
        "placement",
        flotilla_placement::run(placement, CancellationToken::new()),
    );
}

/// The model-provisioner, presets from `.tools/models`.
pub fn model_provisioner(bus: &BusConfig) {
    let provisioner = flotilla_model_provisioner::Config {
        bus: bus.clone(),
        http_addr: ([127, 0, 0, 1], 0).into(),
        preset_dir: workspace_root().join(".tools/models"),
        takeover_after_ms: 60_000,
    };
    spawn(
        "model-provisioner",
        flotilla_model_provisioner::run(provisioner, CancellationToken::new()),
    );
}

/// inventory (unhealthy after `unhealthy_after`), placement and the
/// model-provisioner.
pub fn control_services(server: &NatsServer, unhealthy_after: Duration) {
    let bus = config(server);
    inventory(&bus, unhealthy_after);
    placement(&bus);
    model_provisioner(&bus);
}

/// The rollout service in this process.
pub fn rollout(bus: &BusConfig, halt_after_failures: u32) {
    let rollout = flotilla_rollout::Config {
        bus: bus.clone(),
        http_addr: ([127, 0, 0, 1], 0).into(),
        halt_after_failures,
    };
    spawn(
        "rollout",
        flotilla_rollout::run(rollout, CancellationToken::new()),
    );
}

/// The gateway on a free loopback port: no region, no API keys.
pub fn gateway_config(bus: &BusConfig) -> flotilla_gateway::Config {
    flotilla_gateway::Config {
        bus: bus.clone(),
        listen: ([127, 0, 0, 1], 0).into(),
        region: String::new(),
        api_keys: Vec::new(),
        response_headers_timeout: Duration::from_secs(10),
    }
}

/// Starts the gateway; the address it listens on.
pub async fn gateway(config: flotilla_gateway::Config) -> SocketAddr {
    let (bound, addr) = tokio::sync::oneshot::channel();
    spawn(
        "gateway",
        flotilla_gateway::run(config, CancellationToken::new(), Some(bound)),
    );
    addr.await
        .unwrap_or_else(|_| panic!("the gateway stopped before it listened"))
}

/// Starts the gRPC control API on a free loopback port; its address.
pub async fn control_api(bus: &BusConfig) -> SocketAddr {
    let config = flotilla_control_api::Config {
        bus: bus.clone(),
        listen: ([127, 0, 0, 1], 0).into(),
        http_addr: ([127, 0, 0, 1], 0).into(),
        answer_timeout: Duration::from_secs(10),
    };
    let (bound, addr) = tokio::sync::oneshot::channel();
    spawn(
        "control-api",
        flotilla_control_api::run(config, CancellationToken::new(), Some(bound)),
    );
    addr.await
        .unwrap_or_else(|_| panic!("the control API stopped before it listened"))
}

/// A simulated cluster's executor settings: declared `gpus`
/// (`2xH100-80GB`), `labels`, a cost, a model cache of its own under
/// `caches`, heartbeats every 200 ms, and this workspace's runner.
pub fn executor_args(
    nats_url: &str,
    cluster: &str,
    gpus: &str,
    labels: &[&str],
    cost_per_gpu_hour: f64,
    caches: &Path,
) -> flotilla_executor::ExecutorArgs {
    flotilla_executor::ExecutorArgs {
        bus: flotilla_kit::BusArgs {
            nats_url: nats_url.into(),
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
    }
}

/// Runs an executor as a task until `stop`. Aborting the handle kills it as
/// a crash would: no more heartbeats.
pub fn start_executor(
    args: flotilla_executor::ExecutorArgs,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let config = args.validate().unwrap_or_else(|e| panic!("{e}"));
    spawn("executor", flotilla_executor::run(config, stop))
}

/// A simulated cluster as [`executor_args`] describes it, running until the
/// handle is aborted.
pub fn executor(
    server: &NatsServer,
    cluster: &str,
    gpus: &str,
    labels: &[&str],
    cost_per_gpu_hour: f64,
    caches: &Path,
) -> JoinHandle<()> {
    start_executor(
        executor_args(
            &server.url(),
            cluster,
            gpus,
            labels,
            cost_per_gpu_hour,
            caches,
        ),
        CancellationToken::new(),
    )
}
