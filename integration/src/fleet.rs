//! Starting the services of a fleet for a test, through the assembly
//! `flotilla up` uses (`flotilla_cli::fleet`): the control services in this
//! process, executors as tasks with a simulated cluster's flags, and the
//! paths of the workspace's binaries.
//!
//! The settings are the tests' own (a cluster is unhealthy after a second or
//! three, not the production default): each starter takes the bus settings,
//! so a test can run a service with a user of its own (nats_security).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_cli::fleet::{ControlPlane, SimulatedCluster, Started};
use flotilla_kit::BusConfig;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{NatsServer, workspace_root};

/// The bus settings of a client of `server`.
pub fn config(server: &NatsServer) -> BusConfig {
    // A harness URL is always valid.
    BusConfig::for_url(server.url()).unwrap_or_else(|e| panic!("{e}"))
}

/// A binary of this workspace, next to the running test (in `deps/`) or
/// bench binary.
pub fn target_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().ok();
    let beside = |dir: Option<&Path>| dir.map(|d| d.join(name)).filter(|b| b.is_file());
    let dir = exe.as_deref().and_then(Path::parent);
    let bin = beside(dir)
        .or_else(|| beside(dir.and_then(Path::parent)))
        .unwrap_or_else(|| PathBuf::from(name));
    assert!(
        bin.is_file(),
        "{} is missing: cargo build --workspace --bins builds it",
        bin.display()
    );
    bin
}

/// Starts `plane`'s services until the test ends. A service that stops
/// with an error panics with it, in a task of its own, as a crash would.
fn start(plane: ControlPlane) -> Started {
    let mut started = plane.start(&CancellationToken::new());
    let mut services = std::mem::take(&mut started.services);
    tokio::spawn(async move {
        while let Some(done) = services.join_next().await {
            match done {
                Ok(Err(e)) => panic!("{e:#}"),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                _ => {}
            }
        }
    });
    started
}

/// Inventory's test settings: a cluster is unhealthy after
/// `unhealthy_after` without a heartbeat, checked every 100 ms.
pub fn inventory_config(bus: &BusConfig, unhealthy_after: Duration) -> flotilla_inventory::Config {
    flotilla_inventory::Config {
        bus: bus.clone(),
        http_addr: ([127, 0, 0, 1], 0).into(),
        policy: flotilla_inventory::HealthPolicy {
            unhealthy_after_ms: i64::try_from(unhealthy_after.as_millis()).unwrap_or(i64::MAX),
            left_after_ms: 600_000,
            max_clock_skew_ms: 30_000,
        },
        check_interval: Duration::from_millis(100),
    }
}

/// Placement with its default settings.
pub fn placement_config(bus: &BusConfig) -> flotilla_placement::Config {
    flotilla_placement::Config {
        bus: bus.clone(),
        http_addr: ([127, 0, 0, 1], 0).into(),
        settings: Default::default(),
        flap_probation_ms: 30_000,
    }
}

/// The model-provisioner, presets from this checkout's `.tools/models`.
pub fn model_provisioner_config(bus: &BusConfig) -> flotilla_model_provisioner::Config {
    flotilla_model_provisioner::Config {
        bus: bus.clone(),
        http_addr: ([127, 0, 0, 1], 0).into(),
        preset_dir: workspace_root().join(".tools/models"),
        takeover_after_ms: 60_000,
    }
}

/// Inventory as [`inventory_config`] sets it up.
pub fn inventory(bus: &BusConfig, unhealthy_after: Duration) {
    start(ControlPlane {
        inventory: Some(inventory_config(bus, unhealthy_after)),
        ..Default::default()
    });
}

/// Placement with its default settings.
pub fn placement(bus: &BusConfig) {
    start(ControlPlane {
        placement: Some(placement_config(bus)),
        ..Default::default()
    });
}

/// The model-provisioner, presets from `.tools/models`.
pub fn model_provisioner(bus: &BusConfig) {
    start(ControlPlane {
        model_provisioner: Some(model_provisioner_config(bus)),
        ..Default::default()
    });
}

/// inventory (unhealthy after `unhealthy_after`), placement and the
/// model-provisioner.
pub fn control_services(server: &NatsServer, unhealthy_after: Duration) {
    let bus = config(server);
    start(ControlPlane {
        inventory: Some(inventory_config(&bus, unhealthy_after)),
        placement: Some(placement_config(&bus)),
        model_provisioner: Some(model_provisioner_config(&bus)),
        ..Default::default()
    });
}

/// The rollout service in this process.
pub fn rollout(bus: &BusConfig, halt_after_failures: u32) {
    start(ControlPlane {
        rollout: Some(flotilla_rollout::Config {
            bus: bus.clone(),
            http_addr: ([127, 0, 0, 1], 0).into(),
            halt_after_failures,
        }),
        ..Default::default()
    });
}

/// The gateway on a free loopback port: its defaults (no region, no API
/// keys, the global gateway without edge TLS).
pub fn gateway_config(bus: &BusConfig) -> flotilla_gateway::Config {
    let args = <flotilla_gateway::Args as clap::Parser>::try_parse_from([
        "flotilla-gateway",
        "--listen",
        "127.0.0.1:0",
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    flotilla_gateway::Config {
        bus: bus.clone(),
        ..args.validate().unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Starts the gateway; the address it listens on.
pub async fn gateway(config: flotilla_gateway::Config) -> SocketAddr {
    let started = start(ControlPlane {
        gateway: Some(config),
        ..Default::default()
    });
    listening(started.gateway, "the gateway").await
}

/// Starts the gRPC control API on a free loopback port; its address.
pub async fn control_api(bus: &BusConfig) -> SocketAddr {
    let started = start(ControlPlane {
        control_api: Some(flotilla_control_api::Config {
            bus: bus.clone(),
            listen: ([127, 0, 0, 1], 0).into(),
            http_addr: ([127, 0, 0, 1], 0).into(),
            answer_timeout: Duration::from_secs(10),
        }),
        ..Default::default()
    });
    listening(started.control_api, "the control API").await
}

async fn listening(
    addr: Option<tokio::sync::oneshot::Receiver<SocketAddr>>,
    what: &str,
) -> SocketAddr {
    match addr {
        Some(addr) => addr
            .await
            .unwrap_or_else(|_| panic!("{what} stopped before it listened")),
        None => panic!("{what} was not started"),
    }
}

/// A simulated cluster's executor settings: the flags `flotilla up` gives
/// one (declared `gpus` such as `2xH100-80GB`, `labels`, a cost, a model
/// cache of its own under `caches`), and heartbeats every 200 ms with this
/// workspace's runner. Flags it does not set come from their `FLOTILLA_*`
/// variables, as for `flotilla up`'s executors.
pub fn executor_args(
    nats_url: &str,
    cluster: &str,
    gpus: &str,
    labels: &[&str],
    cost_per_gpu_hour: f64,
    caches: &Path,
) -> flotilla_executor::ExecutorArgs {
    let mut flags = SimulatedCluster::new(cluster, gpus, labels, cost_per_gpu_hour)
        .executor_flags(nats_url, caches);
    flags.extend(["--heartbeat-interval".into(), "200ms".into()]);
    flags.extend(["--runner-bin".into(), target_bin("flotilla-runner").into()]);
    flotilla_cli::fleet::executor_args(flags).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs an executor as a task until `stop`. Aborting the handle kills it as
/// a crash would: no more heartbeats.
pub fn start_executor(
    args: flotilla_executor::ExecutorArgs,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let config = args.validate().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        if let Err(e) = flotilla_executor::run(config, stop).await {
            panic!("executor: {e}");
        }
    })
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
