//! Assembling a fleet: the control services as tasks of one set in this
//! process, and the simulated clusters whose executors join them.
//! `flotilla up` and the integration-test harness both start fleets here,
//! so a service added to the fleet, or a flag of a simulated cluster's
//! executor, is added in one place.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use flotilla_kit::{BusConfig, Shutdown};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

/// The shipped model, SmolLM2-135M-Instruct as a Q4_1 GGUF, where
/// `scripts/install-tools` puts it (relative to a checkout).
pub const SHIPPED_MODEL: &str = ".tools/models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The control services of a fleet, each with its settings; the ones left
/// out (`None`) are not started.
#[derive(Default)]
pub struct ControlPlane {
    pub inventory: Option<flotilla_inventory::Config>,
    pub placement: Option<flotilla_placement::Config>,
    pub model_provisioner: Option<flotilla_model_provisioner::Config>,
    pub rollout: Option<flotilla_rollout::Config>,
    pub gateway: Option<flotilla_gateway::Config>,
    pub control_api: Option<flotilla_control_api::Config>,
}

/// The services of a started [`ControlPlane`].
pub struct Started {
    /// One task per service; one that ends says which service stopped and
    /// why.
    pub services: JoinSet<anyhow::Result<()>>,
    /// Where the gateway listens, once it does.
    pub gateway: Option<oneshot::Receiver<SocketAddr>>,
    /// Where the gRPC control API listens, once it does.
    pub control_api: Option<oneshot::Receiver<SocketAddr>>,
}

impl ControlPlane {
    /// Every control service on `bus` with the defaults of its own command
    /// line (and its `FLOTILLA_*` variables), health endpoints on free
    /// loopback ports; the gateway on `gateway`, the gRPC control API on
    /// `grpc`. What `flotilla up` runs.
    pub fn local(bus: &BusConfig, gateway: SocketAddr, grpc: SocketAddr) -> anyhow::Result<Self> {
        let health = ["--http-addr", "127.0.0.1:0"];
        let mut inventory =
            flotilla_inventory::Args::try_parse_from(["flotilla-inventory"].iter().chain(&health))?
                .validate()?;
        inventory.bus = bus.clone();
        let mut placement =
            flotilla_placement::Args::try_parse_from(["flotilla-placement"].iter().chain(&health))?
                .validate()?;
        placement.bus = bus.clone();
        let mut model_provisioner = flotilla_model_provisioner::Args::try_parse_from(
            ["flotilla-model-provisioner"].iter().chain(&health),
        )?
        .validate()?;
        model_provisioner.bus = bus.clone();
        let mut rollout =
            flotilla_rollout::Args::try_parse_from(["flotilla-rollout"].iter().chain(&health))?
                .validate()?;
        rollout.bus = bus.clone();
        let grpc = grpc.to_string();
        let mut control_api = flotilla_control_api::Args::try_parse_from(
            ["flotilla-control-api", "--listen", &grpc]
                .iter()
                .chain(&health),
        )?
        .validate()?;
        control_api.bus = bus.clone();
        let listen = gateway.to_string();
        let mut gateway =
            flotilla_gateway::Args::try_parse_from(["flotilla-gateway", "--listen", &listen])?
                .validate()?;
        gateway.bus = bus.clone();
        // The local fleet's front door serves every region and asks for no
        // API key, whatever the environment says.
        gateway.region = String::new();
        gateway.api_keys = Vec::new();
        Ok(Self {
            inventory: Some(inventory),
            placement: Some(placement),
            model_provisioner: Some(model_provisioner),
            rollout: Some(rollout),
            gateway: Some(gateway),
            control_api: Some(control_api),
        })
    }

    /// Starts each service given, all stopping with `shutdown`.
    pub fn start(self, shutdown: &Shutdown) -> Started {
        let mut services = JoinSet::new();
        let stop = || shutdown.clone();
        if let Some(config) = self.inventory {
            let stop = stop();
            services.spawn(async move {
                flotilla_inventory::run(config, stop)
                    .await
                    .map_err(|e| anyhow::anyhow!("inventory: {e}"))
            });
        }
        if let Some(config) = self.placement {
            let stop = stop();
            services.spawn(async move {
                flotilla_placement::run(config, stop)
                    .await
                    .map_err(|e| anyhow::anyhow!("placement: {e}"))
            });
        }
        if let Some(config) = self.model_provisioner {
            let stop = stop();
            services.spawn(async move {
                flotilla_model_provisioner::run(config, stop)
                    .await
                    .map_err(|e| anyhow::anyhow!("model-provisioner: {e}"))
            });
        }
        if let Some(config) = self.rollout {
            let stop = stop();
            services.spawn(async move {
                flotilla_rollout::run(config, stop)
                    .await
                    .map_err(|e| anyhow::anyhow!("rollout: {e}"))
            });
        }
        let gateway = self.gateway.map(|config| {
            let (bound, addr) = oneshot::channel();
            let stop = stop();
            services.spawn(async move {
                flotilla_gateway::run(config, stop, Some(bound))
                    .await
                    .map_err(|e| anyhow::anyhow!("gateway: {e}"))
            });
            addr
        });
        let control_api = self.control_api.map(|config| {
            let (bound, addr) = oneshot::channel();
            let stop = stop();
            services.spawn(async move {
                flotilla_control_api::run(config, stop, Some(bound))
                    .await
                    .map_err(|e| anyhow::anyhow!("control-api: {e}"))
            });
            addr
        });
        Started {
            services,
            gateway,
            control_api,
        }
    }
}

/// A simulated cluster: an executor with declared GPUs, labels and a cost.
#[derive(Debug, Clone)]
pub struct SimulatedCluster {
    pub name: String,
    pub labels: Vec<String>,
    /// Declared GPUs, e.g. `2xH100-80GB`.
    pub gpus: String,
    pub cost_per_gpu_hour: f64,
}

impl SimulatedCluster {
    pub fn new(name: &str, gpus: &str, labels: &[&str], cost_per_gpu_hour: f64) -> Self {
        Self {
            name: name.into(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
            gpus: gpus.into(),
            cost_per_gpu_hour,
        }
    }

    /// The flags of this cluster's executor (`flotilla-executor`, or
    /// `flotilla executor --`): the bus at `nats_url`, its name, labels,
    /// declared GPUs and cost, and a model cache of its own under
    /// `cache_root`. Its exit stops its replicas (`--restart-grace 0`):
    /// the local fleet stops as a whole.
    pub fn executor_flags(&self, nats_url: &str, cache_root: &Path) -> Vec<OsString> {
        let mut flags: Vec<OsString> = ["--nats-url", nats_url, "--cluster", &self.name]
            .map(OsString::from)
            .to_vec();
        for label in &self.labels {
            flags.extend(["--label".into(), label.into()]);
        }
        flags.extend(
            [
                "--gpus",
                &self.gpus,
                "--gpu-source",
                "declared",
                "--cost-per-gpu-hour",
                &self.cost_per_gpu_hour.to_string(),
                "--restart-grace",
                "0s",
                "--model-cache-dir",
            ]
            .map(OsString::from),
        );
        flags.push(cache_root.join(&self.name).into());
        flags
    }
}

/// The three clusters of `flotilla up`.
pub fn local_clusters() -> [SimulatedCluster; 3] {
    [
        SimulatedCluster::new(
            "eu-west",
            "2xH100-80GB",
            &["region=eu-west-1", "env=prod"],
            2.9,
        ),
        SimulatedCluster::new(
            "us-east",
            "4xA100-80GB",
            &["region=us-east-1", "env=prod"],
            2.1,
        ),
        SimulatedCluster::new(
            "ap-south",
            "2xL4-24GB",
            &["region=ap-south-1", "env=canary"],
            0.8,
        ),
    ]
}

/// The executor's own command line, inside `flotilla executor -- ...`.
#[derive(Debug, Parser)]
#[command(name = "flotilla executor")]
struct ExecutorCommandLine {
    #[command(flatten)]
    executor: flotilla_executor::ExecutorArgs,
}

/// An executor's flags read as `flotilla executor -- FLAGS` reads them
/// (unset flags from their `FLOTILLA_*` variables).
pub fn executor_args<I, T>(flags: I) -> anyhow::Result<flotilla_executor::ExecutorArgs>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let line = ExecutorCommandLine::try_parse_from(
        std::iter::once(OsString::from("flotilla executor"))
            .chain(flags.into_iter().map(Into::into)),
    )?;
    Ok(line.executor)
}

/// Stops a process of the fleet: SIGTERM, which lets nats-server flush
/// its store and an executor stop its runners, then SIGKILL if it has not
/// exited within 10 s.
pub async fn stop_gracefully(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = tokio::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await;
        if tokio::time::timeout(std::time::Duration::from_secs(10), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

/// The first `name` in a folder of `PATH`.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_simulated_clusters_flags_read_back_as_that_cluster() -> anyhow::Result<()> {
        let cluster = SimulatedCluster::new(
            "ap-south",
            "2xL4-24GB",
            &["region=ap-south-1", "env=canary"],
            0.8,
        );
        let args = executor_args(
            cluster.executor_flags("nats://127.0.0.1:4999", Path::new("/data/cache")),
        )?;
        assert_eq!(args.bus.nats_url, "nats://127.0.0.1:4999");
        assert_eq!(args.cluster.as_deref(), Some("ap-south"));
        assert_eq!(args.labels, ["region=ap-south-1", "env=canary"]);
        assert_eq!(args.gpus, "2xL4-24GB");
        assert_eq!(args.gpu_source, flotilla_executor::GpuSource::Declared);
        assert_eq!(args.cost_per_gpu_hour, 0.8);
        assert_eq!(
            args.model_cache_dir.as_deref(),
            Some(Path::new("/data/cache/ap-south"))
        );
        Ok(())
    }
}
